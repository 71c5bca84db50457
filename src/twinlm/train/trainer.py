"""The training loop: a run set up by train/setup.py, trained through all of its phases, on one CPU or many GPUs.

    trainer = Trainer(recipe, "runs/enc")     # a twinlm.train.recipe.Recipe
    final = trainer.fit()                     # runs/enc/final (an HF folder); resumes by itself

`fit()` first runs the setup (train/setup.py: the read-only checks, then the run folder, the model, the
optimizer and a resume's state; `fit(run)` takes one already set up), then the loop. One optimizer step = one
global batch (`batch_size` sequences, grown by the batch-size warmup), identical for any number of ranks: each
rank takes its share (possibly empty) and hands it to the step (train/step.py: packing, masking, the loss
normalised by the *global* number of target tokens, the update). The loop runs the phases in order (RoPE θ,
data and schedule per phase), checkpoints at phase ends (train/checkpoint.py: the trainer's state and every
callback's `state_dict`), handles SIGTERM (finish the step, checkpoint, return) and non-finite losses (the
step skips the update; the run stops after `max_bad_steps` in a row), and exports `final/`. Optional
behaviour is in callbacks (train/callbacks.py: metrics, progress bar, TensorBoard, periodic checkpoints, eval,
order recording); a finished run whose `final/` verifies is returned as it is, one whose `final/` fails its
manifest writes it again.

The host runs one step ahead of the results: step k's loss is read (train/step.py `StepResult.resolve`)
once step k+1's passes are queued, and only then is step k finished: its state, metrics row, callbacks,
periodic checkpoint and the `max_bad_steps` check, exactly as if nothing were queued (the weights and the
optimizer state are still step k's: step k+1's update is queued after; a checkpoint of step k takes the RNG
states from before step k+1's passes; `on_batch` for step k+1 follows step k's callbacks). Rows, checkpoints
and resumes are therefore those of a loop that read every loss at once. Stopping: max_steps and phase ends
are known on the host. A SIGTERM, or the recipe's `stop_after` deadline passing (checked on this rank's
clock, `now()`, each time a step is finished; counted from when `fit` starts, its setup included, so each
process, a requeued job's too, gets the whole time again), sets `stop_requested`. In a one-rank run it
stops the run after the next step finished (the deadline: after the step just finished); with several ranks
it travels as the stop flag of the next step queued, which every rank reads when finishing that step, so
all of them checkpoint it and stop after it, whichever rank's clock or signal asked. Either way the step
queued behind it is dropped (its gradients, never applied). A step is never left queued behind a
checkpoint or a return. `stop_reason` says why (the message, and `twinlm train`'s, names it); the run
returns its checkpoint and the same command resumes it exactly.

A checkpoint is collective, so a callback that decides on a clock (train/callbacks.py TimedCheckpoint, on
rank 0's) does not save at once: `request_checkpoint()` sends the request with the next step queued, as the
checkpoint flag of its all-reduced totals (no synchronisation of its own), and every rank reads it as
`checkpoint_due` when finishing that step, in whose `on_log` the callback saves. Each save is timed
(`save_s` in the next metrics row, since it falls in that step's period; a log line), with a warning when it
takes longer than `checkpoint.grace_s`, the time a scheduler leaves between SIGTERM and SIGKILL.

Faults between ranks: until the first step of a start is done, a collective waits at most `dist_init_timeout`
seconds (checks, shard verification, loading, compiling), then `dist_timeout` (train/dist.py: the environment
overrides both). A collective that times out (another rank hung) or loses its peer (another rank died) ends
`fit` with a PeerFailure: one line naming this rank, its host, the step and what it was doing, and the last
checkpoint, which the same command (or torchrun's restart) resumes from.

The next batch is drawn from the stream and prepared (cut, packed, masked, pinned on CUDA) on a background
thread while a step runs (the recipe's `prefetch: false`, or `Trainer(prefetch=False)`: in line, the same
batches); a checkpoint records the stream's position after the batch last finished, not after the one drawn
ahead. The stream is used through its interface only (data/loader.py: `next_batch_size`, `next_step`,
`state_dict`), shards and replayed orders alike.
"""

from __future__ import annotations

import functools
import signal
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
from tqdm.auto import tqdm

