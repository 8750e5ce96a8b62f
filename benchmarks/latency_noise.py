"""How far one model's measured decode speed-up moves between measurements on this machine: with the
other core idle, and with it busy the way a neighbouring benchmark cell keeps it busy (issue #20's
speed axis).

The headline and quick suites measured the same weights (equal ``weights_sha256``) with speed-ups up
to 0.22x apart (``choose_smollm2_best.md``, "measured twice"). Those suites run one process per core,
so every latency phase had a neighbour computing perplexity or lm-eval, and each cell is a new
process. This script prunes the headline suite's TransAct 80 % cell once (the same settings, checked
by its plan hash against the committed record), saves it, and then times it against the dense model
with the suites' latency protocol (``compare_latency``: prefill 128 × 8, 32 greedy decode steps at
batch 1, 5 rounds after 1 warm-up, one torch thread) in ``--repeats`` fresh processes per condition,
``--inner`` times in each:

* **idle**: nothing else runs (the script refuses to start when the 1-minute load average is above
  0.5, i.e. something else is already using a core; the neighbour below is stopped, SIGSTOP);
* **busy**: a second process computes the dense model's WikiText-2 perplexity at 2048 context, one
  thread, without end, as a headline cell does in its longest phase.

The conditions alternate (idle, busy, idle, busy, …), so a drift of the machine hits both alike. The
pruned model is loaded from its saved folder in each process (a bench cell times it in memory, right
after pruning).

Usage: ``python benchmarks/latency_noise.py [--repeats 2] [--inner 2]`` (~1.5 min a measurement, ~30 s
to load a process, ~2 min of pruning: ~12 min with the defaults). Writes
``results/latency_noise_smollm2.{jsonl,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, doc_without_usage  # noqa: E402

SUITE = Path(__file__).resolve().parent / "suites" / "choose_smollm2_headline.yaml"
RECORDS = RESULTS / "choose_smollm2_headline" / "a" / "records.jsonl"
NAME = "latency_noise_smollm2"

#: The neighbour: the dense model's perplexity at 2048 context on one thread, forever.
NEIGHBOUR = """
import sys, torch
torch.set_num_threads(1)
from compress.io.loading import load_model
from compress.evaluate.perplexity import perplexity, ppl_text
lm = load_model(sys.argv[1], dtype="float32")
text = ppl_text("wikitext2")
print("ready", flush=True)
while True:
    perplexity(lm.model, lm.tokenizer, text, seq_len=2048, max_windows=4, batch_size=1, progress=False)
