"""The settings of each evaluation track: what to evaluate and with what budget, one dataclass per track.

`classify.run(model, ClassifyConfig(...))` and its siblings take one of these; what a run evaluates *on*
(the model, its tokenizer, the data root, the output file, the log) is passed beside it. Suite scales hold
one of each (`twinlm suite classification.seeds=5`), and a suite step's identity is the `dataclasses.asdict` of
its settings. `twinlm.configs.build` makes them from plain data with coercion, and the checks below run
however they are made. This module imports nothing heavy: `twinlm --help` lists these fields.

Each field is declared with `setting`, whose `help` (and `choices`, `flags`) the `twinlm eval` command line is
generated from (twinlm.cli.flags): one flag per field, its default the field's. `choices` are checked here
too, however the settings are made.

`seeds` is a count `n` (seeds 0..n-1) or the list of seeds itself (on the command line: a comma list).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twinlm.errors import ConfigError
from twinlm.eval.paper.glue_tasks import GLUE_SEEDS, GLUE_TASKS, TASKS, parse_sweep

DEFAULT_CS = (0.1, 1.0, 10.0)  # logistic-regression C swept by the probe
DEFAULT_LRS = (1e-4, 3e-4, 1e-3)  # learning rates swept by classification fine-tuning
DEFAULT_CLASSIFY_TASKS = ["sst2", "rte", "mrpc", "cb", "boolq", "spam", "brown"]
DEFAULT_RETRIEVAL_SETS = ["squad", "boolq", "sciq"]
DEFAULT_GENERATIVE_TASKS = ["arc_easy", "arc_challenge", "hellaswag", "piqa", "sciq", "siqa", "winogrande",
                            "openbookqa", "boolq", "copa", "lambada"]
GENERATIVE_DATA = ("auto", "local", "hub")  # where a generative task's documents come from
POOLINGS = (None, "cls", "mean", "last", "max")
SEEDS_HELP = "the seeds: a list, or a count n for 0..n-1 (on the command line always a comma list)"
PAIR_FAMILIES = ["swap", "replace", "splice", "agreement", "article"]


def setting(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None, help: str,
            choices: Sequence[Any] | None = None, flags: Sequence[str] = ()) -> Any:
    """A settings field: its default (or a `factory` for a list), what it means (`help`), the values it may take
    (`choices`, checked by `check_choices`) and command-line spellings besides `--<name>` (`flags`)."""
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None, "flags": tuple(flags)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check_choices(settings: Any) -> None:
    """Raise ConfigError for a field outside its `choices` (a list field: for any item outside them)."""
    for f in dataclasses.fields(settings):
        allowed = f.metadata.get("choices")
        if allowed is None:
            continue
        value = getattr(settings, f.name)
        if isinstance(value, list):
            shown = ", ".join(str(v) for v in value if v not in allowed)
        else:
            shown = "" if value in allowed else repr(value)
        if shown:
            raise ConfigError(f"{f.name}: {shown} is not one of {', '.join(str(a) for a in allowed)}")


def seed_list(seeds: int | list[int]) -> list[int]:
    """The seeds of a `seeds` setting: a count n means 0..n-1."""
    return list(range(seeds)) if isinstance(seeds, int) else list(seeds)


def _some_seeds(seeds: int | list[int]) -> None:
    if not seed_list(seeds):
        raise ConfigError(f"seeds: {seeds!r} names no seed (give a count, or a list like --seeds 0,1,2)")


@dataclass
class ClassifyConfig:
    """Linear probe or fine-tuning on labelled tasks (twinlm.eval.classify)."""

    tasks: list[str] = setting(factory=lambda: list(DEFAULT_CLASSIFY_TASKS),
                               help="built-in task names (or a file task's name)")
    mode: str = setting("probe", choices=("probe", "finetune"),
                        help="probe (frozen backbone, logistic regression) or finetune")
    seeds: int | list[int] = setting(factory=lambda: [0, 1, 2], help=SEEDS_HELP)
    max_train: int | None = setting(2000, help="training examples drawn per seed (none: all)")
    max_eval: int | None = setting(1000, help="evaluation examples, a fixed draw (none: all)")
    kfold: int = setting(5, help="folds for tasks without a training split")
    epochs: int = setting(3, help="fine-tuning epochs")
    batch_size: int = setting(16, help="fine-tuning batch size")
    lrs: list[float] = setting(factory=lambda: list(DEFAULT_LRS), help="fine-tuning learning rates swept")
    Cs: list[float] = setting(factory=lambda: list(DEFAULT_CS), flags=("--cs",),
                              help="probe: logistic-regression C values swept")
    max_length: int = setting(256, help="tokens per input")
    pooling: str | None = setting(None, choices=POOLINGS,
                                  help="cls, mean, last or max (none: a sentence-transformers folder's own, else the "
                                       "architecture's, encoder cls, decoder last)")
    probe_layer: str = setting("final", choices=("final", "best"),
                               help="probe the last layer with the architecture's pooling (final), or the depth "
                                    "and pooling that score best on the development split (best)")
    train_file: str | None = setting(None, help="JSONL {text, text_pair?, label}: the training file of a task of "
                                                "your own")
    eval_file: str | None = setting(None, help="its evaluation file (k-fold cross-validation without train_file)")

    def __post_init__(self) -> None:
        check_choices(self)
        _some_seeds(self.seeds)
        if not isinstance(self.kfold, int) or self.kfold < 2:
            raise ConfigError(f"kfold: {self.kfold!r}: cross-validation needs at least 2 folds (--kfold 2 or more)")


@dataclass
class RetrievalConfig:
    """Contrastive fine-tuning, then nDCG@10 / MRR@10 / Recall@100 (twinlm.eval.retrieval)."""

    sets: list[str] = setting(factory=lambda: list(DEFAULT_RETRIEVAL_SETS), help="retrieval sets")
    finetune: bool = setting(True, help="fine-tune contrastively (--no-finetune: score the pooled embeddings as "
                                        "they are)")
    seeds: int | list[int] = setting(factory=lambda: [0], help=SEEDS_HELP)
    epochs: int = setting(1, help="fine-tuning epochs")
    batch_size: int = setting(32, help="fine-tuning batch size")
    lr: float = setting(2e-4, help="fine-tuning learning rate")
    max_train_pairs: int | None = setting(2000, help="(query, passage) training pairs over all sets (none: all)")
    max_eval_queries: int = setting(300, help="held-out queries per set")
    max_corpus: int | None = setting(None, help="passages per set, the relevant ones always kept (none: all)")
    max_length: int = setting(256, help="passage tokens")
    query_max_length: int = setting(64, help="query tokens")
    pooling: str | None = setting(None, choices=POOLINGS,
                                  help="cls, mean, last or max (none: a sentence-transformers folder's own, else the "
                                       "architecture's, encoder mean, decoder last)")

    def __post_init__(self) -> None:
        check_choices(self)
        _some_seeds(self.seeds)


@dataclass
class GenerativeConfig:
    """Zero-shot tasks through lm-evaluation-harness, scored by twinlm (twinlm.eval.generative)."""

    tasks: list[str] = setting(factory=lambda: list(DEFAULT_GENERATIVE_TASKS),
                               help="lm-eval task names (siqa and lambada: social_iqa, lambada_openai), paper (the "
                                    "paper's ten), and/or JSONL files {context, choices, label}")
    limit: int | None = setting(500, help="examples per task, a seeded draw (none or all: every one)")
    seed: int = setting(0, help="seed of the draw")
    max_tokens: int = setting(16384, help="tokens per packed forward pass")
    max_length: int | None = setting(None, help="tokens per scored sequence (none: the model's context length)")
    add_bos: bool | None = setting(None, flags=("--bos",),
                                   help="put [CLS]/BOS before the context (none: twinlm's models and encoders yes; "
                                        "another transformers decoder as its tokenizer does, as lm-eval)")
    delimiter: str = setting(" ", help="between context and choice in JSONL tasks")
    data: str = setting("auto", choices=GENERATIVE_DATA,
                        help="local: the fetched bundle's copy (validation splits for ARC, OpenBookQA, SciQ); hub: "
                             "lm-eval's own dataset; auto: the local copy where there is one, else the hub")

    def __post_init__(self) -> None:
        check_choices(self)


@dataclass
class BpbConfig:
    """Bits per byte on held-out text (twinlm.eval.bpb)."""

    text_file: str | None = setting(None, help=".txt (blank-line separated documents) or JSONL {text} (none: "
                                               "LAMBADA; the suite: its held-out split)")
    max_docs: int | None = setting(500, help="a seeded draw of documents (none: all)")
    max_bytes: int | None = setting(None, help="score only the first N UTF-8 bytes of the documents (none: all)")
    max_length: int = setting(512, help="tokens per window")
    max_tokens: int = setting(16384, help="tokens per packed forward pass")
    seed: int = setting(0, help="seed of the document draw and the masks")


@dataclass
class PairsConfig:
    """Minimal pairs: real sentence vs corrupted twin, accuracy per family (twinlm.eval.pairs)."""

    pairs_file: str | None = setting(None, help="JSONL {good, bad, family} (BLiMP's files too; none: pairs built "
                                                "from text)")
    text_file: str | None = setting(None, help="held-out text to build pairs from, .txt (blank-line separated) or "
                                               "JSONL {text} (none: LAMBADA; the suite: its held-out split)")
    families: list[str] = setting(factory=lambda: list(PAIR_FAMILIES), choices=PAIR_FAMILIES,
                                  help="families of built pairs")
    per_family: int | None = setting(200, help="pairs per family (a pair file: a seeded draw; none: all of a file)")
    min_words: int = setting(6, help="shortest sentence (words) accepted for building pairs")
    max_words: int = setting(30, help="longest sentence (words) accepted for building pairs")
    seed: int = setting(0, help="seed of the draws and the bootstrap")
    bootstrap: int = setting(1000, help="bootstrap resamples for the intervals")
    max_tokens: int = setting(16384, help="tokens per packed forward pass")

    def __post_init__(self) -> None:
        check_choices(self)
        if self.per_family is not None and self.per_family < 1:
            raise ConfigError(f"per_family: {self.per_family} must be at least 1 (or None for all)")
        if self.bootstrap < 100:
            raise ConfigError(f"bootstrap: {self.bootstrap} resamples are too few for an interval; use at least 100")


@dataclass
class GlueConfig:
    """The paper's GLUE protocol as ModernBERT ran it: fine-tuning per task, seed and configuration, MNLI warm
    start, the mean of each task's metrics, GLUE the mean of the 8 (twinlm.eval.paper.glue)."""

    tasks: list[str] = setting(factory=lambda: list(GLUE_TASKS), choices=GLUE_TASKS,
                               help="GLUE tasks (mnli first: rte, mrpc, stsb start from its fine-tuned weights)")
    sweep: str = setting("defaults", help="defaults (ModernBERT's per task), grid (all 60 of lr x epochs x weight "
                                          "decay), or random:N (N of the grid, a fixed draw); more than one: the "
                                          "best mean over seeds on validation is reported")
    seeds: int | list[int] = setting(factory=lambda: list(GLUE_SEEDS), help=SEEDS_HELP)
    warm_start: bool = setting(True, help="rte, mrpc and stsb start from the MNLI model of the same seed and "
                                          "configuration selected for MNLI, with a fresh head")
    max_length: int = setting(256, help="tokens per input (pair inputs: longest side truncated first)")
    max_train_examples: int | None = setting(None, help="training rows per task, a fixed draw (none: all)")
    max_eval_examples: int | None = setting(None, help="evaluation rows per split, a fixed draw (none: all)")
    batch_size: int | None = setting(None, help="batch size for every task (none: each task's ModernBERT default)")
    dataset: str = setting("nyu-mll/glue", help="the datasets id (or a local folder in the hub's layout)")
    pooling: str = setting("auto", choices=("auto", "cls", "mean", "last"),
                           help="auto: the folder's own (ModernBERT's classifier_pooling; decoders the last real "
                                "token); cls or mean for a ModernBERT encoder; last for a decoder")
    keep_going: bool = setting(True, help="a task that fails is recorded as an error and the others run on")

    def __post_init__(self) -> None:
        check_choices(self)
        _some_seeds(self.seeds)
        parse_sweep(self.sweep)
        if not self.tasks:
            raise ConfigError("tasks: no task named (e.g. --tasks mnli,rte)")
        for name, value in (("max_length", self.max_length), ("max_train_examples", self.max_train_examples),
                            ("max_eval_examples", self.max_eval_examples), ("batch_size", self.batch_size)):
            if value is not None and value < 1:
                raise ConfigError(f"{name}: {value} must be at least 1")
        warm = [t for t in self.tasks if TASKS[t].warm_from_mnli]
        if self.warm_start and warm and "mnli" not in self.tasks:
            raise ConfigError(f"tasks: {', '.join(warm)} start from the MNLI fine-tuned model: add mnli to --tasks, "
                              "or give --no-warm-start")


