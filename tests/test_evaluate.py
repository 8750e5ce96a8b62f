"""Perplexity protocol and the lm-eval bridge (offline, tiny models, a few items per task)."""

from __future__ import annotations

import math
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

from compress import evaluate as ev
from compress.errors import UsageError
from compress.testing import FAMILY_KINDS, TINY_KINDS, assets_dir, tiny_model, tiny_tokenizer
from conftest import needs_assets

ASSETS = assets_dir()


@pytest.fixture(scope="module", autouse=True)
def _hf_cache(tmp_path_factory):
    """datasets writes Arrow caches under HF_HOME: keep them in a temporary folder."""
    home = tmp_path_factory.mktemp("hf_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(home))
        try:
            import datasets.config

            mp.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
        except ImportError:  # pragma: no cover
            pass
        yield


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama-gqa")


def _hand_ppl(model, ids: torch.Tensor, seq_len: int, windows: int) -> float:
    """exp(mean CE) over the first ``windows`` non-overlapping windows, computed independently."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(windows):
            x = ids[w * seq_len : (w + 1) * seq_len].unsqueeze(0)
            logp = torch.log_softmax(model(x).logits[0].double(), dim=-1)
            picked = logp[torch.arange(seq_len - 1), x[0, 1:]]
            nll -= picked.sum().item()
            count += seq_len - 1
    return math.exp(nll / count)


# ------------------------------------------------------------------------------------ protocol


@needs_assets
def test_wikitext2_protocol_text():
    raw = (ASSETS / "data" / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    lines = raw.split("\n")[:-1]
    assert len(lines) == 4358 and sum(bool(x.strip()) for x in lines) == 2891
    text = ev.wikitext2_text("test")
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")
    # 4358 rows -> 4357 separators; empty rows are "" and the others end with "\n".
    assert len(text) == sum(len(x) + 1 for x in lines if x.strip()) + 2 * 4357
    assert ev.wikitext2_text("valid").startswith("\n\n = Homarus gammarus = \n\n")
    with pytest.raises(UsageError):
        ev.wikitext2_text("train")  # type: ignore[arg-type]


@needs_assets
def test_wikitext2_token_count_matches_reference():
    """SOURCES.md: 304,986 SmolLM2 tokens (148 windows at 2048, 2382 at 128)."""
    from transformers import AutoTokenizer

    smol = AutoTokenizer.from_pretrained(ASSETS / "models" / "smollm2-135m-instruct-q4_1")
    n = len(smol(ev.wikitext2_text(), add_special_tokens=False)["input_ids"])
    assert n == 304_986 and n // 2048 == 148 and n // 128 == 2382


def test_missing_assets_is_a_usage_error(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPRESS_ASSETS", str(tmp_path / "nope"))
    with pytest.raises(UsageError, match="COMPRESS_ASSETS=.* is not a folder"):
        ev.wikitext2_text()  # a set but wrong override is an error, not a silent fallback
    monkeypatch.delenv("COMPRESS_ASSETS")
    assert ev.wikitext2_text().startswith("\n\n = Robert Boulter = \n\n")  # shipped with the package
    with pytest.raises(UsageError, match="tinystories.*COMPRESS_ASSETS"):
        ev.ppl_text("tinystories")
    with pytest.raises(UsageError, match="COMPRESS_ASSETS"):
        ev.lm_eval_tasks(None, None, ["piqa"])  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------- perplexity


@needs_assets
def test_perplexity_equals_hand_computation(model, tok):
    text = ev.ppl_text("tinystories")[:4000]
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    seq_len = 64
    res = ev.perplexity(model, tok, text, seq_len=seq_len, batch_size=3, progress=False)
    windows = len(ids) // seq_len
    assert res["windows"] == res["total_windows"] == windows and not res["partial"]
    assert res["tokens"] == len(ids) and res["predicted"] == windows * (seq_len - 1)
    assert res["ppl"] == pytest.approx(_hand_ppl(model, ids, seq_len, windows), rel=1e-5)
    assert res["nll"] == pytest.approx(math.log(res["ppl"]))
    # batching does not change the result
    one = ev.perplexity(model, tok, text, seq_len=seq_len, batch_size=1, progress=False)
    assert one["ppl"] == pytest.approx(res["ppl"], rel=1e-5)


@needs_assets
def test_perplexity_max_windows_and_bos(model, tok):
    text = ev.ppl_text("tinystories")[:4000]
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    part = ev.perplexity(model, tok, text, seq_len=32, max_windows=2, progress=True)
    assert part["windows"] == 2 and part["partial"] and part["total_windows"] == len(ids) // 32
    assert part["ppl"] == pytest.approx(_hand_ppl(model, ids, 32, 2), rel=1e-5)
    bos = ev.perplexity(model, tok, text, seq_len=32, add_bos=True, max_windows=3, progress=False)
    assert bos["add_bos"] and bos["total_windows"] == len(ids) // 31 and bos["predicted"] == 3 * 31
    with_bos = torch.cat([torch.tensor([tok.bos_token_id]), ids[:31]])
    assert ev.perplexity(model, tok, text, seq_len=32, add_bos=True, max_windows=1, progress=False)[
        "ppl"
    ] == pytest.approx(_hand_ppl(model, with_bos, 32, 1), rel=1e-5)


@needs_assets
def test_perplexity_errors(model, tok):
    with pytest.raises(UsageError, match="fewer than one window"):
        ev.perplexity(model, tok, "Once upon a time.", seq_len=128, progress=False)
    with pytest.raises(UsageError, match="max_position_embeddings"):
        ev.perplexity(model, tok, "Once upon a time.", seq_len=4096, progress=False)
    with pytest.raises(UsageError, match="seq_len"):
        ev.perplexity(model, tok, "Once upon a time.", seq_len=1, progress=False)
    with pytest.raises(UsageError, match="unknown perplexity source"):
        ev.ppl_text("ptb-nope")


@needs_assets
def test_stories260k_tinystories_ppl_about_5():
    """Real model sanity check. The whole file gives 5.05 at 512 (SOURCES.md; reproduced exactly by
    perplexity(), but 15-35 s on this CPU); its first 120 windows are easier text (3.99), hence the
    loose bound."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ASSETS / "models" / "stories260k"
    m, t = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    res = ev.perplexity(
        m, t, ev.ppl_text("tinystories"), seq_len=512, batch_size=40, max_windows=120, progress=False
    )
    assert res["total_windows"] == 767 and res["windows"] == 120
    assert 3.5 < res["ppl"] < 6.0


# -------------------------------------------------------------------------------------- lm-eval


def test_resolve_tasks():
    assert ev.resolve_tasks(["piqa", "compress_boolq", "hub:hellaswag"]) == [
        ("piqa", "compress_piqa"),
        ("boolq", "compress_boolq"),
        ("hub:hellaswag", "hellaswag"),
    ]
    assert [k for k, _ in ev.resolve_tasks("zeroshot")] == list(ev.ZERO_SHOT_TASKS)
    assert ev.resolve_tasks("piqa,piqa") == [("piqa", "compress_piqa")]
    with pytest.raises(UsageError, match="unknown task 'mmlu'.*piqa.*hub:"):
        ev.resolve_tasks(["mmlu"])
    assert set(ev.HEADLINE_METRIC) == set(ev.ZERO_SHOT_TASKS) == set(ev.LOCAL_TASKS)


@needs_assets
def test_materialized_yamls_point_at_assets():
    names = {p.stem for p in ev.tasks_dir().glob("*.yaml")}
    assert set(ev.LOCAL_TASKS.values()) <= names
    with ev.materialized_tasks_dir() as d:
        for name in ev.LOCAL_TASKS.values():
            text = (d / f"{name}.yaml").read_text()
            assert ev.ASSETS_PLACEHOLDER not in text
            (path,) = re.findall(r'test: "([^"]+)"', text)
            assert os.path.isfile(path)
        assert (d / "compress_task_utils.py").is_file()


@needs_assets
def test_prompts_match_lm_eval_format():
    from lm_eval.tasks import TaskManager

    with ev.materialized_tasks_dir() as d:
        manager = TaskManager(include_path=str(d), include_defaults=False)
        tasks = manager.load(
            ["compress_piqa", "compress_winogrande", "compress_boolq", "compress_hellaswag"]
        )["tasks"]
        args = {}
        for name, task in tasks.items():
            task.build_all_requests(limit=1, rank=0, world_size=1)
            args[name] = [inst.arguments for inst in task.instances]

    q = "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert [a[0] for a in args["compress_piqa"]] == [q, q]
    assert args["compress_piqa"][0][1].startswith(" Provide the guinea pig with a cage full of a few inches")
    assert (
        "ripped paper strips" in args["compress_piqa"][0][1] and "ripped jeans" in args["compress_piqa"][1][1]
    )
    # winogrande: partial scoring, one context per option, the same continuation after each
    assert args["compress_winogrande"] == [
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."),
    ]
    assert tasks["compress_winogrande"].multiple_input == 2
    ctx, cont = args["compress_boolq"][0]
    assert ctx.startswith("All biomass goes through") and not ctx.startswith("Passage:")
    assert ctx.endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert [c for _, c in args["compress_boolq"]] == [" no", " yes"]
    # hellaswag: ctx_b capitalised as lm-eval does ("... on a roof. he" -> "... on a roof. He")
    assert args["compress_hellaswag"][0] == (
        "Roof shingle removal: A man is sitting on a roof. He",
        " is using wrap to wrap a pair of skis.",
    )


@needs_assets
def test_lm_eval_tasks_on_tiny_model(model, tok):
    res = ev.lm_eval_tasks(model, tok, ["piqa", "winogrande", "arc_challenge"], limit=4, batch_size=8)
    assert set(res) == {"piqa", "winogrande", "arc_challenge", "average"}
    for key in ("piqa", "winogrande", "arc_challenge"):
        r = res[key]
        assert r["n"] == 4 and r["task"] == f"compress_{key}"
        assert r["metric"] == ev.HEADLINE_METRIC[key] and r["score"] == r[r["metric"]]
        # the picks rebuilt from the samples agree with lm-eval's score on every example (acc and
        # acc_norm, two-option and four-option tasks), else this would be None
        a = r["answers"]
        assert a is not None and 0 < a["chance"] <= 0.5 and 0.25 <= a["constant"] <= 1 and 0 < a["lean"] <= 1
        assert all(0.0 <= r[m] <= 1.0 for m in ("acc", "acc_norm") if m in r)
    assert "acc_norm" not in res["winogrande"] and "acc_norm" in res["piqa"]
    assert res["average"] == pytest.approx(
        sum(res[k]["score"] for k in ("piqa", "winogrande", "arc_challenge")) / 3
    )


@needs_assets
def test_evaluate_model_combines(model, tok):
    out = ev.evaluate_model(
        model, tok, ppl={"tinystories": [64]}, tasks=["boolq"], limit=2, max_windows=2, progress=False
    )
    assert set(out) == {"ppl", "tasks"}
    assert out["ppl"]["tinystories"]["64"]["windows"] == 2
    assert out["tasks"]["boolq"]["n"] == 2 and out["tasks"]["boolq"]["metric"] == "acc"
    assert ev.evaluate_model(model, tok) == {}


@pytest.mark.parametrize("kind", TINY_KINDS + FAMILY_KINDS)
def test_chunked_loss_equals_the_models_own_logits(kind, monkeypatch):
    """Above LOGITS_CHUNK_BYTES the NLL is taken from the last hidden states a few positions at a time
    (Gemma's 262k vocabulary): the same sum as the model's own logits (Gemma-2's soft-capping included),
    without the model's forward and without lm_head ever seeing more than one chunk of positions."""
    from compress.calib import runner

    model = tiny_model(kind).eval()
    blocks = torch.randint(3, model.config.vocab_size, (4, 40), generator=torch.Generator().manual_seed(0))
    full, n_full = runner.nll_sum(model, blocks, batch_size=2)
    monkeypatch.setattr(runner, "LOGITS_CHUNK_BYTES", 0)
    monkeypatch.setattr(runner, "_CHUNK_ELEMENTS", model.config.vocab_size * 2 * 7)  # 7 positions a chunk
    seen: list[int] = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    own = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: pytest.fail("the model's own forward ran"))
    chunked, n_chunked = runner.nll_sum(model, blocks, batch_size=2)
    hook.remove()
    monkeypatch.setattr(model, "forward", own)
    assert n_chunked == n_full == 4 * 39
    assert chunked == pytest.approx(full, rel=1e-6)
    assert max(seen) == 7 and sum(seen) == 39 * 2  # two mini-batches, 39 predicted positions each
    if kind == "gemma2":
        assert model.config.final_logit_softcapping  # the soft-capped path was the one compared


