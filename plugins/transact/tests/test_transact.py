"""TransAct: scorer, schedule, GQA modes, target arithmetic, dry run, SmolLM2 integration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from compress_transact.transact import TransActConfig, TransActPruner

from compress import PruneContext, Target, TargetError, adapter_for
from compress.testing import CalibrationSource, load_config, tiny_model, tiny_tokenizer
from conftest import needs_assets

REPO = Path(__file__).resolve().parents[3]
LLAMA7B = REPO / "benchmarks" / "configs" / "llama-2-7b.json"


def _meta(config_path: Path):
    from transformers import AutoModelForCausalLM

    cfg = load_config(str(config_path))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def _ctx(model, samples=4, seq_len=32, seed=0):
    tok = tiny_tokenizer()
    src = CalibrationSource.from_spec("tinystories", tok, seed=seed, max_chars=100_000)
    return PruneContext(arch=adapter_for(model), tokenizer=tok, calibration=src, seed=seed, progress=False,
                        log=lambda m: None)


# ----------------------------------------------------------------------------- scorer
def test_head_score_formula_by_hand():
    p = TransActPruner()
    s = torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 4.0, 4.0, 4.0])
    # head 0: mean 2.5 + (10/4)·4 = 12.5 ; head 1: mean 4 + (10/4)·4 = 14
    assert p.head_scores(s, 4).tolist() == pytest.approx([12.5, 14.0])
    p2 = TransActPruner({"alpha": 0.0})
    assert p2.head_scores(s, 4).tolist() == pytest.approx([2.5, 4.0])


@needs_assets
def test_channel_salience_equals_l2_norm_of_transitional_activations():
    """Streaming scores == sqrt(Σ A²) over stored o_proj / down_proj inputs of the same batches."""
    model = tiny_model("llama-gqa")
    ctx = _ctx(model)
    batches = ctx.calibration.batches(4, 32)
    stored: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for i in range(ctx.arch.num_layers):
        for key, mod in ((f"{i}.o", ctx.arch.o_proj(i)), (f"{i}.d", ctx.arch.down_proj(i))):
            hooks.append(mod.register_forward_pre_hook(lambda m, a, k=key: stored.setdefault(k, []).append(a[0].detach())))
    with torch.no_grad():
        for b in batches.split(2):
            model(input_ids=b, use_cache=False)
    for h in hooks:
        h.remove()
    sal = TransActPruner({"calib_batch_size": 3}).collect(model, ctx, batches)
    for i in range(ctx.arch.num_layers):
        o = torch.cat(stored[f"{i}.o"]).reshape(-1, stored[f"{i}.o"][0].shape[-1])
        d = torch.cat(stored[f"{i}.d"]).reshape(-1, stored[f"{i}.d"][0].shape[-1])
        assert torch.allclose(sal[i][0], o.pow(2).sum(0).sqrt(), rtol=1e-5)
        assert torch.allclose(sal[i][1], d.pow(2).sum(0).sqrt(), rtol=1e-5)
    # the MLP transitional activation really is act(gate(x)) * up(x): check one layer directly
    mlp = ctx.arch.mlp(0)
    x = torch.randn(5, 64)
    assert torch.allclose(mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)), mlp(x), atol=1e-6)


@needs_assets
def test_pruning_keeps_the_top_scored_units():
    model = tiny_model("llama-mha")
    ctx = _ctx(model)
    p = TransActPruner({"calib_samples": 4, "calib_seq_len": 32})
    sal = p.collect(model, ctx, ctx.calibration.batches(4, 32))
    res = p.prune(model, Target.parse("60%"), ctx)
    widths = res.notes["widths"]
    for i, lp in res.plan["layers"].items():
        heads = p.head_scores(sal[int(i)][0], 16)
        expect = sorted(torch.topk(heads, widths["attn_units"]).indices.tolist())
        assert lp["kv_heads"] == expect
        expect_mlp = sorted(torch.topk(sal[int(i)][1], widths["mlp"]).indices.tolist())
        assert lp["mlp"] == expect_mlp


# ----------------------------------------------------------------------------- schedule
def _smollm2_meta():
    """SmolLM2-135M's shapes (config only, meta device): 9 query heads over 3 KV heads of 64, MLP 1536."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def _official_schedule(dense: int, target: int, unit: int, shots: int) -> list[int]:
    """The official per-shot widths: interpolate in channels, keep ceil(next / unit) units, and carry
    the KEPT (rounded) width into the next shot (XiaoMi/transact-pruning pruning_schedule)."""
    cur, out = dense, []
    for shot in range(shots):
        nxt = cur - (cur - target) // (shots - shot)
        units = -(-nxt // unit)
        cur = units * unit
        out.append(units)
    return out


def test_schedule_follows_official_interpolation():
    model = _meta(LLAMA7B)
    arch = adapter_for(model)
    p = TransActPruner({"shots": 4})
    final = p.final_widths(arch, Target.parse("2B"))
    steps = p.schedule(arch, final)
    assert len(steps) == 4
    assert [u for u, _ in steps] == _official_schedule(4096, final.attn_units * 128, 128, 4)
    cur_f, tgt_f = 11008, final.mlp
    for k, (_, mlp) in enumerate(steps):  # the MLP width is interpolated without rounding
        cur_f = cur_f - (cur_f - tgt_f) // (4 - k)
        assert mlp == cur_f
    assert steps[-1] == (final.attn_units, final.mlp)
    assert [s[0] for s in steps] == sorted((s[0] for s in steps), reverse=True)


def test_schedule_carries_the_rounded_head_count_llama2_7b_official_example():
    """Official README example -a 768 -f 1536 -k 8 on LLaMA-2-7B (32 heads × 128): the kept heads of each
    shot. Carrying the unrounded width instead would give 29, 26, 23, 19, 16, 13, 10, 6."""
    model = _meta(LLAMA7B)
    arch = adapter_for(model)
    p = TransActPruner({"attn_heads": 6, "mlp_dim": 1536, "shots": 8})
    final = p.final_widths(arch, Target.parse("1.3B"))
    steps = p.schedule(arch, final)
    assert [u for u, _ in steps] == [29, 26, 23, 20, 17, 14, 10, 6]
    assert [u for u, _ in steps] == _official_schedule(4096, 768, 128, 8)
    mlp, cur = [], 11008
    for k in range(8):
        cur = cur - (cur - 1536) // (8 - k)
        mlp.append(cur)
    assert [m for _, m in steps] == mlp and mlp[-1] == 1536


def test_schedule_rounds_whole_kv_groups_smollm2():
    """gqa=groups: the unit is a KV group (head_dim × group_size = 192 channels). SmolLM2-135M at 60 %
    with K = 4 ends at 1 group: 576 → ceil(480/192) = 3 → ceil(448/192) = 3 → 2 → 1."""
    model = _smollm2_meta()
    arch = adapter_for(model)
    p = TransActPruner({"shots": 4, "attn_round": "down", "mlp_round_to": 1})
    final = p.final_widths(arch, Target.parse("60%"))
    assert (final.attn_unit, final.attn_units, final.mlp) == ("kv_group", 1, 839)
    steps = p.schedule(arch, final)
    assert [u for u, _ in steps] == [3, 3, 2, 1] == _official_schedule(576, 192, 192, 4)
    up = TransActPruner({"shots": 4, "attn_round": "up", "mlp_round_to": 1})
    final_up = up.final_widths(arch, Target.parse("60%"))
    assert (final_up.attn_units, final_up.mlp) == (2, 668)
    assert [u for u, _ in up.schedule(arch, final_up)] == [3, 3, 3, 2] == _official_schedule(576, 384, 192, 4)
    # gqa=heads: the unit is one query head in each of the 3 groups (3 × 64 channels)
    heads = TransActPruner({"shots": 4, "gqa": "heads", "attn_round": "down"})
    final_h = heads.final_widths(arch, Target.parse("60%"))
    got = [u for u, _ in heads.schedule(arch, final_h)]
    assert got == _official_schedule(576, final_h.attn_units * 192, 192, 4) and got[-1] == final_h.attn_units


def test_dry_run_json_lists_the_per_shot_widths():
    from compress.testing import RunSpec, dry_run

    rec = dry_run(RunSpec(method="transact", target="1.3B", model=str(LLAMA7B),
                          settings={"attn_heads": 6, "mlp_dim": 1536, "shots": 8}), log=lambda m: None)
    shots = rec["plan"]["shots"]
    assert [s["shot"] for s in shots] == list(range(1, 9))
    assert [s["heads"] for s in shots] == [29, 26, 23, 20, 17, 14, 10, 6]
    assert [s["kv_heads"] for s in shots] == [s["heads"] for s in shots]  # MHA
    assert shots[-1]["mlp"] == 1536 and rec["plan"]["f"] == 1536
    json.dumps(rec)  # what --json prints
    smol = TransActPruner({"shots": 4, "attn_round": "down", "mlp_round_to": 1}).plan_shapes(_smollm2_meta(), Target.parse("60%"))
    assert [(s["heads"], s["kv_heads"]) for s in smol["shots"]] == [(9, 3), (9, 3), (6, 2), (3, 1)]
    assert smol["shots"][-1]["mlp"] == smol["f"] == 839
    smol = TransActPruner({"shots": 4, "attn_round": "up", "mlp_round_to": 1}).plan_shapes(_smollm2_meta(), Target.parse("60%"))
    assert [(s["heads"], s["kv_heads"]) for s in smol["shots"]] == [(9, 3), (9, 3), (9, 3), (6, 2)]
    assert smol["shots"][-1]["mlp"] == smol["f"] == 668


def test_attn_round_policy():
    arch = adapter_for(_smollm2_meta())
    got = {r: TransActPruner({"attn_round": r, "mlp_round_to": 1}).final_widths(arch, Target.parse("60%")) for r in ("down", "nearest", "up")}
    assert {r: (w.attn_units, w.mlp) for r, w in got.items()} == {"down": (1, 839), "nearest": (2, 668), "up": (2, 668)}
    assert all(w.predicted <= w.goal for w in got.values())
    assert got["up"].to_dict()["attn_round"] == "up"
    # 'up' measured best (benchmarks/results/attn_rounding_smollm2.md); 'down' stays the default until the
    # committed repro matrix and suites are re-run with it
    assert TransActConfig().attn_round == "down"
    with pytest.raises(Exception, match="attn_round"):
        TransActConfig(attn_round="ceil")


def test_mlp_widths_are_kernel_multiples_by_default():
    """mlp_round_to=auto: 32 for SmolLM2's 1536-wide MLP (llama.cpp's width sweep), exact for small MLPs;
    recorded in the plan; an explicit 1 keeps exact widths."""
    arch = adapter_for(_smollm2_meta())
    for target, exact, rounded in (("80%", 1187, 1184), ("60%", 839, 832), ("50%", 579, 576)):
        auto = TransActPruner({}).final_widths(arch, Target.parse(target))
        assert (auto.mlp, auto.mlp_round_to) == (rounded, 32) and auto.predicted <= auto.goal
        assert auto.to_dict()["mlp_round_to"] == 32
        one = TransActPruner({"mlp_round_to": 1}).final_widths(arch, Target.parse(target))
        assert (one.mlp, one.mlp_round_to) == (exact, 1)
    shapes = TransActPruner({}).plan_shapes(_smollm2_meta(), Target.parse("60%"))
    assert shapes["f"] == 832 and shapes["mlp_round_to"] == 32
    tiny = adapter_for(tiny_model("llama-gqa"))
    w = TransActPruner({}).final_widths(tiny, Target.parse("60%"))
    assert w.mlp_round_to == 1  # a small MLP keeps exact widths
    for bad in (0, -64, "64x", 1.5):
        with pytest.raises(Exception, match="mlp_round_to"):
            TransActConfig(mlp_round_to=bad)


@needs_assets
def test_iterative_shots_plan_is_in_dense_numbering():
    model = tiny_model("llama-mha")
    ref = tiny_model("llama-mha")
    ctx = _ctx(model)
    res = TransActPruner({"shots": 3, "calib_samples": 4, "calib_seq_len": 32}).prune(model, Target.parse("50%"), ctx)
    assert len([s for s in res.notes["shots"] if not s.get("skipped")]) >= 2
    # the composed plan applied to a fresh dense model reproduces the iteratively pruned weights
    from compress import Plan, apply_plan

    apply_plan(ref, Plan.from_dict(res.plan))
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2), n1


