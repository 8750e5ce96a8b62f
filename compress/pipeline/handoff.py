"""Prune once under ``accelerate launch``: rank 0 prunes, the other processes train from its result.

``compress run ... --recover-tokens N`` started by ``accelerate launch`` (or ``torchrun``) used to run
the whole pipeline in every process: each one loaded the dense model, measured it and pruned it
before the Trainer joined them. Now the main process (global rank 0) alone loads the dense model and
prunes; it writes the pruned model, in the format the final export will have (stock or compress), to a
staging folder beside ``--out`` (:func:`stage_dir_for`: ``.<out>.compress-pruned/model``, written
atomically by :func:`compress.io.export.export_model`); every other process waits for that folder,
loads the pruned model from it and never holds the dense weights. All of them then train, rank 0
exports, and the staging folder is gone before training starts.

Why this and not "prune on every process and check that they agree":

* host memory: with P processes on one machine, every-rank pruning holds P dense models at once
  (LLaMA-2-70B in bfloat16: 8 × 138 GB) and runs P copies of the calibration; here the dense model is in
  memory once and the other processes hold only the pruned one (measured on two processes: README,
  *Recovery training on several processes or GPUs*);
* pruning is not free (hours for a 70B model), and on P GPUs every-rank pruning does the same work P
  times; here the other processes are idle while rank 0 prunes, and its ``--stream-weights`` /
  ``--layerwise`` savings are not multiplied;
* agreement still is checked: every process hashes the weights it is about to train from and the
  tokens of its training text, and the run stops in one line if any differs from rank 0's
  (:func:`agree`). The hashes go into the run record (``record["distributed"]``).

Why a folder and not a broadcast of the weights through the process group: the others would sit in
that collective while rank 0 prunes (the timeouts below), on GPUs it stages every tensor through device
memory, and the staged folder is what the final export writes, so an export the format refuses fails
before training instead of after it.

The wait is on files, not on a collective: rank 0 may prune for hours, longer than any NCCL or gloo
timeout. Rank 0 keeps a heartbeat file fresh while it works; if it fails, it writes its one-line error
into the staging folder, so every process stops with that same line (and rank 0's exit code) instead
of hanging; a rank 0 that dies without a word is noticed when its heartbeat stops for
:data:`STALE_S` seconds. One collective is used at the start (:meth:`Handoff.open`: all processes
start together, so it returns in seconds) to agree on the staging folder and a fresh nonce, which
also tells this launch's files from those of a killed earlier one.

Distillation (``--recover-mode kd``) from the dense model itself needs the dense model as the teacher
in every process: there the other processes load it from the model source (once each, while rank 0
prunes) but still never prune. With ``--teacher`` they load that checkpoint instead.

Methods that train between their own pruning steps (TransAct with ``recover_tokens_per_shot``) need
every process inside their training, so for them every process prunes, as before, with the same
agreement check before the final recovery (:func:`trains_while_pruning`).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress.errors import CompressError, UsageError

if TYPE_CHECKING:
    from torch import nn

    from compress.calib.sources import CalibrationSource
    from compress.pruner import Pruner

#: Suffix of the staging folder beside ``--out``: ``.<out>.compress-pruned``.
STAGE_SUFFIX = ".compress-pruned"
#: Seconds between rank 0's heartbeats while it loads and prunes.
HEARTBEAT_S = 5.0
#: Seconds without a heartbeat after which a waiting process gives rank 0 up as dead.
STALE_S = 600.0
#: Seconds rank 0 waits for every other process to have read its error before it reports it and exits
#: (the launcher kills the remaining processes as soon as one exits, so the others must see it first).
ACK_S = 60.0

STATUS_FILE, HEARTBEAT_FILE, MODEL_DIR = "status.json", "heartbeat", "model"
PRUNE_ONCE, EVERY_RANK = "prune_once", "every_rank"


@dataclass(frozen=True)
class Launch:
    """This process in a multi-process launch (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``)."""

    rank: int
    world_size: int
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


#: Where a launcher says how many processes there are and which one this is: torchrun (``accelerate
#: launch --multi_gpu`` and its configs) and the MPI launchers accelerate's ``--cpu`` uses, as accelerate reads them.
_SIZE = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMI_SIZE")
_RANK = ("RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMI_RANK")
_LOCAL = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")


def launch_from_env(environ: dict[str, str] | None = None) -> Launch | None:
    """The launch this process belongs to, read from the variables the launcher sets (torchrun's
    ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK``, or MPI's), before any process group exists; None for a
    single process (unset, or one process). Values that are not integers in range are a one-line
    UsageError."""
    env = os.environ if environ is None else environ

    def first(names: tuple[str, ...]) -> tuple[str, str | None]:
        for n in names:
            if env.get(n, "") != "":
                return n, env[n]
        return names[0], None

    (size_name, size), (rank_name, rank_raw), (local_name, local_raw) = first(_SIZE), first(_RANK), first(_LOCAL)
    if size in (None, "1"):
        return None
    try:
        world, rank, local = int(size), int(rank_raw or 0), int(local_raw or 0)
    except ValueError:
        raise UsageError(f"{size_name}={size!r} {rank_name}={rank_raw!r} {local_name}={local_raw!r} are not integers; "
                         "start the processes with accelerate launch or torchrun") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise UsageError(f"{rank_name}={rank} is not within {size_name}={world}; start the processes with accelerate "
                         "launch or torchrun")
    return None if world == 1 else Launch(rank=rank, world_size=world, local_rank=local)


def stage_dir_for(out: Path) -> Path:
    """Where rank 0 stages the pruned model of a launched run writing ``out``: a hidden sibling."""
    return out.parent / f".{out.name}{STAGE_SUFFIX}"


def trains_while_pruning(pruner: Pruner) -> bool:
    """Whether the method trains between its own pruning steps (TransAct's ``recover_tokens_per_shot``):
    that training runs on every process of the launch, so every process must prune along."""
    value = getattr(pruner.config, "recover_tokens_per_shot", 0)
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def launch_mode(launch: Launch, pruner: Pruner, recover_tokens: int) -> str:
    """:data:`PRUNE_ONCE` or :data:`EVERY_RANK` for a launched run; refuses (one line, before any
    weight is read) a launched run that trains nothing, whose processes would only repeat one prune."""
    if trains_while_pruning(pruner):
        return EVERY_RANK
    if recover_tokens <= 0:
        raise UsageError(f"compress run under accelerate launch ({launch.world_size} processes) trains with "
                         "--recover-tokens N on every process; without it nothing is trained, so run it as one "
                         "process (plain `compress run`), or add --recover-tokens N")
    return PRUNE_ONCE


# ---------------------------------------------------------------------------- hashes
def params_sha256(model: nn.Module) -> str:
    """sha256 of the weights a process trains from: every parameter once (tied ones under their first
    name), in the model's own order, with its name, dtype and shape. The order is what DDP pairs the
    processes' gradients by, so two processes agree only if they would train the same tensors."""
    import torch

    h = hashlib.sha256()
    for name, p in model.named_parameters():
        t = p.detach()
        if t.is_meta:
            raise CompressError(f"parameter {name} has no weights (meta device) before training")
        t = t.to("cpu").contiguous().reshape(-1)
        h.update(f"{name}:{str(t.dtype).removeprefix('torch.')}:{tuple(p.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def tokens_sha256(source: CalibrationSource) -> str:
    """sha256 of the training text as this process's tokenizer cuts it (int64 token ids)."""
    return hashlib.sha256(source.tokens.contiguous().numpy()).hexdigest()


def failure_line(e: BaseException) -> tuple[str, int]:
    """The one line (without ``error: ``) and the exit code ``compress``'s CLI reports for ``e``."""
    if isinstance(e, CompressError):
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return msg.removeprefix("error: "), int(e.exit_code)
    if isinstance(e, KeyboardInterrupt):
        return "interrupted", 130
    first = str(e).splitlines()[0] if str(e) else ""
    name = type(e).__name__ if type(e).__name__ != "error" else f"{type(e).__module__}.error"
    return f"{name}: {first} (run with -v for the traceback)", 1


class PeerFailure(CompressError):
    """Raised in a process whose rank 0 failed before the hand-off: rank 0's own line and exit code."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


# ---------------------------------------------------------------------------- error reports
_pending: list[Callable[[], None]] = []


def after_error_reported() -> None:
    """Called by the CLI once it has printed a run's error: the last step of a failed hand-off (rank 0
    removes the staging folder, which lets the others exit; the others wait for that), so that every
    process has printed its line before the launcher, seeing the first one exit, stops the rest."""
    while _pending:
        fn = _pending.pop(0)
        with contextlib.suppress(Exception):
            fn()


atexit.register(after_error_reported)  # outside the CLI (Python API): at exit


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    """Atomic: a temporary file in the same folder, fsynced and renamed over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _peak_rss() -> int:
    from compress.probes import peak_rss_bytes

    return peak_rss_bytes()


@dataclass
class Handoff:
    """The staging folder of one launched run and the protocol around it (see the module docstring).

    Rank 0: :meth:`open` → (load, prune) → :meth:`publish` → :func:`agree` → :meth:`close`, or
    :meth:`fail` with the error. The others: :meth:`open` → :meth:`wait` → load → :func:`agree`."""

    launch: Launch
    root: Path
    nonce: str
    released: bool = False
    _beat: threading.Event | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ both
    @classmethod
    def open(cls, launch: Launch, out: Path | None) -> Handoff:
        """Agree on the staging folder (a collective, at the start). Rank 0 replaces what a killed
        earlier launch left there, creates the folder with a fresh nonce and starts its heartbeat;
        ``out`` None (``--no-save``): a temporary folder (one machine only)."""
        import torch.distributed as dist

        from compress.train.distributed import process_state

        process_state()  # joins the process group (gloo on CPU, NCCL on GPUs)
        payload: list[Any] = [None, None, None, 0]
        handoff = None
        if launch.is_main:
            root = None
            try:
                root = cls._prepare(out)
                handoff = cls(launch=launch, root=root, nonce=uuid.uuid4().hex)
                _write_json(root / STATUS_FILE, {"nonce": handoff.nonce, "state": "pruning", "host": socket.gethostname(),
                                                 "pid": os.getpid()})
                (root / HEARTBEAT_FILE).touch()
                handoff._start_heartbeat()
                payload = [str(root), handoff.nonce, None, 0]
            except BaseException as e:  # every process stops with rank 0's line
                if handoff is not None:
                    handoff.close()
                elif root is not None:
                    shutil.rmtree(root, ignore_errors=True)
                line, code = failure_line(e)
                dist.broadcast_object_list([None, None, line, code], src=0)
                raise
        dist.broadcast_object_list(payload, src=0)
        if payload[2] is not None:
            raise PeerFailure(payload[2], payload[3])
        return handoff or cls(launch=launch, root=Path(payload[0]), nonce=payload[1])

    @staticmethod
    def _prepare(out: Path | None) -> Path:
        if out is None:
            return Path(tempfile.mkdtemp(prefix="compress-pruned-"))
        root = stage_dir_for(out)
        if root.exists() or root.is_symlink():
            if not root.is_dir() or root.is_symlink() or not (root / STATUS_FILE).is_file():
                raise UsageError(f"{root} is in the way of the staging folder of --out and compress did not write it; "
                                 "move it away")
            shutil.rmtree(root)  # an earlier launch, killed before it cleaned up
        root.parent.mkdir(parents=True, exist_ok=True)
        root.mkdir()
        return root

    # ------------------------------------------------------------------ rank 0
    def _start_heartbeat(self) -> None:
        stop = threading.Event()
        beat = self.root / HEARTBEAT_FILE

        def run() -> None:
            while not stop.wait(HEARTBEAT_S):
                with contextlib.suppress(OSError):
                    os.utime(beat)

        threading.Thread(target=run, name="compress-heartbeat", daemon=True).start()
        self._beat = stop

    def _stop_heartbeat(self) -> None:
        if self._beat is not None:
            self._beat.set()
            self._beat = None

    def publish(self, model: nn.Module, tokenizer: Any, *, kind: str, plan: dict[str, Any],
                record: dict[str, Any]) -> dict[str, Any]:
        """Rank 0: write the pruned model to the staging folder in its final format (atomically), then
        tell the others it is there. Returns the export info."""
        from compress.io.export import export_model

        info = export_model(model, tokenizer, self.root / MODEL_DIR, kind=kind, plan=plan, record=record)
        self._stop_heartbeat()
        _write_json(self.root / STATUS_FILE, {"nonce": self.nonce, "state": "done", "format": info["kind"]})
        return info

    def fail(self, e: BaseException) -> None:
        """Rank 0 failed before the hand-off: record its line for the others and wait (at most
        :data:`ACK_S`) until each has read it; the folder is removed once rank 0 has reported the
        error (:func:`after_error_reported`). A no-op after the hand-off."""
        if self.released:
            return
        self.released = True
        self._stop_heartbeat()
        line, code = failure_line(e)
        try:
            _write_json(self.root / STATUS_FILE, {"nonce": self.nonce, "state": "failed", "message": line,
                                                  "exit_code": code})
        except OSError:
            pass
        else:
            if not isinstance(e, KeyboardInterrupt):  # Ctrl-C reaches every process itself
                deadline = time.monotonic() + ACK_S
                want = {self.root / f"seen-{r}" for r in range(1, self.launch.world_size)}
                while time.monotonic() < deadline and not all(p.exists() for p in want):
                    time.sleep(0.05)
        root = self.root
        _pending.append(lambda: shutil.rmtree(root, ignore_errors=True))

    def close(self) -> None:
        """Rank 0, once every process holds the pruned model: remove the staging folder."""
        self.released = True
        self._stop_heartbeat()
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------ the others
    def _released(self) -> None:
        """Wait (at most :data:`ACK_S`) until rank 0, having reported its error, removes the folder."""
        deadline = time.monotonic() + ACK_S
        while self.root.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def wait(self, *, stale_s: float = STALE_S, poll_s: float = 0.2) -> Path:
        """The other processes: block until rank 0 has staged the pruned model (its folder), or raise
        rank 0's own error (:class:`PeerFailure`), or a one-line error when rank 0's heartbeat stops,
        the folder is not visible here, or another launch took it over."""
        last_beat: int | None = None
        last_change = time.monotonic()
        where = f"{self.root} (host {socket.gethostname()})"
        while True:
            status = _read_json(self.root / STATUS_FILE)
            if status is None:
                if not self.root.is_dir():
                    raise CompressError(f"the staging folder {where} that rank 0 made is gone or not visible "
                                        "here: rank 0 stopped, or --out is not on a filesystem every machine of "
                                        "the launch sees")
            elif status.get("nonce") != self.nonce:
                raise CompressError(f"another run took over the staging folder {where}: do not start two "
                                    "launches with the same --out")
            elif status.get("state") == "done":
                return self.root / MODEL_DIR
            elif status.get("state") == "failed":
                with contextlib.suppress(OSError):
                    (self.root / f"seen-{self.launch.rank}").touch()
                _pending.append(self._released)  # once our line is printed: rank 0 reports its own
                raise PeerFailure(str(status.get("message") or "rank 0 failed"), int(status.get("exit_code") or 1))
            try:
                beat = (self.root / HEARTBEAT_FILE).stat().st_mtime_ns
            except OSError:
                beat = None
            if beat != last_beat:
                last_beat, last_change = beat, time.monotonic()
            elif time.monotonic() - last_change > stale_s:
                raise CompressError(f"rank 0 stopped without finishing the pruned model or reporting an error (no "
                                    f"heartbeat in {where} for {stale_s:.0f} s); see rank 0's output")
            time.sleep(poll_s)
            poll_s = min(1.0, poll_s * 1.5)


# ---------------------------------------------------------------------------- agreement
def agree(launch: Launch, entry: dict[str, Any], model: nn.Module, source: CalibrationSource | None, *,
          mode: str) -> dict[str, Any]:
    """Every process: hash the weights it is about to train from and its training tokens, gather every
    process's ``entry`` (a collective: by now all of them are here) and stop in one line, in every
    process, if any differs from rank 0's. Returns the run record's ``distributed`` entry."""
    import torch.distributed as dist

    from compress.train.distributed import process_state

    entry = {**entry, "rank": launch.rank,
             "pruned_weights_sha256": params_sha256(model),
             "training_tokens_sha256": tokens_sha256(source) if source is not None else None,
             "peak_rss_bytes": _peak_rss()}
    process_state()
    gathered: list[Any] = [None] * launch.world_size
    dist.all_gather_object(gathered, entry)
    ranks = sorted(gathered, key=lambda e: e["rank"])
    why = {"pruned_weights_sha256": ("pruned weights", "the pruned model does not load back bit for bit from its "
                                     "staged copy" if mode == PRUNE_ONCE else "the method does not prune "
                                     "deterministically on every process"),
           "training_tokens_sha256": ("training tokens", "the tokenizers cut the training text differently")}
    for key, (what, cause) in why.items():
        ref = ranks[0][key]
        bad = [e["rank"] for e in ranks if e[key] != ref]
        if bad:
            other = next(e[key] for e in ranks if e[key] != ref)
            raise CompressError(f"rank {', '.join(map(str, bad))} would train from other {what} than rank 0 (sha256 "
                                f"{str(other)[:12]} vs {str(ref)[:12]}): {cause}; prune in one process "
                                "(compress run --out DIR) and train with accelerate launch ... compress recover DIR")
    return {"world_size": launch.world_size, "mode": mode,
            "pruned_on": [0] if mode == PRUNE_ONCE else [e["rank"] for e in ranks],
            "pruned_weights_sha256": ranks[0]["pruned_weights_sha256"],
            "training_tokens_sha256": ranks[0]["training_tokens_sha256"], "ranks": ranks}


class GuardedRecovery:
    """Rank 0's recovery while it prunes alone. A method that trains between its pruning steps (and
    that :func:`trains_while_pruning` does not know) would start a training the other processes,
    waiting for the staged model, never join: refused in one line instead of a hang. After the
    hand-off (:attr:`armed` False) it is the run's recovery."""

    def __init__(self, inner: Any, method: str):
        self._inner, self._method, self.armed = inner, method, True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.armed:
            raise UsageError(f"method {self._method} trains between its pruning steps, which under accelerate launch "
                             "needs every process; prune in one process (compress run --out DIR) and train with "
                             "accelerate launch ... compress recover DIR")
        return self._inner(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # only for names not set in __init__
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._inner, name)



# ---------------------------------------------------------------------------- the other processes
def train_from_staged(spec: Any, checked: Any, handoff: Handoff, *, t_start: float,
                      log: Callable[[str], None]) -> dict[str, Any]:
    """A process other than rank 0 in a prune-once run: load the distillation teacher if there is one
    (while rank 0 prunes), wait for the staged pruned model, load it, agree with every process on the
    weights and tokens, train, and wait for rank 0's export. Returns the fields of a
    :class:`compress.pipeline.run.RunResult` (``run`` builds it: this module sits below it) whose record
    has ``distributed`` and ``recovery_result`` (rank 0's record is the run's)."""
    from compress.assets import display_path
    from compress.io.loading import load_model
    from compress.io.outpath import PLAN_FILE, RECORD_FILE
    from compress.model.footprint import Footprint
    from compress.pipeline.record import empty_run_record, jsonable
    from compress.train.distributed import wait_for_everyone
    from compress.train.recovery import Recovery, check_teacher_tokenizer

    rank = handoff.launch.rank

    def say(msg: str) -> None:
        log(f"rank {rank}: {msg}")

    cfg = checked.recovery
    teacher, teacher_tok, loaded_dense = None, None, False
    if cfg.mode == "kd":  # every process distills from its own copy of the teacher
        src = spec.teacher or checked.source
        t = load_model(src, dtype=spec.dtype, device="cpu", trust_remote_code=spec.trust_remote_code)
        teacher, teacher_tok, loaded_dense = t.model.eval(), t.tokenizer, spec.teacher is None
        say(f"distillation teacher: {display_path(t.source)}" + (" (the dense model)" if loaded_dense else ""))
    say(f"waiting for rank 0 to prune ({display_path(str(handoff.root))})")
    t0 = time.perf_counter()
    folder = handoff.wait()
    waited_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    loaded = load_model(str(folder), dtype="auto", device="cpu", trust_remote_code=spec.trust_remote_code)
    model, tok = loaded.model, loaded.tokenizer
    if teacher_tok is not None and spec.teacher is not None:
        check_teacher_tokenizer(tok, teacher_tok)
    plan_doc = _read_json(folder / PLAN_FILE) or {}
    staged = _read_json(folder / RECORD_FILE) or {}
    load_s = time.perf_counter() - t1
    source = checked.calibration.with_tokenizer(tok)
    entry = {"pruned": False, "loaded": "the pruned model staged by rank 0", "waited_s": round(waited_s, 3),
             "load_s": round(load_s, 3), "teacher_loaded_dense": loaded_dense,
             "ready_s": round(time.perf_counter() - t_start, 3)}
    info = agree(handoff.launch, entry, model, source, mode=PRUNE_ONCE)
    say(f"training from the pruned model of rank 0 (waited {waited_s:.1f}s, loaded in {load_s:.1f}s)")
    res = Recovery(source, cfg, progress=spec.progress, teacher=teacher)(model)
    del teacher
    model = res.model
    record = empty_run_record()
    record.update({"method": staged.get("method"), "target": staged.get("target"), "seed": spec.seed,
                   "distributed": info, "recovery_result": {**res.summary(), "final_loss": res.losses[-1][1]
                                                            if res.losses else None}})
    if checked.out is not None:
        wait_for_everyone()  # rank 0's export (compress.train.distributed.on_main_process)
    dense = Footprint(**staged["dense"]) if isinstance(staged.get("dense"), dict) else None
    achieved = Footprint(**staged["achieved"]) if isinstance(staged.get("achieved"), dict) else None
    return {"model": model, "tokenizer": tok, "plan": plan_doc.get("plan") or {}, "dense": dense,
            "achieved": achieved, "record": jsonable(record)}