# --- the paper's retrieval protocol (twinlm.eval.paper.mteb_track) -------------------------------------
MSMARCO_TRIPLETS = "sentence-transformers/msmarco-co-condenser-margin-mse-sym-mnrl-mean-v1"


@dataclass
class MtebConfig:
    """MS MARCO fine-tuning with sentence-transformers (the Ettin recipe), then mteb's retrieval tasks
    (twinlm.eval.paper.mteb_track)."""

    tasks: list[str] = setting(factory=lambda: ["paper"],
                               help="mteb task names, or the sets paper (the 10 retrieval tasks of MTEB(eng, v2), "
                                    "MSMARCO dev, CodeSearchNetRetrieval, MultiLongDocRetrieval en) and mteb-v2")
    finetune: bool = setting(True, help="fine-tune on MS MARCO first (--no-finetune: evaluate the folder as it is, "
                                        "e.g. a fine-tuned sentence-transformers folder)")
    train_dataset: str = setting(MSMARCO_TRIPLETS, help="hub id of the training triplets")
    train_config: str = setting("triplet-hard", help="its config (columns query, positive, negative)")
    max_triplets: int | None = setting(1_250_000, help="training triplets, the first of the split (none: all)")
    held_out: int = setting(1000, help="triplets held out for the triplet check (a tenth of a smaller set)")
    batch_size: int = setting(1024, help="triplets per device batch (in-batch negatives: part of the objective)")
    accum_steps: int = setting(1, help="gradient accumulation steps")
    mini_batch_size: int = setting(64, help="the cached loss's mini-batch (memory only; Ettin README: 64)")
    lr: float = setting(3e-4, help="learning rate (Ettin README: 3e-4)")
    lrs: list[float] | None = setting(None, help="a sweep instead of --lr: the rate with the best held-out triplet "
                                                 "accuracy is kept")
    max_seq_length: int = setting(512, help="tokens per text in fine-tuning (MS MARCO's texts are shorter)")
    eval_max_seq_length: int | None = setting(None, help="tokens per text when mteb encodes (none: the model's "
                                                         "context, max_position_embeddings: long documents such "
                                                         "as MLDR's are read whole, as the paper's 8K models do)")
    max_steps: int | None = setting(None, help="stop training after this many steps (none: one epoch)")
    loss: str = setting("cached", choices=("cached", "mnrl"),
                        help="cached (CachedMultipleNegativesRankingLoss, Ettin) or mnrl (uncached, same objective)")
    seed: int = setting(12, help="seed of the held-out split (Ettin: 12) and of training")
    encode_batch_size: int = setting(128, help="texts per batch when mteb encodes")

    def __post_init__(self) -> None:
        check_choices(self)
        if not self.tasks:
            raise ConfigError("tasks: no task named (give --tasks paper, mteb-v2 or mteb task names)")
        for name in ("batch_size", "accum_steps", "mini_batch_size", "held_out", "max_seq_length",
                     "encode_batch_size", "eval_max_seq_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name}: {getattr(self, name)} must be at least 1")
        if self.lrs is not None and not self.lrs:
            raise ConfigError("lrs: an empty sweep (give rates, e.g. --lrs 1e-4,3e-4, or none for --lr)")
