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

The update runs with foreach kernels over a group's tensors. On FSDP2 DTensors it runs on the local shards
and the per-tensor means of g²/max(v̂, ε²) come from one all-reduce per group of the local sums (not one
collective per tensor). No host synchronisation: the clipping factor stays a device tensor.

Skipping on the device: `step(found_inf=flag)` takes a 0-d tensor (as torch's fused Adam does); where it is
nonzero the update is exactly a no-op (parameters, exp_avg, exp_avg_sq and the step count keep their bits:
the new values are selected away, never multiplied by 0, so NaN/Inf gradients cannot leak in), decided on the
device with no host read. The flag is the caller's (train/step.py: the global loss is not finite).

The step count t is `state["step"]`, a 0-d float32 tensor (checkpoints save it as such). Without a flag and
with the count on the host (a fresh state, or one restored from a checkpoint) the bias corrections are
host floats, as they always were. With a flag the count moves to the parameters' device (once), is advanced
there by 1 − skip, and the corrections 1 − β^t are computed there in float64 (each one as a 0-d tensor;
the moments and the update go into temporaries and replace the state where the step is kept, so memory
peaks no higher than without a flag). On the CPU these are the host's numbers, so a zero flag gives bitwise
the update without one (tests/test_train_optim.py); on CUDA the device's pow may differ from the host's in
the last bit of a double.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, cast

import torch

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


class StableAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-6,
                 weight_decay: float = 0.0, peak_lr: float | None = None):
        if lr < 0 or eps <= 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or weight_decay < 0:
            raise ValueError(f"invalid StableAdamW settings: lr={lr} betas={betas} eps={eps} wd={weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        peak_lr=lr if peak_lr is None else peak_lr)
        super().__init__(params, defaults)

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
        """One group's update with foreach kernels over its tensors (FSDP2 shards: their local parts), and one
        collective for all of the group's clipping statistics."""
        beta1, beta2 = group["betas"]
        eps, lr, wd, peak = group["eps"], group["lr"], group["weight_decay"], group["peak_lr"]
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("StableAdamW does not support sparse gradients")
            state = self.state[p]
            if not state:
                # a fresh count lives where it will be advanced: the device when a skip flag is in use
                where = _local(p).device if found_inf is not None else "cpu"
                state["step"] = torch.zeros((), dtype=torch.float32, device=where)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        states = [self.state[p] for p in params]
        ms = [_local(st["exp_avg"]) for st in states]
        vs = [_local(st["exp_avg_sq"]) for st in states]
        gs = [_local(p.grad) for p in params]
        gs = [g.float() if g.dtype != m.dtype else g for g, m in zip(gs, ms)]
        ps = [_local(p) for p in params]
        skip = None if found_inf is None else found_inf.to(ps[0].device, non_blocking=True).ne(0)
        if skip is None and all(st["step"].device.type == "cpu" for st in states):
            steps = [st["step"] for st in states]
            torch._foreach_add_(steps, 1)
            ts = [float(t) for t in steps]  # host tensors: no device sync
            bc1: list[float] | tuple[torch.Tensor, ...] = [1 - beta1 ** t for t in ts]
            bc2: list[float] | tuple[torch.Tensor, ...] = [1 - beta2 ** t for t in ts]
        else:
            for st, p in zip(states, ps):
                if st["step"].device != p.device:  # restored from a checkpoint on the host: moved once
                    st["step"] = st["step"].to(p.device, non_blocking=True)
            steps = [st["step"] for st in states]
            if skip is None:
                torch._foreach_add_(steps, 1)
            else:  # a list of tensors: the one-tensor overload reads its value on the host
                keep = (~skip).to(torch.float32)
                torch._foreach_add_(steps, [keep] * len(steps))
            bc1, bc2 = _bias_corrections(steps, beta1), _bias_corrections(steps, beta2)
        if skip is None:
            torch._foreach_lerp_(ms, gs, 1 - beta1)
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
            v_new: list[torch.Tensor] | tuple[torch.Tensor, ...] = vs
        else:  # new moments into temporaries, kept only where the step is not skipped
            v_new = torch._foreach_mul(vs, beta2)
            torch._foreach_addcmul_(v_new, gs, gs, value=1 - beta2)
        v_hat = torch._foreach_div(v_new, bc2)
        if skip is not None:
            _keep_unless(skip, vs, v_new)
            del v_new
        ratio = torch._foreach_div(torch._foreach_mul(gs, gs), torch._foreach_clamp_min(v_hat, eps * eps))
        rms = self._rms(params, ratio)
        del ratio
        etas = [lr / torch.clamp(r, min=1.0) for r in rms]  # 0-d tensors: no host sync
        if wd != 0 and peak > 0:
            shrink = [1 - eta * (wd / peak) for eta in etas]
            if skip is not None:
                shrink = [torch.where(skip, 1.0, f) for f in shrink]  # p·1 keeps every bit of p
            torch._foreach_mul_(ps, shrink)
        torch._foreach_sqrt_(v_hat)
        torch._foreach_add_(v_hat, eps)
        if skip is None:
            update = torch._foreach_div(ms, bc1)
        else:
            m_new = torch._foreach_lerp(ms, gs, 1 - beta1)
            update = torch._foreach_div(m_new, bc1)
            _keep_unless(skip, ms, m_new)
            del m_new
        torch._foreach_div_(update, v_hat)
        torch._foreach_mul_(update, etas)
        if skip is not None:
            for u in update:
                u.masked_fill_(skip, 0.0)  # a select: a NaN update becomes 0, and p - 0 is p
        torch._foreach_sub_(ps, update)

    @staticmethod
    def _rms(params: list[torch.Tensor], ratio: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """sqrt(mean(ratio)) per tensor over the whole (unsharded) tensor: plain tensors take their mean; FSDP2
        shards add up their local sums in one all-reduce for the group (not one per tensor)."""
        sharded = [i for i, p in enumerate(params) if hasattr(p, "device_mesh")]
        out: list[torch.Tensor | None] = [r.mean().sqrt() if not hasattr(p, "device_mesh") else None
                                          for p, r in zip(params, ratio)]
        if sharded:
            sums = torch.stack([ratio[i].sum() for i in sharded])
            mesh = cast("DTensor", params[sharded[0]]).device_mesh
            torch.distributed.all_reduce(sums, group=mesh.get_group())
            for j, i in enumerate(sharded):
                out[i] = (sums[j] / params[i].numel()).sqrt()
        return cast("list[torch.Tensor]", out)  # each None (a shard) was filled in above


def _bias_corrections(steps: list[torch.Tensor], beta: float) -> tuple[torch.Tensor, ...]:
    """1 − β^t for each 0-d step count, in float64 on its device: the value `1 - beta ** t` has on the host."""
    out = torch._foreach_pow(beta, list(torch.stack(steps).double().unbind()))
    torch._foreach_neg_(out)
    torch._foreach_add_(out, 1)  # 1 + (−β^t) is 1 − β^t exactly
    return out


def _keep_unless(skip: torch.Tensor, state: list[torch.Tensor], new: Sequence[torch.Tensor]) -> None:
    """state ← new, except where `skip` (a 0-d bool tensor) is set: then state keeps its bits."""
    for s, n in zip(state, new):
        torch.where(skip, s, n, out=s)


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
                    weight_decay: float) -> StableAdamW:
    return StableAdamW(param_groups(model, weight_decay), lr=lr, betas=cast("tuple[float, float]", tuple(betas)),
                       eps=eps, weight_decay=weight_decay, peak_lr=lr)
