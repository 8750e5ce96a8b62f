"""TransAct on SmolLM2-135M, CPU.

    python benchmarks/transact_smollm2.py [--part floors|shots|cost|all] [--full]

* ``floors``: dense vs TransAct one-shot (gqa=groups and gqa=heads) at 80/60/40 % of parameters vs the
  ``magnitude`` and ``random`` floors at the same widths (the same solver gives the same achieved size).
* ``shots``: one-shot vs K=4 shots with training after each shot vs one-shot + the same total training
  budget after pruning (all at 60 %).
* ``cost``: TransAct scoring time / a plain no-grad forward over the same tokens, and peak RSS / model bytes.

Calibration for the benchmark is 32 × 512 tokens of WikiText-2 valid (the default 128 × 2048 takes
~10 min per scoring pass on 2 CPU cores); perplexity follows ``benchmarks/common.py``.
Results: ``benchmarks/results/transact_smollm2*.{jsonl,md}``.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

CALIB = {"calib_samples": 32, "calib_seq_len": 512}
TARGETS = ("80%", "60%", "40%")


def floors(full: bool) -> list[dict]:
    rows = [common.dense_row(full=full)]
    for tgt in TARGETS:
        for gqa in (("groups",) if tgt == "80%" else ("groups", "heads")):
            rows.append(common.prune_row("transact", tgt, settings={**CALIB, "gqa": gqa},
                                         label=f"transact (gqa={gqa})", full=full))
            print(rows[-1], flush=True)
        for m in ("magnitude", "random"):
            rows.append(common.prune_row(m, tgt, full=full))
            print(rows[-1], flush=True)
    return rows


#: The three arms of the shots experiment, as ``--arms`` names them.
ARMS = ("one-shot", "shots", "after")


def shots(full: bool, per_shot: int, gqa: str, arms: tuple[str, ...] = ARMS) -> list[dict]:
    """The three arms at 60 %; the arms not in ``arms`` are kept from the committed rows (same label).
    MLP widths exact and attention rounded down, as every committed row was run (the defaults of today
    round MLP widths to 32), so that a re-run arm differs from the others only by what changed."""
    # the same recipe in both arms: RecoveryConfig defaults (full training, seq 512, batch 4, lr 5e-5,
    # cosine with 10 % warm-up per call); the shots arm ramps the lr per shot as the official code does
    rec = {"lr": 5e-5}
    K = 4
    base = {**CALIB, "gqa": gqa, "mlp_round_to": 1, "attn_round": "down"}
    spec = {
        "one-shot": dict(settings=base, label="one-shot, no training"),
        "shots": dict(settings={**base, "shots": K, "recover_tokens_per_shot": per_shot, "recover_lr": 5e-5},
                      recover_settings=rec, label=f"K={K} shots, {per_shot} tok/shot (avg)"),
        "after": dict(settings=base, recover_tokens=K * per_shot, recover_settings=rec,
                      label=f"one-shot + {K * per_shot} tok after"),
    }
    old = {r["method"]: r for r in common.read_rows("transact_smollm2_shots")}
    for r in old.values():  # a kept row must share the protocol of the rows run now
        windows = {n: r.get(f"ppl{n}_windows") for n in common.PPL_WINDOWS}
        if not full and any(arm not in arms for arm in ARMS) and windows != common.PPL_WINDOWS:
            raise SystemExit(f"error: the committed row {r['method']!r} was evaluated on {windows} windows, this run "
                             f"on {common.PPL_WINDOWS}; set COMPRESS_BENCH_QUICK=1 (or unset it) to match, or run "
                             "every arm (--arms one-shot,shots,after)")
    rows = []
    for arm in ARMS:
        if arm not in arms and spec[arm]["label"] in old:
            rows.append(old[spec[arm]["label"]])
            continue
        r = common.prune_row("transact", "60%", full=full, **spec[arm])
        r["trained_tokens"] = trained_tokens(r)
        print(r, flush=True)
        rows.append(r)
    for r in rows:
        r["schedule"] = schedule(r)
    return rows


def schedule(row: dict) -> str:
    """The per-shot widths of a row: KV groups (or heads) and MLP channels after each shot."""
    shots = (row.get("notes") or {}).get("shots") or []
    return " → ".join(f"{s['attn_units']}/{s['mlp']}" for s in shots)


def trained_tokens(row: dict) -> int:
    """Tokens actually trained on: between the shots (whole optimizer steps of the official ramp
    1/2 .. 3/2 of the average) plus the recovery after pruning."""
    between = sum(s.get("recovery", {}).get("tokens", 0) for s in (row.get("notes") or {}).get("shots", []))
    return between + ((row.get("recovery") or {}).get("tokens") or 0)


SHOTS_NOTE = (" Training (both arms): full parameters, seq 512, batch 4 (2,048 tokens per optimizer step, so budgets "
              "round up to whole steps), base LR 5e-5 with cosine decay and 10 % warm-up in every call; the shots arm "
              "splits its budget with the official ramp (1/2 .. 3/2 of the average per shot) and LR ramp "
              "(5e-5 · 2i/K), on one continuing stream of WikiText-2 validation text "
              "(the `wikitext2` calibration source); `trained_tokens` is what each arm actually trained on. "
              "`schedule`: KV groups / MLP channels after each shot; the shots arm follows the official rounding "
              "(the attention width rounded up to whole units after every shot and carried on from there). "
              "The first run of this experiment (2026-11-22) carried the unrounded width instead — 3/1362 → 2/1188 → "
              "2/1014 → 1/839, PPL@2048 189.9, @128 248.6 — and was replaced by the row above "
              "(`COMPRESS_BENCH_QUICK=1 python benchmarks/transact_smollm2.py --part shots --per-shot 16000 --arms shots`).")


def cost() -> dict:
    import torch
    from compress_transact.transact import TransActPruner

    from compress.calib.runner import run_calibration
    from compress.calib.sources import CalibrationSource
    from compress.io.loading import load_model
    from compress.model.footprint import model_bytes
    from compress.plugins import get_registry
    from compress.probes import track_peak_rss
    from compress.pruner import PruneContext

    lm = load_model(common.smollm2_path())
    model, tok = lm.model, lm.tokenizer
    arch = get_registry().adapter_for(model)
    src = CalibrationSource.from_spec("wikitext2", tok, seed=0)
    batches = src.batches(CALIB["calib_samples"], CALIB["calib_seq_len"])
    pruner = TransActPruner(CALIB)
    ctx = PruneContext(arch=arch, tokenizer=tok, calibration=src, progress=False, log=lambda m: None)
    run_calibration(model, batches[:4], batch_size=4, progress=False)  # warm-up
    gc.collect()
    plain, scored = [], []
    for _ in range(2):
        t = time.perf_counter()
        run_calibration(model, batches, batch_size=pruner.config.calib_batch_size, progress=False, logits=True)
        plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        with track_peak_rss() as rss:
            pruner.collect(model, ctx, batches)
        scored.append(time.perf_counter() - t)
    mb = model_bytes(model)
    # peak RSS of a whole prune relative to the model's bytes (the process also holds torch/transformers)
    import os

    import psutil

    base_rss = psutil.Process(os.getpid()).memory_info().rss
    with track_peak_rss() as whole:
        from compress.target import Target

        pruner.prune(model, Target.parse("60%"), ctx)
    row = {
        "tokens": int(batches.numel()),
        "plain_forward_s": round(min(plain), 3),
        "scoring_s": round(min(scored), 3),
        "scoring_over_forward": round(min(scored) / min(plain), 3),
        "model_bytes": mb,
        "scoring_peak_increase_bytes": rss.increase_bytes,
        "prune_peak_rss_bytes": whole.peak_bytes,
        "rss_before_prune_bytes": base_rss,
        "peak_rss_over_model_bytes": round(whole.peak_bytes / mb, 3),
        "peak_increase_over_model_bytes": round((whole.peak_bytes - base_rss) / mb, 3),
        "torch_threads": torch.get_num_threads(),
    }
    print(row, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", default="all", choices=("floors", "shots", "cost", "all"))
    ap.add_argument("--full", action="store_true", help="full WikiText-2 test set (slow)")
    ap.add_argument("--per-shot", type=int, default=40_000)
    ap.add_argument("--gqa", default="groups")
    ap.add_argument("--arms", default=",".join(ARMS),
                    help="shots part: the arms to run (comma list of one-shot, shots, after); the others are "
                    "kept from the committed rows")
    a = ap.parse_args()
    arms = tuple(x.strip() for x in a.arms.split(",") if x.strip())
    if not arms or set(arms) - set(ARMS):
        ap.error(f"--arms: choose from {', '.join(ARMS)}, got {a.arms!r}")
    n2048, n128 = common.PPL_WINDOWS[2048], common.PPL_WINDOWS[128]
    pre = ("SmolLM2-135M-Instruct (Q4_1 → fp32), CPU. TransAct calibration 32×512 tokens of WikiText-2 valid; "
           f"PPL on the first {n2048 * 2048:,} WikiText-2 test tokens ({n2048}×2048 and {n128}×128 windows; "
           "`ppl*_windows` columns), no BOS, rows joined by blank lines.")
    if a.part in ("floors", "all"):
        common.write_results("transact_smollm2_floors", floors(a.full), preamble=pre)
    if a.part in ("shots", "all"):
        common.write_results("transact_smollm2_shots", shots(a.full, a.per_shot, a.gqa, arms),
                             preamble=pre + SHOTS_NOTE,
                             columns=["method", "target", "params", "ratios.params", "schedule", "trained_tokens",
                                      "ppl2048", "ppl128", "prune_s", "wall_s"])
    if a.part in ("cost", "all"):
        row = cost()
        common.write_results("transact_smollm2_cost", [row], preamble=pre + " Cost of scoring vs a plain forward.",
                             columns=["tokens", "plain_forward_s", "scoring_s", "scoring_over_forward",
                                      "model_bytes", "prune_peak_rss_bytes", "peak_rss_over_model_bytes",
                                      "peak_increase_over_model_bytes"])


if __name__ == "__main__":
    main()
