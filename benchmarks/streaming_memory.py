"""Peak memory of layer-wise TransAct with and without weight streaming (``--stream-weights``).

Usage: ``python benchmarks/streaming_memory.py [--small] [--results DIR]``.

Writes a synthetic Llama-shaped model with random float32 weights to safetensors shards in a temporary
folder (never in the repository): hidden 2048, 24 layers, MLP 5504, vocabulary 32000, untied head —
1.35 B parameters, 5.4 GB of weights (more than 4 GiB). ``--small`` writes a 4-layer, 256-wide one
instead, to check that the script works in seconds. Then prunes it with TransAct to 50 % of the
parameters (calibration 8 × 128 tokens of TinyStories, the stories260K tokenizer) twice, each in its
own subprocess, through ``compress.pipeline.run.run`` (the ``compress run`` code path):

* ``in-ram``: layer-wise calibration of the model loaded whole (``layerwise=True``);
* ``stream``: the same with ``stream_weights=True`` (each decoder layer read when visited).

Records per cell the process's peak RSS over load + prune (``compress.probes.track_peak_rss``, the
kernel's high-water mark) divided by the weight bytes, the wall time, and whether the plans (their
sha256) and the saved weights are equal. Writes ``results/streaming_memory.{jsonl,md}`` (``--small``:
``streaming_memory_small.*``). torch runs on 1 thread. Needs ``$COMPRESS_ASSETS`` (tokenizer, text).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS  # noqa: E402

NAME = "streaming_memory"
FULL = {"hidden": 2048, "layers": 24, "intermediate": 5504, "vocab": 32000, "heads": 16}
SMALL = {"hidden": 256, "layers": 4, "intermediate": 688, "vocab": 2048, "heads": 4}
TARGET = "50%"
CALIB_SAMPLES, CALIB_SEQ_LEN = 8, 128
MODES = ("stream", "in-ram")


def write_model(folder: Path, shape: dict[str, int], seed: int = 0) -> int:
    """A Llama config, random float32 weights (one shard per layer + one for the rest), the index and
    the stories260K tokenizer. One layer is in memory at a time. Returns the weight bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    h, inter, v, n = shape["hidden"], shape["intermediate"], shape["vocab"], shape["layers"]
    cfg = LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=n, num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["heads"], vocab_size=v, max_position_embeddings=2048,
                      tie_word_embeddings=False, dtype="float32")
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(folder)
    gen = torch.Generator().manual_seed(seed)
    shards = n + 1
    weight_map: dict[str, str] = {}
    total = 0

    def rand(*s: int) -> torch.Tensor:
        # spread the row scales as trained weights do (see compress.testing.tiny_model)
        w = torch.randn(*s, generator=gen) * 0.02
        return w * (torch.rand(s[0], 1, generator=gen) * 1.5 + 0.25) if len(s) == 2 else w

    def write(k: int, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, folder / name, metadata={"format": "pt"})
        for key, t in tensors.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()

    write(0, {"model.embed_tokens.weight": rand(v, h), "model.norm.weight": torch.ones(h), "lm_head.weight": rand(v, h)})
    for i in range(n):
        p = f"model.layers.{i}."
        write(i + 1, {
            p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(h, h),
            p + "self_attn.v_proj.weight": rand(h, h), p + "self_attn.o_proj.weight": rand(h, h),
            p + "mlp.gate_proj.weight": rand(inter, h), p + "mlp.up_proj.weight": rand(inter, h),
            p + "mlp.down_proj.weight": rand(h, inter),
            p + "input_layernorm.weight": torch.ones(h), p + "post_attention_layernorm.weight": torch.ones(h),
        })
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                       "weight_map": weight_map}, indent=1))
    assets = os.environ.get("COMPRESS_ASSETS")
    if not assets:
        raise SystemExit("set COMPRESS_ASSETS to the shared assets folder (tokenizer and calibration text)")
    AutoTokenizer.from_pretrained(Path(assets) / "models" / "stories260k").save_pretrained(folder)
    return total


