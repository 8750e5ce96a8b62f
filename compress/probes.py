"""Process probes: what a run costs in time and memory (not in shapes: that is compress.model.footprint).

* :func:`latency` — prefill and decode tokens/s of a model on its device;
* :func:`track_peak_rss` — peak resident set size of the process while inside (sampled, plus the
  kernel's high-water mark where it can be reset);
* :func:`track_live_tensors` — peak bytes of live torch tensors while inside, independent of the
  allocator (glibc keeps freed memory resident, so RSS overstates what a phase holds).
"""

from __future__ import annotations

import contextlib
import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


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
