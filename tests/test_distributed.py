"""``compress recover``: recovery of a saved model, alone and under ``accelerate launch`` (2 CPU processes, gloo).

The two-process run trains on the same global batch (per-device batch × processes) in the same data
order as the one-process run, so the logged loss curves must agree to float rounding, and only the
main process may write the output folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from compress.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).with_name("accelerate")
TOKENS, SEQ, BATCH = 6144, 64, 8  # 12 optimiser steps of 8 × 64 tokens


@pytest.fixture(scope="module")
def text(assets: Path, tmp_path_factory) -> Path:
    """200 kB of TinyStories: tokenised by every process in well under a second."""
    src = assets / "data" / "tinystories" / "tinystories_val.txt"
    out = tmp_path_factory.mktemp("data") / "train.txt"
    out.write_text(src.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    return out


def _recover_args(model: Path, out: Path, text: Path, batch: int) -> list[str]:
    return ["recover", str(model), "--tokens", str(TOKENS), "--data", str(text), "--seq-len", str(SEQ),
            "--batch-size", str(batch), "--lr", "1e-3", "--logging-steps", "1", "--seed", "3", "--out", str(out),
            "--no-progress"]


def _launch(launcher: list[str], args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    # a private HF_HOME: no default accelerate config of the user's applies
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp / "hf")}
    cmd = [str(ACCELERATE), "launch", *launcher, "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "compress.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not ACCELERATE.exists(), reason="accelerate launcher not installed")
def test_two_processes_match_one_process(tmp_path, stories_dir, text):
    """1 process × batch 8 and 2 processes × batch 4 (gloo): same loss curve, same weights, one writer."""
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = _launch(["--cpu", "--num_processes", "1"], _recover_args(stories_dir, one, text, BATCH), tmp_path)
    assert r1.returncode == 0, r1.stderr[-3000:]
    # accelerate 1.15 starts several CPU processes through torchrun only with --multi_gpu (its --cpu
    # path needs MPI); with no GPU visible, the Trainer runs them on CPU with the gloo backend.
    r2 = _launch(["--multi_gpu", "--num_processes", "2"], _recover_args(stories_dir, two, text, BATCH // 2), tmp_path)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert r2.stdout.count("recovered ") == 1 and r1.stdout.count("recovered ") == 1  # only rank 0 reports
    # the FSDP config on CPU: accelerate 1.15 drops its FSDP plugin on MULTI_CPU, so this is DDP again
    # (same numbers), and compress says so instead of pretending to shard
    fsdp = tmp_path / "fsdp"
    r3 = _launch(["--config_file", str(ROOT / "benchmarks" / "accelerate" / "fsdp_cpu_test.yaml")],
                 _recover_args(stories_dir, fsdp, text, BATCH // 2), tmp_path)
    assert r3.returncode == 0, r3.stderr[-3000:]
    assert "accelerate does not shard on CPU" in r3.stderr and "does not shard" not in r2.stderr

    rec1 = json.loads((one / "compress_run.json").read_text())["recovery_result"]
    rec2 = json.loads((two / "compress_run.json").read_text())["recovery_result"]
    rec3 = json.loads((fsdp / "compress_run.json").read_text())["recovery_result"]
    assert rec1["world_size"] == 1 and rec2["world_size"] == rec3["world_size"] == 2
    assert (rec1["parallelism"], rec2["parallelism"], rec3["parallelism"]) == ("none", "ddp", "ddp")
    assert rec3["losses"] == rec2["losses"]  # the same DDP run, bit for bit
    assert rec1["steps"] == rec2["steps"] == TOKENS // (SEQ * BATCH)
    assert rec1["tokens_seen"] == rec2["tokens_seen"] == TOKENS
    l1, l2 = rec1["losses"], rec2["losses"]
    assert [s for s, _ in l1] == [s for s, _ in l2] == list(range(1, rec1["steps"] + 1))
    for (s, a), (_, b) in zip(l1, l2, strict=True):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (s, a, b)
    assert l1[-1][1] < l1[0][1]  # it trained

    # both folders are complete, loadable models with (to rounding) the same trained weights
    w0 = load_file(stories_dir / "model.safetensors")
    w1, w2 = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert set(w1) == set(w2)
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4
    w3 = load_file(fsdp / "model.safetensors")
    assert all(torch.equal(w2[k], w3[k]) for k in w2)
    assert max((w1[k] - w0[k]).abs().max().item() for k in w1 if k in w0) > 1e-3
    for out in (one, two):
        m = AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            assert torch.isfinite(m(torch.tensor([[1, 20, 30, 40]])).logits).all()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]  # atomic, no debris


@pytest.mark.skipif(not ACCELERATE.exists(), reason="accelerate launcher not installed")
def test_kd_two_processes_match_one_process(tmp_path, stories_dir, text):
    """Distillation under `accelerate launch`: each process runs its own copy of the teacher on its
    shard of the batch; 1 × 8 and 2 × 4 give the same KD loss curve and the same student."""
    from compress.pipeline.run import RunSpec, run

    student = tmp_path / "student"
    run(RunSpec(method="magnitude", target="70%", model=str(stories_dir), out=str(student), evaluate=False,
                progress=False), log=lambda m: None)
    kd = ["--mode", "kd", "--teacher", str(stories_dir)]
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = _launch(["--cpu", "--num_processes", "1"], [*_recover_args(student, one, text, BATCH), *kd], tmp_path)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = _launch(["--multi_gpu", "--num_processes", "2"], [*_recover_args(student, two, text, BATCH // 2), *kd],
                 tmp_path)
    assert r2.returncode == 0, r2.stderr[-3000:]
    rec1 = json.loads((one / "compress_run.json").read_text())
    rec2 = json.loads((two / "compress_run.json").read_text())
    assert rec1["recovery"]["mode"] == rec2["recovery"]["mode"] == "kd"
    l1, l2 = rec1["recovery_result"]["losses"], rec2["recovery_result"]["losses"]
    assert rec2["recovery_result"]["world_size"] == 2 and len(l1) == len(l2) == TOKENS // (SEQ * BATCH)
    for (st, a), (_, b) in zip(l1, l2, strict=True):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (st, a, b)
    assert l1[-1][1] < l1[0][1]
    w1, w2 = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4


def test_recover_compress_format_in_process(tmp_path, capsys, stories_dir, text):
    """A compress-format folder is recovered and written back in the compress format, its plan kept."""
    from compress.io.export import export_model
    from compress.io.loading import load_model

    lm = load_model(str(stories_dir))
    src = tmp_path / "pruned"
    export_model(lm.model, lm.tokenizer, src, kind="compress", plan={"method": "demo", "plan": {"layers": 5}},
                 record={"method": "demo", "target": "100%", "model": str(stories_dir)})
    out = tmp_path / "recovered"
    rc = main([*_recover_args(src, out, text, 4)[:-1], "--json", "--tokens", "1024", "--mode", "lora",
               "--set", "lora_r=4"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    rec = json.loads(cap.out)
    assert rec["recovery"]["mode"] == "lora" and rec["recovery_result"]["steps"] == 4
    assert rec["recovery_result"]["config"]["lora_r"] == 4 and rec["method"] == "demo"
    assert rec["export"]["kind"] == "compress" and rec["notes"]["pruned_from"]["method"] == "demo"
    plan = json.loads((out / "compress_plan.json").read_text())
    assert plan["plan"] == {"layers": 5} and plan["recovery"]["steps"] == 4
    reloaded = load_model(str(out)).model
    assert type(reloaded).__name__ == "CompressForCausalLM"
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in lm.model.parameters())


@pytest.mark.parametrize(("extra", "message"), [
    (["--set", "learning_rate=1"], "unknown key 'learning_rate'"),
    (["--batch-size", "0"], "batch_size"),
    (["--mode", "lora", "--set", "lora_targets=[\"qkv\"]"], "matches no module"),
])
def test_recover_usage_errors_write_nothing(tmp_path, capsys, stories_dir, text, extra, message):
    out = tmp_path / "out"
    rc = main([*_recover_args(stories_dir, out, text, 4), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_recover_refuses_existing_output_and_missing_model(tmp_path, capsys, stories_dir, text):
    out = tmp_path / "out"
    out.mkdir()
    assert main(_recover_args(stories_dir, out, text, 4)) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(_recover_args(tmp_path / "nope", tmp_path / "o2", text, 4)) == 2
    assert "does not exist" in capsys.readouterr().err


def test_accelerate_configs_are_valid():
    """The documented multi-GPU configs load with accelerate's own parser."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    ddp = load_config_from_file(str(ROOT / "benchmarks" / "accelerate" / "ddp.yaml"))
    fsdp = load_config_from_file(str(ROOT / "benchmarks" / "accelerate" / "fsdp.yaml"))
    cpu = load_config_from_file(str(ROOT / "benchmarks" / "accelerate" / "fsdp_cpu_test.yaml"))
    assert ddp.distributed_type == DistributedType.MULTI_GPU and ddp.num_processes >= 2
    assert fsdp.distributed_type == cpu.distributed_type == DistributedType.FSDP
    assert fsdp.fsdp_config["fsdp_state_dict_type"] == cpu.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    # GPUs: bf16 compute, weights loaded once (rank 0); the CPU test: fp32, 2 processes
    assert fsdp.mixed_precision == "bf16" and fsdp.fsdp_config["fsdp_cpu_ram_efficient_loading"] is True
    assert cpu.mixed_precision == "no" and cpu.num_processes == 2
    assert {k: v for k, v in cpu.fsdp_config.items() if k != "fsdp_cpu_ram_efficient_loading"} == {
        k: v for k, v in fsdp.fsdp_config.items() if k != "fsdp_cpu_ram_efficient_loading"}


