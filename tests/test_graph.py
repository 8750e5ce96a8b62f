"""Structures, plans and surgery: pruning a structure equals masking it in the dense model."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch

from compress.errors import TargetError, UsageError
from compress.model.adapter import ArchAdapter, LayerGeometry
from compress.model.coupling import torch_pruning_coupling
from compress.model.footprint import footprint
from compress.model.plan import LayerPlan, Plan, resolve_attention
from compress.model.sizing import shape_plan, solve_uniform
from compress.model.structures import structure_group
from compress.model.surgery import apply_plan
from compress.target import Target
from compress.testing import TINY_KINDS, check_adapter, tiny_model

ATOL = 1e-5

# Per kind: layer 0 drops whole KV groups, layer 1 drops query heads evenly in every group,
# layer 2 drops heads with an explicit KV list; every layer drops some MLP channels.
PLANS = {
    # 4 heads / 4 KV (MHA: a head is a KV group), MLP 96
    "llama-mha": {0: dict(kv_heads=[0, 2, 3], mlp=list(range(0, 96, 2))),
                  1: dict(heads=[1, 2], mlp=[0, 5, 7, 50, 95]),
                  2: dict(heads=[3], kv_heads=[3], mlp=list(range(10, 80)))},
    # 8 heads / 2 KV (4 per group), MLP 96, tied embeddings
    "llama-gqa": {0: dict(kv_heads=[1], mlp=list(range(48, 96))),
                  1: dict(heads=[0, 3, 5, 6], mlp=[1, 2, 3, 90]),
                  2: dict(heads=[1, 2, 4, 7], kv_heads=[0, 1], mlp=list(range(0, 96, 3)))},
    # 4 heads / 2 KV (2 per group), q/k/v bias, MLP 80, tied embeddings
    "qwen2": {0: dict(kv_heads=[0], mlp=list(range(40))),
              1: dict(heads=[1, 2], mlp=list(range(1, 80, 2))),
              2: dict(heads=[0, 3], kv_heads=[0, 1], mlp=[7])},
}


def _ids(n: int = 2, t: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 512, (n, t), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids=None) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids() if ids is None else ids).logits


def _plan(kind: str) -> Plan:
    return Plan(layers={i: LayerPlan(**lp) for i, lp in PLANS[kind].items()})


def _mask_attention(arch: ArchAdapter, i: int, heads: list[int]) -> None:
    """Zero the o_proj input columns of every query head NOT in ``heads`` (exactly removes them)."""
    g = arch.geometry(i)
    W = arch.o_proj(i).weight
    with torch.no_grad():
        for h in range(g.num_heads):
            if h not in heads:
                W[:, h * g.head_dim:(h + 1) * g.head_dim] = 0


def _mask_mlp(arch: ArchAdapter, i: int, keep: list[int]) -> None:
    W = arch.down_proj(i).weight
    with torch.no_grad():
        for c in range(W.shape[1]):
            if c not in keep:
                W[:, c] = 0


# ------------------------------------------------------------------------------ pruning == masking
@pytest.mark.parametrize("kind", TINY_KINDS)
def test_pruning_equals_masking(kind):
    pruned = tiny_model(kind)
    dense = copy.deepcopy(pruned)
    arch_d = ArchAdapter(dense)
    geoms = arch_d.geometries()
    plan = _plan(kind)
    for i, lp in plan.layers.items():
        heads, _ = resolve_attention(geoms[i], lp.heads, lp.kv_heads)
        _mask_attention(arch_d, i, heads)
        _mask_mlp(arch_d, i, lp.mlp)
    ids = _ids()
    ref = _logits(dense, ids)
    assert not torch.allclose(ref, _logits(tiny_model(kind), ids), atol=1e-3)  # the masks do matter

    arch = ArchAdapter(pruned)
    apply_plan(pruned, plan, arch)
    got = _logits(pruned, ids)
    assert (got - ref).abs().max().item() <= ATOL

    # shapes and the attention attribute GQA relies on
    for i, lp in plan.layers.items():
        heads, kv = resolve_attention(geoms[i], lp.heads, lp.kv_heads)
        g = arch.geometry(i)
        assert (g.num_heads, g.num_kv_heads, g.intermediate) == (len(heads), len(kv), len(lp.mlp))
        assert arch.attention(i).num_key_value_groups == len(heads) // len(kv)
    # incremental decoding through the KV cache still agrees with the full forward
    with torch.no_grad():
        out = pruned.generate(ids[:1], max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
        full = pruned(out[:, :-1]).logits[0, -5:].argmax(-1)
    assert torch.equal(out[0, -5:], full)


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_kept_weights_are_exact_slices(kind):
    model = tiny_model(kind)
    orig = {k: v.clone() for k, v in model.state_dict().items()}
    plan = _plan(kind)
    geoms = ArchAdapter(model).geometries()
    apply_plan(model, plan)
    sd = model.state_dict()
    for i, lp in plan.layers.items():
        g = geoms[i]
        heads, kv = resolve_attention(g, lp.heads, lp.kv_heads)
        q_rows = [h * g.head_dim + d for h in heads for d in range(g.head_dim)]
        kv_rows = [k * g.head_dim + d for k in kv for d in range(g.head_dim)]
        p = f"model.layers.{i}"
        assert torch.equal(sd[f"{p}.self_attn.q_proj.weight"], orig[f"{p}.self_attn.q_proj.weight"][q_rows])
        assert torch.equal(sd[f"{p}.self_attn.k_proj.weight"], orig[f"{p}.self_attn.k_proj.weight"][kv_rows])
        assert torch.equal(sd[f"{p}.self_attn.v_proj.weight"], orig[f"{p}.self_attn.v_proj.weight"][kv_rows])
        assert torch.equal(sd[f"{p}.self_attn.o_proj.weight"], orig[f"{p}.self_attn.o_proj.weight"][:, q_rows])
        if f"{p}.self_attn.q_proj.bias" in orig:
            assert torch.equal(sd[f"{p}.self_attn.q_proj.bias"], orig[f"{p}.self_attn.q_proj.bias"][q_rows])
            assert torch.equal(sd[f"{p}.self_attn.k_proj.bias"], orig[f"{p}.self_attn.k_proj.bias"][kv_rows])
        assert torch.equal(sd[f"{p}.mlp.gate_proj.weight"], orig[f"{p}.mlp.gate_proj.weight"][lp.mlp])
        assert torch.equal(sd[f"{p}.mlp.up_proj.weight"], orig[f"{p}.mlp.up_proj.weight"][lp.mlp])
        assert torch.equal(sd[f"{p}.mlp.down_proj.weight"], orig[f"{p}.mlp.down_proj.weight"][:, lp.mlp])
        assert torch.equal(sd[f"{p}.input_layernorm.weight"], orig[f"{p}.input_layernorm.weight"])


def _set_norm_eps(model, eps: float) -> None:
    for m in model.modules():
        if hasattr(m, "variance_epsilon"):
            m.variance_epsilon = eps


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_hidden_pruning_equals_masking(kind):
    """Dropping residual channels equals zeroing them in the dense model, once RMSNorm's mean over the
    (smaller) hidden size is accounted for: with eps = 0, RMSNorm over h' kept channels of a vector that is
    zero elsewhere is RMSNorm over h times sqrt(h'/h), so the dense norms are scaled by sqrt(h'/h)."""
    pruned = tiny_model(kind)
    dense = copy.deepcopy(pruned)
    h = pruned.config.hidden_size
    keep = [c for c in range(h) if c % 4 != 1]  # 48 of 64
    drop = [c for c in range(h) if c not in keep]
    _set_norm_eps(dense, 0.0)
    _set_norm_eps(pruned, 0.0)
    a = ArchAdapter(dense)
    with torch.no_grad():
        a.embed_tokens.weight[:, drop] = 0  # the residual starts (and stays) zero on dropped channels
        for i in range(a.num_layers):
            a.o_proj(i).weight[drop, :] = 0
            a.down_proj(i).weight[drop, :] = 0
        for m in dense.modules():
            if hasattr(m, "variance_epsilon"):
                m.weight.mul_(math.sqrt(len(keep) / h))
    ids = _ids()
    ref = _logits(dense, ids)

    arch = ArchAdapter(pruned)
    tied = arch.tied_embeddings
    apply_plan(pruned, Plan(hidden=keep), arch)
    got = _logits(pruned, ids)
    assert (got - ref).abs().max().item() <= ATOL
    assert pruned.config.hidden_size == len(keep)
    assert arch.embed_tokens.weight.shape == (512, len(keep))
    assert arch.tied_embeddings == tied  # a tied lm_head is re-tied, not sliced separately
    assert arch.final_norm.weight.shape == (len(keep),)
    for i in range(arch.num_layers):
        assert arch.attn_linears(i)["q_proj"].in_features == len(keep)
        assert arch.o_proj(i).out_features == len(keep)
        assert arch.down_proj(i).out_features == len(keep)


def test_uniform_plan_syncs_config():
    model = tiny_model("llama-gqa")
    plan = Plan(layers={i: LayerPlan(kv_heads=[1], mlp=list(range(40))) for i in range(3)})
    apply_plan(model, plan)
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size, cfg.head_dim) == (4, 1, 40, 8)
    assert all(ArchAdapter(model).attention(i).num_key_value_groups == 4 for i in range(3))
    # a config rebuilt from the synced one describes the pruned model exactly
    from transformers import AutoModelForCausalLM

    rebuilt = AutoModelForCausalLM.from_config(cfg)
    rebuilt.load_state_dict(model.state_dict())


def test_non_uniform_plan_keeps_config_and_per_layer_groups():
    model = tiny_model("llama-gqa")
    apply_plan(model, _plan("llama-gqa"))
    assert model.config.num_attention_heads == 8 and model.config.intermediate_size == 96
    arch = ArchAdapter(model)
    assert [arch.attention(i).num_key_value_groups for i in range(3)] == [4, 2, 2]
    assert not arch.is_uniform()


def test_apply_plan_errors():
    model = tiny_model("llama-gqa")
    with pytest.raises(UsageError, match="layer 7"):
        apply_plan(model, Plan(layers={7: LayerPlan(mlp=[0])}))
    with pytest.raises(UsageError, match="every MLP channel"):
        apply_plan(model, Plan(layers={0: LayerPlan(mlp=[])}))
    with pytest.raises(UsageError, match="outside"):
        apply_plan(model, Plan(layers={0: LayerPlan(mlp=[96])}))


# ------------------------------------------------------------------------------ resolve_attention
GQA = LayerGeometry(hidden=64, num_heads=8, num_kv_heads=2, head_dim=8, intermediate=96)


def test_resolve_attention_completes():
    assert resolve_attention(GQA, None, None) == (list(range(8)), [0, 1])
    assert resolve_attention(GQA, None, [1]) == ([4, 5, 6, 7], [1])
    assert resolve_attention(GQA, [6, 0, 3, 5], None) == ([0, 3, 5, 6], [0, 1])
    assert resolve_attention(GQA, [4, 7], None) == ([4, 7], [1])


@pytest.mark.parametrize(
    ("heads", "kv", "match"),
    [
        ([0, 1, 4], None, "unequal number of query heads"),
        ([0, 1], [0, 1], "unequal number of query heads"),  # a kept KV group with no query head
        ([0, 1, 4, 5], [1], "keeps query head 0 but drops its KV head 0"),
        ([], None, "removes every attention head"),
        (None, [], "removes every attention head"),
        ([8], None, "outside"),
        (None, [2], "outside"),
        ([-1], None, "outside"),
    ],
)
def test_resolve_attention_errors(heads, kv, match):
    with pytest.raises(UsageError, match=match):
        resolve_attention(GQA, heads, kv, " for layer 3")


# ------------------------------------------------------------------------------ plan serialisation & composition
def test_plan_dict_round_trip():
    plan = _plan("llama-gqa")
    plan.hidden = [0, 2, 5]
    d = json.loads(json.dumps(plan.to_dict()))
    assert d["layers"]["0"] == {"kv_heads": [1], "mlp": list(range(48, 96))}
    back = Plan.from_dict(d)
    assert back == plan and back.digest() == plan.digest()
    assert Plan.from_dict({}).to_dict() == {"layers": {}}
    assert _plan("qwen2").digest() != plan.digest()


def _sequential_vs_composed(kind: str, first: Plan, second: Plan) -> None:
    seq = tiny_model(kind)
    apply_plan(seq, first)
    apply_plan(seq, second)
    composed = first.compose(second)
    # composed plan survives serialisation
    composed = Plan.from_dict(json.loads(json.dumps(composed.to_dict())))
    fresh = tiny_model(kind)
    apply_plan(fresh, composed)
    a, b = seq.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    groups = [[layer.self_attn.num_key_value_groups for layer in m.model.layers] for m in (seq, fresh)]
    assert groups[0] == groups[1]


def test_compose_equals_sequential_gqa():
    first = Plan(
        layers={
            0: LayerPlan(kv_heads=[0, 1], mlp=[90, 3, 5, 7, 11, 13, 50, 60]),  # unsorted on purpose
            1: LayerPlan(heads=[0, 1, 2, 4, 5, 6], mlp=list(range(0, 96, 2))),
            2: LayerPlan(heads=[1, 2, 3, 5, 6, 7], kv_heads=[0, 1]),  # fully resolved
        },
        hidden=list(range(0, 64, 2)) + [1, 3, 5, 7],
    )
    second = Plan(
        layers={
            0: LayerPlan(kv_heads=[1], mlp=[0, 2, 7]),       # kv after kv
            1: LayerPlan(heads=[1, 2, 3, 5], mlp=[4, 40]),   # heads after heads (3 per group -> 2)
            2: LayerPlan(kv_heads=[1]),                      # kv after a resolved plan
        },
        hidden=[0, 1, 2, 30, 31, 35],
    )
    _sequential_vs_composed("llama-gqa", first, second)
    third = Plan(layers={2: LayerPlan(heads=[0, 2])})  # heads after a resolved plan (one per group)
    first2 = Plan(layers={2: LayerPlan(heads=[1, 2, 3, 5, 6, 7], kv_heads=[0, 1])})
    _sequential_vs_composed("llama-gqa", first2, third)


@pytest.mark.parametrize("kind", ["llama-mha", "qwen2"])
def test_compose_equals_sequential(kind):
    first = _plan(kind)
    second = Plan(layers={0: LayerPlan(mlp=[0, 1, 2]), 1: LayerPlan(heads=[1]), 2: LayerPlan()},
                  hidden=list(range(10, 50)))
    _sequential_vs_composed(kind, first, second)
    # identity on either side
    assert Plan().compose(first).to_dict() == first.to_dict()
    assert first.compose(Plan()).to_dict() == first.to_dict()


def test_compose_refuses_ambiguous_mixed_plans():
    first = Plan(layers={0: LayerPlan(kv_heads=[1])})  # heads implicit: need the group size
    with pytest.raises(UsageError, match="list both heads and kv_heads"):
        first.compose(Plan(layers={0: LayerPlan(heads=[0, 1])}))
    with pytest.raises(UsageError, match="layer 0"):
        Plan(layers={0: LayerPlan(heads=[0, 4])}).compose(Plan(layers={0: LayerPlan(kv_heads=[0])}))


# ------------------------------------------------------------------------------ structure groups
def test_structure_group_members_and_reduce():
    model = tiny_model("qwen2")  # 4 heads / 2 KV, head_dim 16, q/k/v bias, MLP 80
    arch = ArchAdapter(model)
    mlp = structure_group(arch, "mlp", 1)
    assert mlp.units == 80
    assert [(m.name, m.dim, m.width) for m in mlp.members] == [
        ("model.layers.1.mlp.gate_proj.weight", 0, 1),
        ("model.layers.1.mlp.up_proj.weight", 0, 1),
        ("model.layers.1.mlp.down_proj.weight", 1, 1),
    ]
    m = arch.mlp(1)
    expect = m.gate_proj.weight.pow(2).sum(1) + m.up_proj.weight.pow(2).sum(1) + m.down_proj.weight.pow(2).sum(0)
    got = mlp.reduce(lambda mem: mem.blocks().pow(2).sum(dim=(1, 2)))
    assert torch.allclose(got, expect)
    assert torch.allclose(mlp.reduce(lambda mem: mem.blocks().pow(2).sum(dim=(1, 2)), "max"),
                          torch.stack([m.gate_proj.weight.pow(2).sum(1), m.up_proj.weight.pow(2).sum(1),
                                       m.down_proj.weight.pow(2).sum(0)]).max(0).values)
    with pytest.raises(UsageError, match="unknown group reduction"):
        mlp.reduce(lambda mem: mem.blocks().sum(dim=(1, 2)), "median")

    kv = structure_group(arch, "kv_group", 0)
    assert kv.units == 2
    names = {(x.name, x.dim, x.width) for x in kv.members}
    p = "model.layers.0.self_attn"
    assert names == {(f"{p}.q_proj.weight", 0, 32), (f"{p}.q_proj.bias", 0, 32), (f"{p}.k_proj.weight", 0, 16),
                     (f"{p}.k_proj.bias", 0, 16), (f"{p}.v_proj.weight", 0, 16), (f"{p}.v_proj.bias", 0, 16),
                     (f"{p}.o_proj.weight", 1, 32)}
    for mem in kv.members:
        assert mem.blocks().shape[0] == 2
    # block k of o_proj is exactly the columns of KV group k's query heads
    o = next(x for x in kv.members if x.name.endswith("o_proj.weight"))
    assert torch.equal(o.blocks()[1].reshape(32, 64), arch.o_proj(0).weight[:, 32:64].T)

    head = structure_group(arch, "head", 0)
    assert head.units == 4
    assert {x.name for x in head.members} == {f"{p}.q_proj.weight", f"{p}.q_proj.bias", f"{p}.o_proj.weight"}

    hidden = structure_group(arch, "hidden")
    assert hidden.units == 64 and hidden.layer is None
    assert "lm_head.weight" not in {x.name for x in hidden.members}  # tied: counted through the embedding
    with pytest.raises(UsageError, match="unknown structure kind"):
        structure_group(arch, "channel", 0)


def test_plan_for_removes_the_scored_units():
    model = tiny_model("llama-gqa")
    arch = ArchAdapter(model)
    g = structure_group(arch, "kv_group", 2)
    plan = g.plan_for([1])
    assert plan.to_dict() == {"layers": {"2": {"kv_heads": [1]}}}
    assert structure_group(arch, "hidden").plan_for([3, 1]).hidden == [1, 3]


def _module_dirs(group) -> set[tuple[str, str]]:
    out = set()
    for m in group.members:
        mod = m.name.rsplit(".", 1)[0]
        if "norm" in mod:
            continue  # torch-pruning leaves RMSNorm weights unwrapped
        if mod.endswith("embed_tokens"):
            out.add((mod, "out"))
        else:
            out.add((mod, "out" if m.dim == 0 else "in"))
    return out


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_torch_pruning_coupling_matches_structure_groups(kind):
    model = tiny_model(kind)
    arch = ArchAdapter(model)
    assert torch_pruning_coupling(model, "mlp", 1) == _module_dirs(structure_group(arch, "mlp", 1))
    tp_hidden = torch_pruning_coupling(model, "hidden")
    if arch.tied_embeddings:  # torch-pruning reports the tied lm_head separately
        tp_hidden.discard(("lm_head", "in"))
    assert tp_hidden == _module_dirs(structure_group(arch, "hidden"))
    check_adapter(model)  # the same check over every layer, as a family author runs it
    # tracing restored RoPE and the cache flag
    assert model.config.use_cache in (True, None)
    ids = _ids()
    assert torch.equal(_logits(model, ids), _logits(tiny_model(kind), ids))


class _ForgetsUpProj(ArchAdapter):
    """An adapter that declares the MLP without its up projection: a real coupling bug."""

    mlp_names = ("gate_proj", "down_proj", "down_proj")


def test_check_adapter_coupling_finds_a_missing_coupled_tensor():
    from compress.model.coupling import check_adapter_coupling

    model = tiny_model("llama-mha")
    problems = check_adapter_coupling(model, _ForgetsUpProj(model))
    assert len(problems) == 4 and problems[0].startswith("layer 0 MLP channel") and "up_proj" in problems[0]


# ------------------------------------------------------------------------------ sizing
def _measure(model, widths, seq_len=2048):
    m = copy.deepcopy(model) if not next(model.parameters()).is_meta else model
    arch = ArchAdapter(m)
    apply_plan(m, shape_plan(arch, widths), arch)
    fp = footprint(m, seq_len=seq_len, arch=arch)
    return {"params": fp.params, "flops": fp.flops_per_token, "kv": fp.kv_bytes_per_token}[widths.metric]


def _check_solution(make, target: str, unit: str = "kv_group"):
    model = make()
    arch = ArchAdapter(model)
    w = solve_uniform(arch, Target.parse(target), attn_unit=unit)
    got = _measure(make(), w)
    assert got <= w.goal * (1 + 1e-12), (target, got, w)
    assert got == pytest.approx(w.predicted, rel=1e-12)  # the solver's cost model is exact
    assert got < w.dense
    # within one granularity step: one more MLP channel would exceed the goal; where the MLP is already
    # dense (or does not count, kv:), one more attention unit would
    if w.metric != "kv" and w.mlp < w.mlp_dense:
        assert _measure(make(), dataclasses.replace(w, mlp=w.mlp + 1)) > w.goal
    else:
        assert w.attn_units < w.attn_units_dense
        assert _measure(make(), dataclasses.replace(w, attn_units=w.attn_units + 1)) > w.goal
    return w


@pytest.mark.parametrize("kind", TINY_KINDS)
@pytest.mark.parametrize("target", ["60%", "flops:70%", "kv:50%", "80K"])
def test_solve_uniform_tiny(kind, target):
    _check_solution(lambda: tiny_model(kind), target)


def test_solve_uniform_heads_unit():
    w = _check_solution(lambda: tiny_model("llama-gqa"), "60%", unit="head")
    assert w.attn_unit == "head" and w.attn_units_dense == 4
    with pytest.raises(TargetError, match="kv: target needs whole KV groups"):
        solve_uniform(ArchAdapter(tiny_model("llama-gqa")), Target.parse("kv:50%"), attn_unit="head")


def test_solve_uniform_refuses_unreachable():
    arch = ArchAdapter(tiny_model("llama-gqa"))
    with pytest.raises(TargetError, match="below the smallest legal shape"):
        solve_uniform(arch, Target.parse("1K"))
    with pytest.raises(TargetError, match="below the smallest legal shape"):
        solve_uniform(arch, Target.parse("1%"))
    with pytest.raises(TargetError, match="above the dense"):
        solve_uniform(arch, Target.parse("10M"))


def _smollm2_meta():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def test_attn_round_policy_on_smollm2_shapes():
    """SmolLM2-135M (3 KV groups): the balanced attention width at 60 % is ~1.7 groups; down keeps 1 group
    + 839 MLP channels (the default, unchanged), nearest and up 2 + 668; at 50 % (~1.4) nearest rounds
    down. The MLP always takes what is left, at or below the goal."""
    arch = ArchAdapter(_smollm2_meta())
    got = {}
    for t in ("60%", "50%"):
        for r in ("down", "nearest", "up"):
            w = solve_uniform(arch, Target.parse(t), attn_round=r)
            assert w.predicted <= w.goal and w.attn_round == r and not w.note
            got[t, r] = (w.attn_units, w.mlp)
    assert got == {("60%", "down"): (1, 839), ("60%", "nearest"): (2, 668), ("60%", "up"): (2, 668),
                   ("50%", "down"): (1, 579), ("50%", "nearest"): (1, 579), ("50%", "up"): (2, 409)}
    assert solve_uniform(arch, Target.parse("60%")).attn_units == 1  # the default is down
    with pytest.raises(TargetError, match="attn_round"):
        solve_uniform(arch, Target.parse("60%"), attn_round="ceil")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", TINY_KINDS)
@pytest.mark.parametrize("target", ["60%", "flops:70%", "80K"])
@pytest.mark.parametrize("rounding", ["nearest", "up"])
def test_attn_round_stays_at_or_below_the_target(kind, target, rounding):
    make = lambda: tiny_model(kind)  # noqa: E731
    arch = ArchAdapter(make())
    down = solve_uniform(arch, Target.parse(target))
    w = solve_uniform(arch, Target.parse(target), attn_round=rounding)
    assert w.attn_units >= down.attn_units
    got = _measure(make(), w)
    assert got <= w.goal * (1 + 1e-12) and got == pytest.approx(w.predicted, rel=1e-12)
    if w.mlp < w.mlp_dense:  # the MLP takes every channel the attention left
        assert _measure(make(), dataclasses.replace(w, mlp=w.mlp + 1)) > w.goal


def test_attn_round_up_falls_back_to_the_largest_width_that_fits():
    """kv: 50 % of 3 KV groups is 1.5 groups: up cannot keep 2, so it keeps 1 and says why."""
    arch = ArchAdapter(_smollm2_meta())
    w = solve_uniform(arch, Target.parse("kv:50%"), attn_round="up")
    assert w.attn_units == 1 and w.predicted <= w.goal
    assert "attn_round=up: 2 attention units do not fit" in w.note and w.to_dict()["note"] == w.note
    assert "note" not in solve_uniform(arch, Target.parse("kv:50%")).to_dict()


def _llama2_7b_meta():
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from compress.io.loading import load_config

    cfg = load_config(str(Path(__file__).resolve().parents[1] / "benchmarks" / "configs" / "llama-2-7b.json"))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("target", ["2B", "flops:40%", "kv:25%"])
def test_solve_uniform_llama2_7b_meta(target):
    model = _llama2_7b_meta()
    dense = footprint(model, arch=ArchAdapter(model)).params
    assert 6.7e9 < dense < 6.8e9
    w = _check_solution(_llama2_7b_meta, target)
    assert (w.attn_units_dense, w.mlp_dense) == (32, 11008)
    if target == "2B":
        assert 1.99e9 < w.predicted <= 2e9
