"""Half-precision runs end to end (prune + export + reload) and ``device_map="auto"`` loading, on stories260K."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from compress.pipeline.run import RunSpec, run

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = {"transact": {"calib_samples": 8, "calib_seq_len": 128, "shots": 2}, "magnitude": {}}


@pytest.fixture(scope="module")
def fp32_records(stories_dir, tmp_path_factory):
    return {m: run(RunSpec(method=m, target="60%", model=str(stories_dir), calib="tinystories", settings=s,
                           progress=False), log=lambda _: None)
            for m, s in SETTINGS.items()}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_half_precision_prune_export_reload(tmp_path, stories_dir, fp32_records, method, dtype):
    out = tmp_path / "out"
    rec = run(RunSpec(method=method, target="60%", model=str(stories_dir), calib="tinystories",
                      settings=SETTINGS[method], dtype=dtype, out=str(out), progress=False), log=lambda _: None)
    model, rec = rec.model, rec.record
    dt = getattr(torch, dtype)
    assert {p.dtype for p in model.parameters()} == {dt}
    ref = fp32_records[method].record
    # same structure as the fp32 run; the footprint is measured at the run's dtype
    assert rec["achieved"]["params"] == ref["achieved"]["params"] <= 0.6 * rec["dense"]["params"]
    assert rec["dense"]["dtype"] == rec["achieved"]["dtype"] == dtype
    assert rec["achieved"]["kv_bytes_per_token"] * 2 == ref["achieved"]["kv_bytes_per_token"]

    assert json.loads((out / "config.json").read_text())["dtype"] == dtype
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert {p.dtype for p in reloaded.parameters()} == {dt}
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = reloaded(ids).logits, model(ids).logits
    assert torch.isfinite(a).all() and torch.equal(a, b)
    # and it still models text about as well as the fp32 pruned model
    with torch.no_grad():
        loss = reloaded(ids, labels=ids).loss.float()
        ref_loss = fp32_records[method].model(ids, labels=ids).loss
    assert abs(loss - ref_loss) < 0.1 * ref_loss


def test_device_map_auto_loads_and_prunes(tmp_path, stories_dir):
    """``device_map="auto"`` (accelerate's placement; all on CPU here) gives a model every method can prune."""
    from compress.calib.sources import CalibrationSource
    from compress.io.export import export_model
    from compress.io.loading import load_model
    from compress.plugins import get_registry
    from compress.pruner import PruneContext
    from compress.target import Target

    lm = load_model(str(stories_dir), device_map="auto", dtype="bfloat16")
    model = lm.model
    assert next(model.parameters()).device.type == "cpu" and next(model.parameters()).dtype == torch.bfloat16
    reg = get_registry()
    pruner = reg.get("transact")({"calib_samples": 8, "calib_seq_len": 128})
    arch = reg.adapter_for(model)
    calib = CalibrationSource.from_spec("tinystories", lm.tokenizer, seed=0)
    res = pruner.prune(model, Target.parse("60%"), PruneContext(arch=arch, tokenizer=lm.tokenizer, calibration=calib,
                                                                log=lambda _: None, progress=False))
    n = sum(p.numel() for p in res.model.parameters())
    assert n <= 0.6 * 260_032
    info = export_model(res.model, lm.tokenizer, tmp_path / "out", kind=res.export)
    reloaded = AutoModelForCausalLM.from_pretrained(info["path"]).eval()
    assert sum(p.numel() for p in reloaded.parameters()) == n
