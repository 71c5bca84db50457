"""Training recipes: YAML files → typed dataclasses, with base files and dotted command-line overrides.

A recipe is one objective (`mlm`, `clm` or `mntp`), one model (a preset plus field overrides), a tokenizer,
data, an optimizer, and an ordered mapping of phases (pre-training, context extension, decay, or the single
phase of a cross-objective run). Every phase starts from the previous one's weights *and optimizer*; a
recipe with `init_from:` starts from converted weights with a fresh optimizer.

YAML rules
- `base: FILE` or `base: [FILE, …]` are loaded first and deep-merged in order, then the file itself on top.
  Mappings merge key by key; lists and scalars replace. Each FILE is a path relative to the file naming it;
  when no such file exists, a recipe name in `recipes_dir()` (`ettin/base`, or a checkout's
  `../recipes/ettin/base.yaml`), so a recipe of your own can build on a shipped one.
- Phases are a mapping `phases: {name: {...}}` so that base files and overrides can address one phase:
  `phases.decay.tokens=50B`.
- Token counts accept suffixes: `1.7T`, `8.5B`, `250M`, `4K` (powers of 1000), or plain numbers.
- Paths (data, tokenizer, init_from) expand `${VAR}` from the environment and `~`; `${TWINLM_HOME}` defaults
  to `~/.cache/twinlm` when unset. Relative paths are relative to the current working directory.
  The shipped recipes point at `${TWINLM_HOME}/…`, so setting TWINLM_HOME (or overriding `data=…`,
  `tokenizer=…`) is all a caller needs.
- Overrides: `key.sub=value` with the value parsed as YAML (`optim.lr=1e-3`, `phases.pretrain.tokens=2M`,
  `data=/path/to/shards`, `model.overrides.attention_dropout=0`). Unknown keys are errors.
- Values are coerced to the fields' types by `twinlm.configs` (the rules shared with suite scales and
  evaluation settings); `data:` may be a path, a `{path, weight}` mapping or a list of either.

Naming a recipe (`find_recipe`, used by `load_recipe` for every path it is given): a file that exists (relative to
the working directory) is read as it is; any other name is looked up in the recipe folder (`recipes_dir`): the
folder `TWINLM_RECIPES` names when it is set, else the recipes shipped inside the package (twinlm/recipes/, package
data, so a wheel install has them). There a recipe is named by its path, with or without `.yaml` and a leading
`recipes/`: `recipes/cpu/encoder.yaml`, `cpu/encoder.yaml` and `cpu/encoder` name the same file from any directory.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path, PurePath
from typing import Any, overload

import yaml

from twinlm.config import OBJECTIVES, ModelConfig
from twinlm.configs import apply_overrides, build, coerce, deep_merge
from twinlm.errors import ConfigError, MissingArtifactError


@overload
def expand_path(value: str) -> str: ...
@overload
def expand_path(value: None) -> None: ...
@overload
def expand_path(value: str | None) -> str | None: ...
def expand_path(value: str | None) -> str | None:
    if value is None:
        return None
    env = dict(os.environ)
    env.setdefault("TWINLM_HOME", str(Path("~/.cache/twinlm").expanduser()))

    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in env:
            raise ConfigError(f"recipe path {value!r} uses ${{{name}}}, which is not set in the environment")
        return env[name]

    return str(Path(re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, str(value))).expanduser())


# ---------------------------------------------------------------------------------------------------------
@dataclass
class ShardSource:
    """One prepared shard folder (`twinlm data prepare --out DIR`) and its share of the tokens, or a batch-order
    folder to replay (recognised by its layout, twinlm.data.order): then it is the phase's only source, and
    `start_step` is the order step its first step reads (default: the same global step for twinlm's records,
    step 1 for the released layout, whose steps restart per phase), `order_group` the released phase
    (`checkpoint`, `ext` or `decay`) when the folder holds several. An MDS folder of token ids (`index.json`,
    twinlm.data.mds) is read as it is: `column` names the ids column when it is ambiguous, `dtype` how a
    `bytes` column packs them; the recipe must name the tokenizer, whose vocabulary bounds the ids."""
    path: str
    weight: float = 1.0
    start_step: int | None = None
    order_group: str | None = None
    column: str | None = None
    dtype: str | None = None


@dataclass
class Schedule:
    """LR multipliers of `optim.lr` within a phase (see twinlm.train.schedule)."""
    warmup_tokens: int = 0
    start: float = 1.0
    end: float = 1.0
    decay: str = "constant"  # constant | one_minus_sqrt | linear
    decay_tokens: int | None = None  # window at the end of the phase; None: all of it after warmup


@dataclass
class Phase:
    name: str = ""
    tokens: int = 0  # tokens to train in this phase (real tokens: inputs are unpadded)
    seq_len: int = 1024  # chunk length; longer chunks are truncated (prepare shards at this length)
    batch_size: int = 4608  # global batch in sequences, independent of the number of ranks
    batch_warmup_tokens: int = 0
    batch_warmup_start: int | None = None  # None: one micro-batch (micro_batch_tokens // seq_len)
    micro_batch_tokens: int = 8192  # packed tokens per forward pass per rank (memory knob, not the recipe)
    mask_ratio: float = 0.30  # mlm / mntp only
    rope_theta: float | None = None  # global-layer θ from this phase on (None: keep)
    local_rope_theta: float | None = None
    schedule: Schedule = field(default_factory=Schedule)
    data: list[ShardSource] | None = None  # None: the recipe's `data`

    @property
    def micro_batch_size(self) -> int:
        return max(1, self.micro_batch_tokens // self.seq_len)

    @property
    def warmup_start(self) -> int:
        return self.batch_warmup_start if self.batch_warmup_start else min(self.batch_size, self.micro_batch_size)


@dataclass
class Optim:
    lr: float = 8e-4  # peak
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 1e-5

    def __post_init__(self) -> None:
        problem = optim_problem(self)
        if problem:
            raise ConfigError(problem)


def optim_problem(o: Optim) -> str | None:
    """What makes the optimizer settings unusable (StableAdamW would refuse them mid-setup), or None. The
    message starts with the field's name (twinlm.configs puts `optim.` in front)."""
    if not (math.isfinite(o.lr) and o.lr >= 0):
        return f"lr must be a number >= 0 (the peak learning rate), got {o.lr}: set optim.lr to e.g. 8e-4"
    if not all(math.isfinite(b) and 0 <= b < 1 for b in o.betas):
        return (f"betas must both lie in [0, 1) (Adam's moment decays), got {list(o.betas)}: set e.g. "
                "optim.betas=[0.9,0.98]")
    if not (math.isfinite(o.eps) and o.eps > 0):
        return f"eps must be a number > 0, got {o.eps}: set optim.eps to e.g. 1e-6"
    if not (math.isfinite(o.weight_decay) and o.weight_decay >= 0):
        return f"weight_decay must be a number >= 0, got {o.weight_decay}: set optim.weight_decay to e.g. 1e-5"
    return None


