"""The data a recipe's phase names, and the stream of global batches drawn from it.

- shard folders (twinlm's, or MDS folders of token ids, twinlm.data.mds): one folder is read as it is,
  several become a weighted Mixture; a seeded `BatchStream` draws the global batches, their size from the
  phase's batch-size schedule. MDS ids carry no tokenizer record: the recipe must name the tokenizer and
  every id must lie below its vocabulary (checked before training, `TokenizerMismatch`);
- a batch-order folder (twinlm's `data_order/` records or the released layout, twinlm.data.order): a
  `ReplayStream` serves exactly the recorded batches, their size being the recorded one. It must be the
  phase's only source.

`stream_for` and `batch_size_for` are the one definition of "which samples does step k read": the trainer
draws its batches through them and train/plan.py recomputes any step of a run through them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twinlm.data import BatchStream, Mixture, ShardDataset, check_tokenizer
from twinlm.data.mds import MDSTokens, is_mds_folder
from twinlm.data.order import OrderFolder, ReplayStream, is_order_folder
from twinlm.errors import ConfigError, TokenizerMismatch
from twinlm.train.schedule import batch_size as scheduled_batch_size

if TYPE_CHECKING:
    from twinlm.train.recipe import Phase, Recipe


def phase_sources(recipe: Recipe, phase: Phase) -> list:
    """The phase's own `data`, else the recipe's."""
    return phase.data or recipe.data


def build_dataset(sources: list, seed: int) -> ShardDataset | MDSTokens | Mixture:
    """`sources`: the recipe's shard sources (each with a `path` and a `weight`)."""
    sets = [MDSTokens(s.path, column=getattr(s, "column", None), dtype=getattr(s, "dtype", None))
            if is_mds_folder(s.path) else ShardDataset(s.path) for s in sources]
    if len(sets) == 1:
        return sets[0]
    return Mixture([(d, s.weight) for d, s in zip(sets, sources)], seed)


def phase_seed(recipe: Recipe, phase_index: int) -> int:
    return recipe.seed + 1000 * phase_index


def stream_for(recipe: Recipe, phase_index: int, *, rank: int = 0, world_size: int = 1, steps_before: int = 0,
               vocab_size: int | None = None, fingerprint: str | None = None) -> BatchStream | ReplayStream:
    """The stream of phase `phase_index`'s global batches (this rank's share). `steps_before`: optimizer steps
    of the earlier phases (a twinlm order folder is keyed by the run's global step); `vocab_size`: the
    token-id bound a replayed order and the shards' vocabulary are checked against; `fingerprint`: the run's
    tokenizer, which shards that record one must have been made with (TokenizerMismatch)."""
    phase = recipe.phase_list()[phase_index]
    sources = phase_sources(recipe, phase)
    orders = [s for s in sources if is_order_folder(s.path)]
    if orders:
        if len(sources) > 1:
            raise ConfigError(f"phases.{phase.name}.data: the batch-order folder {orders[0].path} must be the phase's "
                              "only source (a replayed order already is the mixture)")
        src = sources[0]
        order = OrderFolder(src.path, group=src.order_group)
        first = src.start_step if src.start_step is not None else (
            steps_before + 1 if order.layout == "twinlm" else 1)
        return ReplayStream(order, first, rank=rank, world_size=world_size, seq_len=phase.seq_len,
                            vocab_size=vocab_size)
    seed = phase_seed(recipe, phase_index)
    ds = build_dataset(sources, seed)
    for d in getattr(ds, "datasets", [ds]):
        if isinstance(d, MDSTokens):
            _check_mds_ids(recipe, d, vocab_size)
        else:
            _check_shard_vocab(d, vocab_size)
            if vocab_size is not None:  # every chunk read is checked against the model's vocabulary (SH13)
                d.id_bound = min(d.id_bound or vocab_size, vocab_size)
            if fingerprint is not None and (d.meta.get("tokenizer") or {}).get("fingerprint"):
                check_tokenizer(d, fingerprint)
    return BatchStream(ds, seed, rank=rank, world_size=world_size)


def _check_mds_ids(recipe: Recipe, ds: MDSTokens, vocab_size: int | None) -> None:
    if not recipe.tokenizer:
        raise ConfigError(f"{ds.path}: an MDS folder of token ids records no tokenizer: set the recipe's "
                          "`tokenizer:` to the one the ids were made with")
    if vocab_size is not None and ds.max_id >= vocab_size:
        raise TokenizerMismatch(f"{ds.path}: token id {ds.max_id} is outside the vocabulary of {vocab_size} of the "
                                f"recipe's tokenizer {recipe.tokenizer}: these ids come from another tokenizer")


def _check_shard_vocab(ds, vocab_size: int | None) -> None:
    """Shards made with a larger vocabulary than the model's would fail at the first out-of-range id."""
    theirs = ((getattr(ds, "meta", None) or {}).get("tokenizer") or {}).get("vocab_size")
    if vocab_size is not None and theirs and theirs > vocab_size:
        raise TokenizerMismatch(f"{ds.path}: prepared with a vocabulary of {theirs} tokens, larger than the model's "
                                f"{vocab_size}: set the recipe's `tokenizer:` to the one the shards were made with "
                                "(the model's vocabulary is taken from it)")


def batch_size_for(phase: Phase, phase_tokens: int, stream: BatchStream | ReplayStream) -> int:
    """The global batch size of the phase's next step: the recorded one when replaying, else the schedule's."""
    return stream.next_batch_size(scheduled_batch_size(phase_tokens, full=phase.batch_size, start=phase.warmup_start,
                                                       warmup_tokens=phase.batch_warmup_tokens,
                                                       multiple=phase.warmup_start))
