"""SliceGPT on SmolLM2-135M: the paper's sparsities and common params targets, vs the magnitude floor.

Usage::

    COMPRESS_ASSETS=/work/shared/assets .venv/bin/python benchmarks/slicegpt_smollm2.py [--samples N] [--full]

Rows (shared protocol of ``benchmarks/common.py``: WikiText-2 test PPL at 2048 and 128 context):

* ``dense``;
* ``slicegpt`` at the official ``--sparsity`` 0.2 / 0.25 / 0.3 (d' = int((1−s)·576) rounded down to
  8). These are sized by the sparsity, not by a params target: on SmolLM2 (tied embeddings, V·D =
  28M of 135M) the untied lm_head plus the shortcut matrices make them *larger* than the dense
  model, which ``compress run`` refuses for any target ≤ 100%, so they call the pruner directly
  (same context, timing and RSS measurement as ``compress.pipeline.run``);
* ``slicegpt`` at the params targets 80% and 60% (``compress.pipeline.run``, d' solved);
* ``magnitude`` (the naive floor: heads/KV groups + MLP channels by weight L2) at 80% and 60%;
* ``slicegpt`` with ``slice_head=true`` at 80% and 60% (last; skip with ``--only`` to save time).

Rows are appended to ``--resume`` as they finish and the tables rewritten after each cell, so an
interrupted run continues where it stopped.

Calibration: WikiText-2 (our ``wikitext2`` alias, the validation file), ``--samples`` sequences of
2048 tokens (the official default is 128; fewer here to fit 2 shared CPU cores — the table says how many).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import dense_row, prune_row, smollm2_path, wikitext_ppl, write_results  # noqa: E402

SEQ_LEN = 2048


def sparsity_row(sparsity: float, settings: dict[str, Any], *, full: bool = False, seed: int = 0) -> dict[str, Any]:
    """SliceGPT sized by the official sparsity, without a params target (see the module doc)."""
    from compress import Target
    from compress.calib.sources import CalibrationSource
    from compress.io.loading import load_model
    from compress.model.footprint import footprint
    from compress.pipeline.record import jsonable
    from compress.pipeline.run import DEFAULT_CALIB
    from compress.plugins import get_registry
    from compress.probes import track_peak_rss
    from compress.pruner import PruneContext

    t0 = time.perf_counter()
    lm = load_model(smollm2_path())
    model, tok = lm.model, lm.tokenizer
    reg = get_registry()
    arch = reg.adapter_for(model)
    pruner = reg.make("slicegpt", {**settings, "sparsity": sparsity})
    no_target = Target.parse("1B")  # an upper bound the sparsity always meets; the sparsity sizes the model
    pruner.check(model, no_target)
    dense = footprint(model, arch=arch)
    calib = CalibrationSource.from_spec(DEFAULT_CALIB, tok, seed=seed)
    ctx = PruneContext(arch=arch, tokenizer=tok, calibration=calib, seed=seed, progress=False, log=lambda m: None)
    torch.manual_seed(seed)
    t1 = time.perf_counter()
    with track_peak_rss() as rss:
        res = pruner.prune(model, no_target, ctx)
    prune_s = time.perf_counter() - t1
    achieved = footprint(res.model, arch=reg.adapter_for(res.model))
    row = {
        "method": "slicegpt",
        "target": f"sparsity {sparsity}",
        "settings": {**settings, "sparsity": sparsity},
        "recover_tokens": 0,
        "params": achieved.params,
        "flops_per_token": achieved.flops_per_token,
        "kv_bytes_per_token": achieved.kv_bytes_per_token,
        "ratios": achieved.ratios(dense),
        "prune_s": round(prune_s, 3),
        "peak_rss_bytes": rss.peak_bytes,
        "notes": jsonable(res.notes),
        **wikitext_ppl(res.model, tok, full=full),
    }
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    return row


def sizing_table(settings: dict[str, Any]) -> str:
    """d' and predicted size of every cell, with and without slice_head (meta model, no weights)."""
    from compress_baselines.slicegpt import SliceGPTConfig, solve_dims
    from transformers import AutoConfig, AutoModelForCausalLM

    from compress import ArchAdapter, Target

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(smollm2_path()))
    arch = ArchAdapter(model)
    lines = ["| sized by | d' | params | of dense | d' (slice_head) | params (slice_head) | of dense |",
             "|---|---|---|---|---|---|---|"]
    for label, target, extra in [*[(f"sparsity {s}", "1B", {"sparsity": s}) for s in (0.2, 0.25, 0.3)],
                                 *[(f"target {t}", t, {}) for t in ("80%", "60%")]]:
        cells = [label]
        for head in (False, True):
            sz = solve_dims(model, arch, Target.parse(target), SliceGPTConfig(**settings, **extra, slice_head=head))
            cells += [str(sz.dims.embedding), f"{int(sz.predicted):,}", f"{sz.predicted / sz.dense:.1%}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=8, help="calibration sequences of 2048 tokens (official 128)")
    ap.add_argument("--full", action="store_true", help="PPL on the whole WikiText-2 test set")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="", help="comma list of cell labels to run")
    ap.add_argument("--resume", default="/tmp/slicegpt_smollm2_rows.jsonl",
                    help="rows done so far (one JSON per line); cells found there are not re-run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    calib = {"calib_samples": args.samples, "calib_seq_len": SEQ_LEN}
    cells: list[tuple[str, Any]] = [
        ("dense", lambda: dense_row(full=args.full)),
        *[(f"sparsity{s}", lambda s=s: sparsity_row(s, dict(calib), full=args.full)) for s in (0.2, 0.25, 0.3)],
        *[(f"slicegpt{t}", lambda t=t: prune_row("slicegpt", t, settings=dict(calib), full=args.full))
          for t in ("80%", "60%")],
        *[(f"magnitude{t}", lambda t=t: prune_row("magnitude", t, full=args.full)) for t in ("80%", "60%")],
        *[(f"slicegpt-head{t}", lambda t=t: prune_row("slicegpt", t, settings={**calib, "slice_head": True},
                                                      full=args.full, label="slicegpt (slice_head)"))
          for t in ("80%", "60%")],
    ]
    only = {x for x in args.only.split(",") if x}
    resume = Path(args.resume)
    done: dict[str, dict[str, Any]] = {}
    if resume.is_file():
        for line in resume.read_text().splitlines():
            r = json.loads(line)
            if r.get("calib_samples") in (None, args.samples) and r.get("full") == args.full:
                done[r["cell"]] = r
    preamble = f"""
# SliceGPT on SmolLM2-135M-Instruct (Q4_1 dequantized to fp32), vs the magnitude floor

PPL: WikiText-2 test, {'all windows' if args.full else 'first 32,768 tokens'} at 2048 and 128 context (the shared
protocol, `benchmarks/common.py`). SliceGPT calibration: WikiText-2 validation (`wikitext2` alias),
**{args.samples} × 2048 tokens** (official default 128 × 2048; fewer here to fit 2 shared CPU cores), seed 0,
`final_orientation: random`, `round_to: 8`. `d` = sliced hidden width (of 576). `params` counts every unique
tensor: for SliceGPT this includes the shortcut matrices (2·d² per layer) and the lm_head, which slicing
unties from the embedding (+28.3M at full width). Rows `sparsity s` are sized by the official `--sparsity`
(no params target: most are larger than dense, see below); the others meet the params target.
`slice_head`: the last layer's output and the lm_head input are sliced too (official `do_slice_head`).
`prune_s` = pruning wall time on 1 thread (2 CPU cores shared with other jobs, so wall ≈ 2–3× CPU time),
`peak_rss_mib` = peak RSS of the process during pruning. No recovery training.
Generated by `benchmarks/slicegpt_smollm2.py --samples {args.samples}`.

Sizing (closed form, shortcuts and untied lm_head included; dense = 134,515,008 parameters):

{sizing_table({"round_to": 8})}
"""
    cols = ["method", "target", "d", "params", "ratios.params", "ratios.flops", "ppl2048", "ppl128", "calib",
            "prune_s", "peak_rss_mib"]
    rows = []
    for label, fn in cells:
        if only and label not in only:
            continue
        if label in done:
            rows.append(done[label])
            continue
        t = time.perf_counter()
        row = fn()
        sizing = (row.get("notes") or {}).get("sizing") or {}
        row.update(cell=label, d=sizing.get("d"), full=args.full,
                   calib=f"{args.samples}x{SEQ_LEN}" if row["method"].startswith("slicegpt") else "",
                   calib_samples=args.samples if row["method"].startswith("slicegpt") else None)
        rows.append(row)
        with resume.open("a") as f:
            f.write(json.dumps(row, sort_keys=True, default=str) + "\n")
        print(f"{label}: params {row['params']:,} ppl2048 {row.get('ppl2048')} ppl128 {row.get('ppl128')} "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
        write_results("slicegpt_smollm2", rows, columns=cols, preamble=preamble)
    md = write_results("slicegpt_smollm2", rows, columns=cols, preamble=preamble)
    print(f"wrote {md}")


if __name__ == "__main__":
    main()
