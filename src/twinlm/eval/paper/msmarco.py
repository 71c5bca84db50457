"""MS MARCO fine-tuning as the Ettin repository's `retrieval_eval/train_st.py` does it, through
sentence-transformers' own trainer; the trained model is written as a sentence-transformers folder.

The recipe (Ettin `train_st.py`, read at `6cbf954`):
- data: `load_dataset("sentence-transformers/msmarco-co-condenser-margin-mse-sym-mnrl-mean-v1", "triplet-hard",
  split="train")` (columns query / positive / negative), `train_test_split(test_size=1000, seed=12)`, the first
  `max_triplets` (1,250,000) of the train part. A set too small for 1,000 held-out triplets holds out a tenth of
  it instead (at least one): `held_out_size`.
- loss: `CachedMultipleNegativesRankingLoss(scale=20, mini_batch_size=...)` (in-batch and hard negatives, cosine
  × 20; the cache makes large batches fit, with the same gradients); `loss="mnrl"` takes the uncached loss (same
  objective, faster on a CPU, for smoke runs).
- trainer: one epoch, `BatchSamplers.NO_DUPLICATES`, warmup 5 % (`warmup_steps=0.05`: a float is a ratio in
  transformers 5, which removed `warmup_ratio`), bf16 on a GPU (Ettin asserts it), fp32 on the CPU.
- check: `TripletEvaluator` (cosine accuracy) on the held-out triplets, before and after training.
- model: encoders load as a plain `SentenceTransformer(folder)` (mean pooling); decoders as `models.Transformer` +
  `models.Pooling(..., "lasttoken")`. A twinlm model folder is first written by the laptop retrieval track's
  `export_sentence_transformers` (the same poolings; a decoder's text ends with `[SEP]`, the token it pools).
  sentence-transformers' last-token pooling reads the last position whose attention mask is 1, so it is right
  with the tokenizer's right padding; a tokenizer without a pad token gets its end token as one.
- an optional learning-rate sweep (`lrs`): each rate trains from the same start; the rate with the best held-out
  triplet accuracy is kept (ties: the first listed). Ettin publishes no sweep; its README uses 3e-4.

`finetune(model_path, cfg, work_dir)` writes `work_dir/st-model/` atomically (filled under a temporary name,
renamed when complete, with `training.json` recording the recipe and outcome); a later call with the same recipe
reuses it without training. The recipe names the source model by its content, not its path (`curve.source_identity`:
a folder's manifest digest, else every file's name, size and modification time; a hub id, its revision and the
snapshot commit it resolved to), so a new checkpoint written into the same folder is fine-tuned again. The
export of a twinlm folder (`work_dir/st-base/`) is likewise written once per source identity and reused while
its record (`export.json`) matches.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import accelerate  # noqa: F401  (sentence-transformers' trainer needs it: fail here, as a missing extra)
import datasets
import torch
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer.evaluation import TripletEvaluator
from sentence_transformers.sentence_transformer.losses import (
    CachedMultipleNegativesRankingLoss,
    MultipleNegativesRankingLoss,
)
from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
from sentence_transformers.sentence_transformer.training_args import BatchSamplers
from transformers import AutoConfig

from twinlm.errors import ConfigError, MissingArtifactError
from twinlm.eval.common import Timer, default_pooling, load_for_eval
from twinlm.eval.curve import source_identity
from twinlm.eval.device import is_accelerator, resolve_device
from twinlm.eval.hf_models import is_twinlm_folder
from twinlm.eval.retrieval import export_sentence_transformers
from twinlm.io import atomic_dir, write_json

SCALE = 20.0  # Ettin's --scale default (also sentence-transformers')
WARMUP = 0.05
SPLIT_SEED = 12  # Ettin's train_test_split seed
MODEL_DIR, BASE_DIR, RECORD, EXPORT_RECORD = "st-model", "st-base", "training.json", "export.json"
RECIPE_FORMAT = 2  # 2: the source model is keyed on its content (source_identity), not its path
# the settings that make the fine-tuned model: a change to any of them trains again
RECIPE_KEYS = ("train_dataset", "train_config", "max_triplets", "held_out", "batch_size", "accum_steps",
               "mini_batch_size", "lr", "lrs", "max_seq_length", "max_steps", "loss", "seed")


def held_out_size(n: int, wanted: int = 1000) -> int:
    """Triplets held out of `n`: Ettin's 1,000 (`wanted`), or a tenth of a set too small for that (at least 1)."""
    return max(1, min(wanted, n // 10))


def load_triplets(cfg: Any) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, held out) as Ettin splits them. The dataset is read by the production call; unreachable offline it
    is a MissingArtifactError naming the id."""
    try:
        ds = datasets.load_dataset(cfg.train_dataset, cfg.train_config, split="train")
    except (ConnectionError, FileNotFoundError, ValueError) as e:
        raise MissingArtifactError(
            f"the training set {cfg.train_dataset} ({cfg.train_config}) is not reachable: {type(e).__name__}: "
            f"{str(e)[:200]}. With HF_HUB_OFFLINE=1 it needs a warm Hugging Face cache, else internet access (or "
            f"a local folder at ./{cfg.train_dataset}, e.g. twinlm.eval.paper.standins.write_msmarco_standin)"
        ) from e
    missing = {"query", "positive", "negative"} - set(ds.column_names)
    if missing:
        raise ConfigError(f"{cfg.train_dataset} ({cfg.train_config}) lacks columns {sorted(missing)}: give a "
                          "triplet set with query / positive / negative (--train-config triplet-hard)")
    if len(ds) < 2:
        raise ConfigError(f"{cfg.train_dataset} has {len(ds)} triplets: too few to hold any out")
    split = ds.train_test_split(test_size=held_out_size(len(ds), cfg.held_out), seed=cfg.seed)
    train = split["train"]
    if cfg.max_triplets is not None:
        train = train.select(range(min(cfg.max_triplets, len(train))))
    return train.select_columns(["query", "positive", "negative"]), split["test"]


def exports_base(path: str | Path) -> bool:
    """Whether `build_model` evaluates `path` through an export to `work_dir/st-base` (a twinlm folder that is
    not already a sentence-transformers folder)."""
    return not (Path(path) / "modules.json").is_file() and is_twinlm_folder(str(path))


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _export_base(path: Path, base: Path, max_seq_length: int, identity: str | None,
                 log: Callable[[str], None] | None) -> None:
    """`base` as the sentence-transformers export of the twinlm folder `path`, written once per source identity
    and export length: a re-export would change its files' times, and with them every cache keyed on it."""
    want = {"source": identity or source_identity(path), "max_seq_length": max_seq_length}
    if (base / "modules.json").is_file() and _read_record(base / EXPORT_RECORD) == want:
        if log:
            log(f"[mteb] reusing the export {base} (same source model)")
        return
    loaded = load_for_eval(str(path), device="cpu")
    pooling = default_pooling(loaded.causal, "retrieval")
    with atomic_dir(base, replace=True) as tmp:  # renamed into place only when whole
        export_sentence_transformers(loaded.model, loaded.tokenizer, tmp, pooling, max_seq_length)
        write_json(tmp / EXPORT_RECORD, want)


def _is_causal(path: Path) -> bool:
    archs = getattr(AutoConfig.from_pretrained(str(path)), "architectures", None) or []
    return bool(archs) and archs[0].endswith("ForCausalLM")


def build_model(model_path: str | Path, *, max_seq_length: int, device: str, work_dir: str | Path,
                log: Callable[[str], None] | None = None,
                identity: str | None = None) -> tuple[SentenceTransformer, str]:
    """(the model as Ettin builds it, its pooling). A sentence-transformers folder (modules.json) loads as it is;
    a twinlm folder is exported first (`work_dir/st-base`, the retrieval track's export; reused while its
    `export.json` names the same source `identity`, default `source_identity(model_path)`); another
    transformers folder: an encoder is a plain `SentenceTransformer(folder)` (mean), a decoder
    `models.Transformer` + `models.Pooling(..., "lasttoken")`."""
    path = Path(model_path)
    if (path / "modules.json").is_file():
        model = SentenceTransformer(str(path), device=device)
    elif exports_base(path):
        base = Path(work_dir) / BASE_DIR
        _export_base(path, base, max_seq_length, identity, log)
        model = SentenceTransformer(str(base), device=device)
    elif _is_causal(path):
        word = Transformer(str(path), max_seq_length=max_seq_length)
        model = SentenceTransformer(modules=[word, Pooling(word.get_embedding_dimension(), "lasttoken")],
                                    device=device)
    else:
        model = SentenceTransformer(str(path), device=device)
    tok = model.tokenizer
    if tok.pad_token is None:  # batches need a pad token; last-token pooling reads the attention mask, not it
        tok.pad_token = tok.eos_token
    model.max_seq_length = max_seq_length
    mode: Any = model[1].pooling_mode
    pooling = mode if isinstance(mode, str) else ",".join(mode)
    if log:
        log(f"[mteb] model {path}: {type(model[0].auto_model).__name__}, pooling {pooling}")
    return model, pooling


def triplet_accuracy(model: SentenceTransformer, held: datasets.Dataset, batch_size: int = 64) -> float:
    """Cosine accuracy of `model` on the held-out triplets (sentence-transformers' TripletEvaluator)."""
    ev = TripletEvaluator(held["query"], held["positive"], held["negative"], name="held-out",
                          batch_size=batch_size, write_csv=False)
    return float(ev(model)[ev.primary_metric])


def _train_one(model: SentenceTransformer, train: datasets.Dataset, held: datasets.Dataset, cfg: Any, lr: float,
               out_dir: Path, accelerator: bool) -> dict[str, Any]:
    loss: torch.nn.Module
    if cfg.loss == "cached":
        loss = CachedMultipleNegativesRankingLoss(model, scale=SCALE, mini_batch_size=cfg.mini_batch_size)
    else:
        loss = MultipleNegativesRankingLoss(model, scale=SCALE)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out_dir), num_train_epochs=1, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.accum_steps, learning_rate=lr, warmup_steps=WARMUP,
        max_steps=cfg.max_steps if cfg.max_steps is not None else -1, bf16=accelerator, use_cpu=not accelerator,
        batch_sampler=BatchSamplers.NO_DUPLICATES, eval_strategy="no", save_strategy="no", report_to="none",
        logging_steps=10, seed=cfg.seed, disable_tqdm=True)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train, loss=loss)
    out = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"lr": lr, "steps": int(out.global_step), "train_loss": float(out.training_loss),
            "last_logged_loss": losses[-1] if losses else None,
            "held_out_accuracy": triplet_accuracy(model, held)}


