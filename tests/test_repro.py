"""Reproducibility: recipes (``compress run --recipe``), determinism of every registered method, the
repro suite with recipe references and ``--targets``, ``compress bench --verify``, the published
numbers next to matching cells (``compress report --reported``), and the pinned stack."""

from __future__ import annotations

import copy
import json
import re
import textwrap
from pathlib import Path

import pytest
import yaml

from compress.bench import load_suite, read_records
from compress.cli import main
from compress.errors import UsageError
from compress.io.export import PLAN_FILE, weights_sha256
from compress.io.recipe import RECIPE_FILE, RUN_KEYS, load_recipe
from compress.plugins import get_registry

ROOT = Path(__file__).resolve().parents[1]
RECIPE_DIRS = [ROOT / "baselines" / "compress_baselines" / "recipes",
               ROOT / "plugins" / "transact" / "compress_transact" / "recipes"]
RECIPES = sorted(p for d in RECIPE_DIRS for p in d.glob("*.yaml"))
REPRO = ROOT / "benchmarks" / "suites" / "repro.yaml"
REPORTED = ROOT / "benchmarks" / "reported"
FIXTURE = ROOT / "tests" / "fixtures" / "bench" / "records.jsonl"
_REG = get_registry()
METHODS = sorted(_REG.pruners)

pytestmark = pytest.mark.usefixtures("one_thread")


def _cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


# ------------------------------------------------------------------------------------ recipes


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_committed_recipes_are_valid(path):
    recipe = load_recipe(path)
    assert recipe.method in _REG.pruners, f"{path.name} names no registered method"
    recipe.check_settings(recipe.method, get_registry())  # every key is a setting of that method (or a run key)
    assert not set(recipe.run) - {"calib"}, "committed recipes leave target/seed/recovery to the run"


def test_every_builtin_method_has_a_recipe_and_no_setting_shadows_a_run_key():
    named = {load_recipe(p).method for p in RECIPES}
    ours = {r["name"] for r in _REG.methods_table() if r["distribution"] in ("compress-transact",
                                                                             "compress-baselines")}
    assert ours <= named, f"methods without a recipe: {sorted(ours - named)}"
    for name, cls in _REG.pruners.items():
        assert not set(cls.Config.model_fields) & set(RUN_KEYS), name


def test_run_with_recipe_saves_resolved_recipe_and_flags_win(tmp_path, capsys, stories_dir):
    recipe = _write(tmp_path / "r.yaml", """\
        method: l2          # an alias: the resolved recipe names the method
        target: 60%
        seed: 3
        gqa: heads
        mlp_round_to: 4
        """)
    out = tmp_path / "out"
    rc, stdout, err = _cli(capsys, "run", "--recipe", recipe, "--model", stories_dir, "--out", out,
                           "--set", "mlp_round_to=8", "--seed", "5", "--json")
    assert rc == 0, err
    rec = json.loads(stdout)
    resolved = rec["recipe"]
    assert resolved["method"] == "magnitude" and resolved["target"] == "60%"
    assert resolved["seed"] == 5 and rec["seed"] == 5  # the CLI flag wins over the recipe
    assert resolved["gqa"] == "heads" and resolved["mlp_round_to"] == 8  # --set wins over the recipe
    assert resolved["attn_ratio"] == 1.0 and resolved["calib"] is None  # defaults filled; no calibration read
    assert resolved == {**rec["config"], **{k: resolved[k] for k in resolved if k in RUN_KEYS}}
    saved = yaml.safe_load((out / RECIPE_FILE).read_text())
    assert saved == resolved and json.loads((out / "compress_run.json").read_text())["recipe"] == resolved
    # the saved recipe is itself a recipe: re-running it gives the same weights, byte for byte
    rc, _, err = _cli(capsys, "run", "--recipe", out / RECIPE_FILE, "--model", stories_dir, "--out",
                      tmp_path / "again", "--json")
    assert rc == 0, err
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "again" / "model.safetensors").read_bytes()
    # --config is kept as an alias of --recipe
    rc, stdout, err = _cli(capsys, "run", "--config", recipe, "--model", stories_dir, "--no-save", "--json")
    assert rc == 0 and json.loads(stdout)["recipe"]["seed"] == 3, err


RECIPE_ERRORS = [
    ("method: magnitude\ntarget: 60%\ngqaa: heads\n", [], "unknown key 'gqaa'"),
    ("method: magnitude\ntarget: 60%\nseed: abc\n", [], "seed must be a int"),
    ("method: magnitude\nrecover_mode: qlora\n", ["--target", "60%"], "recover_mode must be one of"),
    ("method: transact\n", ["--method", "magnitude", "--target", "60%"], "is for method 'transact', not 'magnitude'"),
    ("gqa: heads\n", ["--target", "60%"], "--method is required"),
    ("method: magnitude\n", [], "--target is required"),
    ("- a list\n", [], "must hold a mapping"),
    ("method: magnitude\ntarget: 60%\n  bad: [\n", [], "is not valid YAML"),
]