@dataclass
class ModelSpec:
    """A preset (twinlm.config PRESETS) and ModelConfig fields set on top of it (`overrides`: read by
    `model_overrides`, so unknown keys are listed and counts like `4K` read)."""
    preset: str = "ettin-150m"
    overrides: dict[str, Any] = field(default_factory=dict)


def model_overrides(value: Any, where: str = "model.overrides") -> dict[str, Any]:
    """`model.overrides` read against ModelConfig's fields by twinlm.configs' rules: each value coerced to its
    field's type; an unknown key (or `causal`, which the objective decides) is a ConfigError naming the known
    ones."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping of ModelConfig fields, got {value!r}")
    hints = typing.get_type_hints(ModelConfig)
    known = [f.name for f in dataclasses.fields(ModelConfig) if f.name != "causal"]
    if "causal" in value:
        raise ConfigError(f"{where}.causal: the objective decides the attention (clm: causal; mlm, mntp: "
                          f"bidirectional): remove {where}.causal and set `objective`")
    unknown = sorted(str(k) for k in value if k not in known)
    if unknown:
        close = [m for k in unknown for m in difflib.get_close_matches(k, known, n=1)]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(f'{where}.{k}' for k in unknown)}{hint}; known under {where}: "
                          f"{', '.join(known)}")
    return {k: coerce(hints[k], v, f"{where}.{k}") for k, v in value.items()}


def _model_spec(value: Any, where: str) -> ModelSpec:
    spec = build(ModelSpec, value, where)
    spec.overrides = model_overrides(spec.overrides, f"{where}.overrides")
    return spec


@dataclass
class Checkpointing:
    every_tokens: int = 0  # 0: only at phase ends and on SIGTERM
    every_minutes: float = 0.0  # also once this many minutes passed on rank 0's clock since this process's
    #                             training started or its last checkpoint (0: off); these count among the
    #                             `keep_last`, never for `keep_every` (train/callbacks.py TimedCheckpoint)
    keep_last: int = 3
    keep_every: int = 0  # also keep every M-th periodic (every_tokens) checkpoint for good (0: none); phase
    #                      ends always kept
    grace_s: float = 30.0  # the seconds a scheduler gives between SIGTERM and SIGKILL (torchrun's and Slurm's
    #                        KillWait default): a save that takes longer is warned about (0: no warning)

    def __post_init__(self) -> None:
        for name in ("every_minutes", "grace_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a number >= 0 (0: off), got {value}: set e.g. "
                                  f"checkpoint.{name}=30")


@dataclass
class Eval:
    data: list[ShardSource] | None = None  # held-out shards; None: no eval
    every_tokens: int = 0
    samples: int = 64
    mask_ratio: float = 0.15  # eval masking is always 15% in the paper


@dataclass
class Recipe:
    name: str = ""
    objective: str = "mlm"  # mlm (encoder) | clm (decoder) | mntp (encoder trained from a decoder)
    model: ModelSpec = field(default_factory=ModelSpec)
    tokenizer: str | None = None  # tokenizer folder; None: the one recorded in the first data source's meta
    data: list[ShardSource] = field(default_factory=list)
    phases: dict[str, Phase] = field(default_factory=dict)
    optim: Optim = field(default_factory=Optim)
    checkpoint: Checkpointing = field(default_factory=Checkpointing)
    eval: Eval = field(default_factory=Eval)
    seed: int = 21
    init_from: str | None = None  # cross-objective: a trained model folder of the other kind
    # the exported model card's `license`: a hub license id (mit, apache-2.0) or other (twinlm.card.check_license;
    # another is a warning when training starts and a refusal when `twinlm export` / `convert` write the card)
    license: str | None = None
    language: list[str] = field(default_factory=list)  # the model card's `language`: ISO 639 codes (en, fr, …)
    datasets: list[str] = field(default_factory=list)  # the model card's `datasets`: hub ids of the training data
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    parallel: str = "auto"  # auto (ddp when several ranks) | ddp | fsdp
    compile: bool = False
    static_shapes: bool = False  # pad every micro-batch to its phase's fixed sizes (train/static.py): with compile,
    #                              the whole model is compiled once per phase (dynamic=False) instead of per block
    cuda_graphs: bool = False  # replay each step's passes as CUDA graphs (implies static_shapes; needs compile
    #                            and a CUDA device): removes the host's launch cost at 17M–68M
    activation_checkpointing: bool = False
    memory_check: bool = True  # on CUDA: refuse, before the first step, a micro-batch the memory estimate
    #                            (twinlm.memory) says does not fit the device, naming one that does
    prefetch: bool = True  # draw and prepare the next batch on a background thread while a step runs (false:
    #                        in line; the batches are the same either way)
    max_bad_steps: int = 5  # consecutive NaN/inf losses before the run stops
    dist_timeout: float = 600.0  # seconds a collective waits for the other ranks once step 1 is done, then the run
    #                              ends naming the step (a hung or dead rank; must exceed a checkpoint's save)
    dist_init_timeout: float = 1800.0  # the same from the start to the end of step 1 (checks, shard verification,
    #                                    loading, compiling); TWINLM_DIST_TIMEOUT / _INIT_TIMEOUT override both
    max_steps: int | None = None  # stop (checkpoint, exit 0, like SIGTERM) at this many optimizer steps; rerun
    #                               with a larger value or none to continue (time-limited jobs, tests)
    stop_after: float | str | None = None  # a wall-clock deadline: once this long has passed since this
    #     process's `fit` started (its setup included), stop as on SIGTERM (checkpoint the step just finished,
    #     exit 0; the same command resumes). Seconds or a duration (`20s`, `90m`, `11h30m`, `1d`: parse_duration).
    #     Counted per process, so a requeued job gets the whole time again: set it to the job's time limit
    #     minus one step and one checkpoint's save, and the same line serves every requeue
    tracker: str = "tensorboard"  # experiment tracking (train/callbacks.py): tensorboard (RUN/tensorboard/), wandb
    #     (Weights & Biases, offline unless WANDB_MODE says otherwise: RUN/wandb/) or none; a tracker whose package
    #     is not installed is named in one warning line with its `pip install`, and the run goes on without it
    tensorboard: bool = True  # the older switch: false turns the tensorboard tracker off (as tracker: none)
    record_order: bool = False  # write each checkpoint interval's batches to RUN/data_order/ (parquet)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.stop_after is not None:
            parse_duration(self.stop_after)  # a ConfigError now, not when training starts
        if self.tracker not in TRACKERS:
            raise ConfigError(f"tracker: {self.tracker!r} is not one of {', '.join(TRACKERS)} (e.g. tracker=none)")

    # ---------------------------------------------------------------------------------------------
    @property
    def causal(self) -> bool:
        return self.objective == "clm"

    @property
    def total_tokens(self) -> int:
        return sum(p.tokens for p in self.phases.values())

    def phase_list(self) -> list[Phase]:
        return list(self.phases.values())

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["optim"]["betas"] = list(d["optim"]["betas"])
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self) -> Recipe:
        problems = []
        if self.objective not in OBJECTIVES:
            problems.append(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if not self.phases:
            problems.append("a recipe needs at least one phase")
        for p in self.phases.values():
            where = f"phases.{p.name}"
            if p.tokens <= 0:
                problems.append(f"{where}.tokens must be positive")
            if p.seq_len <= 1 or p.batch_size <= 0 or p.micro_batch_tokens <= 0:
                problems.append(f"{where}: seq_len, batch_size and micro_batch_tokens must be positive")
            if p.micro_batch_tokens < p.seq_len:
                problems.append(f"{where}.micro_batch_tokens ({p.micro_batch_tokens}) must hold one sequence "
                                f"({p.seq_len})")
            if not 0 < p.mask_ratio < 1:
                problems.append(f"{where}.mask_ratio must be in (0, 1)")
            if p.schedule.decay not in ("constant", "one_minus_sqrt", "linear"):
                problems.append(f"{where}.schedule.decay: unknown {p.schedule.decay!r}")
            if p.schedule.warmup_tokens > p.tokens:
                problems.append(f"{where}.schedule.warmup_tokens exceeds the phase")
            if not (p.data or self.data):
                problems.append(f"{where}: no data (set `data:` or `{where}.data`)")
            problems += _weight_problems(p.data, f"{where}.data")
        problems += _weight_problems(self.data, "data")
        if self.precision not in ("auto", "bf16", "fp32"):
            problems.append(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.parallel not in ("auto", "ddp", "fsdp"):
            problems.append(f"parallel must be auto, ddp or fsdp, got {self.parallel!r}")
        if self.cuda_graphs and not self.compile:
            problems.append("cuda_graphs: true needs compile: true (the graphs are captured by torch.compile)")
        for knob in ("dist_timeout", "dist_init_timeout"):
            if not 0 < getattr(self, knob) < 1e9:
                problems.append(f"{knob} must be a positive number of seconds, got {getattr(self, knob)!r}")
        try:  # a Recipe built in Python has not been through the hooks
            self.model.overrides = model_overrides(self.model.overrides)
        except ConfigError as e:
            problems.append(str(e))
        problems += [f"language: {x!r} is not an ISO 639 code (en, fr, zh-hant, …)" for x in self.language
                     if not isinstance(x, str) or not LANGUAGE_CODE.match(x)]
        problems += [f"datasets: {x!r} is not a hub dataset id (org/name)" for x in self.datasets
                     if not isinstance(x, str) or not HUB_DATASET.match(x)]
        problem = optim_problem(self.optim)
        if problem:
            problems.append(f"optim.{problem}")
        if problems:
            raise ConfigError(f"invalid recipe {self.name!r}:\n  " + "\n  ".join(problems))
        return self

    def resolved_paths(self) -> Recipe:
        """A copy with ${VAR}/~ expanded in every path."""
        r = copy.deepcopy(self)
        for src in list(r.data) + [s for p in r.phases.values() for s in (p.data or [])] + list(r.eval.data or []):
            src.path = expand_path(src.path)
        r.tokenizer = expand_path(r.tokenizer)
        r.init_from = expand_path(r.init_from)
        return r


LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}(?:-[A-Za-z0-9]+)*$")  # the model card's `language` entries
HUB_DATASET = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")  # the model card's `datasets` entries
TRACKERS = ("tensorboard", "wandb", "none")  # the `tracker` choices (train/callbacks.py)

_DURATION = re.compile(r"(?:(\d+(?:\.\d*)?)d)?(?:(\d+(?:\.\d*)?)h)?(?:(\d+(?:\.\d*)?)m)?(?:(\d+(?:\.\d*)?)s)?")


def parse_duration(value: Any, where: str = "stop_after") -> float:
    """Seconds (> 0) from a number of seconds (`5400`, `"5400"`, `0.5`) or a duration in days, hours, minutes
    and seconds, largest first (`"20s"`, `"90m"`, `"11h30m"`, `"1d12h"`, `"1.5h"`); anything else is a one-line
    ConfigError naming the accepted forms."""
    text = str(value).strip().lower().replace(" ", "")
    seconds: float | None = None
    if not isinstance(value, bool):
        try:
            seconds = float(text)
        except ValueError:
            m = _DURATION.fullmatch(text)
            if m and text and any(m.groups()):
                seconds = sum(float(g) * unit for g, unit in zip(m.groups(), (86400, 3600, 60, 1)) if g)
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"{where}: cannot read {value!r} as a duration > 0: use seconds (5400) or numbers with "
                          "units d, h, m, s, largest first (20s, 90m, 11h30m, 1d12h)")
    return seconds


def _weight_problems(sources: list[ShardSource] | None, where: str) -> list[str]:
    """A data mixture's weights are shares of the tokens: finite, not negative, not all zero."""
    weights = [s.weight for s in sources or []]
    if weights and (not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0):
        return [f"{where}: weights must be >= 0 with a positive sum (shares of the tokens), got {weights}"]
    return []


