"""One adapter resolution: an adapter registered through ``register_architectures`` for a model type
that only this test knows is the adapter of every stage — preflight, check, plan_shapes, prune (the
context's ``arch``), sizing, surgery, measurement, export and ``inspect`` — and the built-in one is
never constructed behind its back."""

from __future__ import annotations

import json
import traceback

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from compress import ArchAdapter, adapter_for, footprint, hookimpl
from compress.plugins import PluginInfo, get_registry
from compress.testing import tiny_config, tiny_model, tiny_tokenizer

MODEL_TYPE = "compress_test_llama"


class _TestConfig(LlamaConfig):
    model_type = MODEL_TYPE


class _TestLM(LlamaForCausalLM):
    config_class = _TestConfig


def _test_config() -> _TestConfig:
    d = tiny_config("llama-gqa").to_dict()
    d.pop("model_type")
    return _TestConfig(**d)


class TracingAdapter(ArchAdapter):
    """The built-in accessors, under a model type of its own; remembers who built it."""

    model_types = (MODEL_TYPE,)
    callers: list[set[str]] = []

    def __init__(self, model):
        super().__init__(model)
        TracingAdapter.callers.append({f.name for f in traceback.extract_stack()})


class _Plugin:
    @hookimpl
    def register_architectures(self, register):
        register(TracingAdapter)


@pytest.fixture
def registered(monkeypatch):
    AutoConfig.register(MODEL_TYPE, _TestConfig, exist_ok=True)
    AutoModelForCausalLM.register(_TestConfig, _TestLM, exist_ok=True)
    reg = get_registry()
    monkeypatch.setattr(reg, "architectures", dict(reg.architectures))  # restored after the test
    reg._add(_Plugin(), PluginInfo("test-arch", "test-arch-dist", "0", "tests"))
    assert reg.architectures[MODEL_TYPE] is TracingAdapter
    built: list[type] = []
    orig = ArchAdapter.__init__

    def spy(self, model):
        built.append(type(self))
        orig(self, model)

    monkeypatch.setattr(ArchAdapter, "__init__", spy)
    TracingAdapter.callers = []
    return built


@pytest.fixture
def folder(tmp_path):
    tok = tiny_tokenizer()
    if tok is None:
        pytest.skip("needs $COMPRESS_ASSETS (stories260k tokenizer)")
    dense = tiny_model("llama-gqa")
    model = _TestLM(_test_config()).eval()
    model.load_state_dict(dense.state_dict())
    path = tmp_path / "test-family"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    assert json.loads((path / "config.json").read_text())["model_type"] == MODEL_TYPE
    return path


def _stages() -> set[str]:
    return set().union(*TracingAdapter.callers) if TracingAdapter.callers else set()


def test_facade_resolution_goes_through_the_registry(registered):
    model = _TestLM(_test_config())
    assert type(adapter_for(model)) is TracingAdapter
    footprint(model)  # no adapter passed: resolved by the registry, not by constructing the built-in
    assert registered and set(registered) == {TracingAdapter}


@pytest.mark.parametrize("method", ["magnitude", "transact"])
def test_every_stage_uses_the_registered_adapter(registered, folder, tmp_path, method, capsys):
    from compress.cli import main
    from compress.pipeline.run import RunSpec, dry_run, run

    settings = {"calib_samples": 4, "calib_seq_len": 32} if method == "transact" else {}
    plan = dry_run(RunSpec(method=method, target="60%", model=str(folder), settings=settings))
    assert plan["achieved"]["params"] <= 0.6 * plan["dense"]["params"]
    result = run(RunSpec(method=method, target="60%", model=str(folder), out=str(tmp_path / "out"),
                         calib="tinystories", settings=settings, progress=False), log=lambda m: None)
    assert main(["inspect", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model_type"] == MODEL_TYPE

    assert set(registered) == {TracingAdapter}, f"built-in adapter constructed: {registered}"
    seen = _stages()
    # ctx.arch (what prune() gets) is built in run(); no built-in adapter was built at all (above)
    for stage in ("meta_model", "check", "plan_shapes", "dry_run", "run", "export_model", "cmd_inspect"):
        assert stage in seen, f"stage {stage} did not resolve an adapter through the registry"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, result.model(ids).logits, atol=1e-5)


def test_unregistered_model_type_is_refused_from_the_config(folder, monkeypatch):
    """Without the plugin the same folder is refused before any weight is read."""
    import compress.io.loading
    from compress.errors import Unsupported
    from compress.pipeline.run import RunSpec, run

    AutoConfig.register(MODEL_TYPE, _TestConfig, exist_ok=True)
    AutoModelForCausalLM.register(_TestConfig, _TestLM, exist_ok=True)
    assert MODEL_TYPE not in get_registry().architectures

    def refuse(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(compress.io.loading, "load_model", refuse)
    with pytest.raises(Unsupported, match=f"architecture '{MODEL_TYPE}' is not supported"):
        run(RunSpec(method="magnitude", target="60%", model=str(folder)), log=lambda m: None)
