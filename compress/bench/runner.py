"""Run a suite: every cell in its own process, one record line per finished cell, resumable.

``<out>/records.jsonl`` gets one line per finished cell (appended, flushed and fsynced as soon as
the cell ends), ``<out>/logs/<cell id>.log`` the cell's stdout/stderr, and ``<out>/suite.json`` the
resolved suite. With ``resume`` a cell that already has a record is skipped (``retry_failed``: only
if that record is ``ok``); a record line deleted by hand makes exactly that cell run again.

Before a cell's process is started, cheap checks run here (method known, settings valid, target
parses and is reachable on a meta-device copy of the model, the method accepts the model): a cell
that cannot start gets its ``failed`` record at once, without loading weights (``refused`` when the
method declines the target or model: :func:`compress.bench.record.is_refusal`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.bench.record import append_record, fail, jsonable, new_record, plugin_of, read_records
from compress.bench.suite import DENSE, Cell, Suite
from compress.errors import UsageError

__all__ = ["BenchSummary", "latest_by_cell", "preflight", "run_suite"]

RECORDS = "records.jsonl"


@dataclass
class BenchSummary:
    """What :func:`run_suite` did. ``failed`` lists the suite's cells whose latest record failed,
    ``refused`` those the method declined (e.g. a ``kv:`` target for a method that keeps every head):
    an answer, recorded as such, not an error of the run."""

    out: Path
    total: int = 0
    ran: int = 0
    skipped: int = 0
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    def count(self, cid: str, status: str | None) -> None:
        if status == "ok":
            self.ok += 1
        elif status == "refused":
            self.refused.append(cid)
        else:
            self.failed.append(cid)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def latest_by_cell(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last record of each cell id (a retried cell's newest line wins)."""
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        out[r["cell_id"]] = r
    return out


class _Preflight:
    """The run preflight (:func:`compress.pipeline.preflight.preflight`) of each cell, with the
    config-only model built once per model path, plus the cell's evaluation protocol."""

    def __init__(self) -> None:
        self._models: dict[str, Any] = {}

    def _shapes(self, cell: Cell) -> tuple[Any, Any]:
        path = cell.model["path"]
        if path not in self._models:
            from compress.pipeline.preflight import meta_model

            try:
                self._models[path] = (meta_model(path, dtype=cell.model.get("dtype")), None)
            except Exception as e:  # noqa: BLE001 - becomes the cells' failed records
                self._models[path] = (None, e)
        return self._models[path]

    def __call__(self, cell: Cell) -> Exception | None:
        shapes, err = self._shapes(cell)
        if err is not None:
            return err
        max_pos = getattr(shapes.model.config, "max_position_embeddings", None)
        for source, lengths in (cell.eval.get("ppl") or {}).items():
            too_long = [n for n in lengths if isinstance(max_pos, int) and n > max_pos]
            if too_long:
                return UsageError(f"eval.ppl.{source}: context {too_long[0]} exceeds the model's "
                                  f"max_position_embeddings={max_pos}")
        if cell.method == DENSE:
            return None
        from compress.pipeline.preflight import preflight
        from compress.target import Target

        rec = cell.recovery
        try:
            preflight(method=cell.method, settings=cell.settings, target=Target.parse(cell.target),
                      model=cell.model["path"], dtype=cell.model.get("dtype"), seed=cell.seed, calib=cell.calib,
                      recover_tokens=int(rec.get("tokens") or 0), recover_mode=rec.get("mode", "full"),
                      recover_settings=rec.get("settings") or {}, shapes=shapes)
        except Exception as e:  # noqa: BLE001 - a plugin's check() may raise anything; the cell fails
            return e
        return None


def preflight(cell: Cell) -> Exception | None:
    """Why ``cell`` cannot start (one-line error), or None. No weights are loaded."""
    return _Preflight()(cell)


