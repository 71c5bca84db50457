"""The training loop: one recipe, any objective, all phases, one CPU or many GPUs.

    trainer = Trainer(recipe, "runs/enc")     # a twinlm.train.recipe.Recipe
    final = trainer.fit()                     # runs/enc/final (an HF folder); resumes by itself

One optimizer step = one global batch (`batch_size` sequences, grown by the batch-size warmup), identical for
any number of ranks: each rank takes its share, packs it into padding-free micro-batches, and the loss is
normalised by the *global* number of target tokens (sum of token losses / global target count), so neither
ranks nor micro-batches change it. Optional behaviour is in callbacks (metrics, progress bar, TensorBoard,
periodic checkpoints, eval, order recording); `Trainer.fit` only trains, checkpoints at phase ends, and
handles SIGTERM (finish the step, checkpoint, return) and non-finite losses (skip, stop after
`max_bad_steps` in a row).
"""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from twinlm.errors import TrainingDiverged
from twinlm.train import dist
from twinlm.train.checkpoint import CheckpointManager, write_json
from twinlm.train.objectives import build_objective
from twinlm.train.optim import build_optimizer
from twinlm.train.recipe import Phase, Recipe, ShardSource
from twinlm.train.schedule import batch_size as scheduled_batch_size, lr_multiplier


@dataclass
class TrainState:
    phase_index: int = 0
    phase_step: int = 0
    phase_tokens: int = 0
    step: int = 0  # optimizer steps attempted over the whole run (skipped ones included)
    tokens: int = 0  # tokens consumed over the whole run
    bad_streak: int = 0
    skipped_steps: int = 0
    checkpoint_ordinal: int = 0  # number of periodic checkpoint intervals passed
    eval_ordinal: int = 0
    stream: dict = field(default_factory=dict)  # the data stream's position in the current phase
    finished: bool = False


class Callback:
    """Hooks; every method is optional. `row` is the metrics dict of the step (callbacks may add keys)."""

    def on_train_start(self, trainer: "Trainer") -> None: ...
    def on_phase_start(self, trainer: "Trainer", phase: Phase) -> None: ...
    def on_batch(self, trainer: "Trainer", samples: list) -> None: ...
    def on_step_end(self, trainer: "Trainer", row: dict) -> None: ...
    def on_log(self, trainer: "Trainer", row: dict) -> None: ...
    def on_checkpoint(self, trainer: "Trainer", path: Path) -> None: ...
    def on_phase_end(self, trainer: "Trainer", phase: Phase) -> None: ...
    def on_train_end(self, trainer: "Trainer") -> None: ...


def _sources(recipe: Recipe, phase: Phase) -> list[ShardSource]:
    return phase.data or recipe.data


def build_dataset(sources: list[ShardSource], seed: int):
    from twinlm.data import Mixture, ShardDataset
    sets = [ShardDataset(s.path) for s in sources]
    if len(sets) == 1:
        return sets[0]
    return Mixture([(d, s.weight) for d, s in zip(sets, sources)], seed)