from twinlm.card import license_problem, run_summary
from twinlm.data import BatchStream
from twinlm.data.order import ReplayStream
from twinlm.errors import ConfigError, ModelLoadError, OutOfSpace, PeerFailure, TrainingDiverged
from twinlm.export import verify_manifest
from twinlm.io import atomic_dir, is_disk_full, remove_stale_temporaries, write_json
from twinlm.model import Transformer
from twinlm.train import callbacks as cbs
from twinlm.train import dist
from twinlm.train.callback import Callback, keyed
from twinlm.train.checkpoint import CheckpointManager, capture_rng, save_training
from twinlm.train.datasets import batch_size_for, stream_for
from twinlm.train.recipe import Phase, Recipe, parse_duration
from twinlm.train.setup import Run, check_out, setup
from twinlm.train.state import TrainState
from twinlm.train.step import StepResult, TrainStep

STOPPED = "stopped.json"  # in the run folder while it stands stopped before its end: why, at which step


def _print(msg: str) -> None:
    """A log line on stderr, above the progress bar if one is drawn (printed under it, it would be glued to it)."""
    tqdm.write(msg, file=sys.stderr)
    sys.stderr.flush()


@dataclass
class _Queued:
    """A step whose update is queued and whose result is not read yet: the weights are one step ahead of the
    trainer's state until it is finished (`Trainer._finish`)."""

    result: StepResult
    phase: Phase
    batch_size: int
    stream: dict  # the stream's state once this step's batch was drawn
    started: float  # perf_counter when the step began waiting for its batch
    data_s: float  # waiting for the batch, and the count reduction


class _OneAhead:
    """One job run ahead on a background thread; or, without the thread, run when taken (the same calls in the
    same order, so both give the same batches)."""

    def __init__(self, background: bool):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="twinlm-prefetch") if background else None
        self._job: Future | functools.partial | None = None

    @property
    def busy(self) -> bool:
        return self._job is not None

    def start(self, fn, *args) -> None:
        self._job = self._pool.submit(fn, *args) if self._pool else functools.partial(fn, *args)

    def take(self):
        job, self._job = self._job, None
        if job is None:
            raise RuntimeError("nothing was started")
        return job.result() if isinstance(job, Future) else job()

    def close(self) -> None:
        """Wait for a job in flight (it may hold the stream) and drop its result."""
        self._job = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


