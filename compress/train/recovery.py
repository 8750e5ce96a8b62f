"""Recovery training after pruning, on a token budget: full-parameter continued pre-training, LoRA, or
distillation from the dense model (``mode="kd"``).

Training goes through the Hugging Face ``Trainer`` (no hand-written loop), so the same call runs on
one CPU, one GPU, or several processes under ``accelerate launch`` (DDP, or FSDP/DeepSpeed through
the accelerate config). The data are consecutive token blocks of a :class:`CalibrationSource`
(``labels = input_ids``, the usual causal-LM objective).

The number of optimiser steps is ``ceil(tokens / (seq_len * batch_size * grad_accum * world_size))``,
so the budget is met or slightly exceeded; :attr:`RecoveryResult.tokens_seen` says by how much.

LoRA adapters are merged back into the base weights at the end (``merge_and_unload``): the
returned model has plain modules and the architecture of the input, ready for export.

Distillation (``mode="kd"``, every weight trained, as Minitron recovers its pruned widths) replaces the
LM loss by the KL divergence of the student's next-token distribution from the teacher's at a
temperature ``τ``, ``τ² · KL(p_teacher^τ ‖ p_student^τ)`` averaged over every position, optionally
mixed with the LM loss (``kd_lm_weight``) and, when student and teacher share the hidden size, a
hidden-state term (``kd_hidden_weight``: the mean squared error of the last hidden states, each
normalised by the teacher's RMS, so the weight is scale-free). The teacher — the dense model of the
same run, or another checkpoint of the same family and vocabulary — runs in ``eval()`` mode without
gradients, on the device the Trainer trains on.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch
from pydantic import ConfigDict, Field, model_validator
from torch import nn

from compress.calib.sources import CalibrationSource
from compress.errors import UsageError, one_line_validation
from compress.io.export import STOCK_ALTERNATIVES
from compress.io.limits import MAX_BATCH, MAX_RECOVER_TOKENS, MAX_SEED, MAX_SEQ_LEN
from compress.io.recipe import RECOVER_MODES
from compress.io.settings import BoundedSettings
from compress.train.distributed import load_full_state, meta_skeleton

T = TypeVar("T")


#: LLM-Pruner's official LoRA recovery setting: every attention and MLP projection.
DEFAULT_LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


#: Default learning rates when ``lr`` is not given: 5e-5 for full continued pre-training (TransAct's
#: setting), 1e-4 for LoRA (LLM-Pruner's setting).
DEFAULT_LR: dict[str, float] = {"full": 5e-5, "lora": 1e-4, "kd": 5e-5}

RecoverMode = Literal[RECOVER_MODES]  # type: ignore[valid-type]  # the recipe vocabulary, one place


class RecoveryConfig(BoundedSettings):
    """Recovery training settings. Unknown keys are rejected; numbers are bounded
    (:class:`compress.io.settings.BoundedSettings`: finite floats — lr=inf would train to NaN —, no booleans
    for numbers, integers within :mod:`compress.io.limits`)."""

    # no validate_assignment: _fill_defaults assigns lr after validation
    model_config = ConfigDict(extra="forbid", validate_assignment=False, allow_inf_nan=False)

    tokens: int = Field(gt=0, le=MAX_RECOVER_TOKENS, description="training token budget (all processes together)")
    mode: RecoverMode = Field("full", description="full: every weight, LM loss; lora: adapters merged back; "
                              "kd: every weight, distillation from the teacher (the dense model)")
    # >= 2: the LM loss of a sequence predicts its tokens 2..T, a 1-token sequence has none (loss 0.0)
    seq_len: int = Field(512, ge=2, le=MAX_SEQ_LEN)
    batch_size: int = Field(4, gt=0, le=MAX_BATCH, description="micro-batch per device")
    grad_accum: int = Field(1, gt=0, le=MAX_BATCH)
    lr: float | None = Field(None, gt=0, description="None: 5e-5 for full and kd, 1e-4 for lora")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2 (official TransAct: 0.95)")
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    lr_scheduler: str = Field("cosine", description="a transformers SchedulerType name (cosine, linear, constant, ...)")
    lora_r: int = Field(8, gt=0)
    lora_alpha: int = Field(16, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_targets: list[str] | None = Field(None, description=f"None: {', '.join(DEFAULT_LORA_TARGETS)}")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    bf16: bool = False
    max_grad_norm: float = Field(1.0, ge=0)
    logging_steps: int | None = Field(None, gt=0, description="None: about 25 log points per run")
    train_shortcuts: bool = Field(False, description="full mode: also train SliceGPT's residual shortcut rotations")
    kd_temperature: float = Field(1.0, gt=0, description="kd: softmax temperature of teacher and student")
    kd_lm_weight: float = Field(0.0, ge=0, le=1, description="kd: weight of the LM loss; (1 - it) weighs the KL term")
    kd_hidden_weight: float = Field(0.0, ge=0, description="kd: weight of the last-hidden-state term (same hidden size)")

    @model_validator(mode="after")
    def _fill_defaults(self) -> RecoveryConfig:
        if self.lr is None:
            self.lr = DEFAULT_LR[self.mode]
        if self.lora_targets is not None and not self.lora_targets:
            raise ValueError("lora_targets is empty; leave it unset for the default projections")
        kd_set = {k for k in ("kd_temperature", "kd_lm_weight", "kd_hidden_weight")
                  if getattr(self, k) != type(self).model_fields[k].default}
        if kd_set and self.mode != "kd":
            raise ValueError(f"{', '.join(sorted(kd_set))} only apply to distillation; use mode kd (--recover-mode kd)")
        return self

    @property
    def targets(self) -> list[str]:
        return list(self.lora_targets) if self.lora_targets is not None else list(DEFAULT_LORA_TARGETS)

    def tokens_per_step(self, world_size: int = 1) -> int:
        return self.seq_len * self.batch_size * self.grad_accum * world_size

    def num_steps(self, world_size: int = 1) -> int:
        return math.ceil(self.tokens / self.tokens_per_step(world_size))


@dataclass
class RecoveryResult:
    """What :func:`recover` returns. ``losses`` are ``(step, training loss)`` as logged."""

    model: nn.Module
    tokens_seen: int
    steps: int
    losses: list[tuple[int, float]] = field(default_factory=list)
    wall_s: float = 0.0
    world_size: int = 1
    lr: float = 0.0
    mode: str = "full"
    trained_params: int = 0  # parameters the optimizer updated (LoRA: the adapters)
    parallelism: str = "none"  # "none" (one process), "ddp", "fsdp" or "deepspeed": how the Trainer ran the model

    def summary(self) -> dict[str, Any]:
        """JSON-friendly record (no model)."""
        return {
            "mode": self.mode,
            "tokens_seen": self.tokens_seen,
            "steps": self.steps,
            "world_size": self.world_size,
            "parallelism": self.parallelism,
            "lr": self.lr,
            "trained_params": self.trained_params,
            "first_loss": self.losses[0][1] if self.losses else None,
            "last_loss": self.losses[-1][1] if self.losses else None,
            "wall_s": round(self.wall_s, 3),
        }


class _BlockDataset(torch.utils.data.Dataset):
    """Token blocks ``[N, T]`` as causal-LM examples (labels = input_ids)."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return int(self.blocks.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[i]
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def resolve_lora_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Full names of the ``nn.Linear`` modules LoRA should wrap.

    A target matches a module whose qualified name equals it or ends with ``"." + target``. A
    matched module that is not an ``nn.Linear`` (e.g. a low-rank factorised projection) is
    replaced by the ``nn.Linear`` modules inside it. Raises :class:`UsageError` when a target
    matches nothing or a matched module contains no linear layer.
    """
    named = dict(model.named_modules())
    out: list[str] = []
    for t in targets:
        hits = [n for n in named if n == t or n.endswith("." + t)]
        if not hits:
            raise UsageError(
                f"LoRA target {t!r} matches no module of {type(model).__name__}; "
                "set lora_targets to module-name suffixes such as q_proj, down_proj"
            )
        for n in hits:
            mod = named[n]
            if isinstance(mod, nn.Linear):
                out.append(n)
                continue
            inner = [f"{n}.{c}" for c, m in mod.named_modules() if c and isinstance(m, nn.Linear)]
            if not inner:
                raise UsageError(
                    f"LoRA target {n!r} is a {type(mod).__name__} with no nn.Linear inside; "
                    "drop it from lora_targets or use mode='full'"
                )
            out.extend(inner)
    return sorted(set(out))


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft 0.21 calls a transformers API deprecated in 5.x; a warning nobody can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


#: Families whose layers compute the same function: compress writes e.g. a Llama whose head count does
#: not divide its hidden size as the stock Mistral class (compress.io.export.STOCK_ALTERNATIVES), so
#: such a student distills from its Llama teacher.
_SAME_FAMILY = {alt: family for family, (alt, _, _) in STOCK_ALTERNATIVES.items()}


def _family(config: Any) -> str | None:
    """The model family a config describes (a compress-format config names its base family)."""
    fam = getattr(config, "base_model_type", None) or getattr(config, "model_type", None)
    return _SAME_FAMILY.get(fam, fam)


def check_teacher_tokenizer(student_tok: Any, teacher_tok: Any) -> None:
    """Refuse a teacher whose tokenizer maps text to other ids (same vocabulary size is not enough:
    e.g. Llama-2 and Mistral-7B both have 32,000 tokens)."""
    if student_tok is None or teacher_tok is None:
        return
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        raise UsageError("the distillation teacher's tokenizer differs from the model's (other token ids); pass "
                         "--teacher with the dense model this one was pruned from")


def check_teacher(student_config: Any, teacher_config: Any, cfg: RecoveryConfig | None = None,
                  *, student_hidden: int | None = None, teacher_hidden: int | None = None) -> None:
    """Refuse a distillation teacher the student cannot learn from, in one line (configs only, so the
    check runs before any weight is loaded): another family, another vocabulary, or — with a
    hidden-state term — another hidden size. ``*_hidden`` override the configs' ``hidden_size`` (a
    sliced residual stream is narrower than its config's)."""
    s_fam, t_fam = _family(student_config), _family(teacher_config)
    if s_fam != t_fam:
        raise UsageError(f"the distillation teacher is a {t_fam} model and the student a {s_fam} model; "
                         "pass --teacher with the dense model this one was pruned from")
    s_vocab, t_vocab = getattr(student_config, "vocab_size", None), getattr(teacher_config, "vocab_size", None)
    if s_vocab != t_vocab:
        raise UsageError(f"the distillation teacher has a vocabulary of {t_vocab} tokens and the student {s_vocab}; "
                         "KD compares next-token distributions: pass --teacher with the same tokenizer")
    if cfg is not None and cfg.kd_hidden_weight > 0:
        sh = student_hidden or getattr(student_config, "hidden_size", None)
        th = teacher_hidden or getattr(teacher_config, "hidden_size", None)
        if sh != th:
            raise UsageError(f"kd_hidden_weight compares hidden states, but the student's are {sh} wide and the "
                             f"teacher's {th} (a sliced residual stream); set kd_hidden_weight=0")


