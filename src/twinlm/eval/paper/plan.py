"""`twinlm eval paper MODEL --dry-run`: every dataset the paper's columns will download, and what they cost.

Nothing is downloaded and no weights are loaded: the model's size comes from its config and safetensors headers
(reference.model_shape), the datasets from the libraries' own definitions (lm-eval's task configs for the
generative column, mteb's task metadata and descriptive statistics for retrieval, the GLUE task table of
eval/paper/glue_tasks.py), and the row counts from those definitions or the hub's dataset cards.

**The GPU hours are estimates, not measurements** (no GPU run of these protocols is recorded in bench/RESULTS.md
yet; once one is, the plan reports the measured rate beside the estimate). Each unit of work costs the larger of
its FLOPs at an assumed utilisation of one H100 (989 dense bf16 TFLOP/s) and a launch floor:
- FLOPs: training 6 x non-embedding parameters + 12 x layers x hidden x length per token (attention); forward
  only 2 x and 4 x; the cached multiple-negatives loss of the retrieval fine-tuning runs every text forward
  twice (once without gradients), 8 x per token.
- Utilisation (`TRAINING_MFU`, `SCORING_MFU`): the training-step anchors of REFERENCE §5, interpolated on log
  parameters: transformers eager (HF Trainer and sentence-transformers fine-tune with it) 7.4% at 17M, 15.5% at
  150M, 25.5% at 1B; twinlm's own scorer (the generative column) 7.6%, 21.5%, 26%.
- Launch floor: a fine-tuning step of short sequences is bound by kernel launches, not FLOPs: 0.5 ms per layer
  per optimizer step (forward, backward, AdamW) plus 10 ms of Python and data loading, and 0.15 ms per layer
  plus 3 ms per forward-only batch (`STEP_FLOOR`, `FORWARD_FLOOR`): eager PyTorch at about 8 µs a kernel.
- Tokens: GLUE at the estimated mean tokens per example of each task (`GLUE_TOKENS`, padded to the batch's
  longest: x1.5), MS MARCO triplets at 160 tokens (query 10, two passages of 75), mteb corpora and queries at
  their characters / 4 (mteb's descriptive statistics), capped at the model's `max_seq_length`, the generative
  column at the counts `bench/generative_cost.py` measured on lm-eval's requests (`GENERATIVE_COUNTS`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from twinlm.eval.paper.reference import ModelShape

PEAK = 989e12  # one H100, dense bf16 FLOP/s
TRAINING_MFU = {17e6: 0.074, 150e6: 0.155, 1.0e9: 0.255}  # transformers eager training step, REFERENCE §5
SCORING_MFU = {17e6: 0.076, 150e6: 0.215, 1.0e9: 0.26}  # twinlm's step, REFERENCE §5 and bench/RESULTS.md
STEP_FLOOR = (0.5e-3, 10e-3)  # seconds per layer, seconds per optimizer step
FORWARD_FLOOR = (0.15e-3, 3e-3)  # seconds per layer, seconds per forward-only batch
PADDING = 1.5  # tokens computed per real token when a batch is padded to its longest example
LABEL = "estimated (no GPU measurement recorded): FLOPs at the REFERENCE §5 anchors' utilisation of one H100, " \
        "or the launch floor where that is larger"

# Rows of nyu-mll/glue (the dataset card) and estimated mean tokens per example with the specials (GPT-NeoX BPE)
GLUE_ROWS: dict[str, dict[str, int]] = {
    "cola": {"train": 8551, "validation": 1043}, "sst2": {"train": 67349, "validation": 872},
    "mrpc": {"train": 3668, "validation": 408}, "stsb": {"train": 5749, "validation": 1500},
    "qqp": {"train": 363846, "validation": 40430}, "qnli": {"train": 104743, "validation": 5463},
    "rte": {"train": 2490, "validation": 277},
    "mnli": {"train": 392702, "validation_matched": 9815, "validation_mismatched": 9832},
}
GLUE_TOKENS = {"cola": 11, "sst2": 13, "mrpc": 53, "stsb": 31, "qqp": 30, "qnli": 51, "rte": 71, "mnli": 40}
MSMARCO_ROWS = 11_662_655  # triplet-hard train (the hub's viewer); Ettin reads 1,251,000 of them
MSMARCO_TOKENS = 160

# bench/generative_cost.py, 2026-12-07 (lm-eval 0.4.13's requests on the local copies, scaled to the paper's splits,
# Ettin tokenizer): documents, requests, tokens through a decoder, tokens through an encoder (one masked copy per
# continuation token), scored positions
GENERATIVE_COUNTS: dict[str, tuple[int, int, int, int, int]] = {
    "arc_easy": (2376, 9508, 303824, 1538060, 41838), "arc_challenge": (1172, 4680, 175334, 1125136, 27007),
    "hellaswag": (10042, 40168, 3219552, 94207183, 1199604), "lambada_openai": (5153, 5153, 400769, 575811, 7027),
    "openbookqa": (500, 2000, 31234, 141513, 7538), "piqa": (1838, 3676, 133956, 3479447, 83886),
    "sciq": (1000, 4000, 428607, 860493, 7631), "social_iqa": (1954, 5862, 192421, 849473, 23266),
    "triviaqa": (7993, 7993, 1141827, 1308187, 41590), "winogrande": (1267, 2534, 57013, 341970, 14364),
    "wsc273": (273, 546, 12285, 73684, 3095),
}


def interpolated_mfu(params: float, anchors: dict[float, float]) -> float:
    """The assumed utilisation at `params` total parameters: `anchors` interpolated on log parameters, clamped
    at the ends."""
    xs = sorted(anchors)
    if params <= xs[0]:
        return anchors[xs[0]]
    if params >= xs[-1]:
        return anchors[xs[-1]]
    for a, b in zip(xs, xs[1:]):
        if a <= params <= b:
            t = (math.log(params) - math.log(a)) / (math.log(b) - math.log(a))
            return anchors[a] + t * (anchors[b] - anchors[a])
    raise AssertionError("unreachable: params lies between two anchors")


class Cost:
    """Accumulates one column's estimated seconds on one H100 for a model shape."""

    def __init__(self, shape: ModelShape, anchors: dict[float, float]):
        self.shape, self.mfu, self.seconds = shape, interpolated_mfu(shape.params, anchors), 0.0

    def _flop_seconds(self, tokens: float, length: float, per_param: float, per_attention: float) -> float:
        s = self.shape
        return (per_param * s.non_embedding + per_attention * s.layers * s.hidden * length) * tokens / (self.mfu * PEAK)

    def train(self, steps: float, tokens_per_step: float, length: float, per_param: float = 6.0) -> None:
        floor = STEP_FLOOR[0] * self.shape.layers + STEP_FLOOR[1]
        self.seconds += steps * max(floor, self._flop_seconds(tokens_per_step, length, per_param, 2 * per_param))

    def forward(self, batches: float, tokens_per_batch: float, length: float) -> None:
        floor = FORWARD_FLOOR[0] * self.shape.layers + FORWARD_FLOOR[1]
        self.seconds += batches * max(floor, self._flop_seconds(tokens_per_batch, length, 2.0, 4.0))

    def hours(self) -> float:
        return self.seconds / 3600


