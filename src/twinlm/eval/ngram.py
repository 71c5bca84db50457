"""N-gram baselines over token ids, fitted on training shards: the controls a trained model must beat.

`NGramLM(order)` is a unigram (order 1), bigram (2) or trigram (3) model with interpolated Witten-Bell
smoothing, counted over the chunks of a shard folder (twinlm.data.shards: every chunk `[CLS] … [SEP]`,
contexts never cross a chunk boundary; a position before a chunk's start is a sentinel outside the
vocabulary). Witten-Bell interpolates each order with the one below it,

    P_n(w | h) = (c(h, w) + T(h) · P_{n-1}(w | h')) / (c(h) + T(h)),   T(h) = distinct words seen after h,

down to the uniform distribution over the vocabulary, so every distribution sums to one over all `V` ids
and no token has probability zero (tests check both).

It is a `torch.nn.Module` with the calling convention of `twinlm.Transformer` that the eval tracks use
(`model(ids, cu_seqlens=, max_seqlen=, prediction_positions=)` on a packed stream, or padded `(B, T)`
input): the "logits" it returns are log-probabilities of the next token, so the bits-per-byte and the
minimal-pairs tracks score an n-gram model with exactly the code that scores a decoder. It stays on the CPU
(`host_only`: `load_for_eval` does not move it; its outputs are host tensors) whatever device the tracks run on.
`load_ngram(name, shards, tokenizer)` returns it ready for those tracks (`name` one of NGRAMS).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import scipy.sparse as sp
import torch

from twinlm.data.shards import ShardDataset, check_tokenizer
from twinlm.errors import ConfigError, MissingArtifactError
from twinlm.eval.common import Loaded

NGRAMS = {"unigram": 1, "bigram": 2, "trigram": 3}


@dataclass
class NGramConfig:
    """What the eval tracks read from a model's config (special ids, causal, sizes for `describe`)."""

    vocab_size: int
    cls_token_id: int
    sep_token_id: int
    mask_token_id: int
    pad_token_id: int
    causal: bool = True
    num_layers: int = 0
    hidden_size: int = 0


class NGramLM(torch.nn.Module):
    """An interpolated Witten-Bell n-gram model over token ids (see the module docstring)."""

    host_only = True  # numpy tables: scored on the CPU whatever --device says (load_for_eval leaves it there)

    def __init__(self, order: int, config: NGramConfig):
        super().__init__()
        if order not in (1, 2, 3):
            raise ConfigError(f"n-gram order {order} is not supported: 1 (unigram), 2 (bigram) or 3 (trigram)")
        self.order = order
        self.config = config
        self.V = config.vocab_size
        self.S = self.V  # sentinel id: "before the chunk's start"
        # the eval helpers ask for the device of the model's parameters
        self._device_anchor = torch.nn.Parameter(torch.zeros(0), requires_grad=False)
        self.trained_tokens = 0

    # -- fitting ------------------------------------------------------------------------------------
    def fit(self, chunks) -> NGramLM:
        """Count every n-gram of an iterable of token-id arrays (one per chunk)."""
        parts = [np.asarray(c, dtype=np.int64) for c in chunks if len(c) > 1]
        if not parts:
            raise MissingArtifactError("no training chunks to fit the n-gram model on: check the shard folder")
        tokens = np.concatenate(parts)
        starts = np.zeros(len(tokens), dtype=bool)
        starts[np.cumsum([0] + [len(p) for p in parts[:-1]])] = True
        prev1 = np.roll(tokens, 1)
        prev1[starts] = self.S
        prev2 = np.roll(prev1, 1)
        prev2[starts] = self.S
        prev2[np.roll(starts, 1)] = self.S
        # the first token of each chunk ([CLS]) is context, never a prediction (as in every scored sequence)
        keep = ~starts
        w, p1, p2 = tokens[keep], prev1[keep], prev2[keep]
        if w.max(initial=0) >= self.V:
            raise ConfigError(f"token id {int(w.max())} is outside the vocabulary of {self.V}: the shards belong "
                              "to another tokenizer")
        self.trained_tokens = int(len(w))
        uni = np.bincount(w, minlength=self.V).astype(np.float64)
        types = float((uni > 0).sum())
        # P_1 = (c(w) + T · 1/V) / (N + T): Witten-Bell with the uniform distribution below it
        self.p1 = (uni + types / self.V) / (uni.sum() + types)
        if self.order >= 2:
            self.bi = self._table(p1, w, self.V + 1)
        if self.order >= 3:
            self.tri_ctx_keys, ctx_ids = np.unique(p2 * (self.V + 1) + p1, return_inverse=True)
            self.tri = self._table(ctx_ids, w, len(self.tri_ctx_keys))
        return self

    def _table(self, ctx: np.ndarray, w: np.ndarray, n_ctx: int):
        """(counts csr matrix ctx × V, c(h), T(h)) of a context order."""
        counts = sp.csr_matrix((np.ones(len(w)), (ctx, w)), shape=(n_ctx, self.V))
        counts.sum_duplicates()
        total = np.asarray(counts.sum(axis=1)).ravel()
        types = np.diff(counts.indptr).astype(np.float64)
        return counts, total, types

    # -- probabilities ------------------------------------------------------------------------------
    def next_token_probs(self, prev1: np.ndarray, prev2: np.ndarray) -> np.ndarray:
        """(P, V) next-token distributions after contexts (`prev2`, `prev1`) (sentinel = before the start)."""
        probs = np.broadcast_to(self.p1, (len(prev1), self.V)).copy()
        if self.order >= 2:
            probs = self._interpolate(probs, self.bi, prev1)
        if self.order >= 3:
            keys = prev2 * (self.V + 1) + prev1
            idx = np.searchsorted(self.tri_ctx_keys, keys)
            idx = np.minimum(idx, len(self.tri_ctx_keys) - 1)
            seen = self.tri_ctx_keys[idx] == keys
            rows = np.where(seen, idx, -1)
            probs = self._interpolate(probs, self.tri, rows)
        return probs

    @staticmethod
    def _interpolate(lower: np.ndarray, table, rows: np.ndarray) -> np.ndarray:
        counts, total, types = table
        seen = rows >= 0
        seen[seen] = total[rows[seen]] > 0  # a context never seen keeps the lower order's distribution
        if not seen.any():
            return lower
        r = rows[seen]
        c_h, t_h = total[r][:, None], types[r][:, None]
        dense = counts[r].toarray()
        out = lower.copy()
        out[seen] = (dense + t_h * lower[seen]) / (c_h + t_h)
        return out

    # -- the model calling convention -----------------------------------------------------------------
    def forward(self, input_ids, attention_mask=None, *, cu_seqlens=None, max_seqlen=None,
                prediction_positions=None, return_logits: bool = True, labels=None, **_):
        """Log-probabilities of the next token as `.logits`: `(P, V)` at `prediction_positions` of a packed
        stream, `(N, V)` for all of it, or `(B, T, V)` for padded input."""
        if labels is not None:
            raise ConfigError("an n-gram baseline is not trained by gradient: it has no labels= loss")
        ids = input_ids.detach().cpu().numpy().astype(np.int64)
        if ids.ndim == 2:  # padded batch: every row is one sequence
            rows = [self._sequence_logp(row) for row in ids]
            return SimpleNamespace(logits=torch.from_numpy(np.stack(rows)).float(), hidden_states=None)
        bounds = [0, len(ids)] if cu_seqlens is None else cu_seqlens.detach().cpu().tolist()
        first = np.zeros(len(ids), dtype=bool)
        first[np.asarray(bounds[:-1], dtype=np.int64)] = True
        prev1 = ids.copy()
        prev2 = np.roll(ids, 1)
        prev2[first] = self.S
        pos = (np.arange(len(ids)) if prediction_positions is None
               else prediction_positions.detach().cpu().numpy().astype(np.int64))
        logp = np.log(self.next_token_probs(prev1[pos], prev2[pos]))
        return SimpleNamespace(logits=torch.from_numpy(logp).float(), hidden_states=None)

    def _sequence_logp(self, row: np.ndarray) -> np.ndarray:
        prev2 = np.roll(row, 1)
        prev2[0] = self.S
        return np.log(self.next_token_probs(row, prev2))

    def describe(self, name: str, shards: str | None) -> dict:
        return {"path": shards, "arch": "n-gram", "causal": True, "objective": f"{name} (Witten-Bell)",
                "mntp": False, "variant": name, "params": 0, "order": self.order,
                "trained_tokens": self.trained_tokens, "size": f"{self.order}-gram"}


