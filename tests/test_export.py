"""Export: stock and compress formats reload with equal logits, atomically."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from compress.errors import UsageError
from compress.io.export import PLAN_FILE, RECORD_FILE, export_model, stock_expressible, weights_sha256
from compress.io.loading import load_model
from compress.model.adapter import ArchAdapter
from compress.model.plan import LayerPlan, Plan
from compress.model.surgery import apply_plan
from compress.modeling import LowRankLinear
from compress.testing import tiny_model, tiny_tokenizer
from conftest import kill_9_at_random

ATOL = 1e-5
IDS = torch.randint(3, 512, (2, 10), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tok(assets):
    return tiny_tokenizer()


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _low_rank(lin: torch.nn.Linear, rank: int) -> LowRankLinear:
    """The rank-``rank`` truncated SVD of ``lin`` as B(A(x))."""
    U, S, Vh = torch.linalg.svd(lin.weight.data, full_matrices=False)
    s = S[:rank].sqrt()
    lr = LowRankLinear(lin.in_features, lin.out_features, rank, bias=lin.bias is not None)
    with torch.no_grad():
        lr.A.weight.copy_(s[:, None] * Vh[:rank])
        lr.B.weight.copy_(U[:, :rank] * s)
        if lin.bias is not None:
            lr.B.bias.copy_(lin.bias)
    return lr


def uniform_model(kind="llama-gqa"):
    m = tiny_model(kind)
    apply_plan(m, Plan(layers={i: LayerPlan(kv_heads=[1], mlp=list(range(0, 96, 2))) for i in range(3)}))
    return m


def hetero_model(kind):
    """Different MLP widths per layer, different head counts, and a low-rank q_proj in layer 1."""
    m = tiny_model(kind)
    g = ArchAdapter(m).geometry(0)
    n = g.intermediate
    plan = Plan(layers={0: LayerPlan(mlp=list(range(n // 2))),
                        1: LayerPlan(kv_heads=[0], mlp=list(range(0, n, 3))),
                        2: LayerPlan(mlp=list(range(n - 7)))})
    apply_plan(m, plan)
    attn = m.model.layers[1].self_attn
    attn.q_proj = _low_rank(attn.q_proj, rank=5)
    return m.eval()


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def three_of_four_heads(attention_bias: bool = False, rope: dict | None = None):
    """Uniform, but 64 % 3 != 0: transformers' stock LlamaConfig rejects it. Without biases the
    stock Mistral class expresses it exactly; with q/k/v/o biases no stock class does."""
    from transformers import AutoModelForCausalLM

    from compress.testing import tiny_config

    cfg = tiny_config("llama-mha")
    cfg.attention_bias = attention_bias
    if rope is not None:
        cfg.rope_parameters = dict(rope)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg).eval()
    apply_plan(m, Plan(layers={i: LayerPlan(kv_heads=[0, 1, 3]) for i in range(3)}))
    return m


@pytest.mark.parametrize("rope", [None, LLAMA3_ROPE], ids=["rope-default", "rope-llama3"])
def test_llama_with_heads_not_dividing_the_hidden_size_exports_as_stock_mistral(tmp_path, tok, rope):
    """LLaMA-2-7B -> 4B keeps 18 heads of 4096 channels: LlamaConfig refuses it, MistralConfig (the same
    function with sliding_window=None) does not; the folder loads with stock transformers, no remote
    code, logit for logit and token for token (Llama-3's scaled rotary embedding included)."""
    model = three_of_four_heads(rope=rope)
    ids = torch.randint(3, 512, (2, 120), generator=torch.Generator().manual_seed(2))  # past the llama3 knee
    ok, why = stock_expressible(model)
    assert ok and "equivalent stock mistral" in why and "not a multiple" in why
    info = export_model(model, tok, tmp_path / "out")
    assert info["kind"] == "stock"
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "mistral" and cfg["architectures"] == ["MistralForCausalLM"]
    assert cfg["sliding_window"] is None and "auto_map" not in cfg and cfg["head_dim"] == 16
    assert (cfg["num_attention_heads"], cfg["hidden_size"]) == (3, 64)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded).__name__ == "MistralForCausalLM"
    assert (_logits(reloaded, ids) - _logits(model, ids)).abs().max().item() <= ATOL
    assert cfg["rope_parameters"] == (rope or model.config.rope_parameters)
    with torch.no_grad():
        a = reloaded.generate(IDS[:1], max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        b = model.generate(IDS[:1], max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)
    assert type(model).__name__ == "LlamaForCausalLM"  # the in-memory model is left as it was


# ------------------------------------------------------------------------------------------ stock
def test_stock_export_reloads_with_stock_transformers(tmp_path, tok):
    model = uniform_model()
    info = export_model(model, tok, tmp_path / "out", plan={"plan": {"x": 1}}, record={"method": "m", "target": "60%"})
    out = Path(info["path"])
    assert info["kind"] == "stock"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "auto_map" not in cfg
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]) == (4, 1, 48)
    assert not (out / "modeling_compress.py").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    assert (_logits(reloaded) - _logits(model)).abs().max().item() <= ATOL
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    plan = json.loads((out / PLAN_FILE).read_text())
    assert plan["plan"] == {"x": 1} and plan["format"] == "stock"
    assert plan["weights_sha256"] == weights_sha256(out) == info["weights_sha256"]
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["method"] == "m" and record["format"] == "stock"
    assert "loads with stock transformers" in (out / "README.md").read_text()
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer.model").is_file()


