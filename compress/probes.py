"""Process probes: what a run costs in time and memory (not in shapes: that is compress.model.footprint).

* :func:`compare_latency` — prefill and decode tokens/s of models timed interleaved in one process
  (median, IQR, paired speed-ups); :func:`latency` — of one model;
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


def _time_prefill(model: nn.Module, ids: torch.Tensor, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    model(input_ids=ids, use_cache=True)
    _sync(device)
    return time.perf_counter() - t0


def _time_decode(model: nn.Module, ids: torch.Tensor, new_tokens: int, device: torch.device) -> float:
    """Seconds for ``new_tokens`` greedy one-token steps after an untimed prefill of ``ids``."""
    out = model(input_ids=ids, use_cache=True)
    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    del out
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        step = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past, nxt = step.past_key_values, step.logits[:, -1:].argmax(-1)
    _sync(device)
    return time.perf_counter() - t0


def _spread(xs: list[float]) -> tuple[float, float, float]:
    """(median, first quartile, third quartile); with one value all three are it."""
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return med, q1, q3


def compare_latency(
    models: dict[str, nn.Module],
    tokenizer_or_vocab_size: Any = None,
    *,
    prompt_len: int = 128,
    new_tokens: int = 32,
    prefill_batch_size: int = 8,
    decode_batch_size: int = 1,
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
    reference: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Prefill and decode throughput of several models measured in ONE process, interleaved.

    Every round times each model once (prefill: one forward over ``[prefill_batch_size, prompt_len]``
    random ids, cache on; decode: ``new_tokens`` greedy steps of one token through ``past_key_values``
    after an untimed prefill at ``decode_batch_size``), the order rotating from round to round, so a
    change of machine load hits every model alike; the first ``warmup`` rounds are not kept. Per model:
    the median tokens/s, the inter-quartile range and every kept run. With ``reference`` (a key of
    ``models``, e.g. the dense model), every other model also gets its speed-up per round — the ratio
    of its tokens/s to the reference's in the same round — with median, IQR and ``tie`` (the IQR of the
    ratio contains 1: the difference is inside the spread). Tokens/s count every sequence of a batch.
    """
    if not models:
        raise ValueError("no model to time")
    if min(prompt_len, new_tokens, prefill_batch_size, decode_batch_size, repeats) < 1 or warmup < 0:
        raise ValueError("prompt_len, new_tokens, batch sizes and repeats must be >= 1, warmup >= 0")
    if reference is not None and reference not in models:
        raise ValueError(f"reference {reference!r} is not one of the timed models ({', '.join(models)})")
    names = list(models)
    devices, ids_pre, ids_dec = {}, {}, {}
    for n in names:
        param = next(models[n].parameters())
        if param.is_meta:
            raise ValueError(f"cannot time {n!r} on the meta device; load its weights first")
        devices[n] = param.device
        vocab = _vocab_size(models[n], tokenizer_or_vocab_size)
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab, (max(prefill_batch_size, decode_batch_size), prompt_len), generator=g)
        ids_pre[n] = ids[:prefill_batch_size].to(param.device)
        ids_dec[n] = ids[:decode_batch_size].to(param.device)
    runs: dict[str, dict[str, list[float]]] = {n: {"prefill": [], "decode": []} for n in names}
    modes = {n: models[n].training for n in names}
    try:
        for n in names:
            models[n].eval()
        with torch.no_grad():
            for r in range(warmup + repeats):
                k = r % len(names)
                for n in names[k:] + names[:k]:
                    tp = _time_prefill(models[n], ids_pre[n], devices[n])
                    td = _time_decode(models[n], ids_dec[n], new_tokens, devices[n])
                    if r >= warmup:
                        runs[n]["prefill"].append(prefill_batch_size * prompt_len / tp)
                        runs[n]["decode"].append(decode_batch_size * new_tokens / td)
    finally:
        for n in names:
            models[n].train(modes[n])
    out: dict[str, dict[str, Any]] = {}
    for n in names:
        res: dict[str, Any] = {"prompt_len": prompt_len, "new_tokens": new_tokens,
                               "prefill_batch_size": prefill_batch_size, "batch_size": decode_batch_size,
                               "repeats": repeats, "warmup": warmup, "interleaved_with": sorted(set(names) - {n})}
        for phase in ("prefill", "decode"):
            med, q1, q3 = _spread(runs[n][phase])
            res[f"{phase}_tokens_per_s"] = med
            res[f"{phase}_iqr"] = [q1, q3]
            res[f"{phase}_runs"] = runs[n][phase]
        res["prefill_s"] = prefill_batch_size * prompt_len / res["prefill_tokens_per_s"]
        res["decode_s_per_token"] = decode_batch_size / res["decode_tokens_per_s"]
        if reference is not None and n != reference:
            res["speedup"] = {}
            for phase in ("prefill", "decode"):
                ratios = [a / b for a, b in zip(runs[n][phase], runs[reference][phase], strict=True)]
                med, q1, q3 = _spread(ratios)
                res["speedup"][phase] = {"median": med, "iqr": [q1, q3], "tie": q1 <= 1.0 <= q3, "over": reference}
        out[n] = res
    return out


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
) -> dict[str, Any]:
    """Prefill and decode throughput of one model at one batch size (:func:`compare_latency` alone)."""
    return compare_latency({"model": model}, tokenizer_or_vocab_size, prompt_len=prompt_len, new_tokens=new_tokens,
                           prefill_batch_size=batch_size, decode_batch_size=batch_size, repeats=repeats,
                           warmup=warmup, seed=seed)["model"]


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
