"""Reliability: bad input, interruptions, broken plugins, safe loading, plan properties.

* ``BAD_INPUT``: every refusal is one line ``error: ...`` naming the problem and the fix, exit code 2,
  and leaves the working folder exactly as it was.
* Interruptions: a TransAct run killed with SIGKILL after its first shot resumes with ``--resume`` to
  byte-identical weights and plan; checkpoints survive a kill at any moment (kill -9 during export:
  tests/test_export.py; bench cells: tests/test_bench.py).
* Plugins: a method that raises inside ``check``/``plan_shapes``/``prune`` is reported with its plugin
  and distribution; other methods keep working; ``COMPRESS_STRICT_PLUGINS=1`` re-raises
  (import/registration failures: tests/test_plugins.py).
* Safe loading: safetensors only, no remote code unless asked, compress folders checked by hash.
* Properties (hypothesis): any valid plan on a tiny model forwards and measures what sizing predicts.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compress.cli import main
from compress.errors import PluginError, UsageError
from compress.io.checkpoint import CHECKPOINT_FILE, KILL_ENV, read_checkpoint, save_checkpoint
from compress.io.export import PLAN_FILE, export_model, weights_sha256
from compress.io.loading import compress_format, load_model
from compress.model.footprint import footprint
from compress.model.plan import LayerPlan, Plan
from compress.model.sizing import unit_costs
from compress.model.surgery import apply_plan
from compress.pipeline.run import state_dir_for
from compress.testing import tiny_model, tiny_tokenizer
from conftest import kill_9_at_random

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
COMPRESS_BIN = Path(sys.executable).with_name("compress")
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _snapshot(root: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


# ============================================================================== bad-input models
def _copy_model(src: Path, dst: Path, files: tuple[str, ...] = ("config.json", "model.safetensors",
                                                                 "tokenizer.json", "tokenizer_config.json")) -> Path:
    dst.mkdir(parents=True)
    for f in files:
        shutil.copyfile(src / f, dst / f)
    return dst


def _edit_weights(folder: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(folder / "model.safetensors")
    fn(sd)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})


def _tiny_gguf(path: Path) -> bytes:
    """A small, valid GGUF file (one tensor); its bytes."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def _lying_config(src: Path, dst: Path, change: dict) -> Path:
    """A copy of the model at ``src`` whose config.json says ``change`` (the weights stay as they are)."""
    folder = _copy_model(src, dst)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(change)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


_CUSTOM_CODE = "import pathlib\npathlib.Path(__file__).with_name('CODE_WAS_RUN').write_text('yes')\n"


