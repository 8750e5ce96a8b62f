"""compress: structured pruning of causal language models, with measurements.

This module is the public façade. A method plugin imports everything it needs from here and nothing
from the submodules (a test enforces it for the built-in methods and the example plugin)::

    from compress import Pruner, PrunerConfig, Capabilities, PruneContext, PruneResult, hookimpl

A model already in memory is pruned with :func:`prune` (the Python API of ``compress run``)::

    result = compress.prune(model, tokenizer, method="transact", target="60%")
    result.save("out/pruned")

The contract is :class:`Pruner` (what a method declares and implements) and :class:`PruneContext`
(what the run gives it: the adapter, and the services that draw calibration blocks, run calibration
passes, the layer-wise engine, gradients and recovery training, with placement decided by the run).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that defines it. Imported on first use (PEP 562), so that
#: ``import compress`` — and ``compress --help``, ``--version``, ``methods``, ``plugins`` — do not
#: import torch or transformers.
_EXPORTS: dict[str, str] = {
    "ArchAdapter": "compress.model.adapter",
    "CalibrationError": "compress.errors",
    "Capabilities": "compress.pruner",
    "ChannelStats": "compress.calib.stats",
    "CompressConfig": "compress.modeling",
    "CompressError": "compress.errors",
    "CompressForCausalLM": "compress.modeling",
    "DrawnBlocks": "compress.pruner",
    "ExpertStats": "compress.calib.stats",
    "Experts": "compress.model.adapter",
    "Footprint": "compress.model.footprint",
    "LayerGeometry": "compress.model.adapter",
    "LayerPlan": "compress.model.plan",
    "LayerStep": "compress.calib.layerwise",
    "LayerwiseRunner": "compress.calib.layerwise",
    "LowRankLinear": "compress.modeling",
    "Member": "compress.model.structures",
    "NumericalError": "compress.errors",
    "Plan": "compress.model.plan",
    "PluginError": "compress.errors",
    "PruneContext": "compress.pruner",
    "PruneResult": "compress.pruner",
    "Pruner": "compress.pruner",
    "PrunerConfig": "compress.pruner",
    "RunResult": "compress.pipeline.run",
    "StructureGroup": "compress.model.structures",
    "Target": "compress.target",
    "TargetError": "compress.errors",
    "TargetUnreachable": "compress.errors",
    "Unsupported": "compress.errors",
    "UsageError": "compress.errors",
    "Widths": "compress.model.sizing",
    "adapter_for": "compress.model.adapter",
    "apply_plan": "compress.model.surgery",
    "count_params": "compress.model.footprint",
    "flops_per_token": "compress.model.footprint",
    "footprint": "compress.model.footprint",
    "get_registry": "compress.plugins",
    "hookimpl": "compress.hookspecs",
    "hookspec": "compress.hookspecs",
    "kv_bytes_per_token": "compress.model.footprint",
    "layer_attention_core_flops": "compress.model.footprint",
    "layer_kv_bytes_per_token": "compress.model.footprint",
    "linear_flops_per_token": "compress.model.footprint",
    "make_shortcut_layer": "compress.modeling",
    "plan_from_scores": "compress.model.sizing",
    "prune": "compress.pipeline.api",
    "record": "compress.calib.stats",
    "record_experts": "compress.calib.stats",
    "record_routing": "compress.calib.stats",
    "shape_plan": "compress.model.sizing",
    "slice_linear": "compress.model.surgery",
    "solve_uniform": "compress.model.sizing",
    "structure_group": "compress.model.structures",
    "unit_costs": "compress.model.sizing",
}

__all__ = [
    "ArchAdapter",
    "CalibrationError",
    "Capabilities",
    "ChannelStats",
    "CompressConfig",
    "CompressError",
    "CompressForCausalLM",
    "DrawnBlocks",
    "ExpertStats",
    "Experts",
    "Footprint",
    "LayerGeometry",
    "LayerPlan",
    "LayerStep",
    "LayerwiseRunner",
    "LowRankLinear",
    "Member",
    "NumericalError",
    "Plan",
    "PluginError",
    "PruneContext",
    "PruneResult",
    "Pruner",
    "PrunerConfig",
    "RunResult",
    "StructureGroup",
    "Target",
    "TargetError",
    "TargetUnreachable",
    "Unsupported",
    "UsageError",
    "Widths",
    "adapter_for",
    "apply_plan",
    "count_params",
    "flops_per_token",
    "footprint",
    "get_registry",
    "hookimpl",
    "hookspec",
    "kv_bytes_per_token",
    "layer_attention_core_flops",
    "layer_kv_bytes_per_token",
    "linear_flops_per_token",
    "make_shortcut_layer",
    "plan_from_scores",
    "prune",
    "record",
    "record_experts",
    "record_routing",
    "shape_plan",
    "slice_linear",
    "solve_uniform",
    "structure_group",
    "unit_costs",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'compress' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


def _register_models() -> None:
    """Register the ``compress`` model type with transformers' Auto classes, so that a folder in the
    compress format loads with ``AutoModelForCausalLM.from_pretrained`` after ``import compress``."""
    try:
        from compress.modeling import register
    except ImportError:  # compress.modeling is being imported right now: it registers itself when done
        return
    register()


class _AfterTransformers:
    """Runs :func:`_register_models` once ``transformers`` has been imported (now, if it already is):
    the registration needs transformers, and ``import compress`` must not import it."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "transformers":
            return None
        import importlib.util

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            _register_models()

        loader.exec_module = exec_module
        return spec


if "transformers" in sys.modules:
    _register_models()
elif not any(isinstance(f, _AfterTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterTransformers())

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from compress.calib.layerwise import LayerStep, LayerwiseRunner
    from compress.calib.stats import ChannelStats, ExpertStats, record, record_experts, record_routing
    from compress.errors import (
        CalibrationError,
        CompressError,
        NumericalError,
        PluginError,
        TargetError,
        TargetUnreachable,
        Unsupported,
        UsageError,
    )
    from compress.hookspecs import hookimpl, hookspec
    from compress.model.adapter import ArchAdapter, Experts, LayerGeometry, adapter_for
    from compress.model.footprint import (
        Footprint,
        count_params,
        flops_per_token,
        footprint,
        kv_bytes_per_token,
        layer_attention_core_flops,
        layer_kv_bytes_per_token,
        linear_flops_per_token,
    )
    from compress.model.plan import LayerPlan, Plan
    from compress.model.sizing import Widths, plan_from_scores, shape_plan, solve_uniform, unit_costs
    from compress.model.structures import Member, StructureGroup, structure_group
    from compress.model.surgery import apply_plan, slice_linear
    from compress.modeling import CompressConfig, CompressForCausalLM, LowRankLinear, make_shortcut_layer
    from compress.pipeline.api import prune
    from compress.pipeline.run import RunResult
    from compress.plugins import get_registry
    from compress.pruner import Capabilities, DrawnBlocks, PruneContext, Pruner, PrunerConfig, PruneResult
    from compress.target import Target