_FSDP2_GATHER = """
import sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from compress.testing import tiny_model
from compress.train.distributed import load_full_state, meta_skeleton

dist.init_process_group("gloo")
torch.manual_seed(0)
model = tiny_model("llama-gqa")
ref = tiny_model("llama-gqa")
ref.load_state_dict(model.state_dict())
skeleton = meta_skeleton(model)
for layer in model.model.layers:  # the wrap unit of fsdp.yaml: one decoder layer
    fully_shard(layer)
fully_shard(model)
assert type(model.model.layers[0].mlp.up_proj.weight).__name__ == "DTensor"
ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
for m in (model, ref):  # 3 SGD steps on the same batch in every process: the sharded and plain must agree
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        m(ids, labels=ids).loss.backward()
        opt.step()
full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
rebuilt = load_full_state(skeleton, full).eval()
assert rebuilt.lm_head.weight is rebuilt.model.embed_tokens.weight
expect = ref.state_dict()
dw = max((rebuilt.state_dict()[k] - expect[k]).abs().max().item() for k in expect)
with torch.no_grad():
    dl = (rebuilt(ids).logits - ref.eval()(ids).logits).abs().max().item()
moved = max((expect[k] - v).abs().max().item() for k, v in tiny_model("llama-gqa").state_dict().items())
# one file per rank: the two processes share one stdout, where a line can be interleaved or lost
with open(f"{sys.argv[1]}/rank{dist.get_rank()}.txt", "w") as f:
    print(f"rank {dist.get_rank()} weights {dw:.3e} logits {dl:.3e} moved {moved:.3e}", file=f)
dist.destroy_process_group()
"""