# --- building the dataclasses (twinlm.configs), with the recipe's two shorthands ---------------------------
def _sources(value: Any, where: str) -> list[ShardSource]:
    """`data: PATH`, `data: {path, weight}` or a list of either."""
    if value is None:
        return []
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    return [ShardSource(path=v) if isinstance(v, str) else build(ShardSource, v, f"{where}.{i}")
            for i, v in enumerate(value)]


def _phases(value: Any, where: str) -> dict[str, Phase]:
    """`phases: {name: {...}}`, in order; each phase knows its name."""
    if not isinstance(value, dict):
        raise ConfigError("phases: expected a mapping {name: {...}} (ordered)")
    return {k: build(Phase, {**(v or {}), "name": k}, f"phases.{k}", hooks=_HOOKS) for k, v in value.items()}


_HOOKS = {list[ShardSource]: _sources, dict[str, Phase]: _phases, ModelSpec: _model_spec}


# --- finding and loading YAML ------------------------------------------------------------------------------
RECIPES_ENV = "TWINLM_RECIPES"


def shipped_recipes() -> Path:
    """The recipes shipped inside the package (twinlm/recipes/, installed with it as package data)."""
    folder = resources.files("twinlm") / "recipes"
    if not isinstance(folder, Path):  # a zipped install: base files need real paths
        raise MissingArtifactError(f"twinlm is installed as an archive, so its recipes are not files: set "
                                   f"{RECIPES_ENV} to a folder of recipes (a copy of twinlm/recipes/)")
    return folder


