"""Prunable structures: which parameter slices are removed together.

* ``kv_group`` — one KV head with every query head that reads it (q rows, k rows, v rows, o columns);
* ``head``     — one query head (q rows, o columns); a plan keeps the same number per KV group;
* ``mlp``      — one MLP channel (gate rows, up rows, down columns); on a Mixture-of-Experts layer one
  channel of one expert (its rows of the fused ``gate_up`` and its column of ``down``), numbered expert
  by expert (``e · I + j``);
* ``hidden``   — one residual-stream channel, model-wide (embedding, norms, every block in/out).

A :class:`StructureGroup` names the coupled slices of one structure through the adapter, so a
method can score a structure by its weights (the floors do) without knowing the family's layout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from compress.errors import UsageError
from compress.model.adapter import ArchAdapter, Role
from compress.model.plan import Kind, LayerPlan, Plan
from compress.modeling import LowRankLinear


# ====================================================================== structures for scoring
@dataclass
class Member:
    """One parameter of a structure group: units are contiguous blocks of ``width`` along ``dim``.

    A fused linear (Phi-3's ``qkv_proj``) holds several projections: ``start`` / ``count`` then say
    which slice along ``dim`` is this member's (``count`` None: the whole dimension). ``experts``: the
    parameter is a 3-D stack of experts (dim 0), and the units of every expert follow one another."""

    name: str
    param: nn.Parameter
    dim: int
    width: int
    start: int = 0
    count: int | None = None
    experts: bool = False

    def blocks(self, t: torch.Tensor | None = None) -> torch.Tensor:
        """``t`` (default: the parameter, or a tensor of its shape: a gradient, a salience) restricted
        to this member's slice and reshaped to ``[units, width, rest]``."""
        t = self.param if t is None else t
        lead = 1 if self.experts else 0  # the expert dimension stays in front
        t = t.movedim(self.dim, lead)
        if self.count is not None:
            t = t.narrow(lead, self.start, self.count)
        n = t.shape[0] * t.shape[1] if self.experts else t.shape[0]
        return t.reshape(n // self.width, self.width, -1)


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

    def rows(role: Role, width: int) -> None:  # the output rows a projection owns, in its (maybe fused) linear
        pr = arch.proj_rows(layer, role)
        owner = "self_attn" if role in ("q", "k", "v") else "mlp"
        count = pr.count if pr.fused else None
        for name, p, _ in _params(pr.linear, f"{prefix}.{owner}.{pr.attr}"):
            members.append(Member(name, p, 0, width, pr.start, count))

    def columns(owner: str, attr: str, module: nn.Module, width: int) -> None:
        for name, p, is_bias in _params(module, f"{prefix}.{owner}.{attr}"):
            if not is_bias:
                members.append(Member(name, p, 1, width))

    if kind in ("kv_group", "head"):
        o = arch.attn_names[3]
        qw = geom.head_dim * (geom.group_size if kind == "kv_group" else 1)
        rows("q", qw)
        if kind == "kv_group":
            rows("k", geom.head_dim)
            rows("v", geom.head_dim)
        columns("self_attn", o, arch.o_proj(layer), qw)
        units = geom.num_kv_heads if kind == "kv_group" else geom.num_heads
    elif kind == "mlp" and arch.experts(layer) is not None:
        ex = arch.experts(layer)
        inter = ex.intermediate
        base = f"{prefix}.mlp.experts"
        members += [Member(f"{base}.{ex.gate_up}", ex.gate_up_weight, 1, 1, 0, inter, experts=True),
                    Member(f"{base}.{ex.gate_up}", ex.gate_up_weight, 1, 1, inter, inter, experts=True),
                    Member(f"{base}.{ex.down}", ex.down_weight, 2, 1, experts=True)]
        units = ex.num_experts * inter
    elif kind == "mlp":
        rows("gate", 1)
        rows("up", 1)
        columns("mlp", arch.mlp_names[2], arch.down_proj(layer), 1)
        units = geom.intermediate
    else:
        raise UsageError(f"unknown structure kind {kind!r}; use kv_group, head, mlp or hidden")
    return StructureGroup(kind=kind, layer=layer, units=units, members=members)


def _hidden_group(arch: ArchAdapter) -> StructureGroup:
    if any(arch.experts(i) is not None for i in range(arch.num_layers)):
        raise UsageError(arch.hidden_refusal() or "hidden channels of a Mixture-of-Experts model are not a structure group")
    members = [Member("model.embed_tokens.weight", arch.embed_tokens.weight, 1, 1)]
    for i in range(arch.num_layers):
        p = f"model.layers.{i}"
        for name, norm in arch.hidden_norms(i).items():
            members.append(Member(f"{p}.{name}.weight", norm.weight, 0, 1))
        attn, mlp = arch.attention(i), arch.mlp(i)
        q, k, v, o = arch.attn_names
        for n in dict.fromkeys((q, k, v)):  # a fused qkv_proj once
            members.append(Member(f"{p}.self_attn.{n}.weight", getattr(attn, n).weight, 1, 1))
        members.append(Member(f"{p}.self_attn.{o}.weight", getattr(attn, o).weight, 0, 1))
        gate, up, down = arch.mlp_names
        for n in dict.fromkeys((gate, up)):
            members.append(Member(f"{p}.mlp.{n}.weight", getattr(mlp, n).weight, 1, 1))
        members.append(Member(f"{p}.mlp.{down}.weight", getattr(mlp, down).weight, 0, 1))
    members.append(Member("model.norm.weight", arch.final_norm.weight, 0, 1))
    if not arch.tied_embeddings:
        members.append(Member("lm_head.weight", arch.lm_head.weight, 1, 1))
    return StructureGroup(kind="hidden", layer=None, units=arch.embed_tokens.weight.shape[1], members=members)
