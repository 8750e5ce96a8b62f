"""A second real family end to end: Qwen2.5-Coder-0.5B-Instruct (qwen2: 14 query / 2 KV heads, q/k/v
biases, untied output head, 24 layers), fetched once into the cache by :func:`compress.testing.qwen2_gguf`
and skipped, with the reason, when it cannot be fetched.

TransAct at 80 % through the run pipeline: the target is met, the folder reloads in stock transformers
with the same logits as the in-memory model, and the q/k/v biases of the kept heads are the dense ones.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from compress.testing import qwen2_gguf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def qwen2() -> str:
    path, why = qwen2_gguf()
    if path is None:
        pytest.skip(why)
    return str(path)


def test_transact_on_qwen2_end_to_end(qwen2, tmp_path):
    from compress.io.loading import load_model
    from compress.pipeline.run import RunSpec, run

    out = tmp_path / "qwen2-80"
    # one run through the pipeline the CLI uses: the in-memory model and the exported folder of the same run
    mem = run(RunSpec(method="transact", target="80%", model=qwen2, out=str(out), dtype="float32",
                      settings={"calib_samples": 8, "calib_seq_len": 128}, progress=False), log=lambda m: None)
    rec = mem.record
    assert json.loads((out / "compress_run.json").read_text())["plan_hash"] == rec["plan_hash"]
    assert rec["dense"]["params"] == 630_167_424  # untied head counted once each: 2 x 151936 x 896 + blocks
    assert rec["achieved"]["params"] <= 0.8 * rec["dense"]["params"]
    assert rec["export"]["kind"] == "stock"

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert sum(p.numel() for p in reloaded.parameters()) == rec["achieved"]["params"]
    assert reloaded.config.model_type == "qwen2" and not reloaded.config.tie_word_embeddings
    ids = torch.randint(100, 20000, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = reloaded(ids).logits
        assert (mem.model(ids).logits - logits).abs().max().item() < 1e-4
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
    assert math.isfinite(nll)

    # biases of the kept heads: every q/k/v bias row of the pruned model is a row of the dense bias
    dense = load_model(qwen2, dtype="float32").model
    hd = dense.config.hidden_size // dense.config.num_attention_heads  # 64; pruning keeps head_dim
    for i in (0, len(reloaded.model.layers) - 1):
        for name in ("k_proj", "v_proj", "q_proj"):
            b = getattr(reloaded.model.layers[i].self_attn, name).bias.view(-1, hd)
            d = getattr(dense.model.layers[i].self_attn, name).bias.view(-1, hd)
            assert all(any(torch.equal(row, ref) for ref in d) for row in b), (i, name)
