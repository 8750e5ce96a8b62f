"""Pruning plans: what each decoder layer KEEPS.

A :class:`Plan` lists the kept query heads, KV heads, MLP channels (and model-wide hidden channels)
of each layer, in the layer's current numbering; on a Mixture-of-Experts layer, the kept channels of
each expert (``experts``: one list per expert, all of one length). Plans compose (:meth:`Plan.compose`), so an
iterative method records its final plan in the dense model's numbering. :func:`resolve_attention`
turns a layer's kept heads into the (q heads, KV heads) pair the surgery cuts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal

from compress.errors import UsageError
from compress.model.adapter import LayerGeometry

Kind = Literal["kv_group", "head", "mlp", "hidden"]


# ====================================================================== plans
@dataclass
class LayerPlan:
    """What one decoder layer keeps. ``None`` means "unchanged"."""

    heads: list[int] | None = None
    kv_heads: list[int] | None = None
    mlp: list[int] | None = None
    #: a Mixture-of-Experts layer: ``experts[e]`` lists the kept channels of expert ``e`` (every expert
    #: keeps the same number; the router and the experts themselves are kept)
    experts: list[list[int]] | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in (("heads", self.heads), ("kv_heads", self.kv_heads), ("mlp", self.mlp),
                                  ("experts", self.experts)) if v is not None}


@dataclass
class Plan:
    """Per-layer kept indices (and optionally kept hidden channels). Serialised to compress_plan.json."""

    layers: dict[int, LayerPlan] = field(default_factory=dict)
    hidden: list[int] | None = None

    def to_dict(self) -> dict:
        d: dict = {"layers": {str(i): lp.to_dict() for i, lp in sorted(self.layers.items())}}
        if self.hidden is not None:
            d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        def ints(k: str, v: list) -> list:
            return [[int(x) for x in e] for e in v] if k == "experts" else [int(x) for x in v]

        layers = {int(i): LayerPlan(**{k: ints(k, v) for k, v in lp.items()}) for i, lp in d.get("layers", {}).items()}
        hidden = d.get("hidden")
        return cls(layers=layers, hidden=[int(x) for x in hidden] if hidden is not None else None)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def compose(self, later: Plan) -> Plan:
        """The plan equal to applying ``self`` then ``later`` (whose indices refer to ``self``'s result).

        :func:`apply_plan` keeps indices in ascending order, so ``later``'s index ``j`` names the ``j``-th
        smallest index kept by ``self``. A layer whose attention lists only ``heads`` or only ``kv_heads``
        leaves the other implicit; composing it with a plan that names the other kind needs the group
        size, so ``self`` must then list both (the result of :func:`resolve_attention`).
        """

        def comp(first: list[int] | None, second: list[int] | None) -> list[int] | None:
            if second is None:
                return None if first is None else sorted(set(first))
            if first is None:
                return sorted(set(second))
            kept = sorted(set(first))
            return [kept[j] for j in sorted(set(second))]

        def attn(i: int, a: LayerPlan, b: LayerPlan) -> tuple[list[int] | None, list[int] | None]:
            if b.heads is None and b.kv_heads is None:
                return comp(a.heads, None), comp(a.kv_heads, None)
            if a.heads is None and a.kv_heads is None:
                return comp(None, b.heads), comp(None, b.kv_heads)
            if a.heads is not None and a.kv_heads is not None:  # fully resolved: group size is known
                ah, ak = sorted(set(a.heads)), sorted(set(a.kv_heads))
                g = len(ah) // len(ak)
                bk = sorted(set(b.kv_heads)) if b.kv_heads is not None else sorted({h // g for h in b.heads or []})
                bh = (sorted(set(b.heads)) if b.heads is not None
                      else [h for k in bk for h in range(k * g, (k + 1) * g)])
                return [ah[j] for j in bh], [ak[j] for j in bk]
            if (a.heads is None) == (b.heads is None) and (a.kv_heads is None) == (b.kv_heads is None):
                return comp(a.heads, b.heads), comp(a.kv_heads, b.kv_heads)
            raise UsageError(
                f"cannot compose the attention plans of layer {i}: the first lists only "
                f"{'kv_heads' if a.heads is None else 'heads'} and the second "
                f"{'kv_heads' if b.heads is None else 'heads'}; list both heads and kv_heads in the first"
            )

        out = Plan(hidden=comp(self.hidden, later.hidden))
        for i in sorted(set(self.layers) | set(later.layers)):
            a, b = self.layers.get(i, LayerPlan()), later.layers.get(i, LayerPlan())
            heads, kv = attn(i, a, b)
            experts = None
            if a.experts is not None or b.experts is not None:
                firsts = a.experts or [None] * len(b.experts or [])
                seconds = b.experts or [None] * len(firsts)
                if len(firsts) != len(seconds):
                    raise UsageError(f"cannot compose the expert plans of layer {i}: {len(firsts)} and "
                                     f"{len(seconds)} experts")
                experts = [comp(x, y) for x, y in zip(firsts, seconds, strict=True)]
            out.layers[i] = LayerPlan(heads=heads, kv_heads=kv, mlp=comp(a.mlp, b.mlp), experts=experts)
        return out


def resolve_attention(geom: LayerGeometry, heads: list[int] | None, kv_heads: list[int] | None,
                      where: str = "") -> tuple[list[int], list[int]]:
    """Complete and check a layer's attention plan so that GQA stays valid.

    Kept query heads must read kept KV heads, and every kept KV head must keep the same number of
    query heads (transformers' attention repeats each KV head ``num_key_value_groups`` times).
    """
    g = geom.group_size
    if heads is None and kv_heads is None:
        return list(range(geom.num_heads)), list(range(geom.num_kv_heads))
    if heads is None:
        kv = sorted(set(int(x) for x in kv_heads))  # type: ignore[union-attr]
        heads = [h for k in kv for h in range(k * g, (k + 1) * g)]
        kv_heads = kv
    heads = sorted(set(int(x) for x in heads))
    if kv_heads is None:
        kv_heads = sorted({h // g for h in heads})
    kv_heads = sorted(set(int(x) for x in kv_heads))
    if not heads or not kv_heads:
        raise UsageError(f"plan{where} removes every attention head; keep at least one KV group")
    if heads[-1] >= geom.num_heads or heads[0] < 0 or kv_heads[-1] >= geom.num_kv_heads or kv_heads[0] < 0:
        raise UsageError(f"plan{where} names a head outside 0..{geom.num_heads - 1} / KV head outside "
                         f"0..{geom.num_kv_heads - 1}")
    per_group: dict[int, int] = {k: 0 for k in kv_heads}
    for h in heads:
        if h // g not in per_group:
            raise UsageError(f"plan{where} keeps query head {h} but drops its KV head {h // g}")
        per_group[h // g] += 1
    if len(set(per_group.values())) != 1 or 0 in per_group.values():
        raise UsageError(
            f"plan{where} keeps an unequal number of query heads per KV group {per_group}; GQA needs the "
            "same count in every kept group (use whole KV groups or the same number of heads per group)"
        )
    return heads, kv_heads
