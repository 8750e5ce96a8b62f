"""Save a pruned model so that stock ``transformers`` reloads it, atomically.

Two formats:

* ``stock``    — every layer has the same shapes and the family's own config class accepts them
  (transformers 5.x still checks ``hidden_size % num_attention_heads == 0``): a plain checkpoint.
* ``compress`` — anything else: ``architectures: [CompressForCausalLM]`` with one spec per layer (and
  the base family as ``model_type``, so a stock ``AutoTokenizer`` loads the folder without a prompt),
  the modeling file copied into the folder and ``auto_map`` set, so ``trust_remote_code=True`` loads it
  without this package, and ``compress``'s loader (``compress.io.loading.load_model``, every command)
  loads it with its own class, never running the folder's code. Its sha256 is recorded in the config.

Everything is written into a temporary sibling folder and renamed into place at the end, so an
interrupted export leaves the output complete or absent, never partial.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.errors import UsageError
from compress.io.outpath import PLAN_FILE, RECORD_FILE, Input
from compress.io.outpath import check_output_dir as _check_output_dir
from compress.io.safe_io import dumps_json, respect_umask
from compress.model.adapter import ArchAdapter, adapter_for
from compress.modeling import MODELING_FILE, CompressConfig, CompressForCausalLM, LowRankLinear

_DROP_KEYS = {"model_type", "architectures", "transformers_version", "auto_map", "_name_or_path",
              "quantization_config", "dtype", "torch_dtype"}


def modeling_sha256() -> str:
    return hashlib.sha256(MODELING_FILE.read_bytes()).hexdigest()


# ---------------------------------------------------------------------- describing the shapes
def layer_specs(model: nn.Module, arch: ArchAdapter | None = None) -> list[dict[str, Any]]:
    """One spec per decoder layer, read from the modules (the format of ``CompressConfig.layers``)."""
    arch = arch or adapter_for(model)
    hidden = int(arch.embed_tokens.weight.shape[1])
    specs = []
    for i in range(arch.num_layers):
        g = arch.geometry(i)
        layer = arch.layers[i]
        q, _, _, o = arch.attn_names
        h_in = int(getattr(arch.attention(i), q).in_features)
        h_mid = int(getattr(arch.attention(i), o).out_features)
        experts = arch.experts(i)
        h_out = experts.hidden if experts is not None else int(arch.down_proj(i).out_features)
        spec: dict[str, Any] = {
            "num_attention_heads": g.num_heads,
            "num_key_value_heads": g.num_kv_heads,
            "intermediate_size": g.intermediate,
        }
        if (h_in, h_mid, h_out) != (hidden, hidden, hidden):
            spec.update(hidden_in=h_in, hidden_mid=h_mid, hidden_out=h_out)
        low = {n: m.rank for n, m in layer.named_modules() if isinstance(m, LowRankLinear)}
        if low:
            spec["low_rank"] = dict(sorted(low.items()))
        if hasattr(layer, "attn_shortcut"):
            spec["shortcut"] = True
        specs.append(spec)
    return specs


#: A stock class that computes a family's function exactly and accepts shapes that family's own config
#: refuses. transformers 5.x ``LlamaConfig`` checks ``hidden_size % num_attention_heads == 0`` even with
#: an explicit ``head_dim``; ``MistralConfig`` does not, and with ``sliding_window=None`` a Mistral layer
#: is a Llama layer without biases (same parameter names, RMSNorm, SwiGLU MLP, rotary embedding with
#: the same ``rope_parameters``, llama3 scaling included). Llama-only keys must be at their no-op values.
STOCK_ALTERNATIVES: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    # family: (stock model_type, keys that must hold these values, keys set on the alternative)
    "llama": ("mistral", {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}, {"sliding_window": None}),
}


def _uniform_config(model: nn.Module, arch: ArchAdapter) -> tuple[Any | None, str]:
    """The stock config that describes ``model`` exactly (its own family's, else an equivalent stock
    family's from :data:`STOCK_ALTERNATIVES`), or None with the reason there is none."""
    from transformers import AutoConfig

    cfg = model.config
    if cfg.model_type == CompressConfig.model_type:
        return None, "the model already uses the compress format"
    specs = layer_specs(model, arch)
    if any("low_rank" in s or "shortcut" in s or "hidden_in" in s for s in specs):
        return None, "low-rank factors, shortcuts or per-layer residual widths"
    if any(s != specs[0] for s in specs):
        return None, "layers differ in width"
    s = specs[0]
    d = cfg.to_dict()
    d.update(num_attention_heads=s["num_attention_heads"], num_key_value_heads=s["num_key_value_heads"],
             head_dim=arch.head_dim(0), hidden_size=int(arch.embed_tokens.weight.shape[1]))
    d[arch.intermediate_key] = s["intermediate_size"]  # a Mixture-of-Experts family: each expert's width
    kwargs = {k: v for k, v in d.items() if k not in _DROP_KEYS}
    try:
        return type(cfg)(**kwargs), "uniform shapes accepted by the stock config"
    except Exception as e:  # noqa: BLE001 - any validation failure means "not this class"
        own_error = str(e).strip().splitlines()[-1].strip()[:120] if str(e).strip() else type(e).__name__
    alt = STOCK_ALTERNATIVES.get(cfg.model_type)
    if alt is not None:
        alt_type, required, extra = alt
        if all(kwargs.get(k, v) in (v, None) for k, v in required.items()):
            try:
                alt_cfg = AutoConfig.for_model(alt_type, **{k: v for k, v in kwargs.items() if k not in required},
                                               **extra)
            except Exception:  # noqa: BLE001
                alt_cfg = None
            if alt_cfg is not None:
                return alt_cfg, (f"uniform shapes, written as the equivalent stock {alt_type} class "
                                 f"({cfg.model_type}'s config rejects them: {own_error})")
    return None, f"the stock config rejects these shapes ({own_error})"


def stock_expressible(model: nn.Module, arch: ArchAdapter | None = None) -> tuple[bool, str]:
    """Whether a stock config (the model's own family's, or an equivalent stock family's) describes it
    exactly and validates; the reason says which."""
    stock, why = _uniform_config(model, arch or adapter_for(model))
    return stock is not None, why


def _retarget(model: nn.Module, target: nn.Module, tied: bool) -> nn.Module:
    """Put ``model``'s tensors into ``target`` (built on the meta device; no copy: tensors are shared),
    with the non-persistent buffers (rotary ``inv_freq``) and the generation config of the source."""
    missing, unexpected = target.load_state_dict(model.state_dict(), strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and tied)]
    if missing or unexpected:
        raise RuntimeError(f"{type(target).__name__} does not match the pruned model: missing={missing[:5]} "
                           f"unexpected={unexpected[:5]}")
    if tied:
        target.lm_head.weight = target.model.embed_tokens.weight
    src_buffers = dict(model.named_buffers())
    for name, buf in list(target.named_buffers()):
        if buf.is_meta and name in src_buffers:
            mod_name, _, bname = name.rpartition(".")
            target.get_submodule(mod_name)._buffers[bname] = src_buffers[name]
    still_meta = [n for n, t in list(target.named_parameters()) + list(target.named_buffers()) if t.is_meta]
    if still_meta:
        raise RuntimeError(f"tensors left on meta after conversion: {still_meta[:5]}")
    if getattr(model, "generation_config", None) is not None:  # eos ids, sampling defaults of the source
        import copy

        target.generation_config = copy.deepcopy(model.generation_config)
    return target.eval()


