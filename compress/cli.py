"""``compress`` command line: run | methods | plugins | inspect | eval | bench | report.

Exit codes: 0 success, 1 run failure, 2 usage error. Errors are one line (``error: ...``) with a
hint; ``-v`` shows the traceback.
"""

from __future__ import annotations

import argparse
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


def _read_settings_file(path: str) -> dict[str, Any]:
    from compress.errors import UsageError

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read config file {path}: {getattr(e, 'strerror', None) or e}") from None
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UsageError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"config file {path} is not valid JSON ({e.msg} at line {e.lineno}); "
                             "fix it or pass settings with --set key=value") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a mapping of setting names to values")
    return data


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _fmt_num(x: float) -> str:
    for suf, m in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= m:
            return f"{x / m:.3f}{suf}"
    return f"{x:.0f}"


# ---------------------------------------------------------------------------- commands
def cmd_run(args: argparse.Namespace) -> int:
    from compress.run import RunSpec, clean_record, run

    settings = _read_settings_file(args.config) if args.config else {}
    settings.update(_parse_set(args.set))
    if not args.out and not args.dry_run and not args.no_save:
        from compress.errors import UsageError

        raise UsageError("--out is required (or --dry-run to plan only, --no-save to measure without saving)")
    spec = RunSpec(
        method=args.method, target=args.target, model=args.model, out=args.out, seed=args.seed,
        calib=args.calib, settings=settings, dtype=args.dtype, device=args.device, dry_run=args.dry_run,
        overwrite=args.overwrite, recover_tokens=args.recover_tokens, recover_mode=args.recover_mode,
        trust_remote_code=args.trust_remote_code, progress=not args.json and not args.no_progress,
    )
    con = _console()
    if not spec.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    record = run(spec, log=(lambda m: None) if args.json else (lambda m: con.print(m)))
    rec = clean_record(record)
    if args.json:
        print(json.dumps(rec, indent=1, sort_keys=True))
        return 0
    _print_summary(rec)
    return 0


