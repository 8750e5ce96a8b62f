"""The contract between the core and a pruning method.

A method is a :class:`Pruner` subclass with a pydantic ``Config`` (unknown keys rejected), declared
:class:`Capabilities`, an optional :meth:`Pruner.check` that refuses unsupported inputs before any work,
and :meth:`Pruner.prune` which receives everything it may use in a :class:`PruneContext`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from compress.arch import ArchAdapter
from compress.errors import Unsupported
from compress.target import Target

ExportKind = Literal["stock", "compress", "auto"]


class PrunerConfig(BaseModel):
    """Base class of every method's options. Unknown keys are an error, never silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    calib_samples: int = Field(128, ge=1, description="calibration sequences")
    calib_seq_len: int = Field(2048, ge=2, description="tokens per calibration sequence")
    calib_batch_size: int = Field(4, ge=1, description="sequences per calibration forward")


@dataclass(frozen=True)
class Capabilities:
    """What a method prunes and needs; shown by ``compress methods`` and used to refuse bad runs early."""

    structures: tuple[str, ...]
    needs_calibration: bool = True
    needs_gradients: bool = False
    targets: tuple[str, ...] = ("params",)
    export: ExportKind = "auto"
    sequential: bool = False
    summary: str = ""
    reference: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "structures": list(self.structures),
            "needs_calibration": self.needs_calibration,
            "needs_gradients": self.needs_gradients,
            "targets": list(self.targets),
            "export": self.export,
            "sequential": self.sequential,
            "summary": self.summary,
            "reference": self.reference,
        }


@dataclass
class PruneContext:
    """Everything a method may use. No globals: the same context reproduces the same run."""

    arch: ArchAdapter
    tokenizer: Any = None
    calibration: Any = None  # compress.calibration.CalibrationSource
    seed: int = 0
    device: str = "cpu"
    recover: Callable[[nn.Module, int], nn.Module] | None = None  # (model, tokens) -> model
    state_dir: Path | None = None  # where an iterative method may checkpoint (resume)
    log: Callable[[str], None] = print
    progress: bool = True


@dataclass
class PruneResult:
    """The pruned model and a JSON-able plan (kept indices / ranks per layer) plus free-form notes."""

    model: nn.Module
    plan: dict
    export: ExportKind = "auto"
    notes: dict = field(default_factory=dict)


class Pruner:
    """Base class of every pruning method. Subclass, set the class attributes, implement :meth:`prune`."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[PrunerConfig]] = PrunerConfig
    capabilities: ClassVar[Capabilities] = Capabilities(structures=())

    def __init__(self, config: PrunerConfig | dict | None = None):
        if isinstance(config, PrunerConfig):
            self.config = self.Config.model_validate(config.model_dump())
        else:
            self.config = self.Config.model_validate(config or {})

    def check(self, model: nn.Module, target: Target) -> None:
        """Raise :class:`Unsupported` (one line: why + how to fix) before any work starts."""
        if target.metric not in self.capabilities.targets:
            raise Unsupported(
                f"method {self.name!r} cannot meet a {target.metric!r} target; "
                f"it supports {', '.join(self.capabilities.targets)}"
            )

    def plan_shapes(self, model: nn.Module, target: Target) -> dict:
        """Shape-only planning for ``--dry-run``: cut ``model`` (usually on the meta device) to the
        shapes :meth:`prune` would produce, without data, and return a summary of the chosen sizes."""
        raise Unsupported(f"method {self.name!r} has no shape-only planning (--dry-run)")

    def prune(self, model: nn.Module, target: Target, ctx: PruneContext) -> PruneResult:
        raise NotImplementedError
