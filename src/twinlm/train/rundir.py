"""A run folder's provenance: the resolved recipe (`config.yaml`), the first start's environment (`env.json`)
and one line per start (`starts.jsonl`: versions, hardware, git revision, argv, time).

Each start's line records the run's topology (the number of nodes, every rank's host and node, the launcher's
restart count and a Slurm job's id), so a run that moved, lost a node or was restarted by torchrun says so.

A restart whose recipe differs from the saved one (other than the knobs that may change between restarts,
`RUN_KNOBS`: `max_steps`, `stop_after`, `progress`, `tracker`, `tensorboard`, `prefetch`, the collective timeouts,
`checkpoint.every_minutes`, `checkpoint.grace_s`, and the model card's `license`, `language`, `datasets`) is warned
about; the new recipe is used and saved, the old one kept
as `config.previous.yaml` (an older previous one is kept as `config.previous.N.yaml`, N = 1, 2, …: no
recipe a run was trained with is lost). The trainer calls `prepare_run_dir` only after it has accepted a
resume (a changed model, objective or tokenizer is refused before this file is touched).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

import twinlm
from twinlm.io import dumps_json, write_bytes, write_json
from twinlm.train.dist import DistEnv

# settings that may change between restarts without changing the run (dotted: a key of a section)
RUN_KNOBS = ("max_steps", "stop_after", "progress", "tracker", "tensorboard", "prefetch", "dist_timeout",
             "dist_init_timeout", "checkpoint.every_minutes", "checkpoint.grace_s", "license", "language",
             "datasets")  # the last three: what final/'s model card states


def git_revision(path: Path) -> dict[str, Any]:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                               capture_output=True, text=True, timeout=10)
        if rev.returncode == 0:
            return {"commit": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        pass
    return {"commit": None}


def environment(env: DistEnv) -> dict[str, Any]:
    versions: dict[str, str | None] = {"python": sys.version.split()[0], "torch": torch.__version__,
                                       "numpy": np.__version__, "twinlm": twinlm.__version__}
    for name in ("transformers", "tokenizers", "safetensors"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - optional packages
            versions[name] = None
    hw: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(),
                          "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "device": str(env.device), "world_size": env.world_size}
    if torch.cuda.is_available():
        hw["cuda"] = torch.version.cuda
        hw["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"versions": versions, "hardware": hw, "git": git_revision(Path(__file__).resolve().parent),
            "argv": sys.argv, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def without_run_knobs(text: str) -> dict:
    """A resolved recipe (YAML text) minus the settings that may change between restarts without changing the run."""
    d = yaml.safe_load(text) or {}
    for k in RUN_KNOBS:
        *section, key = k.split(".")
        holder = d
        for part in section:
            holder = holder.get(part) if isinstance(holder, dict) else None
        if isinstance(holder, dict):
            holder.pop(key, None)
    return d


def prepare_run_dir(out: Path, recipe_yaml: str, env: DistEnv, log, topology: dict[str, Any] | None = None) -> None:
    """Create or update the run folder's provenance files (rank 0 only; other ranks return at once). `topology`
    (train/dist.py `topology`: nodes, every rank's host, restart count, Slurm job) goes into env.json and this
    start's line of starts.jsonl."""
    if not env.is_main:
        return
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "config.yaml"
    if cfg_path.exists() and without_run_knobs(cfg_path.read_text()) != without_run_knobs(recipe_yaml):
        log(f"warning: {cfg_path} differs from this recipe; the new one is used and saved as "
            f"config.yaml (the old one is kept as config.previous.yaml)")
        prev = out / "config.previous.yaml"
        if prev.exists():
            n = 1
            while (out / f"config.previous.{n}.yaml").exists():
                n += 1
            prev.replace(out / f"config.previous.{n}.yaml")
        cfg_path.replace(prev)
    write_bytes(cfg_path, recipe_yaml)
    info = environment(env)
    if topology is not None:
        info["topology"] = topology
    if not (out / "env.json").exists():
        write_json(out / "env.json", info)
    with open(out / "starts.jsonl", "a") as f:
        f.write(dumps_json(info, indent=None))
