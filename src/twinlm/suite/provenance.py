"""What produced a suite step: the twinlm commit and the versions and machine that computed it.

`provenance()` is recorded in every step's marker (STEP.json) as the step finishes and gathered into the
report (`report.json`'s "provenance"), so a report says which code made each of its figures. It is never part
of a step's identity: a cached step stays cached when the code changes, and its marker keeps the commit that
made it (a suite folder run across several commits says so: `gather`).

The suite is reproducible bit for bit only for the same code, library versions, CPU kind and thread count:
floating-point reductions in torch's and numpy's kernels depend on the instruction set and on how the work is
split over threads, so these are recorded too.
"""

from __future__ import annotations

import functools
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

CHECKOUT = Path(__file__).resolve().parents[3]  # the repository root when twinlm runs from a checkout
# the libraries whose kernels or algorithms the suite's figures depend on
LIBRARIES = ("torch", "transformers", "tokenizers", "numpy", "scikit-learn", "scipy", "lm-eval")


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(CHECKOUT), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.cache
def code_version() -> dict[str, Any]:
    """{"commit": the checkout's HEAD or None (not a git checkout), "dirty": tracked files differ from it}."""
    if not (CHECKOUT / ".git").exists():
        return {"commit": None, "dirty": None}
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@functools.cache
def _cpu() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance() -> dict[str, Any]:
    """The code, libraries and machine of this process (module docstring)."""
    return {**code_version(), "twinlm": _version("twinlm"), "python": platform.python_version(),
            **{lib: _version(lib) for lib in LIBRARIES}, "cpu": _cpu(), "machine": platform.machine(),
            "torch_threads": torch.get_num_threads()}


def gather(markers: dict[str, dict | None]) -> dict[str, Any]:
    """The provenance of a suite folder from its steps' markers ({step: marker or None}): `runs`, one entry per
    distinct provenance with the steps it made (steps finished before provenance was recorded: `unknown`), and
    `single`: True when every step was made by one clean commit with one set of versions."""
    runs: list[dict[str, Any]] = []
    unknown = []
    for step, marker in sorted(markers.items()):
        prov = (marker or {}).get("provenance")
        if prov is None:
            unknown.append(step)
            continue
        for run in runs:
            if run["provenance"] == prov:
                run["steps"].append(step)
                break
        else:
            runs.append({"provenance": prov, "steps": [step]})
    single = (len(runs) == 1 and not unknown and runs[0]["provenance"].get("commit") is not None
              and runs[0]["provenance"].get("dirty") is False)
    return {"runs": runs, "unknown": unknown, "single": single}