"""


def _cell():
    from compress.bench import load_suite

    cells = load_suite(SUITE).cells(methods=["transact"], targets=["80%"])
    return next(c for c in cells if c.method == "transact")


def _committed_plan_hash(cell_id: str) -> str | None:
    for line in RECORDS.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if r.get("cell_id") == cell_id and r.get("status") == "ok":
            return r.get("plan_hash")
    return None


def _measure(models: dict[str, Any], tok: Any, lat: dict[str, Any], condition: str, i: int) -> dict[str, Any]:
    from compress.probes import compare_latency

    t0 = time.perf_counter()
    got = compare_latency(models, tok, **lat, seed=0, reference="dense")
    sp = got["pruned"]["speedup"]["decode"]
    return {"condition": condition, "run": i,  # run: the process
            "decode_speedup_median": sp["median"], "decode_speedup_iqr": sp["iqr"],
            "decode_tok_s_dense": got["dense"]["decode_tokens_per_s"],
            "decode_tok_s_pruned": got["pruned"]["decode_tokens_per_s"],
            "prefill_speedup_median": got["pruned"]["speedup"]["prefill"]["median"],
            "wall_s": round(time.perf_counter() - t0, 1)}


def _md(rows: list[dict[str, Any]], plan_ok: bool) -> str:
    lines = ["# The same weights' decode speed-up, measured again and again (SmolLM2-135M, CPU)", "",
             doc_without_usage(__doc__), "",
             f"The pruned model's plan equals the committed headline record's: {'yes' if plan_ok else 'NO'}.", "",
             "| condition | process | measurement | decode × dense (IQR) | dense tok/s | pruned tok/s | prefill × dense |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lo, hi = r["decode_speedup_iqr"]
        lines.append(f"| {r['condition']} | {r['run']} | {r['in_process']} | {r['decode_speedup_median']:.2f}× "
                     f"({lo:.2f}–{hi:.2f}) | {r['decode_tok_s_dense']:.1f} | {r['decode_tok_s_pruned']:.1f} | "
                     f"{r['prefill_speedup_median']:.2f}× |")
    lines.append("")
    for cond in dict.fromkeys(r["condition"] for r in rows):
        mine = [r for r in rows if r["condition"] == cond]
        meds = [r["decode_speedup_median"] for r in mine]
        by_proc: dict[int, list[float]] = {}
        for r in mine:
            by_proc.setdefault(r["run"], []).append(r["decode_speedup_median"])
        within = max((max(v) - min(v) for v in by_proc.values()), default=0.0)
        means = [statistics.mean(v) for v in by_proc.values()]
        lines.append(f"- **{cond}**: decode speed-up {min(meds):.2f}–{max(meds):.2f}× over {len(meds)} "
                     f"measurements (median {statistics.median(meds):.2f}×); inside one process they move by up to "
                     f"{within:.2f}×, between processes the means move by {max(means) - min(means):.2f}×.")
    return "\n".join(lines) + "\n"


def _child(pruned: str, dense: str, condition: str, i: int, inner: int) -> None:
    """One fresh process: load both models, measure ``inner`` times back to back, print the rows as JSON."""
    import torch

    from compress.io.loading import load_model

    torch.set_num_threads(1)
    lat = dict(_cell().eval["latency"])
    p, d = load_model(pruned, dtype="float32"), load_model(dense, dtype="float32")
    models = {"pruned": p.model, "dense": d.model}
    for j in range(1, inner + 1):
        row = _measure(models, d.tokenizer, lat, condition, i)
        print(json.dumps({**row, "in_process": j}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2, help="fresh processes per condition (default 2)")
    ap.add_argument("--inner", type=int, default=2, help="measurements in each process (default 2)")
    ap.add_argument("--child", nargs=4, metavar=("PRUNED", "DENSE", "CONDITION", "RUN"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], args.child[2], int(args.child[3]), args.inner)
        return
    if args.repeats < 1 or args.inner < 1:
        ap.error("--repeats and --inner must be at least 1")  # one line, exit 2
    if os.getloadavg()[0] > 0.5:
        raise SystemExit(f"error: the 1-minute load average is {os.getloadavg()[0]:.2f}: something else is "
                         "running, so the 'idle' condition would not be idle; wait for it to end")
    import torch

    from compress.pipeline.run import RunSpec, run

    torch.set_num_threads(1)
    cell = _cell()
    path = cell.model["path"]
    spec = RunSpec(method=cell.method, target=cell.target, model=path, seed=cell.seed, calib=cell.calib,
                   settings=dict(cell.settings), dtype=cell.model.get("dtype"), progress=False, evaluate=False)
    result = run(spec, log=lambda m: None)
    plan_ok = result.record.get("plan_hash") == _committed_plan_hash(cell.id)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="latency-noise-") as tmp:
        saved = str(Path(tmp) / "pruned")
        result.save(saved)
        del result
        neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR, path], stdout=subprocess.PIPE, text=True)
        try:
            if neighbour.stdout is None or neighbour.stdout.readline().strip() != "ready":
                raise SystemExit("error: the busy neighbour process did not start")
            for i in range(1, args.repeats + 1):  # alternating, so a drift of the machine hits both alike
                for condition in ("idle", "busy"):
                    neighbour.send_signal(signal.SIGSTOP if condition == "idle" else signal.SIGCONT)
                    time.sleep(2)
                    out = subprocess.run([sys.executable, __file__, "--inner", str(args.inner), "--child", saved,
                                          path, condition, str(i)], capture_output=True, text=True, check=True)
                    rows += [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
        finally:
            neighbour.kill()
            neighbour.wait()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{NAME}.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    md = RESULTS / f"{NAME}.md"
    md.write_text(_md(rows, plan_ok), encoding="utf-8")
    print(f"wrote {md}")


if __name__ == "__main__":
    main()
