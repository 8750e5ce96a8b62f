"""Mixture of experts (``qwen3_moe``): a tiny random-weight Qwen3-MoE (hidden 64, 3 layers, vocab 512, 4 experts
of 32 channels, top 2 in every layer) from transformers' own config class.

* the per-expert salience TransAct uses is the L2 norm of that expert's down_proj input over exactly the tokens
  routed to it (against a hand computation that also reproduces the experts' output);
* a cut model equals a stock Qwen3MoeForCausalLM whose fused expert weights are sliced by hand, and its saved
  folder reloads in stock transformers (and through compress's own loader) with equal logits;
* sizing costs one expert channel E times in parameters and top-k times in FLOPs, and FLOPs/token count the
  ACTIVE experts (= FlopCounterMode over a decode step and a prefill), KV bytes are what the cache holds;
* TransAct (every target kind, shots, gqa=auto's masking), the floors and depth are correct on it (the
  conformance suite runs in tests/test_families.py); the other methods are refused there before any weight;
* TransAct reports the router's load per expert before and after the cut.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from compress.calib.stats import CURRENT_MASK, record_experts, record_routing
from compress.errors import Unsupported, UsageError
from compress.model.footprint import (
    count_params,
    flops_per_token,
    footprint,
    kv_bytes_per_token,
    param_breakdown,
)
from compress.model.plan import LayerPlan, Plan
from compress.model.sizing import shape_plan, solve_uniform, unit_costs
from compress.model.structures import structure_group
from compress.model.surgery import apply_plan
from compress.plugins import get_registry
from compress.target import Target
from compress.testing import check_adapter, check_pruner, tiny_config, tiny_model
from conftest import hand_sliced_attention

REG = get_registry()
E, K, W, H, V, L = 4, 2, 32, 64, 512, 3  # experts, top-k, expert width, hidden, vocabulary, layers
IDS = torch.tensor([[1, 17, 250, 33, 401, 5, 98, 12, 7, 300]])


def _meta(**overrides):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("qwen3_moe")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def _eager(model):
    """Eager attention and the eager experts loop: what FlopCounterMode counts (not the grouped_mm kernel)."""
    model.config._attn_implementation = "eager"
    model.set_experts_implementation("eager")
    return model


def _keep(seed: int, width: int, of: int = W) -> list[list[int]]:
    """A different set of ``width`` of ``of`` channels for each expert."""
    g = torch.Generator().manual_seed(seed)
    return [sorted(torch.randperm(of, generator=g)[:width].tolist()) for _ in range(E)]


# ------------------------------------------------------------------------------ the adapter
def test_qwen3_moe_adapter_reads_the_fused_experts():
    model = tiny_model("qwen3_moe")
    arch = REG.adapter_for(model)
    assert type(arch).__name__ == "Qwen3MoeAdapter" and set(arch.features) == {"foldable_norms"}
    ex = arch.experts(1)
    assert (ex.num_experts, ex.top_k, ex.intermediate, ex.hidden) == (E, K, W, H)
    assert ex.module is model.model.layers[1].mlp.experts and ex.router is model.model.layers[1].mlp.gate
    g = arch.geometry(0)
    assert (g.hidden, g.num_heads, g.num_kv_heads, g.head_dim, g.intermediate) == (H, 4, 2, 16, W)
    assert REG.adapter_for(tiny_model("qwen3")).experts(0) is None  # dense families have none
    for call in (lambda: arch.down_proj(0), lambda: arch.mlp_linears(0), lambda: arch.proj_rows(0, "gate")):
        with pytest.raises(Unsupported, match="fused 3-D weights") as e:
            call()
        assert "\n" not in str(e.value)
    with pytest.raises(Unsupported, match="torch-pruning"):  # its tracer cannot follow 3-D expert weights
        check_adapter(model)
    with pytest.raises(UsageError, match="router and every expert"):
        apply_plan(model, Plan(hidden=list(range(32))))


@pytest.mark.parametrize("overrides", [{"mlp_only_layers": [1]}, {"decoder_sparse_step": 2}])
def test_dense_mlp_layers_among_the_experts_are_refused_from_the_config(overrides):
    model = _meta(**overrides)  # config only: no weight exists
    assert all(p.is_meta for p in model.parameters())
    with pytest.raises(Unsupported, match="dense-MLP layers") as e:
        REG.adapter_for(model)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------ salience over routed tokens
def test_expert_salience_is_the_l2_norm_over_the_tokens_routed_to_the_expert():
    """record_experts against a hand computation over the router's choice, padded positions left out; the hand
    formula is what the experts compute (Σ_k weight · down_e(act(gate_e x) · up_e x) is the module's output)."""
    model = tiny_model("qwen3_moe")  # the default grouped_mm experts kernel
    ex = REG.adapter_for(model).experts(1)
    seen: dict = {}

    def grab(_mod, args, out):
        seen.update(x=args[0].detach(), idx=args[1].detach(), w=args[2].detach(), out=out.detach())

    ids = torch.randint(3, V, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 7:] = False  # a padded tail
    hook = ex.module.register_forward_hook(grab)
    token = CURRENT_MASK.set(mask)
    try:
        with torch.no_grad(), record_experts({"1": ex}) as stats:
            model(ids)
    finally:
        CURRENT_MASK.reset(token)
        hook.remove()
    x, idx, w = seen["x"], seen["idx"], seen["w"]
    gu, down = ex.gate_up_weight.detach(), ex.down_weight.detach()
    sumsq = torch.zeros(E, W, dtype=torch.float64)
    routed = torch.zeros(E, dtype=torch.long)
    for t in range(x.shape[0]):
        out = torch.zeros(H)
        for j, e in enumerate(idx[t].tolist()):
            a = torch.nn.functional.silu(gu[e, :W] @ x[t]) * (gu[e, W:] @ x[t])
            out += w[t, j] * (down[e] @ a)
            if mask.reshape(-1)[t]:
                sumsq[e] += a.double() ** 2
                routed[e] += 1
        torch.testing.assert_close(out, seen["out"][t], rtol=1e-4, atol=1e-6)
    st = stats["1"]
    assert st.tokens == int(mask.sum()) and torch.equal(st.routed, routed) and int(routed.sum()) == K * st.tokens
    torch.testing.assert_close(st.l2.double(), sumsq.sqrt(), rtol=1e-5, atol=1e-7)
    assert st.l2.shape == (E, W)


def test_record_routing_counts_the_routers_choice():
    model = tiny_model("qwen3_moe")
    arch = REG.adapter_for(model)
    experts = {str(i): arch.experts(i) for i in range(L)}
    chosen = []
    hook = arch.experts(2).router.register_forward_hook(lambda m, a, out: chosen.append(out[2].detach()))
    with torch.no_grad(), record_routing(experts) as counts:
        model(IDS)
    hook.remove()
    assert all(int(c.sum()) == K * IDS.numel() for c in counts.values())
    assert torch.equal(counts["2"], torch.bincount(chosen[0].reshape(-1), minlength=E))


# ------------------------------------------------------------------------------ the cut against a hand-sliced model
def _hand_sliced(sd: dict, heads: list[int], kv: list[int], keep: list[list[int]]):
    """A stock Qwen3MoeForCausalLM with ``heads`` / ``kv`` heads and ``len(keep[e])`` channels per expert whose
    weights are cut by hand from the dense ``sd``: expert e keeps rows ``keep[e]`` of its gate and of its up
    half of gate_up_proj, and those columns of its down_proj."""
    from transformers import AutoModelForCausalLM

    hd = 16
    cfg = tiny_config("qwen3_moe")
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = len(heads), len(kv), hd
    cfg.moe_intermediate_size = len(keep[0])
    ref = AutoModelForCausalLM.from_config(cfg).eval()

    new = {}
    for k, v in sd.items():
        v = hand_sliced_attention(k, v, heads, kv, hd)
        if k.endswith("experts.gate_up_proj"):
            v = torch.stack([torch.cat([v[e, :W][ks], v[e, W:][ks]]) for e, ks in enumerate(keep)])
        elif k.endswith("experts.down_proj"):
            v = torch.stack([v[e][:, ks] for e, ks in enumerate(keep)])
        new[k] = v
    missing, unexpected = ref.load_state_dict(new, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return ref


def test_pruned_equals_a_hand_sliced_stock_model_and_reloads_equal(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen3MoeForCausalLM

    from compress.io.export import export_model
    from compress.io.loading import load_model

    model = tiny_model("qwen3_moe")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    keep = _keep(1, 16)
    assert len({tuple(k) for k in keep}) == E  # every expert its own channels
    apply_plan(model, Plan(layers={i: LayerPlan(kv_heads=[1], experts=keep) for i in range(L)}))
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape == (E, 32, H)
    assert model.model.layers[0].mlp.experts.intermediate_dim == 16 and model.config.moe_intermediate_size == 16
    ref = _hand_sliced(sd, [2, 3], [1], keep)
    with torch.no_grad():
        logits = model(IDS).logits
        assert torch.allclose(logits, ref(IDS).logits, atol=1e-5)
        gen = model.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(gen, ref.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0))
    info = export_model(model, None, tmp_path / "out", kind="auto", plan={}, overwrite=True)
    assert info["kind"] == "stock"
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (cfg["moe_intermediate_size"], cfg["intermediate_size"], cfg.get("num_experts", cfg.get("num_local_experts"))) == (16, 96, E)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (2, 1)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert isinstance(reloaded, Qwen3MoeForCausalLM)
    ours = load_model(str(tmp_path / "out")).model.eval()  # compress's loader checks the per-expert checkpoint
    with torch.no_grad():
        assert torch.allclose(reloaded(IDS).logits, logits, atol=1e-5)
        assert torch.allclose(ours(IDS).logits, logits, atol=1e-5)


def test_a_config_that_lies_about_the_expert_width_is_refused(tmp_path):
    from compress.io.export import export_model
    from compress.io.loading import load_config

    export_model(tiny_model("qwen3_moe"), None, tmp_path / "out", kind="auto", plan={}, overwrite=True)
    path = tmp_path / "out" / "config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({**cfg, "moe_intermediate_size": 16}))
    with pytest.raises(UsageError, match=r"moe_intermediate_size=16") as e:
        load_config(str(tmp_path / "out"))
    assert "\n" not in str(e.value)


def test_expert_plans_are_checked_and_compose():
    model = tiny_model("qwen3_moe")
    bad = {"same number": [list(range(8))] * 3 + [list(range(16))],
           "runs multiples of 8": [list(range(12))] * E,
           "which has 4": [list(range(8))] * 3,
           "outside": [list(range(24, 40, 2))] * E}
    for why, experts in bad.items():
        with pytest.raises(UsageError, match=why):
            apply_plan(copy.deepcopy(model), Plan(layers={0: LayerPlan(experts=experts)}))
    with pytest.raises(UsageError, match="experts"):
        apply_plan(copy.deepcopy(model), Plan(layers={0: LayerPlan(mlp=list(range(8)))}))
    with pytest.raises(UsageError, match="dense"):
        apply_plan(tiny_model("qwen3"), Plan(layers={0: LayerPlan(experts=[list(range(8))] * E)}))
    # two cuts compose into one plan in the dense numbering (and it round-trips through JSON)
    first = Plan(layers={i: LayerPlan(experts=_keep(2, 24)) for i in range(L)})
    second = Plan(layers={i: LayerPlan(experts=_keep(3, 8, of=24)) for i in range(L)})
    twice = apply_plan(apply_plan(copy.deepcopy(model), first), second)
    plan = Plan.from_dict(json.loads(json.dumps(first.compose(second).to_dict())))
    once = apply_plan(copy.deepcopy(model), plan)
    with torch.no_grad():
        assert torch.equal(twice(IDS).logits, once(IDS).logits)


def test_magnitude_scores_each_channel_of_each_expert():
    """The floors' structure group of an MoE layer: channel j of expert e (unit e·W + j) owns its gate and up rows
    of that expert's gate_up_proj and its column of down_proj."""
    model = tiny_model("qwen3_moe")
    arch = REG.adapter_for(model)
    group = structure_group(arch, "mlp", 2)
    assert group.units == E * W
    with torch.no_grad():
        got = group.reduce(lambda m: m.blocks().float().pow(2).sum(dim=(1, 2)))
        gu, down = arch.experts(2).gate_up_weight, arch.experts(2).down_weight
        want = gu[:, :W].pow(2).sum(-1) + gu[:, W:].pow(2).sum(-1) + down.pow(2).sum(1)  # [E, W]
    torch.testing.assert_close(got, want.reshape(-1))


# ------------------------------------------------------------------------------ sizing and footprints
def test_sizing_costs_every_expert_in_params_and_the_active_ones_in_flops():
    arch = REG.adapter_for(tiny_model("qwen3_moe"))
    costs = unit_costs(arch, 0, "kv_group", 2048, 4)
    assert costs["params"][1] == E * 3 * H and costs["flops"][1] == K * 6 * H and costs["kv"][1] == 0
    for text in ("60%", "flops:70%", "kv:50%"):
        target = Target.parse(text)
        w = solve_uniform(arch, target, mlp_round_to=1)
        assert w.mlp % 8 == 0 and w.mlp_round_to == 8  # the grouped_mm experts kernel runs multiples of 8
        cut = apply_plan(copy.deepcopy(arch.model), shape_plan(arch, w))
        assert footprint(cut).of(target.metric) == pytest.approx(w.predicted) and w.predicted <= w.goal
    pruner = REG.pruners["transact"]({"gqa": "groups"})
    meta = _meta()
    summary = pruner.plan_shapes(meta, Target.parse("60%"))  # a dry run cuts the meta-device model
    assert summary["f"] == meta.model.layers[0].mlp.experts.down_proj.shape[-1] and summary["experts"] == E


@pytest.mark.parametrize("pruned", [False, True])
def test_flops_count_the_router_and_the_top_k_experts(pruned):
    """FLOPs/token: 2·H·E for the router + top_k · 6·H·W for the experts a token meets, against FlopCounterMode on
    a decode step over a real cache and on a prefill; the parameters count every expert; KV bytes are what the
    real past_key_values hold."""
    from compress.model.footprint import linear_flops_per_token

    model = _eager(tiny_model("qwen3_moe"))
    heads, kv, width = 4, 2, W
    if pruned:
        apply_plan(model, Plan(layers={i: LayerPlan(kv_heads=[0], experts=_keep(4, 8)) for i in range(L)}))
        heads, kv, width = 2, 1, 8
    attn = 2 * H * (heads + 2 * kv) * 16 + 2 * heads * 16 * H
    assert linear_flops_per_token(model) == L * (attn + 2 * H * E + K * 6 * H * width) + 2 * H * V
    T = 20
    ids = torch.randint(3, V, (1, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        with FlopCounterMode(display=False) as fc:  # one decode step at context T + 1
            model(ids[:, :1], past_key_values=cache, use_cache=True)
        assert fc.get_total_flops() == flops_per_token(model, T + 1)
        with FlopCounterMode(display=False) as fc:
            model(ids, use_cache=False)
        assert fc.get_total_flops() == T * flops_per_token(model, T)
    assert kv_bytes_per_token(model, seq_len=T) == held / T == L * 2 * kv * 16 * 4
    assert count_params(model) == sum(p.numel() for p in model.parameters())
    assert param_breakdown(model)["mlp"] == L * (E * 3 * H * width + E * H)  # every expert and the router


# ------------------------------------------------------------------------------ the methods
@pytest.mark.parametrize(("target", "settings"), [("kv:50%", {}), ("flops:70%", {"gqa": "heads"}),
                                                  ("60%", {"shots": 2, "gqa": "groups"})])
def test_transact_targets_and_shots_on_moe(target, settings, tmp_path, assets):
    report = check_pruner(REG.get("transact"), tmp_dir=tmp_path, config=settings, targets=(target,),
                          kinds=("qwen3_moe",))
    assert report[0]["format"] == "stock" and report[0]["reload_max_diff"] <= 1e-5


def test_gqa_auto_masking_of_expert_channels_computes_the_cut():
    """gqa=auto scores its candidates by masking: zeroing an expert's pruned columns of down_proj for the forward
    computes what the cut model computes, and the dense weights are back afterwards."""
    from compress_transact.transact import _masked

    model = tiny_model("qwen3_moe")
    arch = REG.adapter_for(model)
    down = model.model.layers[0].mlp.experts.down_proj
    before = down.detach().clone()
    ids = torch.randint(3, V, (2, 12), generator=torch.Generator().manual_seed(1))
    plan = Plan(layers={i: LayerPlan(kv_heads=[1], experts=_keep(5 + i, 8)) for i in range(L)})
    with torch.no_grad(), _masked(arch, plan):
        masked = model(ids).logits
    cut = apply_plan(copy.deepcopy(model), plan)
    with torch.no_grad():
        assert torch.allclose(masked, cut(ids).logits, atol=1e-5)
    assert model.model.layers[0].mlp.experts.down_proj is down and torch.equal(down, before)


def test_transact_reports_the_router_load_before_and_after(assets):
    from compress.calib.sources import CalibrationSource
    from compress.pruner import PruneContext
    from compress.testing import tiny_tokenizer

    tok = tiny_tokenizer()

    def ctx(model):
        calib = CalibrationSource.from_spec("tinystories", tok, seed=0, max_chars=200_000)
        return PruneContext(arch=REG.adapter_for(model), tokenizer=tok, calibration=calib, seed=0, progress=False,
                            log=lambda m: None)

    model = tiny_model("qwen3_moe")
    result = REG.pruners["transact"]({"calib_samples": 12, "calib_seq_len": 64}).prune(model, Target.parse("60%"),
                                                                                    ctx(model))
    load = result.notes["router_load"]
    assert load["tokens"] == 8 * 64 and sorted(load["layers"]) == ["0", "1", "2"]  # the first 8 blocks
    changes = []
    for shares in load["layers"].values():
        for side in ("before", "after"):
            assert len(shares[side]) == E and min(shares[side]) >= 0
            assert sum(shares[side]) == pytest.approx(1.0, abs=1e-5)
        changes += [abs(a - b) for a, b in zip(shares["after"], shares["before"], strict=True)]
    assert load["max_change"] == pytest.approx(max(changes), abs=2e-6) and load["max_change"] > 0
    assert result.notes["widths"]["experts"] == E and result.notes["widths"]["top_k"] == K
    # "before" is the dense model's routing of the same blocks
    dense = tiny_model("qwen3_moe")
    c = ctx(dense)
    blocks = c.draw(12, 64)[:8]
    dense_load = c.router_load(dense, blocks, batch_size=4)
    for i, shares in load["layers"].items():
        assert shares["before"] == pytest.approx(dense_load[int(i)], abs=1e-6)


def test_depth_removes_whole_moe_layers_at_their_active_cost():
    """Depth pruning is correct on MoE: a layer's FLOPs are its attention, router and top-k experts, and the layers'
    costs add up to the model's."""
    from compress_baselines.depth import layer_costs

    model = tiny_model("qwen3_moe")
    arch = REG.adapter_for(model)
    costs = layer_costs(arch)
    assert sum(c["flops"] for c in costs) + 2 * H * V == flops_per_token(model, 2048)
    assert sum(c["params"] for c in costs) + count_params(arch.embed_tokens) + count_params(arch.lm_head) \
        + H == count_params(model)


def test_layerwise_calibration_gives_the_same_plan_and_load(assets):
    """--layerwise runs one decoder layer at a time: the experts' hooks see the same tokens and routing."""
    from compress.calib.sources import CalibrationSource
    from compress.pruner import PruneContext
    from compress.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    results = []
    for layerwise in (False, True):
        calib = CalibrationSource.from_spec("tinystories", tok, seed=0, max_chars=200_000)
        model = tiny_model("qwen3_moe")
        ctx = PruneContext(arch=REG.adapter_for(model), tokenizer=tok, calibration=calib, seed=0, progress=False,
                           log=lambda m: None, layerwise=layerwise)
        pruner = REG.pruners["transact"]({"calib_samples": 8, "calib_seq_len": 64, "gqa": "groups"})
        r = pruner.prune(model, Target.parse("60%"), ctx)
        results.append((r.plan, r.notes["router_load"]))
    assert results[0] == results[1]
    assert all(len(lp["experts"]) == E for lp in results[0][0]["layers"].values())


def test_streamed_weights_are_refused_with_the_reason(tmp_path):
    """--stream-weights reads tensors by their names in the files; a Mixture-of-Experts checkpoint holds one tensor
    per expert, which transformers fuses on load: refused in one line, not reported as an incomplete checkpoint."""
    from compress.io.export import export_model
    from compress.io.streaming import WeightStream

    export_model(tiny_model("qwen3_moe"), None, tmp_path / "out", kind="auto", plan={}, overwrite=True)
    with pytest.raises(Unsupported, match="drop --stream-weights") as e:
        WeightStream(tmp_path / "out", _meta(), torch.float32)
    assert "\n" not in str(e.value)
