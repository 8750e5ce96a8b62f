"""Turn a :class:`~compress.target.Target` into uniform widths: attention units and MLP channels per layer.

Width-pruning methods (TransAct, the naive floors, LLM-Pruner's local mode) keep the same number of
attention units and MLP channels in every pruned layer. Every metric we target — parameters, FLOPs per
token, KV bytes per token — is affine in those two numbers, so the solver computes the cost of one
unit exactly from the layer shapes and searches the keep ratio. The result lands at or below the goal,
as close as the head/channel granularity allows, and is then checked by measuring the pruned model.

Attention units:

* ``kv_group`` — a KV head with its query heads (shrinks the KV cache; needed for ``kv:`` targets);
* ``head``     — one query head in every KV group (``heads_per_group`` kept per group; KV unchanged).
  For MHA models the two are the same.

Attention rounding (``attn_round``): the balanced keep ratio rarely gives a whole number of attention
units, and on models with few KV groups the choice matters (SmolLM2-135M has 3: at 60 % of the
parameters it is 1 group + 839 MLP channels rounded down, 2 groups + 668 rounded up). ``down`` (the
default) keeps ``floor`` of the balanced attention width, ``nearest`` rounds it half up, ``up`` takes
``ceil``; the MLP then takes whatever budget is left, so the result stays at or below the goal. When
the rounded attention does not fit under the goal even with the smallest MLP, the solver falls back to
the largest attention width that fits and says so in :attr:`Widths.note`.

MLP rounding (``mlp_round_to``): an integer keeps MLP widths at multiples of it; ``"auto"`` (the
default of TransAct and the floors) is :data:`MLP_KERNEL_MULTIPLE` = 32 when the dense width is a
multiple of 32 and at least 16 × 32, else 1 (exact widths: small MLPs would lose too much of the
budget to the rounding). 32 is measured, not assumed (``benchmarks/results/mlp_widths_llamacpp.md``):
llama.cpp's F16 CPU kernels process a prompt ~2.5× faster per FLOP at MLP widths that are multiples
of 16 than at any other width (1 KV group of SmolLM2: 130-137 GFLOP/s at ×16/32/64/128, 42-53 at
×1-8), with nothing more to gain beyond 32; 32 also fills whole ggml quantization blocks (Q8_0/Q4_0
rows are blocks of 32). Decode speed follows the FLOPs at every width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from compress.errors import TargetError, TargetUnreachable
from compress.model.adapter import ArchAdapter
from compress.model.footprint import footprint
from compress.model.plan import LayerPlan, Plan
from compress.target import Target

AttnUnit = Literal["kv_group", "head"]
AttnRound = Literal["down", "nearest", "up"]
ATTN_ROUNDING: tuple[str, ...] = ("down", "nearest", "up")
MlpRoundTo = int | Literal["auto"]
#: the MLP width multiple ``mlp_round_to="auto"`` rounds to (chosen from the llama.cpp width sweep)
MLP_KERNEL_MULTIPLE = 32


def resolve_mlp_round_to(mlp_round_to: MlpRoundTo, mlp_dense: int) -> int:
    """The MLP width multiple ``mlp_round_to`` means for a dense width of ``mlp_dense`` channels."""
    if mlp_round_to == "auto":
        k = MLP_KERNEL_MULTIPLE
        return k if mlp_dense % k == 0 and mlp_dense >= 16 * k else 1
    if isinstance(mlp_round_to, bool) or not isinstance(mlp_round_to, int) or mlp_round_to < 1:
        raise TargetError(f"mlp_round_to must be a positive integer or 'auto', got {mlp_round_to!r}")
    return mlp_round_to


@dataclass(frozen=True)
class Widths:
    """Chosen uniform widths. ``attn_units`` counts KV groups (``kv_group``) or heads per group (``head``)."""

    attn_unit: AttnUnit
    attn_units: int
    attn_units_dense: int
    mlp: int
    mlp_dense: int
    predicted: float
    goal: float
    dense: float
    metric: str
    attn_round: str = "down"  # the policy the attention width was rounded with ("explicit": fixed widths)
    mlp_round_to: int = 1  # the multiple the MLP width was rounded to (resolved from "auto")
    note: str = ""  # e.g. why the policy's attention width could not be kept

    def to_dict(self) -> dict:
        d = {
            "attn_unit": self.attn_unit,
            "attn_units": self.attn_units,
            "attn_units_dense": self.attn_units_dense,
            "mlp": self.mlp,
            "mlp_dense": self.mlp_dense,
            "predicted": self.predicted,
            "goal": self.goal,
            "dense": self.dense,
            "metric": self.metric,
            "attn_round": self.attn_round,
            "mlp_round_to": self.mlp_round_to,
        }
        if self.note:
            d["note"] = self.note
        return d


def unit_costs(arch: ArchAdapter, layer: int, attn_unit: AttnUnit, seq_len: int,
               dtype_bytes: int) -> dict[str, tuple[float, float]]:
    """Cost of ONE attention unit and ONE MLP channel of ``layer`` per metric: ``{metric: (attn, mlp)}``.

    On a Mixture-of-Experts layer the MLP unit is one channel of every expert (the experts keep equal
    widths): its parameters are those of all E experts, its FLOPs per token those of the top-k experts a
    token is routed to."""
    g = arch.geometry(layer)
    lin = arch.attn_linears(layer)
    q, k, v, o = arch.attn_names
    h, hd = g.hidden, g.head_dim
    qb = hd if getattr(lin[q], "bias", None) is not None else 0
    kb = hd if getattr(lin[k], "bias", None) is not None else 0
    vb = hd if getattr(lin[v], "bias", None) is not None else 0
    q_heads = g.group_size if attn_unit == "kv_group" else g.num_kv_heads
    kv_heads = 1 if attn_unit == "kv_group" else 0
    norms = arch.proj_norms(layer)  # OLMo-2: q_norm / k_norm weights go with their rows
    qn = hd if "q" in norms else 0
    kn = hd if "k" in norms else 0
    attn_params = q_heads * (2 * h * hd + qb + qn) + kv_heads * (2 * h * hd + kb + vb + kn)
    attn_lin_w = q_heads * 2 * h * hd + kv_heads * 2 * h * hd
    attn_flops = 2 * attn_lin_w + 4 * q_heads * hd * seq_len
    attn_kv = kv_heads * 2 * hd * dtype_bytes
    experts = arch.experts(layer)
    if experts is not None:  # one channel in EVERY expert: E experts' weights, top-k experts' FLOPs per token
        return {
            "params": (attn_params, experts.num_experts * 3 * h),
            "flops": (attn_flops, experts.top_k * 6 * h),
            "kv": (attn_kv, 0),
        }
    mlp = arch.mlp_linears(layer)
    gate, up, down = arch.mlp_names
    mb = sum(1 for n in (gate, up) if getattr(mlp[n], "bias", None) is not None)
    mlp_params = 3 * h + mb
    return {
        "params": (attn_params, mlp_params),
        "flops": (attn_flops, 6 * h),
        "kv": (attn_kv, 0),
    }


def solve_uniform(
    arch: ArchAdapter,
    target: Target,
    *,
    attn_unit: AttnUnit = "kv_group",
    layers: list[int] | None = None,
    attn_ratio: float = 1.0,
    mlp_round_to: MlpRoundTo = 1,
    min_attn_units: int = 1,
    seq_len: int = 2048,
    prune_attention: bool = True,
    prune_mlp: bool = True,
    fixed: tuple[int, int] | None = None,
    attn_round: AttnRound = "down",
) -> Widths:
    """Uniform widths for ``layers`` (default: all) so the model lands at or below ``target``.

    ``fixed=(attention units, MLP channels)`` skips the search (explicit widths, e.g. a paper's
    configuration) and only predicts the resulting value; the caller checks it against the goal.

    The attention keep ratio is ``attn_ratio`` times the MLP keep ratio (1.0 = balanced, which the
    TransAct paper found best). The largest ratio whose floored widths meet the goal is found by
    bisection; the attention width at that ratio, ``r · attn_ratio · units``, is rounded by
    ``attn_round`` (``down``: floor, today's and the default; ``nearest``: half up; ``up``: ceil), and
    the MLP then takes whatever budget the attention granularity left over. A rounded-up width that
    does not fit even with the smallest MLP falls back to the largest width that fits (``Widths.note``).
    ``mlp_round_to`` is a width multiple or ``"auto"`` (:func:`resolve_mlp_round_to`), combined with the
    multiple the family's kernels need (:attr:`ArchAdapter.mlp_multiple`; the widths record the result).
    """
    if attn_round not in ATTN_ROUNDING:
        raise TargetError(f"attn_round must be one of {', '.join(ATTN_ROUNDING)}, got {attn_round!r}")
    layers = list(range(arch.num_layers)) if layers is None else list(layers)
    if not layers:
        raise TargetError("no layers to prune; widen the layer range")
    dense_fp = footprint(arch.model, seq_len=seq_len, arch=arch)
    dense = dense_fp.of(target.metric)
    goal = target.goal(dense)
    target.check_reachable(dense)
    dtype_bytes = max(1, dense_fp.kv_bytes_per_token // max(1, sum(2 * lg["num_kv_heads"] * lg["head_dim"]
                                                                     for lg in dense_fp.layers)))
    g0 = arch.geometry(layers[0])
    for i in layers:
        if arch.geometry(i) != g0:
            raise TargetError(f"layer {i} has a different shape from layer {layers[0]}; uniform widths need "
                              "equal layers (prune from the dense model)")
    units_dense = g0.num_kv_heads if attn_unit == "kv_group" else g0.group_size
    heads_per_unit = g0.group_size if attn_unit == "kv_group" else g0.num_kv_heads
    mlp_dense = g0.intermediate
    mlp_round_to = resolve_mlp_round_to(mlp_round_to, mlp_dense)
    kernel = arch.mlp_multiple  # widths the family's kernels run (Qwen3-MoE's grouped_mm experts: 8)
    if kernel > 1 and mlp_dense % kernel == 0:
        mlp_round_to = math.lcm(mlp_round_to, kernel)

    def refused(a: int) -> str:  # why the family's stock config refuses a layers of a units ("" if it does not)
        return arch.heads_refusal(a * heads_per_unit, g0.hidden) if a < units_dense else ""

    def legal_at_most(a: int) -> int:
        """The most attention units <= ``a`` the family accepts (else the fewest above it; dense is legal)."""
        for b in range(a, min_attn_units - 1, -1):
            if not refused(b):
                return b
        return next(b for b in range(a + 1, units_dense + 1) if not refused(b))
    ca, cm = (sum(x) for x in zip(*(unit_costs(arch, i, attn_unit, seq_len, dtype_bytes)[target.metric]
                                     for i in layers), strict=True))

    if target.metric == "kv" and (attn_unit != "kv_group" or not prune_attention):
        raise TargetError("a kv: target needs whole KV groups to be removed; use gqa=groups")

    def raw_units(r: float) -> int:
        ra = min(1.0, r * attn_ratio) if prune_attention else 1.0
        return max(min_attn_units, min(units_dense, math.floor(ra * units_dense + 1e-9)))

    def widths(r: float) -> tuple[int, int]:
        rm = r if prune_mlp else 1.0
        m = max(mlp_round_to, (math.floor(rm * mlp_dense + 1e-9) // mlp_round_to) * mlp_round_to)
        return legal_at_most(raw_units(r)), min(m, mlp_dense)

    def value(a: int, m: int) -> float:
        return dense - ca * (units_dense - a) - cm * (mlp_dense - m)

    if fixed is not None:
        a, m = int(fixed[0]), int(fixed[1])
        if not (1 <= a <= units_dense and 1 <= m <= mlp_dense):
            raise TargetError(f"explicit widths ({a} attention units, {m} MLP channels) are outside "
                              f"1..{units_dense} and 1..{mlp_dense}")
        if refused(a):
            raise TargetError(f"explicit widths keep {a * heads_per_unit} query heads per layer: {refused(a)}")
        if m % arch.mlp_multiple and m != mlp_dense:
            raise TargetError(f"an MLP width of {m} does not run: {arch.config.model_type}'s kernels need a multiple "
                              f"of {arch.mlp_multiple}")
        return Widths(attn_unit=attn_unit, attn_units=a, attn_units_dense=units_dense, mlp=m, mlp_dense=mlp_dense,
                      predicted=value(a, m), goal=goal, dense=dense, metric=target.metric, attn_round="explicit",
                      mlp_round_to=1)
    a_min, m_min = widths(0.0)
    if value(a_min, m_min) > goal:
        raise TargetUnreachable(
            f"target {target} ({goal:.4g}) is below the smallest legal shape ({value(a_min, m_min):.4g} with "
            f"{a_min} attention unit(s) and {m_min} MLP channels per layer); choose a larger target"
        )
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if value(*widths(mid)) <= goal:
            lo = mid
        else:
            hi = mid
    a, m = widths(lo)
    m_balanced = m
    if prune_mlp and cm > 0:  # spend what the attention granularity left on MLP channels
        extra = int((goal - value(a, m)) // (cm * mlp_round_to)) * mlp_round_to
        m = min(mlp_dense, m + max(0, extra))
        while m > mlp_round_to and value(a, m) > goal:
            m -= mlp_round_to
    notes = []
    if prune_attention and attn_unit == "kv_group" and units_dense <= min_attn_units:
        notes.append(f"{units_dense} KV group: removing a whole group would remove the attention, so it is "
                     "kept dense and the MLP takes the whole cut (query heads inside the group can go instead)")
    floored = raw_units(lo)
    if floored != a and refused(floored):
        notes.append(f"{floored} attention units refused ({refused(floored)}); kept {a}")
    if attn_round != "down" and prune_attention:
        # the unrounded balanced attention width at the solved ratio, then the policy's rounding
        x = min(1.0, lo * attn_ratio) * units_dense
        want = math.floor(x + 0.5 + 1e-9) if attn_round == "nearest" else math.ceil(x - 1e-9)
        want = max(min_attn_units, min(units_dense, want))
        while want < units_dense and refused(want):  # up to the next width the family accepts
            want += 1
        for a_try in range(want, a, -1):  # from the policy's width down to the floored one
            if refused(a_try):
                continue
            m_try = _fill_mlp(value, a_try, m_balanced, mlp_dense, mlp_round_to, goal) if prune_mlp and cm > 0 \
                else m_balanced
            if m_try is not None and value(a_try, m_try) <= goal:
                if a_try < want:
                    notes.append(f"attn_round={attn_round}: {want} attention units do not fit under the target "
                                 f"with any MLP width; kept {a_try}, the most that fit")
                a, m = a_try, m_try
                break
        else:
            if want > a:
                notes.append(f"attn_round={attn_round}: {want} attention units do not fit under the target "
                             f"with any MLP width; kept {a}, the most that fit")
    return Widths(attn_unit=attn_unit, attn_units=a, attn_units_dense=units_dense, mlp=m, mlp_dense=mlp_dense,
                  predicted=value(a, m), goal=goal, dense=dense, metric=target.metric, attn_round=attn_round,
                  mlp_round_to=mlp_round_to, note="; ".join(notes))


def _fill_mlp(value, a: int, m_start: int, mlp_dense: int, round_to: int, goal: float) -> int | None:
    """The most MLP channels (a multiple of ``round_to``, or all of them) that keep ``value(a, m)`` at or
    below ``goal`` with ``a`` attention units; None when not even ``round_to`` channels fit."""
    if value(a, mlp_dense) <= goal:
        return mlp_dense
    m = min(mlp_dense, max(round_to, (m_start // round_to) * round_to))
    while m > round_to and value(a, m) > goal:
        m -= round_to
    while m + round_to < mlp_dense and value(a, m + round_to) <= goal:
        m += round_to
    return m if value(a, m) <= goal else None


def plan_from_scores(
    arch: ArchAdapter,
    widths: Widths,
    attn_scores: dict[int, torch.Tensor] | None,
    mlp_scores: dict[int, torch.Tensor] | None,
    layers: list[int] | None = None,
) -> Plan:
    """Keep the top-scoring units per layer at the solved widths (indices sorted ascending).

    ``attn_scores[i]`` has one score per KV group (``kv_group`` units) or per query head (``head``
    units: the top ``widths.attn_units`` heads of EVERY group are kept, so GQA stays valid).
    ``mlp_scores[i]`` has one score per MLP channel; on a Mixture-of-Experts layer one per channel of each
    expert (``[E, I]``, or flat expert by expert), and the top ``widths.mlp`` of EVERY expert are kept
    (``LayerPlan.experts``). Ties break towards the lower index.
    """
    layers = list(range(arch.num_layers)) if layers is None else list(layers)
    plan = Plan()
    for i in layers:
        g = arch.geometry(i)
        lp = LayerPlan()
        if attn_scores is not None and widths.attn_units < widths.attn_units_dense:
            s = attn_scores[i].detach().float().cpu()
            if widths.attn_unit == "kv_group":
                lp.kv_heads = _topk(s, widths.attn_units)
            else:
                per_group = s.reshape(g.num_kv_heads, g.group_size)
                lp.heads = sorted(k * g.group_size + j for k in range(g.num_kv_heads)
                                  for j in _topk(per_group[k], widths.attn_units))
        if mlp_scores is not None and widths.mlp < widths.mlp_dense:
            s = mlp_scores[i].detach().float().cpu()
            experts = arch.experts(i)
            if experts is not None:  # the top channels of each expert, the same number in every expert
                s = s.reshape(experts.num_experts, g.intermediate)
                lp.experts = [_topk(s[e], widths.mlp) for e in range(experts.num_experts)]
            else:
                lp.mlp = _topk(s, widths.mlp)
        if lp.to_dict():
            plan.layers[i] = lp
    return plan


def shape_plan(arch: ArchAdapter, widths: Widths, layers: list[int] | None = None) -> Plan:
    """A plan with the solved widths and arbitrary indices: for shape-only (meta-device) planning."""
    layers = list(range(arch.num_layers)) if layers is None else list(layers)
    g = arch.geometry(layers[0])
    n_attn = g.num_kv_heads if widths.attn_unit == "kv_group" else g.num_heads
    scores = {i: -torch.arange(n_attn, dtype=torch.float32) for i in layers}
    mlp = {i: -torch.arange(g.intermediate, dtype=torch.float32).repeat(_experts_of(arch, i), 1) for i in layers}
    return plan_from_scores(arch, widths, scores, mlp, layers)


def _experts_of(arch: ArchAdapter, layer: int) -> int:
    experts = arch.experts(layer)
    return experts.num_experts if experts is not None else 1


def _topk(scores: torch.Tensor, k: int) -> list[int]:
    # stable: sort by (-score, index) so equal scores keep the lower index
    order = torch.sort(-scores.flatten(), stable=True).indices[:k]
    return sorted(order.tolist())
