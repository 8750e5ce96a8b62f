"""One pruning run, start to finish: the engine behind ``compress run`` and the benchmark cells.

Order matters for the user: everything that can be refused (method, config keys, target syntax,
output folder, model path, architecture, target reachability, calibration source) is checked before
any expensive work, and nothing is written unless the run succeeds — except the checkpoints of an
iterative method, kept in a hidden sibling of ``--out`` (:func:`state_dir_for`) so that ``--resume``
continues an interrupted run; they are removed once the output is saved.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from compress.errors import NumericalError, TargetError, UsageError
from compress.layerwise import resolve_layerwise
from compress.measure import Footprint, footprint, track_peak_rss
from compress.plugins import get_registry
from compress.pruner import PruneContext, Pruner
from compress.recipe import resolved_recipe
from compress.target import Target

DEFAULT_CALIB = "wikitext2"


@dataclass
class RunSpec:
    """What the user asked for (CLI flags, recipe, or a benchmark cell)."""

    method: str
    target: str
    model: str | None = None
    out: str | None = None
    seed: int = 0
    calib: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    device: str = "cpu"
    dry_run: bool = False
    overwrite: bool = False
    recover_tokens: int = 0
    recover_mode: str = "full"
    recover_settings: dict[str, Any] = field(default_factory=dict)
    trust_remote_code: bool = False
    seq_len_flops: int = 2048
    progress: bool = True
    resume: bool = False  # continue an interrupted run from its checkpoint (iterative methods)
    # calibrate one decoder layer at a time (compress.layerwise); None = on when the weights exceed
    # compress.layerwise.LAYERWISE_AUTO_BYTES (4 GiB). Layer-wise, the weights stay in CPU RAM and each
    # layer visits ``device`` in turn; ``offload_dir`` caches the calibration activations in files there.
    layerwise: bool | None = None
    offload_dir: str | None = None


def _one_line_validation(e: ValidationError, what: str) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err.get("loc", ())) or what
        if err.get("type") == "extra_forbidden":
            parts.append(f"unknown key {loc!r}")
        else:
            parts.append(f"{loc}: {err.get('msg')}")
    return "; ".join(parts)


def make_pruner(method: str, settings: dict[str, Any]) -> Pruner:
    """Look up the method and validate its settings (unknown keys and wrong types are usage errors)."""
    cls = get_registry().get(method)
    try:
        return cls(settings)
    except ValidationError as e:
        fields = ", ".join(sorted(cls.Config.model_fields))
        raise UsageError(f"bad settings for {cls.name}: {_one_line_validation(e, 'settings')} "
                         f"(valid keys: {fields})") from None


#: Distributions of the pinned stack (constraints.txt) whose installed versions every record carries,
#: besides python, torch and transformers; the key is the name with "-" as "_".
STACK = ("torch-pruning", "lm_eval", "peft", "accelerate", "datasets", "huggingface_hub", "tokenizers",
         "safetensors", "pluggy", "pydantic", "numpy", "gguf", "compress", "compress-transact", "compress-baselines")


def versions() -> dict[str, str]:
    from importlib.metadata import version

    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    for dist in STACK:
        try:
            out[dist.replace("-", "_")] = version(dist)
        except Exception:  # noqa: BLE001
            out[dist.replace("-", "_")] = "absent"
    return out


def check_finite_weights(model: torch.nn.Module, when: str) -> None:
    for name, p in model.named_parameters():
        if p.is_floating_point() and not p.is_meta and not torch.isfinite(p).all():
            raise NumericalError(f"non-finite values in {name} {when}; check the input model / method settings")


def _goal_check(target: Target, dense: Footprint, achieved: Footprint, method: str) -> None:
    key = {"params": "params", "flops": "flops_per_token", "kv": "kv_bytes_per_token"}[target.metric]
    goal = target.goal(getattr(dense, key))
    got = getattr(achieved, key)
    if got > goal * (1 + 1e-9):
        raise TargetError(f"method {method} ended above its target: {target.metric} {got:.6g} > goal {goal:.6g}")


STATE_SUFFIX = ".compress-state"


def state_dir_for(out: Path) -> Path:
    """Where a run writing ``out`` keeps its checkpoints: a hidden sibling, removed once ``out`` is saved."""
    return out.parent / f".{out.name}{STATE_SUFFIX}"


def run_key(spec: RunSpec, pruner: Pruner, target: Target) -> str:
    """Hash of everything that determines a run's result: a checkpoint resumes only the run that wrote it."""
    from compress.loading import default_model

    source = spec.model or default_model()
    p = Path(source).expanduser()
    doc = {
        "model": str(p.resolve()) if p.exists() else source, "method": pruner.name,
        "config": pruner.config.model_dump(mode="json"), "target": str(target), "seed": spec.seed,
        "calib": spec.calib or DEFAULT_CALIB, "dtype": spec.dtype, "device": spec.device,
        "recover": [spec.recover_tokens, spec.recover_mode, spec.recover_settings],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _resume_state(state_dir: Path, key: str, spec: RunSpec, log) -> bool:
    """Decide what to do with a checkpoint left by an interrupted run, before any work.

    Returns True when the state folder must be discarded before pruning (``--overwrite``)."""
    from compress.checkpoint import read_checkpoint

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


def dry_run(spec: RunSpec, log=print) -> dict[str, Any]:
    """Plan shapes on the meta device: no weights are loaded or allocated."""
    from transformers import AutoModelForCausalLM

    from compress.loading import default_model, load_config, parse_dtype
    from compress.memory import estimate_peak_memory

    pruner = make_pruner(spec.method, spec.settings)
    target = Target.parse(spec.target)
    source = spec.model or default_model()
    cfg = load_config(source, trust_remote_code=spec.trust_remote_code)
    with torch.device("meta"):  # at the dtype the real run would load (float32 unless --dtype)
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=spec.trust_remote_code,
                                                 dtype=parse_dtype(spec.dtype))
    registry = get_registry()
    arch = registry.adapter_for(model)
    with registry.reported(pruner.name, "check"):
        pruner.check(model, target)
    dense = footprint(model, seq_len=spec.seq_len_flops, arch=arch)
    layerwise = resolve_layerwise(spec.layerwise if spec.offload_dir is None else True, model)
    memory = estimate_peak_memory(pruner, model, target, layerwise=layerwise, arch=arch)
    with registry.reported(pruner.name, "plan_shapes"):
        planned = pruner.plan_shapes(model, target)
    arch = registry.adapter_for(model)
    after = footprint(model, seq_len=spec.seq_len_flops, arch=arch)
    _goal_check(target, dense, after, pruner.name)
    from compress.export import stock_expressible

    stock, why = stock_expressible(model, arch)
    return {
        "dry_run": True,
        "export": {"kind": "stock" if stock else "compress", "reason": why, "path": None},
        "model": source,
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


def run(spec: RunSpec, log=print) -> dict[str, Any]:
    """Prune (and optionally recover and export) a model. Returns the run record."""
    from compress.export import check_output_dir, export_model
    from compress.loading import load_model, local_model_type, parse_device

    if spec.dry_run:
        return dry_run(spec, log)
    registry = get_registry()
    pruner = make_pruner(spec.method, spec.settings)
    target = Target.parse(spec.target)
    out = check_output_dir(spec.out, spec.overwrite) if spec.out else None
    if spec.resume and out is None:
        raise UsageError("--resume continues an interrupted run into its --out folder; give the same --out")
    key = run_key(spec, pruner, target)
    state_dir = state_dir_for(out) if out is not None else None
    discard_state = _resume_state(state_dir, key, spec, log) if state_dir is not None else False
    parse_device(spec.device)
    model_type = local_model_type(spec.model)
    if model_type is not None:  # refuse an unsupported architecture before loading any weight
        registry.check_model_type(model_type)
    recovery = None
    if spec.recover_tokens:
        from compress.recover import RecoveryConfig

        try:
            recovery = RecoveryConfig(tokens=spec.recover_tokens, mode=spec.recover_mode, seed=spec.seed,
                                      **spec.recover_settings)
        except ValidationError as e:
            raise UsageError(f"bad recovery settings: {_one_line_validation(e, 'recovery')}") from None

    t0 = time.perf_counter()
    if spec.offload_dir is not None:
        if spec.layerwise is False:
            raise UsageError("--offload-dir caches layer-wise activations; drop --no-layerwise or --offload-dir")
        if Path(spec.offload_dir).expanduser().is_file():
            raise UsageError(f"--offload-dir {spec.offload_dir} is a file; give a folder")
    loaded = load_model(spec.model, dtype=spec.dtype, device="cpu", trust_remote_code=spec.trust_remote_code)
    model, tok = loaded.model, loaded.tokenizer
    layerwise = resolve_layerwise(spec.layerwise if spec.offload_dir is None else True, model)
    if not layerwise and spec.device != "cpu":
        model.to(spec.device)  # whole-model: all weights on the device; layer-wise: they stay in CPU RAM
    arch = registry.adapter_for(model)
    with registry.reported(pruner.name, "check"):
        pruner.check(model, target)
    dense = footprint(model, seq_len=spec.seq_len_flops, arch=arch)
    dense_value = {"params": dense.params, "flops": dense.flops_per_token, "kv": dense.kv_bytes_per_token}[target.metric]
    target.check_reachable(dense_value)
    check_finite_weights(model, "of the input model")
    load_s = time.perf_counter() - t0

    calib = None
    calib_hash = None
    cfg = pruner.config
    if pruner.capabilities.needs_calibration or recovery is not None:
        from compress.calibration import CalibrationSource

        calib = CalibrationSource.from_spec(spec.calib or DEFAULT_CALIB, tok, seed=spec.seed)
        n, L = getattr(cfg, "calib_samples", 128), getattr(cfg, "calib_seq_len", 2048)
        L = min(L, int(getattr(model.config, "max_position_embeddings", None) or L))
        calib_hash = calib.fingerprint(n, L) if pruner.capabilities.needs_calibration else None

    rec_obj = None
    if recovery is not None:
        from compress.recover import Recovery

        rec_obj = Recovery(calib, recovery, progress=spec.progress)
    ctx = PruneContext(arch=arch, tokenizer=tok, calibration=calib, seed=spec.seed, device=spec.device,
                       recover=rec_obj, log=log, progress=spec.progress, state_dir=state_dir, state_key=key,
                       layerwise=layerwise,
                       offload_dir=Path(spec.offload_dir).expanduser() if spec.offload_dir else None)
    if discard_state:
        import shutil

        shutil.rmtree(state_dir, ignore_errors=True)  # --overwrite: the interrupted run is discarded
    torch.manual_seed(spec.seed)
    t1 = time.perf_counter()
    with track_peak_rss() as rss, registry.reported(pruner.name, "prune"):
        result = pruner.prune(model, target, ctx)
    prune_s = time.perf_counter() - t1
    model = result.model
    arch = registry.adapter_for(model)
    achieved = footprint(model, seq_len=spec.seq_len_flops, arch=arch)
    _goal_check(target, dense, achieved, pruner.name)
    recovery_info = None
    if rec_obj is not None and not result.notes.get("recovered_inside"):
        r = rec_obj(model)
        model = r.model
        recovery_info = {"tokens": r.tokens_seen, "steps": r.steps, "wall_s": r.wall_s, "world_size": r.world_size,
                         "trained_params": r.trained_params, "final_loss": r.losses[-1][1] if r.losses else None}
    check_finite_weights(model, f"after {pruner.name}")
    plan_hash = hashlib.sha256(json.dumps(result.plan, sort_keys=True).encode()).hexdigest()
    origin = registry.origin.get(pruner.name)
    record: dict[str, Any] = {
        "model": loaded.source,
        "method": pruner.name,
        "plugin": {"distribution": origin.distribution if origin else None, "version": origin.version if origin else None},
        "config": cfg.model_dump(mode="json"),
        "target": str(target),
        "goal": target.goal(dense_value),
        "seed": spec.seed,
        "calibration": calib.describe() if calib else None,
        "calibration_hash": calib_hash,
        "plan_hash": plan_hash,
        "recipe": resolved_recipe(pruner.name, cfg.model_dump(mode="json"), target=str(target), seed=spec.seed,
                                  calib=calib.spec if calib is not None else None,
                                  recover_tokens=spec.recover_tokens, recover_mode=spec.recover_mode,
                                  recover_settings=spec.recover_settings),
        "dense": dense.to_dict(),
        "achieved": achieved.to_dict(),
        "ratios": achieved.ratios(dense),
        "recovery": recovery_info,
        "notes": result.notes,
        "timing_s": {"load": round(load_s, 3), "prune": round(prune_s, 3)},
        "peak_rss_bytes": rss.peak_bytes,
        "peak_rss_increase_bytes": rss.increase_bytes,
        "layerwise": layerwise,
        "versions": versions(),
    }
    if out is not None:

        def export() -> None:
            plan_doc = {"method": pruner.name, "target": str(target), "seed": spec.seed, "plan": result.plan}
            info = export_model(model, tok, out, kind=result.export, plan=plan_doc, record=record,
                                overwrite=spec.overwrite)
            record["export"] = info
            record["weights_sha256"] = info["weights_sha256"]
            if state_dir is not None:
                import shutil

                shutil.rmtree(state_dir, ignore_errors=True)  # saved: nothing left to resume

        from compress.recover import on_main_process

        # trained through the HF Trainer: under `accelerate launch` only rank 0 writes, the others wait
        on_main_process(export, launched=rec_obj is not None)
    record["_model"] = model
    record["_tokenizer"] = tok
    return record


def clean_record(record: dict[str, Any]) -> dict[str, Any]:
    """JSON-able copy of a run record (drops the in-memory model)."""
    out = {k: v for k, v in record.items() if not k.startswith("_")}
    return json.loads(json.dumps(out, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o)))
