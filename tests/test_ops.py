"""twinlm.ops against the eager formulas they replace: values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from twinlm.model import rope_freqs, rope_inv_freq
from twinlm.ops import IGNORE_INDEX, fused_linear_cross_entropy, geglu, qkv_rope


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
@pytest.mark.parametrize("path", ["host", "accelerator"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_cross_entropy_matches_cross_entropy_on_both_paths(monkeypatch, path, dtype, scale):
    """The accelerator's code (no host read; fp32 log-probabilities) and the CPU's (in-place softmax, repair of
    rows whose target probability underflows) give F.cross_entropy's loss and gradients, in fp32 and under bf16
    autocast (matmuls in bf16, softmax and sums in fp32; on the CPU too this runs the accelerator's branch),
    for a unit loss gradient (the backward's shortcut) and another one."""
    from twinlm import ops

    if path == "accelerator":
        monkeypatch.setattr(ops, "host_reads_are_free", lambda t: False)
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
