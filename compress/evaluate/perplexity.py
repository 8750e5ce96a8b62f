"""Perplexity with the pruning papers' WikiText-2 protocol.

As in GPTQ / SparseGPT / SliceGPT / LLM-Pruner: the whole split is joined with ``"\\n\\n"``,
tokenised once without special tokens, cut into non-overlapping windows of ``seq_len`` tokens (the
tail is dropped), and every window predicts its tokens 1..L-1 from its own prefix.
``ppl = exp(mean NLL over all predicted tokens)``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch

from compress.assets import data_text, wikitext2
from compress.calib.runner import nll_sum
from compress.errors import UsageError
from compress.progress import progress_bar

#: Text sources :func:`ppl_text` knows, relative to ``$COMPRESS_ASSETS``.
PPL_DATASETS: tuple[str, ...] = ("wikitext2", "wikitext2-valid", "tinystories")


def wikitext2_text(split: Literal["test", "valid"] = "test") -> str:
    """WikiText-2 (raw) ``split`` joined the way the pruning papers join the HF dataset rows
    (:func:`compress.assets.wikitext2`: ``$COMPRESS_ASSETS`` or the package's own copy)."""
    return wikitext2(split)[0]


def ppl_text(source: str) -> str:
    """Text for a perplexity source: one of :data:`PPL_DATASETS` or a path to a UTF-8 text file."""
    if source == "wikitext2":
        return wikitext2_text("test")
    if source == "wikitext2-valid":
        return wikitext2_text("valid")
    if source == "tinystories":
        return data_text("tinystories/tinystories_val.txt")[0]
    path = Path(source).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise UsageError(
        f"unknown perplexity source {source!r}; use one of {', '.join(PPL_DATASETS)} or a text file path"
    )


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence "sequence longer than the model maximum" while tokenising a whole corpus at once."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    text: str,
    *,
    seq_len: int = 2048,
    batch_size: int = 1,
    max_windows: int | None = None,
    add_bos: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of ``model`` on ``text`` over non-overlapping windows of ``seq_len`` tokens.

    ``text`` is tokenised once with ``add_special_tokens=False``; the tail shorter than a window is
    dropped. Each window predicts its tokens 1..L-1 from its own prefix (no context carried over),
    and ``ppl = exp(mean NLL)`` over all predicted tokens of all windows, accumulated in fp32/fp64.

    With ``add_bos=True`` every window is ``[BOS] + seq_len - 1`` text tokens and all its text tokens
    are predicted (the input stays ``seq_len`` long). ``max_windows`` evaluates only the first N
    windows (a quick, partial figure: the result then has ``"partial": True``).

    Returns ``{"ppl", "nll", "seq_len", "windows", "tokens", "predicted", "total_windows",
    "partial", "add_bos"}`` where ``tokens`` counts the whole text and ``predicted`` the tokens scored.
    """
    if seq_len < 2:
        raise UsageError(f"seq_len must be at least 2, got {seq_len}")
    if batch_size < 1:
        raise UsageError(f"batch_size must be at least 1, got {batch_size}")
    if max_windows is not None and max_windows < 1:
        raise UsageError(f"max_windows must be at least 1 (or None for all), got {max_windows}")
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(max_pos, int) and seq_len > max_pos:
        raise UsageError(
            f"seq_len={seq_len} exceeds the model's max_position_embeddings={max_pos}; use a shorter seq_len"
        )

    with _quiet_transformers():
        ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    ids = torch.tensor(ids, dtype=torch.long)
    n_tokens = int(ids.numel())

    prefix: list[int] = []
    if add_bos:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise UsageError("add_bos=True but the tokenizer has no bos_token_id")
        prefix = [int(bos)]
    body = seq_len - len(prefix)
    total_windows = n_tokens // body
    if total_windows == 0:
        raise UsageError(
            f"the text has {n_tokens} tokens, fewer than one window of seq_len={seq_len}; "
            "use a shorter seq_len or a longer text"
        )
    windows = total_windows if max_windows is None else min(max_windows, total_windows)
    blocks = ids[: windows * body].view(windows, body)
    if prefix:
        blocks = torch.cat([torch.full((windows, 1), prefix[0], dtype=torch.long), blocks], dim=1)

    # fp32 log-softmax even for bf16/fp16 models; sums per batch, accumulated in fp64
    with eval_mode(model), progress_bar(progress, windows, f"perplexity @{seq_len}") as advance:
        total, predicted = nll_sum(model, blocks, batch_size=batch_size, advance=advance)

    nll = total / predicted
    return {
        "ppl": math.exp(nll),
        "nll": nll,
        "seq_len": seq_len,
        "windows": windows,
        "total_windows": total_windows,
        "partial": windows < total_windows,
        "tokens": n_tokens,
        "predicted": predicted,
        "add_bos": add_bos,
    }
