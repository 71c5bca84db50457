"""StableAdamW (Wortsman et al. 2023, "Stable and low-precision training for large-scale vision-language
models"), the optimizer of ModernBERT and Ettin, with fully decoupled weight decay.

For each parameter tensor p with gradient g at step t (β1, β2, ε from the group, η_t the scheduled LR,
η_peak the group's `peak_lr`, λ its weight decay):

    m_t = β1·m + (1−β1)·g              v_t = β2·v + (1−β2)·g²
    m̂ = m_t / (1−β1^t)                 v̂ = v_t / (1−β2^t)
    rms = sqrt(mean(g² / max(v̂, ε²)))                      (one number per tensor)
    η = η_t / max(1, rms)                                   (the per-tensor update clipping)
    p ← p − (η / η_peak)·λ·p                                (fully decoupled: λ is not scaled by η_peak)
    p ← p − η·m̂ / (sqrt(v̂) + ε)

The clipping replaces gradient-norm clipping: no `clip_grad_norm_` is used with this optimizer.
Weight decay is "fully decoupled" from the learning rate: a decay of 1e-5 removes 1e-5 of the weight per
step at the peak LR, less while the schedule is below peak. `param_groups()` puts norms and biases (every
tensor with fewer than two dimensions) in a group without decay.

The update is a fixed sequence of multi-tensor (`torch._foreach_*`) operations per parameter group (per
device and dtype within it), whatever the number of tensors, plus one `sum` per tensor for the clipping
statistic and, with a skip flag, one `where` per tensor that zeroes the gradient (below): with a flag 2 ops
per tensor and about 50 per group, without one 1 per tensor (plus the host count's read) and 26 per group,
where the per-tensor loop this replaced issued 11 per tensor (at 150M with a flag: 1,517 aten ops per step,
now 376). Eager, every operation still reads and writes whole tensors: 144 bytes per parameter with a flag
(168 before), 136 without (136 before), counted as the aten ops' reads and writes. Per element it performs
the operations of the per-tensor form above in the same order (lerp; ×β2 then addcmul; ÷(1−β2^t);
g·g ÷ max(v̂, ε²), summed; √v̂ + ε; p·(1 − η·λ/η_peak); m̂ ÷ (√v̂ + ε) · η subtracted), so on the CPU its
result is bitwise that of the earlier implementation (tests/test_train_optim.py keeps a copy of it). The
per-tensor numbers (bias corrections, RMS, η, the decay factor) are computed as vectors over the group's
tensors and handed to the foreach ops as lists of 0-d tensors. The RMS statistic is `sum` per tensor, not
one `torch._foreach_norm`: on the CPU that kernel sums sequentially, so it differs from `mean` in the last
bits (and is the less accurate of the two: 1.6e-4 relative at 1.7M elements), which would change the
clipped steps.

The learning rate reaches the math as a 0-d float64 tensor on the parameters' device, refilled from
`group["lr"]` each step (a fill, not a copy from the host), so a schedule neither reads the device nor, with
`compile=True`, recompiles the update. `compile=True` (or a backend name, e.g. "aot_eager") runs each
group's update through `torch.compile(fullgraph=True, dynamic=False)`: one graph per group, reused at every
step and learning rate, of the same math written as two passes per tensor (`_two_pass_update`), which inductor
fuses into two kernels per tensor moving 36 bytes per fp32 parameter (it does not promise bitwise equality
with the eager update: it may reassociate the sums and fuse a multiply and an add; a skipped step stays
exact). On CUDA the eager foreach ops that take per-tensor 0-d lists (η, the decay factor, the bias
corrections) fall back to one kernel per tensor; the compiled update is the accelerator's fast form.

On FSDP2 DTensors the update runs on the local shards and the per-tensor sums of g²/max(v̂, ε²) come from
one all-reduce per group of the local sums (not one collective per tensor); such groups run eager.
No host synchronisation: the clipping factor stays a device tensor.

Skipping on the device: `step(found_inf=flag)` takes a 0-d tensor (as torch's fused Adam does); where it is
nonzero the update is exactly a no-op (parameters, exp_avg, exp_avg_sq and the step count keep their bits),
decided on the device with no host read. The flag is the caller's (train/step.py: the global loss is not
finite). How: the gradient is replaced by zeros with a select (`where`, so NaN/Inf never reach the
arithmetic), and the per-tensor factors are selected so that each operation is an identity, signs of zeros
included: lerp weight −0.0 (m + (−0)·(0 − m) = m, even for m = −0), β2 → 1 (v·1 + 0 = v; v is never −0),
decay factor 1, η 0, and the update gets z added, z = −0.0 when the step is kept (x + (−0) = x for every x)
and +0.0 when skipped (±0 + (+0) = +0, and p − (+0) = p, even for p = −0). The bias corrections of a skipped
first step (t = 0, 1 − β^0 = 0) use t = 1 so that the discarded update stays finite.

The step count t is `state["step"]`, a 0-d float32 tensor (checkpoints save it as such). Without a flag and
with the count on the host (a fresh state, or one restored from a checkpoint) the bias corrections are
host floats, as they always were. With a flag (or compiled) the count moves to the parameters' device
(once), is advanced there by 1 − skip, and the corrections 1 − β^t are computed there in float64 (each one as
a 0-d tensor, by the scalar `pow` of `torch._foreach_pow`). On the CPU these are the host's numbers, so a
zero flag gives bitwise the update without one (tests/test_train_optim.py); on CUDA the device's pow may
differ from the host's in the last bit of a double.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


class StableAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-6,
                 weight_decay: float = 0.0, peak_lr: float | None = None, *, compile: bool | str | Callable = False):
        """`compile`: False (eager foreach ops), True (`torch.compile` with inductor) or a backend (a name or a
        callable, as `torch.compile` takes it); a group whose parameters are FSDP2 shards always runs eager."""
        if lr < 0 or eps <= 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or weight_decay < 0:
            raise ValueError(f"invalid StableAdamW settings: lr={lr} betas={betas} eps={eps} wd={weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        peak_lr=lr if peak_lr is None else peak_lr)
        super().__init__(params, defaults)
        self._compile = compile
        self._compiled: Callable[..., None] | None = None
        self._graphs: set[tuple] = set()  # the compiled update's graphs (keys), for dynamo's recompile limit
        self._lr_tensors: dict[torch.device, torch.Tensor] = {}  # the 0-d learning rate, per device

    def __setstate__(self, state: dict) -> None:
        """An unpickled copy (torch's Optimizer pickles defaults, state and groups only) runs eager."""
        super().__setstate__(state)
        self.__dict__.setdefault("_compile", False)
        self.__dict__.setdefault("_compiled", None)
        self.__dict__.setdefault("_graphs", set())
        self.__dict__.setdefault("_lr_tensors", {})

    @torch.no_grad()
    def step(self, closure=None, *, found_inf: torch.Tensor | None = None):
        """One update of every group. `found_inf`: a 0-d tensor; nonzero skips the update exactly (see the
        module docstring), decided on the device."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._group_step(group, found_inf)
        return loss

    def _group_step(self, group: dict, found_inf: torch.Tensor | None = None) -> None:
        """One group's update: its tensors split by device and dtype (the per-tensor numbers are vectors of
        one dtype), each part with foreach kernels and one collective for its clipping statistics."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("StableAdamW does not support sparse gradients")
            state = self.state[p]
            if not state:
                # a fresh count lives where it will be advanced: the device when it is advanced there
                on_device = found_inf is not None or bool(self._compile)
                where = _local(p).device if on_device else "cpu"
                state["step"] = torch.zeros((), dtype=torch.float32, device=where)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        parts: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for p in params:
            m = _local(self.state[p]["exp_avg"])
            parts.setdefault((m.device, m.dtype), []).append(p)
        for part in parts.values():
            self._part_step(group, part, found_inf)

    def _part_step(self, group: dict, params: list[torch.Tensor], found_inf: torch.Tensor | None) -> None:
        """The update of `params` (one device and dtype of `group`): the counts where they live, the
        learning rate as a 0-d tensor, then `_update`, eager or compiled."""
        beta1, beta2 = group["betas"]
        states = [self.state[p] for p in params]
        ms = [_local(st["exp_avg"]) for st in states]
        vs = [_local(st["exp_avg_sq"]) for st in states]
        gs = [_local(cast("torch.Tensor", p.grad)) for p in params]  # params without one were left out
        gs = [g.float() if g.dtype != m.dtype else g for g, m in zip(gs, ms)]
        ps = [_local(p) for p in params]
        device = ps[0].device
        skip = None if found_inf is None else found_inf.to(device, non_blocking=True).ne(0)
        sharded = [i for i, p in enumerate(params) if hasattr(p, "device_mesh")]
        compiled = bool(self._compile) and not sharded
        host_bc: tuple[list[float], list[float]] | None = None
        if skip is None and not compiled and all(st["step"].device.type == "cpu" for st in states):
            steps = [st["step"] for st in states]
            torch._foreach_add_(steps, 1)
            ts = [float(t) for t in steps]  # host tensors: no device sync
            host_bc = ([1 - beta1 ** t for t in ts], [1 - beta2 ** t for t in ts])
        else:
            for st, p in zip(states, ps):
                if st["step"].device != p.device:  # restored from a checkpoint on the host: moved once
                    st["step"] = st["step"].to(p.device, non_blocking=True)
            steps = [st["step"] for st in states]
        lr = self._lr_tensor(device, group["lr"])
        reduce = None
        if sharded:
            mesh = cast("DTensor", params[sharded[0]]).device_mesh
            reduce = _sum_over_shards(sharded, len(params), mesh.get_group())
        kwargs: dict[str, Any] = dict(beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                                      peak_lr=group["peak_lr"], numels=[float(p.numel()) for p in params])
        if compiled:
            if self._compiled is None:
                backend = "inductor" if self._compile is True else cast("str | Callable", self._compile)
                self._compiled = cast("Callable[..., None]",
                                      torch.compile(_two_pass_update, fullgraph=True, dynamic=False,
                                                    backend=backend))
            # one graph per (group, device and dtype, flag or not): dynamo's per-function limit (8) must not
            # turn many groups into an error
            self._graphs.add((id(group), device, ms[0].dtype, skip is None))
            with torch._dynamo.config.patch(recompile_limit=max(8, len(self._graphs))):
                self._compiled(ps, gs, ms, vs, steps, lr, skip, **kwargs)
        else:
            _update(ps, gs, ms, vs, steps, lr, skip, host_bc, reduce, **kwargs)

    def _lr_tensor(self, device: torch.device, lr: float | torch.Tensor) -> torch.Tensor:
        """`lr` as a 0-d float64 tensor on `device`: one buffer, refilled (a fill carries the number in the
        kernel's arguments; nothing is copied from host memory, nothing waits)."""
        t = self._lr_tensors.get(device)
        if t is None:
            t = self._lr_tensors[device] = torch.zeros((), dtype=torch.float64, device=device)
        if isinstance(lr, torch.Tensor):
            t.copy_(lr, non_blocking=True)
        else:
            t.fill_(lr)
        return t


