"""The three training objectives on packed, padding-free batches.

A packed batch is a flat token stream `input_ids (N,)` of documents delimited by `cu_seqlens (D+1,)`; each
document comes with its global `sample_id`. An objective turns it into model inputs, the flat positions
where the prediction head runs, and the target token at each of them:

- `mlm` (encoder): choose each non-special token with probability `mask_ratio`; of the chosen, 80% become
  `[MASK]`, 10% a random token, 10% stay; predict the original token at the chosen positions only (the head
  runs on those positions: "sparse prediction").
- `clm` (decoder): predict token i+1 from position i inside each document; the last token of a document
  predicts nothing, so no loss crosses a document boundary.
- `mntp` (encoder trained from a decoder): MLM masking, but the token chosen at position i is predicted from
  position i−1's output (never from the previous document: the first token of a document is never chosen).

The masking draws are a pure function of (seed, salt, sample_id, position in the sample), a hash rather than
a stateful generator; the training step (train/step.py) passes the global step number as the salt. The same
sample in the same step is masked the same way on any number of ranks, in any micro-batch, and after
resuming (nothing to checkpoint), while a sample seen again in a later epoch gets a fresh mask (dynamic
masking).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised (uint64 arithmetic wraps)."""
    x = x.copy()
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


def token_hashes(seed: int, sample_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """64 random bits per (sample_id, position), a pure function of the seed (uint64 arithmetic wraps)."""
    with np.errstate(over="ignore"):
        key = _mix(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) * _GOLD)
        h = _mix(key ^ (sample_ids.astype(np.uint64) * _GOLD))
        h ^= positions.astype(np.uint64) + _GOLD
        return _mix(h)


def token_uniforms(seed: int, sample_ids: np.ndarray, positions: np.ndarray, stream: int) -> np.ndarray:
    """Uniform [0, 1) floats, one per (sample_id, position), independent across `stream`s and seeds."""
    with np.errstate(over="ignore"):
        h = token_hashes(seed ^ ((stream + 1) * 0x632BE59BD9B4E019 & 0xFFFFFFFFFFFFFFFF), sample_ids, positions)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass
class Prepared:
    input_ids: torch.Tensor  # (N,) model input (masked for mlm/mntp)
    positions: torch.Tensor  # (K,) flat indices where the head runs
    targets: torch.Tensor  # (K,) target token ids

    @property
    def num_targets(self) -> int:
        return int(self.targets.numel())


def _doc_layout(cu_seqlens: np.ndarray, sample_ids) -> tuple[np.ndarray, np.ndarray]:
    lengths: np.ndarray = np.diff(cu_seqlens.astype(np.int64))
    pos = np.arange(int(cu_seqlens[-1]), dtype=np.int64) - np.repeat(cu_seqlens[:-1].astype(np.int64), lengths)
    sid = np.repeat(np.asarray(sample_ids, dtype=np.int64), lengths)
    return sid, pos


class Objective:
    name = ""

    def __init__(self, *, seed: int, mask_ratio: float = 0.3, mask_token_id: int = 0,
                 special_ids: tuple[int, ...] = (), random_high: int = 2):
        self.seed, self.mask_ratio = int(seed), float(mask_ratio)
        self.mask_token_id = int(mask_token_id)
        self.special_ids = tuple(int(s) for s in special_ids)
        self.random_high = int(random_high)  # random replacements drawn from [0, random_high)

    def prepare(self, input_ids: np.ndarray, cu_seqlens: np.ndarray, sample_ids, salt: int = 0) -> Prepared:
        raise NotImplementedError

    def _seed(self, salt: int) -> int:
        with np.errstate(over="ignore"):
            return int(_mix(np.array([self.seed], dtype=np.uint64) * _GOLD + np.uint64(salt & 0xFFFFFFFFFFFFFFFF))[0])

    # MLM-style choice + 80/10/10 corruption; `allowed` marks positions that may be chosen
    def _mask(self, ids: np.ndarray, cu: np.ndarray, sample_ids, allowed: np.ndarray, salt: int):
        # one 64-bit hash per token: bits 40-63 choose the token (24 bits), bits 24-39 pick [MASK] / random /
        # unchanged (16 bits), bits 0-23 the random replacement (24 bits)
        sid, pos = _doc_layout(cu, sample_ids)
        h = token_hashes(self._seed(salt), sid, pos)
        threshold = np.uint64(int(round(self.mask_ratio * (1 << 24))))
        chosen = np.flatnonzero(allowed & ((h >> np.uint64(40)) < threshold))
        hc = h[chosen]
        kind = (hc >> np.uint64(24)) & np.uint64(0xFFFF)
        to_mask = chosen[kind < np.uint64(int(0.8 * (1 << 16)))]
        rnd = (kind >= np.uint64(int(0.8 * (1 << 16)))) & (kind < np.uint64(int(0.9 * (1 << 16))))
        to_random = chosen[rnd]
        corrupted = ids.copy()
        corrupted[to_mask] = self.mask_token_id
        u_tok = (hc[rnd] & np.uint64(0xFFFFFF)).astype(np.float64) * (1.0 / (1 << 24))
        corrupted[to_random] = (u_tok * self.random_high).astype(ids.dtype)
        return corrupted, chosen

    def _not_special(self, ids: np.ndarray) -> np.ndarray:
        out = np.ones(ids.shape, dtype=bool)
        for s in set(self.special_ids):
            out &= ids != s
        return out


class MLM(Objective):
    name = "mlm"

    def prepare(self, input_ids, cu_seqlens, sample_ids, salt: int = 0) -> Prepared:
        ids = np.asarray(input_ids, dtype=np.int64)
        cu = np.asarray(cu_seqlens, dtype=np.int64)
        corrupted, chosen = self._mask(ids, cu, sample_ids, self._not_special(ids), salt)
        return Prepared(torch.from_numpy(corrupted), torch.from_numpy(chosen), torch.from_numpy(ids[chosen]))


class MNTP(Objective):
    name = "mntp"

    def prepare(self, input_ids, cu_seqlens, sample_ids, salt: int = 0) -> Prepared:
        ids = np.asarray(input_ids, dtype=np.int64)
        cu = np.asarray(cu_seqlens, dtype=np.int64)
        allowed = self._not_special(ids)
        allowed[cu[:-1]] = False  # a document's first token has no previous position in its document
        corrupted, chosen = self._mask(ids, cu, sample_ids, allowed, salt)
        return Prepared(torch.from_numpy(corrupted), torch.from_numpy(chosen - 1), torch.from_numpy(ids[chosen]))


class CLM(Objective):
    name = "clm"

    def prepare(self, input_ids, cu_seqlens, sample_ids, salt: int = 0) -> Prepared:
        ids = np.asarray(input_ids, dtype=np.int64)
        cu = np.asarray(cu_seqlens, dtype=np.int64)
        keep = np.ones(len(ids), dtype=bool)
        keep[cu[1:] - 1] = False  # a document's last token predicts nothing
        positions = np.flatnonzero(keep)
        return Prepared(torch.from_numpy(ids), torch.from_numpy(positions), torch.from_numpy(ids[positions + 1]))


OBJECTIVES = {"mlm": MLM, "clm": CLM, "mntp": MNTP}


def build_objective(name: str, **kwargs) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](**kwargs)


def loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy in fp32 (the caller divides by the global target count)."""
    return torch.nn.functional.cross_entropy(logits.float(), targets.to(logits.device), reduction="sum")
