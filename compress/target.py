"""Targets say what REMAINS after pruning, never what is removed.

=============  =====================================================
``2B``          2e9 parameters left (every unique tensor, tied once)
``350M``        3.5e8 parameters left (K, M, B, T suffixes; case-insensitive)
``1.5e9``       an absolute parameter count
``60%``         60 % of the dense parameters
``flops:50%``   50 % of the dense forward FLOPs per token
``kv:25%``      25 % of the dense KV-cache bytes per token
``params:2B``   explicit form of ``2B``
=============  =====================================================

``flops:`` and ``kv:`` also accept absolute values (``flops:1.2G`` per token, ``kv:16K`` bytes per token).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from compress.errors import TargetError

Metric = Literal["params", "flops", "kv"]
METRICS: tuple[str, ...] = ("params", "flops", "kv")
#: The footprint field each metric measures (:class:`compress.model.footprint.Footprint`).
FOOTPRINT_FIELD: dict[str, str] = {"params": "params", "flops": "flops_per_token", "kv": "kv_bytes_per_token"}
_SUFFIX = {"": 1.0, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
_NUM = re.compile(r"^(?P<num>[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)(?P<suf>[kKmMbBgGtT]?)$")
_HINT = "use e.g. 2B, 350M, 1.5e9, 60%, flops:50% or kv:25%"


@dataclass(frozen=True)
class Target:
    """A size goal. Exactly one of ``fraction`` (of dense) or ``absolute`` is set."""

    metric: Metric = "params"
    fraction: float | None = None
    absolute: float | None = None

    @classmethod
    def parse(cls, text: str | Target) -> Target:
        if isinstance(text, Target):
            return text
        if not isinstance(text, str) or not text.strip():
            raise TargetError(f"empty target; {_HINT}")
        raw = text.strip()
        metric: str = "params"
        body = raw
        if ":" in raw:
            metric, body = (s.strip() for s in raw.split(":", 1))
            metric = metric.lower()
            if metric not in METRICS:
                raise TargetError(f"unknown target metric {metric!r} in {raw!r}; metrics are {', '.join(METRICS)}")
        if body.startswith("-"):
            raise TargetError(f"target {raw!r} is negative; a target says what remains, so give a positive "
                              f"amount; {_HINT}")
        if body.endswith("%"):
            num = body[:-1].strip()
            try:
                pct = float(num)
            except ValueError:
                raise TargetError(f"target {raw!r} is not a number followed by %; {_HINT}") from None
            if not math.isfinite(pct) or pct <= 0:
                raise TargetError(f"target {raw!r} must be above 0% (it says what remains); {_HINT}")
            if pct > 100:
                raise TargetError(f"target {raw!r} is above 100% of the dense model; pruning can only shrink it")
            return cls(metric=metric, fraction=pct / 100.0)  # type: ignore[arg-type]
        m = _NUM.match(body)
        if not m:
            raise TargetError(f"cannot parse target {raw!r}; {_HINT}")
        value = float(m.group("num")) * _SUFFIX[m.group("suf").upper()]
        if not math.isfinite(value) or value <= 0:
            raise TargetError(f"target {raw!r} must be a positive amount that remains; {_HINT}")
        return cls(metric=metric, absolute=value)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ arithmetic
    def goal(self, dense_value: float) -> float:
        """The absolute value to stay at or below, given the dense model's value for this metric."""
        if self.fraction is not None:
            return self.fraction * dense_value
        assert self.absolute is not None
        return self.absolute

    def check_reachable(self, dense_value: float) -> None:
        """Refuse a goal above the dense model before any work starts (100% is a legal no-op)."""
        g = self.goal(dense_value)
        if g > dense_value:
            raise TargetError(
                f"target {self} ({_fmt(g)}) is above the dense model's {self.metric} ({_fmt(dense_value)}); "
                "choose a smaller target"
            )

    def __str__(self) -> str:
        if self.fraction is not None:
            pct = f"{_fmt_pct(self.fraction)}%"
            return pct if self.metric == "params" else f"{self.metric}:{pct}"
        assert self.absolute is not None
        body = _fmt(self.absolute)
        return body if self.metric == "params" else f"{self.metric}:{body}"


def _fmt_pct(fraction: float) -> str:
    """The shortest percentage that parses back to exactly ``fraction`` (``parse`` divides by 100)."""
    x = fraction * 100
    for digits in (10, 12, 15, 17):
        s = f"{x:.{digits}g}"
        if float(s) / 100.0 == fraction:
            return s
    up = down = x
    for _ in range(8):  # x/100 may round differently; a neighbouring float of x parses back
        up, down = math.nextafter(up, math.inf), math.nextafter(down, -math.inf)
        for c in (up, down):
            if c / 100.0 == fraction:
                return repr(c)
    return repr(x)


def _fmt(v: float) -> str:
    """Short, exactly re-parsable rendering: 2B, 350M, 1.5B, 123456."""
    for suf, mul in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if v >= mul:
            q = v / mul
            s = f"{q:.12g}"
            if float(s) * mul == v:
                return f"{s}{suf}"
    return f"{v:.17g}"
