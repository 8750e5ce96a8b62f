"""Footprint of a (possibly pruned) causal LM: parameters, FLOPs/token, KV-cache bytes/token, latency.

Everything is computed from **module shapes** (through :class:`compress.arch.ArchAdapter`), never
from config values, because pruned models can have a different number of heads or MLP width in
every layer, low-rank factor pairs in place of linears, or extra "shortcut" linears in the residual
path (SliceGPT). Nothing here reads weight *values*, so every function except :func:`latency` also
works on a model built on the ``meta`` device, which is how a 7B/70B plan is sized without weights::

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    footprint(model)

Conventions
-----------
* **Parameters** — every unique tensor once: a Parameter shared by two modules (tied embedding and
  lm_head) or two Parameters viewing the same storage count once. Buffers are not parameters.
* **FLOPs per token** — forward FLOPs of one pass over a sequence of ``seq_len`` tokens, divided by
  ``seq_len`` (so ``flops_per_token(m, T) * B * T`` is the FLOPs of a ``[B, T]`` forward). A
  multiply-add counts 2 FLOPs. Counted: every linear-like module (``2·in·out`` per token; the bias
  add, norms, activations, softmax and RoPE are not counted; the embedding lookup is free; the
  lm_head is a matmul even when its weight is tied to the embedding) plus the attention core of
  each layer, ``QKᵀ`` and ``AV`` on the full ``T×T`` score matrix (no causal halving):
  ``4·n_q·head_dim·T`` per token. This is exactly what :class:`torch.utils.flop_counter.FlopCounterMode`
  counts under ``attn_implementation="eager"``. For a uniform Llama layer it reduces to
  ``2·h·(nq+2nkv)·hd + 2·nq·hd·h + 4·nq·hd·T + 6·h·I`` per token, plus ``2·h·V`` for the lm_head.
* **KV bytes per token** — bytes the KV cache grows by per token per sequence: the sum over layers of
  the k_proj and v_proj output widths (``2·n_kv·head_dim``) times the element size.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from compress.arch import ArchAdapter, _out_features

__all__ = [
    "FlopCounted",
    "Footprint",
    "LiveTensors",
    "PeakRSS",
    "count_params",
    "flops_per_token",
    "footprint",
    "kv_bytes_per_token",
    "latency",
    "linear_flops_per_token",
    "model_bytes",
    "param_breakdown",
    "peak_rss_bytes",
    "track_live_tensors",
    "track_peak_rss",
]


# --------------------------------------------------------------------------------------- protocol
@runtime_checkable
class FlopCounted(Protocol):
    """A linear-like module that reports its own forward FLOPs per token.

    Implement it on custom replacements of ``nn.Linear`` (e.g. a low-rank pair ``B @ A`` returns
    ``2·rank·(in_features + out_features)``). When a module satisfies this protocol its own figure is
    used and its submodules are not visited. A module that does not implement it is looked into: a
    low-rank module made of two ``nn.Linear`` children is then counted correctly anyway.
    """

    in_features: int
    out_features: int

    def flops_per_token(self) -> float:
        """Forward FLOPs for one token (2 per multiply-add)."""
        ...


# --------------------------------------------------------------------------------------- helpers
def _adapter(model: nn.Module, arch: ArchAdapter | None) -> ArchAdapter:
    return arch if arch is not None else ArchAdapter(model)


def _tensor_key(t: torch.Tensor) -> tuple[Any, ...]:
    """Identity of a tensor's storage region; identity of the object on meta (no storage there)."""
    if t.is_meta:
        return ("id", id(t))
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # exotic tensor subclasses
        return ("id", id(t))
    if ptr == 0:  # empty storage: only identity is meaningful
        return ("id", id(t))
    return (str(t.device), ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _unique(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    seen: set[tuple[Any, ...]] = set()
    out: list[torch.Tensor] = []
    for t in tensors:
        k = _tensor_key(t)
        if k not in seen:
            seen.add(k)
            out.append(t)
    return out


def _param_dtype(model: nn.Module) -> torch.dtype:
    """Dtype of the first floating-point parameter (float32 if there is none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(m).__name__.lower()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------- params
def count_params(model: nn.Module) -> int:
    """Number of unique parameter elements (tied embeddings counted once; works on meta)."""
    return sum(p.numel() for p in _unique(model.parameters()))


def model_bytes(model: nn.Module) -> int:
    """Bytes of the unique parameters and buffers (what the weights occupy in memory)."""
    tensors = _unique([*model.parameters(), *model.buffers()])
    return sum(t.numel() * t.element_size() for t in tensors)


def param_breakdown(model: nn.Module, arch: ArchAdapter | None = None) -> dict[str, int]:
    """Unique parameters by role.

    Keys: ``embedding``, ``lm_head`` (0 when tied to the embedding), ``attention`` (everything under
    each layer's attention module, q/k norms included), ``mlp``, ``norms`` (any other module whose
    class name contains "Norm": per-layer and final norms), ``other`` (e.g. SliceGPT shortcuts) and
    ``total`` (= :func:`count_params`). Each tensor is attributed once, to the first role above.
    """
    a = _adapter(model, arch)
    seen: set[tuple[Any, ...]] = set()
    out = dict.fromkeys(("embedding", "lm_head", "attention", "mlp", "norms", "other"), 0)

    def claim(role: str, params: Iterable[torch.Tensor]) -> None:
        for p in params:
            k = _tensor_key(p)
            if k not in seen:
                seen.add(k)
                out[role] += p.numel()

    claim("embedding", a.embed_tokens.parameters())
    claim("lm_head", a.lm_head.parameters())
    for i in range(a.num_layers):
        claim("attention", a.attention(i).parameters())
    for i in range(a.num_layers):
        claim("mlp", a.mlp(i).parameters())
    for m in model.modules():
        if _is_norm(m):
            claim("norms", m.parameters(recurse=False))
    claim("other", model.parameters())
    out["total"] = sum(out.values())
    return out


# --------------------------------------------------------------------------------------- FLOPs
def linear_flops_per_token(module: nn.Module) -> float:
    """FLOPs per token of every linear-like module inside ``module`` (itself included).

    A :class:`FlopCounted` module reports its own figure (its children are skipped); otherwise every
    ``nn.Linear`` counts ``2·in_features·out_features``. A module shared at two places in the tree
    is counted once.
    """
    total = 0.0
    seen: set[int] = set()

    def visit(m: nn.Module) -> None:
        nonlocal total
        if id(m) in seen:
            return
        seen.add(id(m))
        if isinstance(m, FlopCounted) and not isinstance(m, nn.Linear):
            total += float(m.flops_per_token())
            return
        if isinstance(m, nn.Linear):
            total += 2.0 * m.in_features * m.out_features
            return
        for child in m.children():
            visit(child)

    visit(module)
    return total


def attention_core_flops_per_token(model: nn.Module, seq_len: int = 2048, arch: ArchAdapter | None = None) -> float:
    """``QKᵀ`` + ``AV`` FLOPs per token over the full ``seq_len × seq_len`` scores, all layers."""
    a = _adapter(model, arch)
    total = 0
    for i in range(a.num_layers):
        g = a.geometry(i)
        total += 4 * g.num_heads * g.head_dim * seq_len
    return float(total)


def flops_per_token(model: nn.Module, seq_len: int = 2048, arch: ArchAdapter | None = None) -> float:
    """Forward FLOPs per token, averaged over one forward of ``seq_len`` tokens (see module doc).

    ``flops_per_token(m, T) * B * T`` equals ``FlopCounterMode``'s total for a ``[B, T]`` forward
    under eager attention.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    return linear_flops_per_token(model) + attention_core_flops_per_token(model, seq_len, arch)


# --------------------------------------------------------------------------------------- KV cache
def kv_bytes_per_token(model: nn.Module, dtype: torch.dtype | None = None, arch: ArchAdapter | None = None) -> int:
    """KV-cache bytes per token per sequence: Σ_layers (k width + v width) · element size.

    ``dtype`` is the cache dtype; it defaults to the model's parameter dtype.
    """
    a = _adapter(model, arch)
    itemsize = torch.empty((), dtype=dtype or _param_dtype(model)).element_size()
    total = 0
    for i in range(a.num_layers):
        lin = a.attn_linears(i)
        total += _out_features(lin[a.attn_names[1]]) + _out_features(lin[a.attn_names[2]])
    return total * itemsize


# --------------------------------------------------------------------------------------- footprint
@dataclass
class Footprint:
    """What a model costs. ``layers`` holds each decoder layer's geometry (hidden, num_heads,
    num_kv_heads, head_dim, intermediate, group_size)."""

    params: int
    flops_per_token: float
    kv_bytes_per_token: int
    dtype: str
    seq_len: int
    layers: list[dict[str, int]] = field(default_factory=list)
    breakdown: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return asdict(self)

    def ratios(self, dense: Footprint) -> dict[str, float]:
        """This footprint relative to ``dense``: ``params``, ``flops``, ``kv`` (1.0 = unchanged)."""

        def r(x: float, d: float) -> float:
            return x / d if d else math.nan

        return {
            "params": r(self.params, dense.params),
            "flops": r(self.flops_per_token, dense.flops_per_token),
            "kv": r(self.kv_bytes_per_token, dense.kv_bytes_per_token),
        }


def footprint(model: nn.Module, seq_len: int = 2048, arch: ArchAdapter | None = None) -> Footprint:
    """Parameters, FLOPs/token at ``seq_len``, KV bytes/token and per-layer geometry of ``model``."""
    a = _adapter(model, arch)
    layers = []
    for g in a.geometries():
        d = asdict(g)
        d["group_size"] = g.group_size
        layers.append(d)
    return Footprint(
        params=count_params(model),
        flops_per_token=flops_per_token(model, seq_len, a),
        kv_bytes_per_token=kv_bytes_per_token(model, arch=a),
        dtype=_dtype_name(_param_dtype(model)),
        seq_len=seq_len,
        layers=layers,
        breakdown=param_breakdown(model, a),
    )


# --------------------------------------------------------------------------------------- latency
def _vocab_size(model: nn.Module, tokenizer_or_vocab_size: Any) -> int:
    n_embed = model.get_input_embeddings().weight.shape[0] if hasattr(model, "get_input_embeddings") else None
    if isinstance(tokenizer_or_vocab_size, int):
        v = tokenizer_or_vocab_size
    elif tokenizer_or_vocab_size is None:
        v = n_embed or model.config.vocab_size
    else:
        try:
            v = len(tokenizer_or_vocab_size)
        except TypeError:
            v = int(tokenizer_or_vocab_size.vocab_size)
    if n_embed:
        v = min(v, int(n_embed))
    if v < 1:
        raise ValueError(f"vocabulary size must be >= 1, got {v}")
    return int(v)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def latency(
    model: nn.Module,
    tokenizer_or_vocab_size: Any = None,
    *,
    prompt_len: int = 128,
    new_tokens: int = 32,
    batch_size: int = 1,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
) -> dict[str, float | int]:
    """Prefill and decode throughput on random token ids (seeded), median over ``repeats``.

    Prefill: one forward over ``[batch_size, prompt_len]`` with the cache on. Decode: after an
    untimed prefill, ``new_tokens`` greedy steps of one token each through ``past_key_values``; only
    the steps are timed. Tokens/s count every sequence of the batch. ``tokenizer_or_vocab_size`` is a
    tokenizer, a vocabulary size, or None (the model's embedding rows); ids are drawn below it.
    """
    if prompt_len < 1 or new_tokens < 1 or batch_size < 1 or repeats < 1 or warmup < 0:
        raise ValueError("prompt_len, new_tokens, batch_size and repeats must be >= 1, warmup >= 0")
    param = next(model.parameters())
    if param.is_meta:
        raise ValueError("cannot time a model on the meta device; load its weights first")
    device = param.device
    vocab = _vocab_size(model, tokenizer_or_vocab_size)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, prompt_len), generator=g).to(device)

    was_training = model.training
    model.eval()
    prefill_times: list[float] = []
    decode_times: list[float] = []
    try:
        with torch.no_grad():
            for r in range(warmup + repeats):
                _sync(device)
                t0 = time.perf_counter()
                out = model(input_ids=ids, use_cache=True)
                _sync(device)
                t_prefill = time.perf_counter() - t0

                past = out.past_key_values
                nxt = out.logits[:, -1:].argmax(-1)
                del out
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(new_tokens):
                    step = model(input_ids=nxt, past_key_values=past, use_cache=True)
                    past = step.past_key_values
                    nxt = step.logits[:, -1:].argmax(-1)
                _sync(device)
                t_decode = time.perf_counter() - t0
                del past, step
                if r >= warmup:
                    prefill_times.append(t_prefill)
                    decode_times.append(t_decode)
    finally:
        model.train(was_training)

    tp = statistics.median(prefill_times)
    td = statistics.median(decode_times)
    return {
        "prefill_tokens_per_s": batch_size * prompt_len / tp,
        "decode_tokens_per_s": batch_size * new_tokens / td,
        "prefill_s": tp,
        "decode_s_per_token": td / new_tokens,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "batch_size": batch_size,
        "repeats": repeats,
    }


