"""compress: structured pruning of causal language models, with measurements.

This module is the public façade. A method plugin imports everything it needs from here and nothing
from the submodules (a test enforces it for the built-in methods and the example plugin)::

    from compress import Pruner, PrunerConfig, Capabilities, PruneContext, PruneResult, hookimpl

The contract is :class:`Pruner` (what a method declares and implements) and :class:`PruneContext`
(what the run gives it: the adapter, and the services that draw calibration blocks, run calibration
passes, the layer-wise engine, gradients and recovery training, with placement decided by the run).
"""

from __future__ import annotations

from compress import modeling as _modeling
from compress.calib.layerwise import LayerStep, LayerwiseRunner
from compress.calib.stats import ChannelStats, record
from compress.errors import (
    CalibrationError,
    CompressError,
    NumericalError,
    PluginError,
    TargetError,
    Unsupported,
    UsageError,
)
from compress.hookspecs import hookimpl, hookspec
from compress.model.adapter import ArchAdapter, LayerGeometry, adapter_for
from compress.model.footprint import (
    Footprint,
    count_params,
    flops_per_token,
    footprint,
    kv_bytes_per_token,
    linear_flops_per_token,
)
from compress.model.plan import LayerPlan, Plan
from compress.model.sizing import Widths, plan_from_scores, shape_plan, solve_uniform, unit_costs
from compress.model.structures import Member, StructureGroup, structure_group
from compress.model.surgery import apply_plan, slice_linear
from compress.modeling import CompressConfig, CompressForCausalLM, LowRankLinear, make_shortcut_layer
from compress.plugins import get_registry
from compress.pruner import Capabilities, DrawnBlocks, PruneContext, Pruner, PrunerConfig, PruneResult
from compress.target import Target

__version__ = "0.1.0"

_modeling.register()

__all__ = [
    "ArchAdapter",
    "CalibrationError",
    "Capabilities",
    "ChannelStats",
    "CompressConfig",
    "CompressError",
    "CompressForCausalLM",
    "DrawnBlocks",
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
    "StructureGroup",
    "Target",
    "TargetError",
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
    "linear_flops_per_token",
    "make_shortcut_layer",
    "plan_from_scores",
    "record",
    "shape_plan",
    "slice_linear",
    "solve_uniform",
    "structure_group",
    "unit_costs",
]
