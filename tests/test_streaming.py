"""Weight streaming (--stream-weights): decoder layers read from the safetensors files only when visited.

The streamed run must give the same plan and bit-identical weights as the in-memory layer-wise run,
must never hold the dense decoder layers all at once, and must refuse a checkpoint that lacks a tensor
(naming it and its shard) before any layer's work.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
from compress_baselines.depth import DepthPruner
from compress_baselines.lorap import LorapPruner
from compress_baselines.slicegpt import SliceGPTPruner
from compress_transact.transact import TransActPruner
from safetensors.torch import load_file, save_file

import compress.io.streaming as streaming
from compress import ArchAdapter, Target
from compress.cli import main
from compress.errors import UsageError
from compress.io.loading import load_model
from compress.io.streaming import WeightStream, open_streamed
from compress.pipeline.run import RunSpec, dry_run, run
from compress.pruner import PruneContext
from compress.testing import tiny_model, tiny_tokenizer
from conftest import needs_assets

pytestmark = [pytest.mark.usefixtures("one_thread"), needs_assets]

METHODS = {"transact": TransActPruner, "slicegpt": SliceGPTPruner, "lorap": LorapPruner, "depth": DepthPruner}
SETTINGS = {"calib_samples": 6, "calib_seq_len": 48, "calib_batch_size": 4}
TARGETS = {"transact": "60%", "slicegpt": "90%", "lorap": "70%", "depth": "70%"}


def _save(folder: Path, kind: str, sharded: bool) -> Path:
    model = tiny_model(kind)
    if sharded:  # several shards and model.safetensors.index.json
        model.save_pretrained(folder, max_shard_size="100KB")
        assert (folder / streaming.INDEX_FILE).is_file()
    else:
        model.save_pretrained(folder)
        assert (folder / streaming.SINGLE_FILE).is_file()
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _ctx(model, calib, stream=None) -> PruneContext:
    return PruneContext(arch=ArchAdapter(model), tokenizer=calib.tokenizer, calibration=calib, progress=False,
                        log=lambda m: None, layerwise=True, stream=stream)


def _layer_bytes(model, dense: bool = False) -> list[int]:
    """Bytes of each decoder layer's tensors in memory (meta tensors do not count unless ``dense``)."""
    return [sum(p.numel() * p.element_size() for p in layer.parameters() if dense or not p.is_meta)
            for layer in ArchAdapter(model).layers]


def _remember(storages: set[int], t: torch.Tensor) -> torch.Tensor:
    storages.add(t.untyped_storage().data_ptr())
    return t


def _prune(method: str, model, calib, stream=None, **extra):
    res = METHODS[method]({**SETTINGS, **extra}).prune(model, Target.parse(TARGETS[method]), _ctx(model, calib, stream))
    if stream is not None:
        stream.finish(res.model)
    return res


# ============================================================================ same plan, same weights
# (TransAct's default gqa=auto cannot score its candidates on streamed weights and keeps whole groups:
# tested below; here both paths cut whole groups)
@pytest.mark.parametrize(("method", "kind", "sharded", "extra"), [
    ("transact", "llama-mha", False, {"gqa": "groups"}),
    ("transact", "llama-gqa", True, {"shots": 2, "gqa": "groups"}),
    ("transact", "qwen2", True, {"gqa": "groups"}),
    ("slicegpt", "llama-gqa", True, {}),
    ("slicegpt", "qwen2", False, {}),
    ("lorap", "llama-gqa", True, {}),
    ("lorap", "qwen2", False, {}),
    ("depth", "llama-gqa", True, {}),
])
def test_streaming_gives_the_same_plan_and_weights(method, kind, sharded, extra, calib, tmp_path, monkeypatch):
    folder = _save(tmp_path / "m", kind, sharded)
    ref = _prune(method, load_model(str(folder), dtype=torch.float32).model, calib, **extra)
    read: set[int] = set()  # the storage of every tensor the stream read
    real = WeightStream._cast
    monkeypatch.setattr(WeightStream, "_cast", lambda self, k, t: _remember(read, real(self, k, t)))
    loaded, stream = open_streamed(str(folder), dtype=torch.float32)
    dense_layers = sum(_layer_bytes(loaded.model, dense=True))
    assert sum(_layer_bytes(loaded.model)) == 0  # nothing of the decoder layers is read up front
    got = _prune(method, loaded.model, calib, stream, **extra)
    assert json.dumps(got.plan, sort_keys=True) == json.dumps(ref.plan, sort_keys=True)
    a, b = ref.model.state_dict(), got.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert ref.model.config.to_dict() == got.model.config.to_dict()
    ids = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ref.model(ids).logits, got.model(ids).logits)
    # nothing keeps the dense tensors the method cut off alive (the stream must not hold them)
    gc.collect()
    models = {id(p) for m in (ref.model, got.model) for p in m.parameters()}
    stray = [o for o in gc.get_objects() if type(o) is torch.nn.Parameter and not o.is_meta
             and id(o) not in models and o.untyped_storage().data_ptr() in read]
    assert not stray, [tuple(p.shape) for p in stray]
    # each dense tensor was read once (depth reads its kept layers a second time, after scoring)
    assert len(stream.reads) == len(set(stream.reads)) or method == "depth"
    assert stream.bytes_read >= dense_layers


