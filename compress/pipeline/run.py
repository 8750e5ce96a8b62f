"""One pruning run, start to finish: the engine behind ``compress run`` and the benchmark cells.

Order matters for the user: everything that can be refused is refused by
:func:`compress.pipeline.preflight.preflight` before any weight is loaded, and nothing is written
unless the run succeeds — except the checkpoints of an iterative method, kept in a hidden sibling of
``--out`` (:func:`state_dir_for`) so that ``--resume`` continues an interrupted run; they are removed
once the output is saved.

How data flows: the target is parsed once, where it enters (:class:`RunSpec`); the method draws its
calibration blocks through the context (``ctx.draw``), which records them, and the run's
``calibration_hash`` is of exactly those blocks; the method returns a plan (kept indices per layer,
in the dense numbering), whose hash and footprint go into the record.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compress.assets import display_path
from compress.errors import NumericalError, PluginError, TargetError, UsageError
from compress.model.footprint import Footprint, footprint
from compress.pipeline.preflight import DEFAULT_CALIB, Checked, meta_model, preflight
from compress.pipeline.record import empty_run_record, jsonable, versions
from compress.plugins import get_registry
from compress.probes import track_peak_rss
from compress.pruner import PruneContext, Pruner
from compress.target import Target

__all__ = ["DEFAULT_CALIB", "RunResult", "RunSpec", "check_finite_weights", "dry_run", "meta_model", "run", "state_dir_for"]


@dataclass
class RunSpec:
    """What the user asked for (CLI flags, recipe, a benchmark cell, the Python API).

    ``target`` is parsed here, once: a string becomes a :class:`~compress.target.Target` (a bad one is
    a one-line :class:`~compress.errors.TargetError`), and everything downstream uses the object."""

    method: str
    target: Target | str
    model: str | None = None
    out: str | None = None
    seed: int = 0
    calib: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = "auto"  # the source's own (compress.io.loading.source_dtype); None: float32
    device: str = "cpu"
    dry_run: bool = False
    overwrite: bool = False
    recover_tokens: int = 0
    recover_mode: str = "full"
    recover_settings: dict[str, Any] = field(default_factory=dict)
    teacher: str | None = None  # recover_mode kd: the teacher checkpoint; None: a copy of the dense model
    trust_remote_code: bool = False
    seq_len_flops: int = 2048
    progress: bool = True
    resume: bool = False  # continue an interrupted run from its checkpoint (iterative methods)
    # calibrate one decoder layer at a time (compress.calib.layerwise); None = on when the weights
    # exceed compress.calib.layerwise.LAYERWISE_AUTO_BYTES (4 GiB). Layer-wise, the weights stay in CPU
    # RAM and each layer visits ``device`` in turn; ``offload_dir`` caches the activations in files there.
    layerwise: bool | None = None
    offload_dir: str | None = None
    # read each decoder layer from the safetensors files only when layer-wise calibration visits it
    # (compress.io.streaming): peak host memory ≈ one dense layer + the pruned model + activations,
    # not the dense model. Implies layer-wise; for methods with Capabilities.streams_weights.
    stream_weights: bool = False
    evaluate: bool = True  # quality before -> after on a held-out slice (compress run --no-eval: False)
    recipe: str | None = None  # the recipe file the run came from: an input, kept apart from --out

    def __post_init__(self) -> None:
        self.target = Target.parse(self.target)
        from compress.io.limits import MAX_SEED

        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise UsageError(f"seed {self.seed!r} must be an integer in 0..{MAX_SEED} (2**32 - 1); use a smaller seed")


@dataclass
class RunResult:
    """What a run produced: the pruned model (and its tokenizer), the plan, both footprints, and the
    JSON record (schema :data:`compress.pipeline.record.SCHEMA`, also written as ``compress_run.json``)."""

    model: torch.nn.Module
    tokenizer: Any
    plan: dict[str, Any]
    dense: Footprint
    achieved: Footprint
    record: dict[str, Any]
    export_kind: str = "auto"  # what the method asked for: auto / stock / compress

    @property
    def export(self) -> dict[str, Any] | None:
        """``{kind, reason, path}`` of the saved folder, None when nothing was saved yet."""
        return self.record.get("export")

    @property
    def quality(self) -> dict[str, Any] | None:
        """Perplexity before -> after on the held-out slice (None when not measured)."""
        return self.record.get("quality")

    def save(self, path: str | Path, *, overwrite: bool = False) -> dict[str, Any]:
        """Write the model folder exactly as ``compress run --out`` does (weights, tokenizer, plan,
        record, resolved recipe, model card), atomically; returns ``{path, kind, reason, ...}``."""
        from compress.io.export import check_output_dir, export_model

        model = self.record.get("model")
        source = model.get("source") if isinstance(model, dict) else None  # never over the model it came from
        out = check_output_dir(path, overwrite, inputs=[("the model folder", source),
                                                        ("--calib", self.record.get("calib"))])
        rec = self.record
        plan_doc = {"method": rec["method"], "target": rec["target"], "seed": rec["seed"], "plan": self.plan}
        info = export_model(self.model, self.tokenizer, out, kind=self.export_kind, plan=plan_doc, record=rec,
                            overwrite=overwrite)
        rec["export"] = info
        rec["weights_sha256"] = info["weights_sha256"]
        return info


def check_finite_weights(model: torch.nn.Module, when: str) -> None:
    for name, p in model.named_parameters():
        if p.is_floating_point() and not p.is_meta and not torch.isfinite(p).all():
            raise NumericalError(f"non-finite values in {name} {when}; check the input model / method settings")


def _goal_check(target: Target, dense: Footprint, achieved: Footprint, method: str) -> None:
    goal = target.goal(dense.of(target.metric))
    got = achieved.of(target.metric)
    if got > goal * (1 + 1e-9):
        raise TargetError(f"method {method} ended above its target: {target.metric} {got:.6g} > goal {goal:.6g}")


STATE_SUFFIX = ".compress-state"


def state_dir_for(out: Path) -> Path:
    """Where a run writing ``out`` keeps its checkpoints: a hidden sibling, removed once ``out`` is saved."""
    return out.parent / f".{out.name}{STATE_SUFFIX}"


def run_inputs(spec: RunSpec) -> list[tuple[str, str | None]]:
    """What a run reads from disk, which its output (and checkpoint folder) must stay apart from."""
    model = spec.model
    if model is None:
        from compress.io.loading import default_model

        try:
            model = default_model()
        except UsageError:  # refused later, where the model is needed
            model = None
    # not --offload-dir: a scratch folder (compress writes and removes only its own subfolder there)
    return [("the model folder", model), ("--teacher", spec.teacher), ("--calib", spec.calib),
            ("the recipe file", spec.recipe)]


def check_run_output(spec: RunSpec) -> None:
    """Refuse an ``--out`` (or its checkpoint folder) that overlaps an input, or an existing folder
    compress did not write, before anything else happens (:mod:`compress.io.outpath`)."""
    from compress.io.outpath import check_apart, check_output_dir

    if not spec.out:
        return
    inputs = run_inputs(spec)
    out = check_output_dir(spec.out, spec.overwrite, inputs=inputs)
    check_apart(state_dir_for(out), inputs, option="the checkpoint folder of --out")


def run_key(spec: RunSpec, pruner: Pruner, source: str) -> str:
    """Hash of everything that determines a run's result: a checkpoint resumes only the run that wrote it."""
    p = Path(source).expanduser()
    doc = {
        "model": str(p.resolve()) if p.exists() else source, "method": pruner.name,
        "config": pruner.config.model_dump(mode="json"), "target": str(spec.target), "seed": spec.seed,
        "calib": spec.calib or DEFAULT_CALIB, "dtype": spec.dtype, "device": spec.device,
        "recover": [spec.recover_tokens, spec.recover_mode, spec.recover_settings, spec.teacher],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _resume_state(state_dir: Path, key: str, spec: RunSpec, log) -> bool:
    """Decide what to do with a checkpoint left by an interrupted run, before any work.

    Returns True when the state folder must be discarded before pruning (``--overwrite``)."""
    from compress.io.checkpoint import read_checkpoint

    try:
        ckpt = read_checkpoint(state_dir)
    except UsageError:
        if spec.overwrite:
            return True
        raise
    if ckpt is None:
        if spec.resume:
            log(f"--resume: no interrupted run in {state_dir}; starting from the beginning")
        return False
    if spec.resume and ckpt.key == key:
        log(f"resuming the interrupted run from {ckpt.path}")
        return False
    if spec.overwrite:
        return True
    if spec.resume:
        raise UsageError(f"the interrupted run in {state_dir} had other settings (model, method, target, seed, "
                         "calibration or dtype); repeat its command with --resume, or pass --overwrite to discard it")
    raise UsageError(f"an interrupted run left its checkpoint in {state_dir}; pass --resume to continue it or "
                     "--overwrite to start over")


def _resumed_checkpoint(state_dir: Path | None, key: str) -> Path | None:
    """The checkpoint a ``--resume`` run continues from (already checked by :func:`_resume_state`)."""
    from compress.io.checkpoint import read_checkpoint

    ckpt = read_checkpoint(state_dir) if state_dir is not None else None
    return ckpt.path if ckpt is not None and ckpt.key == key else None


def _preflight(spec: RunSpec, *, dry: bool = False) -> Checked:
    return preflight(
        method=spec.method, settings=spec.settings, target=spec.target, model=spec.model,
        out=None if dry else spec.out, overwrite=spec.overwrite, device=spec.device, dtype=spec.dtype,
        trust_remote_code=spec.trust_remote_code, recover_tokens=spec.recover_tokens,
        recover_mode=spec.recover_mode, recover_settings=spec.recover_settings, teacher=spec.teacher, seed=spec.seed,
        calib=spec.calib, layerwise=spec.layerwise, offload_dir=spec.offload_dir, read_calibration=not dry,
    )


#: Why a method without ``Capabilities.streams_weights`` cannot stream, where it is known.
_NO_STREAM_WHY = {
    "llm_pruner": "its Taylor scores rank every layer's groups together and its layer-wise backward "
                  "revisits the layers, so it needs every layer's weights at once",
}


def check_stream_weights(spec: RunSpec, pruner: Pruner, recovery: Any = None, *, source: str | None = None,
                         dry: bool = False) -> None:
    """Refuse ``--stream-weights`` where it cannot work, in one line, before any weight is read: with
    ``--no-layerwise``, for a method that needs the whole model (no ``Capabilities.streams_weights``),
    for distillation from a copy of the dense model, and (not for a dry run) for a source that is not
    a local safetensors folder of a stock model (:func:`compress.io.streaming.can_stream`)."""
    if not spec.stream_weights:
        return
    if spec.layerwise is False:
        raise UsageError("--stream-weights reads each layer as layer-wise calibration visits it; drop --no-layerwise "
                         "or --stream-weights")
    if not pruner.capabilities.streams_weights:
        why = _NO_STREAM_WHY.get(pruner.name, "it needs the whole model's weights at once")
        raise UsageError(f"method {pruner.name} cannot stream weights: {why}; drop --stream-weights")
    if recovery is not None and getattr(recovery, "mode", None) == "kd" and spec.teacher is None:
        raise UsageError("--recover-mode kd distills from a copy of the dense model, which streaming never holds; "
                         "pass --teacher DENSE_MODEL or drop --stream-weights")
    if not dry:
        from compress.io.streaming import can_stream

        why = can_stream(source or spec.model)
        if why is not None:
            raise UsageError(f"--stream-weights needs a local safetensors folder of a stock model: {why}; drop "
                             "--stream-weights (or convert the model once with save_pretrained)")


def dry_run(spec: RunSpec, log=print) -> dict[str, Any]:
    """Plan shapes on the meta device: no weights are loaded or allocated. Returns the plan summary."""
    from compress.calib.layerwise import resolve_layerwise
    from compress.io.export import stock_expressible
    from compress.model.memory import MemoryModel, estimate_peak_memory

    checked = _preflight(spec, dry=True)
    pruner, target, shapes = checked.pruner, checked.target, checked.shapes
    assert pruner is not None and target is not None and shapes is not None
    registry = get_registry()
    model, dense = shapes.model, shapes.dense
    check_stream_weights(spec, pruner, checked.recovery, dry=True)
    layerwise = spec.stream_weights or resolve_layerwise(checked.layerwise_forced, model)
    teacher_bytes = None
    if checked.teacher is not None and checked.recovery is not None and checked.recovery.mode == "kd":
        from compress.model.footprint import model_bytes

        teacher_bytes = model_bytes(meta_model(checked.teacher, dtype=spec.dtype,
                                               trust_remote_code=spec.trust_remote_code).model)
    memory = estimate_peak_memory(pruner, model, target, layerwise=layerwise, arch=shapes.arch,
                                  recovery=checked.recovery, teacher_bytes=teacher_bytes)
    dense_layer = MemoryModel(model, arch=shapes.arch).layer_bytes if spec.stream_weights else 0
    with registry.reported(pruner.name, "plan_shapes"):
        planned = pruner.plan_shapes(model, target)
    if spec.stream_weights:  # the weights in memory: the pruned model + the dense layer being read
        from compress.model.footprint import model_bytes

        memory = memory.streamed(pruned_bytes=model_bytes(model), dense_layer_bytes=dense_layer)
    arch = registry.adapter_for(model)
    after = footprint(model, seq_len=spec.seq_len_flops, arch=arch)
    _goal_check(target, dense, after, pruner.name)
    stock, why = stock_expressible(model, arch)
    return {
        "dry_run": True,
        "export": {"kind": "stock" if stock else "compress", "reason": why, "path": None},
        "model": checked.source,
        "method": pruner.name,
        "target": str(target),
        "plan": planned,
        "dense": dense.to_dict(),
        "achieved": after.to_dict(),
        "ratios": after.ratios(dense),
        "memory": memory.to_dict(),
        "layers_after": after.layers[:1] if len({json.dumps(x, sort_keys=True) for x in after.layers}) == 1
        else after.layers,
    }


def run(spec: RunSpec, log=print) -> RunResult:
    """Prune (and optionally recover and export) a model.

    Under ``accelerate launch`` (``WORLD_SIZE`` > 1) with ``--recover-tokens``, only rank 0 loads the
    dense model and prunes; the other processes train from the pruned model it stages
    (:mod:`compress.pipeline.handoff`, which says why)."""
    from compress.calib.layerwise import resolve_layerwise
    from compress.io.loading import load_model
    from compress.pipeline.handoff import PRUNE_ONCE, GuardedRecovery, Handoff, launch_from_env, launch_mode

    t_start = time.perf_counter()
    if spec.dry_run:
        raise UsageError("a dry run plans shapes only: call compress.pipeline.run.dry_run (compress run --dry-run)")
    registry = get_registry()
    target: Target = spec.target  # type: ignore[assignment]  # parsed in RunSpec
    if spec.resume and not spec.out:
        raise UsageError("--resume continues an interrupted run into its --out folder; give the same --out")
    launch = launch_from_env()
    check_run_output(spec)
    checked = _preflight(spec)
    pruner = checked.pruner
    assert pruner is not None
    out = checked.out
    mode = launch_mode(launch, pruner, spec.recover_tokens) if launch is not None else None
    if mode == PRUNE_ONCE and out is not None:
        from compress.io.outpath import check_apart
        from compress.pipeline.handoff import stage_dir_for

        check_apart(stage_dir_for(out), run_inputs(spec), option="the staging folder of --out")
    side = launch is not None and not launch.is_main  # a process other than rank 0: rank 0 alone reports
    key = run_key(spec, pruner, checked.source)
    state_dir = state_dir_for(out) if out is not None else None
    discard_state = _resume_state(state_dir, key, spec, _quiet if side else log) if state_dir is not None else False
    resumed_from = _resumed_checkpoint(state_dir, key) if spec.resume and not discard_state else None
    check_stream_weights(spec, pruner, checked.recovery, source=checked.source)

    handoff = None
    if mode == PRUNE_ONCE:
        assert launch is not None
        handoff = Handoff.open(launch, out)  # the one collective before training: all processes start together
        if side:
            from compress.pipeline.handoff import train_from_staged

            return RunResult(**train_from_staged(spec, checked, handoff, t_start=t_start, log=log))
    elif side:  # every process prunes (the method trains between its steps): rank 0 alone speaks and saves
        log = _quiet
        discard_state = False
        if resumed_from is None:
            state_dir = None  # nor reads a checkpoint rank 0 is about to discard
    try:
        t0 = time.perf_counter()
        stream = None
        if spec.stream_weights:  # decoder layers on meta: read one by one as the engine visits them
            from compress.io.loading import parse_dtype
            from compress.io.streaming import open_streamed

            loaded, stream = open_streamed(checked.source, dtype=parse_dtype(spec.dtype, checked.source),
                                           trust_remote_code=spec.trust_remote_code)
        else:
            loaded = load_model(spec.model, dtype=spec.dtype, device="cpu", trust_remote_code=spec.trust_remote_code)
        model, tok = loaded.model, loaded.tokenizer
        layerwise = stream is not None or resolve_layerwise(checked.layerwise_forced, model)
        if not layerwise and spec.device != "cpu":
            model.to(spec.device)  # whole-model: all weights on the device; layer-wise: they stay in CPU RAM
        arch = registry.adapter_for(model)
        with registry.reported(pruner.name, "check"):  # the weights' shapes, which the config may misstate
            pruner.check(model, target)
        dense = footprint(model, seq_len=spec.seq_len_flops, arch=arch)
        target.check_reachable(dense.of(target.metric))
        check_finite_weights(model, "of the input model")
        load_s = time.perf_counter() - t0

        calib = checked.calibration.with_tokenizer(tok) if checked.calibration is not None else None
        rec_obj: Any = None
        if checked.recovery is not None:
            from compress.train.recovery import Recovery

            rec_obj = Recovery(calib, checked.recovery, progress=spec.progress,
                               teacher=kd_teacher(checked.recovery, model, spec.teacher, dtype=spec.dtype,
                                                  trust_remote_code=spec.trust_remote_code, tokenizer=tok, log=log))
        before_training = None
        if launch is not None:
            if handoff is not None:
                rec_obj = GuardedRecovery(rec_obj, pruner.name)
            before_training = _before_training(launch, mode, handoff, rec_obj, tok, calib, method=pruner.name,
                                               dense=dense, spec=spec, t_start=t_start, load_s=load_s)
        ctx = PruneContext(arch=arch, tokenizer=tok, calibration=calib, seed=spec.seed, device=spec.device,
                           recover=rec_obj, log=log, progress=spec.progress, state_dir=state_dir, state_key=key,
                           layerwise=layerwise, stream=stream,
                           offload_dir=Path(spec.offload_dir).expanduser() if spec.offload_dir else None)
        if side:  # every-rank pruning: rank 0 writes the checkpoints
            ctx.checkpoint = lambda model, state: None  # type: ignore[method-assign]
        if discard_state:
            from compress.io.checkpoint import discard_checkpoint

            discard_checkpoint(state_dir)  # --overwrite: the interrupted run is discarded
        log(f"loaded {display_path(loaded.source)} in {load_s:.1f}s: {dense.params:,} parameters"
            + (" (decoder layers streamed from the files as they are visited)" if stream is not None else ""))
        try:
            result = prune_in_memory(pruner, target, model, tok, ctx, dense=dense, spec=spec, source=loaded.source,
                                     load_s=load_s, log=log, before_training=before_training)
        except PluginError as e:
            if resumed_from is None:
                raise
            # the method read the checkpoint's state and choked on it: the checkpoint is the suspect
            cause = e.__cause__ or e
            first = str(cause).strip().splitlines()[0][:160] if str(cause).strip() else ""
            raise UsageError(f"resuming from the checkpoint {resumed_from} failed ({type(cause).__name__}: {first}): "
                             "it is damaged or was written by another version of the method; pass --overwrite to "
                             "start over") from e
    except BaseException as e:
        if handoff is not None:
            handoff.fail(e)  # before the hand-off: every process stops with this line (a no-op after it)
        raise
    if out is not None:

        def export() -> None:
            info = result.save(out, overwrite=spec.overwrite)
            info["path"] = str(spec.out)  # messages name the folder as the user gave it (out is resolved)
            log(f"saved {spec.out} ({info['kind']} format)")
            if state_dir is not None:
                from compress.io.checkpoint import discard_checkpoint

                discard_checkpoint(state_dir)  # saved: nothing left to resume

        from compress.train.distributed import on_main_process

        # trained through the HF Trainer: under `accelerate launch` only rank 0 writes, the others wait
        on_main_process(export, launched=rec_obj is not None or launch is not None)
    return result


def _quiet(_msg: str) -> None:
    """The log of a process that repeats rank 0's work (rank 0 alone reports it)."""


def _before_training(launch: Any, mode: str | None, handoff: Any, rec_obj: Any, tok: Any, calib: Any, *,
                     method: str, dense: Footprint, spec: RunSpec, t_start: float,
                     load_s: float) -> Callable[..., dict[str, Any]]:
    """What a launched run does between pruning and training, as :func:`prune_in_memory`'s
    ``before_training`` hook: rank 0 of a prune-once run stages the pruned model for the others; every
    process then checks that all train from the same weights and tokens (the record's ``distributed``)."""
    from compress.pipeline.handoff import GuardedRecovery, agree

    def hook(model: torch.nn.Module, result: Any, achieved: Footprint, prune_s: float) -> dict[str, Any]:
        entry: dict[str, Any] = {"pruned": True, "loaded": "the dense model", "load_s": round(load_s, 3),
                                 "prune_s": round(prune_s, 3)}
        if handoff is not None:
            t = time.perf_counter()
            rec = {"method": method, "target": str(spec.target), "seed": spec.seed, "dense": dense.to_dict(),
                   "achieved": achieved.to_dict()}
            staged = handoff.publish(model, tok, kind=result.export, record=rec,
                                     plan={"method": method, "target": rec["target"], "seed": spec.seed,
                                           "plan": result.plan})
            entry.update(stage_s=round(time.perf_counter() - t, 3), staged_format=staged["kind"])
        entry["ready_s"] = round(time.perf_counter() - t_start, 3)
        try:
            info = agree(launch, entry, model, calib, mode=str(mode))
        finally:
            if handoff is not None:
                handoff.close()  # every process holds the pruned model now (or all stop)
        if isinstance(rec_obj, GuardedRecovery):
            rec_obj.armed = False  # the others hold the pruned model: training may start
        return info

    return hook


def kd_teacher(recovery: Any, model: torch.nn.Module, teacher: str | None, *, dtype: str | None = "auto",
               trust_remote_code: bool = False, tokenizer: Any = None, log=print) -> torch.nn.Module | None:
    """The distillation teacher of a ``kd`` recovery: the checkpoint ``teacher`` when given, otherwise a
    copy of the dense ``model`` taken now, before pruning changes it (its weights' memory once more:
    ``--dry-run`` counts it). None for the other recovery modes."""
    if recovery is None or recovery.mode != "kd":
        return None
    if teacher is None:
        import copy

        log("distillation teacher: a copy of the dense model")
        return copy.deepcopy(model).eval()
    from compress.io.loading import load_model

    loaded = load_model(teacher, dtype=dtype, device="cpu", trust_remote_code=trust_remote_code)
    from compress.train.recovery import check_teacher_tokenizer

    # family and vocabulary were checked config-only by the preflight; recover() re-checks the widths
    check_teacher_tokenizer(tokenizer, loaded.tokenizer)
    log(f"distillation teacher: {display_path(loaded.source)}")
    return loaded.model.eval()


#: The held-out text of the quick quality check: WikiText-2 test (calibration reads validation).
QUALITY_TEXT = "wikitext2"
QUALITY_WINDOWS, QUALITY_SEQ_LEN = 8, 256
#: Perplexity ratio (pruned / dense) above which a run warns that the model needs recovery.
QUALITY_WARN_RATIO = 2.0


#: Characters of the quality text that are tokenised: far more than the windows need (8 × 256 tokens
#: is ~10k characters of WikiText), so the first windows are those of the whole split.
QUALITY_CHARS = 200_000


@functools.lru_cache(maxsize=1)
def _quality_text() -> str:
    """The head of the quality text, read once per process (a run scores it before and after)."""
    from compress.evaluate.perplexity import ppl_text

    return ppl_text(QUALITY_TEXT)[:QUALITY_CHARS]


def quick_quality(model: torch.nn.Module, tokenizer: Any) -> dict[str, Any]:
    """Perplexity on the first :data:`QUALITY_WINDOWS` windows of :data:`QUALITY_SEQ_LEN` tokens of
    the WikiText-2 test split (capped at the model's context): seconds, and comparable before/after."""
    from compress.evaluate.perplexity import perplexity

    ctx_len = getattr(model.config, "max_position_embeddings", None) or QUALITY_SEQ_LEN
    seq_len = min(QUALITY_SEQ_LEN, int(ctx_len))
    res = perplexity(model, tokenizer, _quality_text(), seq_len=seq_len, max_windows=QUALITY_WINDOWS,
                     batch_size=QUALITY_WINDOWS, progress=False)
    return {"ppl": res["ppl"], "seq_len": seq_len, "windows": res["windows"], "tokens": res["predicted"]}


def prune_in_memory(pruner: Pruner, target: Target, model: torch.nn.Module, tok: Any, ctx: PruneContext, *,
                    dense: Footprint, spec: RunSpec, source: str, load_s: float = 0.0, log=print,
                    before_training: Callable[..., dict[str, Any]] | None = None) -> RunResult:
    """Prune a loaded (or user-given) model with its context, recover if asked, measure, record.

    The part of a run after loading, shared by :func:`run` and :func:`compress.pipeline.api.prune`.
    ``before_training(model, result, achieved, prune_s)``: called once pruning is done, before the
    recovery training (a launched run's hand-off, :mod:`compress.pipeline.handoff`); what it returns is
    the record's ``distributed`` entry."""
    from compress.io.loading import source_metadata
    from compress.io.recipe import resolved_recipe

    registry = get_registry()
    quality: dict[str, Any] | None = None
    stream = ctx.stream
    if spec.evaluate and tok is not None:
        t = time.perf_counter()
        # streamed weights: each dense layer is read for its forward and handed back after it
        with stream.on_demand(model) if stream is not None else contextlib.nullcontext():
            dense_quality = quick_quality(model, tok)
        quality = {"text": f"{QUALITY_TEXT} test, first {QUALITY_WINDOWS} windows", "dense": dense_quality}
        log(f"dense perplexity {quality['dense']['ppl']:.2f} ({time.perf_counter() - t:.1f}s)")
    torch.manual_seed(spec.seed)
    log(f"pruning with {pruner.name} to {target}")
    t1 = time.perf_counter()
    with track_peak_rss() as rss, registry.reported(pruner.name, "prune"):
        result = pruner.prune(model, target, ctx)
        if stream is not None:  # what the method did not visit (or handed back) is read now
            stream.finish(result.model)
    prune_s = time.perf_counter() - t1
    model = result.model
    arch = registry.adapter_for(model)
    achieved = footprint(model, seq_len=spec.seq_len_flops, arch=arch)
    _goal_check(target, dense, achieved, pruner.name)
    log(f"pruned in {prune_s:.1f}s: {achieved.params:,} parameters ({achieved.params / dense.params:.1%})")
    distributed = before_training(model, result, achieved, prune_s) if before_training is not None else None
    recovery_info = None
    rec_obj = ctx.recover
    if rec_obj is not None and spec.recover_tokens > 0 and not result.notes.get("recovered_inside"):
        log(f"recovery training: {spec.recover_tokens:,} tokens ({spec.recover_mode})")
        r = rec_obj(model)
        model = r.model
        recovery_info = {"tokens": r.tokens_seen, "steps": r.steps, "wall_s": r.wall_s, "world_size": r.world_size,
                         "trained_params": r.trained_params, "final_loss": r.losses[-1][1] if r.losses else None}
    check_finite_weights(model, f"after {pruner.name}")
    if quality is not None:
        quality["pruned"] = quick_quality(model, tok)
        quality["ratio"] = quality["pruned"]["ppl"] / quality["dense"]["ppl"]
        quality["warn_ratio"] = QUALITY_WARN_RATIO
        log(f"pruned perplexity {quality['pruned']['ppl']:.2f} ({quality['ratio']:.2f}× dense)")
    plan_hash = hashlib.sha256(json.dumps(result.plan, sort_keys=True).encode()).hexdigest()
    origin = registry.origin.get(pruner.name)
    cfg = pruner.config
    calib = ctx.calibration
    record = empty_run_record()
    record.update({
        "model": {"source": display_path(source), **source_metadata(source)},
        "method": pruner.name,
        "plugin": {"distribution": origin.distribution if origin else None, "version": origin.version if origin else None},
        "settings": dict(spec.settings),
        "config": cfg.model_dump(mode="json"),
        "target": str(target),
        "goal": target.goal(dense.of(target.metric)),
        "seed": spec.seed,
        "calib": display_path(spec.calib),
        "calibration": calib.describe() if calib else None,
        "calibration_hash": ctx.calibration_hash,
        "plan_hash": plan_hash,
        "recipe": resolved_recipe(pruner.name, cfg.model_dump(mode="json"), target=str(target), seed=spec.seed,
                                  calib=display_path(calib.spec) if calib is not None else None,
                                  recover_tokens=spec.recover_tokens, recover_mode=spec.recover_mode,
                                  recover_settings=spec.recover_settings),
        "dense": dense.to_dict(),
        "achieved": achieved.to_dict(),
        "ratios": achieved.ratios(dense),
        "quality": quality,
        "recovery": {"tokens": spec.recover_tokens, "mode": spec.recover_mode,
                     "settings": dict(spec.recover_settings),
                     **({"teacher": display_path(spec.teacher) if spec.teacher else "dense model"}
                        if spec.recover_mode == "kd" else {})},
        "recovery_result": recovery_info,
        "notes": result.notes,
        "timing_s": {"load": round(load_s, 3), "prune": round(prune_s, 3)},
        "peak_rss_bytes": rss.peak_bytes,
        "peak_rss_increase_bytes": rss.increase_bytes,
        "peak_rss": {"prune": rss.peak_bytes},
        "layerwise": ctx.layerwise,
        "versions": versions(),
    })
    if distributed is not None:  # launched runs only (OPTIONAL_RUN_RECORD_KEYS)
        record["distributed"] = distributed
    return RunResult(model=model, tokenizer=tok, plan=result.plan, dense=dense, achieved=achieved,
                     record=jsonable(record), export_kind=result.export)