def recipes_dir() -> Path:
    """The folder recipe names are looked up in: `TWINLM_RECIPES` when set (it replaces the shipped recipes, for
    names and for the suite's scales), else `shipped_recipes()`."""
    env = os.environ.get(RECIPES_ENV)
    if not env:
        return shipped_recipes()
    path = Path(env).expanduser()
    if not path.is_dir():
        raise MissingArtifactError(f"{RECIPES_ENV}={env} is not a folder: point it at a folder of recipes, or unset "
                                   "it to use the recipes shipped with twinlm")
    return path


def _named(folder: Path, parts) -> Path:
    """The file recipe name `parts` (with or without `.yaml`) would be in `folder`."""
    rel = PurePath(*parts)
    return folder / (rel if rel.suffix in (".yaml", ".yml") else rel.with_name(rel.name + ".yaml"))


def find_recipe(name: str | Path) -> Path:
    """The recipe file `name` names: an existing file as it is; else `name` (with or without `.yaml` and a leading
    `recipes/`) inside `recipes_dir()`. MissingArtifactError names both places and the closest recipe names."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    parts = PurePath(name).parts
    if parts and parts[0] == "recipes":
        parts = parts[1:]
    folder = recipes_dir()
    if parts and not path.is_absolute() and _named(folder, parts).is_file():
        return _named(folder, parts)
    where = f"{RECIPES_ENV}={os.environ[RECIPES_ENV]}" if os.environ.get(RECIPES_ENV) else "the shipped recipes"
    known = sorted(p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.yaml"))
    close = difflib.get_close_matches(PurePath(*parts).with_suffix("").as_posix() if parts else "", known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; e.g. {', '.join(known[:3])}" if known else ""
    raise MissingArtifactError(f"recipe {name} not found: no such file, nor a recipe of that name in {folder} "
                               f"({where}){hint}")


def load_raw(path: str | Path, _seen: tuple = ()) -> dict:
    """A recipe file as a plain dict, its `base:` files merged in."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"recipe base cycle: {' -> '.join(map(str, _seen + (path,)))}")
    if not path.is_file():
        raise MissingArtifactError(f"recipe file {path} not found" + (f" (a base of {_seen[-1]})" if _seen else ""))
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a YAML mapping")
    bases = data.pop("base", None) or []
    if isinstance(bases, str):
        bases = [bases]
    merged: dict = {}
    for b in bases:
        merged = deep_merge(merged, load_raw(_base_path(path, str(b)), _seen + (path,)))
    return deep_merge(merged, data)


