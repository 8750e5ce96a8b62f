"""What ``--dtype auto`` chooses for a GGUF source, measured: SmolLM2-135M-Instruct (GGUF Q4_1) loaded,
pruned and saved in float32 vs bfloat16.

For each dtype: the dense model's WikiText-2 test perplexity (first 16,384 tokens at 2048 context and
the first 8,192 at 128), TransAct to 80 % of the parameters (32 × 512 calibration tokens, the repro
matrix's setting) through ``compress run``'s own pipeline, the pruned model's perplexity, and the bytes
of the saved ``model.safetensors``. Writes ``results/dtype_gguf_smollm2.md``.

    COMPRESS_ASSETS=../shared/assets python benchmarks/dtype_gguf_smollm2.py
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from common import RESULTS, smollm2_path  # noqa: E402


def ppl(model, tok, text, seq_len: int, windows: int) -> float:
    from compress.evaluate.perplexity import perplexity

    return perplexity(model, tok, text, seq_len=seq_len, max_windows=windows, batch_size=1 if seq_len > 512 else 16,
                      progress=False)["ppl"]


def main() -> None:
    import torch

    from compress.evaluate.perplexity import wikitext2_text
    from compress.io.loading import load_model
    from compress.pipeline.run import RunSpec, run

    torch.set_num_threads(int(os.environ.get("COMPRESS_BENCH_THREADS", "2")))
    text = wikitext2_text("test")
    rows = []
    for dtype in ("float32", "bfloat16"):
        t0 = time.perf_counter()
        lm = load_model(smollm2_path(), dtype=dtype)
        dense = (ppl(lm.model, lm.tokenizer, text, 2048, 8), ppl(lm.model, lm.tokenizer, text, 128, 64))
        del lm
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out"
            res = run(RunSpec(method="transact", target="80%", model=smollm2_path(), dtype=dtype, out=str(out),
                              settings={"calib_samples": 32, "calib_seq_len": 512, "gqa": "groups"}, progress=False,
                              evaluate=False),
                      log=lambda m: None)
            pruned = (ppl(res.model, res.tokenizer, text, 2048, 8), ppl(res.model, res.tokenizer, text, 128, 64))
            size = (out / "model.safetensors").stat().st_size
        rows.append({"dtype": dtype, "dense_ppl2048": dense[0], "dense_ppl128": dense[1], "pruned_ppl2048": pruned[0],
                     "pruned_ppl128": pruned[1], "bytes": size, "params": res.achieved.params,
                     "prune_s": res.record["timing_s"]["prune"], "wall_s": round(time.perf_counter() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
    f32, b16 = rows
    lines = [
        "# `--dtype auto` for a GGUF source: bfloat16 vs float32 (SmolLM2-135M-Instruct, GGUF Q4_1)",
        "",
        "Produced by `benchmarks/dtype_gguf_smollm2.py`: the GGUF de-quantized to each dtype, the dense model's",
        "WikiText-2 test perplexity (first 16,384 tokens @2048, first 8,192 @128), TransAct to 80 % of the",
        "parameters (32 × 512 calibration tokens; statistics are float32 in both) through `compress run`'s",
        "pipeline, the pruned model's perplexity and the bytes of its saved `model.safetensors`.",
        f"torch threads: {os.environ.get('COMPRESS_BENCH_THREADS', '2')}; the CPU was shared with other work.",
        "",
        "| dtype | dense PPL @2048 | dense PPL @128 | TransAct 80 % PPL @2048 | @128 | model.safetensors | prune s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['dense_ppl2048']:.3f} | {r['dense_ppl128']:.3f} | {r['pruned_ppl2048']:.3f} | "
                     f"{r['pruned_ppl128']:.3f} | {r['bytes'] / 1e6:.1f} MB | {r['prune_s']:.0f} |")
    lines += [
        "",
        f"bfloat16 writes {b16['bytes'] / f32['bytes']:.1%} of the float32 bytes; its perplexity differs by "
        f"{(b16['dense_ppl2048'] / f32['dense_ppl2048'] - 1):+.2%} (dense @2048) and "
        f"{(b16['pruned_ppl2048'] / f32['pruned_ppl2048'] - 1):+.2%} (pruned @2048). The GGUF's weights are 4-bit, so",
        "neither is the source's own dtype; `--dtype auto` loads GGUF files in bfloat16 "
        "(`compress.io.loading.GGUF_AUTO_DTYPE`), `--dtype float32` keeps the old behaviour.",
        "",
    ]
    (RESULTS / "dtype_gguf_smollm2.md").write_text("\n".join(lines))
    (RESULTS / "dtype_gguf_smollm2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
