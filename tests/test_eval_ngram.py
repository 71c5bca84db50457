"""The n-gram baselines: normalised distributions, Witten-Bell counts checked by hand, the model calling
convention the tracks use, and fitting on a real shard folder."""

import json
import math

import numpy as np
import pytest
import torch

from twinlm.data.prepare import prepare
from twinlm.errors import ConfigError, TokenizerMismatch
from twinlm.eval import bpb
from twinlm.eval.ngram import NGramConfig, NGramLM, load_ngram
from twinlm.eval.toy import toy_sentences, toy_tokenizer

V = 12
S = V  # the sentinel


def _cfg():
    return NGramConfig(vocab_size=V, cls_token_id=1, sep_token_id=2, mask_token_id=4, pad_token_id=3)


CHUNKS = [[1, 5, 6, 7, 2], [1, 5, 6, 8, 2], [1, 6, 5, 2]]


@pytest.mark.parametrize("order", [1, 2, 3])
def test_distributions_sum_to_one_and_are_never_zero(order):
    lm = NGramLM(order, _cfg()).fit(CHUNKS)
    rng = np.random.default_rng(0)
    prev1, prev2 = rng.integers(0, V, 50), rng.integers(0, V + 1, 50)
    probs = lm.next_token_probs(np.r_[prev1, 5, 6], np.r_[prev2, 1, 5])
    assert np.allclose(probs.sum(1), 1.0) and (probs > 0).all()


def test_witten_bell_by_hand():
    lm = NGramLM(3, _cfg()).fit(CHUNKS)
    # unigram: targets are every token but each chunk's [CLS]: 5,6,7,2, 5,6,8,2, 6,5,2 (N=11, T=5 types)
    c = {5: 3, 6: 3, 7: 1, 8: 1, 2: 3}
    p1 = {w: (c.get(w, 0) + 5 / V) / (11 + 5) for w in range(V)}
    assert lm.p1 == pytest.approx([p1[w] for w in range(V)])
    # bigram after 5: seen 6, 6, 2 -> c(5)=3, T(5)=2
    p2_6 = (2 + 2 * p1[6]) / (3 + 2)
    # trigram after (1, 5): seen 6, 6 -> c=2, T=1; after (S, 1): seen 5, 5, 6 -> c=3, T=2
    p3 = (2 + 1 * p2_6) / (2 + 1)
    got = lm.next_token_probs(np.array([5]), np.array([1]))[0, 6]
    assert got == pytest.approx(p3)
    p2_after_cls_5 = (2 + 2 * p1[5]) / (3 + 2)   # bigram after [CLS]: 5, 5, 6
    assert lm.next_token_probs(np.array([1]), np.array([S]))[0, 5] == pytest.approx((2 + 2 * p2_after_cls_5) / 5)
    # an unseen context falls back to the order below
    lo = NGramLM(2, _cfg()).fit(CHUNKS)
    assert lm.next_token_probs(np.array([9]), np.array([9]))[0] == pytest.approx(
        lo.next_token_probs(np.array([9]), np.array([0]))[0])
    with pytest.raises(ConfigError):
        NGramLM(4, _cfg())


def test_forward_packed_matches_padded_and_contexts_restart_per_sequence():
    lm = NGramLM(3, _cfg()).fit(CHUNKS)
    a, b = [1, 5, 6, 7], [1, 6, 5]
    ids = torch.tensor(a + b)
    cu = torch.tensor([0, 4, 7], dtype=torch.int32)
    packed = lm(ids, cu_seqlens=cu, max_seqlen=4).logits
    assert packed.shape == (7, V)
    for seq, rows in ((a, packed[:4]), (b, packed[4:])):
        alone = lm(torch.tensor([seq])).logits[0]
        assert torch.allclose(rows, alone)
    some = lm(ids, cu_seqlens=cu, max_seqlen=4, prediction_positions=torch.tensor([1, 5])).logits
    assert torch.allclose(some, packed[[1, 5]])
    assert torch.allclose(packed.exp().sum(-1), torch.ones(7))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("ngram")
    tok = toy_tokenizer(out_dir=root / "tok")
    (root / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in toy_sentences(600, seed=1)))
    prepare([str(root / "train.jsonl")], str(root / "tok"), root / "shards", chunk_size=64, workers=0)
    return root, tok


