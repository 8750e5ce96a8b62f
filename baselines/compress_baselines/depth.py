"""Depth pruning: remove whole decoder layers by Block Influence (ShortGPT; Minitron's depth axis).

ShortGPT (Men et al. 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than You
Expect", arXiv 2403.03853; code: icip-cas/ShortGPT ``shortgpt/shortgpt.py``, ``metrics.py``) scores
every decoder layer ``i`` by its **Block Influence** on calibration text::

    BI_i = 1 − E_t[ cos(x_{i,t}, x_{i+1,t}) ]

where ``x_i`` is the hidden state entering layer ``i`` and ``x_{i+1}`` the one leaving it, ``t`` runs
over every calibration token, and removes the layers with the lowest BI (a layer that barely turns
the residual stream is redundant). Minitron (Muralidharan et al. 2024, "Compact Language Models via
Pruning and Knowledge Distillation") prunes the same axis and ranks layers by BI among its depth
scores; this baseline is the one-shot BI removal, without distillation.

How it is computed here
-----------------------
* The layers are visited with the run's layer-wise engine (``ctx.layers``): each layer runs once
  over the cached inputs of every calibration mini-batch; for each token the cosine similarity of
  the layer's input and output rows is taken in fp32 and summed in fp64; BI is one minus the mean
  over all calibration tokens (the official code sums ``1 − cos`` over tokens, the same ranking for
  every layer sees the same tokens). The outputs computed for the scores are handed to the engine
  as the next layer's inputs (:meth:`compress.LayerStep.set_outputs`), so every layer runs once;
  the price is a second set of activations during each layer's step (``working_memory``).
* Nothing is changed while scoring: the dense model's hidden states are scored, as in the official
  one-pass ``output_hidden_states`` loop, and the layers are removed at the end.
* Ties (equal BI) remove the lower index first; the removal order is recorded.

Sizing
------
Removing a layer removes its parameters, its FLOPs/token (its linears and its attention core at
the run's 2048-token FLOPs length) and its KV cache, so for equal layers each metric is affine in
the number of kept layers: ``value(k) = fixed + k·per_layer``. The run removes the smallest number
of layers whose model is at or below the target (as close as whole layers allow), counted exactly
from the modules (:func:`compress.count_params`, :func:`compress.linear_flops_per_token`, the k/v
widths). A target that only an empty decoder stack would meet is refused in :meth:`check`, before
any work, as is a model whose layers differ in size (run depth pruning on the dense model, or
before a width method). ``n_prune_layers`` (the official ``n_prune_layers``, 9 of 32 for
Llama-2-7B) removes exactly that many layers instead; the target is then an upper bound.

Surgery
-------
The removed layers are deleted from the decoder's ``ModuleList`` (the others keep their order and
weights), every ``layer_idx`` inside a kept layer (the attention's index into the HF KV cache) is
renumbered to its new position (the official ``module.self_attn.layer_idx = layer_idx``), and the
config is cut consistently: ``num_hidden_layers`` and the per-layer lists ``layer_types`` (Qwen2's
full / sliding attention per layer, which the cache and the mask mapping index by position) and
``mlp_layer_types`` keep the kept layers' entries. The result is a stock model with fewer layers,
so the exporter writes the stock format (``export="auto"`` chooses it). Configs with per-layer
overrides (``per_layer_config``) or KV sharing between layers, and compress-format models, are
refused.

Deviations from the official code
---------------------------------
* The last layer's output is the residual stream before the final norm. The official code reads
  ``output_hidden_states`` of transformers 4.x, whose last entry is *after* the final RMSNorm, so
  its BI of the last layer compares ``x_{L-1}`` with ``norm(x_L)``; here every layer is scored on
  its own input and output.
* Calibration: the run's ``--calib`` text in ``calib_samples`` × ``calib_seq_len`` windows (defaults
  128 × 2048, as the other baselines). The official script streams every book of the PG19
  validation split (``emozilla/pg19``) in 256-token windows, one book per batch, in fp16; see the
  recipe for the closest setting.
* Cosine similarity is ``torch.nn.functional.cosine_similarity`` (norms clamped at 1e-8); the
  official code maps the NaN of a zero-norm token to 0.5 instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from compress import (
    ArchAdapter,
    Capabilities,
    NumericalError,
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
    count_params,
    footprint,
    hookimpl,
    layer_attention_core_flops,
    layer_kv_bytes_per_token,
    linear_flops_per_token,
)

#: Per-layer config lists cut with the layers (one entry per decoder layer, indexed by position).
PER_LAYER_LISTS = ("layer_types", "mlp_layer_types")
#: FLOPs/token are counted at this sequence length, the run's default (``compress.footprint``).
FLOPS_SEQ_LEN = 2048


class DepthConfig(PrunerConfig):
    """Depth-pruning settings; calibration defaults as the other baselines (official: see the recipe)."""

    calib_samples: int = Field(128, ge=1, description="calibration sequences")
    calib_seq_len: int = Field(2048, ge=2, description="tokens per sequence (official: 256-token windows)")
    calib_batch_size: int = Field(4, ge=1, description="sequences per layer forward (memory only)")
    n_prune_layers: int | None = Field(
        None, ge=0, le=1024,
        description="official n_prune_layers: remove exactly this many layers; None = solved from the target",
    )


# ====================================================================== block influence
def block_influence_sums(x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """``(Σ_t cos(x_t, y_t), number of tokens)`` over the rows of ``x``/``y`` (``[..., H]``), in fp32/fp64."""
    cos = F.cosine_similarity(x.float(), y.float(), dim=-1)
    return float(cos.double().sum().item()), int(cos.numel())


def block_influence(x: torch.Tensor, y: torch.Tensor) -> float:
    """``1 − mean_t cos(x_t, y_t)``: ShortGPT's BI of a block with input ``x`` and output ``y``."""
    s, n = block_influence_sums(x, y)
    return 1.0 - s / n


