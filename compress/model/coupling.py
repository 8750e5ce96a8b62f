"""Coupling discovery with torch-pruning's dependency graph (the only torch_pruning importer).

torch-pruning traces a model and groups the parameters whose channels must be removed together.
:func:`torch_pruning_coupling` returns that grouping for an MLP or the hidden dimension, so the
coupling an adapter declares (:func:`compress.model.structures.structure_group`) can be checked
against an independent tracer. It does not cut anything: with transformers 5.x, a group rooted at
q/k/v/o never closes through RoPE's ``rotate_half`` unless RoPE is patched out (done here while
tracing), and GQA head groups come out wrong because ``repeat_kv`` hides the q-to-KV mapping, so
the surgery (:mod:`compress.model.surgery`) slices weights itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn

from compress.errors import Unsupported
from compress.model.adapter import ArchAdapter, adapter_for
from compress.model.structures import StructureGroup, structure_group


# ====================================================================== torch-pruning discovery
@contextlib.contextmanager
def _rope_disabled(model: nn.Module) -> Iterator[None]:
    """Replace ``apply_rotary_pos_emb`` by the identity while tracing (torch-pruning#527 hang)."""
    import sys

    mod = sys.modules.get(type(adapter_for(model).attention(0)).__module__)
    orig = getattr(mod, "apply_rotary_pos_emb", None)
    if orig is None:
        yield
        return
    mod.apply_rotary_pos_emb = lambda q, k, cos, sin, *a, **kw: (q, k)
    try:
        yield
    finally:
        mod.apply_rotary_pos_emb = orig


def torch_pruning_coupling(model: nn.Module, kind: Literal["mlp", "hidden"], layer: int = 0) -> set[tuple[str, str]]:
    """Which (module name, "out"/"in") torch-pruning's dependency graph couples to a structure.

    Used to cross-check :func:`structure_group` against torch-pruning's tracing. Attention is not
    offered: torch-pruning cannot group GQA heads (see the module docstring).
    """
    import torch_pruning as tp

    arch = adapter_for(model)
    was_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    ids = torch.zeros(1, 4, dtype=torch.long, device=arch.embed_tokens.weight.device)
    try:
        with _rope_disabled(model), torch.enable_grad(), _quiet():
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=ids,
                                                        output_transform=lambda o: o.logits)
            if kind == "mlp":
                root, fn = arch.mlp_linears(layer)[arch.mlp_names[0]], tp.prune_linear_out_channels
            else:
                root, fn = arch.embed_tokens, tp.prune_embedding_out_channels
            group = dg.get_pruning_group(root, fn, idxs=[0])
    finally:
        model.config.use_cache = was_cache
    names = {m: n for n, m in model.named_modules()}
    out: set[tuple[str, str]] = set()
    for dep, _ in group:
        target = dep.target.module
        if target not in names or not isinstance(target, nn.Linear | nn.Embedding) and not hasattr(target, "weight"):
            continue
        handler = getattr(dep.handler, "__name__", None) or type(dep.handler).__name__
        h = str(handler).lower()
        direction = "in" if "in_channel" in h else "out"
        out.add((names[target], direction))
    return out


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _declared(group: StructureGroup) -> set[tuple[str, str]]:
    """(module, "out"/"in") of a structure group's members, as torch-pruning names them."""
    out = set()
    for m in group.members:
        mod = m.name.rsplit(".", 1)[0]
        if "norm" in mod:
            continue  # torch-pruning leaves RMSNorm weights unwrapped
        out.add((mod, "out" if mod.endswith("embed_tokens") or m.dim == 0 else "in"))
    return out


def check_adapter_coupling(model: nn.Module, arch: ArchAdapter | None = None) -> list[str]:
    """Compare an adapter's declared couplings with torch-pruning's tracing of the same model.

    For every layer's MLP channel and for the hidden (residual) channel, the set of parameter slices
    the adapter's :func:`~compress.model.structures.structure_group` removes together must equal
    the set torch-pruning's dependency graph couples. Run it on a tiny random-weight model of a
    newly registered family (``compress.testing.check_adapter``): a disagreement means the adapter
    misses a coupled tensor (or adds one), and the surgery would cut a model inconsistently.
    Returns the disagreements, one line each (empty: the adapter agrees).
    """
    arch = arch or adapter_for(model)
    if any(arch.experts(i) is not None for i in range(arch.num_layers)):
        raise Unsupported(f"{model.config.model_type}: torch-pruning's dependency graph does not trace experts held "
                          "as fused 3-D weights; the expert cut is checked against hand-sliced stock models instead")
    problems = []
    for layer in range(arch.num_layers):
        mine, traced = _declared(structure_group(arch, "mlp", layer)), torch_pruning_coupling(model, "mlp", layer)
        if mine != traced:
            problems.append(f"layer {layer} MLP channel: adapter {sorted(mine - traced)} not traced, "
                            f"traced {sorted(traced - mine)} not in the adapter")
    mine, traced = _declared(structure_group(arch, "hidden")), torch_pruning_coupling(model, "hidden")
    if arch.tied_embeddings:  # torch-pruning reports the tied lm_head separately
        names = {m: n for n, m in model.named_modules()}
        traced.discard((names.get(arch.lm_head, "lm_head"), "in"))
    if mine != traced:
        problems.append(f"hidden channel: adapter {sorted(mine - traced)} not traced, "
                        f"traced {sorted(traced - mine)} not in the adapter")
    return problems
