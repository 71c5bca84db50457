"""Greedy text continuation with a twinlm decoder, the reference that transformers' `generate` is tested against.

`greedy(model, ids, max_new_tokens, eos_token_id)` appends the argmax token one at a time, running the whole
sequence each step (no KV cache: simple and exact, for checks and small demos, not for serving), and stops
after `eos_token_id`. `continue_text(model, tokenizer, prompt)` tokenizes a prompt as training saw a document
start, `[CLS] text` (no `[SEP]`: the end of a document), and returns the decoded continuation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from twinlm.errors import ConfigError


def greedy(model, ids: Sequence[int], max_new_tokens: int = 20, eos_token_id: int | None = None) -> list[int]:
    """`ids` followed by up to `max_new_tokens` greedily chosen tokens (stopping after `eos_token_id`)."""
    if not model.config.causal:
        raise ConfigError("greedy decoding needs a decoder (an encoder predicts masked tokens, not the next one)")
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be at least 0, got {max_new_tokens}")
    out = list(ids)
    device = next(model.parameters()).device
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            x = torch.tensor([out], dtype=torch.long, device=device)
            nxt = int(model(x).logits[0, -1].argmax())
            out.append(nxt)
            if eos_token_id is not None and nxt == eos_token_id:
                break
    return out


def continue_text(model, tokenizer, prompt: str, max_new_tokens: int = 20) -> str:
    """The greedy continuation of `prompt` (`[CLS] prompt`), stopping at `[SEP]`, without special tokens."""
    cfg = model.config
    ids = [cfg.cls_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    out = greedy(model, ids, max_new_tokens, eos_token_id=cfg.sep_token_id)
    return tokenizer.decode(out[len(ids):], skip_special_tokens=True)


__all__ = ["greedy", "continue_text"]