def test_streaming_gqa_auto_keeps_whole_groups_and_says_why(calib, tmp_path):
    """gqa=auto scores its candidates on the whole model, which streamed weights never hold: the run
    keeps whole KV groups, the in-memory plan of gqa=groups, and the plan says why."""
    folder = _save(tmp_path / "m", "llama-gqa", False)
    ref = _prune("transact", load_model(str(folder), dtype=torch.float32).model, calib, gqa="groups")
    loaded, stream = open_streamed(str(folder), dtype=torch.float32)
    got = _prune("transact", loaded.model, calib, stream, gqa="auto")
    assert got.plan["gqa"]["chosen"] == "groups/down" and "streamed weights" in got.plan["gqa"]["why"]
    assert {k: v for k, v in got.plan.items() if k != "gqa"} == ref.plan


# ============================================================================ never all resident
@pytest.mark.parametrize("method", ["transact", "lorap", "slicegpt"])
def test_a_layer_is_read_only_when_it_is_visited(method, calib, tmp_path, monkeypatch):
    folder = _save(tmp_path / "m", "llama-gqa", sharded=True)
    loaded, stream = open_streamed(str(folder), dtype=torch.float32)
    model = loaded.model
    arch = ArchAdapter(model)
    dense = _layer_bytes(model, dense=True)
    events: list[tuple[str, int, int]] = []  # (what, layer, decoder-layer bytes in memory then)

    real = streaming.safe_open

    class Recording:
        def __init__(self, *a, **kw):
            self._f = real(*a, **kw)

        def __enter__(self):
            self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def get_tensor(self, key):
            if key.startswith("model.layers."):
                events.append(("read", int(key.split(".")[2]), sum(_layer_bytes(model))))
            return self._f.get_tensor(key)

        def __getattr__(self, name):
            return getattr(self._f, name)

    monkeypatch.setattr(streaming, "safe_open", Recording)
    for i, layer in enumerate(arch.layers):
        layer.register_forward_pre_hook(lambda *_, i=i: events.append(("forward", i, sum(_layer_bytes(model)))))
    _prune(method, model, calib, stream)
    reads = [(i, b) for what, i, b in events if what == "read"]
    assert sorted({i for i, _ in reads}) == list(range(arch.num_layers))
    for i in range(arch.num_layers):
        first_read = next(k for k, e in enumerate(events) if e[:2] == ("read", i))
        last_read = max(k for k, e in enumerate(events) if e[:2] == ("read", i))
        first_forward = next(k for k, e in enumerate(events) if e[:2] == ("forward", i))
        assert last_read < first_forward  # read just before its step ...
        if i > 0:  # ... and only once the layer before it has computed (and been cut)
            assert first_read > max(k for k, e in enumerate(events) if e[:2] == ("forward", i - 1))
            assert all(e[0] == "forward" or e[1] == i for e in events[first_read:last_read + 1])
    # the decoder layers in memory: never more than the cut layers so far plus one dense layer
    pruned = _layer_bytes(model)
    for i, b in reads:
        assert b <= sum(pruned[:i]) + dense[i]
    assert max(b for _, b in reads) < sum(dense)


