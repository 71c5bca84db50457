"""The one held-out rule (twinlm.data.split.heldout) and the corpus built with it: the splits below were
computed with the rule the suite's corpus used before it moved to data/ (sha256 of "seed:text[:2000]"), so
`twinlm suite` keeps its corpus, and with it its scores."""

import hashlib
import json

import pytest

from twinlm.data.corpus import build_corpus
from twinlm.data.split import heldout

TEXTS = [f"document {i}: " + "word " * (i % 7) for i in range(60)]
TEXTS += ["héllo wörld ∑ " * 3, "x" * 2500 + "tail-a", "x" * 2500 + "tail-b", "bad \ud800 surrogate"]


@pytest.mark.parametrize("seed, fraction, expected", [
    (0, 0.2, [4, 17, 20, 21, 28, 30, 35, 40, 46, 51, 52, 53, 63]),
    (3, 0.3, [0, 1, 3, 4, 5, 12, 19, 21, 26, 29, 37, 41, 59, 60]),
    (7, 0.1, [12, 37, 52]),
])
def test_the_held_out_rule_gives_the_split_it_gave_before(seed, fraction, expected):
    assert [i for i, t in enumerate(TEXTS) if heldout(t, seed, fraction)] == expected


def test_the_held_out_rule_reads_the_first_2000_characters():
    assert all(heldout("x" * 2500 + "tail-a", s, 0.5) == heldout("x" * 2500 + "tail-b", s, 0.5) for s in range(20))
    assert not any(heldout(t, 0, 0.0) for t in TEXTS) and all(heldout(t, 0, 1.0) for t in TEXTS)


def _write_jsonl(path, texts):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def test_the_corpus_is_the_one_built_before(tmp_path, monkeypatch):
    home = tmp_path / "home"
    _write_jsonl(home / "pretrain" / "nlp-corpus.jsonl", [f"sentence number {i} is short." for i in range(2000)])
    _write_jsonl(home / "pretrain" / "sotu.jsonl", ["a long address " * 400 + str(i) for i in range(40)])
    monkeypatch.setenv("TWINLM_HOME", str(home))
    out = tmp_path / "corpus"
    out.mkdir()
    counts = build_corpus(out, ["nlp-corpus", "sotu"], max_mb=0.1, heldout_fraction=0.2, min_doc_bytes=1000)
    assert counts == {"train_docs": 42, "heldout_docs": 17, "train_bytes": 42715, "heldout_bytes": 62144,
                      "sources": {"nlp-corpus": 50850, "sotu": 54009}}
    digests = {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in ("train.jsonl", "heldout.jsonl")}
    assert digests == {"train.jsonl": "5edf85e3197a82292f84cc173ad5405c883a105daf528b5c2989bee7df74aee6",
                       "heldout.jsonl": "e2a7f01f16b126ca05fd8f18d86ea52ab96da397d6b6dfa6bcd726c0702dfd84"}
