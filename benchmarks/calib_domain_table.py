"""How much each method depends on its calibration text (issue #19, item 7): WikiText-2 vs TinyStories.

Joins two record sets of SmolLM2-135M cells that differ only in the calibration text — the
WikiText-2-validation arm of ``results/choose_smollm2/`` (and of ``results/calib_domain_smollm2/`` for
the entries that suite lacks: label suffix ``-wt2``) and the TinyStories arm of
``results/calib_domain_smollm2/`` — checks that the two arms of a row share method, recipe settings,
seed, target and evaluation protocol, and writes ``results/calib_domain_smollm2.md``.

Usage: ``python benchmarks/calib_domain_table.py`` (runs nothing; see the suite's header for the run).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, bench_records, fmt_ppl  # noqa: E402

SUITE = Path(__file__).resolve().parent / "suites" / "calib_domain_smollm2.yaml"
CHOOSE = RESULTS / "choose_smollm2"
DOMAIN = RESULTS / "calib_domain_smollm2"
OUT = RESULTS / "calib_domain_smollm2.md"
SUFFIX = "-wt2"
#: The columns: (ppl source, context) as the records store them.
COLUMNS = (("wikitext2", "2048"), ("wikitext2", "128"), ("tinystories", "128"))


def _records(folder: Path) -> list[dict]:
    records = bench_records(folder)
    if not records:
        raise SystemExit(f"error: no records in {folder}; run its suite first (see {SUITE.name}'s header)")
    return records


def _same_cell(a: dict, b: dict) -> str | None:
    """Why ``a`` and ``b`` are not the same cell up to the calibration text (None if they are)."""
    for key in ("method", "target", "seed", "settings"):
        if a[key] != b[key]:
            return f"{key} differs: {a[key]!r} vs {b[key]!r}"
    ea, eb = ({k: v for k, v in r["eval"].items() if k != "latency"} for r in (a, b))
    return None if ea == eb else f"evaluation protocol differs: {ea} vs {eb}"


def _ppl(r: dict, source: str, n: str) -> float:
    try:
        return r["ppl"][source][n]["ppl"]
    except (KeyError, TypeError):
        return math.nan


def rows(choose: list[dict], domain: list[dict], order: list[str]) -> tuple[list[str], list[str]]:
    """The table's markdown rows and the problems found (unpaired or mismatched cells)."""
    wt2 = {(r["label"], r["target"]): r for r in choose if r["calib"] == "wikitext2"}
    wt2.update({(r["label"].removesuffix(SUFFIX), r["target"]): r for r in domain
                if r["label"] and r["label"].endswith(SUFFIX)})
    ts = {(r["label"], r["target"]): r for r in domain if r["calib"] == "tinystories"}
    out, problems = [], []
    for label in order:
        for target in ("80%", "50%"):
            a, b = wt2.get((label, target)), ts.get((label, target))
            if not (a and b):
                problems.append(f"`{label}` {target}: {'WikiText-2' if not a else 'TinyStories'} arm not run yet")
                continue
            if a["status"] != "ok" or b["status"] != "ok":
                problems.append(f"`{label}` {target}: status {a['status']} / {b['status']}")
                continue
            why = _same_cell(a, b)
            if why:
                problems.append(f"`{label}` {target}: not comparable ({why})")
                continue
            cells = []
            for source, n in COLUMNS:
                pa, pb = _ppl(a, source, n), _ppl(b, source, n)
                cells.append(f"{fmt_ppl(pa)} → {fmt_ppl(pb)} ({pb / pa:.2f}×)")
            same = "yes" if a["plan_hash"] == b["plan_hash"] else "no"
            out.append(f"| {label} | {target} | {100 * b['ratios']['params']:.1f} % | " + " | ".join(cells)
                       + f" | {same} |")
    return out, problems


def main() -> None:
    from compress.bench import load_suite

    suite = load_suite(SUITE)
    order = [m.display for m in suite.methods if m.name != "dense" and not m.display.endswith(SUFFIX)]
    choose, domain = _records(CHOOSE), _records(DOMAIN)
    body, problems = rows(choose, domain, order)
    dense = next((r for r in domain if r["method"] == "dense" and r["status"] == "ok"), None)
    dense_line = ("Dense: " + ", ".join(f"{s} @{n} {fmt_ppl(_ppl(dense, s, n))}" for s, n in COLUMNS) + ".") if dense else ""
    lines = [
        "# Calibration text: WikiText-2 validation vs TinyStories (SmolLM2-135M, no recovery)",
        "",
        "Each row is one method at one parameter target, pruned twice with the same recipe, settings and "
        "seed — calibrated on WikiText-2 validation (`--calib wikitext2`, the domain of the test text) and on "
        "TinyStories (`--calib tinystories`) — and evaluated with the same protocol: WikiText-2 test, first "
        "16,384 tokens at 2048 and 128 context, and TinyStories, first 16,384 tokens at 128. Each cell: PPL "
        "calibrated on WikiText-2 → on TinyStories (ratio). WikiText-2 test is held out for both arms; the "
        "TinyStories column is out of domain for the WikiText-2 arm but in domain for the TinyStories arm, "
        "whose calibration blocks are drawn from the same file (the assets hold one TinyStories text) and may "
        "overlap the evaluated tokens. `same plan`: the two arms kept exactly the same structures (for "
        "SliceGPT that is the width d' only: its rotations are computed from the calibration text either way). Records: "
        "`benchmarks/results/choose_smollm2/` (WikiText-2 arm) and `benchmarks/results/calib_domain_smollm2/` "
        "(TinyStories arm, and both arms of `transact-auto` and `slicegpt-head`). Written by "
        "`python benchmarks/calib_domain_table.py`.",
        "",
        dense_line,
        "",
        "| method | target | params | WikiText-2 @2048 | WikiText-2 @128 | TinyStories @128 | same plan |",
        "|---|---|---|---|---|---|---|",
        *body,
    ]
    if problems:
        lines += ["", "Not in the table:", "", *[f"- {p}" for p in problems]]
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT} ({len(body)} rows, {len(problems)} not in the table)")


if __name__ == "__main__":
    main()
