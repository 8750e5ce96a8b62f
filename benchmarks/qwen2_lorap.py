"""Why LoRAP collapses on Qwen2.5-Coder-0.5B (issue #23): which sub-layer, which projection, which layer.

Usage: ``python benchmarks/qwen2_lorap.py [--only LABEL ...]``. Rows already in
``results/qwen2_lorap.jsonl`` are kept and not re-run (delete the file to start over), so an
interrupted run resumes. The model is fetched once into ``$COMPRESS_CACHE`` (``common.qwen2_path``).

Protocol (the issue's): WikiText-2 test, the first 8 windows of 512 tokens (4,088 predicted tokens),
fp32, 1 thread; calibration WikiText-2 validation, LoRAP's official 128 × 128 tokens, seed 0.
``s`` is LoRAP's block sparsity (the fraction of every attention and MLP block removed); the 70 %
whole-model target solves to the s recorded in the first LoRAP row, and the sub-layer ablations
run that same s with ``--target 100%``. SmolLM2-135M rows at the same s compare the two models at
equal *block* sparsity (SmolLM2's tied embeddings are 21 % of it, Qwen's untied pair 43 %, so a
whole-model target means a much higher s on Qwen).

Diagnostics, on the attention-only model at s:

* ``swap``: PPL with only one projection kind low-rank (the others dense), which projection costs what;
* ``proj_err``: per layer, the relative output error ``‖(W − BA)X‖ / ‖WX‖`` of each factorised
  projection on 8 × 128 calibration tokens that reach it through the *dense* model;
* ``drift``: per layer, ``‖h_pruned − h_dense‖ / ‖h_dense‖`` of the decoder layer outputs on the same
  tokens, i.e. where the error enters and how it grows.

Two rows isolate LoRAP's MLP channel score: TransAct's score (the L2 norm of each ``down_proj`` input
channel) at exactly LoRAP's MLP widths with the attention dense, and LoRAP's own score with only its
``down_proj`` term (a diagnostic patch of ``compress_baselines.lorap.mlp_channel_scores`` for that row,
not a LoRAP setting).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

NAME = "qwen2_lorap"
WINDOWS = {512: 8}
TARGET = "70%"


def _cells(s: float | None) -> list[tuple[str, str, str, str, dict]]:
    """(label, model, method, target, settings); the ``s`` rows need the 70 % row's s first."""
    cells: list[tuple[str, str, str, str, dict]] = [
        ("dense", "qwen2", "dense", "100%", {}),
        ("lorap", "qwen2", "lorap", TARGET, {}),
    ]
    if s is None:
        return cells
    for model in ("qwen2", "smollm2"):
        if model == "smollm2":
            cells.append(("dense", model, "dense", "100%", {}))
            cells.append((f"lorap s={s}", model, "lorap", "100%", {"sparsity": s}))
        cells += [
            (f"lorap attn-only s={s}", model, "lorap", "100%", {"sparsity": s, "sublayers": ["self_attn"]}),
            (f"lorap mlp-only s={s}", model, "lorap", "100%", {"sparsity": s, "sublayers": ["mlp"]}),
        ]
        if model == "qwen2":
            # the same MLP widths (attention dense), TransAct's channel score instead of LoRAP's
            mlp = MLP_DENSE[model] - (int((s + 0.01) * MLP_DENSE[model]) - int(0.01 * MLP_DENSE[model]))
            cells.append((f"transact mlp {mlp} (lorap's widths)", model, "transact", "100%",
                          {"attn_heads": 14, "mlp_dim": mlp, "mlp_round_to": 1, "calib_samples": 32,
                           "calib_seq_len": 512}))
            # diagnostic, not a LoRAP setting: the official score without its gate/up terms
            cells.append((f"lorap mlp-only s={s}, down term only", model, "lorap", "100%",
                          {"sparsity": s, "sublayers": ["mlp"], DOWN_ONLY: True}))
    for model in ("qwen2", "smollm2"):
        cells.append((f"lorap attn-only svd s={s}", model, "lorap", "100%",
                      {"sparsity": s, "sublayers": ["self_attn"], "decomposition": "svd"}))
    return cells


DOWN_ONLY = "_score_down_term_only"


def _down_term_only(gate, up, down, x_sq, h_sq):
    """LoRAP's MLP channel score with only its down_proj term ‖|W_down[:, c]|·sqrt(E h_c²)‖₂."""
    sh = h_sq.detach().float().clamp_min(0).sqrt().to(down.device)
    return (down.detach().float().abs() * sh[None, :]).norm(p=2, dim=0)


MLP_DENSE = {"qwen2": 4864, "smollm2": 1536}


def _path(model: str) -> str:
    return common.qwen2_path() if model == "qwen2" else common.smollm2_path()


def _calib_tokens(tokenizer: Any) -> torch.Tensor:
    from compress.calib.sources import CalibrationSource

    return CalibrationSource.from_spec("wikitext2", tokenizer, seed=0).batches(8, 128)


