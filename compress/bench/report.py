"""Turn benchmark records into a markdown table, JSON, CSV and Pareto plots of quality against cost.

One table per model, one row per cell: dense first, then targets from the largest, recovery budgets
from none, methods in suite order. In each column the best value among the cells that share a
target and a recovery budget is **bold** (only where at least two cells compete). The report states
the evaluation protocol(s) of its records; failed cells are listed separately.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.bench.record import now, read_records
from compress.bench.runner import RECORDS, latest_by_cell
from compress.bench.suite import DENSE, RecoverySpec
from compress.errors import UsageError

__all__ = ["flat_row", "load_runs", "render_markdown", "write_report"]


# ---------------------------------------------------------------------------------- input


def load_runs(paths: Iterable[str | Path], *, strict: bool = True) -> list[dict[str, Any]]:
    """Records from ``records.jsonl`` files, folders holding one, or folders whose subfolders hold one
    each (e.g. one per tox environment); the newest record of each cell wins (later inputs after
    earlier ones). A missing input, or a damaged records file (not UTF-8, a line that is not a JSON
    record: :func:`compress.bench.record.read_records` with ``strict``), is a one-line UsageError.
    ``strict=False``: damaged lines are skipped (``compress bench`` reporting on the file it just wrote)."""
    records: list[dict[str, Any]] = []
    for raw in paths:
        p = Path(raw)
        files = [p / RECORDS] if (p / RECORDS).is_file() else sorted(p.glob(f"*/{RECORDS}")) if p.is_dir() else [p]
        if not files or not all(f.is_file() for f in files):
            raise UsageError(f"no records at {raw}: pass a records.jsonl file or a folder holding one")
        for f in files:
            got = read_records(f, strict=strict)
            if not got:
                raise UsageError(f"{f} holds no benchmark records")
            records.extend(got)
    return list(latest_by_cell(records).values())


# ---------------------------------------------------------------------------------- rows


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _ppl_keys(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    keys: list[tuple[str, str]] = []
    for r in records:
        for source, by_len in (r.get("ppl") or {}).items():
            for n in by_len:
                if (source, n) not in keys:
                    keys.append((source, n))
    # the papers' protocol (WikiText-2 test) first, then other sources by name; longest context first
    return sorted(keys, key=lambda k: (k[0] != "wikitext2", k[0], -int(k[1]) if k[1].isdigit() else 0))


def _task_keys(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """``(task, headline metric)`` in the suites' task order (records store tasks sorted by name)."""
    order: list[str] = []
    for r in records:
        order += [t for t in (_get(r, "eval", "tasks") or []) if t not in order]
    out: dict[str, str] = {}
    for r in records:
        for task, res in (r.get("tasks") or {}).items():
            if isinstance(res, dict) and task not in out:
                out[task] = res.get("metric") or "acc"
    rank = {t: i for i, t in enumerate(order)}
    return sorted(out.items(), key=lambda kv: rank.get(kv[0], len(rank)))


def flat_row(r: dict[str, Any]) -> dict[str, Any]:
    """One record as a flat dict (the CSV/JSON row)."""
    rec = r.get("recovery") or {}
    row: dict[str, Any] = {
        "cell_id": r.get("cell_id"),
        "status": r.get("status"),
        "suite": r.get("suite"),
        "model": _get(r, "model", "id"),
        "model_hash": _get(r, "model", "hash"),
        "method": r.get("method"),
        "label": r.get("label") or r.get("method"),
        "plugin": _get(r, "plugin", "distribution"),
        "plugin_version": _get(r, "plugin", "version"),
        "target": r.get("target"),
        "recovery_tokens": rec.get("tokens", 0),
        "recovery_mode": rec.get("mode"),
        "seed": r.get("seed"),
        "params": _get(r, "achieved", "params"),
        "params_ratio": _get(r, "ratios", "params"),
        "flops_per_token": _get(r, "achieved", "flops_per_token"),
        "flops_ratio": _get(r, "ratios", "flops"),
        "kv_bytes_per_token": _get(r, "achieved", "kv_bytes_per_token"),
        "kv_ratio": _get(r, "ratios", "kv"),
    }
    for source, by_len in (r.get("ppl") or {}).items():
        for n, res in by_len.items():
            row[f"ppl.{source}.{n}"] = _get(res, "ppl")
            row[f"ppl.{source}.{n}.windows"] = _get(res, "windows")
    for task, res in (r.get("tasks") or {}).items():
        if isinstance(res, dict):
            for m in ("acc", "acc_norm"):
                if m in res:
                    row[f"{task}.{m}"] = res[m]
            row[f"{task}.n"] = res.get("n")
            row[f"{task}.stderr"] = task_stderr(res)
            if isinstance(res.get("answers"), dict):  # the share of the model's answers on one option
                row[f"{task}.lean"] = res["answers"].get("lean")
    row.update({
        "accuracy_avg": r.get("accuracy_avg"),
        "accuracy_avg_stderr": average_stderr(r),
        "prefill_tokens_per_s": _get(r, "latency", "prefill_tokens_per_s"),
        "decode_tokens_per_s": _get(r, "latency", "decode_tokens_per_s"),
        "prefill_speedup": _get(r, "latency", "speedup", "prefill", "median"),
        "prefill_speedup_tie": _get(r, "latency", "speedup", "prefill", "tie"),
        "decode_speedup": _get(r, "latency", "speedup", "decode", "median"),
        "decode_speedup_tie": _get(r, "latency", "speedup", "decode", "tie"),
        "prune_wall_s": r.get("prune_wall_s"),
        "peak_rss_bytes": r.get("peak_rss_bytes"),
        "calibration_hash": r.get("calibration_hash"),
        "plan_hash": r.get("plan_hash"),
        "stage": r.get("stage"),
        "error": r.get("error"),
    })
    return row


