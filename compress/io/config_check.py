"""A model config checked against sane bounds and against its own weights, before anything is built.

A config that lies is refused with one line naming the key, its value and the fix, before transformers
builds a config object or a model (``compress run``, ``--dry-run``, ``inspect``, ``eval`` and
``recover`` all load through :func:`compress.io.loading.load_config` / ``load_model``):

1. :func:`check_config_dict` — on the raw dict (``config.json``, or the GGUF metadata as transformers
   maps it): every size in :data:`compress.io.limits.CONFIG_BOUNDS` a positive integer within its bound
   (10^9 layers would otherwise build 10^9 modules while memory grows), the query heads a multiple of
   the KV heads, the hidden size a multiple of the heads when no ``head_dim`` is given, every number
   finite; a compress-format config's per-layer specs the same way;
2. :func:`check_weights_match` — on a local safetensors folder: the tensor table of the weight files
   (their headers only, no tensor is read) against the parameters the config implies (a model built on
   the meta device): a config with fewer layers than the weights (a silently truncated model), more
   layers, a missing tensor (it would be random) or a shape that differs (e.g. ``hidden_size``) is
   refused. Only the header is read, and the result is cached by the files' sizes and mtimes. Where
   transformers converts the checkpoint's tensors on load (a Mixture-of-Experts model's experts are
   saved one by one and fused into 3-D weights), the weights are compared with that checkpoint layout.

GGUF sources get (1) only: their tensors are named and laid out differently and are checked by
transformers when it de-quantizes them.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.errors import UsageError
from compress.io.limits import CONFIG_BOUNDS, MAX_CONFIG_BYTES

#: What a bad config refusal suggests.
_FIX = "fix the config or re-save the model"

#: What each key means (for the one-line messages).
_MEANING = {
    "num_hidden_layers": "decoder layers",
    "hidden_size": "residual width",
    "num_attention_heads": "query heads",
    "num_key_value_heads": "key/value heads",
    "head_dim": "width of one head",
    "intermediate_size": "MLP width",
    "vocab_size": "vocabulary size",
    "max_position_embeddings": "context length",
}

#: Per-layer spec keys of a compress-format config and the bound that applies to each.
_LAYER_KEYS = {"num_attention_heads": "num_attention_heads", "num_key_value_heads": "num_key_value_heads",
               "intermediate_size": "intermediate_size", "hidden_in": "hidden_size", "hidden_mid": "hidden_size",
               "hidden_out": "hidden_size"}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_size(where: str, key: str, value: Any, bound: int) -> None:
    meaning = _MEANING.get(key, key)
    if not _is_int(value):
        raise UsageError(f"{where}: {key} ({meaning}) must be a positive integer, got {value!r}; {_FIX}")
    if value < 1:
        raise UsageError(f"{where}: {key} ({meaning}) is {value}, it must be at least 1; {_FIX}")
    if value > bound:
        raise UsageError(f"{where}: {key} ({meaning}) is {value:,}, above the limit of {bound:,} "
                         f"(compress.io.limits.CONFIG_BOUNDS); {_FIX}")


def _non_finite(obj: Any, path: str = "") -> str | None:
    """The dotted key of the first NaN/inf number in ``obj`` (iterative), or None."""
    stack: list[tuple[Any, str]] = [(obj, path)]
    while stack:
        x, p = stack.pop()
        if isinstance(x, float) and not math.isfinite(x):
            return p or "value"
        if isinstance(x, Mapping):
            stack.extend((v, f"{p}.{k}" if p else str(k)) for k, v in x.items())
        elif isinstance(x, (list, tuple)):
            stack.extend((v, f"{p}[{i}]") for i, v in enumerate(x))
    return None


def _is_dtype_name(name: str) -> bool:
    import torch

    return isinstance(getattr(torch, name.removeprefix("torch."), None), torch.dtype)


def check_config_dict(d: Mapping[str, Any], where: str) -> None:
    """Refuse a raw config dict whose sizes are not sane (see the module docstring), with one line naming
    the key, its value and the fix. ``where`` names the file ("config.json of MODEL")."""
    if not isinstance(d, Mapping):
        raise UsageError(f"{where} is not a JSON object; {_FIX}")
    bad = _non_finite(d)
    if bad is not None:
        raise UsageError(f"{where}: {bad} is not a finite number; {_FIX}")
    for key in ("model_type", "dtype", "torch_dtype"):
        value = d.get(key)
        if value is not None and not isinstance(value, str):
            raise UsageError(f"{where}: {key} must be a string, got {value!r}; {_FIX}")
    for key in ("dtype", "torch_dtype"):
        if d.get(key) not in (None, "auto") and not _is_dtype_name(d[key]):
            raise UsageError(f"{where}: {key} {d[key]!r} is not a torch dtype (e.g. float32, bfloat16); {_FIX}")
    arch = d.get("architectures")
    if arch is not None and not (isinstance(arch, list) and all(isinstance(a, str) for a in arch)):
        raise UsageError(f"{where}: architectures must be a list of class names, got {arch!r}; {_FIX}")
    for key, bound in CONFIG_BOUNDS.items():
        value = d.get(key)
        if value is None:
            continue
        _check_size(where, key, value, bound)
    heads, kv, hidden = d.get("num_attention_heads"), d.get("num_key_value_heads"), d.get("hidden_size")
    if heads is not None and kv is not None and heads % kv:
        raise UsageError(f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv} "
                         f"(each key/value head serves a whole group of query heads); {_FIX}")
    if heads is not None and hidden is not None and d.get("head_dim") is None and hidden % heads:
        raise UsageError(f"{where}: hidden_size={hidden} is not a multiple of num_attention_heads={heads} and no "
                         f"head_dim is given; {_FIX}")
    if d.get("architectures") == ["CompressForCausalLM"] or d.get("model_type") == "compress":
        # compress format: the dense base config, then one spec per layer
        check_config_dict(d.get("base_config") or {}, f"{where} (base_config)")
        _check_layer_specs(d.get("layers"), where)


def _check_layer_specs(layers: Any, where: str) -> None:
    n_max = CONFIG_BOUNDS["num_hidden_layers"]
    if not isinstance(layers, list) or not layers:
        raise UsageError(f"{where}: layers must be a non-empty list of per-layer specs; {_FIX}")
    if len(layers) > n_max:
        raise UsageError(f"{where}: layers has {len(layers):,} entries, above the limit of {n_max:,}; {_FIX}")
    for i, spec in enumerate(layers):
        if not isinstance(spec, Mapping):
            raise UsageError(f"{where}: layers[{i}] is not an object; {_FIX}")
        for key, bound_key in _LAYER_KEYS.items():
            if key in spec:
                _check_size(f"{where}, layers[{i}]", key, spec[key], CONFIG_BOUNDS[bound_key])
        heads, kv = spec.get("num_attention_heads"), spec.get("num_key_value_heads")
        if heads is not None and kv is not None and heads % kv:
            raise UsageError(f"{where}, layers[{i}]: num_attention_heads={heads} is not a multiple of "
                             f"num_key_value_heads={kv}; {_FIX}")
        low_rank = spec.get("low_rank") or {}
        if not isinstance(low_rank, Mapping):
            raise UsageError(f"{where}, layers[{i}]: low_rank must map module names to ranks; {_FIX}")
        for name, rank in low_rank.items():
            _check_size(f"{where}, layers[{i}].low_rank", str(name), rank, CONFIG_BOUNDS["hidden_size"])


# ---------------------------------------------------------------------- weights against the config
def weight_files(folder: Path) -> list[Path] | None:
    """The safetensors files transformers would load from ``folder`` (the index's shards, else
    ``model.safetensors``), or None when there are none to check."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        from compress.io.safe_io import parse_json, read_text

        doc = parse_json(read_text(index, MAX_CONFIG_BYTES, "weight index"), str(index))
        wmap = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(wmap, dict) or not wmap:
            raise UsageError(f"{index} has no weight_map; re-save the model")
        names = sorted({str(v) for v in wmap.values()})
        for n in names:
            if os.path.basename(n) != n or not n.endswith(".safetensors"):
                raise UsageError(f"{index} names the shard {n!r}, not a .safetensors file of the folder; "
                                 "re-save the model")
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else None


