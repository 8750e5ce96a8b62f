# Copyright the compress authors. Apache-2.0.
"""Model classes for pruned shapes that a stock transformers config cannot express.

This file is copied verbatim into every exported ``compress`` model folder and referenced from its
``config.json`` through ``auto_map``, so ``AutoModelForCausalLM.from_pretrained(path,
trust_remote_code=True)`` works without the ``compress`` package. It must therefore import only
``torch`` and ``transformers``.

A ``compress`` checkpoint is a stock model family (llama, mistral, qwen2, qwen3) whose decoder
layers may differ from each other:

* per-layer query heads, KV heads and MLP width (``num_attention_heads``, ``num_key_value_heads``,
  ``intermediate_size`` in each entry of ``config.layers``);
* low-rank linears: ``"low_rank": {"self_attn.q_proj": r, ...}`` replaces a linear by ``B(A(x))``;
* residual-stream widths and shortcut rotations (SliceGPT): ``hidden_in`` / ``hidden_mid`` /
  ``hidden_out`` per layer and ``"shortcut": true`` adds ``attn_shortcut`` and ``mlp_shortcut``
  linears applied to the residual.

``config.base_config`` is the dense model's config (valid for its own class); the per-layer
configs are copies of it with the layer's widths set on the live object.
"""

from __future__ import annotations

import contextlib
import copy
import importlib

import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

COMPRESS_MODEL_TYPE = "compress"

# model_type -> (module, config class, base model class, decoder layer class, norm class)
_FAMILIES = {
    "llama": ("llama", "LlamaConfig", "LlamaModel", "LlamaDecoderLayer", "LlamaRMSNorm"),
    "mistral": ("mistral", "MistralConfig", "MistralModel", "MistralDecoderLayer", "MistralRMSNorm"),
    "qwen2": ("qwen2", "Qwen2Config", "Qwen2Model", "Qwen2DecoderLayer", "Qwen2RMSNorm"),
    "qwen3": ("qwen3", "Qwen3Config", "Qwen3Model", "Qwen3DecoderLayer", "Qwen3RMSNorm"),
}
_LAYER_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


def family_classes(model_type: str) -> dict:
    """Config, base model, decoder layer and norm classes of a supported model family."""
    if model_type not in _FAMILIES:
        raise ValueError(
            f"compress models support the families {sorted(_FAMILIES)}, not {model_type!r}"
        )
    mod_name, cfg, base, layer, norm = _FAMILIES[model_type]
    mod = importlib.import_module(f"transformers.models.{mod_name}.modeling_{mod_name}")
    cfg_mod = importlib.import_module(f"transformers.models.{mod_name}.configuration_{mod_name}")
    return {
        "config": getattr(cfg_mod, cfg),
        "model": getattr(mod, base),
        "layer": getattr(mod, layer),
        "norm": getattr(mod, norm),
    }


class CompressConfig(PretrainedConfig):
    """Config of a layer-wise pruned model: the dense base config plus one spec per layer.

    ``config.json`` names the **base family** as its ``model_type`` (e.g. ``llama``), with
    ``architectures: [CompressForCausalLM]`` and ``auto_map`` pointing at this file. A stock
    ``AutoTokenizer.from_pretrained(folder)`` therefore reads a config type transformers knows and never
    asks whether to run custom code; ``AutoModelForCausalLM.from_pretrained(folder,
    trust_remote_code=True)`` follows ``auto_map`` here. (Without the flag transformers would build the
    family's stock class and refuse the per-layer weights: a loud size-mismatch error, never a silently
    wrong model.) In memory the type is ``compress``.
    """

    model_type = COMPRESS_MODEL_TYPE

    def __init__(
        self,
        base_model_type: str = "llama",
        base_config: dict | None = None,
        layers: list[dict] | None = None,
        **kwargs,
    ):
        self.base_model_type = base_model_type
        self.base_config = dict(base_config or {})
        self.layers = [dict(x) for x in (layers or [])]
        # Mirror the base config's top-level attributes (vocab, rope, special tokens, ...) that
        # generation and cache code read from the top-level config; explicit kwargs win.
        skip = {"model_type", "architectures", "transformers_version", "auto_map", "dtype", "torch_dtype"}
        for key, value in self.base_config.items():
            if key not in kwargs and key not in skip:
                kwargs[key] = value
        if self.layers:
            kwargs["num_hidden_layers"] = len(self.layers)
        kwargs.pop("model_type", None)  # the file's (the base family's); in memory it is ``compress``
        super().__init__(**kwargs)

    @classmethod
    def get_config_dict(cls, *args, **kwargs):
        config_dict, kwargs = super().get_config_dict(*args, **kwargs)
        if config_dict.get("architectures") == ["CompressForCausalLM"]:
            config_dict = {**config_dict, "model_type": cls.model_type}  # the file names the base family
        return config_dict, kwargs

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["model_type"] = self.base_model_type  # see the class docstring: no prompt for stock AutoTokenizer
        return out

    def build_base_config(self) -> PretrainedConfig:
        """The dense base config object, with global overrides (e.g. a sliced hidden size) set live."""
        fam = family_classes(self.base_model_type)
        cfg = fam["config"](**self.base_config)
        # Attributes set on the live object skip transformers' architecture validation, which would
        # reject e.g. a hidden size that the head count does not divide.
        cfg.hidden_size = self.hidden_size
        cfg.num_hidden_layers = len(self.layers)
        for key in ("attn_implementation", "_attn_implementation"):
            if hasattr(self, key):
                with contextlib.suppress(Exception):  # read-only on some versions
                    setattr(cfg, key, getattr(self, key))
        return cfg

    def layer_config(self, base: PretrainedConfig, i: int) -> PretrainedConfig:
        spec = self.layers[i]
        cfg = copy.copy(base)
        for key in _LAYER_KEYS:
            if key in spec:
                setattr(cfg, key, int(spec[key]))
        cfg.hidden_size = int(spec.get("hidden_in", self.hidden_size))
        return cfg


