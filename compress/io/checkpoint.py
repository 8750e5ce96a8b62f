"""Checkpoints of iterative methods, so that an interrupted run resumes where it stopped.

``compress run`` gives every method a state folder (``PruneContext.state_dir``, a hidden sibling of
``--out``) and a run key (``PruneContext.state_key``: a hash of everything that determines the result).
A method that works in steps (TransAct's shots) calls ``ctx.checkpoint(model, state)`` after each
finished step and ``ctx.resume_point()`` before the first one; ``compress run --resume`` then continues
from the last finished step and gives the same result as an uninterrupted run.

A checkpoint is ONE file, ``<state_dir>/checkpoint.safetensors``: the model's current weights (tied
tensors once, through ``safetensors.torch.save_model``) with the method's JSON state, the torch RNG
state and the run key in the safetensors metadata. It is written to a temporary file in a scratch
folder, fsynced and renamed over the previous one, so a kill at any moment leaves the previous checkpoint or the new one,
never a partial file. Nothing is pickled.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.errors import UsageError

CHECKPOINT_FILE = "checkpoint.safetensors"
#: Test hook: the process SIGKILLs itself right after writing its N-th checkpoint (real interruption).
KILL_ENV = "COMPRESS_TEST_KILL_AFTER_CHECKPOINT"
_META_STATE, _META_KEY, _META_RNG = "compress_state", "compress_run_key", "compress_torch_rng"
_written = 0


@dataclass
class Checkpoint:
    """A finished step of an interrupted run: ``state`` is what the method saved with it."""

    path: Path
    key: str
    state: dict[str, Any]
    rng: bytes | None = None

    def load_into(self, model: nn.Module) -> None:
        """Copy the saved weights into ``model`` (already cut to the saved shapes) and restore the RNG."""
        from safetensors.torch import load_model

        device = next(model.parameters()).device
        try:
            load_model(model, str(self.path), strict=True, device=str(device))
            if self.rng is not None:
                torch.set_rng_state(torch.frombuffer(bytearray(self.rng), dtype=torch.uint8))
        except Exception as e:  # noqa: BLE001 - whatever is wrong with the file, it is the file (not the method)
            raise UsageError(f"checkpoint {self.path} does not fit the model ({_first_line(e)}); "
                             "pass --overwrite to start over") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:160]}" if text else type(e).__name__


def read_checkpoint(state_dir: str | os.PathLike | None) -> Checkpoint | None:
    """The checkpoint in ``state_dir`` (metadata only; no tensor is read), or None when there is none."""
    if state_dir is None:
        return None
    path = Path(state_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        missing = [k for k in (_META_STATE, _META_KEY) if k not in meta]
        if missing:
            raise ValueError(f"no {missing[0]} in its metadata")
        state = json.loads(meta[_META_STATE])
        if not isinstance(state, dict):
            raise ValueError(f"its method state is a JSON {type(state).__name__}, not an object")
        rng = base64.b64decode(meta[_META_RNG], validate=True) if _META_RNG in meta else None
        if rng is not None and len(rng) != torch.get_rng_state().numel():
            raise ValueError(f"its RNG state has {len(rng)} bytes, not {torch.get_rng_state().numel()}")
        return Checkpoint(path=path, key=meta[_META_KEY], state=state, rng=rng)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is refused the same way
        raise UsageError(f"checkpoint {path} is unreadable or malformed ({_first_line(e)}); "
                         "pass --overwrite to start over") from e


def discard_checkpoint(state_dir: str | os.PathLike) -> None:
    """Remove what :func:`save_checkpoint` wrote in ``state_dir`` (the checkpoint, interrupted scratch
    folders), then the folder itself if nothing else is left: never anything compress did not write."""
    folder = Path(state_dir)
    if not folder.is_dir():
        return
    (folder / CHECKPOINT_FILE).unlink(missing_ok=True)
    for scratch in folder.glob(".checkpoint-*"):
        if scratch.is_dir() and not scratch.is_symlink():
            shutil.rmtree(scratch, ignore_errors=True)
    with contextlib.suppress(OSError):  # something else is in there: the folder stays
        folder.rmdir()


def save_checkpoint(state_dir: str | os.PathLike, key: str, model: nn.Module, state: dict[str, Any]) -> Path:
    """Atomically replace the checkpoint in ``state_dir`` with ``model``'s weights and ``state`` (JSON)."""
    from safetensors.torch import save_model

    global _written
    folder = Path(state_dir)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        _META_STATE: json.dumps(state, sort_keys=True),
        _META_KEY: key,
        _META_RNG: base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
    }
    # a private scratch folder: safetensors itself writes through a temporary file of its own
    # (".tmpXXXXXX" beside its target), so a kill mid-write leaves only this folder behind
    scratch = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=folder))
    tmp = scratch / CHECKPOINT_FILE
    try:
        save_model(model, str(tmp), metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, folder / CHECKPOINT_FILE)
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)  # the rename itself survives a power loss
        finally:
            os.close(dfd)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _written += 1
    if os.environ.get(KILL_ENV) == str(_written):
        os.kill(os.getpid(), signal.SIGKILL)
    return folder / CHECKPOINT_FILE
