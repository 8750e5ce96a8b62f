"""Depth pruning (ShortGPT Block Influence): scores, sizing, refusals, surgery + KV cache, export, dry run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from compress_baselines.depth import DepthPruner, block_influence, removal_order, solve_depth

from compress import (
    PruneContext,
    Target,
    TargetError,
    Unsupported,
    count_params,
    footprint,
    get_registry,
)
from compress.testing import (
    CalibrationSource,
    RunSpec,
    assets_dir,
    check_pruner,
    dry_run,
    export_model,
    run,
    tiny_config,
    tiny_model,
    tiny_tokenizer,
)

pytestmark = pytest.mark.usefixtures("one_thread")
CALIB = {"calib_samples": 8, "calib_seq_len": 32}


@pytest.fixture(scope="module")
def source():
    if assets_dir() is None:
        pytest.skip("needs $COMPRESS_ASSETS")
    return CalibrationSource.from_spec("tinystories", tiny_tokenizer(), seed=0, max_chars=150_000)


def _deep(kind: str = "llama-gqa", layers: int = 6, seed: int = 0, **overrides):
    """A tiny random model like ``tiny_model(kind)`` with ``layers`` decoder layers."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(kind)
    d = cfg.to_dict()
    d.update(num_hidden_layers=layers, layer_types=None, **overrides)
    d = {k: v for k, v in d.items() if k not in ("model_type", "transformers_version", "architectures")}
    cfg = type(cfg)(**d)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(torch.rand(p.shape[0], 1, generator=g) * 1.5 + 0.25)
    return model.eval()


def _identity(model, *layers: int) -> None:
    """Make decoder layers identities of the residual stream: zero o_proj and down_proj."""
    with torch.no_grad():
        for i in layers:
            blk = model.model.layers[i]
            blk.self_attn.o_proj.weight.zero_()
            blk.mlp.down_proj.weight.zero_()


def _ctx(model, source):
    return PruneContext(arch=get_registry().adapter_for(model), tokenizer=tiny_tokenizer(), calibration=source,
                        progress=False, log=lambda m: None)


def _prune(model, target: str, source, **settings):
    pruner = DepthPruner({**CALIB, **settings})
    t = Target.parse(target)
    pruner.check(model, t)
    ctx = _ctx(model, source)
    return pruner.prune(model, t, ctx), ctx


# ---------------------------------------------------------------------------- conformance
def test_conformance_suite(tmp_path):
    report = check_pruner(DepthPruner, tmp_dir=tmp_path, targets=("60%", "kv:50%"))
    assert len(report) == 6
    assert {c["format"] for c in report} == {"stock"}
    assert all(c["reload_max_diff"] == 0.0 for c in report)


def test_registered_with_capabilities():
    cls = get_registry().get("depth")
    assert cls is DepthPruner
    caps = cls.capabilities
    assert caps.structures == ("layers",) and set(caps.targets) == {"params", "flops", "kv"}
    assert caps.summary and "2403.03853" in caps.reference


# ---------------------------------------------------------------------------- block influence
def test_block_influence_formula():
    x = torch.randn(2, 5, 16)
    assert block_influence(x, x) == pytest.approx(0.0, abs=1e-6)
    assert block_influence(x, 3.0 * x) == pytest.approx(0.0, abs=1e-6)  # scale-free
    assert block_influence(x, -x) == pytest.approx(2.0, abs=1e-6)
    y = torch.randn(2, 5, 16)
    expected = 1 - torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1).mean().item()
    assert block_influence(x, y) == pytest.approx(expected, abs=1e-6)
    assert removal_order([0.3, 0.1, 0.1, 0.2]) == [1, 2, 3, 0]  # ties: lower index first


def test_identity_layer_has_zero_bi_and_goes_first(source):
    model = _deep(layers=5)
    _identity(model, 3)
    result, _ = _prune(model, "100%", source, n_prune_layers=1)
    bi = result.plan["block_influence"]
    assert len(bi) == 5
    assert bi[3] == pytest.approx(0.0, abs=1e-5)
    assert min(b for i, b in enumerate(bi) if i != 3) > 1e-3
    assert result.plan["removal_order"][0] == 3 and result.plan["removed_layers"] == [3]
    assert result.plan["kept_layers"] == [0, 1, 2, 4]


