"""The evaluation tracks, one record each: the one table `twinlm eval`, `twinlm eval curve` and `twinlm suite`
read a track from.

A `Track` names the track once (`name`: the `twinlm eval` subcommand, the `--tracks` and `--set` word of
`eval curve`, the `Scale` field and step names of the suite, and the `"track"` of its result JSON), its
settings dataclass (eval/settings.py: the command-line flags are generated from it), the module whose
`run(model, settings, *, variant=, data_root=, out=, log=, device=, …)` runs it, and what else that `run` takes
(`ranks=`: the track shares its own work among torchrun's ranks).
`aliases` are other spellings users type today (`classify`): `track(name)`, `canonical_key` and
`canonical_overrides` turn them into the name.

Adding a track: its module (a `run` as above returning a result with `config = result_config(settings, …)`,
eval/common.py), its settings dataclass in eval/settings.py, and one `Track(...)` in `TRACKS` below; the suite
runs it once `Scale` (suite/scales.py) has a field of the track's name with its budgets.

This module imports nothing heavy (`twinlm --help` builds the flags from it): the track's module, which
imports torch, is imported when the track is run.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any

from twinlm.errors import UnknownName
from twinlm.eval.settings import (
    BpbConfig,
    ClassifyConfig,
    GenerativeConfig,
    GlueConfig,
    MtebConfig,
    PairsConfig,
    RetrievalConfig,
)


@dataclass(frozen=True)
class Track:
    name: str
    settings: type  # its settings dataclass
    module: str  # the module holding `run(model, settings, **options) -> result`
    help: str  # one line for `twinlm eval --help`
    aliases: tuple[str, ...] = ()
    mntp: bool = False  # `run` takes `mntp=` (it scores masked tokens, so MNTP encoders read one position earlier)
    ngrams: bool = False  # n-gram controls (`unigram` …, fitted on training shards) are scored on it
    export: bool = False  # `run` takes `export_dir=` (the fine-tuned model, written as a folder)
    baselines: tuple[str, ...] = ()  # model names `run` takes as outside baselines instead of a folder
    ranks: bool = False  # `run` takes `ranks=` (twinlm.eval.ranks): under torchrun it shares its work among the
    # ranks itself; a caller that shares whole runs among the ranks (eval curve, the suite) passes `Ranks()`
    work_dir: bool = False  # `run` takes `work_dir=` (finished runs kept there, a rerun resumes)
    suite: bool = True  # a step of `twinlm suite` (its Scale has a field of this name); the paper's GPU-sized
    # protocols are run on their own

    def run(self, model: Any, settings: Any, **options: Any) -> dict[str, Any]:
        """Run the track (importing its module) on `model` with `settings`; returns the result dict."""
        return importlib.import_module(self.module).run(model, settings, **options)


TRACKS: dict[str, Track] = {t.name: t for t in (
    Track("classification", ClassifyConfig, "twinlm.eval.classify",
          "linear probe or fine-tuning on labelled tasks, mean ± std over seeds", aliases=("classify",),
          baselines=("tfidf", "minilm"), ranks=True),
    Track("retrieval", RetrievalConfig, "twinlm.eval.retrieval",
          "contrastive fine-tuning, then nDCG@10 / MRR@10 / Recall@100", export=True, baselines=("bm25", "minilm"),
          ranks=True),
    Track("generative", GenerativeConfig, "twinlm.eval.generative",
          "zero-shot tasks of lm-evaluation-harness (multiple choice, completion, generation) scored by twinlm",
          mntp=True, ranks=True),
    Track("bpb", BpbConfig, "twinlm.eval.bpb", "bits per byte on held-out text", mntp=True, ngrams=True,
          ranks=True),
    Track("pairs", PairsConfig, "twinlm.eval.pairs",
          "minimal pairs: real sentence vs corrupted twin, accuracy per family with bootstrap intervals",
          mntp=True, ngrams=True, ranks=True),
    Track("glue", GlueConfig, "twinlm.eval.paper.glue",
          "the paper's GLUE protocol (ModernBERT's): fine-tuning on the 8 tasks of nyu-mll/glue through HF Trainer, "
          "MNLI warm start, seeds and sweep", work_dir=True, suite=False),
    Track("mteb", MtebConfig, "twinlm.eval.paper.mteb_track",
          "the paper's retrieval protocol: MS MARCO fine-tuning (sentence-transformers, Ettin's recipe), then mteb "
          "(MTEB(eng, v2) retrieval, MS MARCO dev, CodeSearchNet, MLDR-en)", aliases=("retrieval-paper",),
          export=True, work_dir=True, suite=False),
)}
_BY_SPELLING = {spelling: t for t in TRACKS.values() for spelling in (t.name, *t.aliases)}


def track(name: str) -> Track:
    """The track called `name` or one of its aliases; UnknownName lists the tracks."""
    try:
        return _BY_SPELLING[name]
    except KeyError:
        raise UnknownName(f"unknown track {name!r}: choose from {', '.join(TRACKS)}") from None


def canonical_name(name: str) -> str:
    """The track name for `name` when it is an alias, else `name` unchanged (checked where it is used)."""
    found = _BY_SPELLING.get(name)
    return found.name if found else name


def canonical_key(key: str, noun: str = "key") -> str:
    """A dotted settings key with its first part spelled as the track's name (`classify.seeds` ->
    `classification.seeds`); other keys unchanged. A field unknown under an alias is an error naming the key as
    typed (`noun`: what a key is called in the message, as in twinlm.configs.build)."""
    head, dot, rest = key.partition(".")
    found = _BY_SPELLING.get(head)
    if found is None or head == found.name:
        return key
    field = rest.split(".", 1)[0]
    known = [f.name for f in dataclasses.fields(found.settings)]
    if rest and field not in known:
        raise UnknownName(f"unknown {noun} {key}; known under {head}: {', '.join(known)}")
    return found.name + dot + rest


def canonical_overrides(overrides: list[str], noun: str = "key") -> list[str]:
    """`KEY=VALUE` overrides with each key's track part spelled as the track's name (`canonical_key`)."""
    out = []
    for item in overrides:
        key, eq, value = item.partition("=")
        out.append(canonical_key(key.strip(), noun) + eq + value if eq else item)
    return out


__all__ = ["Track", "TRACKS", "track", "canonical_name", "canonical_key", "canonical_overrides"]
