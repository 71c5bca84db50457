"""twinlm.ops against the eager formulas they replace: values and gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from twinlm import ops
from twinlm.model import rope_freqs, rope_inv_freq
from twinlm.ops import IGNORE_INDEX, compiled_standalone, fused_linear_cross_entropy, geglu, qkv_rope


def _rope_reference(x, positions, theta):
    """Rotate each interleaved pair (x[2j], x[2j+1]) by the angle pos * theta^(-2j/Dh), written out in reals."""
    dh = x.shape[-1]
    angle = positions.float()[:, None] * rope_inv_freq(dh, theta)[None, :]  # (N, Dh/2)
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
    x0, x1 = x.float()[..., 0::2], x.float()[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).flatten(-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qkv_rope_matches_the_rotation_formula(dtype):
    n, h, dh = 11, 3, 8
    g = torch.Generator().manual_seed(0)
    positions = torch.randint(0, 500, (n,), generator=g)
    qkv = torch.randn(n, 3, h, dh, generator=g).to(dtype).requires_grad_()
    up = [torch.randn(n, h, dh, generator=g).to(dtype) for _ in range(3)]
    q, k, v = qkv_rope(qkv, rope_freqs(positions, rope_inv_freq(dh, 10_000.0))[:, 0])
    assert q.dtype == k.dtype == v.dtype == dtype and q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
    sum((o.float() * u.float()).sum() for o, u in zip((q, k, v), up)).backward()
    grad, qkv.grad = qkv.grad.clone(), None
    ref = (_rope_reference(qkv[:, 0], positions, 10_000.0), _rope_reference(qkv[:, 1], positions, 10_000.0),
           qkv[:, 2].float())
    sum((o * u.float()).sum() for o, u in zip(ref, up)).backward()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for ours, theirs in zip((q, k, v), ref):
        torch.testing.assert_close(ours.float(), theirs, **tol)
    torch.testing.assert_close(grad.float(), qkv.grad.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_geglu_matches_gelu_times_gate(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 2 * 12, generator=g).to(dtype).requires_grad_()
    up = torch.randn(7, 12, generator=g).to(dtype)
    out = geglu(x)
    (out * up).sum().backward()
    grad, x.grad = x.grad.clone(), None
    u, gate = x.chunk(2, dim=-1)
    ref = F.gelu(u) * gate
    (ref * up).sum().backward()
    assert out.shape == (7, 12) and out.dtype == dtype
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad, x.grad)


def test_geglu_compiled_takes_the_plain_form_with_the_same_values_and_gradients():
    x = torch.randn(9, 2 * 16, generator=torch.Generator().manual_seed(1)).requires_grad_()
    up = torch.randn(9, 16, generator=torch.Generator().manual_seed(2))
    eager = geglu(x)
    (eager * up).sum().backward()
    grad, x.grad = x.grad.clone(), None
    compiled = torch.compile(geglu, fullgraph=True, backend="aot_eager")(x)
    (compiled * up).sum().backward()
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, grad, rtol=1e-6, atol=1e-7)


def test_fused_cross_entropy_chunks():
    h = torch.randn(37, 8, requires_grad=True)
    w = torch.randn(50, 8, requires_grad=True)
    b = torch.randn(50, requires_grad=True)
    t = torch.randint(0, 50, (37,))
    t[3] = -100
    loss = fused_linear_cross_entropy(h, w, b, t, chunk_rows=5)
    (2 * loss).backward()
    grads = [x.grad.clone() for x in (h, w, b)]
    for x in (h, w, b):
        x.grad = None
    ref = F.cross_entropy(F.linear(h, w, b), t)
    (2 * ref).backward()
    torch.testing.assert_close(loss, ref)
    for g, x in zip(grads, (h, w, b)):
        torch.testing.assert_close(g, x.grad, atol=1e-5, rtol=1e-5)



@pytest.mark.parametrize("scale", [1.0, 3.0])
@pytest.mark.parametrize("path", ["host", "accelerator", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_cross_entropy_matches_cross_entropy_on_both_paths(monkeypatch, path, dtype, scale):
    """The accelerator's code (no host read; the chunk body eager, or compiled as on CUDA: here with aot_eager)
    and the CPU's (in-place softmax, repair of rows whose target probability underflows) give F.cross_entropy's
    loss and gradients, in fp32 and under bf16 autocast (matmuls in bf16, softmax and sums in fp32; on the CPU
    too this runs the accelerator's branch), for a unit loss gradient (the backward's shortcut) and another one."""

    if path != "host":
        monkeypatch.setattr(ops, "host_reads_are_free", lambda t: False)
    if path == "compiled":
        monkeypatch.setitem(ops._CE_BODY_COMPILED_ON, "cpu", "aot_eager")
    g = torch.Generator().manual_seed(0)
    h = torch.randn(41, 16, generator=g)
    w = torch.randn(300, 16, generator=g) * 2  # wide logits: confident and very wrong rows
    b = torch.randn(300, generator=g)
    t = torch.randint(0, 300, (41,), generator=g)
    t[[4, 9]] = IGNORE_INDEX
    b[t[0]] = -250.0  # row 0's target ~250 nats down: exp underflows to 0 in fp32 (the CPU path's repair)
    h, w, b = (x.requires_grad_() for x in (h, w, b))
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    with amp:
        loss = fused_linear_cross_entropy(h, w, b, t, chunk_rows=16)
    (loss * scale if scale != 1.0 else loss).backward()
    grads = [x.grad.clone() for x in (h, w, b)]
    for x in (h, w, b):
        x.grad = None
    logits = F.linear(h.to(dtype), w.to(dtype), b.to(dtype)).float()
    ref = F.cross_entropy(logits, t)
    (ref * scale).backward()
    assert torch.isfinite(loss) and loss > 250 / 39  # the underflowing row counts in full
    torch.testing.assert_close(loss.float(), ref, atol=1e-4, rtol=1e-5)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for ours, theirs in zip(grads, (h, w, b)):
        torch.testing.assert_close(ours, theirs.grad, **tol)


def test_fused_cross_entropy_names_bad_labels():
    h, w, b = torch.randn(4, 8), torch.randn(50, 8), torch.randn(50)
    with pytest.raises(ValueError, match="label 50 is out of range for a vocabulary of 50"):
        fused_linear_cross_entropy(h, w, b, torch.tensor([1, 50, IGNORE_INDEX, 3]))
    with pytest.raises(ValueError, match=r"expects h \(n, d\) and targets \(n,\)"):
        fused_linear_cross_entropy(h, w, b, torch.tensor([1, 2]))


# --- RoPE: the stack-free rotation, its compiled form and its cost ------------------------------------------
def _old_pair_rotation(x, rope, dtype):
    """The formula qkv_rope used before the stack-free form: each pair (x0, x1) -> (x0·c − x1·s, x0·s + x1·c) in
    fp32, stacked, cast back."""
    x = x.float().unflatten(-1, (-1, 2))
    x0, x1, c, s = x[..., 0], x[..., 1], rope[..., 0], rope[..., 1]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), -1).flatten(-2).to(dtype)


def _rope_case(dtype, n=37, h=3, dh=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(n, 3, h, dh, generator=g) * 3).to(dtype).requires_grad_()
    rope = rope_freqs(torch.randint(0, 8192, (n,), generator=g), rope_inv_freq(dh, 160_000.0))[:, 0]
    up = [torch.randn(n, h, dh, generator=g).to(dtype) for _ in range(3)]
    return qkv, rope, up


def _rope_grads(fn, qkv, rope, up):
    qkv.grad = None
    out = fn(qkv, rope)
    torch.autograd.backward(out, up)
    return [o.detach() for o in out], qkv.grad.clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stack_free_rope_is_bit_identical_to_the_pair_formula(dtype):
    """Values and gradients, eager and in the compiled form (`_qkv_rope_traced`, autograd's backward): the
    same bits as the stacked pair formula; the gradient is the inverse rotation."""
    from twinlm.ops import _qkv_rope_traced

    qkv, rope, up = _rope_case(dtype)
    ref_out = (_old_pair_rotation(qkv[:, 0], rope, dtype), _old_pair_rotation(qkv[:, 1], rope, dtype), qkv[:, 2])
    inv = rope * torch.tensor([1.0, -1.0])
    ref_grad = torch.stack((_old_pair_rotation(up[0], inv, dtype), _old_pair_rotation(up[1], inv, dtype), up[2]), 1)
    for fn in (qkv_rope, _qkv_rope_traced):
        out, grad = _rope_grads(fn, qkv, rope, up)
        for ours, theirs in zip(out, ref_out):
            assert torch.equal(ours, theirs.detach())
        assert torch.equal(grad, ref_grad)


def test_rope_compiles_to_one_graph_equal_to_eager():
    qkv, rope, up = _rope_case(torch.bfloat16)
    out_e, grad_e = _rope_grads(qkv_rope, qkv, rope, up)
    torch._dynamo.reset()
    compiled = torch.compile(qkv_rope, backend="aot_eager", fullgraph=True, dynamic=True)
    out_c, grad_c = _rope_grads(compiled, qkv, rope, up)
    torch._dynamo.reset()
    for a, b in zip(out_c, out_e):
        assert torch.equal(a, b)
    assert torch.equal(grad_c, grad_e)


def _aten_traffic(fn):
    """(aten ops, bytes read + written) of fn() on fake tensors: views and metadata are free."""
    from torch.utils._python_dispatch import TorchDispatchMode

    free = {"view", "_unsafe_view", "slice", "select", "t", "transpose", "unsqueeze", "squeeze", "expand", "detach",
            "alias", "unbind", "split", "as_strided", "empty", "empty_like", "new_empty", "empty_strided", "device",
            "ones_like", "lift_fresh"}

    def size(x):
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        return sum(size(y) for y in x) if isinstance(x, (list, tuple)) else 0

    class Count(TorchDispatchMode):
        ops = 0
        bytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket.__name__ not in free:
                inplace = func.overloadpacket.__name__.endswith("_")
                Count.ops += 1
                Count.bytes += size(list(args)) + size(list((kwargs or {}).values())) + (0 if inplace else size(out))
            return out

    with Count():
        fn()
    return Count.ops, Count.bytes


def test_rope_eager_traffic_budget():
    """Per layer, bf16 at 150M head shapes (12 x 64), fake tensors: forward + backward of the eager (CPU) form in
    at most 30 aten ops and 205·d bytes per token (the stacked form took 40 ops and 211·d). A GPU runs the
    compiled form even in eager code (`test_rope_under_inductor_is_three_kernels`)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    n, h, dh = 256, 12, 64
    with FakeTensorMode():
        qkv = torch.randn(n, 3, h, dh, dtype=torch.bfloat16, requires_grad=True)
        rope = torch.randn(n, 1, dh // 2, 2)
        grads = [torch.randn(n, h, dh, dtype=torch.bfloat16) for _ in range(3)]
        ops_, bytes_ = _aten_traffic(lambda: torch.autograd.backward(qkv_rope(qkv, rope), grads))
    assert ops_ <= 30 and bytes_ / n <= 205 * h * dh, (ops_, bytes_ / n / (h * dh))


def test_rope_under_inductor_is_three_kernels():
    """The compiled form, RoPE feeding an opaque attention op, on inductor's CPU backend: forward and backward
    in 3 kernels (the stacked Function took 7) moving ≤ 20·d bytes per token (bf16, 12 x 64)."""
    import torch._inductor.config as inductor_config

    from twinlm.ops import _qkv_rope_traced

    @torch.library.custom_op("twinlm_test::attn_stand_in", mutates_args=())
    def attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (q + k + v).contiguous()

    attn.register_fake(lambda q, k, v: torch.empty_like(q))
    attn.register_autograd(lambda ctx, g: (g, g, g), setup_context=lambda ctx, inputs, output: None)
    kernels = []

    def record(nodes):
        kernels.extend(int(nd.get_read_write_buffers_sizes()) for nd in nodes
                       if type(nd).__name__ not in ("NopKernelSchedulerNode", "ExternKernelSchedulerNode"))
        return nodes

    n, h, dh = 512, 12, 64
    qkv = torch.randn(n, 3, h, dh, dtype=torch.bfloat16, requires_grad=True)
    rope = rope_freqs(torch.arange(n), rope_inv_freq(dh, 10_000.0))[:, 0]
    torch._dynamo.reset()
    with inductor_config.patch(_post_fusion_custom_pass=record, fx_graph_cache=False):
        fn = torch.compile(lambda a, r: attn(*_qkv_rope_traced(a, r)), fullgraph=True)
        fn(qkv, rope).float().sum().backward()
    torch._dynamo.reset()
    assert len(kernels) <= 3 and sum(kernels) / n <= 20 * h * dh, (len(kernels), sum(kernels) / n / (h * dh))


class _OpNames(TorchDispatchMode):
    """Records the name of every aten op dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _standalone_backward(fn, inputs, grads):
    """`fn` compiled on its own as ops compiles it for eager code on a GPU (inductor's CPU backend here): its
    outputs, the gradient of the first input, and the aten ops dispatched eagerly during the backward."""
    torch._dynamo.reset()
    out = compiled_standalone(fn)(*inputs)
    out = out if isinstance(out, tuple) else (out,)
    seen = _OpNames()
    with seen:
        (grad,) = torch.autograd.grad(out, inputs[0], grads)
    torch._dynamo.reset()
    ops._standalone.pop(fn)
    return out, grad, seen.names


EAGER_AROUND_THE_GRAPH = {"select_backward", "slice_backward", "zeros", "add", "add_", "copy_", "fill_"}


def test_rope_compiled_on_its_own_keeps_its_backward_in_the_graph():
    """Eager code on a GPU runs RoPE compiled on its own (`qkv_rope`): its outputs are no views, so autograd runs
    no eager kernel around the compiled backward (views would be rebuilt outside the graph, their backward a
    zero-filled slice gradient per output and the sums); values and gradients are the eager Function's."""
    from twinlm.ops import _qkv_rope_standalone, _QKVRope

    n, h, dh = 97, 4, 64
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(n, 3, h, dh, generator=g).to(torch.bfloat16).requires_grad_()
    rope = rope_freqs(torch.arange(n), rope_inv_freq(dh, 10_000.0))[:, 0]
    grads = [torch.randn(n, h, dh, generator=g).to(torch.bfloat16) for _ in range(3)]
    out, got, names = _standalone_backward(_qkv_rope_standalone, (qkv, rope), grads)
    assert not any(t._is_view() for t in out)
    assert not EAGER_AROUND_THE_GRAPH & set(names), names
    want_out = _QKVRope.apply(qkv, rope)
    (want,) = torch.autograd.grad(want_out, qkv, grads)
    for a, b in zip(out, want_out):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_geglu_compiled_on_its_own_keeps_its_backward_in_the_graph():
    """Eager code on a GPU runs GeGLU compiled on its own (`geglu`): no eager kernel around its compiled
    backward, values and gradients those of the eager Function (fp32 here; in bf16 a fused kernel may round
    the GELU once less)."""
    from twinlm.ops import _GeGLU, _geglu_standalone

    g = torch.Generator().manual_seed(0)
    x = torch.randn(97, 2 * 48, generator=g).requires_grad_()
    up = torch.randn(97, 48, generator=g)
    (out,), got, names = _standalone_backward(_geglu_standalone, (x,), [up])
    assert not out._is_view()
    assert not EAGER_AROUND_THE_GRAPH & set(names), names
    want_out = _GeGLU.apply(x)
    (want,) = torch.autograd.grad(want_out, x, up)
    torch.testing.assert_close(out, want_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# --- fused CE: the compiled chunk body --------------------------------------------------------------------------
def _ce_case(dtype, n=70, v=500, d=24, seed=3):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * 2
    b = torch.randn(v, generator=g)
    t = torch.randint(0, v, (n,), generator=g)
    t[::7] = IGNORE_INDEX
    b[t[1]] = -300.0  # a target whose probability underflows in fp32
    return h.requires_grad_(), w.requires_grad_(), b.requires_grad_(), t


def _ce_loss_grads(fn, h, w, b, t):
    for x in (h, w, b):
        x.grad = None
    loss = fn(h, w, b, t)
    (loss * 2.5).backward()
    return loss.detach(), [x.grad.clone() for x in (h, w, b)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_chunk_body_matches_the_eager_one_and_the_reference(monkeypatch, dtype):
    """The CUDA body (compiled with inductor, here its CPU backend) against the eager body and against
    F.cross_entropy(F.linear(...)) in fp32: loss and the three gradients, ignore_index and an underflowing row,
    a loss gradient of 2.5, several chunks with a short last one."""

    h, w, b, t = _ce_case(dtype)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def fused(*a):
        with amp:
            return fused_linear_cross_entropy(*a, chunk_rows=32)

    monkeypatch.setattr(ops, "host_reads_are_free", lambda t: False)
    eager = _ce_loss_grads(fused, h, w, b, t)
    monkeypatch.setitem(ops._CE_BODY_COMPILED_ON, "cpu", "inductor")
    torch._dynamo.reset()
    compiled = _ce_loss_grads(fused, h, w, b, t)
    torch._dynamo.reset()
    ref = _ce_loss_grads(lambda *a: F.cross_entropy(F.linear(*(x.to(dtype) for x in a[:3])).float(), a[3]),
                         h, w, b, t)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for ours in (eager, compiled):
        torch.testing.assert_close(ours[0], ref[0], atol=1e-4, rtol=1e-5)
        for a, r in zip(ours[1], ref[1]):
            torch.testing.assert_close(a, r, **tol)
    # the two bodies differ only in rounding order
    torch.testing.assert_close(compiled[0], eager[0], atol=1e-5, rtol=1e-6)
    for a, r in zip(compiled[1], eager[1]):
        torch.testing.assert_close(a, r, atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=1e-3)


def test_compiled_chunk_body_inside_a_compiled_caller(monkeypatch):
    """The op stays one opaque node of a fullgraph compile while its body is itself compiled at run time."""

    monkeypatch.setattr(ops, "host_reads_are_free", lambda t: False)
    monkeypatch.setitem(ops._CE_BODY_COMPILED_ON, "cpu", "aot_eager")
    h, w, b, t = _ce_case(torch.float32)
    eager = _ce_loss_grads(lambda *a: fused_linear_cross_entropy(*a, chunk_rows=32), h, w, b, t)
    torch._dynamo.reset()
    outer = torch.compile(lambda *a: fused_linear_cross_entropy(*a, chunk_rows=32), backend="aot_eager",
                          fullgraph=True)
    compiled = _ce_loss_grads(outer, h, w, b, t)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled[0], eager[0])
    for a, r in zip(compiled[1], eager[1]):
        torch.testing.assert_close(a, r)


def test_compiled_chunk_body_kernels_and_bytes():
    """Inductor (CPU backend) turns the chunk body into at most 4 kernels moving at most 10 bytes per logit
    element with bf16 logits (the eager accelerator code: 11 passes, ~36 bytes, counted on fake tensors)."""
    import torch._inductor.config as inductor_config

    from twinlm.ops import _ce_chunk_body

    kernels = []

    def record(nodes):
        kernels.extend(int(nd.get_read_write_buffers_sizes()) for nd in nodes
                       if type(nd).__name__ not in ("NopKernelSchedulerNode", "ExternKernelSchedulerNode"))
        return nodes

    rows, v = 256, 4096
    logits = torch.randn(rows, v).to(torch.bfloat16)
    target = torch.randint(0, v, (rows,))
    torch._dynamo.reset()
    with inductor_config.patch(_post_fusion_custom_pass=record, fx_graph_cache=False):
        torch.compile(_ce_chunk_body, fullgraph=True)(logits, target, target > 5, torch.tensor(0.01))
    torch._dynamo.reset()
    assert len(kernels) <= 4 and sum(kernels) / (rows * v) <= 10.1, (len(kernels), sum(kernels) / (rows * v))
