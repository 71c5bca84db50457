"""Custom autograd operations of the model: fused RoPE on the attention input, GeGLU, and the chunked
prediction head + cross-entropy. Each computes exactly what its eager formula says; they exist to save memory
and passes over memory, and each is tested against that formula (tests/test_ops.py).

- `qkv_rope(qkv, rope)`: qkv (N, 3, H, Dh), the fused Wqkv output, and rope (N, 1, Dh/2, 2) real rotations
  [cos, sin] (`twinlm.model.rope_freqs`) -> (rotate(q), rotate(k), v), three (N, H, Dh) tensors in qkv's dtype.
  q and k hold each head's dims as interleaved pairs (x0, x1) (see twinlm.model), rotated pointwise and without
  a stack as x·(c, c) + swap(x)·(−s, s) in fp32, bit for bit the pair formula (x0·c − x1·s, x0·s + x1·c).
  Compiled code uses the plain form with autograd's backward: under inductor one kernel forward, one backward
  writing the (N, 3, H, Dh) gradient, v a view of qkv. Eager code on CUDA calls a copy compiled on its own
  (`compiled_standalone`) that returns fresh q, k and v. Eager code elsewhere uses an autograd.Function
  returning contiguous tensors whose backward writes the three gradients into one (N, 3, H, Dh) tensor
  (autograd's would add three zero-filled slice gradients).
- `geglu(x)`: gelu(u) * g for [u | g] = x (N, 2I) -> (N, I); the backward returns both halves as one
  (N, 2I) gradient. Eager code on CUDA calls the plain form compiled on its own: one kernel each way.
- `fused_linear_cross_entropy(h, weight, bias, targets)`: the mean over targets != IGNORE_INDEX of
  CE(h @ weight.T + bias, targets), i.e. F.cross_entropy(F.linear(h, weight, bias), targets) up to rounding,
  computed in chunks of rows with the gradients taken during the forward pass, so neither the (n, V) logits
  nor their gradient ever exist in full. Under autocast the matmuls run in the autocast dtype and the
  softmax and sums in fp32. Off the CPU's fp32 path each chunk's elementwise work (logsumexp, NLL,
  g = (softmax − onehot)/count in the GEMM dtype, the bias gradient) is one function, compiled on CUDA into ~4
  kernels (~10 bytes per logit element); the weight gradient accumulates in fp32 inside the GEMM there
  (addmm's out_dtype). It is one opaque custom operator (`torch.ops.twinlm.fused_linear_ce`), so a
  compiled training call sees one node whatever the number of targets (no recompile per micro-batch).

No function here reads a device tensor's value on the host (no `.item()`, `bool()`, `int()`): the target
count stays a device tensor. Host reads happen only on plain CPU tensors outside torch.compile
(`host_reads_are_free`), where they cost nothing: the CPU loss path's underflow repair, the label range
check and the backward's unit-gradient shortcut. tests/test_syncs.py runs the training call with those reads
made to raise, as on an accelerator.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------------
# host reads (see above: only where they cost nothing)
def host_reads_are_free(t: torch.Tensor) -> bool:
    """Whether reading `t`'s values on the host costs nothing: a plain CPU tensor, outside torch.compile."""
    return t.device.type == "cpu" and type(t) is torch.Tensor and not torch.compiler.is_compiling()