def _sample(gold: int, lls: list[float], conts: list[str], metric: str = "acc") -> dict:
    picked = max(range(len(lls)), key=lls.__getitem__) if metric == "acc" else max(
        range(len(lls)), key=lambda i: lls[i] / len(conts[i].lstrip(" ")))
    return {"target": gold, "filtered_resps": [(ll, False) for ll in lls],
            "arguments": [("ctx", c) for c in conts], metric: float(picked == gold)}


def test_answer_balance_tells_a_constant_answer_from_reading():
    """BoolQ's trap on small models: answering "yes" to everything scores the share of "yes" questions.
    The balance names it: the model's lean, the best constant score, and chance."""
    yes_no = [" no", " yes"]
    golds = [1, 1, 1, 0]  # 75 % "yes"
    always_yes = [_sample(g, [-2.0, -1.0], yes_no) for g in golds]
    b = ev.answer_balance(always_yes, "acc")
    assert b == {"chance": 0.5, "constant": 0.75, "constant_choice": 1, "lean": 1.0, "lean_choice": 1,
                 "constant_at_lean": 0.75}
    always_no = ev.answer_balance([_sample(g, [-1.0, -2.0], yes_no) for g in golds], "acc")
    assert always_no["lean"] == 1.0 and always_no["constant_at_lean"] == 0.25  # = its score
    reading = [_sample(g, [-1.0, -2.0] if g == 0 else [-2.0, -1.0], yes_no) for g in golds]
    assert ev.answer_balance(reading, "acc")["lean"] == 0.75  # right every time: the lean is the gold's
    # acc_norm divides by the choice's length (the delimiter excluded), as lm-eval does
    long_short = [" a much longer answer", " short"]
    s = _sample(0, [-10.0, -4.0], long_short, "acc_norm")
    assert s["acc_norm"] == 1.0 and ev.answer_balance([s], "acc_norm")["lean_choice"] == 0
    assert ev.answer_balance([{**s, "acc": 0.0}], "acc")["lean_choice"] == 1  # by raw log-likelihood
    # nothing is reported that disagrees with lm-eval's own per-example score, or without one
    wrong = {**always_yes[0], "acc": 0.0}
    assert ev.answer_balance([wrong], "acc") is None
    assert ev.answer_balance([{k: v for k, v in always_yes[0].items() if k != "acc"}], "acc") is None
    assert ev.answer_balance([{**always_yes[0], "target": [0, 1]}], "acc") is None
    assert ev.answer_balance([], "acc") is None
