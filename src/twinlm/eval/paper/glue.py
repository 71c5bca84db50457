"""`twinlm eval glue MODEL`: the paper's GLUE protocol as ModernBERT ran it, through `datasets` and HF `Trainer`.

What a run does (the constants: eval/paper/glue_tasks.py; the metrics: glue_metrics.py):
- Data: `datasets.load_dataset(cfg.dataset, task.config)` (default `nyu-mll/glue`), the train split to fine-tune,
  the validation split(s) to score (GLUE's test labels are hidden); `max_train_examples` / `max_eval_examples`
  take a fixed draw (seed 0), the same for every run.
- Pairs (6 of the 8 tasks have two texts): the tokenizer's pair template when it puts a token between the sides
  (encoders: `[CLS] A [SEP] B [SEP]`); a template that glues them (decoders: `[CLS] A B`) gets the tokenizer's
  end-of-sequence token (else sep token, else a newline) at the start of the second side (`pair_separator`;
  stated in `rules.pairs`).
- Model: `AutoModelForSequenceClassification` of the folder (any transformers encoder or decoder, twinlm's or
  not), `num_labels` the task's (STS-B: 1, regression). Pooling: `auto` is the folder's own (ModernBERT encoders
  their `classifier_pooling`, decoders the last real token, BERT its [CLS] pooler); `cls` / `mean` set a ModernBERT
  encoder's `classifier_pooling`; `last` is only for decoders. A tokenizer without a pad token pads with its
  end-of-sequence token.
- Training: `Trainer` with AdamW betas (0.9, 0.98), eps 1e-6, linear decay to 0 after 10% warmup
  (`warmup_steps=0.1`: a float is a ratio), inputs cut to `max_length` (longest side first), no checkpoints;
  bf16 on a GPU (STS-B fp32, as ModernBERT forces), fp32 with `use_cpu` on the CPU. ModernBERT's weight decay is
  Composer's DecoupledAdamW decay, applied as `lr_t / lr * wd` (not multiplied by the lr), so torch's AdamW gets
  `weight_decay = wd / lr`; Trainer exempts biases and norm weights from decay, Composer does not.
- Scoring: the predictions at the end of training (the last evaluation, not the best epoch, as ModernBERT), the
  task's metrics (sklearn/scipy) and its run score, the mean of its reported metrics.
- Warm start (`warm_start`): rte, mrpc and stsb runs of seed s start from the MNLI model of seed s of the selected
  MNLI configuration: every weight but the classification head (`classifier.*`, `score.*`: the task's fresh head;
  ModernBERT ignores `model.classifier*`, finetuning_jobs.py:293,299), whose keys the run records as
  `warm_start.reinitialised`. ModernBERT kept one MNLI checkpoint; here one per seed.
- Sweep (`sweep`): each task runs every configuration of the sweep with every seed; with more than one
  configuration the one with the best mean score over seeds is selected, on the same validation split it is
  reported on (stated in `rules.selection`).
- Averaging: a task's score is the selected configuration's mean run score over seeds; GLUE is the mean of the 8
  task scores, None unless all 8 have one (`incomplete`: failed tasks, `not_run`: tasks not asked for).

Resuming: each finished run writes `work_dir/runs/<task>/<key>.json` (atomic, with a sha256 of its content; the
key hashes the task, configuration, seed, data settings, pair separator, warm-start source and the model's weights),
and each MNLI run its model to `work_dir/runs/mnli/<key>.model/`, kept only while its configuration is the best so
far (a sweep holds the best configuration's models and the running one's, `_Task.all`); after MNLI's selection the
selected model of seed s is moved to `work_dir/mnli-<seed>/` and the others removed (a selected model that is gone
is trained again). A rerun with the same `work_dir` reads finished runs back (and logs it); a run file that is cut
short, altered or written for another key is run again. A task that raises is recorded as `{"error": ...}` and the
others go on (`keep_going`); tasks warm-started from a failed MNLI are recorded the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from twinlm.errors import ConfigError, MissingArtifactError
from twinlm.eval.common import Timer, check_result, load_for_eval, placement, result_config
from twinlm.eval.device import is_accelerator, resolve_device
from twinlm.eval.paper.glue_metrics import reported, task_metrics, task_score
from twinlm.eval.paper.glue_tasks import (
    BETAS,
    EPS,
    GLUE_TASKS,
    TASKS,
    WARMUP,
    GlueTask,
    Hyper,
    parse_sweep,
    sweep_configs,
)
from twinlm.eval.settings import GlueConfig, seed_list
from twinlm.hub import resolve_model
from twinlm.io import atomic_dir, dumps_json, read_sealed_json, sha256_file, write_json, write_sealed_json

DRAW_SEED = 0  # the fixed draw of max_train_examples / max_eval_examples
RUN_FORMAT = 2  # 2: pairs of a glued template get a separator (pair_separator); 1's runs are stale
MARKER = "twinlm-glue-run.json"  # in a kept MNLI model folder: the run it holds

RULES = {
    "selection": "sweep 'defaults': ModernBERT's one configuration per task, nothing selected. Several "
                 "configurations: the one with the best mean task score over seeds on the validation split(s) is "
                 "selected (ties: the first in sweep order) and its validation mean is reported; GLUE's test labels "
                 "are hidden, so the same split selects and reports and the number is optimistic by the selection.",
    "averaging": "a run's score is the mean of its task's reported metrics after the last epoch (not the best "
                 "epoch): MNLI mean(matched, mismatched accuracy), MRPC and QQP mean(accuracy, F1), STS-B Spearman, "
                 "CoLA MCC, SST-2/QNLI/RTE accuracy (ModernBERT glue.py:546); a task's score is the selected "
                 "configuration's mean over seeds; GLUE is the mean of the 8 task scores (glue.py:575), None "
                 "unless all 8 have one.",
    "warm_start": "rte, mrpc and stsb runs of seed s start from the MNLI model of seed s of the selected MNLI "
                  "configuration, every weight but the classification head (classifier.*, score.*, or another "
                  "non-backbone parameter whose shape is the label count's: a fresh head of the task's size; each "
                  "run lists them in warm_start.reinitialised); ModernBERT kept one MNLI checkpoint.",
    "weight_decay": "ModernBERT's decay is Composer DecoupledAdamW's (not multiplied by the lr): torch AdamW gets "
                    "weight_decay = wd / lr; Trainer does not decay biases and norm weights.",
}


def _paper_libraries() -> Any:
    """`datasets` and the Trainer's accelerate, imported here so that a missing `paper` extra is one line."""
    try:
        import accelerate  # noqa: F401  (Trainer needs it; its own error comes late and long)
        import datasets
    except ImportError as e:
        raise ConfigError(f"twinlm eval glue needs the paper extra ({e.name or e} is missing): "
                          "pip install 'twinlm[paper]'") from None
    return datasets


