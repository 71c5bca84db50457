"""Training checkpoints: atomic folders, a sha256 manifest, a completion marker written last, a keep policy,
and the training state they hold (weights, optimizer state, every rank's RNG, the trainer's record).

Layout of one checkpoint `RUN/checkpoints/step-XXXXXXXX/`:
  model.safetensors       the weights (full, unsharded; tied tensors stored once)
  model_config.json       the ModelConfig (so `twinlm.load` can rebuild the network)
  optimizer.safetensors   optimizer state per parameter name (`<param>::exp_avg`, `::exp_avg_sq`, `::step`)
  state.json              "trainer" (train/state.py TrainState: phase, steps, tokens, data position),
                          "callbacks" (each stateful callback's state_dict by its state_key, e.g.
                          {"periodic_checkpoint": {"ordinal": 4, "step": 40}, "evaluate": {"ordinal": 2}}),
                          "rng" (every rank's), "world_size", "tokenizer_fingerprint", "keep", "phase", the
                          resolved "recipe"
  MANIFEST.sha256         "<sha256>  <file>" for every file above (twinlm.io.write_manifest's format)
  COMPLETE                written last; a folder without it is ignored (and removed by the next save)

Saving fills a temporary folder beside it (`.step-XXXXXXXX.tmp-*`, see twinlm.io.atomic_dir), renames it,
then writes COMPLETE. Loading verifies the manifest, which must list every file of the folder and at least
the four above: a flipped byte, a truncated, missing or unlisted file, or an empty or shortened manifest is
detected, reported, and resuming falls back to the newest intact checkpoint. Checkpoints that fail verification are
moved aside to `RUN/checkpoints/corrupt/step-XXXXXXXX[.N]` (`set_aside_corrupt`, called by the run's setup once
every check has passed, train/setup.py `open_run`): they are never counted by the keep policy, so a fresh checkpoint
is never pruned in favour of a broken one, and they stay on disk for a person to inspect or delete.
Checkpoints of older versions have no "callbacks": their "trainer" holds the two built-in callbacks'
counters (`checkpoint_ordinal`, `eval_ordinal`; a top-level `checkpoint_ordinal` for the keep policy), which
`callback_states` and `prune` read instead.
The keep policy (`prune`) keeps the newest `keep_last` checkpoints of any kind (periodic by tokens or by time,
on a stop), those marked `keep` (phase ends), and every `keep_every`-th periodic-by-tokens one: only a
checkpoint written at the step that passed its interval counts (`periodic_ordinal`), not one written later
(by time, on a stop) that merely carries the count.
Tensors are always full (gathered from FSDP shards), so a checkpoint resumes on any number of ranks.
`save_training` is collective (every rank gathers; rank 0 writes); `restore_training` runs on every rank.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file, save_file

from twinlm.errors import CorruptCheckpointError, OutOfSpace
from twinlm.io import (
    MANIFEST,
    atomic_dir,
    fsync_file,
    is_disk_full,
    manifest_mismatch,
    read_manifest,
    write_bytes,
    write_json,
    write_manifest,
)
from twinlm.model import Transformer
from twinlm.train import dist

MARKER = "COMPLETE"
# the files of a training checkpoint (save_training); a bare CheckpointManager requires only state.json
TRAINING_FILES = ("model.safetensors", "model_config.json", "optimizer.safetensors", "state.json")
CORRUPT_DIR = "corrupt"
_NAME = re.compile(r"^step-(\d{8,})$")


def _step_of(folder: Path) -> int:
    """The step of a checkpoint folder's name (`step-XXXXXXXX`)."""
    m = _NAME.match(folder.name)
    if m is None:
        raise ValueError(f"{folder} is not named as a checkpoint (step-XXXXXXXX)")
    return int(m.group(1))


