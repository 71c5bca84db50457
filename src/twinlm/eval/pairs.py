"""Minimal-pairs track: does the model score a real sentence above its corrupted twin?

Pairs come from a JSONL file (`{good, bad, family}`, BLiMP's files unchanged) or are built from held-out
text (twinlm.eval.tasks.pairs: swap, replace, splice, agreement, article). Each sentence is scored on its own:

- decoders (and n-gram baselines): log-likelihood, log p(sentence | [CLS]) summed over its tokens;
- encoders: pseudo-log-likelihood (Salazar et al., 2020), the sum over tokens of log p(token) read from a
  copy of `[CLS] sentence [SEP]` with only that token masked (`[MASK]`, no random or kept tokens, as the
  bits-per-byte track masks); MNTP-trained encoders read the position before the mask.

The score compared is the (pseudo-)log-likelihood per UTF-8 byte of the sentence, the same
tokenizer-independent normalisation for both kinds; a pair is right when the real sentence scores higher,
half right on a tie (an order-blind unigram ties on swapped words), wrong otherwise. `accuracy_sum` is the
same with total log-likelihood (BLiMP's convention). Accuracy per family with a bootstrap standard error
and 95% percentile interval (resampling pairs); the average is the accuracy over all pairs (families of a
few pairs do not swing it), with the mean over families (`macro`, a bootstrap stratified by family) beside
it. Each pair's outcome is kept in the result (`correct`), so two models can be compared pair by pair.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from twinlm.errors import ConfigError, DataError, ScoreError
from twinlm.eval.bpb import held_out_texts, target_logprobs
from twinlm.eval.common import (
    Timer,
    check_result,
    encode_plain,
    load_for_eval,
    placement,
    result_config,
)
from twinlm.eval.metrics import bootstrap_macro, bootstrap_ratio
from twinlm.eval.ranks import Ranks
from twinlm.eval.ranks import ranks as job_ranks
from twinlm.eval.settings import PairsConfig
from twinlm.eval.tasks.pairs import Pair, build_pairs, read_pair_file
from twinlm.io import write_json

TIE = 1e-9  # relative difference under which two scores count as equal


def sentence_logliks(model, tokenizer, texts: Sequence[str], *, mntp: bool = False,
                     max_tokens: int = 16384, ranks: Ranks | None = None) -> list[float]:
    """Log-likelihood (decoders) or pseudo-log-likelihood (encoders) of each text, in nats, on the model's device
    (bpb.target_logprobs: under `ranks` each rank runs a share of the forward passes; every rank gets every
    score, equal to one process's)."""
    cfg = model.config
    toks = encode_plain(tokenizer, texts)
    units = []  # (text index, sequence, read positions, targets)
    for k, t in enumerate(toks):
        if not t:
            raise DataError(f"sentence {texts[k]!r} has no tokens: a pair needs text on both sides")
        if cfg.causal:
            units.append((k, [cfg.cls_token_id, *t[:-1]], list(range(len(t))), list(t)))
        else:
            for j in range(len(t)):
                seq = [cfg.cls_token_id, *t, cfg.sep_token_id]
                seq[1 + j] = cfg.mask_token_id
                units.append((k, seq, [j if mntp else 1 + j], [t[j]]))
    total = np.zeros(len(texts), dtype=np.float64)
    for batch, picked in target_logprobs(model, [u[1] for u in units], [u[2] for u in units], [u[3] for u in units],
                                         max_tokens, ranks):
        np.add.at(total, np.asarray([units[i][0] for i in batch for _ in units[i][2]]), picked)
    if not np.isfinite(total).all():
        raise ScoreError("a sentence scored NaN or infinity: the model produced non-finite values (damaged or "
                         "diverged weights?); no pairs result is reported")
    return total.tolist()


def _outcome(good: float, bad: float) -> float:
    if abs(good - bad) <= TIE * max(1.0, abs(good), abs(bad)):
        return 0.5
    return 1.0 if good > bad else 0.0


def score_pairs(loaded, pairs: Sequence[Pair], max_tokens: int = 16384, ranks: Ranks | None = None
                ) -> dict[str, dict[str, list[float]]]:
    """{family: {"correct": [...], "correct_sum": [...]}} for each pair in order (the sentences scored across
    `ranks`, the outcomes on every rank)."""
    texts = [p.good for p in pairs] + [p.bad for p in pairs]
    ll = sentence_logliks(loaded.model, loaded.tokenizer, texts, mntp=bool(loaded.info.get("mntp")),
                          max_tokens=max_tokens, ranks=ranks)
    n = len(pairs)
    out: dict[str, dict[str, list[float]]] = {}
    for i, p in enumerate(pairs):
        good, bad = ll[i], ll[n + i]
        fam = out.setdefault(p.family, {"correct": [], "correct_sum": []})
        fam["correct"].append(_outcome(good / len(p.good.encode("utf-8")), bad / len(p.bad.encode("utf-8"))))
        fam["correct_sum"].append(_outcome(good, bad))
    return out


def load_pairs(cfg: PairsConfig, texts: Sequence[str] | None = None, data_root=None) -> tuple[str, list[Pair]]:
    """(source name, pairs): the pair file, or pairs built from `texts`, `cfg.text_file` or LAMBADA."""
    if cfg.pairs_file is not None:
        pairs = read_pair_file(cfg.pairs_file)
        name = Path(cfg.pairs_file).stem
    else:
        if cfg.per_family is None:
            raise ConfigError("per_family none (all pairs) applies to a pair file; pairs built from text need a "
                              "count per family (--per-family N, default 200)")
        name, docs = held_out_texts(texts, cfg.text_file, data_root)
        pairs = build_pairs(docs, cfg.families, cfg.per_family, cfg.seed, cfg.min_words, cfg.max_words)
        if not pairs:
            raise DataError(f"no minimal pairs could be built from {name} ({len(docs)} documents): it needs "
                            f"sentences of {cfg.min_words}-{cfg.max_words} words ending in . ! or ?")
    if cfg.pairs_file is not None and cfg.per_family is not None:
        by_family: dict[str, list[Pair]] = {}
        for p in pairs:
            by_family.setdefault(p.family, []).append(p)
        rng = random.Random(cfg.seed)
        pairs = [p for fam in by_family.values()
                 for p in (fam if len(fam) <= cfg.per_family else rng.sample(fam, cfg.per_family))]
    return name, pairs


def run(model, cfg: PairsConfig | None = None, *, tokenizer=None, texts: Sequence[str] | None = None,
        mntp: bool | None = None, variant: str | None = None, data_root=None, out: str | Path | None = None,
        log=print, device=None, ranks: Ranks | None = None) -> dict:
    """Minimal-pairs accuracy of `model` (a folder, a `Loaded` — an n-gram baseline too — or a Transformer
    with `tokenizer`) per family, with bootstrap intervals.

    On `device` (twinlm.eval.device.resolve_device; bf16 autocast on accelerators, fp32 on the CPU, recorded
    as the config's `device` and `precision`; an n-gram baseline stays on the CPU). Under torchrun (`ranks`
    None: twinlm.eval.ranks.ranks() joins the job; `Ranks()` runs alone) the sentences' forward passes are
    shared among the ranks; the bootstrap runs on the gathered scores, so every rank's result equals one
    process's, and rank 0 alone logs and writes `out`."""
    cfg = cfg or PairsConfig()
    r = job_ranks() if ranks is None else ranks
    loaded = load_for_eval(model, tokenizer, mntp=mntp, variant=variant, device=device)
    name, pairs = load_pairs(cfg, texts, data_root)
    t = Timer()
    outcomes = score_pairs(loaded, pairs, cfg.max_tokens, r)
    tasks = {}
    for i, (family, res) in enumerate(sorted(outcomes.items())):
        c = res["correct"]
        b = bootstrap_ratio(c, [1.0] * len(c), cfg.bootstrap, seed=cfg.seed + i)
        tasks[family] = {"accuracy": 100 * b["value"], "ci95": [100 * b["lo"], 100 * b["hi"]], "se": 100 * b["se"],
                         "accuracy_sum": 100 * float(np.mean(res["correct_sum"])), "n": len(c),
                         "score": 100 * b["value"], "score_std": 100 * b["se"], "headline": "accuracy",
                         "correct": c}
    every = [c for fam in sorted(outcomes) for c in outcomes[fam]["correct"]]
    pooled = bootstrap_ratio(every, [1.0] * len(every), cfg.bootstrap, seed=cfg.seed)
    macro = bootstrap_macro({f: r["correct"] for f, r in outcomes.items()}, cfg.bootstrap, seed=cfg.seed)
    seconds = t()
    if log and r.writes:
        fams = ", ".join(f"{f} {r['accuracy']:.1f}" for f, r in tasks.items())
        log(f"[pairs] {loaded.info['variant']} {name}: {100 * pooled['value']:.1f}% ({fams}; {len(pairs)} pairs, "
            f"{seconds:.1f}s)")
    result = {"track": "pairs", "model": loaded.info, "tasks": tasks,
              "average": {"metric": "minimal-pair accuracy (%), all pairs", "mean": 100 * pooled["value"],
                          "std": 100 * pooled["se"], "std_kind": "bootstrap standard error (pairs resampled)",
                          "ci95": [100 * pooled["lo"], 100 * pooled["hi"]], "n_tasks": len(tasks),
                          "n_pairs": len(pairs), "macro": 100 * macro["value"], "macro_se": 100 * macro["se"],
                          "macro_ci95": [100 * macro["lo"], 100 * macro["hi"]]},
              "config": result_config(cfg, seconds, source=name,
                                      scoring="log-likelihood per byte" if loaded.causal else
                                      "pseudo-log-likelihood per byte (one masked copy per token)",
                                      **placement(loaded.device))}
    check_result(result)
    if out and r.writes:
        write_json(out, result)
    return result
