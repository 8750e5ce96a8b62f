"""Does the smollm2 suite's quick perplexity (first 16,384 test tokens) agree with the full test set?

The issue protocol is WikiText-2 PPL on the whole test set; on 2 CPU cores that costs ~20 min per cell,
so the committed suite run (``benchmarks/results/smollm2/``) evaluates the first 16,384 tokens of each
context. This script runs two of its cells again — the dense row and TransAct at 80 % without
training — with the suite's own settings but every test window, through the same bench runner
(``compress.bench.run_suite``; perplexity only, 2 torch threads), and puts both protocols side by side.
The pruned model is the same one when the plan hash equals the suite record's.

Usage: ``python benchmarks/full_ppl_smollm2.py`` (``--resume`` to continue). Writes
``results/smollm2_full_ppl/`` (records) and ``results/smollm2_full_ppl.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS  # noqa: E402

SUITE = Path(__file__).resolve().parent / "suites" / "smollm2.yaml"
QUICK = RESULTS / "smollm2" / "records.jsonl"
OUT = RESULTS / "smollm2_full_ppl"
CELLS = {"methods": ["dense", "transact"], "targets": ["80%"], "recovery": [0]}


def _key(r: dict) -> tuple:
    m = r["method"]["name"] if isinstance(r["method"], dict) else r["method"]
    return m, r["target"], (r.get("recovery") or {}).get("tokens", 0)


def _md(full: list[dict], quick: dict[tuple, dict]) -> str:
    lines = [
        "# WikiText-2 perplexity: the suite's first 16,384 tokens vs the full test set (SmolLM2-135M)",
        "",
        "Cells of `benchmarks/suites/smollm2.yaml` (same model, recipe, calibration and seed), evaluated on "
        "every non-overlapping window of the WikiText-2 test set (`python benchmarks/full_ppl_smollm2.py`) "
        "next to the committed quick run (`--max-tokens 16384`: 8 windows of 2048, 128 windows of 128).",
        "",
        "| cell | tokens scored @2048 | PPL @2048 first 16k | PPL @2048 full | tokens scored @128 | PPL @128 first 16k "
        "| PPL @128 full | same plan |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in full:
        q = quick.get(_key(r))
        f2, f1 = r["ppl"]["wikitext2"]["2048"], r["ppl"]["wikitext2"]["128"]
        q2 = q["ppl"]["wikitext2"]["2048"]["ppl"] if q else float("nan")
        q1 = q["ppl"]["wikitext2"]["128"]["ppl"] if q else float("nan")
        same = "—" if r["plan_hash"] is None else ("yes" if q and q["plan_hash"] == r["plan_hash"] else "no")
        name, target, _ = _key(r)
        lines.append(f"| {name} {target if name != 'dense' else ''} | {f2['predicted']:,} | {q2:.2f} | "
                     f"{f2['ppl']:.2f} | {f1['predicted']:,} | {q1:.2f} | {f1['ppl']:.2f} | {same} |")
    dense = next((r for r in full if _key(r)[0] == "dense"), None)
    qd = quick.get(_key(dense)) if dense else None
    if dense and qd:
        for r in full:
            q = quick.get(_key(r))
            if r is dense or not q:
                continue
            ratios = []
            for n in ("2048", "128"):
                fq = q["ppl"]["wikitext2"][n]["ppl"] / qd["ppl"]["wikitext2"][n]["ppl"]
                ff = r["ppl"]["wikitext2"][n]["ppl"] / dense["ppl"]["wikitext2"][n]["ppl"]
                ratios.append(f"@{n} {fq:.2f}× on the first 16k tokens, {ff:.2f}× on the full set")
            lines += ["", f"{_key(r)[0]} {r['target']} over dense: " + "; ".join(ratios) + "."]
        lines += ["", "The first 16,384 tokens are easier text than the whole test set (every perplexity is lower "
                  "there), while the pruned model's perplexity relative to dense moves by a few percent only. Two "
                  "cells are a spot check of the quick protocol, not a guarantee for the others."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--resume", action="store_true", help="skip cells already in the records")
    args = ap.parse_args()
    from compress.bench import load_suite, read_records, run_suite
    from compress.bench.runner import RECORDS, latest_by_cell

    suite = load_suite(SUITE)
    suite = suite.model_copy(update={"threads": 2,
                                     "eval": suite.eval.model_copy(update={"tasks": [], "latency": None})})
    run_suite(suite, OUT, resume=args.resume, **CELLS, log=lambda m: print(m, flush=True))
    full = [r for r in latest_by_cell(read_records(OUT / RECORDS)).values() if r["status"] == "ok"]
    quick = {_key(r): r for r in latest_by_cell(read_records(QUICK)).values()
             if r["status"] == "ok" and r["eval"].get("max_tokens") == 16384}
    full.sort(key=lambda r: _key(r)[0] != "dense")
    (RESULTS / "smollm2_full_ppl.md").write_text(_md(full, quick))
    print(json.dumps({_key(r)[0]: r["ppl"] for r in full}, indent=1)[:2000])
    print(f"wrote {RESULTS / 'smollm2_full_ppl.md'}")


if __name__ == "__main__":
    main()
