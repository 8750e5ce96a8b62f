"""Turn benchmark records into a markdown table, JSON, CSV and accuracy-vs-cost plots.

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
    return sorted(keys, key=lambda k: (k[0], -int(k[1]) if k[1].isdigit() else 0))


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
    row.update({
        "accuracy_avg": r.get("accuracy_avg"),
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
        cols.append(_Col(f"{task} {metric} ↑", lambda r, t=task: _get(r, "tasks", t, "score"), _num(".3f"), "max"))
    if tasks:
        cols.append(_Col("avg ↑", lambda r: r.get("accuracy_avg"), _num(".3f"), "max"))
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
            best[k] = v if cur is None else (min(cur, v) if c.better == "min" else max(cur, v))
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
            # ties as displayed are all bold (0.021 s and 0.028 s both show as 0.0)
            if c.better and not r.get("_paper") and counts.get(k, 0) >= 2 and (v == best[k]
                                                                               or text == c.fmt(best[k], r)):
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


def render_markdown(records: list[dict[str, Any]], *, title: str = "Benchmark report",
                    plots: dict[str, str] | None = None, reported: list[Any] | None = None) -> str:
    """The markdown report of ``records`` (latest record per cell); ``reported`` tables
    (:func:`compress.bench.reported.load_reported`) add *paper* rows next to matching cells."""
    ok = [r for r in records if r.get("status") == "ok"]
    failed = [r for r in records if r.get("status") != "ok"]
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
          f"{len(ok)} finished cell(s), {len(failed)} failed; generated {now()}.", "",
          "Protocol:", *_protocol_lines(records), *_reported_lines(reported or [], shown), "",
          "FLOPs/token are forward FLOPs at 2048 context; ratios are to the dense row. **Bold**: best "
          "value of its column among the cells with the same target, recovery budget and protocol (↓ lower is "
          "better, ↑ higher; size, time and memory columns: lower).", ""]
    md += tables
    for name, path in (plots or {}).items():
        md += [f"![{name}]({path})", ""]
    if failed:
        md += ["## Failed cells", "", "| model | method | target | recovery | stage | error | cell |",
               "|---|---|---|---|---|---|---|"]
        for r in _sorted(failed):
            err = str(r.get("error") or "").replace("|", "\\|")
            md.append(f"| {_get(r, 'model', 'id')} | {r.get('label') or r.get('method')} | {r.get('target')} | "
                      f"{RecoverySpec(**(r.get('recovery') or {})).short()} | {r.get('stage')} | {err} | "
                      f"{r.get('cell_id')} |")
        md.append("")
    return "\n".join(md)


# ---------------------------------------------------------------------------------- plots


def _plot(records: list[dict[str, Any]], x_key: str, x_label: str, path: Path) -> str | None:
    """Accuracy average (or the first perplexity when no record has accuracies) against ``x_key``;
    one subplot per model, one marker per method. Returns the y metric's name, None if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.get("status") == "ok" and _get(r, "achieved", x_key) is not None]
    if not ok:
        return None
    if any(r.get("accuracy_avg") is not None for r in ok):
        y_name, y_of, log_y = "accuracy (avg)", (lambda r: r.get("accuracy_avg")), False
    else:
        keys = _ppl_keys(ok)
        if not keys:
            return None
        s, n = keys[0]
        y_name, y_of, log_y = f"PPL {s}@{n}", (lambda r: _get(r, "ppl", s, n, "ppl")), True
    models = list(dict.fromkeys(_get(r, "model", "id") for r in ok))
    labels = list(dict.fromkeys(r.get("label") or r.get("method") for r in ok))
    markers = "osD^vP<>Xph*"
    colors = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, m in zip(axes[0], models, strict=True):
        for li, lab in enumerate(labels):
            pts = [(r, _get(r, "achieved", x_key), y_of(r)) for r in ok
                   if _get(r, "model", "id") == m and (r.get("label") or r.get("method")) == lab]
            pts = [p for p in pts if p[1] is not None and p[2] is not None]
            if not pts:
                continue
            dense = pts[0][0].get("method") == DENSE
            ax.scatter([p[1] for p in pts], [p[2] for p in pts], label=lab, s=80 if dense else 40,
                       marker="*" if dense else markers[li % len(markers)],
                       color="black" if dense else colors(li % 10), zorder=3)
            for r, x, y in pts:
                if not dense:
                    rec = RecoverySpec(**(r.get("recovery") or {}))
                    ax.annotate(r.get("target", "") + (f" +{rec.short()}" if rec.tokens else ""), (x, y),
                                fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_title(str(m))
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_name)
        if log_y:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return y_name


# ---------------------------------------------------------------------------------- output


#: What :func:`write_report` writes into its folder (besides ``_plot_*.png`` temporaries).
REPORT_FILES = ("report.md", "report.json", "report.csv", "accuracy_vs_flops.png", "accuracy_vs_kv.png",
                "ppl_vs_flops.png", "ppl_vs_kv.png", "_plot_flops.png", "_plot_kv.png")


def write_report(records: list[dict[str, Any]], out: str | Path, *, title: str = "Benchmark report",
                 reported: list[Any] | None = None, inputs: Iterable[str | Path] = ()) -> dict[str, Path]:
    """Write ``report.md``, ``report.json``, ``report.csv`` and the two plots into ``out``
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
    plots: dict[str, str] = {}
    for key, x_label, stem in (("flops_per_token", "FLOPs/token (2048 context)", "flops"),
                               ("kv_bytes_per_token", "KV-cache bytes/token", "kv")):
        tmp = out / f"_plot_{stem}.png"
        y = _plot(records, key, x_label, tmp)
        if y is None:
            continue
        name = f"{'accuracy' if y.startswith('accuracy') else 'ppl'}_vs_{stem}.png"
        tmp.replace(out / name)
        files[f"plot_{stem}"] = out / name
        plots[f"{y} vs {x_label}"] = name
    md = render_markdown(records, title=title, plots=plots, reported=reported)
    files["markdown"] = out / "report.md"
    files["markdown"].write_text(md + "\n", encoding="utf-8")

    ok = _sorted([r for r in records if r.get("status") == "ok"])
    failed = _sorted([r for r in records if r.get("status") != "ok"])
    rows = [flat_row(r) for r in ok + failed]
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
           "columns": columns, "rows": [flat_row(r) for r in ok], "failed": [flat_row(r) for r in failed]}
    files["json"].write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    return files
