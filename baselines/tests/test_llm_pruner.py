"""LLM-Pruner baseline: importance formulas, GQA groups, coupling, layer range, sizing, conformance."""

from __future__ import annotations

import copy

import pytest
import torch
from compress_baselines.llm_pruner import (
    LLMPruner,
    LLMPrunerConfig,
    default_layer_range,
    group_scores,
    official_kept_units,
    scored_members,
    taylor_gradients,
)
from pydantic import ValidationError

from compress import (
    PruneContext,
    Target,
    TargetError,
    Unsupported,
    adapter_for,
    footprint,
    structure_group,
)
from compress.testing import (
    CalibrationSource,
    check_pruner,
    tiny_model,
    tiny_tokenizer,
    torch_pruning_coupling,
)
from conftest import needs_assets

pytestmark = pytest.mark.usefixtures("one_thread")


# ============================================================================ reference gradients
def _reference(model, tokens):
    """Full-model autograd, the official way: ``.grad`` of one batch backward, and per-sample
    ``g_n² / N`` accumulated (``llama3.py``'s ``acc_grad``)."""
    m = copy.deepcopy(model)
    for p in m.parameters():
        p.requires_grad_(True)
    m.zero_grad()
    m(input_ids=tokens, labels=tokens).loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in m.named_parameters()}
    n_samples = tokens.shape[0]
    fisher = {n: torch.zeros_like(p) for n, p in m.named_parameters()}
    for j in range(n_samples):
        m.zero_grad()
        m(input_ids=tokens[j:j + 1], labels=tokens[j:j + 1]).loss.backward()
        for n, p in m.named_parameters():
            fisher[n] += p.grad * p.grad / n_samples
    return grads, fisher


def _layer_weights(model, layer: int) -> dict[str, torch.Tensor]:
    p = f"model.layers.{layer}"
    return {n: w.detach() for n, w in model.named_parameters()
            if n.startswith(p + ".") and n.endswith("proj.weight")}


