"""Model classes for shapes stock configs cannot express; registered with the Auto classes on import."""

from __future__ import annotations

import contextlib
from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM

from compress.modeling.modeling_compress import (
    COMPRESS_MODEL_TYPE,
    CompressConfig,
    CompressForCausalLM,
    LowRankLinear,
    family_classes,
    make_shortcut_layer,
)

MODELING_FILE = Path(__file__).with_name("modeling_compress.py")


def register() -> None:
    """Register the ``compress`` model type with transformers' Auto classes (idempotent)."""
    with contextlib.suppress(ValueError):  # already registered
        AutoConfig.register(COMPRESS_MODEL_TYPE, CompressConfig)
    with contextlib.suppress(ValueError):
        AutoModelForCausalLM.register(CompressConfig, CompressForCausalLM)


register()  # importing this package registers the compress model type

__all__ = [
    "COMPRESS_MODEL_TYPE",
    "MODELING_FILE",
    "CompressConfig",
    "CompressForCausalLM",
    "LowRankLinear",
    "family_classes",
    "make_shortcut_layer",
    "register",
]
