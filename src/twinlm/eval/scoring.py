"""Zero-shot scoring by log-likelihood, batched and padding-free: the engine under the generative track's
lm-evaluation-harness model (eval/harness.py) and the reference the tests compare lm-eval's `hf` model with.

Decoders: log p(continuation | [CLS] context), summed over the continuation's tokens, as
lm-evaluation-harness computes it (trailing spaces of the context move to the continuation; the pair is
tokenized whole and split where the context's own tokens end; BOS = `[CLS]` first when `add_bos`; an empty
context is always conditioned on that token, as lm-eval's `prefix_token_id`).

Encoders (REFERENCE §3): continuation token j is scored on its own masked copy of the input
`[CLS] context cont[:j] [MASK] [MASK] [MASK] END` (the current token and two future tokens masked),
reading the first mask's logits; MNTP-trained encoders read the position before it. END is `[SEP]` (the
paper's "end token"; `end_id` picks another, e.g. the Ettin authors' fork's id 15, `.`).

Greedy generation (`greedy_generate`) uses the same layouts: a decoder's next token is the argmax after its
last token; an encoder's is the argmax at the read position of `prefix [MASK] [MASK] [MASK] END`, one token at
a time (repeated masked prediction).

Speed: every sequence (decoder request or encoder copy) goes into padding-free packs of up to
`max_tokens` tokens (cu_seqlens), sorted by length, and the vocabulary head runs only on the scored
positions (`prediction_positions`). `score_requests_naive` is the one-forward-per-sequence reference
the tests compare against.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from twinlm.errors import DataError
from twinlm.eval.common import Loaded, encode_plain, forward_packed, length_batches, resolve_add_bos
from twinlm.eval.metrics import multiple_choice_metrics
from twinlm.eval.tasks.generative import MCExample

N_FUTURE_MASKS = 2


@dataclass
class Request:
    ctx: list[int]    # token ids of the context, BOS included
    cont: list[int]   # token ids of the continuation


@dataclass
class Scored:
    loglikelihood: float
    is_greedy: bool
    n_tokens: int


# --- tokenization ----------------------------------------------------------------------------------
def tokenize_requests(tokenizer, cfg, pairs: Sequence[tuple[str, str]], add_bos: bool = True,
                      max_length: int | None = None) -> list[Request]:
    """(context, continuation) strings -> token requests, split as lm-evaluation-harness does: `add_bos` puts
    `[CLS]`/BOS first; without it an empty context alone gets that token (lm-eval's prefix token), so the
    continuation's first token is still scored."""
    ctxs, wholes = [], []
    for context, continuation in pairs:
        n = len(context) - len(context.rstrip())
        if n:
            continuation = context[-n:] + continuation
            context = context[:-n]
        ctxs.append(context)
        wholes.append(context + continuation)
    nonempty = [c for c in ctxs if c]
    enc_ctx = iter(encode_plain(tokenizer, nonempty))
    enc_whole = encode_plain(tokenizer, wholes)
    bos = [cfg.cls_token_id] if add_bos else []
    out = []
    for c, whole, (_, cont_text) in zip(ctxs, enc_whole, pairs):
        if c:
            ctx = next(enc_ctx)
            cont = whole[len(ctx):]
        else:
            ctx, cont = [], whole
        lead = bos if (bos or ctx) else [cfg.cls_token_id]
        if not cont:
            raise DataError(f"continuation {cont_text!r} has no tokens of its own: its choice text is empty "
                            "after the context's tokens")
        req = Request(lead + list(ctx), list(cont))
        if max_length is not None and len(req.ctx) + len(req.cont) > max_length:
            # keep BOS and the continuation; drop the context's oldest tokens (lm-eval truncates left)
            req.cont = req.cont[-(max_length - len(lead) - 1):]
            room = max_length - len(lead) - len(req.cont)
            body = req.ctx[len(lead):]
            req.ctx = lead + (body[-room:] if room > 0 else [])
        out.append(req)
    return out


# --- sequences to score ----------------------------------------------------------------------------
def _decoder_items(req: Request) -> tuple[list[int], list[int], list[int]]:
    """(input sequence, positions read, target tokens): input is ctx + cont minus the last token."""
    seq = req.ctx + req.cont[:-1]
    start = len(req.ctx) - 1
    return seq, list(range(start, start + len(req.cont))), list(req.cont)


def masked_query(prefix: list[int], cfg, mntp: bool, end_id: int | None = None,
                 n_future: int = N_FUTURE_MASKS) -> tuple[list[int], int]:
    """`prefix [MASK]×(1 + n_future) END` and the position whose logits predict the token after `prefix`
    (the first mask; MNTP: the last token of the prefix)."""
    end = cfg.sep_token_id if end_id is None else end_id
    seq = prefix + [cfg.mask_token_id] * (1 + n_future) + [end]
    return seq, len(prefix) - 1 if mntp else len(prefix)


def _encoder_items(req: Request, cfg, mntp: bool, n_future: int = N_FUTURE_MASKS, end_id: int | None = None):
    """One masked copy per continuation token: (sequence, position read, target)."""
    items = []
    for j, target in enumerate(req.cont):
        seq, pos = masked_query(req.ctx + req.cont[:j], cfg, mntp, end_id, n_future)
        items.append((seq, pos, target))
    return items


def _work_units(requests: Sequence[Request], cfg, causal: bool, mntp: bool, end_id: int | None = None):
    """Flat list of (request index, sequence, positions, targets)."""
    units = []
    for ri, req in enumerate(requests):
        if causal:
            seq, pos, tgt = _decoder_items(req)
            units.append((ri, seq, pos, tgt))
        else:
            for seq, p, t in _encoder_items(req, cfg, mntp, end_id=end_id):
                units.append((ri, seq, [p], [t]))
    return units


def score_requests(model, requests: Sequence[Request], *, mntp: bool = False, max_tokens: int = 16384,
                   max_docs: int | None = None, end_id: int | None = None) -> list[Scored]:
    """Batched, padding-free scoring: many sequences per forward pass, head only on scored positions. A progress
    bar over the scored sequences (stderr) shows only on a terminal and for more than one pack."""
    cfg = model.config
    units = _work_units(requests, cfg, bool(cfg.causal), mntp, end_id)
    packs = list(length_batches([len(u[1]) for u in units], max_tokens, max_docs))
    ll = np.zeros(len(requests), dtype=np.float64)
    greedy = np.ones(len(requests), dtype=bool)
    ntok = np.zeros(len(requests), dtype=np.int64)
    bar = tqdm(total=len(units), unit="seq", desc="scoring", dynamic_ncols=True, leave=False,
               disable=len(packs) < 2 or not sys.stderr.isatty())
    with torch.inference_mode(), bar:
        for batch in packs:
            bar.update(len(batch))
            seqs = [units[i][1] for i in batch]
            offsets, acc = [], 0
            for s in seqs:
                offsets.append(acc)
                acc += len(s)
            flat_pos = [off + p for off, i in zip(offsets, batch) for p in units[i][2]]
            targets = torch.tensor([t for i in batch for t in units[i][3]], dtype=torch.long)
            out, _ = forward_packed(model, seqs, prediction_positions=flat_pos)
            logp = torch.log_softmax(out.logits.float(), dim=-1).cpu()
            tok_ll = logp.gather(1, targets[:, None]).squeeze(1).double().numpy()
            tok_greedy = (logp.argmax(-1) == targets).numpy()
            k = 0
            for i in batch:
                n = len(units[i][3])
                ri = units[i][0]
                ll[ri] += tok_ll[k:k + n].sum()
                greedy[ri] &= bool(tok_greedy[k:k + n].all())
                ntok[ri] += n
                k += n
    return [Scored(float(a), bool(b), int(c)) for a, b, c in zip(ll, greedy, ntok)]


def score_requests_naive(model, requests: Sequence[Request], *, mntp: bool = False,
                         end_id: int | None = None) -> list[Scored]:
    """Reference: one padded (batch of 1) forward pass per sequence with the full head — per request
    for decoders, per continuation token for encoders."""
    cfg = model.config
    units = _work_units(requests, cfg, bool(cfg.causal), mntp, end_id)
    ll = [0.0] * len(requests)
    greedy = [True] * len(requests)
    ntok = [0] * len(requests)
    device = next(model.parameters()).device
    with torch.inference_mode():
        for ri, seq, pos, tgt in units:
            logits = model(torch.tensor([seq], device=device),
                           attention_mask=torch.ones(1, len(seq), dtype=torch.long, device=device)).logits[0]
            logp = torch.log_softmax(logits.float(), -1)
            for p, t in zip(pos, tgt):
                ll[ri] += float(logp[p, t])
                greedy[ri] &= bool(int(logp[p].argmax()) == t)
                ntok[ri] += 1
    return [Scored(a, b, c) for a, b, c in zip(ll, greedy, ntok)]


# --- generation ------------------------------------------------------------------------------------
def greedy_generate(model, prompts: Sequence[list[int]], max_new: Sequence[int], *,
                    stop: Callable[[int, list[int]], bool] | None = None, mntp: bool = False,
                    end_id: int | None = None, max_tokens: int = 16384) -> list[list[int]]:
    """Greedy continuations of token prompts (BOS included), all prompts advanced one token per round in
    padding-free packs (no cache: each round reads the whole prefix again). `max_new[i]` caps prompt i's new
    tokens; `stop(i, generated)` ends it early (e.g. an `until` string was produced). Decoders read the
    position after the last token; encoders the masked layout of `masked_query`."""
    cfg = model.config
    causal = bool(cfg.causal)
    out: list[list[int]] = [[] for _ in prompts]
    active = [i for i in range(len(prompts)) if max_new[i] > 0]
    with torch.inference_mode():
        while active:
            seqs, pos = [], []
            for i in active:
                prefix = list(prompts[i]) + out[i]
                if causal:
                    seqs.append(prefix)
                    pos.append(len(prefix) - 1)
                else:
                    seq, p = masked_query(prefix, cfg, mntp, end_id)
                    seqs.append(seq)
                    pos.append(p)
            nxt: dict[int, int] = {}
            for batch in length_batches([len(s) for s in seqs], max_tokens):
                sub = [seqs[b] for b in batch]
                offsets = np.cumsum([0] + [len(s) for s in sub[:-1]])
                flat = [int(offsets[j]) + pos[b] for j, b in enumerate(batch)]
                res, _ = forward_packed(model, sub, prediction_positions=flat)
                for b, t in zip(batch, res.logits.float().argmax(-1).cpu().tolist()):
                    nxt[active[b]] = int(t)
            still = []
            for i in active:
                out[i].append(nxt[i])
                if len(out[i]) < max_new[i] and not (stop and stop(i, out[i])):
                    still.append(i)
            active = still
    return out


# --- multiple-choice examples (the JSONL tasks' reference path; tests and benchmarks) ---------------
def evaluate_examples(loaded: Loaded, examples: Sequence[MCExample], *, kind: str = "multiple_choice",
                      add_bos: bool | None = None, max_tokens: int = 16384, max_length: int | None = None,
                      naive: bool = False) -> tuple[dict, list[list[Scored]]]:
    """Score `MCExample`s directly (no lm-eval): acc / acc_norm / acc_bytes, or for a completion task acc and
    ppl, with each example's per-choice `Scored`. `add_bos` None: `common.resolve_add_bos` (twinlm's models and
    encoders True; another transformers decoder as its tokenizer does)."""
    pairs, owners = [], []
    for ei, ex in enumerate(examples):
        for c, k in zip(ex.contexts, ex.continuations):
            pairs.append((c, k))
            owners.append(ei)
    reqs = tokenize_requests(loaded.tokenizer, loaded.cfg, pairs, add_bos=resolve_add_bos(add_bos, loaded),
                             max_length=max_length or loaded.cfg.max_position_embeddings)
    mntp = bool(loaded.info.get("mntp"))
    scored = score_requests_naive(loaded.model, reqs, mntp=mntp) if naive else \
        score_requests(loaded.model, reqs, mntp=mntp, max_tokens=max_tokens)
    per_ex: list[list[Scored]] = [[] for _ in examples]
    for o, s in zip(owners, scored):
        per_ex[o].append(s)
    n = len(examples)
    if kind == "completion":
        total_ll = sum(s[0].loglikelihood for s in per_ex)
        metrics = {"acc": 100.0 * sum(s[0].is_greedy for s in per_ex) / max(1, n),
                   "ppl": math.exp(-total_ll / max(1, n))}
    else:
        metrics = multiple_choice_metrics([[s.loglikelihood for s in row] for row in per_ex],
                                          [e.label for e in examples], [e.choice_texts for e in examples])
    metrics["n"] = n
    metrics["requests"] = len(reqs)
    metrics["scored_tokens"] = int(sum(s.n_tokens for s in scored))
    return metrics, per_ex


__all__ = ["N_FUTURE_MASKS", "Request", "Scored", "evaluate_examples", "greedy_generate", "masked_query",
           "score_requests", "score_requests_naive", "tokenize_requests"]
