"""Where fetched data lives: `$TWINLM_HOME` (default `~/.cache/twinlm`), laid out as the package docstring
of `twinlm.data.fetch` shows, and its manifest.json.

Asking for something not fetched yet raises MissingArtifactError naming the `twinlm data fetch` command
that fetches it; asking for a name the catalogue does not know raises UnknownName.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from twinlm.data.fetch.catalog import SOURCES
from twinlm.errors import ConfigError, MissingArtifactError, UnknownName


def home() -> Path:
    """`$TWINLM_HOME`, default `~/.cache/twinlm`."""
    return Path(os.environ.get("TWINLM_HOME") or Path.home() / ".cache" / "twinlm").expanduser()


def source_dir(name: str, root: str | Path | None = None) -> Path:
    """Folder of an unpacked source (`$TWINLM_HOME/sources/<name>/`); a clear error if not fetched."""
    if name not in SOURCES:
        raise UnknownName(f"unknown source {name!r}; known: {', '.join(SOURCES)}")
    path = Path(root or home()) / "sources" / name
    if not path.is_dir():
        raise MissingArtifactError(f"source {name!r} is not fetched ({path} is missing): "
                                   f"run `twinlm data fetch --only {name}`")
    return path


def pretrain_files(root: str | Path | None = None, names: Iterable[str] | None = None) -> list[Path]:
    """The fetched pre-training JSONL files (all, or those of `names`); a clear error if none."""
    root = Path(root or home())
    wanted = list(names) if names else [s.name for s in SOURCES.values() if s.group == "pretrain"]
    files = []
    for name in wanted:
        if name in SOURCES and SOURCES[name].group != "pretrain":
            raise ConfigError(f"{name!r} is evaluation data and cannot be used as pre-training text")
        path = root / "pretrain" / f"{name}.jsonl"
        if path.exists():
            files.append(path)
        elif names:
            raise MissingArtifactError(f"pre-training source {name!r} is not fetched: "
                                       f"run `twinlm data fetch --only {name}`")
    if not files:
        raise MissingArtifactError(f"no pre-training text under {root / 'pretrain'}: run `twinlm data fetch`")
    return files


def read_manifest(root: str | Path | None = None) -> dict:
    path = Path(root or home()) / "manifest.json"
    if not path.exists():
        return {"version": 1, "sources": {}}
    return json.loads(path.read_text())
