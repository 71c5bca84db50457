"""The training step: one optimizer step on one global batch, and the held-out loss. Everything here touches
the model; nothing here knows about run folders, checkpoints, callbacks or the phase loop (train/trainer.py).

`TrainStep` holds the model (maybe DDP/FSDP wrapped), the optimizer, the objective (its name and seed: a
phase's masking is built from them), the peak learning rate and the precision. The trainer hands it this
rank's share of each global batch:

    step = TrainStep(model, optimizer, env, objective="mlm", seed=0, lr=8e-4)
    result = step.train_batch(samples, phase, step=1)          # samples: [(sample_id, token array), ...]
    loss = step.eval_loss(held_out, phase, mask_ratio=0.15)

Rules of a step (collective: every rank calls it with its share, which may be empty):
- samples are cut to the phase's `seq_len` and packed, in order, into padding-free micro-batches of at most
  `micro_batch_tokens`; the objective turns each into a `MicroBatch` (inputs, head positions, targets), with
  the global step number as the masking salt;
- the loss is normalised by the *global* target count (each micro-batch's mean weighted by its targets ×
  world size / global targets; DDP and FSDP average gradients over ranks), so neither the number of ranks
  nor of micro-batches changes the update;
- every rank runs as many forward passes as the busiest one: FSDP gathers parameters collectively and DDP
  reduces gradients in the last backward, so a rank with fewer micro-batches runs a two-token dummy batch
  with weight 0; gradients are synchronised on the last pass only;
- the learning rate is the phase schedule's at the phase's tokens after this batch;
- a non-finite global loss drops the gradients and skips the update (`StepResult.skipped`); counting bad
  steps and stopping is the caller's job.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from twinlm.data import pack
from twinlm.train import dist
from twinlm.train.objectives import Objective, build_objective
from twinlm.train.schedule import lr_multiplier

if TYPE_CHECKING:
    from twinlm.train.recipe import Phase


@dataclass
class MicroBatch:
    """One forward pass: packed documents and what the head predicts."""

    input_ids: torch.Tensor  # (N,) model input (masked for mlm/mntp)
    cu_seqlens: torch.Tensor  # (D+1,) int32 document boundaries
    max_seqlen: int  # longest document
    positions: torch.Tensor  # (K,) flat indices where the head runs
    targets: torch.Tensor  # (K,) target token ids

    @property
    def num_targets(self) -> int:
        return int(self.targets.numel())

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


@dataclass
class StepResult:
    """What one `train_batch` did; counts are global (all ranks), times this rank's."""

    loss: float  # mean cross-entropy over the global batch's targets (non-finite: the step was skipped)
    lr: float
    targets: int
    tokens: int
    skipped: bool
    stop: bool  # some rank asked to stop
    data_s: float  # packing, masking and the count reduction
    compute_s: float  # forward and backward passes
    step_s: float  # the whole call


