"""SliceGPT: delete rows and columns by slicing the residual stream (Ashkboos et al., ICLR 2024).

Follows the official code, microsoft/TransformerCompression (``src/slicegpt/rotate.py``
``rotate_and_slice_sequential``, ``layernorm_fusion.py``, ``modules.py`` ``RMSN``,
``adapters/llama_adapter.py``, ``slicing_scheduler.py`` ``ConstSlicingScheduler`` and
``experiments/run_slicegpt.py``). Only the residual-stream (hidden) width shrinks: heads, head_dim,
KV heads and the MLP width are untouched, so GQA and RoPE are unaffected.

Algorithm
---------
1. **Norm fusion** (``fuse_modules``). The lm_head is untied from the embedding (after slicing they
   differ), and every RMSNorm scale is multiplied into the linears that read the norm's output
   (q/k/v ← input norm, gate/up ← post-attention norm, lm_head ← final norm). The norms become
   weightless; the model computes exactly the same function (tested).
2. **Sequential rotate-and-slice** (``rotate_and_slice_sequential``) with calibration inputs
   propagated through the already-sliced layers by the core's layer-wise engine
   (``ctx.layers``, a :class:`compress.LayerwiseRunner`; with ``--layerwise`` the layer being sliced is the only
   one on the compute device and the signals are cached in CPU RAM or on disk). With ``Q`` the eigenvectors (descending eigenvalue)
   of ``H = Σ XᵀX + 0.01·mean(diag H)·I`` (``pca_calc``, float64) and ``U = Q[:, :d']`` the kept
   directions, for every layer::

       embedding:   E ← E·U₀                          (PCA of the layer-0 inputs)
       q, k, v:     W ← W·U_in                        (U_in: the previous boundary)
       [PCA of the post-attention-norm input h (the residual after attention)  → U_mid]
       o_proj:      W ← U_midᵀ·W     attn_shortcut_Q = U_inᵀ·U_mid      (d_in × d_mid)
       gate, up:    W ← W·U_mid
       [PCA of the layer output (the MLP residual added, still in full width)  → U_out]
       down_proj:   W ← U_outᵀ·W     mlp_shortcut_Q  = U_midᵀ·U_out     (d_mid × d_out)
       lm_head:     W ← W·U_last   (its input is sliced only with ``slice_head``)

   The residual ``x`` of a sliced layer is rotated by the shortcut matrices (``x·attn_shortcut_Q``);
   in our format they are ``nn.Linear`` modules from :func:`compress.make_shortcut_layer`
   (``attn_shortcut``, ``mlp_shortcut``, weight = the transposed Q) and the export format
   (``compress``, per-layer ``hidden_in/mid/out`` plus ``shortcut``) rebuilds them on reload.
3. **Final orientation** ``random`` (the official script's default): the kept eigenvectors are
   mixed by a random orthogonal d'×d' matrix (``random_orthogonal_upper_left``: QR of a uniform
   [0, 1) matrix). It spans the same subspace, so the sliced function is the same as with ``pca``;
   only the basis of the kept directions differs. Drawn from a ``torch.Generator`` seeded with the
   run seed.
4. **Normalisation after slicing.** The official code replaces every RMSNorm by ``RMSN(D)``, which
   divides the sum of squares by the *original* width D, not by the sliced width d'. A stock
   RMSNorm over d' channels with weight ``sqrt(D/d')`` computes ``x·rsqrt(Σx²/D + eps·d'/D)``,
   i.e. RMSN with ``eps`` scaled by d'/D (relative difference below ``eps/mean(x²)``, ~1e-6 on real
   activations). That is what we store, so the exported model is a stock family's layers plus
   shortcuts (norm weights: ones where the width is unsliced).

Sizing
------
``d'`` is the same at every boundary (``ConstSlicingScheduler``) except the last layer's output,
which keeps the full width D unless ``slice_head`` (official ``--do-slice-head``, default False).
Our runs take a common :class:`compress.Target` (params or flops): the largest ``d'``, a multiple of
``round_to`` (official ``--round-interval`` 8), whose model is at or below the goal, counted exactly
(closed form, quadratic in d'), **including the shortcut matrices (d'² per block), the untied
lm_head and the norm weights**. ``sparsity: s`` in the config uses the official
``d' = int((1−s)·D)`` rounded down to ``round_to`` (paper-faithful runs; pair it with any target
that s meets, a run that misses its target is refused before any work).

Note that on a small model with tied embeddings (SmolLM2-135M: V·D = 28M of 135M parameters), the
untied lm_head plus the shortcuts can make a sliced model *larger* than the dense one at the
paper's sparsities (0.2–0.3); params targets then need a much smaller d'.

Calibration
-----------
Official defaults: WikiText-2, 128 sequences × 2048 tokens (``--cal-nsamples``, ``--cal-max-seqlen``).
Our ``wikitext2`` alias is the WikiText-2 *validation* file (the train split is not shipped in the
offline assets); the sequences are random windows of the token stream (seeded by the run seed; the
official default seed is 42). Windows have no padding, so the official padding mask
(``apply_mask``) has nothing to exclude.

Deviations from the official code
---------------------------------
* ``center_embeddings`` (default False): the official ``fuse_modules`` subtracts each token
  embedding's mean for every model family. That is part of the LayerNorm→RMSNorm conversion (OPT)
  and is not an invariance of an RMSNorm model (the authors call it unimportant for LLaMA in QuaRot#7; a
  comment on SpinQuant#14 reports a better Llama-2 PPL without it). True gives the official behaviour.
* Second pass per layer: the official code re-runs the whole layer after rotating o_proj and the MLP
  inputs to get the layer output. The new post-attention residual is exactly ``h·U_mid`` (h from the
  first pass), so we compute the MLP half only from the stored ``h`` — the same function without
  re-running attention; the first pass stops at the post-attention norm.
* Norm eps (item 4 above); RMSNorm weights are kept (d' parameters per norm, counted in the size).
* Shortcut matrices are ``nn.Linear`` weights (transposed Q) rather than raw ``attn_shortcut_Q``
  parameters; the export reloads with ``AutoModelForCausalLM`` and ``generate()`` works (official
  sliced models need the ``slicegpt`` package to load, TransformerCompression#73 and #114, and have no
  inference demo, #116).
* Only the constant slicing schedule is exposed (the official script uses ``ConstSlicingScheduler``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from compress import (
    ArchAdapter,
    Capabilities,
    LowRankLinear,
    NumericalError,
    PruneContext,
    Pruner,
    PrunerConfig,
    PruneResult,
    Target,
    Unsupported,
    UsageError,
    adapter_for,
    count_params,
    flops_per_token,
    hookimpl,
    linear_flops_per_token,
    make_shortcut_layer,
)

FLOPS_SEQ_LEN = 2048  # the context length of flops targets (compress run's default)
DAMPING = 0.01  # pca_calc: 1% of the mean diagonal

_KV_REFUSAL = (
    "slicegpt slices only the residual (hidden) width; heads, head_dim and KV heads are untouched, so the "
    "KV cache is unchanged; use a params or flops: target, or a head-pruning method (e.g. magnitude) for kv:"
)


class SliceGPTConfig(PrunerConfig):
    """Settings; defaults are the official ``run_slicegpt.py`` ones."""

    sparsity: float | None = Field(
        None, ge=0.0, lt=1.0,
        description="official --sparsity: fraction of the hidden width removed (overrides the target's sizing)",
    )
    round_to: int = Field(8, ge=1, le=1 << 16, description="d' is a multiple of this (official --round-interval)")
    slice_head: bool = Field(False, description="also slice the last layer's output and the lm_head input "
                                                "(official do_slice_head)")
    final_orientation: Literal["random", "pca"] = Field(
        "random", description="basis of the kept directions (official --final-orientation)")
    center_embeddings: bool = Field(
        False, description="subtract each embedding row's mean during fusion (official; not an RMSNorm invariance)")
    calib_samples: int = Field(128, ge=1, description="calibration sequences (official --cal-nsamples)")
    calib_seq_len: int = Field(2048, ge=2, description="tokens per sequence (official --cal-max-seqlen)")
    calib_batch_size: int = Field(4, ge=1, description="sequences per forward (memory only; official 16)")


# ====================================================================== slicing dimensions
@dataclass(frozen=True)
class SliceDims:
    """Residual widths at every block boundary: layer i reads ``attn_in[i]``, its attention writes
    (and its MLP reads) ``mlp_in[i]``, its MLP writes ``mlp_out[i]``; ``hidden`` is the dense D."""

    hidden: int
    attn_in: tuple[int, ...]
    mlp_in: tuple[int, ...]
    mlp_out: tuple[int, ...]

    def __post_init__(self) -> None:
        n = len(self.attn_in)
        if not (n == len(self.mlp_in) == len(self.mlp_out)) or n == 0:
            raise ValueError("attn_in, mlp_in and mlp_out need one width per layer")
        for i in range(1, n):
            if self.attn_in[i] != self.mlp_out[i - 1]:
                raise ValueError(f"layer {i} reads width {self.attn_in[i]} but layer {i - 1} writes {self.mlp_out[i - 1]}")
        if any(not 1 <= d <= self.hidden for d in (*self.attn_in, *self.mlp_in, *self.mlp_out)):
            raise ValueError(f"every width must be in 1..{self.hidden}")

    @classmethod
    def const(cls, hidden: int, num_layers: int, d: int, slice_head: bool = False) -> SliceDims:
        """``ConstSlicingScheduler(d)``: d everywhere; the last output stays D unless ``slice_head``."""
        out = [d] * num_layers
        if not slice_head:
            out[-1] = hidden
        return cls(hidden, (d,) * num_layers, (d,) * num_layers, tuple(out))

    @property
    def embedding(self) -> int:
        return self.attn_in[0]

    @property
    def head(self) -> int:
        return self.mlp_out[-1]

    def to_dict(self) -> dict[str, Any]:
        uniform = len(set(self.attn_in) | set(self.mlp_in) | set(self.mlp_out[:-1])) == 1
        out: dict[str, Any] = {"hidden": self.hidden, "embedding": self.embedding, "head": self.head}
        if uniform:
            out["d"] = self.attn_in[0]
        else:
            out.update(attn_in=list(self.attn_in), mlp_in=list(self.mlp_in), mlp_out=list(self.mlp_out))
        return out


# ====================================================================== closed-form size
def _numel(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _bias_numel(lin: nn.Module) -> int:
    b = getattr(lin, "bias", None)
    return 0 if b is None else int(b.numel())


@dataclass(frozen=True)
class _LayerCoef:
    """Per-layer coefficients of the sliced size: params = fixed + the d-dependent terms."""

    qkv_out: int  # Σ out_features of q, k, v (their input width becomes d_in)
    o_in: int  # o_proj input width (its output becomes d_mid)
    o_bias: bool
    gu_out: int  # Σ out_features of gate, up (input becomes d_mid)
    down_in: int
    down_bias: bool
    fixed: int  # every other parameter of the layer (q/k/v/gate/up biases, q/k norms, ...)


class SizeModel:
    """Exact parameter count and FLOPs/token of the sliced model as a function of the widths.

    Built from the dense (unfused) model's module shapes; works on the meta device.
    """

    def __init__(self, model: nn.Module, arch: ArchAdapter, seq_len: int = FLOPS_SEQ_LEN):
        self.hidden = int(arch.embed_tokens.weight.shape[1])
        self.vocab = int(arch.embed_tokens.weight.shape[0])
        self.num_layers = arch.num_layers
        self.lm_bias = _bias_numel(arch.lm_head)
        q, k, v, o = arch.attn_names
        gate, up, down = arch.mlp_names
        coefs = []
        layer_total = 0
        layer_linear_macs = 0
        for i in range(arch.num_layers):
            a, m = arch.attn_linears(i), arch.mlp_linears(i)
            layer = arch.layers[i]
            variable = sum(int(a[n].weight.numel()) for n in (q, k, v, o))
            variable += sum(int(m[n].weight.numel()) for n in (gate, up, down))
            variable += _bias_numel(a[o]) + _bias_numel(m[down])
            variable += _numel(arch.input_norm(i)) + _numel(arch.post_attn_norm(i))
            total = _numel(layer)
            layer_total += total
            layer_linear_macs += sum(int(a[n].weight.numel()) for n in (q, k, v, o))
            layer_linear_macs += sum(int(m[n].weight.numel()) for n in (gate, up, down))
            coefs.append(_LayerCoef(
                qkv_out=sum(int(a[n].out_features) for n in (q, k, v)),
                o_in=int(a[o].in_features), o_bias=a[o].bias is not None,
                gu_out=sum(int(m[n].out_features) for n in (gate, up)),
                down_in=int(m[down].in_features), down_bias=m[down].bias is not None,
                fixed=total - variable,
            ))
        self.layers = coefs
        dense_params = count_params(model)
        covered = layer_total + _numel(arch.embed_tokens) + _numel(arch.final_norm)
        if not arch.tied_embeddings:
            covered += _numel(arch.lm_head)
        self.fixed_params = dense_params - covered  # parameters outside layers/embedding/head/norm
        lin = linear_flops_per_token(model)
        self.attention_core = flops_per_token(model, seq_len) - lin
        head_macs = self.vocab * self.hidden
        self.fixed_linear_flops = lin - 2.0 * (layer_linear_macs + head_macs)
        self.dense_params = dense_params
        self.dense_flops = lin + self.attention_core

    def params(self, dims: SliceDims) -> int:
        n = self.vocab * dims.embedding + dims.head + self.vocab * dims.head + self.lm_bias + self.fixed_params
        for c, di, dm, do in zip(self.layers, dims.attn_in, dims.mlp_in, dims.mlp_out, strict=True):
            n += c.qkv_out * di + c.o_in * dm + c.o_bias * dm + c.gu_out * dm + c.down_in * do + c.down_bias * do
            n += di + dm  # norm weights
            n += di * dm + dm * do  # shortcut matrices
            n += c.fixed
        return int(n)

    def flops(self, dims: SliceDims) -> float:
        macs = self.vocab * dims.head
        for c, di, dm, do in zip(self.layers, dims.attn_in, dims.mlp_in, dims.mlp_out, strict=True):
            macs += c.qkv_out * di + c.o_in * dm + c.gu_out * dm + c.down_in * do + di * dm + dm * do
        return 2.0 * macs + self.fixed_linear_flops + self.attention_core

    def value(self, metric: str, dims: SliceDims) -> float:
        return float(self.params(dims)) if metric == "params" else self.flops(dims)

    def dense(self, metric: str) -> float:
        return float(self.dense_params) if metric == "params" else self.dense_flops


@dataclass(frozen=True)
class Sizing:
    dims: SliceDims
    metric: str
    goal: float
    dense: float
    predicted: float
    source: str  # "target" or "sparsity"

    def summary(self) -> dict[str, Any]:
        d = self.dims.attn_in[0]
        return {
            **self.dims.to_dict(),
            "sparsity": round(1 - d / self.dims.hidden, 6),
            "sized_by": self.source,
            "metric": self.metric,
            "goal": self.goal,
            "predicted": self.predicted,
            "predicted_ratio": round(self.predicted / self.dense, 6),
        }


def solve_dims(model: nn.Module, arch: ArchAdapter, target: Target, cfg: SliceGPTConfig) -> Sizing:
    """The widths for ``target`` (or ``cfg.sparsity``); raises :class:`Unsupported` when unreachable."""
    if target.metric not in ("params", "flops"):
        raise Unsupported(_KV_REFUSAL)
    sm = SizeModel(model, arch)
    metric = target.metric
    dense = sm.dense(metric)
    goal = target.goal(dense)
    D, L = sm.hidden, sm.num_layers

    def dims_for(d: int) -> SliceDims:
        return SliceDims.const(D, L, d, cfg.slice_head)

    unit = "parameters" if metric == "params" else "FLOPs/token"
    if cfg.sparsity is not None:
        d = int((1 - cfg.sparsity) * D)
        d -= d % cfg.round_to
        if d < 1:
            raise Unsupported(f"sparsity {cfg.sparsity} leaves no hidden channel at round_to={cfg.round_to} "
                              f"(hidden size {D}); choose a smaller sparsity or round_to")
        dims = dims_for(d)
        value = sm.value(metric, dims)
        if value > goal * (1 + 1e-9):
            raise Unsupported(
                f"sparsity {cfg.sparsity} (d'={d} of {D}) gives {value:.6g} {unit} ({value / dense:.1%} of dense, "
                f"shortcuts and untied lm_head included), above the target {target} ({goal:.6g}); raise the target "
                "or the sparsity"
            )
        return Sizing(dims, metric, goal, dense, value, "sparsity")
    if cfg.round_to > D:
        raise Unsupported(f"round_to={cfg.round_to} is larger than the hidden size {D}; choose a smaller round_to")
    best = None
    for d in range(cfg.round_to, D + 1, cfg.round_to):  # the size grows with d
        if sm.value(metric, dims_for(d)) <= goal:
            best = d
        else:
            break
    if best is None:
        smallest = sm.value(metric, dims_for(cfg.round_to))
        stays = ("the untied lm_head" if metric == "params" else "the attention core, the lm_head") + (
            "" if cfg.slice_head else " at full width")
        raise Unsupported(
            f"target {target} ({goal:.6g} {unit}) is below the smallest sliced model (d'={cfg.round_to}: "
            f"{smallest:.6g}, {smallest / dense:.1%} of dense; {stays} and the shortcuts stay); choose a larger "
            "target" + ("" if cfg.slice_head else " or set slice_head=true")
        )
    dims = dims_for(best)
    return Sizing(dims, metric, goal, dense, sm.value(metric, dims), "target")


# ====================================================================== fusion
def _set_linear(lin: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Replace a linear's weight (and bias) in place; weights are cast to the module's dtype."""
    dtype = lin.weight.dtype
    grad = lin.weight.requires_grad
    lin.weight = nn.Parameter(weight.to(dtype).contiguous(), requires_grad=grad)
    lin.out_features, lin.in_features = int(weight.shape[0]), int(weight.shape[1])
    if bias is not None:
        lin.bias = nn.Parameter(bias.to(dtype).contiguous(), requires_grad=lin.bias.requires_grad)


