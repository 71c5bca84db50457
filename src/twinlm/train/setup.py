"""Everything a training run does once, before its first step: read-only checks, then the writes and builds.

    checked = check_run(recipe, out, env, log)     # reads only: a refusal leaves RUN exactly as it was
    run = open_run(checked)                        # writes the run folder, builds the model and optimizer
    Trainer(recipe, out).fit(run)                  # the loop (train/trainer.py); fit() alone does all three

`check_run`, in this order (every rank runs each check, so an error stops all of them; rank 0 alone looks
for the latest checkpoint and broadcasts it):
  1. `--out` is a folder or nothing (`check_out`); every rank sees the folders rank 0 sees of those the run
     reads (`read_paths`: the run folder, the tokenizer, the data, `init_from`; train/shared.py: NotShared, one
     line naming the rank and host).
  2. The recipe's tokenizer loads (`load_run_tokenizer`: MissingArtifactError), and its fingerprint.
  3. The newest intact checkpoint (train/checkpoint.py `CheckpointManager.latest`: corrupt ones are reported
     and remembered, not moved), seen by every rank (NotShared otherwise).
  4. Resuming is refused when the recipe changes what the checkpoint's weights are (`check_resume`:
     ConfigError naming the changed `model`/`objective` settings, TokenizerMismatch for the tokenizer).
  5. Each phase's `seq_len` against the chunk size its shards were prepared with (`check_seq_lens`: longer is
     a ConfigError, shorter a warning).
  6. The run's tokenizer fingerprint (`run_fingerprint`: the recipe's, else the checkpoint's, else that of the
     first shards trained on) and every shard folder against it (`check_shard_tokenizers`: TokenizerMismatch).
     A recipe `license` that is no hub license id is a warning (`license_warning`), never a refusal.
  7. A fresh run's `init_from` exists (`check_init_from`: MissingArtifactError).
  8. The ModelConfig the run trains (`model_config`): the checkpoint's; or `init_from`'s config with the
     recipe's overrides (which may not change a weight's shape); or the preset, sized to the tokenizer, with
     the overrides. An impossible shape is a ConfigError. (The recipe itself was validated when it was built:
     unknown override keys, counts like `4K`, the optimizer's settings: train/recipe.py.)
  9. A fresh run's `init_from` model is read whole (twinlm.load: its manifest, config and weights checked), once.
  10. The memory pre-flight check on an accelerator (`check_memory`, twinlm.memory `check_fits`; the recipe's
     `memory_check`).

`open_run`, in this order:
  1. The run folder's provenance (train/rundir.py `prepare_run_dir`: config.yaml, env.json, starts.jsonl, with
     the topology: nodes, every rank's host, restarts, a Slurm job; dist.py `topology`), a warning when torchrun
     restarts across nodes lack the variable they need (`restart_warning`); every rank sees a probe file rank 0
     writes into the run folder (train/shared.py `check_run_folder_shared`: NotShared otherwise).
  2. Checkpoints that failed verification are moved aside (`set_aside_corrupt`), with a warning when none
     was intact.
  3. Every shard folder not verified in its current state is verified in full, the parts dealt out over the
     ranks (train/verify.py `verify_run_shards`; the record is RUN/verified_shards.json); a damaged one is a
     ShardError on every rank.
  4. The model: the checkpoint's weights; or the `init_from` model read by the checks, converted in memory
     (twinlm.convert `as_kind`; nothing is written for it); or fresh, initialised from the recipe's seed.
     On the device; a fresh or converted model takes the first phase's RoPE θ.
  5. Parallelisation (train/dist.py), the optimizer (StableAdamW; compiled with `compile` on CUDA), the TrainStep.
  6. On resume: the trainer's state, the callbacks' states, the optimizer state and this rank's RNG.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from twinlm.card import license_problem
from twinlm.config import ModelConfig
from twinlm.convert import as_kind
from twinlm.data import check_tokenizer
from twinlm.data.mds import MDSFolder, is_mds_folder
from twinlm.data.order import is_order_folder
from twinlm.data.shards import read_meta
from twinlm.data.tokenizer import load_tokenizer, model_config_for, tokenizer_fingerprint
from twinlm.errors import (
    ConfigError,
    CorruptCheckpointError,
    DataError,
    MissingArtifactError,
    ShardError,
    TokenizerMismatch,
)
from twinlm.hub import resolve_model
from twinlm.loading import load, read_config
from twinlm.memory import check_fits
from twinlm.model import Transformer
from twinlm.train import dist
from twinlm.train.checkpoint import (
    TRAINING_FILES,
    CheckpointManager,
    callback_states,
    read_state,
    read_tensors,
    restore_training,
)
from twinlm.train.datasets import phase_sources
from twinlm.train.optim import build_optimizer
from twinlm.train.recipe import Phase, Recipe, ShardSource
from twinlm.train.rundir import prepare_run_dir
from twinlm.train.shared import check_run_folder_shared, check_visible
from twinlm.train.state import TrainState
from twinlm.train.step import TrainStep
from twinlm.train.verify import verify_run_shards

Log = Callable[[str], None]
# ModelConfig fields that set a weight's shape: a converted start cannot change them
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads")
ShardMeta = tuple[Phase, ShardSource, dict]


@dataclass
class Checked:
    """What the read-only checks found: everything `open_run` needs, nothing written yet."""

    recipe: Recipe
    out: Path
    env: dist.DistEnv
    log: Log
    tokenizer: Any | None
    fingerprint: str | None
    ckpt: CheckpointManager
    resume: Path | None  # the checkpoint to resume from
    resume_state: dict | None  # its state.json
    config: ModelConfig  # the model to build (a resume's: the checkpoint's)
    source: Transformer | None = None  # a fresh cross-objective run's init_from model, as loaded


@dataclass
class Run:
    """A run ready for its first (or next) step: the trainer's loop takes it from here."""

    recipe: Recipe
    out: Path
    env: dist.DistEnv
    tokenizer: Any | None
    fingerprint: str | None
    ckpt: CheckpointManager
    resume: Path | None
    model: torch.nn.Module  # to call (maybe DDP/FSDP wrapped)
    optimizer: torch.optim.Optimizer
    step: TrainStep
    state: TrainState = field(default_factory=TrainState)
    callback_states: dict[str, dict] = field(default_factory=dict)  # key -> a callback's state_dict