def load_task_data(task: GlueTask, dataset: str = "nyu-mll/glue") -> Any:
    """The task's DatasetDict: `datasets.load_dataset(dataset, task.config)`, the production call. Not reachable
    (offline without a warm cache, no such dataset) is a MissingArtifactError saying what to do."""
    datasets = _paper_libraries()
    from datasets.exceptions import DatasetNotFoundError

    try:
        return datasets.load_dataset(dataset, task.config)
    except (ConnectionError, DatasetNotFoundError) as e:  # huggingface_hub's OfflineModeIsEnabled is one too
        raise MissingArtifactError(
            f"GLUE data {dataset!r} config {task.config!r} cannot be loaded ({type(e).__name__}): with HF_HUB_OFFLINE "
            "/ HF_DATASETS_OFFLINE set, datasets needs a warm cache from one earlier online load; else connect to "
            f"the internet, or run from a folder holding {dataset}/ in the hub's layout (write_glue_standin)") from None


def _draw(ds: Any, n: int | None) -> Any:
    return ds if n is None or n >= len(ds) else ds.shuffle(seed=DRAW_SEED).select(range(n))


PAIR_PROBE = ("The cat sat.", "A dog ran.")


def pair_separator(tokenizer: Any) -> str | None:
    """How a two-text task's sides are told apart: None when the tokenizer's pair template puts a token between them
    (encoders: `[CLS] A [SEP] B [SEP]`), else the text that `_encode` puts at the start of the second side: the
    end-of-sequence token, else the sep token, else a newline. Decided by encoding PAIR_PROBE: a template that
    glues the sides (twinlm's and ModernBERT's decoders: `[CLS] $A $B`; GPT-2: `$A $B`) holds A's ids followed at
    once by B's."""
    a, b = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in PAIR_PROBE)
    pair = tokenizer(*PAIR_PROBE)["input_ids"]
    glued = list(a) + list(b)
    if not any(list(pair[i:i + len(glued)]) == glued for i in range(len(pair) - len(glued) + 1)):
        return None
    return tokenizer.eos_token or tokenizer.sep_token or "\n"


