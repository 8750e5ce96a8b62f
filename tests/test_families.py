"""Families beyond Llama: every registered method passes the conformance suite on Mistral, Qwen3, Phi-3,
Gemma-2, Gemma-3 (text), OLMo-2 and Qwen3-MoE (tests/test_moe.py for its experts) or is refused before any
weight is loaded; Qwen3's q/k norms, Phi-3's
fused projections, Gemma-3's one-KV-head attention and OLMo-2's whole-width q/k norms are sliced
correctly (against references built by hand from the dense weights); footprints read each layer's
sliding window as transformers does (against FlopCounterMode and real KV caches)."""

from __future__ import annotations

import pytest
import torch

from compress.errors import Unsupported, UsageError
from compress.model.adapter import FEATURES
from compress.model.footprint import kv_bytes_per_token
from compress.model.plan import LayerPlan, Plan
from compress.model.surgery import apply_plan
from compress.plugins import get_registry
from compress.target import Target
from compress.testing import FAMILY_KINDS, check_adapter, check_pruner, tiny_config, tiny_model
from conftest import hand_sliced_attention

_REGISTRY = get_registry()
METHODS = sorted(_REGISTRY.pruners)
#: depth removes whole layers: one layer of the untied 3-layer tiny Mistral is 62 % of it. The tiny Gemma-3's
#: tied embedding and one-KV-head attention are 63 % of it (as the real 270M's are over 70 %): a method that
#: removes whole KV groups only can keep its attention, never remove it, so it is sized at 70 % there too.
TARGET = {"depth": "70%", "gemma3_text": "70%"}


def _target(name: str, kind: str) -> str:
    return TARGET.get(name) or TARGET.get(kind) or "60%"
IDS = torch.tensor([[1, 17, 250, 33, 401, 5, 98, 12, 7, 300]])
#: families whose layers must keep equal widths (no per_layer_shapes): every method that needs them is refused
EQUAL_WIDTHS = ("phi3", "gemma2", "gemma3_text", "olmo2", "qwen3_moe")
NEW = ("gemma2", "gemma3_text", "olmo2")


def _meta(kind: str, **overrides):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(kind)
    if "num_hidden_layers" in overrides and getattr(cfg, "layer_types", None) is not None:  # one entry per layer
        d = {k: v for k, v in cfg.to_dict().items() if k not in ("model_type", "transformers_version")}
        cfg = type(cfg)(**{**d, "num_hidden_layers": overrides.pop("num_hidden_layers"), "layer_types": None})
    for k, v in overrides.items():
        setattr(cfg, k, v)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def _supported(name: str, kind: str) -> bool:
    cls = _REGISTRY.pruners[name]
    try:
        cls().check(_meta(kind), Target.parse(_target(name, kind)))
    except Unsupported:
        return False
    return True


def test_families_are_registered_through_the_hook():
    assert {"llama", "mistral", "qwen2", "qwen3", *EQUAL_WIDTHS} <= set(_REGISTRY.architectures)
    fam = [p for p in _REGISTRY.plugins if p.name == "families"]
    assert fam and fam[0].status == "loaded" and fam[0].builtin  # the entry point of the compress distribution
    assert set(EQUAL_WIDTHS) <= set(fam[0].architectures)
    names = {k: type(_REGISTRY.adapter_for(tiny_model(k))).__name__ for k in EQUAL_WIDTHS}
    assert names == {"phi3": "Phi3Adapter", "gemma2": "GemmaAdapter", "gemma3_text": "Gemma3TextAdapter",
                     "olmo2": "Olmo2Adapter", "qwen3_moe": "Qwen3MoeAdapter"}
    # none has per_layer_shapes (the compress format does not cover them); Gemma's and OLMo-2's norms do not fold;
    # Qwen3-MoE routes to fused experts: no dense MLP, no separate gate / up
    assert {k: set(_REGISTRY.architectures[k].features) for k in EQUAL_WIDTHS} == {
        "phi3": {"foldable_norms", "dense_mlp"}, **{k: {"separate_projections", "dense_mlp"} for k in NEW},
        "qwen3_moe": {"foldable_norms"}}


