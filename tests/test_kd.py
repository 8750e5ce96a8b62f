"""Distillation recovery (``--recover-mode kd``): the loss, training towards the teacher, the checks that
refuse a teacher before any work, the teacher's memory in ``--dry-run``, and KD between TransAct's shots."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from transformers.modeling_outputs import CausalLMOutputWithPast

from compress.calib.sources import CalibrationSource
from compress.cli import main
from compress.errors import UsageError
from compress.testing import assets_dir, tiny_model, tiny_tokenizer
from compress.train.recovery import RecoveryConfig, check_teacher, distillation_loss, recover

pytestmark = pytest.mark.usefixtures("one_thread")

KD = dict(tokens=2048, seq_len=64, batch_size=4, mode="kd", lr=1e-3, warmup_ratio=0.0)


@pytest.fixture(scope="module")
def source():
    if assets_dir() is None:
        pytest.skip("needs $COMPRESS_ASSETS")
    return CalibrationSource.from_spec("tinystories", tiny_tokenizer(), seed=0, max_chars=150_000)


def _kl(student, teacher, blocks) -> float:
    """Mean KL(teacher ‖ student) per position on ``blocks``."""
    with torch.no_grad():
        s = F.log_softmax(student(input_ids=blocks).logits, -1)
        t = F.log_softmax(teacher(input_ids=blocks).logits, -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def _student(teacher):
    """The teacher pruned to 70 % by magnitude: a student that has something to learn."""
    import compress

    return compress.prune(copy.deepcopy(teacher), method="magnitude", target="70%", evaluate=False).model


# ---------------------------------------------------------------------------- the loss
def test_kd_settings_validate():
    cfg = RecoveryConfig(tokens=100, mode="kd")
    assert cfg.lr == 5e-5 and cfg.kd_temperature == 1.0 and cfg.kd_lm_weight == 0.0
    with pytest.raises(ValidationError, match="only apply to distillation"):
        RecoveryConfig(tokens=100, kd_temperature=2.0)  # mode full
    with pytest.raises(ValidationError):
        RecoveryConfig(tokens=100, mode="kd", kd_temperature=0)
    with pytest.raises(ValidationError):
        RecoveryConfig(tokens=100, mode="kd", kd_lm_weight=1.5)


def test_distillation_loss_is_the_tempered_kl():
    g = torch.Generator().manual_seed(0)
    s_logits, t_logits = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    s, t = CausalLMOutputWithPast(logits=s_logits), CausalLMOutputWithPast(logits=t_logits)
    for tau in (1.0, 2.0):
        cfg = RecoveryConfig(tokens=1, mode="kd", kd_temperature=tau)
        p_t = torch.softmax(t_logits / tau, -1)
        want = (p_t * (p_t.log() - torch.log_softmax(s_logits / tau, -1))).sum(-1).mean() * tau**2
        assert math.isclose(float(distillation_loss(s, t, labels, cfg)), float(want), rel_tol=1e-5)
    assert float(distillation_loss(s, s, labels, RecoveryConfig(tokens=1, mode="kd"))) == pytest.approx(0, abs=1e-6)
    # all LM: the shifted causal-LM cross-entropy, as the model's own loss
    ce = F.cross_entropy(s_logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    lm = distillation_loss(s, t, labels, RecoveryConfig(tokens=1, mode="kd", kd_lm_weight=1.0))
    assert math.isclose(float(lm), float(ce), rel_tol=1e-6)


# ---------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def stories_teacher(stories_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(stories_dir).eval()


def test_kd_trains_the_student_towards_the_teacher(source, stories_teacher):
    teacher = stories_teacher
    student = _student(teacher)
    t_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    held_out = source.with_seed(123).batches(8, 64)
    before = _kl(student, teacher, held_out)
    res = recover(student, source, RecoveryConfig(**KD), progress=False, teacher=teacher)
    after = _kl(res.model, teacher, held_out)
    assert after < 0.7 * before, (before, after)
    assert res.mode == "kd" and res.steps == 8 and res.losses[-1][1] < res.losses[0][1]
    assert all(torch.equal(t_state[k], v) for k, v in teacher.state_dict().items())  # the teacher never moves
    assert not res.model.training and all(p.requires_grad for p in res.model.parameters())

    # the same seed gives the same student; the LM loss gives another one
    again = recover(_student(teacher), source, RecoveryConfig(**KD), progress=False, teacher=teacher).model
    assert all(torch.equal(a, b) for a, b in zip(res.model.state_dict().values(), again.state_dict().values(),
                                                  strict=True))
    lm = recover(_student(teacher), source, RecoveryConfig(**{**KD, "mode": "full"}), progress=False).model
    assert not all(torch.equal(a, b) for a, b in zip(res.model.state_dict().values(), lm.state_dict().values(),
                                                      strict=True))


def test_kd_hidden_term_trains_and_mixes(source, stories_teacher):
    teacher = stories_teacher
    cfg = RecoveryConfig(**KD, kd_lm_weight=0.5, kd_hidden_weight=1.0, kd_temperature=2.0)
    res = recover(_student(teacher), source, cfg, progress=False, teacher=teacher)
    assert res.losses[-1][1] < res.losses[0][1]


def test_teacher_checks():
    llama, qwen = tiny_model("llama-gqa").config, tiny_model("qwen2").config
    with pytest.raises(UsageError, match="teacher is a qwen2 model and the student a llama"):
        check_teacher(llama, qwen)
    other = copy.deepcopy(llama)
    other.vocab_size = 1024
    with pytest.raises(UsageError, match="vocabulary of 1024 tokens and the student 512"):
        check_teacher(llama, other)
    hidden = RecoveryConfig(tokens=1, mode="kd", kd_hidden_weight=1.0)
    with pytest.raises(UsageError, match="kd_hidden_weight compares hidden states"):
        check_teacher(llama, llama, hidden, student_hidden=48, teacher_hidden=64)
    check_teacher(llama, llama, hidden)  # same family, vocabulary and width: accepted
    from transformers import MistralConfig

    # a Llama result exported as the equivalent stock Mistral class distills from its Llama teacher
    check_teacher(MistralConfig(vocab_size=512, hidden_size=64, num_attention_heads=3, head_dim=16), llama)
    from types import SimpleNamespace

    from compress.train.recovery import check_teacher_tokenizer

    a, b = SimpleNamespace(get_vocab=lambda: {"a": 0, "b": 1}), SimpleNamespace(get_vocab=lambda: {"a": 1, "b": 0})
    check_teacher_tokenizer(a, a)
    with pytest.raises(UsageError, match="tokenizer differs"):
        check_teacher_tokenizer(a, b)  # same size, other ids
    with pytest.raises(UsageError, match="distills from a teacher"):
        recover(tiny_model("llama-gqa"), None, RecoveryConfig(tokens=64, mode="kd"))


# ---------------------------------------------------------------------------- the surfaces
def _run_args(stories, out, *extra):
    return ["run", "--model", str(stories), "--method", "magnitude", "--target", "80%", "--calib", "tinystories",
            "--recover-tokens", "256", "--no-eval", "--no-progress", "--out", str(out), *extra]


@pytest.mark.parametrize(("extra", "message"), [
    (["--recover-mode", "kd", "--teacher", "QWEN"], "teacher is a qwen2 model"),
    (["--teacher", "STORIES"], "--teacher is the distillation teacher of --recover-mode kd"),
    (["--recover-mode", "kd", "--teacher", "MISSING"], "does not exist"),
])
def test_run_refuses_a_bad_teacher_before_loading(tmp_path, capsys, stories_dir, extra, message):
    qwen = tmp_path / "qwen"
    tiny_model("qwen2").save_pretrained(qwen)
    subst = {"QWEN": str(qwen), "STORIES": str(stories_dir), "MISSING": str(tmp_path / "nope")}
    out = tmp_path / "out"
    capsys.readouterr()  # the save's progress bar
    rc = main(_run_args(stories_dir, out, *[subst.get(x, x) for x in extra]))
    cap = capsys.readouterr()
    assert rc == 2 and message in cap.err and cap.err.count("\n") == 1, cap.err
    assert "loaded" not in cap.out and not out.exists()


def test_recover_kd_needs_a_teacher(tmp_path, capsys, stories_dir):
    out = tmp_path / "out"
    rc = main(["recover", str(stories_dir), "--tokens", "256", "--mode", "kd", "--calib", "tinystories",
               "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "needs a teacher here: pass --teacher" in err and not out.exists()


def test_run_and_recover_with_kd(tmp_path, capsys, stories_dir):
    """`compress run --recover-mode kd` (teacher: the dense model) and `compress recover --mode kd
    --teacher` train, record the teacher, and write models that reload."""
    from compress.io.loading import load_model

    out = tmp_path / "out"
    assert main([*_run_args(stories_dir, out, "--recover-mode", "kd"), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["recovery"]["mode"] == "kd" and rec["recovery"]["teacher"] == "dense model"
    assert rec["recovery_result"]["steps"] == 1 and rec["recovery_result"]["final_loss"] > 0
    again = tmp_path / "again"
    assert main(["recover", str(out), "--tokens", "512", "--mode", "kd", "--teacher", str(stories_dir),
                 "--calib", "tinystories", "--seq-len", "64", "--out", str(again), "--no-progress", "--json"]) == 0
    rec2 = json.loads(capsys.readouterr().out)
    assert rec2["recovery"]["teacher"] == "stories260k" and rec2["recovery_result"]["steps"] == 2
    m = load_model(str(again)).model
    assert sum(p.numel() for p in m.parameters()) == rec["achieved"]["params"]


def test_dry_run_counts_the_teacher(capsys, stories_dir):
    base = ["run", "--model", str(stories_dir), "--method", "magnitude", "--target", "80%", "--dry-run", "--json",
            "--recover-tokens", "1000"]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)["memory"]
    assert main([*base, "--recover-mode", "kd"]) == 0
    kd = json.loads(capsys.readouterr().out)["memory"]
    assert kd["working_bytes"]["kd_teacher_weights"] == plain["weights_bytes"]
    assert kd["peak_bytes"] == plain["peak_bytes"] + plain["weights_bytes"]


def test_kd_between_transact_shots(stories_dir, monkeypatch):
    """`--recover-mode kd` without a budget after pruning: TransAct's interleaved training distills."""
    import compress.train.recovery as recovery
    from compress.pipeline.run import RunSpec, run

    calls = []
    real = recovery.distillation_loss

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(recovery, "distillation_loss", counting)
    spec = RunSpec(method="transact", target="60%", model=str(stories_dir), calib="tinystories", recover_mode="kd",
                   recover_settings={"seq_len": 64, "batch_size": 4},
                   settings={"shots": 2, "recover_tokens_per_shot": 512, "calib_samples": 8, "calib_seq_len": 64},
                   progress=False, evaluate=False)
    rec = run(spec, log=lambda m: None).record
    shots = rec["notes"]["shots"]
    assert [s["recovery"]["steps"] for s in shots] == [1, 3]  # the official ramp: 256, 768 tokens of 256 a step
    assert len(calls) == 4 and rec["recovery_result"] is None  # every step distilled, nothing after
    assert rec["recovery"] == {"tokens": 0, "mode": "kd", "settings": {"seq_len": 64, "batch_size": 4},
                               "teacher": "dense model"}


def test_api_takes_a_teacher_module_and_refuses_it_without_kd(stories_teacher):
    import compress
    from compress.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    r = compress.prune(copy.deepcopy(stories_teacher), tok, method="magnitude", target="80%", calib="tinystories",
                       evaluate=False, recover_tokens=256, recover_mode="kd", recover_settings={"seq_len": 64},
                       teacher=stories_teacher)
    assert r.record["recovery"]["teacher"] == "in-memory LlamaForCausalLM"
    assert r.record["recovery_result"]["steps"] == 1
    with pytest.raises(UsageError, match="teacher is the distillation teacher of recover_mode='kd'"):
        compress.prune(copy.deepcopy(stories_teacher), tok, method="magnitude", target="80%", evaluate=False,
                       teacher=stories_teacher)
