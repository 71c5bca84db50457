"""Metrics: classification (scikit-learn), ranking (nDCG@k, MRR@k, Recall@k), multiple choice, and
mean ± spread over seeds.

Ranking follows the usual IR definitions (as in pytrec_eval / BEIR): graded gains `rel`, DCG with
`rel / log2(rank + 1)` (linear gain), ideal DCG from the query's own judgements, queries without any
relevant document skipped; MRR@k is 1/rank of the first relevant document within the top k.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef


# --- classification --------------------------------------------------------------------------------
def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], num_labels: int) -> dict[str, float]:
    """accuracy, macro-F1, and (binary tasks) F1 of class 1 and Matthews correlation, all in percent."""
    truth, pred = np.asarray(y_true), np.asarray(y_pred)
    labels = list(range(num_labels))
    out = {"accuracy": 100.0 * accuracy_score(truth, pred),
           "f1_macro": 100.0 * f1_score(truth, pred, labels=labels, average="macro", zero_division=0)}
    if num_labels == 2:
        out["f1"] = 100.0 * f1_score(truth, pred, pos_label=1, average="binary", zero_division=0)
        with warnings.catch_warnings():  # a one-class dev split: MCC is 0, say nothing
            warnings.simplefilter("ignore")
            out["mcc"] = 100.0 * matthews_corrcoef(truth, pred)
    return out


# --- ranking ---------------------------------------------------------------------------------------
def _ranked(scores: Mapping[str, float], k: int | None) -> list[str]:
    # Ties broken by document id, descending score: deterministic.
    ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
    return [d for d, _ in (ranked if k is None else ranked[:k])]


def ndcg_at_k(qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]], k: int = 10) -> float:
    vals = []
    for q, rels in qrels.items():
        positive = sorted((r for r in rels.values() if r > 0), reverse=True)
        if not positive:
            continue
        top = _ranked(run.get(q, {}), k)
        dcg = sum(rels.get(d, 0) / math.log2(i + 2) for i, d in enumerate(top) if rels.get(d, 0) > 0)
        idcg = sum(r / math.log2(i + 2) for i, r in enumerate(positive[:k]))
        vals.append(dcg / idcg)
    return float(np.mean(vals)) if vals else 0.0


def mrr_at_k(qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]], k: int = 10) -> float:
    vals = []
    for q, rels in qrels.items():
        if not any(r > 0 for r in rels.values()):
            continue
        rr = 0.0
        for i, d in enumerate(_ranked(run.get(q, {}), k)):
            if rels.get(d, 0) > 0:
                rr = 1.0 / (i + 1)
                break
        vals.append(rr)
    return float(np.mean(vals)) if vals else 0.0


def recall_at_k(qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]], k: int = 100) -> float:
    vals = []
    for q, rels in qrels.items():
        relevant = {d for d, r in rels.items() if r > 0}
        if not relevant:
            continue
        top = set(_ranked(run.get(q, {}), k))
        vals.append(len(relevant & top) / len(relevant))
    return float(np.mean(vals)) if vals else 0.0


def retrieval_metrics(qrels, run) -> dict[str, float]:
    """nDCG@10, MRR@10, Recall@100 in percent."""
    return {"ndcg@10": 100.0 * ndcg_at_k(qrels, run, 10), "mrr@10": 100.0 * mrr_at_k(qrels, run, 10),
            "recall@100": 100.0 * recall_at_k(qrels, run, 100)}


def run_from_scores(query_ids: Sequence[str], doc_ids: Sequence[str], scores: np.ndarray,
                    top: int = 100) -> dict[str, dict[str, float]]:
    """A run (query → {doc: score}) keeping each query's `top` best documents of a (Q, D) score matrix."""
    scores = np.asarray(scores)
    top = min(top, scores.shape[1])
    out = {}
    for qi, q in enumerate(query_ids):
        row = scores[qi]
        idx = np.argpartition(-row, top - 1)[:top] if top < row.shape[0] else np.arange(row.shape[0])
        out[q] = {doc_ids[j]: float(row[j]) for j in idx}
    return out


