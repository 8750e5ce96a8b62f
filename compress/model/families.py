"""Adapters for families beyond the Llama layout, registered through the ``register_architectures``
hook exactly as a third-party plugin registers one (entry point ``families`` of the ``compress``
distribution, ``pyproject.toml``).

* ``phi3`` (Phi-3, Phi-3.5, Phi-4-mini): ``qkv_proj`` holds [q; k; v] rows, ``gate_up_proj`` holds
  [gate; up] rows (the MLP ``chunk``\\ s it in two halves). Heads, KV groups and MLP channels are sliced
  inside the fused linears (:meth:`Phi3Adapter.proj_rows`). Phi-3's attention splits ``qkv`` with the
  *config's* ``num_attention_heads``, so every layer must keep the same widths: the family has no
  ``per_layer_shapes`` (and the compress export format does not cover it), and no
  ``separate_projections`` (a method that factorises or rotates q alone cannot run on it).
"""

from __future__ import annotations

from typing import ClassVar

from compress.errors import Unsupported
from compress.hookspecs import hookimpl
from compress.model.adapter import ArchAdapter, LayerGeometry, ProjRows, Role, _in_features, _out_features


class Phi3Adapter(ArchAdapter):
    """Phi-3: fused ``qkv_proj`` [q; k; v] and ``gate_up_proj`` [gate; up]."""

    model_types: ClassVar[tuple[str, ...]] = ("phi3",)
    attn_names: ClassVar[tuple[str, str, str, str]] = ("qkv_proj", "qkv_proj", "qkv_proj", "o_proj")
    mlp_names: ClassVar[tuple[str, str, str]] = ("gate_up_proj", "gate_up_proj", "down_proj")
    features: ClassVar[frozenset[str]] = frozenset({"foldable_norms"})

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


@hookimpl
def register_architectures(register) -> None:
    register(Phi3Adapter)
