"""Training checkpoints: atomic folders, a sha256 manifest, a completion marker written last, a keep policy.

Layout of one checkpoint `RUN/checkpoints/step-XXXXXXXX/`:
  model.safetensors       the weights (full, unsharded; tied tensors stored once)
  model_config.json       the ModelConfig (so `twinlm.load` can rebuild the network)
  optimizer.safetensors   optimizer state per parameter name (`<param>::exp_avg`, `::exp_avg_sq`, `::step`)
  state.json              trainer state: phase, steps, tokens, data position, RNG, tokenizer fingerprint,
                          the resolved recipe
  MANIFEST.sha256         "<sha256>  <file>" for every file above
  COMPLETE                written last; a folder without it is ignored (and removed by the next save)

Saving writes into `.tmp-step-XXXXXXXX/`, renames it, then writes COMPLETE. Loading verifies the manifest: a
flipped byte or a truncated file is detected, reported, and resuming falls back to the newest intact
checkpoint. Only one process (rank 0) writes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from twinlm.errors import CorruptCheckpointError
from twinlm.io import sha256_file

MARKER = "COMPLETE"
MANIFEST = "MANIFEST.sha256"
_NAME = re.compile(r"^step-(\d{8,})$")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def verify(folder: str | Path) -> None:
    """Raise CorruptCheckpointError unless `folder` is complete and every file matches its manifest entry."""
    folder = Path(folder)
    if not (folder / MARKER).is_file():
        raise CorruptCheckpointError(f"{folder}: incomplete (no {MARKER} marker): the save was interrupted")
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise CorruptCheckpointError(f"{folder}: no {MANIFEST}")
    for line in manifest.read_text().splitlines():
        if not line.strip():
            continue
        digest, name = line.split(maxsplit=1)
        path = folder / name
        if not path.is_file():
            raise CorruptCheckpointError(f"{folder}: {name} is listed in the manifest but missing")
        if sha256_file(path) != digest:
            raise CorruptCheckpointError(f"{folder}: {name} does not match its sha256 in {MANIFEST} "
                                         "(the file was altered or truncated)")


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 3, keep_every: int = 0, log=print):
        self.root = Path(root)
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
        """The newest checkpoint that verifies; corrupt ones are reported and skipped."""
        for p in reversed(self.complete()):
            try:
                verify(p)
                return p
            except CorruptCheckpointError as e:
                self.log(f"warning: skipping checkpoint: {e}")
        return None

    def save(self, step: int, write_files, state: dict[str, Any]) -> Path:
        """Write a checkpoint. `write_files(folder)` writes the tensor files; `state` goes to state.json."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.path_for(step)
        tmp = self.root / f".tmp-{final.name}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        write_files(tmp)
        write_json(tmp / "state.json", state)
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        lines = []
        for name in files:
            _fsync_file(tmp / name)
            lines.append(f"{sha256_file(tmp / name)}  {name}")
        (tmp / MANIFEST).write_text("\n".join(lines) + "\n")
        _fsync_file(tmp / MANIFEST)
        if final.exists():  # an unmarked leftover of an interrupted save, or a re-save of the same step
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(self.root)
        (final / MARKER).write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) + "\n")
        _fsync_file(final / MARKER)
        _fsync_dir(final)
        self.prune()
        return final

    def prune(self) -> list[Path]:
        """Keep the last `keep_last`, every `keep_every`-th periodic one, and those marked `keep` (phase ends)."""
        done = self.complete()
        recent = set(done[-self.keep_last:])
        removed = []
        for p in done:
            if p in recent:
                continue
            try:
                st = json.loads((p / "state.json").read_text())
            except (OSError, json.JSONDecodeError):
                st = {}
            ordinal = st.get("checkpoint_ordinal")
            if st.get("keep") or (self.keep_every and ordinal and ordinal % self.keep_every == 0):
                continue
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        # leftovers of interrupted saves
        for p in self.root.iterdir():
            if p.name.startswith(".tmp-") or (_NAME.match(p.name) and not (p / MARKER).exists()):
                shutil.rmtree(p, ignore_errors=True)
        return removed
