"""``compress recover``: train a saved pruned model and export it like ``compress run`` does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from compress.assets import display_path
from compress.train.distributed import is_main_process, on_main_process
from compress.train.recovery import recover

if TYPE_CHECKING:
    from compress.pipeline.run import RunResult


# ---------------------------------------------------------------------------- recovery of a saved model
@dataclass
class RecoverSpec:
    """What ``compress recover`` was asked for: a saved model, a token budget, an output folder."""

    model: str
    out: str
    tokens: int
    mode: str = "full"
    calib: str | None = None
    seed: int = 0
    settings: dict[str, Any] = field(default_factory=dict)  # other RecoveryConfig fields
    dtype: str | None = None
    overwrite: bool = False
    trust_remote_code: bool = False
    progress: bool = True
    teacher: str | None = None  # mode kd: the dense model the saved one was pruned from


def _previous_run(folder: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The ``compress_plan.json`` and ``compress_run.json`` of a folder written by compress, if any.

    Read before any work: a file that is there but is not a JSON object is a one-line UsageError now,
    not a crash once training is done (the new record is built from the old one)."""
    from pathlib import Path

    from compress.io.limits import MAX_RECORD_BYTES
    from compress.io.outpath import PLAN_FILE, RECORD_FILE
    from compress.io.safe_io import read_json_object

    fix = "restore it from the folder compress wrote, or delete it to recover without it"
    out: list[dict[str, Any] | None] = []
    for name in (PLAN_FILE, RECORD_FILE):
        p = Path(folder).expanduser() / name
        out.append(read_json_object(p, MAX_RECORD_BYTES, "saved record", fix) if p.is_file() else None)
    return out[0], out[1]


def recover_inputs(spec: RecoverSpec) -> list[tuple[str, str | None]]:
    """What ``compress recover`` reads from disk, which its ``--out`` must stay apart from."""
    return [("the model folder", spec.model), ("--teacher", spec.teacher), ("--calib", spec.calib)]


def recover_saved(spec: RecoverSpec, log: Callable[[str], None] = print) -> RunResult:
    """Recovery training of a saved model (stock or compress format) and an atomic export.

    The same :func:`recover` as ``compress run --recover-tokens``. Under ``accelerate launch`` every
    process loads the model and trains its shard of each global batch (``batch_size`` per device ×
    processes × ``grad_accum``); only the main process writes ``spec.out``, and every process
    returns after it has. Everything that can be refused (settings, output folder, model path and
    architecture, calibration source) is refused by the one preflight before any weight is loaded.
    The record (``result.record``) has the run record's schema; its ``export`` is set on the main
    process only.
    """
    from compress.io.export import check_output_dir, export_model
    from compress.io.loading import load_model
    from compress.model.footprint import footprint
    from compress.pipeline.preflight import preflight
    from compress.pipeline.record import empty_run_record, jsonable, versions
    from compress.pipeline.run import RunResult, check_finite_weights, kd_teacher
    from compress.plugins import get_registry

    check_output_dir(spec.out, spec.overwrite, inputs=recover_inputs(spec))
    prev_plan, prev_run = _previous_run(spec.model)  # a damaged record is refused now, not after training
    checked = preflight(method=None, model=spec.model, out=spec.out, overwrite=spec.overwrite, dtype=spec.dtype,
                        trust_remote_code=spec.trust_remote_code, recover_tokens=spec.tokens, recover_mode=spec.mode,
                        recover_settings=spec.settings, seed=spec.seed, calib=spec.calib, teacher=spec.teacher,
                        teacher_required=True)
    cfg, out = checked.recovery, checked.out
    t0 = time.perf_counter()
    loaded = load_model(spec.model, dtype=spec.dtype, trust_remote_code=spec.trust_remote_code)
    model, tok = loaded.model, loaded.tokenizer
    arch = get_registry().adapter_for(model)
    before = footprint(model, arch=arch)
    check_finite_weights(model, "of the input model")
    source = checked.calibration.with_tokenizer(tok)
    load_s = time.perf_counter() - t0

    teacher = kd_teacher(cfg, model, spec.teacher, dtype=spec.dtype, trust_remote_code=spec.trust_remote_code,
                         tokenizer=tok,
                         log=log if is_main_process() else (lambda m: None))
    res = recover(model, source, cfg, progress=spec.progress, teacher=teacher)
    del teacher
    model = res.model.to("cpu")
    check_finite_weights(model, "after recovery training")
    after = footprint(model, arch=get_registry().adapter_for(model))
    if after.params != before.params:  # pragma: no cover - recover() contract
        raise RuntimeError(f"recovery changed the parameter count ({before.params} -> {after.params})")
    record = empty_run_record()
    record.update({
        "model": {"source": loaded.source},
        "method": (prev_run or {}).get("method", "recover"),
        "target": (prev_run or {}).get("target"),
        "seed": spec.seed,
        "calib": spec.calib,
        "recovery": {"tokens": spec.tokens, "mode": spec.mode, "settings": dict(spec.settings),
                     **({"teacher": display_path(spec.teacher)} if spec.teacher else {})},
        "recovery_result": {**res.summary(), "losses": res.losses, "config": cfg.model_dump(mode="json")},
        "calibration": source.describe(),
        "dense": before.to_dict(),
        "achieved": after.to_dict(),
        "ratios": after.ratios(before),
        "notes": {"pruned_from": {k: (prev_run or {}).get(k) for k in ("model", "method", "target", "plan_hash")}
                  if prev_run else None},
        "timing_s": {"load": round(load_s, 3), "recover": round(res.wall_s, 3)},
        "versions": versions(),
    })
    record = jsonable(record)
    if is_main_process():
        r = record["recovery_result"]
        log(f"recovery: {res.steps} steps × {cfg.tokens_per_step(res.world_size):,} tokens "
            f"({res.world_size} process{'es' if res.world_size > 1 else ''}), loss {r['first_loss']}"
            f" → {r['last_loss']}")

    def export() -> None:
        plan = {k: v for k, v in (prev_plan or {}).items() if k not in ("format", "format_reason", "weights_sha256")}
        plan["recovery"] = res.summary()
        kind = "compress" if getattr(model.config, "model_type", None) == "compress" else "auto"
        info = export_model(model, tok, out, kind=kind, plan=plan, record=record, overwrite=spec.overwrite)
        record["export"] = info
        record["weights_sha256"] = info["weights_sha256"]

    on_main_process(export)
    return RunResult(model=model, tokenizer=tok, plan=(prev_plan or {}).get("plan") or {}, dense=before,
                     achieved=after, record=jsonable(record))
