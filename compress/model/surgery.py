"""Surgery: apply a :class:`~compress.model.plan.Plan` by slicing weights, GQA-correct.

Plain tensor slicing through the adapter's accessors: q/o by query head, k/v by KV head (the query
heads of a removed KV group go with it), gate/up/down by MLP channel, every block's input and output
by hidden channel, each expert of a Mixture-of-Experts layer by its own kept channels (rows of its
slices of the fused ``gate_up`` weight, columns of its ``down`` weight; the router is kept), with the
norms that run along any of these (every residual norm of a block:
:meth:`ArchAdapter.hidden_norms`; OLMo-2's q/k norms over the whole q/k width:
:meth:`ArchAdapter.proj_norms`). The result is bit-exact against masking the same structures in the
dense model (tests/test_graph.py) where no norm spans several heads; OLMo-2's q/k norms then average
over the kept heads only, which is what the family's stock class computes at the pruned widths. :func:`sync_config` then writes the new widths into the config and the
attention modules' ``num_key_value_groups``.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.errors import UsageError
from compress.model.adapter import ArchAdapter, Experts, Role, adapter_for
from compress.model.plan import Plan, resolve_attention
from compress.modeling import LowRankLinear


# ====================================================================== surgery
def _index(idx: list[int] | torch.Tensor, device) -> torch.Tensor:
    return torch.as_tensor(idx, dtype=torch.long, device=device)


def slice_linear(old: nn.Module, out_idx: list[int] | torch.Tensor | None = None,
                 in_idx: list[int] | torch.Tensor | None = None) -> nn.Module:
    """A new linear (or :class:`LowRankLinear`) keeping rows ``out_idx`` and columns ``in_idx``."""
    if isinstance(old, LowRankLinear):
        new = LowRankLinear(old.in_features, old.out_features, old.rank, bias=old.B.bias is not None)
        new.A = slice_linear(old.A, None, in_idx)
        new.B = slice_linear(old.B, out_idx, None)
        new.in_features, new.out_features = new.A.in_features, new.B.out_features
        return new
    W = old.weight.data
    dev = W.device
    if out_idx is not None:
        W = W.index_select(0, _index(out_idx, dev))
    if in_idx is not None:
        W = W.index_select(1, _index(in_idx, dev))
    bias = old.bias
    new = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None, device="meta")
    new.weight = nn.Parameter(W.clone(), requires_grad=old.weight.requires_grad)
    if bias is not None:
        b = bias.data if out_idx is None else bias.data.index_select(0, _index(out_idx, dev))
        new.bias = nn.Parameter(b.clone(), requires_grad=bias.requires_grad)
    return new


def _slice_vector_param(module: nn.Module, idx: list[int] | torch.Tensor) -> None:
    w = module.weight
    module.weight = nn.Parameter(w.data.index_select(0, _index(idx, w.device)).clone(), requires_grad=w.requires_grad)
    if hasattr(module, "normalized_shape"):
        module.normalized_shape = (len(idx),)


def _head_rows(heads: list[int], hd: int, device) -> torch.Tensor:
    return (torch.as_tensor(heads, device=device).unsqueeze(1) * hd + torch.arange(hd, device=device)).reshape(-1)


def _slice_rows(arch: ArchAdapter, i: int, keep: dict[Role, torch.Tensor]) -> None:
    """Keep rows ``keep[role]`` (indices within the role's own rows) of each projection of layer ``i``;
    the roles sharing a fused linear are cut together, in their order in it, and a norm over a role's
    rows (:meth:`ArchAdapter.proj_norms`) keeps the same ones."""
    fused: dict[tuple[int, str], list[tuple[int, torch.Tensor]]] = {}
    owners: dict[tuple[int, str], nn.Module] = {}
    for role, rows in keep.items():
        pr = arch.proj_rows(i, role)
        key = (id(pr.owner), pr.attr)
        owners[key] = pr.owner
        fused.setdefault(key, []).append((pr.start, rows + pr.start))
    for key, parts in fused.items():
        owner, attr = owners[key], key[1]
        rows = torch.cat([r for _, r in sorted(parts, key=lambda x: x[0])])
        setattr(owner, attr, slice_linear(getattr(owner, attr), out_idx=rows))
    norms = arch.proj_norms(i)  # norms over a projection's rows (OLMo-2's q_norm / k_norm) keep the same rows
    for role, rows in keep.items():
        if role in norms:
            _slice_vector_param(norms[role], rows)


def apply_plan(model: nn.Module, plan: Plan, arch: ArchAdapter | None = None) -> nn.Module:
    """Cut the model in place to what ``plan`` keeps; update attention attributes and the config."""
    arch = arch or adapter_for(model)
    for i, lp in sorted(plan.layers.items()):
        if not 0 <= i < arch.num_layers:
            raise UsageError(f"plan names layer {i} but the model has {arch.num_layers} layers")
        geom = arch.geometry(i)
        attn, mlp = arch.attention(i), arch.mlp(i)
        if lp.heads is not None or lp.kv_heads is not None:
            heads, kv = resolve_attention(geom, lp.heads, lp.kv_heads, f" for layer {i}")
            q_rows = _head_rows(heads, geom.head_dim, None)
            kv_rows = _head_rows(kv, geom.head_dim, None)
            _slice_rows(arch, i, {"q": q_rows, "k": kv_rows, "v": kv_rows})
            o = arch.attn_names[3]
            setattr(attn, o, slice_linear(getattr(attn, o), in_idx=q_rows))
            attn.num_key_value_groups = len(heads) // len(kv)
        experts = arch.experts(i)
        if lp.experts is not None:
            if experts is None:
                raise UsageError(f"plan lists expert channels for layer {i}, whose MLP is dense; use mlp")
            _apply_experts(experts, lp.experts, i, arch.mlp_multiple)
        if lp.mlp is not None:
            if experts is not None:
                raise UsageError(f"layer {i} routes tokens to {experts.num_experts} experts: the plan must list the "
                                 "kept channels of each expert (experts), not mlp")
            if not lp.mlp:
                raise UsageError(f"plan removes every MLP channel of layer {i}; keep at least one")
            if max(lp.mlp) >= geom.intermediate or min(lp.mlp) < 0:
                raise UsageError(f"plan names an MLP channel outside 0..{geom.intermediate - 1} in layer {i}")
            idx = torch.as_tensor(sorted(set(lp.mlp)), dtype=torch.long)
            _slice_rows(arch, i, {"gate": idx, "up": idx})
            down = arch.mlp_names[2]
            setattr(mlp, down, slice_linear(getattr(mlp, down), in_idx=idx))
    if plan.hidden is not None:
        _apply_hidden(arch, sorted(set(plan.hidden)))
    sync_config(model, arch)
    return model


def _apply_experts(experts: Experts, keep: list[list[int]], i: int, multiple: int = 1) -> None:
    """Keep channels ``keep[e]`` of each expert ``e``: rows ``keep[e]`` of its gate and of its up slice of
    ``gate_up`` ``[E, 2I, H]``, columns of ``down`` ``[E, H, I]``. Every expert keeps the same number
    (the family's config has one expert width)."""
    E, inter = experts.num_experts, experts.intermediate
    if len(keep) != E:
        raise UsageError(f"plan lists {len(keep)} experts for layer {i}, which has {E}")
    kept = [sorted(set(int(x) for x in k)) for k in keep]
    if len({len(k) for k in kept}) != 1 or not kept[0]:
        raise UsageError(f"plan keeps {sorted({len(k) for k in kept})} channels per expert in layer {i}; every "
                         "expert must keep the same number, at least one")
    if min(min(k) for k in kept) < 0 or max(max(k) for k in kept) >= inter:
        raise UsageError(f"plan names an expert channel outside 0..{inter - 1} in layer {i}")
    if len(kept[0]) % multiple and len(kept[0]) != inter:
        raise UsageError(f"plan keeps {len(kept[0])} channels per expert in layer {i}; the family's experts kernel "
                         f"runs multiples of {multiple} only")
    gu, down = experts.gate_up_weight, experts.down_weight
    idx = torch.as_tensor(kept, dtype=torch.long, device=gu.device)  # [E, I']
    rows = torch.cat([idx, idx + inter], dim=1)  # gate rows, then up rows, of each expert
    new_gu = gu.data.gather(1, rows.unsqueeze(-1).expand(-1, -1, gu.shape[2]))
    new_down = down.data.gather(2, idx.unsqueeze(1).expand(-1, down.shape[1], -1))
    setattr(experts.module, experts.gate_up, nn.Parameter(new_gu.contiguous(), requires_grad=gu.requires_grad))
    setattr(experts.module, experts.down, nn.Parameter(new_down.contiguous(), requires_grad=down.requires_grad))


def _apply_hidden(arch: ArchAdapter, keep: list[int]) -> None:
    refusal = arch.hidden_refusal()
    if refusal:
        raise UsageError(refusal)
    tied = arch.tied_embeddings
    emb = arch.embed_tokens
    emb.weight = nn.Parameter(emb.weight.data[:, keep].clone(), requires_grad=emb.weight.requires_grad)
    emb.embedding_dim = len(keep)
    for i in range(arch.num_layers):
        for norm in arch.hidden_norms(i).values():
            _slice_vector_param(norm, keep)
        attn, mlp = arch.attention(i), arch.mlp(i)
        q, k, v, o = arch.attn_names
        for n in dict.fromkeys((q, k, v)):  # a fused qkv_proj once
            setattr(attn, n, slice_linear(getattr(attn, n), in_idx=keep))
        setattr(attn, o, slice_linear(getattr(attn, o), out_idx=keep))
        gate, up, down = arch.mlp_names
        for n in dict.fromkeys((gate, up)):
            setattr(mlp, n, slice_linear(getattr(mlp, n), in_idx=keep))
        setattr(mlp, down, slice_linear(getattr(mlp, down), out_idx=keep))
    _slice_vector_param(arch.final_norm, keep)
    if tied:
        arch.lm_head.weight = emb.weight
        arch.lm_head.in_features = len(keep)
    else:
        arch.model.lm_head = slice_linear(arch.lm_head, in_idx=keep)


def sync_config(model: nn.Module, arch: ArchAdapter | None = None) -> None:
    """Make attention attributes and the config agree with the weights.

    Uniform shapes are written to the config (it then describes the model exactly). Non-uniform
    models keep their config; export writes a per-layer ``compress`` config for them.
    """
    arch = arch or adapter_for(model)
    geoms = arch.geometries()
    if "per_layer_shapes" not in arch.features and len(set(geoms)) > 1:
        raise UsageError(f"{model.config.model_type} layers must keep equal widths (its attention reads the head "
                         "count from the shared config); this plan makes them differ")
    for i, g in enumerate(geoms):
        arch.sync_attention(i, g)
        arch.sync_mlp(i, g)
    cfg = model.config
    cfg.hidden_size = geoms[0].hidden if geoms else cfg.hidden_size
    if len(set(geoms)) == 1:
        g = geoms[0]
        cfg.num_attention_heads = g.num_heads
        cfg.num_key_value_heads = g.num_kv_heads
        setattr(cfg, arch.intermediate_key, g.intermediate)
        cfg.head_dim = g.head_dim