def git_revision(path: Path) -> dict[str, Any]:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                               capture_output=True, text=True, timeout=10)
        if rev.returncode == 0:
            return {"commit": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        pass
    return {"commit": None}


def environment(env: dist.DistEnv) -> dict[str, Any]:
    import twinlm
    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__,
                "twinlm": twinlm.__version__}
    for name in ("transformers", "tokenizers", "safetensors"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - optional packages
            versions[name] = None
    hw: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(),
                          "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "device": str(env.device), "world_size": env.world_size}
    if torch.cuda.is_available():
        hw["cuda"] = torch.version.cuda
        hw["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"versions": versions, "hardware": hw, "git": git_revision(Path(__file__).resolve().parent),
            "argv": sys.argv, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


class Trainer:
    def __init__(self, recipe: Recipe, out_dir: str | Path, *, callbacks: list[Callback] | None = None,
                 env: dist.DistEnv | None = None, log=None, default_callbacks: bool = True):
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
        self.tokenizer = None
        self.tokenizer_fingerprint = None
        self.stream = None
        self.objective = None
        self.last_checkpoint: Path | None = None
        self.interrupted = False

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
        from twinlm.data.tokenizer import load_tokenizer, tokenizer_fingerprint
        tok = load_tokenizer(src)
        return tok, tokenizer_fingerprint(tok)

    def _model_config(self):
        from twinlm.config import ModelConfig
        spec = self.recipe.model
        if self.tokenizer is not None:
            from twinlm.data.tokenizer import model_config_for
            cfg = model_config_for(self.tokenizer, spec.preset)
        else:
            cfg = ModelConfig.preset(spec.preset)
        return cfg.replace(**{**spec.overrides, "causal": self.recipe.causal})

    def _init_model(self, ckpt: Path | None):
        from twinlm.config import ModelConfig
        from twinlm.model import Transformer
        if ckpt is not None:
            cfg = ModelConfig.load(ckpt / "model_config.json")
            model = Transformer(cfg)
            dist.load_full_state_dict(model, _read_safetensors(ckpt / "model.safetensors"))
            return model
        torch.manual_seed(self.recipe.seed)
        if self.recipe.init_from:
            return self._converted_model()
        return Transformer(self._model_config())

    def _converted_model(self):
        """Cross-objective start: weights of a trained model of the other kind, converted; fresh optimizer."""
        import twinlm
        from twinlm.model import Transformer
        src = Path(self.recipe.init_from)
        target = "decoder" if self.recipe.causal else "encoder"
        if not src.exists():
            raise FileNotFoundError(f"init_from: {src} does not exist (train the source model first, or override "
                                    f"init_from=PATH)")
        loaded = twinlm.load(src)
        if bool(loaded.config.causal) != self.recipe.causal:
            conv_dir = self.out / "init"
            if self.env.is_main and not (conv_dir / "DONE").exists():
                from twinlm.convert import convert
                convert(src, to=target, out=conv_dir, overwrite=True)
                (conv_dir / "DONE").write_text(str(src) + "\n")
            dist.barrier()
            loaded = twinlm.load(conv_dir)
        # the recipe's model overrides (e.g. dropout) apply on top of the converted shape
        over = {k: v for k, v in self.recipe.model.overrides.items()}
        cfg = loaded.config.replace(**over, causal=self.recipe.causal)
        model = Transformer(cfg)
        dist.load_full_state_dict(model, {k: v.detach().cpu() for k, v in loaded.state_dict().items()})
        return model

    def _prepare_run_dir(self) -> None:
        if not self.env.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        cfg_path = self.out / "config.yaml"
        text = self.recipe.to_yaml()
        if cfg_path.exists() and _without_run_knobs(cfg_path.read_text()) != _without_run_knobs(text):
            self.log(f"warning: {cfg_path} differs from this recipe; the new one is used and saved as "
                     f"config.yaml (the old one is kept as config.previous.yaml)")
            cfg_path.replace(self.out / "config.previous.yaml")
        cfg_path.write_text(text)
        info = environment(self.env)
        if not (self.out / "env.json").exists():
            write_json(self.out / "env.json", info)
        with open(self.out / "starts.jsonl", "a") as f:
            f.write(json.dumps(info) + "\n")

    def _build_callbacks(self) -> list[Callback]:
        from twinlm.train import callbacks as cbs
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

    # --- checkpoint I/O -----------------------------------------------------------------------------
    def _optimizer_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in self.bare_model.named_parameters():
            st = self.optimizer.state.get(p)
            if not st:
                continue
            for key, value in st.items():
                if torch.is_tensor(value):
                    out[f"{name}::{key}"] = dist._full(value).contiguous()
        return out

    def _load_optimizer(self, tensors: dict[str, torch.Tensor]) -> None:
        by_param: dict[str, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            name, key = k.rsplit("::", 1)
            by_param.setdefault(name, {})[key] = v
        params = dict(self.bare_model.named_parameters())
        unknown = sorted(set(by_param) - set(params))
        if unknown:
            raise KeyError(f"optimizer state names parameters the model does not have: {unknown[:5]}")
        for name, entries in by_param.items():
            p = params[name]
            st = {}
            for key, full in entries.items():
                if full.dim() == 0:
                    st[key] = full.clone()
                elif hasattr(p, "device_mesh"):
                    from torch.distributed.tensor import distribute_tensor
                    st[key] = distribute_tensor(full.to(p.device), p.device_mesh, p.placements)
                else:
                    st[key] = full.to(p.device).clone()
            self.optimizer.state[p] = st

    def save_checkpoint(self, keep: bool = False) -> Path | None:
        """Collective: every rank calls it; rank 0 writes. Returns the folder (rank 0) or None."""
        weights = dist.full_state_dict(self.model)
        optim = self._optimizer_tensors()
        rng = {"torch": torch.get_rng_state().tolist()}
        if torch.cuda.is_available() and self.env.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.env.device).tolist()
        rngs = dist.all_gather_object(rng)
        path = None
        if self.env.is_main:
            st = asdict(self.state)
            state = {"trainer": st, "rng": rngs, "world_size": self.env.world_size,
                     "tokenizer_fingerprint": self.tokenizer_fingerprint, "keep": bool(keep),
                     "checkpoint_ordinal": self.state.checkpoint_ordinal,
                     "phase": self.phases[min(self.state.phase_index, len(self.phases) - 1)].name,
                     "recipe": self.recipe.to_dict()}
            cfg = self.bare_model.config

            def write(folder: Path) -> None:
                from safetensors.torch import save_file
                save_file(_dedupe(weights), str(folder / "model.safetensors"), metadata={"format": "pt"})
                cfg.save(folder / "model_config.json")
                save_file(optim, str(folder / "optimizer.safetensors"))

            path = self.ckpt.save(self.state.step, write, state)
            self.last_checkpoint = path
        dist.barrier()
        self._emit("on_checkpoint", self.ckpt.path_for(self.state.step))
        return path

    def _restore(self, ckpt: Path) -> None:
        state = json.loads((ckpt / "state.json").read_text())
        self.state = TrainState(**state["trainer"])
        fp = state.get("tokenizer_fingerprint")
        if fp and self.tokenizer_fingerprint and fp != self.tokenizer_fingerprint:
            raise ValueError(f"{ckpt} was trained with another tokenizer (fingerprint {fp[:12]}… vs "
                             f"{self.tokenizer_fingerprint[:12]}…)")
        self.tokenizer_fingerprint = self.tokenizer_fingerprint or fp
        self._load_optimizer(_read_safetensors(ckpt / "optimizer.safetensors"))
        rngs = state.get("rng") or []
        if len(rngs) == self.env.world_size:
            rng = rngs[self.env.rank]
            torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
            if "cuda" in rng and self.env.device.type == "cuda":
                torch.cuda.set_rng_state(torch.tensor(rng["cuda"], dtype=torch.uint8), self.env.device)
        else:
            self.log(f"note: resuming on {self.env.world_size} ranks from a checkpoint written by {len(rngs)}; "
                     "dropout RNG streams are re-seeded (data order and masking are unchanged)")
            torch.manual_seed(self.recipe.seed * 1000 + self.state.step * 17 + self.env.rank)

    # --- the loop ---------------------------------------------------------------------------------
    def _handle_sigterm(self, signum, frame) -> None:  # noqa: ARG002
        self.stop_requested = True

    def _autocast(self):
        prec = self.recipe.precision
        if prec == "auto":
            prec = "bf16" if self.env.device.type == "cuda" else "fp32"
        if prec == "bf16":
            return torch.autocast(self.env.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.env.device.type, enabled=False)

    def _objective(self, phase: Phase, eval_mask: float | None = None):
        cfg = self.bare_model.config
        specials = (cfg.cls_token_id, cfg.sep_token_id, cfg.pad_token_id, cfg.mask_token_id, cfg.unk_token_id)
        high = len(self.tokenizer) if self.tokenizer is not None else cfg.vocab_size
        return build_objective(self.recipe.objective, seed=self.recipe.seed,
                               mask_ratio=eval_mask if eval_mask is not None else phase.mask_ratio,
                               mask_token_id=cfg.mask_token_id, special_ids=specials, random_high=min(high, cfg.vocab_size))

    def _stream_for(self, phase_index: int):
        from twinlm.data import BatchStream
        phase = self.phases[phase_index]
        ds = build_dataset(_sources(self.recipe, phase), self.recipe.seed + 1000 * phase_index)
        self._check_fingerprint(ds, phase)
        return BatchStream(ds, self.recipe.seed + 1000 * phase_index, rank=self.env.rank,
                           world_size=self.env.world_size)

    def _check_fingerprint(self, ds, phase: Phase) -> None:
        metas = []
        for s in _sources(self.recipe, phase):
            try:
                metas.append((s.path, json.loads((Path(s.path) / "meta.json").read_text())))
            except (OSError, json.JSONDecodeError):
                pass
        for path, meta in metas:
            fp = (meta.get("tokenizer") or {}).get("fingerprint") if isinstance(meta.get("tokenizer"), dict) \
                else meta.get("tokenizer_fingerprint")
            if fp is None:
                continue
            if self.tokenizer_fingerprint is None:
                self.tokenizer_fingerprint = fp
            elif fp != self.tokenizer_fingerprint:
                raise ValueError(f"shards {path} were tokenized with another tokenizer (fingerprint {fp[:12]}… vs "
                                 f"{self.tokenizer_fingerprint[:12]}…): prepare them with the recipe's tokenizer")

    def _next_samples(self, bs: int) -> list:
        """This rank's share of the next global batch; a share may be empty (batch smaller than the ranks)."""
        if bs >= self.env.world_size:
            return self.stream.next_step(bs)
        ids = self.stream.peek_global(bs)[self.env.rank::self.env.world_size]
        self.stream.skip(bs)
        self.stream.step += 1
        return [(int(i), self.stream.dataset[int(i)]) for i in ids]

    def micro_batches(self, samples: list, phase: Phase):
        """Truncate to the phase's sequence length and pack into padding-free micro-batches."""
        from twinlm.data import pack
        cut = [(sid, arr[:phase.seq_len]) for sid, arr in samples]
        return pack(cut, phase.micro_batch_tokens) if cut else []

    def _dummy(self):
        cfg = self.bare_model.config
        ids = np.array([cfg.cls_token_id, cfg.sep_token_id], dtype=np.int64)
        return (torch.from_numpy(ids), torch.tensor([0, 2], dtype=torch.int32), 2,
                torch.tensor([0]), torch.tensor([cfg.sep_token_id]))

    def forward_loss(self, input_ids, cu_seqlens, max_seqlen, positions, targets) -> torch.Tensor:
        """Mean cross-entropy over this micro-batch's targets (the model's fused head + loss)."""
        dev = self.env.device
        with self._autocast():
            out = self.model(input_ids.to(dev, non_blocking=True), cu_seqlens=cu_seqlens.to(dev),
                             max_seqlen=int(max_seqlen), prediction_positions=positions.to(dev),
                             labels=targets.to(dev))
        return out.loss

    def train_step(self, phase: Phase, samples: list) -> dict:
        """One optimizer step on this rank's share of the global batch; collective across ranks."""
        t0 = time.perf_counter()
        mbs = self.micro_batches(samples, phase)
        prepared = []
        local_tokens = 0
        for mb in mbs:
            ids = np.asarray(mb.input_ids)
            cu = np.asarray(mb.cu_seqlens)
            p = self.objective.prepare(ids, cu, list(mb.sample_ids), salt=self.state.step + 1)
            prepared.append((p.input_ids, torch.as_tensor(cu, dtype=torch.int32), int(mb.max_seqlen),
                             p.positions, p.targets))
            local_tokens += len(ids)
        counts = torch.tensor([sum(int(p[4].numel()) for p in prepared), local_tokens], dtype=torch.float64)
        n_micro = torch.tensor([len(prepared)], dtype=torch.int64)
        dist.all_reduce(counts)
        dist.all_reduce(n_micro, op=torch.distributed.ReduceOp.MAX if self.env.distributed else None)
        global_targets, global_tokens = int(counts[0]), int(counts[1])
        n = int(n_micro[0])
        t_data = time.perf_counter() - t0

        lr = self.recipe.optim.lr * lr_multiplier(
            self.state.phase_tokens + global_tokens, phase.tokens, warmup_tokens=phase.schedule.warmup_tokens,
            start=phase.schedule.start, end=phase.schedule.end, decay=phase.schedule.decay,
            decay_tokens=phase.schedule.decay_tokens)
        for g in self.optimizer.param_groups:
            g["lr"] = lr

        self.model.train()
        loss_local = torch.zeros((), dtype=torch.float64, device=self.env.device)
        scale = self.env.world_size / max(global_targets, 1)  # DDP/FSDP average gradients over ranks
        for i in range(n):
            last = i == n - 1
            real = i < len(prepared)
            batch = prepared[i] if real else self._dummy()
            k = int(batch[4].numel())
            ctx = self._sync_context(last)
            with ctx:
                mean = self.forward_loss(*batch)
                weight = (k * scale) if real else 0.0
                (mean * weight).backward()
            if real:
                loss_local += mean.detach().double() * k
        t_compute = time.perf_counter() - t0 - t_data

        red = torch.stack([loss_local.cpu(), torch.tensor(float(self.stop_requested), dtype=torch.float64)])
        dist.all_reduce(red)
        loss = float(red[0]) / max(global_targets, 1)
        if red[1] > 0:
            self.stop_requested = True
        skipped = not math.isfinite(loss)
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
            self.state.bad_streak += 1
            self.state.skipped_steps += 1
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.state.bad_streak = 0
        self.state.step += 1
        self.state.phase_step += 1
        self.state.tokens += global_tokens
        self.state.phase_tokens += global_tokens
        return {"step": self.state.step, "phase": phase.name, "tokens": self.state.tokens, "loss": loss, "lr": lr,
                "batch_size": None, "targets": global_targets, "step_tokens": global_tokens,
                "skipped": skipped, "data_s": t_data, "compute_s": t_compute,
                "step_s": time.perf_counter() - t0}

    def _sync_context(self, last: bool):
        import contextlib
        m = self.model
        if last:
            if hasattr(m, "set_requires_gradient_sync"):
                m.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if hasattr(m, "no_sync"):
            return m.no_sync()
        if hasattr(m, "set_requires_gradient_sync"):
            m.set_requires_gradient_sync(False)
        return contextlib.nullcontext()

    def fit(self) -> Path:
        """Train every phase (resuming from the newest intact checkpoint); returns the final HF folder."""
        self.env = self.env or dist.init()
        self.callbacks = self._build_callbacks()
        self.ckpt = CheckpointManager(self.out / "checkpoints", self.recipe.checkpoint.keep_last,
                                      self.recipe.checkpoint.keep_every, log=self.log)
        self._prepare_run_dir()
        dist.barrier()
        self.tokenizer, self.tokenizer_fingerprint = self._load_tokenizer()

        latest = self.ckpt.latest() if self.env.is_main else None
        latest = dist.broadcast_object(str(latest) if latest else None)
        ckpt = Path(latest) if latest else None
        model = self._init_model(ckpt)
        model.to(self.env.device)
        if ckpt is None:
            first = self.phases[0]
            if first.rope_theta or first.local_rope_theta:
                dist.unwrap(model).set_rope_theta(first.rope_theta, first.local_rope_theta)
        self.model = dist.parallelize(model, self.env, mode=self.recipe.parallel, compile=self.recipe.compile,
                                      activation_checkpointing=self.recipe.activation_checkpointing)
        o = self.recipe.optim
        self.optimizer = build_optimizer(self.bare_model, lr=o.lr, betas=o.betas, eps=o.eps,
                                         weight_decay=o.weight_decay)
        if ckpt is not None:
            self._restore(ckpt)
            self.log(f"resuming from {ckpt} (step {self.state.step}, {self.state.tokens:,} tokens)")
        elif self.recipe.init_from:
            self.log(f"starting from converted weights of {self.recipe.init_from} with a fresh optimizer")
        if self.state.finished and (self.out / "final").exists():
            self.log(f"{self.out} is already finished")
            return self.out / "final"

        self.stop_requested = False
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
            self.objective = self._objective(phase)
            if self.state.phase_step == 0 and (phase.rope_theta or phase.local_rope_theta):
                dist.unwrap(self.model).set_rope_theta(phase.rope_theta, phase.local_rope_theta)
            self.stream = self._stream_for(idx)
            if self.state.stream:
                self.stream.load_state_dict(self.state.stream)
            self._emit("on_phase_start", phase)
            while self.state.phase_tokens < phase.tokens:
                bs = scheduled_batch_size(self.state.phase_tokens, full=phase.batch_size, start=phase.warmup_start,
                                          warmup_tokens=phase.batch_warmup_tokens, multiple=phase.warmup_start)
                t_read = time.perf_counter()
                samples = self._next_samples(bs)
                t_read = time.perf_counter() - t_read
                self._emit("on_batch", samples)
                row = self.train_step(phase, samples)
                row["data_s"] += t_read
                row["step_s"] += t_read
                row["batch_size"] = bs
                self.state.stream = self.stream.state_dict()
                if row["skipped"]:
                    self.log(f"warning: step {row['step']}: non-finite loss ({row['loss']}); step skipped "
                             f"({self.state.bad_streak} in a row)")
                self._emit("on_step_end", row)
                self._emit("on_log", row)
                if self.state.bad_streak >= self.recipe.max_bad_steps:
                    raise TrainingDiverged(
                        f"{self.state.bad_streak} non-finite losses in a row (max_bad_steps="
                        f"{self.recipe.max_bad_steps}) at step {self.state.step}: the run is diverging. Lower "
                        f"optim.lr, check the data, or resume from an earlier checkpoint in {self.ckpt.root}")
                if self.recipe.max_steps and self.state.step >= self.recipe.max_steps:
                    self.stop_requested = True
                if self.stop_requested:
                    if self.state.phase_tokens >= phase.tokens:
                        break  # the phase-end checkpoint below covers it
                    self.save_checkpoint()
                    self.log(f"stopped at step {self.state.step} (SIGTERM or max_steps); checkpoint {self.last_checkpoint}")
                    return "interrupted"
            self.state.phase_index += 1
            self.state.phase_step = 0
            self.state.phase_tokens = 0
            self.state.stream = {}
            self._emit("on_phase_end", phase)
            if self.state.phase_index == len(self.phases):
                self.state.finished = True
            self.save_checkpoint(keep=True)
            if self.stop_requested and not self.state.finished:
                self.log(f"stopped by SIGTERM at the end of phase {phase.name}")
                return "interrupted"
        return "done"

    def _write_final(self) -> Path:
        final = self.out / "final"
        weights = dist.full_state_dict(self.model)
        if self.env.is_main:
            import shutil
            from twinlm.model import Transformer
            model = self.bare_model
            if any(hasattr(p, "device_mesh") for p in model.parameters()):
                model = Transformer(self.bare_model.config)
                dist.load_full_state_dict(model, weights)
            tmp = self.out / ".final.tmp"
            if tmp.exists():
                shutil.rmtree(tmp)
            model.save_pretrained(tmp, tokenizer=self.tokenizer)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            self.log(f"final model: {final}")
        dist.barrier()
        return final


def _without_run_knobs(text: str) -> dict:
    """A resolved recipe minus the settings that may change between restarts without changing the run."""
    import yaml
    d = yaml.safe_load(text) or {}
    for k in ("max_steps", "progress", "tensorboard"):
        d.pop(k, None)
    return d


def _dedupe(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage: keep the first name of each tied tensor."""
    seen, out = set(), {}
    for k, v in tensors.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.numel() else (k,)
        if key in seen:
            continue
        seen.add(key)
        out[k] = v.contiguous()
    return out


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(path))