class TrainStep:
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, env: dist.DistEnv, *,
                 objective: str, seed: int, lr: float, precision: str = "auto", vocab_in_use: int | None = None):
        """`lr`: the peak learning rate; `vocab_in_use`: the tokenizer's size, when smaller than the model's
        vocabulary (random replacements of the masking are drawn below it)."""
        self.model = model
        self.optimizer = optimizer
        self.env = env
        self.objective = objective
        self.seed = seed
        self.lr = lr
        self.precision = precision
        self.vocab_in_use = vocab_in_use

    @property
    def bare_model(self) -> torch.nn.Module:
        return dist.unwrap(self.model)

    # --- batches --------------------------------------------------------------------------------------
    def objective_for(self, phase: Phase, mask_ratio: float | None = None) -> Objective:
        """The objective of `phase` (at `mask_ratio` instead of the phase's, when given)."""
        cfg = self.bare_model.config
        specials = (cfg.cls_token_id, cfg.sep_token_id, cfg.pad_token_id, cfg.mask_token_id, cfg.unk_token_id)
        high = self.vocab_in_use if self.vocab_in_use is not None else cfg.vocab_size
        return build_objective(self.objective, seed=self.seed,
                               mask_ratio=mask_ratio if mask_ratio is not None else phase.mask_ratio,
                               mask_token_id=cfg.mask_token_id, special_ids=specials,
                               random_high=min(high, cfg.vocab_size))

    def micro_batches(self, samples: Sequence, phase: Phase, objective: Objective, salt: int) -> list[MicroBatch]:
        """Cut `samples` to the phase's sequence length, pack them, and apply `objective` (masking salt `salt`)."""
        cut = [(sid, arr[:phase.seq_len]) for sid, arr in samples]
        out = []
        for packed in pack(cut, phase.micro_batch_tokens) if cut else []:
            cu = np.asarray(packed.cu_seqlens)
            p = objective.prepare(np.asarray(packed.input_ids), cu, list(packed.sample_ids), salt=salt)
            out.append(MicroBatch(p.input_ids, torch.as_tensor(cu, dtype=torch.int32), int(packed.max_seqlen),
                                  p.positions, p.targets))
        return out

    def _dummy(self) -> MicroBatch:
        cfg = self.bare_model.config
        ids = np.array([cfg.cls_token_id, cfg.sep_token_id], dtype=np.int64)
        return MicroBatch(torch.from_numpy(ids), torch.tensor([0, 2], dtype=torch.int32), 2,
                          torch.tensor([0]), torch.tensor([cfg.sep_token_id]))

    def _passes(self, batches: list[MicroBatch]) -> list[tuple[MicroBatch, bool]]:
        """(micro-batch, real) for each forward pass: as many as the busiest rank has (collective), the
        missing ones filled with dummy batches."""
        n = torch.tensor([len(batches)], dtype=torch.int64)
        if self.env.distributed:
            dist.all_reduce(n, op=torch.distributed.ReduceOp.MAX)
        return [(batches[i], True) if i < len(batches) else (self._dummy(), False) for i in range(int(n[0]))]

    # --- passes ---------------------------------------------------------------------------------------
    def _autocast(self):
        prec = self.precision
        if prec == "auto":
            prec = "bf16" if self.env.device.type == "cuda" else "fp32"
        if prec == "bf16":
            return torch.autocast(self.env.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.env.device.type, enabled=False)

    def _sync_context(self, last: bool):
        """Gradients are reduced across ranks in the last backward of a step only."""
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

    def forward_loss(self, mb: MicroBatch) -> torch.Tensor:
        """Mean cross-entropy over this micro-batch's targets (the model's fused head + loss).

        The micro-batch's tensors stay on the host: the model checks them there and copies them to its device
        through pinned memory without blocking, so the pass reads nothing back from the device."""
        with self._autocast():
            out = self.model(mb.input_ids, cu_seqlens=mb.cu_seqlens, max_seqlen=int(mb.max_seqlen),
                             prediction_positions=mb.positions, labels=mb.targets)
        return out.loss

    # --- the public API -------------------------------------------------------------------------------
    def train_batch(self, samples: Sequence, phase: Phase, *, step: int, phase_tokens: int = 0,
                    stop: bool = False) -> StepResult:
        """One optimizer step on this rank's share of a global batch (collective across ranks).

        `step`: the global step number (1-based), the masking salt; `phase_tokens`: tokens of `phase` trained
        before this batch (the schedule's position); `stop`: this rank asks to stop (the result's `stop` is
        true when any rank did).
        """
        t0 = time.perf_counter()
        batches = self.micro_batches(samples, phase, self.objective_for(phase), salt=step)
        counts = torch.tensor([sum(b.num_targets for b in batches), sum(b.num_tokens for b in batches)],
                              dtype=torch.float64)
        dist.all_reduce(counts)
        global_targets, global_tokens = int(counts[0]), int(counts[1])
        passes = self._passes(batches)
        t_data = time.perf_counter() - t0

        s = phase.schedule
        lr = self.lr * lr_multiplier(phase_tokens + global_tokens, phase.tokens, warmup_tokens=s.warmup_tokens,
                                     start=s.start, end=s.end, decay=s.decay, decay_tokens=s.decay_tokens)
        for g in self.optimizer.param_groups:
            g["lr"] = lr

        self.model.train()
        loss_local = torch.zeros((), dtype=torch.float64, device=self.env.device)
        scale = self.env.world_size / max(global_targets, 1)
        for i, (mb, real) in enumerate(passes):
            k = mb.num_targets
            with self._sync_context(last=i == len(passes) - 1):
                mean = self.forward_loss(mb)
                (mean * ((k * scale) if real else 0.0)).backward()
            if real:
                loss_local += mean.detach().double() * k
        t_compute = time.perf_counter() - t0 - t_data

        # the step's one device->host read, after every backward is queued: the summed loss and the stop flag
        red = torch.stack([loss_local, torch.tensor(float(stop), dtype=torch.float64, device=loss_local.device)])
        dist.all_reduce(red)
        red = red.tolist()
        loss = red[0] / max(global_targets, 1)
        skipped = not math.isfinite(loss)
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=loss, lr=lr, targets=global_targets, tokens=global_tokens, skipped=skipped,
                          stop=red[1] > 0, data_s=t_data, compute_s=t_compute,
                          step_s=time.perf_counter() - t0)

    @torch.no_grad()
    def eval_loss(self, samples: Sequence, phase: Phase, mask_ratio: float) -> float:
        """Mean cross-entropy over the targets of all ranks' `samples` (this rank's share), masked at
        `mask_ratio` with a fixed salt (the same masks at every evaluation); collective across ranks. The
        weights and the optimizer are left as they are; the model is left in training mode."""
        objective = self.objective_for(phase, mask_ratio)
        batches = [b for b in self.micro_batches(samples, phase, objective, salt=0) if b.num_targets]
        passes = self._passes(batches)
        total = torch.zeros(2, dtype=torch.float64)
        self.model.eval()
        for mb, real in passes:
            loss = self.forward_loss(mb)
            if real:
                k = mb.num_targets
                total += torch.tensor([float(loss) * k, k], dtype=torch.float64)
        self.model.train()
        dist.all_reduce(total)
        return float(total[0] / max(total[1], 1))
