"""Static shapes for a compiled step without recompiles (and for CUDA graphs): each micro-batch padded to sizes
that depend on its phase only.

A graph compiled with `dynamic=False`, and a CUDA graph (which replays fixed shapes at fixed addresses), serves one
set of shapes. `pad_packed` gives a packed micro-batch those of its phase:

- tokens: exactly the phase's `micro_batch_tokens`; the free room holds padding documents of at most `seq_len`
  tokens each (the pad id, no targets), so no real document sees a token more or less;
- documents: `cu_seqlens` grows to a capacity bucket (`doc_capacity`: a power of two, at least 64) by repeating
  the last offset, i.e. zero-length documents, which every attention backend skips;
- `max_seqlen`: the phase's `seq_len`, an upper bound on the document length (as flash-attn's kernels take it);
- targets: the phase's target capacity (`target_capacity`: every token for a decoder; for masking objectives
  the masked share of the tokens with a margin, rounded up to TARGET_BUCKET), the extra head positions at token
  0 with the ignore index (no loss and no gradient); a micro-batch with more targets than that (never seen at
  the margin's 8 standard deviations) takes the next multiple of TARGET_BUCKET.

So a partly filled micro-batch (a step's last) has the shapes of a full one, and a phase compiles one graph
per document bucket (a power of two: a handful over a phase) in training and in evaluation (train/dist.py
raises dynamo's recompile limit to GRAPHS_PER_MODEL for this). The loss and the gradients are those of the
unpadded micro-batch (the padding attends only to itself and carries no target); the count of real targets, by
which the step normalises the loss, is returned beside the padded tensors.
"""

from __future__ import annotations

import math

import torch

from twinlm.ops import IGNORE_INDEX

TARGET_BUCKET = 256  # head positions are padded to a multiple of this
MIN_DOC_CAPACITY = 64  # the smallest document bucket
TARGET_MARGIN = 1.05  # masked targets above the expected share a capacity allows
GRAPHS_PER_MODEL = 64  # the recompile limit for a whole model compiled at static shapes (documents × modes)


def doc_capacity(n_docs: int) -> int:
    """The document bucket for `n_docs` documents: the next power of two, at least MIN_DOC_CAPACITY."""
    return max(MIN_DOC_CAPACITY, 1 << max(0, math.ceil(math.log2(max(n_docs, 1)))))


def target_bucket(n_targets: int) -> int:
    """`n_targets` rounded up to a multiple of TARGET_BUCKET, at least one bucket."""
    return max(1, math.ceil(n_targets / TARGET_BUCKET)) * TARGET_BUCKET


def target_capacity(tokens: int, mask_ratio: float | None) -> int:
    """The head positions of a phase's micro-batches of `tokens` tokens: all of them for a decoder
    (`mask_ratio` None), else the masked share with TARGET_MARGIN, in TARGET_BUCKET steps, at most `tokens`."""
    if mask_ratio is None:
        return target_bucket(tokens)
    return min(target_bucket(tokens), target_bucket(math.ceil(tokens * mask_ratio * TARGET_MARGIN)))


def pad_packed(input_ids: torch.Tensor, cu_seqlens: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor, *,
               tokens: int, seq_len: int, pad_id: int, targets_to: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """(input_ids, cu_seqlens, max_seqlen, positions, targets) of a packed micro-batch (host tensors: ids (N,),
    int32 boundaries (D+1,), head positions and targets (K,)) padded to its phase's static shapes (the module
    docstring). `tokens` is the phase's micro_batch_tokens, `seq_len` its longest document, `targets_to` its
    target capacity (`target_capacity`; None: K rounded up to TARGET_BUCKET)."""
    n = int(input_ids.numel())
    if n > tokens:
        raise ValueError(f"a micro-batch of {n} tokens cannot be padded to {tokens}")
    cu = [int(c) for c in cu_seqlens.tolist()]
    pad = tokens - n
    cu += [min(n + (i + 1) * seq_len, tokens) for i in range(math.ceil(pad / seq_len))]
    capacity = doc_capacity(len(cu) - 1)
    cu += [tokens] * (capacity + 1 - len(cu))
    ids = torch.cat([input_ids, input_ids.new_full((pad,), pad_id)])
    k = int(targets.numel())
    extra = (targets_to if targets_to is not None and k <= targets_to else target_bucket(k)) - k
    pos = torch.cat([positions, positions.new_zeros(extra)])
    tgt = torch.cat([targets, targets.new_full((extra,), IGNORE_INDEX)])
    return ids, torch.tensor(cu, dtype=torch.int32), seq_len, pos, tgt
