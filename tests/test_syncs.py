"""No host read on the training call's hot path: the model forward + backward of a trainer micro-batch, and a
whole training step (passes, loss reduction, the finite-loss decision, the optimizer's update or skip), run
with every way of reading a tensor's value on the host made to raise; a step's loss is read afterwards, when
asked for (the trainer: once the next step's passes are queued).

This machine has no accelerator, so the test emulates one: the batch is built on the host (as the trainer
builds it) and may be read there, while the ops' CPU-only shortcuts are switched off
(`twinlm.ops.host_reads_are_free` -> False), so the code that runs is the accelerator's. Reads are caught at
two levels: the Python methods (`item`, `tolist`, `bool`, `int`, `float`, `.cpu()`) and the aten operators
that force a device->host synchronisation (`_local_scalar_dense`, `nonzero`, `masked_select`, boolean
indexing, `repeat_interleave` without `output_size`).
"""

import contextlib
import json
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from test_train_step import NaNLoss, make_samples, make_step, phase, weights
from twinlm import ops
from twinlm.train.callback import Callback
from twinlm.train.recipe import load_recipe
from twinlm.train.step import TrainStep
from twinlm.train.testing import make_shards, tiny_recipe
from twinlm.train.trainer import Trainer

aten = torch.ops.aten


class HostReadError(AssertionError):
    pass


class _NoSyncOps(TorchDispatchMode):
    SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
               aten.is_nonzero.default, aten.equal.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.SYNCING:
            raise HostReadError(f"{func} reads the device on the host")
        if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            raise HostReadError("repeat_interleave without output_size reads its size back")
        if func is aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
            raise HostReadError("boolean indexing reads its count back")
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_reads_context():
    """Every host read raises HostReadError inside (the ops' CPU shortcuts off, as on an accelerator)."""
    def refuse(name):
        def method(*a, **k):
            raise HostReadError(f"Tensor.{name} called on the hot path")
        return method

    names = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu")
    saved = {name: getattr(torch.Tensor, name) for name in names}
    free = ops.host_reads_are_free
    try:
        ops.host_reads_are_free = lambda t: False
        for name in names:
            setattr(torch.Tensor, name, refuse(name))
        with _NoSyncOps():
            yield
    finally:
        ops.host_reads_are_free = free
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def no_host_reads(monkeypatch):
    return no_host_reads_context()


def test_the_detector_catches_reads(monkeypatch):
    x = torch.arange(5)
    for read in (lambda: x.sum().item(), lambda: bool(x.any()), lambda: x[x > 2], lambda: x.tolist(),
                 lambda: torch.repeat_interleave(x, x)):
        with pytest.raises(HostReadError), no_host_reads(monkeypatch):
            read()


@pytest.mark.parametrize("objective", ["mlm", "clm"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_forward_and_backward_read_nothing_back(monkeypatch, objective, precision):
    step = make_step(objective)
    step.precision = precision
    ph = phase(micro_batch_tokens=4096, seq_len=64)
    (mb,) = step.micro_batches(make_samples(8), ph, step.objective_for(ph), salt=3)
    assert len(set(torch.diff(mb.cu_seqlens).numpy().tolist())) > 1  # documents of several lengths
    step.model.train()
    with no_host_reads(monkeypatch):
        loss = step.forward_loss(mb)
        loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in step.model.parameters())


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_a_whole_training_step_reads_nothing_back(monkeypatch, objective):
    """train_batch (several micro-batches, StableAdamW on the device's skip flag) reads nothing; each result is
    read afterwards, once: the loss sum, the stop flag and the skip flag."""
    step = make_step(objective)
    ph = phase(micro_batch_tokens=128, seq_len=64)
    w0 = weights(step)
    with no_host_reads(monkeypatch):
        first = step.train_batch(make_samples(8), ph, step=1)
        second = step.train_batch(make_samples(8, seed=1), ph, step=2, stop=True)
    assert not first.resolved and not second.resolved
    assert first.resolve().resolved and math.isfinite(first.loss) and not first.skipped and not first.stop
    assert math.isfinite(second.loss) and not second.skipped and second.stop
    assert any(not torch.equal(v, w0[k]) for k, v in weights(step).items())
    assert {float(st["step"]) for st in step.optimizer.state.values()} == {2.0}


def test_a_non_finite_step_is_skipped_without_a_read(monkeypatch):
    step = make_step(step_class=NaNLoss)
    w0 = weights(step)
    with no_host_reads(monkeypatch):
        r = step.train_batch(make_samples(8), phase(), step=1)
    assert r.skipped and not math.isfinite(r.loss)
    for k, v in weights(step).items():
        assert torch.equal(v, w0[k]), k


class _NoReadStep(TrainStep):
    """The trainer's calls on the hot path (count, backward, update) with every host read made to raise."""

    def count(self, batch):
        with no_host_reads_context():
            return super().count(batch)

    def backward(self, batch, phase, **kwargs):
        with no_host_reads_context():
            return super().backward(batch, phase, **kwargs)

    def update(self, grads):
        with no_host_reads_context():
            return super().update(grads)


def test_the_trainer_loop_reads_each_step_once_after_the_next_is_queued(tmp_path):
    """One rank: a short run whose steps read nothing on the hot path; each step's result is read by the trainer
    (outside those calls) once the next step's passes are queued; every row is logged."""
    recipe = tiny_recipe(make_shards(tmp_path / "shards", n_docs=60), phases=1, tokens=500, every_tokens=200)
    order = []

    class Watch(_NoReadStep):
        def backward(self, batch, phase, **kwargs):
            order.append(("backward", batch.step))
            return super().backward(batch, phase, **kwargs)

    class Logged(Callback):
        def on_log(self, trainer, row):
            order.append(("row", row["step"]))

    class T(Trainer):
        step_class = Watch

    T(load_recipe(recipe), tmp_path / "run", callbacks=[Logged()], log=lambda m: None).fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    n = len(rows)
    assert n > 3 and [r["step"] for r in rows] == list(range(1, n + 1))
    assert all(math.isfinite(r["loss"]) and not r["skipped"] for r in rows)
    # step k's row comes after step k+1's passes were queued (the last one after the loop)
    expected = [("backward", 1)] + [e for k in range(2, n + 1) for e in (("backward", k), ("row", k - 1))]
    assert order == expected + [("row", n)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_on_cuda_a_training_step_never_waits_for_the_device(objective):
    """The real thing: train_batch on CUDA under torch's sync debug mode ("error"), skip included."""
    from twinlm.config import ModelConfig
    from twinlm.model import Transformer
    from twinlm.train import dist
    from twinlm.train.optim import build_optimizer

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("cpu-tiny").replace(causal=objective == "clm")).cuda()
    opt = build_optimizer(model, lr=3e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=3e-4)
    env = dist.DistEnv(device=torch.device("cuda"))
    step = TrainStep(model, opt, env, objective=objective, seed=21, lr=3e-3, precision="bf16")
    bad = NaNLoss(model, opt, env, objective=objective, seed=21, lr=3e-3, precision="bf16")
    ph = phase(micro_batch_tokens=128, seq_len=64)
    step.train_batch(make_samples(8), ph, step=1).resolve()  # warm-up: kernels, workspaces, the optimizer state
    w = weights(step)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        skipped = bad.train_batch(make_samples(8, seed=2), ph, step=2)
        second = step.train_batch(make_samples(8, seed=1), ph, step=3, stop=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert skipped.skipped and math.isfinite(second.loss) and second.stop and not second.skipped
    assert {float(st["step"]) for st in opt.state.values()} == {2.0}
    assert any(not torch.equal(v, w[k]) for k, v in weights(step).items())
