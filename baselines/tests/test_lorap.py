"""LoRAP baseline: AWSVD, rank allocation, least-save MLP pruning, sequential statistics, conformance."""

from __future__ import annotations

import pytest
import torch
from compress_baselines.lorap import (
    LorapConfig,
    LorapPruner,
    afm,
    allocate_ranks,
    awsvd,
    cal_saved_rank,
    mlp_channel_scores,
    mlp_keep,
    plain_svd,
)

from compress import (
    LowRankLinear,
    PruneContext,
    Target,
    TargetError,
    Unsupported,
    count_params,
    footprint,
    get_registry,
)
from compress.testing import (
    DEFAULT_LORA_TARGETS,
    CalibrationSource,
    RecoveryConfig,
    assets_dir,
    check_pruner,
    recover,
    resolve_lora_targets,
    tiny_model,
    tiny_tokenizer,
)
from conftest import needs_assets

NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def source():
    if assets_dir() is None:
        pytest.skip("needs $COMPRESS_ASSETS")
    return CalibrationSource.from_spec("tinystories", tiny_tokenizer(), seed=0, max_chars=150_000)


def _prune(kind: str, target: str, source, **settings):
    model = tiny_model(kind)
    arch = get_registry().adapter_for(model)
    pruner = LorapPruner({"calib_samples": 8, "calib_seq_len": 32, **settings})
    t = Target.parse(target)
    pruner.check(model, t)
    ctx = PruneContext(arch=arch, tokenizer=tiny_tokenizer(), calibration=source, progress=False, log=lambda m: None)
    return pruner.prune(model, t, ctx)


# ---------------------------------------------------------------------------- decompositions
def test_awsvd_full_rank_reproduces_weight():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, generator=g)
    x_sq = torch.rand(5, generator=g) + 0.1
    left, right = awsvd(w, x_sq, rank=5)
    assert left.shape == (6, 5) and right.shape == (5, 5)
    torch.testing.assert_close(left @ right, w, atol=1e-5, rtol=1e-5)


def test_awsvd_truncated_matches_direct_weighted_svd():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(7, 6, generator=g, dtype=torch.float64)
    x_sq = torch.rand(6, generator=g, dtype=torch.float64) + 0.05
    x_sq[2] = 0.0  # a dead input channel: its norm is clamped to 1e-4 as in the official code
    r = 3
    d = x_sq.sqrt()
    d[d == 0] = 1e-4
    D = torch.diag(d)
    U, S, Vh = torch.linalg.svd(w @ D, full_matrices=False)
    direct = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r] @ torch.linalg.inv(D)
    left, right = awsvd(w, x_sq, rank=r)
    assert left.shape == (7, r) and right.shape == (r, 6)
    got = (left @ right).double()
    # weighted by D (the dead column is divided by 1e-4, which magnifies fp32 rounding 1e4 times)
    torch.testing.assert_close(got * d[None, :], direct * d[None, :], atol=1e-5, rtol=1e-5)
    live = [0, 1, 3, 4, 5]
    torch.testing.assert_close(got[:, live], direct[:, live], atol=1e-5, rtol=1e-5)
    # S^1/2 is split evenly: both factors carry the same singular-value scale
    torch.testing.assert_close(left.norm(dim=0), (right * d.float()[None, :]).norm(dim=1), atol=1e-4, rtol=1e-4)
    # weighting matters: the truncated product differs from a plain truncated SVD
    plain_l, plain_r = plain_svd(w, r)
    assert (plain_l @ plain_r - left @ right).abs().max() > 1e-3


def test_awsvd_beats_svd_on_weighted_error():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 12, generator=g)
    x = torch.randn(500, 12, generator=g) * torch.linspace(0.05, 3.0, 12)  # uneven input scales
    x_sq = x.square().mean(0)
    la, ra = awsvd(w, x_sq, 4)
    ls, rs = plain_svd(w, 4)
    err_aw = (x @ (w - la @ ra).T).square().mean()
    err_svd = (x @ (w - ls @ rs).T).square().mean()
    assert err_aw < err_svd


def test_afm_projects_on_output_principal_directions():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(5, 5, generator=g)
    y = torch.randn(200, 5, generator=g) @ torch.diag(torch.tensor([5.0, 3.0, 1.0, 0.1, 0.01]))
    left, right = afm(w, y.mean(0), y.T @ y / y.shape[0], rank=5)
    torch.testing.assert_close(left @ right, w, atol=1e-4, rtol=1e-4)  # full rank: orthonormal basis
    left, right = afm(w, y.mean(0), y.T @ y / y.shape[0], rank=2)
    assert left.shape == (5, 2) and torch.allclose(left.T @ left, torch.eye(2), atol=1e-5)
    assert set(left.abs().argmax(0).tolist()) == {0, 1}  # the two high-variance output axes


