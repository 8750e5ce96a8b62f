"""SliceGPT: norm fusion, rotation invariance, shortcuts, sizing, refusals, export and reload."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from compress_baselines.slicegpt import (
    SizeModel,
    SliceDims,
    SliceGPTConfig,
    SliceGPTPruner,
    apply_shapes,
    fuse_norms,
    rotate_and_slice,
    solve_dims,
)
from torch import nn

from compress import (
    PruneContext,
    Target,
    Unsupported,
    adapter_for,
    count_params,
    flops_per_token,
    footprint,
    make_shortcut_layer,
)
from compress.testing import (
    TINY_KINDS,
    check_pruner,
    export_model,
    tiny_config,
    tiny_model,
    tiny_tokenizer,
)
from conftest import needs_assets

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(kind: str, eps: float | None = None) -> nn.Module:
    """A tiny model whose norm scales are not all ones (so fusion has something to fold)."""
    m = tiny_model(kind)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for mod in m.modules():
            if "RMSNorm" in type(mod).__name__:
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) * 1.5 + 0.25)
                if eps is not None:
                    mod.variance_epsilon = eps
    return m


def _ids() -> torch.Tensor:
    return torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(3))


def _logits(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m(ids).logits


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_norm_fusion_keeps_logits(kind):
    m = _model(kind)
    ids = _ids()
    ref = _logits(m, ids)
    arch = adapter_for(m)
    was_tied = arch.tied_embeddings
    fuse_norms(m, arch)
    assert torch.allclose(_logits(m, ids), ref, atol=1e-5, rtol=1e-5)
    assert not arch.tied_embeddings and m.config.tie_word_embeddings is False
    for mod in m.modules():
        if "RMSNorm" in type(mod).__name__:
            assert torch.equal(mod.weight, torch.ones_like(mod.weight))
    if was_tied:  # fusion folded the final norm into the head only, the embedding is unchanged
        assert not torch.equal(arch.lm_head.weight, arch.embed_tokens.weight)


@needs_assets
@pytest.mark.parametrize("orientation", ["pca", "random"])
@pytest.mark.parametrize("kind", TINY_KINDS)
def test_rotation_with_full_q_keeps_logits(kind, orientation, calib):
    m = _model(kind)
    ids = _ids()
    ref = _logits(m, ids)
    arch = adapter_for(m)
    fuse_norms(m, arch)
    D = int(arch.embed_tokens.weight.shape[1])
    rotate_and_slice(m, arch, calib.batches(8, 64), SliceDims.const(D, arch.num_layers, D, slice_head=True),
                     orientation=orientation)
    got = _logits(m, ids)
    assert torch.allclose(got, ref, atol=2e-5, rtol=1e-4), (got - ref).abs().max()
    for layer in arch.layers:  # unsliced shortcuts are rotations
        for sc in (layer.attn_shortcut, layer.mlp_shortcut):
            w = sc.weight.double()
            assert torch.allclose(w @ w.T, torch.eye(D, dtype=torch.float64), atol=1e-5)
    assert not torch.allclose(arch.embed_tokens.weight, tiny_model(kind).model.embed_tokens.weight)


def _projected_reference(fused: nn.Module, bases: dict) -> nn.Module:
    """The fused dense model with the residual projected onto the kept subspace at every boundary.

    A sliced model is this model written in the coordinates of the kept bases, so their logits agree.
    """
    ref = copy.deepcopy(fused)
    arch = adapter_for(ref)
    D = int(arch.embed_tokens.weight.shape[1])

    def proj(u: torch.Tensor) -> torch.Tensor:
        return u @ u.T  # float64, D × D

    with torch.no_grad():
        e = arch.embed_tokens.weight
        e.copy_((e.double() @ proj(bases["embedding"])).to(e.dtype))
        for i, layer in enumerate(arch.layers):
            p_mid = proj(bases["layers"][i]["mid"])
            p_out = proj(bases["layers"][i]["out"])
            make_shortcut_layer(layer, D, D, D)
            layer.attn_shortcut.weight.copy_(p_mid.to(e.dtype))
            layer.mlp_shortcut.weight.copy_(p_out.to(e.dtype))
            o, down = arch.o_proj(i), arch.down_proj(i)
            o.weight.copy_((p_mid @ o.weight.double()).to(e.dtype))
            down.weight.copy_((p_out @ down.weight.double()).to(e.dtype))
    return ref


@needs_assets
@pytest.mark.parametrize("slice_head", [False, True])
@pytest.mark.parametrize("kind", TINY_KINDS)
def test_sliced_model_equals_projected_dense_model(kind, slice_head, calib):
    """Shortcut matrices, sliced linears and the RMSN(D) norm scaling are right: slicing to d' equals
    projecting the dense residual onto the kept directions (norm eps zeroed: ours scales eps by d'/D)."""
    m = _model(kind, eps=0.0)
    arch = adapter_for(m)
    fuse_norms(m, arch)
    fused = copy.deepcopy(m)
    D = int(arch.embed_tokens.weight.shape[1])
    dims = SliceDims.const(D, arch.num_layers, 24, slice_head=slice_head)
    rec = rotate_and_slice(m, arch, calib.batches(8, 64), dims, orientation="random", keep_bases=True)
    ref = _projected_reference(fused, rec["bases"])
    ids = _ids()
    got, want = _logits(m, ids), _logits(ref, ids)
    assert torch.allclose(got, want, atol=2e-5, rtol=1e-4), (got - want).abs().max()
    layer = arch.layers[0]
    assert tuple(layer.attn_shortcut.weight.shape) == (24, 24)
    assert tuple(arch.layers[-1].mlp_shortcut.weight.shape) == (24 if slice_head else D, 24)
    assert arch.lm_head.in_features == (24 if slice_head else D)
    assert tuple(arch.embed_tokens.weight.shape) == (512, 24)
    # the shortcut of layer i maps layer i's kept input directions to its kept mid directions
    u_in, u_mid = rec["bases"]["embedding"], rec["bases"]["layers"][0]["mid"]
    assert torch.allclose(layer.attn_shortcut.weight.double(), u_mid.T @ u_in, atol=1e-6)


@needs_assets
@pytest.mark.parametrize("kind", ["llama-gqa", "qwen2"])
def test_pca_sees_the_sliced_models_own_signals(kind, calib):
    """Sequential propagation: with the ``pca`` orientation, the sliced model's residual at every
    boundary, over the calibration data, is uncorrelated across its kept channels (the PCA was taken on
    the signals of the already-sliced layers, not of the dense model)."""
    m = _model(kind)
    arch = adapter_for(m)
    fuse_norms(m, arch)
    batches = calib.batches(8, 64)
    dims = SliceDims.const(64, arch.num_layers, 32, slice_head=True)
    rotate_and_slice(m, arch, batches, dims, orientation="pca")
    grams: dict[str, torch.Tensor] = {}

    def add(name: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        grams[name] = grams.get(name, 0) + x.T @ x

    hooks = []
    for i, layer in enumerate(arch.layers):
        hooks.append(arch.post_attn_norm(i).register_forward_pre_hook(lambda _m, a, i=i: add(f"mid{i}", a[0])))
        hooks.append(layer.register_forward_hook(lambda _m, _a, out, i=i: add(f"out{i}", out)))
    with torch.no_grad():
        for s in range(0, 8, 4):
            m(batches[s:s + 4])
    for h in hooks:
        h.remove()
    assert len(grams) == 2 * arch.num_layers
    for name, g in grams.items():
        off = g - torch.diag(torch.diag(g))
        assert off.abs().max() <= 1e-4 * torch.diag(g).max(), name
        assert torch.all(torch.diag(g)[:-1] >= torch.diag(g)[1:] * (1 - 1e-6)), name  # descending


@pytest.mark.parametrize("slice_head", [False, True])
@pytest.mark.parametrize("kind", TINY_KINDS)
def test_closed_form_size_matches_meta_model(kind, slice_head):
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        dense = AutoModelForCausalLM.from_config(tiny_config(kind))
    arch = adapter_for(dense)
    sm = SizeModel(dense, arch)
    assert sm.dense_params == count_params(dense)
    for d in (8, 24, 40, 64):
        m = copy.deepcopy(dense)
        dims = SliceDims.const(64, arch.num_layers, d, slice_head)
        apply_shapes(m, adapter_for(m), dims)
        fp = footprint(m)
        assert fp.params == sm.params(dims)
        assert fp.flops_per_token == pytest.approx(sm.flops(dims), rel=1e-12)
        assert fp.kv_bytes_per_token == footprint(dense).kv_bytes_per_token
    # non-uniform widths too
    m = copy.deepcopy(dense)
    dims = SliceDims(64, (48, 40, 40), (40, 40, 32), (40, 40, 64 if not slice_head else 16))
    apply_shapes(m, adapter_for(m), dims)
    assert count_params(m) == sm.params(dims)
    assert flops_per_token(m) == pytest.approx(sm.flops(dims), rel=1e-12)


@pytest.mark.parametrize("metric", ["params", "flops"])
@pytest.mark.parametrize("kind", TINY_KINDS)
def test_solver_lands_at_or_below_target_and_is_maximal(kind, metric):
    m = tiny_model(kind)
    arch = adapter_for(m)
    sm = SizeModel(m, arch)
    cfg = SliceGPTConfig()
    # at T=2048 the tiny models' FLOPs are mostly the attention core, which slicing leaves alone
    for pct in (55, 60, 70, 80, 90) if metric == "params" else (93, 95, 97, 99):
        t = Target.parse(f"{pct}%" if metric == "params" else f"flops:{pct}%")
        s = solve_dims(m, arch, t, cfg)
        goal = t.goal(sm.dense(metric))
        d = s.dims.embedding
        assert d % cfg.round_to == 0
        assert s.predicted <= goal
        if d + cfg.round_to <= 64:  # the next legal width would miss the target
            assert sm.value(metric, SliceDims.const(64, arch.num_layers, d + cfg.round_to)) > goal


def test_sparsity_setting_is_the_official_width():
    m = tiny_model("llama-mha")  # untied: slicing shrinks it at these sparsities
    arch = adapter_for(m)
    for s, d in ((0.2, 48), (0.25, 48), (0.3, 40), (0.5, 32)):
        sz = solve_dims(m, arch, Target.parse("100%"), SliceGPTConfig(sparsity=s))
        assert sz.dims.embedding == d and sz.dims.head == 64 and sz.source == "sparsity"
    with pytest.raises(Unsupported, match="above the target"):
        SliceGPTPruner({"sparsity": 0.2}).check(m, Target.parse("50%"))


def test_kv_target_refused_with_reason():
    with pytest.raises(Unsupported, match="KV cache is unchanged"):
        SliceGPTPruner().check(tiny_model("llama-gqa"), Target.parse("kv:50%"))


def test_unreachable_target_refused():
    with pytest.raises(Unsupported, match="below the smallest sliced model"):
        SliceGPTPruner().check(tiny_model("llama-gqa"), Target.parse("30%"))
    # slicing the head makes smaller models reachable
    SliceGPTPruner({"slice_head": True}).check(tiny_model("llama-gqa"), Target.parse("30%"))


def test_refuses_already_sliced_or_low_rank_models():
    m = tiny_model("llama-mha")
    make_shortcut_layer(m.model.layers[1], 64, 64, 64)
    with pytest.raises(Unsupported, match="shortcut"):
        SliceGPTPruner().check(m, Target.parse("60%"))


@needs_assets
def test_conformance():
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        report = check_pruner(SliceGPTPruner, tmp_dir=tmp, targets=("60%", "80%"))
    assert all(r["format"] == "compress" for r in report)
    assert all(r["params"] < 0.8 * r["dense"] + 1 for r in report)


@needs_assets
def test_export_reload_remote_code_and_generate(tmp_path, calib):
    """Non-uniform widths (hidden_mid != hidden_in), untied head; reload without compress installed."""
    m = _model("llama-gqa")
    arch = adapter_for(m)
    fuse_norms(m, arch)
    dims = SliceDims(64, (48, 40, 40), (40, 40, 32), (40, 40, 64))
    rotate_and_slice(m, arch, calib.batches(8, 64), dims)
    ids = _ids()
    want = _logits(m, ids)
    out = tmp_path / "sliced"
    info = export_model(m, tiny_tokenizer(), out, kind="compress")
    assert info["kind"] == "compress"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    assert cfg["layers"][0]["hidden_mid"] == 40 and cfg["layers"][2]["hidden_out"] == 64
    torch.save({"ids": ids, "want": want}, tmp_path / "io.pt")
    code = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        assert "compress" not in sys.modules, "compress was imported"
        io = torch.load({str(tmp_path / 'io.pt')!r})
        with torch.no_grad():
            got = m(io["ids"]).logits
        print((got - io["want"]).abs().max().item())
        assert m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()
        gen = m.generate(io["ids"][:1, :6], max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
        assert gen.shape == (1, 11), gen.shape
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    assert float(res.stdout.strip().splitlines()[-1]) <= 1e-5


@needs_assets
def test_prune_records_sizing_and_meets_flops_target(calib):
    m = tiny_model("qwen2")
    arch = adapter_for(m)
    dense = footprint(m, arch=arch)
    t = Target.parse("flops:95%")
    p = SliceGPTPruner({"calib_samples": 8, "calib_seq_len": 64})
    p.check(m, t)
    ctx = PruneContext(arch=arch, tokenizer=tiny_tokenizer(), calibration=calib, seed=0, progress=False,
                       log=lambda s: None)
    res = p.prune(m, t, ctx)
    got = footprint(res.model)
    assert got.flops_per_token <= 0.95 * dense.flops_per_token
    assert got.flops_per_token == pytest.approx(res.notes["sizing"]["predicted"], rel=1e-12)
    assert got.kv_bytes_per_token == dense.kv_bytes_per_token
    assert set(res.notes["kept_variance"]) == {"embedding", "0", "1", "2"}
    json.dumps(res.plan)


@needs_assets
def test_dry_run_plans_the_same_shapes(stories_dir):
    from compress.testing import RunSpec, dry_run

    rec = dry_run(RunSpec(method="slicegpt", target="60%", model=str(stories_dir), dry_run=True))
    assert rec["achieved"]["params"] == rec["plan"]["predicted"]
    assert rec["achieved"]["params"] <= 0.6 * rec["dense"]["params"]
    assert rec["achieved"]["kv_bytes_per_token"] == rec["dense"]["kv_bytes_per_token"]