def pairs_rule(separator: str | None) -> str:
    """rules.pairs of a result: how the two texts of mnli, qqp, qnli, rte, mrpc and stsb reach the model."""
    here = ("this tokenizer's template separates them, so it is used as is" if separator is None else
            f"this tokenizer's template glues them, so the second side starts with {separator!r}")
    return ("two-text tasks (all but cola and sst2) use the tokenizer's pair template when it puts a token between "
            "the sides (encoders: [CLS] A [SEP] B [SEP]); a template that puts nothing between them (decoders: "
            "[CLS] A B) would read '...sat.A dog...', so the second side is prefixed with the tokenizer's "
            "end-of-sequence token, else its sep token, else a newline; truncation cuts the longer side's end, so "
            f"the separator stays. Here: {here}.")


def _encode(ds: Any, task: GlueTask, tokenizer: Any, max_length: int, separator: str | None = None) -> Any:
    """`ds` tokenized for `task` (cut to `max_length`, longest side first) with its `labels`; `separator`
    (`pair_separator`): put at the start of a pair's second side, for templates that glue the sides."""
    def fn(batch: dict) -> dict:
        texts = [batch[c] for c in task.text]
        if separator is not None and len(texts) == 2:
            texts[1] = [separator + t for t in texts[1]]
        enc = tokenizer(*texts, truncation=True, max_length=max_length)
        enc["labels"] = [float(v) for v in batch["label"]] if task.regression else batch["label"]
        return dict(enc)
    return ds.map(fn, batched=True, remove_columns=ds.column_names, keep_in_memory=True, load_from_cache_file=False)


def glue_tokenizer(path: str | Path) -> Any:
    """The folder's tokenizer, padding with its end-of-sequence token when it has no pad token (decoders)."""
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ConfigError(f"{path}: the tokenizer has neither a pad nor an end-of-sequence token; set pad_token "
                              "in its tokenizer_config.json")
        tok.pad_token = tok.eos_token
    return tok


HEAD_MODULES = ("classifier", "score")  # ModernBERT (encoder and decoder), BERT …: classifier; GPT-2, Llama …: score


def glue_model(path: str | Path, task: GlueTask, *, pooling: str = "auto", pad_token_id: int | None = None,
               warm_from: str | Path | None = None, seed: int = 0) -> Any:
    """The sequence-classification model of the folder for `task` (head initialised under `seed`), with
    `pooling` applied; `warm_from`: a fine-tuned model folder whose weights, all but the head, replace the
    folder's (the MNLI warm start, `load_warm_start`)."""
    config = AutoConfig.from_pretrained(str(path), num_labels=task.num_labels)
    config.problem_type = "regression" if task.regression else "single_label_classification"
    if pooling in ("cls", "mean"):
        config.classifier_pooling = pooling
    if getattr(config, "pad_token_id", None) is None and pad_token_id is not None:
        config.pad_token_id = pad_token_id
    transformers.set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(str(path), config=config, dtype=torch.float32)
    if warm_from is not None:
        load_warm_start(model, warm_from, path)
    return model


def load_warm_start(model: Any, warm_from: str | Path, path: str | Path = "the model") -> list[str]:
    """Load the fine-tuned model folder `warm_from` (the MNLI model of the same base `path`) into `model`, all but
    its classification head, which keeps its fresh initialisation; return the re-initialised keys, sorted.

    The head is every parameter under a top-level module named in HEAD_MODULES (`classifier`, `score`), and any
    other one outside the backbone (`model.base_model_prefix`) whose shape differs from the fresh model's (the
    label count: MNLI 3, RTE/MRPC 2, STS-B 1). Every other weight comes from `warm_from`: ModernBERT's `head`
    (dense + norm before the classifier) too, as ModernBERT ignores only `model.classifier*` (finetuning_jobs.py:293,
    299). A backbone key missing, extra or of another shape means `warm_from` is another model: a ConfigError."""
    source = AutoModelForSequenceClassification.from_pretrained(str(warm_from), dtype=torch.float32)
    theirs = source.state_dict()
    del source
    ours = model.state_dict()
    backbone = getattr(model, "base_model_prefix", "")

    def head(key: str) -> bool:
        top = key.split(".")[0]
        if top in HEAD_MODULES:
            return True
        return top != backbone and key in theirs and tuple(theirs[key].shape) != tuple(ours[key].shape)

    fresh = sorted(k for k in ours if head(k))
    weights = {k: v for k, v in theirs.items() if k in ours and k not in fresh}
    stray = sorted(set(ours) - set(weights) - set(fresh)) + sorted(k for k in theirs if k not in ours and
                                                                   k.split(".")[0] not in HEAD_MODULES)
    stray += sorted(k for k, v in weights.items() if tuple(v.shape) != tuple(ours[k].shape))
    if stray:
        raise ConfigError(f"{warm_from}: the MNLI model does not fit {path} ({', '.join(stray[:4])}): remove the "
                          "work folder's mnli-* folders, or use another --work-dir")
    model.load_state_dict(weights, strict=False)
    return fresh


