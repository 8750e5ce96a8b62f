"""Write a stock-format result as one GGUF file (llama.cpp, ollama, LM Studio), with its tokenizer.

``compress export FOLDER --gguf TYPE --out FILE.gguf`` reads a folder that ``compress run`` saved in
the stock format and writes it with the ``gguf`` package's own writer (the library llama.cpp's
converter is built on, already a dependency for reading GGUF sources), so no llama.cpp checkout is
needed. What is written, and why:

* metadata: the llama.cpp architecture of the family (``llama`` for Llama and Mistral, ``qwen2``,
  ``qwen3``), widths, head counts, ``head_dim`` as key/value length and rotary dimension, RMSNorm
  epsilon, rotary base; only unscaled rotary embeddings (``rope_type: default``) — a scaled one
  (llama3, yarn, ...) is refused, not approximated;
* tensors under llama.cpp's names (``gguf.get_tensor_name_map``); for the ``llama`` architecture the
  query and key rows are permuted from the Hugging Face rotate-half layout to GGML's interleaved one
  (the inverse of what transformers' GGUF loader undoes); 1-D tensors (norms, biases) stay float32,
  as llama.cpp expects; an untied ``lm_head`` is written as ``output``;
* types: ``F32``, ``F16``, ``BF16`` and ``Q8_0`` (blocks of 32; a matrix whose rows are not a multiple
  of 32 wide falls back to F16 and the file says so in ``compress.fallback_tensors``);
* the tokenizer from the folder's ``tokenizer.json`` (byte-level BPE through ``gguf.vocab.BpeVocab``,
  SentencePiece-style through ``LlamaHfVocab``), its merges, special token ids and chat template
  (``gguf.SpecialVocab``).

The file is written to a temporary sibling and renamed into place: complete or absent.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from compress.errors import UsageError
from compress.io.safe_io import respect_umask

#: GGUF output types: name -> (gguf.GGMLQuantizationType name, gguf.LlamaFileType name)
GGUF_TYPES: dict[str, tuple[str, str]] = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
}

#: transformers model_type -> llama.cpp architecture (gguf.MODEL_ARCH member name), and whether the
#: q/k rows are permuted to GGML's interleaved rotary layout (llama.cpp's NORM rope) or not (NEOX).
_ARCHS: dict[str, tuple[str, bool]] = {"llama": ("LLAMA", True), "mistral": ("LLAMA", True),
                                       "qwen2": ("QWEN2", False), "qwen3": ("QWEN3", False)}


def parse_gguf_type(name: str) -> str:
    key = str(name).lower()
    if key not in GGUF_TYPES:
        raise UsageError(f"unknown GGUF type {name!r}; use one of {', '.join(GGUF_TYPES)}")
    return key


def check_gguf_source(folder: Path) -> dict[str, Any]:
    """The stock config of a saved folder that can become a GGUF file, or a one-line refusal."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise UsageError(f"{folder} is not a saved model folder (no config.json); give the --out of compress run")
    from compress.io.loading import compress_format

    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if compress_format(folder):
        raise UsageError(f"{folder} is in the compress format (per-layer shapes), which GGUF cannot express; "
                         "only stock-format results export to GGUF")
    mt = cfg.get("model_type")
    if mt not in _ARCHS:
        raise UsageError(f"GGUF export supports the families {', '.join(sorted(_ARCHS))}, not {mt!r}")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if (rope.get("rope_type") or rope.get("type") or "default") != "default":
        raise UsageError(f"{folder} uses a scaled rotary embedding ({rope.get('rope_type') or rope.get('type')}), "
                         "which this GGUF writer does not express; use llama.cpp's convert_hf_to_gguf.py")
    if not (folder / "tokenizer.json").is_file():
        raise UsageError(f"{folder} has no tokenizer.json; GGUF files carry their tokenizer: save it with the model")
    return cfg