def _print_summary(rec: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
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
    if rec.get("timing_s"):
        con.print(f"time: load {rec['timing_s']['load']:.1f}s, prune {rec['timing_s']['prune']:.1f}s; "
                  f"peak RSS {rec['peak_rss_bytes'] / 2**20:.0f} MiB")


def cmd_methods(args: argparse.Namespace) -> int:
    from compress.plugins import get_registry

    rows = get_registry().methods_table()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title="pruning methods")
    for col in ("method", "structures", "calibration", "gradients", "targets", "export", "plugin", "summary"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["name"] + (f" ({', '.join(r['aliases'])})" if r["aliases"] else ""), ", ".join(r["structures"]),
                  "yes" if r["needs_calibration"] else "no", "yes" if r["needs_gradients"] else "no",
                  ", ".join(r["targets"]), r["export"], f"{r['distribution']} {r['version']}", r["summary"])
    Console().print(t)
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from compress.plugins import get_registry

    reg = get_registry()
    rows = [p.to_dict() for p in reg.plugins]
    for r in rows:
        r.pop("traceback", None)
    if args.json:
        print(json.dumps({"plugins": rows, "architectures": sorted(reg.architectures)}, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title="plugins (entry-point group 'compress')")
    for col in ("entry point", "distribution", "status", "methods", "error"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["name"], f"{r['distribution']} {r['version']}", r["status"], ", ".join(r["methods"]), r["error"] or "")
    con = Console()
    con.print(t)
    con.print(f"architectures: {', '.join(sorted(reg.architectures))}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from compress.errors import CompressError
    from compress.loading import default_model, load_config
    from compress.measure import footprint
    from compress.plugins import get_registry
    from compress.target import Target

    source = args.model or default_model()
    cfg = load_config(source, trust_remote_code=args.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=args.trust_remote_code)
    reg = get_registry()
    arch = reg.adapter_for(model)
    fp = footprint(model, seq_len=args.seq_len, arch=arch)
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
        print(json.dumps(out, indent=1))
        return 0
    from rich.console import Console

    con = Console()
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
    from compress.evaluate import evaluate_model
    from compress.loading import load_model

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
    print(json.dumps(res, indent=1, default=str))
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
    if args.list:
        done = latest_by_cell(read_records(out / RECORDS))
        for cell in suite.cells(methods=methods, models=models, recovery=recovery):
            status = done.get(cell.id, {}).get("status", "todo")
            print(f"{cell.id}  {status:6}  {cell.describe()}")
        return 0
    summary = run_suite(suite, out, resume=args.resume, retry_failed=args.retry_failed, overwrite=args.overwrite,
                        methods=methods, models=models, recovery=recovery,
                        log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"{summary.total} cell(s): {summary.ran} run, {summary.skipped} skipped; {summary.ok} ok, "
          f"{len(summary.failed)} failed. Records: {out / RECORDS}", file=sys.stderr)
    if not args.no_report:
        from compress.bench.report import load_runs, write_report

        files = write_report(load_runs([out]), out / "report", title=f"compress bench: {suite.name}")
        print(f"report: {files['markdown']}", file=sys.stderr)
    return summary.exit_code


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from compress.bench.report import load_runs, write_report

    records = load_runs(args.runs)
    first = Path(args.runs[0])
    out = Path(args.out) if args.out else (first if first.is_dir() else first.parent) / "report"
    title = args.title or "compress bench: " + ", ".join(sorted({str(r.get("suite")) for r in records}))
    files = write_report(records, out, title=title)
    if args.json:
        print(json.dumps({k: str(v) for k, v in files.items()}, indent=1))
    else:
        print((out / "report.md").read_text(encoding="utf-8"))
        print("\n".join(f"wrote {v}" for v in files.values()), file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compress", description="Structured pruning of causal LMs, with measurements.")
    p.add_argument("-v", "--verbose", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="prune a model to a target and save it")
    r.add_argument("--model", help="HF folder, hub id, .gguf file (default: $COMPRESS_MODEL or SmolLM2-135M)")
    r.add_argument("--method", required=True, help="pruning method (see `compress methods`)")
    r.add_argument("--target", required=True, help="what remains: 2B, 350M, 60%%, flops:50%%, kv:25%%")
    r.add_argument("--out", help="output folder (written atomically)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--calib", help="calibration text: file, folder, jsonl[:field], wikitext2, tinystories, hf:NAME")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="method setting (repeatable)")
    r.add_argument("--config", help="JSON or YAML file of method settings (--set wins)")
    r.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    r.add_argument("--device", default="cpu")
    r.add_argument("--dry-run", action="store_true", help="plan shapes on the meta device; load no weights")
    r.add_argument("--no-save", action="store_true", help="prune and measure without writing a model")
    r.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    r.add_argument("--recover-tokens", type=int, default=0, help="recovery training budget after pruning")
    r.add_argument("--recover-mode", choices=("full", "lora"), default="full")
    r.add_argument("--trust-remote-code", action="store_true", help="allow custom code of the INPUT model")
    r.add_argument("--json", action="store_true", help="print the run record as JSON")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(fn=cmd_run)

    m = sub.add_parser("methods", help="list pruning methods and their capabilities")
    m.add_argument("--json", action="store_true")
    m.set_defaults(fn=cmd_methods)

    pl = sub.add_parser("plugins", help="list loaded and failed plugins")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(fn=cmd_plugins)

    i = sub.add_parser("inspect", help="architecture, params, FLOPs/token, KV bytes/token (no weights loaded)")
    i.add_argument("model", nargs="?", help="HF folder, hub id, .gguf file or config.json")
    i.add_argument("--seq-len", type=int, default=2048, help="context length for FLOPs/token")
    i.add_argument("--trust-remote-code", action="store_true")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_inspect)

    e = sub.add_parser("eval", help="perplexity and lm-eval tasks of a saved model")
    e.add_argument("model", nargs="?")
    e.add_argument("--ppl", action="append", metavar="SET[:LEN,LEN]", help="e.g. wikitext2:2048,128 (repeatable)")
    e.add_argument("--tasks", help="comma list, e.g. piqa,arc_easy,hellaswag")
    e.add_argument("--limit", type=float, default=None, help="examples per task (int) or fraction")
    e.add_argument("--max-windows", type=int, default=None, help="only the first N perplexity windows")
    e.add_argument("--dtype", default=None)
    e.add_argument("--device", default="cpu")
    e.add_argument("--trust-remote-code", action="store_true")
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
    b.add_argument("--max-windows", type=int, default=None, help="override eval.max_windows (changes cell ids)")
    b.add_argument("--max-tokens", type=int, default=None, help="override eval.max_tokens (changes cell ids)")
    b.add_argument("--limit", type=float, default=None, help="override eval.limit (changes cell ids)")
    b.add_argument("--list", action="store_true", help="list the cells and their status; run nothing")
    b.add_argument("--no-report", action="store_true", help="do not write <out>/report at the end")
    b.set_defaults(fn=cmd_bench)

    rp = sub.add_parser("report", help="markdown/JSON/CSV tables and plots from benchmark records")
    rp.add_argument("runs", nargs="+", help="records.jsonl files or bench output folders")
    rp.add_argument("--out", help="report folder (default: <first run>/report)")
    rp.add_argument("--title", help="report title")
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


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"].lower() not in ("0", "false", "no", ""):
        _disable_hf_progress_bars()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from compress.errors import CompressError
    except Exception as e:  # noqa: BLE001
        print(f"error: cannot import compress: {e}", file=sys.stderr)
        return 1
    try:
        return int(args.fn(args) or 0)
    except CompressError as e:
        if args.verbose:
            import traceback

            traceback.print_exc()
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001
        if args.verbose:
            import traceback

            traceback.print_exc()
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"error: {type(e).__name__}: {first} (run with -v for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
