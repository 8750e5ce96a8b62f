"""Recovery by distillation (``--recover-mode kd``) vs LM-loss recovery, and depth vs width, on SmolLM2-135M.

    python benchmarks/kd_smollm2.py [--part 16k|64k|shots|all]      # resumable: finished rows are kept

Every arm is ``compress.pipeline.run.run`` (the code path of ``compress run``) with the same recovery
recipe except the loss: full-parameter training, seq 512, batch 4 (2,048 tokens per optimizer step),
lr 5e-5 with cosine decay and 10 % warm-up, AdamW (0.9, 0.999), on WikiText-2 validation (the
``wikitext2`` source; calibration draws its samples from the same text, as in every recovery run
here). ``lm``: the causal-LM loss; ``kd``: KL(teacher ‖ student) at temperature 1 over every
position, the teacher being the dense model of the same run (no LM term, no hidden-state term — the
Minitron setting). Perplexity: ``benchmarks/common.py`` (WikiText-2 test, no BOS, 2048 and 128
context).

Parts (in the order they run; each row is appended to ``results/kd_smollm2.jsonl`` as it finishes,
so an interrupted run continues where it stopped):

* ``16k``: TransAct 80 % / 50 %, LoRAP 50 % (the best other method at 50 % in the main suite) and
  ``depth`` 80 % / 50 %, each without training, with 16k tokens of LM-loss and 16k tokens of KD;
* ``64k``: TransAct 50 %, LoRAP 50 % and TransAct 80 % with 64k tokens of LM and of KD;
* ``shots``: TransAct 50 % with K = 4 shots and KD between them (16k tokens per shot on average; the
  official schedule gives later shots more, 67,584 in all) vs one-shot + KD with 64k tokens, which is the
  ``transact 50% kd 64k`` arm of the ``64k`` part.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

NAME = "kd_smollm2"
TRANSACT = {"calib_samples": 32, "calib_seq_len": 512, "mlp_round_to": 1, "gqa": "groups"}  # as the first rows were measured
REC = {"lr": 5e-5}


def cells(part: str) -> list[dict]:
    out: list[dict] = []

    def add(method: str, target: str, tokens: int, loss: str, settings: dict | None = None, label: str = "") -> None:
        default = f"{method} {target} {loss} {tokens // 1024}k" if tokens else f"{method} {target} no training"
        out.append({"label": label or default,
                    "method": method, "target": target, "tokens": tokens, "loss": loss, "settings": settings or {}})

    if part in ("16k", "all"):
        for method, target, st in (("transact", "50%", TRANSACT), ("transact", "80%", TRANSACT), ("lorap", "50%", {}),
                                   ("depth", "80%", {}), ("depth", "50%", {})):
            add(method, target, 0, "-", st)
            for loss in ("lm", "kd"):
                add(method, target, 16384, loss, st)
    if part in ("64k", "all"):
        for method, target, st in (("transact", "50%", TRANSACT), ("lorap", "50%", {}), ("transact", "80%", TRANSACT)):
            for loss in ("lm", "kd"):
                add(method, target, 65536, loss, st)
    if part in ("shots", "all"):
        per_shot = 16384
        out.append({"label": f"transact 50% K=4 shots, kd {per_shot // 1024}k/shot", "method": "transact",
                    "target": "50%", "tokens": 0, "loss": "kd", "shot_tokens": per_shot,
                    "settings": {**TRANSACT, "shots": 4, "recover_tokens_per_shot": per_shot, "recover_lr": 5e-5}})
        # one-shot + KD with the same total tokens is the 64k KD arm itself (shots=1 is the default): one arm,
        # measured once, whichever part runs first
        if not any(c["label"] == "transact 50% kd 64k" for c in out):
            add("transact", "50%", 4 * per_shot, "kd", TRANSACT)
    return out


def measure(cell: dict) -> dict:
    mode = "kd" if cell["loss"] == "kd" else "full"
    # the shots arm trains inside the method, between the shots, with the run's recovery recipe (mode kd,
    # no budget after pruning); the others train once, after pruning
    row = common.prune_row(cell["method"], cell["target"], settings=cell["settings"], recover_tokens=cell["tokens"],
                           recover_mode=mode, recover_settings=dict(REC) if mode == "kd" or cell["tokens"] else None,
                           label=cell["label"])
    row["loss"] = cell["loss"]
    between = sum(s.get("recovery", {}).get("tokens", 0) for s in (row.get("notes") or {}).get("shots", []))
    row["trained_tokens"] = between + ((row.get("recovery_result") or {}).get("tokens") or 0)
    return row


#: the order an interrupted ``--part all`` resumes in: what the reading needs first (the 64k and shots arms
#: before depth 50 % with KD, whose model is unusable either way)
LAST = ("depth 50% kd 16k",)


def run_order(part: str) -> list[dict]:
    todo = cells(part)
    return [c for c in todo if c["label"] not in LAST] + [c for c in todo if c["label"] in LAST]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", default="all", choices=("16k", "64k", "shots", "all"))
    ap.add_argument("--report", action="store_true", help="only rewrite the markdown from the finished rows")
    a = ap.parse_args()
    jl = common.RESULTS / f"{NAME}.jsonl"
    done = [json.loads(x) for x in jl.read_text().splitlines() if x.strip()] if jl.exists() else []
    have = {r["method_label"] for r in done if "method_label" in r}
    for cell in run_order(a.part):
        if a.report or cell["label"] in have:
            continue
        row = measure(cell)
        row["method_label"] = cell["label"]
        done.append(row)
        jl.parent.mkdir(parents=True, exist_ok=True)
        with jl.open("a") as f:
            f.write(json.dumps(row, sort_keys=True, default=str) + "\n")
        print(json.dumps({k: row.get(k) for k in ("method", "trained_tokens", "ppl2048", "ppl128", "wall_s")}),
              flush=True)
    n2048, n128 = common.PPL_WINDOWS[2048], common.PPL_WINDOWS[128]
    pre = ("SmolLM2-135M-Instruct (Q4_1 → fp32), CPU, 2 threads. Protocol: the docstring of "
           "`benchmarks/kd_smollm2.py` (same recipe in every arm but the loss: `lm` = causal-LM loss, `kd` = "
           "KL from the dense model at T = 1). TransAct calibration 32×512 tokens; LoRAP and depth their "
           f"defaults. PPL on the first {n2048 * 2048:,} WikiText-2 test tokens ({n2048}×2048, {n128}×128 windows).")
    order = {c["label"]: i for i, c in enumerate(cells("all"))}
    done.sort(key=lambda r: order.get(r.get("method_label"), 1e9))
    missing = [c["label"] for c in cells("all") if c["label"] not in {r.get("method_label") for r in done}]
    if missing:
        pre += f" Not measured yet ({len(missing)} arms): {'; '.join(missing)}."
    common.write_results(NAME, done, preamble=pre,
                         columns=["method", "params", "ratios.params", "ratios.flops", "ratios.kv", "trained_tokens",
                                  "ppl2048", "ppl128", "wall_s"])


if __name__ == "__main__":
    main()
