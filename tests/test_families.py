"""Families beyond Llama: every registered method passes the conformance suite on Mistral, Qwen3 and
Phi-3 or is refused before any weight is loaded; Qwen3's q/k norms and Phi-3's fused projections are
sliced correctly (against references built by hand from the dense weights)."""

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
from compress.testing import check_adapter, check_pruner, tiny_config, tiny_model

_REGISTRY = get_registry()
METHODS = sorted(_REGISTRY.pruners)
#: depth removes whole layers: one layer of the untied 3-layer tiny Mistral is 62 % of it
TARGET = {"depth": "70%"}
IDS = torch.tensor([[1, 17, 250, 33, 401, 5, 98, 12, 7, 300]])


def _meta(kind: str, **overrides):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(kind)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def _supported(name: str, kind: str) -> bool:
    cls = _REGISTRY.pruners[name]
    try:
        cls().check(_meta(kind), Target.parse(TARGET.get(name, "60%")))
    except Unsupported:
        return False
    return True


def test_families_are_registered_through_the_hook():
    assert {"llama", "mistral", "qwen2", "qwen3", "phi3"} <= set(_REGISTRY.architectures)
    fam = [p for p in _REGISTRY.plugins if p.name == "families"]
    assert fam and fam[0].status == "loaded" and fam[0].builtin  # the entry point of the compress distribution
    assert type(_REGISTRY.adapter_for(tiny_model("phi3"))).__name__ == "Phi3Adapter"


# ------------------------------------------------------------------------------ conformance per family
@pytest.mark.parametrize("kind", ["mistral", "qwen3", "phi3"])
@pytest.mark.parametrize("name", METHODS)
def test_every_method_passes_or_is_refused_up_front(name, kind, tmp_path, assets):
    if not _supported(name, kind):
        pytest.skip(f"{name} refuses {kind} (tested below)")
    report = check_pruner(_REGISTRY.get(name), tmp_dir=tmp_path, targets=(TARGET.get(name, "60%"),), kinds=(kind,))
    assert len(report) == 1 and report[0]["params"] < report[0]["dense"]
    assert report[0]["reload_max_diff"] <= 1e-5


@pytest.mark.parametrize("kind", ["mistral", "qwen3"])
def test_llama_shaped_families_refuse_nothing(kind):
    assert [n for n in METHODS if not _supported(n, kind)] == []


@pytest.mark.parametrize("name", ["slicegpt", "lorap"])
def test_phi3_refusals_come_before_weights_with_an_alternative(name):
    if name not in _REGISTRY.pruners:
        pytest.skip(f"{name} is not registered")
    model = _meta("phi3")  # config only: no weight exists
    with pytest.raises(Unsupported) as e:
        _REGISTRY.pruners[name]().check(model, Target.parse("60%"))
    msg = str(e.value)
    assert "\n" not in msg and "phi3" in msg and "use transact instead" in msg
    assert FEATURES["separate_projections"] in msg


def test_llm_pruner_on_phi3_needs_every_layer_pruned_alike():
    cls = _REGISTRY.pruners["llm_pruner"]
    model = _meta("phi3", num_hidden_layers=32)  # the official 4..30-of-32 range: layers would differ
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

    def rows(w, hs):
        return torch.cat([w[h * hd:(h + 1) * hd] for h in hs])

    new = {}
    for k, v in sd.items():
        if k.endswith("q_proj.weight"):
            v = rows(v, heads)
        elif k.endswith(("k_proj.weight", "v_proj.weight")):
            v = rows(v, kv_keep)
        elif k.endswith("o_proj.weight"):
            v = rows(v.T, heads).T
        new[k] = v
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


# ------------------------------------------------------------------------------ sliding-window footprints
def _sliding(kind: str, window: int = 8):
    """Eager tiny models whose layers slide: Mistral every layer, Qwen2/Qwen3 layers >= max_window_layers."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(kind)
    if kind == "mistral":
        cfg.sliding_window = window
    else:
        cfg = type(cfg)(**{**cfg.to_dict(), "use_sliding_window": True, "sliding_window": window,
                           "max_window_layers": 1, "layer_types": None})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


@pytest.mark.parametrize(("kind", "windows"), [("mistral", [8, 8, 8]), ("qwen2", [None, 8, 8]),
                                               ("qwen3", [None, 8, 8])])
def test_sliding_layers_are_read_as_transformers_reads_them(kind, windows):
    arch = _REGISTRY.adapter_for(_sliding(kind))
    assert [arch.sliding_window(i) for i in range(3)] == windows
    assert [_REGISTRY.adapter_for(tiny_model(k)).sliding_window(0) for k in ("qwen2", "qwen3")] == [None, None]


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "qwen3"])
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
    if seq_len >= 8:  # the window binds: a sliding layer holds its last W - 1 = 7 tokens only
        assert kv_bytes_per_token(model, seq_len=seq_len) < dense_width
    else:
        assert kv_bytes_per_token(model, seq_len=seq_len) == dense_width


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "qwen3"])
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
    assert fc.get_total_flops() < unwindowed
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
    assert out["methods"]["slicegpt"]["phi3"] == "no" and out["methods"]["transact"]["phi3"] == "yes"
    assert out["methods"]["llm_pruner"]["phi3"] == "settings"
    assert all(v == "yes" for n, row in out["methods"].items() for f, v in row.items() if f != "phi3"), out
    for kind in ("mistral", "qwen3", "phi3"):  # the matrix says what check() does on the family
        for name, row in out["methods"].items():
            assert _supported(name, kind) == (row[kind] != "no"), (name, kind)