def _as_stock(model: nn.Module, stock: Any, tied: bool) -> nn.Module:
    """``model`` itself when ``stock`` (from :func:`_uniform_config`) is its own config class, else the
    same weights in the equivalent stock class (e.g. a Llama whose head count does not divide its
    hidden size as ``MistralForCausalLM``: the same function, tested logit for logit)."""
    from transformers import AutoModelForCausalLM

    if type(stock) is type(model.config):
        return model
    stock._attn_implementation = getattr(model.config, "_attn_implementation", None) or "sdpa"
    stock.dtype = next(model.parameters()).dtype
    with torch.device("meta"):
        target = AutoModelForCausalLM.from_config(stock)
    return _retarget(model, target, tied)


def compress_config(model: nn.Module, arch: ArchAdapter | None = None) -> CompressConfig:
    """The ``compress`` config describing ``model`` exactly."""
    arch = arch or adapter_for(model)
    cfg = model.config
    if isinstance(cfg, CompressConfig):
        base_type, base = cfg.base_model_type, dict(cfg.base_config)
    else:
        base_type = cfg.model_type
        base = {k: v for k, v in cfg.to_dict().items() if k not in _DROP_KEYS}
    hidden = int(arch.embed_tokens.weight.shape[1])
    # The base config must validate in its own class: one head always divides the hidden size; the
    # real per-layer head counts and MLP widths live in ``layers``. config.json names the base family
    # (so a stock AutoTokenizer never prompts); a stock class built from it without trust_remote_code
    # gets MLPs of width 1, so it refuses every layer's MLP weights (size mismatch) instead of loading a
    # wrong model.
    base.update(hidden_size=hidden, num_attention_heads=1, num_key_value_heads=1, head_dim=arch.head_dim(0),
                intermediate_size=1)
    out = CompressConfig(
        base_model_type=base_type,
        base_config=base,
        layers=layer_specs(model, arch),
        hidden_size=hidden,
        tie_word_embeddings=arch.tied_embeddings,
        architectures=["CompressForCausalLM"],
        auto_map={"AutoConfig": "modeling_compress.CompressConfig",
                  "AutoModelForCausalLM": "modeling_compress.CompressForCausalLM"},
        compress_modeling_sha256=modeling_sha256(),
    )
    out.dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    return out


