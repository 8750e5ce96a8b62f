"""LoRAP on SmolLM2-135M: AWSVD vs SVD, least-save 0 vs 0.01, against the magnitude floor.

Usage: ``python benchmarks/lorap_smollm2.py [--full] [--only LABEL ...]``. Rows already in
``results/lorap_smollm2.jsonl`` are kept and not re-run (delete the file to start over), so an
interrupted run resumes. Protocol: ``benchmarks/common.py`` (WikiText-2 test PPL at 2048 and 128
context on the first 32,768 tokens; calibration on WikiText-2 validation, 128 × 128 tokens, seed 0).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, dense_row, lorap_sizing, prune_row, write_results  # noqa: E402

NAME = "lorap_smollm2"
TARGETS = ("80%", "60%")
# label -> (method, settings)
CELLS: dict[str, tuple[str, dict]] = {
    "magnitude": ("magnitude", {}),
    "lorap awsvd ls=0.01": ("lorap", {"decomposition": "awsvd", "mlp_least_save_ratio": 0.01}),
    "lorap awsvd ls=0": ("lorap", {"decomposition": "awsvd", "mlp_least_save_ratio": 0.0}),
    "lorap svd ls=0.01": ("lorap", {"decomposition": "svd", "mlp_least_save_ratio": 0.01}),
}

PREAMBLE = """# LoRAP on SmolLM2-135M-Instruct

SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32; 30 layers, hidden 576, 9 query / 3 KV heads of 64,
MLP 1536, tied embeddings = 21% of the parameters). Targets are fractions of the **whole** model;
LoRAP's s (fraction of each block's parameters removed, recorded in `sizing.sparsity`) is solved
so the model lands at or below the target. `ls` = `mlp_least_save_ratio` (the bottom fraction of
MLP channels kept). `magnitude` = the weight-L2 floor at the same targets (whole KV groups + MLP
channels, uniform widths). Calibration: WikiText-2 validation, 128 × 128 tokens, seed 0 (the
official LoRAP setting is 128 × 128 BookCorpus). PPL: WikiText-2 test, first 32,768 tokens, at 2048
and 128 context (`benchmarks/common.py`). No recovery training. CPU, 1 thread, 2 shared cores;
prune_s is wall time of the pruning step (machine shared with other jobs, so it varies by ~2x),
peak RSS of the process during it. `ranks` = q/k/v/o ranks, `d` = stays dense.

Findings of this run: LoRAP stays usable where the magnitude floor (which must remove whole KV
groups) collapses. AWSVD clearly beats plain SVD (PPL@2048 39.4 vs 58.6 at 80%, 165 vs 1787 at 60%).
Keeping the bottom 1% of MLP channels (15 of 1536) changes nothing measurable at 80% and is slightly
worse at 60% (165 vs 157): without recovery training, the paper's least-save finding does not
reproduce on this model. With GQA, V (576 → 192) is cheap and stays dense at both targets, and O
stays dense at 80% (s ≈ 0.25 < 1/3, as V/O do for LLaMA-7B at s = 0.2); Q/K carry the attention cut.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--full", action="store_true", help="evaluate every PPL window, not the first 32,768 tokens")
    ap.add_argument("--only", nargs="*", help="labels to run (default: all, plus dense)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    partial = RESULTS / f"{NAME}.jsonl"
    rows: list[dict] = []
    if partial.exists():
        rows = [json.loads(line) for line in partial.read_text().splitlines() if line.strip()]
    done = {(r["method"], r["target"]) for r in rows}

    def save() -> None:
        order = {"dense": -1, **{k: i for i, k in enumerate(CELLS)}}
        rows.sort(key=lambda r: (r["target"] != "100%", -float(r["target"].rstrip("%")), order.get(r["method"], 99)))
        write_results(NAME, rows, columns=["method", "target", "params", "ratios.params", "ratios.flops", "ratios.kv",
                                           "sparsity", "ranks", "mlp_channels", "ppl2048", "ppl128", "prune_s",
                                           "peak_rss_mib"], preamble=PREAMBLE)

    if ("dense", "100%") not in done and (not args.only or "dense" in args.only):
        rows.append(dense_row(full=args.full))
        save()
    for target in TARGETS:
        for label, (method, settings) in CELLS.items():
            if (label, target) in done or (args.only and label not in args.only):
                continue
            row = prune_row(method, target, settings=settings, label=label, full=args.full)
            lorap_sizing(row)
            if "mlp_channels" not in row:
                widths = (row.get("notes") or {}).get("widths") or {}
                row["mlp_channels"] = widths.get("mlp")
            rows.append(row)
            save()
            print(json.dumps({k: row.get(k) for k in ("method", "target", "params", "ppl2048", "ppl128", "prune_s")}),
                  flush=True)
    save()


if __name__ == "__main__":
    main()