@pytest.mark.parametrize(("text", "extra", "message"), RECIPE_ERRORS, ids=[m for *_, m in RECIPE_ERRORS])
def test_bad_recipe_is_one_line_usage_error(tmp_path, capsys, stories_dir, text, extra, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    rc, _, err = _cli(capsys, "run", "--recipe", recipe, *extra, "--model", stories_dir, "--out", tmp_path / "o")
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    if "unknown key" in message:
        assert str(recipe) in err and "valid keys" in err  # names the file and what is allowed
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ determinism


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """The tiny GQA model (tied embeddings) with the stories260K tokenizer, saved as an HF folder."""
    from compress.testing import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    if tok is None:
        pytest.skip("needs $COMPRESS_ASSETS")
    d = tmp_path_factory.mktemp("tiny")
    tiny_model("llama-gqa").save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.mark.parametrize("name", METHODS)
def test_prune_and_export_are_deterministic(name, tiny_dir, tmp_path):
    """Same seed and inputs -> byte-identical model.safetensors and identical compress_plan.json and
    resolved recipe, through the real ``compress run`` path; the record carries the three hashes."""
    from compress.pipeline.run import RunSpec, run

    cls = _REG.pruners[name]
    settings = {"calib_samples": 4, "calib_seq_len": 64}
    recs = []
    for i in (1, 2):
        spec = RunSpec(method=name, target="60%", model=str(tiny_dir), out=str(tmp_path / f"o{i}"), seed=7,
                       calib="tinystories", settings=settings, progress=False)
        recs.append(run(spec, log=lambda m: None).record)
    a, b = tmp_path / "o1", tmp_path / "o2"
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / PLAN_FILE).read_text() == (b / PLAN_FILE).read_text()
    assert (a / RECIPE_FILE).read_text() == (b / RECIPE_FILE).read_text()
    r1, r2 = recs
    assert re.fullmatch(r"[0-9a-f]{64}", r1["plan_hash"]) and r1["plan_hash"] == r2["plan_hash"]
    assert r1["weights_sha256"] == weights_sha256(a) == r2["weights_sha256"]
    if cls.capabilities.needs_calibration:
        assert re.fullmatch(r"[0-9a-f]{64}", r1["calibration_hash"]) and r1["calibration_hash"] == r2["calibration_hash"]
        assert r1["recipe"]["calib"] == "tinystories"
    else:
        assert r1["calibration_hash"] is None and r1["recipe"]["calib"] is None
    assert r1["recipe"]["seed"] == 7 and r1["recipe"]["method"] == name
    on_disk = json.loads((a / "compress_run.json").read_text())
    assert {"calibration_hash", "plan_hash", "weights_sha256", "recipe", "versions"} <= set(on_disk)


# ------------------------------------------------------------------------------ suites


@pytest.fixture()
def suite_dir(tmp_path):
    d = tmp_path / "suites"
    (d / "recipes").mkdir(parents=True)
    _write(d / "recipes" / "mag.yaml", """\
        method: magnitude
        calib: tinystories
        gqa: heads
        mlp_round_to: 4
        """)
    return d


SUITE = """\
name: tinyrepro
models:
  - id: stories260k
    path: ${COMPRESS_ASSETS}/models/stories260k
methods:
  - name: magnitude
    recipe: recipes/mag.yaml
    settings: {mlp_round_to: 2}
targets: ["60%", "50%"]
eval:
  ppl: {tinystories: [128]}
  max_windows: 2
  latency: null
threads: 1
"""


def test_suite_method_recipe_is_merged_under_its_settings(suite_dir, assets):
    suite = load_suite(_write(suite_dir / "s.yaml", SUITE))
    cells = suite.cells(methods=["magnitude"])
    assert [c.target for c in cells] == ["60%", "50%"]
    assert cells[0].settings == {"gqa": "heads", "mlp_round_to": 2}  # the entry wins over the recipe
    assert cells[0].calib == "tinystories"  # the recipe's calib is the entry's default
    # the recipe's content is part of the cell id: editing it changes the cell
    _write(suite_dir / "recipes" / "mag.yaml", "method: magnitude\ngqa: groups\n")
    assert load_suite(suite_dir / "s.yaml").cells(methods=["magnitude"])[0].id != cells[0].id
    # --targets keeps the dense row unless --methods drops it; an unknown target is refused
    assert [c.method for c in suite.cells(targets=["50 %"])] == ["dense", "magnitude"]
    with pytest.raises(UsageError, match="no target '80%' in suite tinyrepro"):
        suite.cells(targets=["80%"])


