"""The settings of each evaluation track: what to evaluate and with what budget, one dataclass per track.

`classify.run(model, ClassifyConfig(...))` and its siblings take one of these; what a run evaluates *on*
(the model, its tokenizer, the data root, the output file, the log) is passed beside it. Suite scales hold
one of each (`twinlm suite classify.seeds=5`), and a suite step's identity is the `dataclasses.asdict` of
its settings. `twinlm.configs.build` makes them from plain data with coercion, and the checks below run
however they are made. This module imports nothing heavy: `twinlm --help` lists these fields.

`seeds` is a count `n` (seeds 0..n-1) or the list of seeds itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twinlm.errors import ConfigError

DEFAULT_CS = (0.1, 1.0, 10.0)  # logistic-regression C swept by the probe
DEFAULT_LRS = (1e-4, 3e-4, 1e-3)  # learning rates swept by classification fine-tuning
DEFAULT_CLASSIFY_TASKS = ["sst2", "rte", "mrpc", "cb", "boolq", "spam", "brown"]
DEFAULT_RETRIEVAL_SETS = ["squad", "boolq", "sciq"]
DEFAULT_GENERATIVE_TASKS = ["arc_easy", "arc_challenge", "hellaswag", "piqa", "sciq", "siqa", "winogrande",
                            "openbookqa", "boolq", "copa", "lambada"]


def seed_list(seeds: int | list[int]) -> list[int]:
    """The seeds of a `seeds` setting: a count n means 0..n-1."""
    return list(range(seeds)) if isinstance(seeds, int) else list(seeds)


POOLINGS = (None, "cls", "mean", "last")


def _one_of(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(str, allowed))}")


def _some_seeds(seeds) -> None:
    if not seed_list(seeds):
        raise ConfigError(f"seeds: {seeds!r} names no seed (give a count, or a list like --seeds 0,1,2)")


@dataclass
class ClassifyConfig:
    """Linear probe or fine-tuning on labelled tasks (twinlm.eval.classify)."""

    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_CLASSIFY_TASKS))  # built-in names (or a file task's)
    mode: str = "probe"  # probe (frozen backbone, logistic regression) | finetune
    seeds: int | list[int] = field(default_factory=lambda: [0, 1, 2])
    max_train: int | None = 2000  # training examples drawn per seed; None: all
    max_eval: int | None = 1000  # evaluation examples (a fixed draw); None: all
    kfold: int = 5  # folds for tasks without a training split
    epochs: int = 3  # fine-tuning only
    batch_size: int = 16  # fine-tuning only
    lrs: list[float] = field(default_factory=lambda: list(DEFAULT_LRS))  # fine-tuning sweep
    Cs: list[float] = field(default_factory=lambda: list(DEFAULT_CS))  # probe sweep
    max_length: int = 256  # tokens per input
    pooling: str | None = None  # cls | mean | last; None: the architecture's (encoder cls, decoder last)
    # probe: "final" reads the last layer with the architecture's pooling; "best" picks depth and pooling on
    # the development split
    probe_layer: str = "final"
    train_file: str | None = None  # JSONL {text, text_pair?, label} of a task of your own
    eval_file: str | None = None  # its evaluation file (k-fold cross-validation without train_file)

    def __post_init__(self):
        _one_of("mode", self.mode, ("probe", "finetune"))
        _one_of("probe_layer", self.probe_layer, ("final", "best"))
        _one_of("pooling", self.pooling, POOLINGS)
        _some_seeds(self.seeds)
        if not isinstance(self.kfold, int) or self.kfold < 2:
            raise ConfigError(f"kfold: {self.kfold!r}: cross-validation needs at least 2 folds (--kfold 2 or more)")


@dataclass
class RetrievalConfig:
    """Contrastive fine-tuning, then nDCG@10 / MRR@10 / Recall@100 (twinlm.eval.retrieval)."""

    sets: list[str] = field(default_factory=lambda: list(DEFAULT_RETRIEVAL_SETS))
    finetune: bool = True  # False: score the pooled embeddings as they are
    seeds: int | list[int] = field(default_factory=lambda: [0])
    epochs: int = 1
    batch_size: int = 32
    lr: float = 2e-4
    max_train_pairs: int | None = 2000  # (query, passage) pairs over all sets; None: all
    max_eval_queries: int = 300  # held-out queries per set
    max_corpus: int | None = None  # passages per set (the relevant ones always kept); None: all
    max_length: int = 256  # passage tokens
    query_max_length: int = 64
    pooling: str | None = None  # None: the architecture's (encoder mean, decoder last)

    def __post_init__(self):
        _one_of("pooling", self.pooling, POOLINGS)
        _some_seeds(self.seeds)


@dataclass
class GenerativeConfig:
    """Zero-shot multiple choice and completion by log-likelihood (twinlm.eval.generative)."""

    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_GENERATIVE_TASKS))  # built-in names or JSONL files
    limit: int | None = 500  # examples per task (a seeded draw); None: all
    seed: int = 0
    max_tokens: int = 16384  # tokens per packed forward pass
    max_length: int | None = None  # None: the model's context length
    add_bos: bool = True  # put [CLS] before the context
    delimiter: str = " "  # between context and choice in JSONL tasks


@dataclass
class BpbConfig:
    """Bits per byte on held-out text (twinlm.eval.bpb)."""

    text_file: str | None = None  # .txt (blank-line separated) or JSONL {text}; None: LAMBADA (the suite: its
    #                               held-out split)
    max_docs: int | None = 500  # a seeded draw of documents; None: all
    max_bytes: int | None = None  # score only the first N UTF-8 bytes of the documents
    max_length: int = 512  # tokens per window
    max_tokens: int = 16384  # tokens per packed forward pass
    seed: int = 0


PAIR_FAMILIES = ["swap", "replace", "splice", "agreement", "article"]


@dataclass
class PairsConfig:
    """Minimal pairs: real sentence vs corrupted twin, accuracy per family (twinlm.eval.pairs)."""

    pairs_file: str | None = None  # JSONL {good, bad, family} (BLiMP's files too); None: build from text
    text_file: str | None = None  # held-out text to build pairs from; None: LAMBADA (the suite: its held-out split)
    families: list[str] = field(default_factory=lambda: list(PAIR_FAMILIES))  # built pairs only
    per_family: int | None = 200  # pairs per family (a pair file: a seeded draw); None: all of a file
    min_words: int = 6  # sentence length accepted for building pairs
    max_words: int = 30
    seed: int = 0
    bootstrap: int = 1000  # bootstrap resamples for the intervals
    max_tokens: int = 16384  # tokens per packed forward pass

    def __post_init__(self):
        bad = [f for f in self.families if f not in PAIR_FAMILIES]
        if bad:
            raise ConfigError(f"families: {', '.join(bad)} is not one of {', '.join(PAIR_FAMILIES)}")
        if self.per_family is not None and self.per_family < 1:
            raise ConfigError(f"per_family: {self.per_family} must be at least 1 (or None for all)")
        if self.bootstrap < 100:
            raise ConfigError(f"bootstrap: {self.bootstrap} resamples are too few for an interval; use at least 100")
