"""Deployment speed in a real engine: llama.cpp's ``llama-bench`` on dense vs pruned SmolLM2-135M GGUFs.

    LLAMA_CPP_BIN=/path/to/llama.cpp/build/bin python benchmarks/deploy_llamacpp.py [--reps 5] [--threads 1]

llama.cpp is not part of CI: build it from the ``llama-cpp-python`` source distribution on the package
registry (``pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36``; its
``vendor/llama.cpp`` with ``cmake -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build --target
llama-bench``). Protocol:

* every model is pruned by ``compress.pipeline.run.run`` (the code path of ``compress run``) and
  written as a stock folder, then as an F16 GGUF by ``compress.io.gguf_export.write_gguf`` — the
  dense model goes through the same writer, so only the shapes differ;
* ``llama-bench -p 128 -n 32 -r 1`` per model, interleaved round-robin over ``--reps`` rounds (the
  order rotates each round), on ``--threads`` threads; prompt processing (pp128) and generation (tg32)
  tokens/s; median and inter-quartile range over the rounds;
* each pruned model's speed-up over dense, and that speed-up ÷ (dense FLOPs / pruned FLOPs), the FLOPs
  per token at T = 128 from ``compress.model.footprint`` (1.0 = the engine turns every removed FLOP
  into time).

Results: ``benchmarks/results/deploy_llamacpp.{jsonl,md}`` with the llama.cpp version and build flags.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

TRANSACT = {"calib_samples": 32, "calib_seq_len": 512, "gqa": "groups"}  # measured before gqa=auto became the default
#: (label, method, target, settings)
#: TransAct with its default MLP widths (mlp_round_to=auto: multiples of sizing.MLP_KERNEL_MULTIPLE) and
#: with exact widths (mlp_round_to=1, the default before the width sweep of mlp_widths_llamacpp.py)
ARMS = [
    ("dense", None, "100%", {}),
    ("transact 80%", "transact", "80%", TRANSACT),
    ("transact 60%", "transact", "60%", TRANSACT),
    ("transact 50%", "transact", "50%", TRANSACT),
    ("transact 80%, exact widths", "transact", "80%", {**TRANSACT, "mlp_round_to": 1}),
    ("transact 60%, exact widths", "transact", "60%", {**TRANSACT, "mlp_round_to": 1}),
    ("transact 50%, exact widths", "transact", "50%", {**TRANSACT, "mlp_round_to": 1}),
    ("depth 80%", "depth", "80%", {}),
    ("depth 50%", "depth", "50%", {}),
]


def build_models(work: Path) -> list[dict]:
    from compress.io.export import export_model
    from compress.io.gguf_export import write_gguf
    from compress.io.loading import load_model
    from compress.model.footprint import footprint
    from compress.pipeline.run import RunSpec, run

    out = []
    for label, method, target, settings in ARMS:
        # the folder is keyed by what it was built from (and the code's defaults at that time are part of it:
        # delete --work after changing a default)
        key = hashlib.sha256(json.dumps([method, target, settings], sort_keys=True).encode()).hexdigest()[:8]
        folder = work / f"{label.split(',')[0].replace(' ', '_').replace('%', '')}-{key}"
        gguf = folder.with_suffix(".f16.gguf")
        if not gguf.exists():
            if method is None:
                lm = load_model(common.smollm2_path(), dtype="float32")
                export_model(lm.model, lm.tokenizer, folder, overwrite=True)
            else:
                run(RunSpec(method=method, target=target, model=common.smollm2_path(), settings=dict(settings),
                            dtype="float32", out=str(folder), overwrite=True, progress=False, evaluate=False),
                    log=lambda m: None)
            write_gguf(folder, gguf, "f16", overwrite=True)
        model = load_model(str(folder)).model
        fp = footprint(model, seq_len=128)
        cfg = model.config
        out.append({"label": label, "gguf": str(gguf), "params": fp.params, "flops_per_token_T128": fp.flops_per_token,
                    "layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads,
                    "kv_heads": cfg.num_key_value_heads, "intermediate": cfg.intermediate_size})
        del model
    return out


def bench_once(binary: Path, gguf: str, threads: int) -> dict[str, float]:
    r = subprocess.run([str(binary), "-m", gguf, "-p", "128", "-n", "32", "-r", "1", "-t", str(threads), "-o", "json"],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise SystemExit(f"llama-bench failed on {gguf}: {r.stderr[-500:]}")
    rows = json.loads(r.stdout)
    got = {}
    for row in rows:
        key = "pp128" if row.get("n_prompt") else "tg32"
        got[key] = float(row["avg_ts"])
        got["build"] = f"{row.get('build_commit')} ({row.get('build_number')})"
        got["cpu"] = row.get("cpu_info")
        got["backend"] = row.get("backends")
    return got


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[1], q[0], q[2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="runs/deploy_llamacpp")
    a = ap.parse_args()
    bin_dir = Path(os.environ.get("LLAMA_CPP_BIN", ""))
    binary = bin_dir / "llama-bench"
    if not binary.is_file():
        raise SystemExit("set LLAMA_CPP_BIN to llama.cpp's build/bin (with llama-bench); see the docstring")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    models = build_models(work)
    runs: dict[str, dict[str, list[float]]] = {m["label"]: {"pp128": [], "tg32": []} for m in models}
    meta: dict = {}
    for rep in range(a.reps):
        order = models[rep % len(models):] + models[:rep % len(models)]
        for m in order:
            got = bench_once(binary, m["gguf"], a.threads)
            runs[m["label"]]["pp128"].append(got["pp128"])
            runs[m["label"]]["tg32"].append(got["tg32"])
            meta = {k: got[k] for k in ("build", "cpu", "backend")}
        print(f"round {rep + 1}/{a.reps} done", flush=True)
    dense = models[0]
    rows = []
    for m in models:
        row = dict(m)
        row.pop("gguf")
        for key in ("pp128", "tg32"):
            med, q1, q3 = quartiles(runs[m["label"]][key])
            row[f"{key}_tok_s"] = round(med, 2)
            row[f"{key}_iqr"] = [round(q1, 2), round(q3, 2)]
            row[f"{key}_runs"] = [round(x, 2) for x in runs[m["label"]][key]]
            d_med = statistics.median(runs[dense["label"]][key])
            speedup = med / d_med
            flops_ratio = dense["flops_per_token_T128"] / m["flops_per_token_T128"]
            row[f"{key}_speedup"] = round(speedup, 3)
            row[f"{key}_speedup_over_flops_ratio"] = round(speedup / flops_ratio, 3)
        row["flops_ratio"] = round(dense["flops_per_token_T128"] / m["flops_per_token_T128"], 3)
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("label", "pp128_tok_s", "tg32_tok_s", "pp128_speedup_over_flops_ratio",
                                              "tg32_speedup_over_flops_ratio")}), flush=True)
    pre = (f"llama.cpp `llama-bench` build {meta.get('build')} (vendored in llama-cpp-python 0.3.36; cmake Release, "
           f"GGML_NATIVE=ON, CPU backend {meta.get('backend')}), CPU {meta.get('cpu')}, {a.threads} thread(s). "
           f"SmolLM2-135M-Instruct (Q4_1 source → fp32 → F16 GGUF by compress's writer, dense included); pp128 / "
           f"tg32 tokens/s, median of {a.reps} interleaved rounds (IQR in the jsonl); `*_vs_flops` = speed-up ÷ "
           "(dense FLOPs / pruned FLOPs) at T = 128.")
    for r in rows:
        r["method"] = r["label"]
    common.write_results("deploy_llamacpp", rows, preamble=pre,
                         columns=["method", "params", "layers", "heads", "kv_heads", "intermediate", "flops_ratio",
                                  "pp128_tok_s", "pp128_speedup", "pp128_speedup_over_flops_ratio", "tg32_tok_s",
                                  "tg32_speedup", "tg32_speedup_over_flops_ratio"])


if __name__ == "__main__":
    main()
