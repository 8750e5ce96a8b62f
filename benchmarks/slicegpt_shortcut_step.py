"""Why full recovery keeps SliceGPT's residual shortcut rotations frozen: one AdamW step, both ways.

SliceGPT (suite recipe, 8 × 2048 calibration tokens) prunes SmolLM2-135M to 80 %; one batch of 4 × 512
WikiText-2 tokens gives the gradients; then one AdamW step at the recovery default (lr 5e-5, gradient
norm clipped to 1.0) is taken from the same weights three times — every parameter trained; the shortcut
rotations frozen (``compress.train.recovery.shortcut_parameters``); shortcuts and embedding frozen — and the loss
of that same batch is measured after each. Writes ``results/slicegpt_shortcut_step.md``.

Usage: ``python benchmarks/slicegpt_shortcut_step.py``
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, smollm2_path  # noqa: E402


def main() -> None:
    import torch

    from compress.calib.sources import CalibrationSource
    from compress.pipeline.run import RunSpec, run
    from compress.train.recovery import shortcut_parameters

    torch.manual_seed(0)
    rec = run(RunSpec(method="slicegpt", target="80%", model=smollm2_path(), calib="wikitext2", progress=False,
                      settings={"calib_samples": 8}), log=lambda m: None)
    model, tok = rec.model, rec.tokenizer
    batch = CalibrationSource.from_spec("wikitext2", tok, seed=0).sequential_blocks(4, 512)
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    before = loss.item()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    state = copy.deepcopy(model.state_dict())
    shortcut_ids = {id(p) for p in shortcut_parameters(model)}
    arms = {
        "every parameter": lambda n, p: True,
        "shortcut rotations frozen": lambda n, p: id(p) not in shortcut_ids,
        "shortcut rotations and embedding frozen": lambda n, p: id(p) not in shortcut_ids and "embed" not in n,
    }
    rows = []
    for label, trained in arms.items():
        model.load_state_dict(state)
        params = []
        for n, p in model.named_parameters():
            p.grad = grads[n].clone() if trained(n, p) else None
            if p.grad is not None:
                params.append(p)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        torch.optim.AdamW(params, lr=5e-5, weight_decay=0.0).step()
        with torch.no_grad():
            after = float(model(input_ids=batch, labels=batch).loss)
        rows.append((label, sum(p.numel() for p in params), after))
        print(f"{label}: loss {before:.3f} -> {after:.3f}", flush=True)
    lines = [
        "# One AdamW step on SliceGPT's 80 % SmolLM2-135M: with and without its shortcut rotations",
        "",
        __doc__.split("\n\n")[1].replace("\n", " "),
        "",
        f"Loss of the batch before the step: {before:.3f}.",
        "",
        "| trained | parameters | loss after one step |",
        "|---|---|---|",
        *[f"| {label} | {n:,} | {after:.3f} |" for label, n, after in rows],
        "",
    ]
    (RESULTS / "slicegpt_shortcut_step.md").write_text("\n".join(lines))
    print(f"wrote {RESULTS / 'slicegpt_shortcut_step.md'}")


if __name__ == "__main__":
    main()
