"""The reproducibility check behind ``compress bench SUITE --verify RECORDS``.

Re-run the selected cells of a suite exactly as ``compress bench`` does (one process per cell, the
same code path) and compare each fresh record with the committed one, **exactly**: every perplexity
result (ppl, nll, windows, tokens scored), the achieved parameters, FLOPs/token and KV bytes/token,
and the plan and calibration hashes. Perplexity is bit-exact only with a fixed torch thread count
(the suite's ``threads``), on the same CPU kind and the same pinned stack; a mismatch line says when
the stack differs from the committed record's.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.bench.record import read_records
from compress.bench.runner import RECORDS, latest_by_cell, run_suite
from compress.bench.suite import Suite
from compress.errors import UsageError

__all__ = ["CellCheck", "compare_records", "verify_suite"]

_SIZE_KEYS = ("params", "flops_per_token", "kv_bytes_per_token")
_HASH_KEYS = ("plan_hash", "calibration_hash")


def _fmt(v: Any) -> str:
    return repr(v)  # repr of a float round-trips exactly: the diff shows every differing digit


def compare_records(committed: dict[str, Any], fresh: dict[str, Any]) -> list[str]:
    """Differences between two records of the same cell, one short ``what committed != now`` each."""
    if fresh.get("status") != "ok":
        return [f"re-run failed ({fresh.get('stage')}): {fresh.get('error')}"]
    diffs: list[str] = []
    for key in _SIZE_KEYS:
        a, b = (committed.get("achieved") or {}).get(key), (fresh.get("achieved") or {}).get(key)
        if a != b:
            diffs.append(f"achieved.{key} {_fmt(a)} != {_fmt(b)}")
    old_ppl, new_ppl = committed.get("ppl") or {}, fresh.get("ppl") or {}
    for source in sorted(set(old_ppl) | set(new_ppl)):
        for n in sorted(set(old_ppl.get(source) or {}) | set(new_ppl.get(source) or {}), key=str):
            a, b = (old_ppl.get(source) or {}).get(n), (new_ppl.get(source) or {}).get(n)
            if a is None or b is None:
                diffs.append(f"ppl.{source}.{n} {'missing' if a is None else 'present'} in the committed record, "
                             f"{'missing' if b is None else 'present'} now")
                continue
            for k in sorted(set(a) | set(b)):
                if a.get(k) != b.get(k):
                    diffs.append(f"ppl.{source}.{n}.{k} {_fmt(a.get(k))} != {_fmt(b.get(k))}")
    for key in _HASH_KEYS:
        if committed.get(key) != fresh.get(key):
            diffs.append(f"{key} {str(committed.get(key))[:12]} != {str(fresh.get(key))[:12]}")
    return diffs


def _stack_diff(committed: dict[str, Any], fresh: dict[str, Any]) -> str:
    a, b = committed.get("versions") or {}, fresh.get("versions") or {}
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k != "compress"]
    return ", ".join(f"{k} {a.get(k)} vs {b.get(k)}" for k in keys)


@dataclass
class CellCheck:
    """The outcome of re-running one cell."""

    cell_id: str
    describe: str
    diffs: list[str] = field(default_factory=list)
    stack: str = ""
    summary: str = ""

    @property
    def ok(self) -> bool:
        return not self.diffs

    def line(self) -> str:
        """One line: ``identical`` with the compared values, or ``MISMATCH`` with every difference."""
        if self.ok:
            return f"identical  {self.cell_id}  {self.describe}: {self.summary}"
        tail = f" (stack differs: {self.stack})" if self.stack else ""
        return f"MISMATCH   {self.cell_id}  {self.describe}: committed != now: {'; '.join(self.diffs)}{tail}"


def _summary(rec: dict[str, Any]) -> str:
    bits = [f"params {(rec.get('achieved') or {}).get('params'):,}"] if (rec.get("achieved") or {}).get(
        "params") is not None else []
    for source, by_len in sorted((rec.get("ppl") or {}).items()):
        for n, r in by_len.items():
            if isinstance(r, dict) and r.get("ppl") is not None:
                bits.append(f"PPL {source}@{n} {r['ppl']!r}")
    return ", ".join(bits)


def verify_suite(
    suite: Suite,
    committed_path: str | Path,
    out: str | Path | None = None,
    *,
    methods: list[str] | None = None,
    models: list[str] | None = None,
    recovery: list[int] | None = None,
    targets: list[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    python: str | None = None,
) -> list[CellCheck]:
    """Re-run the selected cells into ``out`` (a fresh temporary folder by default) and compare each with
    its committed record. Every selected cell needs a committed ``ok`` record: a missing one means the
    suite, a recipe or the protocol changed (the cell id covers them) and is a one-line UsageError."""
    committed_path = Path(committed_path)
    src = committed_path / RECORDS if committed_path.is_dir() else committed_path
    committed = latest_by_cell(read_records(src))
    if not committed:
        raise UsageError(f"--verify {committed_path}: no benchmark records there")
    cells = suite.cells(methods=methods, models=models, recovery=recovery, targets=targets)
    for cell in cells:
        rec = committed.get(cell.id)
        if rec is None:
            raise UsageError(f"--verify: no committed record for cell {cell.id} ({cell.describe()}) in {src}; "
                             "the suite, a recipe or the evaluation protocol changed since it was written")
        if rec.get("status") != "ok":
            raise UsageError(f"--verify: the committed record of cell {cell.id} ({cell.describe()}) is "
                             f"{rec.get('status')}, nothing to compare")
    if out is None:
        out = Path(tempfile.mkdtemp(prefix=f"compress-verify-{suite.name}-"))
    run_suite(suite, out, resume=resume, overwrite=overwrite, methods=methods, models=models, recovery=recovery,
              targets=targets, log=log, python=python, inputs=[("the --verify records", src)])
    fresh = latest_by_cell(read_records(Path(out) / RECORDS))
    checks = []
    for cell in cells:
        old, new = committed[cell.id], fresh.get(cell.id) or {"status": "missing", "stage": "run", "error": "no record"}
        diffs = compare_records(old, new)
        checks.append(CellCheck(cell_id=cell.id, describe=cell.describe(), diffs=diffs,
                                stack=_stack_diff(old, new) if diffs else "", summary=_summary(new)))
    return checks
