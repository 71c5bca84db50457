"""The hooks a trainer calls; subclass `Callback` and override any of them (train/callbacks.py has the built-in ones).

Callbacks see the trainer's public surface only, `TrainerView`: `recipe`, `env`, `state` (the TrainState),
`phases`, `model`/`bare_model`, `step` (the TrainStep: `eval_loss`), `save_checkpoint()`, `saved_step`,
`request_checkpoint()` and `checkpoint_due` (a checkpoint agreed by every rank: asked with a step, read when it
finishes), `now()` (the clock the trainer reads) and `log()`. `row` is
the metrics dict of one optimizer step; callbacks may add keys.

A callback with state of its own (a counter of periodic work, …) returns it from `state_dict` (JSON values) and
takes it back in `load_state_dict`: every checkpoint saves it in state.json under "callbacks" by the callback's
`state_key` (the class name unless set), and a resume hands it back before `on_train_start`. A callback whose
`state_dict` is empty saves nothing.

A step's hooks (`on_step_end`, `on_log`, and any checkpoint they make) run once the next step's passes are
queued on the device, before its update: the weights, the optimizer state and `state` are those of the step
the row describes; `on_batch` for the next step follows them.

`on_train_end` runs once a run has finished (final/ written); `on_exit` whenever `fit` ends, a stop for a resume
(max_steps, SIGTERM, a deadline) or an error included: the place to close writers (TensorBoard, W&B).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from twinlm.train.dist import DistEnv
    from twinlm.train.recipe import Phase, Recipe
    from twinlm.train.state import TrainState
    from twinlm.train.step import TrainStep


class TrainerView(Protocol):
    """What a callback may use of the trainer (train/trainer.py `Trainer` provides it)."""

    recipe: Recipe
    state: TrainState

    @property
    def env(self) -> DistEnv: ...
    @property
    def phases(self) -> list[Phase]: ...
    @property
    def model(self) -> torch.nn.Module: ...
    @property
    def bare_model(self) -> torch.nn.Module: ...
    @property
    def step(self) -> TrainStep: ...
    @property
    def saved_step(self) -> int: ...
    checkpoint_due: bool
    def save_checkpoint(self, keep: bool = False) -> Path | None: ...
    def request_checkpoint(self) -> None: ...
    def now(self) -> float: ...
    def log(self, msg: str) -> None: ...


class Callback:
    """Hooks; every method is optional."""

    state_key: str | None = None  # the name of its state in a checkpoint; None: the class name

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def on_train_start(self, trainer: TrainerView) -> None: ...
    def on_phase_start(self, trainer: TrainerView, phase: Phase) -> None: ...
    def on_batch(self, trainer: TrainerView, samples: list) -> None: ...
    def on_step_end(self, trainer: TrainerView, row: dict) -> None: ...
    def on_log(self, trainer: TrainerView, row: dict) -> None: ...
    def on_before_checkpoint(self, trainer: TrainerView) -> None: ...  # a checkpoint of trainer.state is next
    def on_checkpoint(self, trainer: TrainerView, path: Path) -> None: ...
    def on_phase_end(self, trainer: TrainerView, phase: Phase) -> None: ...
    def on_train_end(self, trainer: TrainerView) -> None: ...  # the run finished (final/ written)
    def on_exit(self, trainer: TrainerView) -> None: ...  # `fit` returns or raises, finished or stopped for a resume


def keyed(callbacks: list[Callback]) -> list[tuple[str, Callback]]:
    """Each callback with the key of its state: its `state_key` (or class name), `.2`, `.3`… for repeats."""
    seen: dict[str, int] = {}
    out = []
    for cb in callbacks:
        base = cb.state_key or type(cb).__name__
        seen[base] = seen.get(base, 0) + 1
        out.append((base if seen[base] == 1 else f"{base}.{seen[base]}", cb))
    return out