def removal_order(scores: list[float]) -> list[int]:
    """Layer indices by ascending BI (ties: lower index first): the order in which layers go."""
    return sorted(range(len(scores)), key=lambda i: (scores[i], i))


# ====================================================================== sizing
@dataclass(frozen=True)
class _Sizing:
    metric: str
    num_layers: int
    remove: int  # number of layers removed
    dense: float
    goal: float
    per_layer: float  # value of one layer for the metric
    predicted: float  # value after removing ``remove`` layers

    @property
    def kept(self) -> int:
        return self.num_layers - self.remove

    def summary(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "num_layers": self.num_layers,
            "removed": self.remove,
            "kept": self.kept,
            "dense": self.dense,
            "goal": self.goal,
            "per_layer": self.per_layer,
            "predicted": self.predicted,
        }


def layer_costs(arch: ArchAdapter, seq_len: int = FLOPS_SEQ_LEN) -> list[dict[str, float]]:
    """What removing each decoder layer saves: its parameters, FLOPs/token and KV bytes/token
    (the same conventions as :func:`compress.footprint`, sliding-window layers included: a layer
    that attends ``W < seq_len`` keys costs less attention and caches fewer tokens)."""
    itemsize = next((p.element_size() for p in arch.model.parameters() if p.is_floating_point()), 4)
    out = []
    for i in range(arch.num_layers):
        layer = arch.layers[i]
        out.append({
            "params": float(count_params(layer)),
            "flops": float(linear_flops_per_token(layer) + layer_attention_core_flops(arch, i, seq_len)),
            "kv": float(layer_kv_bytes_per_token(arch, i, seq_len, itemsize)),
        })
    return out


def check_model(model: nn.Module) -> ArchAdapter:
    """The adapter of ``model``, or :class:`Unsupported` for what depth pruning cannot cut."""
    cfg = model.config
    if getattr(cfg, "model_type", None) == "compress":
        raise Unsupported("depth pruning removes layers of a stock-format model; this one uses the compress "
                          "format (per-layer widths); run depth on the dense model, before the width method")
    if getattr(cfg, "is_heterogeneous", False):
        raise Unsupported("this config has per-layer overrides (per_layer_config), which depth pruning does not "
                          "renumber; run it on a model with a uniform config")
    if getattr(cfg, "kv_sharing_modes", None) is not None:
        raise Unsupported("this model shares KV caches between layers (kv_sharing_modes); removing a layer would "
                          "break its readers; depth pruning does not support it")
    arch = adapter_for(model)
    if arch.num_layers < 1:
        raise Unsupported("the model has no decoder layers to remove")
    return arch


