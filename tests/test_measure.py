"""Tests for compress.model.footprint and compress.probes: params, FLOPs/token, KV bytes/token, footprint, latency, memory."""

from __future__ import annotations

import math
import time

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from compress.model.adapter import ArchAdapter
from compress.model.footprint import (
    FlopCounted,
    Footprint,
    count_params,
    flops_per_token,
    footprint,
    kv_bytes_per_token,
    linear_flops_per_token,
    model_bytes,
    param_breakdown,
)
from compress.probes import compare_latency, latency, peak_rss_bytes, track_live_tensors, track_peak_rss
from compress.testing import FAMILY_KINDS, TINY_KINDS, tiny_config, tiny_model

# ----------------------------------------------------------------------------------- helpers


def _eager(model: nn.Module) -> nn.Module:
    model.config._attn_implementation = "eager"
    if getattr(model.config, "num_experts", None):  # FlopCounterMode does not count the grouped_mm experts kernel
        model.set_experts_implementation("eager")
    return model


def _counted_flops(model: nn.Module, B: int, T: int) -> int:
    ids = torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(input_ids=ids, use_cache=False)
    return fc.get_total_flops()


def _cache_bytes_per_token(model: nn.Module, B: int, T: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    total = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    return total / (B * T)


def _slice_linear(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w = lin.weight.data
    b = lin.bias.data if lin.bias is not None else None
    if rows is not None:
        w = w[rows]
        b = b[rows] if b is not None else None
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    return new


def _heterogeneous(kind: str) -> nn.Module:
    """Tiny model with layer 1's MLP cut to 48 channels and half the KV groups of layer 2 dropped."""
    model = _eager(tiny_model(kind))
    a = ArchAdapter(model)
    mlp = a.mlp(1)
    keep = torch.arange(48)
    mlp.gate_proj = _slice_linear(mlp.gate_proj, rows=keep)
    mlp.up_proj = _slice_linear(mlp.up_proj, rows=keep)
    mlp.down_proj = _slice_linear(mlp.down_proj, cols=keep)

    g = a.geometry(2)
    attn = a.attention(2)
    kv_keep = g.num_kv_heads // 2
    hd = g.head_dim
    kv_rows = torch.arange(kv_keep * hd)
    q_rows = torch.arange(kv_keep * g.group_size * hd)  # the query heads of the kept KV groups
    attn.q_proj = _slice_linear(attn.q_proj, rows=q_rows)
    attn.k_proj = _slice_linear(attn.k_proj, rows=kv_rows)
    attn.v_proj = _slice_linear(attn.v_proj, rows=kv_rows)
    attn.o_proj = _slice_linear(attn.o_proj, cols=q_rows)
    attn.num_key_value_groups = g.group_size
    return model


def _hand_params(cfg) -> int:
    h, V, L, inter = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers, cfg.intermediate_size
    nq, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    qkv_bias = cfg.model_type == "qwen2"
    attn = h * nq * hd + 2 * h * nkv * hd + nq * hd * h + ((nq + 2 * nkv) * hd if qkv_bias else 0)
    layer = attn + 3 * h * inter + 2 * h
    return V * h * (1 if cfg.tie_word_embeddings else 2) + L * layer + h


def _hand_flops_per_token(cfg, T: int) -> int:
    h, V, L, inter = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers, cfg.intermediate_size
    nq, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    layer = 2 * h * (nq + 2 * nkv) * hd + 2 * nq * hd * h + 4 * nq * T * hd + 6 * h * inter
    return L * layer + 2 * h * V


class LowRank(nn.Module):
    """Low-rank stand-in for nn.Linear: ``B(A(x))``; no FLOP method, so its children are counted."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Linear(in_features, rank, bias=False)
        self.B = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x))


class LowRankCounted(LowRank):
    """Same, implementing the FlopCounted protocol."""

    def flops_per_token(self) -> float:
        return 2.0 * self.rank * (self.in_features + self.out_features)


def _exotic(kind: str) -> nn.Module:
    """Heterogeneous model plus low-rank o_proj (layer 0), low-rank q_proj (layer 1) and a
    SliceGPT-like square shortcut linear inside layer 0."""
    model = _heterogeneous(kind)
    a = ArchAdapter(model)
    h = model.config.hidden_size
    at0 = a.attention(0)
    o = at0.o_proj
    at0.o_proj = LowRank(o.in_features, o.out_features, rank=8)
    at1 = a.attention(1)
    q = at1.q_proj
    at1.q_proj = LowRankCounted(q.in_features, q.out_features, rank=8, bias=q.bias is not None)
    layer0 = a.layers[0]
    layer0.shortcut = nn.Linear(h, h, bias=False)
    layer0.mlp.register_forward_hook(lambda mod, args, out: layer0.shortcut(out))
    return model


# ----------------------------------------------------------------------------------- params


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_params_match_torch_and_hand_formula(kind: str) -> None:
    model = tiny_model(kind)
    n = count_params(model)
    assert n == sum(p.numel() for p in model.parameters())
    assert n == _hand_params(tiny_config(kind))
    bd = param_breakdown(model)
    assert bd["total"] == n
    assert sum(v for k, v in bd.items() if k != "total") == n
    tied = tiny_config(kind).tie_word_embeddings
    assert ArchAdapter(model).tied_embeddings == tied
    assert bd["lm_head"] == (0 if tied else bd["embedding"])
    assert bd["other"] == 0
    assert bd["norms"] == model.config.hidden_size * (2 * model.config.num_hidden_layers + 1)


def test_params_dedup_shared_storage() -> None:
    t = torch.randn(4, 5)
    m = nn.Module()
    m.a = nn.Parameter(t)
    m.b = nn.Parameter(t)  # distinct Parameter objects, one storage
    m.c = nn.Parameter(torch.randn(3))
    assert count_params(m) == 23
    assert model_bytes(m) == 23 * 4


def test_model_bytes_counts_params_and_buffers() -> None:
    model = tiny_model("llama-gqa")
    expected = sum(p.numel() * 4 for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    assert model_bytes(model) == expected
    assert model_bytes(model.to(torch.bfloat16)) < expected


# ----------------------------------------------------------------------------------- FLOPs


@pytest.mark.parametrize("kind", TINY_KINDS)
@pytest.mark.parametrize(("B", "T"), [(2, 12), (1, 7)])
def test_flops_match_flop_counter(kind: str, B: int, T: int) -> None:
    model = _eager(tiny_model(kind))
    f = flops_per_token(model, T)
    assert f == _hand_flops_per_token(tiny_config(kind), T)
    assert f * B * T == _counted_flops(model, B, T)


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_heterogeneous_flops_params_kv(kind: str) -> None:
    model = _heterogeneous(kind)
    dense = tiny_model(kind)
    geo = ArchAdapter(model).geometries()
    assert geo[1].intermediate == 48
    assert geo[2].num_kv_heads == ArchAdapter(dense).geometry(2).num_kv_heads // 2
    assert not ArchAdapter(model).is_uniform()
    B, T = 2, 10
    assert flops_per_token(model, T) * B * T == _counted_flops(model, B, T)
    assert count_params(model) == sum(p.numel() for p in model.parameters()) < count_params(dense)
    assert kv_bytes_per_token(model) == _cache_bytes_per_token(model, B, T)
    assert kv_bytes_per_token(model) < kv_bytes_per_token(dense)


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_low_rank_and_shortcut_linears_are_counted(kind: str) -> None:
    model = _exotic(kind)
    assert isinstance(ArchAdapter(model).attention(1).q_proj, FlopCounted)
    assert not isinstance(ArchAdapter(model).attention(0).o_proj, FlopCounted)
    B, T = 2, 9
    assert flops_per_token(model, T) * B * T == _counted_flops(model, B, T)
    bd = param_breakdown(model)
    h = model.config.hidden_size
    assert bd["other"] == h * h
    assert bd["total"] == count_params(model) == sum(p.numel() for p in model.parameters())
    assert kv_bytes_per_token(model) == _cache_bytes_per_token(model, B, T)


def test_flop_counted_protocol_overrides_children() -> None:
    lr = LowRankCounted(64, 32, rank=4)
    assert linear_flops_per_token(lr) == 2 * 4 * (64 + 32)
    assert linear_flops_per_token(LowRank(64, 32, rank=4)) == 2 * 4 * (64 + 32)
    assert linear_flops_per_token(nn.Linear(10, 3)) == 60


def test_tied_lm_head_still_counts_as_matmul() -> None:
    model = tiny_model("llama-gqa")
    cfg = model.config
    T = 16
    no_head = flops_per_token(model, T) - 2 * cfg.hidden_size * cfg.vocab_size
    assert no_head == _hand_flops_per_token(cfg, T) - 2 * cfg.hidden_size * cfg.vocab_size
    assert flops_per_token(model, 32) - flops_per_token(model, 16) == (
        cfg.num_hidden_layers * 4 * cfg.num_attention_heads * cfg.head_dim * 16
    )
    with pytest.raises(ValueError):
        flops_per_token(model, 0)


# ----------------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_kv_bytes_match_real_cache(kind: str) -> None:
    model = tiny_model(kind)
    cfg = model.config
    expected = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 4
    assert kv_bytes_per_token(model) == expected
    assert kv_bytes_per_token(model) == _cache_bytes_per_token(model, 2, 5)
    assert kv_bytes_per_token(model, torch.bfloat16) == expected // 2


# ----------------------------------------------------------------------------------- other families


@pytest.mark.parametrize("kind", FAMILY_KINDS)
@pytest.mark.parametrize(("B", "T"), [(2, 7), (1, 8)])
def test_family_flops_match_flop_counter(kind: str, B: int, T: int) -> None:
    """Fused projections (Phi-3), q/k norms (Qwen3, Gemma-3, OLMo-2), soft-capping and scaled embeddings
    (Gemma), one KV head and head_dim != hidden / heads (Gemma-3) add no matmul FLOPs. T stays within the
    tiny Gemma window (8): an eager prefill multiplies the full masked T x T scores (tests/test_families.py
    counts a windowed decode step)."""
    model = _eager(tiny_model(kind))
    assert flops_per_token(model, T) * B * T == _counted_flops(model, B, T)


@pytest.mark.parametrize("kind", FAMILY_KINDS)
@pytest.mark.parametrize("T", [5, 20])
def test_family_kv_bytes_match_real_cache(kind: str, T: int) -> None:
    """Bytes the real past_key_values hold after T tokens, / T: Gemma's sliding layers keep W - 1 = 7."""
    model = tiny_model(kind)
    assert kv_bytes_per_token(model, seq_len=T) == pytest.approx(_cache_bytes_per_token(model, 2, T), rel=1e-12)


@pytest.mark.parametrize(("kind", "norms_per_layer"), [("gemma2", 4), ("gemma3_text", 4), ("olmo2", 2)])
def test_family_param_breakdown(kind: str, norms_per_layer: int) -> None:
    """Gemma norms both ends of each block, OLMo-2 the outputs only; q/k norms count as attention."""
    model = tiny_model(kind)
    bd = param_breakdown(model)
    assert bd["total"] == count_params(model) == sum(p.numel() for p in model.parameters())
    assert bd["norms"] == 64 * (norms_per_layer * 3 + 1) and bd["other"] == 0
    assert bd["lm_head"] == (0 if model.config.tie_word_embeddings else bd["embedding"])


def test_kv_bytes_default_dtype_follows_model() -> None:
    model = tiny_model("llama-gqa").to(torch.bfloat16)
    assert kv_bytes_per_token(model) == _cache_bytes_per_token(model, 1, 4)
    assert footprint(model, 8).dtype == "bfloat16"


# ----------------------------------------------------------------------------------- footprint


def test_footprint_dict_and_ratios() -> None:
    dense = footprint(tiny_model("llama-mha"), 12)
    pruned = footprint(_heterogeneous("llama-mha"), 12)
    d = pruned.to_dict()
    assert set(d) >= {"params", "flops_per_token", "kv_bytes_per_token", "dtype", "seq_len", "layers"}
    assert d["layers"][1]["intermediate"] == 48 and d["layers"][2]["num_kv_heads"] == 2
    assert d["layers"][2]["group_size"] == 1
    assert Footprint(**d) == pruned
    r = pruned.ratios(dense)
    assert set(r) == {"params", "flops", "kv"}
    assert 0 < r["params"] < 1 and 0 < r["flops"] < 1
    assert r["kv"] == pytest.approx(5 / 6)
    assert dense.ratios(dense) == {"params": 1.0, "flops": 1.0, "kv": 1.0}


def test_meta_llama2_7b() -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32,
    )
    t0 = time.perf_counter()
    with track_peak_rss() as mem:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        fp = footprint(model, 2048)
    elapsed = time.perf_counter() - t0
    assert all(p.is_meta for p in model.parameters())
    assert fp.params == count_params(model) == 6_738_415_616
    assert fp.breakdown["lm_head"] == fp.breakdown["embedding"] == 32000 * 4096
    h, inter, T = 4096, 11008, 2048
    per_layer = 2 * h * 96 * 128 + 2 * h * h + 4 * 32 * 128 * T + 6 * h * inter
    assert fp.flops_per_token == 32 * per_layer + 2 * h * 32000
    assert fp.kv_bytes_per_token == 32 * 2 * 4096 * 4  # fp32 meta model
    assert kv_bytes_per_token(model, torch.float16) == 524_288  # the well-known 0.5 MiB/token
    assert model_bytes(model) >= 6_738_415_616 * 4
    assert mem.increase_bytes < 1 << 30  # nothing of the 27 GB was allocated
    assert elapsed < 60


# ----------------------------------------------------------------------------------- latency, memory


def test_latency_positive_finite() -> None:
    model = tiny_model("llama-gqa")
    for vocab in (512, None):
        r = latency(model, vocab, prompt_len=8, new_tokens=3, batch_size=2, repeats=2, warmup=1)
        for k in ("prefill_tokens_per_s", "decode_tokens_per_s", "prefill_s", "decode_s_per_token"):
            assert r[k] > 0 and math.isfinite(r[k]), k
        assert r["new_tokens"] == 3 and r["batch_size"] == 2
    assert not model.training


def test_compare_latency_interleaves_and_pairs_rounds(monkeypatch) -> None:
    """Rounds rotate the order; the speed-up is the median of per-round ratios, *tie* when its IQR
    contains 1 (scripted timings, so the statistics are checked exactly)."""
    import compress.probes as probes

    a, b, c = tiny_model("llama-gqa"), tiny_model("llama-gqa"), tiny_model("llama-gqa")
    order: list[str] = []
    names = {id(a): "a", id(b): "b", id(c): "c"}
    # b is exactly twice as fast as a; c is as fast as a but noisy around it
    secs = {"a": [1.0] * 6, "b": [0.5] * 6, "c": [1.1, 0.8, 1.2, 0.9, 1.0, 1.05]}
    seen = {"a": 0, "b": 0, "c": 0}

    def fake(model, *args):
        n = names[id(model)]
        order.append(n)
        t = secs[n][seen[n] // 2 % 6]  # prefill and decode of one round share the scripted value
        seen[n] += 1
        return t

    monkeypatch.setattr(probes, "_time_prefill", fake)
    monkeypatch.setattr(probes, "_time_decode", fake)
    got = compare_latency({"a": a, "b": b, "c": c}, 512, prompt_len=4, new_tokens=2, prefill_batch_size=3,
                          repeats=5, warmup=1, reference="a")
    firsts = [order[i] for i in range(0, len(order), 6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]  # the first model of each round rotates
    assert got["a"]["prefill_runs"] == [12.0] * 5 and got["b"]["decode_runs"] == [4.0] * 5
    assert "speedup" not in got["a"]
    sb = got["b"]["speedup"]["decode"]
    assert sb["median"] == 2.0 and sb["iqr"] == [2.0, 2.0] and sb["tie"] is False
    sc = got["c"]["speedup"]["prefill"]  # ratios 1/0.8, 1/1.2, 1/0.9, 1/1.0, 1/1.05 around 1
    assert sc["iqr"][0] < 1 < sc["iqr"][1] and sc["tie"] is True
    assert got["b"]["prefill_iqr"] == [24.0, 24.0] and got["b"]["interleaved_with"] == ["a", "c"]
    with pytest.raises(ValueError, match="reference"):
        compare_latency({"a": a}, 512, reference="dense")


def test_compare_latency_real_models() -> None:
    model = tiny_model("llama-gqa")
    got = compare_latency({"x": model, "y": tiny_model("llama-mha")}, 512, prompt_len=8, new_tokens=3,
                          prefill_batch_size=4, repeats=5, reference="x")
    for n in ("x", "y"):
        assert len(got[n]["decode_runs"]) == 5 and all(v > 0 and math.isfinite(v) for v in got[n]["decode_runs"])
        lo, hi = got[n]["prefill_iqr"]
        assert lo <= got[n]["prefill_tokens_per_s"] <= hi
    assert got["y"]["speedup"]["decode"]["median"] > 0 and not model.training


def test_latency_rejects_meta_and_bad_args() -> None:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("llama-gqa"))
    with pytest.raises(ValueError, match="meta"):
        latency(model, 512, prompt_len=4, new_tokens=1, repeats=1)
    with pytest.raises(ValueError):
        latency(tiny_model("llama-gqa"), 512, prompt_len=0)


def test_peak_rss() -> None:
    assert peak_rss_bytes() > 10 * 2**20
    import mmap

    with track_peak_rss() as mem:
        # a fresh anonymous mapping, every page touched: new resident memory whatever the heap holds
        buf = mmap.mmap(-1, 64 * 2**20)
        for off in range(0, len(buf), 4096):
            buf[off] = 1
        buf.close()
    assert mem.method in {"vmhwm", "sampled", "ru_maxrss"}
    if mem.method != "ru_maxrss":
        assert mem.increase_bytes >= 48 * 2**20
    assert mem.peak_bytes >= mem.start_bytes


def test_peak_rss_sampled_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMPRESS_NO_CLEAR_REFS", "1")
    import mmap

    with track_peak_rss(interval_s=0.005) as mem:
        buf = mmap.mmap(-1, 64 * 2**20)  # fresh pages: resident only once touched
        for off in range(0, len(buf), 4096):
            buf[off] = 1
        time.sleep(0.2)
        buf.close()
    assert mem.method in {"sampled", "ru_maxrss"}
    if mem.method == "sampled":
        assert mem.increase_bytes >= 48 * 2**20


# ----------------------------------------------------------------------------- live tensor bytes
def test_live_tensors_count_storages_not_views_or_older_tensors():
    w = torch.randn(100, 100)
    with track_live_tensors() as live:
        a = torch.empty(1000)  # 4,000 bytes
        b = a[10:]  # a view: no new storage
        c = a * 2  # 4,000 more
        wt = w.t()  # a view of a tensor from before the block: not counted
        parts = w.split(10)  # a list of views of it: not counted either
        halves = c.chunk(2)  # views of a counted storage
        assert (live.current_bytes, live.peak_bytes) == (8000, 8000)
        del a
        assert live.current_bytes == 8000  # b still holds a's storage
        del b
        assert live.current_bytes == 4000
        d = torch.ones(500)
        d.add_(1)  # in place: no new storage
        assert live.current_bytes == 6000
        del c, d, wt, parts
        assert live.current_bytes == 4000  # the chunks still hold c's storage
        del halves
    assert (live.current_bytes, live.peak_bytes, live.by_device) == (0, 8000, {"cpu": 8000})


def test_layerwise_calibration_holds_the_cache_plus_one_layer():
    """Live tensors of a layer-wise pass: the cached hidden states plus one mini-batch inside one layer.

    The peak must include the N·T·H cache, must not grow with depth (as it would if the engine kept
    each layer's outputs or keyword arguments), and nothing but the statistics may outlive the pass."""
    from transformers import AutoModelForCausalLM

    from compress.calib.runner import run_calibration
    from compress.calib.stats import record

    n, t = 8, 32
    ids = torch.randint(3, 512, (n, t), generator=torch.Generator().manual_seed(0))
    peaks = {}
    for layers in (2, 6):
        cfg = tiny_config("llama-gqa")
        cfg.num_hidden_layers = layers
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        arch = ArchAdapter(model)
        h, f = cfg.hidden_size, cfg.intermediate_size
        mods = {f"{i}.d": arch.down_proj(i) for i in range(layers)}
        with track_live_tensors() as live, record(mods):
            run_calibration(model, ids, batch_size=1, layerwise=True, progress=False)
        cache = n * t * h * 4
        one_batch_in_layer = 12 * t * max(h, f) * 4  # generous: a dozen [T, max(h, f)] fp32 activations
        assert cache <= live.peak_bytes <= cache + one_batch_in_layer, (layers, live.peak_bytes, cache)
        assert live.current_bytes <= layers * 2 * f * 4  # the statistics: sum and sum of squares per module
        peaks[layers] = live.peak_bytes
    assert peaks[6] - peaks[2] <= 4 * 2 * f * 4  # only the 4 extra layers' statistics