# --- the checks (read only) ---------------------------------------------------------------------------
def check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a folder: give --out a folder name (the run folder is "
                          "created there)")


def load_run_tokenizer(recipe: Recipe) -> tuple[Any | None, str | None]:
    """The recipe's tokenizer and its fingerprint; (None, None) when the recipe names none."""
    if not recipe.tokenizer:
        return None, None
    try:
        tok = load_tokenizer(recipe.tokenizer)
    except FileNotFoundError as e:
        raise MissingArtifactError(f"the recipe's tokenizer: {e}") from e
    return tok, tokenizer_fingerprint(tok)


def latest_checkpoint(ckpt: CheckpointManager, env: dist.DistEnv) -> Path | None:
    """The newest intact checkpoint, found by rank 0 and agreed by every rank."""
    latest = ckpt.latest() if env.is_main else None
    latest = dist.broadcast_object(str(latest) if latest else None)
    return Path(latest) if latest else None


def changes(key: str, old: Any, new: Any) -> list[str]:
    """`key.sub: old -> new` for every leaf that differs between two recipe values."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [c for k in sorted(set(old) | set(new)) for c in changes(f"{key}.{k}", old.get(k), new.get(k))]
    return [] if old == new else [f"{key}: {old!r} -> {new!r}"]


def check_resume(recipe: Recipe, out: Path, ckpt: Path, state: dict, fingerprint: str | None) -> None:
    """Refuse to resume from `ckpt` (its state.json: `state`) with a recipe that changes the model, the
    objective or the tokenizer."""
    saved, now = state.get("recipe") or {}, recipe.to_dict()
    changed = [c for key in ("objective", "model") if key in saved for c in changes(key, saved[key], now.get(key))]
    if changed:
        what = " and ".join(k for k in ("objective", "model") if any(c.startswith(k) for c in changed))
        raise ConfigError(f"{out} holds a run trained with another {what}"
                          f" ({'; '.join(changed)}); resuming would keep the checkpoint's weights under the new "
                          f"settings: restore them, or train into a new folder (--out)")
    fp = state.get("tokenizer_fingerprint")
    if fp and fingerprint and fp != fingerprint:
        raise TokenizerMismatch(f"{ckpt} was trained with another tokenizer (fingerprint {fp[:12]}… vs "
                                f"{fingerprint[:12]}…): point the recipe's `tokenizer` at the "
                                f"one this run started with, or train into a new run folder")


def shard_sources(recipe: Recipe, phase: Phase) -> list[ShardSource]:
    """The phase's twinlm shard folders (MDS folders and batch-order folders are checked when read)."""
    return [s for s in phase_sources(recipe, phase) if not is_order_folder(s.path) and not is_mds_folder(s.path)]


