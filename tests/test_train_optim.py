"""StableAdamW against a hand computation and a copy of its earlier math; its device-side skip; schedules' numbers."""

import collections
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


def _run(steps_grads, flag=None, skip_at=(), dtype=torch.float32, device="cpu", compile=False):
    """StableAdamW over four tensors in two groups for the given gradients; `flag`: pass found_inf (1 at the
    steps in `skip_at`, else 0)."""
    g = torch.Generator().manual_seed(1)
    shapes = [(7, 5), (5,), (3, 4, 2), (11,)]
    ps = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype).to(device)) for s in shapes]
    opt = StableAdamW([{"params": ps[:2]}, {"params": ps[2:], "weight_decay": 0.0}], lr=1e-2, weight_decay=0.1,
                      peak_lr=2e-2, compile=compile)
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
    for p, gr in zip(ps, grads[2]):
        p.grad = gr.clone()
    with torch.no_grad():  # every bit: negative zeros keep their sign
        ps[1][2] = -0.0
        opt.state[ps[1]]["exp_avg"][3] = -0.0
    before = [p.detach().clone() for p in ps]
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in ps}
    opt.step(found_inf=torch.tensor(1.0))
    for p, b in zip(ps, before):
        assert torch.equal(_bits(p), _bits(b))
        for k, v in opt.state[p].items():
            assert torch.equal(_bits(v), _bits(state[id(p)][k])), k
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


class _EarlierStableAdamW(torch.optim.Optimizer):
    """The update as it was before the multi-tensor rewrite (commit f2d6b51, one process, no shards): the
    per-tensor `where`/`masked_fill` skip and a per-tensor loop for the clip. The rewrite must equal it bitwise
    on the CPU, flag or not, skipped or not."""

    def __init__(self, params, lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0, peak_lr=None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      peak_lr=lr if peak_lr is None else peak_lr))

    @torch.no_grad()
    def step(self, found_inf=None):
        for group in self.param_groups:
            self._group_step(group, found_inf)

    def _group_step(self, group, found_inf):
        beta1, beta2 = group["betas"]
        eps, lr, wd, peak = group["eps"], group["lr"], group["weight_decay"], group["peak_lr"]
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            state = self.state[p]
            if not state:
                where = p.device if found_inf is not None else "cpu"
                state["step"] = torch.zeros((), dtype=torch.float32, device=where)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
        states = [self.state[p] for p in params]
        ms, vs = [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states]
        gs, ps = [p.grad for p in params], [p.detach() for p in params]
        skip = None if found_inf is None else found_inf.ne(0)
        steps = [st["step"] for st in states]
        if skip is None and all(t.device.type == "cpu" for t in steps):
            torch._foreach_add_(steps, 1)
            bc1 = [1 - beta1 ** float(t) for t in steps]
            bc2 = [1 - beta2 ** float(t) for t in steps]
        else:
            if skip is None:
                torch._foreach_add_(steps, 1)
            else:
                torch._foreach_add_(steps, [(~skip).to(torch.float32)] * len(steps))

            def corrections(beta):
                out = torch._foreach_pow(beta, list(torch.stack(steps).double().unbind()))
                torch._foreach_neg_(out)
                torch._foreach_add_(out, 1)
                return out

            bc1, bc2 = corrections(beta1), corrections(beta2)
        if skip is None:
            torch._foreach_lerp_(ms, gs, 1 - beta1)
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
            v_new = vs
        else:
            v_new = torch._foreach_mul(vs, beta2)
            torch._foreach_addcmul_(v_new, gs, gs, value=1 - beta2)
        v_hat = torch._foreach_div(v_new, bc2)
        if skip is not None:
            for s, n in zip(vs, v_new):
                torch.where(skip, s, n, out=s)
        ratio = torch._foreach_div(torch._foreach_mul(gs, gs), torch._foreach_clamp_min(v_hat, eps * eps))
        etas = [lr / torch.clamp(r.mean().sqrt(), min=1.0) for r in ratio]
        if wd != 0 and peak > 0:
            shrink = [1 - eta * (wd / peak) for eta in etas]
            if skip is not None:
                shrink = [torch.where(skip, 1.0, f) for f in shrink]
            torch._foreach_mul_(ps, shrink)
        torch._foreach_sqrt_(v_hat)
        torch._foreach_add_(v_hat, eps)
        if skip is None:
            update = torch._foreach_div(ms, bc1)
        else:
            m_new = torch._foreach_lerp(ms, gs, 1 - beta1)
            update = torch._foreach_div(m_new, bc1)
            for s, n in zip(ms, m_new):
                torch.where(skip, s, n, out=s)
        torch._foreach_div_(update, v_hat)
        torch._foreach_mul_(update, etas)
        if skip is not None:
            for u in update:
                u.masked_fill_(skip, 0.0)
        torch._foreach_sub_(ps, update)