def _read_shapes(files: list[Path], source: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors headers (no tensor data is read)."""
    from safetensors import SafetensorError, safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        if not f.is_file():
            raise UsageError(f"the weights of {source} lack the shard {f.name} that their index names; "
                             "re-download or re-save the model")
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                    shapes[key] = tuple(st.get_slice(key).get_shape())
        except (SafetensorError, OSError, ValueError) as e:
            msg = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
            raise UsageError(f"the weights of {source} cannot be read ({msg}): the file is corrupt or truncated; "
                             "re-download or re-save the model") from None
    return shapes


@dataclass
class _Expected:
    """What a config implies for its weights (from a model built on the meta device)."""

    shapes: dict[str, tuple[int, ...]]  # parameters, tied ones once
    known: set[str]  # every name a checkpoint may hold: tied duplicates and buffers too
    prefix: str  # base_model_prefix: checkpoints of the bare model lack it
    ignore_missing: list[str]  # transformers' own patterns
    ignore_unexpected: list[str]
    saved: dict[str, tuple[int, ...]] | None = None  # the checkpoint layout where transformers converts on load

    def as_saved(self) -> _Expected:
        """The same expectation in the checkpoint layout (:func:`_saved_layout`)."""
        assert self.saved is not None
        others = {n for n in self.known if n not in self.shapes}  # tied duplicates, buffers
        return _Expected(shapes=dict(self.saved), known=set(self.saved) | others, prefix=self.prefix,
                         ignore_missing=self.ignore_missing, ignore_unexpected=self.ignore_unexpected)


def _expected_shapes(cfg: Any) -> _Expected:
    """The tensors of the model ``cfg`` implies, built on the meta device (nothing is allocated)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    known = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    known |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    return _Expected(shapes=shapes, known=known,
                     prefix=str(getattr(model, "base_model_prefix", "") or ""),
                     ignore_missing=list(getattr(model, "_keys_to_ignore_on_load_missing", None) or []),
                     ignore_unexpected=list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []),
                     saved=_saved_layout(model, shapes))


