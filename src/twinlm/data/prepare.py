"""Raw text -> tokenized, chunked shards (REFERENCE §2).

Inputs are read by `twinlm.data.inputs` (files, folders, JSONL, parquet, fetched sources, `hf:` datasets);
shards are written by `twinlm.data.shards.ShardWriter`. This module holds the chunking rule and runs the two;
`prepare(inputs, tokenizer, out, PrepareConfig(...))` takes its settings as one object (the flags of `twinlm
data prepare`).

Each document is tokenized without specials and cut into pieces of (chunk_size − 2) tokens, each wrapped
as `[CLS] … [SEP]`. A piece shorter than `min_chunk` tokens is dropped unless it is the document's first;
a later piece shorter than `backfill` tokens is back-filled with the tail of the previous piece of the
same document up to `backfill` tokens. The main process reads documents; worker processes tokenize and
chunk batches of them; at most 2×workers batches are in flight, so memory stays bounded whatever the
corpus size. Output is written under a temporary name and renamed when complete (see shards.py).

Refusals and faults: `out` (and the held-out folder) must be a shard folder, an empty folder or absent (a
file or a folder of other things is never replaced); temporary `.OUT.tmp-*` folders that a killed earlier
run left are removed first; a full disk (ENOSPC) stops with `OutOfSpace`, removes this run's temporary
folders and leaves an earlier shard folder at `out` intact. A count of held-out documents the corpus cannot
give (the count rule holds out about 1 document in 10) is logged and recorded as `holdout.num_documents`
beside the `holdout.docs` asked for; `twinlm data prepare` prints it as a warning. Which documents are held
out is decided by the one held-out rule (twinlm.data.split: a hash of the seed and each document's text, the
suite's corpus rule too), so the split is the same wherever the input files lie, and copies of a document never
straddle the two sides.

Parts (`part=(I, N)`, `twinlm data prepare --part I/N`): every part reads all the inputs and keeps the documents
that the part rule (twinlm.data.split.part_of: the same hash of the text, keyed "part") assigns to part I, so N
machines can each prepare one part of the same inputs, one big file included. A part's docs.npy holds the
documents' ordinals among all documents read (not among the part's), and its meta.json records `part: {index,
count, rule}` and `stats.read_documents`; `twinlm data merge` (twinlm.data.merge) interleaves the parts by those
ordinals into the folder one whole `prepare` writes. A held-out fraction is decided per document, so the parts'
held-out folders merge the same way; a held-out count depends on reading order and is refused with `part`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing as mp
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from twinlm.data.inputs import InputSpec, iter_documents, resolve_inputs
from twinlm.data.shards import ShardWriter
from twinlm.data.split import PART_RULE, heldout, part_of
from twinlm.data.split import RULE as HELDOUT_RULE
from twinlm.data.tokenizer import load_tokenizer, special_ids, tokenizer_fingerprint
from twinlm.errors import ConfigError, DataError, OutOfSpace
from twinlm.io import is_disk_full, remove_stale_temporaries

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Chunking
# --------------------------------------------------------------------------------------------------
def chunk_document(ids: np.ndarray, cls_id: int, sep_id: int, chunk_size: int = 1024, min_chunk: int = 128,
                   backfill: int = 512) -> tuple[list[np.ndarray], dict[str, int]]:
    """Cut one document's token ids into `[CLS] … [SEP]` chunks (REFERENCE §2); returns (chunks, counts)."""
    body = chunk_size - 2
    if body < 1:
        raise ConfigError(f"chunk_size must be at least 3, got {chunk_size}")
    ids = np.asarray(ids)
    counts = {"dropped": 0, "backfilled": 0}
    if len(ids) == 0:
        return [], counts
    chunks = []
    prev: np.ndarray | None = None
    for start in range(0, len(ids), body):
        piece = ids[start:start + body]
        if start > 0:
            if len(piece) < min_chunk:
                counts["dropped"] += 1
                continue
            if len(piece) < backfill:
                need = min(backfill, body) - len(piece)
                assert prev is not None  # set by the first piece (start 0), which is never dropped
                piece = np.concatenate([prev[len(prev) - need:], piece]) if need > 0 else piece
                counts["backfilled"] += 1
        prev = ids[start:start + body]
        dtype = ids.dtype if ids.dtype.kind in "iu" else np.int64
        chunks.append(np.concatenate([[cls_id], piece, [sep_id]]).astype(dtype))
    return chunks, counts