_SHAPES = [(7, 5), (5,), (3, 4, 2), (11,), (300, 70), (1,)]


def _both(cls_kwargs, dtype, lrs, grads, skips, flag, host_counts_at=None):
    """The rewrite and the earlier update side by side over the same gradients; `host_counts_at`: a step after
    which both states' counts are replaced by host float32 tensors (as a checkpoint restores them)."""
    g = torch.Generator().manual_seed(3)
    init = [torch.randn(s, generator=g, dtype=dtype) for s in _SHAPES]
    out = []
    for cls in (StableAdamW, _EarlierStableAdamW):
        ps = [torch.nn.Parameter(x.clone()) for x in init]
        opt = cls([{"params": ps[:3]}, {"params": ps[3:], "weight_decay": 0.0}], **cls_kwargs)
        for i, (lr, grs) in enumerate(zip(lrs, grads)):
            for grp in opt.param_groups:
                grp["lr"] = lr
            for p, gr in zip(ps, grs):
                p.grad = gr.to(dtype=dtype, copy=True)
            opt.step(found_inf=torch.tensor(float(i in skips)) if flag else None)
            if i == host_counts_at:
                for p in ps:
                    opt.state[p]["step"] = torch.tensor(float(opt.state[p]["step"]), dtype=torch.float32)
        out.append((ps, opt))
    return out


def _bits(t):
    return t.detach().view(torch.int64 if t.dtype == torch.float64 else torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["plain", "flag", "skips", "skip_first", "host_counts"])
def test_the_multi_tensor_update_equals_the_earlier_one_bitwise(dtype, case):
    """Parameters and every state tensor, bit for bit (signs of zeros included), over 6 steps with a changing
    LR, a clipping step, weight decay on one group only, and NaN/Inf gradients on the skipped steps."""
    g = torch.Generator().manual_seed(4)
    skips = {"skips": {2, 4}, "skip_first": {0}}.get(case, set())
    grads = []
    for i in range(6):
        grs = [torch.randn(s, generator=g) * (30.0 if i == 1 else 1.0) for s in _SHAPES]
        if i in skips:
            grs[0][0, 0], grs[2][1, 1, 1], grs[4][3, 3] = float("nan"), float("inf"), -float("inf")
        grads.append(grs)
    lrs = [1e-2 * (1 - 0.13 * i) for i in range(6)]
    (ours, o1), (ref, o2) = _both(dict(lr=1e-2, weight_decay=0.1, peak_lr=2e-2), dtype, lrs, grads, skips,
                                  flag=case != "plain", host_counts_at=2 if case == "host_counts" else None)
    for a, b in zip(ours, ref):
        assert torch.equal(_bits(a), _bits(b))
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(_bits(o1.state[a][key]), _bits(o2.state[b][key])), key
        assert torch.equal(o1.state[a]["step"].cpu(), o2.state[b]["step"].cpu())


