"""One pruning run, start to finish: the engine behind ``compress run`` and the benchmark cells.

Order matters for the user: everything that can be refused (method, config keys, target syntax,
output folder, model path, architecture, target reachability, calibration source) is checked before
any expensive work, and nothing is written unless the run succeeds.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import ValidationError

from compress.errors import NumericalError, TargetError, UsageError
from compress.measure import Footprint, footprint, track_peak_rss
from compress.plugins import get_registry
from compress.pruner import PruneContext, Pruner
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


def versions() -> dict[str, str]:
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    for mod in ("torch_pruning", "lm_eval", "peft", "accelerate", "compress"):
        try:
            from importlib.metadata import version

            dist = {"torch_pruning": "torch-pruning", "lm_eval": "lm_eval"}.get(mod, mod)
            out[mod] = version(dist)
        except Exception:  # noqa: BLE001
            out[mod] = "absent"
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


def dry_run(spec: RunSpec, log=print) -> dict[str, Any]:
    """Plan shapes on the meta device: no weights are loaded or allocated."""
    from transformers import AutoModelForCausalLM

    from compress.loading import default_model, load_config

    pruner = make_pruner(spec.method, spec.settings)
    target = Target.parse(spec.target)
    source = spec.model or default_model()
    cfg = load_config(source, trust_remote_code=spec.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=spec.trust_remote_code)
    registry = get_registry()
    arch = registry.adapter_for(model)
    pruner.check(model, target)
    dense = footprint(model, seq_len=spec.seq_len_flops, arch=arch)
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
        "layers_after": after.layers[:1] if len({json.dumps(x, sort_keys=True) for x in after.layers}) == 1
        else after.layers,
    }


def run(spec: RunSpec, log=print) -> dict[str, Any]:
    """Prune (and optionally recover and export) a model. Returns the run record."""
    from compress.export import check_output_dir, export_model
    from compress.loading import load_model

    if spec.dry_run:
        return dry_run(spec, log)
    registry = get_registry()
    pruner = make_pruner(spec.method, spec.settings)
    target = Target.parse(spec.target)
    out = check_output_dir(spec.out, spec.overwrite) if spec.out else None
    recovery = None
    if spec.recover_tokens:
        from compress.recover import RecoveryConfig

        try:
            recovery = RecoveryConfig(tokens=spec.recover_tokens, mode=spec.recover_mode, seed=spec.seed,
                                      **spec.recover_settings)
        except ValidationError as e:
            raise UsageError(f"bad recovery settings: {_one_line_validation(e, 'recovery')}") from None

    t0 = time.perf_counter()
    loaded = load_model(spec.model, dtype=spec.dtype, device=spec.device, trust_remote_code=spec.trust_remote_code)
    model, tok = loaded.model, loaded.tokenizer
    arch = registry.adapter_for(model)
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
                       recover=rec_obj, log=log, progress=spec.progress)
    torch.manual_seed(spec.seed)
    t1 = time.perf_counter()
    with track_peak_rss() as rss:
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
        recovery_info = {"tokens": r.tokens_seen, "steps": r.steps, "wall_s": r.wall_s,
                         "final_loss": r.losses[-1][1] if r.losses else None}
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
        "dense": dense.to_dict(),
        "achieved": achieved.to_dict(),
        "ratios": achieved.ratios(dense),
        "recovery": recovery_info,
        "notes": result.notes,
        "timing_s": {"load": round(load_s, 3), "prune": round(prune_s, 3)},
        "peak_rss_bytes": rss.peak_bytes,
        "versions": versions(),
    }
    if out is not None:
        plan_doc = {"method": pruner.name, "target": str(target), "seed": spec.seed, "plan": result.plan}
        info = export_model(model, tok, out, kind=result.export, plan=plan_doc, record=record,
                            overwrite=spec.overwrite)
        record["export"] = info
        record["weights_sha256"] = info["weights_sha256"]
    record["_model"] = model
    record["_tokenizer"] = tok
    return record


def clean_record(record: dict[str, Any]) -> dict[str, Any]:
    """JSON-able copy of a run record (drops the in-memory model)."""
    out = {k: v for k, v in record.items() if not k.startswith("_")}
    return json.loads(json.dumps(out, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o)))
