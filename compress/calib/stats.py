"""Streaming per-channel statistics of module inputs or outputs, collected by forward hooks.

Nothing but running sums is kept, so memory does not grow with the number of tokens. The hooks fire
whatever runs the model: the whole-model pass (:func:`compress.calib.runner.run_calibration`) or the
layer-wise engine (:mod:`compress.calib.layerwise`); both set :data:`CURRENT_MASK` so that padded
positions are left out::

    with record({"l0.o_proj": layer0.self_attn.o_proj}) as stats:
        ctx.calibrate(ctx.draw(128, 512))
    salience = stats["l0.o_proj"].l2

A Mixture-of-Experts layer has no down-projection module to hook: :func:`record_experts` hooks its
experts module and computes each expert's down-projection input over exactly the tokens the router
sent to it (:class:`ExpertStats`); :func:`record_routing` counts what the routers chose.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import torch
from torch import nn

from compress.errors import NumericalError
from compress.model.adapter import Experts


# ---------------------------------------------------------------------------- statistics
class ChannelStats:
    """Streaming per-channel statistics of tensors shaped ``[..., C]``, accumulated in fp32.

    ``count`` is the number of rows (tokens) seen; ``sum`` and ``sumsq`` are ``[C]``; ``gram``
    (``X^T X``, ``[C, C]``) only when ``second_moment=True``. Buffers live on the device of the
    first update.
    """

    def __init__(self, second_moment: bool = False, dtype: torch.dtype = torch.float32):
        self.want_gram = second_moment
        self.dtype = dtype
        self.count = 0
        self.sum: torch.Tensor | None = None
        self.sumsq: torch.Tensor | None = None
        self.gram: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add ``x`` (``[..., C]``); ``mask`` (shape ``x.shape[:-1]``, or same numel) selects rows."""
        c = x.shape[-1]
        rows = x.detach().reshape(-1, c).to(self.dtype)
        if mask is not None:
            m = mask.to(rows.device).reshape(-1).bool()
            if m.numel() != rows.shape[0]:
                raise ValueError(f"mask has {m.numel()} positions but the tensor has {rows.shape[0]} rows")
            rows = rows[m]
        if self.sum is None:
            self.sum = torch.zeros(c, dtype=self.dtype, device=rows.device)
            self.sumsq = torch.zeros(c, dtype=self.dtype, device=rows.device)
            if self.want_gram:
                self.gram = torch.zeros(c, c, dtype=self.dtype, device=rows.device)
        elif self.sum.shape[0] != c:
            raise ValueError(f"channel count changed from {self.sum.shape[0]} to {c}")
        self.count += rows.shape[0]
        self.sum += rows.sum(0)
        self.sumsq += rows.square().sum(0)
        if self.gram is not None:
            self.gram.addmm_(rows.T, rows)

    def _need(self) -> None:
        if self.sum is None or self.count == 0:
            raise NumericalError("no activations were recorded; run the model inside record(...) first")

    @property
    def channels(self) -> int:
        return 0 if self.sum is None else int(self.sum.shape[0])

    @property
    def l2(self) -> torch.Tensor:
        """L2 norm of each channel over all tokens (TransAct's salience)."""
        self._need()
        return self.sumsq.clamp_min(0).sqrt()

    @property
    def mean(self) -> torch.Tensor:
        self._need()
        return self.sum / self.count

    @property
    def mean_sq(self) -> torch.Tensor:
        self._need()
        return self.sumsq / self.count

    @property
    def second_moment(self) -> torch.Tensor:
        """``X^T X / count`` (needs ``second_moment=True``)."""
        self._need()
        if self.gram is None:
            raise ValueError("second moment not collected; construct with second_moment=True")
        return self.gram / self.count

    def check_finite(self, name: str = "activations") -> None:
        """Raise :class:`NumericalError` if any accumulated value is NaN or inf."""
        for label, t in (("sum", self.sum), ("sum of squares", self.sumsq), ("second moment", self.gram)):
            if t is not None and not bool(torch.isfinite(t).all()):
                raise NumericalError(
                    f"{name}: {label} has NaN/inf after {self.count} tokens; check the model weights or use fp32"
                )

    def __repr__(self) -> str:
        return f"ChannelStats(count={self.count}, channels={self.channels}, gram={self.gram is not None})"


