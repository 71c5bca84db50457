"""StableAdamW against a hand computation and a copy of its earlier math; its device-side skip; schedules' numbers."""

import math

import pytest
import torch

from twinlm.train.optim import StableAdamW, param_groups
from twinlm.train.schedule import batch_size, lr_multiplier


def hand_stableadamw(p, grads, lr, peak, b1, b2, eps, wd):
    """Plain-Python reference: per-tensor RMS clipping, fully decoupled weight decay."""
    p = list(p)
    m = [0.0] * len(p)
    v = [0.0] * len(p)
    for t, g in enumerate(grads, start=1):
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
        mh = [mi / (1 - b1 ** t) for mi in m]
        vh = [vi / (1 - b2 ** t) for vi in v]
        rms = math.sqrt(sum(gi * gi / max(vi, eps * eps) for gi, vi in zip(g, vh)) / len(p))
        eta = lr / max(1.0, rms)
        p = [pi * (1 - eta * wd / peak) for pi in p]
        p = [pi - eta * mi / (math.sqrt(vi) + eps) for pi, mi, vi in zip(p, mh, vh)]
    return p


def test_stableadamw_matches_hand_computation():
    init = [0.5, -1.0, 2.0, 0.25]
    # step 2's gradient is large relative to history: the RMS clip (> 1) engages
    grads = [[0.1, -0.2, 0.3, 0.0], [2.0, 1.0, -3.0, 0.5], [0.01, 0.02, -0.01, 0.0]]
    lr, peak, wd = 1e-2, 2e-2, 0.1
    x = torch.nn.Parameter(torch.tensor(init, dtype=torch.float64))
    opt = StableAdamW([x], lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=wd, peak_lr=peak)
    for g in grads:
        x.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    expected = hand_stableadamw(init, grads, lr, peak, 0.9, 0.98, 1e-6, wd)
    assert x.detach().tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    # the clip really engaged on step 2: plain AdamW would differ
    assert opt.state[x]["step"].item() == 3


def test_rms_clip_bounds_the_first_update():
    # first step: v_hat = g^2, so the update is lr * sign(g) (rms = 1, no clip): |Δ| = lr
    x = torch.nn.Parameter(torch.zeros(5))
    opt = StableAdamW([x], lr=0.1, weight_decay=0.0)
    x.grad = torch.tensor([1e3, -1e-2, 5.0, -2.0, 0.1])
    opt.step()
    assert x.detach().abs().tolist() == pytest.approx([0.1] * 5, rel=1e-4)


def test_no_weight_decay_on_norms_and_biases():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Embedding(10, 4))
    groups = param_groups(model, 0.01)
    decay = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.01 and groups[1]["weight_decay"] == 0.0
    assert id(model[0].weight) in decay and id(model[2].weight) in decay
    assert id(model[0].bias) not in decay and id(model[1].weight) not in decay and id(model[1].bias) not in decay


def test_weight_decay_is_fully_decoupled():
    # zero gradient: only decay acts; at lr = peak the weight shrinks by exactly wd per step, not lr*wd
    x = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = StableAdamW([x], lr=5e-4, weight_decay=1e-2, peak_lr=5e-4)
    x.grad = torch.zeros(3, dtype=torch.float64)
    opt.step()
    assert x.detach().tolist() == pytest.approx([1 - 1e-2] * 3, rel=1e-12)
    for g in opt.param_groups:
        g["lr"] = 2.5e-4  # half the peak: half the decay
    opt.step()
    assert x.detach().tolist() == pytest.approx([(1 - 1e-2) * (1 - 5e-3)] * 3, rel=1e-12)


def test_warmup_then_constant():
    kw = dict(warmup_tokens=100, start=1.0, end=1.0, decay="constant")
    assert lr_multiplier(0, 1000, **kw) == 0.0
    assert lr_multiplier(25, 1000, **kw) == 0.25
    assert lr_multiplier(100, 1000, **kw) == 1.0
    assert lr_multiplier(1000, 1000, **kw) == 1.0


