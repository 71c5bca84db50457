"""Learning-rate and batch-size schedules, as pure functions of the tokens consumed in a phase.

Phases are measured in tokens (the paper's unit), so a schedule does not change when the batch size does.
LR values are multipliers of the recipe's peak LR (`optim.lr`).

Within a phase of T tokens, at t tokens consumed *after* the current step (so the first step of a warmup
gets a small positive LR and the last step of a decay ends exactly at its floor):

- warmup: linear from 0 to `start` over `warmup_tokens`;
- then `start` until the decay window, the last `decay_tokens` of the phase (default: everything after the
  warmup);
- decay `one_minus_sqrt`: lr = end + (start − end)·(1 − sqrt(x)), x the fraction of the window done
  (REFERENCE §2: α_f + (1 − α_f)(1 − sqrt(…)) relative to the phase's start LR, α_f = end/start);
- decay `linear`: lr = end + (start − end)·(1 − x);
- decay `constant`: `start` throughout (the pre-training phase: warmup then constant).

Batch-size warmup: the global batch (in sequences) grows linearly with the tokens consumed, from `start` to
`full` over `warmup_tokens`, rounded down to a multiple of `multiple` (never below `start`).
"""

from __future__ import annotations

import math

DECAYS = ("constant", "one_minus_sqrt", "linear")


def lr_multiplier(tokens: float, phase_tokens: float, *, warmup_tokens: float = 0, start: float = 1.0,
                  end: float = 1.0, decay: str = "constant", decay_tokens: float | None = None) -> float:
    if decay not in DECAYS:
        raise ValueError(f"unknown decay {decay!r}; choose one of {DECAYS}")
    t = max(0.0, float(tokens))
    if warmup_tokens > 0 and t < warmup_tokens:
        return start * t / warmup_tokens
    if decay == "constant":
        return start
    window = float(decay_tokens) if decay_tokens else float(phase_tokens) - warmup_tokens
    if window <= 0:
        return end
    begin = float(phase_tokens) - window
    if t <= begin:
        return start
    x = min(1.0, (t - begin) / window)
    if decay == "one_minus_sqrt":
        return end + (start - end) * (1.0 - math.sqrt(x))
    return end + (start - end) * (1.0 - x)


def batch_size(tokens: float, *, full: int, start: int, warmup_tokens: float = 0, multiple: int = 1) -> int:
    """Global batch size in sequences after `tokens` tokens of the phase."""
    if warmup_tokens <= 0 or tokens >= warmup_tokens or start >= full:
        return full
    size = start + (full - start) * max(0.0, tokens) / warmup_tokens
    multiple = max(1, multiple)
    size = int(size // multiple) * multiple
    return int(min(full, max(start, size)))
