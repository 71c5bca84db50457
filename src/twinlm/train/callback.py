"""The hooks a trainer calls; subclass `Callback` and override any of them (train/callbacks.py has the built-in ones).

Callbacks see the trainer's public surface only: `recipe`, `env`, `state` (a TrainState they may update, e.g.
the ordinals of periodic work), `phases`, `model`/`bare_model`, `step` (the TrainStep: `eval_loss`),
`save_checkpoint()` and `log()`. `row` is the metrics dict of one optimizer step; callbacks may add keys.

A step's hooks (`on_step_end`, `on_log`, and any checkpoint they make) run once the next step's passes are
queued on the device, before its update: the weights, the optimizer state and `state` are those of the step
the row describes; `on_batch` for the next step follows them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from twinlm.train.recipe import Phase
    from twinlm.train.trainer import Trainer


class Callback:
    """Hooks; every method is optional."""

    def on_train_start(self, trainer: Trainer) -> None: ...
    def on_phase_start(self, trainer: Trainer, phase: Phase) -> None: ...
    def on_batch(self, trainer: Trainer, samples: list) -> None: ...
    def on_step_end(self, trainer: Trainer, row: dict) -> None: ...
    def on_log(self, trainer: Trainer, row: dict) -> None: ...
    def on_before_checkpoint(self, trainer: Trainer) -> None: ...  # a checkpoint of trainer.state is next
    def on_checkpoint(self, trainer: Trainer, path: Path) -> None: ...
    def on_phase_end(self, trainer: Trainer, phase: Phase) -> None: ...
    def on_train_end(self, trainer: Trainer) -> None: ...
