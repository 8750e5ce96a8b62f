"""``compress export --gguf``: a stock result as a GGUF file that transformers' own GGUF loader reads
back with the pruned model's logits (within the type's tolerance) and tokenizer; bad input refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from compress.cli import main
from compress.io.loading import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.tensor([[1, 20, 30, 40, 50, 60, 70, 80, 90, 100]])
#: max |logit difference| / max |logit| by type
TOLERANCE = {"f32": 1e-6, "f16": 2e-3, "bf16": 2e-2, "q8_0": 2e-2}


@pytest.fixture(scope="module")
def pruned(stories_dir, tmp_path_factory) -> Path:
    """stories260K pruned to 70 % by magnitude: 4 of 8 heads, MLP 122 wide (not a multiple of 32)."""
    from compress.pipeline.run import RunSpec, run

    out = tmp_path_factory.mktemp("gguf") / "pruned"
    r = run(RunSpec(method="magnitude", target="70%", model=str(stories_dir), out=str(out), evaluate=False,
                    progress=False), log=lambda m: None)
    assert r.export["kind"] == "stock"
    return out


@pytest.mark.parametrize("kind", ["f32", "f16", "bf16", "q8_0"])
def test_gguf_round_trip_through_transformers(pruned, kind, capsys):
    out = pruned.parent / f"m-{kind}.gguf"
    assert main(["export", str(pruned), "--gguf", kind, "--out", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["type"] == kind and info["architecture"] == "llama" and out.stat().st_size == info["bytes"]
    # q8_0 quantizes rows in blocks of 32: the 122-wide down projections stay F16, and the file says so
    assert info["f16_fallback_tensors"] == ([f"blk.{i}.ffn_down.weight" for i in range(5)] if kind == "q8_0" else [])
    with torch.no_grad():
        ref = load_model(str(pruned)).model(IDS).logits
        got = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32)(IDS).logits
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert rel <= TOLERANCE[kind], (kind, rel)
    if kind == "f16":  # the tokenizer travels in the file
        tok = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
        ours = AutoTokenizer.from_pretrained(pruned)
        text = "Once upon a time, there was a little dog named Max. He liked to run!"
        assert tok(text).input_ids == ours(text).input_ids


def test_gguf_sizes_shrink_with_the_type(pruned, tmp_path):
    from compress.io.gguf_export import write_gguf

    sizes = {k: write_gguf(pruned, tmp_path / f"{k}.gguf", k)["bytes"] for k in ("f32", "f16", "q8_0")}
    assert sizes["f32"] > 1.9 * sizes["f16"] and sizes["f16"] > sizes["q8_0"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f16.gguf", "f32.gguf", "q8_0.gguf"]  # no temporaries


def _bad_compress_folder(tmp_path: Path, stories_dir: Path) -> Path:
    from compress.io.export import export_model

    lm = load_model(str(stories_dir))
    out = tmp_path / "cf"
    export_model(lm.model, lm.tokenizer, out, kind="compress")
    return out


@pytest.mark.parametrize(("case", "message"), [
    ("compress", "is in the compress format"),
    ("type", "unknown GGUF type 'q4_k'"),
    ("suffix", "must be a .gguf file name"),
    ("exists", "already exists"),
    ("missing", "is not a saved model folder"),
])
def test_export_refuses_bad_input_and_writes_nothing(tmp_path, capsys, pruned, stories_dir, case, message):
    src, kind, out = pruned, "f16", tmp_path / "x.gguf"
    if case == "compress":
        src = _bad_compress_folder(tmp_path, stories_dir)
    elif case == "type":
        kind = "q4_k"
    elif case == "suffix":
        out = tmp_path / "x.bin"
    elif case == "exists":
        out.write_bytes(b"keep")
    elif case == "missing":
        src = tmp_path / "nope"
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    rc = main(["export", str(src), "--gguf", kind, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temporary left
    if case == "exists":
        assert out.read_bytes() == b"keep"


def test_scaled_rotary_embedding_is_refused(tmp_path, pruned, capsys):
    import shutil

    src = tmp_path / "llama3"
    shutil.copytree(pruned, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}
    (src / "config.json").write_text(json.dumps(cfg))
    assert main(["export", str(src), "--gguf", "f16", "--out", str(tmp_path / "x.gguf")]) == 2
    assert "scaled rotary embedding (llama3)" in capsys.readouterr().err and not (tmp_path / "x.gguf").exists()
