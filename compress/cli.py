"""``compress`` command line: run | recover | export | methods | plugins | inspect | eval | bench | report.

Exit codes: 0 success, 1 run failure, 2 usage error. Errors are one line (``error: ...``) with a
hint; ``-v`` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _parse_set(items: list[str]) -> dict[str, Any]:
    from compress.errors import UsageError

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"--set {item!r} is not key=value; e.g. --set shots=4")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise UsageError(f"--set {item!r} has an empty key")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _dumps_json(obj: Any, **kwargs: Any) -> str:
    """Every ``--json`` output: standard JSON (NaN/inf as null; compress.io.safe_io.dumps_json)."""
    from compress.io.safe_io import dumps_json

    return dumps_json(obj, **kwargs)


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _stdout_console():
    """A rich console on stdout whose reader going away (``compress methods | head``) ends the command
    the way :func:`main` ends every other one (quietly, exit 141), not with rich's own exit 1."""
    from rich.console import Console

    class _Stdout(Console):
        def on_broken_pipe(self) -> None:
            raise BrokenPipeError

    return _Stdout()


def _fmt_num(x: float) -> str:
    for suf, m in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= m:
            return f"{x / m:.3f}{suf}"
    return f"{x:.0f}"


# ---------------------------------------------------------------------------- commands
def cmd_run(args: argparse.Namespace) -> int:

    from compress.io.recipe import Recipe, load_recipe
    from compress.pipeline.run import RunSpec, dry_run, run
    from compress.plugins import get_registry

    recipe = load_recipe(args.recipe) if args.recipe else Recipe()
    # CLI flags and --set win over the recipe, which wins over the defaults.
    run_kwargs = recipe.run_kwargs(get_registry(), method=args.method, target=args.target, seed=args.seed, calib=args.calib,
                                   recover_tokens=args.recover_tokens, recover_mode=args.recover_mode,
                                   settings=_parse_set(args.set))
    if not args.out and not args.dry_run and not args.no_save:
        from compress.errors import UsageError

        raise UsageError("--out is required (or --dry-run to plan only, --no-save to measure without saving)")
    spec = RunSpec(  # parses the target: the one place a run's target text becomes a Target
        **run_kwargs, model=args.model, out=args.out, dtype=args.dtype, device=args.device, dry_run=args.dry_run,
        overwrite=args.overwrite, trust_remote_code=args.trust_remote_code,
        progress=not args.json and not args.no_progress, resume=args.resume,
        layerwise=args.layerwise, offload_dir=args.offload_dir, evaluate=not args.no_eval, teacher=args.teacher,
        stream_weights=args.stream_weights,
        recipe=args.recipe,
    )
    if not spec.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    log = (lambda m: None) if args.json else _phase_logger(_stdout_console())
    rec = dry_run(spec, log=log) if spec.dry_run else run(spec, log=log).record
    from compress.pipeline.handoff import launch_from_env

    launch = launch_from_env()
    if launch is not None and not launch.is_main:  # under accelerate launch rank 0 reports the run
        return 0
    if args.json:
        print(_dumps_json(rec, indent=1, sort_keys=True))
        return 0
    _print_summary(rec)
    return 0


def _phase_logger(con):
    """One line per phase on stdout, with the time since the run started (in a terminal and piped);
    stderr stays for the one-line error."""
    import time

    t0 = time.perf_counter()

    def log(msg: str) -> None:
        con.print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", highlight=False, markup=False)

    return log


