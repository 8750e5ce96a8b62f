"""Footprint of a (possibly pruned) causal LM: parameters, FLOPs/token, KV-cache bytes/token.

Everything is computed from **module shapes** (through :class:`compress.model.adapter.ArchAdapter`), never
from config values, because pruned models can have a different number of heads or MLP width in
every layer, low-rank factor pairs in place of linears, or extra "shortcut" linears in the residual
path (SliceGPT). Nothing here reads weight *values*, so every function here also
works on a model built on the ``meta`` device, which is how a 7B/70B plan is sized without weights::

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    footprint(model)

Conventions
-----------
* **Parameters** — every unique tensor once: a Parameter shared by two modules (tied embedding and
  lm_head) or two Parameters viewing the same storage count once. Buffers are not parameters.
* **FLOPs per token** — forward FLOPs of one pass over a sequence of ``seq_len`` tokens, divided by
  ``seq_len`` (so ``flops_per_token(m, T) * B * T`` is the FLOPs of a ``[B, T]`` forward). A
  multiply-add counts 2 FLOPs. Counted: every linear-like module (``2·in·out`` per token; the bias
  add, norms, activations, softmax and RoPE are not counted; the embedding lookup is free; the
  lm_head is a matmul even when its weight is tied to the embedding) plus the attention core of
  each layer, ``QKᵀ`` and ``AV`` with every query reading ``K`` keys (no causal halving):
  ``4·n_q·head_dim·K`` per token, ``K = T`` for full attention. This is exactly what
  :class:`torch.utils.flop_counter.FlopCounterMode` counts under ``attn_implementation="eager"``.
  For a uniform Llama layer it reduces to
  ``2·h·(nq+2nkv)·hd + 2·nq·hd·h + 4·nq·hd·T + 6·h·I`` per token, plus ``2·h·V`` for the lm_head.
* **Mixture-of-Experts layers** (transformers 5's fused experts: a block with ``experts`` holding 3-D
  ``gate_up_proj`` ``[E, 2I, H]`` / ``down_proj`` ``[E, H, I]`` and a top-k router ``gate``;
  :func:`routed_experts_flops`): every token runs the router (``2·H·E``) and the ``top_k`` experts it
  is routed to (``6·H·I`` each), so FLOPs/token count the ACTIVE experts, ``2·H·E + k·6·H·I``, while the
  parameters count all E. This is what ``FlopCounterMode`` counts over the eager (or ``batched_mm``)
  experts forward for any batch: each token meets exactly k experts. (The ``grouped_mm`` kernel, the
  default where it can run, is not counted by ``FlopCounterMode`` at all.)
* **Sliding-window layers** (Mistral's ``sliding_window``; Qwen2/Qwen3 ``layer_types`` from
  ``use_sliding_window`` / ``max_window_layers``; Gemma-2's alternating and Gemma-3's
  ``sliding_window_pattern`` layers, both as ``layer_types``; :meth:`ArchAdapter.sliding_window`) read
  ``K = min(T, W)`` keys per query, what a windowed kernel computes and what a decode step at context
  ``T`` reads (``FlopCounterMode`` on a one-token step over transformers' cache counts exactly
  that). An eager *prefill* still multiplies the full ``T×T`` scores and masks them, so
  ``FlopCounterMode`` over a prefill counts ``K = T`` there: the window is not free in eager code.
* **KV bytes per token** at context ``T`` — the bytes the KV cache of one sequence holds after ``T``
  tokens, divided by ``T``: the sum over layers of the k and v widths (``2·n_kv·head_dim``, read
  through :meth:`ArchAdapter.kv_width` from the weights, so one KV head (MQA) and a ``head_dim`` other
  than hidden / heads are what they are; fused ``qkv_proj`` included) times the element size, times
  ``min(T, W - 1) / T`` on a sliding layer. ``W - 1`` is what transformers 5 keeps
  (``DynamicSlidingWindowLayer`` caches the last ``W - 1`` tokens; the step's own k/v make the ``W``
  keys attention reads). Without sliding layers it does not depend on ``T``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from compress.model.adapter import ArchAdapter, adapter_for
from compress.target import FOOTPRINT_FIELD


# --------------------------------------------------------------------------------------- protocol
@runtime_checkable
class FlopCounted(Protocol):
    """A linear-like module that reports its own forward FLOPs per token.

    Implement it on custom replacements of ``nn.Linear`` (e.g. a low-rank pair ``B @ A`` returns
    ``2·rank·(in_features + out_features)``). When a module satisfies this protocol its own figure is
    used and its submodules are not visited. A module that does not implement it is looked into: a
    low-rank module made of two ``nn.Linear`` children is then counted correctly anyway.
    """

    in_features: int
    out_features: int

    def flops_per_token(self) -> float:
        """Forward FLOPs for one token (2 per multiply-add)."""
        ...


# --------------------------------------------------------------------------------------- helpers
def _adapter(model: nn.Module, arch: ArchAdapter | None) -> ArchAdapter:
    return arch if arch is not None else adapter_for(model)


def _tensor_key(t: torch.Tensor) -> tuple[Any, ...]:
    """Identity of a tensor's storage region; identity of the object on meta (no storage there)."""
    if t.is_meta:
        return ("id", id(t))
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # exotic tensor subclasses
        return ("id", id(t))
    if ptr == 0:  # empty storage: only identity is meaningful
        return ("id", id(t))
    return (str(t.device), ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _unique(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    seen: set[tuple[Any, ...]] = set()
    out: list[torch.Tensor] = []
    for t in tensors:
        k = _tensor_key(t)
        if k not in seen:
            seen.add(k)
            out.append(t)
    return out


def _param_dtype(model: nn.Module) -> torch.dtype:
    """Dtype of the first floating-point parameter (float32 if there is none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(m).__name__.lower()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------- params
def count_params(model: nn.Module) -> int:
    """Number of unique parameter elements (tied embeddings counted once; works on meta)."""
    return sum(p.numel() for p in _unique(model.parameters()))


def model_bytes(model: nn.Module) -> int:
    """Bytes of the unique parameters and buffers (what the weights occupy in memory)."""
    tensors = _unique([*model.parameters(), *model.buffers()])
    return sum(t.numel() * t.element_size() for t in tensors)


def param_breakdown(model: nn.Module, arch: ArchAdapter | None = None) -> dict[str, int]:
    """Unique parameters by role.

    Keys: ``embedding``, ``lm_head`` (0 when tied to the embedding), ``attention`` (everything under
    each layer's attention module, q/k norms included), ``mlp``, ``norms`` (any other module whose
    class name contains "Norm": per-layer and final norms), ``other`` (e.g. SliceGPT shortcuts) and
    ``total`` (= :func:`count_params`). Each tensor is attributed once, to the first role above.
    """
    a = _adapter(model, arch)
    seen: set[tuple[Any, ...]] = set()
    out = dict.fromkeys(("embedding", "lm_head", "attention", "mlp", "norms", "other"), 0)

    def claim(role: str, params: Iterable[torch.Tensor]) -> None:
        for p in params:
            k = _tensor_key(p)
            if k not in seen:
                seen.add(k)
                out[role] += p.numel()

    claim("embedding", a.embed_tokens.parameters())
    claim("lm_head", a.lm_head.parameters())
    for i in range(a.num_layers):
        claim("attention", a.attention(i).parameters())
    for i in range(a.num_layers):
        claim("mlp", a.mlp(i).parameters())
    for m in model.modules():
        if _is_norm(m):
            claim("norms", m.parameters(recurse=False))
    claim("other", model.parameters())
    out["total"] = sum(out.values())
    return out


# --------------------------------------------------------------------------------------- FLOPs
def linear_flops_per_token(module: nn.Module) -> float:
    """FLOPs per token of every linear-like module inside ``module`` (itself included).

    A :class:`FlopCounted` module reports its own figure (its children are skipped); otherwise every
    ``nn.Linear`` counts ``2·in_features·out_features``. A module shared at two places in the tree
    is counted once.
    """
    total = 0.0
    seen: set[int] = set()

    def visit(m: nn.Module) -> None:
        nonlocal total
        if id(m) in seen:
            return
        seen.add(id(m))
        if isinstance(m, FlopCounted) and not isinstance(m, nn.Linear):
            total += float(m.flops_per_token())
            return
        routed = routed_experts_flops(m)
        if routed is not None:  # a Mixture-of-Experts block: the router and the top-k experts
            total += routed
            for name, child in m.named_children():
                if name not in ("experts", "gate"):  # e.g. a shared expert: a plain MLP
                    visit(child)
            return
        if isinstance(m, nn.Linear):
            total += 2.0 * m.in_features * m.out_features
            return
        for child in m.children():
            visit(child)

    visit(module)
    return total


def routed_experts_flops(block: nn.Module) -> float | None:
    """FLOPs per token of a Mixture-of-Experts block's router and routed experts (``2·H·E`` + ``top_k ·
    (2·H·2I + 2·I·H)``), or None when ``block`` is not one (see the module doc). Read from the shapes."""
    experts, router = getattr(block, "experts", None), getattr(block, "gate", None)
    gu, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    top_k = getattr(router, "top_k", None)
    weight = getattr(router, "weight", None)
    if not (isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.dim() == 3 and down.dim() == 3
            and isinstance(top_k, int) and isinstance(weight, torch.Tensor)):
        return None
    per_expert = 2.0 * (gu.shape[1] * gu.shape[2] + down.shape[1] * down.shape[2])
    return 2.0 * weight.numel() + top_k * per_expert


def attended_tokens(arch: ArchAdapter, layer: int, seq_len: int) -> int:
    """Keys one query of ``layer`` reads at context ``seq_len``: ``min(seq_len, window)`` on a
    sliding-window layer, ``seq_len`` otherwise."""
    w = arch.sliding_window(layer)
    return min(seq_len, w) if w else seq_len


def cached_tokens(arch: ArchAdapter, layer: int, seq_len: int) -> int:
    """Tokens ``layer``'s KV cache holds after ``seq_len`` tokens: ``min(seq_len, window - 1)`` on a
    sliding-window layer (transformers' ``DynamicSlidingWindowLayer``), ``seq_len`` otherwise."""
    w = arch.sliding_window(layer)
    return min(seq_len, max(w - 1, 1)) if w else seq_len


def layer_attention_core_flops(arch: ArchAdapter, layer: int, seq_len: int = 2048) -> float:
    """``QKᵀ`` + ``AV`` FLOPs per token of one layer at context ``seq_len`` (window-aware)."""
    g = arch.geometry(layer)
    return float(4 * g.num_heads * g.head_dim * attended_tokens(arch, layer, seq_len))


def layer_kv_bytes_per_token(arch: ArchAdapter, layer: int, seq_len: int = 2048, itemsize: int = 4) -> float:
    """One layer's KV-cache bytes at context ``seq_len``, divided by ``seq_len`` (window-aware)."""
    width = arch.kv_width(layer) * itemsize
    tokens = cached_tokens(arch, layer, seq_len)
    return float(width) if tokens == seq_len else width * tokens / seq_len


def attention_core_flops_per_token(model: nn.Module, seq_len: int = 2048, arch: ArchAdapter | None = None) -> float:
    """``QKᵀ`` + ``AV`` FLOPs per token at context ``seq_len``, all layers (``min(seq_len, window)``
    keys per query on sliding-window layers)."""
    a = _adapter(model, arch)
    return float(sum(layer_attention_core_flops(a, i, seq_len) for i in range(a.num_layers)))


def flops_per_token(model: nn.Module, seq_len: int = 2048, arch: ArchAdapter | None = None) -> float:
    """Forward FLOPs per token, averaged over one forward of ``seq_len`` tokens (see module doc).

    ``flops_per_token(m, T) * B * T`` equals ``FlopCounterMode``'s total for a ``[B, T]`` forward
    under eager attention.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    return linear_flops_per_token(model) + attention_core_flops_per_token(model, seq_len, arch)


# --------------------------------------------------------------------------------------- KV cache
def kv_bytes_per_token(model: nn.Module, dtype: torch.dtype | None = None, arch: ArchAdapter | None = None,
                       seq_len: int = 2048) -> int | float:
    """KV-cache bytes per token per sequence at context ``seq_len``: Σ_layers (k width + v width) ·
    element size, scaled by ``min(seq_len, window - 1) / seq_len`` on sliding-window layers (see the
    module doc). An ``int`` (independent of ``seq_len``) when no layer slides.

    ``dtype`` is the cache dtype; it defaults to the model's parameter dtype.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    a = _adapter(model, arch)
    itemsize = torch.empty((), dtype=dtype or _param_dtype(model)).element_size()
    total_at_t = sum(a.kv_width(i) * itemsize * cached_tokens(a, i, seq_len) for i in range(a.num_layers))
    return total_at_t // seq_len if total_at_t % seq_len == 0 else total_at_t / seq_len


# --------------------------------------------------------------------------------------- footprint
@dataclass
class Footprint:
    """What a model costs. ``layers`` holds each decoder layer's geometry (hidden, num_heads,
    num_kv_heads, head_dim, intermediate, group_size)."""

    params: int
    flops_per_token: float
    kv_bytes_per_token: int | float  # a float only with sliding-window layers (bytes at seq_len / seq_len)
    dtype: str
    seq_len: int
    layers: list[dict[str, int]] = field(default_factory=list)
    breakdown: dict[str, int] = field(default_factory=dict)

    def of(self, metric: str) -> float:
        """The value a target of ``metric`` (params, flops, kv) is measured on."""
        return getattr(self, FOOTPRINT_FIELD[metric])

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return asdict(self)

    def ratios(self, dense: Footprint) -> dict[str, float]:
        """This footprint relative to ``dense``: ``params``, ``flops``, ``kv`` (1.0 = unchanged)."""

        def r(x: float, d: float) -> float:
            return x / d if d else math.nan

        return {
            "params": r(self.params, dense.params),
            "flops": r(self.flops_per_token, dense.flops_per_token),
            "kv": r(self.kv_bytes_per_token, dense.kv_bytes_per_token),
        }


def footprint(model: nn.Module, seq_len: int = 2048, arch: ArchAdapter | None = None) -> Footprint:
    """Parameters, FLOPs/token at ``seq_len``, KV bytes/token and per-layer geometry of ``model``."""
    a = _adapter(model, arch)
    layers = []
    for g in a.geometries():
        d = asdict(g)
        d["group_size"] = g.group_size
        layers.append(d)
    return Footprint(
        params=count_params(model),
        flops_per_token=flops_per_token(model, seq_len, a),
        kv_bytes_per_token=kv_bytes_per_token(model, arch=a, seq_len=seq_len),
        dtype=_dtype_name(_param_dtype(model)),
        seq_len=seq_len,
        layers=layers,
        breakdown=param_breakdown(model, a),
    )
