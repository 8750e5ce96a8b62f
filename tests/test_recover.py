"""Recovery training: full and LoRA on a token budget through HF Trainer."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from compress.calib.sources import CalibrationSource
from compress.errors import UsageError
from compress.testing import assets_dir, tiny_model, tiny_tokenizer
from compress.train.recovery import (
    DEFAULT_LORA_TARGETS,
    Recovery,
    RecoveryConfig,
    recover,
    resolve_lora_targets,
)
from conftest import needs_assets

pytestmark = pytest.mark.usefixtures("one_thread")


BUDGET = dict(tokens=4096, seq_len=64, batch_size=4)


@pytest.fixture(scope="module")
def source():
    if assets_dir() is None:
        pytest.skip("needs $COMPRESS_ASSETS")
    return CalibrationSource.from_spec("tinystories", tiny_tokenizer(), seed=0, max_chars=150_000)


def _eval_loss(model, blocks):
    with torch.no_grad():
        return float(model(input_ids=blocks, labels=blocks).loss)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _nparams(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------- config
def test_config_validation_and_defaults():
    cfg = RecoveryConfig(tokens=1000)
    assert cfg.mode == "full" and cfg.lr == 5e-5 and cfg.targets == list(DEFAULT_LORA_TARGETS)
    assert RecoveryConfig(tokens=1000, mode="lora").lr == 1e-4
    assert RecoveryConfig(tokens=1000, mode="lora", lr=3e-4).lr == 3e-4
    assert RecoveryConfig(tokens=1000, seq_len=10, batch_size=3, grad_accum=2).num_steps(world_size=2) == 9
    with pytest.raises(ValidationError):
        RecoveryConfig(tokens=0)
    with pytest.raises(ValidationError):
        RecoveryConfig(tokens=-5)
    with pytest.raises(ValidationError, match="extra"):
        RecoveryConfig(tokens=100, learning_rate=1e-3)
    with pytest.raises(ValidationError):
        RecoveryConfig(tokens=100, mode="qlora")
    with pytest.raises(ValidationError):
        RecoveryConfig(tokens=100, warmup_ratio=1.5)
    with pytest.raises(ValidationError):
        RecoveryConfig(tokens=100, lora_targets=[])


def test_lora_target_resolution():
    model = tiny_model("llama-gqa")
    names = resolve_lora_targets(model, DEFAULT_LORA_TARGETS)
    assert len(names) == 7 * 3 and "model.layers.0.self_attn.q_proj" in names
    # a non-Linear projection (low-rank factorisation) is replaced by the linears inside it
    a = model.model.layers[1].self_attn
    a.q_proj = nn.Sequential(nn.Linear(64, 4, bias=False), nn.Linear(4, 64, bias=False))
    names = resolve_lora_targets(model, ["q_proj"])
    assert "model.layers.1.self_attn.q_proj.0" in names and "model.layers.1.self_attn.q_proj.1" in names
    with pytest.raises(UsageError, match="matches no module"):
        resolve_lora_targets(model, ["qkv_proj"])
    with pytest.raises(UsageError, match="no nn.Linear"):
        resolve_lora_targets(model, ["act_fn"])


# ---------------------------------------------------------------------------- training
def test_full_recovery_lowers_loss(source):
    model = tiny_model("llama-gqa")
    model.config.use_cache = True
    held_out = source.with_seed(123).batches(8, 64)
    before = _eval_loss(model, held_out)
    res = recover(model, source, RecoveryConfig(**BUDGET, lr=2e-3, warmup_ratio=0.0), progress=False)
    assert res.model is model and res.steps == 16 and res.tokens_seen == 4096 and res.world_size == 1
    assert res.losses and res.losses[0][0] == 1 and res.wall_s > 0
    assert not res.model.training and res.model.config.use_cache is True
    after = _eval_loss(res.model, held_out)
    assert after < before - 0.3, (before, after)
    assert res.losses[-1][1] < res.losses[0][1]


@pytest.mark.parametrize("train_shortcuts", [False, True])
def test_full_recovery_keeps_slicegpt_shortcuts_frozen(source, train_shortcuts):
    """SliceGPT's residual rotations stay as they are unless asked (see shortcut_parameters)."""
    from compress import make_shortcut_layer
    from compress.train.recovery import shortcut_parameters

    model = tiny_model("llama-gqa")
    h = model.config.hidden_size
    with torch.no_grad():
        for layer in model.model.layers:
            make_shortcut_layer(layer, h, h, h)
            layer.attn_shortcut.weight.copy_(torch.eye(h))
            layer.mlp_shortcut.weight.copy_(torch.eye(h))
    shortcuts = {n for n, p in model.named_parameters() if any(p is q for q in shortcut_parameters(model))}
    assert len(shortcuts) == 2 * model.config.num_hidden_layers
    before = _state(model)
    res = recover(model, source, RecoveryConfig(tokens=512, seq_len=64, batch_size=4, lr=1e-3,
                                                train_shortcuts=train_shortcuts), progress=False)
    after = res.model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    n_shortcut = 2 * model.config.num_hidden_layers * h * h
    if train_shortcuts:
        assert shortcuts <= changed and res.trained_params == _nparams(model)
    else:
        assert not shortcuts & changed and res.trained_params == _nparams(model) - n_shortcut
        assert "model.layers.0.mlp.down_proj.weight" in changed
    assert res.summary()["trained_params"] == res.trained_params
    assert not any(p.requires_grad is False for p in res.model.parameters())  # flags restored


