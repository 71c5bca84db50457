"""The training step on its own: a tiny model, an optimizer and hand-made samples; no run folder, no trainer."""

import math

import numpy as np
import pytest
import torch

from twinlm.config import ModelConfig
from twinlm.model import Transformer
from twinlm.train import dist
from twinlm.train.optim import build_optimizer
from twinlm.train.recipe import Phase, Schedule
from twinlm.train.schedule import lr_multiplier
from twinlm.train.step import MicroBatch, TrainStep

LR = 3e-3


def make_step(objective="mlm", env=None, sgd=False, step_class=TrainStep):
    torch.manual_seed(0)
    cfg = ModelConfig.preset("cpu-tiny").replace(causal=objective == "clm", attention_dropout=0.0)
    model = Transformer(cfg)
    # where updates are compared: plain SGD at lr 1, so the update is the gradient (Adam's normalisation would
    # magnify float rounding in near-zero gradients) and large next to the weights' own rounding
    lr = 1.0 if sgd else LR
    opt = (torch.optim.SGD(model.parameters(), lr=lr) if sgd else
           build_optimizer(model, lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=3e-4))
    return step_class(model, opt, env or dist.DistEnv(), objective=objective, seed=21, lr=lr, precision="fp32")


def make_samples(n=8, seed=0, lo=20, hi=60):
    rng = np.random.default_rng(seed)
    return [(100 + i, np.concatenate([[1], rng.integers(5, 4096, size=int(rng.integers(lo, hi))), [2]]))
            for i in range(n)]


def phase(micro_batch_tokens=4096, seq_len=64, **kw):
    return Phase(name="p", tokens=100_000, seq_len=seq_len, batch_size=8, micro_batch_tokens=micro_batch_tokens, **kw)


def weights(step):
    return {k: v.detach().clone() for k, v in step.bare_model.state_dict().items()}


def test_micro_batch_counts_its_targets():
    mb = MicroBatch(torch.arange(10), torch.tensor([0, 4, 10], dtype=torch.int32), 6,
                    torch.tensor([1, 5, 7]), torch.tensor([9, 9, 9]))
    assert mb.num_targets == 3 and mb.num_tokens == 10


def test_micro_batches_are_cut_packed_and_prepared():
    step = make_step("clm")
    samples = make_samples(8, lo=50, hi=90)  # some longer than seq_len: cut to 64
    p = phase(micro_batch_tokens=128, seq_len=64)
    mbs = step.micro_batches(samples, p, step.objective_for(p), salt=1)
    assert len(mbs) > 1 and all(mb.num_tokens <= 128 for mb in mbs)
    assert sum(mb.num_tokens for mb in mbs) == sum(min(len(a), 64) for _, a in samples)
    for mb in mbs:
        docs = len(mb.cu_seqlens) - 1
        assert mb.cu_seqlens.dtype == torch.int32 and int(mb.cu_seqlens[-1]) == mb.num_tokens
        assert mb.num_targets == mb.num_tokens - docs  # clm: a document's last token predicts nothing
        assert mb.max_seqlen == int(torch.diff(mb.cu_seqlens).max())
    assert step.micro_batches([], p, step.objective_for(p), salt=1) == []


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_a_batch_in_several_micro_batches_gives_the_same_update_as_one(objective):
    samples = make_samples(8)
    one, many = make_step(objective, sgd=True), make_step(objective, sgd=True)
    big, small = phase(micro_batch_tokens=4096), phase(micro_batch_tokens=96)
    assert len(many.micro_batches(samples, small, many.objective_for(small), salt=1)) >= 4
    a = one.train_batch(samples, big, step=1)
    b = many.train_batch(samples, small, step=1)
    assert (a.targets, a.tokens, a.lr) == (b.targets, b.tokens, b.lr)
    assert b.loss == pytest.approx(a.loss, rel=1e-5)
    wa, wb, w0 = weights(one), weights(many), weights(make_step(objective))
    assert any(not torch.equal(v, w0[k]) for k, v in wa.items())  # the step moved the weights
    for k in wa:
        torch.testing.assert_close(wb[k] - w0[k], wa[k] - w0[k], rtol=1e-4, atol=1e-7)


