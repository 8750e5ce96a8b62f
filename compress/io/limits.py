"""Bounds on every number and input size compress accepts from a user, in one place.

A value far outside anything a real model or run uses is a typo or a hostile file. Without a bound it
reaches an allocation (10^12 calibration samples: an 8 TB index tensor), a loop that never ends (a
config with 10^9 layers builds 10^9 modules) or a parser that exhausts memory (a YAML alias bomb),
instead of a one-line refusal before any work. Every bound below sits well above what real models and
runs need; the numbers are documented here and enforced where the value enters:

* model configs (``config.json``, GGUF metadata): :data:`CONFIG_BOUNDS`, checked by
  :func:`compress.io.config_check.check_config_dict` before transformers builds anything;
* settings: :class:`compress.io.settings.BoundedSettings`, the base of every method's ``Config``
  (:class:`compress.pruner.PrunerConfig`) and of :class:`compress.train.recovery.RecoveryConfig` —
  integers within :data:`MAX_SETTING_INT` or their own bound, floats finite, booleans not numbers;
* CLI flags: the argparse types below (``--seed``, ``eval --limit``, counts);
* files: :data:`MAX_CONFIG_BYTES`, :data:`MAX_RECIPE_BYTES`, :data:`MAX_NESTING`,
  :func:`max_calib_bytes` (:mod:`compress.io.safe_io` reads them).

This module is torch-free: the CLI parser imports it.
"""

from __future__ import annotations

import argparse
import math
import os

# ------------------------------------------------------------------ model configs
#: Upper bounds of a model config's sizes (every one must also be a positive integer). The largest
#: public dense models are far below: Llama-3.1-405B has 126 layers, hidden 16384, 128 heads, MLP 53248,
#: vocabulary 128256; Gemma-3 has a 262144-token vocabulary; Llama-4 a 10M-token context.
CONFIG_BOUNDS: dict[str, int] = {
    "num_hidden_layers": 1024,
    "hidden_size": 1 << 16,
    "num_attention_heads": 4096,
    "num_key_value_heads": 4096,
    "head_dim": 4096,
    "intermediate_size": 1 << 20,
    "vocab_size": 1 << 22,
    "max_position_embeddings": 1 << 27,
}

# ------------------------------------------------------------------ settings
#: Calibration sequences of a method (``calib_samples``).
MAX_CALIB_SAMPLES = 1 << 20
#: Tokens per sequence (``calib_seq_len``, recovery ``seq_len``): a 1M-token context.
MAX_SEQ_LEN = 1 << 20
#: ``calib_samples × calib_seq_len``: the drawn blocks are one int64 tensor, 1 GiB at this bound.
MAX_CALIB_TOKENS = 1 << 27
#: Sequences per forward/step (``calib_batch_size``, recovery ``batch_size``, ``grad_accum``).
MAX_BATCH = 1 << 16
#: A recovery token budget (``--tokens``, ``--recover-tokens``, ``recover_tokens_per_shot``). The training
#: stream is materialised as int64 token blocks plus their indices (16 bytes a token): 16 GiB here.
MAX_RECOVER_TOKENS = 1 << 30
#: Any other integer setting (widths, counts, multiples): a 32-bit signed integer.
MAX_SETTING_INT = 2**31 - 1
#: Seeds: ``transformers.set_seed`` also seeds numpy, which takes 0 .. 2**32 - 1 only (torch would take
#: 64 bits).
MAX_SEED = 2**32 - 1

# ------------------------------------------------------------------ files
#: A model's ``config.json`` (real ones are a few KiB; id2label maps of classifiers reach hundreds).
MAX_CONFIG_BYTES = 16 << 20
#: A saved folder's ``compress_plan.json`` / ``compress_run.json``: they list every kept index, one per
#: line (a 405B-class plan is ~70 MB), so the cap is well above that.
MAX_RECORD_BYTES = 512 << 20
#: A recipe (YAML/JSON): a few dozen keys in practice.
MAX_RECIPE_BYTES = 1 << 20
#: Nesting depth of a recipe, a config.json or a JSON calibration record (real ones: under 6).
MAX_NESTING = 32
#: Default cap on the calibration text read from files (``--calib FILE|DIR``): 256 MiB is about 64M
#: tokens, far more than any calibration (128 × 4096 = 0.5M tokens) and tokenised in memory as
#: Python ints (~2.3 GB at the cap). ``COMPRESS_MAX_CALIB_BYTES`` raises it (e.g. recovery corpora).
DEFAULT_MAX_CALIB_BYTES = 256 << 20
#: A safetensors header (its JSON tensor table); safetensors itself refuses more than 100 MB.
MAX_SAFETENSORS_HEADER = 100_000_000


def max_calib_bytes() -> int:
    """The calibration text cap: ``$COMPRESS_MAX_CALIB_BYTES`` (bytes) when set and valid, else the default."""
    raw = os.environ.get("COMPRESS_MAX_CALIB_BYTES", "").strip()
    if raw.isdigit() and int(raw) > 0:
        return int(raw)
    return DEFAULT_MAX_CALIB_BYTES


def human_bytes(n: int) -> str:
    for suf, m in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= m:
            return f"{n / m:.0f} {suf}" if n % m == 0 else f"{n / m:.1f} {suf}"
    return f"{n} bytes"


# ------------------------------------------------------------------ argparse types
def _int_text(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def seed(text: str) -> int:
    """``--seed``: an integer in 0 .. :data:`MAX_SEED`."""
    value = _int_text(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text} is outside 0..{MAX_SEED} (2**32 - 1); use a smaller seed")
    return value


def count(low: int, high: int):
    """An argparse type: an integer in ``low .. high`` (``1000000`` or ``1e6`` style both accepted)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            try:
                f = float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
            if not math.isfinite(f) or f != int(f):
                raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
            value = int(f)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is outside {low}..{high:,}")
        return value

    return parse


#: What :func:`count_or_all` returns for ``all`` (no limit): distinct from ``None`` (no override).
ALL = "all"


def count_or_all(low: int, high: int):
    """An argparse type: :func:`count`'s integer, or ``all`` (:data:`ALL`) to lift a limit."""
    inner = count(low, high)

    def parse(text: str) -> int | str:
        return ALL if text.strip().lower() == ALL else inner(text)

    return parse


def check_limit(value: float | int | None) -> int | float | None:
    """An lm-eval ``limit``: a count >= 1 (an integer) or a fraction in (0, 1); None is no limit.
    Raises ``ValueError`` with the reason otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"limit {value!r} is not a number; give a count (e.g. 100) or a fraction (e.g. 0.1)")
    if value <= 0:
        raise ValueError(f"limit {value:g} must be positive: a count of examples per task (e.g. 100) or a "
                         "fraction below 1 (e.g. 0.1); omit it for every example")
    if value >= 1:
        if value != int(value):
            raise ValueError(f"limit {value:g} is neither a whole count nor a fraction below 1")
        if value > MAX_SETTING_INT:
            raise ValueError(f"limit {value:g} is above {MAX_SETTING_INT}; omit it for every example")
        return int(value)
    return float(value)


def limit(text: str) -> int | float:
    """``--limit``: :func:`check_limit` of the text as an argparse type."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    try:
        return check_limit(value)  # type: ignore[return-value]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