def check_pooling(pooling: str, causal: bool, model_type: str | None) -> None:
    """Refuse a pooling the architecture cannot do (cls/mean: ModernBERT encoders; last: decoders)."""
    if pooling == "auto":
        return
    if causal and pooling != "last":
        raise ConfigError(f"pooling {pooling!r}: a decoder pools its last real token (--pooling last or auto)")
    if not causal and pooling == "last":
        raise ConfigError("pooling 'last' is for decoders: an encoder takes auto, cls or mean")
    if not causal and model_type != "modernbert":
        raise ConfigError(f"pooling {pooling!r}: only ModernBERT encoders choose their pooling "
                          f"({model_type} pools as its folder says): use --pooling auto")


def finetune(path: str | Path, task: GlueTask, hyper: Hyper, seed: int, train: Any, evals: dict[str, Any],
             tokenizer: Any, device: torch.device, *, pooling: str = "auto", warm_from: str | Path | None = None,
             save_to: str | Path | None = None) -> tuple[dict[str, float], list[str]]:
    """One fine-tuning run of `task` (encoded datasets `train` and `evals` {split: dataset}): (its metrics after
    the last epoch, the keys `load_warm_start` re-initialised, [] without `warm_from`); `save_to`: also write the
    fine-tuned model (and tokenizer) there, atomically."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    model = glue_model(path, task, pooling=pooling, pad_token_id=tokenizer.pad_token_id, seed=seed)
    fresh = load_warm_start(model, warm_from, path) if warm_from is not None else []
    with tempfile.TemporaryDirectory(prefix="twinlm-glue-trainer-") as scratch:
        try:
            args = TrainingArguments(
                output_dir=scratch, per_device_train_batch_size=hyper.batch_size,
                per_device_eval_batch_size=hyper.batch_size, learning_rate=hyper.lr,
                weight_decay=hyper.weight_decay / hyper.lr, num_train_epochs=hyper.epochs, adam_beta1=BETAS[0],
                adam_beta2=BETAS[1], adam_epsilon=EPS, optim="adamw_torch", lr_scheduler_type="linear",
                warmup_steps=WARMUP, seed=seed, data_seed=seed, save_strategy="no", eval_strategy="no",
                logging_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
                use_cpu=not is_accelerator(device), bf16=is_accelerator(device) and not task.fp32)
        except ImportError as e:
            raise ConfigError(f"HF Trainer cannot start ({e}): pip install 'twinlm[paper]'") from None
        trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer),
                          processing_class=tokenizer)
        for printer in (PrinterCallback, ProgressCallback):  # stdout is the command's result summary
            trainer.remove_callback(printer)
        trainer.train()
        by_split = {}
        for split, ds in evals.items():
            out = trainer.predict(ds)
            logits = np.asarray(out.predictions[0] if isinstance(out.predictions, tuple) else out.predictions)
            preds = logits[:, 0] if task.regression else logits.argmax(-1)
            by_split[split] = (np.asarray(out.label_ids), preds)
        if save_to is not None:
            with atomic_dir(save_to, replace=True) as tmp:
                trainer.save_model(str(tmp))
    return task_metrics(task, by_split), fresh


# --- run files ------------------------------------------------------------------------------------
def model_identity(path: str | Path) -> dict[str, Any]:
    """What a run key knows of the model: its folder and a sha256 over its config and weight files."""
    folder = Path(path)
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.is_file() and (f.name == "config.json" or f.suffix in (".safetensors", ".bin")):
            h.update(f"{f.name} {sha256_file(f)}\n".encode())
    return {"path": str(folder.resolve()), "files_sha256": h.hexdigest()}


def run_key(task: GlueTask, hyper: Hyper, seed: int, cfg: GlueConfig, identity: dict, precision: str,
            warm_run: str | None, pair_sep: str | None = None) -> tuple[dict, str]:
    """(the key of a run, its hash): everything a run's scores depend on (`pair_sep`: `pair_separator`'s)."""
    key = {"format": RUN_FORMAT, "task": task.name, "dataset": cfg.dataset, "hyper": dataclasses.asdict(hyper),
           "seed": seed, "max_length": cfg.max_length, "max_train_examples": cfg.max_train_examples,
           "max_eval_examples": cfg.max_eval_examples, "pooling": cfg.pooling, "precision": precision,
           "warm_from_mnli_run": warm_run, "pair_separator": pair_sep, "model": identity}
    return key, hashlib.sha256(dumps_json(key, indent=None).encode()).hexdigest()[:20]


def write_run(path: str | Path, key: dict, record: dict) -> None:
    """Write a finished run atomically, sealed with the sha256 of its key and record (io.write_sealed_json)."""
    write_sealed_json(path, {"key": key, "record": record})


def read_run(path: str | Path, key: dict) -> dict | None:
    """The record of the finished run at `path` for `key`; None when there is none, or the file is cut short,
    altered (its sha256 does not match) or holds another key: such a run is not finished."""
    payload, _ = read_sealed_json(path)
    if not isinstance(payload, dict) or payload.get("key") != key or not isinstance(payload.get("record"), dict):
        return None
    return dict(payload["record"])


# --- the protocol ---------------------------------------------------------------------------------
class _Task:
    """One task's runs: configurations x seeds, each read back when finished, else fine-tuned."""

    def __init__(self, task: GlueTask, cfg: GlueConfig, ctx: dict, log: Callable[[str], None]):
        self.task, self.cfg, self.ctx, self.log = task, cfg, ctx, log
        self.hypers = sweep_configs(task, cfg.sweep, cfg.batch_size)
        self.folder = Path(ctx["work"]) / "runs" / task.name
        self._data: tuple[Any, dict[str, Any]] | None = None

    def data(self) -> tuple[Any, dict[str, Any]]:
        if self._data is None:
            raw = load_task_data(self.task, self.cfg.dataset)
            tok, n, sep = self.ctx["tokenizer"], self.cfg.max_length, self.ctx["pair_separator"]
            train = _encode(_draw(raw["train"], self.cfg.max_train_examples), self.task, tok, n, sep)
            evals = {s: _encode(_draw(raw[s], self.cfg.max_eval_examples), self.task, tok, n, sep)
                     for s in self.task.eval_splits}
            self._data = (train, evals)
        return self._data

    def one(self, hyper: Hyper, seed: int, warm: dict | None, force: bool = False) -> dict:
        """The record of one run (config, seed): read back, or fine-tuned now and written."""
        key, digest = run_key(self.task, hyper, seed, self.cfg, self.ctx["identity"], self.ctx["precision"],
                              warm["run"] if warm else None, self.ctx["pair_separator"])
        path = self.folder / f"{digest}.json"
        record = None if force else read_run(path, key)
        what = f"[glue] {self.task.name} lr={hyper.lr:g} wd={hyper.weight_decay:g} epochs={hyper.epochs} " \
               f"batch={hyper.batch_size} seed {seed}"
        if record is not None:
            self.log(f"{what}: finished earlier, read back from {path}")
            return {**record, "reused": True}
        if path.exists():
            self.log(f"{what}: {path} is damaged or for another run; running it again")
        train, evals = self.data()
        timer = Timer()
        save_to = self.folder / f"{digest}.model" if self.saves_models() else None
        metrics, fresh = finetune(self.ctx["path"], self.task, hyper, seed, train, evals, self.ctx["tokenizer"],
                           self.ctx["device"], pooling=self.cfg.pooling, warm_from=warm["dir"] if warm else None,
                           save_to=save_to)
        record = {"config": dataclasses.asdict(hyper), "seed": seed, "metrics": metrics,
                  "score": task_score(self.task, metrics), "seconds": round(timer(), 3), "run": digest,
                  "train_examples": len(train), "eval_examples": {s: len(d) for s, d in evals.items()},
                  "warm_start": {"from": f"mnli-{seed}", "run": warm["run"], "reinitialised": fresh}
                  if warm else None}
        write_run(path, key, record)
        self.log(f"{what}: score {record['score']:.4f} ({record['seconds']:.1f}s)")
        return {**record, "reused": False}

    def saves_models(self) -> bool:
        return self.task.name == "mnli" and self.cfg.warm_start

    def all(self, warm: dict[int, dict] | None) -> tuple[dict, list[dict]]:
        """Every configuration x seed, configuration-major. When MNLI keeps its models, only the best configuration
        so far keeps them: once a configuration's seeds are all done, its models go if its mean score is not above
        the best's (the first of equal means stays, as `summarise` selects), else the former best's go. So a sweep
        holds at most two configurations' models (the best's and the running one's), not all of them."""
        runs: list[dict] = []
        best: tuple[float, list[dict]] | None = None
        for h in self.hypers:
            done = [self.one(h, s, warm[s] if warm else None) for s in self.ctx["seeds"]]
            runs += done
            if self.saves_models():
                mean = float(np.mean([r["score"] for r in done]))  # the same number summarise selects on
                if best is None or mean > best[0]:
                    losers, best = (best[1] if best else []), (mean, done)
                else:
                    losers = done
                for r in losers:
                    shutil.rmtree(self.folder / f"{r['run']}.model", ignore_errors=True)
        return summarise(self.task, self.hypers, self.ctx["seeds"], runs), runs


