"""The ``compress`` command line: in-process through ``compress.cli.main`` and a few real subprocesses."""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from compress.cli import main
from compress.io.export import weights_sha256

ROOT = Path(__file__).resolve().parents[1]
LLAMA2_7B = ROOT / "benchmarks" / "configs" / "llama-2-7b.json"
COMPRESS_BIN = Path(sys.executable).with_name("compress")


def _unique_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


def _run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# ------------------------------------------------------------------------------------------- run
def test_run_magnitude_writes_reloadable_folder(tmp_path, capsys, stories_dir):
    out = tmp_path / "out"
    rc, stdout, err = _run_cli(capsys, "run", "--method", "magnitude", "--target", "60%", "--model",
                               str(stories_dir), "--out", str(out), "--json")
    assert rc == 0, err
    rec = json.loads(stdout)
    assert rec["method"] == "magnitude" and rec["target"] == "60%"
    assert rec["plugin"]["distribution"] == "compress-baselines"
    assert rec["export"]["path"] == str(out.resolve()) and rec["export"]["kind"] == "stock"
    assert rec["achieved"]["params"] <= 0.6 * rec["dense"]["params"] < rec["dense"]["params"]
    assert rec["weights_sha256"] == weights_sha256(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert _unique_params(reloaded) == rec["achieved"]["params"]
    on_disk = json.loads((out / "compress_run.json").read_text())
    assert on_disk["achieved"] == rec["achieved"] and on_disk["plan_hash"] == rec["plan_hash"]

    # the same run in-process (no export) gives the same plan and the same logits as the saved folder
    from compress.pipeline.run import RunSpec, run

    mem = run(RunSpec(method="magnitude", target="60%", model=str(stories_dir), progress=False),
              log=lambda m: None)
    assert mem.record["plan_hash"] == rec["plan_hash"]
    ids = torch.randint(3, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (reloaded(ids).logits - mem.model(ids).logits).abs().max().item()
    assert diff <= 1e-5


def test_run_human_summary(tmp_path, capsys, stories_dir):
    rc, stdout, err = _run_cli(capsys, "run", "--method", "random", "--target", "kv:50%", "--model",
                               str(stories_dir), "--out", str(tmp_path / "o"), "--no-progress")
    assert rc == 0, err
    assert "random → kv:50%" in stdout and "saved" in stdout and "KV bytes/token" in stdout
    assert (tmp_path / "o" / "config.json").is_file()


def test_dry_run_llama2_7b_transact_loads_no_weights(capsys, monkeypatch):
    import transformers

    import compress.io.loading

    def no_weights(*a, **k):
        raise AssertionError("--dry-run must not load weights")

    monkeypatch.setattr(compress.io.loading, "load_model", no_weights)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", no_weights)
    rc, stdout, err = _run_cli(capsys, "run", "--method", "transact", "--target", "2B", "--model", str(LLAMA2_7B),
                               "--dry-run", "--json")
    assert rc == 0, err
    rec = json.loads(stdout)
    assert rec["dry_run"] is True and rec["method"] == "transact"
    assert 1.95e9 <= rec["achieved"]["params"] <= 2e9
    assert 6.7e9 < rec["dense"]["params"] < 6.8e9
    assert rec["export"]["path"] is None and rec["export"]["kind"] in ("stock", "compress")
    rc, stdout, err = _run_cli(capsys, "run", "--method", "transact", "--target", "2B", "--model", str(LLAMA2_7B),
                               "--dry-run")
    assert rc == 0, err
    assert "dry run: no weights loaded" in stdout and "would export" in stdout


# ------------------------------------------------------------------------------------------- usage errors
# The table of bad inputs (exit 2, one line, nothing written) is tests/test_reliability.py::BAD_INPUT.
def test_out_required(capsys, stories_dir):
    rc, _, err = _run_cli(capsys, "run", "--method", "magnitude", "--target", "60%", "--model", str(stories_dir))
    assert rc == 2 and "--out is required" in err


def test_argparse_errors_exit_2(capsys):
    # --method may come from a --recipe, so its absence is our one-line usage error, not argparse's
    assert main(["run", "--target", "60%"]) == 2
    assert "--method is required" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ei:
        main(["frobnicate"])
    assert ei.value.code == 2


def test_kv_target_refused_for_heads_mode(tmp_path, capsys, stories_dir):
    rc, _, err = _run_cli(capsys, "run", "--method", "magnitude", "--target", "kv:50%", "--set", "gqa=heads",
                          "--model", str(stories_dir), "--out", str(tmp_path / "o"))
    assert rc == 2 and "kv: target needs whole KV groups" in err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------- listing / inspect
def test_methods_and_plugins(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps cells at 80 columns when not on a terminal
    rc, out, _ = _run_cli(capsys, "methods", "--json")
    assert rc == 0
    rows = {r["name"]: r for r in json.loads(out)}
    assert {"random", "magnitude", "transact"} <= set(rows)
    assert rows["magnitude"]["aliases"] == ["l2"] and rows["transact"]["distribution"] == "compress-transact"
    rc, out, _ = _run_cli(capsys, "methods")
    assert rc == 0 and "magnitude  (aliases: l2)" in out and "compress-transact 0.1.0" in out
    rc, out, _ = _run_cli(capsys, "plugins", "--json")
    assert rc == 0
    doc = json.loads(out)
    plugins = {p["name"]: p for p in doc["plugins"]}
    assert plugins["naive"]["status"] == "loaded" and plugins["naive"]["methods"] == ["magnitude", "random"]
    assert {"llama", "qwen2", "compress"} <= set(doc["architectures"])
    assert all("traceback" not in p for p in doc["plugins"])
    rc, out, _ = _run_cli(capsys, "plugins")
    assert rc == 0 and "naive" in out and "architectures:" in out


def test_inspect(capsys, stories_dir):
    rc, out, err = _run_cli(capsys, "inspect", str(stories_dir), "--json")
    assert rc == 0, err
    doc = json.loads(out)
    model = AutoModelForCausalLM.from_pretrained(stories_dir)
    assert doc["footprint"]["params"] == _unique_params(model)
    assert doc["model_type"] == "llama" and doc["layers"] == model.config.num_hidden_layers
    assert doc["methods"]["magnitude"] == "yes" and doc["methods"]["transact"] == "yes"
    rc, out, err = _run_cli(capsys, "inspect", str(stories_dir))
    assert rc == 0, err
    assert f"parameters {_unique_params(model):,}" in out
    rc, out, err = _run_cli(capsys, "inspect", str(LLAMA2_7B), "--json")
    assert rc == 0 and 6.7e9 < json.loads(out)["footprint"]["params"] < 6.8e9


def test_inspect_missing_model(capsys, tmp_path):
    rc, _, err = _run_cli(capsys, "inspect", str(tmp_path / "nope"))
    assert rc == 2 and err.startswith("error: ") and "does not exist" in err


# ------------------------------------------------------------------------------------------- real subprocesses
def test_console_script(tmp_path, stories_dir):
    out = tmp_path / "out"
    r = subprocess.run([str(COMPRESS_BIN), "run", "--method", "magnitud", "--target", "60%", "--model",
                        str(stories_dir), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: unknown method 'magnitud'; did you mean 'magnitude'? "
                                             "known methods: " + r.stderr.split("known methods: ", 1)[1].strip()]
    assert r.stdout == ""
    assert not out.exists()


# ------------------------------------------------------------------------------------------- SmolLM2 (slow)
@pytest.mark.slow
def test_run_magnitude_smollm2(tmp_path, capsys, monkeypatch, smollm2_dir, smollm2_loaded):
    """``compress run`` end to end on SmolLM2-135M. The GGUF is dequantized once per session (~30 s):
    ``load_model`` is checked against the same path and then answers with a copy of that load."""
    import compress.io.export
    import compress.io.loading

    calls, exported = [], {}

    def cached_load(source=None, **kw):
        calls.append(source)
        assert Path(source) == smollm2_dir and kw.get("trust_remote_code") is False
        return copy.deepcopy(smollm2_loaded)

    real_export = compress.io.export.export_model

    def spy_export(model, *a, **k):
        exported["model"] = model
        return real_export(model, *a, **k)

    monkeypatch.setattr(compress.io.loading, "load_model", cached_load)
    monkeypatch.setattr(compress.io.export, "export_model", spy_export)
    out = tmp_path / "smol"
    rc, stdout, err = _run_cli(capsys, "run", "--method", "magnitude", "--target", "60%", "--model",
                               str(smollm2_dir), "--out", str(out), "--no-progress")
    assert rc == 0, err
    assert calls == [str(smollm2_dir)] and "saved" in stdout
    cfg = json.loads((out / "config.json").read_text())
    assert "auto_map" not in cfg and "quantization_config" not in cfg
    rec = json.loads((out / "compress_run.json").read_text())
    assert rec["achieved"]["params"] <= 0.6 * rec["dense"]["params"]
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    assert _unique_params(reloaded) == rec["achieved"]["params"]
    tok = smollm2_loaded.tokenizer
    ids = torch.tensor([tok("The quick brown fox jumps over").input_ids])
    with torch.no_grad():
        diff = (reloaded(ids).logits - exported["model"](ids).logits).abs().max().item()
    assert diff <= 1e-4


# ------------------------------------------------------------------------------ instant CLI
def _fresh(code: str, cache: Path, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "COMPRESS_CACHE": str(cache), "COLUMNS": "80", **env}
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=300)


_PROBE = ("import sys\nfrom compress.cli import main\ntry:\n    rc = main({argv!r})\nexcept SystemExit as e:\n"
          "    rc = e.code\nprint('RC', rc, 'TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\n")


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["run", "--help"]])
def test_help_and_version_do_not_import_torch(argv, tmp_path):
    r = _fresh(_PROBE.format(argv=argv), tmp_path)
    assert "RC 0 NO-TORCH" in r.stderr, r.stderr[-2000:]
    if argv == ["--version"]:
        assert r.stdout.strip().startswith("compress 0.")


def test_methods_and_plugins_are_answered_from_the_catalog_without_torch(tmp_path):
    first = _fresh(_PROBE.format(argv=["methods", "--json"]), tmp_path)
    assert "RC 0" in first.stderr, first.stderr[-2000:]
    for argv in (["methods", "--json"], ["plugins", "--json"], ["methods"]):
        again = _fresh(_PROBE.format(argv=argv), tmp_path)
        assert "RC 0 NO-TORCH" in again.stderr, (argv, again.stderr[-2000:])
        if argv == ["methods", "--json"]:
            assert json.loads(again.stdout) == json.loads(first.stdout)  # the cache is the registry's table
    table = _fresh(_PROBE.format(argv=["methods"]), tmp_path).stdout
    assert "transact" in table and max(len(line) for line in table.splitlines()) <= 80
    # another plugin selection is another catalog: rebuilt from the registry, not served stale
    only = _fresh(_PROBE.format(argv=["methods", "--json"]), tmp_path, COMPRESS_PLUGINS="naive")
    assert {r["name"] for r in json.loads(only.stdout)} == {"magnitude", "random"}


@pytest.mark.parametrize("argv", [["methods"], ["methods", "--json"], ["plugins"]])
def test_a_reader_that_went_away_ends_the_command_quietly(argv):
    """``compress methods | head -1``: stdout's reader is gone before the output is written; the command
    stops like a Unix tool killed by SIGPIPE (exit 141, nothing on stderr), both when rich prints the table
    and when print() writes JSON, instead of ``error: BrokenPipeError`` (exit 1)."""
    read, write = os.pipe()
    os.close(read)  # deterministic: every write to stdout fails with EPIPE
    try:
        r = subprocess.run([str(COMPRESS_BIN), *argv], stdout=write, stderr=subprocess.PIPE, text=True, timeout=120,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
    finally:
        os.close(write)
    assert (r.returncode, r.stderr) == (141, ""), (r.returncode, r.stderr)


def test_verbose_is_accepted_after_the_subcommand(capsys):
    rc, _, err = _run_cli(capsys, "run", "--method", "magnitude", "--target", "sixty", "--dry-run", "-v")
    assert rc == 2 and "cannot parse target 'sixty'" in err


def test_every_option_has_help():
    from compress.cli import build_parser

    parser = build_parser()
    missing = []
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)][0]
    for name, sub in [("compress", parser), *subs.choices.items()]:
        for action in sub._actions:
            if action.option_strings and not action.help and action.help is not argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings)}")
    assert not missing, missing


def test_no_progress_silences_third_party_tqdm_bars(tmp_path, stories_dir):
    """transformers' GGUF de-quantization bar and the HF Trainer's use tqdm directly: --no-progress
    (and --json, and a piped stderr) switch them off too."""
    code = ("import sys\nfrom compress.cli import main\n"
            f"rc = main(['run', '--method', 'magnitude', '--target', '60%', '--model', {str(stories_dir)!r}, "
            "'--no-save', '--no-eval', '--no-progress'])\n"
            "from tqdm.auto import tqdm\nbar = tqdm(range(2))\nprint('RC', rc, 'DISABLED' if bar.disable else 'SHOWN')\n")
    r = _fresh(code, tmp_path)
    assert "RC 0 DISABLED" in r.stdout, r.stdout[-1000:] + r.stderr[-2000:]