def to_compress_model(model: nn.Module, arch: ArchAdapter | None = None) -> CompressForCausalLM:
    """The same weights in a :class:`CompressForCausalLM` (no copy: tensors are shared)."""
    arch = arch or adapter_for(model)
    cfg = compress_config(model, arch)
    cfg._attn_implementation = getattr(model.config, "_attn_implementation", None) or "sdpa"
    with torch.device("meta"):
        cm = CompressForCausalLM(cfg)
    return _retarget(model, cm, arch.tied_embeddings)


# ---------------------------------------------------------------------- writing
def check_output_dir(out: str | os.PathLike, overwrite: bool = False, *, inputs: Iterable[Input] = ()) -> Path:
    """Refuse an output folder before any work: one that overlaps ``inputs``, exists (unless
    ``overwrite`` and compress wrote it) or cannot be created (:func:`compress.io.outpath.check_output_dir`)."""
    return _check_output_dir(out, overwrite, inputs=inputs)


def export_model(
    model: nn.Module,
    tokenizer: Any,
    out: str | os.PathLike,
    *,
    kind: str = "auto",
    plan: dict | None = None,
    record: dict | None = None,
    overwrite: bool = False,
    card: str | None = None,
) -> dict[str, Any]:
    """Write ``model`` (+ tokenizer, plan, run record, model card) to ``out`` atomically.

    Returns ``{"path", "kind", "reason"}``. ``kind="auto"`` picks ``stock`` when possible.
    """
    out = check_output_dir(out, overwrite)
    arch = adapter_for(model)
    stock, reason = _uniform_config(model, arch)
    ok = stock is not None
    if kind == "stock" and not ok:
        raise UsageError(f"cannot export as stock: {reason}; use the compress format")
    chosen = "stock" if (kind in ("auto", "stock") and ok) else "compress"
    mt = getattr(model.config, "model_type", None)
    if chosen == "compress" and mt != CompressConfig.model_type and "per_layer_shapes" not in arch.features:
        # phi3, gemma2, gemma3_text, olmo2: CompressForCausalLM does not rebuild their layers
        why = reason if not ok else "the compress format was asked for"
        raise UsageError(f"cannot export this {mt} model: {why}, and the compress format does not cover {mt} "
                         "models; prune to widths its stock config accepts")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if chosen == "stock":
            stock_model = _as_stock(model, stock, arch.tied_embeddings)
            stock_model.config.architectures = [type(stock_model).__name__]
            with _without_auto_map(stock_model.config):  # the input's code is not copied: do not point at it
                stock_model.save_pretrained(tmp, safe_serialization=True)
        else:
            cm = to_compress_model(model, arch)
            cm.save_pretrained(tmp, safe_serialization=True)
            shutil.copyfile(MODELING_FILE, tmp / MODELING_FILE.name)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        meta = {"format": chosen, "format_reason": reason, "weights_sha256": weights_sha256(tmp)}
        # standard JSON only (NaN/inf as null): compress.io.safe_io.dumps_json
        (tmp / PLAN_FILE).write_text(dumps_json({**(plan or {}), **meta}, indent=1, sort_keys=True) + "\n")
        (tmp / RECORD_FILE).write_text(dumps_json({**(record or {}), **meta}, indent=1, sort_keys=True,
                                                  default=str) + "\n")
        if (record or {}).get("recipe"):
            from compress.io.recipe import RECIPE_FILE, dump_recipe

            (tmp / RECIPE_FILE).write_text(dump_recipe(record["recipe"]), encoding="utf-8")
        (tmp / "README.md").write_text(card or _default_card(record or {}, chosen))
        respect_umask(tmp)  # mkdtemp made it 0700: the output gets the modes mkdir would give it
        _fsync_tree(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"path": str(out), "kind": chosen, "reason": reason, "weights_sha256": meta["weights_sha256"]}


