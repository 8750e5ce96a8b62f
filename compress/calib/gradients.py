"""LM-loss gradients of chosen parameters over calibration blocks, whole-model or layer by layer.

The layer-wise backward visits the decoder layers from the last to the first, so only one layer's
autograd graph is alive at a time; its result equals the whole-model backward (tested).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from compress.calib.layerwise import CacheSpec, LayerwiseRunner, on_device
from compress.errors import NumericalError
from compress.model.adapter import ArchAdapter, adapter_for


# ============================================================================ gradients of the LM loss
def loss_gradients(
    model: nn.Module,
    params: list[nn.Parameter],
    tokens: torch.Tensor,
    *,
    first_order: bool = True,
    fisher: bool = False,
    batch_size: int | None = None,
    layerwise: bool = False,
    device: str | torch.device | None = None,
    cache: CacheSpec = "cpu",
    arch: ArchAdapter | None = None,
) -> tuple[dict[nn.Parameter, torch.Tensor], dict[nn.Parameter, torch.Tensor]]:
    """Gradients of the next-token loss w.r.t. ``params`` over ``tokens [N, T]`` (fp32).

    Returns ``(grads, fisher)``: ``grads`` is the gradient of the mean loss over the whole batch
    (micro-batches of ``batch_size`` weighted by their share of the sequences, which equals one
    backward over the batch), ``fisher`` is ``Σ_n g_n² / N`` with ``g_n`` the gradient of sample
    ``n``'s own mean loss. Only ``params`` require grad while this runs; the model's flags, mode,
    ``use_cache`` and ``.grad`` are left as they were.

    ``layerwise=True`` never builds the whole model's autograd graph: a forward layer by layer keeps
    every layer's inputs (``cache``), the loss comes from the final norm + lm_head, then each layer
    is recomputed in reverse with its inputs requiring grad and back-propagated with the upstream
    gradient, its parameters' gradients are accumulated and the input gradient passed down. Only
    decoder-layer parameters are supported there. The result equals the whole-model one up to float
    rounding (Fisher micro-batches are single sequences in both).
    """
    n = int(tokens.shape[0])
    bs = n if batch_size is None else max(1, min(batch_size, n))
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    cfg = getattr(model, "config", None)
    use_cache = getattr(cfg, "use_cache", None)
    grads: dict[nn.Parameter, torch.Tensor] = {}
    acc: dict[nn.Parameter, torch.Tensor] = {}
    homes = {p: p.device for p in params}

    def add(into: dict[nn.Parameter, torch.Tensor], p: nn.Parameter, g: torch.Tensor | None,
            fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        g = torch.zeros(p.shape, dtype=torch.float32, device=p.device) if g is None else fn(g.float())
        g = g.to(homes[p])
        if p in into:
            into[p] += g
        else:
            into[p] = g

    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        model.eval()
        if use_cache is not None:
            cfg.use_cache = False
        if layerwise:
            _layerwise_gradients(model, arch or adapter_for(model), params, tokens, bs, first_order, fisher,
                                 torch.device(device) if device is not None else None, cache, add, grads, acc)
        else:
            _whole_model_gradients(model, params, tokens, bs, first_order, fisher, add, grads, acc)
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
        model.train(was_training)
        if use_cache is not None:
            cfg.use_cache = use_cache
    return grads, acc


def _check_loss(loss: torch.Tensor) -> None:
    if not torch.isfinite(loss):
        raise NumericalError(f"calibration loss is {float(loss)}; check the model and the calibration text")


@torch.enable_grad()
def _whole_model_gradients(model, params, tokens, bs, first_order, fisher, add, grads, acc) -> None:
    n = int(tokens.shape[0])
    tokens = tokens.to(params[0].device)

    def grad_of(x: torch.Tensor) -> list[torch.Tensor | None]:
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        _check_loss(loss)
        return list(torch.autograd.grad(loss, params, allow_unused=True))

    def fold(into, gs, fn) -> None:
        for k, p in enumerate(params):
            g, gs[k] = gs[k], None  # drop autograd's copy as soon as it is folded in
            add(into, p, g, fn)

    if first_order:
        for start in range(0, n, bs):
            x = tokens[start:start + bs]
            w = x.shape[0] / n  # micro-batch losses weighted by their share of the (equal-length) sequences
            fold(grads, grad_of(x), (lambda g: g) if w == 1.0 else (lambda g, w=w: g * w))
    if fisher:
        for j in range(n):
            fold(acc, grad_of(tokens[j:j + 1]), lambda g: g * g / n)


def _layerwise_gradients(model, arch, params, tokens, bs, first_order, fisher, device, cache, add, grads, acc) -> None:
    n = int(tokens.shape[0])
    layers = arch.layers
    layer_of: dict[int, int] = {}
    for i, layer in enumerate(layers):
        for p in layer.parameters():
            layer_of[id(p)] = i
    outside = [p for p in params if id(p) not in layer_of]
    if outside:
        raise ValueError(f"layer-wise gradients cover decoder-layer parameters only; {len(outside)} of the "
                         "requested parameters are outside the decoder layers")
    by_layer: dict[int, list[nn.Parameter]] = {}
    for p in params:
        by_layer.setdefault(layer_of[id(p)], []).append(p)
    lowest = min(by_layer)
    # Fisher needs per-sample gradients: single-sequence micro-batches (as the whole-model path's
    # per-sample backward); their first-order sum over samples / N is the batch gradient.
    mb = 1 if fisher else bs
    weights = [min(mb, n - s) / n for s in range(0, n, mb)]
    with LayerwiseRunner(model, tokens, arch=arch, batch_size=mb, device=device, cache=cache,
                         keep_inputs=range(lowest, len(layers)), description="layer-wise gradients") as runner:
        for _ in runner:
            pass
        dev = runner.device
        final = runner.outputs
        assert final is not None
        upstream = runner.new_cache()
        with on_device([arch.final_norm, arch.lm_head], dev), torch.enable_grad():
            for b, s in enumerate(runner._starts):
                h = final[b].to(dev).detach().requires_grad_(True)
                labels = tokens[s:s + mb].to(dev)
                logits = arch.logits(h)  # final norm, lm_head and the family's soft-capping (Gemma)
                loss = model.loss_function(logits=logits, labels=labels, vocab_size=model.config.vocab_size)
                _check_loss(loss)
                (g,) = torch.autograd.grad(loss, h)
                upstream.append(g)
                final.release(b)
        for i in reversed(range(lowest, len(layers))):
            ps = by_layer.get(i, [])
            inputs = runner.boundaries.pop(i)
            below = runner.new_cache() if i > lowest else None
            with on_device([layers[i]], dev), torch.enable_grad():
                for b in range(len(inputs)):
                    x = inputs[b].to(dev).detach()
                    if below is not None:
                        x.requires_grad_(True)
                    kw = runner.layer_kwargs(b, i)
                    out = layers[i](x, **kw)
                    out = out[0] if isinstance(out, tuple) else out
                    wrt = ([x] if below is not None else []) + ps
                    gs = list(torch.autograd.grad(out, wrt, grad_outputs=upstream[b].to(dev), allow_unused=True))
                    del out
                    if below is not None:
                        below.append(gs.pop(0))
                    w = weights[b]
                    for p, g in zip(ps, gs, strict=True):
                        if fisher:
                            if first_order:
                                add(grads, p, g, lambda g: g / n)
                            add(acc, p, g, lambda g: g * g / n)
                        else:
                            add(grads, p, g, (lambda g: g) if w == 1.0 else (lambda g, w=w: g * w))
                    inputs.release(b)
                    upstream.release(b)
            inputs.clear()
            upstream.clear()
            if below is not None:
                upstream = below
