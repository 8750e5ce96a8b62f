"""The quality cost of kernel-friendly MLP widths: TransAct on SmolLM2-135M with ``mlp_round_to`` 1, 32, 64.

    COMPRESS_BENCH_QUICK=1 python benchmarks/mlp_rounding_smollm2.py      # resumable: finished rows are kept

The speed side is ``benchmarks/mlp_widths_llamacpp.py`` (llama.cpp's F16 prompt kernels want MLP widths
that are multiples of 16; ``auto`` rounds to 32) and ``benchmarks/deploy_llamacpp.py``. Same protocol as
``transact_smollm2.py``: calibration 32 × 512 tokens of WikiText-2 validation, perplexity per
``benchmarks/common.py``. Results: ``benchmarks/results/mlp_rounding_smollm2.{jsonl,md}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

CALIB = {"calib_samples": 32, "calib_seq_len": 512, "gqa": "groups"}  # measured before gqa=auto became the default


def main() -> None:
    jl = common.RESULTS / "mlp_rounding_smollm2.jsonl"
    rows = [json.loads(x) for x in jl.read_text().splitlines() if x.strip()] if jl.exists() else []
    have = {(r["target"], r["method"]) for r in rows}
    for target in ("80%", "60%", "50%"):
        for round_to in (1, 32, 64):
            label = f"transact mlp_round_to={round_to}"
            if (target, label) in have:
                continue
            mlp = _solved_mlp(target, round_to)
            twin = next((r for r in rows if r["target"] == target and r.get("intermediate") == mlp), None)
            if twin is not None:  # the same widths give the same plan and model (deterministic): not re-run
                row = {**twin, "method": label, "same_model_as": twin["method"], "settings": {**CALIB,
                       "mlp_round_to": round_to}}
                rows.append(row)
                continue
            row = common.prune_row("transact", target, settings={**CALIB, "mlp_round_to": round_to}, label=label)
            row["intermediate"] = ((row.get("notes") or {}).get("widths") or {}).get("mlp")
            print(row["method"], target, row["params"], row["ppl2048"], row["ppl128"], flush=True)
            rows.append(row)
            common.write_results("mlp_rounding_smollm2", _sorted(rows), preamble=_preamble(), columns=COLUMNS)
    common.write_results("mlp_rounding_smollm2", _sorted(rows), preamble=_preamble(), columns=COLUMNS)


def _solved_mlp(target: str, round_to: int) -> int:
    from compress import Target
    from compress.pipeline.preflight import meta_model
    from compress.plugins import get_registry

    shapes = meta_model(common.smollm2_path())
    pruner = get_registry().make("transact", {**CALIB, "mlp_round_to": round_to})
    return pruner.final_widths(shapes.arch, Target.parse(target)).mlp


COLUMNS = ["method", "target", "intermediate", "params", "ratios.params", "ratios.flops", "ppl2048", "ppl128",
           "prune_s", "same_model_as"]


def _sorted(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (-float(r["target"].rstrip("%")), int(r["method"].rsplit("=", 1)[1])))


def _preamble() -> str:
    n2048, n128 = common.PPL_WINDOWS[2048], common.PPL_WINDOWS[128]
    return ("SmolLM2-135M-Instruct (Q4_1 → fp32), CPU. TransAct one-shot, calibration 32×512 tokens of WikiText-2 "
            f"valid; PPL on the first {n2048 * 2048:,} WikiText-2 test tokens ({n2048}×2048, {n128}×128 windows). "
            "`mlp_round_to=k` keeps the MLP width a multiple of k (the solver fills the target with whole blocks "
            "of k, at or below it; `auto` = 32 for this model); llama.cpp speed of these shapes: "
            "`mlp_widths_llamacpp.md`, `deploy_llamacpp.md`.")

if __name__ == "__main__":
    main()
