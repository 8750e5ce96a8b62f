"""Prunable structures, pruning plans, and the surgery that applies a plan.

This is the only module that imports ``torch_pruning``. Its dependency graph is used to *discover*
which parameters are coupled (``torch_pruning_coupling``); the structures a method scores and removes
are described by :class:`StructureGroup` and cut by :func:`apply_plan` with plain tensor slicing.
Why not let torch-pruning cut attention? With transformers 5.x, any group rooted at q/k/v/o hangs in
RoPE's ``rotate_half`` unless RoPE is patched out, and GQA head pruning is a silent no-op because
``repeat_kv`` loses the q↔kv mapping (stack.md §3). Manual slicing is exact, GQA-correct and was
checked against masking the same structures in the dense model (tests/test_graph.py).

Structures (all per decoder layer unless noted):

* ``kv_group`` — one KV head with every query head that reads it (q rows, k rows, v rows, o columns);
* ``head``     — one query head (q rows, o columns); a plan keeps the same number per KV group;
* ``mlp``      — one MLP channel (gate rows, up rows, down columns);
* ``hidden``   — one residual-stream channel, model-wide (embedding, norms, every block in/out).

A :class:`Plan` lists what each layer KEEPS, in the layer's current numbering. Plans compose
(:meth:`Plan.compose`) so an iterative method can record its final plan in dense numbering.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from compress.arch import ArchAdapter, LayerGeometry
from compress.errors import UsageError
from compress.modeling import LowRankLinear

Kind = Literal["kv_group", "head", "mlp", "hidden"]


# ====================================================================== plans
@dataclass
class LayerPlan:
    """What one decoder layer keeps. ``None`` means "unchanged"."""

    heads: list[int] | None = None
    kv_heads: list[int] | None = None
    mlp: list[int] | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in (("heads", self.heads), ("kv_heads", self.kv_heads), ("mlp", self.mlp))
                if v is not None}


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
        layers = {int(i): LayerPlan(**{k: [int(x) for x in v] for k, v in lp.items()})
                  for i, lp in d.get("layers", {}).items()}
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
            out.layers[i] = LayerPlan(heads=heads, kv_heads=kv, mlp=comp(a.mlp, b.mlp))
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


# ====================================================================== surgery
def _index(idx: list[int] | torch.Tensor, device) -> torch.Tensor:
    return torch.as_tensor(idx, dtype=torch.long, device=device)


def slice_linear(old: nn.Module, out_idx: list[int] | torch.Tensor | None = None,
                 in_idx: list[int] | torch.Tensor | None = None) -> nn.Module:
    """A new linear (or :class:`LowRankLinear`) keeping rows ``out_idx`` and columns ``in_idx``."""
    if isinstance(old, LowRankLinear):
        new = LowRankLinear(old.in_features, old.out_features, old.rank, bias=old.B.bias is not None)
        new.A = slice_linear(old.A, None, in_idx)
        new.B = slice_linear(old.B, out_idx, None)
        new.in_features, new.out_features = new.A.in_features, new.B.out_features
        return new
    W = old.weight.data
    dev = W.device
    if out_idx is not None:
        W = W.index_select(0, _index(out_idx, dev))
    if in_idx is not None:
        W = W.index_select(1, _index(in_idx, dev))
    bias = old.bias
    new = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None, device="meta")
    new.weight = nn.Parameter(W.clone(), requires_grad=old.weight.requires_grad)
    if bias is not None:
        b = bias.data if out_idx is None else bias.data.index_select(0, _index(out_idx, dev))
        new.bias = nn.Parameter(b.clone(), requires_grad=bias.requires_grad)
    return new


def _slice_vector_param(module: nn.Module, idx: list[int]) -> None:
    w = module.weight
    module.weight = nn.Parameter(w.data.index_select(0, _index(idx, w.device)).clone(), requires_grad=w.requires_grad)
    if hasattr(module, "normalized_shape"):
        module.normalized_shape = (len(idx),)


def _head_rows(heads: list[int], hd: int, device) -> torch.Tensor:
    return (torch.as_tensor(heads, device=device).unsqueeze(1) * hd + torch.arange(hd, device=device)).reshape(-1)


def apply_plan(model: nn.Module, plan: Plan, arch: ArchAdapter | None = None) -> nn.Module:
    """Cut the model in place to what ``plan`` keeps; update attention attributes and the config."""
    arch = arch or ArchAdapter(model)
    for i, lp in sorted(plan.layers.items()):
        if not 0 <= i < arch.num_layers:
            raise UsageError(f"plan names layer {i} but the model has {arch.num_layers} layers")
        geom = arch.geometry(i)
        attn, mlp = arch.attention(i), arch.mlp(i)
        if lp.heads is not None or lp.kv_heads is not None:
            heads, kv = resolve_attention(geom, lp.heads, lp.kv_heads, f" for layer {i}")
            dev = attn.q_proj.weight.device if hasattr(attn.q_proj, "weight") else None
            q_rows = _head_rows(heads, geom.head_dim, dev)
            kv_rows = _head_rows(kv, geom.head_dim, dev)
            q, k, v, o = arch.attn_names
            setattr(attn, q, slice_linear(getattr(attn, q), out_idx=q_rows))
            setattr(attn, k, slice_linear(getattr(attn, k), out_idx=kv_rows))
            setattr(attn, v, slice_linear(getattr(attn, v), out_idx=kv_rows))
            setattr(attn, o, slice_linear(getattr(attn, o), in_idx=q_rows))
            attn.num_key_value_groups = len(heads) // len(kv)
        if lp.mlp is not None:
            if not lp.mlp:
                raise UsageError(f"plan removes every MLP channel of layer {i}; keep at least one")
            if max(lp.mlp) >= geom.intermediate or min(lp.mlp) < 0:
                raise UsageError(f"plan names an MLP channel outside 0..{geom.intermediate - 1} in layer {i}")
            gate, up, down = arch.mlp_names
            idx = sorted(set(lp.mlp))
            setattr(mlp, gate, slice_linear(getattr(mlp, gate), out_idx=idx))
            setattr(mlp, up, slice_linear(getattr(mlp, up), out_idx=idx))
            setattr(mlp, down, slice_linear(getattr(mlp, down), in_idx=idx))
    if plan.hidden is not None:
        _apply_hidden(arch, sorted(set(plan.hidden)))
    sync_config(model, arch)
    return model


def _apply_hidden(arch: ArchAdapter, keep: list[int]) -> None:
    tied = arch.tied_embeddings
    emb = arch.embed_tokens
    emb.weight = nn.Parameter(emb.weight.data[:, keep].clone(), requires_grad=emb.weight.requires_grad)
    emb.embedding_dim = len(keep)
    for i in range(arch.num_layers):
        _slice_vector_param(arch.input_norm(i), keep)
        _slice_vector_param(arch.post_attn_norm(i), keep)
        attn, mlp = arch.attention(i), arch.mlp(i)
        q, k, v, o = arch.attn_names
        for n in (q, k, v):
            setattr(attn, n, slice_linear(getattr(attn, n), in_idx=keep))
        setattr(attn, o, slice_linear(getattr(attn, o), out_idx=keep))
        gate, up, down = arch.mlp_names
        for n in (gate, up):
            setattr(mlp, n, slice_linear(getattr(mlp, n), in_idx=keep))
        setattr(mlp, down, slice_linear(getattr(mlp, down), out_idx=keep))
    _slice_vector_param(arch.final_norm, keep)
    if tied:
        arch.lm_head.weight = emb.weight
        arch.lm_head.in_features = len(keep)
    else:
        arch.model.lm_head = slice_linear(arch.lm_head, in_idx=keep)


def sync_config(model: nn.Module, arch: ArchAdapter | None = None) -> None:
    """Make attention attributes and the config agree with the weights.

    Uniform shapes are written to the config (it then describes the model exactly). Non-uniform
    models keep their config; export writes a per-layer ``compress`` config for them.
    """
    arch = arch or ArchAdapter(model)
    geoms = arch.geometries()
    for i, g in enumerate(geoms):
        arch.attention(i).num_key_value_groups = g.group_size
    cfg = model.config
    cfg.hidden_size = geoms[0].hidden if geoms else cfg.hidden_size
    if len(set(geoms)) == 1:
        g = geoms[0]
        cfg.num_attention_heads = g.num_heads
        cfg.num_key_value_heads = g.num_kv_heads
        cfg.intermediate_size = g.intermediate
        cfg.head_dim = g.head_dim


# ====================================================================== structures for scoring
@dataclass
class Member:
    """One parameter of a structure group: units are contiguous blocks of ``width`` along ``dim``."""

    name: str
    param: nn.Parameter
    dim: int
    width: int

    def blocks(self, t: torch.Tensor | None = None) -> torch.Tensor:
        """``t`` (default: the parameter) reshaped to ``[units, width, rest]``."""
        t = self.param if t is None else t
        t = t.movedim(self.dim, 0)
        return t.reshape(t.shape[0] // self.width, self.width, -1)


@dataclass
class StructureGroup:
    """Coupled parameters whose ``units`` (heads, KV groups, channels) are scored and removed together."""

    kind: Kind
    layer: int | None
    units: int
    members: list[Member]

    def reduce(self, fn: Callable[[Member], torch.Tensor], member_reduction: str = "sum") -> torch.Tensor:
        """Per-unit score: ``fn(member)`` gives a score per unit ``[units]``; members combined by sum/mean/max/prod."""
        scores = torch.stack([fn(m).float() for m in self.members])
        if member_reduction == "sum":
            return scores.sum(0)
        if member_reduction == "mean":
            return scores.mean(0)
        if member_reduction == "max":
            return scores.max(0).values
        if member_reduction == "prod":
            return scores.prod(0)
        if member_reduction == "first":
            return scores[0]
        raise UsageError(f"unknown group reduction {member_reduction!r}; use sum, mean, max, prod or first")

    def plan_for(self, keep: list[int]) -> Plan:
        keep = sorted(int(x) for x in keep)
        if self.kind == "hidden":
            return Plan(hidden=keep)
        assert self.layer is not None
        lp = {"kv_group": LayerPlan(kv_heads=keep), "head": LayerPlan(heads=keep), "mlp": LayerPlan(mlp=keep)}[self.kind]
        return Plan(layers={self.layer: lp})


def _params(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Parameter, bool]]:
    """(name, parameter, is_bias) of a linear, or of both factors of a low-rank linear."""
    if isinstance(module, LowRankLinear):
        raise UsageError(f"{prefix} is a low-rank linear; structure groups need dense linears")
    yield f"{prefix}.weight", module.weight, False
    if getattr(module, "bias", None) is not None:
        yield f"{prefix}.bias", module.bias, True


def structure_group(arch: ArchAdapter, kind: Kind, layer: int | None = None) -> StructureGroup:
    """The coupled parameters of one kind of structure in one layer (or model-wide for ``hidden``)."""
    if kind == "hidden":
        return _hidden_group(arch)
    assert layer is not None
    geom = arch.geometry(layer)
    prefix = f"model.layers.{layer}"
    members: list[Member] = []
    if kind in ("kv_group", "head"):
        q, k, v, o = arch.attn_names
        attn = arch.attention(layer)
        qw = geom.head_dim * (geom.group_size if kind == "kv_group" else 1)
        for name, p, _ in _params(getattr(attn, q), f"{prefix}.self_attn.{q}"):
            members.append(Member(name, p, 0, qw))
        if kind == "kv_group":
            for n in (k, v):
                for name, p, _ in _params(getattr(attn, n), f"{prefix}.self_attn.{n}"):
                    members.append(Member(name, p, 0, geom.head_dim))
        for name, p, is_bias in _params(getattr(attn, o), f"{prefix}.self_attn.{o}"):
            if not is_bias:
                members.append(Member(name, p, 1, qw))
        units = geom.num_kv_heads if kind == "kv_group" else geom.num_heads
    elif kind == "mlp":
        gate, up, down = arch.mlp_names
        mlp = arch.mlp(layer)
        for n in (gate, up):
            for name, p, _ in _params(getattr(mlp, n), f"{prefix}.mlp.{n}"):
                members.append(Member(name, p, 0, 1))
        for name, p, is_bias in _params(getattr(mlp, down), f"{prefix}.mlp.{down}"):
            if not is_bias:
                members.append(Member(name, p, 1, 1))
        units = geom.intermediate
    else:
        raise UsageError(f"unknown structure kind {kind!r}; use kv_group, head, mlp or hidden")
    return StructureGroup(kind=kind, layer=layer, units=units, members=members)


def _hidden_group(arch: ArchAdapter) -> StructureGroup:
    members = [Member("model.embed_tokens.weight", arch.embed_tokens.weight, 1, 1)]
    for i in range(arch.num_layers):
        p = f"model.layers.{i}"
        members.append(Member(f"{p}.input_layernorm.weight", arch.input_norm(i).weight, 0, 1))
        members.append(Member(f"{p}.post_attention_layernorm.weight", arch.post_attn_norm(i).weight, 0, 1))
        attn, mlp = arch.attention(i), arch.mlp(i)
        q, k, v, o = arch.attn_names
        for n in (q, k, v):
            members.append(Member(f"{p}.self_attn.{n}.weight", getattr(attn, n).weight, 1, 1))
        members.append(Member(f"{p}.self_attn.{o}.weight", getattr(attn, o).weight, 0, 1))
        gate, up, down = arch.mlp_names
        for n in (gate, up):
            members.append(Member(f"{p}.mlp.{n}.weight", getattr(mlp, n).weight, 1, 1))
        members.append(Member(f"{p}.mlp.{down}.weight", getattr(mlp, down).weight, 0, 1))
    members.append(Member("model.norm.weight", arch.final_norm.weight, 0, 1))
    if not arch.tied_embeddings:
        members.append(Member("lm_head.weight", arch.lm_head.weight, 1, 1))
    return StructureGroup(kind="hidden", layer=None, units=arch.embed_tokens.weight.shape[1], members=members)


# ====================================================================== torch-pruning discovery
@contextlib.contextmanager
def _rope_disabled(model: nn.Module) -> Iterator[None]:
    """Replace ``apply_rotary_pos_emb`` by the identity while tracing (torch-pruning#527 hang)."""
    import sys

    mod = sys.modules.get(type(ArchAdapter(model).attention(0)).__module__)
    orig = getattr(mod, "apply_rotary_pos_emb", None)
    if orig is None:
        yield
        return
    mod.apply_rotary_pos_emb = lambda q, k, cos, sin, *a, **kw: (q, k)
    try:
        yield
    finally:
        mod.apply_rotary_pos_emb = orig


def torch_pruning_coupling(model: nn.Module, kind: Literal["mlp", "hidden"], layer: int = 0) -> set[tuple[str, str]]:
    """Which (module name, "out"/"in") torch-pruning's dependency graph couples to a structure.

    Used to cross-check :func:`structure_group` against torch-pruning's tracing. Attention is not
    offered: torch-pruning cannot group GQA heads (see the module docstring).
    """
    import torch_pruning as tp

    arch = ArchAdapter(model)
    was_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    ids = torch.zeros(1, 4, dtype=torch.long, device=arch.embed_tokens.weight.device)
    try:
        with _rope_disabled(model), torch.enable_grad(), _quiet():
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=ids,
                                                        output_transform=lambda o: o.logits)
            if kind == "mlp":
                root, fn = arch.mlp_linears(layer)[arch.mlp_names[0]], tp.prune_linear_out_channels
            else:
                root, fn = arch.embed_tokens, tp.prune_embedding_out_channels
            group = dg.get_pruning_group(root, fn, idxs=[0])
    finally:
        model.config.use_cache = was_cache
    names = {m: n for n, m in model.named_modules()}
    out: set[tuple[str, str]] = set()
    for dep, _ in group:
        target = dep.target.module
        if target not in names or not isinstance(target, nn.Linear | nn.Embedding) and not hasattr(target, "weight"):
            continue
        handler = getattr(dep.handler, "__name__", None) or type(dep.handler).__name__
        h = str(handler).lower()
        direction = "in" if "in_channel" in h else "out"
        out.add((names[target], direction))
    return out


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