def _permute_rotary(w: Any, n_head: int) -> Any:
    """Rows of a q/k projection from rotate-half pairs ``(i, i + d/2)`` to interleaved ``(2i, 2i+1)``."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_tokenizer(writer: Any, folder: Path, vocab_size: int) -> str:
    import gguf
    from gguf.vocab import BpeVocab, LlamaHfVocab

    tok = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = tok.get("model", {})
    byte_level = any(p.get("type") == "ByteLevel" for p in _pre_tokenizers(tok.get("pre_tokenizer")))
    if model.get("type") == "BPE" and byte_level:
        vocab, kind = BpeVocab(folder), "gpt2"
    elif model.get("type") == "BPE" and model.get("byte_fallback"):
        vocab, kind = LlamaHfVocab(folder), "llama"
    else:
        raise UsageError(f"{folder / 'tokenizer.json'} is a {model.get('type')} tokenizer this GGUF writer does not "
                         "express (byte-level BPE and byte-fallback BPE are supported)")
    tokens, scores, types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text.encode("utf-8") if isinstance(text, str) else text)
        scores.append(float(score))
        types.append(int(ttype))
    if len(tokens) > vocab_size:
        raise UsageError(f"the tokenizer has {len(tokens)} tokens but the embedding {vocab_size} rows")
    while len(tokens) < vocab_size:  # embedding rows without a token (padding to a round size)
        tokens.append(f"[PAD{len(tokens)}]".encode())
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    writer.add_tokenizer_model(kind)
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=kind == "gpt2", n_vocab=len(tokens)).add_to_gguf(writer)
    return kind


def _pre_tokenizers(pre: dict | None) -> list[dict]:
    if not pre:
        return []
    if pre.get("type") == "Sequence":
        return [p for x in pre.get("pretokenizers", []) for p in _pre_tokenizers(x)]
    return [pre]


def write_gguf(folder: str | os.PathLike, out: str | os.PathLike, gguf_type: str = "f16",
               *, overwrite: bool = False) -> dict[str, Any]:
    """Write the stock-format model in ``folder`` as the GGUF file ``out``; returns what was written."""
    import gguf
    import numpy as np
    import torch
    from safetensors import safe_open

    kind = parse_gguf_type(gguf_type)
    folder = Path(folder).expanduser()
    out = Path(out).expanduser()
    if out.suffix != ".gguf":
        raise UsageError(f"--out {out} must be a .gguf file name")
    from compress.io.outpath import check_output_file

    # never the model folder's own files, nor a file that is not a GGUF one (--overwrite included)
    out = check_output_file(out, overwrite, inputs=[("the model folder", folder)])
    cfg = check_gguf_source(folder)
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise UsageError(f"{folder} has no safetensors weights")
    arch_name, permute = _ARCHS[cfg["model_type"]]
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    n_layers = int(cfg["num_hidden_layers"])
    n_head, n_kv = int(cfg["num_attention_heads"]), int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // n_head)
    names = gguf.get_tensor_name_map(arch, n_layers)
    qtype = getattr(gguf.GGMLQuantizationType, GGUF_TYPES[kind][0])
    rope = cfg.get("rope_parameters") or {}

    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)  # the writer opens the file itself
    tmp = Path(tmp_name)
    fallback: list[str] = []
    try:
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
        writer.add_name(folder.name)
        writer.add_context_length(int(cfg.get("max_position_embeddings") or 2048))
        writer.add_embedding_length(hidden)
        writer.add_block_count(n_layers)
        writer.add_feed_forward_length(int(cfg["intermediate_size"]))
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(rope.get("rope_theta") or cfg.get("rope_theta") or 10000.0))
        writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps") or 1e-6))
        writer.add_file_type(getattr(gguf.LlamaFileType, GGUF_TYPES[kind][1]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        # the tokenizer first: an unsupported one is refused before any tensor is converted
        vocab_size = int(cfg["vocab_size"])
        writer.add_vocab_size(vocab_size)
        tokenizer_kind = _add_tokenizer(writer, folder, vocab_size)
        tied = bool(cfg.get("tie_word_embeddings"))
        seen_embedding = False
        for shard in shards:
            with safe_open(str(shard), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open has no iteration protocol
                    if tied and key == "lm_head.weight":
                        continue
                    name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                    if name is None:
                        raise UsageError(f"tensor {key} of {shard.name} has no GGUF name for {cfg['model_type']}")
                    data = f.get_tensor(key).to(torch.float32).numpy()
                    if key == "model.embed_tokens.weight":
                        if data.shape[0] != vocab_size:
                            raise UsageError(f"{folder}: the embedding has {data.shape[0]} rows but config.json "
                                             f"says vocab_size {vocab_size}; re-save the model")
                        seen_embedding = True
                    if permute and key.endswith("self_attn.q_proj.weight"):
                        data = _permute_rotary(data, n_head)
                    elif permute and key.endswith("self_attn.k_proj.weight"):
                        data = _permute_rotary(data, n_kv)
                    if data.ndim < 2 or kind == "f32":
                        writer.add_tensor(name, data.astype(np.float32))
                    elif kind == "f16" or (kind == "q8_0" and data.shape[-1] % 32):
                        if kind == "q8_0":
                            fallback.append(name)
                        writer.add_tensor(name, data.astype(np.float16))
                    else:
                        q = gguf.quantize(data, qtype)
                        writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
        if not seen_embedding:
            raise UsageError(f"{folder} has no model.embed_tokens.weight")
        if fallback:
            writer.add_array("compress.fallback_tensors", fallback)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        respect_umask(tmp)  # mkstemp made it 0600
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"path": str(out), "type": kind, "bytes": out.stat().st_size, "architecture": gguf.MODEL_ARCH_NAMES[arch],
            "tokenizer": tokenizer_kind, "f16_fallback_tensors": fallback}