@pytest.mark.parametrize(("recipe", "message"), [
    ("method: transact\n", "is for method 'transact', not 'magnitude'"),
    ("method: magnitude\ntarget: 50%\n", "sets 'target'"),
    ("method: magnitude\ngqaa: heads\n", "unknown key 'gqaa'"),
])
def test_bad_suite_recipe_is_one_line_usage_error(suite_dir, tmp_path, capsys, assets, recipe, message):
    (suite_dir / "recipes" / "mag.yaml").write_text(recipe)
    rc, _, err = _cli(capsys, "bench", _write(suite_dir / "s.yaml", SUITE), "--out", tmp_path / "o")
    assert rc == 2 and message in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_repro_suite_uses_the_committed_recipes(assets):
    suite = load_suite(REPRO)
    cells = suite.cells()
    assert cells[0].method == "dense" and len(cells) == 1 + 5 * 2
    assert {c.method for c in cells[1:]} == {"transact", "llm_pruner", "slicegpt", "lorap", "magnitude"}
    assert {c.target for c in cells[1:]} == {"80%", "50%"} and all(c.recovery["tokens"] == 0 for c in cells)
    assert suite.threads == 1 and suite.eval.tasks == [] and suite.eval.latency is None
    assert suite.eval.ppl == {"wikitext2": [2048, 128]} and suite.eval.max_tokens == 16384
    # each cell runs its method's committed recipe; the only changes are the documented calibration sizes
    overrides = {"transact": {"calib_samples": 32, "calib_seq_len": 512, "mlp_round_to": 1}, "slicegpt": {"calib_samples": 8}}
    for c in cells[1:]:
        entry = next(m for m in suite.methods if m.name == c.method)
        assert entry.recipe.endswith(f"recipes/{c.method}.yaml")
        recipe = load_recipe(REPRO.parent / entry.recipe)
        assert c.settings == {**recipe.settings, **overrides.get(c.method, {})}, c.method
    (one,) = suite.cells(methods=["magnitude"], targets=["80%"])
    assert one.describe() == "smollm2-135m · magnitude · 80% · recovery none · seed 0"


# ------------------------------------------------------------------------------ verify


def test_bench_verify_reproduces_a_cell_and_reports_a_mismatch(suite_dir, tmp_path, capsys, assets):
    suite = _write(suite_dir / "s.yaml", SUITE)
    first = tmp_path / "first"
    rc, _, err = _cli(capsys, "bench", suite, "--out", first, "--methods", "magnitude", "--targets", "60%",
                      "--no-report")
    assert rc == 0, err
    (rec,) = read_records(first / "records.jsonl")
    assert rec["status"] == "ok" and rec["recipe"]["method"] == "magnitude" and rec["recipe"]["gqa"] == "heads"
    from compress.pipeline.record import STACK

    assert {d.replace("-", "_") for d in STACK} <= set(rec["versions"])
    # 1. a fresh run of the same cell is identical
    again = tmp_path / "again"
    rc, out, err = _cli(capsys, "bench", suite, "--methods", "magnitude", "--targets", "60%",
                        "--verify", first / "records.jsonl", "--out", again)
    assert rc == 0, err
    assert out.startswith(f"identical  {rec['cell_id']}") and "PPL tinystories@128" in out
    assert "1 identical, 0 mismatched" in err
    # 2. a committed record that differs: exit 1, one line naming what differs (no re-run: --resume)
    tampered = copy.deepcopy(rec)
    tampered["ppl"]["tinystories"]["128"]["ppl"] = rec["ppl"]["tinystories"]["128"]["ppl"] * (1 + 1e-12)
    tampered["achieved"]["params"] += 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(tampered) + "\n")
    rc, out, err = _cli(capsys, "bench", suite, "--methods", "magnitude", "--targets", "60%",
                        "--verify", bad, "--out", again, "--resume")
    assert rc == 1 and "done before, skipped" in err, err
    (line,) = out.strip().splitlines()
    assert line.startswith(f"MISMATCH   {rec['cell_id']}")
    assert "ppl.tinystories.128.ppl" in line and "achieved.params" in line
    # 3. a cell the committed records do not hold (e.g. its recipe changed): a usage error, nothing run
    rc, _, err = _cli(capsys, "bench", suite, "--methods", "magnitude", "--targets", "50%",
                      "--verify", first / "records.jsonl")
    assert rc == 2 and "no committed record for cell" in err


# ------------------------------------------------------------------------------ report