def warn_unhashed_mds(recipe: Recipe, log: Log) -> None:
    """One warning per MDS folder of the recipe whose shards carry no hash (read on trust, data/mds.py)."""
    paths = dict.fromkeys(str(s.path) for phase in recipe.phase_list() for s in phase_sources(recipe, phase)
                          if is_mds_folder(s.path))
    for path in paths:
        try:
            unhashed = MDSFolder(path).unhashed
        except (DataError, ShardError):  # a damaged folder: the phase that opens it names the problem
            continue
        if unhashed:
            log(f"warning: {path}: {len(unhashed)} MDS shard(s) ({unhashed[0]}, …) carry no hash, so bit rot in them "
                "cannot be detected: write the folder with hashes=['sha1'] or prepare its text with `twinlm data "
                "prepare`")


def shard_metas(recipe: Recipe) -> Iterator[ShardMeta]:
    """(phase, source, meta.json) of every phase's shard folders, in training order; unreadable ones are
    reported when the phase opens its data."""
    for phase in recipe.phase_list():
        for src in shard_sources(recipe, phase):
            try:
                yield phase, src, read_meta(src.path)
            except ShardError:
                continue


def check_seq_lens(metas: list[ShardMeta], log: Log) -> None:
    """Each phase's `seq_len` against the chunk size its shards were prepared with (meta.json `chunking`;
    shards that record none are not checked). Longer: an error (the phase could never see sequences that
    long; a context extension on short chunks extends nothing). Shorter: a warning (each chunk is cut to
    seq_len, the rest of it is never trained on)."""
    for phase, src, meta in metas:
        size = (meta.get("chunking") or {}).get("chunk_size")
        if not size or size == phase.seq_len:
            continue
        if phase.seq_len > size:
            raise ConfigError(f"phase {phase.name}: seq_len {phase.seq_len} but {src.path} holds chunks of "
                              f"at most {size} tokens, so no sequence is longer than {size}: prepare shards "
                              f"with --chunk-size {phase.seq_len}, or set "
                              f"phases.{phase.name}.seq_len={size}")
        log(f"warning: phase {phase.name}: seq_len {phase.seq_len} is shorter than the {size}-token "
            f"chunks of {src.path}: each chunk is cut to {phase.seq_len} tokens and the rest is never "
            f"trained on (prepare shards with --chunk-size {phase.seq_len} to use all of the text)")


def run_fingerprint(tokenizer_fp: str | None, resume_state: dict | None, metas: list[ShardMeta]) -> str | None:
    """The run's tokenizer: the recipe's, else the checkpoint's, else that of the first shards trained on
    (None when nothing records one)."""
    if tokenizer_fp:
        return tokenizer_fp
    if resume_state and resume_state.get("tokenizer_fingerprint"):
        return str(resume_state["tokenizer_fingerprint"])
    for _, _, meta in metas:
        found = (meta.get("tokenizer") or {}).get("fingerprint")
        if found:
            return str(found)
    return None


def check_shard_tokenizers(metas: list[ShardMeta], fingerprint: str | None) -> None:
    """Refuse shards of another tokenizer than the run's (shards that record none are not checked)."""
    if fingerprint is None:
        return
    for _, src, meta in metas:
        if (meta.get("tokenizer") or {}).get("fingerprint"):
            check_tokenizer(meta, fingerprint, where=src.path)


def check_init_from(recipe: Recipe) -> Path:
    """The folder of a cross-objective start's source model (a hub id is resolved to its snapshot)."""
    src = resolve_model(recipe.init_from or "")
    if not src.exists():
        raise MissingArtifactError(f"init_from: {recipe.init_from} does not exist (train the source model "
                                   "first, or override init_from=PATH)")
    return src


def model_config(recipe: Recipe, tokenizer: Any | None, resume: Path | None,
                 source: Path | None = None) -> ModelConfig:
    """The ModelConfig of the model the run trains: a resume's is the checkpoint's; a cross-objective start's
    is the source's with the recipe's overrides (e.g. dropout; not a weight's shape); a fresh run's is the
    preset, sized to the tokenizer, with the overrides. Either way `causal` follows the objective."""
    if resume is not None:
        return ModelConfig.load(resume / "model_config.json")
    over = dict(recipe.model.overrides)
    if source is not None:
        cfg = read_config(source)
        reshaped = [f"{k}={over[k]} (the source has {getattr(cfg, k)})" for k in SHAPE_FIELDS
                    if k in over and over[k] != getattr(cfg, k)]
        if reshaped:
            raise ConfigError(f"init_from: model.overrides {', '.join(reshaped)} would change the shape of the "
                              f"weights of {recipe.init_from}: a converted start keeps its source's shape; remove "
                              "those overrides")
        return cfg.replace(**over, causal=recipe.causal)
    base = model_config_for(tokenizer, recipe.model.preset) if tokenizer is not None else \
        ModelConfig.preset(recipe.model.preset)
    return base.replace(**over, causal=recipe.causal)


