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
    state_dir: Path | None = None  # where an iterative method checkpoints (None: no checkpoints)
    state_key: str = ""  # identifies the run; a checkpoint written under another key is never resumed
    log: Callable[[str], None] = print
    progress: bool = True
    # Layer-wise calibration (compress.layerwise): layers run one at a time on ``device`` while the
    # weights stay where they are and the calibration activations are cached in CPU RAM, or in files
    # under ``offload_dir`` when it is set. Methods pass compress.layerwise.context_options(ctx) on.
    layerwise: bool = False
    offload_dir: Path | None = None

    def checkpoint(self, model: nn.Module, state: dict[str, Any]) -> None:
        """Save ``model``'s weights and the JSON-able ``state`` after a finished step (atomic; no-op
        without ``state_dir``). ``compress run --resume`` then continues from here."""
        if self.state_dir is not None:
            from compress.checkpoint import save_checkpoint

            save_checkpoint(self.state_dir, self.state_key, model, state)

    def resume_point(self):
        """The last checkpoint of THIS run (a :class:`compress.checkpoint.Checkpoint`), or None.

        To resume: cut the fresh model to the saved shapes (e.g. ``apply_plan`` with the saved plan),
        then ``checkpoint.load_into(model)`` restores the weights and the torch RNG state."""
        from compress.checkpoint import read_checkpoint

        ckpt = read_checkpoint(self.state_dir)
        return ckpt if ckpt is not None and ckpt.key == self.state_key else None


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

    def working_memory(self, model: nn.Module, target: Target, mem: Any) -> dict[str, int]:
        """Bytes this method keeps alive besides the dense weights, by item, for the estimated peak
        memory of ``--dry-run`` (formulas: :mod:`compress.memory`; ``mem`` is its ``MemoryModel`` of
        the dense ``model``). Default: calibration forwards of ``calib_samples`` × ``calib_seq_len``
        tokens in mini-batches of ``calib_batch_size``, layer by layer for sequential methods or
        ``--layerwise``. Override to add the method's own tensors (gradients, decompositions)."""
        if not self.capabilities.needs_calibration:
            return {}
        cfg = self.config
        return mem.calibration(cfg.calib_samples, cfg.calib_seq_len, cfg.calib_batch_size,
                               layerwise=mem.layerwise or self.capabilities.sequential)

    def prune(self, model: nn.Module, target: Target, ctx: PruneContext) -> PruneResult:
        raise NotImplementedError