@pytest.mark.parametrize("kind", NEW)
def test_new_adapters_agree_with_torch_pruning(kind):
    check_adapter(tiny_model(kind))  # MLP channels and the hidden channel (all four Gemma norms) as traced


# ------------------------------------------------------------------------------ conformance per family
@pytest.mark.parametrize("kind", FAMILY_KINDS)
@pytest.mark.parametrize("name", METHODS)
def test_every_method_passes_or_is_refused_up_front(name, kind, tmp_path, assets):
    if not _supported(name, kind):
        pytest.skip(f"{name} refuses {kind} (tested below)")
    report = check_pruner(_REGISTRY.get(name), tmp_dir=tmp_path, targets=(_target(name, kind),), kinds=(kind,))
    assert len(report) == 1 and report[0]["params"] < report[0]["dense"]
    assert report[0]["reload_max_diff"] <= 1e-5


@pytest.mark.parametrize("kind", ["mistral", "qwen3"])
def test_llama_shaped_families_refuse_nothing(kind):
    assert [n for n in METHODS if not _supported(n, kind)] == []


#: what each refused method lacks on each equal-width family
_MISSING = {("slicegpt", "phi3"): ("separate_projections",), ("lorap", "phi3"): ("separate_projections",),
            **{("slicegpt", k): ("per_layer_shapes", "foldable_norms") for k in NEW},
            **{("lorap", k): ("per_layer_shapes",) for k in NEW},
            # Mixture of experts: no single gated MLP per layer (tests/test_moe.py)
            ("slicegpt", "qwen3_moe"): ("dense_mlp", "separate_projections", "per_layer_shapes"),
            ("lorap", "qwen3_moe"): ("dense_mlp", "separate_projections", "per_layer_shapes"),
            ("llm_pruner", "qwen3_moe"): ("dense_mlp",)}


@pytest.mark.parametrize(("name", "kind"), sorted(_MISSING))
def test_refusals_come_before_weights_with_an_alternative(name, kind):
    if name not in _REGISTRY.pruners:
        pytest.skip(f"{name} is not registered")
    model = _meta(kind)  # config only: no weight exists
    assert all(p.is_meta for p in model.parameters())
    with pytest.raises(Unsupported) as e:
        _REGISTRY.pruners[name]().check(model, Target.parse("60%"))
    msg = str(e.value)
    assert "\n" not in msg and kind in msg and "use transact instead" in msg
    assert all(FEATURES[f] in msg for f in _MISSING[(name, kind)]), msg


@pytest.mark.parametrize("kind", [k for k in EQUAL_WIDTHS if k != "qwen3_moe"])  # llm_pruner refuses MoE outright
def test_llm_pruner_on_equal_width_families_needs_every_layer_pruned_alike(kind):
    cls = _REGISTRY.pruners["llm_pruner"]
    model = _meta(kind, num_hidden_layers=32)  # the official 4..30-of-32 range: layers would differ
    with pytest.raises(Unsupported, match="block_attention_layer_start=0 block_attention_layer_end=32"):
        cls().check(model, Target.parse("60%"))
    full = {"block_attention_layer_start": 0, "block_attention_layer_end": 32,
            "block_mlp_layer_start": 0, "block_mlp_layer_end": 32}
    cls(full).check(model, Target.parse("60%"))
    with pytest.raises(Unsupported, match="global_pruning=false"):
        cls({**full, "global_pruning": True}).check(model, Target.parse("60%"))
    cls({**full, "global_pruning": True}).check(_meta("mistral", num_hidden_layers=32), Target.parse("60%"))


# ------------------------------------------------------------------------------ Qwen3: per-head q/k norms
def _qwen3_randomised():
    model = tiny_model("qwen3")
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for layer in model.model.layers:  # q_norm / k_norm start at ones: make them matter
            layer.self_attn.q_norm.weight.copy_(torch.rand(24, generator=g) * 1.5 + 0.25)
            layer.self_attn.k_norm.weight.copy_(torch.rand(24, generator=g) * 1.5 + 0.25)
    return model


