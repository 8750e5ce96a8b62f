"""One benchmark cell, run in its own process by :mod:`compress.bench.runner`::

    python -m compress.bench.cell '<cell json>' --record result.json

Pruning goes through :func:`compress.pipeline.run.run` (the ``compress run`` pipeline, without export); the
dense row loads the model and prunes nothing. Then perplexity, lm-eval and latency are measured on
the in-memory model. Whatever happens, a record is written to ``--record`` (``status`` ``ok`` or
``failed`` with a one-line ``error`` and the ``stage`` that failed); the traceback goes to stderr.
Exit code 0 when the cell succeeded, 1 when it failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from compress.bench.record import fail, jsonable, new_record, now, plugin_of
from compress.bench.suite import DENSE, Cell


def _log(msg: str) -> None:
    print(f"[cell] {msg}", file=sys.stderr, flush=True)


def load_tokenizer(source: str) -> Any:
    """The tokenizer ``compress.io.loading.load_model`` would return for ``source``."""
    from transformers import AutoTokenizer

    from compress.io.loading import _gguf_in, _load_tokenizer

    path = Path(source).expanduser()
    gguf = _gguf_in(path) if path.exists() else None
    if gguf is not None:
        try:
            return AutoTokenizer.from_pretrained(str(gguf.parent))
        except Exception:  # noqa: BLE001 - no tokenizer files next to the gguf: read it from the gguf
            return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return _load_tokenizer(str(path) if path.exists() else source, False)


def _ppl_batch(seq_len: int, configured: int | None) -> int:
    return configured or max(1, min(16, 2048 // seq_len))


def ppl_windows(seq_len: int, max_windows: int | None, max_tokens: int | None) -> int | None:
    """Windows to evaluate at ``seq_len`` under the suite's caps (None = all)."""
    caps = [c for c in (max_windows, max(1, max_tokens // seq_len) if max_tokens else None) if c]
    return min(caps) if caps else None


def run_cell(cell: Cell) -> dict[str, Any]:
    """Run ``cell`` in this process and return its record (never raises for a cell failure)."""
    import torch

    from compress.model.footprint import footprint
    from compress.pipeline.record import versions
    from compress.probes import compare_latency, track_peak_rss

    t_cell = time.perf_counter()
    record = new_record(cell)
    stage = "setup"
    try:
        record["versions"] = versions()
        if cell.threads:
            torch.set_num_threads(cell.threads)
        record["threads"] = torch.get_num_threads()
        record["plugin"] = plugin_of(cell.method)
        path = cell.model["path"]
        if cell.method == DENSE:
            from compress.io.loading import load_model
            from compress.plugins import get_registry

            stage = "load"
            _log(f"loading {path}")
            t0 = time.perf_counter()
            with track_peak_rss() as rss:
                loaded = load_model(path, dtype=cell.model.get("dtype"))
            model, tok = loaded.model, loaded.tokenizer
            fp = footprint(model, seq_len=2048, arch=get_registry().adapter_for(model)).to_dict()
            record["model"] = {**record["model"], "source": loaded.source}
            record["timing_s"]["load"] = round(time.perf_counter() - t0, 3)
            record["peak_rss"]["load"] = rss.peak_bytes
            record["config"] = {}
            record["dense"] = record["achieved"] = fp
            record["ratios"] = {"params": 1.0, "flops": 1.0, "kv": 1.0}
        else:
            from compress.pipeline.record import RUN_RECORD_KEYS
            from compress.pipeline.run import RunSpec, run

            stage = "prune"
            rec = cell.recovery
            spec = RunSpec(  # parses the cell's target
                method=cell.method, target=cell.target, model=path, seed=cell.seed, calib=cell.calib,
                settings=dict(cell.settings), dtype=cell.model.get("dtype"),
                recover_tokens=int(rec.get("tokens") or 0), recover_mode=rec.get("mode", "full"),
                recover_settings=dict(rec.get("settings") or {}), progress=False,
                evaluate=False,  # the cell measures quality itself, by its eval protocol
            )
            _log(f"pruning {path} with {cell.method} to {cell.target}")
            t0 = time.perf_counter()
            result = run(spec, log=_log)
            wall = time.perf_counter() - t0
            model, out = result.model, result.record
            # the run record's keys mean the same in a bench record: copied as they are, except the
            # cell's own view of what it asked (model entry, settings as given, recovery asked)
            asked = {k: record[k] for k in ("model", "settings", "recovery", "calib", "target")}
            record.update({k: out[k] for k in RUN_RECORD_KEYS if k not in ("timing_s", "peak_rss")})
            record.update(asked)
            record["model"] = {**asked["model"], "source": out["model"]["source"]}
            record["prune_wall_s"] = out["timing_s"]["prune"]
            record["timing_s"].update(out["timing_s"])
            record["timing_s"]["run"] = round(wall, 3)
            record["peak_rss"]["prune"] = out.get("peak_rss_bytes")
            stage = "tokenizer"
            tok = load_tokenizer(path)

        stage = "eval"
        ev = cell.eval
        t0 = time.perf_counter()
        with track_peak_rss() as rss:
            if ev.get("ppl"):
                from compress.evaluate.perplexity import perplexity, ppl_text

                for source, lengths in ev["ppl"].items():
                    text = ppl_text(source)
                    record["ppl"][source] = {}
                    for n in lengths:
                        _log(f"perplexity {source} @{n}")
                        record["ppl"][source][str(n)] = perplexity(
                            model, tok, text, seq_len=int(n),
                            max_windows=ppl_windows(int(n), ev.get("max_windows"), ev.get("max_tokens")),
                            batch_size=_ppl_batch(int(n), ev.get("ppl_batch_size")), progress=False,
                        )
            if ev.get("tasks"):
                from compress.evaluate.harness import lm_eval_tasks

                _log(f"lm-eval {', '.join(ev['tasks'])} (limit {ev.get('limit')})")
                res = lm_eval_tasks(model, tok, ev["tasks"], limit=ev.get("limit"),
                                    batch_size=int(ev.get("batch_size") or 8))
                record["accuracy_avg"] = res.pop("average", None)
                record["tasks"] = res
        record["timing_s"]["eval"] = round(time.perf_counter() - t0, 3)
        record["peak_rss"]["eval"] = rss.peak_bytes
        record["peak_rss"]["method"] = rss.method

        if ev.get("latency"):
            stage = "latency"
            _log("latency")
            t0 = time.perf_counter()
            lat = dict(ev["latency"])
            timed = {"pruned": model}
            if cell.method != DENSE:  # the dense model, timed in this process, interleaved with the pruned one
                from compress.io.loading import load_model

                timed["dense"] = load_model(path, dtype=cell.model.get("dtype")).model
            got = compare_latency(timed, tok, **lat, seed=cell.seed,
                                  reference="dense" if "dense" in timed else None)
            record["latency"] = got["pruned"]
            if "dense" in got:
                record["latency_dense"] = got["dense"]
            del timed
            record["timing_s"]["latency"] = round(time.perf_counter() - t0, 3)
        record["status"] = "ok"
        record["stage"] = None
        record["finished_at"] = now()
    except BaseException as e:  # noqa: BLE001 - every failure becomes a record
        traceback.print_exc(file=sys.stderr)
        fail(record, stage, e)
        if isinstance(e, KeyboardInterrupt):
            raise
    finally:
        phases = [v for k, v in record["peak_rss"].items() if k != "method" and isinstance(v, int)]
        record["peak_rss_bytes"] = max(phases) if phases else None
        record["timing_s"]["cell"] = round(time.perf_counter() - t_cell, 3)
    return jsonable(record)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m compress.bench.cell", description="run one benchmark cell")
    p.add_argument("cell", help="the cell as JSON, or a path to a JSON file")
    p.add_argument("--record", required=True, help="where to write the record (JSON)")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    text = args.cell if args.cell.lstrip().startswith("{") else Path(args.cell).read_text(encoding="utf-8")
    cell = Cell.model_validate(json.loads(text))
    record = run_cell(cell)
    out = Path(args.record)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(record, sort_keys=True), encoding="utf-8")
    os.replace(tmp, out)
    return 0 if record["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