def test_scores_match_an_independent_whole_model_pass(source):
    """BI from the layer engine equals 1 - mean cos of consecutive ``output_hidden_states``."""
    model = _deep(layers=4, seed=3)
    blocks = source.batches(CALIB["calib_samples"], CALIB["calib_seq_len"])
    with torch.no_grad():
        hs = model(blocks, output_hidden_states=True).hidden_states
    bi = DepthPruner(CALIB).scores(model, _ctx(model, source))
    for i in range(model.config.num_hidden_layers - 1):  # the last entry of hidden_states may be normed
        assert bi[i] == pytest.approx(block_influence(hs[i], hs[i + 1]), abs=1e-5)


# ---------------------------------------------------------------------------- sizing
@pytest.mark.parametrize("target", ["70%", "45%", "flops:55%", "flops:30%", "kv:40%", "kv:50%", "kv:17%"])
def test_targets_end_at_or_below_with_the_fewest_layers_removed(target, source):
    model = _deep(layers=6)
    layer_params = count_params(model.model.layers[0])
    t = Target.parse(target)
    dense = footprint(model)
    goal = t.goal(dense.of(t.metric))
    result, _ = _prune(model, target, source)
    got = footprint(result.model)
    kept = len(result.plan["kept_layers"])
    assert model.config.num_hidden_layers == kept == len(result.model.model.layers)
    assert 0 < kept < 6
    assert got.of(t.metric) <= goal
    # each metric is affine in the number of kept layers: every removed layer saved the same amount
    one_layer = (dense.of(t.metric) - got.of(t.metric)) / (6 - kept)
    if t.metric == "params":
        assert one_layer == layer_params
    if t.metric == "kv":
        assert one_layer == dense.kv_bytes_per_token / 6
        assert kept == math.floor(t.fraction * 6 + 1e-9)
    # keeping one more layer would be above the goal: as close as whole layers allow
    assert got.of(t.metric) + one_layer > goal
    assert result.plan["sizing"]["predicted"] == pytest.approx(got.of(t.metric), rel=1e-12)


def test_n_prune_layers_is_exact_and_bounded_by_the_target(source):
    model = _deep(layers=6)
    result, _ = _prune(model, "100%", source, n_prune_layers=2)
    assert len(result.plan["kept_layers"]) == 4
    with pytest.raises(TargetError, match="n_prune_layers=1 leaves"):
        DepthPruner({**CALIB, "n_prune_layers": 1}).check(_deep(layers=6), Target.parse("60%"))


@pytest.mark.parametrize(("target", "settings"), [("kv:10%", {}), ("flops:5%", {}), ("20%", {}),
                                                   ("100%", {"n_prune_layers": 3})])
def test_removing_every_layer_is_refused_before_any_work(target, settings, source):
    model = tiny_model("llama-gqa")  # 3 layers; embeddings are ~27 % of the parameters
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = DepthPruner({**CALIB, **settings})
    with pytest.raises(TargetError) as e:
        pruner.check(model, Target.parse(target))
    assert "\n" not in str(e.value) and "layer" in str(e.value)
    ctx = _ctx(model, source)
    with pytest.raises(TargetError):
        pruner.prune(model, Target.parse(target), ctx)
    assert ctx.drawn == []  # refused before drawing calibration blocks
    assert len(model.model.layers) == 3 and model.config.num_hidden_layers == 3
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_unsupported_inputs_refused():
    model = tiny_model("llama-gqa")
    with torch.no_grad():  # layers of different widths (as after a per-layer width method)
        from compress import LayerPlan, Plan, apply_plan

        apply_plan(model, Plan(layers={1: LayerPlan(mlp=list(range(40)))}), get_registry().adapter_for(model))
    with pytest.raises(Unsupported, match="differ"):
        DepthPruner(CALIB).check(model, Target.parse("70%"))