def _saved_layout(model: Any, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]] | None:
    """The parameters as ``save_pretrained`` writes them, when transformers converts them on load and back
    on save (a Mixture-of-Experts model's fused ``experts.gate_up_proj`` is ``experts.{e}.gate_proj.weight``
    and ``up_proj.weight`` in its checkpoints); None when they are written as they are."""
    try:
        from transformers.core_model_loading import revert_weight_conversion

        out = revert_weight_conversion(model, dict(model.named_parameters()))
    except Exception:  # noqa: BLE001 - no conversion (older transformers, nothing to revert): the names as they are
        return None
    saved = {n: tuple(t.shape) for n, t in out.items()}
    return saved if set(saved) != set(shapes) else None


#: Tensors old checkpoints carry that a model recomputes (rotary frequencies): not weights.
_RECOMPUTED = re.compile(r"(?:^|\.)(?:rotary_emb\.inv_freq|inv_freq|masked_bias|attn\.bias)$")


_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _layer_count(keys: Any) -> int:
    idx = [int(m.group(1)) for k in keys if (m := _LAYER_RE.search(k))]
    return max(idx) + 1 if idx else 0


#: For a llama-like parameter name (by suffix): the config key that sets each dimension.
_DIM_KEYS: list[tuple[str, tuple[str, ...]]] = [
    ("embed_tokens.weight", ("vocab_size", "hidden_size")),
    ("lm_head.weight", ("vocab_size", "hidden_size")),
    ("q_proj.weight", ("num_attention_heads", "hidden_size")),
    ("k_proj.weight", ("num_key_value_heads", "hidden_size")),
    ("v_proj.weight", ("num_key_value_heads", "hidden_size")),
    ("o_proj.weight", ("hidden_size", "num_attention_heads")),
    ("q_proj.bias", ("num_attention_heads",)),
    ("k_proj.bias", ("num_key_value_heads",)),
    ("v_proj.bias", ("num_key_value_heads",)),
    ("gate_proj.weight", ("intermediate_size", "hidden_size")),
    ("up_proj.weight", ("intermediate_size", "hidden_size")),
    ("down_proj.weight", ("hidden_size", "intermediate_size")),
    ("q_norm.weight", ("head_dim",)),
    ("k_norm.weight", ("head_dim",)),
    ("norm.weight", ("hidden_size",)),
    ("layernorm.weight", ("hidden_size",)),
]


def _culprit(cfg: Any, name: str, got: tuple[int, ...], want: tuple[int, ...]) -> str:
    """`` (hidden_size=32)``: the config key behind the first dimension that differs, when known."""
    if len(got) != len(want):
        return ""
    m = _LAYER_RE.search(name)
    specs = getattr(cfg, "layers", None)  # compress format: per-layer widths
    spec = specs[int(m.group(1))] if m and isinstance(specs, list) and int(m.group(1)) < len(specs) else {}

    def value(key: str) -> str:
        if isinstance(spec, dict) and key in spec:
            return f"layers[{int(m.group(1))}].{key}={spec[key]}"  # type: ignore[union-attr]
        return f"{key}={getattr(cfg, key, '?')}"

    for suffix, keys in _DIM_KEYS:
        if ".experts." in name and "intermediate_size" in keys:  # one expert of a Mixture of Experts
            keys = tuple("moe_intermediate_size" if k == "intermediate_size" else k for k in keys)
        if name.endswith(suffix) and len(keys) == len(want):
            for dim, key in enumerate(keys):
                if got[dim] != want[dim]:
                    if key in ("num_attention_heads", "num_key_value_heads") and getattr(cfg, "head_dim", None):
                        return f" ({value(key)} × head_dim={cfg.head_dim})"
                    return f" ({value(key)})"
            return ""
    return ""


