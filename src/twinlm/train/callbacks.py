"""Optional trainer behaviour: metrics file, progress bar, experiment tracking (TensorBoard or Weights & Biases),
periodic checkpoints (by tokens and by time), eval, batch order.

Trackers (the recipe's `tracker`): `TensorBoard` writes RUN/tensorboard/ and, on a resume, purges the events
written after the checkpoint it resumes from (`SummaryWriter(purge_step=step + 1)`), so each step shows once
after a kill; `WandB` logs to Weights & Biases, offline unless `WANDB_MODE` says otherwise, into RUN/wandb/ under
one run id per run folder (kept in RUN/wandb/twinlm-run-id), resumed with `resume="allow"`. A tracker whose
package is missing says so in one warning line naming its `pip install` (`twinlm[track]` brings both), and the
run goes on without it.

Each is a `Callback` (train/callback.py) that uses the trainer's public surface only. `defaults(recipe, out)`
is the list a run gets unless it asks for none (`Trainer(default_callbacks=False)`).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np
from tqdm.auto import tqdm

from twinlm.data import OrderRecorder
from twinlm.io import write_bytes
from twinlm.train.callback import Callback
from twinlm.train.checkpoint import EVALUATE_KEY, PERIODIC_KEY
from twinlm.train.datasets import build_dataset

if TYPE_CHECKING:
    from twinlm.train.recipe import Recipe


def defaults(recipe: Recipe, out: Path) -> list[Callback]:
    """The built-in callbacks a run in `out` gets from its recipe: throughput, metrics.jsonl, and those the
    recipe switches on (progress bar, TensorBoard, periodic checkpoints by tokens then by time, eval, order
    recording)."""
    cbs: list[Callback] = [Throughput(), MetricsLogger(out / "metrics.jsonl")]
    if recipe.progress:
        cbs.append(ProgressBar())
    if recipe.tracker == "tensorboard" and recipe.tensorboard:
        cbs.append(TensorBoard(out / "tensorboard"))
    elif recipe.tracker == "wandb":
        cbs.append(WandB(out))
    if recipe.checkpoint.every_tokens:
        cbs.append(PeriodicCheckpoint(recipe.checkpoint.every_tokens))
    if recipe.checkpoint.every_minutes:  # after PeriodicCheckpoint: a step both save is its (keep_every counts it)
        cbs.append(TimedCheckpoint(recipe.checkpoint.every_minutes))
    if recipe.eval.data and recipe.eval.every_tokens:
        cbs.append(Evaluate(recipe.eval))
    if recipe.record_order:
        cbs.append(RecordOrder(out))
    return cbs


class MetricsLogger(Callback):
    """`metrics.jsonl`: one JSON object per optimizer step (rank 0). On resume, rows after the checkpoint's step
    (logged by the interrupted run after its last checkpoint) are dropped, so the file has each step once.

    Every row up to a checkpoint's step is on disk (flushed and fsynced in `on_before_checkpoint`) before that
    checkpoint is written, so a kill at any moment loses no row: the trainer logs a step before any checkpoint
    of it (PeriodicCheckpoint saves in `on_log`, after this logger)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._f: TextIO | None = None
        self._t_log = 0.0

    def on_train_start(self, trainer) -> None:
        if not trainer.env.is_main:
            return
        step = trainer.state.step
        if self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if row.get("step", 0) <= step:
                    kept.append(line)
            write_bytes(self.path, "".join(k + "\n" for k in kept))
        self._f = open(self.path, "a")

    def on_log(self, trainer, row: dict) -> None:
        if self._f is None:
            return
        t0 = time.perf_counter()
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        if isinstance(row.get("loss"), float) and not math.isfinite(row["loss"]):
            clean["loss_repr"] = repr(row["loss"])
        clean["log_s"] = self._t_log
        self._f.write(json.dumps(clean) + "\n")
        self._f.flush()
        self._t_log = time.perf_counter() - t0

    def on_before_checkpoint(self, trainer) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())

    def on_train_end(self, trainer) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class ProgressBar(Callback):
    """tqdm over all phases' tokens: tokens, tokens/s, loss, ETA (rank 0, stderr)."""

    def __init__(self):
        self.bar = None

    def on_train_start(self, trainer) -> None:
        if not trainer.env.is_main:
            return
        # into a log file (not a terminal) one update per 30 s, not ten per second
        self.bar = tqdm(total=trainer.recipe.total_tokens, initial=trainer.state.tokens, unit="tok",
                        unit_scale=True, dynamic_ncols=True, smoothing=0.1, desc="train",
                        mininterval=0.1 if sys.stderr.isatty() else 30.0)

    def on_log(self, trainer, row: dict) -> None:
        if self.bar is None:
            return
        self.bar.update(row["step_tokens"])
        self.bar.set_postfix_str(f"{row['phase']} loss {row['loss']:.4f} lr {row['lr']:.2e}", refresh=False)

    def on_train_end(self, trainer) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