@torch.no_grad()
def _projection_errors(dense: torch.nn.Module, pruned: torch.nn.Module, tokens: torch.Tensor) -> list[dict]:
    """Relative output error of every low-rank projection of ``pruned`` on inputs from ``dense``."""
    from compress import LowRankLinear, adapter_for

    da, pa = adapter_for(dense), adapter_for(pruned)
    inputs: dict[tuple[int, str], list[torch.Tensor]] = {}
    hooks = []
    for i in range(da.num_layers):
        for name, lin in da.attn_linears(i).items():
            def grab(_m, args, _out, key=(i, name)):
                inputs.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]).float())
            hooks.append(lin.register_forward_hook(grab))
    try:
        dense(tokens)
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for i in range(pa.num_layers):
        row: dict[str, Any] = {"layer": i}
        for name, low in pa.attn_linears(i).items():
            if not isinstance(low, LowRankLinear):
                continue
            w = da.attn_linears(i)[name].weight.float()
            x = torch.cat(inputs[(i, name)])
            approx = low.B.weight.float() @ low.A.weight.float()
            ref = x @ w.T
            row[name] = round(float((x @ (w - approx).T).norm() / ref.norm()), 4)
            b = getattr(da.attn_linears(i)[name], "bias", None)
            if b is not None:  # the same error against the biased output the layer actually produces
                row[f"{name}+bias"] = round(float((x @ (w - approx).T).norm() / (ref + b.float()).norm()), 4)
                assert torch.equal(low.B.bias, b), "the bias must stay exact on the B factor"
        rows.append(row)
    return rows


@torch.no_grad()
def _drift(dense: torch.nn.Module, pruned: torch.nn.Module, tokens: torch.Tensor) -> list[float]:
    hd = dense(tokens, output_hidden_states=True).hidden_states[1:]
    hp = pruned(tokens, output_hidden_states=True).hidden_states[1:]
    return [round(float((p - d).norm() / d.norm()), 4) for d, p in zip(hd, hp, strict=True)]


@torch.no_grad()
def _swap_ppl(dense: torch.nn.Module, pruned: torch.nn.Module, tokenizer: Any) -> dict[str, float]:
    """PPL of ``dense`` with one projection kind replaced by ``pruned``'s (all layers), one kind at a time."""
    from compress import LowRankLinear, adapter_for

    da, pa = adapter_for(dense), adapter_for(pruned)
    out: dict[str, float] = {}
    for name in da.attn_names:
        if not any(isinstance(pa.attn_linears(i)[name], LowRankLinear) for i in range(pa.num_layers)):
            continue
        saved = [da.attn_linears(i)[name] for i in range(da.num_layers)]
        try:
            for i in range(da.num_layers):
                setattr(da.attention(i), name, pa.attn_linears(i)[name])
            out[name] = common.wikitext_ppl(dense, tokenizer, windows=WINDOWS)["ppl512"]
        finally:
            for i, m in enumerate(saved):
                setattr(da.attention(i), name, m)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", nargs="*", help="labels to run (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = common.read_rows(NAME)

    def save() -> None:
        for r in rows:  # the layer-output error after the first, middle and last layer (full list in the jsonl)
            d = r.get("drift")
            r["drift_first_mid_last"] = f"{d[0]} / {d[len(d) // 2]} / {d[-1]}" if d else None
        common.write_results(NAME, rows, columns=["model", "method", "target", "sparsity", "ranks", "mlp_channels",
                                                  "ratios.params", "ppl512", "swap", "drift_first_mid_last",
                                                  "prune_s"],
                             preamble=common.doc_without_usage(__doc__))

    def s_of_target() -> float | None:
        for r in rows:
            if r["model"] == "qwen2" and r["method"] == "lorap" and r["target"] == TARGET:
                return r["sparsity"]
        return None

    while True:
        done = {(r["model"], r["method"], r["target"]) for r in rows}
        todo = [c for c in _cells(s_of_target()) if (c[1], c[0], c[3]) not in done
                and (not args.only or c[0] in args.only)]
        if not todo:
            break
        label, model, method, target, settings = todo[0]
        path = _path(model)
        if method == "dense":
            row = common.dense_row(model=path, windows=WINDOWS)
        else:
            kept: list = []
            settings = dict(settings)
            import compress_baselines.lorap as lorap_mod

            official = lorap_mod.mlp_channel_scores
            if settings.pop(DOWN_ONLY, False):
                lorap_mod.mlp_channel_scores = _down_term_only
            try:
                row = common.prune_row(method, target, settings=settings, label=label, model=path, windows=WINDOWS,
                                       keep=kept)
            finally:
                lorap_mod.mlp_channel_scores = official
            common.lorap_sizing(row)
            if method == "lorap":  # against the dense model: drift always, the attention diagnostics too
                from compress.io.loading import load_model

                lm = load_model(path, dtype="float32")
                tokens = _calib_tokens(lm.tokenizer)
                row["drift"] = _drift(lm.model, kept[0], tokens)
                if settings.get("sublayers") == ["self_attn"]:
                    row["proj_err"] = _projection_errors(lm.model, kept[0], tokens)
                    row["swap"] = _swap_ppl(lm.model, kept[0], lm.tokenizer)
                del lm
            del kept
        row["model"] = model
        row["method"] = label
        row["target"] = target
        rows.append(row)
        save()
        print(json.dumps({k: row.get(k) for k in ("model", "method", "target", "sparsity", "ppl512", "swap")}),
              flush=True)
    save()


if __name__ == "__main__":
    main()
