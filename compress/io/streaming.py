"""Weight streaming: a model whose decoder layers are read from the safetensors files only when needed.

Layer-wise calibration (:mod:`compress.calib.layerwise`) keeps one decoder layer on the compute
device at a time, but a model loaded with :func:`compress.io.loading.load_model` is whole in host
RAM first: LLaMA-2-70B needs ~140 GB in bfloat16 before pruning starts. A streamed model
(:func:`open_streamed`, ``compress run --stream-weights``) is built without weights instead:

* the skeleton is built from the config with every parameter on the meta device (buffers such as
  the rotary ``inv_freq`` are computed as usual, they are not in the files);
* the embeddings, the final norm and the lm_head are read at once (the capture needs the embedding;
  they are part of the pruned model anyway);
* every decoder layer stays on meta until the layer-wise engine visits it
  (:meth:`WeightStream.load`); the method prunes it in its step, and the pruned layer stays;
  a step may instead hand the layer back (:meth:`WeightStream.release`: it is read again later);
* :meth:`WeightStream.finish` reads whatever is still on meta once the method is done (layers it never
  visited or handed back) and checks that nothing is left.

So the peak host memory is about one dense layer + the pruned model so far + the calibration
activations, instead of the dense model. Each tensor is cast to the run's dtype as
``from_pretrained`` casts it (bit-identical weights), and checked for non-finite values when read.

Validated before any layer's work (:class:`WeightStream` construction): the index
(``model.safetensors.index.json``) and every shard's header — a tensor the model needs that no shard
holds, or that the index places in a shard whose header lacks it, or whose shape differs from the
config's, is a one-line :class:`~compress.errors.UsageError` naming the tensor and the shard. Only
headers are read for that.

Sources: a local folder of safetensors weights in a stock transformers format. GGUF files are not
streamed (transformers dequantizes and renames the whole file at once; a per-tensor reader would need
its own name mapping and the q/k row permutation): convert once to a safetensors folder
(``save_pretrained``) to stream it. A compress-format folder (per-layer shapes) is not streamed either.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from compress.errors import NumericalError, Unsupported, UsageError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

__all__ = ["WeightStream", "can_stream", "open_streamed", "shard_map"]


def shard_map(folder: Path) -> tuple[dict[str, str], str]:
    """Tensor name -> shard file name of a safetensors folder, and what said so (the index file name,
    or the single file's). Reads the index and, without one, the header of ``model.safetensors``."""
    index = folder / INDEX_FILE
    if index.is_file():
        from compress.io.limits import MAX_CONFIG_BYTES
        from compress.io.safe_io import parse_json, read_text

        doc = parse_json(read_text(index, MAX_CONFIG_BYTES, "weight index"), str(index))
        wmap = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(wmap, dict) or not wmap:
            raise UsageError(f"{index} has no weight_map; re-save the model")
        out: dict[str, str] = {}
        for name, shard in wmap.items():
            shard = str(shard)
            if os.path.basename(shard) != shard or not shard.endswith(".safetensors"):
                raise UsageError(f"{index} names the shard {shard!r}, not a .safetensors file of the folder; "
                                 "re-save the model")
            out[str(name)] = shard
        return out, INDEX_FILE
    single = folder / SINGLE_FILE
    if not single.is_file():
        raise UsageError(f"{folder} has no {SINGLE_FILE} or {INDEX_FILE}; streaming needs a safetensors folder")
    return {name: SINGLE_FILE for name in _header(single)}, SINGLE_FILE


def _header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name -> (shape, dtype) from a safetensors header (no tensor data is read)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            out = {}
            for k in f.keys():  # noqa: SIM118 - a safe_open handle is not iterable
                sl = f.get_slice(k)
                out[k] = (tuple(int(x) for x in sl.get_shape()), str(sl.get_dtype()))
            return out
    except FileNotFoundError:
        raise UsageError(f"the shard {path.name} of {path.parent} is missing; re-download or re-save the model") from None
    except (SafetensorError, OSError) as e:
        raise UsageError(f"the shard {path} cannot be read ({str(e).splitlines()[0][:120]}): it is corrupt or "
                         "truncated; re-download or re-save the model") from None


def can_stream(source: str | None) -> str | None:
    """None when ``source`` can be streamed, else why not (a short phrase for an error message)."""
    if not source:
        return "the default model is a GGUF file"
    p = Path(source).expanduser()
    if not p.exists():
        return f"{source} is not a local folder (download it first)"
    if p.is_file():
        return "a GGUF file is dequantized whole by transformers" if p.suffix == ".gguf" else f"{source} is a file"
    if not ((p / SINGLE_FILE).is_file() or (p / INDEX_FILE).is_file()):
        if any(p.glob("*.gguf")):
            return "a GGUF file is dequantized whole by transformers"
        return f"{source} has no {SINGLE_FILE} / {INDEX_FILE}"
    from compress.io.loading import compress_format

    if compress_format(p):
        return f"{source} is a compress-format folder (per-layer shapes)"
    return None


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    from compress.model.adapter import adapter_for

    return list(adapter_for(model).layers)


class WeightStream:
    """Reads the tensors of ``model`` (a skeleton whose parameters are on meta) from ``folder`` on demand.

    Construction validates every tensor the model needs against the index and the shard headers and
    reads the parameters outside the decoder layers (embeddings, final norm, lm_head). Then
    :meth:`load` a module before it computes, :meth:`release` it to read it again later, and
    :meth:`finish` the model when the method is done. ``reads`` lists every tensor read, in order;
    ``bytes_read`` counts them.
    """

    def __init__(self, folder: str | os.PathLike, model: nn.Module, dtype: torch.dtype, *, source: str | None = None):
        self.folder = Path(folder)
        self.source = source or str(folder)
        self.dtype = dtype
        self.reads: list[str] = []
        self.bytes_read = 0
        where, origin = shard_map(self.folder)
        self._where = where
        # every (module, attribute) slot of a parameter or persistent buffer -> its tensor name in the files;
        # weak: a module the method replaced (a cut linear) must not keep its dense tensors alive
        self._slots: weakref.WeakKeyDictionary[nn.Module, dict[str, str]] = weakref.WeakKeyDictionary()
        tied: dict[int, str] = {}
        for mod_name, module in model.named_modules(remove_duplicate=False):
            slots: dict[str, str] = {}
            for attr, p in module._parameters.items():
                if p is None:
                    continue
                full = f"{mod_name}.{attr}" if mod_name else attr
                key = self._key(full)
                if key is None and id(p) in tied:  # tied (lm_head = embeddings): saved once
                    key = tied[id(p)]
                if key is None:
                    continue  # checked below, once every alias is known
                tied.setdefault(id(p), key)
                slots[attr] = key
            persistent = set(module._buffers) - set(getattr(module, "_non_persistent_buffers_set", set()))
            for attr in persistent:
                b = module._buffers[attr]
                if b is None:
                    continue
                key = self._key(f"{mod_name}.{attr}" if mod_name else attr)
                if key is not None:
                    slots[attr] = key
            if slots:
                self._slots.setdefault(module, {}).update(slots)
        self._aliases: dict[str, list[tuple[weakref.ref[nn.Module], str]]] = {}
        for module, slots in self._slots.items():
            for attr, key in slots.items():
                self._aliases.setdefault(key, []).append((weakref.ref(module), attr))
                b = module._buffers.get(attr)
                if b is not None and not b.is_meta:  # a persistent buffer the files hold: read it with its module
                    module._buffers[attr] = torch.empty_like(b, device="meta")
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) not in tied and p.dim() == 3 and ".experts." in name:
                raise Unsupported(f"--stream-weights reads each tensor by its name in the files, but {name} is fused "
                                  "on load from one tensor per expert (a Mixture-of-Experts checkpoint); drop "
                                  "--stream-weights")
            if id(p) not in tied:
                raise UsageError(f"no shard of {self.source} holds {name} ({origin} has no entry for it): the "
                                 "checkpoint is incomplete or of another layout; re-download or re-save the model")
        self._check_headers(model, origin)
        layers = _decoder_layers(model)
        inside = {id(m) for layer in layers for m in layer.modules()}
        outside = [m for m in self._slots if id(m) not in inside]
        self._read_into(outside)

    # ------------------------------------------------------------------ names and headers
    def _key(self, name: str) -> str | None:
        """The file's name for the model's tensor ``name`` (a base-model save lacks the ``model.`` prefix)."""
        if name in self._where:
            return name
        head, _, rest = name.partition(".")
        if rest and rest in self._where and head in ("model", "transformer"):
            return rest
        return None

    def _check_headers(self, model: nn.Module, origin: str) -> None:
        needed: dict[str, tuple[int, ...]] = {}
        for module, slots in self._slots.items():
            for attr, key in slots.items():
                t = module._parameters.get(attr)
                if t is None:
                    t = module._buffers.get(attr)
                if t is not None:
                    needed[key] = tuple(t.shape)
        by_shard: dict[str, list[str]] = {}
        for key in needed:
            by_shard.setdefault(self._where[key], []).append(key)
        for shard, keys in sorted(by_shard.items()):
            header = _header(self.folder / shard)
            for key in sorted(keys):
                if key not in header:
                    raise UsageError(f"the shard {shard} of {self.source} lacks {key}, which {origin} places there: "
                                     "the checkpoint is incomplete; re-download or re-save the model")
                shape = header[key][0]
                if shape != needed[key]:
                    raise UsageError(f"{key} in the shard {shard} of {self.source} has shape {list(shape)} but the "
                                     f"config implies {list(needed[key])}; fix config.json or re-save the model")

    # ------------------------------------------------------------------ reading
    def _read_into(self, modules: list[nn.Module]) -> int:
        """Read every meta slot of ``modules`` (one open per shard). Returns the number of tensors read."""
        todo: dict[str, list[tuple[nn.Module, str, str]]] = {}
        for module in modules:
            for attr, key in self._slots.get(module, {}).items():
                if self._is_meta(module, attr):
                    todo.setdefault(self._where[key], []).append((module, attr, key))
        n = 0
        for shard, items in todo.items():
            path = self.folder / shard
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    read: dict[str, torch.Tensor] = {}
                    for module, attr, key in items:
                        if not self._is_meta(module, attr):
                            continue  # a tied alias, filled with its twin
                        if key not in read:
                            read[key] = self._cast(key, f.get_tensor(key))
                            self.reads.append(key)
                            self.bytes_read += read[key].numel() * read[key].element_size()
                            n += 1
                        self._assign(key, read[key])
            except (SafetensorError, OSError) as e:
                raise UsageError(f"the shard {path} cannot be read ({str(e).splitlines()[0][:120]}): it is corrupt "
                                 "or truncated; re-download or re-save the model") from None
        return n

    def _cast(self, key: str, t: torch.Tensor) -> torch.Tensor:
        # a fresh copy at the run's dtype: safe_open's tensors may share the shard's memory map, which
        # stays resident (the whole shard) for as long as any tensor read from it lives
        t = t.to(self.dtype, copy=True) if t.is_floating_point() else t.clone()
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise NumericalError(f"non-finite values in {key} of the input model; check the input model / "
                                 "method settings")
        return t

    @staticmethod
    def _is_meta(module: nn.Module, attr: str) -> bool:
        t = module._parameters.get(attr) if attr in module._parameters else module._buffers.get(attr)
        return t is not None and t.is_meta

    def _assign(self, key: str, t: torch.Tensor) -> None:
        """Put the tensor read for ``key`` into every slot that names it (a tied pair shares one parameter)."""
        new: nn.Parameter | None = None
        for ref, attr in self._aliases[key]:
            module = ref()
            if module is None or not self._is_meta(module, attr):
                continue
            slot = module._parameters[attr] if attr in module._parameters else module._buffers[attr]
            if tuple(slot.shape) != tuple(t.shape):  # cut while on meta: the dense tensor no longer fits
                raise RuntimeError(f"{key} was reshaped to {list(slot.shape)} before it was read ({list(t.shape)} "
                                   "in the files); a streaming method must cut a layer only after the engine read it")
            if attr in module._parameters:
                if new is None:
                    new = nn.Parameter(t, requires_grad=module._parameters[attr].requires_grad)
                module._parameters[attr] = new
            else:
                module._buffers[attr] = t

    # ------------------------------------------------------------------ the engine's calls
    def load(self, module: nn.Module) -> int:
        """Read ``module``'s tensors that are still on meta (none: a no-op). Returns how many were read."""
        return self._read_into(list(module.modules()))

    def release(self, module: nn.Module) -> None:
        """Put ``module``'s streamed tensors back on meta (read again by :meth:`load` or :meth:`finish`).

        Only for a module whose tensors are still those of the files: a changed one would be re-read dense."""
        for m in module.modules():
            for attr in self._slots.get(m, {}):
                if attr in m._parameters and m._parameters[attr] is not None:
                    p = m._parameters[attr]
                    m._parameters[attr] = nn.Parameter(torch.empty_like(p, device="meta"),
                                                       requires_grad=p.requires_grad)
                elif m._buffers.get(attr) is not None:
                    m._buffers[attr] = torch.empty_like(m._buffers[attr], device="meta")

    def allocate(self, module: nn.Module) -> None:
        """Give ``module``'s meta tensors uninitialised CPU memory (to be overwritten, e.g. by a checkpoint)."""
        for m in module.modules():
            for attr, p in list(m._parameters.items()):
                if p is not None and p.is_meta:
                    m._parameters[attr] = nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=p.requires_grad)
            for attr, b in list(m._buffers.items()):
                if b is not None and b.is_meta:
                    m._buffers[attr] = torch.empty_like(b, device="cpu")

    def finish(self, model: nn.Module) -> None:
        """Read every tensor still on meta (layers never visited, or handed back) and check that none is left."""
        self._read_into([m for m in model.modules() if m in self._slots])
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.is_meta:
                raise RuntimeError(f"{name} is still on the meta device after streaming (its shape was changed "
                                   "before its weights were read); the method must visit or keep each layer")

    @contextlib.contextmanager
    def on_demand(self, model: nn.Module) -> Iterator[None]:
        """Inside the block, each decoder layer is read just before its forward and released after it:
        a whole-model forward (e.g. the dense perplexity) with one dense layer in memory at a time.
        Layers already in memory stay as they are."""
        handles = []
        loaded: set[int] = set()

        def pre(module: nn.Module, *_: Any, **__: Any) -> None:
            if self.load(module):
                loaded.add(id(module))

        def post(module: nn.Module, *_: Any, **__: Any) -> None:
            if id(module) in loaded:
                loaded.discard(id(module))
                self.release(module)

        try:
            for layer in _decoder_layers(model):
                handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
                handles.append(layer.register_forward_hook(post, with_kwargs=True))
            yield
        finally:
            for h in handles:
                h.remove()


