"""Custom autograd operations of the model: fused RoPE on the attention input, GeGLU, and the chunked
prediction head + cross-entropy. Each computes exactly what its eager formula says; they exist to save memory
and passes over memory, and each is tested against that formula (tests/test_ops.py).

- `qkv_rope(qkv, freqs)`: qkv (N, 3, H, Dh), the fused Wqkv output, and freqs (N, 1, Dh/2) complex rotations
  (`twinlm.model.rope_freqs`) -> (rotate(q), rotate(k), v), three contiguous (N, H, Dh) tensors in qkv's
  dtype. q and k hold each head's dims as interleaved pairs (see twinlm.model), so rotating is one complex
  multiplication per pair, computed in fp32. The backward writes the q, k and v gradients into one
  (N, 3, H, Dh) tensor instead of adding up three zero-filled slice gradients.
- `geglu(x)`: gelu(u) * g for [u | g] = x (N, 2I) -> (N, I); the backward writes both halves into one
  (N, 2I) gradient.
- `fused_linear_cross_entropy(h, weight, bias, targets)`: the mean over targets != IGNORE_INDEX of
  CE(h @ weight.T + bias, targets), i.e. F.cross_entropy(F.linear(h, weight, bias), targets) up to rounding,
  computed in chunks of rows with the gradients taken during the forward pass, so neither the (n, V) logits
  nor their gradient ever exist in full. Under autocast the matmuls run in the autocast dtype and the
  softmax and sums in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------------
# rotary embeddings on the fused attention input
def _rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x (..., head_dim) interleaved pairs, any float dtype -> rotated, fp32, contiguous."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * freqs).flatten(-2)


class _QKVRope(torch.autograd.Function):
    """(N, 3, H, Dh) fused projection output -> rotated q, rotated k, v: three contiguous (N, H, Dh) tensors.

    One autograd node: the backward rotates the q/k gradients back and writes q, k and v gradients straight into
    one (N, 3, H, Dh) tensor (no zero-filled slice gradients to add up).
    """

    @staticmethod
    def forward(ctx, qkv, freqs):
        ctx.save_for_backward(freqs)
        return (_rotate(qkv[:, 0], freqs).to(qkv.dtype), _rotate(qkv[:, 1], freqs).to(qkv.dtype),
                qkv[:, 2].contiguous())

    @staticmethod
    def backward(ctx, g_q, g_k, g_v):
        (freqs,) = ctx.saved_tensors
        n, h, dh = g_v.shape
        grad = torch.empty(n, 3, h, dh, dtype=g_v.dtype, device=g_v.device)
        conj = freqs.conj()
        for i, g in ((0, g_q), (1, g_k)):
            if grad.dtype == torch.float32:  # rotate straight into the gradient's slice
                torch.mul(torch.view_as_complex(g.unflatten(-1, (-1, 2))), conj,
                          out=torch.view_as_complex(grad[:, i].unflatten(-1, (-1, 2))))
            else:
                grad[:, i] = _rotate(g, conj)
        grad[:, 2] = g_v
        return grad, None


def qkv_rope(qkv: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, 3, H, Dh) fused q/k/v and (N, 1, Dh/2) complex rotations -> rotated q, rotated k, v (N, H, Dh)."""
    return _QKVRope.apply(qkv, freqs)


# --------------------------------------------------------------------------------------------------
# GeGLU
class _GeGLU(torch.autograd.Function):
    """gelu(u) * g for [u | g] = x (N, 2I); the backward writes both halves into one (N, 2I) gradient."""

    @staticmethod
    def forward(ctx, x):
        u, g = x.chunk(2, dim=-1)
        a = F.gelu(u)
        ctx.save_for_backward(x, a)
        return a * g

    @staticmethod
    def backward(ctx, grad):
        x, a = ctx.saved_tensors
        u, g = x.chunk(2, dim=-1)
        out = torch.empty_like(x)
        inter = u.shape[-1]
        torch.ops.aten.gelu_backward.grad_input(grad * g, u, grad_input=out[..., :inter])
        torch.mul(grad, a, out=out[..., inter:])
        return out


def geglu(x: torch.Tensor) -> torch.Tensor:
    """gelu(u) * g for [u | g] = x (..., 2I) -> (..., I)."""
    return _GeGLU.apply(x)


