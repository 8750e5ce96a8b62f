"""Layer-by-layer calibration engine: same statistics, plans, logits and gradients as the whole model."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from compress_baselines.llm_pruner import LLMPruner
from compress_baselines.lorap import LorapPruner
from compress_baselines.slicegpt import SliceGPTPruner
from compress_transact.transact import TransActPruner
from torch import nn

from compress import ArchAdapter, Target, footprint
from compress.calib.gradients import loss_gradients
from compress.calib.layerwise import LayerwiseRunner, resolve_layerwise
from compress.calib.runner import run_calibration
from compress.calib.sources import CalibrationSource
from compress.calib.stats import record
from compress.cli import main
from compress.model.footprint import model_bytes
from compress.pruner import PruneContext
from compress.testing import TINY_KINDS, tiny_config, tiny_model
from conftest import needs_assets

pytestmark = pytest.mark.usefixtures("one_thread")


def _sliding_qwen2() -> nn.Module:
    """qwen2 whose layers 1 and 2 use a 4-token sliding window: every layer needs its own mask."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    d = tiny_config("qwen2").to_dict()
    d.pop("layer_types", None)
    d.update(use_sliding_window=True, sliding_window=4, max_window_layers=1)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(Qwen2Config(**d)).eval()


def _model(kind: str) -> nn.Module:
    return _sliding_qwen2() if kind == "qwen2-sliding" else tiny_model(kind)


def _ids(n: int = 5, t: int = 24) -> torch.Tensor:
    return torch.randint(3, 512, (n, t), generator=torch.Generator().manual_seed(0))


def _stats(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, **kw) -> tuple[int, dict]:
    arch = ArchAdapter(model)
    mods = {f"{i}.{k}": m for i in range(arch.num_layers)
            for k, m in (("o", arch.o_proj(i)), ("d", arch.down_proj(i)), ("q", arch.attn_linears(i)["q_proj"]))}
    with record(mods, second_moment={"0.q"}) as st:
        n = run_calibration(model, ids, batch_size=2, attention_mask=mask, progress=False, **kw)
    return n, st


def _ctx(model: nn.Module, calib, *, layerwise: bool, offload_dir: Path | None = None) -> PruneContext:
    return PruneContext(arch=ArchAdapter(model), tokenizer=calib.tokenizer, calibration=calib, progress=False,
                        log=lambda m: None, layerwise=layerwise, offload_dir=offload_dir)


@pytest.fixture()
def caches(monkeypatch) -> list:
    """Where every activation cache of the engine lives (a Path for files), in creation order."""
    import compress.calib.layerwise as lw

    made: list = []
    orig = lw.LayerwiseRunner.new_cache

    def spy(self):
        c = orig(self)
        made.append(c.where)
        return c

    monkeypatch.setattr(lw.LayerwiseRunner, "new_cache", spy)
    return made


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids(2, 20)).logits.float()


# ============================================================================ statistics
@pytest.mark.parametrize("kind", [*TINY_KINDS, "qwen2-sliding"])
def test_layerwise_statistics_equal_whole_model(kind, tmp_path):
    """Same mini-batches, one layer at a time: bit-identical statistics (padding excluded the same way),
    with the activations cached in RAM or in files; the lm_head never runs layer-wise."""
    model = _model(kind)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    mask[4, :3] = 0
    n_ref, ref = _stats(model, ids, mask)
    head_calls = []
    hook = model.lm_head.register_forward_hook(lambda *_: head_calls.append(1))
    try:
        for cache in ("cpu", tmp_path / "acts"):
            n, got = _stats(model, ids, mask, layerwise=True, cache=cache)
            assert n == n_ref == int(mask.sum())
            for k in ref:
                assert got[k].count == ref[k].count
                assert torch.equal(got[k].sumsq, ref[k].sumsq), k
                assert torch.equal(got[k].sum, ref[k].sum), k
            assert torch.equal(got["0.q"].gram, ref["0.q"].gram)
    finally:
        hook.remove()
    assert not head_calls
    assert list((tmp_path / "acts").iterdir()) == []  # the disk cache is removed afterwards


def test_sliding_window_layers_get_their_own_mask():
    """The captured kwargs differ between full and sliding-window layers and reproduce the backbone."""
    model = _sliding_qwen2()
    ids = _ids(2, 16)
    with LayerwiseRunner(model, ids, batch_size=2) as runner:
        for _ in runner:
            pass
        full, sliding = runner.layer_kwargs(0, 0), runner.layer_kwargs(0, 2)
        assert runner.layer_kwargs(0, 1) is sliding  # equal values are stored once
        assert not (full["attention_mask"] is None and sliding["attention_mask"] is None)
        with torch.no_grad():
            want = model.model(ids).last_hidden_state
        assert torch.equal(model.model.norm(runner.outputs[0]), want)


