"""Seeded, reproducible draws of examples: subsets and k-fold splits."""

from __future__ import annotations

import random


def subset(items: list, limit: int | None, seed: int) -> list:
    """A seeded draw of `limit` items in their original order (all of them when `limit` is None or larger)."""
    if limit is None or limit >= len(items):
        return items
    idx = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in idx]


def kfold_indices(n: int, k: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """k (train, test) index splits of a seeded shuffle."""
    k = max(2, min(k, n))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    folds = [order[i::k] for i in range(k)]
    return [(sorted(i for j, f in enumerate(folds) if j != fi for i in f), sorted(folds[fi])) for fi in range(k)]
