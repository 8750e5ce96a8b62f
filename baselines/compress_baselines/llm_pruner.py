"""LLM-Pruner (Ma, Fang, Wang, NeurIPS 2023, arXiv 2305.11627): block-wise structured pruning.

Faithful to the official ``horseee/LLM-Pruner`` block-wise mode (``hf_prune.py`` for MHA LLaMA,
``llama3.py`` for GQA) and its vendored torch-pruning ``TaylorImportance`` / ``MagnitudeImportance``
and ``MetaPruner``:

* **Structures.** Whole attention heads and MLP channels of the layers in a range; the hidden size is
  never pruned. For GQA models a unit is a whole KV group with its query heads (``llama3.py`` roots the
  group at ``k_proj`` with ``consecutive_groups = head_dim``); for MHA models a KV group is one head
  (``hf_prune.py`` roots it at ``q_proj``). The coupled parameters come from
  :func:`compress.structure_group` (``kv_group``: q/k/v rows + o columns; ``mlp``: gate/up rows + down
  columns); only the weights are scored, as in the official importance (biases are removed with their
  rows but never scored).
* **Importance** on next-token loss over the calibration set (official ``--taylor``), with
  ``s = W ⊙ ∂L/∂W`` and ``F = Σ_n g_n² / N`` (diagonal Fisher, accumulated PER SAMPLE ``n``):

  ===========  ==================  ===============================================
  ours         official            score of one row/column ``i`` of a member
  ===========  ==================  ===============================================
  element1     ``param_first``     ``Σ_k |s_ik|``
  element2     ``param_second``    ``Σ_k |W_ik F_ik W_ik|``
  vector       ``vectorize``       ``|Σ_k s_ik|``
  param_mix    ``param_mix``       ``Σ_k |s_ik − ½ W_ik F_ik W_ik|``
  l1 / l2      ``l1`` / ``l2``     ``Σ_k |W_ik|`` / ``Σ_k W_ik²`` (``MagnitudeImportance(p)``)
  ===========  ==================  ===============================================

  Reduction, in the official order: one score per channel of every member; the query-head rows
  (and o_proj columns) of a KV group are summed onto the group's ``head_dim`` channels (the
  official "align to the smallest member" step); members are combined per channel by ``grouping``
  (``sum`` | ``mean`` | ``max`` | ``prod`` | ``first``; official default ``sum`` for Taylor, and
  ``mean`` — ``MagnitudeImportance``'s own default — for l1/l2); the channels of a head/KV group are
  then summed (``consecutive_groups = head_dim``). ``first`` is the official group root: ``q_proj``
  for MHA, ``k_proj`` for GQA, ``gate_proj`` for the MLP.
* **Gradients.** The official script runs ONE backward over the 10 × 64 calibration batch for the
  first-order terms and, for ``param_second``/``param_mix``, one backward PER SAMPLE for ``F``. Here
  the model is in eval mode, ``requires_grad`` is on only for the scored weights (the pruned layers'
  linears; flags are restored afterwards), gradients come from :func:`torch.autograd.grad` (no
  ``.grad`` left on the model, no optimizer state) and each layer's gradients are freed once it is
  scored. ``calib_batch_size`` splits the batch into micro-batches whose losses are weighted by their
  share of the sequences, which gives the same gradient as the single official batch. With
  ``--layerwise`` (``ctx.gradients``) the whole model's autograd graph is never
  built: a forward layer by layer keeps each layer's inputs on CPU, the loss comes from the final norm +
  lm_head, and each layer is recomputed and back-propagated in reverse with the upstream gradient
  (equal to the whole-model gradients up to float rounding, tested).
* **Layer range.** Official README setting: layers 4..30 of LLaMA's 32 (``--block_*_layer_start 4
  --block_*_layer_end 30``). Scaled to ``L`` layers: ``start = floor(L·4/32 + ½)``,
  ``end = L − floor(L·2/32 + ½)`` (SmolLM2's 30 layers → 4..28; 32 → 4..30; very shallow models whose
  range would be empty prune every layer). Attention and MLP ranges can be set separately with the
  official names ``block_attention_layer_start/end`` and ``block_mlp_layer_start/end``.
* **Sizing.** ``pruning_ratio`` (optional) is the official knob: in every pruned layer
  ``n_pruned = C − int(C·(1 − r))`` channels with ``C`` = KV channels (``n_kv·head_dim``) or MLP
  channels, rounded down to whole heads. Without it the common Target is solved: local mode uses
  :func:`compress.model.sizing.solve_uniform` over the pruned range (same ratio for attention and MLP, the
  MLP takes what the head granularity leaves); when the attention and MLP ranges differ, the smallest
  official ``pruning_ratio`` that meets the target is found by bisection. When ``pruning_ratio`` is
  given it takes precedence and the target is only an upper bound (checked before any work in local
  mode; ``--target 100%`` means "no bound").
* **Global pruning** (``global_pruning=true``, official ``--global_pruning``): the vendored
  ``MetaPruner.prune_global`` concatenates the raw group scores (one per head/KV group — already
  summed over ``head_dim`` — and one per MLP channel) of every pruned layer, with **no
  normalisation** (``TaylorImportance(normalizer=None)``), and removes the lowest
  ``n − int(n·(1 − r))`` units. With a Target instead of a ratio, units are removed in that same
  global order until the target is met. Per-layer widths then differ.
* **Iterative steps** (``iterative_steps``, official ``--iterative_steps``, default 1). The official
  script builds one ``MetaPruner`` with ``iterative_steps = S`` (``linear_scheduler``: step ``k`` prunes
  to ratio ``r·k/S`` of each group's initial channels, so every step removes an equal share) and, before
  each ``pruner.step()``, backwards a FRESH random draw of 10 × 64 examples through the partially pruned
  model. Here step ``k`` draws its own ``calib_samples`` sequences (one draw of ``S × calib_samples``
  split in order; ``S = 1`` is exactly the one-shot draw and plan), recomputes the gradients and scores
  of the pruned model and cuts to the step's widths: ``official_kept_units(units, head_dim, r·k/S)``
  with a ratio; with a target, ``C − ceil((C − K)·k/S)`` channels (``K`` the solved final channels,
  attention rounded up to whole KV groups), i.e. the same linear share of what is removed; global mode
  removes ``len(imp) − int(initial·(1 − r·k/S))`` units per step with a ratio, or the lowest units
  until the target's ``k/S`` share of the metric is removed. The composed plan is in the dense
  numbering; the per-step widths are in the notes (``steps``) and in ``--dry-run``'s plan (local mode).
* **Recovery** is not part of pruning: ``compress run --recover-tokens N --recover-mode lora`` runs the
  official LoRA setting (r=8, α=16, dropout 0.05 on q,k,v,o,gate,up,down; merged before export).

Deviations (all deliberate):

* GQA scoring attributes query head ``h`` to KV group ``h // group_size`` (the group that is actually
  removed with it). The official alignment step (``imp.view(-1, n_kv·head_dim).sum(0)``) folds query
  rows onto KV group ``h mod n_kv`` instead, while its index mapping removes ``h // group_size``: a bug
  for GQA (harmless for MHA, where both agree).
* Every pruned layer keeps at least one KV group and one MLP channel. The official pruner skips a
  group entirely (prunes nothing in that layer) when every unit would go.
* Global mode removes exactly the ``n`` lowest units (ties: attention before MLP, then layer, then
  index); the official threshold ``imp <= thres`` removes every unit tied with the ``n``-th.
* ``param_second`` skips the extra batch backward of ``llama3.py``: its scores do not use it.
* Calibration text defaults to the run's calibration source instead of BookCorpus (not shipped
  offline); the sample count and length keep the official 10 × 64.
* Iterative steps: every step starts from fresh gradients for every group. The official loop never
  zeroes ``.grad`` between steps, so the weights of a group that one step left uncut (new tensors are
  made only for cut layers) carry the previous steps' gradients summed into the next score.
* Channel-wise and layer-wise modes and the ``random`` criterion (see the ``random`` method) are not
  offered.
* ``--dry-run`` of global mode shows the local-mode shapes: global widths depend on the scores.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from compress import (
    ArchAdapter,
    Capabilities,
    LayerPlan,
    Plan,
    PruneContext,
    Pruner,
    PrunerConfig,
    PruneResult,
    StructureGroup,
    Target,
    TargetError,
    TargetUnreachable,
    Unsupported,
    adapter_for,
    apply_plan,
    footprint,
    hookimpl,
    solve_uniform,
    structure_group,
    unit_costs,
)

Importance = Literal["element1", "element2", "vector", "param_mix", "l1", "l2"]
Grouping = Literal["sum", "mean", "max", "prod", "first"]

#: Official ``--taylor`` / ``--pruner_type`` names accepted as aliases.
IMPORTANCE_ALIASES: dict[str, str] = {
    "param_first": "element1",
    "param_second": "element2",
    "vectorize": "vector",
}
TAYLOR: tuple[str, ...] = ("element1", "element2", "vector", "param_mix")
_NEEDS_FIRST = ("element1", "vector", "param_mix")
_NEEDS_FISHER = ("element2", "param_mix")


def default_layer_range(num_layers: int) -> tuple[int, int]:
    """The official 4..30-of-32 range scaled to ``num_layers``: ``[start, end)``.

    ``start = floor(L·4/32 + ½)``, ``end = L − floor(L·2/32 + ½)``; every layer when that is empty.
    """
    start = math.floor(num_layers * 4 / 32 + 0.5)
    end = num_layers - math.floor(num_layers * 2 / 32 + 0.5)
    if end <= start:
        return 0, num_layers
    return start, end


def official_kept_units(units: int, channels_per_unit: int, ratio: float) -> int:
    """Units an official ``MetaPruner`` local step keeps at ``pruning_ratio=ratio`` (at least one).

    ``n_pruned = C − int(C·(1 − r))`` channels of the group root (``C = units·channels_per_unit``),
    rounded down to whole units (``consecutive_groups``).
    """
    c = units * channels_per_unit
    n_pruned = c - int(c * (1 - ratio))
    return max(1, units - n_pruned // channels_per_unit)


_LAYERS = 1024  # bound of layer indices and rounds: the most layers a config may have (compress)


class LLMPrunerConfig(PrunerConfig):
    """LLM-Pruner settings; the defaults are the official block-wise ones."""

    calib_samples: int = Field(10, ge=1, description="calibration sequences (official --num_examples 10)")
    calib_seq_len: int = Field(64, ge=2, description="tokens per calibration sequence (official 64)")
    calib_batch_size: int = Field(10, ge=1, description="sequences per first-order backward (official: all 10)")
    importance: Importance = Field(
        "element1", description="element1|element2|vector|param_mix (Taylor) or l1|l2 (magnitude); "
                                "official names param_first/param_second/vectorize accepted")
    grouping: Grouping | None = Field(
        None, description="member reduction per channel; None = official default (sum for Taylor, mean for l1/l2)")
    pruning_ratio: float | None = Field(
        None, gt=0, lt=1, description="official ratio over the pruned layers; wins over the target (then an upper bound)")
    global_pruning: bool = Field(False, description="rank raw group scores across all pruned layers (official)")
    block_attention_layer_start: int | None = Field(None, ge=0, le=_LAYERS, description="None: scaled official 4 (of 32)")
    block_attention_layer_end: int | None = Field(None, ge=0, le=_LAYERS, description="exclusive; None: scaled official 30 (of 32)")
    block_mlp_layer_start: int | None = Field(None, ge=0, le=_LAYERS, description="None: scaled official 4 (of 32)")
    block_mlp_layer_end: int | None = Field(None, ge=0, le=_LAYERS, description="exclusive; None: scaled official 30 (of 32)")
    iterative_steps: int = Field(
        1, ge=1, le=_LAYERS, description="official --iterative_steps: prune in this many rounds (linear ratio schedule), "
                             "fresh Taylor gradients on the partially pruned model each round")

    @field_validator("importance", mode="before")
    @classmethod
    def _official_names(cls, v: object) -> object:
        return IMPORTANCE_ALIASES.get(v, v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _ranges_ordered(self) -> LLMPrunerConfig:
        for kind in ("attention", "mlp"):
            s, e = getattr(self, f"block_{kind}_layer_start"), getattr(self, f"block_{kind}_layer_end")
            if s is not None and e is not None and e < s:
                raise ValueError(f"block_{kind}_layer_end ({e}) is before block_{kind}_layer_start ({s})")
        return self

    @property
    def member_reduction(self) -> str:
        if self.grouping is not None:
            return self.grouping
        return "sum" if self.importance in TAYLOR else "mean"


@dataclass
class _Sizes:
    """Kept units per pruned layer: ``attn[i]`` KV groups, ``mlp[i]`` MLP channels."""

    attn: dict[int, int] = field(default_factory=dict)
    mlp: dict[int, int] = field(default_factory=dict)
    ratio: float | None = None  # the official pruning_ratio these sizes come from, when there is one
    predicted: float | None = None
    how: str = ""


# ====================================================================== importance
def scored_members(group: StructureGroup, root_first: bool = True) -> list:
    """The members LLM-Pruner scores: weights only, the official group root first.

    Root: ``gate_proj`` for the MLP; ``q_proj`` for MHA attention (``hf_prune.py``) and ``k_proj`` for
    GQA attention (``llama3.py``).
    """
    members = [m for m in group.members if m.name.endswith(".weight")]
    if root_first and group.kind == "kv_group" and len(members) >= 2:
        q = members[0]
        gqa = q.width != members[1].width  # query rows per unit > head_dim
        if gqa:
            members = [members[1], q, *members[2:]]
    return members


def _salience(criterion: str, w: torch.Tensor, g: torch.Tensor | None, f: torch.Tensor | None) -> torch.Tensor:
    w = w.detach().float()
    if criterion in ("element1", "vector"):
        return w * g
    if criterion == "element2":
        return w * f * w
    if criterion == "param_mix":
        return w * g - 0.5 * w * f * w
    if criterion == "l1":
        return w.abs()
    if criterion == "l2":
        return w * w
    raise ValueError(f"unknown importance {criterion!r}")


def group_scores(
    group: StructureGroup,
    criterion: str,
    grads: dict[nn.Parameter, torch.Tensor] | None = None,
    fisher: dict[nn.Parameter, torch.Tensor] | None = None,
    grouping: str = "sum",
    channels_per_unit: int = 1,
) -> torch.Tensor:
    """One LLM-Pruner score per unit of ``group`` (KV group/head or MLP channel).

    ``channels_per_unit`` is ``head_dim`` for attention (official ``consecutive_groups``), 1 for MLP.
    """
    c = channels_per_unit
    per_member = []
    for m in scored_members(group):
        s = _salience(criterion, m.param, None if grads is None else grads.get(m.param),
                      None if fisher is None else fisher.get(m.param))
        blocks = m.blocks(s)  # [units, rows of the unit, the other dimension]
        ch = blocks.sum(-1).abs() if criterion == "vector" else blocks.abs().sum(-1)
        ch = ch.reshape(group.units, m.width // c, c).sum(1)  # fold query heads onto head_dim channels
        per_member.append(ch)
    stacked = torch.stack(per_member)  # [members, units, c]
    if grouping == "sum":
        red = stacked.sum(0)
    elif grouping == "mean":
        red = stacked.mean(0)
    elif grouping == "max":
        red = stacked.max(0).values
    elif grouping == "prod":
        red = stacked.prod(0)
    elif grouping == "first":
        red = stacked[0]
    else:
        raise ValueError(f"unknown grouping {grouping!r}")
    return red.sum(-1)


def taylor_gradients(model: nn.Module, params: list[nn.Parameter], tokens: torch.Tensor, *,
                     ctx: PruneContext | None = None, **kwargs: Any):
    """Gradients of the next-token loss (and per-sample Fisher) for the Taylor importances, from the
    run's gradient service (``ctx.gradients``: whole-model, or layer by layer with ``--layerwise``);
    without ``ctx``, a whole-model pass where the model is."""
    ctx = ctx if ctx is not None else PruneContext(arch=adapter_for(model))
    return ctx.gradients(model, params, tokens, **kwargs)


# ====================================================================== the method
class LLMPruner(Pruner):
    name = "llm_pruner"
    Config = LLMPrunerConfig
    capabilities = Capabilities(
        structures=("kv_groups", "heads", "mlp_channels"),
        needs_calibration=True,
        needs_gradients=True,
        targets=("params", "flops", "kv"),
        export="auto",
        summary="Taylor (element¹/element²/vector) importance of coupled head/KV-group and MLP-channel "
                "groups, layer range 4..30/32 scaled, local or global; LoRA recovery",
        reference="Ma, Fang, Wang. LLM-Pruner, NeurIPS 2023 (horseee/LLM-Pruner hf_prune.py / llama3.py)",
        requires=("dense_mlp",),  # its dependency groups are gate/up/down linears
        conditional=("per_layer_shapes",),  # else every layer in both ranges, local pruning (check says so)
        alternative="transact",
    )
    config: LLMPrunerConfig

    # ------------------------------------------------------------------ ranges and checks
    def layer_ranges(self, num_layers: int) -> tuple[list[int], list[int]]:
        """Pruned attention layers and pruned MLP layers."""
        ds, de = default_layer_range(num_layers)
        c = self.config
        a0 = ds if c.block_attention_layer_start is None else c.block_attention_layer_start
        a1 = de if c.block_attention_layer_end is None else c.block_attention_layer_end
        m0 = ds if c.block_mlp_layer_start is None else c.block_mlp_layer_start
        m1 = de if c.block_mlp_layer_end is None else c.block_mlp_layer_end
        for what, s, e in (("attention", a0, a1), ("mlp", m0, m1)):
            if e > num_layers or s > e:
                raise Unsupported(
                    f"block_{what}_layer range [{s}, {e}) does not fit a model of {num_layers} layers; "
                    f"use 0 <= start <= end <= {num_layers}"
                )
        if a0 == a1 and m0 == m1:
            raise Unsupported("both the attention and the MLP layer ranges are empty; widen one of them")
        return list(range(a0, a1)), list(range(m0, m1))

    def check(self, model: nn.Module, target: Target) -> None:
        super().check(model, target)
        arch = adapter_for(model)
        attn, mlp = self.layer_ranges(arch.num_layers)
        if target.metric == "kv" and not attn:
            raise Unsupported("a kv: target needs attention pruning; set a non-empty block_attention_layer range")
        everything = list(range(arch.num_layers))
        if "per_layer_shapes" not in arch.features and (attn != everything or mlp != everything
                                                        or self.config.global_pruning):
            n, mt = arch.num_layers, arch.config.model_type
            raise Unsupported(
                f"llm_pruner on {mt} must prune every layer to the same widths ({mt} layers cannot differ): set "
                f"block_attention_layer_start=0 block_attention_layer_end={n} block_mlp_layer_start=0 "
                f"block_mlp_layer_end={n} global_pruning=false, or use transact")
        layers = sorted(set(attn) | set(mlp))
        g0 = arch.geometry(layers[0])
        for i in layers:
            if arch.geometry(i) != g0:
                raise Unsupported(f"layer {i} has a different shape from layer {layers[0]}; LLM-Pruner prunes "
                                  "from a model whose pruned layers are equal (start from the dense model)")
            for lin in (*arch.attn_linears(i).values(), *arch.mlp_linears(i).values()):
                if not isinstance(lin, nn.Linear):
                    raise Unsupported(f"layer {i} has a {type(lin).__name__} projection; LLM-Pruner needs "
                                      "dense nn.Linear projections")
        self._sizes(arch, target, attn, mlp)  # raises TargetError when out of reach

    # ------------------------------------------------------------------ sizing
    def _value(self, arch: ArchAdapter, target: Target, dense: float, sizes: _Sizes) -> float:
        """``dense`` (the model's value now) less the units ``sizes`` removes from each layer's width now."""
        out = dense
        for i, a in sizes.attn.items():
            out -= self._costs(arch, target, i)[0] * (arch.geometry(i).num_kv_heads - a)
        for i, m in sizes.mlp.items():
            out -= self._costs(arch, target, i)[1] * (arch.geometry(i).intermediate - m)
        return out

    def _costs(self, arch: ArchAdapter, target: Target, layer: int) -> tuple[float, float]:
        itemsize = next(p for p in arch.model.parameters() if p.is_floating_point()).element_size()
        return unit_costs(arch, layer, "kv_group", 2048, itemsize)[target.metric]

    def _ratio_sizes(self, arch: ArchAdapter, attn: list[int], mlp: list[int], r: float) -> _Sizes:
        g = arch.geometry((attn or mlp)[0])
        a = official_kept_units(g.num_kv_heads, g.head_dim, r)
        m = official_kept_units(g.intermediate, 1, r)
        return _Sizes(attn={i: a for i in attn}, mlp={i: m for i in mlp}, ratio=r)

    def _sizes(self, arch: ArchAdapter, target: Target, attn: list[int], mlp: list[int]) -> _Sizes:
        """Local-mode kept units per layer (also the shapes shown by --dry-run in global mode)."""
        dense_fp = footprint(arch.model, arch=arch)
        dense = dense_fp.of(target.metric)
        goal = target.goal(dense)
        target.check_reachable(dense)
        r = self.config.pruning_ratio
        if r is not None:
            sizes = self._ratio_sizes(arch, attn, mlp, r)
            if attn:  # e.g. Gemma's config refuses a head count that does not divide the hidden size
                g = arch.geometry(attn[0])
                kept = sizes.attn[attn[0]]
                why = arch.heads_refusal(kept * g.group_size, g.hidden) if kept < g.num_kv_heads else ""
                if why:
                    raise TargetError(f"pruning_ratio {r} keeps {kept * g.group_size} query heads per layer: {why}; "
                                      "choose another pruning_ratio, or drop it to let the target set the size")
            sizes.predicted = self._value(arch, target, dense, sizes)
            sizes.how = f"official pruning_ratio {r}"
            if not self.config.global_pruning and sizes.predicted > goal * (1 + 1e-9):
                raise TargetError(
                    f"pruning_ratio {r} leaves {target.metric} {sizes.predicted:.6g}, above the target {target} "
                    f"({goal:.6g}); raise pruning_ratio, or drop it to let the target set the size"
                )
            return sizes
        if attn == mlp or not attn or not mlp:
            w = solve_uniform(arch, target, attn_unit="kv_group", layers=attn or mlp, attn_ratio=1.0,
                              prune_attention=bool(attn), prune_mlp=bool(mlp))
            how = "solve_uniform over the pruned range" + (f" ({w.note})" if w.note else "")
            return _Sizes(attn={i: w.attn_units for i in attn}, mlp={i: w.mlp for i in mlp},
                          predicted=w.predicted, how=how)
        # different attention and MLP ranges: smallest official ratio that meets the target
        lo, hi = 0.0, 1.0 - 1e-12
        if self._value(arch, target, dense, self._ratio_sizes(arch, attn, mlp, hi)) > goal:
            raise TargetUnreachable(f"target {target} ({goal:.6g}) is below the smallest shape of these layer ranges "
                              "(one KV group and one MLP channel per pruned layer); widen the ranges")
        for _ in range(60):
            mid = (lo + hi) / 2
            if self._value(arch, target, dense, self._ratio_sizes(arch, attn, mlp, mid)) <= goal:
                hi = mid
            else:
                lo = mid
        sizes = self._ratio_sizes(arch, attn, mlp, hi)
        sizes.predicted = self._value(arch, target, dense, sizes)
        sizes.how = f"smallest official pruning_ratio meeting the target ({hi:.6f})"
        return sizes

    # ------------------------------------------------------------------ dry run
    def plan_shapes(self, model: nn.Module, target: Target) -> dict:
        arch = adapter_for(model)
        attn, mlp = self.layer_ranges(arch.num_layers)
        sizes = self._sizes(arch, target, attn, mlp)
        g0 = arch.geometry((attn or mlp)[0])
        schedule = self._schedule_summary(g0, sizes) if self.config.iterative_steps > 1 else None
        plan = _plan_from_ranks(arch, sizes, None, None)
        apply_plan(model, plan, arch)
        out = self._summary(sizes, attn, mlp)
        if schedule is not None:
            out["iterative_steps"] = self.config.iterative_steps
            out["steps"] = schedule  # local mode; global widths depend on the scores of each step
        return out

    def working_memory(self, model: nn.Module, target: Target, mem) -> dict[str, int]:
        """Loss backward from the first pruned layer + the gradients of every scored weight: autograd's
        copies (model dtype; all at once whole-model, one layer's layer-wise) and the fp32 sums (twice
        with the Fisher term). Magnitude importance (l1/l2) reads the weights only."""
        cfg = self.config
        if cfg.importance not in TAYLOR:
            return {}
        arch = adapter_for(model)
        attn, mlp = self.layer_ranges(arch.num_layers)
        scored: dict[int, int] = {}
        for i in attn:
            scored[i] = scored.get(i, 0) + sum(m.weight.numel() for m in arch.attn_linears(i).values())
        for i in mlp:
            scored[i] = scored.get(i, 0) + sum(m.weight.numel() for m in arch.mlp_linears(i).values())
        total = sum(scored.values())
        terms = mem.gradients(cfg.calib_samples, cfg.calib_seq_len, cfg.calib_batch_size, first_layer=min(scored))
        fp32_sums = (cfg.importance in _NEEDS_FIRST) + (cfg.importance in _NEEDS_FISHER)
        terms["gradients_autograd"] = (max(scored.values()) if mem.layerwise else total) * mem.b
        terms["gradients_fp32"] = total * 4 * fp32_sums
        return terms

    def _summary(self, sizes: _Sizes, attn: list[int], mlp: list[int]) -> dict:
        out: dict = {
            "sizing": sizes.how,
            "attention_layers": [attn[0], attn[-1] + 1] if attn else [],
            "mlp_layers": [mlp[0], mlp[-1] + 1] if mlp else [],
            "kv_groups_kept": _compact(sizes.attn),
            "mlp_kept": _compact(sizes.mlp),
        }
        if sizes.ratio is not None:
            out["pruning_ratio"] = sizes.ratio
        if self.config.global_pruning:
            out["global_pruning"] = True
        return out

    # ------------------------------------------------------------------ iterative schedule
    def step_sizes(self, g0, final: _Sizes, step: int) -> _Sizes:
        """Local-mode kept units per layer after ``step`` of ``iterative_steps`` (``g0``: the dense
        geometry of the pruned layers).

        Official (``MetaPruner`` with ``linear_scheduler``): step ``k`` of ``S`` prunes each group to
        ratio ``r·k/S`` of its INITIAL channels, ``n_pruned = current − int(C·(1 − r·k/S))`` rounded
        down to whole heads — i.e. ``official_kept_units(units, head_dim, r·k/S)``. Sized by a target
        (no ratio), each step removes an equal share of the channels to remove the same way: after step
        ``k``, ``C − ceil((C − K)·k/S)`` channels, rounded up to whole KV groups for attention (``K``:
        the solved final channels). Step ``S`` is the final size."""
        S = self.config.iterative_steps
        if step >= S:
            return final
        if final.ratio is not None:
            r = (step / float(S)) * final.ratio  # torch-pruning's linear_scheduler value
            a = official_kept_units(g0.num_kv_heads, g0.head_dim, r)
            m = official_kept_units(g0.intermediate, 1, r)
            return _Sizes(attn=dict.fromkeys(final.attn, a), mlp=dict.fromkeys(final.mlp, m), ratio=r,
                          how=f"step {step}/{S} of {final.how}")

        def kept(units: int, per_unit: int, final_units: int) -> int:
            removed = -(-(units - final_units) * per_unit * step // S)  # ceil, in channels
            return units - removed // per_unit

        return _Sizes(attn={i: kept(g0.num_kv_heads, g0.head_dim, a) for i, a in final.attn.items()},
                      mlp={i: kept(g0.intermediate, 1, m) for i, m in final.mlp.items()},
                      how=f"step {step}/{S} of {final.how}")

    def _schedule_summary(self, g0, final: _Sizes) -> list[dict]:
        out = []
        for k in range(1, self.config.iterative_steps + 1):
            sz = self.step_sizes(g0, final, k)
            row: dict = {"step": k, "kv_groups_kept": _compact(sz.attn), "mlp_kept": _compact(sz.mlp)}
            if sz.ratio is not None:
                row["pruning_ratio"] = sz.ratio
            out.append(row)
        return out

    # ------------------------------------------------------------------ pruning
    def prune(self, model: nn.Module, target: Target, ctx: PruneContext) -> PruneResult:
        cfg = self.config
        arch = ctx.arch
        attn, mlp = self.layer_ranges(arch.num_layers)
        final = self._sizes(arch, target, attn, mlp)
        g0 = arch.geometry((attn or mlp)[0])
        hd = g0.head_dim
        S = cfg.iterative_steps
        notes: dict = {"importance": cfg.importance, "grouping": cfg.member_reduction,
                       "global_pruning": cfg.global_pruning}
        if cfg.importance in TAYLOR and ctx.calibration is None:
            raise Unsupported("LLM-Pruner's Taylor importance needs calibration text; pass --calib")
        # official: every step backwards a fresh random draw of calib_samples sequences
        tokens = ctx.draw(cfg.calib_samples * S, cfg.calib_seq_len) if cfg.importance in TAYLOR else None
        dense_fp = footprint(model, arch=arch)
        dense_value, goal = dense_fp.of(target.metric), target.goal(dense_fp.of(target.metric))
        initial_units = len(attn) * g0.num_kv_heads + len(mlp) * g0.intermediate
        timing: dict[str, float] = {}
        total_plan = Plan()
        steps: list[dict] = []
        sizes = final
        for step in range(1, S + 1):
            block = None if tokens is None else tokens[(step - 1) * cfg.calib_samples:step * cfg.calib_samples]
            scores = self._scores(model, ctx, attn, mlp, hd, block, timing)
            if cfg.global_pruning:
                last = step == S
                if cfg.pruning_ratio is not None:
                    r = (step / float(S)) * cfg.pruning_ratio
                    sizes = self._global_sizes(arch, target, scores, ratio=r, initial_units=initial_units,
                                               goal=goal if last else None)
                else:  # the target's share of the removal, linear in the metric; the target itself last
                    goal_k = goal if last else dense_value - (dense_value - goal) * step / S
                    sizes = self._global_sizes(arch, target, scores, goal=goal_k, check=last)
            else:
                sizes = self.step_sizes(g0, final, step)
            plan = _plan_from_ranks(arch, sizes, {i: scores[("attn", i)] for i in attn},
                                    {i: scores[("mlp", i)] for i in mlp})
            apply_plan(model, plan, arch)
            total_plan = total_plan.compose(plan)
            if S > 1:
                row: dict = {"step": step, "kv_groups_kept": _compact(sizes.attn), "mlp_kept": _compact(sizes.mlp),
                             footprint_key(target): footprint(model, arch=arch).of(target.metric)}
                if sizes.ratio is not None:
                    row["pruning_ratio"] = sizes.ratio
                steps.append(row)
                ctx.log(f"llm_pruner step {step}/{S}: kept KV groups {sorted(set(sizes.attn.values()))}, "
                        f"MLP {sorted(set(sizes.mlp.values()))}")
        if tokens is not None:
            notes["calibration"] = {"samples": cfg.calib_samples, "seq_len": cfg.calib_seq_len,
                                    "backward_passes": S * ((math.ceil(cfg.calib_samples / cfg.calib_batch_size)
                                                             if cfg.importance in _NEEDS_FIRST else 0)
                                                            + (cfg.calib_samples if cfg.importance in _NEEDS_FISHER
                                                               else 0))}
            if S > 1:
                notes["calibration"]["fresh_samples_per_step"] = True
        notes["timing_s"] = {k: round(v, 4) for k, v in timing.items()}
        if S > 1:
            notes["iterative_steps"] = S
            notes["steps"] = steps
        notes.update(self._summary(sizes, attn, mlp))
        if ctx.recover is not None and getattr(getattr(ctx.recover, "cfg", None), "mode", "lora") != "lora":
            notes["recovery_note"] = "official LLM-Pruner recovery is LoRA (--recover-mode lora)"
        ctx.log(f"llm_pruner: {cfg.importance} importance, {sizes.how}; kept KV groups "
                f"{sorted(set(sizes.attn.values()))}, MLP {sorted(set(sizes.mlp.values()))}")
        return PruneResult(model=model, plan=total_plan.to_dict(), export="auto", notes=notes)

    def _scores(self, model: nn.Module, ctx: PruneContext, attn: list[int], mlp: list[int], hd: int,
                tokens: torch.Tensor | None, timing: dict[str, float]) -> dict[tuple[str, int], torch.Tensor]:
        """One score per unit of every pruned group of the model as it is now (fresh gradients)."""
        cfg = self.config
        arch = ctx.arch
        groups: dict[tuple[str, int], StructureGroup] = {}
        for i in attn:
            groups[("attn", i)] = structure_group(arch, "kv_group", i)
        for i in mlp:
            groups[("mlp", i)] = structure_group(arch, "mlp", i)
        grads: dict[nn.Parameter, torch.Tensor] = {}
        fisher: dict[nn.Parameter, torch.Tensor] = {}
        if tokens is not None:
            params = _unique(m.param for g in groups.values() for m in scored_members(g))
            t0 = time.perf_counter()
            grads, fisher = taylor_gradients(
                model, params, tokens, first_order=cfg.importance in _NEEDS_FIRST,
                fisher=cfg.importance in _NEEDS_FISHER, batch_size=cfg.calib_batch_size,
                ctx=ctx)
            timing["gradients"] = timing.get("gradients", 0.0) + time.perf_counter() - t0
        t0 = time.perf_counter()
        scores: dict[tuple[str, int], torch.Tensor] = {}
        for key, g in groups.items():
            scores[key] = group_scores(g, cfg.importance, grads, fisher, grouping=cfg.member_reduction,
                                       channels_per_unit=hd if key[0] == "attn" else 1)
            for m in g.members:  # free this layer's gradients as soon as it is scored
                grads.pop(m.param, None)
                fisher.pop(m.param, None)
        timing["scores"] = timing.get("scores", 0.0) + time.perf_counter() - t0
        return scores

    def _global_sizes(self, arch: ArchAdapter, target: Target, scores: dict[tuple[str, int], torch.Tensor], *,
                      ratio: float | None = None, initial_units: int | None = None, goal: float | None = None,
                      check: bool = True) -> _Sizes:
        """Official global ranking: raw scores of every unit in every pruned layer, lowest removed first.

        Each layer's best unit is never a candidate (a layer keeps at least one KV group and one MLP
        channel). With a ratio the official count ``len(imp) − int(initial·(1 − r))`` is removed
        (``initial``: the units of the dense pruned layers; ``r``: this step's scheduled ratio);
        otherwise units go in that order until ``goal`` (default: the target's) is met. ``goal`` with a
        ratio: the target the result is checked against (the last step); ``check=False`` skips the
        check of the target-sized path (intermediate steps)."""
        dense_fp = footprint(arch.model, arch=arch)
        dense = dense_fp.of(target.metric)  # the model as it is now
        goal_given = goal is not None
        goal = target.goal(dense) if goal is None else goal
        total = sum(int(s.numel()) for s in scores.values())
        cands: list[tuple[float, int, int, float]] = []  # (score, key index, unit, cost of removing it)
        keys = list(scores)
        for k, key in enumerate(keys):
            s = scores[key].detach().float().cpu()
            best = _topk(s, 1)[0]
            cost = self._costs(arch, target, key[1])[0 if key[0] == "attn" else 1]
            cands.extend((float(s[u]), k, u, cost) for u in range(s.numel()) if u != best)
        cands.sort(key=lambda c: (c[0], c[1], c[2]))
        r = self.config.pruning_ratio if ratio is None else ratio
        if r is not None:
            initial = total if initial_units is None else initial_units
            n_pruned = max(0, min(len(cands), total - int(initial * (1 - r))))
            how = f"official global pruning_ratio {r}"
            check = ratio is None or goal_given
        else:
            value, n_pruned = dense, 0
            while value > goal and n_pruned < len(cands):
                value -= cands[n_pruned][3]
                n_pruned += 1
            if check and value > goal * (1 + 1e-9):
                raise TargetUnreachable(f"target {target} ({goal:.6g}) is below the smallest shape of the pruned layer "
                                  "ranges (one KV group and one MLP channel per layer); widen the ranges")
            how = "global ranking of raw scores until the target is met"
        removed: dict[tuple[str, int], int] = dict.fromkeys(keys, 0)
        for c in cands[:n_pruned]:
            removed[keys[c[1]]] += 1
        sizes = _Sizes(ratio=r, how=how)
        for key in keys:
            n = int(scores[key].numel()) - removed[key]
            (sizes.attn if key[0] == "attn" else sizes.mlp)[key[1]] = n
        sizes.predicted = self._value(arch, target, dense, sizes)
        if check and sizes.predicted > goal * (1 + 1e-9):
            raise TargetError(f"global pruning_ratio {r} leaves {target.metric} {sizes.predicted:.6g}, above the "
                              f"target {target} ({goal:.6g}); raise pruning_ratio or drop it")
        return sizes


def footprint_key(target: Target) -> str:
    """The name of the target's metric in a step record."""
    return {"params": "params", "flops": "flops_per_token", "kv": "kv_bytes_per_token"}.get(target.metric,
                                                                                           target.metric)


# ====================================================================== helpers
def _unique(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for p in params:
        seen.setdefault(id(p), p)
    return list(seen.values())


def _compact(per_layer: dict[int, int]) -> int | dict[str, int] | None:
    """One number when every pruned layer has the same width, else ``{layer: width}``."""
    if not per_layer:
        return None
    values = set(per_layer.values())
    return values.pop() if len(values) == 1 else {str(i): n for i, n in sorted(per_layer.items())}


def _topk(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` highest scores, ties towards the lower index, sorted ascending."""
    order = sorted(range(scores.numel()), key=lambda j: (-float(scores[j]), j))
    return sorted(order[:k])


def _plan_from_ranks(arch: ArchAdapter, sizes: _Sizes, attn_scores: dict[int, torch.Tensor] | None,
                     mlp_scores: dict[int, torch.Tensor] | None) -> Plan:
    """Keep the top-scoring units per layer (scores None: the first units, for shape-only plans)."""
    plan = Plan()
    for i in sorted(set(sizes.attn) | set(sizes.mlp)):
        g = arch.geometry(i)
        lp = LayerPlan()
        a = sizes.attn.get(i)
        if a is not None and a < g.num_kv_heads:
            lp.kv_heads = list(range(a)) if attn_scores is None else _topk(attn_scores[i].detach().cpu(), a)
        m = sizes.mlp.get(i)
        if m is not None and m < g.intermediate:
            lp.mlp = list(range(m)) if mlp_scores is None else _topk(mlp_scores[i].detach().cpu(), m)
        if lp.to_dict():
            plan.layers[i] = lp
    return plan


@hookimpl
def register_pruners(register):
    register(LLMPruner, aliases=("llm-pruner", "llmpruner"))
