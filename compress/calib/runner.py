"""The calibration pass: the model over calibration blocks in mini-batches, without gradients.

Whole-model (the decoder stack only, no logits) or, with ``layerwise=True``, one decoder layer at a
time through :class:`compress.calib.layerwise.LayerwiseRunner`. The hooks of
:func:`compress.calib.stats.record` see the same activations either way.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from compress.calib.stats import CURRENT_MASK, check_batches
from compress.progress import progress_bar


def _model_device(model: nn.Module) -> torch.device:
    try:
        emb = model.get_input_embeddings()
        if emb is not None:
            return emb.weight.device
    except (AttributeError, NotImplementedError):
        pass
    return next(model.parameters()).device


def run_calibration(
    model: nn.Module,
    batches: torch.Tensor,
    *,
    batch_size: int = 8,
    attention_mask: torch.Tensor | None = None,
    progress: bool | Callable[[int, int], None] | None = None,
    description: str = "calibration",
    layerwise: bool = False,
    device: str | torch.device | None = None,
    cache: str | os.PathLike = "cpu",
    logits: bool = False,
    stream: Any = None,
) -> int:
    """Run ``model(input_ids=...)`` over ``batches`` (``[N, T]``) in mini-batches, without gradients.

    ``logits=False`` (default) runs only the decoder stack (``model.get_decoder()``) when the model
    has one: statistics of the decoder layers are the same, and the ``[batch, T, vocab]`` logits —
    the largest activation of a small-model forward (400 MB for 4 × 512 tokens of a 49k vocabulary)
    — are never allocated. ``logits=True`` runs the whole model (hooks on the lm_head fire).

    Used inside :func:`record` to feed the hooks. ``attention_mask`` (``[N, T]``, 1 = real token)
    is passed to the model and also excludes padded positions from the statistics. ``progress``:
    ``True``/``False`` for a rich progress bar, a callable ``(done, total)`` called after each
    mini-batch (each layer when layer-wise), or ``None`` (default) for a bar only when there are
    more than 4 of them. Returns the number of (unmasked) tokens processed.

    ``layerwise=True`` runs the same mini-batches one decoder layer at a time through
    :class:`compress.calib.layerwise.LayerwiseRunner` (layers computed on ``device``, hidden states cached
    in ``cache``: ``"cpu"``, ``"device"`` or a folder); the hooks see the same activations, the
    lm_head never runs. ``stream`` (layer-wise only): where the engine reads each layer's weights
    (:class:`compress.io.streaming.WeightStream`); the layers read stay in memory.
    """
    check_batches(batches, attention_mask, batch_size)
    if layerwise:
        from compress.calib.layerwise import LayerwiseRunner

        with LayerwiseRunner(model, batches, batch_size=batch_size, attention_mask=attention_mask, device=device,
                             cache=cache, progress=progress, description=description, stream=stream) as runner:
            for _ in runner:  # the engine's own pass to the next layer feeds the hooks
                pass
            return runner.tokens
    device = _model_device(model)
    forward = model
    if not logits and callable(getattr(model, "get_decoder", None)):
        decoder = model.get_decoder()
        if isinstance(decoder, nn.Module) and decoder is not model:
            forward = decoder
    n = batches.shape[0]
    starts = list(range(0, n, batch_size))
    seen = 0
    with progress_bar(progress, len(starts), description) as advance, torch.no_grad():
        for s in starts:
            ids = batches[s : s + batch_size].to(device)
            kwargs: dict[str, Any] = {"input_ids": ids, "use_cache": False}
            mask = None
            if attention_mask is not None:
                mask = attention_mask[s : s + batch_size].to(device)
                kwargs["attention_mask"] = mask
                seen += int(mask.sum())
            else:
                seen += ids.numel()
            token = CURRENT_MASK.set(mask)
            try:
                forward(**kwargs)
            finally:
                CURRENT_MASK.reset(token)
            advance()
    return seen


#: Full logits above this many bytes (batch × positions × vocab × 4) are not materialised: the loss is
#: taken from the last hidden states in chunks of positions instead (Gemma's 262k vocabulary: 2 GiB of
#: fp32 logits per 2048-token window, several copies at the log-softmax). Below it the one-shot path
#: runs, bit-identical to the committed benchmark records.
LOGITS_CHUNK_BYTES = 1 << 30
#: Logit elements per chunk of the chunked loss (256 MiB of fp32).
_CHUNK_ELEMENTS = 1 << 26

#: Causal-LM classes whose logits are ``lm_head(model.model(...).last_hidden_state)``, then the config's
#: ``final_logit_softcapping`` where it has one (gemma2, gemma3_text): the ones the chunked loss may
#: compute itself. Any other model always runs its own forward.
_PLAIN_HEAD = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "olmo2",
                         "qwen3_moe", "compress"})


def _plain_head(model: nn.Module) -> tuple[nn.Module, nn.Linear, float | None] | None:
    """``(decoder, lm_head, softcap)`` when ``model``'s logits can be computed chunk by chunk, else None."""
    cfg = getattr(model, "config", None)
    head, base = getattr(model, "lm_head", None), getattr(model, "model", None)
    if getattr(cfg, "model_type", None) not in _PLAIN_HEAD or not type(model).__name__.endswith("ForCausalLM"):
        return None
    if not isinstance(head, nn.Linear) or not isinstance(base, nn.Module):
        return None
    cap = getattr(cfg, "final_logit_softcapping", None)
    return base, head, (float(cap) if cap else None)