def test_one_minus_sqrt_decay():
    kw = dict(start=1.0, end=0.5, decay="one_minus_sqrt")
    assert lr_multiplier(0, 1000, **kw) == 1.0
    assert lr_multiplier(250, 1000, **kw) == pytest.approx(0.5 + 0.5 * (1 - math.sqrt(0.25)))  # 0.75
    assert lr_multiplier(1000, 1000, **kw) == pytest.approx(0.5)
    # decay phase: restart at 0.5 x peak, down to 0.02 x peak
    kw = dict(start=0.5, end=0.02, decay="one_minus_sqrt")
    assert lr_multiplier(0, 100, **kw) == 0.5
    assert lr_multiplier(64, 100, **kw) == pytest.approx(0.02 + 0.48 * (1 - 0.8))
    assert lr_multiplier(100, 100, **kw) == pytest.approx(0.02)
    # the REFERENCE formula, relative to the phase's start LR: a_f + (1 - a_f)(1 - sqrt(x)), a_f = 0.04
    x = 0.3
    assert lr_multiplier(30, 100, **kw) / 0.5 == pytest.approx(0.04 + 0.96 * (1 - math.sqrt(x)))


def test_warmup_stable_linear_decay_window():
    # cross-objective: warmup 3, stable, linear decay over the last 10 of 50 to 0.02
    kw = dict(warmup_tokens=3, start=1.0, end=0.02, decay="linear", decay_tokens=10)
    assert lr_multiplier(1.5, 50, **kw) == 0.5
    assert lr_multiplier(20, 50, **kw) == 1.0
    assert lr_multiplier(40, 50, **kw) == 1.0
    assert lr_multiplier(45, 50, **kw) == pytest.approx(0.02 + 0.98 * 0.5)
    assert lr_multiplier(50, 50, **kw) == pytest.approx(0.02)


def test_batch_size_warmup():
    kw = dict(full=4608, start=32, warmup_tokens=1000, multiple=32)
    assert batch_size(0, **kw) == 32
    assert batch_size(500, **kw) == (32 + (4608 - 32) // 2) // 32 * 32
    assert batch_size(999, **kw) <= 4608
    assert batch_size(1000, **kw) == 4608
    assert batch_size(10, full=8, start=8, warmup_tokens=100) == 8
    sizes = [batch_size(t, **kw) for t in range(0, 1100, 10)]
    assert sizes == sorted(sizes) and all(s % 32 == 0 for s in sizes)


def _per_tensor_stableadamw_step(params, states, lr, peak, b1, b2, eps, wd):
    """The optimizer as one loop over tensors (its previous implementation): the foreach one must equal it."""
    for p in params:
        st = states.setdefault(p, {"step": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p)})
        st["step"] += 1
        t, g, m, v = st["step"], p.grad, st["m"], st["v"]
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        v_hat = v / (1 - b2 ** t)
        eta = lr / torch.clamp((g * g / v_hat.clamp(min=eps * eps)).mean().sqrt(), min=1.0)
        p.mul_(1 - eta * (wd / peak))
        p.sub_((m / (1 - b1 ** t)).div_(v_hat.sqrt_().add_(eps)) * eta)


@pytest.mark.parametrize("flag", [False, True])
def test_foreach_update_equals_the_per_tensor_loop_bitwise(flag):
    """The update as it was before the skip flag existed (a copy of its math), without the flag and with a zero
    one: the same bits."""
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2), (11,)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    ref = [p.detach().clone() for p in ours]
    opt = StableAdamW([{"params": ours[:2]}, {"params": ours[2:], "weight_decay": 0.0}], lr=1e-2,
                      weight_decay=0.1, peak_lr=2e-2)
    states = {}
    for step in range(4):
        grads = [torch.randn(s, generator=g) * (30.0 if step == 1 else 1.0) for s in shapes]  # step 2 clips
        for p, r, gr in zip(ours, ref, grads):
            p.grad, r.grad = gr.clone(), gr.clone()
        opt.step(found_inf=torch.zeros(()) if flag else None)
        with torch.no_grad():
            _per_tensor_stableadamw_step(ref[:2], states, 1e-2, 2e-2, 0.9, 0.98, 1e-6, 0.1)
            _per_tensor_stableadamw_step(ref[2:], states, 1e-2, 2e-2, 0.9, 0.98, 1e-6, 0.0)
    for p, r in zip(ours, ref):
        assert torch.equal(p.detach(), r)


