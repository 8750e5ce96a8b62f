"""TransAct on a model with only two KV heads (issue #23): Qwen2.5-Coder-0.5B at 80 / 70 / 50 %.

Usage: ``python benchmarks/qwen2_transact.py [--model qwen2|smollm2] [--only LABEL ...] [--targets 70% ...]``.
Rows already in ``results/qwen2_transact.jsonl`` (``smollm2_transact_gqa.jsonl`` for SmolLM2-135M, 3 KV
heads, the same options and protocol) are kept and not re-run (delete the file to start over). The
Qwen model is fetched once into ``$COMPRESS_CACHE`` (``common.qwen2_path``).

With 2 KV groups per layer, ``gqa=groups`` can keep one group or both: every attention cut halves the
attention (and the KV cache). The options measured:

* ``groups down`` — today's default: whole KV groups, the balanced attention width rounded down;
* ``groups up`` — the same rounded up (both groups kept once the balanced ratio exceeds 1/2);
* ``heads`` — ``gqa=heads``: both KV heads kept, the same number of query heads dropped in each group;
* ``attention dense`` — ``attn_ratio: 1000``: attention untouched, the MLP takes the whole cut;
* ``auto`` — ``gqa=auto``: the candidate plans above (at the same target, from the same saliences) scored
  on 4 × 512 held-out tokens of the calibration text, the lowest loss kept (its choice in ``chosen``);
* calibration: 8 × 256, 32 × 512 (the suites') and 64 × 512 tokens of WikiText-2 validation.

Protocol (the issue's): WikiText-2 test, the first 8 windows of 512 tokens, fp32, 1 thread, seed 0,
one shot (the committed recipe's ``transact.yaml`` settings otherwise).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

NAME = "qwen2_transact"
WINDOWS = {512: 8}
TARGETS = ("70%", "80%", "50%")
CAL = {"calib_samples": 32, "calib_seq_len": 512}
OPTIONS: dict[str, dict] = {
    "groups down": {**CAL, "gqa": "groups", "attn_round": "down"},
    "groups up": {**CAL, "gqa": "groups", "attn_round": "up"},
    "heads": {**CAL, "gqa": "heads"},
    "attention dense": {**CAL, "attn_ratio": 1000.0},
    "auto": {**CAL, "gqa": "auto"},
}
CALIBRATION: dict[str, dict] = {  # at 70 % only
    "groups down 8x256": {"calib_samples": 8, "calib_seq_len": 256, "gqa": "groups", "attn_round": "down"},
    "groups down 64x512": {"calib_samples": 64, "calib_seq_len": 512, "gqa": "groups", "attn_round": "down"},
}


def _cells(targets: tuple[str, ...]) -> list[tuple[str, str, dict]]:
    """Every option at the first target, then today's default and ``auto`` at the others, then the
    remaining options and the calibration sizes (so an interrupted run has the comparisons that matter)."""
    first = [(label, targets[0], s) for label, s in OPTIONS.items()]
    main = [(label, t, OPTIONS[label]) for t in targets[1:] for label in ("groups down", "auto")]
    rest = [(label, t, s) for t in targets[1:] for label, s in OPTIONS.items() if label not in ("groups down", "auto")]
    calib = [(label, "70%", s) for label, s in CALIBRATION.items()] if "70%" in targets else []
    return first + main + calib + rest


def _calib(settings: dict) -> str:
    return f"{settings['calib_samples']}x{settings['calib_seq_len']}"


def _planned(path: str, target: str, settings: dict) -> tuple[int, int, int] | None:
    """(heads, KV heads, MLP) a run with ``settings`` lands on, from the config alone; None for auto."""
    if settings.get("gqa") == "auto":
        return None
    from compress import Target
    from compress.pipeline.preflight import meta_model
    from compress.plugins import get_registry

    shapes = meta_model(path, dtype="float32")
    s = get_registry().make("transact", settings).plan_shapes(shapes.model, Target.parse(target))
    return s["heads"], s["kv_heads"], s["f"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", choices=("qwen2", "smollm2"), default="qwen2")
    ap.add_argument("--only", nargs="*", help="labels to run (default: all, plus dense)")
    ap.add_argument("--targets", nargs="*", default=list(TARGETS),
                    help="targets, the first one with every option (default: 70%% 80%% 50%%)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    name = NAME if args.model == "qwen2" else "smollm2_transact_gqa"
    path = common.qwen2_path() if args.model == "qwen2" else common.smollm2_path()
    rows = common.read_rows(name)
    recipe = str(Path(__file__).resolve().parents[1] / "plugins/transact/compress_transact/recipes/transact.yaml")
    from compress.io.recipe import load_recipe

    base = dict(load_recipe(recipe).settings)

    def save() -> None:
        order = {"dense": -1, **{k: i for i, k in enumerate([*OPTIONS, *CALIBRATION])}}
        rows.sort(key=lambda r: (r["target"] != "100%", -float(r["target"].rstrip("%")), order.get(r["method"], 99)))
        common.write_results(name, rows, columns=["method", "target", "calibration", "heads", "kv_heads", "mlp", "chosen", "same_as",
                                                  "ratios.params", "ratios.flops", "ratios.kv", "ppl512", "prune_s"],
                             preamble=common.doc_without_usage(__doc__))

    done = {(r["method"], r["target"]) for r in rows}
    if ("dense", "100%") not in done and (not args.only or "dense" in args.only):
        # the same protocol as qwen2_lorap.py: reuse its dense row when it has one
        dense = [r for r in common.read_rows("qwen2_lorap") if r["method"] == "dense" and r.get("model") == args.model]
        rows.append({k: v for k, v in dense[0].items() if k != "model"} if dense
                    else common.dense_row(model=path, windows=WINDOWS))
        save()
    for label, target, settings in _cells(tuple(args.targets)):
        if (label, target) in done or (args.only and label not in args.only):
            continue
        shape = _planned(path, target, {**base, **settings})
        twin = next((r for r in rows if r["target"] == target and r.get("calibration") == _calib(settings)
                     and shape is not None and (r.get("heads"), r.get("kv_heads"), r.get("mlp")) == shape
                     and not r.get("same_as") and r["method"] != "auto"), None)
        if twin is not None:  # the same widths from the same saliences: the same model, not run again
            rows.append({**twin, "method": label, "same_as": twin["method"], "settings": settings})
            save()
            continue
        row = common.prune_row("transact", target, settings={**base, **settings}, label=label,
                               model=path, windows=WINDOWS)
        widths = (row.get("notes") or {}).get("widths") or {}
        row.update({k: widths.get(k) for k in ("heads", "kv_heads", "mlp")})
        row["chosen"] = ((row.get("notes") or {}).get("gqa") or {}).get("chosen")
        row["calibration"] = _calib(settings)
        row["note"] = widths.get("note")
        rows.append(row)
        save()
        print(json.dumps({k: row.get(k) for k in ("method", "target", "heads", "kv_heads", "mlp", "ppl512")}),
              flush=True)
    save()


if __name__ == "__main__":
    main()