def test_disk_cache_holds_files_while_running(tmp_path):
    model = tiny_model("llama-gqa")
    seen = []
    with LayerwiseRunner(model, _ids(4, 16), batch_size=2, cache=tmp_path) as runner:
        for step in runner:
            seen.append(len(list(tmp_path.rglob("*.pt"))))
            step.forward()
    assert seen and all(n == 2 for n in seen)  # two mini-batches of inputs, on disk
    assert not list(tmp_path.rglob("*.pt"))


def test_set_outputs_checks_the_count_and_bad_cache_is_refused(tmp_path):
    model = tiny_model("llama-mha")
    with LayerwiseRunner(model, _ids(4, 8), batch_size=2) as runner:
        for step in runner:
            with pytest.raises(ValueError, match="expected 2"):
                step.set_outputs([torch.zeros(2, 8, 64)])
            break
    f = tmp_path / "file"
    f.write_text("x")
    from compress import UsageError

    with pytest.raises(UsageError, match="is a file"):
        LayerwiseRunner(model, _ids(4, 8), cache=f)


# ============================================================================ methods
@needs_assets
@pytest.mark.parametrize("kind", TINY_KINDS)
def test_transact_layerwise_gives_the_same_plan(kind, calib, tmp_path, caches):
    settings = {"calib_samples": 6, "calib_seq_len": 48, "shots": 2}
    outs = {}
    for mode, offload in (("whole", None), ("layerwise", None), ("disk", tmp_path)):
        m = tiny_model(kind)
        ctx = _ctx(m, calib, layerwise=mode != "whole", offload_dir=offload)
        caches.clear()
        res = TransActPruner(settings).prune(m, Target.parse("60%"), ctx)
        outs[mode] = (res.plan, _logits(res.model))
        kinds = {"whole": set(), "layerwise": {torch.device("cpu")}, "disk": {"disk"}}[mode]
        assert {"disk" if isinstance(w, Path) else w for w in caches} == kinds
    for mode in ("layerwise", "disk"):
        assert outs[mode][0] == outs["whole"][0]
        assert torch.equal(outs[mode][1], outs["whole"][1])


@needs_assets
@pytest.mark.parametrize("method", ["slicegpt", "lorap", "llm_pruner"])
@pytest.mark.parametrize("kind", ["llama-gqa", "qwen2"])
def test_other_methods_layerwise_match_whole_model(method, kind, calib, tmp_path, caches):
    cls = {"slicegpt": SliceGPTPruner, "lorap": LorapPruner, "llm_pruner": LLMPruner}[method]
    settings = {"calib_samples": 6, "calib_seq_len": 48, "calib_batch_size": 4}
    if method == "llm_pruner":
        settings["importance"] = "param_mix"  # first-order and Fisher terms
    res = {}
    for mode in ("whole", "layerwise"):
        m = tiny_model(kind)
        ctx = _ctx(m, calib, layerwise=mode == "layerwise", offload_dir=tmp_path if mode == "layerwise" else None)
        caches.clear()
        r = cls(settings).prune(m, Target.parse("70%"), ctx)
        res[mode] = (r.plan, _logits(r.model), footprint(r.model).params)
        # layer-wise: the activations went to files; whole-model: they stay with the model (SliceGPT and
        # LoRAP are sequential, so they use the engine either way), LLM-Pruner runs one whole backward
        on_disk = [isinstance(w, Path) for w in caches]
        if mode == "layerwise":
            assert on_disk and all(on_disk)
        else:
            assert not any(on_disk) and bool(caches) == (method != "llm_pruner")
    if method != "llm_pruner":  # its plan holds the scores' ranking only; compared through logits
        assert json.dumps(res["layerwise"][0], sort_keys=True) == json.dumps(res["whole"][0], sort_keys=True)
    assert res["layerwise"][2] == res["whole"][2]
    torch.testing.assert_close(res["layerwise"][1], res["whole"][1], rtol=1e-4, atol=1e-4)