def _by_status(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], ...]:
    """``(ok, refused, failed)``: finished cells, cells their method declined, everything else."""
    ok = [r for r in records if r.get("status") == "ok"]
    refused = [r for r in records if r.get("status") == "refused"]
    failed = [r for r in records if r.get("status") not in ("ok", "refused")]
    return ok, refused, failed


def _target_order(r: dict[str, Any]) -> float:
    if r.get("method") == DENSE:
        return -math.inf
    from compress.target import Target

    try:
        t = Target.parse(r.get("target") or "")
    except UsageError:
        return 0.0
    if t.fraction is not None:
        return -t.fraction
    dense = _get(r, "dense", {"params": "params", "flops": "flops_per_token", "kv": "kv_bytes_per_token"}[t.metric])
    return -(t.absolute / dense) if dense and t.absolute else 0.0


def _sorted(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(records, key=lambda r: (r.get("method") != DENSE, _target_order(r),
                                          _get(r, "recovery", "tokens") or 0, r.get("seed") or 0))


# ---------------------------------------------------------------------------------- markdown


@dataclass
class _Col:
    title: str
    value: Callable[[dict[str, Any]], Any]
    fmt: Callable[[Any, dict[str, Any]], str]
    better: str | None = None  # "min" | "max" | None (never bold)
    #: the value's standard error, where it has one: then every cell within 2·stderr of the best (the
    #: stderr of the difference, sqrt(se² + se_best²)) ties it and is bold too
    se: Callable[[dict[str, Any]], float | None] | None = None


def task_stderr(res: Any) -> float | None:
    """A task result's standard error: as recorded, else from its score and example count (records
    written before the harness stored it)."""
    from compress.evaluate.harness import accuracy_stderr

    if not isinstance(res, dict):
        return None
    se = res.get("stderr")
    return float(se) if isinstance(se, (int, float)) else accuracy_stderr(res.get("score"), res.get("n"))


def average_stderr(r: dict[str, Any]) -> float | None:
    """Standard error of a record's accuracy average (independent tasks: sqrt(Σ se²) / k)."""
    from compress.evaluate.harness import average_stderr as avg

    tasks = [v for v in (r.get("tasks") or {}).values() if isinstance(v, dict)]
    return avg([task_stderr(v) for v in tasks]) if tasks else None


def _with_se(se_of: Callable[[dict[str, Any]], float | None]) -> Callable[[Any, dict[str, Any]], str]:
    def fmt(v: Any, r: dict[str, Any]) -> str:
        se = se_of(r)
        return f"{v:.3f} ±{se:.3f}" if se is not None else f"{v:.3f}"

    return fmt


def _si(x: float) -> str:
    for suf, m in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= m:
            return f"{x / m:.3g}{suf}"
    return f"{x:.3g}"


def _with_ratio(ratio: str) -> Callable[[Any, dict[str, Any]], str]:
    def fmt(v: Any, r: dict[str, Any]) -> str:
        q = _get(r, "ratios", ratio)
        return f"{_si(v)} ({q:.1%})" if isinstance(q, (int, float)) else _si(v)

    return fmt


def _num(spec: str) -> Callable[[Any, dict[str, Any]], str]:
    return lambda v, r: format(v, spec)


def _speedup(phase: str) -> Callable[[Any, dict[str, Any]], str]:
    """``1.97× (1.90–2.03)``: the median per-round speed-up over dense and its IQR; *tie* when the IQR
    contains 1 (the difference is inside the spread)."""

    def fmt(v: Any, r: dict[str, Any]) -> str:
        sp = _get(r, "latency", "speedup", phase) or {}
        lo, hi = sp.get("iqr") or (v, v)
        text = f"{v:.2f}× ({lo:.2f}–{hi:.2f})"
        return f"*tie* {text}" if sp.get("tie") else text

    return fmt


def _columns(records: list[dict[str, Any]]) -> list[_Col]:
    seeds = {r.get("seed") for r in records}
    cols = [
        _Col("method", lambda r: r.get("label") or r.get("method"), lambda v, r: str(v)),
        _Col("target", lambda r: r.get("target"), lambda v, r: "—" if r.get("method") == DENSE else str(v)),
        _Col("recovery", lambda r: r["_paper"]["recovery"] if r.get("_paper") else
             RecoverySpec(**(r.get("recovery") or {})).short(),
             lambda v, r: "—" if r.get("method") == DENSE else str(v)),
    ]
    if len(seeds) > 1:
        cols.append(_Col("seed", lambda r: r.get("seed"), lambda v, r: str(v)))
    cols += [
        _Col("params", lambda r: _get(r, "achieved", "params"), _with_ratio("params"), "min"),
        _Col("FLOPs/token", lambda r: _get(r, "achieved", "flops_per_token"), _with_ratio("flops"), "min"),
        _Col("KV B/token", lambda r: _get(r, "achieved", "kv_bytes_per_token"), _with_ratio("kv"), "min"),
    ]
    for source, n in _ppl_keys(records):
        cols.append(_Col(f"PPL {source}@{n} ↓", lambda r, s=source, n=n: _get(r, "ppl", s, n, "ppl"),
                         _num(".2f"), "min"))
    tasks = _task_keys(records)
    for task, metric in tasks:
        def se(r: dict[str, Any], t: str = task) -> float | None:
            return task_stderr(_get(r, "tasks", t))

        cols.append(_Col(f"{task} {metric} ↑", lambda r, t=task: _get(r, "tasks", t, "score"), _with_se(se), "max",
                         se=se))
    if tasks:
        cols.append(_Col("avg ↑", lambda r: r.get("accuracy_avg"), _with_se(average_stderr), "max",
                         se=average_stderr))
    cols += [
        _Col("prefill tok/s ↑", lambda r: _get(r, "latency", "prefill_tokens_per_s"), _num(".0f"), "max"),
        _Col("prefill × dense", lambda r: _get(r, "latency", "speedup", "prefill", "median"), _speedup("prefill")),
        _Col("decode tok/s ↑", lambda r: _get(r, "latency", "decode_tokens_per_s"), _num(".1f"), "max"),
        _Col("decode × dense", lambda r: _get(r, "latency", "speedup", "decode", "median"), _speedup("decode")),
        _Col("prune s", lambda r: r.get("prune_wall_s"), _num(".1f"), "min"),
        _Col("peak RSS MiB", lambda r: r.get("peak_rss_bytes"), lambda v, r: f"{v / 2**20:.0f}", "min"),
    ]
    return cols


def _group(r: dict[str, Any]) -> tuple[Any, ...]:
    """Cells that compete for "best": same target, recovery budget and evaluation protocol."""
    if r.get("method") == DENSE:
        return (DENSE, r.get("cell_id"))
    rec = r.get("recovery") or {}
    return (r.get("target"), rec.get("tokens", 0), rec.get("mode"), json.dumps(r.get("eval"), sort_keys=True))


def _paper_slot(r: dict[str, Any]) -> tuple[Any, ...]:
    """Where a published row may sit: next to our cells of the same target and recovery kind."""
    if r.get("method") == DENSE:
        return (DENSE,)
    return (r.get("target"), bool(_get(r, "recovery", "tokens")))


def _with_paper(rows: list[dict[str, Any]], paper: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with each matching published row inserted after the last of our rows it matches."""
    out = list(rows)
    for p in paper:
        slots = [i for i, r in enumerate(out) if not r.get("_paper") and _paper_slot(r) == _paper_slot(p)]
        if slots:
            last = slots[-1]
            while last + 1 < len(out) and out[last + 1].get("_paper"):
                last += 1
            out.insert(last + 1, p)
    return out


def _table(records: list[dict[str, Any]], paper: list[dict[str, Any]] | None = None) -> list[str]:
    """The markdown table of ``records``, with ``paper`` rows (published numbers) next to the cells
    they match; those never count for, or get, the bold "best"."""
    rows = _sorted(records)
    cols = _columns(rows)
    # a measurement no cell took (e.g. latency in a suite without it) gets no empty column
    cols = cols[:3] + [c for c in cols[3:] if any(c.value(r) is not None for r in records)]
    rows = _with_paper(rows, paper or [])
    best: dict[tuple[int, tuple[Any, ...]], float] = {}
    best_se: dict[tuple[int, tuple[Any, ...]], float | None] = {}
    counts: dict[tuple[int, tuple[Any, ...]], int] = {}
    for ci, c in enumerate(cols):
        if not c.better:
            continue
        for r in rows:
            v = c.value(r)
            if r.get("_paper") or not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                continue
            k = (ci, _group(r))
            counts[k] = counts.get(k, 0) + 1
            cur = best.get(k)
            if cur is None or (v < cur if c.better == "min" else v > cur):
                best[k], best_se[k] = v, c.se(r) if c.se else None

    def tied(c: _Col, k: tuple[int, tuple[Any, ...]], v: float, r: dict[str, Any]) -> bool:
        if v == best[k] or c.fmt(v, r) == c.fmt(best[k], r):  # ties as displayed (0.021 s and 0.028 s: 0.0)
            return True
        se_v, se_b = (c.se(r) if c.se else None), best_se.get(k)
        return se_v is not None and se_b is not None and abs(best[k] - v) <= 2 * math.hypot(se_v, se_b)
    lines = ["| " + " | ".join(c.title for c in cols) + " |",
             "|" + "|".join("---" if i < 3 else "---:" for i in range(len(cols))) + "|"]
    for r in rows:
        cells = []
        for ci, c in enumerate(cols):
            v = c.value(r)
            if v is None:
                cells.append("")
                continue
            text = c.fmt(v, r)
            k = (ci, _group(r))
            if (c.better and not r.get("_paper") and counts.get(k, 0) >= 2 and isinstance(v, (int, float))
                    and tied(c, k, v, r)):
                text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _protocol_lines(records: list[dict[str, Any]]) -> list[str]:
    seen: list[str] = []
    lines: list[str] = []
    for r in records:
        ev = r.get("eval") or {}
        key = json.dumps(ev, sort_keys=True)
        if key in seen:
            continue
        seen.append(key)
        parts = []
        if ev.get("ppl"):
            mw, mt = ev.get("max_windows"), ev.get("max_tokens")
            caps = [c for c in (f"first {mw} windows" if mw else "", f"first {mt} tokens" if mt else "") if c]
            sets = "; ".join(f"{s} at {', '.join(str(n) for n in lens)} tokens" for s, lens in ev["ppl"].items())
            parts.append(f"perplexity on {sets}: non-overlapping windows, no BOS, "
                         + (f"{' and '.join(caps)} per context (partial)" if caps else "all windows (full set)"))
        if ev.get("tasks"):
            lim = ev.get("limit")
            parts.append(f"lm-eval zero-shot {', '.join(ev['tasks'])}, "
                         + (f"limit {lim} examples per task" if lim else "all examples")
                         + "; column = headline metric (acc or acc_norm, named), avg = their mean")
        lat = ev.get("latency")
        if lat:
            if "decode_batch_size" in lat:
                parts.append(f"latency: prefill of {lat['prompt_len']} tokens at batch {lat['prefill_batch_size']}, "
                             f"{lat['new_tokens']} greedy decode steps at batch {lat['decode_batch_size']}, random "
                             f"ids, median of {lat['repeats']} rounds after {lat['warmup']} warm-up, each pruned model "
                             "interleaved with the dense model in its cell's process; × dense = median of the "
                             "per-round speed-ups (IQR in brackets), *tie* = the IQR contains 1")
            else:  # records written before the interleaved protocol
                parts.append(f"latency: prompt {lat['prompt_len']} + {lat['new_tokens']} greedy tokens, batch "
                             f"{lat['batch_size']}, median of {lat['repeats']} (random ids; not interleaved)")
        lines.append("- " + ("; ".join(parts) or "no evaluation"))
    vers = {json.dumps({k: (r.get("versions") or {}).get(k) for k in ("torch", "transformers", "lm_eval")},
                       sort_keys=True) for r in records if r.get("versions")}
    for v in sorted(vers):
        d = json.loads(v)
        lines.append(f"- versions: torch {d['torch']}, transformers {d['transformers']}, lm-eval {d['lm_eval']}")
    threads = sorted({r.get("threads") for r in records if r.get("threads")})
    if threads:
        lines.append(f"- torch threads per cell: {', '.join(str(t) for t in threads)}")
    return lines


def _reported_lines(tables: list[Any], shown: list[dict[str, Any]]) -> list[str]:
    """Where the *paper* rows come from, and which published tables matched nothing here."""
    lines = []
    used = {(p["_paper"]["file"], p["_paper"]["table"]) for p in shown}
    for t in tables:
        n = sum(1 for p in shown if p["_paper"]["file"] == t.file and p["_paper"]["table"] == t.table)
        if (t.file, t.table) in used:
            lines.append(f"- *paper* rows: {n} published by {t.source} — {t.table} ({t.model}; "
                         f"{t.reference}). Their protocol: {t.protocol or 'see the source'}. Not re-measured here; "
                         "their sizes are the papers' own accounting.")
    unmatched = sorted({(t.model, t.file) for t in tables if (t.file, t.table) not in used})
    if unmatched:
        models = sorted({m for m, _ in unmatched})
        lines.append(f"- published numbers not shown (no cell here with their model and setting): "
                     f"{len(unmatched)} file(s) for {', '.join(models)}")
    return lines


def _cell_line(r: dict[str, Any], *keys: str) -> str:
    """A listed (refused or failed) cell as a markdown row: model, method, target, recovery, then ``keys``."""
    cells = [_get(r, "model", "id"), r.get("label") or r.get("method"), r.get("target"),
             RecoverySpec(**(r.get("recovery") or {})).short(), *(r.get(k) for k in keys)]
    return "| " + " | ".join(str(c if c is not None else "").replace("|", "\\|") for c in cells) + " |"


def _lean_lines(ok: list[dict[str, Any]]) -> list[str]:
    """The section naming every (cell, task) where the model put at least LEAN_THRESHOLD of its answers on
    one option position (:func:`compress.evaluate.harness.answer_balance`): there the score is mostly
    what always giving that answer scores, not evidence of reading."""
    from compress.evaluate.harness import LEAN_THRESHOLD

    rows, unknown = [], 0
    for r in _sorted(ok):
        tasks = {k: v for k, v in (r.get("tasks") or {}).items() if isinstance(v, dict)}
        if tasks and not any(isinstance(v.get("answers"), dict) for v in tasks.values()):
            unknown += 1
        for name, v in tasks.items():
            a = v.get("answers")
            if isinstance(a, dict) and a.get("lean", 0) >= LEAN_THRESHOLD:
                rows.append(_cell_line(r) + f" {name} | {v.get('score', 0):.3f} | {a['lean']:.0%} on option "
                            f"{a['lean_choice'] + 1} | {a['constant_at_lean']:.3f} | {a['chance']:.3f} |")
    if not rows and not unknown:
        return []
    out = ["## Answers by position", "",
           f"Cells and tasks where the model gave the same option (by position) to at least "
           f"{LEAN_THRESHOLD:.0%} of the questions. Its score there is close to what always giving that "
           "answer scores, whatever it understood, so a difference between two such cells says which way "
           "each leans, not which reads better.", ""]
    if rows:
        out += ["| model | method | target | recovery | task | score | answers | always that option | chance |",
                "|---|---|---|---|---|---:|---|---:|---:|", *rows, ""]
    else:
        out += ["None.", ""]
    if unknown:
        out += [f"{unknown} cell(s) with task scores predate this check (their records hold no answer balance).", ""]
    return out


def render_markdown(records: list[dict[str, Any]], *, title: str = "Benchmark report",
                    plots: dict[str, str] | None = None, reported: list[Any] | None = None) -> str:
    """The markdown report of ``records`` (latest record per cell); ``reported`` tables
    (:func:`compress.bench.reported.load_reported`) add *paper* rows next to matching cells."""
    ok, refused, failed = _by_status(records)
    paper = [p for t in (reported or []) for p in t.pseudo_records()]
    shown: list[dict[str, Any]] = []
    tables: list[str] = []
    models: list[str] = []
    for r in ok:
        m = _get(r, "model", "id")
        if m not in models:
            models.append(m)
    for m in models:
        rows = [r for r in ok if _get(r, "model", "id") == m]
        mine = [p for p in paper if _get(p, "model", "id") == m]
        slots = {_paper_slot(r) for r in rows}
        shown += [p for p in mine if _paper_slot(p) in slots]
        h = _get(rows[0], "model", "hash")
        tables += [f"## {m}" + (f" ({_get(rows[0], 'model', 'hash_of')} sha256 {h[:12]}…)" if h else ""), ""]
        tables += _table(rows, mine)
        tables.append("")
    md = [f"# {title}", "",
          f"{len(ok)} finished cell(s), {len(refused)} refused by their method, {len(failed)} failed; "
          f"generated {now()}.", "",
          "Protocol:", *_protocol_lines(records), *_reported_lines(reported or [], shown), "",
          "FLOPs/token are forward FLOPs at 2048 context; ratios are to the dense row. **Bold**: best "
          "value of its column among the cells with the same target, recovery budget and protocol (↓ lower is "
          "better, ↑ higher; size, time and memory columns: lower). Accuracies are ±1 standard error "
          "(sqrt(p(1−p)/(n−1)) per task; the average's assumes independent tasks), and every cell within "
          "2 standard errors of the difference (2·sqrt(se² + se_best²)) of the best is bold too: a tie.", ""]
    md += tables
    md += _lean_lines(ok)
    for name, path in (plots or {}).items():
        md += [f"![{name}]({path})", ""]
    if refused:
        md += ["## Refused cells", "", "The method cannot express these cells (it says why); they are answers, "
               "not errors.", "", "| model | method | target | recovery | reason |", "|---|---|---|---|---|"]
        md += [_cell_line(r, "error") for r in _sorted(refused)] + [""]
    if failed:
        md += ["## Failed cells", "", "| model | method | target | recovery | stage | error | cell |",
               "|---|---|---|---|---|---|---|"]
        md += [_cell_line(r, "stage", "error", "cell_id") for r in _sorted(failed)] + [""]
    return "\n".join(md)


# ---------------------------------------------------------------------------------- plots

#: A fixed colour and marker per method, the same in every report (methods not listed get one from a
#: hash of their name, also stable).
METHOD_STYLE: dict[str, tuple[str, str]] = {
    DENSE: ("black", "*"),
    "transact": ("#d62728", "o"),
    "llm_pruner": ("#1f77b4", "s"),
    "slicegpt": ("#2ca02c", "D"),
    "lorap": ("#9467bd", "^"),
    "depth": ("#8c564b", "v"),
    "magnitude": ("#7f7f7f", "P"),
    "random": ("#bcbd22", "X"),
}
_SPARE_COLOURS = ("#17becf", "#e377c2", "#ff7f0e", "#aec7e8", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94")
#: Markers for labels without a style of their own: none of the fixed methods' markers, and none that
#: reads as a circle at plot size, so a variant of TransAct ("o") never looks like TransAct itself.
_SPARE_MARKERS = "<>pd"
#: Spare markers too close at plot size to a fixed method's own (a thin diamond to SliceGPT's diamond).
_LOOKALIKE = {"D": "d", "o": "p"}


def _style(r: dict[str, Any]) -> tuple[str, str, str]:
    """Colour, marker and line style of a record's line: its label's own (solid); else, for a variant of
    a known method (``transact-auto``), the method's colour with another marker and a dashed line;
    else a stable pick from the name."""
    import zlib

    label, method = r.get("label") or r.get("method"), r.get("method")
    if label in METHOD_STYLE:
        return (*METHOD_STYLE[label], "-")
    h = zlib.crc32(str(label).encode())
    if method in METHOD_STYLE:
        colour, own = METHOD_STYLE[method]
        spare = [m for m in _SPARE_MARKERS if m != own and m not in _LOOKALIKE.get(own, "")]
        return colour, spare[h % len(spare)], "--"
    return _SPARE_COLOURS[h % len(_SPARE_COLOURS)], _SPARE_MARKERS[h % len(_SPARE_MARKERS)], "-"


@dataclass(frozen=True)
class _Axis:
    key: str  # file stem
    title: str
    value: Callable[[dict[str, Any]], float | None]
    smaller_is_better: bool  # for the Pareto front: a smaller model, or a faster one (False)
    percent: bool = True


def _speed(r: dict[str, Any]) -> float | None:
    if r.get("method") == DENSE:
        return 1.0 if r.get("latency") else None
    return _get(r, "latency", "speedup", "decode", "median")


#: The x axes every report draws PPL against (what a user constrains), as a share of the dense model.
AXES: tuple[_Axis, ...] = (
    _Axis("params", "parameters (% of dense)", lambda r: _get(r, "ratios", "params"), True),
    _Axis("flops", "FLOPs/token at 2048 context (% of dense)", lambda r: _get(r, "ratios", "flops"), True),
    _Axis("kv", "KV-cache bytes/token (% of dense)", lambda r: _get(r, "ratios", "kv"), True),
    _Axis("speed", "decode speed, batch 1 (× dense, measured)", _speed, False, percent=False),
)


def _primary_ppl(records: list[dict[str, Any]]) -> tuple[str, str] | None:
    """The perplexity every plot shows: WikiText-2 test at its longest context where measured (else the
    first source by name at its longest)."""
    keys = _ppl_keys(records)
    return keys[0] if keys else None


def pareto_front(points: list[tuple[float, float]], smaller_is_better: bool) -> list[tuple[float, float]]:
    """The points no other point beats on both x (smaller, or larger when ``smaller_is_better`` is
    False) and y (lower PPL), sorted by x: the curve of the best quality a method offers at each cost."""
    order = sorted(points, key=lambda p: (p[0] if smaller_is_better else -p[0], p[1]))
    front: list[tuple[float, float]] = []
    for x, y in order:
        if not front or y < front[-1][1]:
            front.append((x, y))
    return sorted(front)


def _recovered(r: dict[str, Any]) -> int:
    return int(_get(r, "recovery", "tokens") or 0)


#: Perplexities above this multiple of the dense model's are drawn on the plot's top edge (one note
#: says how many; the values are in the table), so the floors' 10⁶ do not squeeze the region a user
#: chooses in.
OFF_SCALE = 1000.0


def _draw_ppl(ax: Any, rows: list[dict[str, Any]], axis: _Axis, ppl: tuple[str, str]) -> None:
    """One panel: log PPL against ``axis``; per method, its unrecovered cells (filled) with their Pareto
    curve, and each recovered cell (hollow) with an arrow from the same cell before recovery."""
    s, n = ppl

    def plain(r: dict[str, Any]) -> float | None:
        v = _get(r, "ppl", s, n, "ppl")
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) and v > 0 else None

    scale = 100.0 if axis.percent else 1.0
    dense = [r for r in rows if r.get("method") == DENSE and plain(r) is not None]
    cap = OFF_SCALE * plain(dense[0]) if dense else math.inf

    def y_of(r: dict[str, Any]) -> float | None:
        v = plain(r)
        return None if v is None else min(v, cap)

    if dense:
        ax.axhline(y_of(dense[0]), color="black", lw=0.8, ls="--", zorder=1)
        x = axis.value(dense[0])
        if x is not None:
            ax.scatter([x * scale], [y_of(dense[0])], marker="*", s=140, color="black", zorder=4, label="dense")

    def points(cells: list[dict[str, Any]]) -> list[tuple[float, float, dict[str, Any]]]:
        xy = [(axis.value(r), y_of(r), r) for r in cells]
        return [(x * scale, y, r) for x, y, r in xy if x is not None and y is not None]

    labels = list(dict.fromkeys(r.get("label") or r.get("method") for r in rows if r.get("method") != DENSE))
    for lab in labels:
        mine = [r for r in rows if (r.get("label") or r.get("method")) == lab]
        colour, marker, line = _style(mine[0])
        before = points([r for r in mine if not _recovered(r)])
        after = points([r for r in mine if _recovered(r)])
        if before:
            ax.scatter([p[0] for p in before], [p[1] for p in before], color=colour, marker=marker, s=42,
                       zorder=3, label=lab)
            front = pareto_front([(x, y) for x, y, _ in before], axis.smaller_is_better)
            ax.plot([p[0] for p in front], [p[1] for p in front], color=colour, lw=1.3, ls=line, zorder=2)
        if after:
            ax.scatter([p[0] for p in after], [p[1] for p in after], facecolors="white", edgecolors=colour,
                       marker=marker, s=42, linewidths=1.4, zorder=3, label=f"{lab} (recovered)")
            start = {(r.get("target"), r.get("seed")): (x, y) for x, y, r in before}
            for x, y, r in after:
                src = start.get((r.get("target"), r.get("seed")))
                if src is not None:
                    ax.annotate("", xy=(x, y), xytext=src, zorder=2,
                                arrowprops={"arrowstyle": "->", "color": colour, "lw": 0.9, "alpha": 0.8})
    off = [r for r in rows if (plain(r) or 0) > cap and axis.value(r) is not None]
    if off:  # one note, not a label per cell (they overlap): the values are in the report's table
        ax.text(0.01, 0.985, f"{len(off)} cell(s) above {cap:,.0f} (= {OFF_SCALE:g}× dense) drawn on the top edge; "
                "values in report.md", transform=ax.transAxes, fontsize=6.5, va="top", ha="left", color="0.3")
    ax.set_yscale("log")
    if off:
        low = min((v for r in rows if (v := y_of(r)) is not None), default=cap / 10)
        ax.set_ylim(low / 1.5, cap * 1.6)
    ax.set_xlabel(axis.title)
    ax.set_ylabel(f"PPL {s}@{n} (log)")
    ax.grid(True, which="both", alpha=0.25)
    if not axis.smaller_is_better:
        ax.axvline(1.0, color="black", lw=0.6, ls=":", zorder=1)


def _draw_accuracy(ax: Any, rows: list[dict[str, Any]]) -> None:
    """Average accuracy against FLOPs with ±2 standard-error bars (what a tie means in the table)."""
    for lab in dict.fromkeys(r.get("label") or r.get("method") for r in rows):
        mine = [r for r in rows if (r.get("label") or r.get("method")) == lab and r.get("accuracy_avg") is not None
                and _get(r, "ratios", "flops") is not None]
        for rec in (False, True):
            pts = [r for r in mine if bool(_recovered(r)) == rec]
            if not pts:
                continue
            colour, marker, line = _style(pts[0])
            xs = [100 * r["ratios"]["flops"] for r in pts]
            ys = [r["accuracy_avg"] for r in pts]
            err = [2 * (average_stderr(r) or 0.0) for r in pts]
            bars = ax.errorbar(xs, ys, yerr=err, fmt=marker, color=colour, ms=6 if lab != DENSE else 11, capsize=3,
                               mfc="white" if rec else colour, lw=1, zorder=3,
                               label=f"{lab} (recovered)" if rec else lab)
            bars.lines[2][0].set_linestyle(line)
    ax.set_xlabel("FLOPs/token at 2048 context (% of dense)")
    ax.set_ylabel("accuracy, task average (bars: ±2 stderr)")
    ax.grid(True, alpha=0.25)


def recovery_series(rows: list[dict[str, Any]], ppl: tuple[str, str]) -> dict[tuple[Any, ...], list[tuple[int, float]]]:
    """Each pruned cell's perplexity against its recovery-training budget: ``{(label, target, mode,
    seed): [(tokens, ppl), ...]}`` sorted by tokens, for the cells measured at two budgets or more (the
    untrained cell, 0 tokens, starts every mode's series). Cells of one model only."""
    s, n = ppl
    found: dict[tuple[Any, ...], dict[int, float]] = {}
    untrained: dict[tuple[Any, ...], float] = {}
    for r in rows:
        v = _get(r, "ppl", s, n, "ppl")
        if r.get("method") == DENSE or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        cell = (r.get("label") or r.get("method"), r.get("target"))
        tokens, seed = _recovered(r), r.get("seed")
        if tokens:
            found.setdefault((*cell, _get(r, "recovery", "mode") or "full", seed), {})[tokens] = float(v)
        else:
            untrained[(*cell, seed)] = float(v)
    out = {}
    for (label, target, mode, seed), pts in found.items():
        start = untrained.get((label, target, seed))
        if start is not None:
            pts = {0: start, **pts}
        if len(pts) >= 2:
            out[(label, target, mode, seed)] = sorted(pts.items())
    return out


def _draw_recovery(ax: Any, rows: list[dict[str, Any]], series: dict[tuple[Any, ...], list[tuple[int, float]]],
                   ppl: tuple[str, str]) -> None:
    """Log PPL against the recovery budget, one line per series of :func:`recovery_series` (of ``rows``,
    one model's cells). The budgets sit at even steps (labelled with their token counts): the suites
    pick them a factor apart, and 0 tokens has no place on a log axis."""
    budgets = sorted({t for pts in series.values() for t, _ in pts})
    step = {t: i for i, t in enumerate(budgets)}
    targets = {k[1] for k in series}
    modes = {k[2] for k in series}
    drawn: set[str] = set()
    for (label, target, mode, _seed), pts in series.items():
        row = next(r for r in rows if (r.get("label") or r.get("method")) == label)
        colour, marker, line = _style(row)
        name = " ".join(str(x) for x in (label, target if len(targets) > 1 else None,
                                           mode if len(modes) > 1 else None) if x is not None)
        ax.plot([step[t] for t, _ in pts], [v for _, v in pts], color=colour, marker=marker, ls=line, lw=1.3,
                ms=6, zorder=3, label=None if name in drawn else name)
        drawn.add(name)
    s, n = ppl
    dense = [r for r in rows if r.get("method") == DENSE and isinstance(_get(r, "ppl", s, n, "ppl"), (int, float))]
    if dense:
        ax.axhline(_get(dense[0], "ppl", s, n, "ppl"), color="black", lw=0.8, ls="--", zorder=1, label="dense")
    ax.set_xticks(range(len(budgets)), ["none" if t == 0 else f"{t:,}" for t in budgets])
    ax.set_xlabel("recovery training tokens (even steps, not to scale)")
    ax.set_yscale("log")
    ax.set_ylabel(f"PPL {s}@{n} (log)")
    ax.grid(True, which="both", alpha=0.25)


def _legend(fig: Any, axes: list[Any]) -> None:
    seen: dict[str, Any] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(lab, h)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="center right", fontsize=8, frameon=False)


