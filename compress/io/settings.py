"""The base of every settings model a user fills: method Configs (:class:`compress.pruner.PrunerConfig`)
and recovery training (:class:`compress.train.recovery.RecoveryConfig`).

Numbers are bounded here, once, for all of them (:mod:`compress.io.limits`): a value from a recipe,
``--set key=value`` or the Python API that no real run uses is refused with one line instead of reaching
an allocation or a NaN.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from compress.io.limits import MAX_SETTING_INT

__all__ = ["BoundedSettings"]


def _accepts_bool(annotation: Any) -> bool:
    """Whether a field's type admits ``True``/``False`` (bool, Any, a Literal of booleans, a union with one)."""
    if annotation is bool or annotation is Any:
        return True
    origin = get_origin(annotation)
    if origin is Literal:
        return any(isinstance(a, bool) for a in get_args(annotation))
    return any(_accepts_bool(a) for a in get_args(annotation))


class BoundedSettings(BaseModel):
    """Base of every settings model a user fills (method Configs, recovery): numbers are bounded here,
    once (:mod:`compress.io.limits`). Unknown keys are an error, never silently ignored; floats must be
    finite (``alpha=Infinity`` is refused); a boolean is not a number (``shots=true`` is refused, where
    pydantic would read 1); every integer is within ±:data:`~compress.io.limits.MAX_SETTING_INT` unless a
    subclass bounds it more tightly (:attr:`_int_bounds`, or ``Field(le=...)``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    #: Upper bounds by field name, applied whatever a subclass redeclares.
    _int_bounds: ClassVar[dict[str, int]] = {}

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name in cls.model_fields \
                and not _accepts_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"must be a number, not the boolean {str(value).lower()}")
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _bounded_ints(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            name = info.field_name or ""
            f = cls.model_fields.get(name)
            explicit = f is not None and any(hasattr(m, "le") or hasattr(m, "lt") for m in f.metadata)
            high = cls._int_bounds.get(name, value if explicit else MAX_SETTING_INT)  # Field(le=...) checked it
            if value > high:
                raise ValueError(f"{value:,} is above the limit of {high:,} (compress.io.limits)")
            if value < -MAX_SETTING_INT:
                raise ValueError(f"{value:,} is below the limit of {-MAX_SETTING_INT:,} (compress.io.limits)")
        return value