def _as_llama7b(records: list[dict], target: str, tokens: int = 0) -> list[dict]:
    """Fixture records relabelled as a LLaMA-7B run with WikiText-2 PPL at 128 and the 7 tasks."""
    out = []
    for r in records:
        if r["status"] != "ok" or r["method"] not in ("dense", "random"):
            continue
        r = copy.deepcopy(r)
        r["model"]["id"] = "llama-7b"
        r["ppl"] = {"wikitext2": {"128": {"ppl": 30.0 if r["method"] != "dense" else 12.0, "windows": 4}}}
        r["tasks"]["boolq"] = {"acc": 0.6, "score": 0.6, "metric": "acc", "n": 4}
        if r["method"] != "dense":
            r["target"], r["recovery"] = target, {"tokens": tokens, "mode": "full", "settings": {}}
            r["cell_id"] = f"{r['cell_id'][:10]}{target[:2]}{tokens}"[:16]
        out.append(r)
    return out


def test_report_shows_paper_rows_only_next_to_matching_cells(tmp_path, capsys):
    records = _as_llama7b(read_records(FIXTURE), "80%")
    runs = tmp_path / "runs.jsonl"
    runs.write_text("".join(json.dumps(r) + "\n" for r in records))
    rc, md, err = _cli(capsys, "report", runs, "--reported", REPORTED, "--out", tmp_path / "rep")
    assert rc == 0, err
    rows = [ln for ln in md.splitlines() if ln.startswith("| ")]
    labels = [ln.split(" | ")[0][2:] for ln in rows[1:]]
    # ours first in each slot, then the published rows of the same model, target and recovery kind
    assert labels[0] == "dense" and labels[1].startswith("*paper*: LLaMA-7B")
    ours = labels.index("random")
    assert all(lab.startswith("*paper*") for lab in labels[ours + 1:])
    assert "*paper*: Element¹ w/o tune" in labels and "*paper*: LoRAP 20% w/o tune" in labels
    assert not any("w/ tune" in lab or "50%" in lab for lab in labels)  # no recovery / 50 % cell here
    element1 = next(r for r in rows if "Element¹ w/o tune" in r)
    assert "19.09" in element1 and "0.571" in element1 and "**" not in element1  # never "best"
    assert "5.42G" in element1
    assert "published by Ma, Fang, Wang" in md and "Not re-measured here" in md
    # the same records for another model: no published row is shown, and the report says so
    for r in records:
        r["model"]["id"] = "smollm2-135m"
    runs.write_text("".join(json.dumps(r) + "\n" for r in records))
    rc, md, _ = _cli(capsys, "report", runs, "--reported", REPORTED, "--out", tmp_path / "rep2")
    assert rc == 0 and "*paper*" not in md and "published numbers not shown" in md and "llama-7b" in md
    # a bad reported file is a one-line usage error
    bad = tmp_path / "bad.yaml"
    bad.write_text("source: x\ntable: t\nmodel: m\nrows: [{method: a, label: b, target: 80%, colour: red}]\n")
    rc, _, err = _cli(capsys, "report", runs, "--reported", bad, "--out", tmp_path / "rep3")
    assert rc == 2 and "unknown key 'rows.0.colour'" in err and err.count("\n") == 1


def test_report_reads_one_records_folder_per_tox_env(tmp_path, capsys):
    lines = FIXTURE.read_text().splitlines(keepends=True)
    for i, chunk in enumerate((lines[:3], lines[3:])):
        (tmp_path / "records" / f"repro-{i}").mkdir(parents=True)
        (tmp_path / "records" / f"repro-{i}" / "records.jsonl").write_text("".join(chunk))
    rc, _, err = _cli(capsys, "report", tmp_path / "records", "--out", tmp_path / "rep", "--json")
    assert rc == 0, err
    doc = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert len(doc["rows"]) + len(doc["failed"]) == len(read_records(FIXTURE))


# ------------------------------------------------------------------------------ stack


def test_constraints_pin_the_stack_that_records_carry():
    from compress.pipeline.record import STACK, versions

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, ver = line.partition("==")
            assert ver, f"constraints.txt pins exact versions only: {line!r}"
            pins[name.lower().replace("_", "-")] = ver
    assert pins["torch"] == "2.13.0"
    have = versions()
    for dist in ("torch", "transformers", *STACK):
        if dist.startswith("compress"):
            continue  # our own distributions, installed from this checkout
        assert dist.lower().replace("_", "-") in pins, f"{dist} is recorded but not pinned"
        installed = have[dist.replace("-", "_")].split("+")[0]
        assert installed == pins[dist.lower().replace("_", "-")], f"{dist}: installed {installed}, pinned"
