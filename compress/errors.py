"""Exceptions with one-line, actionable messages.

Every error raised for bad input says what is wrong and how to fix it in one line; the CLI prints
``error: <message>`` and exits 2 (usage) or 1 (run failure) without a traceback unless ``-v``.
"""

from __future__ import annotations


class CompressError(Exception):
    """Base class. ``exit_code`` is what the CLI returns."""

    exit_code = 1


class UsageError(CompressError):
    """Bad input from the user: wrong target, path, option, config key..."""

    exit_code = 2


class Unsupported(UsageError):
    """The model or target cannot be handled by this method/adapter (raised before any work)."""


class TargetError(UsageError):
    """A target string that does not parse, or that a method cannot reach."""


class TargetUnreachable(TargetError):
    """A valid target below the smallest model this method's structures can cut (one head and one MLP
    channel per layer, one decoder layer, rank-1 factors): a limit of the method, which a benchmark suite
    records as the method refusing the cell, not as a broken suite."""


class CalibrationError(UsageError):
    """Calibration source missing, empty, or shorter than one block."""


class PluginError(CompressError):
    """A plugin failed to import, register or run."""


class NumericalError(CompressError):
    """NaN/inf found in weights or in collected statistics; the run stops.

    Exit code 2: non-finite values come from the input (weights, calibration text, a dtype too narrow
    for the activations) or from user settings (e.g. a recovery learning rate), not from a crash.
    """

    exit_code = 2


def one_line_validation(error: object, what: str) -> str:
    """A pydantic ``ValidationError`` as one line: unknown keys named, other problems as ``key: msg``."""
    parts = []
    for err in error.errors():  # type: ignore[attr-defined]
        loc = ".".join(str(x) for x in err.get("loc", ())) or what
        if err.get("type") == "extra_forbidden":
            parts.append(f"unknown key {loc!r}")
        else:
            parts.append(f"{loc}: {err.get('msg')}")
    return "; ".join(parts)
