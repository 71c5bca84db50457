"""Helpers for tests and benchmarks: synthetic shard folders and tiny recipes (no tokenizer, no real data)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from twinlm.data.shards import ShardWriter

# shaped like a real tokenizer fingerprint (64 hex digits), which is how check_tokenizer recognises one
SYNTHETIC_FINGERPRINT = hashlib.sha256(b"synthetic-test-shards").hexdigest()


def make_shards(out: str | Path, *, n_docs: int = 300, min_len: int = 16, max_len: int = 64, vocab: int = 4096,
                seed: int = 0, first_id: int = 5, cls_id: int = 1, sep_id: int = 2) -> Path:
    """A shard folder of `[CLS] random tokens [SEP]` chunks with a little structure to learn (repeated bigrams)."""
    rng = np.random.default_rng(seed)
    chunks = []
    for _ in range(n_docs):
        n = int(rng.integers(min_len, max_len + 1)) - 2
        body = rng.integers(first_id, vocab, size=n)
        body[1::2] = (body[0::2][: len(body[1::2])] * 7) % (vocab - first_id) + first_id  # learnable pairs
        chunks.append(np.concatenate([[cls_id], body, [sep_id]]))
    lengths = np.array([len(c) for c in chunks], dtype=np.int64)
    w = ShardWriter(out, vocab_size=vocab, overwrite=True)
    w.add(np.concatenate(chunks), lengths, np.arange(n_docs, dtype=np.int64), lengths * 4)
    w.close({"tokenizer": {"fingerprint": SYNTHETIC_FINGERPRINT}, "source": "synthetic"})
    return Path(out)


def tiny_recipe(data: str | Path, *, objective: str = "mlm", phases: int = 2, tokens: int = 2000,
                batch_size: int = 8, seq_len: int = 64, micro_batch_tokens: int = 256, dropout: float = 0.0,
                every_tokens: int = 0, **extra: Any) -> dict:
    """A cpu-tiny recipe over `data` with 1–3 short phases (the paper's shapes: warmup+constant, 1-sqrt with θ
    160k, decay at 15%)."""
    specs = [
        ("pretrain", {"mask_ratio": 0.3, "schedule": {"warmup_tokens": tokens // 4}, "batch_warmup_tokens": tokens // 2,
                      "batch_warmup_start": max(1, batch_size // 4)}),
        ("extension", {"mask_ratio": 0.3, "rope_theta": 160000,
                       "schedule": {"decay": "one_minus_sqrt", "start": 1.0, "end": 0.5}}),
        ("decay", {"mask_ratio": 0.15, "schedule": {"decay": "one_minus_sqrt", "start": 0.5, "end": 0.02}}),
    ][:phases]
    recipe = {
        "name": "tiny", "objective": objective, "seed": 21, "data": str(data), "precision": "fp32",
        "progress": False, "tensorboard": False,
        "model": {"preset": "cpu-tiny", "overrides": {"attention_dropout": dropout}},
        "optim": {"lr": 3e-3, "weight_decay": 3e-4},
        "checkpoint": {"every_tokens": every_tokens, "keep_last": 2},
        "phases": {name: {"tokens": tokens, "seq_len": seq_len, "batch_size": batch_size,
                          "micro_batch_tokens": micro_batch_tokens, **spec} for name, spec in specs},
    }
    recipe.update(extra)
    return recipe