def distillation_loss(student: Any, teacher: Any, labels: torch.Tensor | None, cfg: RecoveryConfig) -> torch.Tensor:
    """``(1 - w_lm) · τ² · KL(teacher ‖ student) + w_lm · LM + w_h · hidden`` for one batch (a mean over
    its positions); ``student`` / ``teacher`` are model outputs (``logits``, ``hidden_states`` when the
    hidden term is on). The KL is taken at every position: the teacher's whole next-token
    distribution is the target, not only the observed next token."""
    import torch.nn.functional as F

    tau = cfg.kd_temperature
    s_logp = F.log_softmax(student.logits.float() / tau, dim=-1)
    t_logp = F.log_softmax(teacher.logits.float() / tau, dim=-1)
    kl = F.kl_div(s_logp.flatten(0, -2), t_logp.flatten(0, -2), log_target=True, reduction="batchmean")
    loss = (1.0 - cfg.kd_lm_weight) * kl * tau * tau
    if cfg.kd_lm_weight > 0:
        if labels is None:  # pragma: no cover - the block dataset always has labels
            raise ValueError("kd_lm_weight > 0 needs labels")
        logits = student.logits[:, :-1].float()
        loss = loss + cfg.kd_lm_weight * F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten())
    if cfg.kd_hidden_weight > 0:
        s_h, t_h = student.hidden_states[-1].float(), teacher.hidden_states[-1].float()
        scale = t_h.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-6)
        loss = loss + cfg.kd_hidden_weight * ((s_h - t_h) / scale).pow(2).mean()
    return loss


