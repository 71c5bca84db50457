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

Works on plain tensors and on FSDP2 DTensors (the per-tensor mean is then a global reduction), without
host synchronisation: the clipping factor stays a device tensor.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class StableAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-6,
                 weight_decay: float = 0.0, peak_lr: float | None = None):
        if lr < 0 or eps <= 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or weight_decay < 0:
            raise ValueError(f"invalid StableAdamW settings: lr={lr} betas={betas} eps={eps} wd={weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        peak_lr=lr if peak_lr is None else peak_lr)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            eps, lr, wd, peak = group["eps"], group["lr"], group["weight_decay"], group["peak_lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    raise RuntimeError("StableAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = float(state["step"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                g32 = g.float() if g.dtype != m.dtype else g
                m.lerp_(g32, 1 - beta1)
                v.mul_(beta2).addcmul_(g32, g32, value=1 - beta2)
                bc1 = 1 - beta1 ** t
                bc2 = 1 - beta2 ** t
                v_hat = v / bc2
                rms = (g32 * g32 / v_hat.clamp(min=eps * eps)).mean().sqrt()
                eta = lr / torch.clamp(rms, min=1.0)  # 0-d tensor: no host sync
                if wd != 0 and peak > 0:
                    p.mul_(1 - eta * (wd / peak))
                denom = v_hat.sqrt_().add_(eps)
                update = (m / bc1).div_(denom)
                p.sub_(update * eta)
        return loss


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices (and embeddings) with weight decay; norms and biases (ndim < 2) without."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, lr: float, betas: Iterable[float], eps: float,
                    weight_decay: float) -> StableAdamW:
    return StableAdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps,
                       weight_decay=weight_decay, peak_lr=lr)