@contextlib.contextmanager
def _without_auto_map(config: Any) -> Iterator[None]:
    """``config`` without ``auto_map`` while a stock folder is written: an input's ``auto_map`` points at
    modeling code that the export does not copy (and that compress never runs), so a stock folder that
    kept it would ask ``trust_remote_code`` users for code that is not there. Restored afterwards: the
    in-memory model is the caller's."""
    saved = config.__dict__.pop("auto_map", None)
    try:
        yield
    finally:
        if saved is not None:
            config.auto_map = saved


def weights_sha256(folder: Path) -> str:
    """sha256 over the folder's safetensors files in name order (determinism checks, run records).

    Read in 16 MiB chunks: reading a file whole would hold a second copy of the model's weights in
    memory (it raised a streamed run's peak RSS from 0.66x to 1.09x of the dense weights)."""
    h = hashlib.sha256()
    for f in sorted(Path(folder).glob("*.safetensors")):
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _human(n: float | None) -> str:
    if n is None:
        return "?"
    for suf, mul in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= mul:
            return f"{n / mul:.1f}{suf}"
    return f"{n:,.0f}"


def _default_card(record: dict, kind: str) -> str:
    """A Hub-ready model card: YAML front matter (base model, license, pipeline tag, tags), the dense
    comparison, the quality check, and a warning when no recovery training was run. No local path."""
    model = record.get("model") if isinstance(record.get("model"), dict) else {"source": record.get("model")}
    method, target = record.get("method", "pruned"), record.get("target", "")
    front = ["---"]
    if model.get("base_model"):
        front.append(f"base_model: {model['base_model']}")
    if model.get("license"):
        front.append(f"license: {model['license']}")
    front += ["library_name: transformers", "pipeline_tag: text-generation",
              f"tags: [pruned, structured-pruning, compress, {method}]", "---"]
    source = model.get("base_model") or Path(str(model.get("source") or "?")).name
    lines = [*front, f"# {source} · {method} → {target}", "",
             f"Structurally pruned from `{source}` with compress (structured pruning of causal LMs), method "
             f"`{method}` (target {target}, seed {record.get('seed', '?')}).", ""]
    d, a = record.get("dense") or {}, record.get("achieved") or {}
    q = record.get("quality")
    if a:
        def row(label: str, key: str, fmt) -> str:
            dv, av = d.get(key), a.get(key)
            ratio = f"{av / dv:.1%}" if dv and av is not None else ""
            return f"| {label} | {fmt(dv)} | {fmt(av)} | {ratio} |"

        lines += ["| | dense | pruned | ratio |", "|---|---|---|---|",
                  row("parameters", "params", _human),
                  row(f"forward FLOPs/token (T={a.get('seq_len', '?')})", "flops_per_token", _human),
                  row(f"KV-cache bytes/token ({a.get('dtype', '?')})", "kv_bytes_per_token",
                      lambda v: "?" if v is None else f"{v:,}")]
        if q:
            lines.append(f"| perplexity ({q['dense']['tokens']:,} held-out WikiText-2 test tokens) | "
                         f"{q['dense']['ppl']:,.2f} | {q['pruned']['ppl']:,.2f} | {q['ratio']:.2f}× |")
        lines.append("")
    if not record.get("recovery_result"):
        rose = f" (perplexity {q['ratio']:.1f}× the dense model's)" if q else ""
        lines += ["> **Warning: no recovery training was run after pruning**" + rose + ". Structured pruning "
                  "removes capacity; recover it before use with `compress recover THIS_FOLDER --tokens N "
                  "--out DIR` (or `compress run ... --recover-tokens N`).", ""]
    lines += [f"- format: `{kind}`" + (" — per-layer shapes: load the model with `trust_remote_code=True` (the "
                                       "code is `modeling_compress.py` in this folder), or with `compress`"
                                       if kind == "compress" else " — loads with stock transformers"),
              "- `compress_plan.json` lists what each layer kept; `compress_run.json` is the full run record;",
              "  `compress_recipe.yaml` (when present) is the resolved recipe that re-runs it.", ""]
    flag = ", trust_remote_code=True" if kind == "compress" else ""
    lines += [
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder"{flag})',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        "```",
        "",
    ]
    return "\n".join(lines)