def summarise(task: GlueTask, hypers: list[Hyper], seeds: list[int], runs: list[dict]) -> dict:
    """A task's result from its runs: the selected configuration (best mean score over seeds; the first on
    ties), its mean score and mean metrics over seeds, every run, and the sweep's means."""
    by = {h: [r for r in runs if r["config"] == dataclasses.asdict(h)] for h in hypers}
    means = {h: float(np.mean([r["score"] for r in rs])) for h, rs in by.items()}
    best = max(hypers, key=lambda h: means[h])  # max keeps the first of equal means
    chosen = by[best]
    scores = [r["score"] for r in chosen]
    out: dict[str, Any] = {
        "score": means[best], "score_std": float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0,
        "metrics": {m: float(np.mean([r["metrics"][m] for r in chosen])) for m in chosen[0]["metrics"]},
        "reported": reported(task), "selected": dataclasses.asdict(best),
        "per_seed": [{"seed": s, "score": x} for s, x in zip(seeds, scores)],
        "seconds": round(sum(r["seconds"] for r in runs if not r["reused"]), 3), "runs": runs}
    if len(hypers) > 1:
        out["sweep"] = [{"config": dataclasses.asdict(h), "mean": means[h]} for h in hypers]
    return out


def glue_average(results: dict[str, dict], asked: list[str]) -> dict:
    """GLUE: the mean of the 8 task scores, None unless all 8 ran and scored (`incomplete`: the tasks that failed;
    `not_run`: those not asked for); MNLI's score reported alone too."""
    scores = {n: r["score"] for n, r in results.items() if "score" in r}
    failed = [n for n in asked if n not in scores]
    not_run = [n for n in GLUE_TASKS if n not in asked]
    complete = not failed and not not_run
    return {"metric": "GLUE: mean of the 8 task scores", "mean": float(np.mean(list(scores.values())))
            if complete else None, "n_tasks": len(scores), "scores": scores, "incomplete": failed,
            "not_run": not_run, "mnli": scores.get("mnli")}


