"""Evaluation across processes: under `torchrun`, each rank takes a share of a track's work, the shares are
gathered, and rank 0 alone writes.

`ranks()` is this process's place: rank 0 of 1 when it runs alone; under torchrun (WORLD_SIZE > 1 in the
environment) it joins the job's process group (a gloo group: what ranks exchange is Python objects, results
and scores, never tensors of the model, so the host backend serves GPUs and CPUs alike and crosses nodes).
When a process group already exists (NCCL, from training) a gloo group beside it is made once and reused.

A track divides its work into units whose order is fixed (the same on every rank), takes `mine(units)` or
`assign(costs)` for its share, computes those, and calls `collect(n, done)` to get every unit's result back
in order, on every rank. The result then equals one process's (each unit is computed the same way wherever it
runs; the tests compare the result files of two gloo ranks and one process), and `writes` says whether this
rank writes the file.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch.distributed as dist

from twinlm.errors import ConfigError

T = TypeVar("T")
_GLOO: Any = None  # the gloo group made beside an existing non-gloo default group
# how long a rank waits for the others at a gather: a rank done early waits while another runs a whole fine-tuning
# or a 1B model's generative tasks (torch's default, 30 minutes, would end such a job)
WAIT = timedelta(hours=24)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    group: Any = None  # the gloo process group the ranks exchange objects over (None: the default group)

    @property
    def writes(self) -> bool:
        """Whether this rank writes results (rank 0)."""
        return self.rank == 0

    def mine(self, units: Sequence[T]) -> list[int]:
        """Indices of this rank's units: every `world`-th, from `rank` (equal-cost units)."""
        return list(range(self.rank, len(units), self.world))

    def assign(self, costs: Sequence[float]) -> list[int]:
        """Indices of this rank's units when they cost unequally: longest first, each to the rank with the least
        work so far (ties to the lower rank); the same assignment on every rank, in input order."""
        load = [0.0] * self.world
        owner = [0] * len(costs)
        for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            r = min(range(self.world), key=lambda r: (load[r], r))
            owner[i] = r
            load[r] += costs[i]
        return [i for i in range(len(costs)) if owner[i] == self.rank]

    def gather(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order, on every rank (`[obj]` alone)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: T, src: int) -> T:
        """Rank `src`'s `obj` on every rank (`obj` alone): what one rank computed and the others need whole."""
        if self.world == 1:
            return obj
        box: list[Any] = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def collect(self, n: int, done: Mapping[int, T]) -> list[T]:
        """The results of units 0..n-1 from `done` ({unit index: result}, this rank's share) on every rank;
        a unit no rank computed is a bug (an error naming it, never a hole in the result)."""
        merged: dict[int, T] = {}
        for part in self.gather(dict(done)):
            merged.update(part)
        missing = [i for i in range(n) if i not in merged]
        if missing:
            raise RuntimeError(f"units {missing[:5]} of {n} were computed by no rank")
        return [merged[i] for i in range(n)]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.group)


def _close() -> None:
    if not dist.is_initialized():
        return
    if dist.get_world_size() > 1:
        # the ranks close together: a rank whose peers' gloo connections close under it while it is still
        # tearing down can abort ("terminate called without an active exception", rarely, in the two-rank tests);
        # a peer that has already gone (a failed rank) is waited for one minute at most
        try:
            dist.monitored_barrier(group=_GLOO, timeout=timedelta(seconds=60))
        except Exception:  # noqa: BLE001 - leaving anyway: the barrier only orders the exits
            pass
    dist.destroy_process_group()


def ranks() -> Ranks:
    """This process's place in the evaluation: alone, or one rank of torchrun's job (joined here)."""
    global _GLOO
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if not dist.is_available() or (env_world <= 1 and not dist.is_initialized()):
        return Ranks()
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise ConfigError("WORLD_SIZE is set but MASTER_ADDR is not: start the ranks with torchrun "
                              "(torchrun --nproc_per_node N -m twinlm eval …)")
        dist.init_process_group("gloo", timeout=WAIT)
        # a process that leaves with its gloo group open may abort in the group's threads ("terminate called
        # without an active exception"): the group it made is closed on the way out
        atexit.register(_close)
    world = dist.get_world_size()
    if world == 1:
        return Ranks()
    group = None
    if dist.get_backend() != "gloo":
        if _GLOO is None:
            _GLOO = dist.new_group(backend="gloo", timeout=WAIT)
        group = _GLOO
    return Ranks(dist.get_rank(), world, group)


__all__ = ["Ranks", "ranks"]