def _tail(path: Path, n: int = 4000) -> str:
    try:
        data = path.read_bytes()[-n:].decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in data.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _spawn(cell: Cell, log_path: Path, python: str) -> dict[str, Any]:
    """Run ``cell`` in a child process; a record comes back whatever happens to the child."""
    with tempfile.TemporaryDirectory(prefix="compress-cell-") as tmp:
        rec_path = Path(tmp) / "record.json"
        cmd = [python, "-m", "compress.bench.cell", cell.model_dump_json(), "--record", str(rec_path)]
        env = dict(os.environ)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        with open(log_path, "ab") as log:
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {cell.describe()}\n".encode())
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                    preexec_fn=functools.partial(_die_with_parent, os.getpid()))
            try:
                rc = proc.wait(timeout=cell.timeout_s)
            except subprocess.TimeoutExpired:
                _kill(proc)
                record = new_record(cell)
                record["plugin"] = _plugin(cell.method)
                return fail(record, "timeout", f"cell did not finish within timeout_s={cell.timeout_s:g}")
            except BaseException:
                _kill(proc)
                raise
        if rec_path.is_file():
            try:
                return json.loads(rec_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                pass
        record = new_record(cell)
        record["plugin"] = _plugin(cell.method)
        why = _tail(log_path)
        return fail(record, "process", f"cell process exited with code {rc} without a record"
                    + (f"; last output: {why}" if why else ""))


def _die_with_parent(runner_pid: int) -> None:
    """In the cell process, before exec (Linux): get SIGKILL when the runner dies, however it dies.

    The cell leads its own session (a Ctrl-C meant for the runner must not half-kill it), so without
    this a runner stopped by SIGTERM or SIGKILL would leave its cell running, up to ``timeout_s``, with
    nobody to read its record. Elsewhere a no-op: the runner's ``except`` still kills the cell on
    Ctrl-C and errors."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if os.getppid() != runner_pid:  # the runner died before the request took effect
        os._exit(1)


def _kill(proc: subprocess.Popen) -> None:
    """Stop the cell process we started (and its children: it leads its own session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.wait(timeout=30)


def _plugin(method: str) -> dict[str, Any] | None:
    try:
        return plugin_of(method)
    except Exception:  # noqa: BLE001 - the plugin registry itself is broken: the record says so elsewhere
        return None


def _status_line(rec: dict[str, Any]) -> str:
    if rec.get("status") == "refused":
        return f"refused by the method: {rec.get('error')}"
    if rec.get("status") != "ok":
        return f"failed ({rec.get('stage')}): {rec.get('error')}"
    bits = []
    for source, by_len in (rec.get("ppl") or {}).items():
        for n, r in by_len.items():
            if isinstance(r, dict) and r.get("ppl") is not None:
                bits.append(f"ppl {source}@{n} {r['ppl']:.3g}")
    if rec.get("accuracy_avg") is not None:
        bits.append(f"acc avg {rec['accuracy_avg']:.3f}")
    if rec.get("ratios"):
        bits.append(f"params {rec['ratios']['params']:.1%}")
    return "ok" + (f" ({', '.join(bits)})" if bits else "")


def run_suite(
    suite: Suite,
    out: str | Path,
    *,
    resume: bool = False,
    retry_failed: bool = False,
    overwrite: bool = False,
    methods: list[str] | None = None,
    models: list[str] | None = None,
    recovery: list[int] | None = None,
    targets: list[str] | None = None,
    log: Callable[[str], None] = print,
    python: str | None = None,
    inputs: Iterable[tuple[str, str | Path | None]] = (),
) -> BenchSummary:
    """Run the cells of ``suite`` (optionally only ``methods``/``models``/``recovery`` budgets/``targets``)
    into ``out``.

    Without ``resume`` or ``overwrite`` an ``out`` that already holds records is refused (a one-line
    UsageError). ``overwrite`` starts the records over. ``out`` never overlaps a model of the suite or
    one of ``inputs`` (e.g. the committed records of ``--verify``), and a ``records.jsonl`` there that
    holds no benchmark record is never appended to or removed. Returns a :class:`BenchSummary`.
    """
    from compress.io.outpath import check_apart

    out = Path(out)
    cells = suite.cells(methods=methods, models=models, recovery=recovery, targets=targets)
    models_read = {str(c.model.get("path")) for c in cells if c.model.get("path")}
    check_apart(out, [*(("a model of the suite", m) for m in sorted(models_read)), *inputs])
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder; choose another --out for the results")
    records_path = out / RECORDS
    existing = read_records(records_path)
    # a file of JSON lines (perhaps with a torn first record) is compress's; anything else never is
    head = records_path.read_bytes().lstrip()[:1] if records_path.is_file() else b""
    if not existing and head not in (b"", b"{"):
        raise UsageError(f"{records_path} holds no benchmark records, so compress did not write it and never "
                         "replaces it; choose another --out or remove it yourself")
    if existing and not (resume or overwrite):
        raise UsageError(f"{records_path} already holds {len(existing)} record(s); pass --resume to continue "
                         "or --overwrite to start over")
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        return _run_cells(suite, out, cells, resume=resume, retry_failed=retry_failed, overwrite=overwrite, log=log,
                          python=python or sys.executable)


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """One ``compress bench`` per results folder at a time (an advisory lock on ``<out>/.lock``)."""
    import fcntl

    with open(out / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UsageError(f"another compress bench is writing to {out}; wait for it or use another --out") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run_cells(suite: Suite, out: Path, cells: list[Cell], *, resume: bool, retry_failed: bool, overwrite: bool,
               log: Callable[[str], None], python: str) -> BenchSummary:
    records_path = out / RECORDS
    if overwrite and records_path.exists():
        records_path.unlink()
    existing = read_records(records_path)  # again, now that the folder is ours
    (out / "logs").mkdir(exist_ok=True)
    (out / "suite.json").write_text(json.dumps(jsonable(suite.model_dump(mode="json")), indent=1) + "\n")
    done = latest_by_cell(existing) if resume else {}
    summary = BenchSummary(out=out, total=len(cells))
    check = _Preflight()
    for i, cell in enumerate(cells, 1):
        cid = cell.id
        prev = done.get(cid)
        head = f"[{i}/{len(cells)}] {cell.describe()} [{cid}]"
        if prev is not None and (prev.get("status") == "ok" or not retry_failed):
            summary.skipped += 1
            summary.count(cid, prev.get("status"))
            log(f"{head}: done before, skipped ({prev.get('status')})")
            continue
        t0 = time.perf_counter()
        err = check(cell)
        if err is not None:
            record = new_record(cell)
            record["plugin"] = _plugin(cell.method)
            fail(record, "preflight", err)
            record["error_type"] = type(err).__name__
            record["timing_s"] = {"cell": round(time.perf_counter() - t0, 3)}
        else:
            log(f"{head}: running")
            record = _spawn(cell, out / "logs" / f"{cid}.log", python)
            record.setdefault("timing_s", {})["process"] = round(time.perf_counter() - t0, 3)
        append_record(records_path, record)
        summary.ran += 1
        summary.count(cid, record.get("status"))
        log(f"{head}: {_status_line(record)} in {time.perf_counter() - t0:.1f}s")
    return summary
