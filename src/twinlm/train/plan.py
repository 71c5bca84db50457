"""The batch of any step of any run, recomputed from its recipe without training.

A run's batch order is a function of its resolved recipe (`RUN/config.yaml`: seed, phases, data) and of
the data those name: the trainer draws every global batch through train/datasets.py (`stream_for`,
`batch_size_for`), and a step's size in tokens (what the batch-size schedule advances on) is the sum of
its samples' lengths cut to the phase's `seq_len`. `plan` replays that arithmetic from sample lengths
alone, so step N costs N cheap steps of bookkeeping and reads only step N's tokens.

    rows = step_batch("runs/enc", 1234)      # [{step, rank, position, sample_id, input_ids}] in global order
    order_of_step("runs/enc", 1234)          # the same, plus where it came from and whether records agree

Where the run recorded its order (`record_order`), `order_of_step` checks the recomputed batch against
the records (sample ids and tokens) and raises `DataError` if they differ: the shards or the recipe changed
since the run. Rows carry the rank and per-rank position the run's `world_size` (env.json) gave them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from twinlm.data.order import OrderFolder
from twinlm.errors import DataError, MissingArtifactError, StepNotRecorded
from twinlm.train.datasets import batch_size_for, stream_for
from twinlm.train.recipe import Recipe, load_recipe


@dataclass
class PlannedStep:
    step: int          # global optimizer step, 1-based
    phase: str
    phase_step: int    # 1-based within the phase
    batch_size: int
    tokens: int        # the step's tokens (all ranks), as metrics.jsonl's step_tokens
    sample_ids: list[int]
    samples: list[np.ndarray] | None  # the tokens, cut to seq_len; only for the step asked for


def plan(recipe: Recipe, until: int | None = None, want: int | None = None) -> Iterator[PlannedStep]:
    """Every step of `recipe` in order (up to global step `until`); tokens are read only for step `want`."""
    recipe = recipe.resolved_paths()
    step = 0
    for idx, phase in enumerate(recipe.phase_list()):
        stream = stream_for(recipe, idx, steps_before=step)
        phase_tokens, phase_step = 0, 0
        while phase_tokens < phase.tokens:
            if until is not None and step >= until:
                return
            bs = batch_size_for(phase, phase_tokens, stream)
            samples: list[np.ndarray] | None = None
            if want == step + 1:
                batch = stream.next_global(bs)
                ids = [int(sid) for sid, _ in batch]
                samples = [np.asarray(t, dtype=np.int64)[:phase.seq_len] for _, t in batch]
                tokens = sum(len(t) for t in samples)
            else:
                id_arr, lengths = stream.next_global_lengths(bs)
                ids = [int(i) for i in id_arr]
                tokens = int(np.minimum(lengths, phase.seq_len).sum())
            step += 1
            phase_step += 1
            phase_tokens += tokens
            yield PlannedStep(step, phase.name, phase_step, bs, tokens, ids, samples)


def _world_size(run: Path) -> int:
    try:
        return int(json.loads((run / "env.json").read_text())["hardware"]["world_size"])
    except (OSError, KeyError, ValueError, TypeError):
        return 1


def run_recipe(run: str | Path) -> Recipe:
    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise MissingArtifactError(f"{run}: no config.yaml: not a twinlm run folder (its order can be recomputed only "
                                   "from the resolved recipe the trainer writes there)")
    return load_recipe(run / "config.yaml")


def step_batch(run: str | Path, step: int) -> list[dict[str, Any]]:
    """Step `step`'s global batch of the run, recomputed from `RUN/config.yaml` and the data it names."""
    run = Path(run)
    if step < 1:
        raise DataError(f"steps are numbered from 1, got {step}")
    for p in plan(run_recipe(run), until=step, want=step):
        if p.step == step:
            assert p.samples is not None  # the plan keeps the tokens of the step it was asked for
            world = _world_size(run)
            return [{"step": step, "rank": i % world, "position": i // world, "sample_id": sid,
                     "input_ids": [int(v) for v in toks]}
                    for i, (sid, toks) in enumerate(zip(p.sample_ids, p.samples))]
    raise StepNotRecorded(f"{run} has no step {step}: its recipe ends before it")


def order_of_step(run: str | Path, step: int) -> tuple[list[dict[str, Any]], str]:
    """(rows, how): the recorded batch checked against the recomputed one, or the recomputed batch alone.

    `how` is "recorded and recomputed (equal)", "recomputed (not recorded)" or "recorded (not recomputed:
    …)" when the run's data is no longer there."""
    run = Path(run)
    recorded = None
    if (run / "data_order").is_dir():
        order = OrderFolder(run)
        if order.first_step <= step <= order.last_step:
            recorded = order.rows(step)
    try:
        rows = step_batch(run, step)
    except MissingArtifactError as e:
        if recorded is None:
            raise
        return [{**r, "input_ids": [int(v) for v in r["input_ids"]]} for r in recorded], \
            f"recorded (not recomputed: {e})"
    if recorded is None:
        return rows, "recomputed (not recorded)"
    got = [(r["sample_id"], [int(v) for v in r["input_ids"]]) for r in recorded]
    want = [(r["sample_id"], r["input_ids"]) for r in rows]
    if got != want:
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise DataError(f"{run}: the recorded batch of step {step} differs from the one recomputed from config.yaml "
                        f"(first at global position {first}; {len(got)} recorded vs {len(want)} recomputed rows): "
                        "the shards or the recipe changed since the run")
    return rows, "recorded and recomputed (equal)"