TRACKED = ("loss", "lr", "batch_size", "eval_loss", "tokens_per_s")  # the metrics rows' keys a tracker shows


def tracked(row: dict) -> dict[str, float]:
    """A metrics row's finite `TRACKED` values, as `train/<key>`."""
    return {f"train/{k}": v for k in TRACKED if isinstance(v := row.get(k), (int, float)) and math.isfinite(v)}


def tracker_missing(trainer, tracker: str, package: str) -> None:
    """The one warning line for a chosen tracker whose package is not installed."""
    trainer.log(f"warning: tracker {tracker}: the {package} package is not installed, so nothing is tracked: "
                f"pip install {package} (or twinlm[track]), or set tracker: none")


def optional_tracker(trainer, tracker: str, package: str, module: str) -> Any:
    """`module` (a tracker's optional package), or None after one warning line: not installed
    (`tracker_missing`), or installed but broken (e.g. a protobuf mismatch), which must not stop training."""
    try:
        return importlib.import_module(module)
    except ImportError:
        tracker_missing(trainer, tracker, package)
    except Exception as e:  # noqa: BLE001 - any failure of an optional import
        trainer.log(f"warning: tracker {tracker}: {module} cannot be imported ({type(e).__name__}: {e}), so "
                    f"nothing is tracked: reinstall it (pip install -U {package}), or set tracker: none")
    return None


class TensorBoard(Callback):
    """Scalars under RUN/tensorboard (rank 0). On a resume from step k the writer purges what earlier starts
    wrote after step k (`purge_step=k + 1`, 1 from scratch: events of steps a kill lost before their checkpoint),
    so TensorBoard shows each step once. Without the `tensorboard` package: one warning line, then nothing."""

    def __init__(self, logdir: str | Path):
        self.logdir = Path(logdir)
        self.writer: Any = None  # a SummaryWriter once started (tensorboard is optional)

    def on_train_start(self, trainer) -> None:
        if not trainer.env.is_main:
            return
        module = optional_tracker(trainer, "tensorboard", "tensorboard", "torch.utils.tensorboard")
        if module is None:
            return
        # from step k + 1 on (step 1 for a start from scratch): what an earlier, killed start wrote is purged
        self.writer = module.SummaryWriter(str(self.logdir), purge_step=int(trainer.state.step) + 1)

    def on_log(self, trainer, row: dict) -> None:
        if self.writer is None:
            return
        for key, v in tracked(row).items():
            self.writer.add_scalar(key, v, row["step"])

    def on_exit(self, trainer) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


WANDB_ID_FILE = "twinlm-run-id"  # RUN/wandb/<this>: the run's W&B id, the same on every resume


class WandB(Callback):
    """Weights & Biases (rank 0): `wandb.init(dir=RUN, id=<the run's id>, resume="allow")`, offline unless the
    environment sets `WANDB_MODE` (online runs need `wandb login`), project `WANDB_PROJECT` or "twinlm", the
    resolved recipe as the run's config; the `TRACKED` values of every metrics row at its step. The id is made
    once per run folder and kept in RUN/wandb/twinlm-run-id and given to every restart (offline, each start
    writes its own RUN/wandb/offline-run-* folder under that id; `wandb sync` uploads them). Without the `wandb`
    package: one warning line, then nothing."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.run: Any = None

    def run_id(self) -> str:
        """This run folder's W&B id (made and written on the first call)."""
        path = self.out / "wandb" / WANDB_ID_FILE
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            run_id = os.urandom(6).hex()
            write_bytes(path, run_id.encode())
            return run_id

    def on_train_start(self, trainer) -> None:
        if not trainer.env.is_main:
            return
        wandb = optional_tracker(trainer, "wandb", "wandb", "wandb")
        if wandb is None:
            return
        os.environ.setdefault("WANDB_MODE", "offline")
        self.run = wandb.init(dir=str(self.out), id=self.run_id(), resume="allow",
                              project=os.environ.get("WANDB_PROJECT", "twinlm"), name=self.out.name,
                              config=trainer.recipe.to_dict())

    def on_log(self, trainer, row: dict) -> None:
        if self.run is not None:
            self.run.log(tracked(row), step=int(row["step"]))

    def on_exit(self, trainer) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class PeriodicCheckpoint(Callback):
    """A checkpoint each time the run's token count passes a multiple of `every_tokens`. It saves in `on_log`,
    after the metrics row of the step is written (a kill between the two would otherwise lose the row). Its
    state is the number of intervals passed (`ordinal`; the keep policy's `keep_every` counts them) and the
    step that passed the last one (`step`: a checkpoint of another step, by time or on a stop, carries the
    ordinal but is not a periodic one; train/checkpoint.py `periodic_ordinal`)."""

    state_key = PERIODIC_KEY

    def __init__(self, every_tokens: int):
        self.every = int(every_tokens)
        self.ordinal = 0
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"ordinal": self.ordinal, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ordinal = int(state.get("ordinal", 0))
        self.step = int(state.get("step", 0))

    def on_log(self, trainer, row: dict) -> None:
        ordinal = trainer.state.tokens // self.every
        if ordinal > self.ordinal:
            self.ordinal, self.step = ordinal, trainer.state.step
            phase = trainer.phases[trainer.state.phase_index]
            if trainer.state.phase_tokens >= phase.tokens:
                return  # the phase-end checkpoint follows right away
            trainer.save_checkpoint()


