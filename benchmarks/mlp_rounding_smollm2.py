"""The quality cost of kernel-friendly MLP widths: TransAct on SmolLM2-135M with ``mlp_round_to`` 1 vs 64.

    COMPRESS_BENCH_QUICK=1 python benchmarks/mlp_rounding_smollm2.py

The speed side is ``benchmarks/deploy_llamacpp.py`` (llama.cpp prompt processing loses most of its
gain at widths like 579 and gains it back at 576). Same protocol as ``transact_smollm2.py``:
calibration 32 × 512 tokens of WikiText-2 validation, perplexity per ``benchmarks/common.py``.
Results: ``benchmarks/results/mlp_rounding_smollm2.{jsonl,md}``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

CALIB = {"calib_samples": 32, "calib_seq_len": 512}


def main() -> None:
    rows = []
    for target in ("80%", "50%"):
        for round_to in (1, 64):
            row = common.prune_row("transact", target, settings={**CALIB, "mlp_round_to": round_to},
                                   label=f"transact mlp_round_to={round_to}")
            row["intermediate"] = (row.get("notes") or {}).get("plan", {}).get("f")
            print(row["method"], target, row["params"], row["ppl2048"], row["ppl128"], flush=True)
            rows.append(row)
    n2048, n128 = common.PPL_WINDOWS[2048], common.PPL_WINDOWS[128]
    pre = ("SmolLM2-135M-Instruct (Q4_1 → fp32), CPU. TransAct one-shot, calibration 32×512 tokens of WikiText-2 "
           f"valid; PPL on the first {n2048 * 2048:,} WikiText-2 test tokens ({n2048}×2048, {n128}×128 windows). "
           "`mlp_round_to=64` rounds the MLP width to a multiple of 64 (the solver fills the target with whole "
           "blocks of 64); llama.cpp speed of the same shapes: `deploy_llamacpp.md`.")
    common.write_results("mlp_rounding_smollm2", rows, preamble=pre,
                         columns=["method", "target", "params", "ratios.params", "ratios.flops", "ppl2048", "ppl128",
                                  "prune_s"])


if __name__ == "__main__":
    main()
