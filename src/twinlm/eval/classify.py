"""Classification track: linear probe (frozen backbone) or full fine-tuning on labelled tasks, single
texts or pairs, with a small hyper-parameter sweep and several seeds (mean ± sample std reported).

Pooling per architecture (REFERENCE §3): encoders `[CLS]` (or mean), decoders the last real token (or
mean). Inputs are `[CLS] a [SEP]` / `[CLS] a [SEP] b [SEP]`, packed padding-free.

Splits. Tasks with a training split train on (a seeded draw of `max_train` of) it and evaluate on a
fixed draw of `max_eval` validation examples. Tasks with only a validation split run k-fold
cross-validation on a fixed draw of `max_eval` examples; the folds are reshuffled per seed and the
predictions of all folds are scored together. Seeds change the training draw, the folds and (fine-tuning)
the head initialisation and batch order.

Probe depth. By default the probe reads the final norm's output with the architecture's pooling. With
`probe_layer="best"` every depth (embedding norm, each block, final norm) under both poolings of the
architecture is a candidate, and the one with the best development score (C = 1), averaged over the
development splits of all seeds, is used for every seed: small or briefly trained models often keep more
of their input in lower layers and in mean pooling than in the last layer's `[CLS]` or last token, and
random-initialisation controls get the same choice.

Sweep. The probe sweeps the logistic regression's C, fine-tuning sweeps the learning rate; either way the
value is chosen on a development split carved from the training portion (15%), never on the evaluation
examples, and the model is then refit on the whole training portion.

Outside baselines on the very same splits: `model="tfidf"` (TF-IDF + logistic regression; the suite's
bag-of-words control) and `model="minilm"` (the bundled all-MiniLM-L6-v2 sentence encoder, probed).

Devices and ranks. The model, its embedding packs and fine-tuning (head, optimizer state, batches) run on
`device` (bf16 autocast on accelerators, fp32 on the CPU, where the result is bit-identical to scoring without a
device); the features come back to the CPU for scikit-learn. Under torchrun the embedding packs (final-norm
features), the depth candidates and the (task, seed) probes or fine-tuning runs are shared out over the ranks and
gathered (twinlm.eval.ranks); each unit seeds itself, and the embedding calls are fixed in advance
(`embedding_groups`), so every rank returns exactly one process's result.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from twinlm.errors import DataError
from twinlm.eval import baselines
from twinlm.eval.common import (
    Loaded,
    Timer,
    check_result,
    choose_pooling,
    default_pooling,
    embed,
    embed_groups,
    embed_layers,
    encode_with_specials,
    forward_packed,
    load_for_eval,
    placement,
    pool_packed,
    result_config,
)
from twinlm.eval.device import autocast, model_device, resolve_device
from twinlm.eval.metrics import classification_metrics, summarise
from twinlm.eval.ranks import Ranks
from twinlm.eval.ranks import ranks as job_ranks
from twinlm.eval.settings import DEFAULT_CS, DEFAULT_LRS, ClassifyConfig, seed_list
from twinlm.eval.tasks import CLASSIFICATION_TASKS, ClsExample, ClsTask, kfold_indices, load_classification_task, subset
from twinlm.io import write_json

DEV_FRACTION = 0.15


# --- splits ----------------------------------------------------------------------------------------
def make_splits(task: ClsTask, seed: int, max_train: int | None, max_eval: int | None,
                kfold: int) -> list[tuple[list[ClsExample], list[ClsExample]]]:
    """[(train, eval)] for one seed: one pair for a train/validation task, k folds otherwise."""
    ev = subset(task.eval, max_eval, 0)
    if task.train is not None:
        return [(subset(task.train, max_train, 1000 + seed), ev)]
    folds = []
    for tr_idx, te_idx in kfold_indices(len(ev), kfold, seed):
        tr = [ev[i] for i in tr_idx]
        folds.append((subset(tr, max_train, 1000 + seed), [ev[i] for i in te_idx]))
    return folds


def _dev_split(n: int, seed: int) -> tuple[list[int], list[int]]:
    order = list(range(n))
    random.Random(7919 + seed).shuffle(order)
    k = max(1, int(round(DEV_FRACTION * n))) if n >= 4 else 0
    return sorted(order[k:]), sorted(order[:k])


# --- linear probe ----------------------------------------------------------------------------------
def _fit_lr(X, y, C: float, seed: int):
    clf = LogisticRegression(C=C, max_iter=2000, random_state=seed)
    if len(set(y)) < 2:  # degenerate training portion: predict its one class
        return _Constant(int(y[0]))
    return clf.fit(X, y)


class _Constant:
    def __init__(self, c):
        self.c = c

    def predict(self, X):
        return np.full(X.shape[0], self.c)


def probe_predict(Xtr, ytr, Xev, seed: int, Cs: Sequence[float] = DEFAULT_CS, scale: bool = True,
                  metric_fn: Callable | None = None) -> tuple[np.ndarray, dict]:
    """Logistic regression on frozen features, C chosen on a dev split of the training portion."""
    ytr = np.asarray(ytr)
    if scale:
        sc = StandardScaler(with_mean=not _is_sparse(Xtr)).fit(Xtr)
        Xtr, Xev = sc.transform(Xtr), sc.transform(Xev)
    tr, dev = _dev_split(len(ytr), seed)
    sweep = {}
    if dev and len(Cs) > 1:
        for C in Cs:
            pred = _fit_lr(Xtr[tr], ytr[tr], C, seed).predict(Xtr[dev])
            sweep[C] = metric_fn(ytr[dev], pred) if metric_fn else float(np.mean(pred == ytr[dev]))
        best = max(Cs, key=lambda c: (sweep[c], -abs(math.log10(c))))
    else:
        best = Cs[len(Cs) // 2]
    return _fit_lr(Xtr, ytr, best, seed).predict(Xev), {"C": best, "dev": sweep}


def select_features(splits: Sequence[tuple[dict, Sequence, int]], metric_fn: Callable | None = None,
                    ranks: Ranks | None = None) -> tuple:
    """The candidate feature set whose probe (C = 1) scores best on development data, averaged over `splits`
    — (candidates {key: (n, d) array}, training labels, seed), scored on the development split of that seed.
    Ties go to the later key. Returns (key, {key: mean dev score}). With `ranks` the candidates are shared out
    (each candidate's probes are one unit) and their scores gathered."""
    keys = list(dict.fromkeys(k for candidates, _, _ in splits for k in candidates))
    rk = ranks or Ranks()
    done = {i: _dev_scores(keys[i], splits, metric_fn) for i in rk.mine(keys)}
    totals = dict(zip(keys, rk.collect(len(keys), done)))
    scores = {k: float(np.mean(v)) if v else float("nan") for k, v in totals.items()}
    return max(scores, key=lambda k: (np.nan_to_num(scores[k], nan=-1.0), k)), scores


def _dev_scores(key, splits: Sequence[tuple[dict, Sequence, int]], metric_fn: Callable | None) -> list[float]:
    """The development scores of candidate `key` (C = 1) on each split that has it and a development part."""
    out = []
    for candidates, labels, seed in splits:
        ytr = np.asarray(labels)
        tr, dev = _dev_split(len(ytr), seed)
        if key not in candidates or not dev:
            continue
        X = candidates[key]
        sc = StandardScaler().fit(X[tr])
        pred = _fit_lr(sc.transform(X[tr]), ytr[tr], 1.0, seed).predict(sc.transform(X[dev]))
        out.append(metric_fn(ytr[dev], pred) if metric_fn else float(np.mean(pred == ytr[dev])))
    return out


def candidate_poolings(causal: bool) -> list[str]:
    return [default_pooling(causal, "classification"), "mean"]


def check_pairing(task: ClsTask) -> None:
    """Refuse a task whose examples mix single texts and pairs (`text_pair` on some lines only): the model
    would read some examples without their second text, or fail on them."""
    exs = [*(task.train or []), *task.eval]
    n = sum(e.text_pair is not None for e in exs)
    if 0 < n < len(exs):
        where = f" ({task.description})" if task.description else ""
        raise DataError(f"classification task {task.name!r}{where}: {n} of {len(exs)} examples have a 'text_pair' "
                        "and the others none: give 'text_pair' on every line of the task files or on none")


def _second_texts(task: ClsTask, exs: Sequence[ClsExample]) -> list[str] | None:
    """The `text_pair`s of `exs` for a pair task; None for a single-text task."""
    if not task.is_pair:
        return None
    pairs = [e.text_pair for e in exs if e.text_pair is not None]
    assert len(pairs) == len(exs), "run() checks that a pair task gives every example a text_pair"
    return pairs


def _is_sparse(X) -> bool:
    return hasattr(X, "tocsr")


# --- fine-tuning -----------------------------------------------------------------------------------
def _batches(n: int, batch_size: int, rng: random.Random) -> list[list[int]]:
    order = list(range(n))
    rng.shuffle(order)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def finetune_predict(loaded: Loaded, tr_seqs, ytr, ev_seqs, num_labels: int, *, lr: float, seed: int,
                     epochs: int = 3, batch_size: int = 16, pooling: str, weight_decay: float = 0.01,
                     warmup: float = 0.1) -> np.ndarray:
    """Fine-tune a copy of the backbone + a linear head on the model's device; return predictions on `ev_seqs`.

    A unit of its own: it seeds torch's generators and the batch order from `seed`, so its predictions depend on
    its arguments alone, never on what ran before it in the process. The head is initialised on the CPU and then
    moved (the same seed gives the same head on every device); the optimizer state lives beside the parameters.
    The forward runs under the device's autocast (twinlm.eval.device: bf16 on accelerators, fp32 on the CPU);
    pooling, head and loss are fp32. `batch_size` counts examples (a setting, as in the paper's recipe)."""
    torch.manual_seed(seed)
    model = copy.deepcopy(loaded.model)
    device = model_device(model)
    model.train()
    d = loaded.cfg.hidden_size
    head = torch.nn.Linear(d, num_labels)
    torch.nn.init.normal_(head.weight, std=0.02)
    torch.nn.init.zeros_(head.bias)
    head.to(device)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98), eps=1e-6)
    rng = random.Random(seed)
    steps = max(1, epochs * math.ceil(len(tr_seqs) / batch_size))
    warm = max(1, int(warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    y = torch.tensor(list(ytr), dtype=torch.long, device=device)
    for _ in range(epochs):
        for b in _batches(len(tr_seqs), batch_size, rng):
            seqs = [tr_seqs[i] for i in b]
            with autocast(device):
                out, _ = forward_packed(model, seqs, return_logits=False)
            pooled = pool_packed(out.hidden_states.float(), [len(s) for s in seqs], pooling)
            loss = torch.nn.functional.cross_entropy(head(pooled), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.inference_mode():
        feats = embed(model, ev_seqs, pooling)
        return head(feats.to(device)).argmax(-1).cpu().numpy()


# --- the track -------------------------------------------------------------------------------------
def _headline(task: ClsTask) -> str:
    return task.metric


def _metric_fn(task: ClsTask):
    key = _headline(task)
    return lambda yt, yp: classification_metrics(yt, yp, task.num_labels)[key]


def evaluate_task(task: ClsTask, featurize, *, mode: str, seeds: Sequence[int], max_train: int | None,
                  max_eval: int | None, kfold: int, Cs=DEFAULT_CS, lrs=DEFAULT_LRS, finetune_fn=None,
                  log=None, ranks: Ranks | None = None) -> dict:
    """Runs every seed (and fold) of one task: `evaluate_tasks` of one task."""
    return evaluate_tasks([(task, featurize, finetune_fn)], mode=mode, seeds=seeds, max_train=max_train,
                          max_eval=max_eval, kfold=kfold, Cs=Cs, lrs=lrs, log=log, ranks=ranks)[0]


def evaluate_tasks(jobs: Sequence[tuple[ClsTask, Callable | None, Callable | None]], *, mode: str,
                   seeds: Sequence[int], max_train: int | None, max_eval: int | None, kfold: int, Cs=DEFAULT_CS,
                   lrs=DEFAULT_LRS, log=None, ranks: Ranks | None = None) -> list[dict]:
    """Runs every seed (and fold) of each `(task, featurize, finetune_fn)`: `featurize(train_examples,
    eval_examples) -> (Xtr, Xev)` for probe mode, `finetune_fn(train, eval, lr, seed) -> predictions` for
    fine-tuning. One result per task, in order.

    The work is cut into units that each depend on their own arguments only (the probe seeds its logistic
    regression, fine-tuning seeds itself: `finetune_predict`): probe, one unit per (task, seed) — its folds'
    probes with their C sweeps; fine-tuning, one unit per run of the learning-rate sweep (task, seed, fold, lr,
    scored on the fold's development split), then one per (task, seed, fold) at the chosen rate. With `ranks`
    (torchrun) the units are shared out by their examples (`Ranks.assign`) and gathered in order, so every rank
    returns exactly what one process returns. A task's `seconds` is the time its units took, summed over ranks."""
    rk = ranks or Ranks()
    splits = [[make_splits(task, seed, max_train, max_eval, kfold) for seed in seeds] for task, _, _ in jobs]
    cells = [(t, s, f) for t in range(len(jobs)) for s in range(len(seeds)) for f in range(len(splits[t][s]))]
    chosen: dict[tuple[int, int, int], Any] = {}
    sweeps: dict[tuple[int, int, int], dict] = {}
    seconds = [0.0] * len(jobs)
    if mode == "probe":
        units = [(t, s) for t in range(len(jobs)) for s in range(len(seeds))]

        def probe_unit(t: int, s: int) -> list:
            task, featurize = jobs[t][0], jobs[t][1]
            assert featurize is not None, "probe mode needs featurize"
            out = []
            for tr, ev in splits[t][s]:
                Xtr, Xev = featurize(tr, ev)
                pred, info = probe_predict(Xtr, np.array([e.label for e in tr]), Xev, seeds[s], Cs,
                                           scale=not _is_sparse(Xtr), metric_fn=_metric_fn(task))
                out.append((pred, info["C"]))
            return out

        done = _timed(rk, units, [sum(len(tr) + len(ev) for tr, ev in splits[t][s]) for t, s in units],
                      lambda u: probe_unit(*u))
        preds = {}
        for (t, s), (per_split, took) in zip(units, done):
            seconds[t] += took
            for f, (pred, C) in enumerate(per_split):
                preds[(t, s, f)], chosen[(t, s, f)] = pred, C
    else:
        def run_ft(t: int, s: int, f: int, tr, ev, lr: float) -> np.ndarray:
            finetune_fn = jobs[t][2]
            assert finetune_fn is not None, "finetune mode needs finetune_fn"
            return finetune_fn(tr, ev, lr, seeds[s])

        sweep_units = []
        for t, s, f in cells:
            tri, dev = _dev_split(len(splits[t][s][f][0]), seeds[s])
            if dev and len(lrs) > 1:
                sweep_units += [(t, s, f, lr, tri, dev) for lr in lrs]

        def sweep_unit(u) -> float:
            t, s, f, lr, tri, dev = u
            tr = splits[t][s][f][0]
            pred = run_ft(t, s, f, [tr[i] for i in tri], [tr[i] for i in dev], lr)
            return _metric_fn(jobs[t][0])(np.array([e.label for e in tr])[dev], pred)

        done = _timed(rk, sweep_units, [len(u[4]) + len(u[5]) for u in sweep_units], sweep_unit)
        for (t, s, f, lr, _, _), (score, took) in zip(sweep_units, done):
            sweeps.setdefault((t, s, f), {})[lr] = score
            seconds[t] += took
        for cell in cells:
            sweep = sweeps.get(cell, {})
            chosen[cell] = max(lrs, key=lambda lr: sweep[lr]) if sweep else lrs[len(lrs) // 2]
        done = _timed(rk, cells, [sum(map(len, splits[t][s][f])) for t, s, f in cells],
                      lambda c: run_ft(c[0], c[1], c[2], splits[c[0]][c[1]][c[2]][0], splits[c[0]][c[1]][c[2]][1],
                                       chosen[c]))
        preds = {}
        for cell, (pred, took) in zip(cells, done):
            preds[cell] = pred
            seconds[cell[0]] += took
    results = []
    for t, (task, _, _) in enumerate(jobs):
        per_seed, task_chosen = [], []
        sweep_log: dict = {}
        for s, seed in enumerate(seeds):
            y_true, y_pred = [], []
            for f, (_, ev) in enumerate(splits[t][s]):
                task_chosen.append(chosen[(t, s, f)])
                for k, v in sweeps.get((t, s, f), {}).items():
                    sweep_log.setdefault(str(k), []).append(v)
                y_true += [e.label for e in ev]
                y_pred += list(preds[(t, s, f)])
            per_seed.append(classification_metrics(y_true, y_pred, task.num_labels))
            if log:
                log(f"  {task.name} seed {seed}: {_headline(task)}={per_seed[-1][_headline(task)]:.2f}")
        out: dict[str, Any] = summarise(per_seed)
        out["score"] = out[_headline(task)]
        out["score_std"] = out[f"{_headline(task)}_std"]
        out["headline"] = _headline(task)
        out["per_seed"] = per_seed
        out["chosen"] = task_chosen
        if sweep_log:
            out["dev_sweep"] = {k: float(np.mean(v)) for k, v in sweep_log.items()}
        out["seconds"] = seconds[t]
        results.append(out)
    return results


def _timed(rk: Ranks, units: Sequence, costs: Sequence[float], fn: Callable) -> list[tuple[Any, float]]:
    """(fn(unit), seconds) of every unit, this rank's share (`Ranks.assign` by `costs`) computed here, the
    others gathered, in order."""
    done = {}
    for u in rk.assign(costs):
        t = Timer()
        done[u] = (fn(units[u]), t())
    return rk.collect(len(units), done)


def embedding_groups(task: ClsTask, seeds: Sequence[int], cfg: ClassifyConfig, depths: bool = False
                     ) -> list[list[ClsExample]]:
    """The examples of `task` a featurizer embeds, call by call, in the order it first needs them: per seed and
    fold, the training then evaluation examples not embedded before (one call each; `depths`: first the first
    fold's training examples of every seed, which choose the depth, then per fold the new training examples and
    the new evaluation examples, two calls). A call's examples are packed together, and a sequence's embedding
    depends in its last bits on its pack, so these calls are the features' definition: one process and every
    rank of torchrun embed the same calls."""
    seen: set[int] = set()
    groups: list[list[ClsExample]] = []

    def add(exs: Sequence[ClsExample]) -> None:
        need = [e for e in exs if id(e) not in seen]
        if need:
            groups.append(need)
            seen.update(id(e) for e in need)

    splits = [make_splits(task, seed, cfg.max_train, cfg.max_eval, cfg.kfold) for seed in seeds]
    if depths:
        for per_seed in splits:
            add(per_seed[0][0])
        for per_seed in splits:
            for tr, ev in per_seed:
                add(tr)
                add(ev)
    else:
        for per_seed in splits:
            for tr, ev in per_seed:
                add([*tr, *ev])
    return groups


class TaskFeaturizer:
    """One task seen through one loaded model: its inputs, the probe's features and fine-tuning.

    Each example is embedded once per model (cached by identity across seeds and folds), in the calls
    `embedding_groups` lists: `prepare_features` embeds them all ahead (shared out over ranks), and a featurizer
    not prepared embeds the same calls as it meets them. `featurize` reads the final norm with `pooling`;
    `featurize_depths` reads the depth and pooling that `select_features` picks on the development splits of the
    first split of every seed (`choose`, decided once; kept in `chosen`); `finetune` fine-tunes a fresh copy and
    predicts (evaluate_task's `finetune_fn`)."""

    def __init__(self, loaded: Loaded, task: ClsTask, cfg: ClassifyConfig, seeds: Sequence[int], pooling: str,
                 poolings: Sequence[str], log: Callable[[str], None] | None = None):
        self.loaded, self.task, self.cfg, self.seeds = loaded, task, cfg, list(seeds)
        self.pooling, self.poolings, self.log = pooling, list(poolings), log
        self.chosen: dict = {}  # the depth search's choice: layer, pooling, of_layers, dev scores
        self._features: dict[int, np.ndarray] = {}  # id(example) -> final-norm features
        self._depths: dict[int, dict] = {}  # id(example) -> {(layer, pooling): features}

    def sequences(self, exs: Sequence[ClsExample]) -> list:
        """The examples as `[CLS] a [SEP] (b [SEP])` token ids, cut at the settings' max_length."""
        return encode_with_specials(self.loaded.tokenizer, self.loaded.cfg, [e.text for e in exs],
                                    _second_texts(self.task, exs), self.cfg.max_length)

    def store(self, groups: Sequence[Sequence[ClsExample]], embedded: Sequence[dict], depths: bool) -> None:
        """Keep the features `embed_groups` computed for `groups` (final norm, or every depth)."""
        for exs, feats in zip(groups, embedded):
            arrays = {k: v.float().numpy() for k, v in feats.items()}
            for n, e in enumerate(exs):
                if depths:
                    self._depths[id(e)] = {k: v[n] for k, v in arrays.items()}
                else:
                    self._features[id(e)] = arrays[self.pooling][n]

    def featurize(self, tr: Sequence[ClsExample], ev: Sequence[ClsExample]) -> tuple[np.ndarray, np.ndarray]:
        """(train, eval) features: the final norm's output with the pooling."""
        need = [e for e in [*tr, *ev] if id(e) not in self._features]
        if need:
            self.store([need], [{self.pooling: embed(self.loaded.model, self.sequences(need), self.pooling)}],
                       depths=False)
        return np.stack([self._features[id(e)] for e in tr]), np.stack([self._features[id(e)] for e in ev])

    def depth_features(self, exs: Sequence[ClsExample], only: Sequence[tuple] | None = None) -> dict:
        """{(layer, pooling): features of `exs`} for the keys `only` (default: every depth and pooling)."""
        need = [e for e in exs if id(e) not in self._depths]
        if need:
            self.store([need], [embed_layers(self.loaded.model, self.sequences(need), self.poolings)], depths=True)
        return {k: np.stack([self._depths[id(e)][k] for e in exs]) for k in (only or sorted(self._depths[id(exs[0])]))}

    def choose(self, ranks: Ranks | None = None) -> None:
        """Choose the depth and pooling (`select_features` on the first split of every seed; its candidates'
        probes shared out over `ranks`)."""
        cfg, task = self.cfg, self.task
        firsts = [make_splits(task, seed, cfg.max_train, cfg.max_eval, cfg.kfold)[0][0] for seed in self.seeds]
        key, scores = select_features([(self.depth_features(t), [e.label for e in t], seed)
                                       for t, seed in zip(firsts, self.seeds)], _metric_fn(task), ranks=ranks)
        self.chosen.update(layer=key[0], pooling=key[1], of_layers=max(k[0] for k in scores),
                           dev={f"{k[0]}/{k[1]}": v for k, v in scores.items()})
        if self.log:
            self.log(f"  {task.name}: probe reads layer {key[0]} of 0..{self.chosen['of_layers']} with {key[1]} "
                     f"pooling (dev {scores[key]:.2f})")

    def featurize_depths(self, tr: Sequence[ClsExample], ev: Sequence[ClsExample]) -> tuple[np.ndarray, np.ndarray]:
        """(train, eval) features at the chosen depth and pooling (chosen on the first call unless `choose` ran)."""
        if not self.chosen:
            self.choose()
        key = (self.chosen["layer"], self.chosen["pooling"])
        return self.depth_features(tr, [key])[key], self.depth_features(ev, [key])[key]

    def finetune(self, tr: Sequence[ClsExample], ev: Sequence[ClsExample], lr: float, seed: int) -> np.ndarray:
        """Fine-tune on `tr` at `lr` with `seed`; the predictions on `ev`."""
        cfg = self.cfg
        return finetune_predict(self.loaded, self.sequences(tr), [e.label for e in tr], self.sequences(ev),
                                self.task.num_labels, lr=lr, seed=seed, epochs=cfg.epochs, batch_size=cfg.batch_size,
                                pooling=self.pooling)


def prepare_features(featurizers: Sequence[TaskFeaturizer], *, depths: bool, ranks: Ranks | None = None) -> None:
    """Embed ahead every call (`embedding_groups`) of every task's featurizer. Final-norm features: the packs of
    all tasks' calls are shared out over `ranks` and gathered (`embed_groups`), so each rank holds them all.
    Every depth (`depths`, the depth search): each rank embeds every call itself (the features of every depth
    are too many to exchange; the forward is the cheap part there), then the choice of depth is shared out
    (`TaskFeaturizer.choose`)."""
    if not featurizers:
        return
    loaded = featurizers[0].loaded
    per_task = [embedding_groups(f.task, f.seeds, f.cfg, depths=depths) for f in featurizers]
    if depths:
        for f, groups in zip(featurizers, per_task):
            f.store(groups, embed_groups(loaded.model, [f.sequences(g) for g in groups], f.poolings, layers=True),
                    depths=True)
        for f in featurizers:
            f.choose(ranks)
        return
    seqs = [f.sequences(g) for f, groups in zip(featurizers, per_task) for g in groups]
    embedded = embed_groups(loaded.model, seqs, [featurizers[0].pooling], ranks=ranks)
    at = 0
    for f, groups in zip(featurizers, per_task):
        f.store(groups, embedded[at:at + len(groups)], depths=False)
        at += len(groups)


def run(model, cfg: ClassifyConfig | None = None, *, tokenizer=None, variant: str | None = None, data_root=None,
        out: str | Path | None = None, log=print, device=None,
        ranks: Ranks | None = None) -> dict:
    """Classification of `model` — a model folder, a `Loaded`, an in-memory Transformer with
    `tokenizer`, or the baselines "tfidf" / "minilm" — on built-in tasks (names) or on a task given by
    `cfg.eval_file` (and optional `cfg.train_file`) JSONL, on `device` (twinlm.eval.device.resolve_device; the
    result's config records it and the precision). Returns the result dict (also written to `out`).

    Under torchrun every rank runs this: the embedding packs, the probes (or fine-tuning runs) and the depth
    choice are shared out (twinlm.eval.ranks), every rank returns the same result, equal to one process's, and
    rank 0 alone writes `out` and logs."""
    cfg = cfg or ClassifyConfig()
    tasks, eval_file, seeds, mode, pooling = cfg.tasks, cfg.eval_file, seed_list(cfg.seeds), cfg.mode, cfg.pooling
    baseline = model if isinstance(model, str) and model in ("tfidf", "minilm") else None
    t_all = Timer()
    rk = job_ranks() if ranks is None else ranks  # the suite and eval curve pass Ranks(): this run alone
    log = log if rk.writes else None
    where = resolve_device(device)  # a device this machine lacks is refused first
    # tasks first: a bad task file fails before any model is loaded
    if eval_file is not None:
        task_objs = [load_classification_task(tasks[0] if tasks and len(tasks) == 1 and tasks[0] not in
                                              CLASSIFICATION_TASKS else Path(eval_file).stem,
                                              train_file=cfg.train_file, eval_file=eval_file)]
    else:
        task_objs = [load_classification_task(t, root=data_root) for t in tasks]
    for task in task_objs:
        check_pairing(task)
    pooling_source: str | None = None  # flag, folder (a sentence-transformers folder's own) or default
    if baseline:
        loaded, info = None, baselines.describe(baseline, data_root)
        if baseline == "tfidf":
            mode = "probe"
            where = torch.device("cpu")
    else:
        loaded = load_for_eval(model, tokenizer, variant=variant, device=device)
        where = loaded.device  # an in-memory model named without a device stays where it is
        info = loaded.info
        poolings = [pooling] if pooling else candidate_poolings(loaded.causal)
        pooling, pooling_source = choose_pooling(pooling, loaded, "classification")
    search_depth = mode == "probe" and cfg.probe_layer == "best" and not baseline

    jobs: list[tuple[ClsTask, Callable | None, Callable | None]] = []
    featurizers: list[TaskFeaturizer] = []
    for task in task_objs:
        if log:
            log(f"[classify] {info['variant']} {task.name} ({mode}, {task.num_labels} labels)")
        if baseline:
            featurize = baselines.featurizer(baseline, data_root, device=where)
            if isinstance(featurize, baselines.MiniLMFeatures):
                featurize.prepare(embedding_groups(task, seeds, cfg))
            jobs.append((task, featurize, None))
        else:
            assert loaded is not None and pooling is not None  # both set above when there is no baseline
            features = TaskFeaturizer(loaded, task, cfg, seeds, pooling, poolings, log)
            featurizers.append(features)
            jobs.append((task, features.featurize_depths if search_depth else features.featurize, features.finetune))
    if mode == "probe":
        prepare_features(featurizers, depths=search_depth, ranks=rk)
    evaluated = evaluate_tasks(jobs, mode=mode, seeds=seeds, max_train=cfg.max_train, max_eval=cfg.max_eval,
                               kfold=cfg.kfold, Cs=cfg.Cs, lrs=cfg.lrs, log=log, ranks=rk)
    results = {}
    for n, (task, res) in enumerate(zip(task_objs, evaluated)):
        res.update(split="train/validation" if task.train is not None else f"{cfg.kfold}-fold", labels=task.labels)
        if search_depth:
            res["features"] = dict(featurizers[n].chosen)
        results[task.name] = res
        if log:
            log(f"[classify] {info['variant']} {task.name}: {res['headline']}={res['score']:.2f} "
                f"± {res['score_std']:.2f} ({res['seconds']:.1f}s)")
    result = {"track": "classification", "model": info, "tasks": results,
              "average": _average(results),
              "config": result_config(cfg, t_all(), tasks=[t.name for t in task_objs], mode=mode,
                                      seeds=list(seeds), pooling=pooling,
                                      pooling_source=pooling_source,
                                      probe_layer=cfg.probe_layer if mode == "probe" and not baseline else None,
                                      dev_fraction=DEV_FRACTION, **placement(where, fp32=baseline == "minilm"))}
    check_result(result)
    if out and rk.writes:
        write_json(out, result)
    return result


def _average(results: dict) -> dict:
    """Mean over tasks of each seed's headline score, then mean ± std over seeds."""
    if not results:
        return {"metric": "score", "mean": float("nan"), "std": float("nan"), "n_tasks": 0}
    n = min(len(r["per_seed"]) for r in results.values())
    per_seed = [float(np.mean([r["per_seed"][i][r["headline"]] for r in results.values()])) for i in range(n)]
    mean = float(np.mean(per_seed))
    std = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0
    return {"metric": "mean headline score over tasks", "mean": mean, "std": std, "std_kind": "over seeds",
            "per_seed": per_seed, "n_tasks": len(results)}