class TimedCheckpoint(Callback):
    """A checkpoint once `every_minutes` have passed on rank 0's clock (`trainer.now()`) since this process's
    training started or its last checkpoint of any kind (a requeued job's clock starts again: no state).

    A checkpoint is collective and the ranks' clocks differ, so rank 0's alone decides, and the decision
    travels with a step like the stop flag: rank 0 asks in a step's `on_log` (`trainer.request_checkpoint()`),
    the request is all-reduced with the next step queued (no synchronisation of its own), and every rank saves
    that step when it finishes it (`trainer.checkpoint_due`, in `on_log`, after the metrics row like
    PeriodicCheckpoint), unless a checkpoint of that step or the one before was saved since (it satisfied the
    request) or the step ends its phase (the phase-end checkpoint follows). The checkpoint thus lands two
    steps after rank 0's clock passed the interval, the same on every rank; it changes nothing in training.
    These checkpoints count among the `keep_last`, never for `keep_every` (not periodic ones)."""

    def __init__(self, every_minutes: float):
        self.every_s = float(every_minutes) * 60
        self._last = 0.0  # rank 0: `now()` at the start or the last checkpoint
        self._asked = False  # rank 0: a request is on its way

    def on_train_start(self, trainer) -> None:
        self._last, self._asked = trainer.now(), False

    def on_log(self, trainer, row: dict) -> None:
        if trainer.checkpoint_due:  # every rank alike: the step's all-reduced flag, the agreed state
            self._asked = False
            phase = trainer.phases[trainer.state.phase_index]
            if trainer.saved_step < trainer.state.step - 1 and trainer.state.phase_tokens < phase.tokens:
                trainer.save_checkpoint()
        elif trainer.env.is_main and not self._asked and trainer.now() - self._last >= self.every_s:
            trainer.request_checkpoint()
            self._asked = True

    def on_checkpoint(self, trainer, path: Path) -> None:
        self._last, self._asked = trainer.now(), False


class Throughput(Callback):
    """Adds `tokens_per_s` (this step) to each row."""

    def on_step_end(self, trainer, row: dict) -> None:
        row["tokens_per_s"] = row["step_tokens"] / max(row["step_s"], 1e-9)


class Evaluate(Callback):
    """Held-out loss every `every_tokens`: the first `samples` chunks of `eval.data`, masked at `eval.mask_ratio`
    for mlm/mntp (15%, as the paper evaluates), next token for clm. Adds `eval_loss` to the row. Its state is
    the number of intervals passed (`ordinal`)."""

    state_key = EVALUATE_KEY

    def __init__(self, cfg):
        self.cfg = cfg
        self.samples = None
        self.ordinal = 0

    def state_dict(self) -> dict[str, Any]:
        return {"ordinal": self.ordinal}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ordinal = int(state.get("ordinal", 0))

    def on_train_start(self, trainer) -> None:
        ds = build_dataset(self.cfg.data, trainer.recipe.seed)
        n = min(self.cfg.samples, len(ds))
        self.samples = [(10**12 + i, np.asarray(ds[i])) for i in range(n)]

    def evaluate(self, trainer) -> float:
        phase = trainer.phases[min(trainer.state.phase_index, len(trainer.phases) - 1)]
        mine = self.samples[trainer.env.rank::trainer.env.world_size]
        return trainer.step.eval_loss(mine, phase, self.cfg.mask_ratio)

    def on_step_end(self, trainer, row: dict) -> None:
        ordinal = trainer.state.tokens // self.cfg.every_tokens
        if ordinal > self.ordinal:
            self.ordinal = ordinal
            row["eval_loss"] = self.evaluate(trainer)


class RecordOrder(Callback):
    """The exact batch order, as the paper released it: every step's samples (ids and tokens, this rank's share)
    collected with twinlm.data's OrderRecorder and written at each checkpoint to
    RUN/data_order/step-XXXXXXXX/rank-RRRRR.parquet (the batches since the previous checkpoint). Steps after the
    last checkpoint of a killed run are recorded again by the resumed run, so each step appears once."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.recorder: OrderRecorder | None = None

    def on_train_start(self, trainer) -> None:
        self.recorder = OrderRecorder(self.run_dir, rank=trainer.env.rank)

    def on_batch(self, trainer, samples: list) -> None:
        if self.recorder is not None and samples:
            seq_len = trainer.phases[trainer.state.phase_index].seq_len
            self.recorder.record(trainer.state.step + 1, [s for s, _ in samples], [a[:seq_len] for _, a in samples])

    def on_checkpoint(self, trainer, path: Path) -> None:
        if self.recorder is not None:
            self.recorder.flush(Path(path).name)
