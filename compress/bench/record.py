"""The per-cell benchmark record: one JSON object per line of ``<out>/records.jsonl``.

Every record, ``ok`` or ``failed``, has every key of :data:`RECORD_KEYS` (unmeasured values are
``None`` or empty), so readers never guess. See :func:`new_record` for the meaning of each key.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

from compress.bench.suite import DENSE, Cell
from compress.pipeline.record import RUN_RECORD_KEYS, SCHEMA, empty_run_record, jsonable

__all__ = ["BENCH_KEYS", "RECORD_KEYS", "SCHEMA", "append_record", "fail", "new_record", "now", "read_records"]

#: Keys a bench record has besides the run record's (:data:`compress.pipeline.record.RUN_RECORD_KEYS`,
#: same names and meanings: a cell's run record is copied in as it is).
BENCH_KEYS: tuple[str, ...] = (
    "cell_id", "suite", "status", "error", "error_type", "stage", "label",
    "eval", "ppl", "tasks", "accuracy_avg", "latency", "prune_wall_s", "threads", "started_at", "finished_at",
)

#: Keys present in every record.
RECORD_KEYS: tuple[str, ...] = (*RUN_RECORD_KEYS, *BENCH_KEYS)


def now() -> str:
    """UTC time, ISO 8601, seconds."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def new_record(cell: Cell) -> dict[str, Any]:
    """A record for ``cell`` with nothing measured yet (status ``failed`` until the cell finishes).

    Keys: ``cell_id`` (see :func:`compress.bench.suite.cell_id`); ``model`` {id, path, dtype, hash,
    hash_of}; ``method`` (``dense`` = no pruning), ``label``, ``plugin`` {distribution, version},
    ``settings`` (as given) and ``config`` (resolved by the method); ``recipe`` (the resolved recipe
    of the run, :func:`compress.io.recipe.resolved_recipe`; None for dense); ``target`` and ``goal`` (absolute
    value to stay under); ``recovery`` {tokens, mode, settings} asked and ``recovery_result`` done;
    ``dense``/``achieved`` {params, flops_per_token, kv_bytes_per_token, dtype, seq_len} and
    ``ratios`` {params, flops, kv} (achieved / dense); ``eval`` (the protocol); ``ppl``
    {source: {context: perplexity result}}; ``tasks`` {task: {acc, acc_norm?, n, metric, score}};
    ``accuracy_avg`` (mean headline score); ``latency`` (:func:`compress.probes.latency`);
    ``prune_wall_s``; ``timing_s`` {load, prune, eval, latency, cell}; ``peak_rss_bytes`` (the
    highest of the phases in ``peak_rss``); ``versions`` (:func:`compress.pipeline.run.versions`).
    """
    record = empty_run_record()
    record.update({
        "cell_id": cell.id,
        "suite": cell.suite,
        "status": "failed",
        "error": None,
        "error_type": None,
        "stage": None,
        "model": dict(cell.model),
        "method": cell.method,
        "label": cell.label,
        "settings": dict(cell.settings),
        "target": cell.target,
        "recovery": dict(cell.recovery),
        "seed": cell.seed,
        "calib": cell.calib,
        "eval": dict(cell.eval),
        "ppl": {},
        "tasks": {},
        "accuracy_avg": None,
        "latency": None,
        "prune_wall_s": None,
        "threads": cell.threads,
        "started_at": now(),
        "finished_at": None,
    })
    return record


def fail(record: dict[str, Any], stage: str, error: BaseException | str) -> dict[str, Any]:
    """Mark ``record`` failed at ``stage`` with a one-line error."""
    if isinstance(error, BaseException):
        text = str(error).strip().splitlines()[0] if str(error).strip() else ""
        record["error_type"] = type(error).__name__
        record["error"] = text or type(error).__name__
    else:
        record["error"] = error.strip().splitlines()[0] if error.strip() else "failed"
    record["status"] = "failed"
    record["stage"] = stage
    record["finished_at"] = now()
    return record


def plugin_of(method: str) -> dict[str, Any] | None:
    """Distribution and version of the plugin that provides ``method`` (None if unknown)."""
    if method == DENSE:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return {"distribution": "compress", "version": version("compress")}
        except PackageNotFoundError:
            return {"distribution": "compress", "version": None}
    from compress.plugins import get_registry

    reg = get_registry()
    name = reg.aliases.get(method, method)
    info = reg.origin.get(name)
    return {"distribution": info.distribution, "version": info.version} if info else None


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line to ``path``, flushed and fsynced (a crash never leaves half a line)."""
    line = json.dumps(jsonable(record), sort_keys=True, allow_nan=False) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records of a ``records.jsonl`` in file order; a torn or non-JSON line is skipped."""
    out: list[dict[str, Any]] = []
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("cell_id"):
            out.append(rec)
    return out
