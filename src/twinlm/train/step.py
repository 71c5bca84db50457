"""The training step: one optimizer step on one global batch, and the held-out loss. Everything here touches
the model; nothing here knows about run folders, checkpoints, callbacks or the phase loop (train/trainer.py).

`TrainStep` holds the model (maybe DDP/FSDP wrapped), the optimizer, the objective (its name and seed: a
phase's masking is built from them), the peak learning rate and the precision. The trainer hands it this
rank's share of each global batch:

    step = TrainStep(model, optimizer, env, objective="mlm", seed=0, lr=8e-4)
    result = step.train_batch(samples, phase, step=1)          # samples: [(sample_id, token array), ...]
    loss = step.eval_loss(held_out, phase, mask_ratio=0.15)

`train_batch` is four calls, which the trainer makes one by one to keep the device busy:

    batch = step.prepare(samples, phase, step=1)   # host only, thread-safe: cut, pack, mask (pinned on CUDA)
    step.count(batch)                              # collective: the global target/token counts, the passes
    grads = step.backward(batch, phase)            # the passes are queued; gradients accumulate
    result = step.update(grads)                    # the update is queued (or step.discard(grads))

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
- a non-finite global loss skips the update (`StepResult.skipped`) and drops the gradients; counting bad
  steps and stopping is the caller's job.

No host read on the hot path. The counts are host numbers (an all-reduce of host values with several
ranks; none with one). The global loss sum and the two flags (ranks asking to stop, ranks asking for a
checkpoint) are all-reduced on the device; whether the loss
is finite is decided there too and handed to the optimizer (`StableAdamW.step(found_inf=)` skips exactly),
so a step queues all of its work without waiting for any of it. The result's loss and flags (skipped,
stop, checkpoint) are copied back without blocking and read when the caller asks for them
(`StepResult.resolve`): the trainer does so for step k once step k+1's passes are queued, so the device
never waits for the host. The stop and checkpoint flags are read that late too: both are exact all the
same, because every rank reads the same reduced flags of the same step and acts after it (the trainer's
docstring): this is how ranks whose clocks differ agree on a deadline or a checkpoint by time without a
synchronisation of their own. With an optimizer that takes no
`found_inf` (torch's SGD in tests), `update` reads the loss before stepping, as it once did always.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from twinlm.data import pack
from twinlm.train import dist
from twinlm.train.objectives import Objective, build_objective
from twinlm.train.schedule import lr_multiplier
from twinlm.train.static import pad_packed, target_capacity

if TYPE_CHECKING:
    from twinlm.config import ModelConfig
    from twinlm.train.optim import StableAdamW
    from twinlm.train.recipe import Phase


@dataclass
class MicroBatch:
    """One forward pass: packed documents and what the head predicts."""

    input_ids: torch.Tensor  # (N,) model input (masked for mlm/mntp)
    cu_seqlens: torch.Tensor  # (D+1,) int32 document boundaries
    max_seqlen: int  # longest document
    positions: torch.Tensor  # (K,) flat indices where the head runs
    targets: torch.Tensor  # (K,) target token ids
    real_targets: int | None = None  # with static shapes (train/static.py): the targets that are not padding
    real_tokens: int | None = None  # and the tokens

    @property
    def num_targets(self) -> int:
        """The targets the loss averages over (padding excluded)."""
        return int(self.targets.numel()) if self.real_targets is None else self.real_targets

    @property
    def num_tokens(self) -> int:
        """The tokens trained on (padding excluded)."""
        return int(self.input_ids.numel()) if self.real_tokens is None else self.real_tokens


@dataclass
class Batch:
    """This rank's share of one global batch, ready for the passes (`TrainStep.prepare`), and once counted
    (`TrainStep.count`) the global numbers. Host tensors only, pinned when the device is CUDA."""

    samples: list  # [(sample_id, tokens)] as drawn, before cutting (what the batch-order record keeps)
    micro: list[MicroBatch]
    step: int  # the global step number (the masking salt)
    prepare_s: float = 0.0  # cutting, packing, masking
    targets: int | None = None  # global (all ranks), set by count
    tokens: int | None = None
    passes: int | None = None  # forward passes every rank runs (the busiest rank's micro-batches)
    count_s: float = 0.0

    @property
    def local_targets(self) -> int:
        return sum(b.num_targets for b in self.micro)

    @property
    def local_tokens(self) -> int:
        return sum(b.num_tokens for b in self.micro)


@dataclass
class Gradients:
    """A step whose passes are queued (`TrainStep.backward`): the gradients accumulate, no update yet."""

    lr: float
    targets: int  # global
    tokens: int  # global
    totals: torch.Tensor  # (3,) float64 on the device, all-reduced: summed loss, ranks asking to stop, ranks
    #                       asking for a checkpoint
    data_s: float
    compute_s: float
    started: float  # perf_counter at the backward's start, minus the batch's preparation time


@dataclass
class StepResult:
    """What one optimizer step did; counts are global (all ranks), times this rank's host times.

    `loss`, `skipped`, `stop` and `checkpoint` are device values until first read: reading one (or
    `resolve()`) waits for this step's update to be done and takes four numbers copied back to pinned memory
    without blocking.
    Nothing else here touches the device."""

    lr: float
    targets: int
    tokens: int
    data_s: float  # packing, masking and the count reduction
    compute_s: float  # queuing (on the CPU: running) the forward and backward passes
    step_s: float  # the whole step on the host, up to its update being queued
    # (loss sum, stop, skipped, checkpoint) float64 on the host, maybe in flight
    _host: Any = field(default=None, repr=False)
    _ready: Any = field(default=None, repr=False)  # a CUDA event recorded after the copy; None when none is needed
    # (loss, skipped, stop, checkpoint) once read
    _read: tuple[float, bool, bool, bool] | None = field(default=None, repr=False)

    def resolve(self) -> StepResult:
        """Read the step's loss and flags (once; waits for the step on the device)."""
        if self._read is None:
            if self._ready is not None:
                self._ready.synchronize()
            loss_sum, stop, skipped, checkpoint = self._host.tolist()
            self._read = (loss_sum / max(self.targets, 1), skipped > 0, stop > 0, checkpoint > 0)
            self._host = self._ready = None
        return self

    @property
    def resolved(self) -> bool:
        return self._read is not None

    def _values(self) -> tuple[float, bool, bool, bool]:
        """(loss, skipped, stop, checkpoint), read once."""
        read = self.resolve()._read
        assert read is not None  # resolve() sets it
        return read

    @property
    def loss(self) -> float:
        """Mean cross-entropy over the global batch's targets (non-finite: the step was skipped)."""
        return self._values()[0]

    @property
    def skipped(self) -> bool:
        return self._values()[1]

    @property
    def stop(self) -> bool:
        """Some rank asked to stop."""
        return self._values()[2]

    @property
    def checkpoint(self) -> bool:
        """Some rank asked for a checkpoint of this step."""
        return self._values()[3]


