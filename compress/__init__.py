"""compress: structured pruning of causal language models, with measurements.

Public API for method plugins (everything a plugin needs is importable from here)::

    from compress import Pruner, PrunerConfig, Capabilities, PruneContext, PruneResult, hookimpl
"""

from __future__ import annotations

from compress import modeling as _modeling
from compress.arch import ArchAdapter, LayerGeometry
from compress.errors import (
    CalibrationError,
    CompressError,
    NumericalError,
    PluginError,
    TargetError,
    Unsupported,
    UsageError,
)
from compress.graph import LayerPlan, Member, Plan, StructureGroup, apply_plan, slice_linear, structure_group
from compress.hookspecs import hookimpl, hookspec
from compress.measure import Footprint, count_params, flops_per_token, footprint, kv_bytes_per_token
from compress.modeling import CompressConfig, CompressForCausalLM, LowRankLinear, make_shortcut_layer
from compress.pruner import Capabilities, PruneContext, Pruner, PrunerConfig, PruneResult
from compress.sizing import Widths, plan_from_scores, shape_plan, solve_uniform
from compress.target import Target

__version__ = "0.1.0"

_modeling.register()

__all__ = [
    "ArchAdapter",
    "CalibrationError",
    "Capabilities",
    "CompressConfig",
    "CompressError",
    "CompressForCausalLM",
    "Footprint",
    "LayerGeometry",
    "LayerPlan",
    "LowRankLinear",
    "Member",
    "NumericalError",
    "Plan",
    "PluginError",
    "PruneContext",
    "PruneResult",
    "Pruner",
    "PrunerConfig",
    "StructureGroup",
    "Target",
    "TargetError",
    "Unsupported",
    "UsageError",
    "Widths",
    "apply_plan",
    "count_params",
    "flops_per_token",
    "footprint",
    "hookimpl",
    "hookspec",
    "kv_bytes_per_token",
    "make_shortcut_layer",
    "plan_from_scores",
    "shape_plan",
    "slice_linear",
    "solve_uniform",
    "structure_group",
]