@pytest.fixture(scope="module")
def gqa_case():
    model = tiny_model("llama-gqa")  # 8 query heads, 2 KV heads, head_dim 8, MLP 96
    tokens = torch.randint(3, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    arch = adapter_for(model)
    layer = 1
    groups = {"attn": structure_group(arch, "kv_group", layer), "mlp": structure_group(arch, "mlp", layer)}
    params = [m.param for g in groups.values() for m in scored_members(g)]
    # micro-batches of 3 + 1 sequences: must still equal the single official batch backward
    grads, fisher = taylor_gradients(model, params, tokens, first_order=True, fisher=True, batch_size=3)
    ref_g, ref_f = _reference(model, tokens)
    return model, arch, layer, groups, grads, fisher, ref_g, ref_f


def test_gradients_match_full_model_autograd(gqa_case):
    model, _arch, layer, groups, grads, fisher, ref_g, ref_f = gqa_case
    by_name = {m.param: m.name for g in groups.values() for m in g.members}
    assert len(grads) == 7 and len(fisher) == 7  # q, k, v, o, gate, up, down of one layer
    for p, g in grads.items():
        torch.testing.assert_close(g, ref_g[by_name[p]], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(fisher[p], ref_f[by_name[p]], rtol=1e-4, atol=1e-10)
    # the model is left as it was: no .grad, flags restored, eval mode
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert not model.training


def _hand_scores(W: dict[str, torch.Tensor], G: dict[str, torch.Tensor], F: dict[str, torch.Tensor],
                 layer: int, crit: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-KV-group and per-MLP-channel scores written out by hand, group reduction ``sum``."""
    p = f"model.layers.{layer}"
    hd, g, n_kv, inter = 8, 4, 2, 96

    def sal(name):
        w = W[name]
        if crit in ("element1", "vector"):
            return w * G[name]
        if crit == "element2":
            return w * F[name] * w
        return w * G[name] - 0.5 * w * F[name] * w  # param_mix

    def rows(name, idx):  # score of each listed row (out channel)
        s = sal(name)[idx]
        return s.sum(1).abs() if crit == "vector" else s.abs().sum(1)

    def cols(name, idx):  # score of each listed column (in channel)
        s = sal(name)[:, idx]
        return s.sum(0).abs() if crit == "vector" else s.abs().sum(0)

    attn = torch.zeros(n_kv)
    for k in range(n_kv):
        q_rows = list(range(k * g * hd, (k + 1) * g * hd))  # query heads k*g .. k*g+g-1
        kv_rows = list(range(k * hd, (k + 1) * hd))
        attn[k] = (rows(f"{p}.self_attn.q_proj.weight", q_rows).sum()
                   + rows(f"{p}.self_attn.k_proj.weight", kv_rows).sum()
                   + rows(f"{p}.self_attn.v_proj.weight", kv_rows).sum()
                   + cols(f"{p}.self_attn.o_proj.weight", q_rows).sum())
    mlp = torch.zeros(inter)
    for c in range(inter):
        mlp[c] = (rows(f"{p}.mlp.gate_proj.weight", [c]).sum() + rows(f"{p}.mlp.up_proj.weight", [c]).sum()
                  + cols(f"{p}.mlp.down_proj.weight", [c]).sum())
    return attn, mlp


@pytest.mark.parametrize("crit", ["element1", "element2", "vector", "param_mix"])
def test_taylor_scores_match_hand_computation(gqa_case, crit):
    model, _arch, layer, groups, grads, fisher, ref_g, ref_f = gqa_case
    W = _layer_weights(model, layer)
    attn_ref, mlp_ref = _hand_scores(W, ref_g, ref_f, layer, crit)
    attn = group_scores(groups["attn"], crit, grads, fisher, grouping="sum", channels_per_unit=8)
    mlp = group_scores(groups["mlp"], crit, grads, fisher, grouping="sum", channels_per_unit=1)
    assert attn.shape == (2,) and mlp.shape == (96,)
    torch.testing.assert_close(attn, attn_ref, rtol=1e-4, atol=0)
    torch.testing.assert_close(mlp, mlp_ref, rtol=1e-4, atol=0)


def test_grouping_max_and_first_follow_the_official_reduction_order(gqa_case):
    """Members are combined per head_dim channel (query heads of the group folded onto it), then the
    channels of a group are summed; ``first`` is the official root, k_proj for GQA."""
    model, _arch, layer, groups, grads, fisher, ref_g, _ = gqa_case
    W = _layer_weights(model, layer)
    p = f"model.layers.{layer}.self_attn"
    s = {n: (W[f"{p}.{n}.weight"] * ref_g[f"{p}.{n}.weight"]).abs() for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    hd, g = 8, 4
    want_max, want_first = torch.zeros(2), torch.zeros(2)
    for k in range(2):
        for d in range(hd):
            q = sum(s["q_proj"][(k * g + j) * hd + d].sum() for j in range(g))
            o = sum(s["o_proj"][:, (k * g + j) * hd + d].sum() for j in range(g))
            kk = s["k_proj"][k * hd + d].sum()
            v = s["v_proj"][k * hd + d].sum()
            want_max[k] += torch.stack([q, kk, v, o]).max()
            want_first[k] += kk
    got_max = group_scores(groups["attn"], "element1", grads, fisher, grouping="max", channels_per_unit=hd)
    got_first = group_scores(groups["attn"], "element1", grads, fisher, grouping="first", channels_per_unit=hd)
    torch.testing.assert_close(got_max, want_max, rtol=1e-4, atol=0)
    torch.testing.assert_close(got_first, want_first, rtol=1e-4, atol=0)


def test_magnitude_criteria_and_mha_root():
    model = tiny_model("llama-mha")  # 4 heads, 4 KV heads, head_dim 16
    arch = adapter_for(model)
    grp = structure_group(arch, "kv_group", 0)
    assert [m.name.rsplit(".", 2)[-2] for m in scored_members(grp)] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    W = _layer_weights(model, 0)
    p = "model.layers.0.self_attn"
    for crit, f in (("l1", lambda w: w.abs()), ("l2", lambda w: w * w)):
        want = torch.zeros(4)
        for h in range(4):
            r = slice(h * 16, (h + 1) * 16)
            want[h] = sum(f(W[f"{p}.{n}.weight"][r]).sum() for n in ("q_proj", "k_proj", "v_proj"))
            want[h] += f(W[f"{p}.o_proj.weight"][:, r]).sum()
        torch.testing.assert_close(group_scores(grp, crit, grouping="sum", channels_per_unit=16), want, rtol=1e-5, atol=0)
        # MagnitudeImportance's default reduction is the mean over the 4 members
        torch.testing.assert_close(group_scores(grp, crit, grouping="mean", channels_per_unit=16), want / 4,
                                   rtol=1e-5, atol=0)
        first = torch.stack([f(W[f"{p}.q_proj.weight"][h * 16:(h + 1) * 16]).sum() for h in range(4)])
        torch.testing.assert_close(group_scores(grp, crit, grouping="first", channels_per_unit=16), first,
                                   rtol=1e-5, atol=0)
    assert LLMPrunerConfig(importance="l2").member_reduction == "mean"
    assert LLMPrunerConfig().member_reduction == "sum"


# ============================================================================ structures
@pytest.mark.parametrize("kind", ["llama-gqa", "qwen2"])
def test_mlp_group_matches_torch_pruning_coupling(kind):
    model = tiny_model(kind)
    arch = adapter_for(model)
    ours = set()
    for m in scored_members(structure_group(arch, "mlp", 1)):
        module = m.name.rsplit(".", 1)[0]
        ours.add((module, "out" if m.dim == 0 else "in"))
    assert ours == torch_pruning_coupling(model, "mlp", 1)


def _ctx(model):
    tok = tiny_tokenizer()
    calib = CalibrationSource.from_spec("tinystories", tok, seed=0, max_chars=100_000)
    return PruneContext(arch=adapter_for(model), tokenizer=tok, calibration=calib, seed=0, progress=False,
                        log=lambda m: None)


@needs_assets
def test_gqa_removes_whole_kv_groups_with_their_query_heads():
    model = tiny_model("llama-gqa")  # 8 q heads over 2 KV heads
    dense = copy.deepcopy(model)
    res = LLMPruner({"calib_samples": 4, "calib_seq_len": 32}).prune(model, Target.parse("60%"), _ctx(model))
    arch, hd, g = adapter_for(model), 8, 4
    pruned_layers = res.plan["layers"]
    assert pruned_layers
    for i, lp in pruned_layers.items():
        i = int(i)
        geom = arch.geometry(i)
        assert geom.num_kv_heads == len(lp["kv_heads"]) == 1 and geom.num_heads == 4 and geom.group_size == g
        (kv,) = lp["kv_heads"]
        src = dense.model.layers[i].self_attn
        dst = model.model.layers[i].self_attn
        q_rows = slice(kv * g * hd, (kv + 1) * g * hd)
        torch.testing.assert_close(dst.q_proj.weight, src.q_proj.weight[q_rows])
        torch.testing.assert_close(dst.k_proj.weight, src.k_proj.weight[kv * hd:(kv + 1) * hd])
        torch.testing.assert_close(dst.v_proj.weight, src.v_proj.weight[kv * hd:(kv + 1) * hd])
        torch.testing.assert_close(dst.o_proj.weight, src.o_proj.weight[:, q_rows])


# ============================================================================ layer range and sizing
def test_layer_range_scales_the_official_4_to_30_of_32():
    assert default_layer_range(32) == (4, 30)  # the README setting itself
    assert default_layer_range(30) == (4, 28)  # SmolLM2-135M
    assert default_layer_range(28) == (4, 26)
    assert default_layer_range(24) == (3, 22)
    assert default_layer_range(16) == (2, 15)
    assert default_layer_range(3) == (0, 3)  # too shallow to skip any layer
    assert default_layer_range(1) == (0, 1)
    assert LLMPruner().layer_ranges(30) == (list(range(4, 28)), list(range(4, 28)))
    split = LLMPruner({"block_attention_layer_start": 2, "block_attention_layer_end": 5, "block_mlp_layer_end": 29})
    assert split.layer_ranges(30) == (list(range(2, 5)), list(range(4, 29)))
    with pytest.raises(Unsupported):
        LLMPruner({"block_mlp_layer_end": 40}).layer_ranges(30)
    with pytest.raises(ValidationError):
        LLMPrunerConfig(block_attention_layer_start=5, block_attention_layer_end=2)


def test_official_widths_reproduce_llama7b_parameter_count():
    """README setting (ratio 0.25, layers 4..30 of 32) on LLaMA-7B's shapes gives the official log's
    count: 6,738,415,616 → 5,422,977,024 (horseee/LLM-Pruner#34)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    assert footprint(model).params == 6_738_415_616
    assert official_kept_units(32, 128, 0.25) == 24 and official_kept_units(11008, 1, 0.25) == 8256
    pruner = LLMPruner({"pruning_ratio": 0.25, "block_attention_layer_start": 4, "block_attention_layer_end": 30,
                        "block_mlp_layer_start": 4, "block_mlp_layer_end": 30})
    pruner.check(model, Target.parse("100%"))
    summary = pruner.plan_shapes(model, Target.parse("100%"))
    assert footprint(model).params == 5_422_977_024
    assert summary["kv_groups_kept"] == 24 and summary["mlp_kept"] == 8256


def test_pruning_ratio_on_smollm2_shapes_and_target_as_upper_bound():
    """SmolLM2-135M: 3 KV groups of 64 channels; ratio 0.25 prunes 48 KV channels < one head, so the
    official tool removes no attention there and 384 of 1536 MLP channels in layers 4..27."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    pruner = LLMPruner({"pruning_ratio": 0.25})
    with pytest.raises(TargetError, match="pruning_ratio"):
        pruner.check(model, Target.parse("60%"))  # the ratio wins; the target is only an upper bound
    pruner.check(model, Target.parse("90%"))
    pruner.plan_shapes(model, Target.parse("90%"))
    arch = adapter_for(model)
    widths = [(g.num_kv_heads, g.intermediate) for g in arch.geometries()]
    assert widths == [(3, 1536)] * 4 + [(3, 1152)] * 24 + [(3, 1536)] * 2


def test_config_accepts_official_names_and_rejects_unknown_keys():
    assert LLMPrunerConfig(importance="param_first").importance == "element1"
    assert LLMPrunerConfig(importance="param_second").importance == "element2"
    assert LLMPrunerConfig(importance="vectorize").importance == "vector"
    c = LLMPrunerConfig()
    assert (c.calib_samples, c.calib_seq_len, c.importance, c.global_pruning) == (10, 64, "element1", False)
    with pytest.raises(ValidationError):
        LLMPrunerConfig(taylor="param_first")
    with pytest.raises(ValidationError):
        LLMPrunerConfig(importance="hessian")


# ============================================================================ end to end
@needs_assets
def test_split_ranges_prune_only_their_layers():
    model = tiny_model("llama-mha")  # 3 layers
    dense = footprint(model)
    pruner = LLMPruner({"calib_samples": 4, "calib_seq_len": 32, "block_attention_layer_start": 0,
                        "block_attention_layer_end": 1, "block_mlp_layer_start": 1, "block_mlp_layer_end": 3})
    pruner.check(model, Target.parse("80%"))
    res = pruner.prune(model, Target.parse("80%"), _ctx(model))
    geoms = adapter_for(model).geometries()
    assert geoms[0].intermediate == 96 and geoms[0].num_heads < 4  # attention only
    assert all(g.num_heads == 4 and g.intermediate < 96 for g in geoms[1:])  # MLP only
    assert footprint(model).params <= 0.8 * dense.params
    assert res.notes["attention_layers"] == [0, 1] and res.notes["mlp_layers"] == [1, 3]


@needs_assets
def test_global_pruning_removes_the_lowest_raw_scores_across_layers():
    model = tiny_model("llama-mha")
    ref = copy.deepcopy(model)
    cfg = {"calib_samples": 4, "calib_seq_len": 32, "global_pruning": True, "pruning_ratio": 0.3}
    ctx = _ctx(model)
    res = LLMPruner(cfg).prune(model, Target.parse("100%"), ctx)
    # recompute the scores independently, on the same calibration tokens
    arch = adapter_for(ref)
    tokens = ctx.calibration.batches(4, 32)
    groups = {("attn", i): structure_group(arch, "kv_group", i) for i in range(3)}
    groups.update({("mlp", i): structure_group(arch, "mlp", i) for i in range(3)})
    params = [m.param for g in groups.values() for m in scored_members(g)]
    grads, _ = taylor_gradients(ref, params, tokens)
    units = []
    for (kind, i), g in groups.items():
        s = group_scores(g, "element1", grads, grouping="sum", channels_per_unit=16 if kind == "attn" else 1)
        best = int(torch.argmax(s))
        units += [(float(s[u]), kind, i, u) for u in range(len(s)) if u != best]
    total = 3 * (4 + 96)
    n_pruned = total - int(total * 0.7)
    removed = {(k, i, u) for _, k, i, u in sorted(units)[:n_pruned]}
    kept = set()
    for i in range(3):
        lp = res.plan["layers"].get(str(i), {})
        kept |= {("attn", i, u) for u in lp.get("kv_heads", range(4))}
        kept |= {("mlp", i, u) for u in lp.get("mlp", range(96))}
    every = {("attn", i, u) for i in range(3) for u in range(4)} | {("mlp", i, u) for i in range(3) for u in range(96)}
    assert every - kept == removed
    assert res.notes["global_pruning"] is True


@needs_assets
def test_plan_shapes_match_prune_in_local_mode():
    from transformers import AutoModelForCausalLM

    from compress.testing import tiny_config

    model = tiny_model("qwen2")
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(tiny_config("qwen2"))
    pruner = LLMPruner({"calib_samples": 4, "calib_seq_len": 32})
    pruner.plan_shapes(meta, Target.parse("flops:70%"))
    pruner.prune(model, Target.parse("flops:70%"), _ctx(model))
    assert adapter_for(meta).geometries() == adapter_for(model).geometries()
    assert footprint(meta).params == footprint(model).params


# ============================================================================ iterative steps
def _one_shot_reference(model, ctx, cfg, target):
    """The one-shot plan computed independently: one backward over the run's draw, the top units of every
    pruned layer at the solved local widths."""
    ref = copy.deepcopy(model)
    arch = adapter_for(ref)
    pruner = LLMPruner(cfg)
    attn, mlp = pruner.layer_ranges(arch.num_layers)
    sizes = pruner._sizes(arch, target, attn, mlp)
    tokens = ctx.calibration.batches(cfg["calib_samples"], cfg["calib_seq_len"])
    groups = {("attn", i): structure_group(arch, "kv_group", i) for i in attn}
    groups.update({("mlp", i): structure_group(arch, "mlp", i) for i in mlp})
    grads, _ = taylor_gradients(ref, [m.param for g in groups.values() for m in scored_members(g)], tokens)
    hd = arch.geometry(0).head_dim
    plan = {}
    for (kind, i), g in groups.items():
        sc = group_scores(g, "element1", grads, grouping="sum", channels_per_unit=hd if kind == "attn" else 1)
        k = sizes.attn[i] if kind == "attn" else sizes.mlp[i]
        if k < sc.numel():
            key = "kv_heads" if kind == "attn" else "mlp"
            plan.setdefault(str(i), {})[key] = sorted(sorted(range(sc.numel()), key=lambda u: (-float(sc[u]), u))[:k])
    return plan, sizes


@needs_assets
def test_iterative_steps_one_is_the_one_shot_plan():
    cfg = {"calib_samples": 4, "calib_seq_len": 32}
    target = Target.parse("60%")
    model = tiny_model("llama-mha")
    ctx = _ctx(model)
    expect, _ = _one_shot_reference(model, ctx, cfg, target)
    res = LLMPruner({**cfg, "iterative_steps": 1}).prune(model, target, ctx)
    assert {i: {k: v for k, v in lp.items() if k in ("kv_heads", "mlp")} for i, lp in res.plan["layers"].items()} \
        == expect
    assert "steps" not in res.notes and [d.samples for d in ctx.drawn] == [4]
    again = tiny_model("llama-mha")
    assert LLMPruner(cfg).prune(again, target, _ctx(again)).plan == res.plan  # the default is one step


@needs_assets
def test_iterative_steps_follow_the_linear_schedule_and_reach_the_target():
    """Two steps: the first removes half of what is removed (rounded to whole KV groups the official way),
    the second reaches the one-shot widths; fresh gradients on the pruned model change the choice."""
    cfg = {"calib_samples": 4, "calib_seq_len": 32}
    target = Target.parse("50%")
    one = tiny_model("llama-mha")  # 3 layers (all pruned), 4 heads × 16, MLP 96
    dense = footprint(one)
    res1 = LLMPruner(cfg).prune(one, target, _ctx(one))
    two = tiny_model("llama-mha")
    ctx = _ctx(two)
    res2 = LLMPruner({**cfg, "iterative_steps": 2}).prune(two, target, ctx)
    a_f, m_f = res1.notes["kv_groups_kept"], res1.notes["mlp_kept"]
    steps = res2.notes["steps"]
    assert [s["step"] for s in steps] == [1, 2]
    removed_ch = -(-(4 - a_f) * 16 // 2)  # ceil of half the removed attention channels
    assert steps[0]["kv_groups_kept"] == 4 - removed_ch // 16
    assert steps[0]["mlp_kept"] == 96 - -(-(96 - m_f) // 2)
    assert (steps[1]["kv_groups_kept"], steps[1]["mlp_kept"]) == (a_f, m_f)
    assert adapter_for(two).geometries() == adapter_for(one).geometries()
    assert footprint(two).params == footprint(one).params <= target.goal(dense.params)
    assert res2.plan != res1.plan  # rescored after the first cut
    assert [d.samples for d in ctx.drawn] == [8]  # a fresh draw of calib_samples for every step
    # the composed plan, in the dense numbering, reproduces the iteratively pruned model
    from compress import Plan, apply_plan

    ref = tiny_model("llama-mha")
    apply_plan(ref, Plan.from_dict(res2.plan))
    for (n1, p1), (n2, p2) in zip(two.named_parameters(), ref.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_iterative_ratio_schedule_is_torch_prunings_linear_scheduler():
    """With pruning_ratio r, step k of S prunes to r·k/S of the initial channels (official MetaPruner)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    pruner = LLMPruner({"pruning_ratio": 0.5, "iterative_steps": 4})
    summary = pruner.plan_shapes(model, Target.parse("100%"))
    ratios = [(k / 4.0) * 0.5 for k in range(1, 5)]
    assert [s["pruning_ratio"] for s in summary["steps"]] == ratios
    assert [s["kv_groups_kept"] for s in summary["steps"]] == [official_kept_units(3, 64, r) for r in ratios] \
        == [3, 3, 2, 2]
    assert [s["mlp_kept"] for s in summary["steps"]] == [1344, 1152, 960, 768]
    assert summary["kv_groups_kept"] == 2 and summary["mlp_kept"] == 768
    with pytest.raises(ValidationError):
        LLMPrunerConfig(iterative_steps=0)


@needs_assets
@pytest.mark.parametrize("config", [
    {},
    {"importance": "element2", "global_pruning": True},
    {"importance": "vector", "grouping": "max"},
    {"importance": "l1"},
    {"iterative_steps": 2, "global_pruning": True},
], ids=["element1-local", "element2-global", "vector-max", "l1", "iterative-global"])
def test_check_pruner(tmp_path, config):
    report = check_pruner(LLMPruner, tmp_dir=tmp_path, config=config, targets=("60%", "flops:70%"))
    assert len(report) == 6


def test_paper_recipe_is_a_valid_config():
    from pathlib import Path

    import compress_baselines

    from compress.testing import load_recipe

    path = Path(compress_baselines.__file__).parent / "recipes" / "llm_pruner_paper.yaml"
    recipe = load_recipe(path)
    assert recipe.method == "llm_pruner"
    cfg = LLMPrunerConfig(**recipe.settings)
    assert (cfg.importance, cfg.pruning_ratio, cfg.calib_samples, cfg.calib_seq_len) == ("element1", 0.25, 10, 64)
    assert cfg.member_reduction == "sum" and not cfg.global_pruning