def glue_plan(shape: ModelShape, runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The GLUE column: `runs` are {task, hypers: [{epochs, batch_size}, …] (the configurations swept), seeds,
    max_train, max_eval} per task; every configuration x seed fine-tunes on the train split and evaluates once on
    the eval splits."""
    cost = Cost(shape, TRAINING_MFU)
    datasets = []
    for r in runs:
        rows = GLUE_ROWS[r["task"]]
        train = min(rows["train"], r.get("max_train") or rows["train"])
        evals = {k: min(v, r.get("max_eval") or v) for k, v in rows.items() if k != "train"}
        length = GLUE_TOKENS[r["task"]] * PADDING
        for h in r["hypers"]:
            batch = h["batch_size"]
            cost.train(r["seeds"] * h["epochs"] * math.ceil(train / batch), batch * length, length)
            cost.forward(r["seeds"] * sum(math.ceil(v / batch) for v in evals.values()), batch * length, length)
        datasets.append({"id": "nyu-mll/glue", "config": r["task"], "task": r["task"], "splits": dict(rows),
                         "reads": {"train": train, **evals}, "fine_tuning_runs": r["seeds"] * len(r["hypers"])})
    return {"datasets": datasets, "gpu_hours": cost.hours(), "mfu": cost.mfu}


def retrieval_plan(shape: ModelShape, settings: Any, tasks: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The retrieval column: MS MARCO fine-tuning (`settings`: the mteb track's) and encoding every mteb task's
    corpus and queries (`tasks`: mteb_tasks.task_plan's rows)."""
    cost = Cost(shape, TRAINING_MFU)
    datasets: list[dict[str, Any]] = []
    if getattr(settings, "finetune", True):
        triplets = min(MSMARCO_ROWS - 1000, settings.max_triplets or MSMARCO_ROWS)
        batch = settings.batch_size
        cost.train(math.ceil(triplets / batch), batch * MSMARCO_TOKENS * PADDING, MSMARCO_TOKENS / 2, per_param=8.0)
        datasets.append({"id": settings.train_dataset, "config": settings.train_config, "task": "fine-tuning",
                         "splits": {"train": MSMARCO_ROWS}, "reads": {"train": triplets + 1000}})
    max_len = settings.eval_max_seq_length or 8192  # none: the model's context (Ettin's: 7,999 to 8,192)
    for t in tasks:
        for kind in ("documents", "queries"):
            n = t.get(kind) or 0
            length = min(max_len, (t.get(f"{kind}_chars") or 4 * max_len) / 4)
            cost.forward(math.ceil(n / 32), 32 * length * PADDING, length)
        datasets.append({"id": t["dataset"], "revision": t.get("revision"), "task": t["name"],
                         "splits": {t["split"]: (t.get("documents") or 0) + (t.get("queries") or 0)},
                         "reads": {"documents": t.get("documents"), "queries": t.get("queries")}})
    return {"datasets": datasets, "gpu_hours": cost.hours(), "mfu": cost.mfu}


def generative_plan(shape: ModelShape, task_configs: dict[str, dict[str, Any]], limit: int | None) -> dict[str, Any]:
    """The generative column: each lm-eval task's dataset (`task_configs`: lm-eval's config per task name) and the
    scoring cost from GENERATIVE_COUNTS (a decoder reads each request once; an encoder one masked copy per
    continuation token); `limit` documents per task scales both."""
    cost = Cost(shape, SCORING_MFU)
    datasets = []
    for name, cfg in task_configs.items():
        docs, requests, dec_tokens, enc_tokens, scored = GENERATIVE_COUNTS.get(name, (0, 0, 0, 0, 0))
        share = 1.0 if limit is None or not docs else min(1.0, limit / docs)
        tokens = (dec_tokens if shape.kind == "decoder" else enc_tokens) * share
        units = (requests if shape.kind == "decoder" else scored) * share
        if units:
            length = tokens / units
            cost.forward(math.ceil(tokens / 16384), 16384, length)
        split = cfg.get("test_split") or cfg.get("validation_split")
        datasets.append({"id": cfg.get("dataset_path"), "config": cfg.get("dataset_name"), "task": name,
                         "splits": {split: docs}, "reads": {split: round(docs * share)}})
    return {"datasets": datasets, "gpu_hours": cost.hours(), "mfu": cost.mfu}


__all__ = ["glue_plan", "retrieval_plan", "generative_plan", "interpolated_mfu", "Cost", "GENERATIVE_COUNTS",
           "GLUE_ROWS", "SCORING_MFU", "TRAINING_MFU", "PEAK", "LABEL"]
