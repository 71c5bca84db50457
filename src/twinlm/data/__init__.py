"""Data: real corpora (fetch), tokenizers, chunked token shards, mixtures, the loader, batch-order records.

Light to import (numpy only); torch is imported when `pack` builds a batch.
"""

from twinlm.data.loader import BatchStream, PackedBatch, pack
from twinlm.data.mixture import Mixture
from twinlm.data.order import OrderRecorder, read_step, replay_step
from twinlm.data.shards import ShardDataset, ShardError, TokenizerMismatch, check_tokenizer, verify_shards


def load_tokenizer(path):
    """A tokenizer folder as a PreTrainedTokenizerFast (see twinlm.data.tokenizer)."""
    from twinlm.data.tokenizer import load_tokenizer as _load
    return _load(path)


def tokenizer_fingerprint(tok):
    from twinlm.data.tokenizer import tokenizer_fingerprint as _fp
    return _fp(tok)


def model_config_for(tok, preset, **overrides):
    from twinlm.data.tokenizer import model_config_for as _mc
    return _mc(tok, preset, **overrides)


def prepare(*args, **kwargs):
    """See twinlm.data.prepare.prepare."""
    from twinlm.data.prepare import prepare as _prepare
    return _prepare(*args, **kwargs)


__all__ = [
    "BatchStream", "PackedBatch", "pack", "Mixture", "OrderRecorder", "read_step", "replay_step",
    "ShardDataset", "ShardError", "TokenizerMismatch", "check_tokenizer", "verify_shards",
    "load_tokenizer", "tokenizer_fingerprint", "model_config_for", "prepare",
]