def _keep_mnli_models(work: Path, result: dict, seeds: list[int], task_runner: _Task) -> dict[int, dict]:
    """Move the selected MNLI configuration's model of each seed to `work/mnli-<seed>/` (retraining one whose
    model is gone), remove the other MNLI models, and return {seed: {"dir", "run"}} for the warm starts."""
    selected = result["selected"]
    warm = {}
    for seed in seeds:
        run = next(r for r in result["runs"] if r["config"] == selected and r["seed"] == seed)
        target = work / f"mnli-{seed}"
        source = task_runner.folder / f"{run['run']}.model"
        if _holds(target) != run["run"]:
            if not source.is_dir():
                task_runner.log(f"[glue] mnli seed {seed}: the selected run's model is gone; training it again")
                task_runner.one(Hyper(**selected), seed, None, force=True)
            with atomic_dir(target, replace=True) as tmp:
                for f in source.iterdir():
                    shutil.move(str(f), tmp / f.name)
                (tmp / MARKER).write_text(json.dumps({"run": run["run"], "seed": seed}) + "\n")
            shutil.rmtree(source, ignore_errors=True)
        warm[seed] = {"dir": target, "run": run["run"]}
    for stale in task_runner.folder.glob("*.model"):
        shutil.rmtree(stale, ignore_errors=True)
    return warm


