"""Cached, resumable pipeline steps.

A step's identity is a hash of its own settings and of the identities of the steps it reads from, so a
changed setting reruns exactly that step and everything downstream of it. A step is finished only when
its marker `STEP.json` (written last) carries the current identity. An interrupted step reruns into the
same folder, where long steps (training) resume from their own checkpoints; a step whose identity
changed starts from an empty folder.

A step's identity does not cover the code that computes it: a cached step stays cached when the code changes.
The pipeline's `stamp` (twinlm.suite.provenance: the commit and versions) is written into each marker instead,
so what made every finished step can be read back.

Across ranks (a `Ranks` of torchrun's job, twinlm.eval.ranks): the status is rank 0's; a step with `compute`
(work that writes nothing: the evaluations) may run on any rank, and each run of consecutive such steps still
to do is dealt out among the ranks by their estimates (`Ranks.assign`) and gathered to rank 0, which writes
every step's folder (`write`) and marker; every other step runs on rank 0 alone while the other ranks wait for
its marker (reading the suite folder: the ranks share a file system). Only rank 0 writes anything; every rank
returns rank 0's summaries.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twinlm.eval.ranks import Ranks
from twinlm.io import write_json

MARKER = "STEP.json"
WAIT_S = 5.0  # how often a rank waiting for rank 0's step looks for its marker
STARTED = "STARTED.json"  # written when a step starts (its identity): a partial folder of other settings is not reused


@dataclass
class Step:
    name: str  # also the folder name under the suite folder
    run: Callable[[Path], dict[str, Any]]  # does the work in its folder, returns a JSON-able summary
    settings: dict[str, Any] = field(default_factory=dict)  # everything the output depends on
    after: list[str] = field(default_factory=list)  # names of the steps whose outputs it reads
    estimate_s: float = 60.0  # for the ETA only
    title: str = ""
    # a step any rank may compute: `compute()` does the work and writes nothing, `write(folder, value)` writes its
    # value into the folder and returns the summary (then `run(folder)` is `write(folder, compute())`)
    compute: Callable[[], Any] | None = None
    write: Callable[[Path, Any], dict[str, Any]] | None = None

    @classmethod
    def shared(cls, name: str, compute: Callable[[], Any], write: Callable[[Path, Any], dict[str, Any]],
               **fields: Any) -> Step:
        """A step whose work (`compute`) may run on any rank and whose folder (`write`) is written by rank 0."""
        return cls(name, lambda folder: write(folder, compute()), compute=compute, write=write, **fields)


def _identity(step: Step, upstream: dict[str, str]) -> str:
    payload = json.dumps({"settings": step.settings, "after": {n: upstream[n] for n in sorted(step.after)}},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _write(step: Step, value: Any, folder: Path) -> dict[str, Any]:
    assert step.write is not None  # a step with `compute` has `write` (Step.shared)
    return step.write(folder, value)


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
    """Runs steps in order, skipping those already finished with the same identity (across `ranks`: the module
    docstring)."""

    def __init__(self, root: str | Path, steps: list[Step], log=None, ranks: Ranks | None = None,
                 stamp: Callable[[], dict[str, Any]] | None = None):
        self.root = Path(root)
        self.stamp = stamp  # what made a step (its marker's "provenance"): never part of its identity
        self.steps = steps
        self.ranks = ranks or Ranks()
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
        r = self.ranks
        if r.writes:
            self.root.mkdir(parents=True, exist_ok=True)
        ids = self.identities()
        status = r.gather(self.status())[0]  # rank 0's view decides, the same on every rank
        remaining = sum(s.estimate_s for s in self.steps if status[s.name] != "done")
        summaries: dict[str, dict[str, Any]] = {}
        started = time.monotonic()
        say = self.log if r.writes else (lambda line: None)
        index = 0
        while index < len(self.steps):
            step = self.steps[index]
            if r.world > 1 and step.compute is not None and status[step.name] != "done":
                group: list[Step] = []  # the consecutive steps still to do that any rank may compute
                while (index + len(group) < len(self.steps) and self.steps[index + len(group)].compute is not None
                       and status[self.steps[index + len(group)].name] != "done"):
                    group.append(self.steps[index + len(group)])
                values = self._share(group, index, say)
                for member, value in zip(group, values):
                    if r.writes:
                        summaries[member.name] = self._finish(member, ids[member.name], status[member.name],
                                                              functools.partial(_write, member, value))
                    remaining = max(0.0, remaining - member.estimate_s)
                index += len(group)
                continue
            label = f"[{index + 1}/{len(self.steps)}] {step.title or step.name}"
            folder = self.root / step.name
            if status[step.name] == "done":
                marker = read_marker(folder)
                assert marker is not None  # "done": the marker was read just above (status)
                summaries[step.name] = marker["summary"]
                say(f"{label}: cached")
            elif r.writes:
                resumed = " (resuming)" if status[step.name] == "partial" else ""
                say(f"{label}{resumed}: ~{_fmt_seconds(step.estimate_s)}; suite ETA {_fmt_seconds(remaining)}")
                t0 = time.monotonic()
                summaries[step.name] = self._finish(step, ids[step.name], status[step.name], step.run)
                remaining = max(0.0, remaining - step.estimate_s)
                say(f"{label}: done in {_fmt_seconds(time.monotonic() - t0)} (suite so far "
                    f"{_fmt_seconds(time.monotonic() - started)})")
            else:  # rank 0 runs it: wait for its marker (a failure there ends the job: torchrun stops every rank)
                while (read_marker(folder) or {}).get("identity") != ids[step.name]:
                    time.sleep(WAIT_S)
            index += 1
        return r.gather(summaries)[0]

    def _finish(self, step: Step, identity: str, state: str, body: Callable[[Path], dict[str, Any]]
                ) -> dict[str, Any]:
        """Run `body` in the step's folder (emptied first when stale) and write its marker; the summary."""
        folder = self.root / step.name
        if state == "stale":
            shutil.rmtree(folder)  # its settings changed: nothing in it may be reused
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / STARTED, {"identity": identity})
        t0 = time.monotonic()
        summary = body(folder) or {}
        marker = {"identity": identity, "settings": step.settings, "seconds": round(time.monotonic() - t0, 1),
                  "summary": summary}
        if self.stamp is not None:
            marker["provenance"] = self.stamp()
        write_json(folder / MARKER, marker)  # last: the step counts as done once this is there
        return summary

    def _share(self, group: list[Step], first: int, say: Callable[[str], None]) -> list[Any]:
        """The values of `group`'s computations, each run by one rank (`Ranks.assign` by estimate), on every rank."""
        r = self.ranks
        done = {}
        for k in r.assign([s.estimate_s for s in group]):
            step = group[k]
            self.log(f"[{first + k + 1}/{len(self.steps)}] {step.title or step.name}: on rank {r.rank} "
                     f"(~{_fmt_seconds(step.estimate_s)})")
            assert step.compute is not None  # the group holds steps with `compute` only
            done[k] = step.compute()
        values = r.collect(len(group), done)
        say(f"[{first + 1}-{first + len(group)}/{len(self.steps)}] computed on {r.world} ranks")
        return values