# ---------------------------------------------------------------------------- rank allocation
@pytest.mark.parametrize(("s", "qk", "vo"), [(0.2, 1228, None), (0.3, 819, None), (0.5, 512, 1536)])
def test_rank_table_llama7b(s, qk, vo):
    d = 4096
    ranks = allocate_ranks(s, dict.fromkeys(NAMES, (d, d)), d, 3.0)
    assert ranks == {"q_proj": qk, "k_proj": qk, "v_proj": vo, "o_proj": vo}
    _, k_min, k_max = cal_saved_rank(s, d, 3)
    assert k_min == qk and (k_max == 1536 if vo else k_max == 2048)
    kept = sum(d * d if ranks[n] is None else ranks[n] * 2 * d for n in NAMES)
    assert kept <= (1 - s) * 4 * d * d and kept >= (1 - s) * 4 * d * d - 4 * 2 * d  # s of the block, to a rank


@pytest.mark.parametrize("s", [0.0, 0.1, 0.25, 0.4, 0.6, 0.8])
def test_gqa_allocation_honours_s(s):
    d, kv = 576, 192  # SmolLM2-135M: 9 query heads, 3 KV heads of 64
    shapes = {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d)}
    ranks = allocate_ranks(s, shapes, d, 3.0)
    dense = {n: shapes[n][0] * shapes[n][1] for n in NAMES}
    cost = {n: dense[n] if ranks[n] is None else ranks[n] * sum(shapes[n]) for n in NAMES}
    assert sum(cost.values()) <= (1 - s) * sum(dense.values())
    for n in NAMES:  # a linear is low-rank only where that is smaller
        if ranks[n] is not None:
            assert cost[n] < dense[n]
    assert ranks["q_proj"] == ranks["k_proj"] or ranks["k_proj"] is None
    if s == 0.0:
        assert set(ranks.values()) == {None}  # nothing to remove: everything stays dense
    if s <= 0.3:  # V+O's share covers their dense size (as for LLaMA-7B at s <= 1/3)
        assert ranks["v_proj"] is None and ranks["o_proj"] is None
    if all(ranks[n] is not None for n in NAMES):  # nothing dense: V+O get 3x the parameters of Q+K
        ratio = (cost["v_proj"] + cost["o_proj"]) / (cost["q_proj"] + cost["k_proj"])
        assert 2.9 < ratio < 3.1


# ---------------------------------------------------------------------------- MLP
def test_mlp_scores_follow_the_official_formula():
    g = torch.Generator().manual_seed(4)
    gate, up, down = torch.randn(10, 4, generator=g), torch.randn(10, 4, generator=g), torch.randn(4, 10, generator=g)
    x_sq, h_sq = torch.rand(4, generator=g), torch.rand(10, generator=g)
    s = mlp_channel_scores(gate, up, down, x_sq, h_sq)
    c = 3
    want = ((up[c].abs() * x_sq.sqrt()).norm() + (gate[c].abs() * x_sq.sqrt()).norm()
            + (down[:, c].abs() * h_sq[c].sqrt()).norm())
    torch.testing.assert_close(s[c], want)


def test_least_save_keeps_the_bottom_one_percent():
    scores = torch.arange(200, dtype=torch.float32).flip(0)  # channel 199 scores lowest
    keep = mlp_keep(scores, sparsity=0.5, least_save=0.01)
    assert len(keep) == 100
    assert 199 in keep and 198 in keep  # the two lowest (1% of 200) survive
    assert all(c not in keep for c in range(98, 198))  # the next 100 lowest go
    no_save = mlp_keep(scores, sparsity=0.5, least_save=0.0)
    assert no_save == list(range(100))


@needs_assets
def test_least_save_in_a_pruned_model(source):
    """With ratio 0.05 (4 of 96 channels), the 4 lowest-scoring channels of each layer are kept."""
    res = _prune("llama-mha", "70%", source, sublayers=["mlp"], mlp_least_save_ratio=0.05)
    res0 = _prune("llama-mha", "70%", source, sublayers=["mlp"], mlp_least_save_ratio=0.0)
    s = res.plan["sparsity"]
    assert res.plan["sizing"]["mlp_channels"] == res0.plan["sizing"]["mlp_channels"]
    for i in range(3):
        kept, kept0 = set(res.plan["layers"][str(i)]["mlp"]), set(res0.plan["layers"][str(i)]["mlp"])
        assert len(kept) == len(kept0) == 96 - (int((s + 0.05) * 96) - int(0.05 * 96))
        assert len(kept - kept0) >= 1  # some bottom channels rescued, ...
    # ... and they are exactly the lowest-scoring ones: recompute the scores on the dense layer 0
    # (layer 0's inputs do not depend on earlier compression)
    model = tiny_model("llama-mha")
    from compress import record
    from compress.testing import run_calibration

    mlp = model.model.layers[0].mlp
    with record({"x": mlp.gate_proj, "h": mlp.down_proj}) as st:
        run_calibration(model, source.batches(8, 32), batch_size=8, progress=False)
    scores = mlp_channel_scores(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight,
                                st["x"].mean_sq, st["h"].mean_sq)
    lowest = torch.argsort(scores)[:4].tolist()
    assert set(lowest) <= set(res.plan["layers"]["0"]["mlp"])
    assert not set(lowest) & set(res0.plan["layers"]["0"]["mlp"])


