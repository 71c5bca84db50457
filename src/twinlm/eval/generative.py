"""Zero-shot generative track: multiple-choice and completion tasks scored by log-likelihood.

Decoders: log p(continuation | [CLS] context), summed over the continuation's tokens, as
lm-evaluation-harness computes it (trailing spaces of the context move to the continuation; the pair is
tokenized whole and split where the context's own tokens end; BOS = `[CLS]` first). Metrics `acc`,
`acc_norm` (log-likelihood / characters of the choice) and `acc_bytes` (/ UTF-8 bytes) as lm-eval
reports them; completion tasks (LAMBADA) report `acc` (every token the greedy argmax) and `ppl`.

Encoders (REFERENCE §3): continuation token j is scored on its own masked copy of the input
`[CLS] context cont[:j] [MASK] [MASK] [MASK] [SEP]` (the current token and two future tokens masked),
reading the first mask's logits; MNTP-trained encoders read the position before it.

Speed: every sequence (decoder request or encoder copy) goes into padding-free packs of up to
`max_tokens` tokens (cu_seqlens), sorted by length, and the vocabulary head runs only on the scored
positions (`prediction_positions`). `score_requests_naive` is the one-forward-per-sequence reference
the tests compare against.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from twinlm.errors import ConfigError, DataError
from twinlm.eval.common import (
    Loaded,
    Timer,
    check_result,
    encode_plain,
    forward_packed,
    length_batches,
    load_for_eval,
    result_config,
)
from twinlm.eval.metrics import multiple_choice_metrics
from twinlm.eval.settings import GenerativeConfig
from twinlm.eval.tasks import MCExample, load_generative_task
from twinlm.io import write_json

# The metric each task contributes to the average (lm-eval's customary headline for that task).
HEADLINE = {"arc_easy": "acc_norm", "arc_challenge": "acc_norm", "hellaswag": "acc_norm", "piqa": "acc_norm",
            "openbookqa": "acc_norm", "lambada": "acc"}
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
    """(context, continuation) strings -> token requests, split as lm-evaluation-harness does."""
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
        if not bos and not ctx:
            raise ConfigError("an empty context needs add_bos=True (drop --no-bos)")
        if not cont:
            raise DataError(f"continuation {cont_text!r} has no tokens of its own: its choice text is empty "
                            "after the context's tokens")
        req = Request(bos + list(ctx), list(cont))
        if max_length is not None and len(req.ctx) + len(req.cont) > max_length:
            # keep BOS and the continuation; drop the context's oldest tokens (lm-eval truncates left)
            req.cont = req.cont[-(max_length - len(bos) - 1):]
            room = max_length - len(bos) - len(req.cont)
            body = req.ctx[len(bos):]
            req.ctx = bos + (body[-room:] if room > 0 else [])
        out.append(req)
    return out


# --- sequences to score ----------------------------------------------------------------------------
def _decoder_items(req: Request) -> tuple[list[int], list[int], list[int]]:
    """(input sequence, positions read, target tokens): input is ctx + cont minus the last token."""
    seq = req.ctx + req.cont[:-1]
    start = len(req.ctx) - 1
    return seq, list(range(start, start + len(req.cont))), list(req.cont)


def _encoder_items(req: Request, cfg, mntp: bool, n_future: int = N_FUTURE_MASKS):
    """One masked copy per continuation token: (sequence, position read, target)."""
    items = []
    for j, target in enumerate(req.cont):
        prefix = req.ctx + req.cont[:j]
        seq = prefix + [cfg.mask_token_id] * (1 + n_future) + [cfg.sep_token_id]
        pos = len(prefix) - 1 if mntp else len(prefix)
        items.append((seq, pos, target))
    return items


def _work_units(requests: Sequence[Request], cfg, causal: bool, mntp: bool):
    """Flat list of (request index, sequence, positions, targets)."""
    units = []
    for ri, req in enumerate(requests):
        if causal:
            seq, pos, tgt = _decoder_items(req)
            units.append((ri, seq, pos, tgt))
        else:
            for seq, pos, tgt in _encoder_items(req, cfg, mntp):
                units.append((ri, seq, [pos], [tgt]))
    return units


def score_requests(model, requests: Sequence[Request], *, mntp: bool = False, max_tokens: int = 16384,
                   max_docs: int | None = None) -> list[Scored]:
    """Batched, padding-free scoring: many sequences per forward pass, head only on scored positions."""
    cfg = model.config
    units = _work_units(requests, cfg, bool(cfg.causal), mntp)
    ll = np.zeros(len(requests), dtype=np.float64)
    greedy = np.ones(len(requests), dtype=bool)
    ntok = np.zeros(len(requests), dtype=np.int64)
    with torch.inference_mode():
        for batch in length_batches([len(u[1]) for u in units], max_tokens, max_docs):
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


def score_requests_naive(model, requests: Sequence[Request], *, mntp: bool = False) -> list[Scored]:
    """Reference: one padded (batch of 1) forward pass per sequence with the full head — per request
    for decoders, per continuation token for encoders."""
    cfg = model.config
    units = _work_units(requests, cfg, bool(cfg.causal), mntp)
    ll = [0.0] * len(requests)
    greedy = [True] * len(requests)
    ntok = [0] * len(requests)
    with torch.inference_mode():
        for ri, seq, pos, tgt in units:
            logits = model(torch.tensor([seq]), attention_mask=torch.ones(1, len(seq), dtype=torch.long)).logits[0]
            logp = torch.log_softmax(logits.float(), -1)
            for p, t in zip(pos, tgt):
                ll[ri] += float(logp[p, t])
                greedy[ri] &= bool(int(logp[p].argmax()) == t)
                ntok[ri] += 1
    return [Scored(a, b, c) for a, b, c in zip(ll, greedy, ntok)]


# --- tasks -----------------------------------------------------------------------------------------
def evaluate_examples(loaded: Loaded, examples: Sequence[MCExample], *, kind: str = "multiple_choice",
                      add_bos: bool = True, max_tokens: int = 16384, max_length: int | None = None,
                      naive: bool = False) -> tuple[dict, list[list[Scored]]]:
    pairs, owners = [], []
    for ei, ex in enumerate(examples):
        for c, k in zip(ex.contexts, ex.continuations):
            pairs.append((c, k))
            owners.append(ei)
    reqs = tokenize_requests(loaded.tokenizer, loaded.cfg, pairs, add_bos=add_bos,
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


def run(model, cfg: GenerativeConfig | None = None, *, tokenizer=None, mntp: bool | None = None,
        variant: str | None = None, data_root=None, out: str | Path | None = None, log=print,
        device=None) -> dict:
    """Zero-shot scoring of `model` (a folder, a `Loaded`, or a Transformer with `tokenizer`) on built-in
    task names or JSONL files (`cfg.tasks`); `cfg.limit` draws a seeded random subset of each task (None = all).
    `mntp` overrides the detection of MNTP-trained encoders.

    Returns {"track": "generative", "model", "tasks": {name: {acc, acc_norm, acc_bytes | acc, ppl; n,
    score, stderr, seconds, examples_per_s}}, "average": {"metric", "mean", "std", "n_tasks"}, "config"}.
    """
    cfg = cfg or GenerativeConfig()
    t_all = Timer()
    # tasks first: a bad task file fails before any model is loaded
    task_objs = [load_generative_task(name, root=data_root, limit=cfg.limit, seed=cfg.seed, delimiter=cfg.delimiter)
                 for name in cfg.tasks]
    loaded = load_for_eval(model, tokenizer, mntp=mntp, variant=variant, device=device)
    results = {}
    for task in task_objs:
        t = Timer()
        metrics, _ = evaluate_examples(loaded, task.examples, kind=task.kind, add_bos=cfg.add_bos,
                                       max_tokens=cfg.max_tokens, max_length=cfg.max_length)
        sec = t()
        headline = HEADLINE.get(task.name, "acc")
        p = metrics[headline] / 100.0
        metrics.update(score=metrics[headline], headline=headline,
                       stderr=100.0 * math.sqrt(max(p * (1 - p), 0.0) / max(1, metrics["n"])),
                       seconds=sec, examples_per_s=metrics["n"] / sec if sec > 0 else float("inf"))
        results[task.name] = metrics
        if log:
            log(f"[generative] {loaded.info['variant']} {task.name}: {headline}={metrics[headline]:.2f} "
                f"(n={metrics['n']}, {sec:.1f}s)")
    scores = [r["score"] for r in results.values()]
    se = math.sqrt(sum(r["stderr"] ** 2 for r in results.values())) / max(1, len(results))
    result = {"track": "generative", "model": loaded.info, "tasks": results,
              "average": {"metric": "score (acc_norm for ARC/HellaSwag/PIQA/OpenBookQA, acc otherwise)",
                          "mean": float(np.mean(scores)) if scores else float("nan"), "std": se,
                          "std_kind": "standard error over examples (zero-shot scoring is deterministic)",
                          "n_tasks": len(scores)},
              "config": result_config(cfg, t_all(), n_future_masks=N_FUTURE_MASKS,
                                      scoring="log-likelihood" if loaded.causal else
                                      ("masked (MNTP: read position before the first mask)" if loaded.info["mntp"]
                                       else "masked (read first mask)"))}
    check_result(result)
    if out:
        write_json(out, result)
    return result


__all__ = ["run", "score_requests", "score_requests_naive", "tokenize_requests", "evaluate_examples",
           "Request", "Scored", "GenerativeConfig"]