class _FakeRecovery:
    """Stands in for the run's Recovery: records each call's budget, LR and optimizer overrides."""

    def __init__(self):
        self.consumed, self.calls = 0, []

    def __call__(self, model, *, tokens, lr, **kw):
        from types import SimpleNamespace

        self.calls.append((tokens, lr, kw.get("settings")))
        return SimpleNamespace(model=model, tokens_seen=tokens, steps=1, losses=[(1, 1.0)])


@needs_assets
def test_shots_train_with_the_given_optimizer_settings():
    """The official split (1/2, 3/2 of the average for K = 2), LR ramp 2i/K, and the optimizer overrides
    (official AdamW beta2 = 0.95, weight decay 0) passed to every shot's training."""
    model = tiny_model("llama-mha")
    ctx = _ctx(model)
    ctx.recover = fake = _FakeRecovery()
    base = {"shots": 2, "calib_samples": 4, "calib_seq_len": 32, "recover_tokens_per_shot": 100}
    official = {"recover_beta1": 0.9, "recover_beta2": 0.95, "recover_weight_decay": 0.0,
                "recover_warmup_ratio": 0.1, "recover_lr_scheduler": "cosine"}
    res = TransActPruner({**base, **official}).prune(model, Target.parse("50%"), ctx)
    optim = {"adam_beta1": 0.9, "adam_beta2": 0.95, "weight_decay": 0.0, "warmup_ratio": 0.1,
             "lr_scheduler": "cosine"}
    assert fake.calls == [(50, pytest.approx(5e-5), optim), (150, pytest.approx(1e-4), optim)]
    assert [s["recovery"]["settings"] for s in res.notes["shots"]] == [optim, optim]
    # unset: the run's recovery settings, and the call is the plain one
    model = tiny_model("llama-mha")
    ctx = _ctx(model)
    ctx.recover = fake = _FakeRecovery()
    TransActPruner(base).prune(model, Target.parse("50%"), ctx)
    assert [c[2] for c in fake.calls] == [None, None]