@pytest.fixture(scope="module")
def bad(tmp_path_factory, stories_dir) -> dict[str, Path]:
    """Broken or unsupported model folders, built once (outside every test's working folder)."""
    root = tmp_path_factory.mktemp("bad-models")
    m: dict[str, Path] = {}
    m["nan"] = _copy_model(stories_dir, root / "nan")
    _edit_weights(m["nan"], lambda sd: sd["model.layers.0.self_attn.q_proj.weight"].__setitem__((0, 0), float("nan")))
    m["inf"] = _copy_model(stories_dir, root / "inf")  # finite weights whose activations overflow fp32
    _edit_weights(m["inf"], lambda sd: sd["model.layers.1.self_attn.v_proj.weight"].fill_(3e38))
    m["corrupt"] = _copy_model(stories_dir, root / "corrupt")
    (m["corrupt"] / "model.safetensors").write_bytes(b"\x00" * 8 + b"not a safetensors header" * 4)
    m["pickle"] = _copy_model(stories_dir, root / "pickle", ("config.json", "tokenizer.json", "tokenizer_config.json"))
    torch.save({"model.embed_tokens.weight": torch.zeros(512, 64)}, m["pickle"] / "pytorch_model.bin")
    m["notok"] = _copy_model(stories_dir, root / "notok", ("config.json", "model.safetensors"))
    m["noconfig"] = _copy_model(stories_dir, root / "noconfig", ("model.safetensors",))
    m["file"] = root / "weights.txt"
    m["file"].write_text("not a model")
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=512, n_positions=64)).save_pretrained(
        root / "gpt2")
    m["gpt2"] = root / "gpt2"
    # a model whose config asks for its own code (an unknown model_type with auto_map)
    m["custom"] = _copy_model(stories_dir, root / "custom")
    cfg = json.loads((m["custom"] / "config.json").read_text())
    cfg.update(model_type="relcustom", auto_map={"AutoConfig": "configuration_relcustom.RelConfig",
                                                "AutoModelForCausalLM": "modeling_relcustom.RelModel"})
    (m["custom"] / "config.json").write_text(json.dumps(cfg))
    for f in ("configuration_relcustom.py", "modeling_relcustom.py"):
        (m["custom"] / f).write_text(_CUSTOM_CODE)
    # a compress-format export whose modeling file was changed afterwards
    hetero = tiny_model("qwen2")
    apply_plan(hetero, Plan(layers={0: LayerPlan(mlp=list(range(40)))}))
    m["compress"] = root / "compress-format"
    export_model(hetero, tiny_tokenizer(), m["compress"])
    m["tampered"] = root / "tampered"
    shutil.copytree(m["compress"], m["tampered"])
    with open(m["tampered"] / "modeling_compress.py", "a") as f:
        f.write("\nimport os  # injected\n")
    # a compress export whose run record is not the JSON object compress writes
    m["record_list"] = root / "record-list"
    shutil.copytree(m["compress"], m["record_list"])
    (m["record_list"] / "compress_run.json").write_text("[1, 2]\n")
    m["record_binary"] = root / "record-binary"
    shutil.copytree(m["compress"], m["record_binary"])
    (m["record_binary"] / "compress_run.json").write_bytes(b"\x00\xff\xfe{")
    # GGUF files cut short: inside the header (transformers' reader: struct.error), inside the tensor data
    whole = _tiny_gguf(root / "whole.gguf")
    m["gguf_header_cut"] = root / "header-cut.gguf"
    m["gguf_header_cut"].write_bytes(whole[:40])
    m["gguf_data_cut"] = root / "data-cut.gguf"
    m["gguf_data_cut"].write_bytes(whole[:-64])
    m["gguf_garbage"] = root / "garbage.gguf"
    m["gguf_garbage"].write_bytes(b"not a gguf file at all, just text\n" * 4)
    # issue #24 class 4: configs that lie about the weights next to them (stories260k: 5 layers, hidden 64,
    # 8 heads / 4 KV heads)
    for name, change in (("cfg_fewer_layers", {"num_hidden_layers": 3}), ("cfg_huge_layers", {"num_hidden_layers": 10**9}),
                         ("cfg_zero_layers", {"num_hidden_layers": 0}), ("cfg_negative_heads", {"num_attention_heads": -8}),
                         ("cfg_hidden_mismatch", {"hidden_size": 32}), ("cfg_bad_heads", {"num_attention_heads": 7}),
                         ("cfg_layers_text", {"num_hidden_layers": "5"})):
        m[name] = _lying_config(stories_dir, root / name, change)
    m["cfg_nan"] = _copy_model(stories_dir, root / "cfg_nan")
    text = (m["cfg_nan"] / "config.json").read_text()
    (m["cfg_nan"] / "config.json").write_text(text.replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": NaN'))
    m["unreadable"] = _copy_model(stories_dir, root / "unreadable")
    os.chmod(m["unreadable"], 0)
    yield m
    os.chmod(m["unreadable"], 0o755)


_S = ["--set", "calib_samples=2", "--set", "calib_seq_len=32"]  # keep calibrating cases fast
_T = ["--method", "transact", "--target", "60%"]
_M = ["--method", "magnitude", "--target", "60%"]

#: (id, argv, expected text of the one-line error). ``run`` gets --model stories260k and --out
#: {work}/out unless the case names them; {work} is the test's working folder, {X} a ``bad`` model.
BAD_INPUT = [
    ("unknown-method", ["run", "--method", "magnitud", "--target", "60%"], "did you mean 'magnitude'"),
    ("target-garbage", ["run", "--method", "magnitude", "--target", "abc"], "cannot parse target 'abc'"),
    ("target-zero", ["run", "--method", "magnitude", "--target", "0"], "must be a positive amount"),
    ("target-negative", ["run", "--method", "magnitude", "--target=-5"], "is negative"),
    ("target-negative-pct", ["run", "--method", "magnitude", "--target", "-10%"], "is negative"),
    ("target-above-100pct", ["run", "--method", "magnitude", "--target", "150%"], "above 100%"),
    ("target-above-dense", ["run", "--method", "magnitude", "--target", "600M"], "above the dense model"),
    ("target-below-smallest", ["run", "--method", "magnitude", "--target", "10"], "below the smallest legal shape"),
    ("target-unknown-metric", ["run", "--method", "magnitude", "--target", "speed:50%"], "unknown target metric"),
    ("metric-unsupported-by-method", ["run", "--method", "lorap", "--target", "kv:50%"], "KV cache is unchanged"),
    ("model-missing", ["run", *_M, "--model", "{work}/no/such/model"], "does not exist"),
    ("model-is-a-file", ["run", *_M, "--model", "{file}"], "is a file, not a model"),
    ("model-without-config", ["run", *_M, "--model", "{noconfig}"], "without config.json"),
    pytest.param("model-unreadable", ["run", *_M, "--model", "{unreadable}"], "is not readable",
                 marks=pytest.mark.skipif(IS_ROOT, reason="root reads everything")),
    ("model-weights-corrupt", ["run", *_M, "--model", "{corrupt}"], "corrupt or truncated"),
    ("model-pickle-weights", ["run", *_M, "--model", "{pickle}"], "has only pickle weights"),
    ("architecture-unsupported", ["run", *_M, "--model", "{gpt2}"], "architecture 'gpt2' is not supported"),
    ("remote-code-not-trusted", ["inspect", "{custom}"], "unless you pass --trust-remote-code"),
    ("compress-folder-tampered", ["run", *_M, "--model", "{tampered}"], "does not match the sha256 recorded"),
    ("tokenizer-missing", ["run", *_M, "--model", "{notok}"], "no usable tokenizer"),
    ("weights-nan", ["run", *_M, "--model", "{nan}"], "non-finite values in model.layers.0.self_attn.q_proj"),
    ("statistics-inf", ["run", *_T, *_S, "--calib", "tinystories", "--model", "{inf}"], "NaN/inf"),
    ("config-not-json", ["run", *_T, "--config", "{work}/settings.json"], "is not valid JSON"),
    ("config-missing", ["run", *_T, "--config", "{work}/missing.json"], "cannot read"),
    ("calib-missing", ["run", *_T, *_S, "--calib", "{work}/nope.txt"], "does not exist"),
    ("calib-empty", ["run", *_T, *_S, "--calib", "{work}/empty.txt"], "is empty"),
    ("calib-shorter-than-a-block", ["run", *_T, "--set", "calib_seq_len=64", "--calib", "{work}/short.txt"],
     "fewer than one block"),
    ("set-unknown-key", ["run", *_M, "--set", "unknown_key=1"], "unknown key 'unknown_key'"),
    ("set-wrong-type", ["run", *_T, "--set", "shots=abc"], "shots"),
    ("set-not-key-value", ["run", *_T, "--set", "noequals"], "is not key=value"),
    ("out-exists", ["run", *_M, "--out", "{work}/exists"], "already exists and was not written by compress"),
    # issue #24: --out never overlaps an input, and --overwrite never replaces a folder compress did not write
    ("out-exists-not-compress-overwrite", ["run", *_M, "--out", "{work}/exists", "--overwrite"],
     "was not written by compress (no compress_run.json), so it is never replaced"),
    ("out-exists-written-by-compress", ["run", *_M, "--out", "{compress}"], "already exists; pass --overwrite"),
    ("out-is-the-model", ["run", *_M, "--model", "{nan}", "--out", "{nan}", "--overwrite"],
     "is the model folder itself"),
    ("out-inside-the-model", ["run", *_M, "--model", "{nan}", "--out", "{nan}/pruned"], "is inside the model folder"),
    ("out-contains-calib", ["run", *_T, *_S, "--calib", "{work}/short.txt", "--out", "{work}", "--overwrite"],
     "contains --calib"),
    ("out-contains-teacher", ["run", *_M, "--recover-mode", "kd", "--recover-tokens", "64", "--teacher",
                              "{work}/exists", "--out", "{work}", "--overwrite"], "contains --teacher"),
    ("out-contains-recipe", ["run", "--recipe", "{work}/recipe.yaml", "--out", "{work}", "--overwrite"],
     "contains the recipe file"),
    ("recover-out-is-the-model", ["recover", "{compress}", "--tokens", "64", "--out", "{compress}", "--overwrite"],
     "is the model folder itself"),
    ("recover-out-exists-not-compress", ["recover", "{compress}", "--tokens", "64", "--out", "{work}/exists",
                                         "--overwrite"], "was not written by compress"),
    ("recover-record-not-an-object", ["recover", "{record_list}", "--tokens", "64", "--out", "{work}/out"],
     "compress_run.json holds a JSON list, not an object"),
    ("recover-record-not-text", ["recover", "{record_binary}", "--tokens", "64", "--out", "{work}/out"],
     "compress_run.json is not UTF-8 text"),
    ("export-out-inside-the-model", ["export", "{compress}", "--gguf", "f16", "--out", "{compress}/m.gguf"],
     "is inside the model folder"),
    ("export-overwrite-not-a-gguf", ["export", "{compress}", "--gguf", "f16", "--out", "{work}/notes.gguf",
                                     "--overwrite"], "is not a GGUF file, so it is never replaced"),
    ("gguf-header-truncated", ["inspect", "{gguf_header_cut}"], "is not a readable GGUF file (it ends inside"),
    ("gguf-data-truncated", ["run", *_M, "--model", "{gguf_data_cut}"], "its tensor data ends at byte"),
    ("gguf-garbage", ["run", *_M, "--model", "{gguf_garbage}"], "no GGUF magic bytes"),
    ("report-records-not-utf8", ["report", "{work}/binary.jsonl"], "binary.jsonl:2: not UTF-8 text"),
    ("report-records-not-json-lines", ["report", "{work}/notjson.jsonl"], "notjson.jsonl:1: not a JSON line"),
    ("report-record-not-an-object", ["report", "{work}/list.jsonl"], "list.jsonl:2: this line holds a JSON list"),
    ("report-record-missing-keys", ["report", "{work}/partial.jsonl"], "partial.jsonl:1: the record lacks 'method'"),
    ("report-record-wrong-types", ["report", "{work}/types.jsonl"], "types.jsonl:1: 'ppl' is a list, not an object"),
    ("report-out-is-a-records-file", ["report", "{work}/good.jsonl", "--out", "{work}/good.jsonl"],
     "is a file, not a folder"),
    ("resume-checkpoint-garbage", ["run", *_T, "--set", "shots=3", "--out", "{work}/garbled", "--resume"],
     "is unreadable or malformed"),
    ("out-not-writable", ["run", *_M, "--out", "/proc/1/compress-out"], "cannot write to /proc/1"),
    ("out-under-a-file", ["run", *_M, "--out", "{work}/short.txt/out"], "is a file, not a folder"),
    ("dtype-unknown", ["run", *_M, "--dtype", "float8"], "unknown dtype 'float8'"),
    ("device-unavailable", ["run", *_M, "--device", "cuda:99"], "is not available"),
    ("interrupted-run-needs-resume", ["run", *_T, "--set", "shots=3", "--out", "{work}/interrupted"],
     "pass --resume to continue it or --overwrite"),
    ("resume-other-settings", ["run", *_T, "--set", "shots=3", "--out", "{work}/interrupted", "--resume"],
     "had other settings"),
    ("resume-without-out", ["run", *_T, "--no-save", "--resume"], "give the same --out"),
    ("unknown-option", ["run", *_M, "--frobnicate"], "unrecognized arguments: --frobnicate"),
    # issue #24 class 4: configs that lie (checked against bounds and the weight headers before anything is built)
    ("config-fewer-layers-than-weights", ["run", *_M, "--model", "{cfg_fewer_layers}"],
     "says num_hidden_layers=3 but its weights hold 5 layers"),
    ("config-huge-layer-count", ["run", *_M, "--dry-run", "--model", "{cfg_huge_layers}"],
     "num_hidden_layers (decoder layers) is 1,000,000,000, above the limit of 1,024"),
    ("config-huge-layer-count-inspect", ["inspect", "{cfg_huge_layers}"], "above the limit of 1,024"),
    ("config-zero-layers", ["inspect", "{cfg_zero_layers}"], "num_hidden_layers (decoder layers) is 0, it must be"),
    ("config-negative-heads", ["run", *_M, "--model", "{cfg_negative_heads}"], "num_attention_heads (query heads) is -8"),
    ("config-layers-not-int", ["run", *_M, "--dry-run", "--model", "{cfg_layers_text}"],
     "num_hidden_layers (decoder layers) must be a positive integer, got '5'"),
    ("config-shape-mismatch", ["run", *_M, "--model", "{cfg_hidden_mismatch}"],
     "model.embed_tokens.weight is 512×64 in the weights but 512×32 by the config (hidden_size=32)"),
    ("config-bad-head-count", ["run", *_M, "--model", "{cfg_bad_heads}"],
     "num_attention_heads=7 is not a multiple of num_key_value_heads=4"),
    ("config-non-finite", ["inspect", "{cfg_nan}"], "holds NaN, which is not JSON"),
    ("eval-config-fewer-layers", ["eval", "{cfg_fewer_layers}", "--max-windows", "1"], "but its weights hold 5 layers"),
    # class 5: unbounded inputs (special files, expansion, nesting, sizes)
    ("calib-dev-zero", ["run", *_T, *_S, "--calib", "/dev/zero"], "/dev/zero is a character device, not a regular file"),
    ("calib-fifo", ["run", *_T, *_S, "--calib", "{work}/fifo.txt"], "is a FIFO (named pipe), not a regular file"),
    ("recipe-fifo", ["run", *_T, "--recipe", "{work}/fifo.txt"], "is a FIFO (named pipe), not a regular file"),
    ("recipe-yaml-alias-bomb", ["run", "--target", "60%", "--recipe", "{work}/bomb.yaml"],
     "anchors and aliases are refused"),
    ("recipe-nested-deep-yaml", ["run", "--target", "60%", "--recipe", "{work}/deep.yaml"],
     "is nested more than 32 levels deep"),
    ("recipe-nested-deep-json", ["run", "--target", "60%", "--recipe", "{work}/deep.json"],
     "is nested more than 32 levels deep"),
    ("set-calib-samples-huge", ["run", *_T, "--set", "calib_samples=1e12"],
     "calib_samples: Value error, 1,000,000,000,000 is above the limit of 1,048,576"),
    ("set-calib-budget-huge", ["run", *_T, "--set", "calib_samples=1000000", "--set", "calib_seq_len=4096"],
     "calib_samples × calib_seq_len = 4,096,000,000 tokens is above"),
    ("recover-tokens-huge", ["recover", "{compress}", "--tokens", "1000000000000", "--out", "{work}/out"],
     "tokens: Input should be less than or equal to 1073741824"),
    ("run-recover-tokens-huge", ["run", *_M, "--recover-tokens", "1000000000000"],
     "tokens: Input should be less than or equal to 1073741824"),
    # class 7: values that slipped through
    ("set-bool-for-int", ["run", *_T, "--set", "shots=true"], "shots: Value error, must be a number, not the boolean"),
    ("set-float-infinity", ["run", *_T, "--set", "alpha=Infinity"], "alpha: Input should be a finite number"),
    ("set-float-nan", ["run", *_T, "--set", "alpha=NaN"], "alpha: Input should be a finite number"),
    ("seed-too-large", ["run", *_M, "--seed", str(2**70)], "is outside 0..4294967295"),
    ("recipe-seed-too-large", ["run", "--recipe", "{work}/bigseed.yaml"], "seed must be in 0..4294967295"),
    ("recipe-duplicate-key", ["run", "--target", "60%", "--recipe", "{work}/dup.yaml"], "has the key 'shots' twice"),
    ("recipe-json-nan", ["run", "--target", "60%", "--recipe", "{work}/nan.json"], "holds NaN, which is not JSON"),
    ("eval-limit-zero", ["eval", "{compress}", "--tasks", "piqa", "--limit", "0"], "argument --limit: limit 0 must be"),
    ("eval-limit-negative", ["eval", "{compress}", "--tasks", "piqa", "--limit", "-1"], "limit -1 must be positive"),
    ("recover-seq-len-1", ["recover", "{compress}", "--tokens", "64", "--seq-len", "1", "--out", "{work}/out"],
     "seq_len: Input should be greater than or equal to 2"),
    ("recover-set-seq-len-1", ["recover", "{compress}", "--tokens", "64", "--set", "seq_len=1", "--out", "{work}/out"],
     "seq_len: Input should be greater than or equal to 2"),
    ("recover-lr-infinite", ["recover", "{compress}", "--tokens", "64", "--lr", "inf", "--out", "{work}/out"],
     "lr: Input should be a finite number"),
]


def _case_id(case) -> str:
    return case.values[0] if hasattr(case, "values") else case[0]


@pytest.mark.parametrize(("case", "argv", "message"), BAD_INPUT, ids=[_case_id(c) for c in BAD_INPUT])
def test_bad_input_exit_2_one_line_nothing_written(tmp_path, capsys, stories_dir, bad, case, argv, message):
    work = tmp_path / "work"
    work.mkdir()
    (work / "exists").mkdir()
    (work / "exists" / "mine.txt").write_text("keep")
    (work / "settings.json").write_text("{shots: 2,,}")
    (work / "empty.txt").write_text("")
    (work / "short.txt").write_text("Once upon a time.")
    os.mkfifo(work / "fifo.txt")  # a calibration "file" that would block open() forever
    lol = '["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]'
    (work / "bomb.yaml").write_text("method: transact\na: &a " + lol + "\n" + "".join(
        f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)))
    (work / "deep.yaml").write_text("method: transact\nshots: " + "[" * 100_000 + "]" * 100_000 + "\n")
    (work / "deep.json").write_text('{"method": "transact", "shots": ' + "[" * 100_000 + "]" * 100_000 + "}")
    (work / "dup.yaml").write_text("method: transact\nshots: 2\nshots: 3\n")
    (work / "nan.json").write_text('{"method": "transact", "alpha": NaN}')
    (work / "bigseed.yaml").write_text(f"method: magnitude\ntarget: 60%\nseed: {2**70}\n")
    (work / "recipe.yaml").write_text("method: magnitude\ntarget: 60%\n")
    (work / "notes.gguf").write_text("my notes, not a GGUF file")
    good = '{"cell_id": "a", "status": "ok", "method": "m", "model": {"id": "x"}}\n'
    (work / "good.jsonl").write_text(good)
    (work / "binary.jsonl").write_bytes(good.encode() + b"\x89PNG\r\n\x1a\n\x00\xff\xfe\n")
    (work / "notjson.jsonl").write_text("hello\nworld\n")
    (work / "list.jsonl").write_text(good + "[1, 2]\n")
    (work / "partial.jsonl").write_text('{"cell_id": "a", "status": "ok"}\n')
    (work / "types.jsonl").write_text(good.replace("}}", '}, "ppl": [1, 2]}'))
    garbled = state_dir_for(work / "garbled")  # a checkpoint file that is not a safetensors file
    garbled.mkdir()
    (garbled / CHECKPOINT_FILE).write_bytes(b"\x00" * 64)
    # what an interrupted run leaves behind: a checkpoint in the hidden state folder next to its --out
    save_checkpoint(state_dir_for(work / "interrupted"), "key-of-another-run", tiny_model("llama-mha"),
                    {"shot": 1, "shots": 3})
    subs = {"work": str(work), **{k: str(v) for k, v in bad.items()}}
    full = [a.format(**subs) for a in argv]
    if full[0] == "run":
        full += [] if "--model" in full else ["--model", str(stories_dir)]
        full += [] if "--out" in full or "--no-save" in full else ["--out", str(work / "out")]
    before = _snapshot(work)
    rc, stdout, err = _cli(capsys, full)
    assert rc == 2, (stdout, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], lines[0]
    assert "Traceback" not in err
    assert _snapshot(work) == before  # nothing written, nothing removed