def _holds(folder: Path) -> str | None:
    try:
        return json.loads((folder / MARKER).read_text())["run"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' load reports (a fresh head is expected here) and Trainer notes would bury the log."""
    before = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(before)


def run(model: str | Path, cfg: GlueConfig | None = None, *, variant: str | None = None, data_root: Any = None,
        out: str | Path | None = None, log: Callable[[str], None] | None = None, device: Any = None,
        work_dir: str | Path | None = None) -> dict:
    """GLUE of the model folder `model` (or hub id) under `cfg` on `device`; returns the result (also written to
    `out`). `work_dir` keeps finished runs and the MNLI models (None: a temporary folder, removed at the end).
    `data_root` is unused: GLUE comes through `datasets`. Result: `track` "glue", `model` (common.describe),
    `tasks` {name: task result (`summarise`) or {"error": ...}}, `average` (`glue_average`), `rules`, `config`."""
    del data_root
    cfg = cfg or GlueConfig()
    log = log or (lambda line: None)
    parse_sweep(cfg.sweep)
    _paper_libraries()
    where = resolve_device(device)
    timer = Timer()
    path = str(resolve_model(model))
    info = load_for_eval(path, variant=variant, device="cpu").info  # the result's model entry, any folder
    check_pooling(cfg.pooling, info["causal"], AutoConfig.from_pretrained(path).model_type)
    asked = [n for n in GLUE_TASKS if n in cfg.tasks]
    seeds = seed_list(cfg.seeds)
    temporary = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="twinlm-glue-")) if temporary else Path(work_dir)  # type: ignore[arg-type]
    precision = placement(where)["precision"]
    tokenizer = glue_tokenizer(path)
    separator = pair_separator(tokenizer)
    ctx = {"path": path, "tokenizer": tokenizer, "device": where, "seeds": seeds, "work": work,
           "identity": model_identity(path), "precision": precision, "pair_separator": separator}
    results: dict[str, dict] = {}
    warm: dict[int, dict] | None = None
    try:
        with _quiet_transformers():
            for name in asked:
                task = TASKS[name]
                runner = _Task(task, cfg, ctx, log)
                log(f"[glue] {info['variant']} {name}: {len(runner.hypers)} configuration(s) x {len(seeds)} seed(s)")
                try:
                    needs_mnli = task.warm_from_mnli and cfg.warm_start
                    if needs_mnli and warm is None:
                        raise MissingArtifactError(f"{name} starts from the MNLI model, and MNLI has none (it failed: "
                                                   "see tasks.mnli.error); fix that, or give --no-warm-start")
                    res, _ = runner.all(warm if needs_mnli else None)
                    if name == "mnli" and cfg.warm_start:
                        warm = _keep_mnli_models(work, res, seeds, runner)
                    results[name] = res
                    log(f"[glue] {info['variant']} {name}: {res['score']:.4f}")
                except Exception as e:  # noqa: BLE001  (one task's failure is recorded; keep_going decides)
                    if not cfg.keep_going:
                        raise
                    results[name] = {"error": f"{type(e).__name__}: {e}"}
                    log(f"[glue] {info['variant']} {name} failed: {results[name]['error']}")
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    result = {"track": "glue", "model": info, "tasks": results, "average": glue_average(results, asked),
              "rules": {**RULES, "pairs": pairs_rule(separator)},
              "config": result_config(cfg, timer(), tasks=asked, seeds=seeds,
                                      configurations=len(sweep_configs(TASKS[asked[0]], cfg.sweep)),
                                      work_dir=None if temporary else str(work),
                                      optimizer={"name": "adamw_torch", "betas": list(BETAS), "eps": EPS,
                                                 "schedule": "linear", "warmup": WARMUP,
                                                 "weight_decay": "wd / lr (see rules.weight_decay)"},
                                      **placement(where))}
    check_result(result)
    if out:
        write_json(out, result)
    return result


__all__ = ["run", "finetune", "glue_model", "load_warm_start", "HEAD_MODULES", "glue_tokenizer", "pair_separator",
           "pairs_rule", "load_task_data", "check_pooling", "model_identity",
           "run_key", "write_run", "read_run", "summarise", "glue_average", "RULES"]