def shard_chunks(shards: str | Path, max_tokens: int | None = None) -> list[np.ndarray]:
    """The chunks of a shard folder as arrays, the first `max_tokens` tokens' worth (whole chunks)."""
    ds = ShardDataset(shards)
    index = np.asarray(ds.index, dtype=np.int64)
    n = len(index) - 1
    if max_tokens is not None:
        n = min(n, int(np.searchsorted(index, max_tokens, side="left")))
    tokens = np.asarray(ds.tokens[:index[n]], dtype=np.int64)
    return np.split(tokens, index[1:n])


def load_ngram(name: str, shards: str | Path, tokenizer, max_tokens: int | None = None) -> Loaded:
    """The n-gram baseline `name` (unigram, bigram, trigram) fitted on a training shard folder, with the
    shards' tokenizer, as a `Loaded` the eval tracks accept."""
    if name not in NGRAMS:
        raise ConfigError(f"unknown n-gram baseline {name!r}: one of {', '.join(NGRAMS)}")
    shards = Path(shards)
    if not (shards / "meta.json").exists():
        raise MissingArtifactError(f"{shards} is not a shard folder (no meta.json): give the training shards "
                                   "the n-gram baseline is fitted on (twinlm data prepare … --out DIR)")
    check_tokenizer(shards, tokenizer)
    meta = json.loads((shards / "meta.json").read_text())
    special = {k: tokenizer.convert_tokens_to_ids(t) for k, t in
               (("cls", "[CLS]"), ("sep", "[SEP]"), ("mask", "[MASK]"), ("pad", "[PAD]"))}
    vocab = max(len(tokenizer), int(meta.get("tokenizer", {}).get("vocab_size", 0) or 0))
    cfg = NGramConfig(vocab_size=vocab, cls_token_id=special["cls"], sep_token_id=special["sep"],
                      mask_token_id=special["mask"], pad_token_id=special["pad"])
    model = NGramLM(NGRAMS[name], cfg).fit(shard_chunks(shards, max_tokens))
    return Loaded(model.eval(), tokenizer, str(shards), model.describe(name, str(shards)))

