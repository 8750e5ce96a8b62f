"""Adapters for families beyond the Llama layout, registered through the ``register_architectures``
hook exactly as a third-party plugin registers one (entry point ``families`` of the ``compress``
distribution, ``pyproject.toml``).

* ``phi3`` (Phi-3, Phi-3.5, Phi-4-mini): ``qkv_proj`` holds [q; k; v] rows, ``gate_up_proj`` holds
  [gate; up] rows (the MLP ``chunk``\\ s it in two halves). Heads, KV groups and MLP channels are sliced
  inside the fused linears (:meth:`Phi3Adapter.proj_rows`). Phi-3's attention splits ``qkv`` with the
  *config's* ``num_attention_heads``, so every layer must keep the same widths: the family has no
  ``per_layer_shapes`` (and the compress export format does not cover it), and no
  ``separate_projections`` (a method that factorises or rotates q alone cannot run on it).
* ``gemma2`` (Gemma-2) and ``gemma3_text`` (Gemma-3, text only: ``Gemma3ForCausalLM``): separate
  projections, but every block norms its input *and* its output (``input_layernorm`` →
  attention → ``post_attention_layernorm`` → residual; ``pre_feedforward_layernorm`` → MLP →
  ``post_feedforward_layernorm`` → residual), each RMSNorm scaling by ``1 + w``: nothing folds into the
  linears (no ``foldable_norms``). The embedding is multiplied by ``sqrt(hidden_size)`` computed from
  the config at load time and tied to the lm_head, so the hidden size cannot be cut
  (:meth:`GemmaAdapter.hidden_refusal`); the logits are soft-capped (``final_logit_softcapping``,
  :meth:`GemmaAdapter.logits`). The attention reshapes with ``-1`` heads of the config's ``head_dim``
  (which need not be hidden / heads), so the layers *could* differ, but the compress export format
  does not cover these families: no ``per_layer_shapes``. Their configs refuse a hidden size the head
  count does not divide, so sizing keeps to head counts that divide it
  (:meth:`GemmaAdapter.heads_refusal`). Gemma-3's q/k norms are per head (``head_dim`` wide, shared by
  all heads): nothing to cut. Sliding-window layers come from ``layer_types`` (Gemma-2: every other
  layer; Gemma-3: ``sliding_window_pattern``), read by :meth:`ArchAdapter.sliding_window`.
* ``olmo2`` (OLMo-2): separate projections, no input norms: each block norms its attention and MLP
  outputs before the residual add (no ``foldable_norms``), and ``q_norm`` / ``k_norm`` are RMSNorms over
  the WHOLE q / k projection (``num_heads · head_dim`` / ``num_kv_heads · head_dim`` channels), so a
  removed head takes its rows of them too (:meth:`Olmo2Adapter.proj_norms`). The config has no
  ``head_dim`` (hidden / heads is assumed), so a pruned model's config names it; the compress export
  format does not cover OLMo-2: no ``per_layer_shapes``.
* ``qwen3_moe`` (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention (separate q/k/v/o, per-head q/k
  norms) and, in place of the MLP, a sparse Mixture-of-Experts block: a router (``gate``, a bare
  ``[E, H]`` weight: softmax over the experts, top-k, renormalised when ``norm_topk_prob``) and E experts
  stored as fused 3-D parameters (``experts.gate_up_proj`` ``[E, 2I, H]``, ``experts.down_proj``
  ``[E, H, I]``, :class:`compress.model.adapter.Experts`); checkpoints hold them per expert
  (``experts.{e}.gate_proj.weight``), which transformers converts on load and back on save. It is the
  cleanest family for a faithful per-expert cut: no shared expert and no router jitter (Mixtral's
  training-time noise), and its q/k norms are per head (OLMoE's span the whole q/k width, so masked
  candidates would only approximate a cut). An MLP channel is one channel of one expert; every
  expert keeps the same number (the config has one ``moe_intermediate_size``), each its own set
  (:attr:`compress.model.plan.LayerPlan.experts`); the router and the number of experts are kept, so
  the routing changes only through its input. Expert widths are multiples of 8 (transformers' default
  ``grouped_mm`` experts kernel refuses rows that are not a multiple of 16 bytes). No ``dense_mlp`` (a method that needs one gated MLP per
  layer cannot run on it), no ``separate_projections`` (gate and up are fused per expert), no
  ``per_layer_shapes``; its RMSNorms are plain (``foldable_norms``). The hidden size is kept (the router
  and every expert would be cut with it). Configs with dense-MLP layers among the sparse ones
  (``mlp_only_layers``, ``decoder_sparse_step`` > 1) are refused: every layer must route.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from compress.errors import Unsupported
from compress.hookspecs import hookimpl
from compress.model.adapter import (
    ArchAdapter,
    Experts,
    LayerGeometry,
    ProjRows,
    Role,
    _in_features,
    _out_features,
)


class Phi3Adapter(ArchAdapter):
    """Phi-3: fused ``qkv_proj`` [q; k; v] and ``gate_up_proj`` [gate; up]."""

    model_types: ClassVar[tuple[str, ...]] = ("phi3",)
    attn_names: ClassVar[tuple[str, str, str, str]] = ("qkv_proj", "qkv_proj", "qkv_proj", "o_proj")
    mlp_names: ClassVar[tuple[str, str, str]] = ("gate_up_proj", "gate_up_proj", "down_proj")
    features: ClassVar[frozenset[str]] = frozenset({"foldable_norms", "dense_mlp"})

    def geometry(self, i: int) -> LayerGeometry:
        hd = self.head_dim(i)
        q = _in_features(self.o_proj(i))  # o_proj reads exactly the query heads
        qkv = _out_features(self.attention(i).qkv_proj)
        return LayerGeometry(
            hidden=int(self.embed_tokens.weight.shape[1]),
            num_heads=q // hd,
            num_kv_heads=(qkv - q) // (2 * hd),
            head_dim=hd,
            intermediate=_in_features(self.down_proj(i)),
        )

    def proj_rows(self, i: int, role: Role) -> ProjRows:
        if role in ("o", "down"):
            return super().proj_rows(i, role)
        g = self.geometry(i)
        if role in ("q", "k", "v"):
            q, kv = g.num_heads * g.head_dim, g.num_kv_heads * g.head_dim
            start, count = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[role]
            return ProjRows(self.attention(i), "qkv_proj", start, count)
        start = 0 if role == "gate" else g.intermediate
        return ProjRows(self.mlp(i), "gate_up_proj", start, g.intermediate)

    def sync_attention(self, i: int, geometry: LayerGeometry) -> None:
        attn = self.attention(i)
        attn.num_key_value_groups = geometry.group_size
        attn.num_key_value_heads = geometry.num_kv_heads  # Phi3Attention slices k and v with it

    def _check(self) -> None:
        layers = getattr(getattr(self.model, "model", None), "layers", None)
        if layers is None or not hasattr(self.model, "lm_head"):
            raise Unsupported(f"{type(self.model).__name__} does not have the model.layers / lm_head layout of Phi-3")
        layer = layers[0]
        for owner, names in (("self_attn", ("qkv_proj", "o_proj")), ("mlp", ("gate_up_proj", "down_proj"))):
            for n in names:
                if not hasattr(getattr(layer, owner, None), n):
                    raise Unsupported(f"Phi-3 layer {type(layer).__name__} has no {owner}.{n}")


def _require(model: nn.Module, family: str, names: dict[str, tuple[str, ...]]) -> None:
    """Refuse (one line) a model without the ``model.layers`` / ``lm_head`` layout whose first layer lacks
    one of ``names`` (``{submodule: attributes}``; ``""``: the layer itself)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not hasattr(model, "lm_head"):
        raise Unsupported(f"{type(model).__name__} does not have the model.layers / lm_head layout of {family}")
    layer = layers[0]
    for owner, attrs in names.items():
        mod = getattr(layer, owner, None) if owner else layer
        for n in attrs:
            if not hasattr(mod, n):
                where = f"{owner}.{n}" if owner else n
                raise Unsupported(f"{family} layer {type(layer).__name__} has no {where}; register an ArchAdapter")


