"""``compress recover``: recovery of a saved model, alone and under ``accelerate launch`` (2 CPU processes, gloo);
``compress run --recover-tokens`` under ``accelerate launch``: rank 0 prunes once and hands the pruned
model to the other process (:mod:`compress.pipeline.handoff`).

The two-process run trains on the same global batch (per-device batch × processes) in the same data
order as the one-process run, so the logged loss curves must agree to float rounding, and only the
main process may write the output folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
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


# ---------------------------------------------------------------------------- compress run: prune once
def _run_args(model: Path, out: Path, text: Path, recipe: Path, method: list[str], *extra: str) -> list[str]:
    return ["run", "--model", str(model), *method, "--target", "70%", "--calib", str(text), "--recipe", str(recipe),
            "--recover-tokens", str(TOKENS), "--seed", "3", "--no-eval", "--no-progress", "--out", str(out), *extra]


def _recovery_recipe(folder: Path, batch: int) -> Path:
    """The recovery settings of the recover tests (a run takes them from a recipe)."""
    folder.mkdir(exist_ok=True)
    path = folder / f"recover_b{batch}.yaml"
    path.write_text(f"recover_settings:\n  seq_len: {SEQ}\n  batch_size: {batch}\n  lr: 0.001\n  logging_steps: 1\n")
    return path


def _debris(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.mark.skipif(not ACCELERATE.exists(), reason="accelerate launcher not installed")
@pytest.mark.parametrize(("method", "mode", "kind"), [
    (["--method", "transact", "--set", "calib_samples=4", "--set", "calib_seq_len=32"], "full", "stock"),
    (["--method", "lorap", "--set", "calib_samples=4", "--set", "calib_seq_len=32"], "kd", "compress"),
], ids=["transact-stock-full", "lorap-compress-kd"])
def test_run_prunes_once_under_accelerate_launch(tmp_path, capsys, stories_dir, text, method, mode, kind):
    """`compress run --recover-tokens` on 2 processes: rank 0 alone loads the dense model and prunes, rank 1
    loads the pruned model rank 0 staged (both export formats; with kd rank 1 loads the dense model only as
    its teacher); both train from the same weights (sha256 in the record), the result equals a 1-process
    run with the same global batch, and the staging folder is gone."""
    recipes = tmp_path / "recipes"
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ("--recover-mode", mode)
    assert main(_run_args(stories_dir, one, text, _recovery_recipe(recipes, BATCH), method, *extra)) == 0
    capsys.readouterr()
    r2 = _launch(["--multi_gpu", "--num_processes", "2"],
                 _run_args(stories_dir, two, text, _recovery_recipe(recipes, BATCH // 2), method, *extra), tmp_path)
    assert r2.returncode == 0, r2.stderr[-3000:]
    out = r2.stdout
    # rank 0 alone loaded the dense model and pruned; rank 1 waited and loaded the staged model
    assert out.count("loaded stories260k") == 1 and out.count("pruning with") == 1, out
    assert out.count("rank 1: waiting for rank 0 to prune") == 1 and "rank 1: training from the pruned model" in out
    assert out.count("] saved ") == 1 and out.count("┏") == 1  # one export and one summary, rank 0's
    assert ("rank 1: distillation teacher: stories260k (the dense model)" in out) == (mode == "kd")

    rec1 = json.loads((one / "compress_run.json").read_text())
    rec2 = json.loads((two / "compress_run.json").read_text())
    assert "distributed" not in rec1 and set(rec2) - set(rec1) == {"distributed"}
    assert rec1["format"] == rec2["format"] == kind
    d = rec2["distributed"]
    assert (d["world_size"], d["mode"], d["pruned_on"]) == (2, "prune_once", [0])
    r0, r1 = d["ranks"]
    assert (r0["rank"], r0["pruned"], r0["loaded"]) == (0, True, "the dense model")
    assert (r1["rank"], r1["pruned"], r1["loaded"]) == (1, False, "the pruned model staged by rank 0")
    assert r0["staged_format"] == kind and r1["teacher_loaded_dense"] == (mode == "kd")
    assert r0["pruned_weights_sha256"] == r1["pruned_weights_sha256"] == d["pruned_weights_sha256"]
    assert r0["training_tokens_sha256"] == r1["training_tokens_sha256"]
    assert rec2["plan_hash"] == rec1["plan_hash"] and rec2["achieved"] == rec1["achieved"]  # the same prune
    res1, res2 = rec1["recovery_result"], rec2["recovery_result"]
    assert res1["world_size"] == 1 and res2["world_size"] == 2 and res1["steps"] == res2["steps"]
    assert abs(res1["final_loss"] - res2["final_loss"]) <= 1e-4 * max(1.0, abs(res1["final_loss"]))
    w1, w2 = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert set(w1) == set(w2) and max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4
    assert _debris(tmp_path) == [], _debris(tmp_path)  # no staging folder, no temporary export


@pytest.mark.skipif(not ACCELERATE.exists(), reason="accelerate launcher not installed")
def test_run_failure_on_rank_0_stops_every_process(tmp_path, stories_dir):
    """Rank 0 fails while pruning (the calibration text is shorter than one calibration block): every
    process exits non-zero with rank 0's one-line error instead of waiting, and nothing is left."""
    short = tmp_path / "short.txt"
    short.write_text("Spot. Spot saw the shiny car and said, \"Wow, Kitty, your car is so bright and clean!\"\n")
    recipe = _recovery_recipe(tmp_path / "recipes", BATCH // 2)
    out = tmp_path / "out"
    args = _run_args(stories_dir, out, short, recipe,
                     ["--method", "transact", "--set", "calib_samples=4", "--set", "calib_seq_len=128"])
    r = _launch(["--multi_gpu", "--num_processes", "2"], args, tmp_path)
    assert r.returncode != 0
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 2 and errors[0] == errors[1], r.stderr[-3000:]  # one line from each process
    assert "fewer than one block of seq_len=128" in errors[0]
    codes = re.findall(r"^\s*exitcode\s*: (-?\d+)", r.stderr, re.M)  # torchrun's report, one per process
    # rank 0 exits 2 (bad input); rank 1 too, unless the launcher, seeing rank 0 exit, stopped it first
    assert len(codes) == 2 and "2" in codes and "0" not in codes, r.stderr[-3000:]
    assert r.stdout.count("pruning with") == 1 and "rank 1: waiting for rank 0" in r.stdout
    assert not out.exists() and _debris(tmp_path) == []


@pytest.mark.skipif(not ACCELERATE.exists(), reason="accelerate launcher not installed")
def test_run_prunes_on_every_process_when_the_method_trains_between_shots(tmp_path, stories_dir, text):
    """TransAct with training between its shots needs every process in that training, so every process
    prunes (as before the hand-off existed); rank 0 alone reports, checkpoints and saves, and every
    process is checked to end its pruning with the same weights."""
    out = tmp_path / "out"
    args = _run_args(stories_dir, out, text, _recovery_recipe(tmp_path / "recipes", BATCH // 2),
                     ["--method", "transact", "--set", "calib_samples=4", "--set", "calib_seq_len=32",
                      "--set", "shots=2", "--set", "recover_tokens_per_shot=1024"])
    r = _launch(["--multi_gpu", "--num_processes", "2"], args, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("pruning with") == 1 and "rank 1" not in r.stdout  # rank 1 works silently
    d = json.loads((out / "compress_run.json").read_text())["distributed"]
    assert (d["mode"], d["pruned_on"]) == ("every_rank", [0, 1]) and [e["pruned"] for e in d["ranks"]] == [True, True]
    assert d["ranks"][0]["pruned_weights_sha256"] == d["ranks"][1]["pruned_weights_sha256"]
    assert _debris(tmp_path) == []  # no checkpoint folder left either


def test_launched_run_without_training_is_refused(tmp_path, capsys, monkeypatch, stories_dir, text):
    """Under a launch, a run that trains nothing would only repeat one prune in every process: one line,
    before any weight is read, nothing written; bad launch variables too."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    out = tmp_path / "out"
    base = ["run", "--model", str(stories_dir), "--method", "random", "--target", "70%", "--out", str(out)]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "without it nothing is trained" in err and err.count("\n") == 1, err
    monkeypatch.setenv("RANK", "2")
    assert main([*base, "--recover-tokens", "100"]) == 2
    err = capsys.readouterr().err
    assert "RANK=2 is not within WORLD_SIZE=2" in err and err.count("\n") == 1, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_launch_from_env():
    from compress.errors import UsageError
    from compress.pipeline.handoff import Launch, launch_from_env

    assert launch_from_env({}) is None and launch_from_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
    assert launch_from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == Launch(3, 4, 1)
    assert launch_from_env({"PMI_SIZE": "2", "PMI_RANK": "1"}) == Launch(1, 2, 0)  # MPI (accelerate --cpu)
    with pytest.raises(UsageError, match="not integers"):
        launch_from_env({"WORLD_SIZE": "two"})


def _handoff(root: Path, rank: int = 1):
    from compress.pipeline.handoff import Handoff, Launch

    root.mkdir(exist_ok=True)
    return Handoff(launch=Launch(rank, 2), root=root, nonce="n1")


def test_waiting_process_reports_rank_0_failure_stale_heartbeat_and_takeover(tmp_path):
    """What a waiting process does with each state of the staging folder, without a launch."""
    from compress.errors import CompressError
    from compress.pipeline import handoff as h

    root = tmp_path / ".out.compress-pruned"
    w = _handoff(root)
    (root / h.HEARTBEAT_FILE).touch()
    (root / h.STATUS_FILE).write_text(json.dumps({"nonce": "n1", "state": "pruning"}))
    with pytest.raises(CompressError, match="no heartbeat .* for 0 s"):  # rank 0 died without a word
        w.wait(stale_s=0.3, poll_s=0.05)
    (root / h.STATUS_FILE).write_text(json.dumps({"nonce": "other", "state": "pruning"}))
    with pytest.raises(CompressError, match="another run took over"):
        w.wait(poll_s=0.05)
    (root / h.STATUS_FILE).write_text(json.dumps({"nonce": "n1", "state": "failed", "message": "bad calib",
                                                  "exit_code": 2}))
    with pytest.raises(h.PeerFailure, match="^bad calib$") as e:
        w.wait(poll_s=0.05)
    assert e.value.exit_code == 2 and (root / "seen-1").exists()  # rank 0 may now report and exit
    h._pending.clear()
    (root / h.STATUS_FILE).write_text(json.dumps({"nonce": "n1", "state": "done"}))
    assert w.wait(poll_s=0.05) == root / h.MODEL_DIR
    shutil.rmtree(root)
    with pytest.raises(CompressError, match="gone or not visible"):
        w.wait(poll_s=0.05)


def test_rank_0_failure_waits_for_the_others_then_cleans_up(tmp_path, monkeypatch):
    from compress.errors import CalibrationError
    from compress.pipeline import handoff as h

    monkeypatch.setattr(h, "ACK_S", 0.2)
    root = tmp_path / ".out.compress-pruned"
    zero = _handoff(root, rank=0)
    zero.fail(CalibrationError("too short\nsecond line"))
    status = json.loads((root / h.STATUS_FILE).read_text())
    assert (status["state"], status["message"], status["exit_code"]) == ("failed", "too short", 2)
    assert root.exists()  # kept until rank 0 has printed its line
    h.after_error_reported()
    assert not root.exists() and h._pending == []
    zero.fail(RuntimeError("again"))  # a no-op once failed (or handed over)
    assert not root.exists()
    assert h.failure_line(RuntimeError("boom")) == ("RuntimeError: boom (run with -v for the traceback)", 1)
    assert h.failure_line(KeyboardInterrupt()) == ("interrupted", 130)


def test_staging_folder_not_written_by_compress_is_refused(tmp_path):
    from compress.errors import UsageError
    from compress.pipeline.handoff import Handoff, stage_dir_for

    out = tmp_path / "out"
    stage = stage_dir_for(out)
    stage.mkdir()
    (stage / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="compress did not write it"):
        Handoff._prepare(out)
    assert (stage / "notes.txt").exists()
    (stage / "status.json").write_text("{}")  # a killed launch's: replaced
    assert Handoff._prepare(out) == stage and list(stage.iterdir()) == []


def test_processes_that_would_train_from_other_weights_stop(monkeypatch):
    """The agreement check: every process hashes its weights and tokens; any difference is one line."""
    import torch.distributed as dist

    from compress.errors import CompressError
    from compress.pipeline import handoff as h
    from compress.testing import tiny_model

    model = tiny_model("llama-gqa")
    other = {"rank": 1, "pruned_weights_sha256": "f" * 64, "training_tokens_sha256": None}
    monkeypatch.setattr("compress.train.distributed.process_state", lambda: None)

    def gather(into, entry):
        into[0], into[1] = entry, {**entry, **other}

    monkeypatch.setattr(dist, "all_gather_object", gather)
    with pytest.raises(CompressError, match=r"^rank 1 would train from other pruned weights than rank 0 \(sha256 "
                                            r"ffffffffffff vs [0-9a-f]{12}\): the pruned model does not load back"):
        h.agree(h.Launch(0, 2), {}, model, None, mode=h.PRUNE_ONCE)
    other["pruned_weights_sha256"] = h.params_sha256(model)
    info = h.agree(h.Launch(0, 2), {"pruned": True}, model, None, mode=h.PRUNE_ONCE)
    assert info["pruned_on"] == [0] and [e["rank"] for e in info["ranks"]] == [0, 1]
    tied = tiny_model("llama-gqa")
    tied.load_state_dict(model.state_dict())
    assert h.params_sha256(tied) == h.params_sha256(model)
    with torch.no_grad():
        tied.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-6
    assert h.params_sha256(tied) != h.params_sha256(model)


def test_guarded_recovery_refuses_training_while_rank_0_prunes_alone():
    from compress.errors import UsageError
    from compress.pipeline.handoff import GuardedRecovery

    class Rec:
        consumed = 7

        def __call__(self, model, **kw):
            return ("trained", model)

    g = GuardedRecovery(Rec(), "mymethod")
    with pytest.raises(UsageError, match="method mymethod trains between its pruning steps"):
        g("m")
    assert g.consumed == 7
    g.armed = False
    assert g("m") == ("trained", "m")