def test_stock_kind_refused_when_not_expressible(tmp_path, tok):
    with pytest.raises(UsageError, match="cannot export as stock"):
        export_model(hetero_model("llama-gqa"), tok, tmp_path / "out", kind="stock")
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------------------- compress
@pytest.fixture(scope="module")
def compress_exports(tmp_path_factory, assets):
    """Folders exported in the compress format, with the logits of the in-memory models."""
    tok = tiny_tokenizer()
    root = tmp_path_factory.mktemp("compress-exports")
    cases = {}
    for name, make in (("hetero-llama-gqa", lambda: hetero_model("llama-gqa")),
                       ("hetero-llama-mha", lambda: hetero_model("llama-mha")),
                       ("hetero-qwen2", lambda: hetero_model("qwen2")),
                       ("three-heads", lambda: three_of_four_heads(attention_bias=True))):
        model = make()
        info = export_model(model, tok, root / name, plan={"plan": {"k": name}}, record={"method": "hand"})
        torch.save(IDS, root / f"{name}.ids.pt")
        cases[name] = {"path": Path(info["path"]), "info": info, "logits": _logits(model), "model": model}
    return cases


@pytest.mark.parametrize("name", ["hetero-llama-gqa", "hetero-llama-mha", "hetero-qwen2", "three-heads"])
def test_compress_export_reloads(compress_exports, name):
    case = compress_exports[name]
    out, model = case["path"], case["model"]
    assert case["info"]["kind"] == "compress"
    if name == "three-heads":
        ok, why = stock_expressible(model)
        assert not ok and "not a multiple" in why
    cfg = json.loads((out / "config.json").read_text())
    # the base family as model_type (a stock AutoTokenizer reads it without a prompt), our class by name
    assert cfg["model_type"] == model.config.model_type and cfg["architectures"] == ["CompressForCausalLM"]
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_compress.CompressForCausalLM"
    for f in ("compress_plan.json", "compress_run.json", "README.md", "model.safetensors", "modeling_compress.py"):
        assert (out / f).is_file(), f
    specs = cfg["layers"]
    if name.startswith("hetero"):
        assert len({s["intermediate_size"] for s in specs}) == 3
        assert specs[1]["low_rank"] == {"self_attn.q_proj": 5}
    reloaded = load_model(str(out)).model  # compress's loader: its own class, the folder's code never runs
    assert type(reloaded).__name__ == "CompressForCausalLM" and reloaded.config.model_type == "compress"
    assert (_logits(reloaded) - case["logits"]).abs().max().item() <= ATOL
    if name.startswith("hetero"):
        assert isinstance(reloaded.model.layers[1].self_attn.q_proj, LowRankLinear)
        assert ArchAdapter(reloaded).geometries() == ArchAdapter(model).geometries()
    with torch.no_grad():
        a = reloaded.generate(IDS[:1], max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        b = model.generate(IDS[:1], max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)
    card = (out / "README.md").read_text()
    assert "AutoModelForCausalLM.from_pretrained(\"path/to/this/folder\", trust_remote_code=True)" in card
    assert "AutoTokenizer.from_pretrained(\"path/to/this/folder\")" in card


def test_modeling_file_hash_and_imports(compress_exports):
    out = compress_exports["hetero-llama-gqa"]["path"]
    cfg = json.loads((out / "config.json").read_text())
    src = (out / "modeling_compress.py").read_bytes()
    assert hashlib.sha256(src).hexdigest() == cfg["compress_modeling_sha256"]
    top = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in the modeling file"
            top.add(node.module.split(".")[0])
    third_party = top - set(sys.stdlib_module_names) - {"__future__"}
    assert third_party == {"torch", "transformers"}, top


_NO_COMPRESS = textwrap.dedent('''
    import importlib.abc, sys
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("compress", "compress_transact", "compress_baselines"):
                raise ImportError(f"{name} must not be imported")
    sys.meta_path.insert(0, _Block())
    import builtins
    prompts = []
    builtins.input = lambda *a: prompts.append(a) or "n"  # transformers' "run custom code? [y/N]"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    for folder in sys.argv[1:]:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        AutoTokenizer.from_pretrained(folder)  # as the model card shows: no flag, and no prompt
        assert not prompts, prompts
        try:  # without the flag: the stock class refuses the per-layer weights, never a wrong model
            AutoModelForCausalLM.from_pretrained(folder)
            raise SystemExit("loaded without trust_remote_code")
        except (RuntimeError, ValueError) as e:
            assert "mismatch" in str(e) or "size" in str(e), e
        ids = torch.load(folder + ".ids.pt")
        with torch.no_grad():
            torch.save(model(ids).logits, folder + ".remote-logits.pt")
            model.generate(ids[:1], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert not [m for m in sys.modules if m.split(".")[0] == "compress"]
    print("OK")
''')


def test_trust_remote_code_without_compress(compress_exports):
    folders = [str(c["path"]) for c in compress_exports.values()]
    r = subprocess.run([sys.executable, "-c", _NO_COMPRESS, *folders], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"}, stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
    for case in compress_exports.values():
        remote = torch.load(str(case["path"]) + ".remote-logits.pt")
        assert (remote - case["logits"]).abs().max().item() <= ATOL


# ----------------------------------------------------------------------------------------- atomicity
def test_existing_output_refused_and_untouched(tmp_path, tok):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for overwrite in (False, True):  # a folder compress did not write is never replaced
        with pytest.raises(UsageError, match="already exists and was not written by compress"):
            export_model(uniform_model(), tok, out, overwrite=overwrite)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / RECORD_FILE).write_text("{}")  # one compress wrote: refused without --overwrite only
    with pytest.raises(UsageError, match="already exists; pass --overwrite"):
        export_model(uniform_model(), tok, out)
    assert sorted(p.name for p in out.iterdir()) == sorted([RECORD_FILE, "keep.txt"])


def test_overwrite_replaces_whole_folder(tmp_path, tok):
    out = tmp_path / "out"
    model = uniform_model()
    export_model(model, tok, out)
    (out / "stale.txt").write_text("old")
    export_model(model, tok, out, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no .old-/.tmp- folders left behind
    assert (_logits(AutoModelForCausalLM.from_pretrained(out)) - _logits(model)).abs().max().item() <= ATOL


@pytest.mark.parametrize("fmt", ["stock", "compress"])
def test_failure_mid_export_leaves_nothing(tmp_path, tok, monkeypatch, fmt):
    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(tok, "save_pretrained", boom)
    model = uniform_model() if fmt == "stock" else hetero_model("llama-gqa")
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_model(model, tok, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    # and the failure does not poison a later export: overwrite path too (of a folder compress wrote)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "previous.txt").write_text("x")
    (tmp_path / "out" / RECORD_FILE).write_text("{}")
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_model(model, tok, tmp_path / "out", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([RECORD_FILE, "previous.txt"])


_EXPORT_LOOP = textwrap.dedent('''
    import sys, itertools
    from pathlib import Path
    from compress.io.export import export_model
    from compress.model.plan import LayerPlan, Plan
    from compress.model.surgery import apply_plan
    from compress.testing import tiny_model, tiny_tokenizer
    out = Path(sys.argv[1])
    tok = tiny_tokenizer()
    stock = tiny_model("llama-gqa")
    apply_plan(stock, Plan(layers={i: LayerPlan(kv_heads=[1]) for i in range(3)}))
    hetero = tiny_model("qwen2")
    apply_plan(hetero, Plan(layers={0: LayerPlan(mlp=list(range(40)))}))
    print("ready", flush=True)
    for i in itertools.count():
        model = stock if i % 2 == 0 else hetero
        export_model(model, tok, out / f"m{i}")
        export_model(model, tok, out / "same", overwrite=True)
''')


def test_kill_9_during_export_leaves_complete_or_absent(tmp_path, assets):
    out = tmp_path / "exports"
    out.mkdir()
    delay = kill_9_at_random([sys.executable, "-c", _EXPORT_LOOP, str(out)], 0.3, 2.5)
    finals = sorted(p for p in out.iterdir() if not p.name.startswith("."))
    numbered = [p for p in finals if p.name.startswith("m")]
    assert numbered, f"no export finished within {delay:.2f}s"
    for folder in finals:
        names = {p.name for p in folder.iterdir()}
        assert {"config.json", "model.safetensors", PLAN_FILE, RECORD_FILE, "README.md"} <= names, (folder, names)
        plan = json.loads((folder / PLAN_FILE).read_text())
        assert plan["weights_sha256"] == weights_sha256(folder), f"{folder.name} is partial (delay {delay:.2f}s)"
    for folder in (numbered[-1], *(p for p in finals if p.name == "same")):
        load_model(str(folder))
    # whatever was in flight is only under a hidden temporary name
    assert all(p.name.startswith((".m", ".same")) for p in out.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------ hub-ready folder
@pytest.mark.parametrize("kind", ["stock", "compress"])
def test_generation_config_and_chat_template_travel(kind, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    from compress.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    if tok is None:
        pytest.skip("needs $COMPRESS_ASSETS")
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    model = tiny_model("llama-gqa")
    model.generation_config = GenerationConfig(eos_token_id=[2, 7], bos_token_id=1, do_sample=True,
                                               temperature=0.2, top_p=0.9)
    export_model(model, tok, tmp_path / "o", kind=kind, plan={}, record={"method": "x", "target": "60%"})
    gen = GenerationConfig.from_pretrained(tmp_path / "o")
    assert gen.eos_token_id == [2, 7] and gen.do_sample is True and gen.temperature == 0.2 and gen.top_p == 0.9
    again = AutoTokenizer.from_pretrained(tmp_path / "o")  # no flag, no prompt, in both formats
    assert again.chat_template == tok.chat_template


def test_run_folder_is_hub_ready_and_has_no_absolute_path(tmp_path, stories_dir, capsys):
    import re

    import yaml

    from compress.cli import main

    out = tmp_path / "deep" / "out"
    calib = tmp_path / "my-calibration.txt"
    calib.write_text((stories_dir.parent.parent / "data" / "tinystories" / "tinystories_val.txt").read_text()[:200_000])
    assert main(["run", "--method", "transact", "--target", "60%", "--model", str(stories_dir), "--out", str(out),
                 "--calib", str(calib), "--set", "calib_samples=4", "--set", "calib_seq_len=32", "--json"]) == 0
    capsys.readouterr()
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---", 2)[1])
    assert front["pipeline_tag"] == "text-generation" and "transact" in front["tags"]
    assert "| parameters |" in card and "| perplexity (" in card and "no recovery training was run" in card
    # numbers are formatted (no raw floats such as 208491264.0)
    assert not re.search(r"\d{7,}\.0", card)
    leaks = {str(tmp_path), str(stories_dir), str(Path.home())}
    for f in out.iterdir():
        if f.suffix in (".json", ".md", ".yaml", ".txt", ".jinja"):
            text = f.read_text(errors="replace")
            for leak in leaks:
                assert leak not in text, f"{f.name} holds the absolute path {leak}"
