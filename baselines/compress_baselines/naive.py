"""Naive floors: what "no method" gives at the same widths as the real methods.

Both prune the same structures as TransAct — attention units (whole KV groups by default, or the same
number of query heads in every group) and MLP channels, uniform widths in every layer, hidden size
kept — so a table row of a real method can be read against them at equal size. The widths come from
the same solver with the same settings (``gqa``, ``attn_ratio``, ``attn_round``, ``mlp_round_to``), so
a floor run with TransAct's settings lands on TransAct's widths.

* ``random``    — units chosen uniformly at random (seeded).
* ``magnitude`` — units with the largest weight L2 norm over all their coupled parameters
  (torch-pruning's ``GroupMagnitudeImportance(p=2)``: squared norms summed over the group's members).

On a Mixture-of-Experts layer (``qwen3_moe``) an MLP unit is one channel of one expert: both floors
score every channel of every expert (magnitude: its gate and up rows and its down column of that
expert) and keep the same number in every expert, each its own set, as TransAct does.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from compress import (
    Capabilities,
    PruneContext,
    Pruner,
    PrunerConfig,
    PruneResult,
    Target,
    adapter_for,
    apply_plan,
    hookimpl,
    plan_from_scores,
    shape_plan,
    solve_uniform,
    structure_group,
)


class NaiveConfig(PrunerConfig):
    gqa: Literal["groups", "heads"] = Field("groups", description="remove whole KV groups, or heads per group")
    attn_ratio: float = Field(1.0, gt=0, description="attention keep ratio / MLP keep ratio")
    attn_round: Literal["down", "nearest", "up"] = Field(
        "down", description="round the balanced attention width down / to nearest / up (default as transact)")
    mlp_round_to: Annotated[int, Field(ge=1, le=1 << 20)] | Literal["auto"] = Field(
        "auto", description="MLP width multiple; auto: 32 when the dense width is a multiple of 32 (>= 512), else 1")


class _NaiveWidth(Pruner):
    Config = NaiveConfig

    def _widths(self, model, target: Target, ctx_arch):
        unit = "kv_group" if self.config.gqa == "groups" else "head"
        return solve_uniform(ctx_arch, target, attn_unit=unit, attn_ratio=self.config.attn_ratio,
                             mlp_round_to=self.config.mlp_round_to, attn_round=self.config.attn_round)

    def check(self, model, target: Target) -> None:
        super().check(model, target)
        self._widths(model, target, adapter_for(model))  # sized from the shapes alone: an unreachable target now

    def plan_shapes(self, model, target: Target) -> dict:
        arch = adapter_for(model)
        widths = self._widths(model, target, arch)
        apply_plan(model, shape_plan(arch, widths), arch)
        return widths.to_dict()

    def scores(self, ctx: PruneContext, kind: str, layer: int) -> torch.Tensor:
        raise NotImplementedError

    def prune(self, model, target: Target, ctx: PruneContext) -> PruneResult:
        arch = ctx.arch
        widths = self._widths(model, target, arch)
        kind = widths.attn_unit
        attn = {i: self.scores(ctx, kind, i) for i in range(arch.num_layers)}
        mlp = {i: self.scores(ctx, "mlp", i) for i in range(arch.num_layers)}
        plan = plan_from_scores(arch, widths, attn, mlp)
        apply_plan(model, plan, arch)
        return PruneResult(model=model, plan=plan.to_dict(), notes={"widths": widths.to_dict()})


class RandomPruner(_NaiveWidth):
    name = "random"
    capabilities = Capabilities(
        structures=("kv_groups", "heads", "mlp_channels"), needs_calibration=False,
        targets=("params", "flops", "kv"), export="auto",
        summary="random heads/KV groups and MLP channels at uniform widths (floor)",
        reference="LLM-Pruner paper, 'Random' row",
    )

    def scores(self, ctx: PruneContext, kind: str, layer: int) -> torch.Tensor:
        g, experts = ctx.arch.geometry(layer), ctx.arch.experts(layer)
        mlp = g.intermediate * (experts.num_experts if experts is not None else 1)  # every expert's channels
        n = {"kv_group": g.num_kv_heads, "head": g.num_heads, "mlp": mlp}[kind]
        gen = torch.Generator().manual_seed(ctx.seed * 1_000_003 + layer * 7 + len(kind))
        return torch.rand(n, generator=gen)


class MagnitudePruner(_NaiveWidth):
    name = "magnitude"
    capabilities = Capabilities(
        structures=("kv_groups", "heads", "mlp_channels"), needs_calibration=False,
        targets=("params", "flops", "kv"), export="auto",
        summary="weight L2 magnitude of each coupled group at uniform widths (floor)",
        reference="Torch-Pruning GroupMagnitudeImportance(p=2); LLM-Pruner 'L2' row",
    )

    def scores(self, ctx: PruneContext, kind: str, layer: int) -> torch.Tensor:
        group = structure_group(ctx.arch, kind, layer)
        with torch.no_grad():
            return group.reduce(lambda m: m.blocks().float().pow(2).sum(dim=(1, 2)))


@hookimpl
def register_pruners(register):
    register(RandomPruner)
    register(MagnitudePruner, aliases=("l2",))
