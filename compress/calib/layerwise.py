"""Layer-by-layer calibration: run a decoder one layer at a time over the calibration batch.

Every calibration-based method goes through :class:`LayerwiseRunner`: it captures the hidden states
and the keyword arguments (rotary cos/sin, attention mask, position ids) that enter each decoder
layer, then visits the layers in order. At each :class:`LayerStep` the method runs the cached inputs
through the layer with its hooks (:meth:`LayerStep.forward`, or its own loop over
:meth:`LayerStep.batches`), may prune or transform the layer (sequential methods: SliceGPT, LoRAP),
and the engine then recomputes the layer's outputs, after the change, as the next layer's inputs.
:func:`compress.calib.runner.run_calibration` (``layerwise=True``) is the non-sequential case (one
forward per layer, whose outputs are kept), and :func:`loss_gradients` runs the LM-loss backward
layer by layer (LLM-Pruner's Taylor importance).

Typical use::

    with LayerwiseRunner(model, batches, batch_size=4, device="cuda", cache="cpu") as runner:
        for step in runner:                       # step.layer is on "cuda" while the body runs
            with record({"o": step.layer.self_attn.o_proj}) as stats:
                step.forward()                    # statistics of this layer
            prune(step.layer, stats)              # the next layer sees the pruned layer's outputs

What the engine keeps in memory (N sequences × T tokens, hidden size H, model dtype of b bytes,
L layers, mini-batches of B sequences):

* **Weights** stay where they are (their *home*, normally CPU RAM). Only the current decoder layer
  is moved to the compute ``device`` while its step runs, and moved back afterwards; nothing moves
  when the home is the compute device. The final norm and lm_head move only for :func:`loss_gradients`.
  With a weight ``stream`` (:class:`compress.io.streaming.WeightStream`, ``--stream-weights``) the
  decoder layers are not in memory at all until visited: the engine reads layer ``i``'s tensors from
  the files just before its step, the step prunes it (the pruned layer stays), or hands it back with
  :meth:`LayerStep.release` (it is read again when needed). A method that prunes layer ``i`` from
  statistics of the dense model calls :meth:`LayerStep.advance` first, so that layer ``i + 1`` still
  sees the dense layer's outputs.
* **Activation cache** (``cache``): the hidden states entering the current layer, N·T·H·b bytes, in
  CPU RAM (``"cpu"``), on the compute device (``"device"``) or as one file per mini-batch under a
  folder (one mini-batch in RAM at a time). In RAM the set is one tensor and each mini-batch's outputs
  overwrite its inputs in place, so the boundary between layers costs exactly one set (methods that
  build signal sets of their own, e.g. SliceGPT's mid-layer residuals and layer outputs, add theirs).
  ``keep_inputs`` (used by :func:`loss_gradients`) keeps the inputs of the named layers, k of them:
  (k + 1)·N·T·H·b with the last layer's outputs, plus two sets of gradients (the upstream one and the
  one being passed down) during the backward.
* **Layer keyword arguments**: one copy per distinct value (equal values of different mini-batches
  and layers are shared), usually just the rotary cos/sin (2·T·head_dim floats) plus, for eager
  attention or padded batches, a B·T·T mask per distinct mask.
* **Compute device**: one layer's weights plus one mini-batch's activations inside that layer.
  Freed host memory is handed back to the OS after every layer (glibc ``malloc_trim``), so RSS does
  not creep up layer after layer through heap fragmentation (within a layer, glibc may keep a few
  mini-batches' worth of freed blocks).
* **Capture** runs only the backbone's embedding, mask and rotary code (decoder layers are replaced by
  stand-ins that record their inputs); the lm_head never runs, so there are no N·T·vocab logits.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from compress.calib.stats import CURRENT_MASK, check_batches
from compress.errors import Unsupported, UsageError
from compress.model.adapter import ArchAdapter, adapter_for
from compress.model.footprint import model_bytes
from compress.progress import progress_bar

#: ``--layerwise`` is on by default when the model's weights take more than this many bytes
#: (4 GiB: about 1B parameters in fp32, 2B in bf16). Below it the whole-model pass is simpler and
#: at least as fast; above it, calibrating one layer at a time is what lets a model that does not
#: fit on the accelerator be pruned there.
LAYERWISE_AUTO_BYTES = 4 * 2**30


CacheSpec = str | os.PathLike  # "cpu", "device", or a folder for files


class LayerSource(Protocol):
    """Where the engine reads a decoder layer's weights just before its step (weight streaming:
    :class:`compress.io.streaming.WeightStream`)."""

    def load(self, module: nn.Module) -> int: ...

    def release(self, module: nn.Module) -> None: ...


def resolve_layerwise(requested: bool | None, model: nn.Module) -> bool:
    """``requested`` when given (``--layerwise`` / ``--no-layerwise``), else on when the weights
    (:func:`compress.model.footprint.model_bytes`) exceed :data:`LAYERWISE_AUTO_BYTES`."""
    if requested is not None:
        return bool(requested)
    return model_bytes(model) > LAYERWISE_AUTO_BYTES


def context_options(ctx: Any) -> dict[str, Any]:
    """Placement of a :class:`LayerwiseRunner` for a :class:`compress.PruneContext`.

    Layer-wise (``ctx.layerwise``): compute on ``ctx.device``, cache in CPU RAM or under
    ``ctx.offload_dir``. Otherwise everything stays where the model is (cache on its device).
    """
    if getattr(ctx, "layerwise", False):
        offload = getattr(ctx, "offload_dir", None)
        return {"device": getattr(ctx, "device", None), "cache": offload if offload is not None else "cpu"}
    return {"device": None, "cache": "device"}


_LIBC: Any = None


def _trim_host_memory() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Called after every layer. Small long-lived allocations (statistics buffers) land between a
    layer's large temporary activations; glibc then keeps the freed blocks, and without a trim RSS
    grows layer after layer (measured on SmolLM2: +210 MB over 30 layers instead of a flat +48 MB).
    A trim costs a few milliseconds (after every mini-batch it would cost ~25 % of a small model's
    calibration time for a few MB).
    """
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def _module_device(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def on_device(modules: Sequence[nn.Module], device: torch.device) -> Iterator[None]:
    """Move ``modules`` to ``device`` for the body, then back to where each was."""
    homes = [_module_device(m) for m in modules]
    try:
        for m, home in zip(modules, homes, strict=True):
            if home != device:
                m.to(device)
        yield
    finally:
        for m, home in zip(modules, homes, strict=True):
            if home != device:
                m.to(home)


# ============================================================================ activation cache
class ActivationCache:
    """One tensor per mini-batch, kept on a device (CPU RAM or the accelerator) or in files.

    In memory, the mini-batches of a cache of ``rows`` sequences share ONE ``[rows, ...]`` tensor
    (the *slab*, allocated at the first append): a layer's outputs overwrite its inputs in place
    (:meth:`replace`), and the allocator sees one block per cache instead of one per mini-batch
    (per-mini-batch blocks fragment the heap, and RSS then grows layer after layer). An item whose
    shape or dtype does not fit the slab is kept as its own tensor. Items come back from ``cache[k]``
    where they are stored (files are read back to CPU); move them to the compute device yourself.
    :meth:`release` forgets one item (a file is deleted at once, slab memory at :meth:`clear`).
    """

    def __init__(self, where: torch.device | Path, rows: int | None = None):
        self.where = where
        self.rows = rows
        self._slab: torch.Tensor | None = None
        self._used = 0  # slab rows handed out
        self._items: list[torch.Tensor | Path | None] = []
        self._in_slab: list[bool] = []

    @property
    def on_disk(self) -> bool:
        return isinstance(self.where, Path)

    def _slot(self, t: torch.Tensor) -> torch.Tensor | None:
        """A free slab view for ``t`` (``None``: it does not fit, store it on its own)."""
        if self.rows is None or self.on_disk or t.dim() == 0:
            return None
        if self._slab is None:
            self._slab = torch.empty((self.rows, *t.shape[1:]), dtype=t.dtype, device=self.where)
        n = t.shape[0]
        if self._slab.shape[1:] != t.shape[1:] or self._slab.dtype != t.dtype or self._used + n > self.rows:
            return None
        view = self._slab[self._used:self._used + n]
        self._used += n
        return view

    def _store(self, t: torch.Tensor) -> torch.Tensor | Path:
        if self.on_disk:
            t = t.cpu()
            if t.untyped_storage().nbytes() != t.numel() * t.element_size():
                t = t.clone()  # a view would save its whole storage
            path = self.where / f"{uuid.uuid4().hex}.pt"
            torch.save(t, path)
            return path
        return t.to(self.where)

    def append(self, t: torch.Tensor) -> None:
        t = t.detach()
        view = self._slot(t)
        if view is not None:
            view.copy_(t)
            self._items.append(view)
        else:
            self._items.append(self._store(t))
        self._in_slab.append(view is not None)

    def replace(self, k: int, t: torch.Tensor) -> None:
        """Put ``t`` in place of item ``k`` (in the slab, overwriting it, when the shape is the same)."""
        t = t.detach()
        item = self._items[k]
        if self._in_slab[k] and isinstance(item, torch.Tensor) and item.shape == t.shape and item.dtype == t.dtype:
            item.copy_(t)
            return
        self.release(k)
        self._items[k] = self._store(t)

    def __getitem__(self, k: int) -> torch.Tensor:
        item = self._items[k]
        if item is None:
            raise RuntimeError(f"mini-batch {k} of this activation cache was already released")
        if isinstance(item, Path):
            return torch.load(item, weights_only=True)
        return item

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for k in range(len(self._items)):
            yield self[k]

    def release(self, k: int) -> None:
        item = self._items[k]
        if isinstance(item, Path):
            item.unlink(missing_ok=True)
        self._items[k] = None
        self._in_slab[k] = False

    def clear(self) -> None:
        for k in range(len(self._items)):
            self.release(k)
        self._items.clear()
        self._in_slab.clear()
        self._slab = None
        self._used = 0


# ============================================================================ keyword arguments
def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor], memo: dict[int, Any]) -> Any:
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = fn(obj)
        return memo[id(obj)]
    if isinstance(obj, tuple):
        return tuple(_map_tensors(o, fn, memo) for o in obj)
    if isinstance(obj, list):
        return [_map_tensors(o, fn, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn, memo) for k, v in obj.items()}
    return obj