class LowRankLinear(nn.Module):
    """``y = B(A(x))``: a linear of rank ``rank``. ``A``: in→rank (no bias), ``B``: rank→out."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.B = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x))

    @property
    def weight(self) -> torch.Tensor:
        """The dense equivalent ``B·A`` (computed on access; for inspection, not for training)."""
        return self.B.weight @ self.A.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.B.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def _shortcut_forward(self, hidden_states, attention_mask=None, position_ids=None,
                      past_key_values=None, use_cache=False, position_embeddings=None, **kwargs):
    """Pre-norm block whose residual path is rotated by ``attn_shortcut`` / ``mlp_shortcut``."""
    residual = self.attn_shortcut(hidden_states)
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(
        hidden_states=hidden_states,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        use_cache=use_cache,
        position_embeddings=position_embeddings,
        **kwargs,
    )
    hidden_states = residual + hidden_states
    residual = self.mlp_shortcut(hidden_states)
    hidden_states = self.post_attention_layernorm(hidden_states)
    hidden_states = self.mlp(hidden_states)
    return residual + hidden_states


_SHORTCUT_CLASSES: dict[type, type] = {}


def shortcut_layer_class(base_cls: type) -> type:
    """Subclass of a stock decoder layer whose residual goes through shortcut linears."""
    if base_cls not in _SHORTCUT_CLASSES:
        _SHORTCUT_CLASSES[base_cls] = type(
            f"Shortcut{base_cls.__name__}", (base_cls,), {"forward": _shortcut_forward}
        )
    return _SHORTCUT_CLASSES[base_cls]


def make_shortcut_layer(layer: nn.Module, hidden_in: int, hidden_mid: int, hidden_out: int) -> nn.Module:
    """Give a decoder layer (in place) shortcut linears in→mid and mid→out on its residual path."""
    p = next(layer.parameters())
    layer.attn_shortcut = nn.Linear(hidden_in, hidden_mid, bias=False, device=p.device, dtype=p.dtype)
    layer.mlp_shortcut = nn.Linear(hidden_mid, hidden_out, bias=False, device=p.device, dtype=p.dtype)
    if not type(layer).__name__.startswith("Shortcut"):
        layer.__class__ = shortcut_layer_class(type(layer))
    return layer


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _linear_like(old: nn.Module, in_f: int, out_f: int, rank: int | None) -> nn.Module:
    bias = getattr(old, "bias", None) is not None
    if rank:
        return LowRankLinear(in_f, out_f, int(rank), bias=bias)
    return nn.Linear(in_f, out_f, bias=bias)


def build_layer(config: CompressConfig, base: PretrainedConfig, i: int, layer_cls: type,
                norm_cls: type) -> nn.Module:
    """Decoder layer ``i`` with the widths, low-rank factors and shortcuts its spec asks for."""
    spec = config.layers[i]
    lcfg = config.layer_config(base, i)
    layer = layer_cls(lcfg, i)
    h_in = int(spec.get("hidden_in", config.hidden_size))
    h_mid = int(spec.get("hidden_mid", h_in))
    h_out = int(spec.get("hidden_out", h_mid))
    eps = getattr(base, "rms_norm_eps", 1e-6)
    attn, mlp = layer.self_attn, layer.mlp
    if h_mid != h_in:
        attn.o_proj = _linear_like(attn.o_proj, attn.o_proj.in_features, h_mid, None)
        layer.post_attention_layernorm = norm_cls(h_mid, eps=eps)
        mlp.gate_proj = _linear_like(mlp.gate_proj, h_mid, mlp.gate_proj.out_features, None)
        mlp.up_proj = _linear_like(mlp.up_proj, h_mid, mlp.up_proj.out_features, None)
    if h_out != h_in:  # the layer was built at width h_in, so down_proj writes h_in until resized
        mlp.down_proj = _linear_like(mlp.down_proj, mlp.down_proj.in_features, h_out, None)
    for path, rank in (spec.get("low_rank") or {}).items():
        old = layer.get_submodule(path)
        _set_submodule(layer, path, _linear_like(old, old.in_features, old.out_features, rank))
    if spec.get("shortcut"):
        make_shortcut_layer(layer, h_in, h_mid, h_out)
    return layer


class CompressForCausalLM(PreTrainedModel, GenerationMixin):
    """Causal LM over a stock family's backbone with per-layer shapes from ``config.layers``."""

    config_class = CompressConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _skip_keys_device_placement = ["past_key_values"]

    def __init__(self, config: CompressConfig):
        super().__init__(config)
        fam = family_classes(config.base_model_type)
        base = config.build_base_config()
        n_layers = len(config.layers)
        base.num_hidden_layers = 0  # build the backbone without dense layers, then add ours
        self.model = fam["model"](base)
        base.num_hidden_layers = n_layers
        self.model.layers = nn.ModuleList(
            [build_layer(config, base, i, fam["layer"], fam["norm"]) for i in range(n_layers)]
        )
        last = config.layers[-1] if config.layers else {}
        h_final = int(last.get("hidden_out", last.get("hidden_mid", last.get("hidden_in", config.hidden_size))))
        if h_final != config.hidden_size:
            self.model.norm = fam["norm"](h_final, eps=getattr(base, "rms_norm_eps", 1e-6))
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(h_final, config.vocab_size, bias=False)
        self._no_split_modules = [fam["layer"].__name__, shortcut_layer_class(fam["layer"]).__name__]
        self.post_init()

    def _init_weights(self, module):  # weights always come from a checkpoint or a pruned model
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, std)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