def _update(ps: list[torch.Tensor], gs: list[torch.Tensor], ms: list[torch.Tensor], vs: list[torch.Tensor],
            steps: list[torch.Tensor], lr: torch.Tensor, skip: torch.Tensor | None,
            host_bc: tuple[list[float], list[float]] | None,
            reduce: Callable[[torch.Tensor], None] | None, *, beta1: float, beta2: float, eps: float,
            weight_decay: float, peak_lr: float, numels: list[float]) -> None:
    """One StableAdamW update of tensors of one device and dtype, in place (the module docstring's math and
    order). `steps`: the 0-d counts, advanced here unless `host_bc` holds the bias corrections of counts
    already advanced on the host; `lr`: 0-d; `skip`: a 0-d bool tensor or None; `reduce`: sums a vector of
    the tensors' local sums over the shards, in place (FSDP), or None; `numels`: the tensors' (global) sizes."""
    n = len(ps)
    like = ms[0]
    bc1: Sequence[float | torch.Tensor]
    bc2: Sequence[float | torch.Tensor]
    if host_bc is not None:
        bc1, bc2 = host_bc
    else:
        ts = _advance(steps, skip).unbind()
        bc1, bc2 = _one_minus(torch._foreach_pow(beta1, ts)), _one_minus(torch._foreach_pow(beta2, ts))
    if skip is not None:
        zero, one = torch.zeros((), dtype=like.dtype, device=like.device), torch.ones_like(lr, dtype=like.dtype)
        # zeros where skipped, selected (never multiplied: NaN·0 is NaN); also ours to overwrite below
        gs = [torch.where(skip, zero, g) for g in gs]
        # weight −0, not +0: m + (−0)·(0 − m) is m even for m = −0 (an underflow can leave one there)
        torch._foreach_lerp_(ms, gs, [torch.where(skip, torch.neg(zero), 1 - beta1)] * n)
        torch._foreach_mul_(vs, torch.where(skip, one, beta2))
    else:
        torch._foreach_lerp_(ms, gs, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
    v_hat = torch._foreach_div(vs, bc2)
    ratio: Sequence[torch.Tensor]
    if skip is not None:
        ratio = gs
        torch._foreach_mul_(ratio, ratio)
    else:
        ratio = torch._foreach_mul(gs, gs)
    torch._foreach_div_(ratio, torch._foreach_clamp_min(v_hat, eps * eps))
    # one sum per tensor: `mean`'s kernel and order (a multi-tensor norm would change the clipped steps' bits)
    sums = torch.stack([r.sum() for r in ratio])
    del ratio, gs
    if reduce is not None:
        reduce(sums)
    torch._foreach_div_(sums.unbind(), numels)  # in place through the views: sums holds the means
    eta = sums.sqrt_().clamp_(min=1.0).reciprocal_().mul_(lr)  # η = η_t / max(1, rms), as `lr / rms`
    if weight_decay != 0 and peak_lr > 0:
        shrink = torch.rsub(eta * (weight_decay / peak_lr), 1)
        if skip is not None:
            shrink = torch.where(skip, 1.0, shrink)  # p·1 keeps every bit of p
        torch._foreach_mul_(ps, shrink.unbind())
    torch._foreach_sqrt_(v_hat)
    torch._foreach_add_(v_hat, eps)
    update = torch._foreach_div(ms, bc1)
    torch._foreach_div_(update, v_hat)
    del v_hat
    if skip is None:
        # not addcmul(p, u, η, value=−1): the CPU kernel fuses it into one rounding (an FMA), not two
        torch._foreach_mul_(update, eta.unbind())
    else:
        eta = torch.where(skip, 0.0, eta)
        # u·η + z in one pass: z = −0 is an identity (u·η + (−0) is u·η, one rounding or two), z = +0 turns
        # the skipped ±0 update into +0
        z = torch.where(skip, zero, -0.0)
        update = torch._foreach_addcmul([z] * n, update, eta.unbind())
    torch._foreach_sub_(ps, update)


def _two_pass_update(ps: list[torch.Tensor], gs: list[torch.Tensor], ms: list[torch.Tensor], vs: list[torch.Tensor],
                     steps: list[torch.Tensor], lr: torch.Tensor, skip: torch.Tensor | None, *, beta1: float,
                     beta2: float, eps: float, weight_decay: float, peak_lr: float, numels: list[float]) -> None:
    """`_update`'s math written for the compiler (`compile=True`; `_update`'s arguments less the host bias
    corrections and the shard reduction: the counts live on the device, the tensors are whole): two passes over
    each tensor, which inductor fuses into two kernels per tensor where the foreach form leaves five or more (a
    per-tensor `sum` does not fuse into a foreach kernel, nor does `_foreach_lerp` with per-tensor weights
    lower).

    Pass 1 reads g and v, writes v_t and reduces Σ g² / max(v̂, ε²); pass 2, once every η is known, reads p, g,
    m and v_t and writes m_t and p: 36 bytes per fp32 parameter (12 + 24) as inductor fuses it, against the
    eager foreach form's 144. The values are the module docstring's; the roundings may differ from the eager
    update's in the last bits (a compiler may fuse a multiply and an add); a skipped step keeps every bit, by
    the same identities as `_update` (g selected to 0, β2 → 1, lerp weight −0, decay factor 1, η 0, +0 added)."""
    t = _advance(steps, skip)
    bc1, bc2 = 1 - torch.pow(beta1, t), 1 - torch.pow(beta2, t)  # (n,) float64
    zero = torch.zeros((), dtype=ms[0].dtype, device=ms[0].device)
    if skip is not None:
        gs = [torch.where(skip, zero, g) for g in gs]  # selected, never multiplied: NaN·0 is NaN
        b2: float | torch.Tensor = torch.where(skip, 1.0, beta2).to(zero.dtype)
        w: float | torch.Tensor = torch.where(skip, torch.neg(zero), 1 - beta1)
    else:
        b2, w = beta2, 1 - beta1
    sums = []
    for g, v, c2 in zip(gs, vs, bc2.unbind()):
        v.mul_(b2).addcmul_(g, g, value=1 - beta2)
        sums.append((g * g / (v / c2).clamp_min(eps * eps)).sum())
    rms = (torch.stack(sums) / torch.tensor(numels, dtype=torch.float64, device=zero.device)).sqrt()
    eta = rms.clamp(min=1.0).reciprocal() * lr
    shrink = torch.ones_like(eta)
    if weight_decay != 0 and peak_lr > 0:
        shrink = 1 - eta * (weight_decay / peak_lr)
    if skip is not None:
        eta, shrink = torch.where(skip, 0.0, eta), torch.where(skip, 1.0, shrink)
    z = zero.neg() if skip is None else torch.where(skip, zero, -0.0)
    for p, g, m, v, c1, c2, e, s in zip(ps, gs, ms, vs, bc1.unbind(), bc2.unbind(), eta.unbind(), shrink.unbind()):
        m.lerp_(g, w)
        update = m / c1 / ((v / c2).sqrt() + eps) * e + z
        p.mul_(s).sub_(update)


def _advance(steps: list[torch.Tensor], skip: torch.Tensor | None) -> torch.Tensor:
    """Advances the 0-d device counts by 1 (by 0 where `skip`) and returns them as a float64 vector, a skipped
    first step's 0 read as 1 (1 − β^0 = 0 would make the discarded update 0/0)."""
    if skip is None:
        torch._foreach_add_(steps, 1)
    else:  # a list of tensors: the one-tensor overload reads its value on the host
        torch._foreach_add_(steps, [(~skip).to(torch.float32)] * len(steps))
    t = torch.stack(steps).double()
    return t if skip is None else t.clamp(min=1)


def _one_minus(xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """1 − x for each 0-d tensor (1 + (−x) is 1 − x exactly), in place."""
    out = list(xs)
    torch._foreach_neg_(out)
    torch._foreach_add_(out, 1)
    return out


def _sum_over_shards(sharded: list[int], n: int, group: Any) -> Callable[[torch.Tensor], None]:
    """The in-place sum over ranks of the entries `sharded` of an (n,) vector of local sums: one all-reduce
    (the other entries, of tensors every rank holds whole, are left as they are)."""
    def reduce(sums: torch.Tensor) -> None:
        if len(sharded) == n:
            torch.distributed.all_reduce(sums, group=group)
            return
        part = torch.stack([sums[i] for i in sharded])
        torch.distributed.all_reduce(part, group=group)
        for j, i in enumerate(sharded):
            sums[i] = part[j]
    return reduce


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local part of an FSDP2 DTensor shard (the math runs on plain tensors, no DTensor dispatch)."""
    return t.to_local() if hasattr(t, "to_local") else t


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices (and embeddings) with weight decay; norms and biases (ndim < 2) without."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, lr: float, betas: Iterable[float], eps: float,
                    weight_decay: float, *, compile: bool | str | Callable = False) -> StableAdamW:
    return StableAdamW(param_groups(model, weight_decay), lr=lr, betas=cast("tuple[float, float]", tuple(betas)),
                       eps=eps, weight_decay=weight_decay, peak_lr=lr, compile=compile)
