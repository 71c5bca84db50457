"""The shard data a recipe names: one folder is read as it is, several become a weighted Mixture."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twinlm.data import Mixture, ShardDataset

if TYPE_CHECKING:
    from twinlm.train.recipe import Phase, Recipe


def phase_sources(recipe: Recipe, phase: Phase) -> list:
    """The phase's own `data`, else the recipe's."""
    return phase.data or recipe.data


def build_dataset(sources: list, seed: int) -> ShardDataset | Mixture:
    """`sources`: the recipe's shard sources (each with a `path` and a `weight`)."""
    sets = [ShardDataset(s.path) for s in sources]
    if len(sets) == 1:
        return sets[0]
    return Mixture([(d, s.weight) for d, s in zip(sets, sources)], seed)