# --------------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------------
_W: dict[str, Any] = {}


def _byte_lengths(backend) -> np.ndarray:
    """UTF-8 bytes each token id stands for (0 for special tokens)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_chars = {chr(c) for c in cs}
    data = json.loads(backend.to_str())
    byte_level = "ByteLevel" in json.dumps(data.get("pre_tokenizer")) or "ByteLevel" in json.dumps(data.get("decoder"))
    size = backend.get_vocab_size(with_added_tokens=True)
    out = np.zeros(size, dtype=np.int64)
    for tok, i in backend.get_vocab(with_added_tokens=True).items():
        if i >= size:
            continue
        if byte_level and all(ch in byte_chars for ch in tok):
            out[i] = len(tok)
        else:
            out[i] = len(tok.replace("##", "").encode("utf-8"))
    for a in data.get("added_tokens", []):
        if a.get("special") and a["id"] < size:
            out[a["id"]] = 0
        elif a["id"] < size:
            out[a["id"]] = len(a["content"].encode("utf-8"))
    return out


def _init_worker(tokenizer_json: str, cls_id: int, sep_id: int, chunk_size: int, min_chunk: int, backfill: int,
                 threads: int | None = None) -> None:
    if threads is not None:  # in a worker process: its own encoder thread count
        os.environ["RAYON_NUM_THREADS"] = str(threads)
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    backend = Tokenizer.from_str(tokenizer_json)
    backend.no_padding()
    backend.no_truncation()
    _W.update(backend=backend, cls=cls_id, sep=sep_id, chunk_size=chunk_size, min_chunk=min_chunk,
              backfill=backfill, nbytes=_byte_lengths(backend))


def _process(batch: list[tuple[int, bool, str]]) -> dict[str | bool, Any]:
    backend = _W["backend"]
    texts = [t for _, _, t in batch]
    try:
        encs = backend.encode_batch_fast(texts, add_special_tokens=False)
    except AttributeError:  # older tokenizers
        encs = backend.encode_batch(texts, add_special_tokens=False)
    out: dict[bool, tuple[list[np.ndarray], list[int], list[int]]] = {False: ([], [], []), True: ([], [], [])}
    counts: Counter[str] = Counter()
    nbytes = _W["nbytes"]
    for (doc, held, _), enc in zip(batch, encs):
        ids = np.asarray(enc.ids, dtype=np.int64)
        if len(ids) == 0:
            counts["empty_documents"] += 1
            continue
        chunks, c = chunk_document(ids, _W["cls"], _W["sep"], _W["chunk_size"], _W["min_chunk"], _W["backfill"])
        counts.update(c)
        toks, lens, docs = out[held]
        toks.extend(chunks)
        lens.extend(len(ch) for ch in chunks)
        docs.extend([doc] * len(chunks))
    result: dict[str | bool, Any] = {"counts": counts}  # and per side (held out?): flat, lengths, docs, bytes
    for held, (toks, lens, docs) in out.items():
        flat = np.concatenate(toks) if toks else np.empty(0, np.int64)
        lens_a = np.asarray(lens, dtype=np.int64)
        per_tok = nbytes[flat] if len(flat) else np.empty(0, np.int64)
        chunk_bytes = np.add.reduceat(per_tok, np.concatenate([[0], np.cumsum(lens_a)[:-1]])) if len(lens_a) else lens_a
        result[held] = (flat, lens_a, np.asarray(docs, dtype=np.int64), chunk_bytes)
    return result


def _holdout_rule(holdout_docs: float, seed: int) -> Callable[[int, str], bool]:
    """A function (doc ordinal, text) -> held out?  fraction < 1: each document with that probability;
    count >= 1: documents drawn with probability 1/10 until that many are held out. The draw is the held-out
    rule (twinlm.data.split.heldout: a hash of the seed and the document's text), so the split does not depend
    on where the input files lie, and identical documents fall on the same side."""
    if not holdout_docs:
        return lambda ordinal, text: False
    fraction = holdout_docs if holdout_docs < 1 else 0.1
    limit = None if holdout_docs < 1 else int(holdout_docs)
    taken = [0]

    def rule(ordinal: int, text: str) -> bool:
        if limit is not None and taken[0] >= limit:
            return False
        if heldout(text, seed, fraction):
            taken[0] += 1
            return True
        return False

    return rule


# --------------------------------------------------------------------------------------------------
# prepare: its settings, the job they make, the run
# --------------------------------------------------------------------------------------------------
@dataclass
class PrepareConfig:
    """The settings of `prepare` (those of `twinlm data prepare`): chunking, the held-out split, the workers.

    Checked however it is made (directly, or by twinlm.configs.build from plain data)."""

    chunk_size: int = 1024  # tokens per chunk, [CLS] and [SEP] included
    min_chunk: int | None = None  # a later piece shorter than this is dropped; None: chunk_size / 8
    backfill: int | None = None  # a later piece shorter than this is back-filled; None: chunk_size / 2
    text_field: str = "text"  # the field of JSONL and parquet records that holds the text
    holdout_docs: float = 0.0  # held-out documents: a fraction < 1, or a count (0: none)
    holdout_out: str | Path | None = None  # their shard folder; None: <out>-heldout
    workers: int | None = None  # tokenizer processes; None: 1; 0: tokenize in this process
    threads: int | None = None  # encoder threads per worker process; None: CPU count / workers
    seed: int = 0  # seed of the held-out draw
    on_bad_input: str = "error"  # error | skip (and count) undecodable or empty inputs
    max_docs: int | None = None  # stop after this many documents
    batch_bytes: int = 1 << 20  # text sent to a worker at a time
    overwrite: bool = True  # an earlier shard folder at the output is replaced
    part: tuple[int, int] | None = None  # (I, N): keep only the documents of part I of N (see the module docstring)

    def __post_init__(self) -> None:
        if self.chunk_size < 3:
            raise ConfigError(f"chunk_size must be at least 3 ([CLS] + 1 token + [SEP]), got {self.chunk_size}")
        if self.holdout_docs < 0:
            raise ConfigError(f"holdout_docs must be >= 0, got {self.holdout_docs}")
        if self.part is not None:
            index, count = self.part
            if not (count >= 1 and 0 <= index < count):
                raise ConfigError(f"part {index}/{count}: give I/N with 0 <= I < N (the parts of 2 are 0/2 and 1/2)")
            if self.holdout_docs >= 1:
                raise ConfigError(f"a held-out count ({self.holdout_docs:g} documents) cannot be split into parts (it "
                                  "depends on reading order): give a fraction with --part, e.g. --holdout-docs 0.01")


@dataclass
class _Job:
    """One prepare's settings made concrete: the tokenizer read, the inputs resolved, the defaults applied."""

    tok: Any
    specs: list[InputSpec]
    cfg: PrepareConfig  # min_chunk, backfill, workers and threads filled in
    out: Path
    holdout_out: Path
    ids: dict[str, int]
    fingerprint: str


@dataclass
class _Tally:
    """What the reading and the workers counted."""

    read: int = 0  # documents read, all parts
    docs: int = 0  # documents kept (this part's)
    bytes: int = 0
    held_docs: int = 0
    counts: Counter = field(default_factory=Counter)  # chunking: dropped, backfilled, empty documents
    skipped: Counter = field(default_factory=Counter)  # bad inputs skipped, by reason


def prepare(inputs: Iterable[Any], tokenizer: Any, out: str | Path, settings: PrepareConfig | None = None,
            **fields: Any) -> dict[str, Any]:
    """Tokenize, chunk and shard `inputs` into `out` (and held-out documents into `settings.holdout_out`,
    default `<out>-heldout`); returns the meta.json written. `tokenizer`: a PreTrainedTokenizerFast or a
    folder. `fields` (e.g. `chunk_size=64, workers=0`) replace those of `settings` (default PrepareConfig()).
    min_chunk / backfill default to chunk_size/8 and chunk_size/2 (128 and 512 at the paper's 1,024). The
    main process reads while the workers encode."""
    t0 = time.time()
    job = _job(inputs, tokenizer, out, _settings(settings, fields))
    rule = _holdout_rule(job.cfg.holdout_docs, job.cfg.seed)
    targets = [job.out, job.holdout_out] if job.cfg.holdout_docs else [job.out]
    for target in targets:
        _check_target(target)
        for p in remove_stale_temporaries(target.parent, target.name):
            log.warning("removed %s, left by an earlier run that was killed", p)
    vocab = len(job.tok)
    writers = {held: ShardWriter(target, vocab, overwrite=job.cfg.overwrite)
               for held, target in zip((False, True), targets)}
    tally = _Tally()
    try:
        _run_workers(job, rule, writers, tally)
    except BaseException as e:
        for w in writers.values():
            w.abort()
        _raise_if_disk_full(e, job.out)
        raise
    if tally.read == 0:
        for w in writers.values():
            w.abort()
        raise DataError(f"no documents in the inputs ({', '.join(map(str, job.specs[:5]))}"
                        f"{', …' if len(job.specs) > 5 else ''}); skipped: {dict(tally.skipped)}")
    return _write_meta(job, writers, tally, time.time() - t0)


def _settings(settings: PrepareConfig | None, fields: dict[str, Any]) -> PrepareConfig:
    cfg = settings or PrepareConfig()
    try:
        return dataclasses.replace(cfg, **fields) if fields else cfg
    except TypeError:
        known = [f.name for f in dataclasses.fields(PrepareConfig)]
        unknown = sorted(set(fields) - set(known))
        raise ConfigError(f"unknown prepare setting {', '.join(unknown)}; known: {', '.join(known)}") from None


def _job(inputs: Iterable[Any], tokenizer: Any, out: str | Path, cfg: PrepareConfig) -> _Job:
    """Read the tokenizer, resolve the inputs and fill in the defaults of `cfg`."""
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    inputs = list(inputs)
    specs = resolve_inputs(inputs) if not all(isinstance(x, InputSpec) for x in inputs) else inputs
    chunk_size = cfg.chunk_size
    # default: the paper's 128 / 512 at 1,024 tokens, scaled with the chunk size for short CPU sequences
    min_chunk = chunk_size // 8 if cfg.min_chunk is None else cfg.min_chunk
    backfill = chunk_size // 2 if cfg.backfill is None else cfg.backfill
    if min_chunk > chunk_size - 2 or backfill > chunk_size - 2:
        # short CPU sequences with the paper's 128/512: clamp to the chunk body, recorded in meta.json
        log.info("min_chunk %d / backfill %d exceed the chunk body (%d tokens): clamped", min_chunk, backfill,
                 chunk_size - 2)
        min_chunk, backfill = min(min_chunk, chunk_size - 2), min(backfill, chunk_size - 2)
    workers = 1 if cfg.workers is None else max(0, int(cfg.workers))
    threads = max(1, (os.cpu_count() or 1) // max(workers, 1)) if cfg.threads is None else max(1, int(cfg.threads))
    out = Path(out)
    holdout_out = Path(cfg.holdout_out) if cfg.holdout_out else out.with_name(out.name + "-heldout")
    cfg = dataclasses.replace(cfg, min_chunk=min_chunk, backfill=backfill, workers=workers, threads=threads)
    return _Job(tok, specs, cfg, out, holdout_out, special_ids(tok), tokenizer_fingerprint(tok))


def _run_workers(job: _Job, rule: Callable[[int, str], bool], writers: dict[bool, ShardWriter],
                 tally: _Tally) -> None:
    """Read the documents in this process, tokenize and chunk them in the workers (at most 2×workers batches
    in flight), and hand each batch's chunks to the writer of its side, in document order. A progress bar
    (documents, on stderr) shows only on a terminal: logs and tests stay quiet."""
    cfg = job.cfg
    bar = tqdm(total=cfg.max_docs, unit="doc", unit_scale=True, desc="prepare", dynamic_ncols=True,
               disable=not sys.stderr.isatty())
    try:
        _feed_workers(job, rule, writers, tally, bar)
    finally:
        bar.close()


def _feed_workers(job: _Job, rule: Callable[[int, str], bool], writers: dict[bool, ShardWriter], tally: _Tally,
                  bar: Any) -> None:
    """`_run_workers`' loop; `bar` counts the documents read."""
    cfg = job.cfg
    assert cfg.min_chunk is not None and cfg.backfill is not None and cfg.workers is not None  # filled in by _job
    init_args = (job.tok.backend_tokenizer.to_str(), job.ids["cls"], job.ids["sep"], cfg.chunk_size,
                 cfg.min_chunk, cfg.backfill)

    def batches() -> Iterator[list[tuple[int, bool, str]]]:
        batch, size = [], 0
        for _key, text in iter_documents(job.specs, cfg.text_field, cfg.on_bad_input, tally.skipped):
            if cfg.max_docs is not None and tally.read >= cfg.max_docs:
                break
            ordinal = tally.read
            tally.read += 1
            if cfg.part is not None and part_of(text, cfg.part[1]) != cfg.part[0]:
                continue
            held = rule(ordinal, text)
            tally.held_docs += held
            batch.append((ordinal, held, text))
            tally.docs += 1
            size += len(text)
            tally.bytes += len(text.encode("utf-8")) if not text.isascii() else len(text)
            if size >= cfg.batch_bytes:
                bar.update(len(batch))
                yield batch
                batch, size = [], 0
        if batch:
            bar.update(len(batch))
            yield batch

    def consume(result: dict[str | bool, Any]) -> None:
        tally.counts.update(result["counts"])
        for held, writer in writers.items():
            writer.add(*result[held])

    if cfg.workers == 0:
        _init_worker(*init_args)
        for b in batches():
            consume(_process(b))
        return
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    pool = ctx.Pool(cfg.workers, initializer=_init_worker, initargs=(*init_args, cfg.threads))
    try:
        pending: deque = deque()
        for b in batches():
            pending.append(pool.apply_async(_process, (b,)))
            while len(pending) >= 2 * cfg.workers + 1:
                consume(pending.popleft().get())
        while pending:
            consume(pending.popleft().get())
        pool.close()
        pool.join()
    except BaseException:
        pool.terminate()
        raise


def _write_meta(job: _Job, writers: dict[bool, ShardWriter], tally: _Tally, seconds: float) -> dict[str, Any]:
    """Close the writers (the held-out folder first) with their meta.json; returns the training side's."""
    cfg = job.cfg
    common = {
        "tokenizer": {"fingerprint": job.fingerprint, "name": getattr(job.tok, "name_or_path", ""),
                      "vocab_size": len(job.tok), "special_ids": job.ids},
        "chunking": {"chunk_size": cfg.chunk_size, "min_chunk": cfg.min_chunk, "backfill": cfg.backfill},
        "inputs": [str(s) for s in job.specs][:1000], "text_field": cfg.text_field,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if cfg.part is not None:
        common["part"] = {"index": cfg.part[0], "count": cfg.part[1], "rule": PART_RULE}
    stats = {"documents": tally.docs, "read_documents": tally.read, "bytes": tally.bytes,
             "seconds": round(seconds, 3), "workers": cfg.workers,
             "threads": cfg.threads, "skipped": dict(tally.skipped), **{k: int(v) for k, v in tally.counts.items()}}
    holdout_docs, held_docs = cfg.holdout_docs, tally.held_docs
    if holdout_docs >= 1 and held_docs < holdout_docs:
        log.warning("held out %d of the %d documents asked for: the count rule holds out about 1 document in 10 "
                    "(%d read); pass a fraction (--holdout-docs 0.2) to hold out more", held_docs, holdout_docs,
                    tally.docs)
    holdout_meta = None
    try:
        if True in writers:
            drawn = {"docs": holdout_docs, "seed": cfg.seed, "rule": HELDOUT_RULE}
            holdout_meta = writers[True].close({**common, "split": "heldout", "num_documents": held_docs,
                                                "holdout": drawn, "stats": stats})
        return writers[False].close({
            **common, "split": "train", "num_documents": tally.docs - held_docs, "stats": stats,
            "holdout": ({"path": str(job.holdout_out), "num_documents": held_docs,
                         "num_chunks": holdout_meta["num_chunks"], "docs": holdout_docs, "seed": cfg.seed,
                         "rule": HELDOUT_RULE}
                        if holdout_meta else None)})
    except BaseException as e:
        for w in writers.values():
            w.abort()  # a writer already closed has nothing left to remove
        _raise_if_disk_full(e, job.out)
        raise


def _check_target(path: Path) -> None:
    """An output folder may be absent, empty, or an earlier shard folder (replaced); nothing else."""
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir():
        raise ConfigError(f"{path} exists and is not a folder: give --out a folder name (the shard folder is "
                          "created there)")
    if not (path / "meta.json").exists() and any(path.iterdir()):
        raise ConfigError(f"{path} is a folder of other files, not a shard folder (no meta.json): give --out a new "
                          "or empty folder, or remove that one")


def _raise_if_disk_full(e: BaseException, out: Path) -> None:
    if is_disk_full(e):
        raise OutOfSpace(f"the disk holding {out} is full ({e}); this run's temporary files were removed and any "
                         f"earlier shard folder there is intact: free space and run the command again") from e