# --- multiple choice -------------------------------------------------------------------------------
def multiple_choice_metrics(loglikelihoods: Sequence[Sequence[float]], labels: Sequence[int],
                            choice_texts: Sequence[Sequence[str]]) -> dict[str, float]:
    """acc (raw log-likelihood), acc_norm (divided by the choice's length in characters, as
    lm-evaluation-harness's `acc_norm`) and acc_bytes (divided by its UTF-8 byte length, lm-eval's
    `acc_bytes`), in percent. First maximum wins ties (numpy argmax), as in lm-eval."""
    acc = acc_norm = acc_bytes = 0
    for choice_lls, gold, texts in zip(loglikelihoods, labels, choice_texts):
        lls = np.asarray(choice_lls, dtype=np.float64)
        chars = np.array([float(len(t)) for t in texts])
        nbytes = np.array([float(len(t.encode("utf-8"))) for t in texts])
        acc += int(np.argmax(lls) == gold)
        acc_norm += int(np.argmax(lls / chars) == gold)
        acc_bytes += int(np.argmax(lls / nbytes) == gold)
    n = max(1, len(labels))
    return {"acc": 100.0 * acc / n, "acc_norm": 100.0 * acc_norm / n, "acc_bytes": 100.0 * acc_bytes / n}


# --- spread ----------------------------------------------------------------------------------------
def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def summarise(per_seed: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """{metric: mean, metric_std: std, n_seeds} over a list of per-seed metric dicts."""
    out: dict[str, float] = {}
    for key in per_seed[0]:
        m, s = mean_std(r[key] for r in per_seed)
        out[key] = m
        out[f"{key}_std"] = s
    out["n_seeds"] = len(per_seed)
    return out


# --- bootstrap -------------------------------------------------------------------------------------
BOOTSTRAP_SAMPLES = 1000


def bootstrap_ratio(num: Sequence[float] | np.ndarray, den: Sequence[float] | np.ndarray,
                    samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> dict[str, float]:
    """sum(num) / sum(den) and its spread over `samples` resamplings of the items with replacement: the
    standard error (`se`, the bootstrap replicates' std) and the 95% percentile interval (`lo`, `hi`).
    A mean is the ratio with `den` all ones. No items is an error: a score from no data is no score."""
    nums, dens = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if nums.size == 0 or nums.shape != dens.shape or dens.sum() <= 0:
        raise ValueError("bootstrap of no data: nothing was scored")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, nums.size, size=(samples, nums.size))
    reps = nums[idx].sum(1) / np.maximum(dens[idx].sum(1), 1e-300)
    lo, hi = np.percentile(reps, [2.5, 97.5])
    return {"value": float(nums.sum() / dens.sum()), "se": float(reps.std(ddof=1)), "lo": float(lo), "hi": float(hi)}


def bootstrap_macro(groups: Mapping[str, Sequence[float]], samples: int = BOOTSTRAP_SAMPLES,
                    seed: int = 0) -> dict[str, float]:
    """The mean over groups of each group's mean, with a stratified bootstrap (each group resampled
    within itself) for its standard error and 95% percentile interval."""
    arrays = [np.asarray(v, dtype=np.float64) for v in groups.values()]
    if not arrays or any(a.size == 0 for a in arrays):
        raise ValueError("bootstrap of no data: a group has nothing scored")
    rng = np.random.default_rng(seed)
    reps = np.mean([a[rng.integers(0, a.size, size=(samples, a.size))].mean(1) for a in arrays], axis=0)
    lo, hi = np.percentile(reps, [2.5, 97.5])
    return {"value": float(np.mean([a.mean() for a in arrays])), "se": float(reps.std(ddof=1)),
            "lo": float(lo), "hi": float(hi)}
