"""LLM-Pruner on SmolLM2-135M, CPU.

    python benchmarks/llm_pruner_smollm2.py [--part rows|cost|all] [--lora-tokens N] [--full]

* ``rows``: dense; at 80 % and 60 % of the parameters, LLM-Pruner with element¹, element² and vector
  importance (official defaults: 10 × 64 calibration tokens, layers 4..28 of 30, local pruning, whole KV
  groups) against the ``magnitude`` floor (uniform widths over all layers, whole KV groups); and
  element¹ followed by a small LoRA recovery (official adapter: r=8, α=16, dropout 0.05 on
  q,k,v,o,gate,up,down, lr 1e-4; budget ``--lora-tokens`` of WikiText-2 valid text at seq_len 256,
  batch 4), merged before measuring.
* ``cost``: Taylor scoring time (gradients + group scores) divided by a plain no-grad forward over the
  same 10 × 64 tokens, for element¹/vector (one backward) and element² (ten per-sample backwards);
  wall-clock and CPU time, one torch thread.

Calibration and recovery text: WikiText-2 valid (the run default; the paper used BookCorpus).
Perplexity follows ``benchmarks/common.py``. Finished rows are cached (``--cache``) so an interrupted
run resumes. Results: ``benchmarks/results/llm_pruner_smollm2.{jsonl,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

TARGETS = ("80%", "60%")
LORA = {"seq_len": 256, "batch_size": 4}


def _cells(lora_tokens: int) -> list[dict]:
    cells: list[dict] = [{"label": "dense"}]
    for tgt in TARGETS:
        for imp in ("element1", "element2", "vector"):
            cells.append({"label": f"llm_pruner {imp}", "method": "llm_pruner", "target": tgt,
                          "settings": {"importance": imp}})
        cells.append({"label": "magnitude (floor)", "method": "magnitude", "target": tgt})
        cells.append({"label": f"llm_pruner element1 + LoRA {lora_tokens // 1000}k", "method": "llm_pruner",
                      "target": tgt, "settings": {"importance": "element1"}, "recover_tokens": lora_tokens})
    return cells


def rows(lora_tokens: int, full: bool, cache: Path) -> list[dict]:
    done: dict[str, dict] = {}
    if cache.is_file():
        for line in cache.read_text().splitlines():
            r = json.loads(line)
            done[r["_key"]] = r
    out = []
    for cell in _cells(lora_tokens):
        key = json.dumps(cell, sort_keys=True) + f"|full={full}"
        if key in done:
            out.append(done[key])
            continue
        t = time.process_time()
        if cell["label"] == "dense":
            row = common.dense_row(full=full)
        else:
            rt = cell.get("recover_tokens", 0)
            row = common.prune_row(cell["method"], cell["target"], settings=cell.get("settings"),
                                   recover_tokens=rt, recover_mode="lora",
                                   recover_settings=LORA if rt else None, full=full, label=cell["label"])
        row["cpu_s"] = round(time.process_time() - t, 1)
        row["_key"] = key
        with cache.open("a") as f:
            f.write(json.dumps(row, sort_keys=True, default=str) + "\n")
        print({k: row.get(k) for k in ("method", "target", "params", "ppl2048", "ppl128", "cpu_s")}, flush=True)
        out.append(row)
    return out


def cost(repeats: int = 2) -> dict:
    from compress_baselines.llm_pruner import LLMPruner, group_scores, scored_members, taylor_gradients

    from compress import structure_group
    from compress.calib.sources import CalibrationSource
    from compress.io.loading import load_model
    from compress.model.footprint import model_bytes
    from compress.plugins import get_registry
    from compress.probes import track_peak_rss

    lm = load_model(common.smollm2_path())
    model, tok = lm.model.eval(), lm.tokenizer
    arch = get_registry().adapter_for(model)
    pruner = LLMPruner()
    cfg = pruner.config
    tokens = CalibrationSource.from_spec("wikitext2", tok, seed=0).batches(cfg.calib_samples, cfg.calib_seq_len)
    attn, mlp = pruner.layer_ranges(arch.num_layers)
    groups = [(structure_group(arch, "kv_group", i), arch.geometry(i).head_dim) for i in attn]
    groups += [(structure_group(arch, "mlp", i), 1) for i in mlp]
    params = list({id(m.param): m.param for g, _ in groups for m in scored_members(g)}.values())

    def timed(fn) -> tuple[float, float]:
        best_w, best_c = float("inf"), float("inf")
        for _ in range(repeats):
            w, c = time.perf_counter(), time.process_time()
            fn()
            best_w, best_c = min(best_w, time.perf_counter() - w), min(best_c, time.process_time() - c)
        return best_w, best_c

    def forward() -> None:
        with torch.no_grad():
            model(input_ids=tokens, use_cache=False)

    def score(criterion: str) -> None:
        g1, f = taylor_gradients(model, params, tokens, first_order=criterion != "element2",
                                 fisher=criterion in ("element2", "param_mix"), batch_size=cfg.calib_batch_size)
        for g, c in groups:
            group_scores(g, criterion, g1, f, channels_per_unit=c)

    forward()  # warm-up
    fw, fc = timed(forward)
    row: dict = {"tokens": int(tokens.numel()), "torch_threads": torch.get_num_threads(),
                 "plain_forward_wall_s": round(fw, 3), "plain_forward_cpu_s": round(fc, 3),
                 "model_bytes": model_bytes(model), "scored_params": sum(p.numel() for p in params)}
    for crit in ("element1", "element2"):
        sw, sc = timed(lambda c=crit: score(c))
        _release_memory()
        with track_peak_rss() as rss:  # one more run, alone, for the memory the scoring adds
            score(crit)
        row[f"{crit}_rss_start_bytes"] = rss.start_bytes
        row[f"{crit}_rss_increase_bytes"] = rss.increase_bytes
        row[f"{crit}_rss_method"] = rss.method
        row[f"{crit}_wall_s"] = round(sw, 3)
        row[f"{crit}_cpu_s"] = round(sc, 3)
        row[f"{crit}_over_forward_wall"] = round(sw / fw, 3)
        row[f"{crit}_over_forward_cpu"] = round(sc / fc, 3)
        row[f"{crit}_peak_rss_bytes"] = rss.peak_bytes
    print(row, flush=True)
    return row


def _release_memory() -> None:
    """Return freed heap to the OS so that an RSS increase is the block's own (glibc keeps it otherwise)."""
    import contextlib
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _md_cost(row: dict) -> str:
    lines = ["", "Scoring cost (10 × 64 tokens, 1 torch thread, best of 2; vector shares element¹'s single backward):", "",
             "| importance | backward passes | scoring wall s | scoring CPU s | ÷ forward (wall) | ÷ forward (CPU) |"
             " RSS before MiB | RSS added by scoring MiB |", "|---|---|---|---|---|---|---|---|"]
    for crit, passes in (("element1", "1 (batch of 10)"), ("element2", "10 (per sample)")):
        lines.append(f"| {crit} | {passes} | {row[f'{crit}_wall_s']} | {row[f'{crit}_cpu_s']} | "
                     f"{row[f'{crit}_over_forward_wall']} | {row[f'{crit}_over_forward_cpu']} | "
                     f"{row[f'{crit}_rss_start_bytes'] / 2**20:.0f} | "
                     f"{row[f'{crit}_rss_increase_bytes'] / 2**20:.0f} |")
    lines.append(f"\nPlain no-grad forward over the same tokens: {row['plain_forward_wall_s']} s wall, "
                 f"{row['plain_forward_cpu_s']} s CPU. Model weights: {row['model_bytes'] / 2**20:.0f} MiB (fp32); "
                 f"gradients are kept for the {row['scored_params']:,} scored weights only.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", default="all", choices=("rows", "cost", "all"))
    ap.add_argument("--full", action="store_true", help="full WikiText-2 test set (slow)")
    ap.add_argument("--lora-tokens", type=int, default=50_000)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/llm_pruner_smollm2_cache.jsonl"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    pre = ("LLM-Pruner on SmolLM2-135M-Instruct (Q4_1 → fp32), CPU, one torch thread. Calibration: 10 × 64 tokens "
           "of WikiText-2 valid (official count and length; the paper used BookCorpus); layers 4..28 of 30 "
           "(official 4..30 of 32, scaled); local pruning; whole KV groups (3 per layer) and MLP channels. "
           "`magnitude` is the naive floor (uniform widths over ALL layers). LoRA: official adapter "
           f"(r=8, α=16, dropout 0.05, lr 1e-4) on {a.lora_tokens:,} WikiText-2 valid tokens, seq_len 256, "
           "batch 4, merged. PPL on the first 32,768 WikiText-2 test tokens (16×2048, 256×128 windows) unless "
           "stated. prune_s includes the gradient pass. peak_rss_mib is the process's peak while pruning; one process "
           "runs every row in turn, so after the first rows it mostly reflects what earlier evaluations left in "
           "the allocator — the scoring cost table below isolates the memory the gradient pass adds.")
    jl = common.RESULTS / "llm_pruner_smollm2.jsonl"
    existing = [json.loads(x) for x in jl.read_text().splitlines()] if jl.is_file() else []
    out_rows = [r for r in existing if r.get("kind") != "cost"]
    cost_row = next((r for r in existing if r.get("kind") == "cost"), None)
    if a.part in ("rows", "all"):
        out_rows = [{k: v for k, v in r.items() if k != "_key"} for r in rows(a.lora_tokens, a.full, a.cache)]
    if a.part in ("cost", "all"):
        cost_row = {"kind": "cost", **cost()}
    md = common.write_results(
        "llm_pruner_smollm2", out_rows, preamble=pre,
        columns=["method", "target", "params", "ratios.params", "ratios.flops", "ratios.kv", "recover_tokens",
                 "ppl2048", "ppl128", "prune_s", "peak_rss_mib"])
    if cost_row is not None:
        jl.write_text("".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in [*out_rows, cost_row]))
        md.write_text(md.read_text() + _md_cost(cost_row))

if __name__ == "__main__":
    main()