def solve_depth(arch: ArchAdapter, target: Target, n_prune_layers: int | None = None,
                seq_len: int = FLOPS_SEQ_LEN) -> _Sizing:
    """How many layers to remove: the fewest whose model is at or below ``target`` (or exactly
    ``n_prune_layers``, which must then meet it). Raises :class:`TargetError` when that would
    leave no decoder layer, and :class:`Unsupported` when the layers differ in size."""
    metric = target.metric
    costs = [c[metric] for c in layer_costs(arch, seq_len)]
    if any(c != costs[0] for c in costs):
        if metric != "params" and len({arch.sliding_window(i) for i in range(arch.num_layers)}) > 1:
            raise Unsupported(f"the sliding-window and global layers differ in {metric} ({min(costs):.6g} to "
                              f"{max(costs):.6g}) at {seq_len} tokens; depth pruning sizes equal layers: use a "
                              "params target")
        raise Unsupported(f"the decoder layers differ in {metric} ({min(costs):.6g} to {max(costs):.6g}); depth "
                          "pruning sizes equal layers; run it on the dense model, before any width pruning")
    n_layers = len(costs)
    dense = float(footprint(arch.model, seq_len=seq_len, arch=arch).of(metric))
    target.check_reachable(dense)
    goal = float(target.goal(dense))
    per = costs[0]
    tol = goal * 1e-12

    def value(n: int) -> float:
        return dense - n * per

    if n_prune_layers is not None:
        n = int(n_prune_layers)
        if n >= n_layers:
            raise TargetError(f"n_prune_layers={n} would remove every one of the {n_layers} decoder layers; "
                              f"choose at most {n_layers - 1}")
        if value(n) > goal + tol:
            raise TargetError(f"n_prune_layers={n} leaves {value(n):.6g} {metric}, above the target {target} "
                              f"({goal:.6g}); remove more layers, or use --target 100% to run n_prune_layers as given")
    else:
        n = next((k for k in range(n_layers + 1) if value(k) <= goal + tol), n_layers)
        if n >= n_layers:
            keep_one = value(n_layers - 1)
            raise TargetUnreachable(f"target {target} ({goal:.6g} {metric}) is below the model with a single decoder layer "
                              f"({keep_one:.6g}: {keep_one / dense:.2%} of dense); depth pruning would remove every "
                              "layer; choose a larger target")
    return _Sizing(metric=metric, num_layers=n_layers, remove=n, dense=dense, goal=goal, per_layer=per,
                   predicted=value(n))


# ====================================================================== surgery
def _configs(model: nn.Module, arch: ArchAdapter) -> list[Any]:
    out: list[Any] = []
    for cfg in (getattr(model, "config", None), getattr(arch.backbone, "config", None)):
        if cfg is not None and all(cfg is not c for c in out):
            out.append(cfg)
    return out


def remove_layers(model: nn.Module, arch: ArchAdapter, keep: list[int]) -> None:
    """Keep only the decoder layers ``keep`` (dense indices, in order): delete the others from the
    module list, renumber every ``layer_idx`` (the KV-cache slot) and cut the config to match."""
    layers = arch.layers
    n = len(layers)
    keep = sorted(set(int(i) for i in keep))
    if not keep:
        raise UsageError("depth pruning must keep at least one decoder layer")
    if keep[0] < 0 or keep[-1] >= n:
        raise UsageError(f"kept layers {keep} are outside 0..{n - 1}")
    for i in sorted(set(range(n)) - set(keep), reverse=True):
        del layers[i]  # ModuleList renumbers its keys: model.layers.0..k-1
    for j, layer in enumerate(layers):
        for m in layer.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = j
    for cfg in _configs(model, arch):
        for name in PER_LAYER_LISTS:
            values = getattr(cfg, name, None)
            if isinstance(values, (list, tuple)) and len(values) == n:
                setattr(cfg, name, [values[i] for i in keep])
        cfg.num_hidden_layers = len(keep)