def test_lora_recovery_merges_back(source):
    model = tiny_model("llama-gqa")
    before = _state(model)
    n_before = _nparams(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    res = recover(model, source, RecoveryConfig(**BUDGET, mode="lora", lr=1e-3), progress=False)
    m = res.model
    assert type(m).__name__ == "LlamaForCausalLM"
    assert not any("lora" in n.lower() for n, _ in m.named_modules())
    assert not any(type(mod).__module__.startswith("peft") for mod in m.modules())
    assert _nparams(m) == n_before and set(_state(m)) == set(before)
    after = _state(m)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("q_proj" in k for k in changed) and any("down_proj" in k for k in changed)
    assert not any("norm" in k or "embed" in k for k in changed)  # only targeted linears move
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    assert not m.training


def test_same_seed_is_deterministic(source):
    cfg = RecoveryConfig(tokens=1024, seq_len=64, batch_size=4, lr=1e-3, seed=7)
    a = recover(tiny_model("llama-gqa"), source, cfg, progress=False).model
    b = recover(tiny_model("llama-gqa"), source, cfg, progress=False).model
    sa, sb = _state(a), _state(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = recover(tiny_model("llama-gqa"), source, cfg.model_copy(update={"seed": 8}), progress=False).model
    sc = _state(c)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_recovery_calls_continue_one_data_stream(source, monkeypatch):
    """Training between pruning shots sees fresh text each time (the official TransAct trainer streams
    its dataset across shots), and a resumed stream (``consumed`` set) picks up where it stopped."""
    seen: list[torch.Tensor] = []
    real = CalibrationSource.sequential_blocks

    def spy(self, n, seq_len, skip_tokens=0):
        out = real(self, n, seq_len, skip_tokens=skip_tokens)
        seen.append(out.clone())
        return out

    monkeypatch.setattr(CalibrationSource, "sequential_blocks", spy)
    rec = Recovery(source, RecoveryConfig(tokens=256, seq_len=64, batch_size=2, lr=1e-4), progress=False)
    model = tiny_model("llama-gqa")
    rec(model, tokens=256)
    assert rec.consumed == 256
    rec(model, tokens=128, lr=2e-4)
    assert rec.consumed == 384
    first, second = seen
    stream = real(source, 6, 64)  # the same stream in one piece
    assert torch.equal(first, stream[:4]) and torch.equal(second, stream[4:6])
    resumed = Recovery(source, rec.cfg, progress=False, consumed=256)
    resumed(tiny_model("llama-gqa"), tokens=128)
    assert torch.equal(seen[-1], second)


def _captured_training(source, cfg, overrides=None):
    """Run one tiny recovery and capture what the Trainer was configured with."""
    from transformers import TrainerCallback

    seen: dict = {}

    class Spy(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kw):
            seen["args"] = args
            seen["groups"] = [dict(g) for g in optimizer.param_groups]

        def on_step_end(self, args, state, control, lr_scheduler=None, **kw):
            seen.setdefault("lrs", []).append(lr_scheduler.get_last_lr()[0])

    rec = Recovery(source, cfg, progress=False)
    rec(tiny_model("llama-gqa"), tokens=cfg.tokens, callbacks=[Spy()], **({"settings": overrides} if overrides else {}))
    return seen


def test_optimizer_settings_reach_the_trainer(source):
    """adam_beta1/adam_beta2/weight_decay/lr_scheduler/warmup_ratio go into TrainingArguments and the
    optimizer; the defaults are AdamW (0.9, 0.999), no weight decay, cosine with 10 % warm-up."""
    cfg = RecoveryConfig(tokens=640, seq_len=32, batch_size=2, lr=1e-4)
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.weight_decay, cfg.lr_scheduler, cfg.warmup_ratio) == \
        (0.9, 0.999, 0.0, "cosine", 0.1)
    seen = _captured_training(source, cfg)
    a = seen["args"]
    assert (a.adam_beta1, a.adam_beta2, a.weight_decay, str(a.lr_scheduler_type.value)) == (0.9, 0.999, 0.0, "cosine")
    assert all(tuple(g["betas"]) == (0.9, 0.999) for g in seen["groups"])
    # the official TransAct optimizer: AdamW (0.9, 0.95); a weight decay and a constant schedule too
    official = cfg.model_copy(update={"adam_beta2": 0.95, "weight_decay": 0.1, "lr_scheduler": "constant",
                                      "warmup_ratio": 0.0})
    seen = _captured_training(source, official)
    a = seen["args"]
    assert (a.adam_beta1, a.adam_beta2, a.weight_decay, str(a.lr_scheduler_type.value)) == (0.9, 0.95, 0.1, "constant")
    assert all(tuple(g["betas"]) == (0.9, 0.95) for g in seen["groups"])
    assert {g["weight_decay"] for g in seen["groups"]} == {0.0, 0.1}  # the Trainer spares biases and norms
    assert seen["lrs"] == [1e-4] * len(seen["lrs"])
    with pytest.raises(ValidationError):
        RecoveryConfig(tokens=10, adam_beta2=1.0)


def test_recovery_call_overrides_settings_for_one_call(source):
    """``Recovery(...)(model, settings={...})`` overrides RecoveryConfig fields for that call only (how
    TransAct's shots train with the official beta2 = 0.95); unknown keys are refused in one line."""
    cfg = RecoveryConfig(tokens=320, seq_len=32, batch_size=2, lr=1e-4)
    seen = _captured_training(source, cfg, {"adam_beta2": 0.95, "weight_decay": 0.01})
    assert (seen["args"].adam_beta2, seen["args"].weight_decay) == (0.95, 0.01)
    rec = Recovery(source, cfg, progress=False)
    with pytest.raises(UsageError, match="adam_beta3"):
        rec(tiny_model("llama-gqa"), tokens=64, settings={"adam_beta3": 0.9})
    with pytest.raises(UsageError, match="adam_beta2"):
        rec(tiny_model("llama-gqa"), tokens=64, settings={"adam_beta2": 2.0})
    assert rec.cfg.adam_beta2 == 0.999 and rec.consumed == 0


def test_pruned_widths_and_lowrank_modules(source):
    """Layers of different widths and a non-Linear (factorised) projection train under LoRA."""
    model = tiny_model("llama-gqa")
    mlp = model.model.layers[1].mlp
    keep = torch.arange(40)
    for name in ("gate_proj", "up_proj"):
        old = getattr(mlp, name)
        new = nn.Linear(64, 40, bias=False)
        new.weight.data.copy_(old.weight.data[keep])
        setattr(mlp, name, new)
    down = nn.Linear(40, 64, bias=False)
    down.weight.data.copy_(mlp.down_proj.weight.data[:, keep])
    mlp.down_proj = down
    a = model.model.layers[2].self_attn
    a.o_proj = nn.Sequential(nn.Linear(64, 8, bias=False), nn.Linear(8, 64, bias=False))
    n_before = _nparams(model)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    res = Recovery(source, RecoveryConfig(tokens=10_000, seq_len=32, batch_size=2, mode="lora"), progress=False)(
        model, tokens=256
    )
    assert res.steps == 4
    assert _nparams(res.model) == n_before
    assert {k: v.shape for k, v in res.model.state_dict().items()} == shapes
    assert isinstance(res.model.model.layers[2].self_attn.o_proj, nn.Sequential)
    with pytest.raises(UsageError, match="matches no module"):
        recover(model, source, RecoveryConfig(tokens=64, seq_len=32, mode="lora", lora_targets=["wq"]))


@needs_assets
def test_run_records_the_recovery(tmp_path):
    """`compress run --recover-tokens`: the run record says what was trained, and the output reloads."""
    from transformers import AutoModelForCausalLM

    from compress.pipeline.run import RunSpec, run

    spec = RunSpec(method="magnitude", target="80%", model=str(assets_dir() / "models" / "stories260k"),
                   calib="tinystories", recover_tokens=512, recover_settings={"seq_len": 64, "batch_size": 4},
                   out=str(tmp_path / "out"), progress=False)
    rec = run(spec, log=lambda m: None).record
    assert rec["recovery"] == {"tokens": 512, "mode": "full", "settings": {"seq_len": 64, "batch_size": 4}}
    r = rec["recovery_result"]
    assert r["tokens"] == 512 and r["steps"] == 2 and r["trained_params"] == rec["achieved"]["params"]
    assert r["final_loss"] is not None and r["final_loss"] > 0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert sum(p.numel() for p in reloaded.parameters()) == rec["achieved"]["params"]