# --------------------------------------------------------------------------------------------------
# rotary embeddings on the fused attention input
def _rope_factors(rope: torch.Tensor, inverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """[cos, sin] (..., Dh/2, 2) -> the per-pair factors (c (..., Dh/2, 1), (−s, s) (..., Dh/2, 2)) of `_rotate`;
    (s, −s) for the inverse rotation."""
    c, s = rope[..., :1], rope[..., 1:]
    return c, (torch.cat((s, -s), -1) if inverse else torch.cat((-s, s), -1))


def _rotate_f32(x: torch.Tensor, c: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """x (..., Dh) interleaved pairs, any float dtype -> rotated, fp32: y = x·(c, c) + swap(x)·(−s, s) per pair
    (x0, x1), swap(x) = (x1, x0). Bit for bit the pair formula (x0·c − x1·s, x0·s + x1·c), since a − b = a + (−b)
    and the sum commutes; pointwise and stack-free, so inductor fuses upcast, rotation and downcast into the one
    kernel that reads x. A multiply and an add, not addcmul: the CPU's fused multiply-add rounds once and would
    change the bits."""
    xf = x.float().unflatten(-1, (-1, 2))
    return (xf * c + xf.flip(-1) * sign).flatten(-2)


def _rotate(x: torch.Tensor, rope: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """x (..., Dh) rotated by rope [cos, sin] (..., Dh/2, 2) (by minus the angle when `inverse`), in x's dtype."""
    return _rotate_f32(x, *_rope_factors(rope, inverse)).to(x.dtype)


def _qkv_rope_traced(qkv: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The form compiled code uses: plain ops on the packed tensor, the backward derived by autograd. Inside a
    compiled block the forward is one kernel writing q and k, and the backward one kernel writing the (N, 3, H,
    Dh) gradient (the three slice gradients fused, never zero-filled); v goes to attention as a view of qkv."""
    qk = _rotate(qkv[:, :2], rope[:, None])  # (N, 2, H, Dh): q and k in one pass
    return qk[:, 0], qk[:, 1], qkv[:, 2]


def _qkv_rope_standalone(qkv: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The form compiled on its own for eager code on a GPU: q, k and v as tensors of their own. Outputs of a
    compiled function that are views (of its input or of its intermediates) are rebuilt outside its graph, and
    their backward then runs eagerly (a zero-filled (N, 3, H, Dh) slice gradient per output and their sums: ~40
    bf16 q-sizes of traffic per layer); fresh outputs keep the backward one compiled kernel, at the price of
    copying v (2 q-sizes)."""
    q, k, v = _qkv_rope_traced(qkv, rope)
    return q.clone(), k.clone(), v.clone()


class _QKVRope(torch.autograd.Function):
    """Eager form: (N, 3, H, Dh) -> rotated q, rotated k, v, as contiguous (N, H, Dh) tensors.

    A derived backward in eager would add three zero-filled (N, 3, H, Dh) slice gradients; this one writes the
    q, k and v gradients straight into one (N, 3, H, Dh) tensor.
    """

    @staticmethod
    def forward(ctx, qkv, rope):
        ctx.save_for_backward(rope)
        c, sign = _rope_factors(rope)  # once for q and k
        return (_rotate_f32(qkv[:, 0], c, sign).to(qkv.dtype), _rotate_f32(qkv[:, 1], c, sign).to(qkv.dtype),
                qkv[:, 2].contiguous())

    @staticmethod
    def backward(ctx, g_q, g_k, g_v):
        (rope,) = ctx.saved_tensors
        c, sign = _rope_factors(rope, inverse=True)
        grad = torch.empty(g_q.shape[0], 3, *g_q.shape[1:], dtype=g_v.dtype, device=g_v.device)
        grad[:, 0] = _rotate_f32(g_q, c, sign)  # the copy into the slice is the downcast
        grad[:, 1] = _rotate_f32(g_k, c, sign)
        grad[:, 2] = g_v
        return grad, None


_standalone: dict[Callable, Callable] = {}


def compiled_standalone(fn: Callable) -> Callable:
    """`fn` compiled on its own (fullgraph, dynamic shapes), once per process: how eager code on a GPU runs a
    few elementwise ops as one kernel each way (its outputs must be no views: see `_qkv_rope_standalone`)."""
    compiled = _standalone.get(fn)
    if compiled is None:
        compiled = _standalone[fn] = torch.compile(fn, fullgraph=True, dynamic=True)
    return compiled


def qkv_rope(qkv: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, 3, H, Dh) fused q/k/v and (N, 1, Dh/2, 2) [cos, sin] rotations -> rotated q, rotated k, v (N, H, Dh)."""
    if torch.compiler.is_compiling():
        return _qkv_rope_traced(qkv, rope)
    if qkv.is_cuda:  # eager on a GPU: the compiled form, so RoPE is one kernel each way there too
        return compiled_standalone(_qkv_rope_standalone)(qkv, rope)
    return _QKVRope.apply(qkv, rope)


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
        if torch.compiler.is_compiling():  # strided out= writes break the graph; inductor fuses the cat
            return torch.cat((torch.ops.aten.gelu_backward(grad * g, u), grad * a), -1)
        out = torch.empty_like(x)  # eager: both halves written in place, no concatenation pass
        inter = u.shape[-1]
        torch.ops.aten.gelu_backward.grad_input(grad * g, u, grad_input=out[..., :inter])
        torch.mul(grad, a, out=out[..., inter:])
        return out


def _geglu_standalone(x: torch.Tensor) -> torch.Tensor:
    """The plain form, compiled on its own for eager code on a GPU: one kernel forward (bf16 in and out, the
    GELU in fp32 inside), one backward writing the (..., 2I) gradient; only x is saved, the GELU recomputed."""
    u, g = x.chunk(2, dim=-1)
    return F.gelu(u) * g


def geglu(x: torch.Tensor) -> torch.Tensor:
    """gelu(u) * g for [u | g] = x (..., 2I) -> (..., I)."""
    if x.is_cuda and not torch.compiler.is_compiling():
        return compiled_standalone(_geglu_standalone)(x)
    return _GeGLU.apply(x)


# --------------------------------------------------------------------------------------------------
# fused head + cross-entropy
def _ce_chunk_rows(vocab: int, device_type: str = "cpu") -> int:
    budget = (1 << 25) if device_type == "cpu" else (1 << 27)  # fp32 logits per chunk: 128 MB CPU, 512 MB GPU
    return max(64, min(8192, budget // max(vocab, 1)))


def _ce_chunk_body(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
                   coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk's elementwise work, the form written for the compiler: a row reduction, one pointwise pass that
    reads the logits in the GEMM dtype and writes g in it, and g's column sum (no fp32 (rows, V) tensor).

    logits (rows, V); target (rows,) int64, any in-range index where not `valid`; coef 0-d fp32 (1/count)
    -> (sum over valid rows of the NLL, fp32 0-d; g = coef·valid·(softmax − onehot) in logits' dtype; the column
    sum of g, fp32: the bias gradient). The NLL is logsumexp − target logit: exact where softmax underflows.
    """
    lf = logits.float()
    lse = torch.logsumexp(lf, -1, keepdim=True)
    nll = (lse[:, 0] - lf.gather(1, target[:, None])[:, 0]) * valid
    onehot = torch.arange(lf.shape[1], device=lf.device)[None, :] == target[:, None]  # an iota: fused, not stored
    g = (torch.where(onehot, torch.exp(lf - lse) - 1.0, torch.exp(lf - lse)) * (valid * coef)[:, None]).to(logits.dtype)
    # summed from g as the GEMMs see it: one more read of the small-dtype g, no fp32 copy kept for it
    return nll.sum(), g, g.float().sum(0)


def _ce_chunk_body_eager(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
                         coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_ce_chunk_body` as plain eager ops, with as few passes over (rows, V) as eager allows: the fp32 copy,
    log_softmax, an in-place exp, the one-hot subtracted in place (one element per row), the bias gradient as a
    matrix-vector product and the row scaling written straight into the GEMM dtype."""
    lsm = torch.log_softmax(logits.float(), -1)
    nll = -lsm.gather(1, target[:, None])[:, 0] * valid
    p = lsm.exp_().scatter_add_(1, target[:, None], torch.full_like(target[:, None], -1, dtype=lsm.dtype))
    c = valid * coef
    g_sum = p.t() @ c
    g = torch.mul(p, c[:, None], out=torch.empty_like(logits)) if logits.dtype != p.dtype else p.mul_(c[:, None])
    return nll.sum(), g, g_sum


# The chunk body is compiled where passes over memory are the cost (CUDA: 28 -> ~8 bytes per logit element) and
# runs as plain ops elsewhere (on the CPU compiling costs seconds and gains little). Tests compile it on the CPU
# by adding "cpu" here.
_CE_BODY_COMPILED_ON: dict[str, str] = {"cuda": "inductor"}  # device type -> torch.compile backend
_ce_bodies: dict[str, object] = {}


def _ce_body(device_type: str):
    backend = _CE_BODY_COMPILED_ON.get(device_type)
    if backend is None:
        return _ce_chunk_body_eager
    if backend not in _ce_bodies:  # dynamic: the last chunk's row count does not recompile
        _ce_bodies[backend] = torch.compile(_ce_chunk_body, backend=backend, fullgraph=True, dynamic=True)
    return _ce_bodies[backend]


def _fp32_accumulating_mm(device_type: str) -> bool:
    """Whether a bf16 GEMM accumulates into fp32 on `device_type`: CUDA, where aten.addmm has the out_dtype
    overload (torch >= 2.8)."""
    return device_type == "cuda" and hasattr(torch.ops.aten.addmm, "dtype")


def _fused_ce(h, weight, bias, targets, ignore_index: int, chunk: int, cast: torch.dtype, needs_grad: bool):
    """-> (loss, grad_h, grad_weight, grad_bias) for a unit loss gradient (empty (0,) grads without needs_grad).

    Two paths per chunk of rows:
    - plain fp32 CPU tensors (`host_reads_are_free`): the logits matmul into a reused buffer, one in-place
      softmax, the one-hot subtracted in place (one element per row), the two gradient matmuls; the 1/count
      scaling and the bias gradient on the small sides (grad_h = c·(g @ W), grad_W = gᵀ @ (c·h), grad_b = gᵀ @ c
      with c = valid/count per row), rows whose target probability underflows recomputed exactly.
    - otherwise (accelerators, and autocast): the logits in the GEMM dtype, then `_ce_chunk_body` (compiled on
      CUDA) gives the NLL sum, g = c·(softmax − onehot) in the GEMM dtype and the bias gradient in one read of
      the logits; grad_h = g @ W and grad_W += gᵀ @ h, accumulated in fp32 by the GEMM itself where it can
      (addmm's out_dtype on CUDA), so no fp32 copy of the logits or of a (V, d) partial product exists.
    The count stays a device tensor (no host read).
    """
    n, d = h.shape
    valid = targets != ignore_index
    inv = 1.0 / valid.sum().clamp(min=1).to(torch.float32)  # 0-d device tensor
    host = host_reads_are_free(h) and cast == torch.float32
    body = _ce_body(h.device.type)
    fp32_acc = cast in (torch.bfloat16, torch.float16) and _fp32_accumulating_mm(h.device.type)
    w = weight.to(cast)
    b = bias.to(cast)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    acc = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if needs_grad else None
    acc_b = torch.zeros(bias.shape, dtype=torch.float32, device=h.device) if needs_grad else None
    grad_h = torch.empty(n, d, dtype=h.dtype, device=h.device) if needs_grad else None
    buf = None
    with torch.autocast(h.device.type, enabled=False):
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            hc = h[s:e].to(cast)
            tc = targets[s:e]
            vc = valid[s:e]
            safe_t = torch.where(vc, tc, torch.zeros_like(tc))
            if not host:
                nll_sum, g, g_sum = body(torch.addmm(b, hc, w.t()), safe_t, vc, inv)
                total += nll_sum
                if needs_grad:
                    assert grad_h is not None and acc is not None and acc_b is not None  # allocated with needs_grad
                    grad_h[s:e] = g @ w
                    if fp32_acc:
                        acc = torch.addmm(acc, g.t(), hc, out_dtype=torch.float32)
                    elif cast == torch.float32:
                        acc.addmm_(g.t(), hc)
                    else:
                        acc += (g.t() @ hc).float()
                    acc_b += g_sum
                continue
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
            total += (nll * vc).sum()
            if needs_grad:
                assert grad_h is not None and acc is not None and acc_b is not None  # allocated with needs_grad
                c = vc.to(torch.float32) * inv  # (rows,)
                p = p.scatter_add_(1, safe_t[:, None], torch.full_like(safe_t[:, None], -1, dtype=p.dtype))
                grad_h[s:e] = (p @ w) * c[:, None]
                acc.addmm_(p.t(), hc * c[:, None])
                acc_b.addmv_(p.t(), c)
    loss = total * inv
    if not needs_grad:
        empty = h.new_empty(0)
        return loss, empty, empty.clone(), empty.clone()
    assert grad_h is not None and acc is not None and acc_b is not None  # allocated with needs_grad
    return loss, grad_h, acc.to(weight.dtype), acc_b.to(bias.dtype)


@torch.library.custom_op("twinlm::fused_linear_ce", mutates_args=())
def _fused_ce_op(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor,
                 ignore_index: int, chunk: int, cast: torch.dtype,
                 needs_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fused_ce(h, weight, bias, targets, ignore_index, chunk, cast, needs_grad)


@_fused_ce_op.register_fake
def _(h, weight, bias, targets, ignore_index, chunk, cast, needs_grad):
    loss = h.new_empty((), dtype=torch.float32)
    if not needs_grad:
        return loss, h.new_empty(0), h.new_empty(0), h.new_empty(0)
    return loss, torch.empty_like(h), torch.empty_like(weight), torch.empty_like(bias)


def _fused_ce_setup(ctx, inputs, output):
    ctx.save_for_backward(*output[1:])


def _fused_ce_backward(ctx, grad_loss, *_):
    grad_h, grad_w, grad_b = ctx.saved_tensors
    if host_reads_are_free(grad_loss) and float(grad_loss) == 1.0:  # the usual loss.backward(): no copies
        return grad_h, grad_w, grad_b, None, None, None, None, None
    return grad_h * grad_loss, grad_w * grad_loss, grad_b * grad_loss, None, None, None, None, None


_fused_ce_op.register_autograd(_fused_ce_backward, setup_context=_fused_ce_setup)


def fused_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor,
                               ignore_index: int = IGNORE_INDEX, chunk_rows: int | None = None) -> torch.Tensor:
    """mean over targets != ignore_index of CE(h @ weight.T + bias, targets), computed in row chunks.

    The gradients are computed during the forward pass chunk by chunk, so neither the (n, V) logits nor their
    gradient ever exist in full. Equal to F.cross_entropy(F.linear(h, weight, bias), targets) up to rounding.
    Targets are range-checked here when they are on the host (twinlm.model checks its labels there first);
    device targets are not read back.
    """
    if h.dim() != 2 or targets.shape != h.shape[:1]:
        raise ValueError(f"fused_linear_cross_entropy expects h (n, d) and targets (n,); got {tuple(h.shape)}, "
                         f"{tuple(targets.shape)}")
    if host_reads_are_free(targets):
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))
        if bool(bad.any()):
            raise ValueError(f"label {int(targets[bad][0])} is out of range for a vocabulary of {weight.shape[0]}")
    device_type = h.device.type
    cast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype
    needs_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad or bias.requires_grad)
    chunk = chunk_rows or _ce_chunk_rows(weight.shape[0], device_type)
    return _fused_ce_op(h, weight, bias, targets, ignore_index, chunk, cast, needs_grad)[0]


__all__ = ["qkv_rope", "geglu", "fused_linear_cross_entropy", "IGNORE_INDEX"]
