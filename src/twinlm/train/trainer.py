"""The training loop: one recipe, any objective, all phases, one CPU or many GPUs.

    trainer = Trainer(recipe, "runs/enc")     # a twinlm.train.recipe.Recipe
    final = trainer.fit()                     # runs/enc/final (an HF folder); resumes by itself

One optimizer step = one global batch (`batch_size` sequences, grown by the batch-size warmup), identical for
any number of ranks: each rank takes its share and hands it to the step (train/step.py: packing, masking, the
loss normalised by the *global* number of target tokens, the update). The trainer builds the model (fresh,
from a checkpoint, or converted from a model of the other kind), runs the phases in order (RoPE θ, data and
schedule per phase), checkpoints at phase ends (train/checkpoint.py), handles SIGTERM (finish the step,
checkpoint, return) and non-finite losses (the step skips the update; the run stops after `max_bad_steps` in
a row), and exports `final/`. Optional behaviour is in callbacks (train/callbacks.py: metrics, progress bar,
TensorBoard, periodic checkpoints, eval, order recording); the run folder's provenance is train/rundir.py.

The host runs one step ahead of the results: step k's loss is read (train/step.py `StepResult.resolve`)
once step k+1's passes are queued, and only then is step k finished: its state, metrics row, callbacks,
periodic checkpoint and the `max_bad_steps` check, exactly as if nothing were queued (the weights and the
optimizer state are still step k's: step k+1's update is queued after; a checkpoint of step k takes the RNG
states from before step k+1's passes; `on_batch` for step k+1 follows step k's callbacks). Rows, checkpoints
and resumes are therefore those of a loop that read every loss at once. Stopping: max_steps and phase ends
are known on the host. In a one-rank run a SIGTERM stops the run after the next step finished; with several
ranks it travels as the stop flag of the next step queued, which every rank reads when finishing that step,
so all of them checkpoint it and stop after it. Either way the step queued behind it is dropped (its
gradients, never applied). A step is never left queued behind a checkpoint or a return.

The next batch is drawn from the stream and prepared (cut, packed, masked, pinned on CUDA) on a background
thread while a step runs (the recipe's `prefetch: false`, or `Trainer(prefetch=False)`: in line, the same
batches); a checkpoint records the stream's position after the batch last finished, not after the one drawn
ahead.

Resuming is refused (ConfigError / TokenizerMismatch, one line naming the changed settings) when the recipe
changes what the checkpoint's weights are: `model` (preset or overrides), `objective`, or the tokenizer (its
fingerprint). The check runs before anything in the run folder is written (config.yaml included); only
then are checkpoints that failed verification moved aside (train/checkpoint.py). Every shard folder is
verified in full (data/shards.py `verify_shards`: hashes, index, token ids) the first time the run uses it
and whenever it changed since (RUN/verified_shards.json); a damaged folder stops the run with one line.
"""

from __future__ import annotations

import functools
import json
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import twinlm
from twinlm.card import run_summary
from twinlm.config import ModelConfig
from twinlm.convert import convert
from twinlm.data import BatchStream, check_tokenizer
from twinlm.data.mds import is_mds_folder
from twinlm.data.order import ReplayStream, is_order_folder
from twinlm.data.shards import is_verified, read_meta, shard_signature, verify_shards
from twinlm.data.tokenizer import load_tokenizer, model_config_for, tokenizer_fingerprint
from twinlm.errors import (
    ConfigError,
    MissingArtifactError,
    MissingShards,
    ModelLoadError,
    OutOfSpace,
    ShardError,
    TokenizerMismatch,
    TrainingDiverged,
)
from twinlm.export import verify_manifest
from twinlm.hub import resolve_model
from twinlm.io import atomic_dir, is_disk_full, remove_stale_temporaries, write_bytes, write_json
from twinlm.memory import check_fits
from twinlm.model import Transformer
from twinlm.train import callbacks as cbs
from twinlm.train import dist
from twinlm.train.callback import Callback
from twinlm.train.checkpoint import (
    TRAINING_FILES,
    CheckpointManager,
    capture_rng,
    read_state,
    read_tensors,
    restore_training,
    save_training,
)
from twinlm.train.datasets import batch_size_for, phase_sources, stream_for
from twinlm.train.optim import build_optimizer
from twinlm.train.recipe import Phase, Recipe
from twinlm.train.rundir import prepare_run_dir
from twinlm.train.state import TrainState
from twinlm.train.step import StepResult, TrainStep