def device_memory(device: torch.device) -> float | None:
    """Bytes of memory of an accelerator (None on the CPU, where the host's memory is not planned)."""
    if device.type != "cuda":
        return None
    return float(torch.cuda.mem_get_info(device)[1])


def check_device(recipe: Recipe, env: dist.DistEnv) -> None:
    """Refuse settings the device cannot run: CUDA graphs anywhere but on CUDA."""
    if recipe.cuda_graphs and env.device.type != "cuda":
        raise ConfigError(f"cuda_graphs: true needs a CUDA device, and this run is on {env.device}: set "
                          "cuda_graphs=false (static_shapes=true compiles the same shapes without graphs)")


def license_warning(recipe: Recipe, log: Log) -> None:
    """Warn of a recipe `license` that is no hub license id (twinlm.card.check_license): the run trains (a run
    started under an older twinlm resumes with the same command), final/'s card is written without a license,
    and `twinlm export` / `convert` refuse it until `--license` names one."""
    problem = license_problem(recipe.license)
    if problem:
        log(f"warning: {problem}; final/'s model card is written without a license until then")


def check_memory(recipe: Recipe, env: dist.DistEnv, cfg: ModelConfig) -> None:
    """Refuse a micro-batch that the memory estimate says does not fit the device (twinlm.memory)."""
    total = device_memory(env.device)
    if total is None or not recipe.memory_check:
        return
    bf16 = dist.compute_dtype(recipe.precision, env) is torch.bfloat16  # the same rule as the training's
    check_fits(cfg, micro_batch_tokens=max(p.micro_batch_tokens for p in recipe.phase_list()),
               checkpointing=recipe.activation_checkpointing, card_bytes=total, device=str(env.device),
               ranks=env.world_size, sharded=recipe.parallel == "fsdp" and env.distributed,
               precision="bf16" if bf16 else "fp32")


def read_paths(recipe: Recipe, out: Path) -> list[Path]:
    """What every rank of the run reads from disk: the run folder and its checkpoints, the tokenizer, every
    phase's data, the held-out data, a cross-objective start's model (those that exist on rank 0 must exist on
    every rank: train/shared.py)."""
    paths = [out, out / "checkpoints"]
    if recipe.tokenizer:
        paths.append(Path(recipe.tokenizer))
    paths += [Path(s.path) for phase in recipe.phase_list() for s in phase_sources(recipe, phase)]
    paths += [Path(s.path) for s in recipe.eval.data or []]
    if recipe.init_from:
        paths.append(Path(recipe.init_from))
    return list(dict.fromkeys(paths))


def check_run(recipe: Recipe, out: str | Path, env: dist.DistEnv, log: Log) -> Checked:
    """Every check of a run before anything is written (the module docstring lists them in order)."""
    out = Path(out)
    check_out(out)
    check_device(recipe, env)
    check_visible(read_paths(recipe, out), env, "a folder the run reads")
    tokenizer, tokenizer_fp = load_run_tokenizer(recipe)
    ckpt = CheckpointManager(out / "checkpoints", recipe.checkpoint.keep_last, recipe.checkpoint.keep_every,
                             log=log, required=TRAINING_FILES)
    resume = latest_checkpoint(ckpt, env)
    if resume is not None:
        check_visible([resume / name for name in sorted(TRAINING_FILES)], env, "the checkpoint to resume from")
    resume_state = read_state(resume) if resume is not None else None
    if resume is not None and resume_state is not None:
        check_resume(recipe, out, resume, resume_state, tokenizer_fp)
    metas = list(shard_metas(recipe))
    check_seq_lens(metas, log)
    fingerprint = run_fingerprint(tokenizer_fp, resume_state, metas)
    check_shard_tokenizers(metas, fingerprint)
    license_warning(recipe, log)
    source = check_init_from(recipe) if resume is None and recipe.init_from else None
    cfg = model_config(recipe, tokenizer, resume, source)
    source_model = load(source) if source is not None else None  # on every rank; damage named before any write
    check_memory(recipe, env, cfg)
    return Checked(recipe=recipe, out=out, env=env, log=log, tokenizer=tokenizer, fingerprint=fingerprint,
                   ckpt=ckpt, resume=resume, resume_state=resume_state, config=cfg, source=source_model)


