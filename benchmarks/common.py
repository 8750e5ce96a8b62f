"""Shared protocol of the per-method SmolLM2-135M reports (``benchmarks/<method>_smollm2.py``).

Every method is measured the same way so rows can be compared:

* model: SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32) from ``$COMPRESS_ASSETS``;
* pruning: ``compress.pipeline.run.run`` — the same code path as ``compress run``;
* perplexity: WikiText-2 test, the pruning papers' protocol (rows joined with blank lines,
  non-overlapping windows, no BOS) at 2048 and 128 context. On 2 CPU cores the full test set takes
  ~10 min per context per model, so the default is the first 32,768 tokens (16 windows of 2048,
  256 windows of 128) — ``PPL_WINDOWS``; ``--full`` evaluates every window. Every record says which.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

PPL_WINDOWS = {2048: 16, 128: 256}
if os.environ.get("COMPRESS_BENCH_QUICK"):  # half the tokens (16,384) when CPU time is scarce; recorded per row
    PPL_WINDOWS = {2048: 8, 128: 128}
if os.environ.get("COMPRESS_BENCH_THREADS"):
    import torch

    torch.set_num_threads(int(os.environ["COMPRESS_BENCH_THREADS"]))
RESULTS = Path(__file__).resolve().parent / "results"


def smollm2_path() -> str:
    assets = os.environ.get("COMPRESS_ASSETS")
    if not assets:
        raise SystemExit("set COMPRESS_ASSETS to the shared assets folder (e.g. ../shared/assets)")
    return str(Path(assets) / "models" / "smollm2-135m-instruct-q4_1")


def qwen2_path() -> str:
    """Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M), fetched once into the cache
    (:func:`compress.testing.qwen2_gguf`)."""
    from compress.testing import qwen2_gguf

    path, why = qwen2_gguf()
    if path is None:
        raise SystemExit(why)
    return str(path)


_TEXT: str | None = None


def wikitext_ppl(model, tokenizer, *, full: bool = False, windows: dict[int, int] | None = None) -> dict[str, Any]:
    """PPL on WikiText-2 test at each context of ``windows`` (context -> number of windows; default
    :data:`PPL_WINDOWS`, 2048 and 128 on the first 32,768 tokens), every window if ``full``."""
    global _TEXT
    from compress.evaluate.perplexity import perplexity, wikitext2_text

    if _TEXT is None:
        _TEXT = wikitext2_text("test")
    out: dict[str, Any] = {}
    for L, n in (windows or PPL_WINDOWS).items():
        r = perplexity(model, tokenizer, _TEXT, seq_len=L, max_windows=None if full else n,
                       batch_size=1 if L > 512 else 16, progress=False)
        out[f"ppl{L}"] = round(r["ppl"], 4)
        out[f"ppl{L}_windows"] = r["windows"]
    return out


def dense_row(*, full: bool = False, model: str | None = None, windows: dict[int, int] | None = None) -> dict[str, Any]:
    """The dense row of ``model`` (default SmolLM2) in fp32."""
    from compress.io.loading import load_model
    from compress.model.footprint import footprint

    lm = load_model(model or smollm2_path(), dtype="float32")
    fp = footprint(lm.model)
    return {"method": "dense", "target": "100%", "params": fp.params, "flops_per_token": fp.flops_per_token,
            "kv_bytes_per_token": fp.kv_bytes_per_token,
            **wikitext_ppl(lm.model, lm.tokenizer, full=full, windows=windows)}


def prune_row(method: str, target: str, *, settings: dict | None = None, seed: int = 0, calib: str | None = None,
              recover_tokens: int = 0, recover_mode: str = "full", recover_settings: dict | None = None,
              full: bool = False, label: str | None = None, model: str | None = None,
              windows: dict[int, int] | None = None, keep: list | None = None) -> dict[str, Any]:
    """Prune ``model`` (default SmolLM2) with ``compress.pipeline.run.run`` (no export) and measure it.
    ``keep``, a list, receives the pruned model (for diagnostics on it)."""
    from compress.pipeline.run import RunSpec, run

    path = model or smollm2_path()
    spec = RunSpec(method=method, target=target, model=path, seed=seed, calib=calib, dtype="float32",
                   settings=dict(settings or {}), recover_tokens=recover_tokens, recover_mode=recover_mode,
                   recover_settings=dict(recover_settings or {}), progress=False)
    t = time.perf_counter()
    result = run(spec, log=lambda m: None)
    wall = time.perf_counter() - t
    pruned, rec, tok = result.model, result.record, result.tokenizer
    row = {
        "method": label or method,
        "target": target,
        "settings": settings or {},
        "recover_tokens": recover_tokens,
        "params": rec["achieved"]["params"],
        "flops_per_token": rec["achieved"]["flops_per_token"],
        "kv_bytes_per_token": rec["achieved"]["kv_bytes_per_token"],
        "ratios": rec["ratios"],
        "prune_s": rec["timing_s"]["prune"],
        "wall_s": round(wall, 1),
        "peak_rss_bytes": rec["peak_rss_bytes"],
        "notes": rec.get("notes"),
        "recovery": rec.get("recovery"),
        "recovery_result": rec.get("recovery_result"),
        **wikitext_ppl(pruned, tok, full=full, windows=windows),
    }
    if keep is not None:
        keep.append(pruned)
    return row


def read_rows(name: str) -> list[dict[str, Any]]:
    """The rows already in ``results/<name>.jsonl`` (none when it does not exist): a script resumes from them."""
    path = RESULTS / f"{name}.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def bench_records(folder: Path) -> list[dict[str, Any]]:
    """The latest record of every cell in ``folder/records.jsonl`` of ``compress bench`` (none if absent)."""
    from compress.bench import read_records
    from compress.bench.runner import RECORDS, latest_by_cell

    path = folder / RECORDS
    return list(latest_by_cell(read_records(path)).values()) if path.exists() else []


def fmt_ppl(x: float) -> str:
    """A perplexity for a table: one decimal with thousands separators, 3 significant digits from 10^4."""
    return "—" if not math.isfinite(x) else (f"{x:,.1f}" if x < 1e4 else f"{x:.3g}")


def lorap_sizing(row: dict[str, Any]) -> None:
    """LoRAP's solved s, q/k/v/o ranks (``d`` = dense) and MLP channels as columns of ``row``, from the
    run's ``notes.sizing``; nothing for a method without one."""
    sizing = (row.get("notes") or {}).get("sizing")
    if sizing:
        row["sparsity"] = sizing["sparsity"]
        row["ranks"] = "/".join("d" if sizing["ranks"][n] is None else str(sizing["ranks"][n])
                                for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        row["mlp_channels"] = sizing["mlp_channels"]


def doc_without_usage(doc: str | None) -> str:
    """A benchmark script's docstring as the preamble of its results file: every paragraph but the
    ``Usage:`` one."""
    return "\n\n".join(p for p in (doc or "").strip().split("\n\n") if not p.startswith("Usage"))


def write_results(name: str, rows: list[dict[str, Any]], columns: list[str] | None = None,
                  preamble: str = "") -> Path:
    """``results/<name>.jsonl`` and a markdown table ``results/<name>.md``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    jl = RESULTS / f"{name}.jsonl"
    jl.write_text("".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in rows))
    cols = columns or ["method", "target", "params", "ratios.params", "ratios.flops", "ratios.kv", "ppl2048",
                       "ppl128", "prune_s", "peak_rss_mib"]

    def get(r: dict, c: str):
        if c == "peak_rss_mib":
            v = r.get("peak_rss_bytes")
            return f"{v / 2**20:.0f}" if v else ""
        cur: Any = r
        for part in c.split("."):
            cur = cur.get(part) if isinstance(cur, dict) else None
        if isinstance(cur, float):
            return f"{cur:.4g}" if not c.startswith("ratios") else f"{cur:.1%}"
        if isinstance(cur, int) and c == "params":
            return f"{cur:,}"
        return "" if cur is None else str(cur)

    lines = [preamble.strip(), ""] if preamble.strip() else []
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(get(r, c) for c in cols) + " |" for r in rows]
    md = RESULTS / f"{name}.md"
    md.write_text("\n".join(lines) + "\n")
    return md