def verify(folder: str | Path, required: tuple[str, ...] = ("state.json",)) -> None:
    """Raise CorruptCheckpointError unless `folder` is complete, its manifest lists every file in it and each
    of `required`, and every file matches its manifest entry."""
    folder = Path(folder)
    if not (folder / MARKER).is_file():
        raise CorruptCheckpointError(f"{folder}: incomplete (no {MARKER} marker): the save was interrupted")
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise CorruptCheckpointError(f"{folder}: no {MANIFEST}")
    listed = read_manifest(manifest, lambda what: CorruptCheckpointError(
        f"{folder}: {MANIFEST} {what} (the manifest is damaged)"))
    present = {p.name for p in folder.iterdir() if p.is_file()} - {MANIFEST, MARKER}
    missing = [name for name in required if name not in listed]
    unlisted = sorted(present - set(listed) - set(missing))
    if missing or unlisted:
        raise CorruptCheckpointError(f"{folder}: {MANIFEST} does not list {', '.join(missing + unlisted)} (the "
                                     "manifest is incomplete or damaged)")
    bad = manifest_mismatch(folder, listed)
    if bad is not None and bad[1] == "missing":
        raise CorruptCheckpointError(f"{folder}: {bad[0]} is listed in the manifest but missing")
    if bad is not None:
        raise CorruptCheckpointError(f"{folder}: {bad[0]} does not match its sha256 in {MANIFEST} "
                                     "(the file was altered or truncated)")


def _is_leftover(p: Path) -> bool:
    """A temporary or swapped-out folder of a save that was killed (`.tmp-step-*` is the name older versions used)."""
    return p.name.startswith((".tmp-", ".step-"))


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 3, keep_every: int = 0, log=print,
                 required: tuple[str, ...] = ("state.json",)):
        self.root = Path(root)
        self.required = tuple(required)  # files the manifest must list (TRAINING_FILES for the trainer)
        self.corrupt: list[Path] = []
        self.keep_last = max(1, int(keep_last))
        self.keep_every = int(keep_every)
        self.log = log

    def path_for(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"

    def complete(self) -> list[Path]:
        """Marked checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _NAME.match(p.name)
            if m and p.is_dir() and (p / MARKER).is_file():
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        """The newest checkpoint that verifies. Corrupt ones newer than it are reported and remembered in
        `self.corrupt` (nothing is moved here: the caller decides whether to resume; see `set_aside_corrupt`)."""
        self.corrupt = []
        for p in reversed(self.complete()):
            try:
                verify(p, self.required)
                return p
            except CorruptCheckpointError as e:
                self.log(f"warning: skipping checkpoint: {e}")
                self.corrupt.append(p)
        return None

    def set_aside_corrupt(self) -> list[Path]:
        """Move the checkpoints `latest` found corrupt to `checkpoints/corrupt/` (kept for inspection, never
        counted by the keep policy, never resumed from); return where they went."""
        moved = []
        for p in self.corrupt:
            if not p.is_dir():
                continue
            dest_dir = self.root / CORRUPT_DIR
            dest_dir.mkdir(exist_ok=True)
            dest, n = dest_dir / p.name, 1
            while dest.exists():
                dest, n = dest_dir / f"{p.name}.{n}", n + 1
            os.replace(p, dest)
            moved.append(dest)
            self.log(f"warning: moved the corrupt checkpoint {p.name} to {dest} (delete it when it is no longer "
                     "needed)")
        if moved:
            fsync_file(self.root)
        self.corrupt = []
        return moved

    def save(self, step: int, write_files: Callable[[Path], None], state: dict[str, Any]) -> Path:
        """Write a checkpoint. `write_files(folder)` writes the tensor files; `state` goes to state.json."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.path_for(step)
        try:
            # replace=True: an unmarked leftover of an interrupted save, or a re-save of the same step
            with atomic_dir(final, replace=True) as tmp:
                write_files(tmp)
                write_json(tmp / "state.json", state)
                names = [p.name for p in tmp.iterdir() if p.is_file()]
                for name in names:
                    fsync_file(tmp / name)
                write_manifest(tmp, names)
            fsync_file(self.root)
            write_bytes(final / MARKER, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) + "\n")
            fsync_file(final)
        except Exception as e:
            if is_disk_full(e):  # the temporary folder is gone (atomic_dir); an unmarked folder is ignored
                done = self.complete()
                raise OutOfSpace(f"the disk holding {self.root} is full: checkpoint step {step} was not written "
                                 f"(no partial folder is kept; the newest checkpoint is "
                                 f"{done[-1].name if done else 'none'}): free space and run the same command "
                                 "again to resume") from e
            raise
        self.prune(upto=step)
        return final

    def prune(self, upto: int | None = None) -> list[Path]:
        """Keep the last `keep_last`, every `keep_every`-th periodic one, and those marked `keep` (phase ends).

        With `upto` (the step just saved), only checkpoints up to that step count as the last `keep_last`;
        newer ones (left by a run that went further before falling back past them) are neither counted nor
        removed here, so a fresh checkpoint is never deleted because of them."""
        done = self.complete()
        if upto is not None:
            done = [p for p in done if _step_of(p) <= upto]
        recent = set(done[-self.keep_last:])
        removed = []
        for p in done:
            if p in recent:
                continue
            try:
                st = json.loads((p / "state.json").read_text())
            except (OSError, json.JSONDecodeError):
                st = {}
            ordinal = periodic_ordinal(st)
            if st.get("keep") or (self.keep_every and ordinal and ordinal % self.keep_every == 0):
                continue
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        # leftovers of interrupted saves
        for p in self.root.iterdir():
            if _is_leftover(p) or (_NAME.match(p.name) and not (p / MARKER).exists()):
                shutil.rmtree(p, ignore_errors=True)
        return removed


