"""Peak memory of layer-wise pruning (TransAct, SliceGPT) with and without weight streaming (``--stream-weights``).

Usage: ``python benchmarks/streaming_memory.py [--small] [--resume] [--results DIR]``.

Writes a synthetic Llama-shaped model with random float32 weights to safetensors shards in a temporary
folder (never in the repository): hidden 2048, 24 layers, MLP 5504, vocabulary 32000, untied head —
1.35 B parameters, 5.4 GB of weights (more than 4 GiB). ``--small`` writes a 4-layer, 256-wide one
instead, to check that the script works in seconds. Then prunes it with TransAct to 50 % and to 30 % of
the parameters and with SliceGPT to 50 % (``--small``: 60 % and 50 %, SliceGPT 60 %; calibration 8 × 128
tokens of TinyStories, the stories260K tokenizer), each cell twice, each in its own subprocess, through
``compress.pipeline.run.run`` (the ``compress run`` code path: load, prune, save):

* ``in-ram``: layer-wise calibration of the model loaded whole (``layerwise=True``);
* ``stream``: the same with ``stream_weights=True`` (each decoder layer read when visited).

Records per cell the process's peak RSS over load + prune + save (``compress.probes.track_peak_rss``,
the kernel's high-water mark) divided by the weight bytes, the wall time, and whether the two plans of a
cell (their sha256) and their saved weights are equal. Writes ``results/streaming_memory.{jsonl,md}``
(``--small``: ``streaming_memory_small.*``). torch runs on 1 thread. Needs ``$COMPRESS_ASSETS`` (tokenizer, text).
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
#: (method, target, settings): TransAct at 50 % and at 30 % (about LLaMA-2-7B -> 2B, the deployment
#: issue's ratio, where the pruned model is small enough for a peak at most half the dense weights), and
#: SliceGPT (another streaming method: each layer's norms folded and its rotations computed when read)
CELLS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("transact", "50%", {"gqa": "groups"}),
    ("transact", "30%", {"gqa": "groups"}),
    ("slicegpt", "50%", {}),
)
#: the small model's embeddings alone are ~40 % of it
SMALL_CELLS = (("transact", "60%", {"gqa": "groups"}), ("transact", "50%", {"gqa": "groups"}), ("slicegpt", "60%", {}))
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


def cell(mode: str, model: str, out: str, method: str, target: str, settings: dict[str, Any]) -> dict[str, Any]:
    """One measurement, in this process (a fresh subprocess per cell)."""
    import torch

    torch.set_num_threads(1)
    from compress.pipeline.run import RunSpec, run
    from compress.probes import track_peak_rss

    spec = RunSpec(method=method, target=target, model=model, out=out, calib="tinystories", dtype="float32",
                   settings={"calib_samples": CALIB_SAMPLES, "calib_seq_len": CALIB_SEQ_LEN, **settings}, layerwise=True,
                   stream_weights=mode == "stream", evaluate=False, progress=False)
    t0 = time.perf_counter()
    with track_peak_rss() as rss:
        res = run(spec, log=lambda m: None)
    wall = time.perf_counter() - t0
    rec = res.record
    return {"mode": mode, "method": method, "target": target, "settings": settings, "peak_rss_bytes": rss.peak_bytes,
            "rss_increase_bytes": rss.increase_bytes, "rss_method": rss.method,
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
    ap.add_argument("--resume", action="store_true", help="keep the rows of the results file that match a cell "
                    "and the model shape; run only the missing cells")
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cell:
        print(json.dumps(cell(args.cell, args.model, args.out, *json.loads(args.spec))))
        return
    shape = SMALL if args.small else FULL
    name = NAME + ("_small" if args.small else "")
    cells = SMALL_CELLS if args.small else CELLS
    results = args.results / f"{name}.jsonl"
    done: dict[tuple[str, str, str], dict[str, Any]] = {}
    if args.resume and results.is_file():
        for line in results.read_text().splitlines():
            r = json.loads(line)
            if r.get("shape") == shape and (r.get("method"), r["target"], r.get("settings")) in cells:
                done[(r["method"], r["target"], r["mode"])] = r
    tmp = Path(tempfile.mkdtemp(prefix="compress-streaming-bench-"))
    try:
        t = time.perf_counter()
        nbytes = write_model(tmp / "model", shape)
        print(f"wrote {nbytes / 2**30:.2f} GiB of float32 weights in {time.perf_counter() - t:.0f}s", flush=True)
        if any(r["weight_bytes"] != nbytes for r in done.values()):
            raise SystemExit(f"{results} was measured on another model; run without --resume")
        for method, target, settings in cells:
            for mode in MODES:
                if (method, target, mode) in done:
                    continue
                proc = subprocess.run([sys.executable, __file__, "--cell", mode, "--model", str(tmp / "model"),
                                       "--out", str(tmp / f"out-{mode}"), "--spec", json.dumps([method, target, settings])],
                                      capture_output=True, text=True,
                                      env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
                if proc.returncode != 0:
                    raise SystemExit(f"cell {method} {target} {mode} failed:\n{proc.stderr[-3000:]}")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                row.update({"bench": NAME, "shape": shape, "weight_bytes": nbytes,
                            "peak_over_weights": round(row["peak_rss_bytes"] / nbytes, 3),
                            "increase_over_weights": round(row["rss_increase_bytes"] / nbytes, 3),
                            "prune_peak_over_weights": round(row["prune_peak_rss_bytes"] / nbytes, 3),
                            "pruned_over_weights": round(row["params_after"] * 4 / nbytes, 3),
                            "calibration": f"{CALIB_SAMPLES}x{CALIB_SEQ_LEN}", "threads": 1,
                            "load_avg_1min": round(os.getloadavg()[0], 2)})
                done[(method, target, mode)] = row
                print(f"{method} {target} {mode}: peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB = "
                      f"{row['peak_over_weights']:.2f} x weights, {row['wall_s']:.0f}s", flush=True)
                shutil.rmtree(tmp / f"out-{mode}", ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [done[(m, t, mode)] for m, t, _ in cells for mode in MODES]
    for r in rows:
        pair = [q for q in rows if (q["method"], q["target"]) == (r["method"], r["target"])]
        r.update({"same_plan": len({q["plan_hash"] for q in pair}) == 1,
                  "same_weights": len({q["weights_sha256"] for q in pair}) == 1})
    same_plan = all(r["same_plan"] for r in rows)
    same_weights = all(r["same_weights"] for r in rows)
    args.results.mkdir(parents=True, exist_ok=True)
    with open(args.results / f"{name}.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    lines = [f"# Layer-wise pruning: streamed vs in-RAM weights ({name})", "",
             f"Synthetic Llama (hidden {shape['hidden']}, {shape['layers']} layers, MLP {shape['intermediate']}, "
             f"vocab {shape['vocab']}, untied), random float32 weights, {nbytes / 2**30:.2f} GiB in "
             f"{shape['layers'] + 1} safetensors shards; TransAct (`gqa: groups`) and SliceGPT to each target, calibration "
             f"{CALIB_SAMPLES} × {CALIB_SEQ_LEN} tokens of TinyStories, 1 torch thread, CPU, through `compress run`'s "
             "code path (load, prune, save). Peak RSS of the whole process (`track_peak_rss`, the kernel's "
             "high-water mark) over load + prune + save; 'prune peak' is the run record's peak at the end of "
             "pruning; 'peak − start' leaves out the interpreter and libraries resident before the run; "
             "'pruned' is the pruned model's float32 bytes ÷ the dense weight bytes (a lower bound of any peak); "
             "'load avg' is the 1-minute load average when the cell ended (2 cores: above ~1, other work shared them).",
             "",
             "| method | target | weights | pruned ÷ weights | peak RSS | peak ÷ weight bytes | prune peak ÷ weight bytes "
             "| peak − start ÷ weight bytes | wall (s) | load (s) | prune (s) | load avg |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['target']} | {r['mode']} | {r['pruned_over_weights']:.2f} | "
                     f"{r['peak_rss_bytes'] / 2**30:.2f} GiB | {r['peak_over_weights']:.2f} | "
                     f"{r['prune_peak_over_weights']:.2f} | {r['increase_over_weights']:.2f} | {r['wall_s']:.1f} | "
                     f"{r['load_s']:.1f} | {r['prune_s']:.1f} | {r.get('load_avg_1min', '–')} |")
    lines += ["", f"Same plan (sha256) streamed and in RAM, in every cell: {'yes' if same_plan else 'NO'}; "
              f"same saved weights: {'yes' if same_weights else 'NO'}.", ""]
    (args.results / f"{name}.md").write_text("\n".join(lines))
    print(f"wrote {args.results / name}.jsonl/.md (same plan: {same_plan}, same weights: {same_weights})")


if __name__ == "__main__":
    main()
