"""Structured Wanda ("Wanda-sp", the FLAP paper's baseline) as a third-party compress plugin.

Score of a unit = Σ |W| · ‖X‖ over the columns of ``o_proj`` (a KV group's heads) or ``down_proj``
(an MLP channel) that the unit feeds, with ‖X‖ the L2 norm of that input channel over the
calibration tokens. Widths are uniform and solved from the target by the core.
"""

import torch

from compress import (
    Capabilities,
    Pruner,
    PruneResult,
    apply_plan,
    hookimpl,
    plan_from_scores,
    record,
    solve_uniform,
)


class WandaSP(Pruner):
    name = "wanda_sp"
    capabilities = Capabilities(structures=("kv_groups", "mlp_channels"), targets=("params", "flops", "kv"),
                                requires=("dense_mlp",),  # one down_proj per layer: refused on MoE up front
                                summary="|W|·‖X‖ of o_proj / down_proj input columns (example plugin)")

    def prune(self, model, target, ctx):
        arch, cfg = ctx.arch, self.config
        mods = {f"{i}.{k}": m for i in range(arch.num_layers)
                for k, m in (("o", arch.o_proj(i)), ("d", arch.down_proj(i)))}
        with record(mods) as stats:  # hooks on the inputs; the run decides whole-model or layer-wise, and where
            ctx.calibrate(model, ctx.draw(cfg.calib_samples, cfg.calib_seq_len), batch_size=cfg.calib_batch_size)
        widths = solve_uniform(arch, target, attn_unit="kv_group")
        attn, mlp = {}, {}
        for i in range(arch.num_layers):
            g = arch.geometry(i)
            col = lambda m, s: (m.weight.abs() * s.l2).sum(0)  # noqa: E731 - per input column
            attn[i] = col(arch.o_proj(i), stats[f"{i}.o"]).reshape(g.num_kv_heads, -1).sum(1)
            mlp[i] = col(arch.down_proj(i), stats[f"{i}.d"])
        plan = plan_from_scores(arch, widths, attn, mlp)
        with torch.no_grad():
            apply_plan(model, plan, arch)
        return PruneResult(model=model, plan=plan.to_dict(), notes={"widths": widths.to_dict()})


@hookimpl
def register_pruners(register):
    register(WandaSP)