def _plots(records: list[dict[str, Any]], out: Path) -> dict[str, str]:
    """Draw every figure into ``out``: ``ppl_vs_<axis>.png`` (one panel per model), ``overview.png``
    (one row per model: PPL on the four axes, plus average accuracy where measured),
    ``ppl_vs_recovery.png`` when a cell was trained at two budgets or more (:func:`recovery_series`) and
    ``accuracy_vs_flops.png`` when any record has accuracies. Returns {caption: file name}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.get("status") == "ok"]
    ppl = _primary_ppl(ok)
    models = list(dict.fromkeys(_get(r, "model", "id") for r in ok))
    has_acc = any(r.get("accuracy_avg") is not None for r in ok)
    drawn: dict[str, str] = {}

    def save(fig: Any, name: str, caption: str) -> None:
        fig.tight_layout(rect=(0, 0, 1 - 1.9 / fig.get_size_inches()[0], 1))  # ~1.9 in on the right: the legend
        tmp = out / f"_{name}"
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        tmp.replace(out / name)
        drawn[caption] = name

    if ppl is not None:
        panels = [a for a in AXES if any(a.value(r) is not None and r.get("method") != DENSE for r in ok)]
        for axis in panels:
            fig, axes = plt.subplots(1, len(models), figsize=(6.2 * len(models) + 1.9, 4.8), squeeze=False)
            for ax, m in zip(axes[0], models, strict=True):
                _draw_ppl(ax, [r for r in ok if _get(r, "model", "id") == m], axis, ppl)
                ax.set_title(str(m))
            _legend(fig, list(axes[0]))
            save(fig, f"ppl_vs_{axis.key}.png", f"PPL {ppl[0]}@{ppl[1]} vs {axis.title}")
        ncol = len(panels) + (1 if has_acc else 0)
        fig, axes = plt.subplots(len(models), ncol, figsize=(4.6 * ncol + 1.9, 4.2 * len(models)), squeeze=False)
        for row, m in zip(axes, models, strict=True):
            mine = [r for r in ok if _get(r, "model", "id") == m]
            for ax, axis in zip(row, panels, strict=False):
                _draw_ppl(ax, mine, axis, ppl)
                ax.set_title(f"{m}: {axis.key}", fontsize=9)
            if has_acc:
                _draw_accuracy(row[-1], mine)
                row[-1].set_title(f"{m}: accuracy", fontsize=9)
        _legend(fig, [a for row in axes for a in row])
        save(fig, "overview.png", "overview: PPL on every axis" + (" and accuracy" if has_acc else ""))
    of_model = {m: [r for r in ok if _get(r, "model", "id") == m] for m in models}
    series = {m: recovery_series(of_model[m], ppl) for m in models} if ppl is not None else {}
    if any(series.values()):
        fig, axes = plt.subplots(1, len(models), figsize=(6.2 * len(models) + 1.9, 4.8), squeeze=False)
        for ax, m in zip(axes[0], models, strict=True):
            if series[m]:
                _draw_recovery(ax, of_model[m], series[m], ppl)
                ax.set_title(str(m))
            else:
                ax.set_axis_off()
                ax.set_title(f"{m}: no cell at two recovery budgets", fontsize=9)
        _legend(fig, list(axes[0]))
        save(fig, "ppl_vs_recovery.png", f"PPL {ppl[0]}@{ppl[1]} vs recovery training tokens")
    if has_acc:
        fig, axes = plt.subplots(1, len(models), figsize=(6.2 * len(models) + 1.9, 4.8), squeeze=False)
        for ax, m in zip(axes[0], models, strict=True):
            _draw_accuracy(ax, [r for r in ok if _get(r, "model", "id") == m])
            ax.set_title(str(m))
        _legend(fig, list(axes[0]))
        save(fig, "accuracy_vs_flops.png", "average accuracy (±2 stderr) vs FLOPs/token")
    return drawn


# ---------------------------------------------------------------------------------- output


#: What :func:`write_report` writes into its folder (besides ``_<name>.png`` temporaries).
PLOT_FILES = (*(f"ppl_vs_{a.key}.png" for a in AXES), "ppl_vs_recovery.png", "overview.png", "accuracy_vs_flops.png")
REPORT_FILES = ("report.md", "report.json", "report.csv", *PLOT_FILES, *(f"_{p}" for p in PLOT_FILES))


def write_report(records: list[dict[str, Any]], out: str | Path, *, title: str = "Benchmark report",
                 reported: list[Any] | None = None, inputs: Iterable[str | Path] = ()) -> dict[str, Path]:
    """Write ``report.md``, ``report.json``, ``report.csv`` and the figures of :func:`_plots` into ``out``
    (``reported``: published tables shown as *paper* rows next to matching cells, markdown only).

    ``inputs`` (the records files or folders read): none of them is ever replaced by a report file.
    Unlike a model folder, ``out`` may lie inside an input folder or hold one (the default
    ``<run>/report`` is inside the run): a report only writes the files of :data:`REPORT_FILES`
    there, and never deletes anything."""
    from compress.io.outpath import check_files_apart, resolved

    if not records:
        raise UsageError("no records to report")
    out = resolved(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder; choose another --out for the report")
    check_files_apart([out / name for name in REPORT_FILES], [("an input of the report", p) for p in inputs])
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    plots = _plots(records, out)
    for name in plots.values():
        files[f"plot_{name.removesuffix('.png')}"] = out / name
    md = render_markdown(records, title=title, plots=plots, reported=reported)
    files["markdown"] = out / "report.md"
    files["markdown"].write_text(md + "\n", encoding="utf-8")

    ok, refused, failed = (_sorted(part) for part in _by_status(records))
    rows = [flat_row(r) for r in ok + refused + failed]
    columns: list[str] = []
    for row in rows:
        for k in row:
            if k not in columns:
                columns.append(k)
    files["csv"] = out / "report.csv"
    with open(files["csv"], "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    files["json"] = out / "report.json"
    doc = {"title": title, "generated_at": now(), "protocol": _protocol_lines(records),
           "columns": columns, "rows": rows[:len(ok)], "refused": rows[len(ok):len(ok) + len(refused)],
           "failed": rows[len(ok) + len(refused):]}
    files["json"].write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    return files