def _run(steps_grads, flag=None, skip_at=(), dtype=torch.float32, device="cpu"):
    """StableAdamW over four tensors in two groups for the given gradients; `flag`: pass found_inf (1 at the
    steps in `skip_at`, else 0)."""
    g = torch.Generator().manual_seed(1)
    shapes = [(7, 5), (5,), (3, 4, 2), (11,)]
    ps = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype).to(device)) for s in shapes]
    opt = StableAdamW([{"params": ps[:2]}, {"params": ps[2:], "weight_decay": 0.0}], lr=1e-2, weight_decay=0.1,
                      peak_lr=2e-2)
    for i, grads in enumerate(steps_grads):
        for p, gr in zip(ps, grads):
            p.grad = gr.to(device=device, dtype=dtype, copy=True)
        if flag is None:
            opt.step()
        else:
            opt.step(found_inf=torch.tensor(float(i in skip_at), device=device))
    return ps, opt


def _grads(n, bad=()):
    g = torch.Generator().manual_seed(2)
    shapes = [(7, 5), (5,), (3, 4, 2), (11,)]
    out = []
    for i in range(n):
        grads = [torch.randn(s, generator=g) * (30.0 if i == 1 else 1.0) for s in shapes]  # step 2 clips
        if i in bad:
            grads[0][0, 0], grads[2][1, 1, 1] = float("nan"), float("inf")
        out.append(grads)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_zero_skip_flag_gives_bitwise_the_update_without_one(dtype):
    plain, o1 = _run(_grads(5), dtype=dtype)
    flagged, o2 = _run(_grads(5), flag=True, dtype=dtype)
    for a, b in zip(plain, flagged):
        assert torch.equal(a.detach(), b.detach())
    for a, b in zip(plain, flagged):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(o1.state[a][key], o2.state[b][key]), key


def test_a_set_skip_flag_is_an_exact_no_op_even_with_nan_gradients():
    grads = _grads(5, bad={2})
    ps, opt = _run(grads[:2], flag=True)
    before = [p.detach().clone() for p in ps]
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in ps}
    for p, gr in zip(ps, grads[2]):
        p.grad = gr.clone()
    opt.step(found_inf=torch.tensor(1.0))
    for p, b in zip(ps, before):
        assert torch.equal(p.detach(), b)
        for k, v in opt.state[p].items():
            assert torch.equal(v, state[id(p)][k]), k
    # the skipped step left no trace: the rest of the run equals one that never saw it
    ref, _ = _run(grads[:2] + grads[3:], flag=True)
    out, o = _run(grads, flag=True, skip_at={2})
    for a, b in zip(ref, out):
        assert torch.equal(a.detach(), b.detach())
    assert {float(o.state[p]["step"]) for p in out} == {4.0}


def test_a_skip_on_the_first_step_leaves_a_fresh_state():
    grads = _grads(3, bad={0})
    ps, opt = _run(grads[:1], flag=True, skip_at={0})
    for p in ps:
        st = opt.state[p]
        assert float(st["step"]) == 0 and not st["exp_avg"].any() and not st["exp_avg_sq"].any()
        assert torch.isfinite(p).all()
    ref, _ = _run(grads[1:], flag=True)
    out, _ = _run(grads, flag=True, skip_at={0})
    for a, b in zip(ref, out):
        assert torch.equal(a.detach(), b.detach())


def test_host_step_counts_of_old_checkpoints_continue_under_a_flag():
    """A state restored with host float32 step tensors (what checkpoints hold) continues bitwise, flag or not."""
    grads = _grads(4)
    ref, _ = _run(grads)
    ps, opt = _run(grads[:2])
    for p in ps:
        opt.state[p]["step"] = torch.tensor(float(opt.state[p]["step"]), dtype=torch.float32)  # as loaded
    for grs in grads[2:]:
        for p, gr in zip(ps, grs):
            p.grad = gr.clone()
        opt.step(found_inf=torch.zeros(()))
    for a, b in zip(ref, ps):
        assert torch.equal(a.detach(), b.detach())
    assert all(opt.state[p]["step"].dtype == torch.float32 and float(opt.state[p]["step"]) == 4 for p in ps)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_skip_is_exact_on_the_device_and_a_zero_flag_keeps_the_update():
    grads = _grads(5, bad={2})
    ref, _ = _run(grads[:2] + grads[3:], flag=True, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # the flagged update must not wait for the device
    try:
        out, opt = _run(grads, flag=True, skip_at={2}, device="cuda")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for a, b in zip(ref, out):
        assert torch.equal(a.detach(), b.detach())
    assert all(opt.state[p]["step"].is_cuda and float(opt.state[p]["step"]) == 4 for p in out)
    plain, _ = _run(grads[:2] + grads[3:], device="cuda")  # host step counts, as before the flag
    for a, b in zip(plain, ref):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)
