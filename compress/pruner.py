"""The contract between the core and a pruning method.

A method is a :class:`Pruner` subclass with a pydantic ``Config`` (unknown keys rejected), declared
:class:`Capabilities`, an optional :meth:`Pruner.check` that refuses unsupported inputs before any work,
and :meth:`Pruner.prune` which receives everything it may use in a :class:`PruneContext`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from compress.calib.sources import blocks_sha256
from compress.errors import Unsupported
from compress.io.limits import MAX_BATCH, MAX_CALIB_SAMPLES, MAX_CALIB_TOKENS, MAX_SEQ_LEN
from compress.io.settings import BoundedSettings
from compress.model.adapter import FEATURES, ArchAdapter, adapter_for
from compress.target import Target

ExportKind = Literal["stock", "compress", "auto"]


class PrunerConfig(BoundedSettings):
    """Base class of every method's options (:class:`BoundedSettings`): the calibration settings keep
    their bounds whatever a method redeclares, and ``calib_samples × calib_seq_len`` is within
    :data:`~compress.io.limits.MAX_CALIB_TOKENS` (the drawn blocks are one tensor)."""

    _int_bounds: ClassVar[dict[str, int]] = {
        "calib_samples": MAX_CALIB_SAMPLES, "calib_seq_len": MAX_SEQ_LEN, "calib_batch_size": MAX_BATCH}

    calib_samples: int = Field(128, ge=1, le=MAX_CALIB_SAMPLES, description="calibration sequences")
    calib_seq_len: int = Field(2048, ge=2, le=MAX_SEQ_LEN, description="tokens per calibration sequence")
    calib_batch_size: int = Field(4, ge=1, le=MAX_BATCH, description="sequences per calibration forward")

    @model_validator(mode="after")
    def _calib_budget(self) -> PrunerConfig:
        tokens = self.calib_samples * self.calib_seq_len
        if tokens > MAX_CALIB_TOKENS:
            raise ValueError(f"calib_samples × calib_seq_len = {tokens:,} tokens is above {MAX_CALIB_TOKENS:,}; "
                             "use fewer or shorter calibration sequences")
        return self


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
    #: Features of the family's layout the method needs (:data:`compress.model.adapter.FEATURES`); the
    #: base :meth:`Pruner.check` refuses a family whose adapter lacks one, before any weight is loaded.
    requires: tuple[str, ...] = ()
    #: Features without which the method runs only with some settings (its ``check`` names them).
    conditional: tuple[str, ...] = ()
    #: The method to suggest where this one is refused for a family (a registered method name).
    alternative: str = ""
    #: The method works on a model whose decoder layers are read from the files only when the
    #: layer-wise engine visits them (``--stream-weights``, :mod:`compress.io.streaming`): it reaches
    #: layer weights only through :meth:`PruneContext.layers` and prunes each layer in its step (or
    #: hands it back, :meth:`compress.LayerStep.release`). Outside the decoder layers the weights are in memory.
    streams_weights: bool = False

    def supports(self, adapter: type[ArchAdapter] | ArchAdapter) -> bool:
        """Whether a family (its adapter class or instance) has every feature this method needs."""
        return set(self.requires) <= set(adapter.features)

    def support(self, adapter: type[ArchAdapter] | ArchAdapter) -> Literal["yes", "settings", "no"]:
        """``yes``, ``settings`` (only with some settings: a missing :attr:`conditional` feature) or ``no``."""
        if not self.supports(adapter):
            return "no"
        return "yes" if set(self.conditional) <= set(adapter.features) else "settings"

    def to_dict(self) -> dict[str, Any]:
        return {
            "requires": list(self.requires),
            "conditional": list(self.conditional),
            "alternative": self.alternative,
            "structures": list(self.structures),
            "needs_calibration": self.needs_calibration,
            "needs_gradients": self.needs_gradients,
            "targets": list(self.targets),
            "export": self.export,
            "sequential": self.sequential,
            "streams_weights": self.streams_weights,
            "summary": self.summary,
            "reference": self.reference,
        }


@dataclass(frozen=True)
class DrawnBlocks:
    """One draw of calibration blocks: how many, how long, and the sha256 of the tokens."""

    samples: int
    seq_len: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "seq_len": self.seq_len, "sha256": self.sha256}


@dataclass
class PruneContext:
    """Everything a method may use, and the services it calls instead of the core's internals.

    No globals: the same context reproduces the same run. Placement is the context's business, never
    the method's: whole-model or layer-wise calibration, the compute ``device`` and where layer-wise
    activations are cached (CPU RAM or files under ``offload_dir``) come from the run's flags, and
    every service below honours them.

    * :meth:`draw` — seeded calibration blocks, capped at the model's context length; what was
      drawn is recorded (:attr:`drawn`), and the run's ``calibration_hash`` is of exactly those blocks;
    * :meth:`calibrate` — one pass over blocks that feeds :func:`compress.record` hooks;
    * :meth:`router_load` — a Mixture-of-Experts model's load per expert over some blocks;
    * :meth:`layers` — the layer-wise engine, for methods that change layer ``i`` before layer
      ``i + 1`` sees its inputs (SliceGPT, LoRAP);
    * :meth:`gradients` — LM-loss gradients of chosen parameters (whole or layer by layer);
    * :meth:`recovery` — training between steps (the run's recovery settings, or a default);
    * :meth:`checkpoint` / :meth:`resume_point` — resumable iterative methods;
    * :attr:`arch` (the adapter), :meth:`log`, :attr:`progress`.
    """

    arch: ArchAdapter
    tokenizer: Any = None
    calibration: Any = None  # compress.calib.sources.CalibrationSource; draw through draw()
    seed: int = 0
    device: str = "cpu"
    recover: Callable[..., Any] | None = None  # compress.train.recovery.Recovery of the run, if asked
    state_dir: Path | None = None  # where an iterative method checkpoints (None: no checkpoints)
    state_key: str = ""  # identifies the run; a checkpoint written under another key is never resumed
    log: Callable[[str], None] = print
    progress: bool = True
    # Layer-wise calibration (compress.calib.layerwise): layers run one at a time on ``device`` while
    # the weights stay where they are and the calibration activations are cached in CPU RAM, or in
    # files under ``offload_dir`` when it is set.
    layerwise: bool = False
    offload_dir: Path | None = None
    # Weight streaming (--stream-weights; compress.io.streaming.WeightStream): the decoder layers are on
    # the meta device until the layer-wise engine visits them (a method with
    # ``Capabilities.streams_weights``); None: the weights are in memory.
    stream: Any = None
    drawn: list[DrawnBlocks] = field(default_factory=list)

    @property
    def streaming(self) -> bool:
        """Whether the decoder layers' weights are read from the files as the engine visits them."""
        return self.stream is not None

    # ------------------------------------------------------------------ calibration data
    def context_length(self) -> int | None:
        """The model's context length (``max_position_embeddings``), if it has one."""
        n = getattr(self.arch.config, "max_position_embeddings", None)
        return int(n) if n else None

    def draw(self, samples: int, seq_len: int) -> torch.Tensor:
        """``samples`` seeded random windows of ``min(seq_len, context length)`` tokens, ``[N, T]``.

        Raises :class:`Unsupported` when the run has no calibration text."""
        seq_len = self._capped(seq_len)
        blocks = self.calibration.batches(int(samples), seq_len)
        self.drawn.append(DrawnBlocks(int(samples), seq_len, blocks_sha256(blocks)))
        return blocks

    def _capped(self, seq_len: int) -> int:
        """``seq_len`` capped at the context length; refuses a run without calibration text."""
        if self.calibration is None:
            raise Unsupported("this method needs calibration text; pass --calib FILE (or a dataset alias)")
        ctx_len = self.context_length()
        return min(int(seq_len), ctx_len) if ctx_len else int(seq_len)

    def held_out(self, samples: int, seq_len: int) -> torch.Tensor:
        """``samples`` windows of ``min(seq_len, context length)`` tokens of the calibration text that
        overlap none of the blocks :meth:`draw` returned so far (nor each other), ``[N, T]``: text to
        *score* a choice on that the method did not calibrate on. Recorded in :attr:`drawn` (and so in
        the ``calibration_hash``) like a draw."""
        seq_len = self._capped(seq_len)
        blocks = self.calibration.held_out(int(samples), seq_len, [(d.samples, d.seq_len) for d in self.drawn])
        self.drawn.append(DrawnBlocks(int(samples), seq_len, blocks_sha256(blocks)))
        return blocks

    def loss(self, model: nn.Module, batches: torch.Tensor, *, batch_size: int = 1) -> float:
        """Mean next-token NLL of ``model`` over ``batches`` (every position 1..T-1 of every block),
        without gradients, through the whole model on the device its weights are on."""
        from compress.calib.runner import mean_nll

        return mean_nll(model, batches, batch_size=batch_size)

    @property
    def calibration_hash(self) -> str | None:
        """sha256 of every block drawn so far (None when nothing was drawn): for one draw, the
        sha256 of ``"{N}x{T}:"`` and the int64 tokens; for several, of their hashes in order."""
        if not self.drawn:
            return None
        if len(self.drawn) == 1:
            return self.drawn[0].sha256
        return hashlib.sha256("".join(d.sha256 for d in self.drawn).encode()).hexdigest()

    # ------------------------------------------------------------------ passes over the blocks
    def _placement(self) -> dict[str, Any]:
        if self.layerwise:
            return {"device": self.device, "cache": self.offload_dir if self.offload_dir is not None else "cpu"}
        return {"device": None, "cache": "device"}  # everything stays where the model is

    def _bar(self) -> bool | None:
        return None if self.progress else False

    def calibrate(self, model: nn.Module, batches: torch.Tensor, *, batch_size: int,
                  description: str = "calibration", logits: bool = False) -> int:
        """Run ``model`` over ``batches`` without gradients (whole-model or layer-wise, as the run
        says) so that the hooks of :func:`compress.record` see every token. Returns tokens seen."""
        from compress.calib.runner import run_calibration

        return run_calibration(model, batches, batch_size=batch_size, progress=self._bar(),
                               description=description, layerwise=self.layerwise, logits=logits,
                               **self._placement(), **({"stream": self.stream} if self.stream is not None else {}))

    def router_load(self, model: nn.Module, batches: torch.Tensor, *, batch_size: int) -> dict[int, list[float]]:
        """Per Mixture-of-Experts layer of ``model``, the fraction of the routed (token, expert) pairs each
        expert received over ``batches`` (one :meth:`calibrate` pass with hooks on the routers; each
        layer's fractions sum to 1). Empty for a model without experts."""
        from compress.calib.stats import record_routing

        arch = adapter_for(model)
        experts = {str(i): ex for i in range(arch.num_layers) if (ex := arch.experts(i)) is not None}
        if not experts:
            return {}
        with record_routing(experts) as counts:
            self.calibrate(model, batches, batch_size=batch_size, description="router load")
        return {int(k): [float(x) for x in (c.double() / max(1, int(c.sum()))).tolist()] for k, c in counts.items()}

    def layers(self, model: nn.Module, batches: torch.Tensor, *, batch_size: int,
               description: str = "layers") -> Any:
        """The layer-wise engine over ``batches`` (a :class:`compress.LayerwiseRunner`): iterate it
        to get each decoder layer with its cached inputs, change the layer, and the engine computes
        the next layer's inputs with the changed one. Layer ``i`` is on the compute device while it
        is visited (layer-wise runs) or everything stays where the model is. With streamed weights
        (:attr:`streaming`) the engine reads layer ``i`` from the files just before its step."""
        from compress.calib.layerwise import LayerwiseRunner

        return LayerwiseRunner(model, batches, arch=self.arch, batch_size=batch_size, progress=self._bar(),
                               description=description, stream=self.stream, **self._placement())

    def gradients(self, model: nn.Module, params: list[nn.Parameter], tokens: torch.Tensor, *,
                  batch_size: int | None = None, first_order: bool = True,
                  fisher: bool = False) -> tuple[dict[nn.Parameter, torch.Tensor], dict[nn.Parameter, torch.Tensor]]:
        """LM-loss gradients of ``params`` over ``tokens`` and, with ``fisher``, the per-sample
        squared gradients (:func:`compress.calib.gradients.loss_gradients`), layer by layer when the
        run is layer-wise."""
        from compress.calib.gradients import loss_gradients

        return loss_gradients(model, params, tokens, first_order=first_order, fisher=fisher,
                              batch_size=batch_size, layerwise=self.layerwise, arch=self.arch, **self._placement())

    # ------------------------------------------------------------------ training between steps
    def recovery(self) -> Any:
        """The training a method may run between its steps: ``recovery(model, tokens=N, lr=x)``
        returns a result with ``.model``. The run's recovery (``--recover-tokens`` settings and text)
        when it has one, else full training on the calibration text. One data stream for every call,
        so successive calls train on fresh tokens (``.consumed`` counts what was used)."""
        if self.recover is not None:
            return self.recover
        if self.calibration is None:
            raise Unsupported("training between steps needs calibration text; pass --calib")
        from compress.train.recovery import Recovery, RecoveryConfig

        return Recovery(self.calibration, RecoveryConfig(tokens=1, mode="full", seed=self.seed), progress=self.progress)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, model: nn.Module, state: dict[str, Any]) -> None:
        """Save ``model``'s weights and the JSON-able ``state`` after a finished step (atomic; no-op
        without ``state_dir``). ``compress run --resume`` then continues from here."""
        if self.state_dir is not None:
            from compress.io.checkpoint import save_checkpoint

            save_checkpoint(self.state_dir, self.state_key, model, state)

    def resume_point(self):
        """The last checkpoint of THIS run (a :class:`compress.io.checkpoint.Checkpoint`), or None.

        To resume: cut the fresh model to the saved shapes (e.g. ``apply_plan`` with the saved plan),
        then ``checkpoint.load_into(model)`` restores the weights and the torch RNG state."""
        from compress.io.checkpoint import read_checkpoint

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
        cap = self.capabilities
        if cap.requires:
            arch = adapter_for(model)
            missing = [f for f in cap.requires if f not in arch.features]
            if missing:
                mt = getattr(arch.config, "model_type", type(model).__name__)
                alt = f"; use {cap.alternative} instead" if cap.alternative else ""
                needs = " and ".join(FEATURES[f] for f in missing)  # every missing feature, not just the first
                raise Unsupported(f"method {self.name!r} cannot prune {mt} models: it needs {needs}"
                                  f"{alt} (`compress methods --json` lists each method's families)")

    def plan_shapes(self, model: nn.Module, target: Target) -> dict:
        """Shape-only planning for ``--dry-run``: cut ``model`` (usually on the meta device) to the
        shapes :meth:`prune` would produce, without data, and return a summary of the chosen sizes."""
        raise Unsupported(f"method {self.name!r} has no shape-only planning (--dry-run)")

    def working_memory(self, model: nn.Module, target: Target, mem: Any) -> dict[str, int]:
        """Bytes this method keeps alive besides the dense weights, by item, for the estimated peak
        memory of ``--dry-run`` (formulas: :mod:`compress.model.memory`; ``mem`` is its ``MemoryModel`` of
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