def _print_summary(rec: dict[str, Any]) -> None:
    from rich.table import Table

    con = _stdout_console()
    title = f"{rec['method']} → {rec['target']}" + ("  (dry run: no weights loaded)" if rec.get("dry_run") else "")
    t = Table(title=title)
    t.add_column("")
    t.add_column("dense", justify="right")
    t.add_column("pruned", justify="right")
    t.add_column("ratio", justify="right")
    d, a, r = rec["dense"], rec["achieved"], rec["ratios"]
    t.add_row("parameters", f"{d['params']:,}", f"{a['params']:,}", f"{r['params']:.2%}")
    t.add_row(f"FLOPs/token (T={d['seq_len']})", _fmt_num(d["flops_per_token"]), _fmt_num(a["flops_per_token"]),
              f"{r['flops']:.2%}")
    t.add_row(f"KV bytes/token ({d['dtype']})", f"{d['kv_bytes_per_token']:,}", f"{a['kv_bytes_per_token']:,}",
              f"{r['kv']:.2%}")
    q = rec.get("quality")
    if q:
        t.add_row(f"perplexity ({q['dense']['tokens']:,} held-out tokens)", f"{q['dense']['ppl']:,.2f}",
                  f"{q['pruned']['ppl']:,.2f}", f"{q['ratio']:.2f}×")
    con.print(t)
    plan = rec.get("plan") or (rec.get("notes") or {}).get("widths")
    if plan:
        con.print(f"plan: {json.dumps(plan)}")
    layers = rec.get("layers_after") or (rec.get("achieved") or {}).get("layers")
    if layers:
        uniq = {json.dumps(x, sort_keys=True) for x in layers}
        if len(uniq) == 1:
            con.print(f"every layer: {layers[0]}")
    if rec.get("export"):
        e = rec["export"]
        if e.get("path"):
            con.print(f"saved [bold]{e['path']}[/] ({e['kind']} format: {e['reason']})")
        else:
            con.print(f"would export in {e['kind']} format ({e['reason']})")
    if rec.get("memory"):
        m = rec["memory"]
        work = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in sorted(m["working_bytes"].items(), key=lambda kv: -kv[1]))
        con.print(f"estimated peak memory ({m['mode']}): {m['peak_bytes'] / 2**30:.2f} GiB = weights "
                  f"{m['weights_bytes'] / 2**30:.2f} GiB" + (f" + {work} GiB" if work else ""))
    if rec.get("timing_s"):
        con.print(f"time: load {rec['timing_s']['load']:.1f}s, prune {rec['timing_s']['prune']:.1f}s; "
                  f"peak RSS {rec['peak_rss_bytes'] / 2**20:.0f} MiB")
    if q and q["ratio"] > q["warn_ratio"] and not rec.get("recovery_result"):
        _console().print(
            f"[bold yellow]warning:[/] perplexity rose {q['ratio']:.1f}× ({q['dense']['ppl']:.1f} → "
            f"{q['pruned']['ppl']:.1f}), more than {q['warn_ratio']:g}×: the model needs recovery training before "
            "use; add --recover-tokens N to this command, or run `compress recover OUT --tokens N --out DIR`")