def open_streamed(source: str, *, dtype: torch.dtype, trust_remote_code: bool = False) -> tuple[Any, WeightStream]:
    """``source``'s model (a :class:`compress.io.loading.LoadedModel`, with its tokenizer) with the
    decoder layers on meta, and a :class:`WeightStream` that fills them.

    ``source`` must be a local safetensors folder in a stock format (:func:`can_stream`); the config
    is read and checked as :func:`compress.io.loading.load_model` does, and the index and shard headers
    are validated before anything else is read."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, GenerationConfig

    from compress.io.loading import LoadedModel, _check_source, _check_weights, _load_tokenizer, load_config

    why = can_stream(source)
    if why is not None:
        raise UsageError(f"--stream-weights needs a local safetensors folder of a stock model: {why}; drop "
                         "--stream-weights (or convert the model once with save_pretrained)")
    path = Path(source).expanduser()
    _check_source(str(path))
    _check_weights(path)
    cfg = load_config(str(path), trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # accelerate's meta parameters replace the tied object: tie it again
    model.config.name_or_path = str(path)
    if (path / "generation_config.json").is_file():
        with contextlib.suppress(Exception):  # noqa: BLE001 - from_pretrained keeps the default as well
            model.generation_config = GenerationConfig.from_pretrained(str(path))
    model.eval()
    tokenizer = _load_tokenizer(str(path), trust_remote_code)
    stream = WeightStream(path, model, dtype, source=source)
    return LoadedModel(model=model, tokenizer=tokenizer, source=str(source)), stream