_SEPARATE = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


class GemmaAdapter(ArchAdapter):
    """Gemma-2: separate projections; (1 + w) RMSNorms before and after each block; embeddings scaled
    by ``sqrt(hidden_size)``; soft-capped logits."""

    model_types: ClassVar[tuple[str, ...]] = ("gemma2",)
    features: ClassVar[frozenset[str]] = frozenset({"separate_projections", "dense_mlp"})
    family: ClassVar[str] = "Gemma-2"

    def post_attn_norm(self, i: int) -> nn.Module:
        """The norm the MLP reads (``pre_feedforward_layernorm``): the role ``post_attention_layernorm``
        plays in a Llama block. Gemma's ``post_attention_layernorm`` norms the attention's output."""
        return self.layers[i].pre_feedforward_layernorm

    def hidden_norms(self, i: int) -> dict[str, nn.Module]:
        layer = self.layers[i]
        names = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm")
        return {n: getattr(layer, n) for n in names}

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().logits(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def heads_refusal(self, num_heads: int, hidden: int) -> str:
        if num_heads < 1 or hidden % num_heads == 0:
            return ""
        return (f"{self.config.model_type}'s config refuses a hidden size ({hidden}) that the number of heads "
                f"({num_heads}) does not divide")

    def hidden_refusal(self) -> str:
        return (f"{self.config.model_type} scales its embeddings by sqrt(hidden_size) taken from the config and "
                "ties them to the lm_head, so a cut hidden size would not reload as the same model; keep the "
                "hidden size (prune heads and MLP channels)")

    def _check(self) -> None:
        _require(self.model, self.family, {
            "": ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"),
            **_SEPARATE,
        })


class Gemma3TextAdapter(GemmaAdapter):
    """Gemma-3 text (``Gemma3ForCausalLM``): Gemma-2's layout plus per-head q/k norms (``head_dim`` wide,
    shared by every head, so never cut) and sliding / global layers by ``sliding_window_pattern``."""

    model_types: ClassVar[tuple[str, ...]] = ("gemma3_text",)
    family: ClassVar[str] = "Gemma-3"


class Olmo2Adapter(ArchAdapter):
    """OLMo-2: separate projections; norms on the block outputs only; q/k norms over the whole q/k width."""

    model_types: ClassVar[tuple[str, ...]] = ("olmo2",)
    features: ClassVar[frozenset[str]] = frozenset({"separate_projections", "dense_mlp"})

    def input_norm(self, i: int) -> nn.Module:
        raise Unsupported("OLMo-2 blocks have no input norm (they norm the attention and MLP outputs); "
                          "a method that folds input norms cannot run on olmo2")

    def post_attn_norm(self, i: int) -> nn.Module:
        raise Unsupported("OLMo-2's MLP reads the residual stream without a norm (post_attention_layernorm "
                          "norms the attention's output); a method that folds input norms cannot run on olmo2")

    def hidden_norms(self, i: int) -> dict[str, nn.Module]:
        layer = self.layers[i]
        return {"post_attention_layernorm": layer.post_attention_layernorm,
                "post_feedforward_layernorm": layer.post_feedforward_layernorm}

    def proj_norms(self, i: int) -> dict[Role, nn.Module]:
        attn = self.attention(i)
        return {"q": attn.q_norm, "k": attn.k_norm}

    def _check(self) -> None:
        _require(self.model, "OLMo-2", {
            "": ("self_attn", "mlp", "post_attention_layernorm", "post_feedforward_layernorm"),
            "self_attn": (*_SEPARATE["self_attn"], "q_norm", "k_norm"),
            "mlp": _SEPARATE["mlp"],
        })


class Qwen3MoeAdapter(ArchAdapter):
    """Qwen3-MoE: Qwen3's attention; a router and E fused experts in place of every MLP."""

    model_types: ClassVar[tuple[str, ...]] = ("qwen3_moe",)
    features: ClassVar[frozenset[str]] = frozenset({"foldable_norms"})
    intermediate_key: ClassVar[str] = "moe_intermediate_size"
    #: transformers' default experts kernel (``grouped_mm``) needs each expert's rows to be a multiple of 16
    #: bytes ("strides should be multiple of 16 bytes" otherwise): 8 channels in bf16 / fp16, 4 in fp32
    mlp_multiple: ClassVar[int] = 8

    def experts(self, i: int) -> Experts:
        block = self.mlp(i)
        return Experts(module=block.experts, router=block.gate, num_experts=int(block.experts.gate_up_proj.shape[0]),
                       top_k=int(block.gate.top_k))

    def mlp_width(self, i: int) -> int:
        return self.experts(i).intermediate  # per expert

    def _no_linear(self, i: int) -> Unsupported:
        return Unsupported(f"layer {i} of this qwen3_moe model routes tokens to {self.experts(i).num_experts} "
                           "experts held as fused 3-D weights: it has no single gate / up / down linear "
                           "(use the adapter's experts(i))")

    def mlp_linears(self, i: int) -> dict[str, nn.Module]:
        raise self._no_linear(i)

    def down_proj(self, i: int) -> nn.Module:
        raise self._no_linear(i)

    def proj_rows(self, i: int, role: Role) -> ProjRows:
        if role in ("gate", "up", "down"):
            raise self._no_linear(i)
        return super().proj_rows(i, role)

    def hidden_refusal(self) -> str:
        return ("qwen3_moe's hidden size runs through the router and every expert; cutting it is not supported "
                "(prune heads and expert channels)")

    def sync_mlp(self, i: int, geometry: LayerGeometry) -> None:
        self.mlp(i).experts.intermediate_dim = geometry.intermediate

    def _check(self) -> None:
        cfg = self.config
        dense = list(getattr(cfg, "mlp_only_layers", None) or [])
        step = getattr(cfg, "decoder_sparse_step", 1)
        if not getattr(cfg, "num_experts", 0) or dense or step != 1:
            why = (f"mlp_only_layers={dense}" if dense else f"decoder_sparse_step={step}" if step != 1
                   else "num_experts=0")
            raise Unsupported(f"this qwen3_moe config has dense-MLP layers ({why}); compress prunes qwen3_moe models "
                              "whose every layer routes to experts (as Qwen3-30B-A3B and Qwen3-235B-A22B)")
        _require(self.model, "Qwen3-MoE", {
            "": ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"),
            "self_attn": _SEPARATE["self_attn"],
            "mlp": ("experts", "gate"),
        })
        for i, layer in enumerate(self.layers):
            ex, gate = getattr(layer.mlp, "experts", None), getattr(layer.mlp, "gate", None)
            up, down = getattr(ex, "gate_up_proj", None), getattr(ex, "down_proj", None)
            if not (isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor) and up.dim() == down.dim() == 3
                    and hasattr(gate, "top_k")):
                raise Unsupported(f"qwen3_moe layer {i} does not hold its experts as fused 3-D gate_up_proj / "
                                  "down_proj weights with a top-k router (transformers >= 5 layout)")


@hookimpl
def register_architectures(register) -> None:
    register(Phi3Adapter)
    register(GemmaAdapter)
    register(Gemma3TextAdapter)
    register(Olmo2Adapter)
    register(Qwen3MoeAdapter)
