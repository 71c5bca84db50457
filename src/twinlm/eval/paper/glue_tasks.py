"""ModernBERT's GLUE task table, sweep grid and seeds: the protocol's constants, nothing else.

Sources (review /work/shared/reviews/eval-protocol.md §1.3, `AnswerDotAI/ModernBERT` @ 8c57a0f):
- the 8 tasks, no WNLI: `glue.py:69`; MNLI first, then RTE/MRPC/STS-B from the MNLI checkpoint: `glue.py:468,503`;
- per-task lr / weight decay / epochs / batch size and metrics: `src/evals/glue_jobs.py` (lines per task below);
- every task: DecoupledAdamW betas (0.9, 0.98), eps 1e-6, max_seq_len 256; linear decay with 10% warmup
  (`generate_eval_config.py:363-365`);
- seeds: `generate_eval_config.py:227` lists [1618, 42, 6033, 3145], GLUE tasks take `seeds[:3]` (`:389-391,415-417`);
- the sweep grid: branch `said/sweep` @ 2fed0f2, `create_sweep.py:36-45` (W&B random search).

This module imports nothing heavy: the settings (eval/settings.py) read the task names from it.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

from twinlm.errors import ConfigError


@dataclass(frozen=True)
class GlueTask:
    name: str  # twinlm's name, also the hub config of nyu-mll/glue
    config: str  # the hub config name
    text: tuple[str, ...]  # one or two text columns
    num_labels: int  # 1: regression (STS-B)
    eval_splits: tuple[str, ...]  # GLUE's test labels are hidden: validation splits
    metrics: tuple[str, ...]  # the reported metrics, averaged into the task score (ModernBERT glue.py:546)
    lr: float  # ModernBERT's defaults (glue_jobs.py)
    weight_decay: float  # Composer DecoupledAdamW's decay (not multiplied by the lr; see glue.py)
    epochs: int
    batch_size: int
    warm_from_mnli: bool = False  # starts from the MNLI fine-tuned weights with a fresh head
    extra_metrics: tuple[str, ...] = ()  # computed and kept, not in the score
    fp32: bool = False  # ModernBERT forces fp32 for this task (STS-B)

    @property
    def regression(self) -> bool:
        return self.num_labels == 1


_TABLE = (
    # glue_jobs.py:39-40,71-74,95-100
    GlueTask("mnli", "mnli", ("premise", "hypothesis"), 3, ("validation_matched", "validation_mismatched"),
             ("accuracy",), 5e-5, 1e-6, 2, 64),
    # glue_jobs.py:270-271,302-305,325
    GlueTask("cola", "cola", ("sentence",), 2, ("validation",), ("mcc",), 5e-5, 5e-6, 10, 32),
    # glue_jobs.py:495-496,527-530,550
    GlueTask("sst2", "sst2", ("sentence",), 2, ("validation",), ("accuracy",), 3e-5, 3e-6, 3, 16),
    # glue_jobs.py:195-196,227-230,250
    GlueTask("qqp", "qqp", ("question1", "question2"), 2, ("validation",), ("accuracy", "f1"), 3e-5, 3e-6, 5, 16),
    # glue_jobs.py:420-421,452-455,475
    GlueTask("qnli", "qnli", ("question", "sentence"), 2, ("validation",), ("accuracy",), 1e-5, 1e-6, 10, 16),
    # glue_jobs.py:120-121,152-155,175
    GlueTask("rte", "rte", ("sentence1", "sentence2"), 2, ("validation",), ("accuracy",), 1e-5, 1e-5, 3, 16,
             warm_from_mnli=True),
    # glue_jobs.py:345-346,377-380,400
    GlueTask("mrpc", "mrpc", ("sentence1", "sentence2"), 2, ("validation",), ("accuracy", "f1"), 8e-5, 8e-6, 10, 32,
             warm_from_mnli=True),
    # glue_jobs.py:570-571,602-605,625: num_labels 1, forced fp32, Spearman only in the score
    GlueTask("stsb", "stsb", ("sentence1", "sentence2"), 1, ("validation",), ("spearman",), 3e-5, 3e-6, 10, 32,
             warm_from_mnli=True, extra_metrics=("pearson",), fp32=True),
)

TASKS: dict[str, GlueTask] = {t.name: t for t in _TABLE}
GLUE_TASKS: tuple[str, ...] = tuple(TASKS)  # run order: MNLI first, the warm-started tasks after it
GLUE_SEEDS: tuple[int, ...] = (1618, 42, 6033)  # generate_eval_config.py:227, seeds[:3]
BETAS = (0.9, 0.98)
EPS = 1e-6
MAX_LENGTH = 256
WARMUP = 0.1  # fraction of the steps, then linear decay to 0 (alpha_f 0)

# create_sweep.py:36-45 (said/sweep): random search over this grid, run_cap 60
GRID_LRS = (1e-5, 3e-5, 5e-5, 8e-5)
GRID_EPOCHS = (1, 2, 3)
GRID_WEIGHT_DECAYS = (1e-5, 8e-6, 5e-6, 3e-6, 1e-6)
SWEEP_SEED = 0  # the draw of `random:N`


@dataclass(frozen=True)
class Hyper:
    """One fine-tuning configuration of a task."""

    lr: float
    weight_decay: float
    epochs: int
    batch_size: int


def defaults(task: GlueTask, batch_size: int | None = None) -> Hyper:
    """ModernBERT's configuration of `task` (`batch_size`: an override of its batch size)."""
    return Hyper(task.lr, task.weight_decay, task.epochs, batch_size or task.batch_size)


def grid(task: GlueTask, batch_size: int | None = None) -> list[Hyper]:
    """The 60 configurations of the published grid, lr-major; the batch size is the task's (or the override)."""
    return [Hyper(lr, wd, ep, batch_size or task.batch_size)
            for lr, ep, wd in itertools.product(GRID_LRS, GRID_EPOCHS, GRID_WEIGHT_DECAYS)]


def parse_sweep(sweep: str) -> int | None:
    """The number of configurations `sweep` asks for: `defaults` -> None (ModernBERT's one per task), `grid` -> 60,
    `random:N` -> N (1..60). Anything else is a ConfigError naming the three forms."""
    text = str(sweep).strip().lower()
    size = len(GRID_LRS) * len(GRID_EPOCHS) * len(GRID_WEIGHT_DECAYS)
    if text == "defaults":
        return None
    if text == "grid":
        return size
    head, _, n = text.partition(":")
    if head == "random" and n.strip().isdigit() and 1 <= int(n) <= size:
        return int(n)
    raise ConfigError(f"sweep: {sweep!r} is not defaults, grid or random:N with N in 1..{size} "
                      "(e.g. --sweep random:20)")


def sweep_configs(task: GlueTask, sweep: str, batch_size: int | None = None) -> list[Hyper]:
    """The configurations `sweep` runs for `task`: its defaults, the whole grid, or N drawn from the grid without
    replacement with the fixed seed SWEEP_SEED (the same N for every task and every rerun)."""
    n = parse_sweep(sweep)
    if n is None:
        return [defaults(task, batch_size)]
    full = grid(task, batch_size)
    if n == len(full):
        return full
    return random.Random(SWEEP_SEED).sample(full, n)


__all__ = ["GlueTask", "Hyper", "TASKS", "GLUE_TASKS", "GLUE_SEEDS", "BETAS", "EPS", "MAX_LENGTH", "WARMUP",
           "GRID_LRS", "GRID_EPOCHS", "GRID_WEIGHT_DECAYS", "SWEEP_SEED", "defaults", "grid", "parse_sweep",
           "sweep_configs"]
