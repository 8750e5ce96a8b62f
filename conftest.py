"""Test-wide settings: offline hub, private HF cache, assets location."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="compress-hf-home-"))
os.environ.setdefault("COMPRESS_CACHE", tempfile.mkdtemp(prefix="compress-cache-"))  # the methods catalog
_default_assets = Path(__file__).resolve().parent.parent / "shared" / "assets"
if not os.environ.get("COMPRESS_ASSETS") and _default_assets.is_dir():
    os.environ["COMPRESS_ASSETS"] = str(_default_assets)

import pytest  # noqa: E402

ASSETS = Path(os.environ["COMPRESS_ASSETS"]) if os.environ.get("COMPRESS_ASSETS") else None
needs_assets = pytest.mark.skipif(ASSETS is None or not ASSETS.is_dir(), reason="needs $COMPRESS_ASSETS")


@pytest.fixture(scope="session")
def assets() -> Path:
    if ASSETS is None or not ASSETS.is_dir():
        pytest.skip("needs $COMPRESS_ASSETS")
    return ASSETS


@pytest.fixture(scope="session")
def smollm2_dir(assets: Path) -> Path:
    return assets / "models" / "smollm2-135m-instruct-q4_1"


@pytest.fixture(scope="session")
def stories_dir(assets: Path) -> Path:
    return assets / "models" / "stories260k"


@pytest.fixture(scope="session")
def smollm2_loaded(smollm2_dir: Path):
    """SmolLM2-135M loaded once from its GGUF through ``compress.io.loading.load_model`` (dequantized, ~30 s).

    Shared by the slow tests; never modify it in place (deep-copy first)."""
    if not smollm2_dir.is_dir():
        pytest.skip(f"{smollm2_dir} is missing")
    from compress.io.loading import load_model

    return load_model(str(smollm2_dir))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one torch thread, and far faster when the CPU is shared.

    Opt in per module with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def kill_9_at_random(argv: list[str], low: float, high: float) -> float:
    """Start ``argv`` (which prints ``ready`` once its write loop runs), SIGKILL it after a random
    delay in ``[low, high]`` seconds while it is still writing, and reap it. Returns the delay."""
    import random
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-3000:]
        delay = random.uniform(low, high)
        time.sleep(delay)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return delay


@pytest.fixture(scope="module")
def calib():
    """TinyStories calibration text through the tiny tokenizer (seeded, first 150k characters); skips
    without $COMPRESS_ASSETS. One per test module, as the modules that use it had each defined it."""
    from compress.calib.sources import CalibrationSource
    from compress.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    if tok is None:
        pytest.skip("needs $COMPRESS_ASSETS")
    return CalibrationSource.from_spec("tinystories", tok, seed=0, max_chars=150_000)


def hand_sliced_attention(key: str, w, heads: list[int], kv: list[int], hd: int):
    """The dense tensor ``w`` of state-dict entry ``key`` cut by hand to query heads ``heads`` and KV heads
    ``kv`` of ``hd`` channels: rows of q/k/v, columns of o, and rows of q/k norms that span every head
    (OLMo-2's; a per-head norm, ``hd`` wide, is shared and stays). Any other entry comes back as it is.
    The reference the families' surgery tests compare a pruned model with."""
    import torch

    def rows(t, hs):
        return torch.cat([t[h * hd:(h + 1) * hd] for h in hs])

    spans_heads = w.shape[0] > hd
    if key.endswith("q_proj.weight") or (key.endswith("q_norm.weight") and spans_heads):
        return rows(w, heads)
    if key.endswith(("k_proj.weight", "v_proj.weight")) or (key.endswith("k_norm.weight") and spans_heads):
        return rows(w, kv)
    if key.endswith("o_proj.weight"):
        return rows(w.T, heads).T
    return w