# --------------------------------------------------------------------------------------- memory
def peak_rss_bytes() -> int:
    """Peak resident set size of this process since it started (``ru_maxrss``), in bytes."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _proc_status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5); True if it took effect."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _proc_status_kib("VmHWM"), _proc_status_kib("VmRSS")
    # after a reset HWM ≈ RSS; allow a little growth between the two reads
    return hwm is not None and rss is not None and hwm <= rss + 1024


@dataclass
class PeakRSS:
    """Result of :func:`track_peak_rss`, filled in when the block exits.

    ``peak_bytes``: highest RSS seen during the block; ``start_bytes``: RSS on entry;
    ``increase_bytes``: ``peak - start`` (≥ 0); ``method``: ``"vmhwm"`` (exact kernel high-water
    mark, reset on entry), ``"sampled"`` (RSS polled by a thread; can miss short spikes) or
    ``"ru_maxrss"`` (process lifetime peak; only meaningful if the block set a new record).
    """

    start_bytes: int = 0
    peak_bytes: int = 0
    increase_bytes: int = 0
    method: str = ""


@contextlib.contextmanager
def track_peak_rss(interval_s: float = 0.01) -> Iterator[PeakRSS]:
    """Measure the peak RSS increase during a ``with`` block::

        with track_peak_rss() as mem:
            model = load(...)
        mem.increase_bytes

    Uses the kernel's VmHWM after resetting it where Linux allows, else a sampling thread, else
    ``ru_maxrss``. Note that resetting VmHWM affects anyone else reading it in this process.
    """
    res = PeakRSS()
    rss0 = _proc_status_kib("VmRSS")
    if rss0 is None:  # no /proc: lifetime peak only
        res.method = "ru_maxrss"
        res.start_bytes = peak_rss_bytes()
        try:
            yield res
        finally:
            res.peak_bytes = peak_rss_bytes()
            res.increase_bytes = max(0, res.peak_bytes - res.start_bytes)
        return

    if os.environ.get("COMPRESS_NO_CLEAR_REFS") != "1" and _reset_hwm():
        start = _proc_status_kib("VmRSS") or rss0
        res.method = "vmhwm"
        res.start_bytes = start * 1024
        try:
            yield res
        finally:
            hwm = _proc_status_kib("VmHWM") or start
            res.peak_bytes = max(hwm, start) * 1024
            res.increase_bytes = max(0, res.peak_bytes - res.start_bytes)
        return

    res.method = "sampled"
    res.start_bytes = rss0 * 1024
    peak = [rss0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            v = _proc_status_kib("VmRSS")
            if v is not None and v > peak[0]:
                peak[0] = v
            stop.wait(interval_s)

    th = threading.Thread(target=sample, name="compress-rss-sampler", daemon=True)
    th.start()
    try:
        yield res
    finally:
        stop.set()
        th.join()
        v = _proc_status_kib("VmRSS")
        if v is not None:
            peak[0] = max(peak[0], v)
        res.peak_bytes = peak[0] * 1024
        res.increase_bytes = max(0, res.peak_bytes - res.start_bytes)


# ------------------------------------------------------------------------------- live tensor bytes
@dataclass
class LiveTensors:
    """Result of :func:`track_live_tensors`: bytes of tensor storage created inside the block.

    ``peak_bytes``: most of them alive at once; ``current_bytes``: alive now (on exit: what the
    block left allocated); ``by_device``: the peak per device type.
    """

    peak_bytes: int = 0
    current_bytes: int = 0
    by_device: dict[str, int] = field(default_factory=dict)


@contextlib.contextmanager
def track_live_tensors() -> Iterator[LiveTensors]:
    """Count the tensor memory a block allocates and keeps alive, independently of the allocator.

    RSS on CPU also holds memory the C library keeps after it was freed (glibc keeps freed heap
    blocks resident until a trim), so it over-states what code *needs*. This counts storages instead:
    every aten op's output that is not an alias of an input is a new storage, alive until the last
    tensor viewing it is garbage-collected. Tensors that existed before the block are not counted;
    scratch memory inside a kernel (a fused attention's workspace) is not seen. A storage adopted by
    an ``nn.Parameter`` created outside the op stream can be released early in the count, so use it
    for activation memory (calibration passes), not for weight surgery. Slow: Python runs per op.
    """
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    res = LiveTensors()
    live: dict[tuple[str, int], list[int]] = {}  # storage -> [bytes, live tensors viewing it]
    per_device: dict[str, int] = {}

    def release(key: tuple[str, int]) -> None:
        entry = live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del live[key]
            res.current_bytes -= entry[0]
            per_device[key[0]] -= entry[0]

    def watch(t: torch.Tensor, key: tuple[str, int]) -> None:
        live[key][1] += 1
        weakref.finalize(t, release, key)

    class _Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            returns = func._schema.returns
            # one schema return per output; a single return may be a list (split, unbind: views)
            pairs = [(returns[0], out)] if len(returns) == 1 else list(zip(returns, out, strict=False))
            for ret, t in pairs:
                aliases = ret.alias_info is not None
                for x in tree_flatten(t)[0]:
                    if not isinstance(x, torch.Tensor) or x.device.type == "meta":
                        continue
                    st = x.untyped_storage()
                    key = (x.device.type, st.data_ptr())
                    if key in live:
                        watch(x, key)  # another view of a counted storage
                    elif not aliases and st.nbytes() > 0:
                        live[key] = [st.nbytes(), 0]
                        res.current_bytes += st.nbytes()
                        per_device[key[0]] = per_device.get(key[0], 0) + st.nbytes()
                        res.peak_bytes = max(res.peak_bytes, res.current_bytes)
                        res.by_device[key[0]] = max(res.by_device.get(key[0], 0), per_device[key[0]])
                        watch(x, key)
            return out

    with _Mode():
        yield res
