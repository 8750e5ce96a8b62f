"""Which method keeps the most quality under a constraint (issue #20): the tables behind the README's
reading, written from the committed records so that every claim there can be traced to a cell.

Reads
  * ``results/choose_smollm2/`` — every method on every axis (params 80/60/50 %, ``flops:70/50%``,
    ``kv:67/34%``), quick protocol: PPL on the first 16,384 WikiText-2 test tokens, decode speed;
  * ``results/choose_smollm2_headline/{a,b,c}/`` — the 80 % and 50 % cells on the full protocol: the full
    WikiText-2 test set, TinyStories validation, the seven tasks × 200 examples with standard errors;
  * ``results/choose_smollm2_speed/{a,b}/`` where it has been run — LoRAP and depth sized to TransAct 50 %'s
    measured decode speed, same protocol as ``choose_smollm2``, read with it for the speed tables;
  * ``results/choose_smollm2_recovery/{a,b}/`` where it has been run — the 50 % cells after 16k and 128k
    tokens of the same training;

and writes ``results/choose_smollm2_best.md``. Ties: two accuracies are a tie when they differ by less
than 2 standard errors of the difference (2·sqrt(se₁² + se₂²)), as in ``compress report``; two decode
speed-ups are a tie when their inter-quartile ranges over the interleaved rounds overlap.

Usage: ``python benchmarks/choose_table.py`` (runs nothing; ``compress bench`` does).
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, fmt_ppl  # noqa: E402

from compress.bench.report import flat_row, load_runs, task_stderr  # noqa: E402
from compress.evaluate.harness import average_stderr  # noqa: E402

QUICK = RESULTS / "choose_smollm2"
HEADLINE = [RESULTS / "choose_smollm2_headline" / p for p in ("a", "b", "c")]
SPEED = [RESULTS / "choose_smollm2_speed" / p for p in ("a", "b")]
RECOVERY = [RESULTS / "choose_smollm2_recovery" / p for p in ("a", "b")]
OUT = RESULTS / "choose_smollm2_best.md"

#: The floors are not candidates for "best"; they stay in the tables as the reference for "how bad".
FLOORS = ("random", "magnitude")
#: Constraint rows of the quick suite, in reading order: (title, target string in the suite).
CONSTRAINTS = [("params 80 %", "80%"), ("params 60 %", "60%"), ("params 50 %", "50%"),
               ("FLOPs 70 %", "flops:70%"), ("FLOPs 50 %", "flops:50%"),
               ("KV cache 67 %", "kv:67%"), ("KV cache 34 %", "kv:34%")]
#: Half-width of an "equal measured speed" window around a reference speed-up: about how far the same
#: weights' speed-up moves between two runs here (median 0.09x, up to 0.22x: "measured twice" below).
SPEED_WINDOW = 0.1


def _records(paths: list[Path]) -> list[dict[str, Any]]:
    there = [p for p in paths if (p / "records.jsonl").is_file()]
    return load_runs(there) if there else []


def _label(r: dict[str, Any]) -> str:
    return r.get("label") or r.get("method") or "?"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def _ppl(row: dict[str, Any], key: str) -> float:
    v = row.get(key)
    return float(v) if isinstance(v, (int, float)) else math.inf


def _speed(row: dict[str, Any]) -> str:
    v = row.get("decode_speedup")
    return "—" if v is None else f"{v:.2f}×"


def _iqr(r: dict[str, Any]) -> tuple[float, float] | None:
    sp = ((r.get("latency") or {}).get("speedup") or {}).get("decode") or {}
    return tuple(sp["iqr"]) if sp.get("iqr") else None  # type: ignore[return-value]


def _acc(row: dict[str, Any]) -> str:
    a, se = row.get("accuracy_avg"), row.get("accuracy_avg_stderr")
    return "—" if a is None else f"{a:.3f} ± {se:.3f}" if se is not None else f"{a:.3f}"


def acc_ties(rows: list[dict[str, Any]], key: str = "accuracy_avg"
             ) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The row with the best ``key`` accuracy and every row within 2 standard errors of the difference
    (``key + "_stderr"`` holds each row's)."""
    se = f"{key}_stderr"
    have = [r for r in rows if r.get(key) is not None and r.get(se) is not None]
    if not have:
        return None, []
    best = max(have, key=lambda r: r[key])
    ties = [r for r in have if r is not best and best[key] - r[key] < 2 * math.hypot(best[se], r[se])]
    return best, ties