# --- the writes and builds ----------------------------------------------------------------------------
def build_model(checked: Checked) -> Transformer:
    """The model on the CPU: the checkpoint's weights, `init_from` converted in memory, or fresh."""
    cfg = checked.config
    if checked.resume is not None:
        model = Transformer(cfg)
        dist.load_full_state_dict(model, read_tensors(checked.resume / "model.safetensors"))
        return model
    recipe = checked.recipe
    if checked.source is not None:
        torch.manual_seed(recipe.seed)
        return as_kind(checked.source, recipe.causal, **recipe.model.overrides)
    torch.manual_seed(recipe.seed)
    return Transformer(cfg)


def restored_state(state: dict, where: Path | str = "state.json") -> TrainState:
    """The TrainState of a checkpoint's state.json (keys of older versions it no longer has are ignored); a
    state.json without one is a CorruptCheckpointError (resuming it would restart at step 0 on trained weights)."""
    trainer = state.get("trainer")
    if not isinstance(trainer, dict):
        raise CorruptCheckpointError(f"{where}: no trainer state (a damaged or foreign state.json): move the "
                                     "checkpoint aside to resume from an earlier one")
    known = {f.name for f in fields(TrainState)}
    return TrainState(**{k: v for k, v in trainer.items() if k in known})


def open_run(checked: Checked, *, step_class: type[TrainStep] = TrainStep) -> Run:
    """The writes and builds of a checked run (the module docstring lists them in order). Every rank calls it."""
    recipe, env, out, log = checked.recipe, checked.env, checked.out, checked.log
    topology = dist.topology(env)
    warning = dist.restart_warning(topology)
    if warning:
        log(warning)
    prepare_run_dir(out, recipe.to_yaml(), env, log, topology=topology)
    check_run_folder_shared(out, env)
    if env.is_main:
        if checked.resume is None and checked.ckpt.corrupt:
            log(f"warning: no intact checkpoint in {checked.ckpt.root}: training starts again from step 0")
        checked.ckpt.set_aside_corrupt()
    verify_run_shards([str(s.path) for phase in recipe.phase_list() for s in shard_sources(recipe, phase)], out,
                      env, log)
    if env.is_main:
        warn_unhashed_mds(recipe, log)
    dist.barrier()
    model = build_model(checked)
    model.to(env.device)
    first = recipe.phase_list()[0]
    if checked.resume is None and (first.rope_theta or first.local_rope_theta):
        model.set_rope_theta(first.rope_theta, first.local_rope_theta)
    static = recipe.static_shapes or recipe.cuda_graphs
    wrapped = dist.parallelize(model, env, mode=recipe.parallel, compile=recipe.compile,
                               activation_checkpointing=recipe.activation_checkpointing,
                               param_dtype=dist.compute_dtype(recipe.precision, env), static_shapes=static,
                               cuda_graphs=recipe.cuda_graphs)
    o = recipe.optim
    # with `compile` on an accelerator the update's foreach ops are compiled too (a few fused kernels instead of
    # full passes per op); on the CPU they stay eager, bitwise today's update
    optimizer = build_optimizer(dist.unwrap(wrapped), lr=o.lr, betas=o.betas, eps=o.eps,
                                weight_decay=o.weight_decay, compile=recipe.compile and env.device.type == "cuda")
    step = step_class(wrapped, optimizer, env, objective=recipe.objective, seed=recipe.seed, lr=o.lr,
                      precision=recipe.precision, static_shapes=static, cuda_graphs=recipe.cuda_graphs,
                      vocab_in_use=len(checked.tokenizer) if checked.tokenizer is not None else None)
    run = Run(recipe=recipe, out=out, env=env, tokenizer=checked.tokenizer, fingerprint=checked.fingerprint,
              ckpt=checked.ckpt, resume=checked.resume, model=wrapped, optimizer=optimizer, step=step)
    if checked.resume is not None and checked.resume_state is not None:
        run.state = restored_state(checked.resume_state, checked.resume / "state.json")
        run.callback_states = callback_states(checked.resume_state)
        restore_training(checked.resume, checked.resume_state, wrapped, optimizer, env, seed=recipe.seed, log=log)
        log(f"resuming from {checked.resume} (step {run.state.step}, {run.state.tokens:,} tokens)")
    elif recipe.init_from:
        log(f"starting from converted weights of {recipe.init_from} with a fresh optimizer")
    return run


def setup(recipe: Recipe, out: str | Path, env: dist.DistEnv, log: Log, *,
          step_class: type[TrainStep] = TrainStep) -> Run:
    """`open_run(check_run(...))`."""
    return open_run(check_run(recipe, out, env, log), step_class=step_class)
