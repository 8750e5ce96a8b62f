"""Architecture adapters: where the prunable pieces of a model family live.

A method never reaches into ``model.model.layers[i].self_attn.q_proj`` itself; it asks the adapter.
The built-in adapter covers every "Llama-shaped" decoder in transformers (llama, mistral, qwen2,
qwen3 and the ``compress`` export format): pre-norm blocks with separate q/k/v/o projections and a
gated (SwiGLU) MLP. Other families register their own adapter through the
``register_architectures`` hook.

Geometry (heads, KV heads, MLP width) is read from the weights, not the config, so it is correct
for models whose layers were pruned to different widths. A Mixture-of-Experts family says where each
layer's routed experts live (:meth:`ArchAdapter.experts`, :class:`Experts`); its MLP width is the width
of each expert.

Every stage gets its adapter from :func:`adapter_for`, which asks the plugin registry
(:mod:`compress.plugins` installs itself as the resolver when it is imported, and ``import compress``
imports it): an adapter registered through ``register_architectures`` is then the one that sizing,
surgery, measurement, export and every method see. The registry sits above this layer, so it is
reached through :func:`install_resolver` rather than an import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from compress.errors import Unsupported


@dataclass(frozen=True)
class LayerGeometry:
    """Shapes of one decoder layer, read from its weights."""

    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 for MHA)."""
        return self.num_heads // self.num_kv_heads if self.num_kv_heads else 0


#: What a family's layout allows, by name. An adapter lists the ones its family has in
#: :attr:`ArchAdapter.features`; a method lists the ones it needs in ``Capabilities.requires`` and is
#: refused (before any weight is loaded) on a family that lacks one.
FEATURES: dict[str, str] = {
    "separate_projections": "q, k, v and gate, up as separate linears, to replace, factorise or rotate one alone "
                            "(this family fuses some of them, into qkv_proj and / or gate_up_proj)",
    "per_layer_shapes": "layers of different widths, low-rank factors or shortcuts (this family's layers must "
                        "keep equal widths, and the compress export format does not cover it)",
    "foldable_norms": "plain RMSNorms that fold into the linears reading them (this family scales by (1 + w) "
                      "or normalises block outputs)",
    "dense_mlp": "one gated MLP of gate / up / down linears per layer, to score, factorise or rotate (this family "
                 "routes each token to a few of many experts held as fused 3-D weights)",
}

#: A projection's role: q/k/v/o in attention, gate/up/down in the MLP.
Role = Literal["q", "k", "v", "o", "gate", "up", "down"]


@dataclass(frozen=True)
class ProjRows:
    """Where one projection lives: output rows ``[start, start + count)`` of the linear ``owner.attr``
    (a fused linear holds several projections one after another: Phi-3's ``qkv_proj`` is [q; k; v])."""

    owner: nn.Module
    attr: str
    start: int
    count: int

    @property
    def linear(self) -> nn.Module:
        return getattr(self.owner, self.attr)

    @property
    def fused(self) -> bool:
        return self.start != 0 or self.count != _out_features(self.linear)


