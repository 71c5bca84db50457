"""GLUE metrics from predictions, and a task's score: scikit-learn and scipy (the `evaluate` library needs the hub).

Metric names: `accuracy`, `f1` (binary, positive class 1), `mcc` (Matthews correlation), `spearman`, `pearson`; all
as fractions (0..1, correlations -1..1). A task with several evaluation splits (MNLI) names each metric after the
split: `accuracy_matched`, `accuracy_mismatched`.

The task score is ModernBERT's (`glue.py:546`): the mean of the task's reported metrics (MNLI: mean of matched and
mismatched accuracy; MRPC and QQP: mean of accuracy and F1; STS-B: Spearman; CoLA: MCC), `extra_metrics` (STS-B's
Pearson) kept but not in the score. No data, or a value that is not a finite number (Spearman of constant
predictions), raises ScoreError: a score is never made up.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from twinlm.errors import ScoreError
from twinlm.eval.paper.glue_tasks import GlueTask


def metric(name: str, labels: Any, predictions: Any) -> float:
    """One metric of predictions against labels (classes for accuracy/f1/mcc, numbers for the correlations)."""
    y, p = np.asarray(labels), np.asarray(predictions)
    if y.size == 0 or y.shape != p.shape:
        raise ScoreError(f"{name}: {y.size} labels and {p.size} predictions: a metric needs the same non-zero "
                         "number of each (an empty evaluation split?)")
    if name == "accuracy":
        value = accuracy_score(y, p)
    elif name == "f1":
        value = f1_score(y, p, pos_label=1, average="binary", zero_division=0.0)
    elif name == "mcc":
        value = matthews_corrcoef(y, p)
    elif name in ("spearman", "pearson"):
        with warnings.catch_warnings():  # constant input: scipy warns and gives NaN, refused below
            warnings.simplefilter("ignore")
            value = (spearmanr if name == "spearman" else pearsonr)(y, p).statistic
    else:
        raise ValueError(f"unknown GLUE metric {name!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ScoreError(f"{name} is {value}: the predictions (or labels) are constant or not finite, so it is "
                         "undefined; the run has no score")
    return value


def split_suffix(task: GlueTask, split: str) -> str:
    """'' for a task with one evaluation split, else the split's name without `validation_` (`_matched`)."""
    return "" if len(task.eval_splits) == 1 else "_" + split.removeprefix("validation_")


def task_metrics(task: GlueTask, by_split: Mapping[str, tuple[Any, Any]]) -> dict[str, float]:
    """Every metric of `task` (reported and extra) on each of its evaluation splits: `by_split` maps a split name
    to (labels, predictions)."""
    missing = [s for s in task.eval_splits if s not in by_split]
    if missing:
        raise ScoreError(f"{task.name}: no predictions for split(s) {', '.join(missing)}")
    out = {}
    for split in task.eval_splits:
        labels, preds = by_split[split]
        for name in (*task.metrics, *task.extra_metrics):
            out[name + split_suffix(task, split)] = metric(name, labels, preds)
    return out


def reported(task: GlueTask) -> list[str]:
    """The names of the metrics averaged into the task score."""
    return [name + split_suffix(task, split) for split in task.eval_splits for name in task.metrics]


def task_score(task: GlueTask, metrics: Mapping[str, float]) -> float:
    """The task's score: the mean of its reported metrics (ModernBERT glue.py:546)."""
    names = reported(task)
    absent = [n for n in names if n not in metrics]
    if absent:
        raise ScoreError(f"{task.name}: metrics {', '.join(absent)} are missing, so it has no score")
    values = [float(metrics[n]) for n in names]
    if not all(math.isfinite(v) for v in values):
        raise ScoreError(f"{task.name}: a metric is not a finite number ({dict(zip(names, values))})")
    return float(np.mean(values))


__all__ = ["metric", "split_suffix", "task_metrics", "reported", "task_score"]
