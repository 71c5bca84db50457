"""No host read on the training call's hot path: the model forward + backward of a trainer micro-batch runs
with every way of reading a tensor's value on the host made to raise.

This machine has no accelerator, so the test emulates one: the batch is built on the host (as the trainer
builds it) and may be read there, while the ops' CPU-only shortcuts are switched off
(`twinlm.ops.host_reads_are_free` -> False), so the code that runs is the accelerator's. Reads are caught at
two levels: the Python methods (`item`, `tolist`, `bool`, `int`, `float`, `.cpu()`) and the aten operators
that force a device->host synchronisation (`_local_scalar_dense`, `nonzero`, `masked_select`, boolean
indexing, `repeat_interleave` without `output_size`).
"""

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from test_train_step import make_samples, make_step, phase
from twinlm import ops

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
