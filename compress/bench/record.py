"""The per-cell benchmark record: one JSON object per line of ``<out>/records.jsonl``.

Every record, ``ok``, ``failed`` or ``refused`` (the method cannot express the cell), has every key
of :data:`RECORD_KEYS` (unmeasured values are ``None`` or empty), so readers never guess. See :func:`new_record` for the meaning of each key.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

from compress.bench.suite import DENSE, Cell
from compress.errors import TargetUnreachable, Unsupported, UsageError
from compress.pipeline.record import RUN_RECORD_KEYS, SCHEMA, empty_run_record, jsonable

__all__ = ["BENCH_KEYS", "RECORD_KEYS", "SCHEMA", "append_record", "fail", "is_refusal", "new_record", "now",
           "read_records", "record_problem"]

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


#: Stages where a method's :class:`~compress.errors.Unsupported` means it cannot express the cell
#: (a *refused* cell), not that something broke.
REFUSAL_STAGES = ("preflight", "prune")


def is_refusal(stage: str, error: BaseException | str) -> bool:
    """Whether ``error`` at ``stage`` is the method declining the cell (e.g. a ``kv:`` target for a
    method that keeps every head: :class:`~compress.errors.Unsupported`; a target below the smallest
    model the method's structures can cut: :class:`~compress.errors.TargetUnreachable`), which a suite
    records as ``refused`` rather than ``failed``. Any other :class:`~compress.errors.TargetError` (a
    typo, a target above the dense model) stays ``failed``: the suite is wrong, not the method."""
    return stage in REFUSAL_STAGES and isinstance(error, Unsupported | TargetUnreachable)


def fail(record: dict[str, Any], stage: str, error: BaseException | str) -> dict[str, Any]:
    """Mark ``record`` failed at ``stage`` with a one-line error (status ``refused`` when the method
    declined the cell before any work, :func:`is_refusal`)."""
    if isinstance(error, BaseException):
        text = str(error).strip().splitlines()[0] if str(error).strip() else ""
        record["error_type"] = type(error).__name__
        record["error"] = text or type(error).__name__
    else:
        record["error"] = error.strip().splitlines()[0] if error.strip() else "failed"
    record["status"] = "refused" if is_refusal(stage, error) else "failed"
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
    """Append one JSON line to ``path``, flushed and fsynced. A line an earlier crash cut short is
    closed first, so the new record never joins it (readers skip or name the torn line)."""
    line = json.dumps(jsonable(record), sort_keys=True, allow_nan=False) + "\n"
    with open(path, "a+b") as f:  # appends always go to the end, whatever was read
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write(line.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def read_records(path: Path, *, strict: bool = False) -> list[dict[str, Any]]:
    """Records of a ``records.jsonl`` in file order.

    By default (a bench resuming into its own folder) a torn, non-JSON or non-record line is skipped
    and undecodable bytes are replaced, so a crash mid-line never stops the next run. ``strict`` (what
    ``compress report`` reads) refuses a damaged file with a one-line UsageError naming the file and
    line; only a last line without its newline that does not parse (a write cut short) is skipped."""
    out: list[dict[str, Any]] = []
    if not path.is_file():
        return out
    data = path.read_bytes()
    if strict:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[:e.start].count(b"\n") + 1
            raise UsageError(f"{path}:{line}: not UTF-8 text (byte {e.start}), so not a records.jsonl written by "
                             "compress bench; pass the records file of a bench run") from None
    else:
        text = data.decode("utf-8", errors="replace")
    lines = text.split("\n")
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if not strict or n == len(lines):  # the last line, without its newline: cut short mid-write
                continue
            raise UsageError(f"{path}:{n}: not a JSON line ({e.msg} at column {e.colno}); repair or delete that "
                             "line, or pass the records.jsonl of a bench run") from None
        if not strict:
            if isinstance(rec, dict) and rec.get("cell_id"):
                out.append(rec)
            continue
        problem = record_problem(rec)
        if problem is not None:
            raise UsageError(f"{path}:{n}: {problem}; repair or delete that line, or pass the records.jsonl of a "
                             "bench run")
        out.append(rec)
    return out


#: Keys a record must have for ``compress report`` to place it (the rest may be missing or None).
REQUIRED_KEYS: tuple[str, ...] = ("cell_id", "status", "method", "model")
#: Keys whose value, when present and not None, must be a JSON object.
_OBJECT_KEYS: tuple[str, ...] = ("model", "recovery", "ppl", "tasks", "eval", "dense", "achieved", "ratios",
                                 "latency", "versions", "plugin", "timing_s")


def record_problem(rec: Any) -> str | None:
    """What makes ``rec`` unusable as a benchmark record (None: nothing): not an object, a required key
    missing, or a value of the wrong kind where the report needs its structure."""
    if not isinstance(rec, dict):
        return f"this line holds a JSON {type(rec).__name__}, not a record (an object)"
    missing = [k for k in REQUIRED_KEYS if k not in rec]
    if missing:
        return f"the record lacks {', '.join(repr(k) for k in missing)}"
    if not isinstance(rec["cell_id"], str) or not rec["cell_id"]:
        return "'cell_id' is not a non-empty string"
    for key in ("status", "method", "target", "label", "suite"):
        if rec.get(key) is not None and not isinstance(rec[key], str):
            return f"{key!r} is a {type(rec[key]).__name__}, not a string"
    if rec.get("seed") is not None and (not isinstance(rec["seed"], int) or isinstance(rec["seed"], bool)):
        return f"'seed' is a {type(rec['seed']).__name__}, not an integer"
    for key in _OBJECT_KEYS:
        if rec.get(key) is not None and not isinstance(rec[key], dict):
            return f"{key!r} is a {type(rec[key]).__name__}, not an object"
    for source, by_len in (rec.get("ppl") or {}).items():
        if not isinstance(by_len, dict):
            return f"'ppl.{source}' is a {type(by_len).__name__}, not an object"
    if rec.get("recovery"):
        from pydantic import ValidationError

        from compress.bench.suite import RecoverySpec

        try:
            RecoverySpec(**rec["recovery"])
        except (ValidationError, TypeError) as e:
            first = e.errors()[0] if isinstance(e, ValidationError) else {"loc": (), "msg": str(e)}
            where = ".".join(str(x) for x in first.get("loc", ()))
            return f"'recovery{'.' + where if where else ''}': {first.get('msg')}"
    return None