def _changes(key: str, old, new) -> list[str]:
    """`key.sub: old -> new` for every leaf that differs between two recipe values."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [c for k in sorted(set(old) | set(new)) for c in _changes(f"{key}.{k}", old.get(k), new.get(k))]
    return [] if old == new else [f"{key}: {old!r} -> {new!r}"]


def device_memory(device: torch.device) -> float | None:
    """Bytes of memory of an accelerator (None on the CPU, where the host's memory is not planned)."""
    if device.type != "cuda":
        return None
    return float(torch.cuda.mem_get_info(device)[1])


VERIFIED_SHARDS = "verified_shards.json"  # in the run folder: shard folders verified, with their signature


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
        self._job = None

    @property
    def busy(self) -> bool:
        return self._job is not None

    def start(self, fn, *args) -> None:
        self._job = self._pool.submit(fn, *args) if self._pool else functools.partial(fn, *args)

    def take(self):
        job, self._job = self._job, None
        return job.result() if self._pool else job()

    def close(self) -> None:
        """Wait for a job in flight (it may hold the stream) and drop its result."""
        self._job = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


class Trainer:
    step_class = TrainStep  # what runs each step (a subclass may be substituted, e.g. to inject failures)

    def __init__(self, recipe: Recipe, out_dir: str | Path, *, callbacks: list[Callback] | None = None,
                 env: dist.DistEnv | None = None, log=None, default_callbacks: bool = True,
                 prefetch: bool | None = None):
        """`prefetch`: draw and prepare the next batch on a background thread while a step runs (the same
        batches either way); None: the recipe's `prefetch`."""
        self.recipe = recipe.resolved_paths().validate()
        self.out = Path(out_dir)
        self.env = env
        self.extra_callbacks = list(callbacks or [])
        self.default_callbacks = default_callbacks
        self._log = log
        self.state = TrainState()
        self.stop_requested = False
        self.model = None  # the module to call (maybe DDP/FSDP wrapped)
        self.optimizer = None
        self.step: TrainStep | None = None
        self.tokenizer = None
        self.tokenizer_fingerprint = None
        self.stream = None
        self.last_checkpoint: Path | None = None
        self.interrupted = False
        self.prefetch = self.recipe.prefetch if prefetch is None else prefetch
        self._saved_step = -1
        self._queued: _Queued | None = None  # a step queued on the device, its result not read yet
        self._rng = None  # the RNG states that go with `state` while the next step's passes are queued
        self._stop = False  # stop after the step just finished: agreed by every rank

    # --- small helpers ------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.env is None or self.env.is_main:
            (self._log or (lambda m: print(m, file=sys.stderr, flush=True)))(msg)

    @property
    def bare_model(self) -> torch.nn.Module:
        return dist.unwrap(self.model)

    @property
    def phases(self) -> list[Phase]:
        return self.recipe.phase_list()

    def _emit(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    # --- setup ------------------------------------------------------------------------------------
    def _load_tokenizer(self):
        src = self.recipe.tokenizer
        if not src:
            return None, None
        try:
            tok = load_tokenizer(src)
        except FileNotFoundError as e:
            raise MissingArtifactError(f"the recipe's tokenizer: {e}") from e
        return tok, tokenizer_fingerprint(tok)

    def _model_config(self) -> ModelConfig:
        spec = self.recipe.model
        if self.tokenizer is not None:
            cfg = model_config_for(self.tokenizer, spec.preset)
        else:
            cfg = ModelConfig.preset(spec.preset)
        return cfg.replace(**{**spec.overrides, "causal": self.recipe.causal})

    def _init_model(self, ckpt: Path | None) -> Transformer:
        if ckpt is not None:
            model = Transformer(ModelConfig.load(ckpt / "model_config.json"))
            dist.load_full_state_dict(model, read_tensors(ckpt / "model.safetensors"))
            return model
        torch.manual_seed(self.recipe.seed)
        if self.recipe.init_from:
            return self._converted_model()
        return Transformer(self._model_config())

    def _converted_model(self) -> Transformer:
        """Cross-objective start: weights of a trained model of the other kind, converted; fresh optimizer."""
        src = resolve_model(self.recipe.init_from)  # a hub id org/name@revision -> its snapshot folder
        target = "decoder" if self.recipe.causal else "encoder"
        if not src.exists():
            raise MissingArtifactError(f"init_from: {src} does not exist (train the source model first, or "
                                       f"override init_from=PATH)")
        loaded = twinlm.load(src)
        if bool(loaded.config.causal) != self.recipe.causal:
            conv_dir = self.out / "init"
            if self.env.is_main and not (conv_dir / "DONE").exists():
                convert(src, to=target, out=conv_dir, overwrite=True)
                write_bytes(conv_dir / "DONE", str(src) + "\n")
            dist.barrier()
            loaded = twinlm.load(conv_dir)
        # the recipe's model overrides (e.g. dropout) apply on top of the converted shape
        over = {k: v for k, v in self.recipe.model.overrides.items()}
        cfg = loaded.config.replace(**over, causal=self.recipe.causal)
        model = Transformer(cfg)
        dist.load_full_state_dict(model, {k: v.detach().cpu() for k, v in loaded.state_dict().items()})
        return model

    def _build_callbacks(self) -> list[Callback]:
        out: list[Callback] = []
        if self.default_callbacks:
            out.append(cbs.Throughput())
            out.append(cbs.MetricsLogger(self.out / "metrics.jsonl"))
            if self.recipe.progress:
                out.append(cbs.ProgressBar())
            if self.recipe.tensorboard:
                out.append(cbs.TensorBoard(self.out / "tensorboard"))
            if self.recipe.checkpoint.every_tokens:
                out.append(cbs.PeriodicCheckpoint(self.recipe.checkpoint.every_tokens))
            if self.recipe.eval.data and self.recipe.eval.every_tokens:
                out.append(cbs.Evaluate(self.recipe.eval))
            if self.recipe.record_order:
                out.append(cbs.RecordOrder(self.out))
        return out + self.extra_callbacks

    # --- checkpoints ----------------------------------------------------------------------------------
    def save_checkpoint(self, keep: bool = False) -> Path | None:
        """Collective: every rank calls it; rank 0 writes. Returns the folder (rank 0) or None. A step whose
        update is queued is finished first (its row logged), so the checkpoint holds the state its rows
        describe; callbacks' `on_before_checkpoint` runs next (the metrics file is made durable up to this
        step)."""
        if self._queued is not None:
            self._finish()
        self._emit("on_before_checkpoint")
        self._saved_step = self.state.step  # on every rank (the save is collective)
        info = {"tokenizer_fingerprint": self.tokenizer_fingerprint, "keep": bool(keep),
                "checkpoint_ordinal": self.state.checkpoint_ordinal,
                "phase": self.phases[min(self.state.phase_index, len(self.phases) - 1)].name,
                "recipe": self.recipe.to_dict()}
        path = save_training(self.ckpt, self.model, self.optimizer, self.env, step=self.state.step,
                             trainer_state=asdict(self.state), info=info, rng=self._rng)
        if path is not None:
            self.last_checkpoint = path
        dist.barrier()
        self._emit("on_checkpoint", self.ckpt.path_for(self.state.step))
        return path

    def _check_resume(self, ckpt: Path) -> None:
        """Refuse to resume from `ckpt` with a recipe that changes the model, the objective or the tokenizer."""
        state = read_state(ckpt)
        saved, now = state.get("recipe") or {}, self.recipe.to_dict()
        changed = [c for key in ("objective", "model") if key in saved
                   for c in _changes(key, saved[key], now.get(key))]
        if changed:
            what = " and ".join(k for k in ("objective", "model") if any(c.startswith(k) for c in changed))
            raise ConfigError(f"{self.out} holds a run trained with another {what}"
                              f" ({'; '.join(changed)}); resuming would keep the checkpoint's weights under the new "
                              f"settings: restore them, or train into a new folder (--out)")
        fp = state.get("tokenizer_fingerprint")
        if fp and self.tokenizer_fingerprint and fp != self.tokenizer_fingerprint:
            raise TokenizerMismatch(f"{ckpt} was trained with another tokenizer (fingerprint {fp[:12]}… vs "
                                    f"{self.tokenizer_fingerprint[:12]}…): point the recipe's `tokenizer` at the "
                                    f"one this run started with, or train into a new run folder")

    def _restore(self, ckpt: Path) -> None:
        state = read_state(ckpt)
        self.state = TrainState(**state["trainer"])
        self.tokenizer_fingerprint = self.tokenizer_fingerprint or state.get("tokenizer_fingerprint")
        restore_training(ckpt, state, self.model, self.optimizer, self.env, seed=self.recipe.seed, log=self.log)

    def _check_memory(self, cfg: ModelConfig) -> None:
        """Refuse a micro-batch that the memory estimate says does not fit the device (twinlm.memory)."""
        total = device_memory(self.env.device)
        if total is None or not self.recipe.memory_check:
            return
        r = self.recipe
        bf16 = dist.compute_dtype(r.precision, self.env) is torch.bfloat16  # the same rule as the training's
        check_fits(cfg, micro_batch_tokens=max(p.micro_batch_tokens for p in self.phases),
                   checkpointing=r.activation_checkpointing, card_bytes=total, device=str(self.env.device),
                   ranks=self.env.world_size, sharded=r.parallel == "fsdp" and self.env.distributed,
                   precision="bf16" if bf16 else "fp32")

    # --- data -----------------------------------------------------------------------------------------
    def _shard_sources(self, phase) -> list:
        """The phase's twinlm shard folders (MDS folders and batch-order folders are checked when read)."""
        return [s for s in phase_sources(self.recipe, phase)
                if not is_order_folder(s.path) and not is_mds_folder(s.path)]

    def _shard_metas(self):
        """(phase, source, meta.json) of every phase's shard folders; unreadable ones are reported when the
        phase opens its data."""
        for phase in self.phases:
            for src in self._shard_sources(phase):
                try:
                    yield phase, src, read_meta(src.path)
                except ShardError:
                    continue

    def _check_seq_lens(self) -> None:
        """Each phase's `seq_len` against the chunk size its shards were prepared with (meta.json `chunking`;
        shards that record none are not checked). Longer: an error (the phase could never see sequences that
        long; a context extension on short chunks extends nothing). Shorter: a warning (each chunk is cut to
        seq_len, the rest of it is never trained on)."""
        for phase, src, meta in self._shard_metas():
            size = (meta.get("chunking") or {}).get("chunk_size")
            if not size or size == phase.seq_len:
                continue
            if phase.seq_len > size:
                raise ConfigError(f"phase {phase.name}: seq_len {phase.seq_len} but {src.path} holds chunks of "
                                  f"at most {size} tokens, so no sequence is longer than {size}: prepare shards "
                                  f"with --chunk-size {phase.seq_len}, or set "
                                  f"phases.{phase.name}.seq_len={size}")
            self.log(f"warning: phase {phase.name}: seq_len {phase.seq_len} is shorter than the {size}-token "
                     f"chunks of {src.path}: each chunk is cut to {phase.seq_len} tokens and the rest is never "
                     f"trained on (prepare shards with --chunk-size {phase.seq_len} to use all of the text)")

    def _check_inputs(self, ckpt: Path | None) -> None:
        """Refuse, before the run folder is written, what would stop the run once it has started: shards of
        another tokenizer than the recipe's (read from meta.json; the checkpoint's is checked on resume) and,
        for a fresh run, an `init_from` that is not there."""
        if self.tokenizer_fingerprint is not None:
            for _, src, meta in self._shard_metas():
                if (meta.get("tokenizer") or {}).get("fingerprint"):
                    check_tokenizer(meta, self.tokenizer_fingerprint, where=src.path)
        if ckpt is None and self.recipe.init_from and not resolve_model(self.recipe.init_from).exists():
            raise MissingArtifactError(f"init_from: {self.recipe.init_from} does not exist (train the source model "
                                       "first, or override init_from=PATH)")

    def _verify_shards(self) -> str | None:
        """Verify (sha256, index, token ids) every shard folder the recipe trains on that was not verified in
        its current state, by this run (RUN/verified_shards.json: path -> shard_signature) or by anyone
        (the folder's .verified.json); return the problem or None. Rank 0 only; the caller broadcasts it."""
        record_path = self.out / VERIFIED_SHARDS
        try:
            record = json.loads(record_path.read_text()) if record_path.exists() else {}
        except json.JSONDecodeError:
            record = {}
        paths = {str(s.path) for phase in self.phases for s in self._shard_sources(phase)}
        changed = False
        for path in sorted(paths):
            try:
                sig = shard_signature(path) if Path(path, "meta.json").exists() else None
                if sig is not None and (record.get(path) == sig or is_verified(path)):
                    continue
                t0 = time.perf_counter()
                verify_shards(path)
            except (ShardError, OSError) as e:  # a missing folder is reported when the phase opens it
                if isinstance(e, ShardError) and not isinstance(e, MissingShards):
                    return str(e)
                continue
            self.log(f"verified {path} (sha256 of every file, index, token ids) in {time.perf_counter() - t0:.1f} s")
            record[path] = sig
            changed = True
        if changed:
            write_json(record_path, record)
        return None

    def _stream_for(self, phase_index: int) -> BatchStream | ReplayStream:
        """Shards (checked against the run's tokenizer) or a replayed batch order (ids checked per step)."""
        vocab = len(self.tokenizer) if self.tokenizer is not None else self.bare_model.config.vocab_size
        stream = stream_for(self.recipe, phase_index, rank=self.env.rank, world_size=self.env.world_size,
                            steps_before=self.state.step - self.state.phase_step, vocab_size=vocab)
        if stream.dataset is not None:
            self._check_tokenizer(stream.dataset)
        return stream

    def _check_tokenizer(self, ds) -> None:
        """The shards must come from the run's tokenizer: the recipe's, else the checkpoint's, else that of
        the first shards trained on. Shards that record no tokenizer are not checked."""
        first = ds.datasets[0] if hasattr(ds, "datasets") else ds  # a Mixture's sources agree (it checks)
        found = (first.meta.get("tokenizer") or {}).get("fingerprint")
        if found is None:
            return
        if self.tokenizer_fingerprint is None:
            self.tokenizer_fingerprint = found
        check_tokenizer(ds, self.tokenizer_fingerprint)

    def _next_samples(self, bs: int) -> list:
        """This rank's share of the next global batch; a share may be empty (batch smaller than the ranks)."""
        if bs >= self.env.world_size or isinstance(self.stream, ReplayStream):
            return self.stream.next_step(bs)
        ids = self.stream.peek_global(bs)[self.env.rank::self.env.world_size]
        self.stream.skip(bs)
        self.stream.step += 1
        return [(int(i), self.stream.dataset[int(i)]) for i in ids]

    # --- the loop ---------------------------------------------------------------------------------
    def _handle_sigterm(self, signum, frame) -> None:  # noqa: ARG002
        self.stop_requested = True

    def fit(self) -> Path:
        """Train every phase (resuming from the newest intact checkpoint); returns the final HF folder."""
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"{self.out} exists and is not a folder: give --out a folder name (the run folder is "
                              "created there)")
        self.env = self.env or dist.init()
        self.callbacks = self._build_callbacks()
        self.ckpt = CheckpointManager(self.out / "checkpoints", self.recipe.checkpoint.keep_last,
                                      self.recipe.checkpoint.keep_every, log=self.log, required=TRAINING_FILES)
        self.tokenizer, self.tokenizer_fingerprint = self._load_tokenizer()
        # read-only until the resume is accepted: a refused resume leaves the run folder as it was
        latest = self.ckpt.latest() if self.env.is_main else None
        latest = dist.broadcast_object(str(latest) if latest else None)
        ckpt = Path(latest) if latest else None
        if ckpt is not None:
            self._check_resume(ckpt)
        self._check_seq_lens()  # every rank: an error must stop all of them (it only reads meta.json)
        self._check_inputs(ckpt)
        prepare_run_dir(self.out, self.recipe.to_yaml(), self.env, self.log)
        if self.env.is_main:
            if ckpt is None and self.ckpt.corrupt:
                self.log(f"warning: no intact checkpoint in {self.ckpt.root}: training starts again from step 0")
            self.ckpt.set_aside_corrupt()
        problem = self._verify_shards() if self.env.is_main else None
        problem = dist.broadcast_object(problem)
        if problem:
            raise ShardError(problem)
        dist.barrier()
        model = self._init_model(ckpt)
        self._check_memory(model.config)
        model.to(self.env.device)
        if ckpt is None:
            first = self.phases[0]
            if first.rope_theta or first.local_rope_theta:
                dist.unwrap(model).set_rope_theta(first.rope_theta, first.local_rope_theta)
        self.model = dist.parallelize(model, self.env, mode=self.recipe.parallel, compile=self.recipe.compile,
                                      activation_checkpointing=self.recipe.activation_checkpointing,
                                      param_dtype=dist.compute_dtype(self.recipe.precision, self.env))
        o = self.recipe.optim
        self.optimizer = build_optimizer(self.bare_model, lr=o.lr, betas=o.betas, eps=o.eps,
                                         weight_decay=o.weight_decay)
        self.step = self.step_class(self.model, self.optimizer, self.env, objective=self.recipe.objective,
                                    seed=self.recipe.seed, lr=o.lr, precision=self.recipe.precision,
                                    vocab_in_use=len(self.tokenizer) if self.tokenizer is not None else None)
        if ckpt is not None:
            self._restore(ckpt)
            self.log(f"resuming from {ckpt} (step {self.state.step}, {self.state.tokens:,} tokens)")
        elif self.recipe.init_from:
            self.log(f"starting from converted weights of {self.recipe.init_from} with a fresh optimizer")
        if self.state.finished and (self.out / "final").exists():
            problem = self._final_problem() if self.env.is_main else None
            problem = dist.broadcast_object(problem)
            if problem is None:
                self.log(f"{self.out} is already finished")
                return self.out / "final"
            self.log(f"warning: final/ fails its manifest, so it is written again from {ckpt} ({problem})")

        self.stop_requested = self._stop = False
        old_handler = None
        try:
            old_handler = signal.signal(signal.SIGTERM, self._handle_sigterm)
        except ValueError:  # not the main thread
            pass
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

    def _run_phases(self) -> str:
        while self.state.phase_index < len(self.phases):
            idx = self.state.phase_index
            phase = self.phases[idx]
            if self.state.phase_step == 0 and (phase.rope_theta or phase.local_rope_theta):
                dist.unwrap(self.model).set_rope_theta(phase.rope_theta, phase.local_rope_theta)
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
                self.log(f"stopped by SIGTERM at the end of phase {phase.name}")
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
        bs = batch_size_for(phase, phase_tokens, self.stream)
        samples = self._next_samples(bs)
        stream_state = self.stream.state_dict()
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
                self.step.count(batch)
                data_s = time.perf_counter() - t0
                step, tokens = step + 1, tokens + batch.tokens
                more = self._may_queue(step)
                if tokens < phase.tokens and more:
                    ahead.start(self._draw, phase, step + 1, tokens)
                rng = capture_rng(self.env) if self._queued is not None else None
                grads = self.step.backward(batch, phase, phase_tokens=tokens - batch.tokens, stop=self.stop_requested)
                if self._queued is not None:
                    self._rng = rng
                    self._finish(next_started=t0)
                    if self._stop:
                        self.step.discard(grads)
                        return self._interrupt()
                    self._rng = None
                self._emit("on_batch", batch.samples)
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
        self.log(f"stopped at step {self.state.step} (SIGTERM or max_steps); checkpoint {self.last_checkpoint}")
        return "interrupted"

    def _finish(self, next_started: float | None = None) -> None:
        """Read the queued step's result and make it the trainer's: the state, the metrics row (its callbacks,
        which may checkpoint), the non-finite streak (TrainingDiverged) and whether to stop. `next_started`:
        when the next step began (the row's step_s runs to it; else to now)."""
        q, self._queued = self._queued, None
        if q is None:
            return
        r = q.result.resolve()
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
        # loop's period, the throughput when the device runs ahead of the host)
        step_s = (next_started if next_started is not None else time.perf_counter()) - q.started
        row = {"step": self.state.step, "phase": q.phase.name, "tokens": self.state.tokens, "loss": r.loss,
               "lr": r.lr, "batch_size": q.batch_size, "targets": r.targets, "step_tokens": r.tokens,
               "skipped": r.skipped, "data_s": q.data_s, "compute_s": r.compute_s, "step_s": step_s}
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
        if r.stop:
            self.stop_requested = True
        # agreed by every rank: the reduced stop flag of this step, max_steps; one rank needs no agreement
        self._stop = (r.stop or self._at_max_steps(self.state.step)
                      or (self.stop_requested and not self.env.distributed))

    def _final_problem(self) -> str | None:
        """What is wrong with the finished run's final/ (its files against its MANIFEST.sha256), or None."""
        try:
            verify_manifest(self.out / "final")
        except ModelLoadError as e:
            return str(e)
        return None

    def _write_final(self) -> Path:
        final = self.out / "final"
        weights = dist.full_state_dict(self.model, keep=self.env.is_main)
        if self.env.is_main:
            model = self.bare_model
            if any(hasattr(p, "device_mesh") for p in model.parameters()):
                model = Transformer(self.bare_model.config)
                dist.load_full_state_dict(model, weights)
            remove_stale_temporaries(self.out, "final")  # left by a run killed while exporting
            card = run_summary(self.out)
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