# ---------------------------------------------------------------------------- sizing and shapes
def test_kv_target_refused():
    with pytest.raises(Unsupported, match="KV cache is unchanged"):
        LorapPruner().check(tiny_model("llama-gqa"), Target.parse("kv:50%"))


def test_config_defaults_and_validation():
    cfg = LorapConfig()
    assert (cfg.calib_samples, cfg.calib_seq_len, cfg.para_allocate, cfg.mlp_least_save_ratio) == (128, 128, 3.0, 0.01)
    assert LorapConfig(decomposition="AWSVD").decomposition == "awsvd"
    with pytest.raises(ValueError):
        LorapConfig(decomposition="qr")
    with pytest.raises(ValueError):
        LorapConfig(sparsity=1.0)
    with pytest.raises(ValueError):
        LorapConfig(lora=1)


def test_official_sparsity_must_meet_the_target():
    model = tiny_model("llama-gqa")
    with pytest.raises(TargetError, match="sparsity=0.1"):
        LorapPruner({"sparsity": 0.1}).check(model, Target.parse("60%"))
    LorapPruner({"sparsity": 0.1}).check(model, Target.parse("100%"))
    with pytest.raises(TargetError, match="smallest"):
        LorapPruner().check(model, Target.parse("1%"))


@pytest.mark.parametrize("target", ["80%", "60%", "flops:95%"])
def test_plan_shapes_meets_target_on_meta(target):
    from transformers import AutoModelForCausalLM

    from compress.testing import tiny_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("llama-gqa"))
    t = Target.parse(target)
    dense = footprint(model)
    summary = LorapPruner().plan_shapes(model, t)
    after = footprint(model)
    value = after.params if t.metric == "params" else after.flops_per_token
    assert value == summary["predicted"] <= summary["goal"]
    assert isinstance(model.model.layers[0].self_attn.q_proj, LowRankLinear)
    assert after.kv_bytes_per_token == dense.kv_bytes_per_token
    assert 0 < summary["sparsity"] < 1


# ---------------------------------------------------------------------------- end to end
@needs_assets
def test_check_pruner_conformance(tmp_path):
    report = check_pruner(LorapPruner, tmp_dir=tmp_path, targets=("60%", "80%"))
    assert len(report) == 6 and all(r["format"] == "compress" for r in report)


@needs_assets
@pytest.mark.parametrize("decomposition", ["svd", "afm"])
def test_other_decompositions_conform(tmp_path, decomposition):
    check_pruner(LorapPruner, tmp_dir=tmp_path, targets=("70%",), kinds=("qwen2",),
                 config={"decomposition": decomposition})


@needs_assets
def test_sequential_statistics_come_from_compressed_layers(source):
    """Layer 1 is factorised with the input norms it sees AFTER layer 0 was compressed."""
    dense = tiny_model("llama-mha")
    res = _prune("llama-mha", "90%", source, sublayers=["self_attn"])
    pruned = res.model
    q1 = pruned.model.layers[1].self_attn.q_proj
    assert isinstance(q1, LowRankLinear)
    from compress import record
    from compress.testing import run_calibration

    blocks = source.batches(8, 32)

    def q_input_sq(model):
        with record({"q": model.model.layers[1].self_attn.q_proj}) as st:
            run_calibration(model, blocks, batch_size=8, progress=False)
        return st["q"].mean_sq

    w = dense.model.layers[1].self_attn.q_proj.weight
    seq_l, seq_r = awsvd(w, q_input_sq(pruned), q1.rank)
    torch.testing.assert_close(q1.weight, seq_l @ seq_r, atol=1e-4, rtol=1e-3)
    dense_l, dense_r = awsvd(w, q_input_sq(dense), q1.rank)
    assert (q1.weight - dense_l @ dense_r).abs().max() > 1e-3  # not the dense model's statistics


@needs_assets
def test_lora_recovery_trains_the_factors(source):
    res = _prune("llama-gqa", "70%", source)
    model = res.model
    names = resolve_lora_targets(model, DEFAULT_LORA_TARGETS)
    assert "model.layers.0.self_attn.q_proj.A" in names and "model.layers.0.self_attn.q_proj.B" in names
    n_before = count_params(model)
    a_before = model.model.layers[0].self_attn.q_proj.A.weight.detach().clone()
    out = recover(model, source, RecoveryConfig(tokens=1024, seq_len=32, batch_size=4, mode="lora", lr=1e-3),
                  progress=False).model
    q = out.model.layers[0].self_attn.q_proj
    assert isinstance(q, LowRankLinear) and count_params(out) == n_before  # no dense re-materialising
    assert not torch.equal(q.A.weight, a_before)


@needs_assets
def test_pruning_is_deterministic(source):
    a = _prune("llama-gqa", "70%", source).model
    b = _prune("llama-gqa", "70%", source).model
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
