"""LoRAP: low-rank attention + structured MLP pruning (Li, Tang, Zhang, ICML 2024, arXiv 2404.09695).

Follows the official code, lihuang258/LoRAP (``utils/compression.py``, ``utils/decomposition.py``,
``utils/prune.py``, ``utils/layerwrapper.py``). Hidden size and heads stay as they are; each
sub-layer is compressed in its own way:

* **Attention**: Wq, Wk, Wv and Wo are each replaced by a rank-r pair ``B(A(x))``
  (:class:`compress.LowRankLinear`). ``decomposition`` chooses how:

  - ``awsvd`` (default, the paper's method): SVD of ``W·D`` with ``D = diag(sqrt(E‖x_j‖²))``, the
    input-channel norms from calibration (exact zeros clamped to 1e-4, as the official code does);
    ``B = U_r·S_r^½`` and ``A = S_r^½·V_rᵀ·D⁻¹``;
  - ``svd``: plain truncated SVD, ``B = U_r·S_r``, ``A = V_rᵀ``;
  - ``afm``: PCA of the output covariance ``E[yyᵀ] − E[y]E[y]ᵀ`` (top-r eigenvectors ``U_r``),
    ``B = U_r``, ``A = U_rᵀ·W``.

  **Rank allocation** is the official ``cal_saved_rank`` with ``para_allocate`` = 3: V and O get
  3× the parameters of Q and K; when their rank would reach d/2 (where a d×d low-rank pair stops
  being smaller) they stay dense and Q, K take the rest of the budget. For LLaMA-7B (d=4096) this
  gives Q/K ranks 1228 / 819 / 512 and V/O dense / dense / 1536 at s = 0.2 / 0.3 / 0.5.
* **MLP**: Wanda-style channel score, the L2 norm over each channel's weights scaled by the input
  norms, summed over gate, up and down::

      score_c = ‖|W_up[c,:]|·sqrt(E x²)‖₂ + ‖|W_gate[c,:]|·sqrt(E x²)‖₂ + ‖|W_down[:,c]|·sqrt(E h_c²)‖₂

  A fraction s of the channels is removed in every layer, the lowest-scoring ones, **except the
  bottom ``mlp_least_save_ratio`` (default 1%), which are kept** (the paper's finding): the removed
  slice of the ascending order is ``[int(ρ·I), int((s+ρ)·I))``, exactly as in ``prune_mlp``.
* **Schedule**: sequential over layers. Each layer's input statistics are collected on the outputs
  of the already-compressed previous layers; within a layer, one pass collects the statistics of all
  seven linears (so the MLP statistics see the dense attention of that layer, as in the official
  loop), the layer is compressed, and a second pass produces the next layer's inputs. The loop is
  the run's layer-wise engine (``ctx.layers``, a :class:`compress.LayerwiseRunner`), which gives every layer
  its own attention mask (sliding-window layers included) and, with ``--layerwise``, keeps only the
  current layer on the compute device and the signals in CPU RAM or on disk.
  Calibration: 128 sequences × 128 tokens (the official ``--nsamples`` / ``--calibration_seqlen``).

Sizing
------
The official ``s`` (``--sparsity_ratio``) is the fraction of *block* parameters removed (each of
attention and MLP loses s). Our runs take a common :class:`compress.Target` (a fraction of the
whole model, embeddings included, or of its FLOPs): the smallest s whose compressed model is at or
below the goal is found by bisection, each candidate counted exactly from the integer ranks and
channel counts (the count is a non-increasing step function of s), and the s is recorded in the
plan. ``sparsity: 0.2`` in the config uses the official s directly (paper-faithful runs; pair it
with ``--target 100%``, or any target that s meets: a run whose s misses its target is refused).

GQA (our derivation; the paper and code assume four d×d projections)
--------------------------------------------------------------------
With GQA, k_proj and v_proj map d → n_kv·head_dim < d. Let P = Σ in·out over q, k, v, o be the dense
attention parameters and B = (1−s)·P the budget, so the block keeps exactly the fraction 1−s of
its parameters, as in the MHA case. Q and K share one rank, V and O share another (as in the
official code); a pair at rank r costs ``r·c`` with ``c = (in+out)`` summed over the pair. Then:

1. V and O share a rank within the budget ``a/(1+a)·B`` (a = para_allocate):
   ``r_vo = floor(a/(1+a)·B / c_vo)``;
2. a member whose low-rank form at that rank would not be smaller (``r·(in+out) ≥ in·out``) stays
   **dense** (the official "k_max ≥ d/2 → dense" rule, stated for any shape), and the rank of the
   other member is re-solved with what is left of the pair's budget;
3. Q and K take the rest, ``B − cost(V, O)``, the same way (the official dense case gives Q, K
   ``int((1−s)·d) − d/2``, i.e. the rest).

For SmolLM2-135M (d = 576, k/v 576 → 192) V stays dense up to s ≈ 0.58 and O takes V's unused
share (both dense up to s ≈ 1/3, as for LLaMA-7B: V+O are half of the block in both); at s = 0 nothing is
factorised.

For four d×d projections this reproduces ``cal_saved_rank`` up to flooring, so that case uses the
official formula itself. Ranks are at least 1 and every layer keeps at least one MLP channel.

Deviations from the official code
---------------------------------
* Statistics are means over tokens (``ChannelStats.mean_sq``) where the official ``WrappedGPT``
  divides the sum over tokens by the number of *sequences*; this is a constant factor, which
  changes neither the AWSVD factors' product nor the MLP ranking.
* The factors are kept in the model's dtype (the official code casts them to fp16); the
  decompositions themselves run in fp32 as in the official code.
* A linear whose low-rank form is not smaller than its dense weight stays dense, Q and K included
  (the official code factorises Q and K even at s = 0, where the pair is as large as W).
* Biases (e.g. qwen2's q/k/v biases; LLaMA has none) stay on the ``B`` factor unchanged.
* ``--mlp_compress_method decom`` is not implemented (the official branch decomposes the MLP with
  the attention rank ``k_min`` and writes ``L@R`` back densely, i.e. it saves nothing).
* Recovery: the official recipe tunes LoRA on the dense ``L@R`` weights and re-factorises at rank
  k+8 afterwards (``After_tune.py``), so its final model is larger than s implies. Here
  ``--recover-mode lora`` puts LoRA on the factors themselves (``q_proj`` resolves to
  ``q_proj.A`` and ``q_proj.B`` in :func:`compress.train.recovery.resolve_lora_targets`) and merges it
  into them, so the size after recovery is exactly the pruned size.
* ``kv:`` targets are refused: heads and head_dim are kept, and the KV cache stores the full k/v
  outputs, so a low-rank k/v projection does not shrink it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from compress import (
    ArchAdapter,
    Capabilities,
    LayerPlan,
    LowRankLinear,
    Plan,
    PruneContext,
    Pruner,
    PrunerConfig,
    PruneResult,
    Target,
    TargetError,
    TargetUnreachable,
    Unsupported,
    UsageError,
    adapter_for,
    apply_plan,
    footprint,
    hookimpl,
    record,
)

Decomposition = Literal["awsvd", "svd", "afm"]
Sublayer = Literal["self_attn", "mlp"]
ZERO_NORM_CLAMP = 1e-4  # official: col_sums_sqrt[col_sums_sqrt == 0] = 0.0001


class LorapConfig(PrunerConfig):
    """LoRAP settings; defaults are the official ones (``utils/model_load.py``, ``llama_7b.sh``)."""

    calib_samples: int = Field(128, ge=1, description="calibration sequences (official --nsamples)")
    calib_seq_len: int = Field(128, ge=2, description="tokens per sequence (official --calibration_seqlen)")
    calib_batch_size: int = Field(8, ge=1, description="sequences per layer forward")
    sparsity: float | None = Field(
        None, ge=0, lt=1,
        description="official s: fraction of each compressed sub-layer's parameters removed; "
        "None = solved from the target",
    )
    decomposition: Decomposition = Field("awsvd", description="attention factorisation: awsvd, svd or afm")
    para_allocate: float = Field(3.0, gt=0, description="parameter ratio (Wv+Wo):(Wq+Wk)")
    mlp_least_save_ratio: float = Field(0.01, ge=0, lt=1, description="bottom fraction of MLP channels kept")
    sublayers: list[Sublayer] = Field(
        default_factory=lambda: ["self_attn", "mlp"], min_length=1, description="sub-layers to compress",
    )

    @field_validator("decomposition", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v  # the official names are AWSVD / SVD / AFM


# ====================================================================== rank allocation
def cal_saved_rank(sparsity: float, hidden: int, allocate: float = 3.0) -> tuple[int, int, int]:
    """The official ``cal_saved_rank``: ``(k_att, k_min, k_max)`` for four d×d projections.

    ``k_min`` is the rank of Q and K, ``k_max`` that of V and O; when ``k_max`` reaches d/2 it is
    capped there (V, O then stay dense) and Q, K get ``int((1−s)·d) − d/2``.
    """
    saved = 1 - sparsity
    k_att = int(saved * hidden / 2)
    k_max = int(k_att * 2 * allocate / (1 + allocate))
    if k_max >= hidden / 2:
        k_max = int(hidden / 2)
        k_min = int(saved * hidden) - int(hidden / 2)
    else:
        k_min = int(k_att * 2 / (1 + allocate))
    return k_att, k_min, k_max


def _smaller(rank: int, shape: tuple[int, int]) -> bool:
    """Whether a rank-``rank`` pair has fewer parameters than the dense ``in×out`` weight."""
    fan_in, fan_out = shape
    return rank * (fan_in + fan_out) < fan_in * fan_out


def allocate_ranks(sparsity: float, shapes: dict[str, tuple[int, int]], hidden: int,
                   allocate: float = 3.0) -> dict[str, int | None]:
    """Rank of each attention projection (``None`` = stays dense) for sparsity ``s``.

    ``shapes`` maps ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` to ``(in_features, out_features)``.
    Four d×d projections use the official :func:`cal_saved_rank`; other shapes (GQA, explicit
    head_dim) use the generalisation derived in the module docstring.
    """
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    if all(shapes[n] == (hidden, hidden) for n in names):
        _, k_min, k_max = cal_saved_rank(sparsity, hidden, allocate)
        vo_rank: int | None = k_max if k_max < int(hidden / 2) else None  # official condition
        ranks: dict[str, int | None] = {"q_proj": k_min, "k_proj": k_min, "v_proj": vo_rank, "o_proj": vo_rank}
        out: dict[str, int | None] = {}
        for n, r in ranks.items():
            r = None if r is None else max(1, r)
            out[n] = r if r is not None and _smaller(r, shapes[n]) else None
        return out
    budget = (1 - sparsity) * sum(shapes[n][0] * shapes[n][1] for n in names)
    vo = _fill_pair(allocate / (1 + allocate) * budget, ("v_proj", "o_proj"), shapes)
    qk = _fill_pair(budget - _cost(vo, shapes), ("q_proj", "k_proj"), shapes)
    return {n: {**qk, **vo}[n] for n in names}


def _cost(ranks: dict[str, int | None], shapes: dict[str, tuple[int, int]]) -> int:
    return sum(shapes[n][0] * shapes[n][1] if r is None else r * sum(shapes[n]) for n, r in ranks.items())


def _fill_pair(budget: float, pair: tuple[str, str], shapes: dict[str, tuple[int, int]]) -> dict[str, int | None]:
    """One shared rank for ``pair`` within ``budget`` parameters; a member whose low-rank form at that
    rank would not be smaller stays dense, and the rank is re-solved for the others with what is left."""
    dense: set[str] = set()
    while True:
        low = [n for n in pair if n not in dense]
        if not low:
            return dict.fromkeys(pair)
        left = budget - sum(shapes[n][0] * shapes[n][1] for n in dense)
        r = max(1, math.floor(left / sum(sum(shapes[n]) for n in low)))
        grown = {n for n in low if not _smaller(r, shapes[n])}
        if not grown:
            return {n: (None if n in dense else r) for n in pair}
        dense |= grown


def mlp_removed_slice(sparsity: float, intermediate: int, least_save: float) -> tuple[int, int]:
    """``[start, stop)`` of the ascending score order that is removed (official ``prune_mlp``).

    At least one channel is always kept.
    """
    start = int(intermediate * least_save)
    stop = min(intermediate, int((sparsity + least_save) * intermediate))
    stop = max(start, stop)
    if stop - start >= intermediate:
        stop = intermediate - 1
    return start, stop


# ====================================================================== decompositions
def awsvd(weight: torch.Tensor, in_sq: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation-weighted SVD. ``weight`` is ``[out, in]``, ``in_sq`` the mean squared input per
    channel ``[in]``. Returns ``(L [out, r], R [r, in])`` with ``L @ R ≈ W`` (fp32)."""
    w = weight.detach().float()
    d = in_sq.detach().float().to(w.device).clamp_min(0).sqrt()
    d[d == 0] = ZERO_NORM_CLAMP
    u, s, vh = torch.linalg.svd(w * d[None, :], full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root[None, :], (root[:, None] * vh[:rank]) / d[None, :]


def plain_svd(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD with the singular values on the left factor (official ``SVD`` branch)."""
    u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    return u[:, :rank] * s[:rank][None, :], vh[:rank].clone()


def afm(weight: torch.Tensor, out_mean: torch.Tensor, out_second_moment: torch.Tensor,
        rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Atomic feature mimicking: project W onto the top-``rank`` principal directions of its outputs."""
    w = weight.detach().float()
    mean = out_mean.detach().float().to(w.device)
    cov = out_second_moment.detach().float().to(w.device) - torch.outer(mean, mean)
    evals, evecs = torch.linalg.eigh(cov)
    top = evecs[:, torch.argsort(evals, descending=True)[:rank]]
    return top.clone(), top.T @ w


def mlp_channel_scores(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, x_sq: torch.Tensor,
                       h_sq: torch.Tensor) -> torch.Tensor:
    """Official ``prune_mlp`` score per intermediate channel (see the module docstring).

    ``gate``/``up`` are ``[I, d]``, ``down`` is ``[d, I]``; ``x_sq`` (``[d]``) and ``h_sq`` (``[I]``)
    are the mean squared inputs of gate/up and of down.
    """
    sx = x_sq.detach().float().clamp_min(0).sqrt().to(gate.device)
    sh = h_sq.detach().float().clamp_min(0).sqrt().to(down.device)
    s_up = (up.detach().float().abs() * sx[None, :]).norm(p=2, dim=1)
    s_gate = (gate.detach().float().abs() * sx[None, :]).norm(p=2, dim=1)
    s_down = (down.detach().float().abs() * sh[None, :]).norm(p=2, dim=0)
    return s_gate + s_down + s_up


def mlp_keep(scores: torch.Tensor, sparsity: float, least_save: float) -> list[int]:
    """Channels kept: all but the slice ``[int(ρI), int((s+ρ)I))`` of the ascending score order."""
    n = int(scores.numel())
    start, stop = mlp_removed_slice(sparsity, n, least_save)
    order = torch.sort(scores.detach().float().cpu(), stable=True).indices
    removed = set(order[start:stop].tolist())
    return [c for c in range(n) if c not in removed]


# ====================================================================== sizing
@dataclass(frozen=True)
class _LayerShape:
    attn: dict[str, tuple[int, int]]  # name -> (in, out) of q/k/v/o
    mlp_channel_params: int  # parameters of one intermediate channel (gate/up rows, down column)
    mlp_channel_flops: int
    intermediate: int


def _in_out(m: nn.Module) -> tuple[int, int]:
    return int(m.in_features), int(m.out_features)


def _layer_shapes(arch: ArchAdapter) -> list[_LayerShape]:
    out = []
    for i in range(arch.num_layers):
        lin = arch.attn_linears(i)
        attn = {std: _in_out(lin[name]) for std, name in zip(("q_proj", "k_proj", "v_proj", "o_proj"),
                                                              arch.attn_names, strict=True)}
        mlp = arch.mlp_linears(i)
        gate, up, down = (mlp[n] for n in arch.mlp_names)
        per = gate.in_features + up.in_features + down.out_features
        bias = sum(1 for m in (gate, up) if getattr(m, "bias", None) is not None)
        out.append(_LayerShape(attn=attn, mlp_channel_params=per + bias, mlp_channel_flops=2 * per,
                               intermediate=int(gate.out_features)))
    return out


@dataclass(frozen=True)
class _Sizing:
    sparsity: float
    ranks: list[dict[str, int | None]]  # per layer, q/k/v/o
    mlp_kept: list[int]  # per layer, number of channels kept
    predicted: float
    goal: float
    dense: float
    metric: str

    def summary(self) -> dict[str, Any]:
        uniform = all(r == self.ranks[0] for r in self.ranks) and len(set(self.mlp_kept)) == 1
        return {
            "sparsity": self.sparsity,
            "ranks": self.ranks[0] if uniform else None,
            "mlp_channels": self.mlp_kept[0] if uniform else None,
            "per_layer": None if uniform else [{"ranks": r, "mlp_channels": m}
                                               for r, m in zip(self.ranks, self.mlp_kept, strict=True)],
            "predicted": self.predicted,
            "goal": self.goal,
            "dense": self.dense,
            "metric": self.metric,
        }


class _Sizer:
    """Counts the model a given s produces (exactly, from integer ranks and channel counts)."""

    def __init__(self, arch: ArchAdapter, cfg: LorapConfig, target: Target, seq_len: int = 2048):
        if target.metric not in ("params", "flops"):
            raise Unsupported(_KV_REFUSAL)
        self.cfg = cfg
        self.metric = target.metric
        self.shapes = _layer_shapes(arch)
        self.hidden = int(arch.embed_tokens.weight.shape[1])
        fp = footprint(arch.model, seq_len=seq_len, arch=arch)
        self.dense = float(fp.of(self.metric))
        target.check_reachable(self.dense)
        self.goal = float(target.goal(self.dense))
        self.target = target

    def layout(self, s: float) -> tuple[list[dict[str, int | None]], list[int]]:
        attn_on = "self_attn" in self.cfg.sublayers
        mlp_on = "mlp" in self.cfg.sublayers
        ranks, kept = [], []
        for sh in self.shapes:
            if attn_on:
                ranks.append(allocate_ranks(s, sh.attn, self.hidden, self.cfg.para_allocate))
            else:
                ranks.append(dict.fromkeys(sh.attn))
            if mlp_on:
                start, stop = mlp_removed_slice(s, sh.intermediate, self.cfg.mlp_least_save_ratio)
                kept.append(sh.intermediate - (stop - start))
            else:
                kept.append(sh.intermediate)
        return ranks, kept

    def value(self, s: float) -> float:
        ranks, kept = self.layout(s)
        unit = 1 if self.metric == "params" else 2
        saved = 0
        for sh, rk, k in zip(self.shapes, ranks, kept, strict=True):
            for n, r in rk.items():
                if r is not None:
                    fi, fo = sh.attn[n]
                    saved += unit * (fi * fo - r * (fi + fo))
            per = sh.mlp_channel_params if self.metric == "params" else sh.mlp_channel_flops
            saved += (sh.intermediate - k) * per
        return self.dense - saved

    def solve(self) -> _Sizing:
        if self.cfg.sparsity is not None:
            s = float(self.cfg.sparsity)
            v = self.value(s)
            if v > self.goal * (1 + 1e-12):
                raise TargetError(
                    f"sparsity={s} leaves {v:.6g} {self.metric}, above the target {self.target} ({self.goal:.6g}); "
                    "raise sparsity, or use --target 100% to run the official s as given"
                )
        else:
            hi = 1 - 1e-9
            if self.value(hi) > self.goal:
                raise TargetUnreachable(
                    f"target {self.target} ({self.goal:.4g} {self.metric}) is below the smallest LoRAP model "
                    f"({self.value(hi):.4g}: rank-1 attention, minimal MLP); choose a larger target"
                )
            lo = 0.0
            if self.value(lo) <= self.goal:
                hi = lo
            else:
                for _ in range(64):
                    mid = (lo + hi) / 2
                    if self.value(mid) <= self.goal:
                        hi = mid
                    else:
                        lo = mid
            # a short, readable s with the same (or a smaller) model; the count is monotone in s
            s = math.ceil(hi * 1e6) / 1e6
            if s >= 1 or self.value(s) > self.goal:
                s = hi
        ranks, kept = self.layout(s)
        return _Sizing(sparsity=s, ranks=ranks, mlp_kept=kept, predicted=self.value(s), goal=self.goal,
                       dense=self.dense, metric=self.metric)


_KV_REFUSAL = (
    "lorap keeps every head and the head size, so the KV cache is unchanged (the cache stores the full k/v "
    "outputs; a low-rank k/v projection does not shrink it); use a params or flops: target, or a head-pruning "
    "method (e.g. magnitude, llm_pruner) for kv:"
)


# ====================================================================== low-rank factors
def _low_rank(old: nn.Module, left: torch.Tensor, right: torch.Tensor) -> LowRankLinear:
    w = old.weight
    bias = getattr(old, "bias", None)
    new = LowRankLinear(old.in_features, old.out_features, left.shape[1], bias=bias is not None,
                        device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.A.weight.copy_(right.to(w.dtype))
        new.B.weight.copy_(left.to(w.dtype))
        if bias is not None:
            new.B.bias.copy_(bias)
    return new


# ====================================================================== the pruner
class LorapPruner(Pruner):
    name = "lorap"
    Config = LorapConfig
    capabilities = Capabilities(
        structures=("low_rank_attention", "mlp_channels"),
        needs_calibration=True,
        needs_gradients=False,
        targets=("params", "flops"),
        export="auto",
        sequential=True,
        summary="activation-weighted SVD of q/k/v/o (V,O:Q,K = 3:1) + Wanda-style MLP channel pruning "
        "keeping the bottom 1%, layer by layer",
        reference="Li et al., ICML 2024, arXiv 2404.09695; github.com/lihuang258/LoRAP",
        requires=("dense_mlp", "separate_projections", "per_layer_shapes"),
        alternative="transact",
        streams_weights=True,  # every layer is compressed in its own step of the engine
    )
    config: LorapConfig

    def check(self, model: nn.Module, target: Target) -> None:
        if target.metric == "kv":
            raise Unsupported(_KV_REFUSAL)
        super().check(model, target)
        arch = adapter_for(model)
        for i in range(arch.num_layers):
            if any(isinstance(m, LowRankLinear) for m in arch.attn_linears(i).values()):
                raise Unsupported(f"layer {i} already has low-rank attention projections; run lorap on the dense model")
        _Sizer(arch, self.config, target).solve()  # refuses an unreachable target before any work

    def plan_shapes(self, model: nn.Module, target: Target) -> dict:
        arch = adapter_for(model)
        sizing = _Sizer(arch, self.config, target).solve()
        plan = Plan()
        for i in range(arch.num_layers):
            attn = arch.attention(i)
            for std, name in zip(("q_proj", "k_proj", "v_proj", "o_proj"), arch.attn_names, strict=True):
                r = sizing.ranks[i][std]
                if r is not None:
                    old = getattr(attn, name)
                    setattr(attn, name, LowRankLinear(old.in_features, old.out_features, r,
                                                      bias=getattr(old, "bias", None) is not None, device="meta"))
            if sizing.mlp_kept[i] < arch.geometry(i).intermediate:
                plan.layers[i] = LayerPlan(mlp=list(range(sizing.mlp_kept[i])))
        apply_plan(model, plan, arch)
        return sizing.summary()

    def working_memory(self, model: nn.Module, target: Target, mem) -> dict[str, int]:
        """Layer-by-layer calibration + the fp32 SVD of the largest attention projection (the scaled
        copy of ``W``, ``U``, ``Vᵀ``) and, for ``afm``, the output second moments of one layer."""
        terms = super().working_memory(model, target, mem)
        arch = adapter_for(model)
        shapes = [(m.out_features, m.in_features) for i in range(arch.num_layers)
                  for m in arch.attn_linears(i).values()]
        if "self_attn" in self.config.sublayers and shapes:
            terms["svd"] = max(4 * (o * i + (o + i) * min(o, i) + min(o, i)) for o, i in shapes)
            if self.config.decomposition == "afm":
                terms["statistics"] = 4 * sum(o * o for o, _ in shapes[:4])
        return terms

    @torch.no_grad()
    def prune(self, model: nn.Module, target: Target, ctx: PruneContext) -> PruneResult:
        cfg = self.config
        arch = ctx.arch
        if ctx.calibration is None:
            raise UsageError("lorap needs calibration data; pass --calib (a text file or an alias such as wikitext2)")
        sizing = _Sizer(arch, cfg, target).solve()
        ctx.log(f"lorap: s={sizing.sparsity:.6g}, ranks {sizing.ranks[0]}, MLP channels "
                f"{sizing.mlp_kept[0]}/{arch.geometry(0).intermediate} (layer 0), {cfg.decomposition}")
        attn_on = "self_attn" in cfg.sublayers
        mlp_on = "mlp" in cfg.sublayers
        use_cache = getattr(model.config, "use_cache", None)
        model.config.use_cache = False
        batches = ctx.draw(cfg.calib_samples, cfg.calib_seq_len)
        layer_plans: dict[str, dict[str, Any]] = {}
        q, k, v, o = arch.attn_names
        gate, up, down = arch.mlp_names
        std_names = dict(zip(arch.attn_names, ("q_proj", "k_proj", "v_proj", "o_proj"), strict=True))
        # one layer at a time on the compute device; after each step the engine runs the compressed
        # layer over the cached inputs to make the next layer's inputs
        runner = ctx.layers(model, batches, batch_size=cfg.calib_batch_size, description="lorap")
        try:
            for step in runner:
                i = step.index
                lin = arch.attn_linears(i)
                mlp = arch.mlp_linears(i)
                ranks = sizing.ranks[i]
                # inputs of q/k/v are one tensor, so is gate/up's; outputs only for AFM
                ins = {"qkv": lin[q], "o": lin[o], "gate_up": mlp[gate], "down": mlp[down]}
                outs = {n: lin[n] for n in arch.attn_names} if attn_on and cfg.decomposition == "afm" else {}
                with record(ins, where="input") as in_stats, record(outs, where="output", second_moment=True) as out_stats:
                    step.forward()
                for st in (*in_stats.values(), *out_stats.values()):
                    st.check_finite(f"layer {i} calibration")
                spec: dict[str, Any] = {}
                if attn_on:
                    low: dict[str, int] = {}
                    for name in arch.attn_names:
                        r = ranks[std_names[name]]
                        if r is None:
                            continue
                        old = lin[name]
                        x_sq = in_stats["o" if name == o else "qkv"].mean_sq
                        if cfg.decomposition == "awsvd":
                            left, right = awsvd(old.weight, x_sq, r)
                        elif cfg.decomposition == "svd":
                            left, right = plain_svd(old.weight, r)
                        else:
                            st = out_stats[name]
                            left, right = afm(old.weight, st.mean, st.second_moment, r)
                        setattr(arch.attention(i), name, _low_rank(old, left, right))
                        low[name] = r
                    spec["low_rank"] = low
                if mlp_on:
                    scores = mlp_channel_scores(mlp[gate].weight, mlp[up].weight, mlp[down].weight,
                                                in_stats["gate_up"].mean_sq, in_stats["down"].mean_sq)
                    keep = mlp_keep(scores, sizing.sparsity, cfg.mlp_least_save_ratio)
                    if len(keep) < scores.numel():
                        apply_plan(model, Plan(layers={i: LayerPlan(mlp=keep)}), arch)
                    spec["mlp"] = keep
                layer_plans[str(i)] = spec
                if ctx.progress:
                    ctx.log(f"lorap: layer {i + 1}/{arch.num_layers} compressed")
        finally:
            runner.close()
            if use_cache is not None:
                model.config.use_cache = use_cache
        plan = {
            "method": "lorap",
            "sparsity": sizing.sparsity,
            "decomposition": cfg.decomposition,
            "para_allocate": cfg.para_allocate,
            "mlp_least_save_ratio": cfg.mlp_least_save_ratio,
            "sublayers": list(cfg.sublayers),
            "sizing": sizing.summary(),
            "layers": layer_plans,
        }
        notes = {"sizing": sizing.summary(), "calibration": {"samples": cfg.calib_samples,
                                                             "seq_len": cfg.calib_seq_len}}
        return PruneResult(model=model, plan=plan, export="auto", notes=notes)


@hookimpl
def register_pruners(register):
    register(LorapPruner)