# ============================================================================ the pipeline
def test_run_with_stream_weights_matches_the_layerwise_run(tmp_path):
    folder = _save(tmp_path / "m", "llama-gqa", sharded=True)
    common = {"method": "transact", "target": "60%", "model": str(folder), "calib": "tinystories",
              "settings": {"calib_samples": 4, "calib_seq_len": 64, "gqa": "groups"}, "progress": False}
    ref = run(RunSpec(**common, layerwise=True, out=str(tmp_path / "ref")), log=lambda m: None)
    logs: list[str] = []
    got = run(RunSpec(**common, stream_weights=True, out=str(tmp_path / "got")), log=logs.append)
    assert any("streamed from the files" in line for line in logs)
    assert got.record["layerwise"] is True
    assert got.record["plan_hash"] == ref.record["plan_hash"]
    assert got.record["weights_sha256"] == ref.record["weights_sha256"]
    assert got.record["quality"]["dense"] == ref.record["quality"]["dense"]  # dense layers read one by one
    assert got.record["quality"]["pruned"] == ref.record["quality"]["pruned"]
    assert (tmp_path / "got" / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()


def test_dry_run_estimates_the_streamed_peak():
    cfg = str(Path(__file__).resolve().parents[1] / "benchmarks" / "configs" / "llama-2-70b.json")
    common = {"method": "transact", "target": "50%", "model": cfg, "dry_run": True, "dtype": "bfloat16",
              "settings": {"calib_samples": 8, "calib_seq_len": 128}}
    plain = dry_run(RunSpec(**common, layerwise=True), log=lambda m: None)["memory"]
    streamed = dry_run(RunSpec(**common, stream_weights=True), log=lambda m: None)["memory"]
    assert streamed["mode"] == "layer-wise, streamed weights"
    assert streamed["dense_weights_bytes"] == plain["weights_bytes"] > 128e9  # 70B in bf16
    assert streamed["working_bytes"] == plain["working_bytes"]
    # the pruned model (about half) plus one dense layer of ~1.7 GB
    assert 0.45 * plain["weights_bytes"] < streamed["weights_bytes"] < 0.6 * plain["weights_bytes"]


def test_stream_weights_refusals(tmp_path, capsys):
    folder = _save(tmp_path / "m", "llama-gqa", sharded=False)

    def refused(*extra: str) -> str:
        rc = main(["run", "--method", "transact", "--target", "60%", "--model", str(folder), "--no-save",
                   "--calib", "tinystories", "--stream-weights", *extra])
        err = capsys.readouterr().err
        assert rc == 2, err
        return err

    assert "--no-layerwise" in refused("--no-layerwise")
    err = refused("--method", "llm_pruner")
    assert "llm_pruner cannot stream weights" in err and "drop --stream-weights" in err
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    assert "GGUF" in refused("--model", str(gguf))
    assert "kd" in refused("--recover-mode", "kd", "--recover-tokens", "64")


# ============================================================================ bad input
def _drop_from_shard(folder: Path, tensor: str) -> str:
    """Rewrite the shard that holds ``tensor`` without it (the index still places it there)."""
    index = json.loads((folder / streaming.INDEX_FILE).read_text())
    shard = index["weight_map"][tensor]
    tensors = load_file(folder / shard)
    del tensors[tensor]
    save_file(tensors, folder / shard, metadata={"format": "pt"})
    return shard


def test_a_shard_missing_a_tensor_is_refused_before_any_read(tmp_path, monkeypatch):
    folder = _save(tmp_path / "m", "llama-gqa", sharded=True)
    tensor = "model.layers.1.mlp.up_proj.weight"
    shard = _drop_from_shard(folder, tensor)
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        skeleton = AutoModelForCausalLM.from_config(tiny_model("llama-gqa").config)
    skeleton.tie_weights()
    read: list[str] = []
    real = WeightStream._cast
    monkeypatch.setattr(WeightStream, "_cast", lambda self, k, t: read.append(k) or real(self, k, t))
    with pytest.raises(UsageError) as e:
        WeightStream(folder, skeleton, torch.float32)
    msg = str(e.value)
    assert "\n" not in msg and tensor in msg and shard in msg and streaming.INDEX_FILE in msg
    assert read == []  # validated before anything was read
    # the whole run: one line naming the tensor, nothing written
    out = tmp_path / "out"
    with pytest.raises(UsageError, match=tensor.replace(".", r"\.")):
        run(RunSpec(method="transact", target="60%", model=str(folder), calib="tinystories", stream_weights=True,
                    out=str(out), progress=False), log=lambda m: None)
    assert not out.exists()


def test_a_tensor_no_shard_holds_is_refused(tmp_path):
    folder = _save(tmp_path / "m", "llama-gqa", sharded=True)
    index = json.loads((folder / streaming.INDEX_FILE).read_text())
    tensor = "model.layers.2.self_attn.k_proj.weight"
    del index["weight_map"][tensor]
    (folder / streaming.INDEX_FILE).write_text(json.dumps(index))
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        skeleton = AutoModelForCausalLM.from_config(tiny_model("llama-gqa").config)
    skeleton.tie_weights()
    with pytest.raises(UsageError, match=f"no shard of .* holds {tensor}"):
        WeightStream(folder, skeleton, torch.float32)


def test_an_interrupted_streamed_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    folder = _save(tmp_path / "m", "llama-gqa", sharded=True)
    common = {"method": "transact", "target": "60%", "model": str(folder), "calib": "tinystories",
              "settings": {"calib_samples": 4, "calib_seq_len": 64, "shots": 2}, "progress": False,
              "evaluate": False, "stream_weights": True}
    full = run(RunSpec(**common, out=str(tmp_path / "full")), log=lambda m: None)

    def interrupt(self, *a, **k):  # shot 1 streams (collect_and_cut); shot 2 scores the cut model
        raise KeyboardInterrupt

    monkeypatch.setattr(TransActPruner, "collect", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(RunSpec(**common, out=str(tmp_path / "out")), log=lambda m: None)
    monkeypatch.undo()
    logs: list[str] = []
    got = run(RunSpec(**common, out=str(tmp_path / "out"), resume=True), log=logs.append)
    assert any("resuming" in line for line in logs)
    assert got.record["plan_hash"] == full.record["plan_hash"]
    assert got.record["weights_sha256"] == full.record["weights_sha256"]
