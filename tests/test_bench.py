"""``compress bench`` / ``compress report``: suite files, record schema, resume, failure isolation,
report rendering, and one real smoke-suite cell end to end (stories260K, a few seconds of work per
cell; most of a cell's time is its process importing torch and transformers)."""

from __future__ import annotations

import csv
import json
import shutil
import textwrap
from pathlib import Path
from typing import Any

import pytest

from compress.bench import RECORD_KEYS, SCHEMA, load_suite, read_records
from compress.bench.runner import run_suite
from compress.cli import main
from compress.errors import UsageError
from compress.evaluate.harness import ZERO_SHOT_TASKS
from compress.testing import assets_dir
from conftest import needs_assets

ROOT = Path(__file__).resolve().parents[1]
SUITES = ROOT / "benchmarks" / "suites"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "bench"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Fast cells: dense and random run (in their own processes); random at 1M parameters (above the
# 260K dense model) and the unknown method fail before any process starts.
TINY = """
name: tiny
models:
  - id: stories260k
    path: ${COMPRESS_ASSETS}/models/stories260k
methods: [random, nosuch]
targets: ["50%", "1M"]
eval:
  ppl: {tinystories: [128]}
  max_windows: 2
  latency: {prompt_len: 16, new_tokens: 4, prefill_batch_size: 2, repeats: 5, warmup: 0}
threads: 1
"""


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _write(tmp_path: Path, text: str, name: str = "suite.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


# ------------------------------------------------------------------------------ suite files


@needs_assets
@pytest.mark.parametrize(("edit", "message"), [
    (lambda s: s + "colour: red\n", "unknown key 'colour'"),
    (lambda s: s.replace("methods: [random, nosuch]", "methods: [{name: random, sets: {}}]"),
     "unknown key 'methods.0.sets'"),
    (lambda s: s.replace("  max_windows: 2", "  max_window: 2"), "unknown key 'eval.max_window'"),
    (lambda s: s.replace('targets: ["50%", "1M"]\n', ""), "missing field 'targets'"),
    (lambda s: s.replace('targets: ["50%", "1M"]', 'targets: ["half"]'), "cannot parse target 'half'"),
    (lambda s: s.replace("  max_windows: 2", "  tasks: [piqaa]"), "unknown task 'piqaa'"),
    (lambda s: s.replace("{tinystories: [128]}", "{nowhere: [128]}"), "unknown source 'nowhere'"),
    (lambda s: s.replace("${COMPRESS_ASSETS}", "${NO_SUCH_VAR_XYZ}"), "NO_SUCH_VAR_XYZ is not set"),
    (lambda s: s.replace("models/stories260k", "models/missing"), "does not exist"),
    (lambda s: s + "  - bad: [\n", "not valid YAML"),
    (lambda s: s.replace("methods: [random, nosuch]", "methods: [random, random]"), "'random' is listed twice"),
])
def test_bad_suite_file_is_a_one_line_usage_error(tmp_path, capsys, edit, message):
    path = _write(tmp_path, edit(TINY))
    rc, out, err = _cli(capsys, "bench", path, "--out", tmp_path / "o")
    assert rc == 2
    assert message in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


@needs_assets
def test_suite_cells_dense_first_and_stable_ids(tmp_path):
    suite = load_suite(SUITES / "smoke.yaml")
    cells = suite.cells()
    methods = ["dense", "random", "magnitude", "transact", "llm_pruner", "slicegpt", "lorap"]
    assert [c.method for c in cells] == methods
    assert cells[0].target == "100%" and cells[0].settings == {} and cells[0].calib is None
    assert cells[0].model["hash_of"] == "config.json" and len(cells[0].model["hash"]) == 64
    ids = [c.id for c in cells]
    assert len(set(ids)) == len(ids) and ids == [c.id for c in load_suite(SUITES / "smoke.yaml").cells()]
    # threads and labels do not change a cell's id; the evaluation protocol does
    assert cells[1].model_copy(update={"threads": 7, "label": "x"}).id == ids[1]
    quick = load_suite(SUITES / "smoke.yaml", max_windows=1).cells()
    assert quick[1].eval["max_windows"] == 1 and quick[1].id != ids[1]
    # 'all' lifts a suite's limit: the quick suite's cells on every window, under their own ids
    lifted = load_suite(SUITES / "smoke.yaml", max_windows="all").cells()
    assert lifted[1].eval["max_windows"] is None and lifted[1].id not in ids
    assert lifted[1].id == load_suite(SUITES / "smoke.yaml", max_windows="all", max_tokens="all").cells()[1].id
    assert [c.method for c in suite.cells(methods=["transact"])] == ["transact"]
    with pytest.raises(UsageError, match="no method 'nosuch'"):
        suite.cells(methods=["nosuch"])


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--max-tokens", "most", "argument --max-tokens: 'most' is not an integer"),
    ("--max-tokens", "1", "argument --max-tokens: 1 is outside 2.."),
    ("--max-windows", "0", "argument --max-windows: 0 is outside 1.."),
])
def test_bad_eval_override_is_a_usage_error(tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as e:
        main(["bench", str(SUITES / "smoke.yaml"), "--out", str(tmp_path / "o"), flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and not (tmp_path / "o").exists(), err


@needs_assets
def test_smollm2_suite_is_valid():
    suite = load_suite(SUITES / "smollm2.yaml")
    cells = suite.cells()
    assert cells[0].method == "dense"
    assert {c.method for c in cells[1:]} == {"random", "magnitude", "transact", "llm_pruner", "slicegpt", "lorap"}
    assert {c.target for c in cells[1:]} == {"80%", "50%"}
    budgets = {c.recovery["tokens"] for c in cells[1:]}
    assert len(budgets) == 2 and 0 in budgets
    assert len(cells) == 1 + 6 * 2 * 2
    assert suite.eval.ppl == {"wikitext2": [2048, 128]} and suite.eval.max_windows is None
    assert set(suite.eval.tasks) == set(ZERO_SHOT_TASKS) and suite.eval.limit
    assert cells[0].model["hash_of"] == "gguf-header"


@needs_assets
def test_every_committed_suite_loads_and_lists_distinct_cells():
    """A typo in a committed suite would otherwise surface hours into a benchmark. The suites on models
    outside the assets (Qwen2, Gemma-3: fetched by a script) are checked as far as their files allow."""
    import os
    import re

    paths = sorted(SUITES.glob("*.yaml"))
    assert len(paths) >= 10
    for p in paths:
        suite = load_suite(p)
        if any(v not in os.environ for m in suite.models for v in re.findall(r"\$\{(\w+)\}", m.path)):
            continue  # a model fetched by a script, not in the assets
        ids = [c.id for c in suite.cells()]
        assert ids and len(set(ids)) == len(ids), p.name
    # the speed-sized cells share the quick suite's protocol, so choose_table.py may read them together
    quick, sized = load_suite(SUITES / "choose_smollm2.yaml"), load_suite(SUITES / "choose_smollm2_speed.yaml")
    assert sized.eval == quick.eval and sized.threads == quick.threads
    # the speed-sized, recovery and headline suites prune as the quick suite does, so their cells and its
    # cells are the same pruned models (the speed tables, the before -> after arrows, speed measured twice)
    same = {m.display: m for m in quick.methods}
    for name in ("choose_smollm2_speed", "choose_smollm2_recovery", "choose_smollm2_headline"):
        for m in load_suite(SUITES / f"{name}.yaml").methods:
            if m.display in same:
                assert (m.name, m.recipe, m.settings, m.calib) == (same[m.display].name, same[m.display].recipe,
                                                                   same[m.display].settings, same[m.display].calib), (name, m.display)

# ------------------------------------------------------------------------------ running


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny suite run once through the CLI: (out folder, exit code, records, stderr)."""
    if assets_dir() is None:
        pytest.skip("COMPRESS_ASSETS not set")
    tmp = tmp_path_factory.mktemp("bench")
    suite = _write(tmp, TINY)
    out = tmp / "out"
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["bench", str(suite), "--out", str(out), "--no-report"])
    return out, rc, read_records(out / "records.jsonl"), err.getvalue(), suite


def test_records_schema_and_failure_isolation(tiny_run):
    out, rc, records, err, _ = tiny_run
    assert rc == 1, err  # failed cells -> exit 1, but every cell has its record
    assert len(records) == 5 and len({r["cell_id"] for r in records}) == 5
    by = {(r["method"], r["target"]): r for r in records}
    assert records[0]["method"] == "dense"
    for r in records:
        assert set(RECORD_KEYS) <= set(r), set(RECORD_KEYS) - set(r)
        assert r["schema"] == SCHEMA and r["suite"] == "tiny" and r["status"] in ("ok", "failed")
        assert r["model"]["id"] == "stories260k" and len(r["model"]["hash"]) == 64
        assert isinstance(r["seed"], int) and isinstance(r["eval"], dict) and r["eval"]["max_windows"] == 2
    ok = [by[("dense", "100%")], by[("random", "50%")]]
    for r in ok:
        assert r["status"] == "ok" and r["error"] is None, r["error"]
        for k in ("params", "flops_per_token", "kv_bytes_per_token"):
            assert r["achieved"][k] > 0 and r["dense"][k] > 0
        assert set(r["ratios"]) == {"params", "flops", "kv"}
        ppl = r["ppl"]["tinystories"]["128"]
        assert ppl["windows"] == 2 and ppl["partial"] is True and ppl["ppl"] > 1
        assert r["latency"]["prefill_tokens_per_s"] > 0 and r["latency"]["decode_tokens_per_s"] > 0
        assert len(r["latency"]["decode_runs"]) == 5 and r["latency"]["prefill_batch_size"] == 2
        assert isinstance(r["peak_rss_bytes"], int) and r["peak_rss_bytes"] > 0
        assert r["threads"] == 1
        assert {"python", "torch", "transformers", "lm_eval", "torch_pruning"} <= set(r["versions"])
        assert r["plugin"]["distribution"] and r["tasks"] == {} and r["accuracy_avg"] is None
        assert (out / "logs" / f"{r['cell_id']}.log").is_file()
    dense, rnd = ok
    # the pruned cell timed the dense model in its own process, interleaved: paired speed-ups with spread
    assert "latency_dense" not in dense and "speedup" not in dense["latency"]
    assert rnd["latency_dense"]["interleaved_with"] == ["pruned"] and len(rnd["latency_dense"]["prefill_runs"]) == 5
    for phase in ("prefill", "decode"):
        sp = rnd["latency"]["speedup"][phase]
        assert sp["over"] == "dense" and sp["iqr"][0] <= sp["median"] <= sp["iqr"][1]
        assert sp["tie"] == (sp["iqr"][0] <= 1 <= sp["iqr"][1])
    assert dense["ratios"] == {"params": 1.0, "flops": 1.0, "kv": 1.0} and dense["plugin"]["distribution"] == "compress"
    assert rnd["plugin"]["distribution"] == "compress-baselines" and rnd["config"]["gqa"] == "groups"
    assert 0.45 < rnd["ratios"]["params"] <= 0.5 and isinstance(rnd["prune_wall_s"], float)
    assert rnd["plan_hash"] and rnd["calibration_hash"] is None  # random needs no calibration
    for key in (("random", "1M"), ("nosuch", "50%"), ("nosuch", "1M")):
        r = by[key]
        assert r["status"] == "failed" and r["stage"] == "preflight" and "\n" not in r["error"]
        assert r["achieved"] is None and r["ppl"] == {}
    assert "above the dense model" in by[("random", "1M")]["error"]
    assert "unknown method 'nosuch'" in by[("nosuch", "50%")]["error"]


def test_resume_runs_only_missing_cells(tiny_run, tmp_path, capsys, monkeypatch):
    src, _, records, _, suite = tiny_run
    out = tmp_path / "out"
    shutil.copytree(src, out)
    import compress.bench.runner as runner

    def no_spawn(*a, **k):
        raise AssertionError("a finished cell was run again")

    # 1. everything has a record: nothing runs, the exit code still reports the failed cells
    monkeypatch.setattr(runner, "_spawn", no_spawn)
    rc, _, err = _cli(capsys, "bench", suite, "--out", out, "--resume", "--no-report")
    assert rc == 1 and "5 cell(s): 0 run, 5 skipped" in err
    assert read_records(out / "records.jsonl") == records
    # 2. without --resume an existing run is refused
    rc, _, err = _cli(capsys, "bench", suite, "--out", out, "--no-report")
    assert rc == 2 and "--resume" in err
    # 3. --retry-failed reruns the failed cells only (these fail before any process starts)
    rc, _, err = _cli(capsys, "bench", suite, "--out", out, "--resume", "--retry-failed", "--no-report")
    assert rc == 1 and "3 run, 2 skipped" in err
    again = read_records(out / "records.jsonl")
    assert len(again) == 8 and all(r["status"] == "failed" for r in again[5:])
    # 4. delete one finished line: exactly that cell runs again (in a real process)
    monkeypatch.undo()
    lines = (out / "records.jsonl").read_text().splitlines(keepends=True)
    victim = next(i for i, line in enumerate(lines) if '"method": "random"' in line and '"status": "ok"' in line)
    gone = json.loads(lines[victim])["cell_id"]
    (out / "records.jsonl").write_text("".join(lines[:victim] + lines[victim + 1:]))
    rc, _, err = _cli(capsys, "bench", suite, "--out", out, "--resume", "--no-report")
    assert rc == 1 and "1 run, 4 skipped" in err, err
    final = read_records(out / "records.jsonl")
    assert len(final) == 8 and final[-1]["cell_id"] == gone and final[-1]["status"] == "ok"


def _fake_python(tmp_path: Path, body: str) -> str:
    p = tmp_path / "fake-python"
    p.write_text("#!/bin/sh\n" + body + "\n")
    p.chmod(0o755)
    return str(p)


@needs_assets
def test_crashed_or_hung_cell_process_gets_a_failed_record(tmp_path):
    suite = load_suite(_write(tmp_path, TINY))
    crash = _fake_python(tmp_path, 'echo "Segmentation fault (pretend)" >&2; exit 139')
    s = run_suite(suite, tmp_path / "a", methods=["dense"], python=crash, log=lambda m: None)
    (rec,) = read_records(tmp_path / "a" / "records.jsonl")
    assert s.exit_code == 1 and s.failed == [rec["cell_id"]]
    assert rec["status"] == "failed" and rec["stage"] == "process"
    assert "exited with code 139" in rec["error"] and "Segmentation fault (pretend)" in rec["error"]
    hang = _fake_python(tmp_path, "exec sleep 30")
    suite = suite.model_copy(update={"timeout_s": 1.0})
    run_suite(suite, tmp_path / "b", methods=["dense"], python=hang, log=lambda m: None)
    (rec,) = read_records(tmp_path / "b" / "records.jsonl")
    assert rec["stage"] == "timeout" and "timeout_s=1" in rec["error"]


@needs_assets
def test_one_bench_per_results_folder(tmp_path):
    import fcntl

    suite = load_suite(_write(tmp_path, TINY))
    out = tmp_path / "o"
    out.mkdir()
    with open(out / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(UsageError, match="another compress bench is writing"):
            run_suite(suite, out, methods=["dense"], python="/bin/false", log=lambda m: None)
    assert not (out / "records.jsonl").exists()


@needs_assets
def test_bench_list(tmp_path, capsys):
    rc, out, _ = _cli(capsys, "bench", SUITES / "smoke.yaml", "--out", tmp_path / "o", "--list")
    assert rc == 0 and len(out.splitlines()) == 7 and all("todo" in line for line in out.splitlines())
    assert not (tmp_path / "o").exists()


@needs_assets
@pytest.mark.slow
def test_smoke_suite_cell_end_to_end(tmp_path, capsys):
    """One real smoke-suite cell: TransAct on stories260K with calibration, PPL, lm-eval and latency."""
    rc, _, err = _cli(capsys, "bench", SUITES / "smoke.yaml", "--out", tmp_path, "--methods", "transact")
    assert rc == 0, err
    (r,) = read_records(tmp_path / "records.jsonl")
    assert r["status"] == "ok" and r["method"] == "transact" and r["target"] == "50%"
    assert r["plugin"] == {"distribution": "compress-transact", "version": r["plugin"]["version"]}
    assert r["config"]["calib_samples"] == 8 and r["config"]["calib_seq_len"] == 128
    assert r["calibration"]["spec"] == "tinystories" and len(r["calibration_hash"]) == 64 and r["plan_hash"]
    assert r["achieved"]["params"] <= 0.5 * r["dense"]["params"]
    assert r["ppl"]["tinystories"]["128"]["windows"] == 4
    assert set(r["tasks"]) == {"piqa", "arc_easy"}
    for res in r["tasks"].values():
        assert res["n"] == 4 and 0 <= res["acc"] <= 1 and 0 <= res["acc_norm"] <= 1
        assert res["metric"] == "acc" and res["score"] == res["acc"]
    assert r["accuracy_avg"] == pytest.approx((r["tasks"]["piqa"]["acc"] + r["tasks"]["arc_easy"]["acc"]) / 2)
    assert r["latency"]["prompt_len"] == 64 and r["prune_wall_s"] > 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| transact | 50% | none |" in md
    assert "decode × dense" in md and "interleaved with the dense model" in md


# ------------------------------------------------------------------------------ report


def test_report_from_fixture_records(tmp_path, capsys):
    src = FIXTURES / "records.jsonl"
    records = read_records(src)
    rc, out, err = _cli(capsys, "report", src, "--out", tmp_path)
    assert rc == 0, err
    md = (tmp_path / "report.md").read_text()
    assert out.strip() == md.strip()
    table = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line]
    header, first = table[0], table[1]
    assert header.startswith("| method | target | recovery | params |")
    assert "piqa acc" in header and "avg" in header and "PPL tinystories@128" in header
    assert first.startswith("| dense | — | — |")  # dense first
    ok = [r for r in records if r["status"] == "ok" and r["method"] != "dense"]
    best_ppl = min(r["ppl"]["tinystories"]["128"]["ppl"] for r in ok)
    assert f"**{best_ppl:.2f}**" in md
    dense_row = first.split(" | ")
    assert not any(c.startswith("**") for c in dense_row)  # the reference row is never "best"
    assert "first 4 windows" in md and "limit 4 examples per task" in md  # the protocol is stated
    assert "## Failed cells" in md and "unknown method 'nosuch'" in md.split("## Failed cells")[1]
    with open(tmp_path / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records) and rows[0]["method"] == "dense"
    assert {"params_ratio", "flops_ratio", "kv_ratio", "piqa.acc", "piqa.acc_norm", "accuracy_avg"} <= set(rows[0])
    doc = json.loads((tmp_path / "report.json").read_text())
    assert len(doc["rows"]) == len(records) - 1 and len(doc["failed"]) == 1
    for name in ("accuracy_vs_flops.png", "ppl_vs_params.png", "ppl_vs_flops.png", "ppl_vs_kv.png", "overview.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
        assert f"]({name})" in md
    assert not list(tmp_path.glob("_*"))  # no temporaries left


def _acc_record(method: str, scores: dict[str, float], n: int, ratio: float, ppl: float, **extra: Any) -> dict:
    tasks = {t: {"acc": v, "n": n, "metric": "acc", "score": v, "task": t} for t, v in scores.items()}
    return {"cell_id": f"{method}-{ratio}-{extra.get('recovery', {}).get('tokens', 0)}", "status": "ok",
            "model": {"id": "m"}, "method": method, "label": method, "target": "100%" if method == "dense" else "50%",
            "recovery": extra.pop("recovery", {"tokens": 0, "mode": "full"}), "seed": 0, "eval": {"tasks": list(scores)},
            "ratios": {"params": ratio, "flops": ratio, "kv": ratio},
            "achieved": {"params": 100 * ratio, "flops_per_token": 10 * ratio, "kv_bytes_per_token": ratio},
            "ppl": {"wikitext2": {"2048": {"ppl": ppl}}}, "tasks": tasks,
            "accuracy_avg": sum(scores.values()) / len(scores), **extra}


def test_accuracy_stderr_matches_lm_eval_and_makes_ties():
    """The stderr is lm-eval's own mean_stderr of the 0/1 outcomes; a gap within 2·stderr of the
    difference is a tie (both bold), a wider one is not."""
    from lm_eval.api.metrics import mean_stderr

    from compress.bench.report import _table, average_stderr, task_stderr
    from compress.evaluate.harness import accuracy_stderr

    assert accuracy_stderr(0.3, 20) == pytest.approx(mean_stderr([1] * 6 + [0] * 14))
    assert accuracy_stderr(0.5, 1) is None and accuracy_stderr(None, 50) is None
    a = _acc_record("a", {"piqa": 0.60, "boolq": 0.70}, 200, 0.5, 30.0)
    b = _acc_record("b", {"piqa": 0.55, "boolq": 0.50}, 200, 0.5, 40.0)
    dense = _acc_record("dense", {"piqa": 0.7, "boolq": 0.8}, 200, 1.0, 20.0)
    se_piqa = task_stderr(a["tasks"]["piqa"])
    assert se_piqa == pytest.approx((0.6 * 0.4 / 199) ** 0.5)
    assert average_stderr(a) == pytest.approx(((0.6 * 0.4 / 199) + (0.7 * 0.3 / 199)) ** 0.5 / 2)
    rows = {line.split(" | ")[0].strip("| "): line for line in _table([dense, a, b]) if line.startswith("| ")}
    # piqa: 0.05 apart, 2·sqrt(se_a² + se_b²) ≈ 0.098: a tie, both bold; boolq: 0.20 apart, only a is bold
    assert "**0.600 ±0.035**" in rows["a"] and "**0.550 ±0.035**" in rows["b"]
    assert "**0.700 ±0.032**" in rows["a"] and "| 0.500 ±0.035 |" in rows["b"]
    # with 20 examples the same boolq gap is a tie
    a20 = _acc_record("a", {"piqa": 0.60, "boolq": 0.70}, 20, 0.5, 30.0)
    b20 = _acc_record("b", {"piqa": 0.55, "boolq": 0.50}, 20, 0.5, 40.0)
    rows = {line.split(" | ")[0].strip("| "): line for line in _table([dense, a20, b20]) if line.startswith("| ")}
    assert "**0.500 ±0.115**" in rows["b"]


def test_pareto_front():
    from compress.bench.report import pareto_front

    pts = [(50, 300.0), (60, 400.0), (80, 40.0), (70, 100.0), (65, 90.0)]
    assert pareto_front(pts, True) == [(50, 300.0), (65, 90.0), (80, 40.0)]  # (60, 400) and (70, 100) beaten
    # speed: faster (larger x) is better
    assert pareto_front([(1.2, 50.0), (1.5, 80.0), (1.4, 90.0), (1.0, 20.0)], False) == [
        (1.0, 20.0), (1.2, 50.0), (1.5, 80.0)]


def test_report_names_the_tasks_a_model_answers_by_position():
    """A cell that gave BoolQ the same answer every time is listed with the score of always giving it,
    one that read is not; records from before the check are counted as such."""
    from compress.bench.report import render_markdown

    leaning = _acc_record("a", {"boolq": 0.635, "piqa": 0.6}, 200, 0.5, 30.0)
    leaning["tasks"]["boolq"]["answers"] = {"chance": 0.5, "constant": 0.635, "constant_choice": 1, "lean": 1.0,
                                            "lean_choice": 1, "constant_at_lean": 0.635}
    leaning["tasks"]["piqa"]["answers"] = {"chance": 0.5, "constant": 0.52, "constant_choice": 0, "lean": 0.55,
                                           "lean_choice": 0, "constant_at_lean": 0.52}
    old = _acc_record("b", {"boolq": 0.6}, 200, 0.5, 40.0)
    md = render_markdown([leaning, old])
    section = md[md.index("## Answers by position"):]
    assert "| m | a | 50% | none | boolq | 0.635 | 100% on option 2 | 0.635 | 0.500 |" in section
    assert "piqa" not in section and "1 cell(s) with task scores predate this check" in section
    assert "## Answers by position" not in render_markdown([_acc_record("c", {"piqa": 0.6}, 200, 0.5, 30.0)
                                                            | {"tasks": {"piqa": leaning["tasks"]["piqa"]}}])


def test_report_draws_every_axis_with_refused_cells_apart(tmp_path):
    """PPL against params, FLOPs, KV and measured speed, a combined figure, accuracy with error bars;
    a refused cell is listed as such, apart from failures, and draws nothing."""
    from compress.bench.report import METHOD_STYLE, _style, write_report

    lat = {"decode_tokens_per_s": 10.0}
    dense = _acc_record("dense", {"piqa": 0.7}, 200, 1.0, 20.0, latency=lat)
    recs = [dense]
    for method, ratio, ppl, sp in (("transact", 0.5, 300.0, 1.6), ("transact", 0.8, 60.0, 1.2),
                                   ("lorap", 0.5, 200.0, 1.1), ("random", 0.5, 5e7, 1.6)):
        r = _acc_record(method, {"piqa": 0.6}, 200, ratio, ppl,
                        latency={**lat, "speedup": {"decode": {"median": sp, "iqr": [sp, sp], "tie": False}}})
        r["cell_id"] += method
        recs.append(r)
    recs.append({**recs[1], "cell_id": "rec", "recovery": {"tokens": 16384, "mode": "full"},
                 "ppl": {"wikitext2": {"2048": {"ppl": 100.0}}}})
    recs.append({**recs[3], "cell_id": "refused", "status": "refused", "target": "kv:33%", "stage": "preflight",
                 "error": "lorap keeps every head"})
    recs[0]["ppl"]["tinystories"] = {"128": {"ppl": 9.0}}  # a second source sorts after WikiText-2
    files = write_report(recs, tmp_path)
    assert "PPL wikitext2@2048 vs" in files["markdown"].read_text()
    for stem in ("ppl_vs_params", "ppl_vs_flops", "ppl_vs_kv", "ppl_vs_speed", "ppl_vs_recovery", "overview",
                 "accuracy_vs_flops"):
        assert files[f"plot_{stem}"].read_bytes().startswith(PNG_MAGIC)
    md = files["markdown"].read_text()
    assert "1 refused by their method, 0 failed" in md and "## Refused cells" in md and "## Failed cells" not in md
    assert "| m | lorap | kv:33% | none | lorap keeps every head |" in md
    doc = json.loads(files["json"].read_text())
    assert [r["cell_id"] for r in doc["refused"]] == ["refused"] and doc["failed"] == []
    # the same method has the same colour and marker in every report; an unknown one a stable pick; a
    # variant of a method its colour, dashed, with a marker that is not the method's
    assert _style(recs[1]) == (*METHOD_STYLE["transact"], "-") and _style({"method": "x", "label": "x"}) == _style(
        {"method": "x", "label": "x"})
    for method, label in (("transact", "transact-auto"), ("slicegpt", "slicegpt-head")):
        variant = _style({"method": method, "label": label})
        assert variant[0] == METHOD_STYLE[method][0] and variant[2] == "--"
        assert variant[1] not in (METHOD_STYLE[method][1], METHOD_STYLE[method][1].lower(), "p" if method == "transact" else "")


def test_recovery_series_follow_each_cell_through_its_budgets(tmp_path):
    """PPL against recovery tokens: one series per pruned cell (label, target, mode, seed) measured at
    two budgets or more, starting from the untrained cell; a cell at one budget draws no series, and a
    report with no such cell has no recovery plot."""
    from compress.bench.report import recovery_series, write_report

    def cell(method, ratio, ppl, tokens=0, mode="full"):
        r = _acc_record(method, {"piqa": 0.6}, 200, ratio, ppl)
        r["cell_id"] += f"{method}{ratio}{tokens}{mode}"
        r["recovery"] = {"tokens": tokens, "mode": mode}
        r["target"] = "100%" if method == "dense" else f"{round(100 * ratio)}%"
        return r

    dense = cell("dense", 1.0, 20.0)
    recs = [dense, cell("lorap", 0.5, 400.0), cell("lorap", 0.5, 200.0, 16384), cell("lorap", 0.5, 80.0, 131072),
            cell("lorap", 0.5, 150.0, 16384, "lora"), cell("transact", 0.5, 900.0),
            cell("transact", 0.8, 90.0, 16384)]  # transact 80 %: no untrained cell, one budget: no series
    series = recovery_series(recs, ("wikitext2", "2048"))
    assert series == {("lorap", "50%", "full", 0): [(0, 400.0), (16384, 200.0), (131072, 80.0)],
                      ("lorap", "50%", "lora", 0): [(0, 400.0), (16384, 150.0)]}
    assert "plot_ppl_vs_recovery" in write_report(recs, tmp_path / "with")
    files = write_report([dense, recs[1], recs[5], recs[6]], tmp_path / "without")
    assert "plot_ppl_vs_recovery" not in files and not (tmp_path / "without" / "ppl_vs_recovery.png").exists()


def test_unsupported_is_refused_a_bad_target_failed():
    from compress.bench.record import fail
    from compress.errors import TargetError, Unsupported

    assert fail({}, "preflight", Unsupported("cannot"))["status"] == "refused"
    assert fail({}, "prune", Unsupported("cannot"))["status"] == "refused"
    assert fail({}, "preflight", TargetError("target 1M is above the dense model"))["status"] == "failed"
    assert fail({}, "eval", Unsupported("x"))["status"] == "failed"


@needs_assets
def test_a_target_below_a_methods_smallest_model_is_refused_not_failed(tmp_path):
    """The bench preflight of real cells: 1 % of stories260K is below what each method's structures
    can cut (one head / channel per layer, one layer, rank-1 factors): refused, with the method's reason;
    a target above the dense model stays a failure (the suite is wrong)."""
    from compress.bench.record import fail, new_record
    from compress.bench.runner import preflight
    from compress.errors import TargetUnreachable

    text = TINY.replace("methods: [random, nosuch]", "methods: [random, transact, llm_pruner, lorap, depth]")
    suite = load_suite(_write(tmp_path, text.replace('targets: ["50%", "1M"]', 'targets: ["1%", "1M"]')))
    seen = set()
    for cell in suite.cells():
        if cell.method == "dense":
            continue
        err = preflight(cell)
        rec = fail(new_record(cell), "preflight", err)
        if cell.target == "1%":
            assert isinstance(err, TargetUnreachable) and rec["status"] == "refused", (cell.method, err)
            assert "smallest" in rec["error"] or "single decoder layer" in rec["error"]
            seen.add(cell.method)
        else:
            assert not isinstance(err, TargetUnreachable) and rec["status"] == "failed", (cell.method, err)
    assert seen == {"random", "transact", "llm_pruner", "lorap", "depth"}


def test_report_inputs(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(FIXTURES / "records.jsonl", run / "records.jsonl")
    rc, out, _ = _cli(capsys, "report", run, "--json")
    assert rc == 0 and set(json.loads(out)) >= {"markdown", "csv", "json", "plot_ppl_vs_flops", "plot_ppl_vs_kv",
                                                 "plot_overview", "plot_accuracy_vs_flops"}
    assert (run / "report" / "report.md").is_file()
    rc, _, err = _cli(capsys, "report", tmp_path / "nothing-here")
    assert rc == 2 and "no records at" in err


# ------------------------------------------------------------------------------ compress eval


@needs_assets
def test_eval_cli_perplexity_and_limit(capsys):
    from compress.cli import _limit

    assert _limit(4.0) == 4 and isinstance(_limit(4.0), int) and _limit(0.25) == 0.25 and _limit(None) is None
    stories = Path(assets_dir()) / "models" / "stories260k"
    rc, out, err = _cli(capsys, "eval", stories, "--ppl", "tinystories:64", "--max-windows", "2")
    assert rc == 0, err
    assert out.startswith("{"), out[:80]  # stdout is the JSON alone (progress bars go to stderr)
    res = json.loads(out)["ppl"]["tinystories"]["64"]
    assert res["windows"] == 2 and res["ppl"] > 1
    rc, _, err = _cli(capsys, "eval", stories, "--ppl", "tinystories:abc")
    assert rc == 2 and "context lengths must be integers" in err


_RUNNER_DIES = textwrap.dedent('''
    import sys
    from pathlib import Path
    from compress.bench import load_suite
    from compress.bench.runner import _spawn
    cell = load_suite(Path(sys.argv[1])).cells()[0]
    print("ready", flush=True)
    _spawn(cell, Path(sys.argv[2]), sys.argv[3])
''')


def test_cell_process_dies_with_the_runner(tmp_path, assets):  # the smoke suite names $COMPRESS_ASSETS
    """A runner killed by SIGKILL (no cleanup possible) must not leave its cell running for hours."""
    import os
    import signal
    import subprocess
    import sys
    import time

    fake_python = tmp_path / "python"  # stands in for the cell: ignores its arguments, runs long
    fake_python.write_text("#!/bin/sh\nexec sleep 300\n")
    fake_python.chmod(0o755)
    runner = subprocess.Popen([sys.executable, "-c", _RUNNER_DIES, str(SUITES / "smoke.yaml"),
                               str(tmp_path / "cell.log"), str(fake_python)], stdout=subprocess.PIPE, text=True)
    try:
        assert runner.stdout.readline().strip() == "ready"
        children: list[int] = []
        for _ in range(200):  # the cell process appears as the runner's child
            kids = Path(f"/proc/{runner.pid}/task/{runner.pid}/children")
            children = [int(x) for x in kids.read_text().split()] if kids.exists() else []
            if children:
                break
            time.sleep(0.05)
        assert len(children) == 1, "the runner started no cell process"
        cell = children[0]
        runner.send_signal(signal.SIGKILL)
        runner.wait(timeout=30)
        for _ in range(100):
            try:
                os.kill(cell, 0)
            except ProcessLookupError:
                break
            if Path(f"/proc/{cell}/stat").read_text().split()[2] == "Z":  # dead, waiting to be reaped by init
                break
            time.sleep(0.05)
        else:
            os.kill(cell, signal.SIGKILL)
            pytest.fail("the cell process outlived its runner")
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