def _shape(s: tuple[int, ...]) -> str:
    return "×".join(map(str, s)) or "scalar"


def check_weights_match(cfg: Any, folder: Path, source: str) -> None:
    """Refuse a local safetensors folder whose weights do not have the tensors ``cfg`` implies (see the
    module docstring). Reads the headers only; a passed check is remembered by the files' sizes and
    mtimes and the config, so the several loads of one run check once."""
    files = weight_files(folder)
    if not files:
        return
    key = (tuple((str(p), *_stat(p)) for p in [folder / "config.json", *files]), cfg.to_json_string(use_diff=False))
    if key in _PASSED:
        return
    _check_uncached(cfg, folder, source)
    if len(_PASSED) > 64:
        _PASSED.clear()
    _PASSED.add(key)


_PASSED: set[tuple[Any, ...]] = set()


def _stat(p: Path) -> tuple[int, int]:
    try:
        st = p.stat()
    except OSError:
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)


def _check_uncached(cfg: Any, folder: Path, source: str) -> None:
    files = weight_files(folder) or []
    have = _read_shapes(files, source)
    try:
        exp = _expected_shapes(cfg)
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - the config was built from the user's file: its failure is that file's
        raise UsageError(f"the config of {source} does not describe a model that can be built "
                         f"({error_reason(e)}); {_FIX}") from None
    where = f"config.json of {source}"
    n_cfg = getattr(cfg, "num_hidden_layers", None)
    n_have = _layer_count(have)
    if _is_int(n_cfg) and n_have and n_have != n_cfg:
        if n_have > n_cfg:
            raise UsageError(f"{where} says num_hidden_layers={n_cfg} but its weights hold {n_have} layers: "
                             f"layers {n_cfg}..{n_have - 1} would be dropped silently; set num_hidden_layers to "
                             f"{n_have} or re-save the model")
        raise UsageError(f"{where} says num_hidden_layers={n_cfg} but its weights hold {n_have} layers: layers "
                         f"{n_have}..{n_cfg - 1} would be random; set num_hidden_layers to {n_have} or re-save the model")

    if exp.saved is not None and len(set(have) & set(exp.saved)) > len(set(have) & set(exp.shapes)):
        exp = exp.as_saved()  # the weights are in the checkpoint layout transformers converts from
    prefix = exp.prefix

    def in_file(name: str) -> str | None:
        if name in have:
            return name
        if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1:] in have:
            return name[len(prefix) + 1:]
        return None

    # tensors the config has no place for would be dropped silently (e.g. the biases of another family)
    bare = prefix and not any(k.startswith(prefix + ".") for k in have)
    unused = sorted(k for k in have if (f"{prefix}.{k}" if bare else k) not in exp.known
                    and not _RECOMPUTED.search(k) and not any(re.search(p, k) for p in exp.ignore_unexpected))
    if unused:
        raise UsageError(f"{where} does not match its weights: they hold {len(unused)} tensor(s) the config has no "
                         f"place for (e.g. {unused[0]}), which would be dropped silently; {_FIX}")
    missing = []
    for name, shape in exp.shapes.items():
        key = in_file(name)
        if key is None:
            if not any(re.search(p, name) for p in exp.ignore_missing):
                missing.append(name)
            continue
        if have[key] != shape:
            raise UsageError(f"{where} does not match its weights: {key} is {_shape(have[key])} in the weights but "
                             f"{_shape(shape)} by the config{_culprit(cfg, name, have[key], shape)}; {_FIX}")
    if missing:
        raise UsageError(f"the weights of {source} lack {len(missing)} tensor(s) the config needs "
                         f"(e.g. {sorted(missing)[0]}); they would be random: re-save the model")


def error_reason(e: BaseException) -> str:
    """A readable one-line reason for an exception raised while building a config or model: the cause
    of a wrapped validation error (huggingface_hub's strict dataclasses) when there is one."""
    for err in (e.__cause__, e):
        if err is None:
            continue
        lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
        if lines:
            return (lines[-1] if len(lines) > 1 and lines[0].endswith(":") else lines[0])[:240]
    return type(e).__name__
