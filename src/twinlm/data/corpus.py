"""A train / held-out corpus of JSONL documents from fetched pre-training sources (the suite's corpus step).

`build_corpus` takes up to a budget of text, an equal share from each source (a source smaller than its
share passes the rest on to the others), joins consecutive short documents until they reach `min_doc_bytes`
(a corpus of single sentences would otherwise make every training sequence a few dozen tokens long), and
writes each document to `train.jsonl` or `heldout.jsonl` (`{"text": …}` per line) by the held-out rule
(twinlm.data.split.heldout). Both files are written atomically.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from twinlm.data.fetch import pretrain_files
from twinlm.data.split import heldout
from twinlm.io import atomic_path


def _grouped(lines: Iterable[str], min_bytes: int) -> Iterator[tuple[str, int]]:
    """(document, UTF-8 bytes of its parts) from JSONL lines, consecutive short documents joined by "\\n"
    until they reach `min_bytes` (the last one of the file may be shorter)."""
    buffer: list[str] = []
    size = 0
    for line in lines:
        text = json.loads(line)["text"]
        buffer.append(text)
        size += len(text.encode("utf-8"))
        if size >= min_bytes:
            yield "\n".join(buffer), size
            buffer, size = [], 0
    if buffer:
        yield "\n".join(buffer), size


def build_corpus(folder: Path, sources: list[str], max_mb: float, heldout_fraction: float, seed: int = 0,
                 min_doc_bytes: int = 4000) -> dict[str, Any]:
    """Write `folder/train.jsonl` and `folder/heldout.jsonl` from up to `max_mb` MB of the fetched `sources`
    (see the module docstring); returns the counts: documents and bytes per side, bytes taken per source."""
    files = pretrain_files(names=sources)
    budget = int(max_mb * 1e6)
    sizes = {f: f.stat().st_size for f in files}
    shares: dict[Path, int] = {}
    remaining, left = budget, sorted(files, key=lambda f: sizes[f])
    while left:  # smallest first: a source smaller than its share gives the rest to the others
        f = left.pop(0)
        shares[f] = min(sizes[f], remaining // (len(left) + 1))
        remaining -= shares[f]
    counts: dict[str, Any] = {"train_docs": 0, "heldout_docs": 0, "train_bytes": 0, "heldout_bytes": 0,
                              "sources": {}}
    with atomic_path(folder / "train.jsonl") as train_path, atomic_path(folder / "heldout.jsonl") as held_path, \
            open(train_path, "w") as train, open(held_path, "w") as held:
        for f in files:
            taken = 0
            with open(f, encoding="utf-8") as src:
                for text, size in _grouped(src, min_doc_bytes):
                    if taken >= shares[f]:
                        break
                    taken += size
                    split = "heldout" if heldout(text, seed, heldout_fraction) else "train"
                    (held if split == "heldout" else train).write(json.dumps({"text": text}) + "\n")
                    counts[f"{split}_docs"] += 1
                    counts[f"{split}_bytes"] += size
            counts["sources"][f.stem] = taken
    return counts
