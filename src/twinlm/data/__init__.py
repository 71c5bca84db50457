"""Data, in the order it flows: fetch (real corpora) -> inputs (readers) -> tokenizer -> prepare (chunking) ->
shards (on disk) -> mixture -> loader (batches); order records the batches a run saw.

Light to import (numpy and tokenizers): torch is imported when `pack` builds a batch, transformers when a
tokenizer is loaded, pyarrow when parquet is read or written. `prepare` lives in `twinlm.data.prepare`.
"""

from twinlm.data.loader import BatchStream, PackedBatch, pack
from twinlm.data.mixture import Mixture
from twinlm.data.order import OrderRecorder, read_step, replay_step
from twinlm.data.shards import ShardDataset, ShardError, TokenizerMismatch, check_tokenizer, verify_shards
from twinlm.data.tokenizer import load_tokenizer, model_config_for, tokenizer_fingerprint

__all__ = [
    "BatchStream", "PackedBatch", "pack", "Mixture", "OrderRecorder", "read_step", "replay_step",
    "ShardDataset", "ShardError", "TokenizerMismatch", "check_tokenizer", "verify_shards",
    "load_tokenizer", "tokenizer_fingerprint", "model_config_for",
]
