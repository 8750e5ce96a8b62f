"""The Python API: prune a model that is already in memory (a notebook, a training script).

    import compress
    result = compress.prune(model, tokenizer, method="transact", target="60%")
    result.quality                      # perplexity before -> after on a held-out slice
    result.save("out/pruned")           # exactly what `compress run --out` writes

The same method, the same checks and the same record as ``compress run``; only loading is skipped.
"""

from __future__ import annotations

from typing import Any

import torch

from compress.errors import UsageError
from compress.model.footprint import footprint
from compress.pipeline.preflight import DEFAULT_CALIB, recovery_config
from compress.pipeline.run import RunResult, RunSpec, check_finite_weights, kd_teacher, prune_in_memory
from compress.plugins import get_registry
from compress.pruner import PruneContext
from compress.target import Target


def _device_of(model: torch.nn.Module) -> str:
    try:
        return str(next(model.parameters()).device)
    except StopIteration:
        return "cpu"


def prune(
    model: torch.nn.Module,
    tokenizer: Any = None,
    *,
    method: str,
    target: str | Target,
    calib: str | Any | None = None,
    seed: int = 0,
    evaluate: bool = True,
    layerwise: bool = False,
    recover_tokens: int = 0,
    recover_mode: str = "full",
    recover_settings: dict[str, Any] | None = None,
    teacher: torch.nn.Module | None = None,
    progress: bool = False,
    log: Any = None,
    **settings: Any,
) -> RunResult:
    """Prune ``model`` **in place** (``copy.deepcopy`` it first to keep the dense one) and return a
    :class:`~compress.pipeline.run.RunResult`: ``.model``, ``.plan``, ``.dense`` / ``.achieved``
    footprints, ``.quality`` (perplexity before -> after when ``evaluate`` and a tokenizer are
    given), ``.record`` (the run record) and ``.save(path)``.

    ``model``: a Hugging Face causal LM of a supported family, any dtype, on any device (it stays
    there; calibration runs where it is). ``target``: ``"60%"``, ``"2B"``, ``"flops:50%"``, ``"kv:33%"``.
    ``calib``: a calibration spec (file, folder, alias such as ``"wikitext2"``, ``hf:NAME``) or a
    :class:`compress.calib.sources.CalibrationSource`; default ``wikitext2`` (shipped with the
    package). ``settings``: the method's settings (``compress methods`` lists them), e.g.
    ``calib_samples=32``. ``recover_tokens`` / ``recover_mode`` (``full``, ``lora``, ``kd``) /
    ``recover_settings``: recovery training after pruning; ``kd`` distills from ``teacher``, by default
    a copy of ``model`` taken before pruning. Bad arguments raise a one-line :class:`~compress.errors.UsageError` before
    the model is touched.
    """
    from compress.calib.sources import CalibrationSource

    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise UsageError(f"model must be a Hugging Face causal LM (torch.nn.Module with a .config), got "
                         f"{type(model).__name__}; load one with AutoModelForCausalLM.from_pretrained")
    if not isinstance(method, str) or not method:
        raise UsageError("method must be a method name such as 'transact'; see `compress methods`")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UsageError(f"seed must be a non-negative int, got {seed!r}")
    registry = get_registry()
    pruner = registry.make(method, settings)
    spec = RunSpec(method=pruner.name, target=target, seed=seed, calib=calib if isinstance(calib, str) else None,
                   settings=dict(settings), device=_device_of(model), recover_tokens=int(recover_tokens or 0),
                   recover_mode=recover_mode, recover_settings=dict(recover_settings or {}), progress=progress,
                   evaluate=evaluate, layerwise=layerwise)
    tgt: Target = spec.target  # type: ignore[assignment]
    recovery = recovery_config(spec.recover_tokens, recover_mode, seed, recover_settings)
    arch = registry.adapter_for(model)  # refuses an unsupported family in one line
    with registry.reported(pruner.name, "check"):
        pruner.check(model, tgt)
    dense = footprint(model, seq_len=spec.seq_len_flops, arch=arch)
    tgt.check_reachable(dense.of(tgt.metric))
    needs_text = pruner.capabilities.needs_calibration or recovery is not None
    if (needs_text or evaluate) and tokenizer is None:
        what = "calibration text" if needs_text else "the quality check"
        raise UsageError(f"{pruner.name} needs a tokenizer for {what}; pass prune(model, tokenizer, ...)"
                         + ("" if needs_text else " or evaluate=False"))
    if isinstance(calib, CalibrationSource):
        source = calib.with_tokenizer(tokenizer).with_seed(seed)
    elif calib is None or isinstance(calib, str):
        source = CalibrationSource.from_spec(calib or DEFAULT_CALIB, tokenizer, seed=seed) if needs_text else None
    else:
        raise UsageError(f"calib must be a spec string or a CalibrationSource, got {type(calib).__name__}")
    check_finite_weights(model, "of the input model")
    say = log if log is not None else (lambda m: None)
    if teacher is not None:
        if recovery is None or recovery.mode != "kd":
            raise UsageError("teacher is the distillation teacher of recover_mode='kd'; pass recover_mode='kd' "
                             "or drop teacher")
        if not isinstance(teacher, torch.nn.Module) or not hasattr(teacher, "config"):
            raise UsageError(f"teacher must be a Hugging Face causal LM, got {type(teacher).__name__}")
        from compress.train.recovery import check_teacher

        check_teacher(model.config, teacher.config, recovery)
        spec.teacher = f"in-memory {type(teacher).__name__}"  # what the run record names as the teacher
    rec_obj = None
    if recovery is not None:
        from compress.train.recovery import Recovery

        rec_obj = Recovery(source, recovery, progress=progress,
                           teacher=teacher if teacher is not None else kd_teacher(recovery, model, None, log=say))
    ctx = PruneContext(arch=arch, tokenizer=tokenizer, calibration=source, seed=seed, device=spec.device,
                       recover=rec_obj, log=say, progress=progress, layerwise=layerwise)
    return prune_in_memory(pruner, tgt, model, tokenizer, ctx, dense=dense, spec=spec,
                           source=getattr(model.config, "_name_or_path", "") or type(model).__name__, log=say)
