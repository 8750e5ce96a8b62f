"""Issue #24 classes 4, 5 and 7: configs that lie, unbounded inputs, values that slipped through.

The one-line refusals themselves are rows of ``BAD_INPUT`` (tests/test_reliability.py). Here:

* a config with 10^9 layers is refused in well under a second (it used to hang while memory grew);
* the strict readers (:mod:`compress.io.safe_io`): YAML aliases/anchors, duplicate keys, deep nesting,
  special files, size caps — and that ordinary recipes still read;
* every method's settings and the recovery settings refuse booleans for numbers, non-finite floats
  and out-of-range integers (one shared mechanism, :class:`compress.io.settings.BoundedSettings`);
* every JSON compress writes is standard JSON (NaN/inf become null), a stock export drops the input's
  ``auto_map``, outputs get the modes the umask says;
* properties (hypothesis): random configs and random recipes through the CLI end in exit 0 or 2, with no
  traceback, quickly, touching nothing outside ``--out``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import stat
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compress.cli import main
from compress.errors import CalibrationError, UsageError
from compress.io.limits import MAX_SETTING_INT, check_limit
from compress.io.safe_io import dumps_json, parse_json, parse_yaml, read_text, respect_umask

pytestmark = pytest.mark.usefixtures("one_thread")

# transformers binds its log handler to the sys.stderr of the moment it is first configured: do it now,
# outside any test's capture (a test's captured stream is closed after it, and a later warning would print
# "--- Logging error --- Traceback ..." into the next test's stderr)
transformers_logging = pytest.importorskip("transformers.utils.logging")
transformers_logging.get_logger("transformers")

_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _cli(cap, argv: list[str]) -> tuple[int, str, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    out = cap.readouterr()
    return rc, out.out, out.err


def _model_copy(src: Path, dst: Path, config: dict | None = None) -> Path:
    dst.mkdir(parents=True)
    for f in _MODEL_FILES:
        shutil.copyfile(src / f, dst / f)
    if config is not None:
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def _snapshot(root: Path, skip: Path | None = None) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
                  if skip is None or (p != skip and skip not in p.parents))


# ============================================================================== class 4: configs that lie
def test_huge_layer_count_is_refused_at_once(tmp_path, capsys, stories_dir):
    cfg = json.loads((stories_dir / "config.json").read_text())
    folder = _model_copy(stories_dir, tmp_path / "huge", {**cfg, "num_hidden_layers": 10**9})
    config_only = tmp_path / "huge.json"
    config_only.write_text(json.dumps({**cfg, "num_hidden_layers": 10**9}))
    for argv in (["inspect", str(folder)], ["inspect", str(config_only)],
                 ["run", "--method", "magnitude", "--target", "60%", "--model", str(folder), "--dry-run"],
                 ["run", "--method", "magnitude", "--target", "60%", "--model", str(folder), "--out",
                  str(tmp_path / "out")]):
        t0 = time.perf_counter()
        rc, _, err = _cli(capsys, argv)
        assert rc == 2 and "above the limit of 1,024" in err, err
        assert time.perf_counter() - t0 < 5, argv  # was: no end, memory growing
    assert not (tmp_path / "out").exists()


def test_gguf_metadata_is_bounded_too(tmp_path, capsys):
    import gguf
    import numpy as np

    path = tmp_path / "huge.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(10**9)
    for add, v in ((w.add_embedding_length, 32), (w.add_head_count, 4), (w.add_head_count_kv, 4),
                   (w.add_feed_forward_length, 64), (w.add_context_length, 128)):
        add(v)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    t0 = time.perf_counter()
    rc, _, err = _cli(capsys, ["inspect", str(path)])
    assert rc == 2 and "the GGUF metadata of" in err and "num_hidden_layers (decoder layers) is 1,000,000,000" in err
    assert time.perf_counter() - t0 < 5


def test_config_checks_pass_every_real_model(stories_dir, smollm2_dir, tmp_path):
    """The checks refuse lies, not real models: the tiny Llama, the GGUF SmolLM2, and compress exports
    (stock and per-layer compress format)."""
    from compress.io.export import export_model
    from compress.io.loading import load_config, load_model
    from compress.model.plan import LayerPlan, Plan
    from compress.model.surgery import apply_plan
    from compress.testing import tiny_model, tiny_tokenizer

    assert load_config(str(stories_dir)).num_hidden_layers == 5
    if smollm2_dir.is_dir():
        assert load_config(str(smollm2_dir)).num_hidden_layers == 30
    for kind, plan in (("stock", Plan()), ("compress", Plan(layers={0: LayerPlan(mlp=list(range(40)))}))):
        model = tiny_model("qwen2")
        apply_plan(model, plan)
        info = export_model(model, tiny_tokenizer(), tmp_path / kind)
        assert info["kind"] == kind
        load_model(str(tmp_path / kind))


def test_weights_the_config_has_no_place_for_are_refused(tmp_path, stories_dir):
    """Tensors a config does not use would be dropped silently (e.g. biases of another family)."""
    import torch
    from safetensors.torch import load_file, save_file

    from compress.io.loading import load_config, load_model

    folder = _model_copy(stories_dir, tmp_path / "biased")
    sd = load_file(folder / "model.safetensors")
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(4)  # recomputed, never a weight: fine
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    for load in (load_config, load_model):
        with pytest.raises(UsageError, match=r"hold 1 tensor\(s\) the config has no place for \(e\.g\. "
                                             r"model\.layers\.0\.self_attn\.q_proj\.bias\)"):
            load(str(folder))


def test_compress_format_layer_spec_checked_against_weights(tmp_path):
    from compress.io.export import export_model
    from compress.io.loading import load_config
    from compress.model.plan import LayerPlan, Plan
    from compress.model.surgery import apply_plan
    from compress.testing import tiny_model, tiny_tokenizer

    model = tiny_model("qwen2")
    apply_plan(model, Plan(layers={0: LayerPlan(mlp=list(range(40)))}))
    out = tmp_path / "cf"
    export_model(model, tiny_tokenizer(), out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["layers"][0]["intermediate_size"] = 41
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match=r"gate_proj\.weight is 40×64 in the weights but 41×64 by the config "
                                         r"\(layers\[0\]\.intermediate_size=41\)"):
        load_config(str(out))
    cfg["layers"][0]["intermediate_size"] = 10**9
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match=r"layers\[0\]: intermediate_size \(MLP width\) is 1,000,000,000"):
        load_config(str(out))


# ============================================================================== class 5: unbounded inputs
def test_strict_yaml_and_json_readers():
    ok = "method: slicegpt  # a comment\nround_to: 8\nnested: {a: [1, 2, {b: 3}]}\nratio: 0.5\n"
    assert parse_yaml(ok, "r") == {"method": "slicegpt", "round_to": 8, "nested": {"a": [1, 2, {"b": 3}]},
                                   "ratio": 0.5}
    for text, msg in (("a: &x 1\nb: *x\n", "anchor &x"), ("b: *x\n", "alias"),
                      ("a: 1\na: 2\n", "has the key 'a' twice"), ("<<: {a: 1}\nb: 2\n", None),
                      ("x: " + "[" * 50 + "]" * 50, "nested more than 32 levels"),
                      ("x: " + "[" * 200_000, "nested more than 32 levels"),
                      ("x: !!python/object:os.system {}\n", "not valid YAML")):
        if msg is None:
            parse_yaml(text, "r")  # a merge key without an alias is only a key
            continue
        with pytest.raises(UsageError, match=msg):
            parse_yaml(text, "recipe r")
    assert parse_json('{"a": [1, {"b": null}]}', "j") == {"a": [1, {"b": None}]}
    for text, msg in (('{"a": 1, "a": 2}', "twice"), ('{"a": NaN}', "holds NaN"), ('{"a": -Infinity}', "Infinity"),
                      ("[" * 100_000 + "]" * 100_000, "nested more than 32"), ("[" * 40 + "]" * 40, "nested more"),
                      ("{", "not valid JSON")):
        with pytest.raises(UsageError, match=msg):
            parse_json(text, "j")


def test_bounded_reads_refuse_special_files_and_large_ones(tmp_path):
    big = tmp_path / "big.txt"
    big.write_bytes(b"x" * 2000)
    assert read_text(big, 2000, "f") == "x" * 2000
    with pytest.raises(UsageError, match=r"big\.txt is 2\.0 KiB, above the 1000 bytes limit"):
        read_text(big, 1000, "f")
    with pytest.raises(UsageError, match="is a folder"):
        read_text(tmp_path, 1000, "f")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    t0 = time.perf_counter()
    with pytest.raises(CalibrationError, match="is a FIFO"):
        read_text(fifo, 1000, "calibration file", CalibrationError)
    assert time.perf_counter() - t0 < 1
    with pytest.raises(UsageError, match="is a character device"):
        read_text("/dev/zero", 1 << 30, "f")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(UsageError, match="is not UTF-8 text"):
        read_text(tmp_path / "latin1.txt", 1000, "f")


def test_calibration_text_is_capped(tmp_path, monkeypatch):
    from compress.calib.sources import CalibrationSource

    monkeypatch.setenv("COMPRESS_MAX_CALIB_BYTES", "1000")
    (tmp_path / "one.txt").write_text("word " * 400)  # 2000 bytes
    with pytest.raises(CalibrationError, match=r"one\.txt is above the 1000 bytes limit; .*COMPRESS_MAX_CALIB_BYTES"):
        CalibrationSource.from_spec(str(tmp_path / "one.txt"), None)
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in ("a.txt", "b.txt"):  # 600 bytes each: each under the cap, together above it
        (folder / name).write_text("word " * 120)
    with pytest.raises(CalibrationError, match="all files of the folder together"):
        CalibrationSource.from_spec(str(folder), None)
    (folder / "b.txt").unlink()
    os.mkfifo(folder / "c.txt")  # not a regular file: not part of the folder's text
    assert CalibrationSource.from_spec(str(folder), None).text == "word " * 120
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    monkeypatch.delenv("COMPRESS_MAX_CALIB_BYTES")
    with pytest.raises(CalibrationError, match="nested too deeply"):
        CalibrationSource.from_spec(str(tmp_path / "deep.json"), None)


# ============================================================================== class 7: settings
def _numeric_fields(config_cls) -> list[tuple[str, type]]:
    out = []
    for name, f in config_cls.model_fields.items():
        ann = str(f.annotation)
        if "bool" in ann:
            continue
        if "int" in ann:
            out.append((name, int))
        elif "float" in ann:
            out.append((name, float))
    return out


def test_every_method_setting_is_bounded():
    """One mechanism for every method (and recovery): booleans are not numbers, floats are finite,
    integers bounded."""
    from pydantic import ValidationError

    from compress.plugins import get_registry
    from compress.train.recovery import RecoveryConfig

    reg = get_registry()
    checked = 0
    for name in sorted(reg.pruners):
        for field, kind in _numeric_fields(reg.pruners[name].Config):
            bad = [True, MAX_SETTING_INT + 1, -MAX_SETTING_INT - 1] if kind is int else \
                  [False, math.inf, -math.inf, math.nan]
            for value in bad:
                with pytest.raises(UsageError, match=field):
                    reg.make(name, {field: value})
                checked += 1
    assert checked > 50
    for kw in ({"tokens": True}, {"tokens": 2**40}, {"seq_len": 1}, {"lr": math.inf}, {"lora_r": False},
               {"seed": 2**32}, {"seed": -1}, {"warmup_ratio": math.nan}):
        with pytest.raises(ValidationError):
            RecoveryConfig(**{"tokens": 64, **kw})
    assert RecoveryConfig(tokens=64, seq_len=2, seed=2**32 - 1).seq_len == 2


def test_limit_bounds():
    assert check_limit(None) is None
    assert check_limit(4.0) == 4 and isinstance(check_limit(4.0), int)
    assert check_limit(0.25) == 0.25
    for bad in (0, -1, 1.5, math.nan, math.inf, True):
        with pytest.raises(ValueError):
            check_limit(bad)


# ============================================================================== class 7: outputs
def _strict_loads(text: str):
    def refuse(name: str):
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_json_written_is_standard_with_non_finite_as_null(tmp_path, capsys, stories_dir, monkeypatch):
    assert dumps_json({"a": math.nan, "b": [math.inf, 1.5, (-math.inf,)], 3: "x"}) == \
        '{"a": null, "b": [null, 1.5, [null]], "3": "x"}'
    from compress.io.export import PLAN_FILE, RECORD_FILE, export_model
    from compress.testing import tiny_model, tiny_tokenizer

    out = tmp_path / "out"
    export_model(tiny_model("llama-gqa"), tiny_tokenizer(), out, plan={"score": math.nan},
                 record={"quality": {"ratio": math.inf, "ppl": [1.0, math.nan]}})
    assert _strict_loads((out / PLAN_FILE).read_text())["score"] is None
    assert _strict_loads((out / RECORD_FILE).read_text())["quality"] == {"ratio": None, "ppl": [1.0, None]}
    # --json outputs go through the same helper: a record with NaN prints as standard JSON
    import compress.pipeline.run as run_mod

    monkeypatch.setattr(run_mod, "dry_run", lambda spec, log=None: {"quality": {"ppl": math.nan}, "x": math.inf})
    rc, stdout, err = _cli(capsys, ["run", "--method", "magnitude", "--target", "60%", "--model", str(stories_dir),
                                    "--dry-run", "--json"])
    assert rc == 0, err
    assert _strict_loads(stdout) == {"quality": {"ppl": None}, "x": None}


def test_stock_export_drops_the_input_auto_map(tmp_path, stories_dir):
    from compress.io.export import export_model
    from compress.io.loading import load_model

    cfg = json.loads((stories_dir / "config.json").read_text())
    auto_map = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XModel"}
    src = _model_copy(stories_dir, tmp_path / "with-auto-map", {**cfg, "auto_map": auto_map})
    lm = load_model(str(src))
    assert lm.model.config.auto_map == auto_map  # the input really carries it
    info = export_model(lm.model, lm.tokenizer, tmp_path / "out")
    assert info["kind"] == "stock"
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "auto_map" not in written and not list((tmp_path / "out").glob("*.py"))
    assert lm.model.config.auto_map == auto_map  # the caller's model is left as it was
    load_model(str(tmp_path / "out"))


@contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_outputs_follow_the_umask(tmp_path, mask):
    from compress.io.export import export_model
    from compress.testing import tiny_model, tiny_tokenizer

    out = tmp_path / "out"
    with _umask(mask):
        export_model(tiny_model("llama-gqa"), tiny_tokenizer(), out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask  # mkdtemp made it 0700
    for p in out.rglob("*"):
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(p.stat().st_mode) == want, p


def test_respect_umask_on_mkstemp_file(tmp_path):
    import tempfile

    fd, name = tempfile.mkstemp(dir=tmp_path)
    os.close(fd)
    assert stat.S_IMODE(os.stat(name).st_mode) == 0o600
    with _umask(0o022):
        respect_umask(name)
    assert stat.S_IMODE(os.stat(name).st_mode) == 0o644


# ============================================================================== properties
_STORIES_CFG_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "vocab_size", "head_dim", "max_position_embeddings", "model_type",
                     "tie_word_embeddings", "rms_norm_eps", "hidden_act", "rope_parameters", "rope_theta",
                     "architectures", "dtype", "torch_dtype", "bos_token_id", "eos_token_id", "attention_bias",
                     "mlp_bias", "layers", "base_config")

_ints = st.one_of(st.sampled_from([0, -1, 1, 2, 3, 4, 5, 7, 8, 16, 64, 172, 512, 1024, 1025, 10**9, 2**63, -2**63]),
                  st.integers(-(10**12), 10**12))
_wrong = st.one_of(st.text(max_size=8), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
                   st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
_mutation = st.tuples(st.sampled_from(_STORIES_CFG_KEYS),
                      st.one_of(st.tuples(st.just("int"), _ints), st.tuples(st.just("wrong"), _wrong),
                                st.tuples(st.just("delete"), st.none())))


@contextmanager
def _alarm(seconds: int):
    """Turn a hang into an exception (the CLI reports it as exit 1, which the property refuses)."""
    def on_alarm(*_):
        raise TimeoutError(f"no answer in {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _answer_touching_only_out(capfd, work: Path, out: Path, argv: list[str]) -> int:
    """Run ``argv`` under a 60 s alarm, require a clean answer (:func:`_check_answer`) and that nothing
    in ``work`` but ``out`` changed; the exit code."""
    before = _snapshot(work, skip=out)
    t0 = time.perf_counter()
    with _alarm(60):
        rc, _, err = _cli(capfd, argv)
    _check_answer(rc, err, time.perf_counter() - t0, argv)
    assert _snapshot(work, skip=out) == before
    return rc


def _check_answer(rc: int, err: str, seconds: float, argv: list[str]) -> None:
    assert rc in (0, 2), (argv, rc, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    if rc == 2:
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        assert lines and lines[-1].startswith("error: ") and len(lines[-1]) < 1000, err[-2000:]
        assert len(lines) == 1, err[-2000:]  # one line: no load report before the error
    assert seconds < 30, (argv, seconds)


@pytest.fixture(scope="module")
def stories_cfg(stories_dir) -> dict:
    return json.loads((stories_dir / "config.json").read_text())


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(mutations=st.lists(_mutation, min_size=1, max_size=3), command=st.sampled_from(["inspect", "dry-run", "run"]),
       data=st.data())
def test_random_configs_answer_0_or_2(tmp_path_factory, capfd, stories_dir, stories_cfg, mutations, command, data):
    work = tmp_path_factory.mktemp("cfg")
    cfg = dict(stories_cfg)
    for key, (op, value) in mutations:
        if op == "delete":
            cfg.pop(key, None)
        else:
            cfg[key] = value
    model = _model_copy(stories_dir, work / "model")
    (model / "config.json").write_text(json.dumps(cfg))  # NaN/Infinity as Python writes them
    out = work / "out"
    argv = {"inspect": ["inspect", str(model)],
            "dry-run": ["run", "--method", data.draw(st.sampled_from(["magnitude", "transact", "slicegpt"])),
                        "--target", "60%", "--model", str(model), "--dry-run"],
            "run": ["run", "--method", "magnitude", "--target", "60%", "--model", str(model), "--out", str(out),
                    "--no-progress", "--no-eval"]}[command]
    rc = _answer_touching_only_out(capfd, work, out, argv)
    assert (rc == 0) == out.exists() or command != "run"


#: Each method's own settings (so that most recipes reach the settings' bounds), run keys, and unknown keys.
_KEYS = {"magnitude": ["calib_samples", "calib_seq_len", "calib_batch_size", "gqa", "attn_ratio", "attn_round",
                       "mlp_round_to"],
         "transact": ["calib_samples", "calib_seq_len", "shots", "alpha", "attn_ratio", "attn_heads", "mlp_dim",
                      "mlp_round_to", "gqa", "recover_tokens_per_shot", "recover_lr", "recover_beta1"]}
_RUN = ["seed", "target", "method", "calib", "recover_tokens", "recover_mode", "recover_settings"]
_leaf = st.one_of(st.integers(-3, 300), _ints, st.floats(0, 2), st.floats(allow_nan=True, allow_infinity=True),
                  st.booleans(), st.none(), st.text(max_size=10),
                  st.sampled_from(["60%", "auto", "groups", "heads", "up", "magnitude", "transact", "full", "wikitext2",
                                   "1e12", 1e12, 1e3, 4.0]))
_values = st.recursive(_leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                       max_leaves=6)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(fmt=st.sampled_from(["yaml", "yaml", "json", "text"]), method=st.sampled_from(["magnitude", "transact"]),
       raw=st.text(max_size=60), real=st.sampled_from([False, False, True]), data=st.data())
def test_random_recipes_answer_0_or_2(tmp_path_factory, capfd, stories_dir, fmt, method, raw, real, data):
    if real:
        method = "magnitude"
    names = st.one_of(st.sampled_from(_KEYS[method]), st.sampled_from(_KEYS[method] + _RUN), st.text(max_size=6))
    doc = data.draw(st.dictionaries(names, _values, max_size=4), label="recipe")
    work = tmp_path_factory.mktemp("recipe")
    if real:  # a valid training budget would train (for hours, at the bound): a real run prunes only
        doc = {k: v for k, v in doc.items() if not k.startswith("recover")}
    if fmt == "yaml":
        recipe = work / "r.yaml"
        recipe.write_text(yaml.safe_dump(doc))
    elif fmt == "json":
        recipe = work / "r.json"
        recipe.write_text(json.dumps(doc))  # may hold NaN/Infinity: not JSON, refused
    else:
        recipe = work / "r.yaml"
        recipe.write_text(raw)
    out = work / "out"
    argv = ["run", "--method", method, "--target", "60%", "--model", str(stories_dir),
            "--recipe", str(recipe), *(["--out", str(out), "--no-eval", "--no-progress"] if real else ["--dry-run"])]
    rc = _answer_touching_only_out(capfd, work, out, argv)
    assert out.exists() == (real and rc == 0)


def test_python_api_seed_is_bounded_like_the_cli():
    from compress.errors import UsageError
    from compress.pipeline.run import RunSpec

    RunSpec(method="magnitude", target="60%", seed=2**32 - 1)
    for bad in (2**70, -1, True, 1.5):
        with pytest.raises(UsageError, match="seed"):
            RunSpec(method="magnitude", target="60%", seed=bad)
