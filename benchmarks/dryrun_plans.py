"""Plans of every method on config-only LLaMA-2-7B / LLaMA-2-70B / Llama-3-8B, without weights.

Runs ``compress run --dry-run`` (``compress.pipeline.run.dry_run``: meta device, shapes only) for every
registered method at the targets below and writes ``results/dryrun_plans.md`` (+ ``.jsonl``):
achieved parameters, FLOPs/token (T = 2048), KV-cache bytes/token and the estimated peak memory
(``compress.model.memory``) of the real run at the chosen dtype, with each method's default settings.

    python benchmarks/dryrun_plans.py [--dtype bfloat16] [--methods transact,slicegpt]

Takes well under a minute on a laptop CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
RESULTS = HERE / "results"
#: (config, target): the issue's targets — 2B/4B of LLaMA-2-7B, half of the two others
CASES = [("llama-2-7b", "2B"), ("llama-2-7b", "4B"), ("llama-2-70b", "50%"), ("llama-3-8b", "50%")]


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f}"


def _flops(x: float) -> str:
    return f"{x / 1e9:.2f}G"


def plan_all(methods: list[str], dtype: str) -> list[dict]:
    from compress.pipeline.run import RunSpec, dry_run

    rows = []
    for config, target in CASES:
        for method in methods:
            rec = dry_run(RunSpec(method=method, target=target, model=str(CONFIGS / f"{config}.json"), dtype=dtype),
                          log=lambda _: None)
            rows.append({"config": config, "method": method, "target": target, "dtype": dtype,
                         "dense": {k: rec["dense"][k] for k in ("params", "flops_per_token", "kv_bytes_per_token")},
                         "achieved": {k: rec["achieved"][k] for k in ("params", "flops_per_token", "kv_bytes_per_token")},
                         "ratios": rec["ratios"], "memory": rec["memory"], "export": rec["export"]["kind"],
                         "plan": rec["plan"]})
            print(f"{config} {method} {target}: {rec['achieved']['params']:,} params, peak "
                  f"{_gib(rec['memory']['peak_bytes'])} GiB", file=sys.stderr)
    return rows


def markdown(rows: list[dict], dtype: str) -> str:
    lines = [
        "# Dry-run plans on config-only LLaMA-2-7B, LLaMA-2-70B and Llama-3-8B",
        "",
        f"Written by `benchmarks/dryrun_plans.py` (`compress run --dry-run` for every method, default settings, "
        f"dtype {dtype}): shapes are planned on the meta device from `benchmarks/configs/*.json`, no weights "
        "exist. FLOPs/token at T = 2048 (forward, 2 per multiply-add); KV bytes/token at the dtype. *Estimated "
        "peak* is the dense weights plus the method's working memory (formulas in `compress/memory.py`): "
        "calibration is layer by layer (`--layerwise`, automatic above 4 GiB of weights, and always for the "
        "sequential SliceGPT and LoRAP), so the working memory is one layer, its cached inputs and the method's "
        "own tensors — for LLM-Pruner the fp32 gradients of every scored weight dominate. It is an estimate of "
        "host + device memory, not a measurement.",
        "",
        "| model | method | target | params (ratio) | FLOPs/token (ratio) | KV bytes/token (ratio) | est. peak GiB "
        "| weights GiB | largest working terms (GiB) | export |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, q, m = r["achieved"], r["ratios"], r["memory"]
        top = sorted(m["working_bytes"].items(), key=lambda kv: -kv[1])[:3]
        work = ", ".join(f"{k} {_gib(v)}" for k, v in top) or "—"
        lines.append(
            f"| {r['config']} | {r['method']} | {r['target']} | {a['params'] / 1e9:.3f}B ({q['params']:.1%}) | "
            f"{_flops(a['flops_per_token'])} ({q['flops']:.1%}) | {a['kv_bytes_per_token']:,} ({q['kv']:.1%}) | "
            f"{_gib(m['peak_bytes'])} | {_gib(m['weights_bytes'])} | {work} | {r['export']} |")
    dense = {r["config"]: r["dense"] for r in rows}
    lines += ["", "Dense models:", "", "| model | params | FLOPs/token | KV bytes/token |", "|---|---|---|---|"]
    for c, d in dense.items():
        lines.append(f"| {c} | {d['params']:,} | {_flops(d['flops_per_token'])} | {d['kv_bytes_per_token']:,} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16", help="dtype of the planned run (default bfloat16)")
    p.add_argument("--methods", help="comma list (default: every registered method)")
    p.add_argument("--out", default=str(RESULTS / "dryrun_plans.md"))
    args = p.parse_args()
    from compress.plugins import get_registry
    from compress.pruner import Pruner

    # every installed method that plans shapes (a third-party plugin may have no --dry-run)
    methods = args.methods.split(",") if args.methods else sorted(
        n for n, cls in get_registry().pruners.items() if cls.plan_shapes is not Pruner.plan_shapes)
    rows = plan_all(methods, args.dtype)
    out = Path(args.out)
    out.write_text(markdown(rows, args.dtype), encoding="utf-8")
    with open(out.with_suffix(".jsonl"), "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
