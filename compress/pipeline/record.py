"""The run record: one versioned JSON schema for ``compress run`` (``compress_run.json``) and
``compress bench`` (each line of ``records.jsonl``).

A bench record is a run record plus the keys of the benchmark cell (:data:`BENCH_KEYS` in
:mod:`compress.bench.record`): the shared keys have the same names and meanings in both, so a
reader never maps one onto the other.
"""

from __future__ import annotations

import json
import math
import platform
from typing import Any

#: Version of the record schema. ``compress.bench/1`` records (before the run and bench records
#: were one schema) carry the same keys except ``layerwise``, ``export``, ``weights_sha256`` and
#: ``peak_rss_increase_bytes``, and their ``dense``/``achieved`` hold fewer footprint fields.
SCHEMA = "compress.record/2"
COMPATIBLE_SCHEMAS = ("compress.record/2", "compress.bench/1")

#: Keys of every run record, with their meaning.
RUN_RECORD_KEYS: dict[str, str] = {
    "schema": "the schema version (SCHEMA)",
    "model": "{source: what --model named}; a bench record adds the suite's model entry (id, path, dtype, hash)",
    "method": "the method's registered name",
    "plugin": "{distribution, version} that provides the method",
    "settings": "the method settings as given (--set, recipe)",
    "config": "every setting of the method after defaults",
    "target": "the target, canonical text (e.g. 60%, flops:50%)",
    "goal": "the absolute value of the target's metric to stay at or below",
    "seed": "the run's seed",
    "calib": "the calibration source as asked (None: the default)",
    "calibration": "the calibration source as read (spec, chars, tokens, seed)",
    "calibration_hash": "sha256 of the calibration blocks the method drew (None: it drew none)",
    "plan_hash": "sha256 of the plan (kept indices / ranks per layer)",
    "recipe": "the resolved recipe, which reproduces the run",
    "dense": "footprint of the dense model (params, flops_per_token, kv_bytes_per_token, layers, ...)",
    "achieved": "footprint of the pruned model",
    "ratios": "achieved / dense for params, flops, kv",
    "quality": "perplexity before -> after on a held-out slice ({text, dense, pruned, ratio}; None: not measured)",
    "recovery": "recovery asked: {tokens, mode, settings}",
    "recovery_result": "recovery done: tokens, steps, wall_s, world_size, trained_params, final_loss (None: none)",
    "notes": "the method's own notes (widths, shots, calibration sizes)",
    "timing_s": "seconds per phase: load, prune (a bench record adds eval, latency, run, cell)",
    "peak_rss_bytes": "peak resident memory of the process (a bench record: the highest phase)",
    "peak_rss_increase_bytes": "how far the peak rose above the RSS when pruning started",
    "peak_rss": "peak RSS per phase",
    "layerwise": "whether calibration ran one decoder layer at a time",
    "export": "{kind, reason, path} of the saved folder (None: not saved)",
    "weights_sha256": "sha256 of the saved weights (None: not saved)",
    "versions": "installed versions of the pinned stack",
}

#: Keys a run record has only in some runs (absent, not None, elsewhere), with their meaning.
OPTIONAL_RUN_RECORD_KEYS: dict[str, str] = {
    "distributed": "a run under accelerate launch (compress.pipeline.handoff): {world_size, mode (prune_once: rank 0 "
                   "pruned, the others loaded its staged model; every_rank), pruned_on, pruned_weights_sha256, "
                   "training_tokens_sha256, ranks: one entry per process (what it loaded, seconds before training, "
                   "peak RSS, the hashes it trained from)}",
}

#: Distributions of the pinned stack (constraints.txt) whose installed versions every record carries,
#: besides python, torch and transformers; the key is the name with "-" as "_".
STACK = ("torch-pruning", "lm_eval", "peft", "accelerate", "datasets", "huggingface_hub", "tokenizers",
         "safetensors", "pluggy", "pydantic", "numpy", "gguf", "compress", "compress-transact", "compress-baselines")


def versions() -> dict[str, str]:
    """Installed versions of python, torch, transformers and :data:`STACK`."""
    from importlib.metadata import version

    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    for dist in STACK:
        try:
            out[dist.replace("-", "_")] = version(dist)
        except Exception:  # noqa: BLE001
            out[dist.replace("-", "_")] = "absent"
    return out


def empty_run_record() -> dict[str, Any]:
    """A run record with every key of :data:`RUN_RECORD_KEYS` and nothing measured."""
    rec: dict[str, Any] = dict.fromkeys(RUN_RECORD_KEYS)
    rec.update({"schema": SCHEMA, "timing_s": {}, "peak_rss": {}, "settings": {}})
    return rec


def jsonable(obj: Any) -> Any:
    """A JSON round trip: NaN/inf become None, unknown objects their ``str``."""

    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.loads(json.dumps(clean(obj), default=str))