def _base_path(recipe: Path, base: str) -> Path:
    """The file a recipe's `base:` entry names: the path relative to the recipe's own folder when it exists,
    else a recipe name in `recipes_dir()` (the shipped recipes, or TWINLM_RECIPES), so a recipe of your own
    can say `base: ettin/base`; leading `..` and `recipes/` are dropped from the name, so the checkout-relative
    `../recipes/ettin/base.yaml` names the same recipe. Neither there: MissingArtifactError naming both places."""
    beside = recipe.parent / Path(base).expanduser()
    if beside.is_file() or Path(base).is_absolute():
        return beside
    parts = list(PurePath(base).parts)
    while parts and parts[0] in ("..", "."):
        parts.pop(0)
    if parts and parts[0] == "recipes":
        parts.pop(0)
    folder = recipes_dir()
    if parts and _named(folder, parts).is_file():
        return _named(folder, parts)
    where = f"{RECIPES_ENV}={os.environ[RECIPES_ENV]}" if os.environ.get(RECIPES_ENV) else "the shipped recipes"
    raise MissingArtifactError(f"recipe {recipe}: base {base!r} not found: neither {beside.resolve()} (beside "
                               f"the recipe) nor a recipe of that name in {folder} ({where}); correct the path")


def from_dict(raw: dict) -> Recipe:
    return build(Recipe, raw, hooks=_HOOKS).validate()