# Token mask of the mini-batch being run (set by run_calibration, read by the hooks).
CURRENT_MASK: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("compress_mask", default=None)


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for o in obj:
            if isinstance(o, torch.Tensor):
                return o
    return None


def _mask_for(x: torch.Tensor) -> torch.Tensor | None:
    mask = CURRENT_MASK.get()
    if mask is None:
        return None
    if mask.numel() == x.numel() // x.shape[-1]:
        return mask
    raise ValueError(
        f"token mask of shape {tuple(mask.shape)} does not match a hooked tensor of shape {tuple(x.shape)}"
    )


@contextlib.contextmanager
def record(
    modules: Mapping[str, nn.Module],
    *,
    where: Literal["input", "output"] = "input",
    second_moment: bool | set[str] | frozenset[str] = False,
) -> Iterator[dict[str, ChannelStats]]:
    """Collect :class:`ChannelStats` of each module's first input (or output) while inside.

    ``second_moment`` is a bool for all modules or the set of names that also get ``X^T X``.
    Hooks are removed on exit, also when the body raises. Positions masked out by the
    ``attention_mask`` given to :func:`run_calibration` are excluded.
    """
    if where not in ("input", "output"):
        raise ValueError(f"where must be 'input' or 'output', got {where!r}")
    if isinstance(second_moment, bool):
        gram_names = set(modules) if second_moment else set()
    else:
        unknown = set(second_moment) - set(modules)
        if unknown:
            raise ValueError(f"second_moment names not among the recorded modules: {sorted(unknown)}")
        gram_names = set(second_moment)
    stats = {name: ChannelStats(second_moment=name in gram_names) for name in modules}
    handles = []

    def make_hook(st: ChannelStats) -> Callable[..., None]:
        if where == "input":

            def pre_hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
                x = _first_tensor(args) if args else _first_tensor(kwargs)
                if x is not None:
                    st.update(x, _mask_for(x))

            return pre_hook

        def hook(_mod: nn.Module, _args: tuple, output: Any) -> None:
            x = _first_tensor(output)
            if x is not None:
                st.update(x, _mask_for(x))

        return hook

    try:
        for name, mod in modules.items():
            fn = make_hook(stats[name])
            if where == "input":
                handles.append(mod.register_forward_pre_hook(fn, with_kwargs=True))
            else:
                handles.append(mod.register_forward_hook(fn))
        yield stats
    finally:
        for h in handles:
            h.remove()


class ExpertStats:
    """Per-expert :class:`ChannelStats` of the down-projection input of one Mixture-of-Experts layer,
    each over only the tokens routed to that expert (``experts[e].count`` of them); ``tokens`` counts
    the tokens the layer saw."""

    def __init__(self, num_experts: int):
        self.experts = [ChannelStats() for _ in range(num_experts)]
        self.tokens = 0

    @property
    def routed(self) -> torch.Tensor:
        """Tokens routed to each expert ``[E]`` (they sum to ``tokens · top_k``)."""
        return torch.tensor([st.count for st in self.experts], dtype=torch.long)

    @property
    def l2(self) -> torch.Tensor:
        """``[E, I]``: the L2 norm of each channel of each expert over the tokens routed to it (0 for an
        expert no token reached)."""
        seen = [st for st in self.experts if st.count]
        if not seen:
            raise NumericalError("no token was routed to any expert; run the model inside record_experts(...) first")
        ref = seen[0].sumsq
        assert ref is not None
        return torch.stack([st.l2 if st.count else torch.zeros_like(ref) for st in self.experts])

    def check_finite(self, name: str = "expert activations") -> None:
        for e, st in enumerate(self.experts):
            st.check_finite(f"{name}, expert {e}")

    def __repr__(self) -> str:
        return f"ExpertStats(experts={len(self.experts)}, tokens={self.tokens}, routed={self.routed.tolist()})"