def _same(a: Any, b: Any) -> bool:
    """Structural equality of captured layer arguments (tensors compared by value)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b))
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if a is None or isinstance(a, (bool, int, float, str)):
        return type(a) is type(b) and a == b
    return False  # other objects (caches, ...) are never shared


class _StopCapture(Exception):
    """Raised by the last stand-in once every layer's inputs are recorded (skips the final norm)."""


class _StandIn(nn.Module):
    """Takes a decoder layer's place during capture: records what the layer would get, returns it unchanged."""

    def __init__(self, layer: nn.Module, index: int, sink: Callable[[int, torch.Tensor, dict], None], last: bool):
        super().__init__()
        self.index, self._sink, self._last = index, sink, last
        for attr in ("attention_type", "layer_idx", "is_sliding"):  # read by some backbones' loops
            if hasattr(layer, attr):
                setattr(self, attr, getattr(layer, attr))

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise Unsupported("the backbone passes positional arguments to its decoder layers besides the hidden "
                              "states; layer-wise calibration supports keyword arguments only")
        self._sink(self.index, hidden_states, kwargs)
        if self._last:
            raise _StopCapture
        return hidden_states


# ============================================================================ the runner
class LayerStep:
    """One decoder layer's turn: the layer is on the compute device and its inputs are cached.

    After the loop body, the engine runs the cached inputs through the (possibly changed) layer to
    get the next layer's inputs, unless the body gave them with :meth:`set_outputs`.
    """

    def __init__(self, runner: LayerwiseRunner, index: int, layer: nn.Module, inputs: ActivationCache | None):
        self.runner = runner
        self.index = index
        self.layer = layer
        self._inputs = inputs
        self._outputs: ActivationCache | None = None
        self._release = False

    @property
    def device(self) -> torch.device:
        return self.runner.device

    def __len__(self) -> int:
        return len(self.runner._starts)

    def _need_inputs(self) -> ActivationCache:
        if self._inputs is None:
            raise RuntimeError(f"the inputs of layer {self.index} were already dropped")
        return self._inputs

    def batches(self, release: bool = False) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        """``(hidden states, layer kwargs)`` of each mini-batch on the compute device.

        While the caller holds a mini-batch, its token mask is the one :func:`compress.calib.stats.record`
        uses, so statistics skip padded positions. ``release=True`` frees each cached input after use.
        """
        inputs = self._need_inputs()
        for b in range(len(inputs)):
            x = inputs[b].to(self.device)
            token = CURRENT_MASK.set(self.runner._mask(b))
            try:
                yield x, self.runner.layer_kwargs(b, self.index)
            finally:
                CURRENT_MASK.reset(token)
            del x
            if release:
                inputs.release(b)

    def call(self, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """The layer's output hidden states for one mini-batch."""
        out = self.layer(x, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def forward(self) -> None:
        """Run every cached mini-batch through the layer without gradients (hooks see them).

        A body whose hooks stay registered after it need not call it: after the body the engine
        runs the layer anyway to make the next layer's inputs, and those hooks see that pass too.
        """
        with torch.no_grad():
            for x, kw in self.batches():
                self.call(x, kw)

    def _advance(self) -> None:
        """Outputs of every mini-batch → the next layer's inputs (in place of the inputs if not kept)."""
        inputs = self._need_inputs()
        in_place = not self.runner._keeps(self.index)
        outs = inputs if in_place else self.runner.new_cache()
        with torch.no_grad():
            for b, (x, kw) in enumerate(self.batches()):
                y = self.call(x, kw)
                del x
                if in_place:
                    inputs.replace(b, y)
                else:
                    outs.append(y)
        self._outputs = outs
        if in_place:
            self._inputs = None

    def advance(self) -> None:
        """Compute the next layer's inputs NOW, with the layer as it is (hooks see this pass).

        For a method that prunes layer ``i`` from statistics of the unchanged model (TransAct with
        streamed weights): record the statistics during this pass, then change the layer; the next
        layer's inputs are those of the unchanged layer, as in a whole-model pass."""
        if self._outputs is not None:
            raise RuntimeError(f"the outputs of layer {self.index} were already computed")
        self._advance()

    def release(self) -> None:
        """Hand the layer's weights back after this step (streamed weights: they go back to the files and
        are read again when needed; otherwise a no-op). Only for a layer the step did not change."""
        self._release = True

    def map_inputs(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace each cached input ``x`` (on the compute device) by ``fn(x)`` (e.g. a rotation)."""
        inputs = self._need_inputs()
        with torch.no_grad():
            for b in range(len(inputs)):
                inputs.replace(b, fn(inputs[b].to(self.device)))

    def new_cache(self) -> ActivationCache:
        """An empty cache where the runner keeps activations (for signals a method builds itself)."""
        return self.runner.new_cache()

    def set_outputs(self, tensors: Iterable[torch.Tensor]) -> None:
        """Give the next layer's inputs (one tensor per mini-batch) instead of recomputing them."""
        outs = self.runner.new_cache()
        for t in tensors:
            outs.append(t)
        if len(outs) != len(self):
            n = len(outs)
            outs.clear()
            raise ValueError(f"set_outputs got {n} mini-batches, expected {len(self)}")
        self._outputs = outs

    def drop_inputs(self) -> None:
        """Free the cached inputs now (the step must then end with :meth:`set_outputs`)."""
        if self._inputs is not None and not self.runner._keeps(self.index):
            self._inputs.clear()
        self._inputs = None


class LayerwiseRunner:
    """Visit the decoder layers in order with the calibration batch's hidden states cached.

    ``batches`` is ``[N, T]`` token ids, run in mini-batches of ``batch_size`` (the same mini-batches
    as :func:`compress.calib.runner.run_calibration`, so statistics are identical to a whole-model
    pass). ``attention_mask`` (``[N, T]``) marks real tokens: it builds the layers' masks and
    excludes padding from :func:`compress.calib.stats.record` statistics. ``device``: where layers
    compute (default: where the embedding is). ``cache``: ``"cpu"``, ``"device"`` or a folder for
    files. ``keep_inputs``: layers whose inputs stay in :attr:`boundaries` after their step (``True``
    for all). ``stream``: where each layer's weights are read just before its step (weight streaming).
    After the loop, :attr:`outputs` holds the last layer's outputs. Use it as a context
    manager so that files of a disk cache are removed. See the module docstring for memory.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: torch.Tensor,
        *,
        arch: ArchAdapter | None = None,
        batch_size: int = 8,
        attention_mask: torch.Tensor | None = None,
        device: str | torch.device | None = None,
        cache: CacheSpec = "cpu",
        keep_inputs: bool | Collection[int] = False,
        progress: bool | Callable[[int, int], None] | None = False,
        description: str = "layer-wise calibration",
        stream: LayerSource | None = None,
    ):
        check_batches(batches, attention_mask, batch_size)
        self.model = model
        self.arch = arch if arch is not None else adapter_for(model)
        self.batches_ids = batches
        self.attention_mask = attention_mask
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else _module_device(self.arch.embed_tokens)
        self.keep_inputs = keep_inputs
        self.progress = progress
        self.description = description
        self.stream = stream
        self._starts = list(range(0, batches.shape[0], batch_size))
        self._cache_spec = cache
        self._dir: Path | None = None
        self._kw_store: list[tuple[dict[str, Any]]] = []
        self._kw_index: list[list[int]] = []
        self._kw_device: dict[int, dict[str, Any]] = {}
        self._masks: list[torch.Tensor | None] = []
        self.boundaries: dict[int, ActivationCache] = {}
        self.outputs: ActivationCache | None = None
        self.tokens = 0
        if not isinstance(cache, (str, os.PathLike)):
            raise UsageError(f"cache must be 'cpu', 'device' or a folder, not {cache!r}")
        if str(cache) not in ("cpu", "device"):
            p = Path(cache).expanduser()
            if p.exists() and not p.is_dir():
                raise UsageError(f"offload folder {str(p)!r} is a file; give a folder for layer-wise activations")

    # ------------------------------------------------------------------ storage
    def _kw_where(self) -> torch.device:
        return self.device if str(self._cache_spec) == "device" else torch.device("cpu")

    def new_cache(self) -> ActivationCache:
        spec = str(self._cache_spec)
        rows = int(self.batches_ids.shape[0])
        if spec == "cpu":
            return ActivationCache(torch.device("cpu"), rows)
        if spec == "device":
            return ActivationCache(self.device, rows)
        if self._dir is None:
            root = Path(self._cache_spec).expanduser()
            try:
                root.mkdir(parents=True, exist_ok=True)
                self._dir = Path(tempfile.mkdtemp(prefix="compress-layerwise-", dir=root))
            except OSError as e:
                raise UsageError(f"cannot write layer-wise activations under {str(root)!r}: "
                                 f"{e.strerror or e}; choose a writable folder") from e
        return ActivationCache(self._dir)

    def close(self) -> None:
        """Free every cached activation (and the files of a disk cache)."""
        for c in self.boundaries.values():
            c.clear()
        self.boundaries.clear()
        if self.outputs is not None:
            self.outputs.clear()
            self.outputs = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> LayerwiseRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _keeps(self, index: int) -> bool:
        if isinstance(self.keep_inputs, bool):
            return self.keep_inputs
        return index in self.keep_inputs

    def _mask(self, b: int) -> torch.Tensor | None:
        m = self._masks[b] if b < len(self._masks) else None
        return None if m is None else m.to(self.device)

    def layer_kwargs(self, b: int, layer: int) -> dict[str, Any]:
        """Keyword arguments of ``layer`` for mini-batch ``b``, on the compute device."""
        k = self._kw_index[b][layer]
        if k not in self._kw_device:
            self._kw_device[k] = _map_tensors(self._kw_store[k], lambda t: t.to(self.device), {})
        return self._kw_device[k]

    def _intern(self, kw: dict[str, Any], memo: dict[int, Any]) -> int:
        where = self._kw_where()
        stored = _map_tensors(kw, lambda t: t.detach().to(where), memo)
        for k, old in enumerate(self._kw_store):
            if _same(old, stored):
                return k
        self._kw_store.append(stored)
        return len(self._kw_store) - 1

    # ------------------------------------------------------------------ capture
    def _capture(self) -> ActivationCache:
        """Hidden states entering layer 0 and every layer's keyword arguments, per mini-batch."""
        arch = self.arch
        layers = arch.layers
        n = len(layers)
        originals = list(layers)
        seen: dict[int, tuple[torch.Tensor, dict[str, Any]]] = {}

        def sink(i: int, hs: torch.Tensor, kw: dict[str, Any]) -> None:
            seen[i] = (hs, kw)

        hidden = self.new_cache()
        emb_dev = _module_device(arch.embed_tokens)
        ids_all, mask_all = self.batches_ids, self.attention_mask
        try:
            for i in range(n):
                layers[i] = _StandIn(originals[i], i, sink, last=i == n - 1)
            for s in self._starts:
                seen.clear()
                ids = ids_all[s:s + self.batch_size].to(emb_dev)
                mask = None if mask_all is None else mask_all[s:s + self.batch_size].to(emb_dev)
                with contextlib.suppress(_StopCapture), torch.no_grad():
                    arch.backbone(input_ids=ids, attention_mask=mask, use_cache=False)
                if len(seen) != n:
                    raise Unsupported(f"{type(arch.backbone).__name__} called {len(seen)} of its {n} decoder layers; "
                                      "layer-wise calibration needs every layer called once per forward")
                hidden.append(seen[0][0])
                memo: dict[int, Any] = {}
                self._kw_index.append([self._intern(seen[i][1], memo) for i in range(n)])
                self._masks.append(None if mask is None else mask.detach().cpu())
                self.tokens += ids.numel() if mask is None else int(mask.sum())
        except BaseException:
            hidden.clear()
            raise
        finally:
            for i in range(n):
                layers[i] = originals[i]
        return hidden

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[LayerStep]:
        layers = self.arch.layers
        inputs = self._capture()
        _trim_host_memory()  # the capture's embedding outputs and masks, freed, would stay resident
        total = len(layers)
        with progress_bar(self.progress, total, self.description) as advance:
            for i in range(total):
                layer = layers[i]
                if self.stream is not None:
                    self.stream.load(layer)  # streamed weights: this layer's tensors, read now
                step = LayerStep(self, i, layer, inputs)
                with on_device([layer], self.device):
                    try:
                        yield step
                        if step._outputs is None:
                            step._advance()
                    except BaseException:
                        for c in (step._outputs, step._inputs):
                            if c is not None and not (c is step._inputs and self._keeps(i)):
                                c.clear()
                        raise
                if step._release and self.stream is not None:
                    self.stream.release(layer)
                kept = step._inputs if self._keeps(i) else None
                if kept is not None:
                    self.boundaries[i] = kept
                elif step._inputs is not None:
                    step._inputs.clear()
                inputs = step._outputs
                del step
                _trim_host_memory()
                advance()
        self.outputs = inputs
