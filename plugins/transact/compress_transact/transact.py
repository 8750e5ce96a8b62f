"""TransAct: prune the transitional activations inside attention and MLP (Shen et al., Findings ACL 2024).

Faithful to the official code (XiaoMi/transact-pruning ``pruning/scorer.py::ActsScorer``,
``pruning/prune.py::pruning_schedule``, ``training/trainer_prune.py``):

* **Transitional activations** of every layer: the input of ``o_proj`` (attention-weighted values,
  heads concatenated) and the input of ``down_proj`` (``act(gate(x)) * up(x)``).
* **Channel salience** ``S_j = sqrt(Σ_batch Σ_tokens A[b, t, j]²)`` — the L2 norm over all calibration
  tokens, accumulated in fp32 by streaming forward hooks (no activation is stored).
* **Head score** ``H_h = mean_j S_{h,j} + (10 / head_dim) · max_j S_{h,j}``; the top heads and the top MLP
  channels of each layer are kept (selection per layer; the kept widths are the same in every layer).
* **Schedule**: ``shots`` pruning steps; before each, scores are recomputed on the calibration set and
  both widths move towards the target by ``cur - (cur - target) // remaining_shots`` (the official
  interpolation). The attention width is then rounded UP to whole heads (``ceil(next_mha_dim /
  head_dim)``; with ``gqa=groups`` to whole KV groups, ``head_dim · group_size`` channels) and the next
  shot continues from that ROUNDED width, as the official trainer does (it reads the kept
  ``mha_inter_size`` back from the pruned model): LLaMA-2-7B ``-a 768 -k 8`` keeps 29, 26, 23, 20, 17,
  14, 10, 6 heads. The MLP width is interpolated unrounded. Optional training after each shot, with
  the official token split (``avg · (1/2 + (i-1)/(K-1))`` for shot i of K) and learning-rate ramp
  (``lr · 2i / K``); ``recover_beta1`` / ``recover_beta2`` / ``recover_weight_decay`` /
  ``recover_warmup_ratio`` / ``recover_lr_scheduler`` set the optimizer of that training (official:
  AdamW β = (0.9, 0.95), weight decay 0, 10 % warm-up, cosine; unset = the run's recovery settings).
* The hidden size and ``head_dim`` are never pruned (RoPE untouched).
* **Streamed weights** (``--stream-weights``: the decoder layers are read from the files only when
  the layer-wise engine visits them): the first shot scores and cuts each layer in its own step,
  the statistics recorded during the pass that makes the next layer's inputs from the still-dense
  layer (:meth:`compress.LayerStep.advance`), so the plan and the weights are those of the in-memory
  layer-wise run, with one dense layer in memory at a time. Later shots run on the pruned model.
* With ``shots > 1`` the model, the composed plan and the RNG state are checkpointed after every
  finished shot (``ctx.checkpoint``); ``compress run --resume`` continues after the last one and ends
  with byte-identical weights and plan.

Deviations (documented, each with a reason):

* **GQA** (the official code has none: it sets ``num_key_value_heads = num_heads``). ``gqa=groups``
  removes whole KV groups with their query heads; a group's score is the sum of its query heads'
  head scores. ``gqa=heads`` keeps the same number of query heads in every group, chosen by head score
  within the group (the KV cache does not shrink). ``gqa=auto`` chooses by measurement: from the same
  saliences of the dense model it builds every distinct candidate plan at the target — whole groups and
  heads inside groups, each with the attention width rounded down and up, and the attention kept dense
  (the MLP taking the whole cut; not for ``kv:`` targets) — scores each by its mean next-token loss on
  ``auto_samples × auto_seq_len`` held-out tokens of the calibration text (windows sharing no token
  with the calibration blocks, :meth:`compress.PruneContext.held_out`), computed by masking the pruned
  heads' ``o_proj`` and channels' ``down_proj`` inputs (what removing them computes), and keeps the
  lowest (on OLMo-2, whose q/k norms span every head, masking only approximates the cut: the kept
  heads' norms still see the masked heads); the candidates, their losses and the choice are in the plan
  (``gqa``). Where it cannot score (no held-out text left in the corpus, streamed weights) it keeps
  the whole-group plan (or, where whole groups cannot reach the target, the first candidate that can)
  and the plan says why. With ``shots > 1`` the choice is made once, as one-shot cuts of the dense
  model, and the shots then reach its widths. A dry run shows that unscored candidate and lists the
  others. ``auto`` is the default (the committed recipe ``transact.yaml`` keeps ``groups``, the setting
  its records were measured with); see the README for the measurements behind it.
* **Mixture of experts** (``qwen3_moe``; the paper prunes dense models only): attention exactly as
  above; an MLP channel is one channel of one expert, and its salience is the L2 norm of THAT expert's
  ``down_proj`` input over the calibration tokens the router sent to it (:func:`compress.record_experts`).
  Every expert keeps the same number of channels (the family's config has one expert width), each its
  own top set; the router is not pruned. One MLP unit costs E experts' channels in parameters and the
  top-k experts' in FLOPs/token (:func:`compress.unit_costs`). ``gqa=auto`` masks an expert's pruned
  channels by zeroing their columns of its fused down weight for the scoring forward. The notes report
  the router's behaviour after the cut: each expert's share of the routed tokens on the first
  ``ROUTER_LOAD_SAMPLES`` calibration blocks before and after (``router_load``).
* **Target arithmetic**: the official tool takes the final widths (``-a`` attention width, ``-f`` MLP
  width). Ours solves them from any target (params, FLOPs/token, KV bytes/token) with a balanced keep
  ratio (the paper finds balanced MHA/MLP compression best) — ``attn_ratio`` shifts the balance —
  landing at or below the target. ``attn_round`` (``down`` | ``nearest`` | ``up``, default ``down``)
  rounds the balanced attention width to whole units, the MLP taking the rest of the budget; ``up``
  measured better than ``down`` at 80, 60 and 50 % of SmolLM2-135M
  (``benchmarks/results/attn_rounding_smollm2.md``; e.g. 60 %: PPL 220 vs 900 at 2048 context) and
  becomes the default once the committed records are re-run with it.
  ``attn_heads`` / ``mlp_dim`` set the widths explicitly instead.
* **Calibration**: official 128 × 4096 RedPajama tokens; our default is 128 × 2048 (capped at the model's
  context) from the run's calibration source.
* The last shot lands on the solved widths exactly (the official interpolation reaches the target
  width there, and ours is always a whole number of units), so the target is met.
* Interleaved training uses HF's cosine schedule with linear warm-up per shot; the official runs use
  DeepSpeed's ``WarmupCosineLR`` (same warm-up ratio and peak, its own warm-up shape and floor).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator

from compress import (
    ArchAdapter,
    CalibrationError,
    Capabilities,
    Plan,
    PruneContext,
    Pruner,
    PrunerConfig,
    PruneResult,
    Target,
    TargetError,
    Unsupported,
    Widths,
    adapter_for,
    apply_plan,
    hookimpl,
    plan_from_scores,
    record,
    record_experts,
    shape_plan,
    solve_uniform,
)

#: calibration blocks the router load is measured on, before and after pruning (a Mixture-of-Experts model)
ROUTER_LOAD_SAMPLES = 8


class TransActConfig(PrunerConfig):
    calib_samples: int = Field(128, ge=1, description="calibration sequences (official: 128)")
    calib_seq_len: int = Field(2048, ge=2, description="tokens per sequence (official: 4096; capped at context)")
    shots: int = Field(1, ge=1, le=1024, description="pruning steps K (official README example: 8)")
    gqa: Literal["auto", "groups", "heads"] = Field(
        "auto", description="auto: score the candidate plans (whole KV groups / heads inside groups, rounded down "
                            "and up, attention dense) on held-out text, keep the best; groups / heads: that one")
    auto_samples: int = Field(4, ge=1, le=4096, description="gqa=auto: held-out blocks the candidates are scored on")
    auto_seq_len: int = Field(512, ge=2, le=1 << 20, description="gqa=auto: tokens per held-out block")
    attn_ratio: float = Field(1.0, gt=0, description="attention keep ratio / MLP keep ratio (1 = balanced)")
    attn_round: Literal["down", "nearest", "up"] = Field(
        "down", description="round the balanced attention width down / to nearest / up to whole units; "
                          "the MLP takes the rest of the budget (up: measured best on SmolLM2)")
    attn_heads: int | None = Field(None, ge=1, le=4096, description="explicit query heads per layer (official -a / head_dim)")
    mlp_dim: int | None = Field(None, ge=1, le=1 << 20, description="explicit MLP width (official -f)")
    mlp_round_to: Annotated[int, Field(ge=1, le=1 << 20)] | Literal["auto"] = Field(
        "auto", description="MLP width multiple; auto: 32 when the dense width is a multiple of 32 (>= 512), else 1")
    alpha: float = Field(10.0, ge=0, description="head score = mean + (alpha/head_dim)·max")
    recover_tokens_per_shot: int = Field(0, ge=0, le=1 << 30, description="average training tokens after each shot")
    recover_lr: float = Field(5e-5, gt=0, description="base LR of interleaved training (ramped 2i/K)")
    # optimizer of the interleaved training; None = the run's recovery setting (RecoveryConfig default)
    recover_beta1: float | None = Field(None, ge=0, lt=1, description="AdamW beta1 between shots (official 0.9)")
    recover_beta2: float | None = Field(None, ge=0, lt=1, description="AdamW beta2 between shots (official 0.95)")
    recover_weight_decay: float | None = Field(None, ge=0, description="weight decay between shots (official 0)")
    recover_warmup_ratio: float | None = Field(None, ge=0, lt=1, description="warm-up share per shot (official 0.1)")
    recover_lr_scheduler: str | None = Field(None, description="LR schedule per shot (official: cosine)")

    @model_validator(mode="after")
    def _explicit_pair(self) -> TransActConfig:
        if (self.attn_heads is None) != (self.mlp_dim is None):
            raise ValueError("attn_heads and mlp_dim must be given together (or neither)")
        return self


class TransActPruner(Pruner):
    name = "transact"
    Config = TransActConfig
    capabilities = Capabilities(
        structures=("kv_groups", "heads", "mlp_channels"),
        needs_calibration=True,
        needs_gradients=False,
        targets=("params", "flops", "kv"),
        export="auto",
        sequential=False,
        streams_weights=True,
        summary="L2 norm of transitional activations (o_proj / down_proj inputs), iterative shots, hidden kept",
        reference="Shen et al., Findings ACL 2024 (arXiv 2407.05690); XiaoMi/transact-pruning",
    )

    # ------------------------------------------------------------------ checks and sizing
    def check(self, model, target: Target) -> None:
        super().check(model, target)
        if target.metric == "kv" and self.config.gqa == "heads":
            arch = adapter_for(model)
            if arch.geometry(0).group_size > 1:
                raise Unsupported("gqa=heads keeps every KV head, so it cannot meet a kv: target; use --set gqa=groups")
        # sized from the shapes alone (gqa=auto: its candidates), so an unreachable target stops here
        arch = adapter_for(model)
        self.candidates(arch, target) if self._auto(arch) else self.final_widths(arch, target)

    def _attn_unit(self, arch: ArchAdapter) -> str:
        cfg, g = self.config, arch.geometry(0)
        if g.group_size == 1 or cfg.gqa == "groups":
            return "kv_group"
        if cfg.gqa == "auto":  # explicit widths, or the shape a dry run shows: groups when they fit
            return "head" if cfg.attn_heads is not None and cfg.attn_heads % g.group_size else "kv_group"
        return "head"

    def candidates(self, arch: ArchAdapter, target: Target) -> dict[str, Widths]:
        """``gqa=auto``'s candidate final widths at ``target``, one per distinct shape: whole KV groups
        and query heads inside groups (each with the attention width rounded down and up), and the
        attention kept dense with the MLP taking the whole cut. ``kv:`` targets only have group plans."""
        cfg, g = self.config, arch.geometry(0)
        specs: list[tuple[str, dict]] = [("groups/down", {"attn_unit": "kv_group", "attn_round": "down"}),
                                         ("groups/up", {"attn_unit": "kv_group", "attn_round": "up"})]
        if target.metric != "kv":
            if g.group_size > 1:
                specs += [("heads/down", {"attn_unit": "head", "attn_round": "down"}),
                          ("heads/up", {"attn_unit": "head", "attn_round": "up"})]
            specs.append(("attention dense", {"attn_unit": "kv_group", "prune_attention": False}))
        out: dict[str, Widths] = {}
        seen: set[tuple[int, int, int]] = set()
        first_error: TargetError | None = None
        for label, kw in specs:
            try:
                w = solve_uniform(arch, target, attn_ratio=cfg.attn_ratio, mlp_round_to=cfg.mlp_round_to, **kw)
            except TargetError as e:
                first_error = first_error or e
                continue
            key = (*self._heads_kv(arch, w.attn_unit, w.attn_units), w.mlp)
            if key not in seen:
                seen.add(key)
                out[label] = w
        if not out:
            assert first_error is not None
            raise first_error
        return out

    def _unscored(self, arch: ArchAdapter, target: Target, cands: dict[str, Widths]) -> str:
        """The candidate ``auto`` keeps when it cannot score them (and a dry run shows): the one ``gqa=groups``
        would cut (whole KV groups at ``attn_round``; identical candidates are listed once, under the first
        label), else — whole groups cannot reach the target, e.g. one KV head — the first that can."""
        try:
            w = self.final_widths(arch, target)
        except TargetError:
            return next(iter(cands))
        key = (*self._heads_kv(arch, w.attn_unit, w.attn_units), w.mlp)
        return next((label for label, c in cands.items()
                     if (*self._heads_kv(arch, c.attn_unit, c.attn_units), c.mlp) == key), next(iter(cands)))

    @staticmethod
    def _heads_kv(arch: ArchAdapter, attn_unit: str, units: int) -> tuple[int, int]:
        """(query heads, KV heads) per layer when ``units`` attention units of kind ``attn_unit`` are kept."""
        g = arch.geometry(0)
        if attn_unit == "kv_group":
            return units * g.group_size, units
        return units * g.num_kv_heads, g.num_kv_heads

    def final_widths(self, arch: ArchAdapter, target: Target) -> Widths:
        """The widths the last shot lands on (for ``gqa=auto`` without explicit widths: the whole-KV-group
        candidate; the run replaces it with the candidate the held-out loss chose)."""
        unit = self._attn_unit(arch)
        cfg = self.config
        fixed = None
        if cfg.attn_heads is not None:
            g = arch.geometry(0)
            per_unit = g.group_size if unit == "kv_group" else g.num_kv_heads
            if cfg.attn_heads % per_unit or not 0 < cfg.attn_heads <= g.num_heads:
                raise TargetError(f"attn_heads={cfg.attn_heads} must be a multiple of {per_unit} and at most "
                                  f"{g.num_heads} for gqa={cfg.gqa}")
            fixed = (cfg.attn_heads // per_unit, int(cfg.mlp_dim or g.intermediate))
        return solve_uniform(arch, target, attn_unit=unit, attn_ratio=cfg.attn_ratio,  # type: ignore[arg-type]
                             mlp_round_to=cfg.mlp_round_to, fixed=fixed, attn_round=cfg.attn_round)

    def schedule(self, arch: ArchAdapter, final: Widths) -> list[tuple[int, int]]:
        """(attention units, MLP channels) after each shot: the official linear interpolation.

        Attention: ``next = cur - (cur - target) // remaining`` in channels, rounded UP to whole units
        (``ceil(next / unit)``; a unit is one head of ``head_dim`` channels for MHA, a KV group of
        ``head_dim · group_size`` with ``gqa=groups``, one head in every group with ``gqa=heads``), and
        the next shot starts from the rounded width. MLP: the same interpolation, unrounded (rounded up to
        the multiple a family's kernels need, :attr:`ArchAdapter.mlp_multiple`: Qwen3-MoE's experts)."""
        g = arch.geometry(0)
        unit_ch = g.head_dim * (g.group_size if final.attn_unit == "kv_group" else g.num_kv_heads)
        cur_mha, tgt_mha = final.attn_units_dense * unit_ch, final.attn_units * unit_ch
        cur_mlp, tgt_mlp = final.mlp_dense, final.mlp
        out = []
        K = self.config.shots
        for shot in range(K):
            remaining = K - shot
            units = math.ceil((cur_mha - (cur_mha - tgt_mha) // remaining) / unit_ch)
            cur_mlp = cur_mlp - (cur_mlp - tgt_mlp) // remaining
            if arch.mlp_multiple > 1:  # up to a width the family's kernels run (Qwen3-MoE's experts: 8)
                cur_mlp = min(final.mlp_dense, -(-cur_mlp // arch.mlp_multiple) * arch.mlp_multiple)
            if shot == K - 1:  # remaining == 1 lands on the target already; kept explicit
                units, cur_mlp = final.attn_units, final.mlp
            cur_mha = units * unit_ch  # the kept width: the next shot interpolates from it
            out.append((units, cur_mlp))
        return out

    def shot_shapes(self, arch: ArchAdapter, final: Widths) -> list[dict]:
        """Per shot: query heads, KV heads and MLP width of every layer after that shot."""
        out = []
        for shot, (units, mlp) in enumerate(self.schedule(arch, final), 1):
            heads, kv = self._heads_kv(arch, final.attn_unit, units)
            out.append({"shot": shot, "heads": heads, "kv_heads": kv, "mlp": mlp})
        return out

    def plan_shapes(self, model, target: Target) -> dict:
        arch = adapter_for(model)
        gqa = None
        if self._auto(arch):  # the shape shown is one candidate; the run scores them all
            cands = self.candidates(arch, target)
            shown = self._unscored(arch, target, cands)
            final = cands[shown]
            gqa = {"mode": "auto", "shown": f"{shown} (the run keeps the candidate with the lowest held-out loss; "
                                            "every candidate meets the target)",
                   "candidates": self._candidate_table(arch, cands)}
        else:
            final = self.final_widths(arch, target)
        shots = self.shot_shapes(arch, final)
        apply_plan(model, shape_plan(arch, final), arch)
        return {**self._summary(arch, final), "shots": shots, **({"gqa": gqa} if gqa else {})}

    def _auto(self, arch: ArchAdapter) -> bool:
        return self.config.gqa == "auto" and self.config.attn_heads is None

    def _candidate_table(self, arch: ArchAdapter, cands: dict[str, Widths]) -> dict[str, dict]:
        out = {}
        for label, w in cands.items():
            heads, kv = self._heads_kv(arch, w.attn_unit, w.attn_units)
            out[label] = {"heads": heads, "kv_heads": kv, "mlp": w.mlp, "predicted": w.predicted}
        return out

    def choose(self, model, target: Target, ctx: PruneContext, batches: torch.Tensor,
               sal: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> tuple[str, Widths, dict]:
        """``gqa=auto``: cut the dense model to every candidate (by masking the pruned heads' o_proj inputs
        and the pruned channels' down_proj inputs, which equals removing them) from the same saliences,
        score each by its mean next-token loss on held-out blocks of the calibration text (none of its
        tokens in ``batches``), and keep the lowest. Returns (label, widths, report for the plan)."""
        arch = ctx.arch
        cands = self.candidates(arch, target)
        table = self._candidate_table(arch, cands)
        groups = self._unscored(arch, target, cands)
        try:
            held = ctx.held_out(self.config.auto_samples, min(self.config.auto_seq_len, int(batches.shape[1])))
        except CalibrationError as e:  # a small corpus the calibration blocks cover: nothing left to score on
            why = (f"no held-out text to score the candidates on ({e}); {groups} kept "
                   "(lower calib_samples or auto_samples / auto_seq_len, or set gqa)")
            ctx.log(f"TransAct gqa=auto: {why}")
            return groups, cands[groups], {"mode": "auto", "chosen": groups, "why": why, "candidates": table}
        report: dict = {"mode": "auto", "held_out": {"samples": int(held.shape[0]), "seq_len": int(held.shape[1])}}
        if len(cands) > 1:
            for label, w in cands.items():
                scores = {i: self.attention_unit_scores(arch, i, sal[i][0], w.attn_unit) for i in sal}
                plan = plan_from_scores(arch, w, scores, {i: sal[i][1] for i in sal})
                with _masked(arch, plan):
                    table[label]["nll"] = round(ctx.loss(model, held), 6)
                ctx.log(f"TransAct gqa=auto: {label}: {table[label]['heads']} heads ({table[label]['kv_heads']} KV), "
                        f"MLP {w.mlp}: held-out NLL {table[label]['nll']:.4f}")
            chosen = min(cands, key=lambda k: table[k]["nll"])
        else:
            chosen = next(iter(cands))
        report.update(candidates=table, chosen=chosen)
        return chosen, cands[chosen], report

    @staticmethod
    def _summary(arch: ArchAdapter, widths: Widths) -> dict:
        g, ex = arch.geometry(0), arch.experts(0)
        out = {**widths.to_dict(), "heads": g.num_heads, "kv_heads": g.num_kv_heads, "head_dim": g.head_dim,
               "a": g.num_heads * g.head_dim, "f": g.intermediate}
        if ex is not None:  # f is the width of EACH expert
            out.update(experts=ex.num_experts, top_k=ex.top_k)
        return out

    # ------------------------------------------------------------------ scoring
    def collect(self, model, ctx: PruneContext, batches: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Per layer: (salience of each o_proj input channel, salience of each down_proj input channel).

        With ``ctx.layerwise`` the same mini-batches run one decoder layer at a time
        (:mod:`compress.calib.layerwise`): identical statistics, so the same plan, without the whole model's
        activations or logits."""
        arch = ctx.arch
        mods = {}
        experts = {}
        for i in range(arch.num_layers):
            mods[f"{i}.attn"] = arch.o_proj(i)
            ex = arch.experts(i)
            if ex is not None:  # Mixture of experts: each expert's down_proj input over its routed tokens
                experts[f"{i}.mlp"] = ex
            else:
                mods[f"{i}.mlp"] = arch.down_proj(i)
        with record(mods, where="input") as stats, record_experts(experts) as expert_stats:
            ctx.calibrate(model, batches, batch_size=self.config.calib_batch_size, description="TransAct scoring")
        stats = {**stats, **expert_stats}
        out = {}
        for i in range(arch.num_layers):
            for key in (f"{i}.attn", f"{i}.mlp"):
                stats[key].check_finite(f"transitional activations of layer {key}")
            out[i] = (stats[f"{i}.attn"].l2, stats[f"{i}.mlp"].l2)  # MLP of an MoE layer: [experts, channels]
        return out

    def collect_and_cut(self, model, ctx: PruneContext, batches: torch.Tensor, widths: Widths) -> Plan:
        """One shot with streamed weights: for each layer in turn (read from the files by the engine),
        the saliences of its transitional activations, recorded while the dense layer makes the next
        layer's inputs, then its plan at ``widths`` and the cut. Same statistics, plan and weights as
        :meth:`collect` + one :func:`apply_plan`; only one dense layer is in memory at a time."""
        arch = ctx.arch
        if "per_layer_shapes" not in arch.features:
            mt = getattr(arch.config, "model_type", type(model).__name__)
            raise Unsupported(f"TransAct cannot stream the weights of {mt} models (their layers must keep equal "
                              "widths while they are cut one by one); drop --stream-weights")
        plan = Plan()
        with ctx.layers(model, batches, batch_size=self.config.calib_batch_size,
                        description="TransAct scoring") as runner:
            for step in runner:
                i = step.index
                with record({"attn": arch.o_proj(i), "mlp": arch.down_proj(i)}, where="input") as stats:
                    step.advance()  # the next layer's inputs come from the dense layer
                for key in ("attn", "mlp"):
                    stats[key].check_finite(f"transitional activations of layer {i}.{key}")
                attn = {i: self.attention_unit_scores(arch, i, stats["attn"].l2, widths.attn_unit)}
                layer_plan = plan_from_scores(arch, widths, attn, {i: stats["mlp"].l2}, layers=[i])
                apply_plan(model, layer_plan, arch)
                plan.layers.update(layer_plan.layers)
                del stats, attn  # the cut-off dense linears are freed before the engine trims the heap
        return plan

    def head_scores(self, channel_l2: torch.Tensor, head_dim: int) -> torch.Tensor:
        """``mean + (alpha/head_dim)·max`` of each head's channel saliences."""
        s = channel_l2.float().reshape(-1, head_dim)
        return s.mean(dim=1) + (self.config.alpha / head_dim) * s.max(dim=1).values

    def attention_unit_scores(self, arch: ArchAdapter, layer: int, channel_l2: torch.Tensor, unit: str) -> torch.Tensor:
        g = arch.geometry(layer)
        heads = self.head_scores(channel_l2, g.head_dim)
        if unit == "kv_group":
            return heads.reshape(g.num_kv_heads, g.group_size).sum(dim=1)
        return heads

    # ------------------------------------------------------------------ the method
    def prune(self, model, target: Target, ctx: PruneContext) -> PruneResult:
        cfg = self.config
        arch = ctx.arch
        if ctx.calibration is None:
            raise Unsupported("TransAct needs calibration text; pass --calib FILE (or a dataset alias)")
        cands = self.candidates(arch, target) if self._auto(arch) else {}
        final = cands[self._unscored(arch, target, cands)] if cands else self.final_widths(arch, target)
        batches = ctx.draw(cfg.calib_samples, cfg.calib_seq_len)  # capped at the model's context
        seq_len = int(batches.shape[1])
        resumed = ctx.resume_point()
        if resumed is not None and resumed.state.get("shots") != cfg.shots:
            resumed = None
        first_sal = None  # the dense model's saliences when gqa=auto computed them (shot 1 reuses them)
        gqa_report: dict | None = None
        if self._auto(arch):
            if resumed is not None and resumed.state.get("gqa"):  # the choice the interrupted run made
                gqa_report = dict(resumed.state["gqa"])
                final = cands[gqa_report["chosen"]]
                if "held_out" in gqa_report:  # the same draws as the first run: the same calibration_hash
                    ctx.held_out(gqa_report["held_out"]["samples"], gqa_report["held_out"]["seq_len"])
            elif ctx.streaming and any(p.is_meta for p in model.parameters()):
                label = self._unscored(arch, target, cands)
                gqa_report = {"mode": "auto", "chosen": label,
                              "why": f"streamed weights: the candidates cannot be scored on the whole model; {label} "
                                     "kept (set gqa to choose)"}
            else:
                first_sal = self.collect(model, ctx, batches)
                _, final, gqa_report = self.choose(model, target, ctx, batches, first_sal)
        steps = self.schedule(arch, final)
        unit = final.attn_unit
        total_plan = Plan()
        history: list[dict] = []
        done = 0
        if resumed is not None:
            # --resume: the dense model cut to the composed plan, then the weights after the last finished
            # shot (they differ from the cut dense weights when training ran between shots)
            done, history = int(resumed.state["shot"]), list(resumed.state["history"])
            total_plan = Plan.from_dict(resumed.state["plan"])
            apply_plan(model, total_plan, arch)
            if ctx.streaming:  # the cut layers are still on meta: give them memory for the checkpoint
                ctx.stream.allocate(model)
            resumed.load_into(model)
            ctx.log(f"TransAct: resuming after shot {done}/{cfg.shots} ({resumed.path})")
        moe = any(arch.experts(i) is not None for i in range(arch.num_layers))
        load_blocks = batches[:ROUTER_LOAD_SAMPLES]
        load_before = (ctx.router_load(model, load_blocks, batch_size=cfg.calib_batch_size)
                       if moe and resumed is None and not ctx.streaming else None)
        recovery = self._recovery(ctx)
        if recovery is not None:  # continue the training stream after the finished shots
            recovery.consumed += sum(h.get("recovery", {}).get("tokens", 0) for h in history)
        for shot, (units, mlp) in enumerate(steps, 1):
            if shot <= done:
                continue
            widths = Widths(attn_unit=unit, attn_units=units, attn_units_dense=self._units_now(arch, unit),
                            mlp=mlp, mlp_dense=arch.geometry(0).intermediate, predicted=final.predicted,
                            goal=final.goal, dense=final.dense, metric=final.metric)
            if widths.attn_units_dense == units and widths.mlp_dense == mlp:
                history.append({"shot": shot, "skipped": True})
                continue
            if ctx.streaming and any(p.is_meta for p in model.parameters()):
                plan = self.collect_and_cut(model, ctx, batches, widths)  # dense layers read one by one
            else:
                sal = first_sal if shot == 1 and first_sal is not None else self.collect(model, ctx, batches)
                first_sal = None
                attn_scores = {i: self.attention_unit_scores(arch, i, sal[i][0], unit) for i in sal}
                mlp_scores = {i: sal[i][1] for i in sal}
                plan = plan_from_scores(arch, widths, attn_scores, mlp_scores)
                apply_plan(model, plan, arch)
            total_plan = total_plan.compose(plan)
            entry = {"shot": shot, **self._summary(arch, widths)}
            ctx.log(f"TransAct shot {shot}/{cfg.shots}: {entry['heads']} heads "
                    f"({entry['kv_heads']} KV) × {entry['head_dim']}, MLP {entry['f']}")
            if recovery is not None:
                tokens, lr = self._shot_budget(shot)
                optim = self._shot_optimizer()
                r = recovery(model, tokens=tokens, lr=lr, **({"settings": optim} if optim else {}))
                model = r.model
                entry["recovery"] = {"tokens": r.tokens_seen, "steps": r.steps, "lr": lr,
                                     "final_loss": r.losses[-1][1] if r.losses else None}
                if optim:
                    entry["recovery"]["settings"] = optim
            history.append(entry)
            if cfg.shots > 1:  # iterative: an interrupted run resumes after the last finished shot
                ctx.checkpoint(model, {"shot": shot, "shots": cfg.shots, "plan": total_plan.to_dict(),
                                       "history": history, "gqa": gqa_report})
        notes = {"widths": self._summary(arch, final), "shots": history,
                 "calibration": {"samples": cfg.calib_samples, "seq_len": seq_len}}
        if load_before is not None:
            after = ctx.router_load(model, load_blocks, batch_size=cfg.calib_batch_size)
            notes["router_load"] = router_load_report(load_before, after, int(load_blocks.numel()))
            ctx.log(f"TransAct router load: largest change of an expert's share "
                    f"{notes['router_load']['max_change']:.4f} over {load_blocks.numel()} tokens")
        plan_doc = total_plan.to_dict()
        if gqa_report is not None:
            notes["gqa"] = gqa_report
            plan_doc["gqa"] = gqa_report
        return PruneResult(model=model, plan=plan_doc, export="auto", notes=notes)

    @staticmethod
    def _units_now(arch: ArchAdapter, unit: str) -> int:
        g = arch.geometry(0)
        return g.num_kv_heads if unit == "kv_group" else g.group_size

    def _shot_budget(self, shot: int) -> tuple[int, float]:
        """Tokens and LR of the training after ``shot`` (official split and ramp)."""
        K, avg = self.config.shots, self.config.recover_tokens_per_shot
        share = 1.0 if K == 1 else 0.5 + (shot - 1) / (K - 1)
        return max(1, int(round(avg * share))), self.config.recover_lr * (2 * shot / K if K > 1 else 1.0)

    def _shot_optimizer(self) -> dict:
        """Recovery settings the shots override (only the ones set): RecoveryConfig field names."""
        c = self.config
        pairs = {"adam_beta1": c.recover_beta1, "adam_beta2": c.recover_beta2, "weight_decay": c.recover_weight_decay,
                 "warmup_ratio": c.recover_warmup_ratio, "lr_scheduler": c.recover_lr_scheduler}
        return {k: v for k, v in pairs.items() if v is not None}

    def _recovery(self, ctx: PruneContext):
        """The training between shots: the run's recovery recipe (``--recover-tokens`` settings and
        text) when there is one, else full training on the calibration text. One data stream for all
        shots and the final recovery, so each shot trains on fresh tokens (the official trainer
        streams its dataset across shots)."""
        if self.config.recover_tokens_per_shot <= 0:
            return None
        return ctx.recovery()


def router_load_report(before: dict[int, list[float]], after: dict[int, list[float]], tokens: int) -> dict:
    """The router's behaviour after pruning: per MoE layer, the share of routed (token, expert) pairs each
    expert got on the same calibration tokens before and after (the router itself is not pruned; its
    input changes with the layers below), and the largest change of one expert's share."""
    layers = {str(i): {"before": [round(x, 6) for x in before[i]], "after": [round(x, 6) for x in after[i]]}
              for i in sorted(before)}
    change = max((abs(a - b) for i in before for a, b in zip(after[i], before[i], strict=True)), default=0.0)
    return {"tokens": tokens, "layers": layers, "max_change": round(change, 6)}


@contextmanager
def _masked(arch: ArchAdapter, plan: Plan) -> Iterator[None]:
    """The model computes as if cut to ``plan`` (whole-layer forward only): the o_proj inputs of the
    pruned query heads and the down_proj inputs of the pruned MLP channels are zeroed, which is what
    removing them computes (a pruned KV head only feeds its own group's query heads). An expert has no
    down_proj module to hook: its fused down weight ``[E, H, I]`` is replaced, for the experts module's
    forward only, by a copy whose pruned channels' columns are zero (the same product)."""
    hooks = []

    def scale(mask: torch.Tensor):
        def hook(_module, args):
            return (args[0] * mask.to(device=args[0].device, dtype=args[0].dtype), *args[1:])
        return hook

    try:
        for i, lp in plan.layers.items():
            ex = arch.experts(i)
            if ex is not None and lp.experts is not None:
                m = torch.zeros(ex.num_experts, 1, ex.intermediate)
                for e, kept in enumerate(lp.experts):
                    m[e, 0, kept] = 1
                hooks += _masked_param(ex.module, ex.down, m)
        for i, lp in plan.layers.items():
            g = arch.geometry(i)
            heads = lp.heads
            if heads is None and lp.kv_heads is not None:
                kept = set(lp.kv_heads)
                heads = [h for h in range(g.num_heads) if h // g.group_size in kept]
            if heads is not None:
                m = torch.zeros(g.num_heads, g.head_dim)
                m[heads] = 1
                hooks.append(arch.o_proj(i).register_forward_pre_hook(scale(m.flatten())))
            if lp.mlp is not None:
                m = torch.zeros(g.intermediate)
                m[lp.mlp] = 1
                hooks.append(arch.down_proj(i).register_forward_pre_hook(scale(m)))
        yield
    finally:
        for h in hooks:
            h.remove()


def _masked_param(module: torch.nn.Module, name: str, mask: torch.Tensor) -> list:
    """Hooks that make ``module.<name>`` read as ``<name> · mask`` during ``module``'s forward and
    restore the parameter after it (the masked copy lives for one call only)."""
    saved: list = []

    def pre(mod, _args):
        p = mod._parameters[name]
        saved.append(p)
        mod._parameters[name] = torch.nn.Parameter(p.detach() * mask.to(device=p.device, dtype=p.dtype),
                                                   requires_grad=False)

    def post(mod, _args, _out):
        mod._parameters[name] = saved.pop()

    class _Restore:  # also restores when the forward raised between the two hooks
        def remove(self) -> None:
            while saved:
                module._parameters[name] = saved.pop()

    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post), _Restore()]


@hookimpl
def register_pruners(register):
    register(TransActPruner)