def test_qwen3_head_removal_keeps_qk_norms_and_matches_a_hand_sliced_model():
    from transformers import AutoModelForCausalLM

    dense = _qwen3_randomised()
    sd = {k: v.clone() for k, v in dense.state_dict().items()}
    kv_keep, hd, group = [1], 24, 2
    heads = [h for k in kv_keep for h in range(k * group, (k + 1) * group)]
    pruned = apply_plan(dense, Plan(layers={i: LayerPlan(kv_heads=kv_keep) for i in range(3)}))
    assert pruned.model.layers[0].self_attn.q_norm.weight.shape == (hd,)  # per head_dim, shared by heads

    cfg = tiny_config("qwen3")
    cfg.num_attention_heads, cfg.num_key_value_heads = len(heads), len(kv_keep)
    ref = AutoModelForCausalLM.from_config(cfg).eval()

    new = {k: hand_sliced_attention(k, v, heads, kv_keep, hd) for k, v in sd.items()}
    ref.load_state_dict(new, strict=False)
    ref.tie_weights()
    with torch.no_grad():
        assert torch.allclose(pruned(IDS).logits, ref(IDS).logits, atol=1e-5)


# ------------------------------------------------------------------------------ Phi-3: fused projections
def test_phi3_adapter_geometry_and_coupling():
    model = tiny_model("phi3")
    arch = _REGISTRY.adapter_for(model)
    g = arch.geometry(0)
    assert (g.num_heads, g.num_kv_heads, g.head_dim, g.intermediate) == (8, 2, 8, 96)
    assert kv_bytes_per_token(model) == 3 * 2 * 2 * 8 * 4  # layers × (k + v) × KV heads × head_dim × fp32
    assert [(arch.proj_rows(0, r).start, arch.proj_rows(0, r).count) for r in ("q", "k", "v", "gate", "up")] == \
        [(0, 64), (64, 16), (80, 16), (0, 96), (96, 96)]
    check_adapter(model)  # torch-pruning traces the fused MLP and hidden couplings the adapter declares


def test_phi3_keeping_everything_is_the_identity():
    model = tiny_model("phi3")
    with torch.no_grad():
        before = model(IDS).logits
    full = Plan(layers={i: LayerPlan(heads=list(range(8)), mlp=list(range(96))) for i in range(3)})
    apply_plan(model, full)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, before)


def _phi3_reference(sd: dict, heads: list[int], kv: list[int], mlp: list[int]):
    """A stock Phi3ForCausalLM of the pruned widths whose fused weights are cut by hand from ``sd``."""
    from transformers import AutoModelForCausalLM

    hd, nq, inter = 8, 8, 96
    cfg = tiny_config("phi3")
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size = len(heads), len(kv), len(mlp)
    cfg.head_dim = hd
    ref = AutoModelForCausalLM.from_config(cfg).eval()
    new = {}
    for k, v in sd.items():
        if k.endswith("qkv_proj.weight"):
            q, kk, vv = v[:nq * hd], v[nq * hd:(nq + 2) * hd], v[(nq + 2) * hd:]
            v = torch.cat([torch.cat([t[h * hd:(h + 1) * hd] for h in hs]) for t, hs in ((q, heads), (kk, kv), (vv, kv))])
        elif k.endswith("o_proj.weight"):
            v = torch.cat([v[:, h * hd:(h + 1) * hd] for h in heads], dim=1)
        elif k.endswith("gate_up_proj.weight"):
            v = torch.cat([v[:inter][mlp], v[inter:][mlp]])
        elif k.endswith("down_proj.weight"):
            v = v[:, mlp]
        new[k] = v
    missing, unexpected = ref.load_state_dict(new, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return ref


@pytest.mark.parametrize("unit", ["kv_heads", "heads"])
def test_phi3_pruned_equals_a_hand_sliced_stock_model(unit, tmp_path):
    from transformers import AutoModelForCausalLM, Phi3ForCausalLM

    from compress.io.export import export_model

    model = tiny_model("phi3")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    mlp = [0, 3, 5, *range(10, 60, 2), 95]
    if unit == "kv_heads":
        kv, heads = [1], [4, 5, 6, 7]
        lp = LayerPlan(kv_heads=kv, mlp=mlp)
    else:
        kv, heads = [0, 1], [1, 3, 4, 6]  # two of the four query heads of each KV group
        lp = LayerPlan(heads=heads, mlp=mlp)
    apply_plan(model, Plan(layers={i: lp for i in range(3)}))
    ref = _phi3_reference(sd, heads, kv, mlp)
    with torch.no_grad():
        logits = model(IDS).logits
        assert torch.allclose(logits, ref(IDS).logits, atol=1e-5)
        gen = model.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(gen, ref.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0))
    info = export_model(model, None, tmp_path / "out", kind="auto", plan={}, overwrite=True)
    assert info["kind"] == "stock"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert isinstance(reloaded, Phi3ForCausalLM)
    with torch.no_grad():
        assert torch.allclose(reloaded(IDS).logits, logits, atol=1e-5)