def cmd_recover(args: argparse.Namespace) -> int:
    """Recovery training of a saved model; runs as is under ``accelerate launch`` (rank 0 writes)."""
    from compress.pipeline.recover import RecoverSpec, recover_saved

    settings = _parse_set(args.set)
    for key in ("seq_len", "batch_size", "grad_accum", "lr", "logging_steps"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    progress = not args.json and not args.no_progress
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    spec = RecoverSpec(model=args.model, out=args.out, tokens=args.tokens, mode=args.mode, calib=args.calib,
                       seed=args.seed, settings=settings, dtype=args.dtype, overwrite=args.overwrite,
                       trust_remote_code=args.trust_remote_code, progress=progress, teacher=args.teacher)
    con = _console()
    rec = recover_saved(spec, log=(lambda m: None) if args.json else (lambda m: con.print(m))).record
    if not rec.get("export"):  # not the main process: rank 0 prints the result
        return 0
    if args.json:
        print(_dumps_json(rec, indent=1, sort_keys=True))
    else:
        r, e = rec["recovery_result"], rec["export"]
        print(f"recovered {rec['model']['source']}: {r['steps']} steps, {r['tokens_seen']:,} tokens, {r['world_size']} "
              f"process(es), loss {r['first_loss']:.4f} → {r['last_loss']:.4f}\nsaved {e['path']} ({e['kind']} format)")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from compress.catalog import current

    rows = current()["methods"]  # cached: no plugin (and no torch) is imported when nothing changed
    if args.json:
        print(_dumps_json(rows, indent=1))
        return 0
    from rich.table import Table

    # one block per method, wrapped to the terminal: readable at 80 columns
    con = _stdout_console()
    for r in rows:
        needs = [n for n, on in (("calibration", r["needs_calibration"]), ("gradients", r["needs_gradients"])) if on]
        con.print(f"[bold]{r['name']}[/]" + (f"  (aliases: {', '.join(r['aliases'])})" if r["aliases"] else "")
                  + f"  — {r['distribution']} {r['version']}", highlight=False)
        grid = Table.grid(padding=(0, 1))
        grid.add_column(width=11, no_wrap=True)
        grid.add_column(ratio=1)
        for key, value in (("prunes", ", ".join(r["structures"])), ("targets", ", ".join(r["targets"])),
                           ("needs", ", ".join(needs) or "nothing"), ("export", r["export"]),
                           ("how", r["summary"]), ("reference", r["reference"])):
            if value:
                grid.add_row(f"  {key}", value)
        con.print(grid, highlight=False)
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from compress.catalog import current

    catalog = current()  # cached: no plugin (and no torch) is imported when nothing changed
    rows, architectures = catalog["plugins"], catalog["architectures"]
    if args.json:
        print(_dumps_json({"plugins": rows, "architectures": architectures}, indent=1))
        return 0
    from rich.table import Table

    t = Table(title="plugins (entry-point group 'compress')")
    for col in ("entry point", "distribution", "status", "methods", "error"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["name"], f"{r['distribution']} {r['version']}", r["status"], ", ".join(r["methods"]), r["error"] or "")
    con = _stdout_console()
    con.print(t)
    con.print(f"architectures: {', '.join(architectures)}")
    return 0


def cmd_families(args: argparse.Namespace) -> int:
    """Method × family matrix: yes, settings (only with some settings; the method's check says which) or no."""
    from compress.plugins import get_registry

    reg = get_registry()
    fams = sorted(t for t in reg.architectures if t != "compress")  # compress is the export format, not a family
    rows = {n: {f: c.capabilities.support(reg.architectures[f]) for f in fams} for n, c in sorted(reg.pruners.items())}
    if args.json:
        print(_dumps_json({"families": fams, "methods": rows}, indent=1))
        return 0
    for n, row in rows.items():
        print(f"{n}: " + ", ".join(f"{f} {v}" for f, v in row.items()))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A saved stock-format folder as one GGUF file (compress.io.gguf_export)."""
    from compress.io.gguf_export import write_gguf

    info = write_gguf(args.model, args.out, args.gguf, overwrite=args.overwrite)
    if args.json:
        print(_dumps_json(info, indent=1, sort_keys=True))
    else:
        note = (f"; {len(info['f16_fallback_tensors'])} tensors with rows not a multiple of 32 wide kept as F16"
                if info["f16_fallback_tensors"] else "")
        print(f"wrote {info['path']}: {info['type'].upper()}, {info['bytes']:,} bytes, architecture "
              f"{info['architecture']}, {info['tokenizer']} tokenizer{note}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from compress.errors import CompressError
    from compress.io.loading import default_model
    from compress.pipeline.preflight import meta_model
    from compress.plugins import get_registry
    from compress.target import Target

    source = args.model or default_model()
    reg = get_registry()
    shapes = meta_model(source, trust_remote_code=args.trust_remote_code, registry=reg, seq_len=args.seq_len)
    cfg, model, arch, fp = shapes.config, shapes.model, shapes.arch, shapes.dense
    applicable = {}
    probe = Target.parse("50%")
    for name, cls in sorted(reg.pruners.items()):
        try:
            cls().check(model, probe)
            applicable[name] = "yes"
        except CompressError as e:
            applicable[name] = f"no: {e}"
    out = {
        "model": source,
        "model_type": cfg.model_type,
        "architecture": (getattr(cfg, "architectures", None) or [type(model).__name__])[0],
        "layers": arch.num_layers,
        "tied_embeddings": arch.tied_embeddings,
        "footprint": fp.to_dict(),
        "methods": applicable,
    }
    if args.json:
        print(_dumps_json(out, indent=1))
        return 0

    con = _stdout_console()
    g = fp.layers[0]
    con.print(f"[bold]{source}[/]: {out['architecture']} ({cfg.model_type}), {arch.num_layers} layers, hidden "
              f"{g['hidden']}, heads {g['num_heads']} / KV {g['num_kv_heads']} × {g['head_dim']}, MLP "
              f"{g['intermediate']}, tied embeddings: {arch.tied_embeddings}")
    if len({json.dumps(x, sort_keys=True) for x in fp.layers}) > 1:
        con.print("per-layer widths differ: " + "; ".join(
            f"{i}: {x['num_heads']}h/{x['num_kv_heads']}kv/{x['intermediate']}" for i, x in enumerate(fp.layers)))
    con.print(f"parameters {fp.params:,} · FLOPs/token {_fmt_num(fp.flops_per_token)} (T={fp.seq_len}) · "
              f"KV bytes/token {fp.kv_bytes_per_token:,} ({fp.dtype})")
    for name, ok in applicable.items():
        con.print(f"  {name}: {ok}")
    return 0


def _limit(value: float | None) -> int | float | None:
    """``--limit 4`` is a count (lm-eval takes values >= 1 as counts), ``--limit 0.1`` a fraction."""
    return int(value) if value is not None and value >= 1 and value == int(value) else value


def cmd_eval(args: argparse.Namespace) -> int:
    from compress.evaluate.harness import evaluate_model
    from compress.io.loading import load_model

    loaded = load_model(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
    ppl: dict[str, list[int]] = {}
    for item in args.ppl or []:
        name, _, lens = item.partition(":")
        try:
            ppl[name] = [int(x) for x in lens.split(",")] if lens else [2048]
        except ValueError:
            from compress.errors import UsageError

            raise UsageError(f"--ppl {item!r}: context lengths must be integers, e.g. wikitext2:2048,128") from None
    tasks = [t for t in (args.tasks or "").split(",") if t]
    res = evaluate_model(loaded.model, loaded.tokenizer, ppl=ppl or None, tasks=tasks or None,
                         limit=_limit(args.limit), max_windows=args.max_windows)
    print(_dumps_json(res, indent=1, default=str))
    return 0


def _csv_list(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from compress.bench import load_suite, read_records, run_suite
    from compress.bench.runner import RECORDS, latest_by_cell

    suite = load_suite(args.suite, max_windows=args.max_windows, max_tokens=args.max_tokens,
                       limit=_limit(args.limit))
    out = Path(args.out or Path("runs") / "bench" / suite.name)
    methods, models = _csv_list(args.methods), _csv_list(args.models)
    recovery = None
    if args.recovery:
        try:
            recovery = [int(float(t)) for t in _csv_list(args.recovery) or []]
        except ValueError:
            from compress.errors import UsageError

            raise UsageError(f"--recovery {args.recovery!r}: give token budgets, e.g. --recovery 0") from None
    targets = _csv_list(args.targets)
    if args.verify:
        return _verify(args, suite, methods=methods, models=models, recovery=recovery, targets=targets)
    if args.list:
        done = latest_by_cell(read_records(out / RECORDS))
        for cell in suite.cells(methods=methods, models=models, recovery=recovery, targets=targets):
            status = done.get(cell.id, {}).get("status", "todo")
            print(f"{cell.id}  {status:7}  {cell.describe()}")
        return 0
    summary = run_suite(suite, out, resume=args.resume, retry_failed=args.retry_failed, overwrite=args.overwrite,
                        methods=methods, models=models, recovery=recovery, targets=targets,
                        log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"{summary.total} cell(s): {summary.ran} run, {summary.skipped} skipped; {summary.ok} ok, "
          f"{len(summary.failed)} failed, {len(summary.refused)} refused by their method. "
          f"Records: {out / RECORDS}", file=sys.stderr)
    if not args.no_report:
        from compress.bench.report import load_runs, write_report

        files = write_report(load_runs([out], strict=False), out / "report", title=f"compress bench: {suite.name}")
        print(f"report: {files['markdown']}", file=sys.stderr)
    return summary.exit_code


def _verify(args: argparse.Namespace, suite: Any, **filters: Any) -> int:
    """``compress bench SUITE --verify RECORDS``: re-run the cells, compare exactly, exit 1 on a mismatch."""
    from compress.bench.verify import verify_suite

    checks = verify_suite(suite, args.verify, args.out, resume=args.resume, overwrite=args.overwrite,
                          log=lambda m: print(m, file=sys.stderr, flush=True), **filters)
    for c in checks:
        print(c.line(), flush=True)
    bad = [c for c in checks if not c.ok]
    print(f"verified {len(checks)} cell(s) against {args.verify}: {len(checks) - len(bad)} identical, "
          f"{len(bad)} mismatched", file=sys.stderr)
    return 1 if bad else 0


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from compress.bench.report import load_runs, write_report

    records = load_runs(args.runs)
    reported = None
    if args.reported:
        from compress.bench.reported import load_reported

        reported = load_reported(args.reported)
    first = Path(args.runs[0])
    out = Path(args.out) if args.out else (first if first.is_dir() else first.parent) / "report"
    title = args.title or "compress bench: " + ", ".join(sorted({str(r.get("suite")) for r in records}))
    files = write_report(records, out, title=title, reported=reported, inputs=args.runs)
    if args.json:
        print(_dumps_json({k: str(v) for k, v in files.items()}, indent=1))
    else:
        print((out / "report.md").read_text(encoding="utf-8"))
        print("\n".join(f"wrote {v}" for v in files.values()), file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """argparse with the tool's error style: one line ``error: ...`` and exit code 2 (no usage dump)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")


def _attach_values(argv: list[str]) -> list[str]:
    """``--target -5%`` → ``--target=-5%``: argparse would take the value for an option and answer
    "expected one argument"; attached, it reaches Target.parse, which says what is wrong with it."""
    out: list[str] = []
    it = iter(argv)
    for a in it:
        if a == "--target":
            nxt = next(it, None)
            if nxt is not None and nxt.startswith("-") and not nxt.startswith("--"):
                out.append(f"--target={nxt}")
                continue
            out.append(a)
            if nxt is not None:
                out.append(nxt)
            continue
        out.append(a)
    return out


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("compress")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    from compress.io import limits as lim  # torch-free, like the recipe module: the parser stays instant
    from compress.io.recipe import RECOVER_MODES
    p = _Parser(prog="compress", description="Structured pruning of causal LMs, with measurements.")
    p.add_argument("-v", "--verbose", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="version", version=f"compress {_version()}")
    # -v is also accepted after the subcommand (`compress run ... -v`)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    add = sub.add_parser

    def add_parser(name: str, **kw: Any) -> argparse.ArgumentParser:
        return add(name, parents=[common], **kw)

    sub.add_parser = add_parser  # type: ignore[method-assign]

    r = sub.add_parser("run", help="prune a model to a target and save it")
    r.add_argument("--model", help="HF folder, hub id, .gguf file (default: $COMPRESS_MODEL or SmolLM2-135M)")
    r.add_argument("--method", help="pruning method (see `compress methods`; default: the recipe's method)")
    r.add_argument("--target", help="what remains: 2B, 350M, 60%%, flops:50%%, kv:25%% (default: the recipe's)")
    r.add_argument("--out", help="output folder (written atomically)")
    r.add_argument("--seed", type=lim.seed, default=None, help="default: the recipe's, else 0 (0..2**32-1)")
    r.add_argument("--calib", help="calibration text: file, folder, jsonl[:field], wikitext2, tinystories, hf:NAME")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="method setting (repeatable)")
    # --config is the pre-recipe name of the same option, kept so existing commands keep working.
    r.add_argument("--recipe", "--config", dest="recipe", metavar="FILE",
                   help="YAML/JSON recipe: method, its settings, optional run keys (flags and --set win)")
    r.add_argument("--dtype", default="auto", help="auto (default: the source's own dtype; bfloat16 for a GGUF "
                   "file), float32, bfloat16, float16; calibration statistics are float32 whatever it is")
    r.add_argument("--device", default="cpu", help="where calibration runs: cpu (default), cuda, cuda:N, mps")
    r.add_argument("--layerwise", action=argparse.BooleanOptionalAction, default=None,
                   help="calibrate one decoder layer at a time: weights stay in CPU RAM, each layer visits --device "
                        "in turn (default: on above 4 GiB of weights)")
    r.add_argument("--offload-dir", metavar="DIR", help="layer-wise: cache calibration activations in files under DIR")
    r.add_argument("--stream-weights", action="store_true",
                   help="layer-wise: read each decoder layer from the safetensors files only when it is visited "
                        "(peak RAM ~ one dense layer + the pruned model, not the dense model)")
    r.add_argument("--dry-run", action="store_true", help="plan shapes on the meta device; load no weights")
    r.add_argument("--no-save", action="store_true", help="prune and measure without writing a model")
    r.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    r.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its last checkpoint (iterative methods, e.g. TransAct shots)")
    r.add_argument("--recover-tokens", type=int, default=None, help="recovery training budget after pruning")
    r.add_argument("--recover-mode", choices=RECOVER_MODES, default=None,
                   help="recovery training of every weight (full, default), LoRA adapters merged back (lora), or "
                        "every weight distilled from the dense model (kd)")
    r.add_argument("--teacher", metavar="MODEL", help="--recover-mode kd: the teacher (default: the dense model itself)")
    r.add_argument("--trust-remote-code", action="store_true", help="allow custom code of the INPUT model")
    r.add_argument("--no-eval", action="store_true",
                   help="skip the quality check (perplexity before -> after on a held-out slice, a few seconds)")
    r.add_argument("--json", action="store_true", help="print the run record as JSON")
    r.add_argument("--no-progress", action="store_true", help="no progress bars (one line per phase still)")
    r.set_defaults(fn=cmd_run)

    rc = sub.add_parser("recover", help="recovery training of a saved model (works under `accelerate launch`)")
    rc.add_argument("model", help="saved model folder (stock or compress format) or hub id")
    rc.add_argument("--tokens", type=int, required=True, help="training token budget, all processes together")
    rc.add_argument("--out", required=True, help="output folder (written atomically, by the main process only)")
    rc.add_argument("--mode", choices=RECOVER_MODES, default="full",
                    help="full parameters, LoRA merged back, or kd: full parameters distilled from --teacher")
    rc.add_argument("--teacher", metavar="MODEL", help="--mode kd: the dense model the input was pruned from")
    rc.add_argument("--calib", "--data", dest="calib", help="training text: file, folder, jsonl[:field], alias, "
                    "hf:NAME (default wikitext2)")
    # the numbers are bounded by RecoveryConfig (compress.io.limits), e.g. --seq-len >= 2, --tokens <= 2**30
    rc.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 512)")
    rc.add_argument("--batch-size", type=int, default=None, help="sequences per device per step (default 4)")
    rc.add_argument("--grad-accum", type=int, default=None, help="gradient accumulation steps (default 1)")
    rc.add_argument("--lr", type=float, default=None, help="learning rate (default 5e-5 full, 1e-4 lora)")
    rc.add_argument("--logging-steps", type=int, default=None, help="log the loss every N steps")
    rc.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="other recovery setting, e.g. warmup_ratio=0 or lora_r=16 (repeatable)")
    rc.add_argument("--seed", type=lim.seed, default=0, help="training data order and init seed (default 0)")
    rc.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    rc.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    rc.add_argument("--trust-remote-code", action="store_true", help="allow custom code of the INPUT model")
    rc.add_argument("--json", action="store_true", help="print the record as JSON")
    rc.add_argument("--no-progress", action="store_true", help="no progress bars")
    rc.set_defaults(fn=cmd_recover)

    ex = sub.add_parser("export", help="write a saved stock-format model as a GGUF file (llama.cpp, ollama)")
    ex.add_argument("model", help="folder written by compress run / recover (stock format)")
    ex.add_argument("--gguf", required=True, metavar="TYPE", help="f16, bf16, q8_0 or f32")
    ex.add_argument("--out", required=True, help="the .gguf file to write (atomically)")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    ex.add_argument("--json", action="store_true", help="print what was written as JSON")
    ex.set_defaults(fn=cmd_export)

    m = sub.add_parser("methods", help="list pruning methods and their capabilities")
    m.add_argument("--json", action="store_true", help="print every method's capabilities as JSON")
    m.set_defaults(fn=cmd_methods)

    pl = sub.add_parser("plugins", help="list loaded and failed plugins")
    pl.add_argument("--json", action="store_true", help="print the plugins and architectures as JSON")
    pl.set_defaults(fn=cmd_plugins)

    fa = sub.add_parser("families", help="which method prunes which model family (yes / settings / no)")
    fa.add_argument("--json", action="store_true", help="print the method × family matrix as JSON")
    fa.set_defaults(fn=cmd_families)

    i = sub.add_parser("inspect", help="architecture, params, FLOPs/token, KV bytes/token (no weights loaded)")
    i.add_argument("model", nargs="?", help="HF folder, hub id, .gguf file or config.json")
    i.add_argument("--seq-len", type=lim.count(1, lim.MAX_SEQ_LEN), default=2048,
                   help="context length for FLOPs/token")
    i.add_argument("--trust-remote-code", action="store_true", help="allow custom code of the model's config")
    i.add_argument("--json", action="store_true", help="print the result as JSON")
    i.set_defaults(fn=cmd_inspect)

    e = sub.add_parser("eval", help="perplexity and lm-eval tasks of a saved model")
    e.add_argument("model", nargs="?", help="saved model folder, hub id or .gguf (default: the default model)")
    e.add_argument("--ppl", action="append", metavar="SET[:LEN,LEN]", help="e.g. wikitext2:2048,128 (repeatable)")
    e.add_argument("--tasks", help="comma list, e.g. piqa,arc_easy,hellaswag")
    e.add_argument("--limit", type=lim.limit, default=None, help="examples per task (int >= 1) or fraction (0..1)")
    e.add_argument("--max-windows", type=lim.count(1, lim.MAX_SETTING_INT), default=None,
                   help="only the first N perplexity windows")
    e.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    e.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps")
    e.add_argument("--trust-remote-code", action="store_true", help="allow custom code of the model")
    e.set_defaults(fn=cmd_eval)

    b = sub.add_parser("bench", help="run a benchmark suite (one isolated process and record per cell)")
    b.add_argument("suite", help="suite YAML, e.g. benchmarks/suites/smoke.yaml")
    b.add_argument("--out", help="results folder (default: runs/bench/<suite name>)")
    b.add_argument("--resume", action="store_true", help="skip cells that already have a record")
    b.add_argument("--retry-failed", action="store_true", help="with --resume: run failed cells again")
    b.add_argument("--overwrite", action="store_true", help="discard existing records and start over")
    b.add_argument("--methods", help="only these methods (comma list of names/labels; add 'dense' for the dense row)")
    b.add_argument("--models", help="only these model ids (comma list)")
    b.add_argument("--recovery", help="only these recovery budgets in tokens (comma list, e.g. 0)")
    b.add_argument("--targets", help="only these targets (comma list, e.g. 80%%,50%%; the dense row stays)")
    b.add_argument("--verify", metavar="RECORDS", help="re-run the selected cells and compare them exactly with "
                   "these committed records (records.jsonl or its folder); exit 1 on a mismatch")
    b.add_argument("--max-windows", type=lim.count_or_all(1, lim.MAX_SETTING_INT), default=None,
                   help="override eval.max_windows; 'all' lifts the suite's limit (changes cell ids)")
    b.add_argument("--max-tokens", type=lim.count_or_all(2, lim.MAX_SETTING_INT), default=None,
                   help="override eval.max_tokens; 'all' lifts the suite's limit, e.g. a quick suite on "
                   "the full test set (changes cell ids)")
    b.add_argument("--limit", type=lim.limit, default=None, help="override eval.limit (changes cell ids)")
    b.add_argument("--list", action="store_true", help="list the cells and their status; run nothing")
    b.add_argument("--no-report", action="store_true", help="do not write <out>/report at the end")
    b.set_defaults(fn=cmd_bench)

    rp = sub.add_parser("report", help="markdown/JSON/CSV tables and plots from benchmark records")
    rp.add_argument("runs", nargs="+", help="records.jsonl files or bench output folders")
    rp.add_argument("--out", help="report folder (default: <first run>/report)")
    rp.add_argument("--title", help="report title")
    rp.add_argument("--reported", metavar="DIR", help="published numbers (YAML file or folder, e.g. "
                    "benchmarks/reported): shown as *paper* rows next to cells of the same model and setting")
    rp.add_argument("--json", action="store_true", help="print the written paths as JSON instead of the table")
    rp.set_defaults(fn=cmd_report)
    return p