def test_the_learning_rate_follows_the_phase_schedule():
    step = make_step()
    p = phase(schedule=Schedule(warmup_tokens=10_000))
    r = step.train_batch(make_samples(4), p, step=1, phase_tokens=2_000)
    assert r.lr == pytest.approx(LR * lr_multiplier(2_000 + r.tokens, p.tokens, warmup_tokens=10_000))
    assert all(g["lr"] == r.lr for g in step.optimizer.param_groups)


class _OtherRank:
    """Stands in for the collectives of a 2-rank run: the other rank has `passes` micro-batches with `targets`
    targets, `tokens` tokens and a summed loss of `loss_sum`."""

    def __init__(self, passes=3, targets=50, tokens=60, loss_sum=100.0):
        self.passes, self.targets, self.tokens, self.loss_sum = passes, targets, tokens, loss_sum
        self.sums = 0

    def __call__(self, t, op=None):
        if op == torch.distributed.ReduceOp.MAX:
            t.copy_(torch.maximum(t, torch.tensor([self.passes])))
        elif t.numel() == 2 and self.sums == 0:  # (targets, tokens)
            t += torch.tensor([self.targets, self.tokens], dtype=t.dtype)
            self.sums += 1
        else:  # (loss sum, stop, checkpoint)
            t += torch.tensor([self.loss_sum, 0.0, 0.0], dtype=t.dtype)
        return t


@pytest.mark.parametrize("mine", [0, 1])
def test_every_rank_runs_as_many_passes_as_the_busiest_one(monkeypatch, mine):
    """A rank with fewer micro-batches (here none or one, the other rank three) pads with dummy passes of
    weight 0; the step's counts and loss are the global ones."""
    monkeypatch.setattr(dist, "all_reduce", _OtherRank(passes=3))
    step = make_step(env=dist.DistEnv(rank=1, world_size=2))
    sizes = []
    forward = step.forward_loss

    def counting(mb):
        sizes.append(mb.num_tokens)
        return forward(mb)

    step.forward_loss = counting
    samples = make_samples(1)[:mine]
    p = phase()
    own = step.micro_batches(samples, p, step.objective_for(p), salt=1)
    r = step.train_batch(samples, p, step=1)
    assert sizes == [mb.num_tokens for mb in own] + [2] * (3 - len(own))
    assert r.targets == 50 + sum(mb.num_targets for mb in own) and r.tokens == 60 + sum(mb.num_tokens for mb in own)
    if not own:
        assert r.loss == pytest.approx(100.0 / 50)
    sizes.clear()
    monkeypatch.setattr(dist, "all_reduce", _OtherRank(passes=3))
    step.eval_loss(samples, p, mask_ratio=0.15)
    assert len(sizes) == 3 and sizes[len(own):] == [2] * (3 - len(own))


def test_eval_loss_leaves_the_weights_and_the_optimizer_untouched():
    step = make_step()
    p = phase()
    step.train_batch(make_samples(8), p, step=1)
    before = weights(step)
    opt_before = {id(q): {k: v.clone() for k, v in s.items()} for q, s in step.optimizer.state.items()}
    held = make_samples(6, seed=5)
    loss = step.eval_loss(held, p, mask_ratio=0.15)
    assert math.isfinite(loss) and loss > 0
    assert step.eval_loss(held, p, mask_ratio=0.15) == loss  # fixed masks: the same number every time
    for k, v in weights(step).items():
        assert torch.equal(v, before[k]), k
    assert all(q.grad is None for q in step.bare_model.parameters())
    for q, s in step.optimizer.state.items():
        for k, v in s.items():
            assert torch.equal(v, opt_before[id(q)][k])
    assert step.bare_model.training


