"""Target syntax: what remains after pruning."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compress.errors import TargetError, UsageError
from compress.target import Target


@pytest.mark.parametrize(
    ("text", "metric", "fraction", "absolute"),
    [
        ("2B", "params", None, 2e9),
        ("2b", "params", None, 2e9),
        ("350M", "params", None, 3.5e8),
        ("1.5e9", "params", None, 1.5e9),
        ("135m", "params", None, 1.35e8),
        ("16K", "params", None, 16e3),
        ("60%", "params", 0.6, None),
        (" 60 % ", "params", 0.6, None),
        ("100%", "params", 1.0, None),
        ("flops:50%", "flops", 0.5, None),
        ("FLOPS:50%", "flops", 0.5, None),
        ("kv:25%", "kv", 0.25, None),
        ("params:2B", "params", None, 2e9),
        ("flops:1.2G", "flops", None, 1.2e9),
        ("kv:16K", "kv", None, 16e3),
    ],
)
def test_parse(text, metric, fraction, absolute):
    t = Target.parse(text)
    assert t.metric == metric
    if fraction is None:
        assert t.fraction is None
        assert t.absolute == pytest.approx(absolute, rel=1e-15)
    else:
        assert t.absolute is None
        assert t.fraction == pytest.approx(fraction, rel=1e-15)


def test_explicit_params_equals_implicit():
    assert Target.parse("params:2B") == Target.parse("2B") == Target.parse("2e9") == Target.parse("2000M")
    assert Target.parse(Target.parse("60%")) == Target.parse("60%")


@pytest.mark.parametrize(
    ("text", "rendered"),
    [("2B", "2B"), ("350M", "350M"), ("1.5e9", "1.5B"), ("60%", "60%"), ("flops:50%", "flops:50%"),
     ("kv:25%", "kv:25%"), ("params:2B", "2B"), ("123", "123"), ("kv:16K", "kv:16K")],
)
def test_str_round_trips(text, rendered):
    t = Target.parse(text)
    assert str(t) == rendered
    assert Target.parse(str(t)) == t


@pytest.mark.parametrize(
    "text",
    ["abc", "2X", "2BB", "50%%", "%", "flops:", "flops:abc", "-5%", "-2B", "0", "0%", "0.0B", "flops:0%",
     "150%", "100.0001%", "kv:101%", "speed:50%", "latency:2B", "", "   ", "nan%", "inf%", "1e999",
     "2 B x", "1,000"],
)
def test_rejects_bad_targets(text):
    with pytest.raises(TargetError) as ei:
        Target.parse(text)
    msg = str(ei.value)
    assert msg and "\n" not in msg  # one line, shown as "error: <msg>" by the CLI


def test_rejects_non_string():
    with pytest.raises(TargetError):
        Target.parse(None)  # type: ignore[arg-type]


def test_error_messages_are_actionable():
    with pytest.raises(TargetError, match="metrics are params, flops, kv"):
        Target.parse("speed:50%")
    with pytest.raises(TargetError, match="above 100%"):
        Target.parse("150%")
    with pytest.raises(TargetError, match="e.g. 2B"):
        Target.parse("abc")


def test_target_error_is_usage_error_exit_2():
    assert issubclass(TargetError, UsageError)
    assert TargetError.exit_code == 2


def test_goal():
    assert Target.parse("60%").goal(1000) == pytest.approx(600)
    assert Target.parse("flops:50%").goal(4e9) == pytest.approx(2e9)
    assert Target.parse("2B").goal(7e9) == 2e9  # absolute: independent of dense
    assert Target.parse("kv:16K").goal(1.0) == 16e3


def test_check_reachable():
    Target.parse("2B").check_reachable(7e9)
    Target.parse("60%").check_reachable(1000)
    with pytest.raises(TargetError, match="above the dense"):
        Target.parse("8B").check_reachable(7e9)
    with pytest.raises(TargetError, match="choose a smaller target"):
        Target.parse("params:135M").check_reachable(134_515_008)


# ----------------------------------------------------------------------------------- properties
_pct = st.floats(min_value=1e-6, max_value=100.0, allow_nan=False, allow_infinity=False, exclude_min=False)


@settings(max_examples=300, deadline=None)
@given(_pct, st.sampled_from(["", "params:", "flops:", "kv:"]))
def test_percent_round_trip_property(pct, prefix):
    t = Target.parse(f"{prefix}{pct!r}%")
    assert t.fraction is not None and 0 < t.fraction <= 1
    again = Target.parse(str(t))
    assert again == t, (pct, str(t))
    assert str(again) == str(t)


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=1e-3, max_value=1e15, allow_nan=False, allow_infinity=False),
       st.sampled_from(["", "params:", "flops:", "kv:"]))
def test_absolute_round_trip_property(value, prefix):
    t = Target.parse(f"{prefix}{value!r}")
    assert t.absolute == value
    again = Target.parse(str(t))
    assert again == t, (value, str(t))


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1, max_value=10**13), st.sampled_from(["", "K", "M", "B", "T"]))
def test_suffix_round_trip_property(n, suf):
    t = Target.parse(f"{n}{suf}")
    again = Target.parse(str(t))
    assert again == t
    assert math.isclose(again.absolute, n * {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}[suf], rel_tol=1e-15)
