"""Mixtures of prepared sources, weighted by tokens, deterministic from a seed."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from twinlm.data.shards import ShardDataset
from twinlm.errors import ConfigError, DataError


class Mixture:
    """Several datasets mixed so that source s supplies `weight_s / sum(weights)` of the tokens.

    The mixture has `num_tokens` tokens in all (default: as many as the sources together). Each source
    contributes round(share_s · num_tokens / mean chunk length_s) chunks: whole seeded permutations of the
    source, repeated when it is upsampled and cut short when it is downsampled (so every chunk appears
    ⌊r⌋ or ⌈r⌉ times). The mixture is itself a dataset (len, [i], .meta); its order is shuffled by the
    BatchStream. Everything depends only on the seed.
    """

    def __init__(self, sources: Sequence[tuple[Any, float]], seed: int = 0, num_tokens: int | None = None) -> None:
        if not sources:
            raise ConfigError("a Mixture needs at least one (dataset, weight) pair")
        weights = np.asarray([float(w) for _, w in sources])
        if (weights < 0).any() or weights.sum() <= 0:
            raise ConfigError(f"mixture weights must be >= 0 with a positive sum, got {weights.tolist()}")
        self.datasets = [d for d, _ in sources]
        self.weights = weights / weights.sum()
        self.seed = seed
        fps = {getattr(d, "fingerprint", None) for d in self.datasets}
        if len(fps) > 1:
            raise DataError("mixture sources were prepared with different tokenizers: "
                            + ", ".join(f"{getattr(d, 'path', d)}={getattr(d, 'fingerprint', '?')[:12]}"
                                        for d in self.datasets)
                            + " (prepare them again with one tokenizer: `twinlm data prepare --tokenizer DIR`)")
        totals = np.asarray([_num_tokens(d) for d in self.datasets], dtype=np.float64)
        counts = np.asarray([len(d) for d in self.datasets], dtype=np.float64)
        if (counts == 0).any():
            empty = [str(getattr(d, "path", d)) for d, c in zip(self.datasets, counts) if c == 0]
            raise DataError(f"empty mixture source(s): {', '.join(empty)} (prepare them again, or drop them "
                            "from the recipe)")
        self.num_tokens_target = int(num_tokens if num_tokens is not None else totals.sum())
        mean_len = totals / counts
        self.samples_per_source = np.rint(self.weights * self.num_tokens_target / mean_len).astype(np.int64)
        src, idx = [], []
        for s, (d, n) in enumerate(zip(self.datasets, self.samples_per_source)):
            if n == 0:
                continue
            rng = np.random.default_rng([seed, 7919, s])
            reps = -(-int(n) // len(d))
            order = np.concatenate([rng.permutation(len(d)) for _ in range(reps)])[:n]
            src.append(np.full(n, s, dtype=np.int32))
            idx.append(order.astype(np.int64))
        self.source_of = np.concatenate(src)
        self.index_in_source = np.concatenate(idx)

    @classmethod
    def from_spec(cls, spec: dict[str | Path, float] | Iterable[tuple[str | Path, float]], seed: int = 0,
                  num_tokens: int | None = None, verify: bool = False) -> Mixture:
        """`{shard folder: weight, …}` (e.g. one phase of a recipe) -> Mixture of ShardDatasets."""
        items = spec.items() if isinstance(spec, dict) else spec
        return cls([(ShardDataset(p, verify=verify), w) for p, w in items], seed=seed, num_tokens=num_tokens)

    def __len__(self) -> int:
        return len(self.source_of)

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        return self.datasets[int(self.source_of[i])][int(self.index_in_source[i])]

    def locate(self, i: int) -> tuple[int, int]:
        """(source number, chunk index in that source) of mixture item i."""
        return int(self.source_of[i]), int(self.index_in_source[i])

    @property
    def num_tokens(self) -> int:
        return sum(self._tokens_of(s) for s in range(len(self.datasets)))

    @property
    def lengths(self) -> np.ndarray:
        out = np.empty(len(self), dtype=np.int64)
        for s, d in enumerate(self.datasets):
            sel = self.source_of == s
            out[sel] = np.asarray(d.lengths)[self.index_in_source[sel]] if hasattr(d, "lengths") else \
                [len(d[int(i)]) for i in self.index_in_source[sel]]
        return out

    @property
    def fingerprint(self) -> str | None:
        return getattr(self.datasets[0], "fingerprint", None)

    @property
    def meta(self) -> dict[str, Any]:
        first = getattr(self.datasets[0], "meta", {})
        return {"tokenizer": first.get("tokenizer"), "mixture": self.describe()}

    def describe(self) -> list[dict[str, Any]]:
        lengths = [self._tokens_of(s) for s in range(len(self.datasets))]
        total = sum(lengths) or 1
        return [{"source": str(getattr(d, "path", d)), "weight": float(w), "samples": int(n),
                 "tokens": int(t), "token_share": t / total}
                for d, w, n, t in zip(self.datasets, self.weights, self.samples_per_source, lengths)]

    def _tokens_of(self, s: int) -> int:
        d = self.datasets[s]
        sel = self.index_in_source[self.source_of == s]
        if hasattr(d, "lengths"):
            return int(np.asarray(d.lengths)[sel].sum())
        return int(sum(len(d[int(i)]) for i in sel))


def _num_tokens(d: Any) -> int:
    if hasattr(d, "num_tokens"):
        return int(d.num_tokens)
    return int(sum(len(d[i]) for i in range(len(d))))