# ============================================================================ gradients
def _reference_grads(model, tokens):
    m = copy.deepcopy(model)
    m.zero_grad()
    m(input_ids=tokens, labels=tokens).loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in m.named_parameters()}
    fisher = {n: torch.zeros_like(p) for n, p in m.named_parameters()}
    for j in range(tokens.shape[0]):
        m.zero_grad()
        m(input_ids=tokens[j:j + 1], labels=tokens[j:j + 1]).loss.backward()
        for n, p in m.named_parameters():
            fisher[n] += p.grad * p.grad / tokens.shape[0]
    return grads, fisher


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_layerwise_gradients_equal_whole_model_autograd(kind, tmp_path):
    model = tiny_model(kind)
    names = {p: n for n, p in model.named_parameters()}
    # two non-adjacent layers, weights and (qwen2) biases: the input gradient must flow through layer 2
    params = [p for n, p in model.named_parameters() if n.startswith(("model.layers.0.", "model.layers.2."))
              and "norm" not in n]
    tokens = torch.randint(3, 512, (4, 16), generator=torch.Generator().manual_seed(1))
    ref_g, ref_f = _reference_grads(model, tokens)
    for first_order, fisher, bs in ((True, False, 3), (True, True, 3), (False, True, 4)):
        g, f = loss_gradients(model, params, tokens, first_order=first_order, fisher=fisher, batch_size=bs,
                              layerwise=True, cache=tmp_path)
        assert set(g) == (set(params) if first_order else set())
        assert set(f) == (set(params) if fisher else set())
        for p in params:
            if first_order:
                assert g[p].dtype == torch.float32
                torch.testing.assert_close(g[p], ref_g[names[p]], rtol=1e-4, atol=1e-7)
            if fisher:
                torch.testing.assert_close(f[p], ref_f[names[p]], rtol=1e-4, atol=1e-10)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert not model.training
    with pytest.raises(ValueError, match="decoder-layer parameters only"):
        loss_gradients(model, [model.model.embed_tokens.weight], tokens, layerwise=True)


# ============================================================================ bf16
@needs_assets
def test_bf16_statistics_are_fp32_and_methods_run_layerwise(calib):
    model = tiny_model("llama-gqa").to(torch.bfloat16)
    ids = _ids()
    _, whole = _stats(model, ids, None)
    _, lw = _stats(model, ids, None, layerwise=True)
    for k in whole:
        assert whole[k].sumsq.dtype == lw[k].sumsq.dtype == torch.float32
        assert torch.equal(whole[k].sumsq, lw[k].sumsq)
    assert lw["0.q"].gram.dtype == torch.float32
    settings = {"calib_samples": 4, "calib_seq_len": 32}
    plans = []
    for layerwise in (False, True):
        m = tiny_model("llama-gqa").to(torch.bfloat16)
        plans.append(TransActPruner(settings).prune(m, Target.parse("60%"), _ctx(m, calib, layerwise=layerwise)).plan)
    assert plans[0] == plans[1]
    for cls in (SliceGPTPruner, LorapPruner, LLMPruner):
        m = tiny_model("llama-gqa").to(torch.bfloat16)
        dense = footprint(m).params
        r = cls(settings).prune(m, Target.parse("70%"), _ctx(m, calib, layerwise=True))
        assert footprint(r.model).params <= 0.7 * dense
        assert all(p.dtype == torch.bfloat16 for p in r.model.parameters())
        assert torch.isfinite(_logits(r.model)).all()
    params = list(ArchAdapter(model).layers[1].mlp.parameters())
    g, _ = loss_gradients(model, params, ids, layerwise=True)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in g.values())


# ============================================================================ run / CLI
def test_auto_threshold(monkeypatch):
    import compress.calib.layerwise as lw

    model = tiny_model("llama-mha")
    assert resolve_layerwise(None, model) is False
    assert resolve_layerwise(True, model) is True
    monkeypatch.setattr(lw, "LAYERWISE_AUTO_BYTES", model_bytes(model) - 1)
    assert resolve_layerwise(None, model) is True
    assert resolve_layerwise(False, model) is False


@needs_assets
def test_cli_layerwise_flag_same_plan(tmp_path, capsys, stories_dir):
    def run(*extra: str) -> dict:
        rc = main(["run", "--method", "transact", "--target", "60%", "--model", str(stories_dir), "--no-save",
                   "--calib", "tinystories", "--set", "calib_samples=4", "--set", "calib_seq_len=64", "--json",
                   *extra])
        out = capsys.readouterr()
        assert rc == 0, out.err
        return json.loads(out.out)

    whole = run("--no-layerwise")
    lw = run("--layerwise", "--offload-dir", str(tmp_path / "acts"))
    assert whole["layerwise"] is False and lw["layerwise"] is True
    assert lw["plan_hash"] == whole["plan_hash"]
    assert run()["layerwise"] is False  # 1 MB of weights: below the automatic threshold
    rc = main(["run", "--method", "transact", "--target", "60%", "--model", str(stories_dir), "--no-save",
               "--no-layerwise", "--offload-dir", str(tmp_path)])
    assert rc == 2 and "offload" in capsys.readouterr().err


# ============================================================================ SmolLM2
@pytest.mark.slow
def test_smollm2_transact_layerwise_same_plan(smollm2_loaded):
    src = CalibrationSource.from_spec("wikitext2", smollm2_loaded.tokenizer, seed=0)
    plans = []
    for layerwise in (False, True):
        m = copy.deepcopy(smollm2_loaded.model)
        ctx = _ctx(m, src, layerwise=layerwise)
        plans.append(TransActPruner({"calib_samples": 8, "calib_seq_len": 256}).prune(m, Target.parse("60%"), ctx).plan)
    assert plans[0] == plans[1] and plans[0]["layers"]