def cell(mode: str, model: str, out: str) -> dict[str, Any]:
    """One measurement, in this process (a fresh subprocess per cell)."""
    import torch

    torch.set_num_threads(1)
    from compress.pipeline.run import RunSpec, run
    from compress.probes import track_peak_rss

    spec = RunSpec(method="transact", target=TARGET, model=model, out=out, calib="tinystories", dtype="float32",
                   settings={"calib_samples": CALIB_SAMPLES, "calib_seq_len": CALIB_SEQ_LEN, "gqa": "groups"}, layerwise=True,
                   stream_weights=mode == "stream", evaluate=False, progress=False)
    t0 = time.perf_counter()
    with track_peak_rss() as rss:
        res = run(spec, log=lambda m: None)
    wall = time.perf_counter() - t0
    rec = res.record
    return {"mode": mode, "peak_rss_bytes": rss.peak_bytes, "rss_increase_bytes": rss.increase_bytes,
            "rss_method": rss.method,
            "prune_peak_rss_bytes": rec["peak_rss_bytes"], "wall_s": round(wall, 2),
            "load_s": rec["timing_s"]["load"], "prune_s": rec["timing_s"]["prune"], "plan_hash": rec["plan_hash"],
            "weights_sha256": rec["weights_sha256"], "params_after": rec["achieved"]["params"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="a 4-layer, 256-wide model (seconds; checks the script)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where the .jsonl and .md go")
    ap.add_argument("--cell", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cell:
        print(json.dumps(cell(args.cell, args.model, args.out)))
        return
    shape = SMALL if args.small else FULL
    name = NAME + ("_small" if args.small else "")
    tmp = Path(tempfile.mkdtemp(prefix="compress-streaming-bench-"))
    try:
        t = time.perf_counter()
        nbytes = write_model(tmp / "model", shape)
        print(f"wrote {nbytes / 2**30:.2f} GiB of float32 weights in {time.perf_counter() - t:.0f}s", flush=True)
        rows = []
        for mode in MODES:
            proc = subprocess.run([sys.executable, __file__, "--cell", mode, "--model", str(tmp / "model"),
                                   "--out", str(tmp / f"out-{mode}")], capture_output=True, text=True,
                                  env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if proc.returncode != 0:
                raise SystemExit(f"cell {mode} failed:\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row.update({"bench": NAME, "shape": shape, "weight_bytes": nbytes,
                        "peak_over_weights": round(row["peak_rss_bytes"] / nbytes, 3),
                        "increase_over_weights": round(row["rss_increase_bytes"] / nbytes, 3),
                        "calibration": f"{CALIB_SAMPLES}x{CALIB_SEQ_LEN}", "target": TARGET, "threads": 1})
            rows.append(row)
            print(f"{mode}: peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB = {row['peak_over_weights']:.2f} × "
                  f"weights, {row['wall_s']:.0f}s", flush=True)
            shutil.rmtree(tmp / f"out-{mode}", ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    same_plan = len({r["plan_hash"] for r in rows}) == 1
    same_weights = len({r["weights_sha256"] for r in rows}) == 1
    for r in rows:
        r.update({"same_plan": same_plan, "same_weights": same_weights})
    args.results.mkdir(parents=True, exist_ok=True)
    with open(args.results / f"{name}.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    lines = [f"# Layer-wise TransAct: streamed vs in-RAM weights ({name})", "",
             f"Synthetic Llama (hidden {shape['hidden']}, {shape['layers']} layers, MLP {shape['intermediate']}, "
             f"vocab {shape['vocab']}, untied), random float32 weights, {nbytes / 2**30:.2f} GiB in "
             f"{shape['layers'] + 1} safetensors shards; TransAct to {TARGET} params, calibration "
             f"{CALIB_SAMPLES} × {CALIB_SEQ_LEN} tokens, 1 torch thread, CPU. Peak RSS of the whole process over "
             "load + prune (`track_peak_rss`); 'peak − start' leaves out the interpreter and libraries resident "
             "before the run.", "",
             "| weights | peak RSS | peak ÷ weight bytes | peak − start ÷ weight bytes | wall (s) | load (s) | prune (s) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['peak_rss_bytes'] / 2**30:.2f} GiB | {r['peak_over_weights']:.2f} | "
                     f"{r['increase_over_weights']:.2f} | {r['wall_s']:.1f} | {r['load_s']:.1f} | {r['prune_s']:.1f} |")
    lines += ["", f"Same plan (sha256): {'yes' if same_plan else 'NO'}; same saved weights: "
              f"{'yes' if same_weights else 'NO'}.", ""]
    (args.results / f"{name}.md").write_text("\n".join(lines))
    print(f"wrote {args.results / name}.jsonl/.md (same plan: {same_plan}, same weights: {same_weights})")


if __name__ == "__main__":
    main()