def test_phi3_layers_of_different_widths_are_refused():
    model = tiny_model("phi3")
    with pytest.raises(UsageError, match="equal widths"):
        apply_plan(model, Plan(layers={0: LayerPlan(kv_heads=[0])}))


# ------------------------------------------------------------------------------ Gemma-2 / Gemma-3
def _hand_sliced(kind: str, sd: dict, heads: list[int], kv: list[int], hd: int, mlp: list[int] | None = None):
    """A stock model of ``kind`` with ``heads`` query heads, ``kv`` KV heads (and MLP channels ``mlp``) whose
    q/k/v/o (gate/up/down) weights and OLMo-2's whole-width q/k norms are cut by hand from the dense ``sd``."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(kind)
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = len(heads), len(kv), hd
    if mlp is not None:
        cfg.intermediate_size = len(mlp)
    ref = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()

    new = {}
    for k, v in sd.items():
        v = hand_sliced_attention(k, v, heads, kv, hd)  # OLMo-2's whole-width q/k norms too
        if mlp is not None and k.endswith(("gate_proj.weight", "up_proj.weight")):
            v = v[mlp]
        elif mlp is not None and k.endswith("down_proj.weight"):
            v = v[:, mlp]
        new[k] = v
    missing, unexpected = ref.load_state_dict(new, strict=False)
    assert not unexpected and all("rotary" in m or m == "lm_head.weight" for m in missing), (missing, unexpected)
    ref.tie_weights()
    return ref


def _eager(kind: str):
    from transformers import AutoModelForCausalLM

    model = tiny_model(kind)
    out = AutoModelForCausalLM.from_config(tiny_config(kind), attn_implementation="eager").eval()
    out.load_state_dict(model.state_dict())
    return out


def test_gemma3_mqa_head_removal_matches_a_hand_sliced_stock_model(tmp_path):
    """One KV head under 4 query heads of head_dim 32 (4 × 32 != hidden 64): two query heads go, the KV
    head and the per-head q/k norms stay; the export is a stock Gemma3ForCausalLM with the same logits."""
    from transformers import AutoModelForCausalLM, Gemma3ForCausalLM

    from compress.io.export import export_model

    model = _eager("gemma3_text")
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for layer in model.model.layers:  # norms start at zero ((1 + w) scaling): make them matter
            for n in ("q_norm", "k_norm", "input_layernorm", "post_attention_layernorm",
                      "pre_feedforward_layernorm", "post_feedforward_layernorm"):
                w = getattr(layer.self_attn if n in ("q_norm", "k_norm") else layer, n).weight
                w.copy_(torch.rand(w.shape, generator=g) - 0.5)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    heads = [1, 3]
    apply_plan(model, Plan(layers={i: LayerPlan(heads=heads) for i in range(3)}))
    assert model.model.layers[0].self_attn.q_norm.weight.shape == (32,)  # per head_dim: nothing was cut
    assert model.config.num_attention_heads == 2 and model.config.head_dim == 32
    ref = _hand_sliced("gemma3_text", sd, heads, [0], 32)
    with torch.no_grad():
        logits = model(IDS).logits
        assert torch.allclose(logits, ref(IDS).logits, atol=1e-5)
    info = export_model(model, None, tmp_path / "out", kind="auto", plan={}, overwrite=True)
    assert info["kind"] == "stock"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert isinstance(reloaded, Gemma3ForCausalLM) and reloaded.config.layer_types == model.config.layer_types
    with torch.no_grad():
        assert torch.allclose(reloaded(IDS).logits, logits, atol=1e-5)


def test_gemma_sizing_keeps_head_counts_the_config_accepts():
    """Gemma's configs refuse a hidden size the head count does not divide: sizing never lands there (64
    hidden: Gemma-2's 3 of 4 KV groups = 6 heads, Gemma-3's 3 of 4 heads are refused)."""
    from compress.errors import TargetError
    from compress.model.sizing import solve_uniform

    seen = {}
    for kind, unit in (("gemma2", "kv_group"), ("gemma2", "head"), ("gemma3_text", "head")):
        arch = _REGISTRY.adapter_for(_meta(kind))
        for pct in range(55, 100, 3):
            for rnd in ("down", "nearest", "up"):
                w = solve_uniform(arch, Target.parse(f"{pct}%"), attn_unit=unit, attn_round=rnd)
                per = arch.geometry(0).group_size if unit == "kv_group" else arch.geometry(0).num_kv_heads
                heads = w.attn_units * per
                assert 64 % heads == 0 and w.predicted <= w.goal, (kind, unit, pct, rnd, w)
                seen.setdefault((kind, unit), set()).add(heads)
                if "refused" in w.note:
                    assert "does not divide" in w.note
    assert seen[("gemma2", "kv_group")] >= {2, 4, 8} and seen[("gemma3_text", "head")] >= {2, 4}
    arch = _REGISTRY.adapter_for(_meta("gemma2"))
    with pytest.raises(TargetError, match="6 query heads per layer: gemma2's config refuses"):
        solve_uniform(arch, Target.parse("60%"), fixed=(3, 48))
    with pytest.raises(TargetError, match="does not divide"):  # transact's explicit widths go the same way
        _REGISTRY.pruners["transact"]({"gqa": "groups", "attn_heads": 6, "mlp_dim": 48}).final_widths(
            arch, Target.parse("60%"))


def test_one_kv_head_keeps_attention_with_whole_groups_and_says_so(tmp_path, assets):
    """Gemma-3's single KV head: with gqa=groups a unit is all of the attention, so TransAct keeps it and
    the MLP takes the whole cut; the notes say so. gqa=heads prunes query heads inside the group."""
    from compress.calib.sources import CalibrationSource
    from compress.pruner import PruneContext
    from compress.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    calib = CalibrationSource.from_spec("tinystories", tok, seed=0, max_chars=200_000)
    for gqa in ("groups", "heads"):
        model = tiny_model("gemma3_text")
        arch = _REGISTRY.adapter_for(model)
        ctx = PruneContext(arch=arch, tokenizer=tok, calibration=calib, seed=0, progress=False, log=lambda m: None)
        pruner = _REGISTRY.pruners["transact"]({"gqa": gqa, "calib_samples": 4, "calib_seq_len": 32})
        result = pruner.prune(model, Target.parse("70%"), ctx)
        widths = result.notes["widths"]
        assert widths["kv_heads"] == 1 and (widths["heads"] == 4) == (gqa == "groups") and 64 % widths["heads"] == 0
        if gqa == "groups":
            assert widths["attn_units"] == widths["attn_units_dense"] == 1 and "attention" in widths["note"]
            assert "kept dense" in widths["note"]
            assert all("heads" not in lp and "kv_heads" not in lp for lp in result.plan["layers"].values())
        with torch.no_grad():
            assert torch.isfinite(result.model(IDS).logits).all()


@pytest.mark.parametrize("kind", ["gemma2", "gemma3_text"])
def test_gemma_logits_are_soft_capped_and_hidden_is_kept(kind):
    model = tiny_model(kind)
    arch = _REGISTRY.adapter_for(model)
    if kind == "gemma3_text":  # its config has no final soft-capping by default: give it the Gemma-2 value
        model.config.final_logit_softcapping = 30.0
    with torch.no_grad():
        h = model.model(IDS).last_hidden_state
        logits = model(IDS).logits
        assert torch.allclose(arch.logits(h), logits, atol=1e-6)  # what layer-wise gradients use
        assert not torch.allclose(arch.lm_head(arch.final_norm(h)), logits, atol=1e-6)
    with pytest.raises(UsageError, match=r"sqrt\(hidden_size\)") as e:
        apply_plan(model, Plan(hidden=list(range(48))))
    assert "\n" not in str(e.value)
    assert arch.post_attn_norm(0) is model.model.layers[0].pre_feedforward_layernorm  # the norm the MLP reads
    assert len(arch.hidden_norms(0)) == 4


def test_layerwise_gradients_on_gemma_include_the_soft_capping(tmp_path):
    """LLM-Pruner's layer-wise Taylor gradients (``--layerwise``) build the loss from the last layer's output
    through :meth:`ArchAdapter.logits`: with Gemma's soft-capping (made to bind on the tiny logits) and its
    per-layer sliding / global masks (16 tokens, window 8) they equal the whole model's autograd."""
    import copy

    from compress.calib.gradients import loss_gradients

    model = tiny_model("gemma2")
    model.config.final_logit_softcapping = 0.5  # |logits| ~ 1: tanh(x / 0.5) is far from linear
    named = dict(model.named_parameters())
    params = [p for n, p in named.items() if n.startswith(("model.layers.0.", "model.layers.2.")) and "norm" not in n]
    tokens = torch.randint(3, 512, (4, 16), generator=torch.Generator().manual_seed(1))
    ref = copy.deepcopy(model)
    ref(input_ids=tokens, labels=tokens).loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    got, _ = loss_gradients(model, params, tokens, batch_size=4, layerwise=True, cache=tmp_path)
    names = {p: n for n, p in named.items()}
    for p in params:
        torch.testing.assert_close(got[p], ref_grads[names[p]], rtol=1e-4, atol=1e-7)