#: The task left out of the second average: on SmolLM2 its score is the share of one answer (below).
BIASED = "boolq"


def _without(r: dict[str, Any], row: dict[str, Any], task: str = BIASED) -> None:
    """``row["avg_wo"]`` / ``row["avg_wo_stderr"]``: the average and its standard error over every task
    of record ``r`` but ``task``; ``row["biased"]``: that task's own score."""
    tasks = r.get("tasks") or {}
    row["biased"] = (tasks.get(task) or {}).get("score")
    row["biased_lean"] = ((tasks.get(task) or {}).get("answers") or {}).get("lean")  # recorded since 2026-12-04
    rest = {k: v for k, v in tasks.items() if k != task and isinstance(v, dict)}
    scores = [v.get("score") for v in rest.values()]
    if rest and all(isinstance(x, (int, float)) for x in scores):
        row["avg_wo"] = sum(scores) / len(scores)
        row["avg_wo_stderr"] = average_stderr([task_stderr(v) for v in rest.values()])


def _biased(score: float | None, lean: float | None) -> str:
    """The left-out task's score, with the share of the model's answers on one option where recorded."""
    if score is None:
        return "—"
    return f"{score:.3f}" + ("" if lean is None else f" ({lean:.0%} one answer)")


def _yes_in_records(records: list[dict[str, Any]], n: Any) -> float | None:
    """The share of 'yes' (option 2) among the BoolQ examples, from a record's answer balance over the
    same ``n`` examples (None when no record holds one)."""
    for r in records:
        t = (r.get("tasks") or {}).get(BIASED) or {}
        a = t.get("answers")
        if isinstance(a, dict) and t.get("n") == n:
            return a["constant"] if a["constant_choice"] == 1 else 1 - a["constant"]
    return None