def recipe(cfg: Any, model_path: str | Path, identity: str | None = None) -> dict[str, Any]:
    """What makes the fine-tuned model: the source model's content `identity` (default
    `source_identity(model_path)`) and the `RECIPE_KEYS` settings."""
    settings = dataclasses.asdict(cfg)
    return {"format": RECIPE_FORMAT, "model": identity or source_identity(model_path),
            **{k: settings[k] for k in RECIPE_KEYS}}


def finetune(model_path: str | Path, cfg: Any, work_dir: str | Path, *, device: str | None = None,
             log: Callable[[str], None] | None = None, identity: str | None = None) -> tuple[Path, dict[str, Any]]:
    """(`work_dir/st-model`, its training record). Trains unless a complete folder with the same `recipe` (the
    source model's content `identity`, default `source_identity(model_path)`, and the settings) is there already
    (then logs "reusing ..."). With `cfg.lrs` every rate is trained from the same start and the one with the best
    held-out triplet accuracy is written (ties: the first listed)."""
    work = Path(work_dir)
    final = work / MODEL_DIR
    identity = identity or source_identity(model_path)
    want = recipe(cfg, model_path, identity)
    record_path = final / RECORD
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("recipe") == want:
            if log:
                log(f"[mteb] reusing the fine-tuned model {final} (same source model and recipe; delete it to train "
                "again)")
            return final, record
        if log:
            log(f"[mteb] {final} was fine-tuned from another model or recipe: training again")
    where = resolve_device(device)
    accelerator = is_accelerator(where)
    timer = Timer()
    train, held = load_triplets(cfg)
    lrs = list(cfg.lrs) if cfg.lrs else [cfg.lr]
    runs: list[dict[str, Any]] = []
    best: tuple[float, int] | None = None
    base_accuracy = None
    with atomic_dir(final, replace=True) as tmp:
        for i, lr in enumerate(lrs):
            model, pooling = build_model(model_path, max_seq_length=cfg.max_seq_length, device=str(where),
                                         work_dir=work, log=log if i == 0 else None, identity=identity)
            if base_accuracy is None:
                base_accuracy = triplet_accuracy(model, held)
            run = _train_one(model, train, held, cfg, lr, work / "st-train", accelerator)
            if not math.isfinite(run["train_loss"]):
                raise ConfigError(f"MS MARCO fine-tuning at lr {lr} diverged (loss {run['train_loss']}): lower --lr")
            runs.append(run)
            if log:
                log(f"[mteb] fine-tuned at lr {lr}: {run['steps']} steps, loss {run['train_loss']:.4f}, held-out "
                    f"triplet accuracy {run['held_out_accuracy']:.4f}")
            if best is None or run["held_out_accuracy"] > best[0]:
                best = (run["held_out_accuracy"], i)
                model.save_pretrained(str(tmp))  # the best so far replaces the one before
            del model
            if accelerator:
                torch.cuda.empty_cache()
        assert best is not None
        record = {"recipe": want, "source": str(model_path), "pooling": pooling, "selected_lr": lrs[best[1]],
                  "selection": "the learning rate with the highest held-out triplet accuracy (cosine; ties: the "
                               "first listed)" if len(lrs) > 1 else "one learning rate, no sweep",
                  "train_triplets": len(train), "held_out_triplets": len(held), "scale": SCALE,
                  "warmup": WARMUP, "epochs": 1, "precision": "bf16" if accelerator else "fp32", "device": str(where),
                  "held_out_accuracy_before": base_accuracy, "held_out_accuracy": best[0], "runs": runs,
                  "seconds": timer()}
        write_json(tmp / RECORD, record)
    if log:
        log(f"[mteb] wrote {final}")
    return final, record


__all__ = ["SCALE", "WARMUP", "MODEL_DIR", "BASE_DIR", "RECIPE_KEYS", "held_out_size", "load_triplets",
           "source_identity", "exports_base", "build_model", "triplet_accuracy", "recipe", "finetune"]