# ---------------------------------------------------------------------------- surgery, KV cache, export
@pytest.mark.parametrize("kind", ["llama-gqa", "llama-mha", "qwen2"])
def test_generate_with_kv_cache_after_removing_middle_layers(kind, source):
    model = _deep(kind, layers=5)
    _identity(model, 1, 3)
    result, _ = _prune(model, "100%", source, n_prune_layers=2)
    assert result.plan["kept_layers"] == [0, 2, 4]
    pruned = result.model
    assert [blk.self_attn.layer_idx for blk in pruned.model.layers] == [0, 1, 2]
    ids = torch.tensor([tiny_tokenizer()("Once upon a time there was a little dog").input_ids])
    with torch.no_grad():
        cached = pruned.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0,
                                 use_cache=True)
        plain = pruned.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0,
                                use_cache=False)
    assert torch.equal(cached, plain)


def test_sliding_layer_types_are_cut_with_the_layers(source, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _deep("qwen2", layers=5, use_sliding_window=True, sliding_window=4, max_window_layers=2)
    types = list(model.config.layer_types)
    assert types == ["full_attention"] * 2 + ["sliding_attention"] * 3
    _identity(model, 1, 3)
    result, _ = _prune(model, "100%", source, n_prune_layers=2)
    pruned = result.model
    assert pruned.config.num_hidden_layers == 3
    assert pruned.config.layer_types == [types[i] for i in (0, 2, 4)]
    ids = torch.tensor([tiny_tokenizer()("Once upon a time there was a little dog who liked to run").input_ids])
    with torch.no_grad():
        cached = pruned.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        plain = pruned.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                                use_cache=False)
        logits = pruned(ids).logits
    assert torch.equal(cached, plain)
    info = export_model(pruned, tiny_tokenizer(), tmp_path / "out", plan={"plan": result.plan})
    assert info["kind"] == "stock"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.layer_types == pruned.config.layer_types
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, logits, atol=1e-6, rtol=0)


def test_export_is_stock_with_fewer_layers(source, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _deep("llama-gqa", layers=6)
    result, _ = _prune(model, "60%", source)
    kept = result.plan["kept_layers"]
    assert 0 < len(kept) < 6
    json.dumps(result.plan)
    assert len(result.plan["block_influence"]) == 6 and all(isinstance(b, float) for b in result.plan["block_influence"])
    assert sorted(kept + result.plan["removed_layers"]) == list(range(6))
    info = export_model(result.model, tiny_tokenizer(), tmp_path / "out", kind=result.export,
                        plan={"plan": result.plan})
    assert info["kind"] == "stock"
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == len(kept)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert len(reloaded.model.layers) == len(kept)
    ids = torch.tensor([tiny_tokenizer()("Once upon a time").input_ids])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, result.model(ids).logits)


# ---------------------------------------------------------------------------- the run and the dry run
def test_run_and_dry_run_agree_on_a_trained_model(stories_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    settings = {"calib_samples": 8, "calib_seq_len": 64}
    planned = dry_run(RunSpec(method="depth", target="70%", model=str(stories_dir), settings=settings,
                              dry_run=True))
    assert planned["export"]["kind"] == "stock"
    assert planned["plan"]["kept"] == 3 and planned["plan"]["removed"] == 2  # 5 layers, tied embeddings
    assert planned["achieved"]["params"] == planned["plan"]["predicted"] <= 0.7 * planned["dense"]["params"]
    res = run(RunSpec(method="depth", target="70%", model=str(stories_dir), calib="tinystories",
                      settings=settings, out=str(tmp_path / "out"), progress=False, evaluate=False))
    assert res.export["kind"] == "stock"
    assert len(res.plan["kept_layers"]) == planned["plan"]["kept"]
    assert res.achieved.params == planned["achieved"]["params"]
    assert res.plan["removed_layers"] == removal_order(res.plan["block_influence"])[:2]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.config.num_hidden_layers == 3


def test_solve_depth_matches_plan_shapes_on_meta():
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("qwen2")
    d = {k: v for k, v in cfg.to_dict().items() if k not in ("model_type", "transformers_version", "architectures")}
    d.update(num_hidden_layers=8, layer_types=None)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(type(cfg)(**d))
    arch = get_registry().adapter_for(meta)
    sizing = solve_depth(arch, Target.parse("flops:50%"))
    summary = DepthPruner(CALIB).plan_shapes(meta, Target.parse("flops:50%"))
    assert summary["kept"] == sizing.kept == len(meta.model.layers) == meta.config.num_hidden_layers
    assert len(meta.config.layer_types) == sizing.kept
    assert footprint(meta).flops_per_token == pytest.approx(summary["predicted"], rel=1e-12)