def test_fsdp2_gather_on_two_cpu_processes(tmp_path):
    """The FSDP export path for real, on 2 CPU processes (gloo): torch's FSDP2 shards per decoder layer
    on CPU (accelerate will not, see fsdp_cpu_test.yaml), trains, gathers the full state dict, and
    recover()'s rebuild of it equals the same training without sharding."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed")
    script = tmp_path / "gather.py"
    script.write_text(_FSDP2_GATHER)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    results = tmp_path / "results"
    results.mkdir()
    r = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(script), str(results)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [f.read_text().split() for f in sorted(results.glob("rank*.txt"))]
    assert sorted(int(ln[1]) for ln in lines) == [0, 1]
    for ln in lines:
        weights, logits, moved = float(ln[3]), float(ln[5]), float(ln[7])
        assert weights < 1e-5 and logits < 1e-4, ln
        assert moved > 1e-3  # it trained


def test_rebuild_from_gathered_weights_keeps_ties():
    """After FSDP, recover() rebuilds a plain model from the gathered full weights: same function, ties kept."""
    from compress.testing import tiny_model
    from compress.train.distributed import load_full_state, meta_skeleton

    model = tiny_model("llama-gqa")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    skeleton = meta_skeleton(model)
    assert all(p.is_meta for p in skeleton.parameters()) and not any(p.is_meta for p in model.parameters())
    gathered = {k: v.detach().clone() + 0.5 for k, v in model.state_dict().items()}  # "trained" full weights
    rebuilt = load_full_state(skeleton, gathered)
    assert rebuilt.lm_head.weight is rebuilt.model.embed_tokens.weight
    assert not rebuilt.model.layers[0].mlp.up_proj.weight.requires_grad
    with torch.no_grad():
        for p in model.parameters():  # unique tensors: the tied one once
            p.add_(0.5)
        ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
        assert torch.equal(rebuilt(ids).logits, model(ids).logits)


@pytest.mark.parametrize("main_rank", [True, False])
def test_export_on_main_process_releases_the_barrier_when_it_fails(monkeypatch, main_rank):
    """Rank 0's export raising must still reach the barrier (the other ranks would hang forever)."""
    import compress.train.distributed as recover

    calls: list[str] = []
    monkeypatch.setattr(recover, "is_main_process", lambda: main_rank)
    monkeypatch.setattr(recover, "wait_for_everyone", lambda: calls.append("barrier"))

    def export() -> None:
        calls.append("export")
        raise OSError("disk full")

    if main_rank:
        with pytest.raises(OSError, match="disk full"):
            recover.on_main_process(export)
        assert calls == ["export", "barrier"]
    else:  # the other ranks never export, and wait for rank 0
        assert recover.on_main_process(export) is None
        assert calls == ["barrier"]
    calls.clear()
    assert recover.on_main_process(lambda: "saved", launched=False) == "saved"  # no process group: no barrier
    assert calls == []
