"""Which MLP width multiple llama.cpp's kernels want: a width sweep on SmolLM2-135M shapes.

    LLAMA_CPP_BIN=/path/to/llama.cpp/build/bin python benchmarks/mlp_widths_llamacpp.py [--reps 7] [--threads 1]

Speed depends on the shapes only, so every model here is the dense SmolLM2-135M with the same shape
plan applied (the first KV groups and the first MLP channels kept — no calibration; the pruning
criterion does not change the speed), exported by ``compress.io.export.export_model`` as a stock
folder and by ``compress.io.gguf_export.write_gguf`` as an F16 GGUF. Two regions: 1 KV group with MLP
widths around 576 (TransAct 50-60 %) and 2 KV groups around 1187 (TransAct 80 %), each with widths
whose largest power-of-two divisor is 1, 2, 4, 8, 16, 32, 64 and 128.

Protocol as ``deploy_llamacpp.py``: ``llama-bench -p 128 -n 32 -r 1``, models interleaved round-robin
over ``--reps`` rounds (the order rotates), median and IQR. The comparison across widths is the
effective throughput ``tok/s × FLOPs per token`` (GFLOP/s at T = 128, ``compress.model.footprint``):
a kernel-friendly width runs the same FLOPs faster. ``sizing.MLP_KERNEL_MULTIPLE`` (the
``mlp_round_to=auto`` multiple) is chosen from this table.

Results: ``benchmarks/results/mlp_widths_llamacpp.{jsonl,md}``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from deploy_llamacpp import bench_once, quartiles  # noqa: E402

#: (KV groups kept, MLP widths)
REGIONS = [(1, [569, 570, 572, 568, 560, 544, 576, 640]), (2, [1187, 1186, 1188, 1176, 1168, 1184, 1152, 1280])]


def pow2_divisor(n: int) -> int:
    return n & -n


def build(work: Path) -> list[dict]:
    from compress.io.export import export_model
    from compress.io.gguf_export import write_gguf
    from compress.io.loading import load_model
    from compress.model.adapter import adapter_for
    from compress.model.footprint import footprint
    from compress.model.plan import LayerPlan, Plan
    from compress.model.surgery import apply_plan

    lm = load_model(common.smollm2_path(), dtype="float32")
    out = []
    for groups, widths in REGIONS:
        for w in widths:
            gguf = work / f"g{groups}_mlp{w}.f16.gguf"
            model = copy.deepcopy(lm.model)
            arch = adapter_for(model)
            plan = Plan(layers={i: LayerPlan(kv_heads=list(range(groups)), mlp=list(range(w)))
                                for i in range(arch.num_layers)})
            apply_plan(model, plan, arch)
            if not gguf.exists():
                folder = work / f"g{groups}_mlp{w}"
                export_model(model, lm.tokenizer, folder, overwrite=True)
                write_gguf(folder, gguf, "f16", overwrite=True)
            fp = footprint(model, seq_len=128)
            out.append({"kv_groups": groups, "intermediate": w, "pow2_divisor": pow2_divisor(w), "gguf": str(gguf),
                        "params": fp.params, "flops_per_token_T128": fp.flops_per_token})
            del model
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="runs/mlp_widths_llamacpp")
    a = ap.parse_args()
    binary = Path(os.environ.get("LLAMA_CPP_BIN", "")) / "llama-bench"
    if not binary.is_file():
        raise SystemExit("set LLAMA_CPP_BIN to llama.cpp's build/bin (with llama-bench); see deploy_llamacpp.py")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    models = build(work)
    runs = {m["gguf"]: {"pp128": [], "tg32": []} for m in models}
    meta: dict = {}
    for rep in range(a.reps):
        order = models[rep % len(models):] + models[:rep % len(models)]
        for m in order:
            got = bench_once(binary, m["gguf"], a.threads)
            for key in ("pp128", "tg32"):
                runs[m["gguf"]][key].append(got[key])
            meta = {k: got[k] for k in ("build", "cpu", "backend")}
        print(f"round {rep + 1}/{a.reps} done", flush=True)
    rows = []
    for m in models:
        row = {k: v for k, v in m.items() if k != "gguf"}
        row["method"] = f"{m['kv_groups']} KV group(s) × {m['intermediate']}"
        for key in ("pp128", "tg32"):
            med, q1, q3 = quartiles(runs[m["gguf"]][key])
            row[f"{key}_tok_s"] = round(med, 2)
            row[f"{key}_iqr"] = [round(q1, 2), round(q3, 2)]
            row[f"{key}_runs"] = [round(x, 2) for x in runs[m["gguf"]][key]]
            row[f"{key}_gflop_s"] = round(med * m["flops_per_token_T128"] / 1e9, 2)
        rows.append(row)
    pre = (f"llama.cpp `llama-bench` build {meta.get('build')} (vendored in llama-cpp-python 0.3.36; cmake Release, "
           f"GGML_NATIVE=ON), CPU {meta.get('cpu')}, {a.threads} thread(s), F16. SmolLM2-135M shapes (30 layers, "
           "hidden 576, the first KV groups and MLP channels kept); protocol: the docstring of "
           f"`benchmarks/mlp_widths_llamacpp.py`; median of {a.reps} interleaved rounds (IQR and every run in the "
           "jsonl). `*_gflop_s` = tok/s × FLOPs per token at T = 128: higher = the kernels use the width better.")
    common.write_results("mlp_widths_llamacpp", rows, preamble=pre,
                         columns=["method", "pow2_divisor", "params", "pp128_tok_s", "pp128_iqr", "pp128_gflop_s",
                                  "tg32_tok_s", "tg32_iqr", "tg32_gflop_s"])


if __name__ == "__main__":
    main()
