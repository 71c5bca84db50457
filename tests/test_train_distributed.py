"""2 processes on CPU (gloo) give the same losses as 1 process with the same global batch (DDP and FSDP2), and a
checkpoint written by 2 ranks resumes on 1."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from twinlm.train.testing import make_shards, tiny_recipe

pytestmark = pytest.mark.distributed


def env():
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return e


def train(recipe_path, out, nproc=1, *overrides):
    args = [str(recipe_path), "--out", str(out), *overrides]
    if nproc == 1:
        cmd = [sys.executable, "-m", "twinlm", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--standalone", "-m", "twinlm", "train", *args]
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def close(a, b):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    assert [r["targets"] for r in a] == [r["targets"] for r in b]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5, abs=1e-6), (x["step"], x["loss"], y["loss"])


def setup(tmp_path):
    shards = make_shards(tmp_path / "shards", n_docs=200)
    # batch-size warmup starts at 1 sequence: with 2 ranks one of them has nothing for a step (dummy micro-batch)
    recipe = tiny_recipe(shards, objective="clm", phases=2, tokens=900, batch_size=6, micro_batch_tokens=128,
                         every_tokens=300)
    recipe["phases"]["pretrain"]["batch_warmup_start"] = 1
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_two_ranks_equal_one(tmp_path):
    path = setup(tmp_path)
    one = train(path, tmp_path / "one")
    ddp = train(path, tmp_path / "ddp", 2)
    close(one, ddp)


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_on_another_rank_count(tmp_path):
    path = setup(tmp_path)
    one = train(path, tmp_path / "one")
    # FSDP2 for 4 steps on 2 ranks, then the rest on 1 rank from its checkpoint
    train(path, tmp_path / "mixed", 2, "parallel=fsdp", "max_steps=4")
    ck = sorted((tmp_path / "mixed" / "checkpoints").glob("step-*"))[-1]
    assert ck.name == "step-00000004"
    assert json.loads((ck / "state.json").read_text())["world_size"] == 2
    mixed = train(path, tmp_path / "mixed", 1)
    close(one, mixed)


WRITER_ONLY = '''
import json, sys
import torch
from twinlm import ModelConfig, Transformer
from twinlm.train import dist
from twinlm.train.checkpoint import CheckpointManager, save_training
from twinlm.train.optim import build_optimizer

env = dist.init()
torch.manual_seed(0)
model = Transformer(ModelConfig.preset("cpu-tiny"))
wrapped = dist.parallelize(model, env, mode="fsdp")
opt = build_optimizer(model, lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0)
ids = torch.randint(5, 4000, (64,))
wrapped(ids, cu_seqlens=torch.tensor([0, 64], dtype=torch.int32), prediction_positions=torch.arange(8),
        labels=ids[:8]).loss.backward()
opt.step()
copies = []
real_cpu = torch.Tensor.cpu
def counting_cpu(self, *a, **k):
    if self.is_floating_point():  # (all_gather_object moves its pickled bytes through .cpu() too)
        copies.append(self.numel())
    return real_cpu(self, *a, **k)
torch.Tensor.cpu = counting_cpu
path = save_training(CheckpointManager(sys.argv[1], keep_last=1), wrapped, opt, env, step=1, trainer_state={},
                     info={})
torch.Tensor.cpu = real_cpu
json.dump({"rank": env.rank, "host_copy_elements": sum(copies), "wrote": path is not None},
          open(f"{sys.argv[1]}-rank{env.rank}.json", "w"))
dist.shutdown()
'''


def test_fsdp_checkpoint_copies_to_host_on_the_writer_only(tmp_path):
    """Every rank gathers each sharded tensor (a collective), but only rank 0 keeps host copies and writes:
    the other ranks hold no second copy of the model and optimizer in host memory."""
    from safetensors import safe_open

    from twinlm import ModelConfig, Transformer

    script = tmp_path / "writer_only.py"
    script.write_text(WRITER_ONLY)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(script),
           str(tmp_path / "ck")]
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"ck-rank{r}.json").read_text()) for r in (0, 1)]
    params = sum(t.numel() for t in Transformer(ModelConfig.preset("cpu-tiny")).state_dict().values())
    assert ranks[0]["wrote"] and ranks[0]["host_copy_elements"] >= 3 * params  # weights + two moments
    assert not ranks[1]["wrote"] and ranks[1]["host_copy_elements"] == 0
    folder = next((tmp_path / "ck").glob("step-*"))
    with safe_open(folder / "optimizer.safetensors", "pt") as f:
        assert any(k.endswith("::exp_avg_sq") for k in f.keys())


HOST_VALUES = '''
import json, sys
import torch
import torch.distributed as tdist
sys.path.insert(0, sys.argv[2])
from test_train_step import make_samples, make_step, phase
from twinlm.train import dist

# a default group without a CPU backend, as one started with NCCL alone (gloo registered for cuda only)
tdist.init_process_group(backend="cuda:gloo")
rank = tdist.get_rank()
refused = False
try:
    tdist.all_reduce(torch.ones(1))
except RuntimeError:
    refused = True
env = dist.DistEnv(rank=rank, world_size=2)
step = make_step("mlm", env=env)
ph = phase(micro_batch_tokens=128)
batch = step.count(step.prepare(make_samples(4 + 4 * rank, seed=rank), ph, step=1))
locals_ = dist.all_gather_object([batch.local_targets, batch.local_tokens, len(batch.micro)])
dist.barrier()
json.dump({"refused": refused, "counted": [batch.targets, batch.tokens, batch.passes], "locals": locals_,
           "sum": float(dist.all_reduce(torch.tensor([rank + 1.0]))[0]),
           "from_0": dist.broadcast_object({"rank": rank})["rank"],
           "host_groups_made": len(dist._HOST_GROUP), "same_group": dist.host_group() is dist.host_group()},
          open(f"{sys.argv[1]}-rank{rank}.json", "w"))
dist.shutdown()
'''


def test_host_values_never_go_through_the_device_group(tmp_path):
    """With a default group that cannot carry host tensors (NCCL alone; here gloo registered for cuda only),
    the step's counts, objects and barriers go through a gloo group for host values: the counts are the sums
    (and the pass count the maximum) of both ranks' own, and nothing is copied to a device."""
    script = tmp_path / "host_values.py"
    script.write_text(HOST_VALUES)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(script),
           str(tmp_path / "out"), str(os.path.dirname(__file__))]
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"out-rank{r}.json").read_text()) for r in (0, 1)]
    (t0, n0, p0), (t1, n1, p1) = ranks[0]["locals"]
    assert t0 != t1 and p0 != p1  # the ranks' shares differ, so a sum and a maximum are seen
    for r in ranks:
        assert r["refused"]  # the stand-in indeed has no CPU backend
        assert r["counted"] == [t0 + t1, n0 + n1, max(p0, p1)]
        assert r["sum"] == 3.0 and r["from_0"] == 0
        assert r["host_groups_made"] == 1 and r["same_group"]  # made once, on first use


@pytest.mark.parametrize("device, backend", [("cuda:1", "cpu:gloo,cuda:nccl"), ("cpu", "gloo")])
def test_init_starts_one_group_with_a_host_backend(monkeypatch, device, backend):
    """Under torchrun on CUDA, init() starts NCCL for device tensors and gloo for host values in one default
    group (bound to the rank's device); on CPU gloo alone."""
    import torch.distributed as tdist

    from twinlm.train import dist

    started = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(tdist, "is_initialized", lambda: False)
    monkeypatch.setattr(tdist, "init_process_group", lambda **kw: started.update(kw))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    env = dist.init(device)
    assert env.rank == 1 and env.world_size == 2 and env.device == torch.device(device)
    assert started["backend"] == backend
    assert started["device_id"] == (torch.device(device) if device != "cpu" else None)
