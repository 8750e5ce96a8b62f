"""Meta-device planning (``--dry-run``) of every method on config-only LLaMA-2-7B/70B and Llama-3-8B:
no weights loaded, target met, GQA groups kept whole, estimated peak memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compress.cli import main
from compress.plugins import get_registry
from compress.pruner import Pruner

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "benchmarks" / "configs"
CASES = [("llama-2-7b", "2B"), ("llama-2-7b", "4B"), ("llama-2-70b", "50%"), ("llama-3-8b", "50%")]
#: every installed method that plans shapes (a third-party plugin may not: its dry run is refused in one line)
METHODS = sorted(n for n, cls in get_registry().pruners.items() if cls.plan_shapes is not Pruner.plan_shapes)
#: methods that prune attention heads (they must keep whole KV groups under GQA)
HEAD_PRUNERS = {"transact", "llm_pruner", "random", "magnitude"}


@pytest.fixture
def no_weights(monkeypatch):
    import transformers

    import compress.io.loading

    def refuse(*a, **k):
        raise AssertionError("--dry-run must not load weights")

    monkeypatch.setattr(compress.io.loading, "load_model", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", refuse)


def _dry(capsys, config: str, method: str, target: str, *extra: str) -> dict:
    rc = main(["run", "--dry-run", "--json", "--model", str(CONFIGS / f"{config}.json"), "--method", method,
               "--target", target, *extra])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    return json.loads(cap.out)


def test_every_registered_method_is_covered():
    assert {"transact", "llm_pruner", "slicegpt", "lorap", "random", "magnitude"} <= set(METHODS)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("config", "target"), CASES, ids=[f"{c}-{t}" for c, t in CASES])
def test_dry_run_meets_target_without_weights(capsys, no_weights, config, target, method):
    rec = _dry(capsys, config, method, target)
    dense, got = rec["dense"]["params"], rec["achieved"]["params"]
    goal = float(target[:-1]) / 100 * dense if target.endswith("%") else float(target[:-1]) * 1e9
    # as close as the method's granularity allows: whole heads/channels (3 %), whole layers for depth
    layers = json.loads((ROOT / "benchmarks" / "configs" / f"{config}.json").read_text())["num_hidden_layers"]
    floor = goal - dense / layers if method == "depth" else 0.97 * goal
    assert floor <= got <= goal, (got, goal)
    assert rec["achieved"]["flops_per_token"] < rec["dense"]["flops_per_token"]
    assert rec["achieved"]["kv_bytes_per_token"] <= rec["dense"]["kv_bytes_per_token"]
    assert rec["export"]["path"] is None
    mem = rec["memory"]
    # --dtype auto (the default): the config's own dtype, as the real run would load the weights
    dtype = json.loads((ROOT / "benchmarks" / "configs" / f"{config}.json").read_text())["torch_dtype"]
    assert rec["dense"]["dtype"] == dtype in ("float16", "bfloat16")
    assert 2 * dense <= mem["weights_bytes"] < 2 * dense * 1.001
    assert mem["peak_bytes"] == mem["weights_bytes"] + sum(mem["working_bytes"].values())
    if get_registry().get(method).capabilities.needs_calibration:
        assert mem["peak_bytes"] > mem["weights_bytes"]
    if config == "llama-3-8b" and method in HEAD_PRUNERS:
        layers = rec["achieved"]["layers"]
        assert all(g["num_heads"] == 4 * g["num_kv_heads"] for g in layers), layers  # whole 4:1 KV groups
        assert min(g["num_kv_heads"] for g in layers) < 8  # and some groups did go


def test_peak_memory_terms(capsys, no_weights):
    """The estimate follows the run's dtype, calibration mode and each method's own tensors."""
    L, H, F = 32, 4096, 11008  # LLaMA-2-7B
    scored = 26 * (4 * H * H + 3 * H * F)  # LLM-Pruner scores the linears of layers 4..30
    lp = _dry(capsys, "llama-2-7b", "llm_pruner", "2B")["memory"]
    assert lp["working_bytes"]["gradients_fp32"] == 4 * scored  # element1: one fp32 sum per scored weight
    lp2 = _dry(capsys, "llama-2-7b", "llm_pruner", "2B", "--set", "importance=param_mix")["memory"]
    assert lp2["working_bytes"]["gradients_fp32"] == 8 * scored  # + the Fisher sums
    assert "gradients_fp32" not in _dry(capsys, "llama-2-7b", "llm_pruner", "2B",
                                        "--set", "importance=l2")["memory"]["working_bytes"]

    fp32 = _dry(capsys, "llama-2-7b", "transact", "2B", "--no-layerwise", "--dtype", "float32")
    bf16 = _dry(capsys, "llama-2-7b", "transact", "2B", "--no-layerwise", "--dtype", "bfloat16")
    assert bf16["dense"]["dtype"] == "bfloat16" and bf16["dense"]["params"] == fp32["dense"]["params"]
    assert abs(bf16["memory"]["weights_bytes"] * 2 - fp32["memory"]["weights_bytes"]) <= 1024  # fp32 rotary buffers
    assert bf16["dense"]["kv_bytes_per_token"] * 2 == fp32["dense"]["kv_bytes_per_token"] == 2 * L * H * 4
    assert fp32["memory"]["mode"] == "whole-model" and "activations" in fp32["memory"]["working_bytes"]
    lw = _dry(capsys, "llama-2-7b", "transact", "2B", "--layerwise", "--dtype", "float32")["memory"]
    assert lw["mode"] == "layer-wise" and lw["working_bytes"]["layer_on_device"] == (4 * H * H + 3 * H * F + 2 * H) * 4
    # whole-model calibration holds a mini-batch of logits (4 × 2048 × 32000 floats); layer-wise never does
    assert fp32["memory"]["working_bytes"]["activations"] >= 4 * 2048 * 32000 * 4
    assert lw["working_bytes"]["activation_cache"] == (128 + 4) * 2048 * H * 4

    sg = _dry(capsys, "llama-2-7b", "slicegpt", "2B")["memory"]
    assert sg["mode"] == "layer-wise" and sg["working_bytes"]["pca"] > 3 * H * H * 8
    mag = _dry(capsys, "llama-2-7b", "magnitude", "2B")["memory"]
    assert mag["mode"] == "weights only" and mag["peak_bytes"] == mag["weights_bytes"]


def test_human_summary_shows_peak_memory(capsys, no_weights):
    rc = main(["run", "--dry-run", "--model", str(CONFIGS / "llama-3-8b.json"), "--method", "llm_pruner",
               "--target", "50%", "--dtype", "bfloat16"])
    out = capsys.readouterr().out
    assert rc == 0 and "estimated peak memory" in out and "gradients_fp32" in out
