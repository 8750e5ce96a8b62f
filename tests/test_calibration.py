"""Calibration sources (seeded blocks, file formats, aliases, errors) and streaming statistics."""

from __future__ import annotations

import json

import pytest
import torch

from compress.assets import wikitext_join
from compress.calib.runner import run_calibration
from compress.calib.sources import CalibrationSource
from compress.calib.stats import ChannelStats, record
from compress.errors import CalibrationError, NumericalError, UsageError
from compress.testing import assets_dir, tiny_model, tiny_tokenizer
from conftest import needs_assets

ASSETS = assets_dir()

pytestmark = pytest.mark.usefixtures("one_thread")


TEXT = "\n".join(f"Line {i}: the cat sat on mat number {i * 7 % 13} and smiled." for i in range(200)) + "\n"


class CharTokenizer:
    """Byte-level stand-in so that file-format tests need no assets."""

    def __call__(self, text, add_special_tokens=False, **_kw):
        if isinstance(text, list):
            return {"input_ids": [list(t.encode()) for t in text]}
        return {"input_ids": list(text.encode())}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer() or CharTokenizer()


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


# ---------------------------------------------------------------------------- sources
def test_seeded_blocks_shape_and_determinism(text_file, tok):
    a = CalibrationSource.from_spec(str(text_file), tok, seed=3)
    b = CalibrationSource.from_spec(str(text_file), tok, seed=3)
    c = CalibrationSource.from_spec(str(text_file), tok, seed=4)
    x = a.batches(6, 16)
    assert x.shape == (6, 16) and x.dtype == torch.long
    assert torch.equal(x, b.batches(6, 16))
    assert not torch.equal(x, c.batches(6, 16))
    assert a.fingerprint(6, 16) == b.fingerprint(6, 16) != c.fingerprint(6, 16)
    # every block is a contiguous window of the stream
    stream = a.tokens
    for row in x:
        hits = [s for s in range(stream.numel() - 15) if torch.equal(stream[s : s + 16], row)]
        assert hits
    d = a.describe()
    assert d["tokens"] == stream.numel() and d["seed"] == 3 and d["path"].endswith("corpus.txt")


def test_tokens_have_no_special_tokens(text_file, tok):
    src = CalibrationSource.from_spec(str(text_file), tok)
    direct = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert src.tokens.tolist() == list(direct)