class TrainStep:
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, env: dist.DistEnv, *,
                 objective: str, seed: int, lr: float, precision: str = "auto", vocab_in_use: int | None = None,
                 static_shapes: bool = False, cuda_graphs: bool = False):
        """`lr`: the peak learning rate; `vocab_in_use`: the tokenizer's size, when smaller than the model's
        vocabulary (random replacements of the masking are drawn below it); `static_shapes`: pad every
        micro-batch to its phase's fixed sizes (train/static.py), for a graph compiled once; `cuda_graphs`: the
        model replays CUDA graphs, whose gradient outputs a later pass overwrites, so gradients are accumulated
        into buffers kept across steps (allocated once, zeroed in place) instead of taking a pass's output."""
        self.static_shapes = static_shapes or cuda_graphs
        self.cuda_graphs = cuda_graphs
        self.model = model
        self.optimizer = optimizer
        self.env = env
        self.objective = objective
        self.seed = seed
        self.lr = lr
        self.precision = precision
        self.vocab_in_use = vocab_in_use
        # StableAdamW skips on the device; another optimizer (torch's SGD in tests) needs the loss read first
        self._skips_on_device = "found_inf" in inspect.signature(optimizer.step).parameters

    @property
    def bare_model(self) -> torch.nn.Module:
        return dist.unwrap(self.model)

    # --- batches --------------------------------------------------------------------------------------
    def objective_for(self, phase: Phase, mask_ratio: float | None = None) -> Objective:
        """The objective of `phase` (at `mask_ratio` instead of the phase's, when given)."""
        cfg = cast("ModelConfig", self.bare_model.config)
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
            out.append(self._shaped(MicroBatch(p.input_ids, torch.as_tensor(cu, dtype=torch.int32),
                                               int(packed.max_seqlen), p.positions, p.targets), phase,
                                    getattr(objective, "mask_ratio", None)))
        return out

    def _shaped(self, mb: MicroBatch, phase: Phase, mask_ratio: float | None = None) -> MicroBatch:
        """`mb` padded to the phase's static shapes when the step has them (train/static.py), else `mb`;
        `mask_ratio`: the masking's, when not the phase's (evaluation)."""
        if not self.static_shapes:
            return mb
        cfg = cast("ModelConfig", self.bare_model.config)
        ratio = None if self.objective == "clm" else (mask_ratio if mask_ratio is not None else phase.mask_ratio)
        ids, cu, max_seqlen, pos, tgt = pad_packed(mb.input_ids, mb.cu_seqlens, mb.positions, mb.targets,
                                                   tokens=phase.micro_batch_tokens, seq_len=phase.seq_len,
                                                   pad_id=cfg.pad_token_id,
                                                   targets_to=target_capacity(phase.micro_batch_tokens, ratio))
        return MicroBatch(ids, cu, max_seqlen, pos, tgt, real_targets=mb.num_targets, real_tokens=mb.num_tokens)

    def _dummy(self, phase: Phase) -> MicroBatch:
        cfg = cast("ModelConfig", self.bare_model.config)
        ids = np.array([cfg.cls_token_id, cfg.sep_token_id], dtype=np.int64)
        return self._shaped(MicroBatch(torch.from_numpy(ids), torch.tensor([0, 2], dtype=torch.int32), 2,
                                       torch.tensor([0]), torch.tensor([cfg.sep_token_id])), phase)

    def _passes(self, batches: list[MicroBatch], phase: Phase,
                passes: int | None = None) -> list[tuple[MicroBatch, bool]]:
        """(micro-batch, real) for each forward pass: as many as the busiest rank has (`passes`, else found
        here: collective), the missing ones filled with dummy batches (of the phase's static shapes, if any)."""
        if passes is None:
            passes = self._max_passes(len(batches))
        return [(batches[i], True) if i < len(batches) else (self._dummy(phase), False) for i in range(passes)]

    def _max_passes(self, mine: int) -> int:
        if not self.env.distributed:
            return mine
        n = torch.tensor([mine], dtype=torch.int64)
        dist.all_reduce(n, op=torch.distributed.ReduceOp.MAX)
        return int(n[0])

    # --- passes ---------------------------------------------------------------------------------------
    def _autocast(self):
        if dist.resolve_precision(self.precision, self.env.device) == "bf16":
            return torch.autocast(self.env.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.env.device.type, enabled=False)

    def _sync_context(self, last: bool):
        """Gradients are reduced across ranks in the last backward of a step only."""
        m: Any = self.model  # the wrappers' own methods (DDP's no_sync, FSDP's set_requires_gradient_sync)
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
        if self.static_shapes:  # a new pass: CUDA graphs may reuse the last one's buffers (the loss was consumed)
            torch.compiler.cudagraph_mark_step_begin()
        with self._autocast():
            out = self.model(mb.input_ids, cu_seqlens=mb.cu_seqlens, max_seqlen=int(mb.max_seqlen),
                             prediction_positions=mb.positions, labels=mb.targets)
        return out.loss

    # --- the public API -------------------------------------------------------------------------------
    def prepare(self, samples: Sequence, phase: Phase, *, step: int) -> Batch:
        """This rank's share of step `step`'s global batch as micro-batches (cut, packed, masked with salt
        `step`), on the host; pinned when the device is CUDA, so the passes copy it without blocking. Touches
        neither the model nor the device: safe on a background thread while a step runs."""
        t0 = time.perf_counter()
        micro = self.micro_batches(samples, phase, self.objective_for(phase), salt=step)
        if self.env.device.type == "cuda":
            micro = [MicroBatch(b.input_ids.pin_memory(), b.cu_seqlens.pin_memory(), b.max_seqlen,
                                b.positions.pin_memory(), b.targets.pin_memory(), b.real_targets, b.real_tokens)
                     for b in micro]
        return Batch(list(samples), micro, step, prepare_s=time.perf_counter() - t0)

    def count(self, batch: Batch) -> Batch:
        """Fill in the batch's global target and token counts and the number of passes (collective: host
        values reduced across ranks; with one rank nothing is reduced). Returns `batch`."""
        t0 = time.perf_counter()
        targets, tokens, passes = batch.local_targets, batch.local_tokens, len(batch.micro)
        if self.env.distributed:
            counts = torch.tensor([targets, tokens], dtype=torch.float64)
            dist.all_reduce(counts)
            targets, tokens = int(counts[0]), int(counts[1])
            passes = self._max_passes(passes)
        batch.targets, batch.tokens, batch.passes = targets, tokens, passes
        batch.count_s = time.perf_counter() - t0
        return batch

    def backward(self, batch: Batch, phase: Phase, *, phase_tokens: int = 0, stop: bool = False,
                 checkpoint: bool = False) -> Gradients:
        """Queue the batch's forward and backward passes (collective) and the all-reduce of the loss sum and
        of the two flags; reads nothing back. `phase_tokens`: tokens of `phase` trained before this batch
        (the schedule's position); `stop`: this rank asks to stop; `checkpoint`: this rank asks for a
        checkpoint of this step."""
        if batch.targets is None:
            self.count(batch)
        assert batch.targets is not None and batch.tokens is not None  # set by count
        t0 = time.perf_counter()
        s = phase.schedule
        lr = self.lr * lr_multiplier(phase_tokens + batch.tokens, phase.tokens, warmup_tokens=s.warmup_tokens,
                                     start=s.start, end=s.end, decay=s.decay, decay_tokens=s.decay_tokens)
        passes = self._passes(batch.micro, phase, batch.passes)
        if self.cuda_graphs:
            self._keep_grads()
        self.model.train()
        device = self.env.device
        loss_local = torch.zeros((), dtype=torch.float64, device=device)
        scale = self.env.world_size / max(batch.targets, 1)
        for i, (mb, real) in enumerate(passes):
            k = mb.num_targets
            with self._sync_context(last=i == len(passes) - 1):
                mean = self.forward_loss(mb)
                (mean * ((k * scale) if real else 0.0)).backward()
            if real:
                loss_local += mean.detach().double() * k
        # filled on the device (torch.tensor(x, device=) would copy from the host, and wait for it)
        totals = torch.stack([loss_local, torch.full((), float(stop), dtype=torch.float64, device=device),
                              torch.full((), float(checkpoint), dtype=torch.float64, device=device)])
        dist.all_reduce(totals)
        data_s = batch.prepare_s + batch.count_s
        return Gradients(lr=lr, targets=batch.targets, tokens=batch.tokens, totals=totals, data_s=data_s,
                         compute_s=time.perf_counter() - t0, started=t0 - data_s)

    def update(self, grads: Gradients) -> StepResult:
        """Queue the optimizer step at the batch's learning rate, skipped on the device when the global loss
        is not finite, and drop the gradients. The result's loss and flags are read when asked for."""
        for g in self.optimizer.param_groups:
            g["lr"] = grads.lr
        loss_sum, stop, checkpoint = grads.totals[0], grads.totals[1], grads.totals[2]
        found_inf = ~torch.isfinite(loss_sum)
        read = None
        if self._skips_on_device:
            cast("StableAdamW", self.optimizer).step(found_inf=found_inf)  # its step takes found_inf
        else:
            loss_sum_, stop_, checkpoint_ = grads.totals.tolist()  # the one host read this optimizer costs
            skipped = not math.isfinite(loss_sum_)
            if not skipped:
                self.optimizer.step()
            read = (loss_sum_ / max(grads.targets, 1), skipped, stop_ > 0, checkpoint_ > 0)
        self.optimizer.zero_grad(set_to_none=not self.cuda_graphs)
        host, ready = None, None
        if read is None:
            values = torch.stack([loss_sum, stop, found_inf.to(torch.float64), checkpoint])
            if values.device.type == "cuda":
                host = torch.empty(4, dtype=torch.float64, pin_memory=True)
                host.copy_(values, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record()
            else:
                host = values
        return StepResult(lr=grads.lr, targets=grads.targets, tokens=grads.tokens, data_s=grads.data_s,
                          compute_s=grads.compute_s, step_s=time.perf_counter() - grads.started,
                          _host=host, _ready=ready, _read=read)

    def discard(self, grads: Gradients) -> None:  # noqa: ARG002 - the gradients are those of `grads`
        """Drop a step's gradients without an update (the caller stops before it)."""
        self.optimizer.zero_grad(set_to_none=not self.cuda_graphs)

    def _keep_grads(self) -> None:
        """Give every trainable parameter a gradient buffer of its own (once), so that autograd adds each pass's
        gradient into it rather than keeping a CUDA graph's output buffer as `.grad`."""
        for p in self.bare_model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)

    def train_batch(self, samples: Sequence, phase: Phase, *, step: int, phase_tokens: int = 0,
                    stop: bool = False, checkpoint: bool = False) -> StepResult:
        """One optimizer step on this rank's share of a global batch (collective across ranks): `prepare`,
        `count`, `backward`, `update`.

        `step`: the global step number (1-based), the masking salt; `phase_tokens`: tokens of `phase` trained
        before this batch (the schedule's position); `stop`: this rank asks to stop (the result's `stop` is
        true when any rank did), `checkpoint` likewise. Reads nothing from the device: the result is read
        when asked for.
        """
        batch = self.count(self.prepare(samples, phase, step=step))
        return self.update(self.backward(batch, phase, phase_tokens=phase_tokens, stop=stop, checkpoint=checkpoint))

    @torch.no_grad()
    def eval_loss(self, samples: Sequence, phase: Phase, mask_ratio: float) -> float:
        """Mean cross-entropy over the targets of all ranks' `samples` (this rank's share), masked at
        `mask_ratio` with a fixed salt (the same masks at every evaluation); collective across ranks. The
        weights and the optimizer are left as they are; the model is left in training mode."""
        objective = self.objective_for(phase, mask_ratio)
        batches = [b for b in self.micro_batches(samples, phase, objective, salt=0) if b.num_targets]
        passes = self._passes(batches, phase)
        total = torch.zeros(2, dtype=torch.float64)
        self.model.eval()
        for mb, real in passes:
            loss = self.forward_loss(mb)
            if real:
                k = mb.num_targets
                total += torch.tensor([float(loss) * k, k], dtype=torch.float64)
        self.model.train()
        dist.all_reduce(total)
        return float(total[0] / max(float(total[1]), 1))
