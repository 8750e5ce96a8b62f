"""Multi-process helpers for training under ``accelerate launch`` (DDP / FSDP, or one process).

Only the main process writes output folders (:func:`on_main_process`, with the barrier in
``finally``); FSDP-sharded weights are gathered into a full state dict and loaded into a meta
skeleton of the model for export (:func:`meta_skeleton`, :func:`load_full_state`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

T = TypeVar("T")


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree whose parameters are on the meta device (no memory).

    Buffers are copied (small: rotary frequencies); shared parameters stay shared.
    """
    import copy

    memo: dict[int, Any] = {}
    for p in model.parameters():  # deepcopy consults the memo first: every Parameter maps to a meta one
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    return copy.deepcopy(model, memo)


def load_full_state(skeleton: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Fill a :func:`meta_skeleton` with full (gathered) weights; parameters shared in the skeleton
    (tied embeddings) are shared again. Every parameter must be in ``state``."""
    aliases: dict[int, list[str]] = {}
    for name, p in skeleton.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    skeleton.load_state_dict(state, strict=True, assign=True)
    for names in aliases.values():
        first = skeleton.get_parameter(names[0])
        for other in names[1:]:
            mod, _, attr = other.rpartition(".")
            setattr(skeleton.get_submodule(mod) if mod else skeleton, attr, first)
    left = [n for n, p in skeleton.named_parameters() if p.is_meta]
    if left:  # pragma: no cover - strict load_state_dict already refuses this
        raise RuntimeError(f"parameters left without weights after gathering: {left[:5]}")
    return skeleton


# ---------------------------------------------------------------------------- processes
def process_state() -> Any:
    """accelerate's shared process state, the one the Trainer uses.

    Under ``accelerate launch`` (or ``torchrun``) it joins the process group (gloo on CPU, NCCL on
    GPUs); in a plain process it is a single-process state. ``cpu`` matches what :func:`recover`
    gives the Trainer, so whichever is created first, both agree.
    """
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    """True in the process that writes files (rank 0, or the only process)."""
    return bool(process_state().is_main_process)


def wait_for_everyone() -> None:
    """Barrier across the launched processes (a no-op in a single process)."""
    process_state().wait_for_everyone()


def on_main_process(fn: Callable[[], T], *, launched: bool = True) -> T | None:
    """Run ``fn`` (an export) in the main process only; every process returns once it has finished.

    The barrier is in ``finally``: if ``fn`` raises on rank 0, the other ranks are released (and
    rank 0 re-raises) instead of waiting forever for a barrier rank 0 never reaches.
    ``launched=False`` (no Trainer ran, so no process group): just ``fn()``.
    """
    if not launched:
        return fn()
    try:
        return fn() if is_main_process() else None
    finally:
        wait_for_everyone()
