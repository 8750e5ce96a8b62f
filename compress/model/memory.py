"""Estimated peak memory of a pruning run, from shapes alone (``compress run --dry-run``).

The estimate is the dense model's weights at the run's dtype plus the method's **working memory**,
the largest set of tensors its pruning keeps alive at once. Each method states its own working
memory (:meth:`compress.Pruner.working_memory`, terms in bytes); the core gives the terms every
calibration-based method shares through :class:`MemoryModel`. It is the total of host and device
memory (layer-wise, the weights stay in CPU RAM and one layer visits the device), an estimate of the
run's peak, not a measurement: the real peak also depends on the allocator, the attention kernel and
the framework's own buffers (``compress run`` records the measured peak RSS).

Notation: ``b`` bytes per element of the model dtype; ``N`` calibration sequences of ``T`` tokens in
mini-batches of ``B``; hidden size ``H``, ``n_q`` query and ``n_kv`` KV heads of ``d`` channels, MLP
width ``I`` (the widest layer), vocabulary ``V``, ``L`` decoder layers; ``W`` the bytes of all weights,
``W_layer`` of the largest decoder layer.

* **Activations inside one layer** (one mini-batch, no gradients)::

      A = B·T·b·(2H + max((2n_q + 3n_kv)·d + n_q·d,  3I)) + B·n_q·T²·b

  residual + normed input, then the larger of the attention half (q, k, v, rotated q and k, the
  attention output) and the MLP half (gate, up, their product); ``B·n_q·T²·b`` is the score matrix of
  the eager / math attention path (an upper bound: fused kernels never build it).
* **Whole-model calibration forward**: ``W + N·T·8`` (token ids) ``+ max(A, B·T·(H + V)·b)`` (the
  logits of one mini-batch).
* **Layer-wise calibration** (:mod:`compress.calib.layerwise`, and every sequential method):
  ``W + N·T·8 + (N + B)·T·H·b`` (the cached inputs of the current layer plus one mini-batch of its
  outputs) ``+ W_layer`` (the layer on the compute device) ``+ A``. No logits: the lm_head never runs.
* **Streamed weights** (``--stream-weights``, :mod:`compress.io.streaming`): layer-wise, but the
  decoder layers are read from the files as the engine visits them and cut in their step, so ``W``
  above becomes ``W_pruned + W_layer`` (the pruned model, an upper bound for the layers not cut yet,
  plus the dense layer being read); the other terms are the same.
* **Gradients of the loss** (training activations of one layer ``A_g = A + B·T·b·(H + I)``, logits in
  fp32 for the loss ``B·T·V·(b + 8)``): whole-model, every layer from the first one with gradients
  keeps its ``A_g``; layer-wise, the inputs of those layers are cached ((k + 1)·N·T·H·b for k layers)
  plus one set of upstream gradients and one layer's ``A_g``.

Method terms (in the methods' ``working_memory``): LLM-Pruner adds the gradients of the scored
weights (autograd's copies at b bytes for the whole model or one layer, and the fp32 accumulators,
twice with the Fisher term); SliceGPT its own set of residual signals, the PCA (``3·H²·8``: ``Σ XᵀX``,
its eigenvectors and one product, float64) and the float64 rotation of the widest weight; LoRAP the
SVD of the largest attention matrix (fp32 copies of ``W``, ``U``, ``Vᵀ``).

A run with distillation recovery (``--recover-mode kd``) keeps its teacher — a copy of the dense
model taken before pruning, or the ``--teacher`` checkpoint — alive from the start: the term
``kd_teacher_weights`` (``W``, or the teacher's own weights). The recovery training itself (gradients,
AdamW's two moments) comes after pruning and is not part of this estimate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from compress.model.adapter import ArchAdapter, adapter_for
from compress.model.footprint import _unique, model_bytes

__all__ = ["MemoryEstimate", "MemoryModel", "estimate_peak_memory"]


@dataclass
class MemoryEstimate:
    """Weights + named working-memory terms, in bytes."""

    weights: int
    terms: dict[str, int] = field(default_factory=dict)
    layerwise: bool = False  # calibration one layer at a time (--layerwise, or a sequential method)
    #: --stream-weights: ``weights`` is the pruned model + one dense layer (``dense_weights``: the dense model)
    stream: bool = False
    dense_weights: int | None = None

    def streamed(self, *, pruned_bytes: int, dense_layer_bytes: int) -> MemoryEstimate:
        """The same run with streamed weights: the decoder layers are read one at a time, so the weights
        in memory at the peak are the pruned model (``pruned_bytes``, at most) plus the dense layer being
        read and cut (``dense_layer_bytes``) instead of the dense model."""
        return MemoryEstimate(weights=int(pruned_bytes) + int(dense_layer_bytes), terms=dict(self.terms),
                              layerwise=True, stream=True, dense_weights=self.weights)

    @property
    def peak_bytes(self) -> int:
        return self.weights + sum(self.terms.values())

    @property
    def mode(self) -> str:
        if self.stream:
            return "layer-wise, streamed weights"
        return "weights only" if not self.terms else "layer-wise" if self.layerwise else "whole-model"

    def to_dict(self) -> dict[str, Any]:
        d = {"peak_bytes": self.peak_bytes, "weights_bytes": self.weights, "working_bytes": dict(self.terms),
             "mode": self.mode}
        if self.stream:
            d["dense_weights_bytes"] = self.dense_weights
        return d


class MemoryModel:
    """The dense model's sizes and the shared working-memory terms (see the module docstring).

    Built from the DENSE model (usually on the meta device, at the run's dtype) before planning.
    ``layerwise`` says whether calibration runs one layer at a time.
    """

    def __init__(self, model: nn.Module, *, layerwise: bool = False, arch: ArchAdapter | None = None):
        arch = arch or adapter_for(model)
        self.model, self.arch, self.layerwise = model, arch, layerwise
        geoms = arch.geometries()
        self.L = len(geoms)
        self.H = int(arch.embed_tokens.weight.shape[1])
        self.V = int(arch.embed_tokens.weight.shape[0])
        self.nq = max(g.num_heads for g in geoms)
        self.nkv = max(g.num_kv_heads for g in geoms)
        self.d = max(g.head_dim for g in geoms)
        # a Mixture-of-Experts layer computes top-k experts' channels per token
        self.I = max(g.intermediate * (ex.top_k if (ex := arch.experts(i)) is not None else 1)
                     for i, g in enumerate(geoms))
        self.b = next(p for p in model.parameters() if p.is_floating_point()).element_size()
        self.weights = model_bytes(model)
        self.layer_bytes = max(sum(t.numel() * t.element_size() for t in _unique(layer.parameters()))
                               for layer in arch.layers)
        self.tied = arch.tied_embeddings
        self.max_positions = int(getattr(getattr(model, "config", None), "max_position_embeddings", 0) or 0)

    def seq_len(self, T: int) -> int:
        """Calibration length as the methods use it: capped at the model's context."""
        return min(T, self.max_positions) if self.max_positions else T

    # ---------------------------------------------------------------- building blocks
    def layer_activations(self, B: int, T: int) -> int:
        attn = (2 * self.nq + 3 * self.nkv) * self.d + self.nq * self.d
        return B * T * self.b * (2 * self.H + max(attn, 3 * self.I)) + B * self.nq * T * T * self.b

    def calibration(self, N: int, T: int, B: int, *, layerwise: bool | None = None) -> dict[str, int]:
        """Forward passes without gradients (activation statistics)."""
        T, B = self.seq_len(T), min(B, N)
        lw = self.layerwise if layerwise is None else layerwise
        act = self.layer_activations(B, T)
        terms = {"calibration_tokens": N * T * 8}
        if lw:
            terms["activation_cache"] = (N + B) * T * self.H * self.b
            terms["layer_on_device"] = self.layer_bytes
            terms["layer_activations"] = act
        else:
            terms["activations"] = max(act, B * T * (self.H + self.V) * self.b)
        return terms

    def gradients(self, N: int, T: int, B: int, *, first_layer: int = 0, layerwise: bool | None = None) -> dict[str, int]:
        """Forward + backward of the LM loss w.r.t. weights of layers ``first_layer..L-1``."""
        T, B = self.seq_len(T), min(B, N)
        lw = self.layerwise if layerwise is None else layerwise
        k = self.L - first_layer
        act_g = self.layer_activations(B, T) + B * T * self.b * (self.H + self.I)
        logits = B * T * self.V * (self.b + 8)
        terms = {"calibration_tokens": N * T * 8, "logits_and_loss": logits}
        if lw:
            terms["activation_cache"] = (k + 1) * N * T * self.H * self.b + N * T * self.H * self.b
            terms["layer_on_device"] = self.layer_bytes
            terms["layer_activations"] = act_g
        else:
            terms["backward_activations"] = k * act_g
        return terms


def estimate_peak_memory(pruner: Any, model: nn.Module, target: Any, *, layerwise: bool = False,
                         arch: ArchAdapter | None = None, recovery: Any = None,
                         teacher_bytes: int | None = None) -> MemoryEstimate:
    """Weights of the dense ``model`` + ``pruner.working_memory`` (call before planning shapes), + the
    distillation teacher's weights when ``recovery`` (a ``RecoveryConfig``) is in mode ``kd``
    (``teacher_bytes``: a ``--teacher`` checkpoint's; default the dense model's)."""
    mem = MemoryModel(model, layerwise=layerwise, arch=arch)
    terms = {k: int(v) for k, v in pruner.working_memory(model, target, mem).items() if v}
    if recovery is not None and getattr(recovery, "mode", None) == "kd":
        terms["kd_teacher_weights"] = int(mem.weights if teacher_bytes is None else teacher_bytes)
    sequential = bool(getattr(getattr(pruner, "capabilities", None), "sequential", False))
    return MemoryEstimate(weights=mem.weights, terms=terms, layerwise=layerwise or sequential)
