"""Attention rounding of the sizing solver (``attn_round``: down vs up) on SmolLM2-135M, CPU.

    python benchmarks/attn_rounding_smollm2.py [--targets 60% 50% 80%] [--methods transact magnitude] [--merge]

SmolLM2-135M has 3 KV groups, so the balanced keep ratio falls between whole groups: at 60 % of the
parameters ``down`` keeps 1 group + 839 MLP channels, ``up`` 2 groups + 668. Each cell is one
``compress run`` without export (``compress.pipeline.run.run``, as ``compress run --no-save``), fp32:

    compress run --method transact --target 60% --set attn_round=up --set calib_samples=32 \\
        --set calib_seq_len=512 --calib wikitext2 --dtype float32 --no-eval --no-save --json

then WikiText-2 test perplexity on the first 16,384 tokens at 2048 and 128 context
(``benchmarks/common.py``, ``COMPRESS_BENCH_QUICK`` windows: 8 × 2048 and 128 × 128), one torch thread
(the repro matrix's setting, so the ``down`` cells equal the committed records). TransAct calibrates on
32 × 512 tokens of WikiText-2 validation, as the repro matrix does. ``nearest`` needs no run of its
own: its widths equal ``up``'s or ``down``'s at these targets (listed in the table).

Results: ``benchmarks/results/attn_rounding_smollm2.{jsonl,md}``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("COMPRESS_BENCH_QUICK", "1")  # the first 16,384 test tokens
os.environ.setdefault("COMPRESS_BENCH_THREADS", "1")  # one torch thread, as the repro cells
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

CALIB = {"calib_samples": 32, "calib_seq_len": 512, "gqa": "groups"}  # measured before gqa=auto became the default
NAME = "attn_rounding_smollm2"


def nearest_is(target: str) -> str:
    """Which measured policy ``nearest`` coincides with at ``target`` (from the solver alone)."""
    import torch
    from transformers import AutoModelForCausalLM

    from compress.io.loading import load_config
    from compress.model.adapter import ArchAdapter
    from compress.model.sizing import solve_uniform
    from compress.target import Target

    cfg = load_config(common.smollm2_path())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    arch = ArchAdapter(model)
    w = {r: solve_uniform(arch, Target.parse(target), attn_round=r) for r in ("down", "nearest", "up")}
    same = [r for r in ("down", "up") if (w[r].attn_units, w[r].mlp) == (w["nearest"].attn_units, w["nearest"].mlp)]
    return same[0] if same else f"{w['nearest'].attn_units} groups + {w['nearest'].mlp} (not measured)"


def cell(method: str, target: str, rounding: str) -> dict:
    """One cell: ``compress run`` without export, float32 weights (``--dtype float32``: the GGUF
    de-quantized to fp32, as every committed SmolLM2 result), then the perplexity of ``common``."""
    import time

    from transformers import AutoTokenizer

    from compress.pipeline.run import RunSpec, run

    settings = {"attn_round": rounding, **(CALIB if method == "transact" else {})}
    spec = RunSpec(method=method, target=target, model=common.smollm2_path(), calib="wikitext2", settings=settings,
                   dtype="float32", evaluate=False, progress=False)
    t = time.perf_counter()
    result = run(spec, log=lambda m: None)
    rec = result.record
    row = {"method": method, "target": target, "settings": settings, "params": rec["achieved"]["params"],
           "flops_per_token": rec["achieved"]["flops_per_token"],
           "kv_bytes_per_token": rec["achieved"]["kv_bytes_per_token"], "ratios": rec["ratios"],
           "prune_s": rec["timing_s"]["prune"], "plan_hash": rec["plan_hash"],
           "calibration_hash": rec["calibration_hash"], "notes": rec.get("notes"),
           **common.wikitext_ppl(result.model, AutoTokenizer.from_pretrained(common.smollm2_path()))}
    row["wall_s"] = round(time.perf_counter() - t, 1)
    widths = (row.get("notes") or {}).get("widths") or {}
    row.update({"attn_round": rounding, "kv_groups": widths.get("attn_units"), "mlp": widths.get("mlp"),
                "width_note": widths.get("note", "")})
    row.pop("notes", None)  # the per-shot history etc.; the widths are in the row
    print({k: row[k] for k in ("method", "target", "attn_round", "params", "kv_groups", "mlp", "ppl2048",
                               "ppl128", "wall_s")}, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", nargs="+", default=["60%", "50%", "80%"])
    ap.add_argument("--methods", nargs="+", default=["transact", "magnitude"])
    ap.add_argument("--merge", action="store_true",
                    help="keep the committed rows of cells this run does not measure (e.g. --methods magnitude)")
    a = ap.parse_args()
    rows = []
    kept = _committed() if a.merge else []
    for method in a.methods:
        for target in a.targets:
            for rounding in ("down", "up"):
                rows.append(cell(method, target, rounding))
                rows[-1]["nearest_equals"] = nearest_is(target)
                write(_merged(kept, rows))  # after every cell: a partial table survives an interruption


def _key(r: dict) -> tuple:
    return r["method"], r["target"], r["attn_round"]


def _committed() -> list[dict]:
    import json

    path = common.RESULTS / f"{NAME}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _merged(kept: list[dict], rows: list[dict]) -> list[dict]:
    new = {_key(r) for r in rows}
    return [r for r in kept if _key(r) not in new] + rows


def write(rows: list[dict]) -> None:
    n2048, n128 = common.PPL_WINDOWS[2048], common.PPL_WINDOWS[128]
    pre = (
        "# Attention rounding on SmolLM2-135M (`attn_round`: down vs up)\n\n"
        "SmolLM2-135M-Instruct (Q4_1 de-quantized to fp32, `--dtype float32`), CPU, one torch thread, no recovery training. Each row is one "
        "`compress run` (no export), e.g.\n\n"
        "    compress run --method transact --target 60% --set attn_round=up --set calib_samples=32 \\\n"
        "        --set calib_seq_len=512 --calib wikitext2 --dtype float32 --no-eval --no-save --json\n\n"
        f"then WikiText-2 test perplexity on the first {n2048 * 2048:,} tokens ({n2048} × 2048 and {n128} × 128 "
        "windows, no BOS, rows joined by blank lines). TransAct: 32 × 512 calibration tokens of WikiText-2 "
        "validation, gqa=groups, one shot. `magnitude` needs no calibration. `kv_groups` / `mlp`: the kept "
        "widths of every layer (3 KV groups and 1536 MLP channels dense). `nearest_equals`: the measured "
        "policy whose widths `attn_round=nearest` gives at that target.\n\n"
        "Produced by `python benchmarks/attn_rounding_smollm2.py` (the command of every cell above, with "
        "`--set attn_round=down|up`; `--method magnitude` without the calibration settings)."
    )
    md = common.write_results(NAME, rows, preamble=pre,
                              columns=["method", "target", "attn_round", "params", "kv_groups", "mlp",
                                       "ratios.flops", "ratios.kv", "ppl2048", "ppl128", "nearest_equals",
                                       "prune_s", "wall_s"])
    md.write_text(md.read_text() + reading(rows))


def reading(rows: list[dict]) -> str:
    """up against down per method and target, from the rows."""
    by = {_key(r): r for r in rows}
    lines = ["", "## up against down", "",
             "| method | target | PPL @2048 down → up | PPL @128 down → up | FLOPs/token down → up | KV down → up |",
             "|---|---|---|---|---|---|"]
    for (method, target, rounding), up in by.items():
        down = by.get((method, target, "down"))
        if rounding != "up" or down is None:
            continue
        lines.append(f"| {method} | {target} | {down['ppl2048']:.4g} → {up['ppl2048']:.4g} "
                     f"({up['ppl2048'] / down['ppl2048']:.2f}×) | {down['ppl128']:.4g} → {up['ppl128']:.4g} "
                     f"({up['ppl128'] / down['ppl128']:.2f}×) | {down['ratios']['flops']:.1%} → "
                     f"{up['ratios']['flops']:.1%} | {down['ratios']['kv']:.1%} → {up['ratios']['kv']:.1%} |")
    lines += ["", "At the same parameter count `up` keeps one more KV group and fewer MLP channels, so it spends "
              "more FLOPs per token and a larger KV cache than `down` (80 %: all 3 groups kept, the attention not "
              "pruned at all). These rows compare equal parameters only; equal-FLOPs or equal-KV targets "
              "(`flops:` / `kv:`, where the solver charges the attention its real cost and a `kv:` target "
              "falls back to the largest width that fits, saying so) were not measured here. `magnitude`'s "
              "perplexities (10^5–10^6) are noise at either rounding; the floors follow TransAct's default so "
              "that their rows stay at TransAct's widths.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