# ====================================================================== the pruner
class DepthPruner(Pruner):
    name = "depth"
    Config = DepthConfig
    capabilities = Capabilities(
        structures=("layers",),
        needs_calibration=True,
        needs_gradients=False,
        targets=("params", "flops", "kv"),
        export="auto",
        sequential=False,
        summary="remove whole decoder layers with the lowest Block Influence 1 − E[cos(x_in, x_out)] "
        "(ShortGPT); widths kept, stock export with fewer layers",
        reference="Men et al., 2024, arXiv 2403.03853 (ShortGPT); github.com/icip-cas/ShortGPT",
        streams_weights=True,  # scoring hands each layer back; the kept ones are read again at the end
    )
    config: DepthConfig

    def check(self, model: nn.Module, target: Target) -> None:
        super().check(model, target)
        arch = check_model(model)
        solve_depth(arch, target, self.config.n_prune_layers)  # refuses what whole layers cannot meet

    def plan_shapes(self, model: nn.Module, target: Target) -> dict:
        """Remove the LAST layers of the (meta) model: the same count as the real run, whose choice
        of layers needs the calibration text."""
        arch = check_model(model)
        sizing = solve_depth(arch, target, self.config.n_prune_layers)
        remove_layers(model, arch, list(range(sizing.kept)))
        return {**sizing.summary(), "note": "shapes only: the last layers stand in for the lowest-BI ones"}

    def working_memory(self, model: nn.Module, target: Target, mem) -> dict[str, int]:
        """The layer engine's calibration plus the second activation set (the outputs handed to the
        engine while the inputs are still cached) and the fp32 copies for the cosine of one mini-batch."""
        cfg = self.config
        terms = mem.calibration(cfg.calib_samples, cfg.calib_seq_len, cfg.calib_batch_size, layerwise=True)
        if not mem.layerwise:
            terms.pop("layer_on_device", None)  # everything stays where the model is
        T, B = mem.seq_len(cfg.calib_seq_len), min(cfg.calib_batch_size, cfg.calib_samples)
        terms["layer_outputs"] = max(0, cfg.calib_samples - B) * T * mem.H * mem.b
        terms["cosine"] = 2 * B * T * mem.H * 4
        return terms

    @torch.no_grad()
    def scores(self, model: nn.Module, ctx: PruneContext) -> list[float]:
        """BI of every decoder layer (dense numbering) on ``calib_samples`` × ``calib_seq_len`` blocks."""
        cfg = self.config
        batches = ctx.draw(cfg.calib_samples, cfg.calib_seq_len)
        use_cache = getattr(model.config, "use_cache", None)
        model.config.use_cache = False
        bi: list[float] = []
        runner = ctx.layers(model, batches, batch_size=cfg.calib_batch_size, description="depth: block influence")
        try:
            for step in runner:
                acc = {"sum": 0.0, "tokens": 0}

                def outputs(step=step, acc=acc):
                    with torch.no_grad():
                        for x, kw in step.batches():
                            y = step.call(x, kw)
                            s, n = block_influence_sums(x, y)
                            acc["sum"] += s
                            acc["tokens"] += n
                            yield y

                step.set_outputs(outputs())  # the scored outputs are the next layer's inputs
                step.release()  # streamed weights: back to the files (the kept layers are read again)
                score = 1.0 - acc["sum"] / max(1, acc["tokens"])
                if not math.isfinite(score):
                    raise NumericalError(f"layer {step.index}: non-finite hidden states while scoring Block "
                                         "Influence; check the weights and the dtype")
                bi.append(score)
        finally:
            runner.close()
            if use_cache is not None:
                model.config.use_cache = use_cache
        return bi

    def prune(self, model: nn.Module, target: Target, ctx: PruneContext) -> PruneResult:
        cfg = self.config
        arch = ctx.arch
        check_model(model)
        sizing = solve_depth(arch, target, cfg.n_prune_layers)
        bi = self.scores(model, ctx)
        order = removal_order(bi)
        removed = order[:sizing.remove]
        kept = sorted(set(range(sizing.num_layers)) - set(removed))
        ctx.log(f"depth: removing {len(removed)} of {sizing.num_layers} layers {sorted(removed)} (lowest BI), "
                f"keeping {len(kept)}")
        remove_layers(model, arch, kept)
        plan = {
            "method": "depth",
            "score": "block_influence",
            "num_layers": sizing.num_layers,
            "kept_layers": kept,
            "removed_layers": removed,  # in removal order (ascending BI)
            "block_influence": bi,  # every layer, dense numbering
            "removal_order": order,
            "n_prune_layers": cfg.n_prune_layers,
            "sizing": sizing.summary(),
        }
        notes = {"sizing": sizing.summary(),
                 "calibration": {"samples": cfg.calib_samples, "seq_len": cfg.calib_seq_len}}
        return PruneResult(model=model, plan=plan, export="auto", notes=notes)


@hookimpl
def register_pruners(register):
    register(DepthPruner)