def _set_norm(norm: nn.Module, width: int, hidden: int) -> None:
    """A weightless RMSN(D) over ``width`` channels, as a stock RMSNorm with weight sqrt(D/width)."""
    w = norm.weight
    value = math.sqrt(hidden / width)
    norm.weight = nn.Parameter(torch.full((width,), value, dtype=w.dtype, device=w.device),
                               requires_grad=w.requires_grad)
    if hasattr(norm, "normalized_shape"):
        norm.normalized_shape = (width,)


_ROW_CHUNK = 4096


def _rowwise(w: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn(w.double())`` cast back to ``w``'s dtype, computed over blocks of rows so that no float64
    copy of a whole embedding / lm_head matrix is ever alive (``fn`` must act on rows independently)."""
    w = w.detach()
    out: torch.Tensor | None = None
    for s in range(0, w.shape[0], _ROW_CHUNK):
        block = fn(w[s:s + _ROW_CHUNK].double()).to(w.dtype)
        if out is None:
            out = torch.empty((w.shape[0], *block.shape[1:]), dtype=w.dtype, device=w.device)
        out[s:s + block.shape[0]] = block
    assert out is not None
    return out


def _fold(norm: nn.Module, linears: Sequence[nn.Linear]) -> None:
    scale = norm.weight.detach().double()
    for lin in linears:
        _set_linear(lin, _rowwise(lin.weight, lambda rows: rows * scale[None, :]))
    with torch.no_grad():
        norm.weight.fill_(1.0)


def untie(model: nn.Module, arch: ArchAdapter) -> None:
    """Give the lm_head its own weight (the sliced embedding and head differ) and say so in the config."""
    if arch.tied_embeddings:
        w = arch.lm_head.weight
        arch.lm_head.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
    model.config.tie_word_embeddings = False


@torch.no_grad()
def fuse_norms(model: nn.Module, arch: ArchAdapter, center_embeddings: bool = False, layers: bool = True) -> None:
    """Official ``fuse_modules`` for RMSNorm models: the same function with weightless norms.

    ``layers=False`` leaves the decoder layers' norms to :func:`fuse_layer_norms` (streamed weights:
    each layer is folded when the engine has read it; the fold touches that layer only)."""
    untie(model, arch)
    if center_embeddings:
        e = arch.embed_tokens.weight
        e.data = (e.double() - e.double().mean(dim=-1, keepdim=True)).to(e.dtype)
    if layers:
        for i in range(arch.num_layers):
            fuse_layer_norms(arch, i)
    _fold(arch.final_norm, [arch.lm_head])


@torch.no_grad()
def fuse_layer_norms(arch: ArchAdapter, i: int) -> None:
    """Fold layer ``i``'s input and post-attention norm scales into the linears that read them."""
    q, k, v, _ = arch.attn_names
    gate, up, _ = arch.mlp_names
    a, m = arch.attn_linears(i), arch.mlp_linears(i)
    _fold(arch.input_norm(i), [a[q], a[k], a[v]])
    _fold(arch.post_attn_norm(i), [m[gate], m[up]])


