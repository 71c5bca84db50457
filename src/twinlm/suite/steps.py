"""Cached, resumable pipeline steps.

A step's identity is a hash of its own settings and of the identities of the steps it reads from, so a
changed setting reruns exactly that step and everything downstream of it. A step is finished only when
its marker `STEP.json` (written last) carries the current identity. An interrupted step reruns into the
same folder, where long steps (training) resume from their own checkpoints; a step whose identity
changed starts from an empty folder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twinlm.io import write_json

MARKER = "STEP.json"
STARTED = "STARTED.json"  # written when a step starts (its identity): a partial folder of other settings is not reused


@dataclass
class Step:
    name: str  # also the folder name under the suite folder
    run: Callable[[Path], dict[str, Any]]  # does the work in its folder, returns a JSON-able summary
    settings: dict[str, Any] = field(default_factory=dict)  # everything the output depends on
    after: list[str] = field(default_factory=list)  # names of the steps whose outputs it reads
    estimate_s: float = 60.0  # for the ETA only
    title: str = ""


def _identity(step: Step, upstream: dict[str, str]) -> str:
    payload = json.dumps({"settings": step.settings, "after": {n: upstream[n] for n in sorted(step.after)}},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def read_marker(folder: Path) -> dict[str, Any] | None:
    return _read_json(folder / MARKER)


def _fmt_seconds(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Pipeline:
    """Runs steps in order, skipping those already finished with the same identity."""

    def __init__(self, root: str | Path, steps: list[Step], log=None):
        self.root = Path(root)
        self.steps = steps
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        names = [s.name for s in steps]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate step names: {names}")
        seen: set[str] = set()
        for step in steps:
            missing = [n for n in step.after if n not in seen]
            if missing:
                raise ValueError(f"step {step.name!r} reads from {missing}, which do not run before it")
            seen.add(step.name)

    def identities(self) -> dict[str, str]:
        ids: dict[str, str] = {}
        for step in self.steps:
            ids[step.name] = _identity(step, ids)
        return ids

    def status(self) -> dict[str, str]:
        """Per step: "done" (cached), "stale" (done with other settings), "partial" or "todo"."""
        ids, out = self.identities(), {}
        for step in self.steps:
            folder = self.root / step.name
            marker = read_marker(folder)
            started = _read_json(folder / STARTED)
            if marker and marker.get("identity") == ids[step.name]:
                out[step.name] = "done"
            elif marker or (started and started.get("identity") != ids[step.name]):
                out[step.name] = "stale"
            elif folder.exists():
                out[step.name] = "partial"
            else:
                out[step.name] = "todo"
        return out

    def run(self) -> dict[str, dict[str, Any]]:
        self.root.mkdir(parents=True, exist_ok=True)
        ids, status = self.identities(), self.status()
        remaining = sum(s.estimate_s for s in self.steps if status[s.name] != "done")
        summaries: dict[str, dict[str, Any]] = {}
        started = time.monotonic()
        for index, step in enumerate(self.steps, 1):
            folder = self.root / step.name
            label = f"[{index}/{len(self.steps)}] {step.title or step.name}"
            if status[step.name] == "done":
                marker = read_marker(folder)
                assert marker is not None  # "done": the marker was read just above (status)
                summaries[step.name] = marker["summary"]
                self.log(f"{label}: cached")
                continue
            if status[step.name] == "stale":
                shutil.rmtree(folder)  # its settings changed: nothing in it may be reused
            resumed = " (resuming)" if status[step.name] == "partial" else ""
            self.log(f"{label}{resumed}: ~{_fmt_seconds(step.estimate_s)}; suite ETA "
                     f"{_fmt_seconds(remaining)}")
            folder.mkdir(parents=True, exist_ok=True)
            write_json(folder / STARTED, {"identity": ids[step.name]})
            t0 = time.monotonic()
            summary = step.run(folder) or {}
            elapsed = time.monotonic() - t0
            marker = {"identity": ids[step.name], "settings": step.settings, "seconds": round(elapsed, 1),
                      "summary": summary}
            write_json(folder / MARKER, marker)  # last: the step counts as done once this is there
            summaries[step.name] = summary
            remaining = max(0.0, remaining - step.estimate_s)
            so_far = _fmt_seconds(time.monotonic() - started)
            self.log(f"{label}: done in {_fmt_seconds(elapsed)} (suite so far {so_far})")
        return summaries