def test_depth_on_sliding_layers_refuses_flops_and_kv_targets_up_front():
    """Gemma-3's sliding layers (window 8) cost less attention and cache than its global layer at 2048
    tokens, so whole-layer sizing cannot meet a FLOPs or KV target exactly; a params target runs."""
    cls = _REGISTRY.pruners["depth"]
    for metric in ("flops", "kv"):
        with pytest.raises(Unsupported, match=f"sliding-window and global layers differ in {metric}"):
            cls().check(_meta("gemma3_text"), Target.parse(f"{metric}:70%"))
    cls().check(_meta("gemma3_text"), Target.parse("70%"))


# ------------------------------------------------------------------------------ OLMo-2: whole-width q/k norms
@pytest.mark.parametrize("unit", ["kv_heads", "heads"])
def test_olmo2_head_removal_cuts_the_qk_norms_and_matches_a_hand_sliced_model(unit, tmp_path):
    """q_norm / k_norm are RMSNorms over all heads at once (64 / 32 channels): a removed head takes its rows
    of them; the export names head_dim (OLMo-2 configs have none, and 64 / 2 heads != 16) and reloads equal."""
    import json

    from transformers import AutoModelForCausalLM, Olmo2ForCausalLM

    from compress.io.export import export_model

    model = _eager("olmo2")
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        for layer in model.model.layers:  # norms start at ones: make them matter
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) * 1.5 + 0.25)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if unit == "kv_heads":
        kv, heads, mlp = [1], [2, 3], list(range(0, 96, 2))
        lp = LayerPlan(kv_heads=kv, mlp=mlp)
    else:
        kv, heads, mlp = [0, 1], [0, 3], None  # one of the two query heads of each KV group
        lp = LayerPlan(heads=heads)
    apply_plan(model, Plan(layers={i: lp for i in range(3)}))
    attn = model.model.layers[0].self_attn
    assert attn.q_norm.weight.shape == (len(heads) * 16,) and attn.k_norm.weight.shape == (len(kv) * 16,)
    ref = _hand_sliced("olmo2", sd, heads, kv, 16, mlp)
    with torch.no_grad():
        logits = model(IDS).logits
        assert torch.allclose(logits, ref(IDS).logits, atol=1e-5)
    info = export_model(model, None, tmp_path / "out", kind="auto", plan={}, overwrite=True)
    assert info["kind"] == "stock"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["head_dim"] == 16
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert isinstance(reloaded, Olmo2ForCausalLM)
    with torch.no_grad():
        assert torch.allclose(reloaded(IDS).logits, logits, atol=1e-5)


