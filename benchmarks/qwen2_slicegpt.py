"""SliceGPT on Qwen2.5-Coder-0.5B (issue #23): does its calibration length explain the two figures?

The issue measured SliceGPT at 70 % of the parameters with 8 × 256 calibration tokens (PPL 120); the
qwen2 suite runs it at 80 % with 8 × 2048 (the SmolLM2 suites' setting; PPL 243 in
``results/qwen2/records.jsonl``). This script runs the suite's cell again with 8 × 256 tokens, the only
difference, so the two rows at 80 % differ by the calibration length alone.

Usage: ``python benchmarks/qwen2_slicegpt.py``. Rows already in ``results/qwen2_slicegpt.jsonl`` are
kept (delete the file to start over). Protocol: the suite's — WikiText-2 test, the first 8 windows of
512 tokens, fp32, 1 thread, seed 0, the committed recipe ``slicegpt.yaml`` (``slice_head: false``,
random final orientation), calibration WikiText-2 validation.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

NAME = "qwen2_slicegpt"
WINDOWS = {512: 8}
RECIPE = {"round_to": 8, "slice_head": False, "final_orientation": "random", "center_embeddings": False}
CELLS = (("slicegpt 8x256", "80%", {**RECIPE, "calib_samples": 8, "calib_seq_len": 256}),)


def _suite_row() -> dict | None:
    """The qwen2 suite's SliceGPT 80 % record (8 × 2048 tokens) as a row of this table."""
    path = common.RESULTS / "qwen2" / "records.jsonl"
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r.get("method") == "slicegpt" and r.get("target") == "80%" and r.get("status") == "ok":
            return {"method": "slicegpt 8x2048 (qwen2 suite)", "target": "80%", "ratios": r["ratios"],
                    "ppl512": round(r["ppl"]["wikitext2"]["512"]["ppl"], 4), "cell_id": r["cell_id"]}
    return None


def main() -> None:
    torch.set_num_threads(1)
    path = common.qwen2_path()
    rows = [r for r in common.read_rows(NAME) if not r["method"].endswith("(qwen2 suite)")]
    have = {r["method"] for r in rows}
    for label, target, settings in CELLS:
        if label in have:
            continue
        row = common.prune_row("slicegpt", target, settings=settings, label=label, model=path, windows=WINDOWS,
                               calib="wikitext2")
        rows.append(row)
        print(json.dumps({k: row.get(k) for k in ("method", "target", "ppl512")}), flush=True)
    suite = _suite_row()
    out = ([suite] if suite else []) + rows
    common.write_results(NAME, out, columns=["method", "target", "ratios.params", "ratios.flops", "ppl512", "prune_s"],
                         preamble=common.doc_without_usage(__doc__))


if __name__ == "__main__":
    main()