# ====================================================================== PCA and rotations
def pca(signals: Iterable[torch.Tensor], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Official ``pca_calc``: eigenvalues (descending) and eigenvectors of ``Σ XᵀX`` + 1% damping, float64."""
    H: torch.Tensor | None = None
    for x in signals:
        xf = x.reshape(-1, x.shape[-1]).to(device=device, dtype=torch.float64)
        h = xf.T @ xf
        H = h if H is None else H.add_(h)
    if H is None:
        raise UsageError("slicegpt got no calibration signals")
    if not torch.isfinite(H).all():
        raise NumericalError("non-finite calibration activations in slicegpt; check the model and its dtype")
    damp = DAMPING * torch.mean(torch.diag(H))
    H.diagonal().add_(damp)
    evals, evecs = torch.linalg.eigh(H)
    order = torch.argsort(evals, descending=True)
    return evals[order], evecs[:, order]


def random_orthogonal(d: int, generator: torch.Generator) -> torch.Tensor:
    """Official ``random_orthogonal_upper_left`` block: Q of the QR of a uniform [0, 1) d×d matrix."""
    a = torch.rand(d, d, generator=generator, dtype=torch.float64)
    q, _ = torch.linalg.qr(a)
    return q


class _StopForward(Exception):
    """Raised by a hook once the wanted activation is captured (the rest of the forward is skipped)."""


def _attention_half(layer: nn.Module, norm: nn.Module, x: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
    """Run a (shortcut) decoder layer up to the post-attention norm and return that norm's input."""
    got: list[torch.Tensor] = []

    def hook(_mod: nn.Module, args: tuple) -> None:
        got.append(args[0].detach())
        raise _StopForward

    handle = norm.register_forward_pre_hook(hook)
    try:
        with contextlib.suppress(_StopForward):
            layer(x, **kw)
    finally:
        handle.remove()
    if not got:
        raise RuntimeError(f"{type(layer).__name__} did not call its post-attention norm")
    return got[0]


def _linear_from(weight: torch.Tensor, like: torch.Tensor) -> nn.Linear:
    """A bias-free linear holding ``weight`` (dtype, device and trainability of ``like``)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(weight.to(device=like.device, dtype=like.dtype).contiguous(),
                              requires_grad=like.requires_grad)
    return lin


def _kept_variance(evals: torch.Tensor, d: int) -> float:
    return round(float(evals[:d].sum() / evals.sum()), 6)


@torch.no_grad()
def rotate_and_slice(
    model: nn.Module,
    arch: ArchAdapter,
    batches: torch.Tensor,
    dims: SliceDims,
    *,
    batch_size: int = 4,
    orientation: Literal["random", "pca"] = "random",
    generator: torch.Generator | None = None,
    log: Callable[[str], None] | None = None,
    keep_bases: bool = False,
    ctx: PruneContext | None = None,
) -> dict[str, Any]:
    """Official ``rotate_and_slice_sequential`` on a norm-fused model (:func:`fuse_norms` first).

    Runs through the run's layer-wise engine (``ctx.layers``; without ``ctx``, everything stays where
    the model is): with ``--layerwise`` layer ``i`` is on the compute device while it is rotated and
    sliced, and the calibration signals are cached where the run says (CPU RAM or files). Besides the engine's cached inputs, at most two
    signal sets of one layer are alive (the mid-layer residuals, then the layer outputs).

    Returns diagnostics: the kept fraction of each PCA's eigenvalue mass and, with ``keep_bases``,
    the orthonormal bases ``U`` of every boundary (``embedding``, then per layer ``mid`` and ``out``).
    """
    if dims.hidden != int(arch.embed_tokens.weight.shape[1]) or len(dims.attn_in) != arch.num_layers:
        raise ValueError("dims do not describe this model")
    D = dims.hidden
    gen = generator or torch.Generator().manual_seed(0)
    emb = arch.embed_tokens
    dtype = emb.weight.dtype
    q, k, v, o = arch.attn_names
    gate, up, down = arch.mlp_names

    def basis(evecs: torch.Tensor, d: int) -> torch.Tensor:
        u = evecs[:, :d]
        if orientation == "random":
            u = u @ random_orthogonal(d, gen).to(u.device)
        return u  # float64, D × d, orthonormal columns

    record: dict[str, Any] = {"kept_variance": {}}
    bases: dict[str, Any] = {"layers": []}
    u_in = torch.empty(0)
    ctx = ctx if ctx is not None else PruneContext(arch=arch)
    with ctx.layers(model, batches, batch_size=batch_size, description="slicegpt") as runner:
        for step in runner:
            i, layer, dev = step.index, step.layer, step.device
            if ctx.streaming:  # streamed weights: the layer was just read, its norms are not folded yet
                fuse_layer_norms(arch, i)
            if i == 0:  # PCA of the embeddings: rotate and slice the embedding and the cached inputs
                evals, evecs = pca((x for x, _ in step.batches()), dev)
                u_in = basis(evecs, dims.embedding)
                record["kept_variance"]["embedding"] = _kept_variance(evals, dims.embedding)
                u_emb = u_in.to(emb.weight.device)
                emb.weight = nn.Parameter(_rowwise(emb.weight, lambda rows, u=u_emb: rows @ u),
                                          requires_grad=emb.weight.requires_grad)
                emb.embedding_dim = dims.embedding
                u0 = u_in.to(dtype)
                step.map_inputs(lambda x, u0=u0: x @ u0)
                if keep_bases:
                    bases["embedding"] = u_in.cpu()
            d_in, d_mid, d_out = dims.attn_in[i], dims.mlp_in[i], dims.mlp_out[i]
            a, m = arch.attn_linears(i), arch.mlp_linears(i)
            like = a[q].weight  # on the compute device with the layer
            in_norm, post_norm = arch.input_norm(i), arch.post_attn_norm(i)
            make_shortcut_layer(layer, d_in, d_mid, d_out)
            # attention inputs follow the previous boundary; the residual goes back to full width for the PCA
            for n in (q, k, v):
                _set_linear(a[n], a[n].weight.double() @ u_in)
            _set_norm(in_norm, d_in, D)
            layer.attn_shortcut = _linear_from(u_in, like)  # d_in -> D: x = U_in·s
            layer.mlp_shortcut = nn.Identity()
            mids = step.new_cache()
            for x, kw in step.batches(release=True):
                mids.append(_attention_half(layer, post_norm, x, kw))
            step.drop_inputs()  # only two sets of signals are alive at a time
            evals, evecs = pca(mids, dev)
            u_mid = basis(evecs, d_mid)
            kept = {"attn": _kept_variance(evals, d_mid)}
            layer.attn_shortcut = _linear_from(u_mid.T @ u_in, like)  # weight = (U_inᵀ U_mid)ᵀ
            ob = a[o].bias
            _set_linear(a[o], u_mid.T @ a[o].weight.double(), None if ob is None else u_mid.T @ ob.double())
            for n in (gate, up):
                _set_linear(m[n], m[n].weight.double() @ u_mid)
            _set_norm(post_norm, d_mid, D)
            # the layer output at full width: the new residual is exactly h·U_mid (see module doc)
            um = u_mid.to(dtype)
            outs = step.new_cache()
            for b in range(len(mids)):
                hp = mids[b].to(dev) @ um
                outs.append(hp @ um.T + layer.mlp(post_norm(hp)))
                mids.release(b)
            mids.clear()
            evals, evecs = pca(outs, dev)
            u_out = basis(evecs, d_out)
            kept["mlp"] = _kept_variance(evals, d_out)
            layer.mlp_shortcut = _linear_from(u_out.T @ u_mid, like)
            db = m[down].bias
            _set_linear(m[down], u_out.T @ m[down].weight.double(), None if db is None else u_out.T @ db.double())
            uo = u_out.to(dtype)
            step.set_outputs(outs[b].to(dev) @ uo for b in range(len(outs)))
            outs.clear()
            record["kept_variance"][str(i)] = kept
            if keep_bases:
                bases["layers"].append({"mid": u_mid.cpu(), "out": u_out.cpu()})
            u_in = u_out
            if log is not None:
                log(f"slicegpt: layer {i + 1}/{arch.num_layers} rotated and sliced "
                    f"({d_in}/{d_mid}/{d_out}, kept variance {kept['attn']:.4f}/{kept['mlp']:.4f})")
    head = arch.lm_head
    u_head = u_in.to(head.weight.device)
    _set_linear(head, _rowwise(head.weight, lambda rows: rows @ u_head))
    _set_norm(arch.final_norm, dims.head, D)
    _sync_config(model, arch, dims)
    if keep_bases:
        record["bases"] = bases
    return record


def _sync_config(model: nn.Module, arch: ArchAdapter, dims: SliceDims) -> None:
    cfg = model.config
    cfg.head_dim = arch.head_dim(0)  # explicit: hidden_size // heads no longer gives it
    cfg.hidden_size = dims.embedding
    cfg.tie_word_embeddings = False


# ====================================================================== shapes without data
@torch.no_grad()
def apply_shapes(model: nn.Module, arch: ArchAdapter, dims: SliceDims) -> None:
    """Cut ``model`` (usually on meta) to the sliced shapes, without computing anything."""
    untie(model, arch)

    def empty(*shape: int, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(*shape, dtype=like.dtype, device=like.device)

    D = dims.hidden
    emb = arch.embed_tokens
    emb.weight = nn.Parameter(empty(emb.weight.shape[0], dims.embedding, like=emb.weight),
                              requires_grad=emb.weight.requires_grad)
    emb.embedding_dim = dims.embedding
    q, k, v, o = arch.attn_names
    gate, up, down = arch.mlp_names
    for i in range(arch.num_layers):
        d_in, d_mid, d_out = dims.attn_in[i], dims.mlp_in[i], dims.mlp_out[i]
        a, m = arch.attn_linears(i), arch.mlp_linears(i)
        for n in (q, k, v):
            _set_linear(a[n], empty(a[n].out_features, d_in, like=a[n].weight))
        for n, lin in ((o, a[o]), (down, m[down])):
            width = d_mid if n == o else d_out
            _set_linear(lin, empty(width, lin.in_features, like=lin.weight),
                        None if lin.bias is None else empty(width, like=lin.bias))
        for n in (gate, up):
            _set_linear(m[n], empty(m[n].out_features, d_mid, like=m[n].weight))
        _set_norm(arch.input_norm(i), d_in, D)
        _set_norm(arch.post_attn_norm(i), d_mid, D)
        make_shortcut_layer(arch.layers[i], d_in, d_mid, d_out)
    head = arch.lm_head
    _set_linear(head, empty(head.out_features, dims.head, like=head.weight))
    _set_norm(arch.final_norm, dims.head, D)
    _sync_config(model, arch, dims)


# ====================================================================== the pruner
class SliceGPTPruner(Pruner):
    name = "slicegpt"
    Config = SliceGPTConfig
    capabilities = Capabilities(
        structures=("hidden",),
        needs_calibration=True,
        targets=("params", "flops"),
        export="compress",
        sequential=True,
        summary="fuse norms, PCA-rotate the residual stream layer by layer and slice the hidden width "
                "(shortcut rotations between blocks)",
        reference="Ashkboos et al., ICLR 2024, arXiv 2401.15024; github.com/microsoft/TransformerCompression",
        requires=("dense_mlp", "separate_projections", "per_layer_shapes", "foldable_norms"),
        alternative="transact",
        streams_weights=True,
    )
    config: SliceGPTConfig

    def check(self, model: nn.Module, target: Target) -> None:
        if target.metric == "kv":
            raise Unsupported(_KV_REFUSAL)
        super().check(model, target)
        arch = adapter_for(model)
        hidden = int(arch.embed_tokens.weight.shape[1])
        for i in range(arch.num_layers):
            layer = arch.layers[i]
            lins = {**arch.attn_linears(i), **arch.mlp_linears(i)}
            if any(isinstance(x, LowRankLinear) or not isinstance(x, nn.Linear) for x in lins.values()):
                raise Unsupported(f"layer {i} has low-rank or non-linear projections; run slicegpt on a model "
                                  "with plain nn.Linear projections")
            if hasattr(layer, "attn_shortcut") or hasattr(layer, "mlp_shortcut"):
                raise Unsupported(f"layer {i} already has shortcut rotations (a sliced model); slice the dense model")
            q, _, _, o = arch.attn_names
            widths = (lins[q].in_features, lins[o].out_features, arch.down_proj(i).out_features)
            if any(w != hidden for w in widths):
                raise Unsupported(f"layer {i} has residual widths {widths} != hidden size {hidden}; slicegpt needs "
                                  "a model with one residual width")
            for norm in (arch.input_norm(i), arch.post_attn_norm(i)):
                if getattr(norm, "weight", None) is None or getattr(norm, "bias", None) is not None:
                    raise Unsupported(f"layer {i} norm {type(norm).__name__} is not an RMSNorm with a scale; "
                                      "slicegpt supports RMSNorm models (llama, mistral, qwen2, qwen3)")
        solve_dims(model, arch, target, self.config)  # refuses an unreachable target before any work

    def plan_shapes(self, model: nn.Module, target: Target) -> dict:
        arch = adapter_for(model)
        sizing = solve_dims(model, arch, target, self.config)
        apply_shapes(model, arch, sizing.dims)
        return sizing.summary()

    def working_memory(self, model: nn.Module, target: Target, mem) -> dict[str, int]:
        """Layer-by-layer calibration + SliceGPT's own tensors: the untied lm_head, a second set of
        residual signals (the mid-layer ones beside the engine's cache), the float64 PCA (``Σ XᵀX``,
        eigenvectors, one mini-batch product, the kept bases) and the float64 rotation of the widest
        weight (the embedding or an MLP projection, before and after)."""
        cfg = self.config
        terms = super().working_memory(model, target, mem)
        d = solve_dims(model, adapter_for(model), target, cfg).dims.embedding
        T, B = mem.seq_len(cfg.calib_seq_len), min(cfg.calib_batch_size, cfg.calib_samples)
        H = mem.H
        if mem.tied:
            terms["untied_lm_head"] = mem.V * H * mem.b
        terms["signals"] = cfg.calib_samples * T * H * mem.b
        terms["pca"] = 3 * H * H * 8 + B * T * H * 8 + 3 * H * d * 8
        terms["rotation"] = max(mem.V, mem.I) * (H + d) * 8
        return terms

    def prune(self, model: nn.Module, target: Target, ctx: PruneContext) -> PruneResult:
        cfg = self.config
        arch = ctx.arch
        if ctx.calibration is None:
            raise UsageError("slicegpt needs calibration data; pass --calib (a text file or an alias such as wikitext2)")
        sizing = solve_dims(model, arch, target, cfg)
        dims = sizing.dims
        ctx.log(f"slicegpt: d'={dims.embedding} of {dims.hidden} (head {dims.head}), predicted "
                f"{sizing.predicted:.6g} {sizing.metric} ({sizing.predicted / sizing.dense:.1%} of dense)")
        model.eval()
        use_cache = getattr(model.config, "use_cache", None)
        model.config.use_cache = False
        batches = ctx.draw(cfg.calib_samples, cfg.calib_seq_len)
        gen = torch.Generator().manual_seed(int(ctx.seed))
        try:
            fuse_norms(model, arch, center_embeddings=cfg.center_embeddings, layers=not ctx.streaming)
            record = rotate_and_slice(model, arch, batches, dims, batch_size=cfg.calib_batch_size,
                                      orientation=cfg.final_orientation, generator=gen,
                                      log=ctx.log if ctx.progress else None, ctx=ctx)
        finally:
            if use_cache is not None:
                model.config.use_cache = use_cache
        plan = {
            "method": "slicegpt",
            "dims": dims.to_dict(),
            "slice_head": cfg.slice_head,
            "final_orientation": cfg.final_orientation,
            "center_embeddings": cfg.center_embeddings,
            "sizing": sizing.summary(),
        }
        notes = {
            "sizing": sizing.summary(),
            "kept_variance": record["kept_variance"],
            "calibration": {"samples": cfg.calib_samples, "seq_len": cfg.calib_seq_len,
                            "tokens": int(batches.numel())},
        }
        return PruneResult(model=model, plan=plan, export="compress", notes=notes)


@hookimpl
def register_pruners(register):
    register(SliceGPTPruner)
