"""The parity table (issue #19): each baseline at its official settings on SmolLM2-135M, over 3 seeds.

Reads the records of ``benchmarks/suites/parity_smollm2.yaml`` — the first 8,192 WikiText-2 test
tokens (``results/parity_smollm2/``) and, where it has been run, the same cells on the full test set
(``results/parity_smollm2_full/{a,b}``: the suite with ``--max-tokens`` unset, run as two processes split
by method, see the suite's header) — and
writes ``results/parity_smollm2.md``: per entry the parameters and each perplexity as the mean over the
calibration seeds with its min–max, plus the cells the 100 % bound refused and why.

Usage: ``python benchmarks/parity_table.py`` (runs nothing; ``compress bench`` does).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, bench_records, fmt_ppl  # noqa: E402

SUITE = Path(__file__).resolve().parent / "suites" / "parity_smollm2.yaml"
QUICK = RESULTS / "parity_smollm2"
#: the full-test-set copy, one folder per ``compress bench`` process (a: dense, LLM-Pruner, LoRAP; b: SliceGPT)
FULL = [RESULTS / "parity_smollm2_full" / "a", RESULTS / "parity_smollm2_full" / "b"]
OUT = RESULTS / "parity_smollm2.md"

#: What each entry sets beyond its recipe, in the official scripts' terms.
OFFICIAL = {
    "llm_pruner-r0.25": "block-wise, Taylor `param_first` (element1), `--pruning_ratio 0.25`, layers 4..28, 10 × 64",
    "llm_pruner-r0.5": "as above, `--pruning_ratio 0.5`",
    "lorap-s0.2": "s = 0.2, AWSVD, `para_allocate` 3, least-save 0.01, 128 × 128",
    "lorap-s0.5": "s = 0.5, as above",
}


def _slicegpt_note(label: str) -> str:
    sp = "0.30" if "s0.30" in label else "0.25"
    head = "sliced" if "-head" in label else "kept full width (untied)"
    centre = "centred" if "-center" in label else "not centred"
    return f"`--sparsity {sp}`, 64 × 512, random final orientation; lm_head {head}; embeddings {centre}"


def _spread(vals: list[float]) -> str:
    if not vals:
        return "—"
    if len(vals) == 1:
        return fmt_ppl(vals[0])
    return f"{fmt_ppl(statistics.fmean(vals))} ({fmt_ppl(min(vals))}–{fmt_ppl(max(vals))})"


def _group(records: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(r["label"] or r["method"], []).append(r)
    return out


def _ppls(rows: list[dict], n: str) -> list[float]:
    return [r["ppl"]["wikitext2"][n]["ppl"] for r in rows if r["status"] == "ok"]


def table(quick: list[dict], full: list[dict], order: list[str]) -> str:
    q, f = _group(quick), _group(full)
    dense = next((r for r in quick if r["method"] == "dense" and r["status"] == "ok"), None)
    dense_params = dense["achieved"]["breakdown"]["total"] if dense else None
    lines = [
        "# Parity table: each baseline at its official settings (SmolLM2-135M, 3 calibration seeds)",
        "",
        "SmolLM2-135M-Instruct (Q4_1 de-quantized to fp32), CPU, one torch thread, no recovery; each "
        "entry is one cell of `benchmarks/suites/parity_smollm2.yaml` per calibration seed (the seed "
        "draws the calibration blocks from WikiText-2 validation). The fixed ratio/sparsity sizes the "
        "model; the target (100 %) is only the upper bound every run checks. Perplexity: WikiText-2 "
        "test, no BOS, rows joined by blank lines; *first 8k* = the first 8,192 tokens (64 windows of "
        "128, 4 of 2048: the published protocol's), *full* = every window of the test set. Each cell: "
        "mean over the seeds that ran (min–max); *seeds* counts them for each protocol (first 8k / full). "
        "Written by `python benchmarks/parity_table.py`.",
        "",
        "| entry | official settings | seeds | params (% of dense) | PPL@128 first 8k | PPL@2048 first 8k "
        "| PPL@128 full | PPL@2048 full | prune (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    if dense:
        fd = f.get("dense", [])
        lines.append(f"| dense | — | — | {dense_params:,} (100 %) | {_spread(_ppls([dense], '128'))} | "
                     f"{_spread(_ppls([dense], '2048'))} | {_spread(_ppls(fd, '128'))} | "
                     f"{_spread(_ppls(fd, '2048'))} | — |")
    refused = []
    for label in order:
        rows = q.get(label, [])
        ok = [r for r in rows if r["status"] == "ok"]
        note = OFFICIAL.get(label) or (_slicegpt_note(label) if label.startswith("slicegpt") else "")
        for r in rows:
            if r["status"] != "ok":
                refused.append((label, r["seed"], r["status"], (r.get("error") or "").splitlines()[0][:300]))
        if not ok:
            if rows:
                lines.append(f"| {label} | {note} | 0 of {len(rows)} / — | {rows[0]['status']} (below) | — | — | — | — | — |")
            continue
        params = sorted({r["achieved"]["breakdown"]["total"] for r in ok})
        pct = f"{100 * params[0] / dense_params:.1f} %" if dense_params else "?"
        p = f"{params[0]:,} ({pct})" if len(params) == 1 else f"{params[0]:,}–{params[-1]:,}"
        fr = [r for r in f.get(label, []) if r["status"] == "ok"]
        prune = statistics.fmean(r["prune_wall_s"] for r in ok)
        lines.append(f"| {label} | {note} | {len(ok)} / {len(fr)} | {p} | {_spread(_ppls(ok, '128'))} | "
                     f"{_spread(_ppls(ok, '2048'))} | {_spread(_ppls(fr, '128'))} | {_spread(_ppls(fr, '2048'))} "
                     f"| {prune:.0f} |")
    if refused:
        lines += ["", "Cells not run to the end (status and the run's one-line reason):", ""]
        seen = set()
        for label, _seed, status, err in refused:
            if (label, err) in seen:
                continue
            seen.add((label, err))
            seeds = sorted(s for lb, s, _, e in refused if lb == label and e == err)
            lines.append(f"- `{label}` (seeds {', '.join(map(str, seeds))}): {status} — {err}")
    return "\n".join(lines) + "\n"


def main() -> None:
    from compress.bench import load_suite

    suite = load_suite(SUITE)
    order = [m.display for m in suite.methods if m.name != "dense"]
    quick, full = bench_records(QUICK), [r for folder in FULL for r in bench_records(folder)]
    if not quick:
        raise SystemExit(f"error: no records in {QUICK}; run the suite first (see {SUITE.name}'s header)")
    OUT.write_text(table(quick, full, order))
    print(f"wrote {OUT} ({len(quick)} quick, {len(full)} full records)")


if __name__ == "__main__":
    main()