def headline(records: list[dict[str, Any]]) -> list[str]:
    ok = [r for r in records if r.get("status") == "ok"]
    dense = next((r for r in ok if r.get("method") == "dense"), None)
    key = "ppl.wikitext2.2048"
    lines = ["## At equal parameters, full protocol (`choose_smollm2_headline.yaml`)", "",
             "WikiText-2 test PPL on the **full** test set (148 windows of 2048), TinyStories validation PPL "
             "(1,513 windows of 128: neither the calibration nor the test text), the seven zero-shot tasks on "
             "their first 200 examples each (average ± standard error), decode speed at batch 1 against the dense "
             "model in the same process (median of the per-round speed-ups). No recovery training.", ""]
    if dense is not None:
        d = flat_row(dense)
        _without(dense, d)
        lines += [f"Dense: PPL {fmt_ppl(d[key])}, TinyStories {fmt_ppl(d['ppl.tinystories.128'])}, "
                  f"accuracy {_acc(d)} (without {BIASED}: {d['avg_wo']:.3f} ± {d['avg_wo_stderr']:.3f}; "
                  f"{BIASED} {d['biased']:.3f}), decode {d['decode_tokens_per_s']:.1f} tok/s.", ""]
        n = ((dense.get("tasks") or {}).get(BIASED) or {}).get("n")
        yes = _yes_in_records(ok, n) if n else None
        if yes is not None:
            lines += [f"Why the second average: the first {n} {BIASED} examples are {yes:.1%} 'yes', so a model "
                      f"that always answers 'yes' scores {yes:.3f} and one that always answers 'no' {1 - yes:.3f}. "
                      f"A {BIASED} score at one of those two values says which way the model leans, not how "
                      "well it reads, and it moves the seven-task average by up to "
                      f"{abs(2 * yes - 1) / 7:.3f}.", ""]
        else:
            lines += [f"(No record holds {BIASED}'s answer balance over these {n} examples yet.)", ""]
    for target in ("80%", "50%"):
        cells = [r for r in records if r.get("target") == target]
        done = []
        for r in cells:
            if r.get("status") == "ok":
                row = flat_row(r)
                _without(r, row)
                done.append(row)
        done.sort(key=lambda row: _ppl(row, key))
        lines += [f"### {target.replace('%', ' %')} of the parameters", ""]
        if not done:
            lines += ["Not run yet.", ""]
            continue
        best, ties = acc_ties([row for row in done if row["method"] not in FLOORS])
        best_wo, ties_wo = acc_ties([row for row in done if row["method"] not in FLOORS], "avg_wo")
        bold = {id(t) for t in (best, *ties)}
        bold_wo = {id(t) for t in (best_wo, *ties_wo)}
        lines += ["| method | params | FLOPs | KV | PPL@2048 full ↓ | TinyStories@128 ↓ | accuracy avg ↑ | "
                  f"avg without {BIASED} ↑ | {BIASED} | decode × dense |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in done:
            acc = _acc(row)
            wo = "—" if row.get("avg_wo") is None else f"{row['avg_wo']:.3f} ± {row['avg_wo_stderr']:.3f}"
            acc = f"**{acc}**" if id(row) in bold else acc
            wo = f"**{wo}**" if id(row) in bold_wo else wo
            biased = row.get("biased")
            lines.append(f"| {row['label'] or row['method']} | {_pct(row['params_ratio'])} | {_pct(row['flops_ratio'])} | "
                         f"{_pct(row['kv_ratio'])} | {fmt_ppl(_ppl(row, key))} | "
                         f"{fmt_ppl(_ppl(row, 'ppl.tinystories.128'))} | {acc} | {wo} | "
                         f"{_biased(biased, row.get('biased_lean'))} | {_speed(row)} |")
        for r in cells:
            if r.get("status") == "refused":
                lines.append(f"| {_label(r)} | refused: {(r.get('error') or '').splitlines()[0][:120]} |||||||")
        cand = [row for row in done if row["method"] not in FLOORS]
        if cand:
            top = cand[0]
            lines += ["", f"Lowest PPL: **{top['label'] or top['method']}** ({fmt_ppl(_ppl(top, key))})."]
            for b, t, k, what in ((best, ties, "accuracy_avg", "accuracy"),
                                  (best_wo, ties_wo, "avg_wo", f"accuracy without {BIASED}")):
                if b is not None:
                    names = ", ".join(f"{x['label'] or x['method']} {x[k]:.3f}" for x in t) or "none"
                    lines.append(f"Best {what}: **{b['label'] or b['method']}** ({b[k]:.3f}); "
                                 f"within 2 standard errors of it (ties): {names}.")
        missing = sorted({_label(r) for r in records if r.get("method") != "dense"} - {_label(r) for r in cells})
        if missing:
            lines.append(f"Not run yet at {target}: {', '.join(missing)}.")
        lines.append("")
    return lines


def by_constraint(records: list[dict[str, Any]]) -> list[str]:
    key = "ppl.wikitext2.2048"
    lines = ["## Every axis, quick protocol (`choose_smollm2.yaml`)", "",
             "PPL@2048 on the first 16,384 WikiText-2 test tokens; the methods that can express the constraint, "
             "best first (the floors random / magnitude left out; refused: the method cannot reach or express it).",
             "", "| constraint | best | next | others | refused |", "|---|---|---|---|---|"]
    for title, target in CONSTRAINTS:
        cells = [r for r in records if r.get("target") == target and r.get("method") not in FLOORS]
        done = sorted((flat_row(r) for r in cells if r.get("status") == "ok"), key=lambda row: _ppl(row, key))

        def cell(row: dict[str, Any]) -> str:
            return (f"{row['label'] or row['method']} {fmt_ppl(_ppl(row, key))} (params {_pct(row['params_ratio'])}, "
                    f"FLOPs {_pct(row['flops_ratio'])}, KV {_pct(row['kv_ratio'])}, decode {_speed(row)})")

        refused = ", ".join(_label(r) for r in cells if r.get("status") == "refused") or "—"
        best = f"**{cell(done[0])}**" if done else "—"
        nxt = cell(done[1]) if len(done) > 1 else "—"
        others = ", ".join(f"{row['label'] or row['method']} {fmt_ppl(_ppl(row, key))}" for row in done[2:]) or "—"
        lines.append(f"| {title} | {best} | {nxt} | {others} | {refused} |")
    return [*lines, ""]


def by_speed(records: list[dict[str, Any]]) -> list[str]:
    """Each method's best cell (lowest PPL) whose measured decode speed-up is within ±SPEED_WINDOW of a
    reference: TransAct's own cells at 80 %, 60 % and 50 % of the parameters. A method with no cell in
    the window is named under the table with its nearest cell."""
    key = "ppl.wikitext2.2048"
    ok = [r for r in records if r.get("status") == "ok" and r.get("method") not in ("dense", *FLOORS)]
    refs = [r for r in ok if r.get("method") == "transact" and r.get("target") in ("80%", "60%", "50%")]
    lines = ["## At equal measured decode speed, quick protocol (`choose_smollm2.yaml`, "
             "`choose_smollm2_speed.yaml`)", "",
             f"Decode at batch 1, one thread, interleaved with the dense model in each cell's process. For a "
             f"reference speed-up (TransAct's 80 %, 60 % and 50 % cells), each method's lowest-PPL cell whose median "
             f"speed-up is within ±{SPEED_WINDOW:g}× of it, over all its targets (params, FLOPs, KV). "
             "*IQR overlaps*: the inter-quartile ranges of the two speed-ups overlap (the speeds tie).", ""]
    for ref in sorted(refs, key=lambda r: -(r["ratios"]["params"])):
        sp = flat_row(ref)["decode_speedup"]
        if sp is None:
            continue
        rows, missing = [], []
        for method in dict.fromkeys(_label(r) for r in ok):
            mine = [row for r in ok if _label(r) == method and (row := flat_row(r))["decode_speedup"] is not None]
            near = [row for row in mine if abs(row["decode_speedup"] - sp) <= SPEED_WINDOW]
            if near:
                rows.append(min(near, key=lambda row: _ppl(row, key)))
            elif mine:
                closest = min(mine, key=lambda row: abs(row["decode_speedup"] - sp))
                missing.append(f"{method} (nearest: {closest['target']} at {closest['decode_speedup']:.2f}×)")
        rows.sort(key=lambda row: _ppl(row, key))
        ref_iqr = _iqr(ref)
        lines += [f"### Decode {sp:.2f}× dense (TransAct {ref['target'].replace('%', ' %')})", "",
                  "| method | its cell | PPL@2048 (16k) ↓ | decode × dense (IQR) | params | KV |",
                  "|---|---|---:|---:|---:|---:|"]
        by_id = {r["cell_id"]: r for r in ok}
        for row in rows:
            iqr = _iqr(by_id[row["cell_id"]])
            overlap = ref_iqr is not None and iqr is not None and iqr[0] <= ref_iqr[1] and ref_iqr[0] <= iqr[1]
            spread = f" ({iqr[0]:.2f}–{iqr[1]:.2f})" if iqr else ""
            mark = " (the reference)" if row["cell_id"] == ref["cell_id"] else " *IQR overlaps*" if overlap else ""
            lines.append(f"| {row['label'] or row['method']} | {row['target']} | {fmt_ppl(_ppl(row, key))} | "
                         f"{row['decode_speedup']:.2f}×{spread}{mark} | "
                         f"{_pct(row['params_ratio'])} | {_pct(row['kv_ratio'])} |")
        if missing:
            lines += ["", "No cell within the window: " + ", ".join(missing) + "."]
        lines.append("")
    return lines


def speed_twice(quick: list[dict[str, Any]], head: list[dict[str, Any]]) -> list[str]:
    """The same method and target measured in both suites: how far one cell's decode speed-up moves between
    two runs on this machine, the honest size of a speed tie."""
    def ok(rs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
        return {(_label(r), r.get("target")): r for r in rs
                if r.get("status") == "ok" and r.get("method") != "dense" and _iqr(r) is not None}

    q, h = ok(quick), ok(head)
    both = [k for k in h if k in q and q[k].get("weights_sha256") == h[k].get("weights_sha256")]
    lines = ["## The same cell's decode speed, measured twice", ""]
    if not both:
        return [*lines, "No cell is in both suites yet.", ""]
    lines += ["Each method and target that both suites ran, with identical saved weights (`weights_sha256`), "
              "and its decode "
              "speed-up in each (median, IQR over the interleaved rounds). The two runs differ in what the other "
              "core was doing at the time.", "",
              "| method | target | quick suite | full-protocol suite | difference |", "|---|---|---:|---:|---:|"]
    diffs = []
    for label, target in both:
        a, b = q[(label, target)], h[(label, target)]
        sa, sb = flat_row(a)["decode_speedup"], flat_row(b)["decode_speedup"]
        (a0, a1), (b0, b1) = _iqr(a), _iqr(b)  # type: ignore[misc]
        diffs.append(abs(sb - sa))
        lines.append(f"| {label} | {target} | {sa:.2f}× ({a0:.2f}–{a1:.2f}) | {sb:.2f}× ({b0:.2f}–{b1:.2f}) | "
                     f"{sb - sa:+.2f}× |")
    lines += ["", f"Largest difference: {max(diffs):.2f}×; median {statistics.median(diffs):.2f}× "
              f"over {len(diffs)} cells.", ""]
    return lines


def recovery(records: list[dict[str, Any]], before: list[dict[str, Any]]) -> list[str]:
    """Each method at 50 % before and after every recovery budget, on WikiText-2 (the training text's
    domain) and TinyStories (held out), ordered by WikiText-2 perplexity at the largest budget."""
    lines = ["## After recovery training, 50 % of the parameters (`choose_smollm2_recovery.yaml`)", ""]
    if not records:
        return [*lines, "Not run yet.", ""]
    keys = {"WikiText-2 PPL@2048": "ppl.wikitext2.2048", "TinyStories PPL@128": "ppl.tinystories.128"}
    base = {(_label(r), r.get("target")): flat_row(r) for r in before if r.get("status") == "ok"}
    dense = [r for r in records if r.get("method") == "dense" and r.get("status") == "ok"]
    if dense:
        d = flat_row(dense[0])
        lines += ["Dense: " + ", ".join(f"{name} {fmt_ppl(_ppl(d, k))}" for name, k in keys.items()) + ".", ""]
    records = [r for r in records if r.get("method") != "dense"]
    budgets = sorted({(r.get("recovery") or {}).get("tokens", 0) for r in records})
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    for r in records:
        rows.setdefault(_label(r), {})[(r.get("recovery") or {}).get("tokens", 0)] = r

    def value(method: str, tokens: int | None, key: str) -> float:
        """The cell's perplexity (``tokens`` None: the quick suite's cell before training); inf if not run."""
        if tokens is None:
            b = base.get((method, "50%"))
            return _ppl(b, key) if b else math.inf
        r = rows[method].get(tokens)
        return _ppl(flat_row(r), key) if r and r.get("status") == "ok" else math.inf

    cols = [None, *budgets]
    best = {(k, t): min((value(m, t, k) for m in rows if m not in FLOORS), default=math.inf)
            for k in keys.values() for t in cols}
    order = sorted(rows, key=lambda m: (m in FLOORS, value(m, budgets[-1], keys["WikiText-2 PPL@2048"])))
    head = ["before", *(f"{t // 1024}k tokens" for t in budgets)]
    lines += ["Perplexity on the first 16,384 WikiText-2 test tokens and on TinyStories validation (128-token "
              "windows; neither the calibration, the training nor the test text), before → after full "
              "training on WikiText-2 validation: the same tokens, recipe and optimizer for every method. "
              "*before* is the quick suite's cell (`choose_smollm2.yaml`, the same pruning); bold: the best "
              "method of a column (the floors excluded). *training* is the wall time of the largest budget's "
              "training, one core.", "",
              "| method | " + " | ".join(f"{name} {h}" for name in keys for h in head) + " | training |",
              "|---|" + "---:|" * (len(keys) * len(head) + 1)]
    for m in order:
        cells = []
        for k in keys.values():
            for t in cols:
                v = value(m, t, k)
                text = "—" if not math.isfinite(v) else fmt_ppl(v)
                cells.append(f"**{text}**" if m not in FLOORS and v == best[(k, t)] and math.isfinite(v) else text)
        last = rows[m].get(budgets[-1]) or {}
        wall = (last.get("recovery_result") or {}).get("wall_s")
        cells.append(f"{wall / 60:.0f} min" if wall else "—")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def main() -> None:
    quick, head, rec = _records([QUICK]), _records(HEADLINE), _records(RECOVERY)
    sized = _records(SPEED)
    text = ["# Best method per constraint: SmolLM2-135M, CPU (issue #20)", "",
            "Written by `python benchmarks/choose_table.py` from the committed records (every number is a "
            "cell of the named suite, by `cell_id` in its `records.jsonl`). Accuracy ties: within 2 standard "
            "errors of the difference of the best (bold). The floors (random, magnitude) are never 'best'.", "",
            *headline(head), *by_constraint(quick), *by_speed(quick + sized), *speed_twice(quick, head),
            *recovery(rec, quick)]
    OUT.write_text("\n".join(text).rstrip() + "\n", encoding="utf-8")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