def test_fitted_on_shards_the_orders_rank_as_they_should_on_held_out_text(shards):
    root, tok = shards
    texts = toy_sentences(40, seed=9)
    res = {}
    for name in ("unigram", "bigram", "trigram"):
        loaded = load_ngram(name, root / "shards", tok)
        assert loaded.info["variant"] == name and loaded.info["trained_tokens"] > 1000
        res[name] = bpb.run(loaded, texts=texts, log=None)["tasks"]["texts"]["bpb"]
    # uniform over the vocabulary, for scale: each order must beat the one below on this templated text
    uniform = math.log2(len(tok)) * sum(len(t) for t in tok(texts, add_special_tokens=False)["input_ids"]) / sum(
        len(t.encode()) for t in texts)
    assert uniform > res["unigram"] > res["bigram"] > res["trigram"] > 0


def test_load_ngram_refuses_other_tokenizers_and_missing_folders(shards, tmp_path):
    root, _ = shards
    other = toy_tokenizer(vocab_size=300)
    with pytest.raises(TokenizerMismatch):
        load_ngram("bigram", root / "shards", other)
    with pytest.raises(FileNotFoundError, match="not a shard folder"):
        load_ngram("bigram", tmp_path, other)
    with pytest.raises(ConfigError, match="unknown n-gram"):
        load_ngram("fourgram", root / "shards", other)


def test_bpb_interval_resamples_documents(shards):
    root, tok = shards
    loaded = load_ngram("bigram", root / "shards", tok)
    texts = toy_sentences(30, seed=4)
    res = bpb.run(loaded, texts=texts, log=None)
    r = res["tasks"]["texts"]
    # per-document bits by hand: each document's bits / its bytes, resampled
    per_doc = [bpb.bits_per_byte(loaded.model, tok, [t])["bpb"] * len(t.encode()) for t in texts]
    assert sum(per_doc) / sum(len(t.encode()) for t in texts) == pytest.approx(r["bpb"], rel=1e-6)
    assert r["bpb_ci95"][0] < r["bpb"] < r["bpb_ci95"][1] and res["average"]["std"] == r["bpb_se"] > 0


def test_interpolation_matches_nltk_witten_bell():
    """NLTK's WittenBellInterpolated (installed with the test extra, through lm-eval -> rouge_score) on the
    same n-gram counts. NLTK ends the recursion at the maximum-likelihood unigram where ours interpolates it
    with the uniform distribution, so our unigram level is set to NLTK's for the comparison."""
    nltk_lm = pytest.importorskip("nltk.lm")
    rng = np.random.default_rng(3)
    chunks = [[1, *rng.integers(5, V, rng.integers(3, 12)).tolist(), 2] for _ in range(40)]
    lm = NGramLM(3, _cfg()).fit(chunks)
    grams = []
    for c in chunks:
        seq = [S, S] + c
        grams.append([g for t in range(3, len(seq)) for g in
                      ((str(seq[t]),), tuple(map(str, seq[t - 1:t + 1])), tuple(map(str, seq[t - 2:t + 1])))])
    ref = nltk_lm.WittenBellInterpolated(3)
    ref.fit(grams, vocabulary_text=[str(w) for w in range(V + 1)])
    uni = np.array([ref.counts.unigrams.freq(str(w)) for w in range(V)])
    lm.p1 = uni
    contexts = [(c[i - 1] if i else S, c[i]) for c in chunks[:10] for i in range(len(c) - 1)] + [(7, 9), (S, 11)]
    for p2, p1 in contexts:
        ours = lm.next_token_probs(np.array([p1]), np.array([p2]))[0]
        theirs = [ref.score(str(w), [str(p2), str(p1)]) for w in range(V)]
        assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12)