# --------------------------------------------------------------------------------------------------
# fused head + cross-entropy
def _ce_chunk_rows(vocab: int, device_type: str = "cpu") -> int:
    budget = (1 << 25) if device_type == "cpu" else (1 << 27)  # fp32 logits per chunk: 128 MB CPU, 512 MB GPU
    return max(64, min(8192, budget // max(vocab, 1)))


class _FusedLinearCE(torch.autograd.Function):
    """Chunked head + cross-entropy whose gradients are computed in the forward pass.

    Per chunk of rows the only passes over the (rows, V) matrix are: the logits matmul, one (in-place) softmax,
    and the two gradient matmuls. The one-hot part of the gradient, the bias gradient and the 1/count scaling
    are applied on the small sides: with g = softmax - onehot (the one-hot subtracted in place, one element per
    row) and c = valid / count per row, grad_h = c * (g @ W), grad_W = g^T @ (c * h), grad_b = g^T @ c.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, ignore_index, chunk):
        n, d = h.shape
        valid = targets != ignore_index
        count = int(valid.sum())
        needs_grad = any(ctx.needs_input_grad[:3])
        device_type = h.device.type
        cast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype
        w = weight.to(cast)
        b = bias.to(cast)
        inv = 1.0 / max(count, 1)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        acc = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if needs_grad else None
        acc_b = torch.zeros(bias.shape, dtype=torch.float32, device=h.device) if needs_grad else None
        grad_h = torch.empty(n, d, dtype=h.dtype, device=h.device) if needs_grad else None
        buf = None
        with torch.autocast(device_type, enabled=False):
            for s in range(0, n, chunk):
                e = min(n, s + chunk)
                hc = h[s:e].to(cast)
                tc = targets[s:e]
                vc = valid[s:e]
                safe_t = torch.where(vc, tc, torch.zeros_like(tc))
                if cast == torch.float32 and not h.is_cuda:
                    if buf is None or buf.shape[0] < e - s:
                        buf = torch.empty(e - s, weight.shape[0], dtype=torch.float32, device=h.device)
                    logits = torch.addmm(b, hc, w.t(), out=buf[: e - s])
                    p = torch.ops.aten._softmax.out(logits, -1, False, out=logits)  # in place, one pass
                    pt = p.gather(1, safe_t[:, None])[:, 0]
                    nll = -torch.log(pt)
                    if bool(torch.isinf(nll).any()):  # p underflowed to 0: recompute those rows exactly
                        rows = torch.isinf(nll).nonzero()[:, 0]
                        lg = torch.addmm(b, hc[rows], w.t()).float()
                        nll[rows] = torch.logsumexp(lg, -1) - lg.gather(1, safe_t[rows, None])[:, 0]
                else:  # accelerators: memory passes are cheap, host syncs are not
                    logits = torch.addmm(b, hc, w.t()).float()
                    lse = torch.logsumexp(logits, dim=-1)
                    nll = lse - logits.gather(1, safe_t[:, None])[:, 0]
                    p = logits.sub_(lse[:, None]).exp_()
                total += (nll * vc).sum()
                if needs_grad:
                    c = vc.to(torch.float32) * inv  # (rows,)
                    p = p.scatter_add_(1, safe_t[:, None], torch.full_like(safe_t[:, None], -1, dtype=p.dtype))
                    pc = p.to(cast)
                    grad_h[s:e] = ((pc @ w).float() * c[:, None]).to(h.dtype)
                    hs = (hc.float() * c[:, None]).to(cast)
                    if cast == torch.float32:
                        acc.addmm_(pc.t(), hs)
                        acc_b.addmv_(pc.t(), c)
                    else:
                        acc += (pc.t() @ hs).float()
                        acc_b += (pc.t() @ c.to(cast)).float()
        if needs_grad:
            ctx.save_for_backward(grad_h, acc.to(weight.dtype), acc_b.to(bias.dtype))
        return total * inv

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        if not grad_out.is_cuda and float(grad_out) == 1.0:  # the usual loss.backward(): skip three copies
            return grad_h, grad_w, grad_b, None, None, None
        return grad_h * grad_out, grad_w * grad_out, grad_b * grad_out, None, None, None


def fused_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor,
                               ignore_index: int = IGNORE_INDEX, chunk_rows: int | None = None) -> torch.Tensor:
    """mean over targets != ignore_index of CE(h @ weight.T + bias, targets), computed in row chunks.

    The gradients are computed during the forward pass chunk by chunk, so neither the (n, V) logits nor their
    gradient ever exist in full. Equal to F.cross_entropy(F.linear(h, weight, bias), targets) up to rounding.
    """
    if h.dim() != 2 or targets.shape != h.shape[:1]:
        raise ValueError(f"fused_linear_cross_entropy expects h (n, d) and targets (n,); got {tuple(h.shape)}, "
                         f"{tuple(targets.shape)}")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))
    if bool(bad.any()):
        raise ValueError(f"label {int(targets[bad][0])} is out of range for a vocabulary of {weight.shape[0]}")
    chunk = chunk_rows or _ce_chunk_rows(weight.shape[0], h.device.type)
    return _FusedLinearCE.apply(h, weight, bias, targets, ignore_index, chunk)


__all__ = ["qkv_rope", "geglu", "fused_linear_cross_entropy", "IGNORE_INDEX"]