# --- training state ---------------------------------------------------------------------------------
def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file of a checkpoint (`model.safetensors`, `optimizer.safetensors`) on the CPU."""
    return load_file(str(path))


def _dedupe(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage: keep the first name of each tied tensor."""
    seen, out = set(), {}
    for k, v in tensors.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.numel() else (k,)
        if key in seen:
            continue
        seen.add(key)
        out[k] = v.contiguous()
    return out


def optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      keep: bool = True) -> dict[str, torch.Tensor]:
    """The optimizer state as full tensors named `<parameter>::<key>` (collective under FSDP)."""
    out = {}
    for name, p in model.named_parameters():
        st = optimizer.state.get(p)
        if not st:
            continue
        for key, value in st.items():
            if torch.is_tensor(value):
                full = dist.full_tensor(value, keep)  # collective for FSDP shards: every rank gathers
                if full is not None:  # on the keeping rank
                    out[f"{name}::{key}"] = full.contiguous()
    return out


def load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    """Put `optimizer_tensors` output back, sharded like each parameter (FSDP) or on its device."""
    by_param: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        name, key = k.rsplit("::", 1)
        by_param.setdefault(name, {})[key] = v
    params = dict(model.named_parameters())
    unknown = sorted(set(by_param) - set(params))
    if unknown:
        raise CorruptCheckpointError(f"the optimizer state names parameters the model does not have: {unknown[:5]}; "
                                     "the checkpoint's files do not belong together: move that checkpoint folder "
                                     "away to resume from an earlier one")
    for name, entries in by_param.items():
        p = params[name]
        # 0-dim entries (`step`) are restored as saved, on the CPU
        optimizer.state[p] = {key: full.clone() if full.dim() == 0 else dist.place_like(full, p)
                              for key, full in entries.items()}


