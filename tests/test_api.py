"""The Python API: ``compress.prune`` on a model in memory, for every method; ``.save`` writes what
``compress run`` writes; bad arguments are refused in one line before the model is touched."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import compress
from compress.errors import TargetError, Unsupported, UsageError
from compress.plugins import get_registry
from compress.testing import tiny_model, tiny_tokenizer

OURS = {"compress-transact", "compress-baselines"}
METHODS = sorted(r["name"] for r in get_registry().methods_table() if r["distribution"] in OURS)
SMALL = {"calib_samples": 4, "calib_seq_len": 32}
IDS = torch.tensor([[1, 17, 93, 402, 5, 61, 7]])


@pytest.fixture(scope="module")
def tok():
    t = tiny_tokenizer()
    if t is None:
        pytest.skip("needs $COMPRESS_ASSETS (stories260k tokenizer)")
    return t


def _settings(method: str) -> dict:
    fields = get_registry().get(method).Config.model_fields
    return {k: v for k, v in SMALL.items() if k in fields}


@pytest.mark.parametrize("method", METHODS)
def test_prune_in_memory_every_method(method, tok, tmp_path):
    model = tiny_model("llama-gqa")
    result = compress.prune(model, tok, method=method, target="60%", calib="tinystories", **_settings(method))
    assert result.achieved.params <= 0.6 * result.dense.params
    assert result.record["method"] == method and result.record["target"] == "60%"
    q = result.quality
    assert q["dense"]["ppl"] > 1 and q["pruned"]["ppl"] > 1 and q["ratio"] == q["pruned"]["ppl"] / q["dense"]["ppl"]
    info = result.save(tmp_path / "out")
    assert info["path"] == str((tmp_path / "out").resolve())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=info["kind"] == "compress")
    with torch.no_grad():
        assert torch.allclose(reloaded.eval()(IDS).logits, result.model(IDS).logits, atol=1e-5)
    on_disk = json.loads((tmp_path / "out" / "compress_run.json").read_text())
    assert on_disk["plan_hash"] == result.record["plan_hash"] and on_disk["quality"] == result.record["quality"]


def test_save_writes_what_compress_run_writes(tok, tmp_path, stories_dir):
    """Same model, method, settings and seed: the API's folder and `compress run`'s are the same
    weights, plan and resolved recipe."""
    from compress.io.loading import load_model
    from compress.pipeline.run import RunSpec, run

    settings = {"calib_samples": 4, "calib_seq_len": 32}
    run(RunSpec(method="transact", target="60%", model=str(stories_dir), out=str(tmp_path / "cli"), seed=3,
                calib="tinystories", settings=settings, progress=False), log=lambda m: None)
    lm = load_model(str(stories_dir))
    api = compress.prune(lm.model, lm.tokenizer, method="transact", target="60%", calib="tinystories", seed=3,
                         **settings)
    api.save(tmp_path / "api")
    for name in ("model.safetensors", "compress_plan.json", "compress_recipe.yaml"):
        assert (tmp_path / "api" / name).read_bytes() == (tmp_path / "cli" / name).read_bytes(), name


def test_prune_keeps_dtype_and_device(tok):
    model = tiny_model("llama-mha").to(torch.bfloat16)
    result = compress.prune(model, tok, method="magnitude", target="60%", evaluate=False)
    assert {p.dtype for p in result.model.parameters()} == {torch.bfloat16}
    assert result.achieved.dtype == "bfloat16" and result.quality is None


def test_bad_arguments_are_refused_before_the_model_is_touched(tok):
    model = tiny_model("llama-gqa")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UsageError, match="unknown method 'transakt'; did you mean 'transact'"):
        compress.prune(model, tok, method="transakt", target="60%")
    with pytest.raises(TargetError, match="cannot parse target"):
        compress.prune(model, tok, method="magnitude", target="sixty")
    with pytest.raises(TargetError, match="above 100%"):
        compress.prune(model, tok, method="magnitude", target="120%")
    with pytest.raises(UsageError, match="unknown key 'shots'"):
        compress.prune(model, tok, method="magnitude", target="60%", shots=3)
    with pytest.raises(UsageError, match="needs a tokenizer for calibration text"):
        compress.prune(model, None, method="transact", target="60%")
    with pytest.raises(UsageError, match="needs a tokenizer for the quality check.*evaluate=False"):
        compress.prune(model, None, method="magnitude", target="60%")
    with pytest.raises(UsageError, match="must be a Hugging Face causal LM"):
        compress.prune(torch.nn.Linear(2, 2), tok, method="magnitude", target="60%")
    with pytest.raises(UsageError, match="seed must be a non-negative int"):
        compress.prune(model, tok, method="magnitude", target="60%", seed=-1)
    with pytest.raises(Unsupported, match="KV cache is unchanged"):
        compress.prune(model, tok, method="slicegpt", target="kv:50%")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