def load_recipe(path_or_obj: Any, overrides: list[str] | None = None) -> Recipe:
    """A Recipe from a YAML path or recipe name (`find_recipe`), a dict or a Recipe, with dotted overrides applied."""
    if isinstance(path_or_obj, Recipe):
        raw = path_or_obj.to_dict()
    elif isinstance(path_or_obj, dict):
        raw = copy.deepcopy(path_or_obj)
    else:
        path = find_recipe(path_or_obj)
        raw = load_raw(path)
        raw.setdefault("name", path.stem)
    _check_phase_names(raw, overrides)
    return from_dict(apply_overrides(raw, overrides, path_lists=("data",)))


def _check_phase_names(raw: dict, overrides: list[str] | None) -> None:
    """Refuse an override that walks into a phase the recipe does not have (`phases.pretrian.tokens=5K` would
    otherwise add a phase with default settings); a new phase is given whole: `phases.NAME={tokens: …}`."""
    known = list(raw.get("phases") or {}) if isinstance(raw.get("phases"), dict) else []
    for item in overrides or []:
        parts = item.split("=", 1)[0].strip().split(".")
        if known and len(parts) > 2 and parts[0] == "phases" and parts[1] not in known:
            raise ConfigError(f"override {item!r}: the recipe has no phase {parts[1]!r} (its phases: "
                              f"{', '.join(known)}): correct the name, or add a phase whole with "
                              f"phases.{parts[1]}={{tokens: …, seq_len: …}}")