class _OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace != "prim":  # metadata queries, not kernels
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _ops_per_step(n_tensors, flag):
    ps = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(n_tensors)]
    opt = StableAdamW([{"params": ps[: n_tensors // 2]}, {"params": ps[n_tensors // 2:], "weight_decay": 0.0}],
                      lr=1e-3, weight_decay=0.1)
    for _ in range(2):  # the second step: the state exists
        for p in ps:
            p.grad = torch.randn(4, 3)
        with _OpCount() as count:
            opt.step(found_inf=torch.zeros(()) if flag else None)
    return count.ops


@pytest.mark.parametrize("flag", [False, True])
def test_a_step_costs_a_fixed_number_of_multi_tensor_ops_and_one_sum_per_tensor(flag):
    """The op budget (the per-tensor loop this replaced issued 11 ops per tensor): per tensor one `sum` (the
    clip's statistic), with a skip flag one `where` (the gradient's select), and without one a host read of the
    count (the bias corrections are host floats then); everything else is per group."""
    few, many = _ops_per_step(4, flag), _ops_per_step(40, flag)
    per_tensor = {k: (many[k] - few[k]) / 36 for k in many if many[k] != few[k]}
    expected = {"sum": 1, "where": 1} if flag else {"sum": 1, "_local_scalar_dense": 1}
    assert per_tensor == expected
    fixed = sum(few.values()) - 4 * sum(expected.values())
    assert fixed <= (52 if flag else 28) * 2  # per group; 2 groups


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("flag", [False, True])
def test_the_compiled_update_follows_the_eager_one_and_never_recompiles_for_the_lr(flag, backend):
    """compile= runs each group's update as one graph (through aot_eager: its two-pass form as aten ops; and
    through inductor, its fused kernels built by the CPU backend); 6 steps with a new LR each time, a clipping
    step and (flagged) a skipped step with NaN gradients: close to the eager update, the skip exact, and no
    graph after the first step's."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    skips = {3} if flag else set()
    grads = _grads(6, bad=skips)
    eager, eager_opt = _run([], flag=flag)
    compiled, compiled_opt = _run([], flag=flag, compile=counter)
    frames = []
    for i, grs in enumerate(grads):
        for opt, ps in ((eager_opt, eager), (compiled_opt, compiled)):
            for grp in opt.param_groups:
                grp["lr"] = 1e-2 * (1 - 0.15 * i)
            for p, gr in zip(ps, grs):
                p.grad = gr.clone()
            before = [p.detach().clone() for p in ps]
            opt.step(found_inf=torch.tensor(float(i in skips)) if flag else None)
            if i in skips:
                assert all(torch.equal(p.detach(), b) for p, b in zip(ps, before))
        frames.append(counter.frame_count)
        for a, b in zip(eager, compiled):
            torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-6, atol=1e-7)
    assert frames[0] > 0 and set(frames) == {frames[0]}  # no recompile as the LR (or a skip) changes
    assert all(float(compiled_opt.state[p]["step"]) == 6 - len(skips) for p in compiled)


def test_the_compiled_update_takes_more_groups_than_dynamos_recompile_limit():
    """Twelve parameter groups, each its own graph: more than dynamo's default limit of 8 graphs per function,
    which under fullgraph=True would be an error; the update matches the eager one."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    g = torch.Generator().manual_seed(5)
    shapes = [(3, 2 + i) for i in range(12)]
    start = [torch.randn(s, generator=g) for s in shapes]
    models = [[torch.nn.Parameter(t.clone()) for t in start] for _ in range(2)]
    opts = [StableAdamW([{"params": [p]} for p in ps], lr=1e-2, weight_decay=0.1, compile=c)
            for ps, c in zip(models, (False, counter))]
    frames = []
    for _ in range(2):
        grads = [torch.randn(s, generator=g) for s in shapes]
        for ps, opt in zip(models, opts):
            for p, gr in zip(ps, grads):
                p.grad = gr.clone()
            opt.step(found_inf=torch.tensor(0.0))
        frames.append(counter.frame_count)
    assert frames[0] >= 12 and frames[1] == frames[0]  # a graph per group, none recompiled at the second step
    for a, b in zip(*models):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-6, atol=1e-7)
