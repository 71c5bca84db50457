"""Retrieval sets built from the fetched QA data: SQuAD, BoolQ and SciQ. A `RetrievalSet` is a corpus of
passages, queries and relevance judgements; the corpus is every distinct passage of the set, and the one
relevant document of a question is its own passage.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twinlm.errors import UnknownName
from twinlm.eval.tasks.fetched import hf_dataset, oe_eval_requests


@dataclass
class RetrievalSet:
    name: str
    corpus: dict[str, str]                      # doc id -> passage
    queries: dict[str, str]                     # query id -> question
    qrels: dict[str, dict[str, int]]            # query id -> {doc id: relevance}
    meta: dict[str, Any] = field(default_factory=dict)

    def split(self, n_test: int | float, seed: int = 0) -> tuple[RetrievalSet, RetrievalSet]:
        """(train, test) by queries; both keep the whole corpus."""
        qids = sorted(self.queries)
        random.Random(seed).shuffle(qids)
        n = int(round(n_test * len(qids))) if isinstance(n_test, float) else int(n_test)
        test, train = set(qids[:n]), set(qids[n:])

        def part(ids, tag):
            return RetrievalSet(f"{self.name}", self.corpus, {q: self.queries[q] for q in sorted(ids)},
                                {q: self.qrels[q] for q in sorted(ids)}, {**self.meta, "part": tag})
        return part(train, "train"), part(test, "test")


def _passage_ids(passages: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
    corpus: dict[str, str] = {}
    by_text: dict[str, str] = {}
    for p in passages:
        if p not in by_text:
            did = f"d{len(corpus)}"
            by_text[p] = did
            corpus[did] = p
    return corpus, by_text


def _ret_from_pairs(name, pairs: list[tuple[str, str]]) -> RetrievalSet:
    corpus, by_text = _passage_ids([p for _, p in pairs])
    queries = {f"q{i}": q for i, (q, _) in enumerate(pairs)}
    qrels = {f"q{i}": {by_text[p]: 1} for i, (_, p) in enumerate(pairs)}
    return RetrievalSet(name, corpus, queries, qrels)


def _ret_squad(root=None) -> RetrievalSet:
    pairs = []
    for r in oe_eval_requests("squad/bpb_5shot", root):
        m = re.search(r"Background: (.*)\nQuestion: (.*)\nAnswer:\s*$", r["doc"]["query"], re.S)
        if m:
            pairs.append((m.group(2).strip(), m.group(1).strip()))
    return _ret_from_pairs("squad", pairs)


def _ret_boolq(root=None) -> RetrievalSet:
    return _ret_from_pairs("boolq", [(r["question"] + "?", r["passage"])
                                     for r in hf_dataset("boolq/none/validation", root)])


def _ret_sciq(root=None) -> RetrievalSet:
    return _ret_from_pairs("sciq", [(r["question"], r["support"].strip())
                                    for r in hf_dataset("sciq/none/validation", root) if r["support"].strip()])


RETRIEVAL_SETS: dict[str, Callable[..., RetrievalSet]] = {"squad": _ret_squad, "boolq": _ret_boolq, "sciq": _ret_sciq}


def load_retrieval_set(name: str, root=None) -> RetrievalSet:
    if name not in RETRIEVAL_SETS:
        raise UnknownName(f"unknown retrieval set {name!r}: choose one of {', '.join(RETRIEVAL_SETS)}")
    return RETRIEVAL_SETS[name](root)