def test_official_recipe_carries_the_official_optimizer():
    from compress_transact import transact as mod

    from compress.testing import load_recipe

    recipes = Path(mod.__file__).parent / "recipes"
    cfg = TransActConfig(**load_recipe(recipes / "transact_official.yaml").settings)
    assert (cfg.shots, cfg.calib_samples, cfg.calib_seq_len, cfg.recover_lr) == (8, 128, 4096, 5e-5)
    assert (cfg.recover_beta1, cfg.recover_beta2, cfg.recover_weight_decay, cfg.recover_warmup_ratio,
            cfg.recover_lr_scheduler) == (0.9, 0.95, 0.0, 0.1, "cosine")
    for name in ("transact.yaml", "transact_official.yaml", "transact_1p3b_llama2.yaml"):
        assert TransActConfig(**load_recipe(recipes / name).settings).attn_round == "down"


# ----------------------------------------------------------------------------- GQA modes
@needs_assets
def test_gqa_groups_removes_whole_kv_groups():
    model = tiny_model("llama-gqa")  # 8 q heads, 2 KV heads, head_dim 8
    res = TransActPruner({"gqa": "groups", "calib_samples": 4, "calib_seq_len": 32}).prune(
        model, Target.parse("60%"), _ctx(model))
    g = adapter_for(res.model).geometry(0)
    assert (g.num_heads, g.num_kv_heads) == (4, 1)
    assert res.model.config.num_key_value_heads == 1
    assert res.model.model.layers[0].self_attn.num_key_value_groups == 4


