"""One global, seeded sample order sliced across ranks; padding-free packing.

The order is a sequence of epochs; epoch e is a permutation of the dataset drawn from (seed, e) only.
Step k's global batch is the next `global_batch_size` samples of that sequence, whatever the number of
ranks; rank r takes the samples at positions r, r + world_size, … of the batch. The stream's state is
the number of global samples consumed, so a run resumes at the same sample on any cluster size and the
batches after a resume are the batches it would have seen without one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from twinlm.errors import ConfigError, DataError


class BatchStream:
    """`next_step(global_batch_size)` -> this rank's share of the next global batch: [(sample_id, tokens)].

    sample_id is the dataset index of the sample (`dataset[sample_id]` gives its tokens back).
    `global_batch_size` may change every step (batch-size warmup); the trainer passes it each time.

    The stream interface, shared with data/order.py's ReplayStream (the trainer and train/plan.py use only
    this): `next_batch_size(scheduled)` (the size of the next global batch: here the schedule's), `next_step(bs,
    empty_shares=…)`, `next_global(bs)` / `next_global_lengths(bs)` (the whole global batch, or its ids and
    lengths without reading tokens, for planning), `state_dict` / `load_state_dict`.
    """

    def __init__(self, dataset: Any, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if len(dataset) == 0:
            raise DataError("BatchStream over an empty dataset")
        self.dataset = dataset
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.position = 0      # global samples consumed
        self.step = 0          # next_step calls made
        self._perms: dict[int, np.ndarray] = {}
        self._lengths: np.ndarray | None = None  # the dataset's sample lengths, read on first use

    # --- order ---------------------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> np.ndarray:
        """The dataset indices of epoch `epoch`, in order (depends on seed and epoch only)."""
        cache = self._perms
        if epoch not in cache:
            n = len(self.dataset)
            if self.shuffle:
                cache[epoch] = np.random.default_rng([self.seed, 104729, epoch]).permutation(n)
            else:
                cache[epoch] = np.arange(n)
            for old in sorted(cache)[:-2]:  # keep the two latest epochs (a batch may span a boundary)
                del cache[old]
        return cache[epoch]

    def global_ids(self, start: int, count: int) -> np.ndarray:
        """Sample ids at global positions [start, start + count) of the order."""
        n = len(self.dataset)
        out = np.empty(count, dtype=np.int64)
        filled = 0
        pos = start
        while filled < count:
            epoch, offset = divmod(pos, n)
            take = min(count - filled, n - offset)
            out[filled:filled + take] = self.epoch_order(epoch)[offset:offset + take]
            filled += take
            pos += take
        return out

    @property
    def epoch(self) -> int:
        return self.position // len(self.dataset)

    # --- stepping ------------------------------------------------------------------------------------
    def next_batch_size(self, scheduled: int) -> int:
        """The size of the next global batch: the schedule's (`scheduled`)."""
        return int(scheduled)

    def next_step(self, global_batch_size: int, *, empty_shares: bool = False) -> list[tuple[int, np.ndarray]]:
        """This rank's share of the next global batch. A batch smaller than the ranks leaves some shares empty:
        allowed with `empty_shares` (the trainer: the step still counts on every rank), else a ConfigError."""
        if global_batch_size < self.world_size and not empty_shares:
            raise ConfigError(f"global batch size {global_batch_size} is smaller than world_size {self.world_size}: "
                              "every rank needs at least one sample")
        mine = self._advance(global_batch_size)[self.rank::self.world_size]
        return [(int(i), self.dataset[int(i)]) for i in mine]

    def next_global(self, global_batch_size: int) -> list[tuple[int, np.ndarray]]:
        """The whole next global batch (every rank's share, in global order), consumed."""
        return [(int(i), self.dataset[int(i)]) for i in self._advance(global_batch_size)]

    def next_global_lengths(self, global_batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """The next global batch's sample ids and lengths in tokens, consumed, without reading its tokens."""
        if self._lengths is None:
            self._lengths = np.asarray(self.dataset.lengths)
        ids = self._advance(global_batch_size)
        return ids, self._lengths[ids]

    def _advance(self, global_batch_size: int) -> np.ndarray:
        """The next global batch's sample ids; the stream moves past them (one step)."""
        ids = self.global_ids(self.position, int(global_batch_size))
        self.position += int(global_batch_size)
        self.step += 1
        return ids

    def peek_global(self, global_batch_size: int) -> np.ndarray:
        """The sample ids of the next global batch (all ranks), without consuming it."""
        return self.global_ids(self.position, int(global_batch_size))

    # --- resume --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"position": int(self.position), "step": int(self.step), "seed": self.seed,
                "dataset_len": len(self.dataset), "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") == "replay":
            raise ConfigError(f"the checkpoint's phase replayed the order folder {state.get('order')}, the recipe now "
                              "reads shards: restore the recipe's data, or train into a new run folder")
        if int(state["seed"]) != self.seed:
            raise ConfigError(f"data order seed {state['seed']} in the checkpoint differs from this stream's "
                              f"{self.seed}")
        if int(state.get("dataset_len", len(self.dataset))) != len(self.dataset):
            raise ConfigError(f"the checkpoint's data had {state['dataset_len']} samples, this dataset has "
                              f"{len(self.dataset)}: resuming would not replay the same order")
        self.position = int(state["position"])
        self.step = int(state.get("step", 0))


@dataclass
class PackedBatch:
    """A padding-free micro-batch: documents laid end to end.

    input_ids: (N,) torch.long; cu_seqlens: (D+1,) torch.int32 document boundaries; max_seqlen: longest
    document; sample_ids: the dataset index of each document.
    """
    input_ids: Any
    cu_seqlens: Any
    max_seqlen: int
    sample_ids: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def sequences(self) -> list[Any]:
        cu = self.cu_seqlens.tolist()
        return [self.input_ids[cu[i]:cu[i + 1]] for i in range(len(cu) - 1)]

    def to(self, device: Any) -> PackedBatch:
        return PackedBatch(self.input_ids.to(device, non_blocking=True), self.cu_seqlens.to(device, non_blocking=True),
                           self.max_seqlen, list(self.sample_ids))


def pack(samples: Sequence[tuple[int, np.ndarray]], max_tokens: int) -> list[PackedBatch]:
    """Pack samples, in order, into micro-batches of at most `max_tokens` tokens (a sample longer than that
    is an error: raise the budget or prepare shorter chunks)."""
    import torch  # imported where a batch is built: `import twinlm.data` stays light (no torch)
    batches: list[PackedBatch] = []
    cur: list[tuple[int, np.ndarray]] = []
    used = 0

    def emit() -> None:
        flat = np.concatenate([np.asarray(t, dtype=np.int64) for _, t in cur])
        lens = [len(t) for _, t in cur]
        cu = np.zeros(len(lens) + 1, dtype=np.int32)
        np.cumsum(lens, out=cu[1:])
        batches.append(PackedBatch(torch.from_numpy(flat), torch.from_numpy(cu), int(max(lens)), [i for i, _ in cur]))

    for sid, toks in samples:
        n = len(toks)
        if n > max_tokens:
            raise ConfigError(f"sample {sid} has {n} tokens, more than the micro-batch budget of {max_tokens} "
                              "(raise the budget or prepare shorter chunks)")
        if n == 0:
            continue
        if used + n > max_tokens and cur:
            emit()
            cur, used = [], 0
        cur.append((sid, toks))
        used += n
    if cur:
        emit()
    return batches
