"""Ranking and classification metrics against hand computations and scikit-learn."""

import math

import numpy as np
import pytest

from twinlm.eval import metrics as M


def test_ndcg_mrr_recall_by_hand():
    qrels = {"q1": {"a": 1}, "q2": {"b": 2, "c": 1}, "q3": {"z": 1}, "q4": {}}
    run = {"q1": {"x": 3.0, "a": 2.0, "y": 1.0},          # relevant at rank 2
           "q2": {"c": 5.0, "x": 4.0, "b": 3.0},          # graded: c (1) at rank 1, b (2) at rank 3
           "q3": {"x": 1.0}}                              # never retrieved
    ndcg_q1 = (1 / math.log2(3)) / 1.0
    ndcg_q2 = (1 / math.log2(2) + 2 / math.log2(4)) / (2 / math.log2(2) + 1 / math.log2(3))
    assert M.ndcg_at_k(qrels, run, 10) == pytest.approx((ndcg_q1 + ndcg_q2 + 0) / 3)
    assert M.mrr_at_k(qrels, run, 10) == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert M.recall_at_k(qrels, run, 100) == pytest.approx((1 + 1 + 0) / 3)
    # cut-offs: only the top k count
    assert M.mrr_at_k(qrels, run, 1) == pytest.approx((0 + 1 + 0) / 3)
    assert M.recall_at_k(qrels, run, 2) == pytest.approx((1 + 0.5 + 0) / 3)


def test_ndcg_matches_sklearn_for_single_query():
    from sklearn.metrics import ndcg_score

    rng = np.random.default_rng(0)
    for _ in range(20):
        rel = rng.integers(0, 3, size=15)
        if rel.sum() == 0:
            continue
        scores = rng.normal(size=15)
        qrels = {"q": {f"d{i}": int(r) for i, r in enumerate(rel)}}
        run = {"q": {f"d{i}": float(s) for i, s in enumerate(scores)}}
        assert M.ndcg_at_k(qrels, run, 10) == pytest.approx(ndcg_score([rel], [scores], k=10), abs=1e-9)


def test_run_from_scores_keeps_top():
    scores = np.array([[0.1, 0.9, 0.5, 0.3]])
    run = M.run_from_scores(["q"], ["a", "b", "c", "d"], scores, top=2)
    assert set(run["q"]) == {"b", "c"}


def test_classification_metrics_match_sklearn():
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    y, p = [0, 1, 1, 0, 1, 1, 0], [0, 1, 0, 0, 1, 1, 1]
    m = M.classification_metrics(y, p, 2)
    assert m["accuracy"] == pytest.approx(100 * accuracy_score(y, p))
    assert m["f1"] == pytest.approx(100 * f1_score(y, p))
    assert m["mcc"] == pytest.approx(100 * matthews_corrcoef(y, p))
    y3, p3 = [0, 1, 2, 2, 1], [0, 2, 2, 1, 1]
    assert M.classification_metrics(y3, p3, 3)["f1_macro"] == pytest.approx(100 * f1_score(y3, p3, average="macro"))


def test_multiple_choice_normalisations():
    m = M.multiple_choice_metrics([[-4.0, -5.0, -9.0]], [1], [["ab", "abcdef", "ééé"]])
    assert m["acc"] == 0.0 and m["acc_norm"] == 100.0
    m = M.multiple_choice_metrics([[-4.0, -7.0, -5.0]], [2], [["ab", "abcdefghij", "ééé"]])
    # per char: -2, -0.7, -1.67 -> 1 ; per byte: -2, -0.7, -0.83 -> 1
    assert m["acc_norm"] == 0.0 and m["acc_bytes"] == 0.0
    m = M.multiple_choice_metrics([[-4.0, -9.0, -2.5]], [2], [["abcd", "ab", "ééé"]])
    # per char: -1, -4.5, -0.83 -> 2 ; per byte: -1, -4.5, -0.42 -> 2
    assert m["acc_norm"] == 100.0 and m["acc_bytes"] == 100.0
    m = M.multiple_choice_metrics([[-3.0, -2.0]], [0], [["éé", "ab"]])
    # per char: -1.5, -1 -> 1 ; per byte: -0.75, -1 -> 0
    assert m["acc_norm"] == 0.0 and m["acc_bytes"] == 100.0


def test_summarise_mean_std():
    s = M.summarise([{"a": 1.0}, {"a": 3.0}])
    assert s["a"] == 2.0 and s["a_std"] == pytest.approx(math.sqrt(2)) and s["n_seeds"] == 2
