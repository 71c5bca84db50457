"""Retrieval track: contrastive fine-tuning with in-batch negatives, then nDCG@10 / MRR@10 / Recall@100
on held-out queries.

Sets built from the fetched QA data (tasks.RETRIEVAL_SETS): SQuAD, BoolQ and SciQ — corpus = every
passage of the set, a question's one relevant document = its own passage. A fixed draw of each set's
questions (`max_eval_queries`) is held out; the other questions with their passages are the training
pairs (the union over sets, capped at `max_train_pairs`).

Loss: sentence-transformers' MultipleNegativesRankingLoss — cross-entropy over cosine similarities × 20
between each query and every passage of the batch, its own passage the target. Pooling: encoder mean,
decoder last token (the `[SEP]` that closes `[CLS] text [SEP]`), exactly what sentence-transformers
computes on the folder `export_sentence_transformers` writes.

Baselines on the same held-out queries and corpora: `model="bm25"`, `model="minilm"` (zero-shot).

Devices and ranks. Fine-tuning (optimizer state, batches) and encoding run on `device`, under bf16 autocast on
accelerators and in fp32 on the CPU (bit-identical to scoring without a device); similarities and the loss are
fp32. Under torchrun the seeds' fine-tuning runs are shared out, each fine-tuned copy is sent to every rank, and
the packs that encode every set's queries and passages are shared out and gathered (twinlm.eval.ranks): every
rank returns one process's result, rank 0 writes it.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from twinlm.card import CARD, sentence_transformers_card
from twinlm.errors import ConfigError
from twinlm.eval import baselines
from twinlm.eval.common import (
    ST_POOLING_MODES,
    Loaded,
    Timer,
    check_result,
    choose_pooling,
    embed,
    embed_groups,
    encode_with_specials,
    forward_packed,
    load_for_eval,
    placement,
    pool_packed,
    result_config,
)
from twinlm.eval.device import autocast, model_device, resolve_device
from twinlm.eval.metrics import retrieval_metrics, run_from_scores, summarise
from twinlm.eval.ranks import Ranks
from twinlm.eval.ranks import ranks as job_ranks
from twinlm.eval.settings import RetrievalConfig, seed_list
from twinlm.eval.tasks import RetrievalSet, load_retrieval_set
from twinlm.export import GENERATION_CONFIG, TOKENIZER_FILES, WEIGHTS, apply_tokenizer_conventions, write_manifest
from twinlm.io import write_bytes, write_json

SCALE = 20.0


def held_out(sets: Sequence[RetrievalSet], max_eval_queries: int, max_corpus: int | None = None,
             seed: int = 0) -> tuple[list[RetrievalSet], list[tuple[str, str]]]:
    """(test sets, training (query, passage) pairs). Each set's test part keeps `max_eval_queries`
    questions; `max_corpus` keeps all their relevant passages plus a seeded draw of the others."""
    tests, pairs = [], []
    for s in sets:
        n_test = min(max_eval_queries, max(1, len(s.queries) // 2))
        train, test = s.split(n_test, seed=seed)
        if max_corpus is not None and max_corpus < len(test.corpus):
            keep = {d for rel in test.qrels.values() for d in rel}
            others = sorted(set(test.corpus) - keep)
            random.Random(seed).shuffle(others)
            keep |= set(others[:max(0, max_corpus - len(keep))])
            test = RetrievalSet(test.name, {d: test.corpus[d] for d in sorted(keep)}, test.queries, test.qrels,
                                test.meta)
        tests.append(test)
        for q, rel in train.qrels.items():
            for d in rel:
                pairs.append((train.queries[q], s.corpus[d]))
    return tests, pairs


# --- model side ------------------------------------------------------------------------------------
def contrastive_finetune(loaded: Loaded, pairs: Sequence[tuple[str, str]], *, pooling: str, seed: int = 0,
                         epochs: int = 1, batch_size: int = 32, lr: float = 2e-4, warmup: float = 0.1,
                         max_length: int = 256, query_max_length: int = 64, log=None):
    """A fine-tuned copy of the model (MultipleNegativesRankingLoss, scale 20, cosine) on the model's device, and
    its per-step losses. Seeds itself (torch's generators, the batch order): the copy depends on its arguments
    alone. The forward runs under the device's autocast (bf16 on accelerators, fp32 on the CPU); pooling,
    similarities and loss are fp32; the losses are read back once, after the last step. `batch_size` counts
    pairs (a setting: in-batch negatives make it part of the objective)."""
    torch.manual_seed(seed)
    model = copy.deepcopy(loaded.model)
    device = model_device(model)
    model.train()
    q_seqs = encode_with_specials(loaded.tokenizer, loaded.cfg, [q for q, _ in pairs], max_length=query_max_length)
    d_seqs = encode_with_specials(loaded.tokenizer, loaded.cfg, [d for _, d in pairs], max_length=max_length)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98), eps=1e-6)
    rng = random.Random(seed)
    steps = max(1, epochs * (len(pairs) // batch_size or 1))
    warm = max(1, int(warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    step_losses: list[torch.Tensor] = []
    for _ in range(epochs):
        order = list(range(len(pairs)))
        rng.shuffle(order)
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        if len(batches) > 1 and len(batches[-1]) < 2:
            batches.pop()
        for b in batches:
            seqs = [q_seqs[i] for i in b] + [d_seqs[i] for i in b]
            with autocast(device):
                out, _ = forward_packed(model, seqs, return_logits=False)
            emb = pool_packed(out.hidden_states.float(), [len(s) for s in seqs], pooling)
            q, d = emb[:len(b)], emb[len(b):]
            sim = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(d, dim=-1).T
            loss = torch.nn.functional.cross_entropy(SCALE * sim, torch.arange(len(b), device=device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step_losses.append(loss.detach())
    model.eval()
    losses: list[float] = torch.stack(step_losses).cpu().tolist() if step_losses else []
    if log and losses:
        log(f"  contrastive fine-tuning: {len(losses)} steps, loss {losses[0]:.3f} -> {np.mean(losses[-5:]):.3f}")
    return model, losses


def encode_texts(model, tokenizer, texts: Sequence[str], pooling: str, max_length: int = 256,
                 max_tokens: int = 16384) -> np.ndarray:
    """Pooled embeddings of `texts` (`[CLS] text [SEP]`, cut at `max_length`) on the model's device, packed
    `max_tokens` tokens at a time; a float32 array."""
    seqs = encode_with_specials(tokenizer, model.config, list(texts), max_length=max_length)
    return embed(model, seqs, pooling, max_tokens=max_tokens).float().numpy()


def score_sets(model, tokenizer, tests: Sequence[RetrievalSet], pooling: str, *, max_length: int,
               query_max_length: int, max_tokens: int = 16384, ranks: Ranks | None = None) -> dict[str, dict]:
    """`evaluate_sets` with `model`: each set's queries and passages are encoded as `encode_texts` encodes them
    (one call each, so the same packs), the packs of all sets shared out over `ranks` and gathered
    (`embed_groups`): every rank gets the scores one process computes."""
    groups = []
    for s in tests:
        groups.append(encode_with_specials(tokenizer, model.config, list(s.queries.values()),
                                           max_length=query_max_length))
        groups.append(encode_with_specials(tokenizer, model.config, list(s.corpus.values()), max_length=max_length))
    vecs = [g.get(pooling, torch.empty(0)).float().numpy()
            for g in embed_groups(model, groups, [pooling], max_tokens=max_tokens, ranks=ranks)]
    return {s.name: retrieval_metrics(s.qrels, _cosine_run(vecs[2 * n], vecs[2 * n + 1], list(s.queries),
                                                           list(s.corpus)))
            for n, s in enumerate(tests)}


def _cosine_run(qv: np.ndarray, dv: np.ndarray, qids, dids):
    qv = qv / np.maximum(np.linalg.norm(qv, axis=1, keepdims=True), 1e-12)
    dv = dv / np.maximum(np.linalg.norm(dv, axis=1, keepdims=True), 1e-12)
    return run_from_scores(qids, dids, qv @ dv.T, top=100)


def evaluate_sets(encode_queries, encode_docs, tests: Sequence[RetrievalSet]) -> dict[str, dict]:
    out = {}
    for s in tests:
        qids, dids = list(s.queries), list(s.corpus)
        qv = encode_queries([s.queries[q] for q in qids])
        dv = encode_docs([s.corpus[d] for d in dids])
        out[s.name] = retrieval_metrics(s.qrels, _cosine_run(qv, dv, qids, dids))
    return out


def _shared_net(loaded: Loaded, net, owner: int, ranks: Ranks):
    """A fine-tuned copy made on rank `owner` (`net` there, None elsewhere), on every rank: the owner's weights
    are sent to the others, which load them into a copy of the model on their device."""
    if ranks.world == 1:
        return net
    state = ranks.broadcast({k: v.detach().cpu() for k, v in net.state_dict().items()} if net is not None else None,
                            owner)
    if net is not None:
        return net
    net = copy.deepcopy(loaded.model)
    net.load_state_dict(state)
    return net.eval()


# --- sentence-transformers export ------------------------------------------------------------------
def export_sentence_transformers(model, tokenizer, out_dir: str | Path, pooling: str,
                                 max_seq_length: int = 256, card: dict[str, Any] | None = None) -> Path:
    """An HF model folder (`save_pretrained`) plus `modules.json`, `sentence_bert_config.json` and
    `1_Pooling/config.json` so that `SentenceTransformer(out_dir)` loads it with our pooling (decoders:
    last token, set explicitly — sentence-transformers would otherwise mean-pool), and a sentence-transformers
    model card (twinlm.card.sentence_transformers_card; `card`: its `source`, `training`, `scores`, `license`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), tokenizer=tokenizer, max_length=max_seq_length)
    write_bytes(out / CARD, sentence_transformers_card(model.config, {
        **(card or {}), "name": out.name, "pooling": pooling, "max_seq_length": max_seq_length}))
    # sentence-transformers tokenizes with the folder's template: a decoder's must end with the [SEP] that
    # twinlm's decoder retrieval pools on (a plain decoder folder prepends [CLS] only)
    apply_tokenizer_conventions(out, model.config, max_length=max_seq_length, append_sep=True)
    write_manifest(out, [WEIGHTS, "config.json", GENERATION_CONFIG, *TOKENIZER_FILES])
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    write_json(out / "modules.json", modules)
    write_json(out / "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False})
    modes = {v: k for k, v in ST_POOLING_MODES.items()}
    if pooling not in modes:
        raise ConfigError(f"cannot export pooling {pooling!r} as a sentence-transformers folder: use mean, cls, max "
                          f"or last")
    cfg = {"word_embedding_dimension": model.config.hidden_size, "pooling_mode_cls_token": False,
           "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False,
           "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
           "pooling_mode_lasttoken": False, "include_prompt": True}
    cfg[modes[pooling]] = True
    write_json(out / "1_Pooling" / "config.json", cfg)
    write_json(out / "config_sentence_transformers.json",
               {"similarity_fn_name": "cosine", "model_type": "SentenceTransformer"})
    return out


# --- the track -------------------------------------------------------------------------------------
def run(model, cfg: RetrievalConfig | None = None, *, tokenizer=None, variant: str | None = None, data_root=None,
        retrieval_sets: Sequence[RetrievalSet] | None = None, export_dir: str | Path | None = None,
        out: str | Path | None = None, log=print, device=None,
        ranks: Ranks | None = None) -> dict:
    """Retrieval of `model` (folder / `Loaded` / Transformer + tokenizer, or "bm25" / "minilm") on `device`
    (twinlm.eval.device.resolve_device; the result's config records it and the precision).
    `retrieval_sets` replaces the built-in sets (`cfg.sets`) by in-memory ones. `export_dir`: the first
    seed's fine-tuned model as a sentence-transformers folder.

    Under torchrun every rank runs this (twinlm.eval.ranks): the seeds' fine-tuning runs are shared out (seed
    index i on rank i % world), each fine-tuned copy is sent to every rank, and the encoding of every set's
    queries and passages is shared out by packs (`score_sets`); every rank returns the same result, equal to one
    process's, and rank 0 alone writes `out` and `export_dir` and logs."""
    cfg = cfg or RetrievalConfig()
    seeds, pooling, max_train_pairs = seed_list(cfg.seeds), cfg.pooling, cfg.max_train_pairs
    t_all = Timer()
    rk = job_ranks() if ranks is None else ranks  # the suite and eval curve pass Ranks(): this run alone
    log = log if rk.writes else None
    where = resolve_device(device)  # a device this machine lacks is refused first
    all_sets = (list(retrieval_sets) if retrieval_sets is not None
                else [load_retrieval_set(s, data_root) for s in cfg.sets])
    tests, pairs = held_out(all_sets, cfg.max_eval_queries, cfg.max_corpus, seed=0)
    baseline = model if isinstance(model, str) and model in ("bm25", "minilm") else None
    per_seed_sets: list[dict[str, dict]] = []
    train_info = {}
    pooling_source: str | None = None
    if baseline:
        info = baselines.describe(baseline)
        where = torch.device("cpu") if baseline == "bm25" else where
        if baseline == "bm25":
            per_set = {}
            for s in tests:
                qids, dids = list(s.queries), list(s.corpus)
                bm = baselines.BM25([s.corpus[d] for d in dids])
                per_set[s.name] = retrieval_metrics(s.qrels, run_from_scores(
                    qids, dids, bm.scores([s.queries[q] for q in qids]), top=100))
        else:
            enc = lambda texts: baselines.minilm_encode(texts, data_root, device=where)  # noqa: E731
            per_set = evaluate_sets(enc, enc, tests)
        per_seed_sets.append(per_set)
        seeds = [0]
        pooling = info.get("pooling")
    else:
        loaded = load_for_eval(model, tokenizer, variant=variant, device=device)
        where = loaded.device  # an in-memory model named without a device stays where it is
        info = loaded.info
        pooling, pooling_source = choose_pooling(pooling, loaded, "retrieval")
        if max_train_pairs is not None and len(pairs) > max_train_pairs:
            pairs = [pairs[i] for i in sorted(random.Random(0).sample(range(len(pairs)), max_train_pairs))]
        runs = list(seeds if cfg.finetune else (0,))
        nets: dict[int, Any] = {}  # this rank's fine-tuned copies, by seed index
        if cfg.finetune:
            done = {}
            for i in rk.mine(runs):
                t = Timer()
                nets[i], losses = contrastive_finetune(loaded, pairs, pooling=pooling, seed=runs[i], epochs=cfg.epochs,
                                                       batch_size=cfg.batch_size, lr=cfg.lr, max_length=cfg.max_length,
                                                       query_max_length=cfg.query_max_length, log=log)
                done[i] = {"steps": len(losses), "first_loss": losses[0] if losses else None,
                           "last_loss": float(np.mean(losses[-5:])) if losses else None, "seconds": t()}
            train_info = dict(zip(runs, rk.collect(len(runs), done)))
        for i, seed in enumerate(runs):
            # the seed's fine-tuned copy was made by one rank (`Ranks.mine`: index i on rank i % world)
            net = _shared_net(loaded, nets.get(i), i % rk.world, rk) if cfg.finetune else loaded.model
            per_set = score_sets(net, loaded.tokenizer, tests, pooling, max_length=cfg.max_length,
                                 query_max_length=cfg.query_max_length, ranks=rk)
            per_seed_sets.append(per_set)
            if export_dir is not None and seed == seeds[0] and rk.writes:
                export_sentence_transformers(net, loaded.tokenizer, export_dir, pooling, cfg.max_length, card={
                    "source": info.get("path"), "base_model": info.get("path"), "scores": per_set,
                    "training": {"pairs": len(pairs), "sets": [s.name for s in all_sets], "epochs": cfg.epochs,
                                 "seed": seed} if cfg.finetune else None})
            nets.pop(i, None)
            if log:
                log(f"[retrieval] {info['variant']} seed {seed}: " + ", ".join(
                    f"{k} nDCG@10={v['ndcg@10']:.2f}" for k, v in per_set.items()))
    results = {}
    for s in tests:
        res: dict[str, Any] = summarise([ps[s.name] for ps in per_seed_sets])
        res.update(score=res["ndcg@10"], score_std=res["ndcg@10_std"], headline="ndcg@10",
                   queries=len(s.queries), corpus=len(s.corpus), per_seed=[ps[s.name] for ps in per_seed_sets])
        results[s.name] = res
    avg_per_seed = [float(np.mean([ps[n]["ndcg@10"] for n in ps])) for ps in per_seed_sets]
    result = {"track": "retrieval", "model": info, "tasks": results,
              "average": {"metric": "mean nDCG@10 over sets", "mean": float(np.mean(avg_per_seed)),
                          "std": float(np.std(avg_per_seed, ddof=1)) if len(avg_per_seed) > 1 else 0.0,
                          "std_kind": "over seeds", "per_seed": avg_per_seed, "n_tasks": len(results)},
              "config": result_config(cfg, t_all(), sets=[s.name for s in all_sets],
                                      finetune=cfg.finetune and not baseline, seeds=list(seeds), scale=SCALE,
                                      train_pairs=len(pairs), pooling=pooling, pooling_source=pooling_source,
                                      training=train_info,
                                      export_dir=str(export_dir) if export_dir else None,
                                      **placement(where, fp32=baseline == "minilm"))}
    check_result(result)
    if out and rk.writes:
        write_json(out, result)
    return result