class Trainer:
    step_class = TrainStep  # what runs each step (a subclass may be substituted, e.g. to inject failures)
    # set when fit() takes its run (train/setup.py Run)
    model: torch.nn.Module  # the module to call (maybe DDP/FSDP wrapped)
    optimizer: torch.optim.Optimizer
    step: TrainStep
    tokenizer: Any
    tokenizer_fingerprint: str | None
    ckpt: CheckpointManager
    env: dist.DistEnv  # the constructor's, else started by fit()

    def __init__(self, recipe: Recipe, out_dir: str | Path, *, callbacks: list[Callback] | None = None,
                 env: dist.DistEnv | None = None, log=None, default_callbacks: bool = True,
                 prefetch: bool | None = None):
        """`prefetch`: draw and prepare the next batch on a background thread while a step runs (the same
        batches either way); None: the recipe's `prefetch`. `default_callbacks`: train/callbacks.py
        `defaults(recipe, out)` before `callbacks`."""
        self.recipe = recipe.resolved_paths().validate()
        self.out = Path(out_dir)
        if env is not None:
            self.env = env
        self.callbacks: list[Callback] = ((cbs.defaults(self.recipe, self.out) if default_callbacks else [])
                                          + list(callbacks or []))
        self._log = log
        self.state = TrainState()
        self.stop_requested = False
        self.last_checkpoint: Path | None = None
        self.interrupted = False
        self.prefetch = self.recipe.prefetch if prefetch is None else prefetch
        self.stream: BatchStream | ReplayStream | None = None
        self._callback_states: dict[str, dict] = {}  # as restored, updated at each checkpoint
        self._saved_step = -1
        self._queued: _Queued | None = None  # a step queued on the device, its result not read yet
        self._rng: dict | None = None  # the RNG states that go with `state` while the next step's passes are queued
        self._stop = False  # stop after the step just finished: agreed by every rank
        self._doing = "start-up"  # what the loop is doing, named when another rank hangs or dies
        self._steady = False  # the first step is done: collectives wait `dist_timeout` from now on
        self._last_saved: Path | None = None  # the newest checkpoint, known on every rank
        self.stop_reason: str | None = None  # why the run stops: SIGTERM, the deadline, max_steps, another rank
        self._started = 0.0  # `now()` when fit() began (stop_after counts from it)
        self._deadline: float | None = None  # `now()` at which stop_after passes, for this process
        self.checkpoint_requested = False  # a checkpoint asked for, sent with the next step queued
        self.checkpoint_due = False  # every rank: the step just finished carries a checkpoint request
        self._save_s = 0.0  # seconds spent saving checkpoints since the last metrics row

    # --- small helpers ------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        env = getattr(self, "env", None)  # before fit() there may be none yet
        if env is None or env.is_main:
            (self._log or _print)(msg)

    @property
    def bare_model(self) -> Transformer:
        """The Transformer inside the DDP/FSDP wrapping (FSDP shards it in place: its parameters are DTensors)."""
        return cast(Transformer, dist.unwrap(self.model))

    @property
    def phases(self) -> list[Phase]:
        return self.recipe.phase_list()

    @property
    def resumable(self) -> bool:
        """Whether `fit` stopped before the run's end for a reason the same command gets past: SIGTERM or the
        `stop_after` deadline (this rank's or another's), after a checkpoint. Not a stop at the recipe's
        `max_steps` (the user's own limit: running again trains one more step), as RUN/stopped.json records it;
        `twinlm train` exits 75 on it."""
        return self.interrupted and not self._at_max_steps(self.state.step)

    def now(self) -> float:
        """Seconds on this process's monotonic clock: what the deadline (`stop_after`) and callbacks that
        checkpoint by time read (a subclass or a test may substitute another clock)."""
        return time.monotonic()

    @property
    def saved_step(self) -> int:
        """The step of the last checkpoint this process saved (-1: none yet); the same on every rank."""
        return self._saved_step

    def request_checkpoint(self) -> None:
        """Ask for a checkpoint of the next step queued: the request travels with that step to every rank
        (any rank may ask; callbacks that decide on a clock ask from rank 0 only), which reads it as
        `checkpoint_due` when finishing that step. A checkpoint saved before the step is queued satisfies it."""
        self.checkpoint_requested = True

    def _emit(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def _take(self, run: Run) -> None:
        """Make a set-up run the trainer's: its model, optimizer, step, checkpoints and restored state."""
        if run.out.resolve() != self.out.resolve():
            raise ConfigError(f"the run was set up for {run.out} but this Trainer writes {self.out}: set both up "
                              "for one folder")
        self.recipe, self.env = run.recipe, run.env
        self.model, self.optimizer, self.step = run.model, run.optimizer, run.step
        self.tokenizer, self.tokenizer_fingerprint, self.ckpt = run.tokenizer, run.fingerprint, run.ckpt
        self.state = run.state
        self._callback_states = dict(run.callback_states)
        for key, cb in keyed(self.callbacks):
            if key in self._callback_states:
                cb.load_state_dict(self._callback_states[key])

    # --- checkpoints ----------------------------------------------------------------------------------
    def save_checkpoint(self, keep: bool = False) -> Path | None:
        """Collective: every rank calls it; rank 0 writes. Returns the folder (rank 0) or None. A step whose
        update is queued is finished first (its row logged), so the checkpoint holds the state its rows
        describe; callbacks' `on_before_checkpoint` runs next (the metrics file is made durable up to this
        step). The callbacks' states are saved beside the trainer's (those of callbacks this run does not
        have are carried over as restored)."""
        if self._queued is not None:
            self._finish()
        self._emit("on_before_checkpoint")
        self._saved_step = self.state.step  # on every rank (the save is collective)
        self.checkpoint_requested = False  # a request not sent yet is satisfied by this checkpoint
        for key, cb in keyed(self.callbacks):
            own = cb.state_dict()
            if own:
                self._callback_states[key] = own
        info = {"tokenizer_fingerprint": self.tokenizer_fingerprint, "keep": bool(keep),
                "callbacks": self._callback_states,
                "phase": self.phases[min(self.state.phase_index, len(self.phases) - 1)].name,
                "recipe": self.recipe.to_dict()}
        self._doing = f"saving the checkpoint of step {self.state.step}"
        t0 = time.perf_counter()
        path = save_training(self.ckpt, self.model, self.optimizer, self.env, step=self.state.step,
                             trainer_state=asdict(self.state), info=info, rng=self._rng)
        save_s = time.perf_counter() - t0
        self._save_s += save_s
        if path is not None:
            self.last_checkpoint = path
            self._log_save(path, save_s)
        dist.barrier()
        self._last_saved = self.ckpt.path_for(self.state.step)
        self._emit("on_checkpoint", self.ckpt.path_for(self.state.step))
        return path

    def _log_save(self, path: Path, save_s: float) -> None:
        """Each save's duration, and a warning when it is longer than a scheduler's SIGTERM-to-SIGKILL grace."""
        grace = self.recipe.checkpoint.grace_s
        if grace and save_s > grace:
            self.log(f"warning: saving {path.name} took {save_s:.1f} s, longer than the {grace:g} s a scheduler "
                     "gives between SIGTERM and SIGKILL (checkpoint.grace_s): a checkpoint on SIGTERM would be cut "
                     "off; checkpoint more often by time (checkpoint.every_minutes) or stop before the limit "
                     "(stop_after)")
        else:
            self.log(f"checkpoint {path.name} saved in {save_s:.1f} s")

    # --- data -----------------------------------------------------------------------------------------
    def _stream_for(self, phase_index: int) -> BatchStream | ReplayStream:
        """Shards (checked against the run's tokenizer) or a replayed batch order (ids checked per step)."""
        vocab = len(self.tokenizer) if self.tokenizer is not None else self.bare_model.config.vocab_size
        return stream_for(self.recipe, phase_index, rank=self.env.rank, world_size=self.env.world_size,
                          steps_before=self.state.step - self.state.phase_step, vocab_size=vocab,
                          fingerprint=self.tokenizer_fingerprint)

    # --- the loop ---------------------------------------------------------------------------------
    def _handle_sigterm(self, signum, frame) -> None:  # noqa: ARG002
        self._ask_to_stop("SIGTERM")

    def _ask_to_stop(self, reason: str) -> None:
        self.stop_requested = True
        self.stop_reason = self.stop_reason or reason

    def fit(self, run: Run | None = None) -> Path:
        """Train every phase (resuming from the newest intact checkpoint); returns the final HF folder. `run`: a
        run set up by train/setup.py (`setup`, or `open_run(check_run(…))`); None: set up here.

        Under several ranks, a collective that times out (another rank hung) or loses its connection (another
        rank died) ends the run with a PeerFailure naming this rank, its host, what it was doing and the last
        checkpoint, instead of the backend's traceback."""
        if run is None:
            check_out(self.out)  # before any process group is started
            self.env = getattr(self, "env", None) or dist.init(timeout_s=self.recipe.dist_timeout,
                                                               init_timeout_s=self.recipe.dist_init_timeout)
        self._doing = "start-up (checks, shard verification, loading the model)"
        self._started = self.now()  # stop_after counts from here: the set-up is part of a job's time
        try:
            return self._fit(run)
        except RuntimeError as e:
            kind = dist.peer_failure(e)
            if kind is None:
                raise
            raise PeerFailure(self._peer_message(kind)) from e

    def _peer_message(self, kind: str) -> str:
        env = self.env
        if kind == "hung":
            waited, knob = ((env.timeout_s, f"dist_timeout or {dist.TIMEOUT_VARIABLE}") if self._steady else
                            (env.init_timeout_s, f"dist_init_timeout or {dist.INIT_TIMEOUT_VARIABLE}"))
            what = (f"waited {waited:.0f} s for the other ranks ({self._doing}): another rank hung (raise {knob} "
                    "if it was only slow)")
        else:
            what = (f"lost its connection to another rank ({self._doing}): another rank died or was stopped (if "
                    "one printed an error, fix that first)")
        return (f"rank {env.rank} (host {dist.host()}) {what}; last checkpoint "
                f"{self._last_saved or 'none yet'}: run the same command again to resume (under torchrun "
                "--max-restarts this happens by itself)")

    def _fit(self, run: Run | None) -> Path:
        if run is None:
            run = setup(self.recipe, self.out, self.env, self.log, step_class=self.step_class)
        self._take(run)
        self._last_saved = run.resume
        if self.env.is_main:
            (self.out / STOPPED).unlink(missing_ok=True)
        if self.state.finished and (self.out / "final").exists():
            problem = self._final_problem() if self.env.is_main else None
            problem = dist.broadcast_object(problem)
            if problem is None:
                self.log(f"{self.out} is already finished")
                return self.out / "final"
            self.log(f"warning: final/ fails its manifest, so it is written again from {run.resume} ({problem})")

        self.stop_requested = self._stop = self.checkpoint_requested = self.checkpoint_due = False
        self.stop_reason = None
        stop_after = self.recipe.stop_after
        # counted from fit()'s start, the set-up included: each process (a requeued job's too) gets the whole time
        self._deadline = self._started + parse_duration(stop_after) if stop_after is not None else None
        old_handler = None
        try:
            old_handler = signal.signal(signal.SIGTERM, self._handle_sigterm)
        except ValueError:  # not the main thread
            pass
        try:
            try:
                self._emit("on_train_start")
                result = self._run_phases()
            finally:
                if old_handler is not None:
                    signal.signal(signal.SIGTERM, old_handler)
            if result == "interrupted":
                self.interrupted = True
                return self.last_checkpoint or self.out
            final = self._write_final()
            self._emit("on_train_end")
            return final
        finally:
            self._exit_callbacks()  # trackers close their writers, however fit ends

    def _exit_callbacks(self) -> None:
        """Every callback's `on_exit`, each on its own: one that fails is logged and the others still run, and
        the error that ended `fit`, if any, is the one raised."""
        for cb in self.callbacks:
            try:
                cb.on_exit(self)
            except Exception as e:  # noqa: BLE001 - closing a tracker must not hide why the run ended
                self.log(f"warning: {type(cb).__name__}.on_exit failed: {type(e).__name__}: {e}")

    def _run_phases(self) -> str:
        while self.state.phase_index < len(self.phases):
            idx = self.state.phase_index
            phase = self.phases[idx]
            if self.state.phase_step == 0 and (phase.rope_theta or phase.local_rope_theta):
                self.bare_model.set_rope_theta(phase.rope_theta, phase.local_rope_theta)
            self.stream = self._stream_for(idx)
            if self.state.stream:
                self.stream.load_state_dict(self.state.stream)
            self._emit("on_phase_start", phase)
            if self._run_phase(phase) == "interrupted":
                return "interrupted"
            self.state.phase_index += 1
            self.state.phase_step = 0
            self.state.phase_tokens = 0
            self.state.stream = {}
            self._emit("on_phase_end", phase)
            if self.state.phase_index == len(self.phases):
                self.state.finished = True
            self.save_checkpoint(keep=True)
            if self._stop and not self.state.finished:
                self.log(f"stopped by {self.stop_reason} at the end of phase {phase.name} (step "
                         f"{self.state.step}); checkpoint {self.last_checkpoint}; the same command resumes")
                self._record_stop()
                return "interrupted"
        return "done"

    def _may_queue(self, step: int) -> bool:
        """Whether a step after `step` may be queued without knowing whether to stop: not past max_steps, and,
        on one rank, not asked to stop (with several ranks the stop flag travels with a step: every rank
        queues the next one until it reads the agreed flag)."""
        if self._at_max_steps(step):
            return False
        return not (self.stop_requested and not self.env.distributed)

    def _at_max_steps(self, step: int) -> bool:
        return bool(self.recipe.max_steps and step >= self.recipe.max_steps)

    def _draw(self, phase: Phase, step: int, phase_tokens: int) -> tuple:
        """Step `step`'s batch (its size, the prepared batch, the stream's state after it), `phase_tokens`
        being the phase's tokens before it. Runs on the prefetch thread: it alone touches the stream then."""
        stream = self.stream
        assert stream is not None  # opened by _run_phases before the phase runs
        bs = batch_size_for(phase, phase_tokens, stream)
        samples = stream.next_step(bs, empty_shares=True)
        stream_state = stream.state_dict()
        return bs, self.step.prepare(samples, phase, step=step), stream_state

    def _run_phase(self, phase: Phase) -> str | None:
        """Train the phase to its token budget (None), or until a stop ("interrupted", checkpoint written).

        Step k+1's passes are queued before step k's result is read, so the device never waits for the host:
        finishing step k (its row, callbacks, periodic checkpoints, the bad-step and stop checks) happens
        between step k+1's backward and its update, while the weights, the optimizer state and the stream's
        recorded position are still step k's; the RNG states a checkpoint of step k needs are taken before
        step k+1's passes draw dropout masks. A stop after step k drops step k+1's gradients. The next batch
        is drawn and prepared on a background thread while a step runs (`prefetch`)."""
        ahead = _OneAhead(self.prefetch)
        step, tokens = self.state.step, self.state.phase_tokens  # as of the steps queued so far
        more = True  # a run (or a resume) trains at least one step before max_steps is looked at
        try:
            while tokens < phase.tokens and more:
                t0 = time.perf_counter()
                if not ahead.busy:
                    ahead.start(self._draw, phase, step + 1, tokens)
                try:
                    bs, batch, stream_state = ahead.take()
                except Exception:
                    self._finish()  # the step before a data error is logged (and checkpointed) as it was
                    raise
                self._doing = f"step {step + 1}: summing the batch's counts over the ranks"
                self.step.count(batch)
                data_s = time.perf_counter() - t0
                step, tokens = step + 1, tokens + batch.tokens
                more = self._may_queue(step)
                if tokens < phase.tokens and more:
                    ahead.start(self._draw, phase, step + 1, tokens)
                rng = capture_rng(self.env) if self._queued is not None else None
                self._doing = f"step {step}: forward and backward, the gradients' all-reduce"
                grads = self.step.backward(batch, phase, phase_tokens=tokens - batch.tokens, stop=self.stop_requested,
                                           checkpoint=self.checkpoint_requested)
                self.checkpoint_requested = False  # sent
                if self._queued is not None:
                    self._rng = rng
                    self._finish(next_started=t0)
                    if self._stop:
                        self.step.discard(grads)
                        return self._interrupt()
                    self._rng = None
                self._emit("on_batch", batch.samples)
                self._doing = f"step {step}: the update"
                self._queued = _Queued(self.step.update(grads), phase, bs, stream_state, t0, data_s)
            self._finish()
            if self._stop and self.state.phase_tokens < phase.tokens:
                return self._interrupt()
            return None  # the phase-end checkpoint follows (also when stopping at the phase's end)
        finally:
            ahead.close()
            self._rng = None

    def _interrupt(self) -> str:
        if self._saved_step != self.state.step:  # PeriodicCheckpoint may have just saved it
            self.save_checkpoint()
        self.log(f"stopped by {self.stop_reason} at step {self.state.step}; checkpoint {self.last_checkpoint}; "
                 "the same command resumes")
        self._record_stop()
        return "interrupted"

    def _record_stop(self) -> None:
        """RUN/stopped.json (rank 0): why and where the run stopped, for a job script deciding whether to requeue
        itself (scripts/slurm/train.sbatch: not after max_steps, which is the user's own stop); the next start
        removes it."""
        if self.env.is_main:
            write_json(self.out / STOPPED, {"reason": self.stop_reason, "step": self.state.step,
                                            "max_steps": self._at_max_steps(self.state.step),
                                            "checkpoint": str(self.last_checkpoint)})

    def _finish(self, next_started: float | None = None) -> None:
        """Read the queued step's result and make it the trainer's: the state, the metrics row (its callbacks,
        which may checkpoint), the non-finite streak (TrainingDiverged) and whether to stop. `next_started`:
        when the next step began (the row's step_s runs to it; else to now)."""
        q, self._queued = self._queued, None
        if q is None:
            return
        r = q.result.resolve()
        if not self._steady:  # start-up and the first step (compiling) are over: the steps' timeout from now on
            dist.set_timeout(self.env.timeout_s)
            self._steady = True
        if r.skipped:
            self.state.bad_streak += 1
            self.state.skipped_steps += 1
        else:
            self.state.bad_streak = 0
        self.state.step += 1
        self.state.phase_step += 1
        self.state.tokens += r.tokens
        self.state.phase_tokens += r.tokens
        self.state.stream = q.stream
        # data_s: waiting for the batch (what the prefetch did not hide) and the count reduction; compute_s:
        # queuing the passes (on the CPU: running them); step_s: this step's start to the next one's (the
        # loop's period, the throughput when the device runs ahead of the host); save_s: saving checkpoints since
        # the previous row (the save of a step falls in the next step's period: its step_s includes it)
        step_s = (next_started if next_started is not None else time.perf_counter()) - q.started
        row = {"step": self.state.step, "phase": q.phase.name, "tokens": self.state.tokens, "loss": r.loss,
               "lr": r.lr, "batch_size": q.batch_size, "targets": r.targets, "step_tokens": r.tokens,
               "skipped": r.skipped, "data_s": q.data_s, "compute_s": r.compute_s, "step_s": step_s,
               "save_s": self._save_s}
        self._save_s = 0.0
        self.checkpoint_due = r.checkpoint  # this step's all-reduced flag: the same on every rank
        if r.skipped:
            self.log(f"warning: step {row['step']}: non-finite loss ({row['loss']}); step skipped "
                     f"({self.state.bad_streak} in a row)")
        self._emit("on_step_end", row)
        self._emit("on_log", row)
        if self.state.bad_streak >= self.recipe.max_bad_steps:
            raise TrainingDiverged(
                f"{self.state.bad_streak} non-finite losses in a row (max_bad_steps="
                f"{self.recipe.max_bad_steps}) at step {self.state.step}: the run is diverging. Lower "
                f"optim.lr, check the data, or resume from an earlier checkpoint in {self.ckpt.root}")
        # the deadline is this rank's clock: with several ranks it only asks (the flag travels with the next step)
        if self._deadline is not None and not self.stop_requested and self.now() >= self._deadline:
            self._ask_to_stop(f"the deadline (stop_after={self.recipe.stop_after})")
        if r.stop:
            self._ask_to_stop("another rank's SIGTERM or deadline (stop_after)")
        # agreed by every rank: the reduced stop flag of this step, max_steps; one rank needs no agreement
        self._stop = (r.stop or self._at_max_steps(self.state.step)
                      or (self.stop_requested and not self.env.distributed))
        if self._stop and not self.stop_requested:
            self.stop_reason = f"max_steps={self.recipe.max_steps}"

    def _final_problem(self) -> str | None:
        """What is wrong with the finished run's final/ (its files against its MANIFEST.sha256), or None."""
        try:
            verify_manifest(self.out / "final")
        except ModelLoadError as e:
            return str(e)
        return None

    def _write_final(self) -> Path:
        final = self.out / "final"
        self._doing = "gathering the final weights"
        weights = dist.full_state_dict(self.model, keep=self.env.is_main)
        if self.env.is_main:
            model = self.bare_model
            if any(hasattr(p, "device_mesh") for p in model.parameters()):
                model = Transformer(self.bare_model.config)
                dist.load_full_state_dict(model, weights)
            remove_stale_temporaries(self.out, "final")  # left by a run killed while exporting
            card = run_summary(self.out)
            card["name"] = f"{self.out.name}/final"  # written into a temporary folder: name the one it becomes
            if license_problem(card.get("license")):  # warned of at the start; the trained model is written
                card.pop("license")
            if self.tokenizer is not None:
                card["tokenizer"] = {"name": getattr(self.tokenizer, "name_or_path", None) or self.recipe.tokenizer,
                                     "vocab": len(self.tokenizer), "fingerprint": self.tokenizer_fingerprint}
            try:
                with atomic_dir(final, replace=True) as tmp:
                    # the tokenizer's model_max_length is the longest context trained at
                    model.save_pretrained(tmp, tokenizer=self.tokenizer, card=card,
                                          max_length=max(p.seq_len for p in self.phases),
                                          objective=self.recipe.objective)
            except Exception as e:
                if is_disk_full(e):
                    raise OutOfSpace(f"the disk holding {self.out} is full: final/ was not written (the temporary "
                                     "folder was removed; the last checkpoint holds the trained weights): free "
                                     "space and run the same command again") from e
                raise
            self.log(f"final model: {final}")
        dist.barrier()
        return final
