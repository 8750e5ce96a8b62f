"""The one preflight: everything a run can be refused for, checked before any weight is loaded.

``compress run``, ``compress run --dry-run``, ``compress bench`` (every cell, before the first one
starts) and ``compress recover`` call :func:`preflight`, in this order:

1. the method exists and its settings validate (unknown keys named);
2. the target (already a :class:`~compress.target.Target`: parsed once, where it entered);
3. the output folder (absent, or ``--overwrite``; its parent writable), the device, ``--offload-dir``;
4. the recovery settings (and a distillation teacher's config: family, vocabulary);
5. the model: the path or id, its config (config only, on the meta device), its architecture
   against the registered adapters;
6. the method's own ``check()`` on the config-only model, and the target's reachability from the
   dense shapes;
7. the calibration source (the text is read now; it is tokenised once the tokenizer is loaded).

A config-only model of a source (for ``--dry-run``, ``inspect`` and the checks) is built in one
place, :func:`meta_model`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.errors import UsageError, one_line_validation
from compress.model.adapter import ArchAdapter
from compress.model.footprint import Footprint, footprint
from compress.plugins import Registry, get_registry
from compress.pruner import Pruner
from compress.target import Target

#: The calibration text when none is given.
DEFAULT_CALIB = "wikitext2"


@dataclass
class Shapes:
    """A config-only model of a source: its config, the meta-device model, adapter and dense footprint."""

    source: str
    config: Any
    model: Any  # on the meta device: shapes, no weights
    arch: ArchAdapter
    dense: Footprint


def meta_model(source: str, *, dtype: str | None = None, trust_remote_code: bool = False,
               registry: Registry | None = None, seq_len: int = 2048) -> Shapes:
    """Build ``source``'s model on the meta device from its config alone (no weight is read), at the
    dtype a real run would load (float32 unless ``dtype``); refuse an architecture no adapter knows."""
    import torch
    from transformers import AutoModelForCausalLM

    from compress.io.loading import load_config, parse_dtype

    registry = registry or get_registry()
    cfg = load_config(source, trust_remote_code=trust_remote_code)
    registry.check_model_type(getattr(cfg, "model_type", None))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code,
                                                 dtype=parse_dtype(dtype, source))
    arch = registry.adapter_for(model)
    return Shapes(source=source, config=cfg, model=model, arch=arch, dense=footprint(model, seq_len=seq_len, arch=arch))


def recovery_config(tokens: int, mode: str, seed: int, settings: dict[str, Any] | None) -> Any:
    """The :class:`compress.train.recovery.RecoveryConfig` of a run (one-line error for bad settings),
    or None when the run asks for no training at all.

    A run has a recovery recipe when it gives a budget (``tokens``) or a non-default mode or settings:
    with ``tokens == 0`` the recipe only shapes the training an iterative method runs between its steps
    (TransAct's shots with ``recover_tokens_per_shot``, e.g. ``--recover-mode kd`` to distill there),
    and nothing is trained after pruning."""
    from pydantic import ValidationError

    from compress.train.recovery import RecoveryConfig

    if not tokens and mode == "full" and not settings:
        return None
    try:
        return RecoveryConfig(**{**(settings or {}), "tokens": tokens or 1, "mode": mode, "seed": seed})
    except ValidationError as e:
        fields = ", ".join(sorted(set(RecoveryConfig.model_fields) - {"tokens", "mode", "seed"}))
        raise UsageError(f"bad recovery settings: {one_line_validation(e, 'recovery')} (valid keys: {fields})") from None


@dataclass
class Checked:
    """What :func:`preflight` established; the run continues from here without re-checking."""

    pruner: Pruner | None
    target: Target | None
    source: str
    shapes: Shapes | None
    out: Path | None
    recovery: Any  # RecoveryConfig | None
    teacher: str | None  # mode kd: a teacher checkpoint (None: the dense model of the run itself)
    calibration: Any  # CalibrationSource without a tokenizer yet | None
    layerwise_forced: bool | None


def preflight(
    *,
    method: str | None,
    settings: dict[str, Any] | None = None,
    target: Target | None = None,
    model: str | None = None,
    out: str | None = None,
    overwrite: bool = False,
    device: str = "cpu",
    dtype: str | None = None,
    trust_remote_code: bool = False,
    recover_tokens: int = 0,
    recover_mode: str = "full",
    recover_settings: dict[str, Any] | None = None,
    teacher: str | None = None,
    teacher_required: bool = False,
    seed: int = 0,
    calib: str | None = None,
    layerwise: bool | None = None,
    offload_dir: str | None = None,
    shapes: Shapes | None = None,
    read_calibration: bool = True,
    registry: Registry | None = None,
) -> Checked:
    """Refuse a run that cannot succeed, before any weight is loaded (one-line errors, in the order of
    the module docstring). ``shapes`` reuses a config-only model already built for ``model`` (the
    bench checks many cells of one model); ``read_calibration=False`` skips reading the text (a
    dry run never calibrates). ``teacher``: the distillation teacher of ``recover_mode="kd"``, checked
    config-only against the model; ``teacher_required``: there is no dense model to fall back to
    (``compress recover``)."""
    from compress.io.export import check_output_dir
    from compress.io.loading import default_model, parse_device

    registry = registry or get_registry()
    pruner = registry.make(method, settings) if method is not None else None
    if pruner is not None and target is None:
        raise UsageError("--target is required, e.g. --target 60%")
    checked_out = check_output_dir(out, overwrite) if out else None
    parse_device(device)
    if offload_dir is not None:
        if layerwise is False:
            raise UsageError("--offload-dir caches layer-wise activations; drop --no-layerwise or --offload-dir")
        if Path(offload_dir).expanduser().is_file():
            raise UsageError(f"--offload-dir {offload_dir} is a file; give a folder")
    recovery = recovery_config(recover_tokens, recover_mode, seed, recover_settings)
    kd = recovery is not None and recovery.mode == "kd"
    if teacher is not None and not kd:
        raise UsageError("--teacher is the distillation teacher of --recover-mode kd; add --recover-mode kd "
                         "or drop --teacher")
    if kd and teacher is None and teacher_required:
        raise UsageError("recovery mode kd needs a teacher here: pass --teacher with the dense model this one was "
                         "pruned from")

    source = model or default_model()
    if shapes is None:
        shapes = meta_model(source, dtype=dtype, trust_remote_code=trust_remote_code, registry=registry)
    if kd and teacher is not None:
        from compress.io.loading import load_config
        from compress.train.recovery import check_teacher

        check_teacher(shapes.config, load_config(teacher, trust_remote_code=trust_remote_code), recovery)
    if pruner is not None and target is not None:
        with registry.reported(pruner.name, "check"):
            pruner.check(shapes.model, target)
        target.check_reachable(shapes.dense.of(target.metric))

    calibration = None
    needs_text = recovery is not None or (pruner is not None and pruner.capabilities.needs_calibration)
    if needs_text and read_calibration:
        from compress.calib.sources import CalibrationSource

        calibration = CalibrationSource.from_spec(calib or DEFAULT_CALIB, None, seed=seed)
    return Checked(pruner=pruner, target=target, source=source, shapes=shapes, out=checked_out, recovery=recovery,
                   teacher=teacher, calibration=calibration, layerwise_forced=True if offload_dir is not None else layerwise)