def _chunked_loss(plain: tuple[nn.Module, nn.Linear, float | None], batch: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of ``batch`` from the decoder's last hidden states, ``lm_head`` applied
    to a few positions at a time (each chunk's logits are at most ~256 MiB of fp32)."""
    base, head, cap = plain
    hidden = base(input_ids=batch, use_cache=False).last_hidden_state[:, :-1, :]
    target = batch[:, 1:]
    step = max(1, _CHUNK_ELEMENTS // max(1, head.out_features * batch.size(0)))
    total = torch.zeros((), dtype=torch.float64, device=batch.device)
    for s in range(0, hidden.size(1), step):
        logits = head(hidden[:, s : s + step, :]).float()
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                                   target[:, s : s + step].reshape(-1), reduction="sum").double()
        del logits
    return total


def nll_sum(model: nn.Module, blocks: torch.Tensor, *, batch_size: int = 1,
            advance: Callable[[int], None] | None = None) -> tuple[float, int]:
    """Summed next-token NLL (nats) of ``model`` over ``blocks`` (``[N, T]``, positions 1..T-1 of every
    block predicted from the block's own prefix) and the number of predicted tokens. Logits are upcast to
    fp32 for the log-softmax, sums accumulated in fp64; no gradients; the model's own device.
    Where a mini-batch's logits would exceed :data:`LOGITS_CHUNK_BYTES` the loss is taken in chunks of
    positions (:func:`_chunked_loss`, the same values to float rounding). ``advance(n)`` is called after
    each mini-batch of ``n`` blocks (a progress bar)."""
    check_batches(blocks, None, batch_size)
    device = _model_device(model)
    plain = _plain_head(model)
    total, predicted = 0.0, 0
    with torch.no_grad():
        for s in range(0, blocks.shape[0], batch_size):
            batch = blocks[s : s + batch_size].to(device)
            target = batch[:, 1:]
            if plain is not None and batch.numel() * plain[1].out_features * 4 > LOGITS_CHUNK_BYTES:
                total += float(_chunked_loss(plain, batch))
            else:
                logits = model(input_ids=batch, use_cache=False).logits
                shift = logits[:, :-1, :].float()
                loss = torch.nn.functional.cross_entropy(shift.reshape(-1, shift.size(-1)), target.reshape(-1),
                                                         reduction="sum")
                total += float(loss.double())
                del logits, shift, loss
            predicted += int(target.numel())
            if advance is not None:
                advance(batch.size(0))
    return total, predicted


def mean_nll(model: nn.Module, batches: torch.Tensor, *, batch_size: int = 1) -> float:
    """Mean next-token NLL (nats) of ``model`` over ``batches`` (:func:`nll_sum` / predicted tokens)."""
    total, predicted = nll_sum(model, batches, batch_size=batch_size)
    return total / predicted
