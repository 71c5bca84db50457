"""The trainer's progress record: what a checkpoint's state.json holds under "trainer" and a resume restores.

Callbacks keep their own state (train/callback.py `Callback.state_dict`), saved beside it under "callbacks".
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainState:
    phase_index: int = 0
    phase_step: int = 0
    phase_tokens: int = 0
    step: int = 0  # optimizer steps attempted over the whole run (skipped ones included)
    tokens: int = 0  # tokens consumed over the whole run
    bad_streak: int = 0
    skipped_steps: int = 0
    stream: dict = field(default_factory=dict)  # the data stream's position in the current phase
    finished: bool = False