def _kd_trainer_class() -> type:
    """A ``Trainer`` whose loss is :func:`distillation_loss` against ``self.teacher`` (built lazily:
    transformers is imported only when recovery runs)."""
    from transformers import Trainer

    class KDTrainer(Trainer):
        loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides by the accumulation steps

        def __init__(self, *args: Any, teacher: nn.Module, kd: RecoveryConfig, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.kd = kd
            self.teacher = teacher.to(self.args.device).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ARG002
            hidden = self.kd.kd_hidden_weight > 0
            feed = {k: v for k, v in inputs.items() if k != "labels"}
            with torch.no_grad():
                t_out = self.teacher(**feed, output_hidden_states=hidden, use_cache=False)
            s_out = model(**feed, output_hidden_states=hidden, use_cache=False)
            loss = distillation_loss(s_out, t_out, inputs.get("labels"), self.kd)
            return (loss, s_out) if return_outputs else loss

    return KDTrainer


def _hidden_width(model: nn.Module) -> int | None:
    """The width of the last hidden state (the final norm's), which a sliced model narrows."""
    norm = getattr(getattr(model, "model", None), "norm", None)
    weight = getattr(norm, "weight", None)
    return int(weight.shape[0]) if weight is not None else None


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def recover(
    model: nn.Module,
    source: CalibrationSource,
    cfg: RecoveryConfig,
    *,
    output_dir: str | None = None,
    callbacks: Sequence[Any] | None = None,
    progress: bool = True,
    skip_tokens: int = 0,
    teacher: nn.Module | None = None,
) -> RecoveryResult:
    """Train ``model`` on ``cfg.tokens`` tokens of ``source`` and return it (trained in place).

    ``skip_tokens``: tokens of the source's training stream already consumed by earlier calls
    (:class:`Recovery` tracks it), so training between pruning shots sees fresh text each time, as
    the official TransAct data stream does.

    ``mode="full"`` trains every parameter; ``mode="lora"`` trains LoRA adapters on
    ``cfg.targets`` and merges them into the weights. The model ends in ``eval()`` mode with its
    ``config.use_cache`` and parameters' ``requires_grad`` flags as they were, on the device the
    Trainer chose (the GPU when there is one). ``output_dir`` holds Trainer scratch files (nothing
    is saved); a temporary directory, removed afterwards, when None. ``callbacks`` are extra
    ``TrainerCallback`` objects. ``progress=False`` hides the progress bar and log lines.
    ``teacher``: the distillation teacher of ``mode="kd"`` (required there; moved to the training
    device, never trained).
    """
    t0 = time.perf_counter()
    from transformers import Trainer, TrainingArguments, default_data_collator, set_seed
    from transformers.trainer_callback import PrinterCallback

    if not isinstance(cfg, RecoveryConfig):
        raise UsageError(f"cfg must be a RecoveryConfig, got {type(cfg).__name__}")
    if cfg.mode == "kd":
        if teacher is None:
            raise UsageError("recovery mode kd distills from a teacher: pass the dense model (teacher=..., --teacher)")
        check_teacher(model.config, teacher.config, cfg, student_hidden=_hidden_width(model),
                      teacher_hidden=_hidden_width(teacher))
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    n_params_before = _num_params(model)
    lora_targets = resolve_lora_targets(model, cfg.targets) if cfg.mode == "lora" else []
    tmp = None
    if output_dir is None:
        tmp = tempfile.mkdtemp(prefix="compress-recover-")
        output_dir = tmp

    def make_args(max_steps: int, logging_steps: int) -> TrainingArguments:
        return TrainingArguments(
            output_dir=output_dir,
            max_steps=max_steps,
            per_device_train_batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.grad_accum,
            learning_rate=cfg.lr,
            weight_decay=cfg.weight_decay,
            adam_beta1=cfg.adam_beta1,
            adam_beta2=cfg.adam_beta2,
            warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio of the total steps
            lr_scheduler_type=cfg.lr_scheduler,
            max_grad_norm=cfg.max_grad_norm,
            logging_steps=logging_steps,
            logging_first_step=True,
            save_strategy="no",
            report_to=[],
            seed=cfg.seed,
            data_seed=cfg.seed,
            bf16=cfg.bf16,
            use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0,
            remove_unused_columns=False,
            ddp_find_unused_parameters=False,  # every trained parameter is used in every step
            disable_tqdm=not progress,
        )

    train_model: nn.Module = model
    merged = False
    try:
        # The world size is only known once the arguments have initialised the (possibly
        # distributed) state, so build them once to read it, then again with the real step count.
        try:
            world = int(make_args(1, 1).world_size)
            steps = cfg.num_steps(world)
            logging_steps = cfg.logging_steps or max(1, steps // 25)
            args = make_args(steps, logging_steps)
        except ValueError as e:  # e.g. an unknown lr_scheduler name
            raise UsageError(f"invalid recovery setting: {' '.join(str(e).split())[:200]}") from e

        n_blocks = steps * cfg.batch_size * cfg.grad_accum * world
        blocks = source.sequential_blocks(n_blocks, cfg.seq_len, skip_tokens=skip_tokens)

        set_seed(cfg.seed)  # LoRA's A matrices are drawn at wrapping time
        if config is not None and use_cache is not None:
            config.use_cache = False
        if cfg.mode in ("full", "kd"):
            frozen = set() if cfg.train_shortcuts else {id(p) for p in shortcut_parameters(model)}
            for p in model.parameters():
                p.requires_grad_(id(p) not in frozen)
        else:
            from peft import LoraConfig, get_peft_model

            lcfg = LoraConfig(
                r=cfg.lora_r,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout,
                target_modules=lora_targets,
                bias="none",
                task_type="CAUSAL_LM",
            )
            with _quiet_peft():
                train_model = get_peft_model(model, lcfg)

        trained = sum(p.numel() for p in train_model.parameters() if p.requires_grad)
        trainer_cls, extra = (Trainer, {}) if cfg.mode != "kd" else (_kd_trainer_class(), {"teacher": teacher, "kd": cfg})
        trainer = trainer_cls(
            model=train_model,
            args=args,
            train_dataset=_BlockDataset(blocks),
            data_collator=default_data_collator,
            callbacks=list(callbacks or []),
            **extra,
        )
        if not progress:
            trainer.remove_callback(PrinterCallback)
        # FSDP (accelerate config) shards the parameters in place; keep a weightless copy of the
        # module tree to rebuild a plain model from the gathered full weights afterwards.
        fsdp = bool(getattr(trainer, "is_fsdp_enabled", False))
        deepspeed = bool(getattr(trainer, "is_deepspeed_enabled", False))
        parallelism = "fsdp" if fsdp else "deepspeed" if deepspeed else "ddp" if world > 1 else "none"
        if not fsdp and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            # accelerate 1.15 keeps its FSDP plugin only on accelerators (MULTI_GPU, XPU, ...): on CPU
            # (MULTI_CPU) it drops it without a word and the Trainer runs plain DDP
            warnings.warn("the accelerate config asks for FSDP, but accelerate does not shard on CPU: "
                          "training runs as DDP (every process holds the whole model)", stacklevel=1)
        skeleton = meta_skeleton(train_model) if fsdp else None
        with _quiet_peft():
            trainer.train()
        if skeleton is not None:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            # a collective: every process gathers the full weights, as after DDP each holds them
            full = get_model_state_dict(trainer.model_wrapped, options=StateDictOptions(full_state_dict=True))
            rebuilt = load_full_state(skeleton, full)
            model = rebuilt if train_model is model else model
            train_model = rebuilt
        losses = [
            (int(r["step"]), float(r["loss"])) for r in trainer.state.log_history if "loss" in r and "step" in r
        ]
        done_steps = int(trainer.state.global_step)

        if cfg.mode == "lora":
            with _quiet_peft():
                model = train_model.merge_and_unload()
            merged = True
            if _num_params(model) != n_params_before:  # pragma: no cover - peft contract
                raise RuntimeError("LoRA merge changed the parameter count; peft did not unload cleanly")
    finally:
        if train_model is not model and not merged:
            model = train_model.unload()  # failed mid-way: drop the adapters, keep the base weights
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if config is not None and use_cache is not None:
            config.use_cache = use_cache
        for n, p in model.named_parameters():
            if n in grad_flags:
                p.requires_grad_(grad_flags[n])
        model.eval()

    return RecoveryResult(
        model=model,
        tokens_seen=done_steps * cfg.tokens_per_step(world),
        steps=done_steps,
        losses=losses,
        wall_s=time.perf_counter() - t0,
        world_size=world,
        parallelism=parallelism,
        lr=float(cfg.lr),
        mode=cfg.mode,
        trained_params=trained,
    )


@dataclass
class Recovery:
    """A recovery recipe bound to its data, for methods that train between pruning steps.

    ``Recovery(source, cfg, teacher=dense)(model, tokens=N)`` runs :func:`recover` with the budget replaced by
    ``N`` (e.g. TransAct splits its budget over the shots) and, with ``lr``, the learning rate;
    ``settings`` overrides any other :class:`RecoveryConfig` field for that call only (e.g. TransAct's
    official ``{"adam_beta2": 0.95}`` between shots), validated like the recipe's.
    Successive calls continue one data stream: ``consumed`` counts the tokens trained on so far
    (all processes together), and the next call starts after them. Set it to resume a stream.
    """

    source: CalibrationSource
    cfg: RecoveryConfig
    output_dir: str | None = None
    progress: bool = True
    consumed: int = 0
    teacher: nn.Module | None = None  # mode kd: the dense model (kept on CPU between calls)

    def __call__(self, model: nn.Module, *, tokens: int | None = None, lr: float | None = None,
                 callbacks: Sequence[Any] | None = None, settings: dict[str, Any] | None = None) -> RecoveryResult:
        update: dict[str, Any] = {}
        if tokens is not None:
            update["tokens"] = tokens
        if lr is not None:
            update["lr"] = lr
        cfg = self.cfg.model_copy(update=update) if update else self.cfg
        if settings:
            from pydantic import ValidationError

            try:
                cfg = RecoveryConfig.model_validate({**cfg.model_dump(), **dict(settings)})
            except ValidationError as e:
                fields = ", ".join(RecoveryConfig.model_fields)
                raise UsageError(f"bad recovery settings: {one_line_validation(e, 'recovery')} "
                                 f"(valid keys: {fields})") from None
        if cfg.tokens <= 0:
            raise UsageError(f"recovery token budget must be positive, got {cfg.tokens}")
        result = recover(model, self.source, cfg, output_dir=self.output_dir, callbacks=callbacks,
                         progress=self.progress, skip_tokens=self.consumed,
                         teacher=self.teacher if cfg.mode == "kd" else None)
        self.consumed += result.tokens_seen
        return result


def shortcut_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The weights of SliceGPT's residual shortcuts (``attn_shortcut`` / ``mlp_shortcut`` of a layer).

    Full recovery keeps them frozen unless ``train_shortcuts``: they are the change of basis
    ``Q_l^T Q_(l+1)`` between layers, and the residual stream passes through two of them per layer, so
    AdamW's first, sign-like steps compound along the whole depth. On SliceGPT SmolLM2-135M at 80 %, one
    step at 5e-5 raised the loss of the very batch it was computed on from 6.19 to 6.95 with them
    trained, and lowered it to 5.79 with them frozen. SliceGPT's own recovery fine-tuning (LoRA on the
    attention and MLP projections) never trains them either.
    """
    out: list[nn.Parameter] = []
    for module in model.modules():
        for name in ("attn_shortcut", "mlp_shortcut"):
            sc = getattr(module, name, None)
            if isinstance(sc, nn.Module):
                out.extend(sc.parameters())
    return out