def test_bad_input_table_size():
    assert len(BAD_INPUT) >= 22
    ids = {_case_id(c) for c in BAD_INPUT}
    # issue #24 classes 4 (configs that lie), 5 (unbounded inputs), 7 (values that slipped through)
    assert {"config-fewer-layers-than-weights", "config-huge-layer-count", "config-zero-layers", "config-shape-mismatch",
            "config-bad-head-count", "calib-dev-zero", "calib-fifo", "recipe-yaml-alias-bomb", "recipe-nested-deep-yaml",
            "set-calib-samples-huge", "recover-tokens-huge", "set-bool-for-int", "set-float-infinity", "seed-too-large",
            "recipe-duplicate-key", "eval-limit-zero", "recover-seq-len-1"} <= ids


def test_missing_tensors_refused_not_random(tmp_path, stories_dir):
    folder = _copy_model(stories_dir, tmp_path / "partial")
    _edit_weights(folder, lambda sd: sd.pop("model.layers.2.mlp.up_proj.weight"))
    with pytest.raises(UsageError, match=r"lack 1 tensor\(s\).*model\.layers\.2\.mlp\.up_proj\.weight"):
        load_model(str(folder))


# ============================================================================== outputs apart from inputs
def _tree(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root``: a file's bytes, a symlink's target, ``dir`` for a folder."""
    out: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = f"-> {os.readlink(path)}" if path.is_symlink() else "dir" if path.is_dir() else path.read_bytes()
    return out


_SUITE = """name: guard
models:
  - id: m
    path: {model}
methods: [magnitude]
targets: ["60%"]
eval: {{ppl: {{}}, tasks: []}}
"""


@pytest.fixture
def own_model(tmp_path, stories_dir) -> Path:
    """A copy of the tiny model at ``tmp/parent/model`` with unrelated files of the user's beside it, a
    symlink ``tmp/link`` to it, calibration text, a bench suite of it and committed records of that suite."""
    parent = tmp_path / "parent"
    model = _copy_model(stories_dir, parent / "model")
    (parent / "notes.txt").write_text("the user's, nothing to do with compress")
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "calib.txt").write_text("Once upon a time there was a little dog. " * 40)
    (tmp_path / "link").symlink_to(model)
    (tmp_path / "weights.gguf").symlink_to(model / "model.safetensors")
    (tmp_path / "suite.yaml").write_text(_SUITE.format(model=model))
    from compress.bench import load_suite

    committed = tmp_path / "committed"
    committed.mkdir()
    with open(committed / "records.jsonl", "w") as f:
        for cell in load_suite(tmp_path / "suite.yaml").cells():
            f.write(json.dumps({"cell_id": cell.id, "status": "ok", "method": cell.method, "model": cell.model}) + "\n")
    return model


_KD = ["--recover-mode", "kd", "--recover-tokens", "64"]

#: (id, argv with {m} the model folder and {t} the test's folder, message): each with --overwrite.
OVERLAP = [
    ("run-out-is-the-model", ["run", *_M, "--model", "{m}", "--out", "{m}"], "is the model folder itself"),
    ("run-out-is-its-parent", ["run", *_M, "--model", "{m}", "--out", "{t}/parent"], "contains the model folder"),
    ("run-out-is-an-ancestor", ["run", *_M, "--model", "{m}", "--out", "{t}"], "contains the model folder"),
    ("run-out-inside-the-model", ["run", *_M, "--model", "{m}", "--out", "{m}/pruned"], "is inside the model folder"),
    ("run-out-symlink-to-the-model", ["run", *_M, "--model", "{m}", "--out", "{t}/link"],
     "link (= {m}) is the model folder itself"),
    ("run-model-through-symlink", ["run", *_M, "--model", "{t}/link", "--out", "{t}/parent"],
     "contains the model folder"),
    ("run-out-is-the-teachers-parent", ["run", *_M, *_KD, "--teacher", "{m}", "--out", "{t}/parent"],
     "contains --teacher"),
    ("run-out-is-the-calib-files-folder", ["run", *_T, *_S, "--model", "{m}", "--calib", "{t}/texts/calib.txt",
                                           "--out", "{t}/texts"], "contains --calib"),
    ("recover-out-is-the-model", ["recover", "{m}", "--tokens", "64", "--out", "{m}"], "is the model folder itself"),
    ("recover-out-is-its-parent", ["recover", "{m}", "--tokens", "64", "--out", "{t}/parent"],
     "contains the model folder"),
    ("recover-out-symlink-to-the-model", ["recover", "{m}", "--tokens", "64", "--out", "{t}/link"],
     "is the model folder itself"),
    ("recover-out-is-the-calib-files-folder", ["recover", "{m}", "--tokens", "64", "--calib",
                                               "{t}/texts/calib.txt", "--out", "{t}/texts"], "contains --calib"),
    ("export-out-inside-the-model", ["export", "{m}", "--gguf", "f16", "--out", "{m}/model.gguf"],
     "is inside the model folder"),
    ("export-out-symlink-to-the-weights", ["export", "{m}", "--gguf", "f16", "--out", "{t}/weights.gguf"],
     "is inside the model folder"),
    ("bench-out-is-the-models-parent", ["bench", "{t}/suite.yaml", "--out", "{t}/parent"],
     "contains a model of the suite"),
    ("bench-out-holds-the-verify-records", ["bench", "{t}/suite.yaml", "--verify", "{t}/committed", "--out",
                                            "{t}/committed"], "contains the --verify records"),
]


@pytest.mark.parametrize(("case", "argv", "message"), OVERLAP, ids=[c[0] for c in OVERLAP])
def test_overwrite_never_touches_an_input(tmp_path, capsys, own_model, case, argv, message):
    """Issue #24: ``--out`` equal to an input, a folder holding one (its parent, an ancestor), a folder
    inside one, or a symlink to one is refused with ``--overwrite`` too, before any work: every file
    stays byte-identical, nothing is added."""
    before = _tree(tmp_path)
    full = [a.format(m=own_model, t=tmp_path) for a in argv] + ["--overwrite"]
    rc, stdout, err = _cli(capsys, full)
    assert rc == 2, (stdout, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert message.format(m=own_model) in lines[0], lines[0]
    assert "choose a" in lines[0]  # the fix: another --out
    assert _tree(tmp_path) == before


def test_overwrite_replaces_only_a_folder_compress_wrote(tmp_path, capsys, stories_dir):
    """--overwrite replaces a folder that compress wrote (its run record is there), whole; a folder
    without one is refused, its files untouched, with or without --overwrite."""
    out = tmp_path / "out"
    run = ["run", *_M, "--model", str(stories_dir), "--no-eval", "--no-progress", "--out"]
    argv = [*run, str(out)]
    rc, _, err = _cli(capsys, argv)
    assert rc == 0, err
    (out / "stale.txt").write_text("from before")
    rc, _, err = _cli(capsys, argv)
    assert rc == 2 and "already exists; pass --overwrite" in err
    rc, _, err = _cli(capsys, [*argv, "--overwrite"])
    assert rc == 0, err
    assert (out / "compress_run.json").is_file() and not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left beside it

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    (mine / "sub").mkdir()
    (mine / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = _tree(tmp_path)
    for cmd in ([*run, str(mine), "--overwrite"],
                ["recover", str(out), "--tokens", "64", "--out", str(mine), "--overwrite"]):
        rc, _, err = _cli(capsys, cmd)
        assert rc == 2 and err.count("\n") == 1, err
        assert "was not written by compress" in err and "remove it yourself" in err, err
        assert _tree(tmp_path) == before
    empty = tmp_path / "empty"  # an empty folder holds nothing to lose
    empty.mkdir()
    rc, _, err = _cli(capsys, [*run, str(empty), "--overwrite"])
    assert rc == 0 and (empty / "compress_run.json").is_file(), err


def test_gguf_overwrite_replaces_a_gguf_only(tmp_path, capsys, stories_dir):
    """export --gguf --overwrite replaces a GGUF file, never another file that happens to have the name."""
    out = tmp_path / "m.gguf"
    out.write_bytes(b"GGUF" + b"\x00" * 60)  # a GGUF file (compress only checks the magic bytes)
    rc, _, err = _cli(capsys, ["export", str(stories_dir), "--gguf", "f16", "--out", str(out)])
    assert rc == 2 and "already exists; pass --overwrite" in err
    rc, _, err = _cli(capsys, ["export", str(stories_dir), "--gguf", "f16", "--out", str(out), "--overwrite"])
    assert rc == 0, err
    from compress.io.loading import check_gguf_file

    check_gguf_file(out)  # what was written reads back as a whole GGUF file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_recover_with_a_damaged_record_fails_before_any_work(tmp_path, capsys, bad, monkeypatch):
    """A compress_run.json that is not a JSON object is refused before a weight is loaded, not by a crash
    once the training is done (the new record is built from it)."""
    import compress.io.loading
    import compress.pipeline.recover

    def never(*a, **k):
        raise AssertionError("work started before the record was checked")

    monkeypatch.setattr(compress.io.loading, "load_model", never)
    monkeypatch.setattr(compress.pipeline.recover, "recover", never)
    for folder, message in ((bad["record_list"], "holds a JSON list"), (bad["record_binary"], "is not UTF-8 text")):
        rc, _, err = _cli(capsys, ["recover", str(folder), "--tokens", "100000000", "--out", str(tmp_path / "out")])
        assert rc == 2 and err.count("\n") == 1, err
        assert f"{folder / 'compress_run.json'} {message}" in err and "delete it" in err, err
    assert list(tmp_path.iterdir()) == []


def test_truncated_gguf_is_one_usage_line_everywhere(bad, capsys):
    """A GGUF file cut short in its header used to surface as ``error: error: unpack_from requires...``
    (struct.error, exit 1) from transformers' reader; every command now says what the file is."""
    for cmd in (["inspect"], ["eval"], ["run", *_M, "--dry-run", "--model"]):
        for name in ("gguf_header_cut", "gguf_data_cut", "gguf_garbage"):
            rc, _, err = _cli(capsys, [*cmd, str(bad[name])])
            assert rc == 2 and err.count("\n") == 1, (cmd, name, err)
            assert "is not a readable GGUF file" in err and "re-download" in err, err
            assert "error: error:" not in err and "unpack_from" not in err


def test_cli_never_doubles_the_error_prefix(capsys, monkeypatch):
    """An unexpected ``struct.error`` reads ``error: struct.error: ...``, never ``error: error: ...``."""
    import struct

    import compress.cli

    monkeypatch.setattr(compress.cli, "cmd_inspect", lambda args: struct.unpack_from("<Q", b""))
    rc, _, err = _cli(capsys, ["inspect", "x"])
    assert rc == 1 and err.startswith("error: struct.error: unpack_from") and "error: error:" not in err, err


def test_malformed_checkpoint_on_resume_is_not_blamed_on_the_plugin(tmp_path, capsys, stories_dir, monkeypatch,
                                                                      count_scoring):
    """A checkpoint whose method state was damaged (here: a key of TransAct's state removed; then a state
    that is not an object) is refused as the checkpoint's fault with the --overwrite hint, not reported
    as a bug of the plugin; --overwrite then starts over."""
    from compress_transact.transact import TransActPruner
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    out = tmp_path / "out"
    real = TransActPruner.collect

    def interrupt_second(self, *a, **k):
        if count_scoring:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(TransActPruner, "collect", interrupt_second)
    count_scoring.clear()
    rc, _, err = _cli(capsys, _transact_argv(stories_dir, out))
    assert rc == 130, err
    monkeypatch.setattr(TransActPruner, "collect", real)
    path = state_dir_for(out) / CHECKPOINT_FILE
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(path)

    def rewrite(state) -> None:
        save_file(tensors, path, metadata={**meta, "compress_state": json.dumps(state)})

    good = json.loads(meta["compress_state"])
    for state, message in (({k: v for k, v in good.items() if k != "history"}, "resuming from the checkpoint"),
                           ([1, 2], "is unreadable or malformed")):
        rewrite(state)
        rc, _, err = _cli(capsys, _transact_argv(stories_dir, out, "--resume"))
        assert rc == 2 and err.count("\n") == 1, err
        assert message in err and str(path) in err and "pass --overwrite to start over" in err, err
        assert "plugin" not in err, err
        assert not out.exists()
    rc, _, err = _cli(capsys, _transact_argv(stories_dir, out, "--overwrite"))
    assert rc == 0, err
    assert out.is_dir() and not state_dir_for(out).exists()


def test_bench_never_replaces_a_records_file_it_did_not_write(tmp_path, capsys, own_model):
    out = tmp_path / "results"
    out.mkdir()
    (out / "records.jsonl").write_text("my own notes, in a file named records.jsonl\n")
    before = _tree(tmp_path)
    for extra in ([], ["--overwrite"], ["--resume"]):
        rc, _, err = _cli(capsys, ["bench", str(tmp_path / "suite.yaml"), "--out", str(out), *extra])
        assert rc == 2 and "holds no benchmark records" in err and "remove it yourself" in err, err
        assert _tree(tmp_path) == before


def test_report_reads_damaged_records_strictly_and_bench_resumes_past_a_torn_line(tmp_path, capsys):
    """``compress report`` names the file and line of a damaged record; a last line cut short mid-write
    (no newline) is skipped, as the bench runner itself does when it resumes."""
    from compress.bench import read_records

    src = ROOT / "tests" / "fixtures" / "bench" / "records.jsonl"
    torn = tmp_path / "torn.jsonl"
    torn.write_bytes(src.read_bytes() + b'{"cell_id": "x", "sta')
    assert read_records(torn, strict=True) == read_records(src, strict=True) == read_records(torn)
    rc, _, err = _cli(capsys, ["report", str(torn), "--out", str(tmp_path / "rep")])
    assert rc == 0, err
    middle = tmp_path / "middle.jsonl"
    lines = src.read_text().splitlines(keepends=True)
    middle.write_text("".join([*lines[:2], '{"cell_id": "x", "sta\n', *lines[2:]]))
    rc, _, err = _cli(capsys, ["report", str(middle), "--out", str(tmp_path / "rep2")])
    assert rc == 2 and f"{middle}:3: not a JSON line" in err and err.count("\n") == 1, err
    assert not (tmp_path / "rep2").exists()
    assert len(read_records(middle)) == len(lines)  # the bench runner: skips it and goes on
    from compress.bench.record import append_record

    new = {**read_records(src)[0], "cell_id": "after-the-crash"}
    append_record(torn, new)  # a resumed bench closes the torn line instead of joining its record to it
    assert read_records(torn)[-1] == new and len(read_records(torn)) == len(lines) + 1
    rc, _, err = _cli(capsys, ["report", str(torn), "--out", str(tmp_path / "rep3")])
    assert rc == 2 and f"{torn}:{len(lines) + 1}: not a JSON line" in err, err


# ============================================================================== safe loading
def _calls(tree: ast.AST, name: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            dotted = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if dotted == name:
                yield node


def _sources() -> list[Path]:
    return [p for d in ("compress", "plugins", "baselines", "examples") for p in (ROOT / d).rglob("*.py")
            if ".egg-info" not in str(p)]


def test_no_pickle_loading_and_no_remote_code_in_sources():
    for path in _sources():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib") for n in names), path
        for call in _calls(tree, "load"):
            func = call.func
            if isinstance(func, ast.Attribute) and getattr(func.value, "id", "") == "torch":
                kw = {k.arg: k.value for k in call.keywords}
                assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, \
                    f"{path}:{call.lineno}: torch.load without weights_only=True"
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                assert not (isinstance(node.value, ast.Constant) and node.value.value is True), \
                    f"{path}:{node.value.lineno}: trust_remote_code=True hard-coded"


def test_loading_never_unpickles(monkeypatch, stories_dir):
    def no_pickle(*a, **k):
        raise AssertionError("torch.load called while loading a model")

    monkeypatch.setattr(torch, "load", no_pickle)
    lm = load_model(str(stories_dir))
    assert type(lm.model).__name__ == "LlamaForCausalLM"


def test_remote_code_is_never_run_without_the_flag(bad, tmp_path):
    folder = bad["custom"]
    with pytest.raises(UsageError, match="never runs unless you pass --trust-remote-code"):
        load_model(str(folder))
    assert not (folder / "CODE_WAS_RUN").exists()
    # a known model_type with a leftover auto_map loads with the stock class; its code is not run either
    llama = shutil.copytree(folder, tmp_path / "llama-with-auto-map")
    cfg = json.loads((llama / "config.json").read_text())
    cfg["model_type"] = "llama"
    (llama / "config.json").write_text(json.dumps(cfg))
    lm = load_model(str(llama))
    assert type(lm.model).__module__.startswith("transformers.models.llama")
    assert not (llama / "CODE_WAS_RUN").exists()


def test_compress_folder_loads_with_our_class_even_with_trust_remote_code(bad, monkeypatch):
    folder = bad["compress"]
    assert compress_format(folder)
    prompts = []
    monkeypatch.setattr("builtins.input", lambda *a: prompts.append(a) or "n")  # transformers' "run custom code?"

    def remote_modules() -> set[str]:  # other tests load folders the way users do, with trust_remote_code
        return {m for m in sys.modules if m.startswith("transformers_modules") and "modeling_compress" in m}

    before = remote_modules()
    for trust in (False, True):
        lm = load_model(str(folder), trust_remote_code=trust)
        assert type(lm.model).__module__ == "compress.modeling.modeling_compress"  # not transformers_modules.*
    assert prompts == []
    assert remote_modules() == before  # the folder's own copy of the code was never imported
    with pytest.raises(UsageError, match="does not match the sha256 recorded at export"):
        load_model(str(bad["tampered"]), trust_remote_code=True)
    with pytest.raises(UsageError, match="does not match the sha256 recorded at export"):
        compress_format(bad["tampered"])


# ============================================================================== interruptions
def _transact_argv(stories_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--method", "transact", "--target", "50%", "--model", str(stories_dir), "--calib", "tinystories",
            "--set", "shots=3", "--set", "calib_samples=4", "--set", "calib_seq_len=64", "--out", str(out),
            "--no-progress", *extra]


@pytest.fixture
def count_scoring(monkeypatch):
    """Counts TransAct scoring passes (one per shot that runs)."""
    from compress_transact.transact import TransActPruner

    calls = []
    real = TransActPruner.collect

    def counted(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(TransActPruner, "collect", counted)
    return calls


def test_transact_killed_after_shot_1_resumes_byte_identical(tmp_path, capsys, stories_dir, count_scoring):
    killed, ref = tmp_path / "killed", tmp_path / "ref"
    env = {**os.environ, KILL_ENV: "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([str(COMPRESS_BIN), *_transact_argv(stories_dir, killed)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert not killed.exists()
    state = state_dir_for(killed)
    ckpt = read_checkpoint(state)
    assert ckpt is not None and ckpt.state["shot"] == 1 and ckpt.state["shots"] == 3
    assert sorted(p.name for p in state.iterdir()) == [CHECKPOINT_FILE]

    rc, _, err = _cli(capsys, _transact_argv(stories_dir, killed))  # no --resume: refused, state kept
    assert rc == 2 and "pass --resume" in err and read_checkpoint(state).state["shot"] == 1

    rc, out, err = _cli(capsys, _transact_argv(stories_dir, killed, "--resume"))
    assert rc == 0, err
    assert "resuming after shot 1/3" in out.replace("\n", " ")  # a phase line (stdout)
    assert len(count_scoring) == 2  # shots 2 and 3 only
    assert not state.exists()  # saved: the checkpoint is gone

    count_scoring.clear()
    rc, _, err = _cli(capsys, _transact_argv(stories_dir, ref))
    assert rc == 0, err
    assert len(count_scoring) == 3 and not state_dir_for(ref).exists()
    assert weights_sha256(killed) == weights_sha256(ref)
    assert (killed / PLAN_FILE).read_bytes() == (ref / PLAN_FILE).read_bytes()
    run_k, run_r = (json.loads((d / "compress_run.json").read_text()) for d in (killed, ref))
    assert run_k["notes"]["shots"] == run_r["notes"]["shots"] and len(run_k["notes"]["shots"]) == 3


def test_ctrl_c_after_shot_then_overwrite_or_resume(tmp_path, capsys, stories_dir, monkeypatch, count_scoring):
    """An in-process interruption (KeyboardInterrupt in shot 2) leaves the shot-1 checkpoint; --overwrite
    discards it and starts over, other settings with --resume are refused."""
    from compress_transact.transact import TransActPruner

    out = tmp_path / "out"
    real = TransActPruner.collect

    def interrupt_second(self, *a, **k):
        if count_scoring:  # shot 1 has been scored: stop in shot 2
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(TransActPruner, "collect", interrupt_second)
    count_scoring.clear()
    rc, _, err = _cli(capsys, _transact_argv(stories_dir, out))
    assert rc == 130 and "interrupted" in err
    assert read_checkpoint(state_dir_for(out)).state["shot"] == 1 and not out.exists()
    monkeypatch.setattr(TransActPruner, "collect", real)

    rc, _, err = _cli(capsys, [*_transact_argv(stories_dir, out, "--resume"), "--seed", "1"])
    assert rc == 2 and "had other settings" in err
    rc, _, err = _cli(capsys, _transact_argv(stories_dir, out, "--overwrite"))
    assert rc == 0, err
    assert out.is_dir() and not state_dir_for(out).exists()


_CHECKPOINT_LOOP = textwrap.dedent('''
    import sys, itertools, torch
    from compress.io.checkpoint import save_checkpoint
    from compress.testing import tiny_model
    model = tiny_model("llama-gqa")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    print("ready", flush=True)
    for i in itertools.count(1):
        with torch.no_grad():
            for k, p in model.state_dict().items():
                p.copy_(base[k] * i)
        save_checkpoint(sys.argv[1], "loop", model, {"shot": i})
''')


def test_kill_9_while_checkpointing_leaves_a_whole_checkpoint(tmp_path):
    state = tmp_path / "state"
    kill_9_at_random([sys.executable, "-c", _CHECKPOINT_LOOP, str(state)], 0.3, 1.5)
    ckpt = read_checkpoint(state)
    assert ckpt is not None and ckpt.key == "loop", "no checkpoint finished"
    model = tiny_model("llama-gqa")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt.load_into(model)
    i = ckpt.state["shot"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, base[k] * i), (k, i)  # the weights belong to the state they were saved with
    assert all(p.name == CHECKPOINT_FILE or p.name.startswith(".checkpoint-") for p in state.iterdir())


# ============================================================================== broken plugins
_BOOM = '''
from compress import Capabilities, Pruner, hookimpl


class Boom(Pruner):
    name = "{method}"
    capabilities = Capabilities(structures=("mlp_channels",), needs_calibration=False, targets=("params",))

    def check(self, model, target):
        super().check(model, target)
        if target.fraction == 0.7:
            raise KeyError("check exploded")

    def plan_shapes(self, model, target):
        raise ZeroDivisionError("plan exploded")

    def prune(self, model, target, ctx):
        raise RuntimeError("prune exploded")


@hookimpl
def register_pruners(register):
    register(Boom)
'''


@pytest.fixture
def boom(tmp_path, monkeypatch) -> tuple[str, str]:
    """A real installed distribution ``boom-<tag>`` 0.3.0 whose method raises inside check/plan_shapes/prune."""
    from test_plugins import make_dist

    import compress.plugins

    for var in ("COMPRESS_PLUGINS", "COMPRESS_DISABLE_PLUGINS", "COMPRESS_STRICT_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    tag = uuid.uuid4().hex[:8]
    site = tmp_path / "site"
    site.mkdir()
    method, dist = f"boom_{tag}", f"boom-{tag}"
    make_dist(site, dist, "0.3.0", {method: f"boom_plugin_{tag}"}, {f"boom_plugin_{tag}": _BOOM.format(method=method)})
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(compress.plugins, "_REGISTRY", None)  # rebuilt with the new distribution, restored after
    return method, dist


def test_plugin_raising_in_prune_is_reported_and_others_work(tmp_path, capsys, stories_dir, boom):
    method, dist = boom
    out = tmp_path / "out"
    rc, _, err = _cli(capsys, ["run", "--method", method, "--target", "60%", "--model", str(stories_dir),
                               "--out", str(out)])
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: method '{method}' from plugin '{method}' ({dist} 0.3.0) failed in prune(): "
                               "RuntimeError: prune exploded; this is a bug in that plugin")
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "site"]
    # the same process: other methods and commands keep working
    rc, _, err = _cli(capsys, ["run", "--method", "magnitude", "--target", "60%", "--model", str(stories_dir),
                               "--out", str(out)])
    assert rc == 0, err
    rc, listing, _ = _cli(capsys, ["methods", "--json"])
    assert rc == 0 and {method, "magnitude", "transact"} <= {r["name"] for r in json.loads(listing)}


def test_plugin_raising_in_check_and_plan_shapes_is_reported(capsys, stories_dir, boom, tmp_path):
    method, dist = boom
    rc, _, err = _cli(capsys, ["run", "--method", method, "--target", "70%", "--model", str(stories_dir),
                               "--out", str(tmp_path / "o")])
    assert rc == 1 and f"({dist} 0.3.0) failed in check(): KeyError" in err and len(err.strip().splitlines()) == 1
    rc, _, err = _cli(capsys, ["run", "--method", method, "--target", "60%", "--model", str(stories_dir), "--dry-run"])
    assert rc == 1 and "failed in plan_shapes(): ZeroDivisionError: plan exploded" in err
    assert not (tmp_path / "o").exists()


def test_strict_plugins_reraises_the_original_error(capsys, stories_dir, boom, monkeypatch):
    from compress.pipeline.run import RunSpec, run

    method, _ = boom
    monkeypatch.setenv("COMPRESS_STRICT_PLUGINS", "1")
    with pytest.raises(RuntimeError, match="prune exploded") as ei:
        run(RunSpec(method=method, target="60%", model=str(stories_dir), progress=False), log=lambda m: None)
    assert not isinstance(ei.value, PluginError)
    monkeypatch.delenv("COMPRESS_STRICT_PLUGINS")
    with pytest.raises(PluginError, match="failed in prune") as ei:
        run(RunSpec(method=method, target="60%", model=str(stories_dir), progress=False), log=lambda m: None)
    assert isinstance(ei.value.__cause__, RuntimeError)  # -v shows the plugin's own traceback


# ============================================================================== plan properties
_MODELS = {kind: tiny_model(kind) for kind in ("llama-mha", "llama-gqa", "qwen2")}
_SEQ = 256


@st.composite
def _plans(draw, kind: str) -> Plan:
    """Any valid plan: per layer, a non-empty subset of KV groups, the same number (>= 1) of query heads in
    every kept group, and a non-empty subset of MLP channels; each part may also be left unchanged."""
    from compress.model.adapter import ArchAdapter

    arch = ArchAdapter(_MODELS[kind])
    plan = Plan()
    for i in range(arch.num_layers):
        g = arch.geometry(i)
        lp = LayerPlan()
        if draw(st.booleans()):
            kv = draw(st.lists(st.integers(0, g.num_kv_heads - 1), min_size=1, unique=True))
            per = draw(st.integers(1, g.group_size))
            lp.kv_heads = sorted(kv)
            lp.heads = sorted(k * g.group_size + j for k in kv
                              for j in draw(st.permutations(range(g.group_size)))[:per])
        if draw(st.booleans()):
            lp.mlp = sorted(draw(st.lists(st.integers(0, g.intermediate - 1), min_size=1, unique=True)))
        if lp.to_dict():
            plan.layers[i] = lp
    return plan


def _predicted(model, plan: Plan) -> dict[str, float]:
    """Dense footprint minus the exact per-structure costs from compress.model.sizing.unit_costs."""
    from compress.model.adapter import ArchAdapter

    arch = ArchAdapter(model)
    dense = footprint(model, seq_len=_SEQ, arch=arch)
    pred = {"params": float(dense.params), "flops": dense.flops_per_token, "kv": float(dense.kv_bytes_per_token)}
    dtype_bytes = next(model.parameters()).element_size()
    for i, lp in plan.layers.items():
        g = arch.geometry(i)
        group = unit_costs(arch, i, "kv_group", _SEQ, dtype_bytes)  # one KV head + its group_size query heads
        head = unit_costs(arch, i, "head", _SEQ, dtype_bytes)  # one query head in each of the num_kv_heads groups
        gone_q = g.num_heads - len(lp.heads) if lp.heads is not None else 0
        gone_kv = g.num_kv_heads - len(lp.kv_heads) if lp.kv_heads is not None else 0
        gone_mlp = g.intermediate - len(lp.mlp) if lp.mlp is not None else 0
        for m in pred:
            q = head[m][0] / g.num_kv_heads
            kv = group[m][0] - g.group_size * q
            pred[m] -= q * gone_q + kv * gone_kv + group[m][1] * gone_mlp
    return pred


@pytest.mark.parametrize("kind", sorted(_MODELS))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_valid_plan_forwards_and_measures_as_predicted(kind, data):
    plan = data.draw(_plans(kind))
    model = copy.deepcopy(_MODELS[kind])
    predicted = _predicted(model, plan)
    apply_plan(model, plan)
    got = footprint(model, seq_len=_SEQ)
    assert (got.params, got.flops_per_token, got.kv_bytes_per_token) == (
        predicted["params"], predicted["flops"], predicted["kv"]), plan.to_dict()
    ids = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 12, 512) and torch.isfinite(logits).all()
    for i, lp in plan.layers.items():
        layer = got.layers[i]
        if lp.heads is not None:
            assert (layer["num_heads"], layer["num_kv_heads"]) == (len(lp.heads), len(lp.kv_heads))
        if lp.mlp is not None:
            assert layer["intermediate"] == len(lp.mlp)


def test_plan_property_catches_a_wrong_prediction():
    """The property compares exact numbers: dropping one more MLP channel than planned is caught."""
    model = copy.deepcopy(_MODELS["qwen2"])
    plan = Plan(layers={0: LayerPlan(mlp=list(range(10)))})
    predicted = _predicted(model, plan)
    apply_plan(model, Plan(layers={0: LayerPlan(mlp=list(range(9)))}))
    assert footprint(model, seq_len=_SEQ).params != predicted["params"]

