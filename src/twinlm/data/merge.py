"""`twinlm data merge PARTS… --out DIR`: join the shard folders of `twinlm data prepare --part I/N` into one.

The parts must agree (`check_parts`): each is a complete, intact shard folder (`verify_shards`, sha256 of every
file) prepared with `--part`, with the same tokenizer fingerprint and vocabulary, the same chunking (chunk size,
min_chunk, backfill), text field, split (train or held-out), held-out settings (fraction, seed, rule), part rule
and count N, and the same number of documents read (the same inputs); every index 0..N−1 appears exactly once.
A mixed set is refused with a ConfigError naming the first difference and the part that differs. Input paths are
not compared (they may differ between machines); the count of documents read is.

The output is the folder one whole `prepare` of the same inputs writes: chunks in the order of the documents'
ordinals among all documents read (each part's docs.npy holds them), a document's chunks in their order. So
tokens.bin, index.npy, docs.npy and bytes.npy are byte-identical to the whole's; meta.json differs only in its
`stats` (summed over the parts, `merged_from` listing them) and `created`. It is written by `ShardWriter`
(checksums, meta.json last, a temporary folder renamed into place through `twinlm.io.atomic_dir`), so every
reader and `twinlm data verify` accept it. Held-out parts (`OUT-heldout` of each part) are merged the same way,
into a folder of their own. Memory is bounded: the parts are interleaved a window of at most `block` chunks of
each part at a time.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from twinlm.data.prepare import _check_target
from twinlm.data.shards import ShardWriter, read_tokens, verify_shards
from twinlm.errors import ConfigError, DataError

# meta.json fields every part must share, as (name shown in the refusal, how to read it)
_AGREE: tuple[tuple[str, Any], ...] = (
    ("tokenizer fingerprint", lambda m: (m.get("tokenizer") or {}).get("fingerprint")),
    ("vocabulary size", lambda m: (m.get("tokenizer") or {}).get("vocab_size")),
    ("chunking", lambda m: m.get("chunking")),
    ("text field", lambda m: m.get("text_field")),
    ("split", lambda m: m.get("split")),
    ("held-out settings", lambda m: {k: (m.get("holdout") or {}).get(k) for k in ("docs", "seed", "rule")}),
    ("part rule", lambda m: m["part"].get("rule")),
    ("part count N", lambda m: m["part"].get("count")),
    ("documents read (the inputs)", lambda m: (m.get("stats") or {}).get("read_documents")),
    ("dtype", lambda m: m.get("dtype")),
)


def check_parts(parts: list[Path]) -> list[tuple[Path, dict[str, Any]]]:
    """Verify every part folder and check that they make one whole (see the module docstring); returns each
    folder with its meta.json, in part-index order."""
    if not parts:
        raise ConfigError("twinlm data merge needs the part folders: twinlm data merge PART0 PART1 … --out DIR")
    metas = []
    for p in parts:
        meta = verify_shards(p)
        if not isinstance(meta.get("part"), dict):
            raise ConfigError(f"{p} was not prepared as a part (its meta.json has no `part`): merge only folders "
                              "of `twinlm data prepare --part I/N`")
        metas.append(meta)
    first = metas[0]
    for p, meta in zip(parts[1:], metas[1:]):
        for name, get in _AGREE:
            if get(meta) != get(first):
                raise ConfigError(f"{p} differs from {parts[0]} in its {name} ({get(meta)!r} vs {get(first)!r}): "
                                  "merge only parts prepared with the same tokenizer, settings and inputs")
    count = int(first["part"]["count"])
    seen = Counter(int(m["part"]["index"]) for m in metas)
    twice = sorted(i for i, n in seen.items() if n > 1)
    missing = sorted(set(range(count)) - set(seen))
    if twice:
        raise ConfigError(f"part {twice[0]}/{count} is given more than once: give each part folder once")
    if missing:
        raise ConfigError(f"part {missing[0]}/{count} is missing ({len(parts)} of {count} parts given): prepare it "
                          f"with `twinlm data prepare … --part {missing[0]}/{count}` and merge all {count}")
    return sorted(zip(parts, metas), key=lambda pm: int(pm[1]["part"]["index"]))


def merge_parts(parts: list[str | Path], out: str | Path, block: int = 1 << 16) -> dict[str, Any]:
    """Merge the part folders `parts` (any order) into the shard folder `out` (see the module docstring);
    returns its meta.json. `out` may be absent, empty or an earlier shard folder (replaced), never a part."""
    t0 = time.time()
    paths = [Path(p) for p in parts]
    out = Path(out)
    if any(out.resolve() == p.resolve() for p in paths):
        raise ConfigError(f"--out {out} is one of the parts: merge into a new folder")
    checked = check_parts(paths)
    ordered, metas = [p for p, _ in checked], [m for _, m in checked]
    _check_target(out)
    first = metas[0]
    writer = ShardWriter(out, int(first["tokenizer"]["vocab_size"]), overwrite=True)
    try:
        _interleave(ordered, metas, writer, block)
        meta = {k: v for k, v in first.items() if k not in _WRITTEN}
        meta["num_documents"] = sum(int(m["num_documents"]) for m in metas)
        meta["stats"] = _summed_stats(metas, time.time() - t0)
        meta["merged_from"] = [{"path": str(p), "index": int(m["part"]["index"]), "num_chunks": m["num_chunks"]}
                               for p, m in zip(ordered, metas)]
        meta.pop("part", None)  # the merged folder is a whole
        if isinstance(first.get("holdout"), dict) and "num_chunks" in first["holdout"]:  # a train side's pointer
            meta["holdout"] = {**first["holdout"], "path": None,
                               "num_documents": sum(int(m["holdout"]["num_documents"]) for m in metas),
                               "num_chunks": sum(int(m["holdout"]["num_chunks"]) for m in metas)}
        return writer.close(meta)
    except BaseException:
        writer.abort()
        raise


# what ShardWriter.close writes itself
_WRITTEN = {"format", "format_version", "dtype", "num_chunks", "num_tokens", "num_bytes", "max_chunk_len", "sizes",
            "sha256", "meta_sha256"}


def _summed_stats(metas: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """The parts' stats summed (counts of documents, bytes, chunking events); `skipped` and `read_documents`,
    which every part counts over all the inputs, from the first."""
    stats: dict[str, Any] = {}
    for m in metas:
        for k, v in (m.get("stats") or {}).items():
            if k in ("skipped", "read_documents", "workers", "threads"):
                stats.setdefault(k, v)
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                stats[k] = stats.get(k, 0) + v
    stats["merge_seconds"] = round(seconds, 3)
    return stats


def _interleave(parts: list[Path], metas: list[dict[str, Any]], writer: ShardWriter, block: int) -> None:
    """Write the parts' chunks to `writer` in the order of their documents' ordinals (docs.npy), at most `block`
    chunks of each part at a time."""
    index = [np.load(p / "index.npy", mmap_mode="r") for p in parts]
    docs = [np.load(p / "docs.npy", mmap_mode="r") for p in parts]
    nbytes = [np.load(p / "bytes.npy", mmap_mode="r") for p in parts]
    tokens = [read_tokens(p, m["dtype"]) for p, m in zip(parts, metas)]
    pos = [0] * len(parts)
    sizes = [len(d) for d in docs]
    while any(pos[i] < sizes[i] for i in range(len(parts))):
        # every document below `limit` has all its chunks within `block` of each part's position
        limit = min((int(docs[i][pos[i] + block]) for i in range(len(parts)) if pos[i] + block < sizes[i]),
                    default=None)
        cap: int | None = block + 1
        if limit is not None and limit <= min(int(docs[i][pos[i]]) for i in range(len(parts)) if pos[i] < sizes[i]):
            limit, cap = limit + 1, None  # one document of more than `block` chunks: take it whole
        win_docs, win_bytes, win_lens, win_tokens, win_part = [], [], [], [], []
        for i in range(len(parts)):
            lo = pos[i]
            end = None if cap is None else lo + cap
            hi = sizes[i] if limit is None else lo + int(np.searchsorted(docs[i][lo:end], limit, "left"))
            if hi == lo:
                continue
            offs = np.asarray(index[i][lo:hi + 1], dtype=np.int64)
            win_docs.append(np.asarray(docs[i][lo:hi], dtype=np.int64))
            win_bytes.append(np.asarray(nbytes[i][lo:hi], dtype=np.int64))
            win_lens.append(np.diff(offs))
            win_tokens.append(np.asarray(tokens[i][offs[0]:offs[-1]]))
            win_part.append(np.full(hi - lo, i, dtype=np.int64))
            pos[i] = hi
        d = np.concatenate(win_docs)
        lens = np.concatenate(win_lens)
        part = np.concatenate(win_part)
        order = np.argsort(d, kind="stable")  # a document lies in one part, its chunks in order there
        ds, ps = d[order], part[order]
        clash = np.flatnonzero((ds[1:] == ds[:-1]) & (ps[1:] != ps[:-1]))
        if len(clash):
            a, b = parts[int(ps[clash[0]])], parts[int(ps[clash[0] + 1])]
            raise DataError(f"document {int(ds[clash[0]])} is in both {a} and {b}: these parts were not prepared "
                            "from the same inputs with the same part rule; prepare them again")
        flat = np.concatenate(win_tokens)
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]])[order]
        lens_o = lens[order]
        total = int(lens_o.sum())
        take = np.repeat(starts - np.concatenate([[0], np.cumsum(lens_o)[:-1]]), lens_o) + np.arange(total)
        writer.add(flat[take], lens_o, ds, np.concatenate(win_bytes)[order])