def capture_rng(env: dist.DistEnv) -> dict[str, torch.Tensor]:
    """This rank's RNG states now (copies), for a checkpoint written later of the state they go with."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and env.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(env.device)
    return rng


def _rng_state(env: dist.DistEnv, captured: dict[str, torch.Tensor] | None = None) -> dict[str, list]:
    return {k: v.tolist() for k, v in (captured or capture_rng(env)).items()}


def save_training(manager: CheckpointManager, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  env: dist.DistEnv, *, step: int, trainer_state: dict, info: dict,
                  rng: dict[str, torch.Tensor] | None = None) -> Path | None:
    """Checkpoint `step`. Collective: every rank calls it (weights and optimizer state are gathered tensor by
    tensor, and every rank's RNG state recorded: `rng` from `capture_rng` when the state to save is not the
    current one, e.g. the next step's passes already drew dropout masks); rank 0 alone keeps host copies and
    writes. state.json holds `trainer_state` under "trainer", the RNG states, the world size and `info`.
    Returns the folder on rank 0, None elsewhere."""
    weights = dist.full_state_dict(model, keep=env.is_main)  # host copies on the writer only
    bare = cast(Transformer, dist.unwrap(model))
    optim = optimizer_tensors(bare, optimizer, keep=env.is_main)
    rngs = dist.all_gather_object(_rng_state(env, rng))
    if not env.is_main:
        return None
    cfg = bare.config

    def write(folder: Path) -> None:
        save_file(_dedupe(weights), str(folder / "model.safetensors"), metadata={"format": "pt"})
        cfg.save(folder / "model_config.json")
        save_file(optim, str(folder / "optimizer.safetensors"))

    state = {"trainer": trainer_state, "rng": rngs, "world_size": env.world_size, **info}
    return manager.save(step, write, state)


def read_state(folder: str | Path) -> dict[str, Any]:
    """A checkpoint's state.json."""
    return json.loads((Path(folder) / "state.json").read_text())


PERIODIC_KEY = "periodic_checkpoint"  # the state_key of train/callbacks.py's PeriodicCheckpoint
EVALUATE_KEY = "evaluate"  # and of its Evaluate


def callback_states(state: dict[str, Any]) -> dict[str, dict]:
    """The callbacks' states in a checkpoint's state.json; for a checkpoint of an older version, the two
    built-in counters it kept in "trainer"."""
    if "callbacks" in state:
        return dict(state["callbacks"] or {})
    old = state.get("trainer") or {}
    return {PERIODIC_KEY: {"ordinal": int(old.get("checkpoint_ordinal", 0))},
            EVALUATE_KEY: {"ordinal": int(old.get("eval_ordinal", 0))}}


def periodic_ordinal(state: dict[str, Any]) -> int | None:
    """How many periodic-checkpoint intervals had passed when the checkpoint was written, if it is the periodic
    one of its interval (the keep policy's `keep_every` counts them), or None: no periodic checkpoints, or one
    of another step (by time, on a stop) that carries the count but not the interval's place."""
    if "checkpoint_ordinal" in state:  # older versions
        return state["checkpoint_ordinal"]
    periodic = (state.get("callbacks") or {}).get(PERIODIC_KEY) or {}
    if "step" in periodic and periodic["step"] != (state.get("trainer") or {}).get("step"):
        return None
    return periodic.get("ordinal")


def restore_training(folder: str | Path, state: dict[str, Any], model: torch.nn.Module,
                     optimizer: torch.optim.Optimizer, env: dist.DistEnv, *, seed: int, log) -> None:
    """Load the optimizer state and this rank's RNG state of checkpoint `folder` (its `state` from read_state).

    The weights are loaded when the model is built (`read_tensors(folder / "model.safetensors")`). On another
    number of ranks than the checkpoint's, RNG streams are re-seeded from (seed, step, rank): dropout differs,
    the data order and masking do not (they are functions of the step).
    """
    load_optimizer(dist.unwrap(model), optimizer, read_tensors(Path(folder) / "optimizer.safetensors"))
    rngs = state.get("rng") or []
    if len(rngs) == env.world_size:
        rng = rngs[env.rank]
        torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
        if "cuda" in rng and env.device.type == "cuda":
            torch.cuda.set_rng_state(torch.tensor(rng["cuda"], dtype=torch.uint8), env.device)
    else:
        log(f"note: resuming on {env.world_size} ranks from a checkpoint written by {len(rngs)}; "
            "dropout RNG streams are re-seeded (data order and masking are unchanged)")
        torch.manual_seed(seed * 1000 + state["trainer"]["step"] * 17 + env.rank)