def test_sequential_blocks_cover_stream_and_wrap(text_file, tok):
    src = CalibrationSource.from_spec(str(text_file), tok, seed=1)
    n_tok = src.num_tokens
    blocks = src.sequential_blocks(3, 10)
    flat = blocks.reshape(-1)
    start = next(s for s in range(n_tok) if src.tokens[s] == flat[0] and torch.equal(
        src.tokens[(s + torch.arange(30)) % n_tok], flat))
    assert 0 <= start < n_tok
    # more tokens than the corpus: wraps around instead of failing
    many = src.token_budget_blocks(n_tok * 2 + 5, 10)
    assert many.shape == (-(-(n_tok * 2 + 5) // 10), 10)
    assert torch.equal(src.sequential_blocks(3, 10), blocks)


def test_max_chars_and_too_short(text_file, tok):
    src = CalibrationSource.from_spec(str(text_file), tok, max_chars=40)
    assert len(src.text) == 40
    with pytest.raises(CalibrationError, match="fewer than one block"):
        src.batches(2, 10_000)


def test_missing_and_unknown(tmp_path, tok):
    with pytest.raises(CalibrationError, match="does not exist"):
        CalibrationSource.from_spec(str(tmp_path / "nope.txt"), tok)
    with pytest.raises(CalibrationError, match="unknown calibration source"):
        CalibrationSource.from_spec("wikitext3", tok)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n", encoding="utf-8")
    with pytest.raises(CalibrationError, match="empty"):
        CalibrationSource.from_spec(str(empty), tok)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(CalibrationError, match="UTF-8"):
        CalibrationSource.from_spec(str(bad), tok)
    for err in (CalibrationError,):
        with pytest.raises(err) as ei:
            CalibrationSource.from_spec(str(tmp_path / "nope.jsonl"), tok)
        assert "\n" not in str(ei.value)


def test_jsonl_fields_and_directory(tmp_path, tok):
    p = tmp_path / "docs.jsonl"
    rows = [{"text": f"text {i}", "body": f"body {i}"} for i in range(3)]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    assert CalibrationSource.from_spec(str(p), tok).text == "text 0\n\ntext 1\n\ntext 2"
    assert CalibrationSource.from_spec(f"{p}:body", tok).text == "body 0\n\nbody 1\n\nbody 2"
    with pytest.raises(CalibrationError, match="no field 'title'"):
        CalibrationSource.from_spec(f"{p}:title", tok)
    j = tmp_path / "list.json"
    j.write_text(json.dumps(rows), encoding="utf-8")
    assert CalibrationSource.from_spec(f"{j}:body", tok).text.startswith("body 0")

    d = tmp_path / "dir"
    d.mkdir()
    (d / "b.txt").write_text("second", encoding="utf-8")
    (d / "a.raw").write_text("first", encoding="utf-8")
    (d / "c.jsonl").write_text(json.dumps({"text": "third"}) + "\n", encoding="utf-8")
    (d / "skip.bin").write_bytes(b"\x00")
    assert CalibrationSource.from_spec(str(d), tok).text == "first\n\nsecond\n\nthird"


def test_alias_needs_assets_env(monkeypatch, tok):
    monkeypatch.delenv("COMPRESS_ASSETS", raising=False)
    with pytest.raises(CalibrationError, match=r"\$COMPRESS_ASSETS"):
        CalibrationSource.from_spec("tinystories", tok)


def test_hf_offline_is_one_line_error(monkeypatch, tok):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CalibrationError, match="local") as ei:
        CalibrationSource.from_spec("hf:compress-no-such/dataset:cfg:train", tok, max_chars=1000)
    assert "\n" not in str(ei.value)
    with pytest.raises(CalibrationError, match="hf:NAME"):
        CalibrationSource.from_spec("hf:", tok)


def test_long_text_is_tokenised_in_line_chunks(monkeypatch, text_file):
    import compress.calib.sources as cal

    monkeypatch.setattr(cal, "_ONE_SHOT_CHARS", 500)
    monkeypatch.setattr(cal, "_CHUNK_CHARS", 300)
    tok = CharTokenizer()  # byte-level: chunking must not change the stream at all
    src = CalibrationSource.from_spec(str(text_file), tok)
    assert src.tokens.tolist() == list(TEXT.encode())
    assert all(c.endswith("\n") for c in cal._line_chunks(TEXT, 300)[:-1])


def test_hf_spec_streams_local_dataset_dir(tmp_path, monkeypatch, tok):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")  # keep ~/.cache clean
    d = tmp_path / "ds"
    d.mkdir()
    (d / "train.jsonl").write_text("\n".join(json.dumps({"text": f"row {i}"}) for i in range(50)), encoding="utf-8")
    src = CalibrationSource.from_spec(f"hf:{d}", tok, max_chars=20)  # max_chars -> streaming, no cache
    assert src.text == "row 0\n\nrow 1\n\nrow 2"[:20]
    assert src.describe()["path"].endswith(":train")


@needs_assets
def test_wikitext2_alias_protocol():
    tok = tiny_tokenizer()
    src = CalibrationSource.from_spec("wikitext2", tok)
    raw = (ASSETS / "data/wikitext-2-raw/wiki.valid.raw").read_text(encoding="utf-8")
    rows = [line + "\n" if line.strip() else "" for line in raw.split("\n")[:-1]]
    joined = "\n\n".join(rows)
    assert len(rows) == 3760
    assert src.text == joined == wikitext_join(raw)
    head = tok(joined[:5000], add_special_tokens=False)["input_ids"]
    assert src.tokens[:500].tolist() == head[:500]
    test = CalibrationSource.from_spec("wikitext2-test", tok)
    assert test.text.count("\n\n") >= 4357 and test.path.endswith("wiki.test.raw")


# ---------------------------------------------------------------------------- statistics
def _inputs(n=4, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 512, (n, t), generator=g)


def test_channel_stats_match_stored_activations():
    model = tiny_model("llama-gqa")
    layer = model.model.layers[1]
    mods = {"o": layer.self_attn.o_proj, "down": layer.mlp.down_proj, "mlp": layer.mlp}
    stored: dict[str, list[torch.Tensor]] = {k: [] for k in mods}
    handles = [m.register_forward_pre_hook(lambda _m, a, k=k: stored[k].append(a[0].detach().clone()))
               for k, m in mods.items()]
    ids = _inputs(5, 10)
    with record(mods, second_moment={"o"}) as stats:
        run_calibration(model, ids, batch_size=2, progress=False)
    for h in handles:
        h.remove()
    for k in mods:
        x = torch.cat([s.reshape(-1, s.shape[-1]) for s in stored[k]]).double()
        st = stats[k]
        assert st.count == 50
        torch.testing.assert_close(st.l2.double(), x.norm(dim=0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(st.mean.double(), x.mean(0), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(st.mean_sq.double(), (x * x).mean(0), rtol=1e-5, atol=1e-6)
        st.check_finite(k)
    xo = torch.cat([s.reshape(-1, s.shape[-1]) for s in stored["o"]]).double()
    torch.testing.assert_close(stats["o"].second_moment.double(), xo.T @ xo / 50, rtol=1e-4, atol=1e-5)
    assert stats["down"].gram is None
    with pytest.raises(ValueError, match="second_moment=True"):
        _ = stats["down"].second_moment


def test_record_output_and_half_precision_input():
    model = tiny_model("llama-mha")
    q = model.model.layers[0].self_attn.q_proj
    with record({"q": q}, where="output") as stats:
        out = q(torch.randn(2, 3, 64))
    torch.testing.assert_close(stats["q"].sum, out.reshape(-1, out.shape[-1]).sum(0))
    st = ChannelStats()
    x = torch.randn(7, 5).to(torch.bfloat16)
    st.update(x)
    assert st.sum.dtype == torch.float32
    torch.testing.assert_close(st.sumsq, x.float().square().sum(0))


def test_hooks_removed_after_context_and_on_exception():
    model = tiny_model("llama-gqa")
    mods = {f"l{i}": layer.mlp.down_proj for i, layer in enumerate(model.model.layers)}
    with record(mods, second_moment=True):
        assert all(len(m._forward_pre_hooks) == 1 for m in mods.values())
    assert all(len(m._forward_pre_hooks) == 0 for m in mods.values())
    with pytest.raises(RuntimeError, match="boom"), record(mods, where="output"):
        assert all(len(m._forward_hooks) == 1 for m in mods.values())
        raise RuntimeError("boom")
    assert all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0 for m in mods.values())


def test_nan_detection():
    st = ChannelStats(second_moment=True)
    x = torch.ones(4, 3)
    x[2, 1] = float("nan")
    st.update(x)
    with pytest.raises(NumericalError, match="layer3.down_proj") as ei:
        st.check_finite("layer3.down_proj")
    assert "\n" not in str(ei.value)
    with pytest.raises(NumericalError, match="no activations"):
        _ = ChannelStats().l2


def test_mask_excludes_padding():
    st = ChannelStats()
    x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    st.update(x, mask)
    kept = x.reshape(-1, 4)[mask.reshape(-1).bool()]
    assert st.count == 3
    torch.testing.assert_close(st.sum, kept.sum(0))

    # through the model: padded positions of the batch do not reach the statistics
    model = tiny_model("llama-gqa")
    down = model.model.layers[0].mlp.down_proj
    ids = _inputs(2, 8)
    amask = torch.ones_like(ids)
    amask[1, 5:] = 0
    with record({"d": down}) as stats:
        n = run_calibration(model, ids, attention_mask=amask, progress=False)
    assert n == 13 and stats["d"].count == 13


def test_run_calibration_progress_callback():
    model = tiny_model("llama-gqa")
    calls = []
    run_calibration(model, _inputs(5, 6), batch_size=2, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert not model.training


def test_run_calibration_skips_the_lm_head_unless_asked():
    """The decoder stack alone feeds the layer hooks (same statistics); the [batch, T, vocab] logits
    are only computed with ``logits=True``."""
    from compress.calib.runner import run_calibration
    from compress.calib.stats import record
    from compress.testing import tiny_model

    model = tiny_model("llama-gqa")
    ids = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    calls = []
    model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    o_proj = {"o": model.model.layers[0].self_attn.o_proj}
    with record(o_proj, where="input") as lean:
        run_calibration(model, ids, batch_size=2, progress=False)
    assert calls == []
    with record(o_proj, where="input") as full:
        run_calibration(model, ids, batch_size=2, progress=False, logits=True)
    assert len(calls) == 2
    assert torch.equal(lean["o"].l2, full["o"].l2)


def test_packaged_wikitext_equals_the_assets_copy_and_needs_no_assets(monkeypatch, assets):
    """The default calibration and perplexity text work with COMPRESS_ASSETS unset, from the copy
    the package ships, and give exactly the assets folder's text (so the same blocks and PPL)."""
    from compress.assets import data_text
    from compress.evaluate import wikitext2_text

    tok = tiny_tokenizer()
    with_assets = {s: wikitext2_text(s) for s in ("valid", "test")}
    calib_assets = CalibrationSource.from_spec("wikitext2", tok, seed=3)
    assert calib_assets.path == "$COMPRESS_ASSETS/data/wikitext-2-raw/wiki.valid.raw"
    monkeypatch.delenv("COMPRESS_ASSETS")
    assert {s: wikitext2_text(s) for s in ("valid", "test")} == with_assets
    calib = CalibrationSource.from_spec("wikitext2", tok, seed=3)
    assert calib.path == "package:compress/data/wikitext-2-raw/wiki.valid.raw"
    assert calib.fingerprint(4, 64) == calib_assets.fingerprint(4, 64)
    with pytest.raises(CalibrationError, match="tinystories.*COMPRESS_ASSETS"):
        CalibrationSource.from_spec("tinystories", tok)
    with pytest.raises(UsageError, match="neither in"):
        data_text("nope/missing.txt")