def _expert_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden_states [N, H], top_k_index [N, k])`` of a call of a transformers-5 experts module."""
    x = args[0] if args else kwargs["hidden_states"]
    idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
    return x, idx


def _token_mask(n: int) -> torch.Tensor | None:
    mask = CURRENT_MASK.get()
    if mask is None:
        return None
    if mask.numel() != n:
        raise ValueError(f"token mask of shape {tuple(mask.shape)} does not match {n} routed tokens")
    return mask.reshape(-1).bool()


@contextlib.contextmanager
def record_experts(experts: Mapping[str, Experts]) -> Iterator[dict[str, ExpertStats]]:
    """Collect :class:`ExpertStats` of each Mixture-of-Experts layer while inside.

    A pre-hook on the experts module reads the tokens and the router's top-k choice the module is given
    and computes, for each expert, ``act(gate_e(x)) * up_e(x)`` of the tokens routed to it
    (:meth:`Experts.down_input`, the eager experts forward's own arithmetic, whatever kernel then runs
    the module): the input of that expert's down projection. It costs one more gate/up product per
    routed token. Masked (padded) positions are left out; hooks are removed on exit."""
    stats = {name: ExpertStats(ex.num_experts) for name, ex in experts.items()}
    handles = []

    def make_hook(ex: Experts, st: ExpertStats) -> Callable[..., None]:
        def pre_hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
            x, idx = _expert_inputs(args, kwargs)
            m = _token_mask(x.shape[0])
            if m is not None:
                m = m.to(x.device)
                x, idx = x[m], idx[m]
            st.tokens += int(x.shape[0])
            with torch.no_grad():
                for e in range(ex.num_experts):
                    rows = (idx == e).any(dim=-1)
                    if bool(rows.any()):
                        st.experts[e].update(ex.down_input(x[rows], e))

        return pre_hook

    try:
        for name, ex in experts.items():
            handles.append(ex.module.register_forward_pre_hook(make_hook(ex, stats[name]), with_kwargs=True))
        yield stats
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def record_routing(experts: Mapping[str, Experts]) -> Iterator[dict[str, torch.Tensor]]:
    """Count, per Mixture-of-Experts layer, the tokens its router sends to each expert while inside
    (``[E]`` int64; each token counts once for each of its top-k experts). A forward hook on the router
    reads its chosen indices; masked positions are left out."""
    counts = {name: torch.zeros(ex.num_experts, dtype=torch.long) for name, ex in experts.items()}
    handles = []

    def make_hook(ex: Experts, name: str) -> Callable[..., None]:
        def hook(_mod: nn.Module, _args: tuple, output: Any) -> None:
            idx = output[ex.router_indices].detach()
            m = _token_mask(idx.shape[0])
            if m is not None:
                idx = idx[m.to(idx.device)]
            idx = idx.reshape(-1)
            idx = idx[idx < ex.num_experts].cpu()
            counts[name] += torch.bincount(idx, minlength=ex.num_experts)

        return hook

    try:
        for name, ex in experts.items():
            handles.append(ex.router.register_forward_hook(make_hook(ex, name)))
        yield counts
    finally:
        for h in handles:
            h.remove()


def check_batches(batches: torch.Tensor, attention_mask: torch.Tensor | None, batch_size: int) -> None:
    """Shapes every calibration pass (whole-model or layer-wise) expects; ValueError otherwise."""
    if batches.dim() != 2:
        raise ValueError(f"batches must be [N, seq_len], got shape {tuple(batches.shape)}")
    if attention_mask is not None and attention_mask.shape != batches.shape:
        raise ValueError("attention_mask must have the shape of batches")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