def test_olmo2_sizing_counts_the_qk_norm_rows():
    """A KV group of the tiny OLMo-2 (2 query heads + 1 KV head of 16) costs its linears' weights plus
    48 q/k-norm entries; the solver's prediction is the measured count."""
    from compress.model.footprint import count_params
    from compress.model.sizing import shape_plan, solve_uniform, unit_costs

    arch = _REGISTRY.adapter_for(tiny_model("olmo2"))
    assert unit_costs(arch, 0, "kv_group", 2048, 4)["params"][0] == 2 * 64 * 32 + 2 * 64 * 16 + 2 * 16 + 16
    w = solve_uniform(arch, Target.parse("60%"))
    model = apply_plan(arch.model, shape_plan(arch, w), arch)
    assert count_params(model) == w.predicted
    with pytest.raises(Unsupported, match="no input norm"):
        arch.input_norm(0)


# ------------------------------------------------------------------------------ sliding-window footprints
def _sliding(kind: str, window: int = 8):
    """Eager tiny models whose layers slide: Mistral every layer, Qwen2/Qwen3 layers >= max_window_layers;
    Gemma-2 / Gemma-3 as their tiny configs are (window 8 on alternating / 2-in-3 layers); OLMo-2 none."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(kind)
    if kind in NEW:
        assert getattr(cfg, "sliding_window", None) in (window, None)
    elif kind == "mistral":
        cfg.sliding_window = window
    else:
        cfg = type(cfg)(**{**cfg.to_dict(), "use_sliding_window": True, "sliding_window": window,
                           "max_window_layers": 1, "layer_types": None})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


@pytest.mark.parametrize(("kind", "windows"), [("mistral", [8, 8, 8]), ("qwen2", [None, 8, 8]),
                                               ("qwen3", [None, 8, 8]), ("gemma2", [8, None, 8]),
                                               ("gemma3_text", [8, 8, None]), ("olmo2", [None, None, None])])
def test_sliding_layers_are_read_as_transformers_reads_them(kind, windows):
    model = _sliding(kind)
    arch = _REGISTRY.adapter_for(model)
    assert [arch.sliding_window(i) for i in range(3)] == windows
    assert [_REGISTRY.adapter_for(tiny_model(k)).sliding_window(0) for k in ("qwen2", "qwen3")] == [None, None]
    # what the model itself uses: each attention's window and the cache layer it fills
    if kind in NEW:
        assert [getattr(arch.attention(i), "sliding_window", None) for i in range(3)] == windows
    with torch.no_grad():
        cache = model(IDS, use_cache=True).past_key_values
    assert [type(layer).__name__ == "DynamicSlidingWindowLayer" for layer in cache.layers] == [bool(w) for w in windows]


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "qwen3", *NEW])
@pytest.mark.parametrize("seq_len", [5, 20])
def test_kv_bytes_are_what_the_cache_holds(kind, seq_len):
    model = _sliding(kind)
    ids = torch.randint(3, 500, (1, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert kv_bytes_per_token(model, seq_len=seq_len) == pytest.approx(held / seq_len, rel=1e-12)
    full = _REGISTRY.adapter_for(model)
    dense_width = sum(full.kv_width(i) for i in range(3)) * 4
    if seq_len >= 8 and kind != "olmo2":  # the window binds: a sliding layer holds its last W - 1 = 7 tokens only
        assert kv_bytes_per_token(model, seq_len=seq_len) < dense_width
    else:
        assert kv_bytes_per_token(model, seq_len=seq_len) == dense_width


def test_gemma_kv_bytes_per_layer_type():
    """Gemma-3's one KV head of head_dim 32 (not hidden / heads = 16) on two sliding layers and one global
    layer; Gemma-2's 4 KV heads of 16 on alternating layers: per layer, (k + v) × KV heads × head_dim × fp32
    × the tokens it caches."""
    from compress.model.footprint import layer_kv_bytes_per_token

    T = 2048
    g3 = _REGISTRY.adapter_for(tiny_model("gemma3_text"))
    assert [layer_kv_bytes_per_token(g3, i, T) for i in range(3)] == [2 * 32 * 4 * 7 / T] * 2 + [2 * 32 * 4]
    g2 = _REGISTRY.adapter_for(tiny_model("gemma2"))
    assert [layer_kv_bytes_per_token(g2, i, T) for i in range(3)] == [2 * 4 * 16 * 4 * 7 / T, 2 * 4 * 16 * 4,
                                                                      2 * 4 * 16 * 4 * 7 / T]
    assert kv_bytes_per_token(g2.model, seq_len=T) == pytest.approx(sum(layer_kv_bytes_per_token(g2, i, T)
                                                                        for i in range(3)))


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "qwen3", *NEW])
def test_attention_flops_read_the_window(kind):
    from torch.utils.flop_counter import FlopCounterMode

    from compress.model.footprint import flops_per_token, linear_flops_per_token

    model, T = _sliding(kind), 20
    ids = torch.randint(3, 500, (1, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        with FlopCounterMode(display=False) as fc:  # one decode step at context T + 1
            model(ids[:, :1], past_key_values=cache, use_cache=True)
    assert fc.get_total_flops() == flops_per_token(model, T + 1)
    # the window is what saves: a full-attention model of the same shapes reads all T + 1 keys
    arch = _REGISTRY.adapter_for(model)
    g = arch.geometry(0)
    unwindowed = linear_flops_per_token(model) + 3 * 4 * g.num_heads * g.head_dim * (T + 1)
    assert fc.get_total_flops() < unwindowed or kind == "olmo2"
    assert fc.get_total_flops() == unwindowed or kind != "olmo2"
    # an eager prefill multiplies the full masked T × T scores: FlopCounterMode counts no window there
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(ids, use_cache=False)
    assert fc.get_total_flops() == pytest.approx(T * (linear_flops_per_token(model) + 3 * 4 * g.num_heads * g.head_dim * T))


def test_footprint_reports_window_bound_kv():
    from compress.model.footprint import footprint

    model = _sliding("mistral")
    fp = footprint(model, seq_len=2048)
    assert fp.kv_bytes_per_token == pytest.approx(3 * 2 * 2 * 8 * 4 * 7 / 2048)
    assert footprint(tiny_model("mistral"), seq_len=2048).kv_bytes_per_token == 3 * 2 * 2 * 8 * 4  # W > T: unbounded


# ------------------------------------------------------------------------------ the matrix
def test_compress_families_json(capsys):
    import json

    from compress.cli import main

    assert main(["families", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "phi3" in out["families"] and "compress" not in out["families"]
    assert set(EQUAL_WIDTHS) <= set(out["families"])
    for kind in EQUAL_WIDTHS:
        assert out["methods"]["slicegpt"][kind] == "no" and out["methods"]["transact"][kind] == "yes"
        assert out["methods"]["llm_pruner"][kind] == ("no" if kind == "qwen3_moe" else "settings")
    assert {k: out["methods"]["lorap"][k] for k in EQUAL_WIDTHS} == dict.fromkeys(EQUAL_WIDTHS, "no")
    assert {n: row["qwen3_moe"] for n, row in out["methods"].items()} == {
        "depth": "yes", "llm_pruner": "no", "lorap": "no", "magnitude": "yes", "random": "yes", "slicegpt": "no",
        "transact": "yes"}
    assert all(v == "yes" for n, row in out["methods"].items() for f, v in row.items() if f not in EQUAL_WIDTHS), out
    for kind in FAMILY_KINDS:  # the matrix says what check() does on the family
        for name, row in out["methods"].items():
            assert _supported(name, kind) == (row[kind] != "no"), (name, kind)


def test_compress_methods_json_carries_the_family_matrix(capsys):
    """`compress methods --json` has each method's row of the method × family matrix, the same as
    `compress families --json`."""
    import json

    from compress.cli import main

    assert main(["families", "--json"]) == 0
    families = json.loads(capsys.readouterr().out)
    assert main(["methods", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    rows = rows["methods"] if isinstance(rows, dict) else rows
    ours = {r["name"]: r["families"] for r in rows if r["name"] in families["methods"]}
    assert ours == families["methods"] and "gemma3_text" in ours["transact"]