def _disable_hf_progress_bars() -> None:
    """transformers and huggingface_hub read HF_HUB_DISABLE_PROGRESS_BARS when imported, which
    ``import compress`` has already done: switch their bars ("Loading weights", "Writing model shards")
    off explicitly, so stderr carries only our own progress and one-line errors."""
    try:
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as hf_logging
    except Exception:  # noqa: BLE001 - cosmetic only
        return
    disable_progress_bars()
    hf_logging.disable_progress_bar()


def _after_error_reported() -> None:
    """A launched run that failed before rank 0 handed its pruned model over: let every process print
    its line before any exits (:func:`compress.pipeline.handoff.after_error_reported`)."""
    handoff = sys.modules.get("compress.pipeline.handoff")
    if handoff is not None:
        handoff.after_error_reported()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser = build_parser()
    args = parser.parse_args(_attach_values(list(sys.argv[1:] if argv is None else argv)))
    light = args.command in ("methods", "plugins")  # answered without torch / transformers when cached
    if getattr(args, "no_progress", False) or getattr(args, "json", False) or not sys.stderr.isatty():
        # third-party bars (transformers' GGUF de-quantization, the HF Trainer) use tqdm, which reads
        # TQDM_DISABLE when it is first imported — nothing has imported it yet
        os.environ["TQDM_DISABLE"] = "1"
    if not light and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"].lower() not in ("0", "false", "no", ""):
        _disable_hf_progress_bars()
    try:
        from compress.errors import CompressError
    except Exception as e:  # noqa: BLE001
        print(f"error: cannot import compress: {e}", file=sys.stderr)
        return 1
    try:
        rc = int(args.fn(args) or 0)
        sys.stdout.flush()  # a reader that went away is seen here, not at interpreter exit
        return rc
    except CompressError as e:
        if getattr(args, "verbose", False):
            import traceback

            traceback.print_exc()
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {msg.removeprefix('error: ')}", file=sys.stderr, flush=True)
        _after_error_reported()
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        _after_error_reported()
        return 130
    except BrokenPipeError:
        # the reader of stdout went away (`compress methods | head`): stop quietly, like a Unix tool
        # killed by SIGPIPE; stdout goes to /dev/null so that the interpreter's final flush is silent
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13
    except Exception as e:  # noqa: BLE001
        if getattr(args, "verbose", False):
            import traceback

            traceback.print_exc()
        first = str(e).splitlines()[0] if str(e) else ""
        name = type(e).__name__ if type(e).__name__ != "error" else f"{type(e).__module__}.error"  # struct.error
        print(f"error: {name}: {first} (run with -v for the traceback)", file=sys.stderr, flush=True)
        _after_error_reported()
        return 1


if __name__ == "__main__":
    sys.exit(main())