@needs_assets
def test_gqa_heads_keeps_every_kv_head_and_equal_heads_per_group():
    model = tiny_model("llama-gqa")
    res = TransActPruner({"gqa": "heads", "calib_samples": 4, "calib_seq_len": 32}).prune(
        model, Target.parse("60%"), _ctx(model))
    g = adapter_for(res.model).geometry(0)
    assert g.num_kv_heads == 2 and g.num_heads < 8 and g.num_heads % 2 == 0
    for lp in res.plan["layers"].values():
        per_group = [sum(1 for h in lp["heads"] if h // 4 == k) for k in range(2)]
        assert per_group[0] == per_group[1] > 0


def test_gqa_heads_refuses_kv_target():
    with pytest.raises(Exception, match="gqa=groups"):
        TransActPruner({"gqa": "heads"}).check(tiny_model("llama-gqa"), Target.parse("kv:50%"))


def test_config_rejects_unknown_keys_and_half_explicit_widths():
    with pytest.raises(Exception, match="extra"):
        TransActConfig(nope=1)
    with pytest.raises(Exception, match="together"):
        TransActConfig(attn_heads=4)


# ----------------------------------------------------------------------------- target arithmetic
@pytest.mark.parametrize("round_to", [1, "auto"])
@pytest.mark.parametrize("target,low", [("2B", 1.97e9), ("4B", 3.97e9)])
def test_llama2_7b_dry_run_arithmetic(target, low, round_to):
    from compress import footprint

    model = _meta(LLAMA7B)
    dense = footprint(model)
    assert dense.params == 6_738_415_616
    summary = TransActPruner({"mlp_round_to": round_to}).plan_shapes(model, Target.parse(target))
    got = footprint(model)
    goal = Target.parse(target).goal(dense.params)
    assert low <= got.params <= goal
    # as close as granularity allows: one more MLP step (1 channel, or 32 with auto: 11008 = 344 × 32) in
    # every layer would overshoot
    step = 1 if round_to == 1 else 32
    assert summary["mlp_round_to"] == step and summary["mlp"] % step == 0
    assert got.params + 32 * 3 * 4096 * step > goal
    a, f = summary["a"], summary["f"]
    assert got.params == 2 * 32000 * 4096 + 65 * 4096 + 32 * (4 * 4096 * a + 3 * 4096 * f)
    assert got.kv_bytes_per_token == dense.kv_bytes_per_token * a // 4096
    assert all(p.is_meta for p in model.parameters())


def test_llama2_7b_2b_plan_values():
    model = _meta(LLAMA7B)
    s = TransActPruner({"attn_round": "up", "mlp_round_to": 1}).plan_shapes(model, Target.parse("2B"))
    # balanced keep ratio ≈ 0.27 → 8.6 heads, rounded up to 9 (a = 1152); the rest of the budget in the MLP
    assert (s["heads"], s["a"], s["f"]) == (9, 1152, 2882)
    s = TransActPruner({"mlp_round_to": 1}).plan_shapes(_meta(LLAMA7B), Target.parse("2B"))  # default: down
    assert (s["heads"], s["a"], s["f"]) == (8, 1024, 3053)
    s = TransActPruner().plan_shapes(_meta(LLAMA7B), Target.parse("2B"))  # default MLP multiple: 32
    assert (s["heads"], s["a"], s["f"]) == (8, 1024, 3040)


def test_explicit_official_widths():
    model = _meta(LLAMA7B)
    s = TransActPruner({"attn_heads": 6, "mlp_dim": 1536}).plan_shapes(model, Target.parse("2B"))
    assert (s["a"], s["f"]) == (768, 1536)
    from compress import count_params

    assert count_params(model) == 1_269_043_200  # the paper's TransAct-1.3B (official -a 768 -f 1536)


# ----------------------------------------------------------------------------- SmolLM2 integration
@pytest.mark.slow
@needs_assets
def test_smollm2_prune_export_reload_with_stock_transformers(smollm2_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from compress import footprint
    from compress.testing import RunSpec, run

    out = tmp_path / "smol-transact"
    rec = run(RunSpec(method="transact", target="60%", model=str(smollm2_dir), out=str(out), calib="wikitext2",
                      settings={"calib_samples": 4, "calib_seq_len": 128}, progress=False), log=lambda m: None)
    model, rec = rec.model, rec.record
    assert rec["export"]["kind"] == "stock"
    assert rec["achieved"]["params"] <= 0.6 * rec["dense"]["params"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "auto_map" not in cfg
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[1, 504, 3458, 314, 260, 3575, 281]])
    with torch.no_grad():
        a = model(ids).logits
        b = reloaded(ids).logits
    assert (a - b).abs().max().item() <= 1e-5
    fp = footprint(reloaded)
    g0 = fp.layers[0]
    assert fp.kv_bytes_per_token == rec["dense"]["kv_bytes_per_token"] * g0["num_kv_heads"] // 3
    plan = json.loads((out / "compress_plan.json").read_text())
    assert plan["method"] == "transact" and len(plan["plan"]["layers"]) == 30


# ----------------------------------------------------------------------------- gqa=auto
def test_masked_forward_equals_the_cut_model():
    """gqa=auto scores a candidate by masking the pruned heads' o_proj inputs and channels' down_proj
    inputs; that must compute what the cut model computes (q/k/v biases included), for whole KV groups
    and for heads inside groups."""
    import copy

    from compress_transact.transact import _masked

    from compress import LayerPlan, Plan, apply_plan

    model = tiny_model("qwen2")  # 4 heads / 2 KV, head_dim 16, q/k/v bias, MLP 80
    ids = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    arch = adapter_for(model)
    for lp in (LayerPlan(kv_heads=[1], mlp=list(range(0, 80, 3))), LayerPlan(heads=[0, 3], mlp=[5, 6, 70])):
        plan = Plan(layers={0: lp, 2: lp})
        with torch.no_grad(), _masked(arch, plan):
            masked = model(ids).logits
        cut = copy.deepcopy(model)
        apply_plan(cut, plan, adapter_for(cut))
        with torch.no_grad():
            assert torch.allclose(masked, cut(ids).logits, atol=1e-5), lp
    with torch.no_grad():  # the hooks are gone afterwards
        assert not torch.allclose(model(ids).logits, masked, atol=1e-5)


def test_gqa_auto_candidates_are_distinct_and_meet_the_target():
    model = _smollm2_meta()
    p = TransActPruner({"gqa": "auto"})
    arch = adapter_for(model)
    for target in ("80%", "60%", "flops:50%"):
        cands = p.candidates(arch, Target.parse(target))
        shapes = {(*p._heads_kv(arch, w.attn_unit, w.attn_units), w.mlp) for w in cands.values()}
        assert len(shapes) == len(cands) >= 3, cands
        assert all(w.predicted <= w.goal for w in cands.values())
        if target != "flops:50%":  # there the MLP alone cannot take the whole cut
            # one candidate keeps the attention whole (labelled groups/up when rounding up already does)
            assert any(p._heads_kv(arch, w.attn_unit, w.attn_units) == (9, 3) for w in cands.values())
    kv = p.candidates(arch, Target.parse("kv:67%"))
    assert set(kv) <= {"groups/down", "groups/up"} and all(w.attn_unit == "kv_group" for w in kv.values())


def test_gqa_auto_dry_run_lists_the_candidates():
    model = _smollm2_meta()
    shapes = TransActPruner({"gqa": "auto"}).plan_shapes(model, Target.parse("60%"))
    assert shapes["gqa"]["mode"] == "auto" and shapes["attn_unit"] == "kv_group"
    assert {"groups/down", "attention dense"} <= set(shapes["gqa"]["candidates"])


@needs_assets
def test_gqa_auto_keeps_the_candidate_with_the_lowest_held_out_loss():
    import copy

    from compress import apply_plan, plan_from_scores

    dense = tiny_model("llama-gqa")  # 8 q heads over 2 KV heads, MLP 64
    model = copy.deepcopy(dense)
    ctx = _ctx(model, samples=4, seq_len=32)
    p = TransActPruner({"gqa": "auto", "calib_samples": 4, "calib_seq_len": 32, "auto_samples": 3,
                        "auto_seq_len": 32})
    res = p.prune(model, Target.parse("60%"), ctx)
    rep = res.notes["gqa"]
    assert res.plan["gqa"] == rep and rep["held_out"] == {"samples": 3, "seq_len": 32}
    nll = {k: v["nll"] for k, v in rep["candidates"].items()}
    assert len(nll) >= 3 and rep["chosen"] == min(nll, key=nll.get)
    g = adapter_for(res.model).geometry(0)
    best = rep["candidates"][rep["chosen"]]
    assert (g.num_heads, g.num_kv_heads, g.intermediate) == (best["heads"], best["kv_heads"], best["mlp"])
    assert res.notes["widths"]["predicted"] <= 0.6 * res.notes["widths"]["dense"]

    # each reported loss is the loss of that candidate really cut, on the held-out blocks the context drew
    fresh = _ctx(dense, samples=4, seq_len=32)
    batches = fresh.draw(4, 32)
    held = fresh.held_out(3, 32)
    assert fresh.calibration_hash == ctx.calibration_hash
    sal = p.collect(dense, fresh, batches)
    arch = adapter_for(dense)
    for label, w in p.candidates(arch, Target.parse("60%")).items():
        cut = copy.deepcopy(dense)
        scores = {i: p.attention_unit_scores(arch, i, sal[i][0], w.attn_unit) for i in sal}
        apply_plan(cut, plan_from_scores(arch, w, scores, {i: sal[i][1] for i in sal}), adapter_for(cut))
        assert abs(fresh.loss(cut, held) - nll[label]) < 1e-4, label


def test_gqa_auto_is_the_default_and_keeps_whole_groups_when_no_text_is_left_to_score_on():
    """The default (no setting) is gqa=auto. On a corpus its calibration blocks cover (nothing left for
    held-out windows) it cannot score, so it keeps the whole-KV-group plan, gqa=groups' exact cut, and
    says why in the plan; the run does not fail."""
    import copy

    assert TransActConfig().gqa == "auto"
    tok = tiny_tokenizer()
    text = " ".join(f"w{i % 97} x{i % 13}" for i in range(40))
    logs: list[str] = []

    def ctx(model):
        src = CalibrationSource.from_text(text, tok, seed=0)
        return PruneContext(arch=adapter_for(model), tokenizer=tok, calibration=src, seed=0, progress=False,
                            log=logs.append)

    dense = tiny_model("llama-gqa")
    n_tok = CalibrationSource.from_text(text, tok, seed=0).num_tokens
    assert n_tok <= 256  # the tiny model's context: one block of the whole corpus is every token
    cal = {"calib_samples": 2, "calib_seq_len": n_tok}
    a, b = copy.deepcopy(dense), copy.deepcopy(dense)
    got = TransActPruner(cal).prune(a, Target.parse("60%"), ctx(a))
    ref = TransActPruner({**cal, "gqa": "groups"}).prune(b, Target.parse("60%"), ctx(b))
    rep = got.plan.pop("gqa")
    assert rep["chosen"] == "groups/down" and "no held-out text" in rep["why"] and "nll" not in str(rep)
    assert set(rep["candidates"]) >= {"groups/down", "attention dense"}  # what it would have scored
    assert json.dumps(got.plan, sort_keys=True) == json.dumps(ref.plan, sort_keys=True)
    assert any("no held-out text" in line for line in logs)


def test_gqa_auto_on_one_kv_head_chooses_among_the_candidates_that_reach_the_target():
    """Gemma-3's single KV head: whole groups cannot cut attention, so at 60 % of the tiny model only
    heads inside the group reach the target; check() accepts it and auto picks among those."""
    model = tiny_model("gemma3_text")
    target = Target.parse("60%")
    p = TransActPruner({"calib_samples": 4, "calib_seq_len": 32})
    with pytest.raises(TargetError):
        TransActPruner({"gqa": "groups"}).check(model, target)
    p.check(model, target)
    res = p.prune(model, target, _ctx(model))
    rep = res.plan["gqa"]
    assert set(rep["candidates"]) <= {"heads/down", "heads/up"} and rep["chosen"] in rep["candidates"]
    assert res.notes["widths"]["predicted"] <= res.notes["widths"]["goal"]
    assert adapter_for(res.model).geometry(0).num_kv_heads == 1


def test_held_out_blocks_share_no_token_with_the_calibration_blocks():
    from compress import CalibrationError

    tok = tiny_tokenizer()
    text = " ".join(f"w{i % 97} x{i % 13}" for i in range(3000))
    src = CalibrationSource.from_text(text, tok, seed=3)
    n_tok = src.num_tokens
    held = src.held_out(5, 40, avoid=[(6, 64), (2, 16)])
    assert held.shape == (5, 40)
    assert torch.equal(held, src.held_out(5, 40, avoid=[(6, 64), (2, 16)]))  # seeded

    def spans(n, length):
        return [set(range(s, s + length)) for s in src._starts(n, length).tolist()]

    calib = set().union(*spans(6, 64), *spans(2, 16))
    tokens = src.tokens
    # locate each held-out block in the corpus (the text is repetitive: use every matching offset)
    for row in held:
        offs = [s for s in range(n_tok - 40 + 1) if torch.equal(tokens[s:s + 40], row)]
        assert any(not (set(range(s, s + 40)) & calib) for s in offs)
    with pytest.raises(CalibrationError, match="held-out"):
        src.held_out(n_tok // 40, 40, avoid=[(6, 64)])