@dataclass(frozen=True)
class Experts:
    """Where one layer's routed experts live (a Mixture-of-Experts MLP in transformers 5's fused layout).

    ``module`` holds every expert's weights as two 3-D parameters: ``gate_up`` ``[E, 2I, H]`` (the gate
    rows of each expert, then its up rows) and ``down`` ``[E, H, I]``; its forward takes
    ``(hidden_states [N, H], top_k_index [N, k], top_k_weights [N, k])`` and returns ``[N, H]`` (every
    ``@use_experts_implementation`` class of transformers 5 does, whatever kernel runs it). ``router``
    scores the experts; its output tuple holds the chosen experts' indices ``[N, k]`` at
    ``router_indices``. Expert ``e`` computes ``down[e] @ (act(gate[e] @ x) * up[e] @ x)`` for the tokens
    routed to it: :meth:`down_input` is the input of its down projection."""

    module: nn.Module
    router: nn.Module
    num_experts: int
    top_k: int
    gate_up: str = "gate_up_proj"
    down: str = "down_proj"
    router_indices: int = 2

    @property
    def gate_up_weight(self) -> torch.Tensor:
        return getattr(self.module, self.gate_up)

    @property
    def down_weight(self) -> torch.Tensor:
        return getattr(self.module, self.down)

    @property
    def intermediate(self) -> int:
        """Channels of each expert (the experts are cut to equal widths)."""
        return int(self.down_weight.shape[-1])

    @property
    def hidden(self) -> int:
        return int(self.down_weight.shape[1])

    def down_input(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """``act(gate_e(x)) * up_e(x)`` of expert ``expert`` for the rows ``x`` ``[n, H]``: what its down
        projection reads (computed as the eager experts forward does)."""
        gate, up = torch.nn.functional.linear(x, self.gate_up_weight[expert]).chunk(2, dim=-1)
        return self.module.act_fn(gate) * up


class ArchAdapter:
    """Adapter for Llama-shaped causal LMs. Subclass and override the accessors for other layouts.

    A family with fused projections (one linear holding q, k and v, or gate and up) names the fused
    linear under each of its roles in :attr:`attn_names` / :attr:`mlp_names` and overrides
    :meth:`proj_rows` to say which rows each role owns (see :class:`compress.model.families.Phi3Adapter`);
    structures, surgery and footprints then slice and count through :meth:`proj_rows`."""

    model_types: ClassVar[tuple[str, ...]] = ("llama", "mistral", "qwen2", "qwen3", "compress")
    attn_names: ClassVar[tuple[str, str, str, str]] = ("q_proj", "k_proj", "v_proj", "o_proj")
    mlp_names: ClassVar[tuple[str, str, str]] = ("gate_proj", "up_proj", "down_proj")
    features: ClassVar[frozenset[str]] = frozenset(FEATURES)
    #: the config key :func:`compress.model.surgery.sync_config` writes the MLP width to (a Mixture-of-Experts
    #: family: the width of each expert, e.g. ``moe_intermediate_size``)
    intermediate_key: ClassVar[str] = "intermediate_size"
    #: MLP widths the family's kernels run: a pruned width is a multiple of this (or the dense width)
    mlp_multiple: ClassVar[int] = 1

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self._check()

    # ----------------------------------------------------------------- structure accessors
    @property
    def backbone(self) -> nn.Module:
        return self.model.model

    @property
    def layers(self) -> nn.ModuleList:
        return self.backbone.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def attention(self, i: int) -> nn.Module:
        return self.layers[i].self_attn

    def mlp(self, i: int) -> nn.Module:
        return self.layers[i].mlp

    def attn_linears(self, i: int) -> dict[str, nn.Module]:
        a = self.attention(i)
        return {n: getattr(a, n) for n in self.attn_names}

    def mlp_linears(self, i: int) -> dict[str, nn.Module]:
        m = self.mlp(i)
        return {n: getattr(m, n) for n in self.mlp_names}

    def experts(self, i: int) -> Experts | None:
        """Layer ``i``'s routed experts, or None when its MLP is one dense gated MLP (every family but a
        Mixture-of-Experts one)."""
        return None

    def o_proj(self, i: int) -> nn.Module:
        return getattr(self.attention(i), self.attn_names[3])

    def down_proj(self, i: int) -> nn.Module:
        return getattr(self.mlp(i), self.mlp_names[2])

    def input_norm(self, i: int) -> nn.Module:
        return self.layers[i].input_layernorm

    def post_attn_norm(self, i: int) -> nn.Module:
        return self.layers[i].post_attention_layernorm

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.backbone.embed_tokens

    @property
    def final_norm(self) -> nn.Module:
        return self.backbone.norm

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    @property
    def tied_embeddings(self) -> bool:
        return self.lm_head.weight is self.embed_tokens.weight

    def hidden_norms(self, i: int) -> dict[str, nn.Module]:
        """Every norm of layer ``i`` whose weight runs along the residual stream (cut with the hidden
        size), by attribute name in the layer: a Llama block's two pre-norms."""
        layer = self.layers[i]
        return {"input_layernorm": layer.input_layernorm, "post_attention_layernorm": layer.post_attention_layernorm}

    def proj_norms(self, i: int) -> dict[Role, nn.Module]:
        """Norms of layer ``i`` whose weight runs along a projection's output rows, by role: they are cut
        with the rows (OLMo-2's ``q_norm`` / ``k_norm`` over the whole q / k width). None here: a
        Llama block has none, and Qwen3's per-head q/k norms (``head_dim`` wide) are shared by every head."""
        return {}

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The logits of the last decoder layer's output ``hidden``, as the model's forward computes them
        (final norm, lm_head, and whatever the family applies after it)."""
        return self.lm_head(self.final_norm(hidden))

    def heads_refusal(self, num_heads: int, hidden: int) -> str:
        """Why the family's stock config refuses ``num_heads`` query heads per layer at residual width
        ``hidden`` (one line), or "" when it accepts them. Sizing keeps to accepted head counts."""
        return ""

    def hidden_refusal(self) -> str:
        """Why the residual (hidden) width of this family cannot be cut (one line), or "" when it can."""
        return ""

    # ----------------------------------------------------------------- geometry
    def head_dim(self, i: int = 0) -> int:
        a = self.attention(i)
        hd = getattr(a, "head_dim", None) or getattr(self.config, "head_dim", None)
        if not hd:
            hd = self.config.hidden_size // self.config.num_attention_heads
        return int(hd)

    def mlp_width(self, i: int) -> int:
        """MLP channels of layer ``i`` (of each expert in a Mixture-of-Experts layer)."""
        return int(_out_features(self.mlp_linears(i)["gate_proj"]))

    def geometry(self, i: int) -> LayerGeometry:
        lin = self.attn_linears(i)
        hd = self.head_dim(i)
        return LayerGeometry(
            hidden=int(self.embed_tokens.weight.shape[1]),
            num_heads=int(_out_features(lin["q_proj"]) // hd),
            num_kv_heads=int(_out_features(lin["k_proj"]) // hd),
            head_dim=hd,
            intermediate=self.mlp_width(i),
        )

    def proj_rows(self, i: int, role: Role) -> ProjRows:
        """The output rows of layer ``i``'s ``role`` projection (q, k, v, gate or up; o and down are
        sliced by input column and always whole linears)."""
        if role in ("q", "k", "v", "o"):
            owner, attr = self.attention(i), self.attn_names["qkvo".index(role)]
        else:
            owner, attr = self.mlp(i), self.mlp_names[("gate", "up", "down").index(role)]
        return ProjRows(owner, attr, 0, _out_features(getattr(owner, attr)))

    def kv_width(self, i: int) -> int:
        """Channels layer ``i`` caches per token: k rows plus v rows."""
        return self.proj_rows(i, "k").count + self.proj_rows(i, "v").count

    def sliding_window(self, i: int) -> int | None:
        """The attention window of layer ``i`` (keys a query reads, itself included), None for full
        attention. Read as transformers 5 reads it: ``layer_types[i] == "sliding_attention"`` with the
        config's ``sliding_window`` (Qwen2/Qwen3 derive ``layer_types`` from ``use_sliding_window`` and
        ``max_window_layers``, Gemma-2 alternates, Gemma-3 follows ``sliding_window_pattern``); without
        ``layer_types`` (Mistral) every layer slides when
        ``sliding_window`` is set. A compress-format model reads its base family's config."""
        base = getattr(self.config, "base_config", None)

        def get(key: str):
            return base.get(key) if isinstance(base, dict) else getattr(self.config, key, None)

        window = get("sliding_window")
        if not window:
            return None
        types = get("layer_types")
        if types is None:
            return int(window)
        return int(window) if i < len(types) and types[i] == "sliding_attention" else None

    def sync_attention(self, i: int, geometry: LayerGeometry) -> None:
        """Write layer ``i``'s head counts into its attention module after surgery."""
        self.attention(i).num_key_value_groups = geometry.group_size

    def sync_mlp(self, i: int, geometry: LayerGeometry) -> None:
        """Write layer ``i``'s MLP width into its modules after surgery (a Llama MLP reads it from the weights)."""

    def geometries(self) -> list[LayerGeometry]:
        return [self.geometry(i) for i in range(self.num_layers)]

    def is_uniform(self) -> bool:
        return len(set(self.geometries())) <= 1

    # ----------------------------------------------------------------- validation
    def _check(self) -> None:
        backbone = getattr(self.model, "model", None)
        layers = getattr(backbone, "layers", None)
        if layers is None or not hasattr(self.model, "lm_head"):
            raise Unsupported(
                f"{type(self.model).__name__} does not have the model.layers / lm_head layout of a "
                "Llama-shaped causal LM; register an ArchAdapter for it"
            )
        layer = layers[0]
        for n in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"):
            if not hasattr(layer, n):
                raise Unsupported(f"decoder layer {type(layer).__name__} has no '{n}'; register an ArchAdapter")
        for n in self.attn_names:
            if not hasattr(layer.self_attn, n):
                raise Unsupported(
                    f"attention {type(layer.self_attn).__name__} has no separate '{n}' "
                    "(fused qkv is not supported by the built-in adapter)"
                )
        for n in self.mlp_names:
            if not hasattr(layer.mlp, n):
                raise Unsupported(f"MLP {type(layer.mlp).__name__} has no '{n}' (gated MLP expected)")


def _out_features(m: nn.Module) -> int:
    if hasattr(m, "out_features"):
        return int(m.out_features)
    return int(m.weight.shape[0])


def _in_features(m: nn.Module) -> int:
    if hasattr(m, "in_features"):
        return int(m.in_features)
    return int(m.weight.shape[1])


_Resolver = Callable[[nn.Module], "ArchAdapter"]
_RESOLVER: _Resolver | None = None


def install_resolver(resolver: _Resolver | None) -> _Resolver | None:
    """Make ``resolver`` (the plugin registry's lookup by ``config.model_type``) the one adapter
    resolution of the process; returns the previous one."""
    global _RESOLVER
    previous, _RESOLVER = _RESOLVER, resolver
    return previous


def adapter_for(model: nn.Module) -> ArchAdapter:
    """The adapter of ``model``'s family, from the registry (built-in or registered by a plugin).

    Before any registry is installed (only when this module is used without ``import compress``),
    the built-in Llama-shaped adapter."""
    if _RESOLVER is not None:
        return _RESOLVER(model)
    return ArchAdapter(model)