class NaNLoss(TrainStep):
    def forward_loss(self, mb):
        return super().forward_loss(mb) * float("nan")


def test_a_non_finite_loss_skips_the_update():
    step = make_step(step_class=NaNLoss)
    before = weights(step)
    r = step.train_batch(make_samples(8), phase(), step=1)
    assert r.skipped and not math.isfinite(r.loss) and r.targets > 0
    for k, v in weights(step).items():
        assert torch.equal(v, before[k]), k
    assert all(q.grad is None for q in step.bare_model.parameters())
    # the update was skipped on the device: the optimizer's state is a fresh one (step 0, zero moments)
    for st in step.optimizer.state.values():
        assert float(st["step"]) == 0 and not st["exp_avg"].any() and not st["exp_avg_sq"].any()
    # the same model and optimizer without the fault: the next step updates
    healthy = TrainStep(step.model, step.optimizer, step.env, objective="mlm", seed=21, lr=LR, precision="fp32")
    r = healthy.train_batch(make_samples(8), phase(), step=2)
    assert not r.skipped and math.isfinite(r.loss)
    assert any(not torch.equal(v, before[k]) for k, v in weights(step).items())


def test_a_stop_request_is_reported():
    step = make_step()
    assert not step.train_batch(make_samples(2), phase(), step=1).stop
    assert step.train_batch(make_samples(2), phase(), step=2, stop=True).stop


def test_the_four_calls_are_train_batch_and_discard_drops_a_step():
    p = phase(micro_batch_tokens=128)
    whole, split = make_step(), make_step()
    a = whole.train_batch(make_samples(8), p, step=1, phase_tokens=100)
    batch = split.prepare(make_samples(8), p, step=1)
    assert batch.targets is None and batch.local_tokens == sum(min(len(x), 64) for _, x in make_samples(8))
    split.count(batch)
    assert (batch.targets, batch.tokens, batch.passes) == (batch.local_targets, batch.local_tokens, len(batch.micro))
    b = split.update(split.backward(batch, p, phase_tokens=100))
    assert (a.loss, a.lr, a.targets, a.tokens, a.skipped) == (b.loss, b.lr, b.targets, b.tokens, b.skipped)
    w, opt = weights(split), {id(q): {k: v.clone() for k, v in s.items()} for q, s in split.optimizer.state.items()}
    assert all(torch.equal(v, weights(whole)[k]) for k, v in w.items())
    grads = split.backward(split.prepare(make_samples(8, seed=3), p, step=2), p)
    assert any(q.grad is not None for q in split.bare_model.parameters())
    split.discard(grads)
    assert all(q.grad is None for q in split.bare_model.parameters())
    assert all(torch.equal(v, w[k]) for k, v in weights(split).items())
    for q, s in split.optimizer.state.items():
        assert all(torch.equal(v, opt[id(q)][k]) for k, v in s.items())


def test_one_precision_rule_for_the_autocast_and_the_parameter_dtype():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [dist.resolve_precision(p, cpu) for p in ("auto", "bf16", "fp32")] == ["fp32", "bf16", "fp32"]
    assert [dist.resolve_precision(p, cuda) for p in ("auto", "bf16", "fp32")] == ["bf16", "bf16", "fp32"]
    # FSDP keeps fp32 parameters off CUDA, even where the CPU autocasts to bf16
    assert [dist.compute_dtype(p, dist.DistEnv(device=cuda)) for p in ("auto", "bf16", "fp32")] == \
        [torch.bfloat16, torch.bfloat16, None]
    assert [dist.compute_dtype(p, dist.DistEnv()) for p in ("auto", "bf16", "fp32")] == [None, None, None]
    step = make_step()
    for precision, enabled in (("auto", False), ("fp32", False), ("bf16", True)):
        step.precision = precision
        with step._autocast():
            assert torch.is_autocast_enabled("cpu") == enabled
