"""Raw text -> tokenized, chunked shards (REFERENCE §2).

Sources: plain text files (one document per file), JSONL (`{"text": …}` per line; `.jsonl.gz` too),
parquet (a text column), fetched sources by name (`$TWINLM_HOME/pretrain/<name>.jsonl`), and Hugging Face
datasets by name (`hf:NAME[:CONFIG][:SPLIT]`, read with `datasets.load_dataset(..., streaming=True)`).

Each document is tokenized without specials and cut into pieces of (chunk_size − 2) tokens, each wrapped
as `[CLS] … [SEP]`. A piece shorter than `min_chunk` tokens is dropped unless it is the document's first;
a later piece shorter than `backfill` tokens is back-filled with the tail of the previous piece of the
same document up to `backfill` tokens. The main process reads documents; worker processes tokenize and
chunk batches of them; at most 2×workers batches are in flight, so memory stays bounded whatever the
corpus size. Output is written under a temporary name and renamed when complete (see shards.py).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from twinlm.errors import DataError
from twinlm.data.shards import ShardWriter

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".text", ".tex", ".html", ".c", ".h", ".js")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)


@dataclass(frozen=True)
class InputSpec:
    kind: str                 # "text" | "jsonl" | "parquet" | "hf"
    path: str                 # file path, or dataset name for "hf"
    config: str | None = None
    split: str | None = None
    source: str | None = None  # fetched source name, when it came from one

    def __str__(self) -> str:
        if self.kind == "hf":
            return f"hf:{self.path}" + (f":{self.config or ''}" if self.config or self.split else "") + (
                f":{self.split}" if self.split else "")
        return self.path


def _kind_of(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(TEXT_SUFFIXES) or "." not in name:
        return "text"
    return None


def resolve_inputs(items: Iterable[Any] | None, fetched: bool = False, home: str | Path | None = None) -> list[InputSpec]:
    """Turn command-line inputs into InputSpecs. Items: paths (files or folders, searched recursively for
    text/JSONL/parquet files), fetched pre-training source names, `hf:NAME[:CONFIG][:SPLIT]`, or InputSpecs."""
    from twinlm.data import fetch as fetch_mod
    specs: list[InputSpec] = []
    for item in list(items or []):
        if isinstance(item, InputSpec):
            specs.append(item)
            continue
        s = str(item)
        if s.startswith("hf:"):
            parts = s[3:].split(":")
            specs.append(InputSpec("hf", parts[0], (parts[1] or None) if len(parts) > 1 else None,
                                   (parts[2] or None) if len(parts) > 2 else None))
            continue
        path = Path(s)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".") and _kind_of(p))
            if not found:
                raise DataError(f"{path}: no text, JSONL or parquet files in this folder")
            specs.extend(InputSpec(_kind_of(p), str(p)) for p in found)
        elif path.is_file():
            kind = _kind_of(path) or "text"
            specs.append(InputSpec(kind, str(path)))
        elif s in fetch_mod.SOURCES:
            for f in fetch_mod.pretrain_files(home, [s]):
                specs.append(InputSpec("jsonl", str(f), source=s))
        else:
            raise DataError(f"{s}: no such file or folder, and not a fetched source "
                            f"({', '.join(n for n, x in fetch_mod.SOURCES.items() if x.group == 'pretrain')}) "
                            "nor hf:NAME")
    if fetched:
        for f in fetch_mod.pretrain_files(home):
            specs.append(InputSpec("jsonl", str(f), source=f.stem))
    if not specs:
        raise DataError("no inputs given (files, folders, fetched source names, hf:NAME, or --fetched)")
    return specs


class _Bad(Exception):
    def __init__(self, reason: str, where: str, detail: str = "") -> None:
        super().__init__(f"{where}: {reason}{': ' + detail if detail else ''}")
        self.reason = reason


def _decode_text(data: bytes, where: str) -> str:
    if b"\x00" in data[:65536]:
        raise _Bad("binary", where, "contains NUL bytes (binary file?)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Bad("not_utf8", where, f"not valid UTF-8 at byte {e.start}") from e


def iter_documents(specs: Iterable[InputSpec], text_field: str = "text", on_bad_input: str = "error",
                   skipped: Counter | None = None) -> Iterator[tuple[str, str]]:
    """(document key, text) for every document of the inputs, in order.

    Bad input (a missing or empty file, binary or non-UTF-8 content, invalid JSON, a record without the
    text field): on_bad_input="error" raises DataError naming the file and line; "skip" counts it in
    `skipped` (by reason) and logs a warning.
    """
    if on_bad_input not in ("error", "skip"):
        raise ValueError(f"on_bad_input must be 'error' or 'skip', got {on_bad_input!r}")
    skipped = skipped if skipped is not None else Counter()

    def bad(b: _Bad) -> None:
        if on_bad_input == "error":
            raise DataError(str(b) + " (pass --on-bad-input skip to skip and count such input)") from None
        skipped[b.reason] += 1
        log.warning("skipped %s", b)

    for spec in specs:
        if spec.kind == "hf":
            yield from _iter_hf(spec, text_field, bad)
            continue
        path = Path(spec.path)
        if not path.exists():
            raise DataError(f"{path}: no such file")
        if path.stat().st_size == 0:
            bad(_Bad("empty", str(path), "empty file"))
            continue
        if spec.kind == "text" and path.stat().st_size > LARGE_TEXT_BYTES:
            yield from _iter_large_text(path, bad)
        elif spec.kind == "text":
            try:
                text = _decode_text(path.read_bytes(), str(path))
            except _Bad as b:
                bad(b)
                continue
            if not text.strip():
                bad(_Bad("empty", str(path), "only whitespace"))
                continue
            yield str(path), text
        elif spec.kind == "jsonl":
            yield from _iter_jsonl(path, text_field, bad)
        elif spec.kind == "parquet":
            yield from _iter_parquet(path, text_field, bad)
        else:
            raise DataError(f"{path}: unknown input kind {spec.kind!r}")


LARGE_TEXT_BYTES = 64 << 20


def _iter_large_text(path: Path, bad, block: int = 8 << 20) -> Iterator[tuple[str, str]]:
    """A plain text file too large to be one document: read in blocks, cut at blank lines (so memory stays
    bounded); each piece is a document keyed path@offset."""
    offset = 0
    carry = b""
    with open(path, "rb") as f:
        while True:
            data = f.read(block)
            buf = carry + data
            if not buf:
                return
            cut = buf.rfind(b"\n\n") if data else len(buf)
            if cut <= 0:
                cut = buf.rfind(b"\n") if data else len(buf)
            if cut <= 0:
                cut = len(buf) if not data or len(buf) > 4 * block else -1
            if cut < 0:
                carry = buf
                continue
            piece, carry = buf[:cut], buf[cut:]
            where = f"{path}@{offset}"
            offset += len(piece)
            try:
                text = _decode_text(piece, where)
            except _Bad as b:
                bad(b)
                continue
            if text.strip():
                yield where, text
            if not data:
                if carry.strip():
                    continue
                return


def _iter_jsonl(path: Path, text_field: str, bad) -> Iterator[tuple[str, str]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        if path.name.endswith(".json") and not path.name.endswith(".jsonl"):
            head = f.read(1)
            f.seek(0)
            if head == b"[":  # a JSON array of records
                try:
                    records = json.load(io.TextIOWrapper(f, encoding="utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    bad(_Bad("invalid_json", str(path), str(e)))
                    return
                for i, rec in enumerate(records):
                    got = _field(rec, text_field, f"{path}:{i}", bad)
                    if got is not None:
                        yield f"{path}:{i}", got
                return
        n = 0
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(_decode_text(raw, where))
            except _Bad as b:
                bad(b)
                continue
            except json.JSONDecodeError as e:
                bad(_Bad("invalid_json", where, str(e)))
                continue
            got = _field(rec, text_field, where, bad)
            if got is not None:
                n += 1
                yield where, got
        if n == 0 and lineno_is_empty(path):
            bad(_Bad("empty", str(path), "no records"))


def lineno_is_empty(path: Path) -> bool:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        return not any(line.strip() for line in f)


def _field(rec: Any, text_field: str, where: str, bad) -> str | None:
    if not isinstance(rec, dict) or text_field not in rec:
        bad(_Bad("missing_field", where, f"no {text_field!r} field"))
        return None
    text = rec[text_field]
    if not isinstance(text, str):
        bad(_Bad("missing_field", where, f"field {text_field!r} is {type(text).__name__}, not text"))
        return None
    if not text.strip():
        bad(_Bad("empty", where, f"empty {text_field!r}"))
        return None
    return text


def _iter_parquet(path: Path, text_field: str, bad) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        bad(_Bad("unreadable", str(path), str(e)))
        return
    if text_field not in pf.schema_arrow.names:
        bad(_Bad("missing_field", str(path), f"no {text_field!r} column (columns: {', '.join(pf.schema_arrow.names)})"))
        return
    row = 0
    for batch in pf.iter_batches(batch_size=4096, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            where = f"{path}:{row}"
            row += 1
            if not isinstance(text, str) or not text.strip():
                bad(_Bad("missing_field" if not isinstance(text, str) else "empty", where, f"no text in {text_field!r}"))
                continue
            yield where, text


def _iter_hf(spec: InputSpec, text_field: str, bad) -> Iterator[tuple[str, str]]:
    import datasets
    kwargs: dict[str, Any] = {"streaming": True}
    name = spec.path
    if Path(name).is_file():  # a single local data file: use the builder its suffix names
        kind = _kind_of(Path(name))
        builder = {"jsonl": "json", "parquet": "parquet", "text": "text"}[kind or "text"]
        kwargs["data_files"] = name
        name = builder
    ds = datasets.load_dataset(name, spec.config, split=spec.split or "train", **kwargs)
    for i, rec in enumerate(ds):
        got = _field(rec, text_field, f"{spec}:{i}", bad)
        if got is not None:
            yield f"{spec}:{i}", got


# --------------------------------------------------------------------------------------------------
# Chunking
# --------------------------------------------------------------------------------------------------
def chunk_document(ids: np.ndarray, cls_id: int, sep_id: int, chunk_size: int = 1024, min_chunk: int = 128,
                   backfill: int = 512) -> tuple[list[np.ndarray], dict[str, int]]:
    """Cut one document's token ids into `[CLS] … [SEP]` chunks (REFERENCE §2); returns (chunks, counts)."""
    body = chunk_size - 2
    if body < 1:
        raise ValueError(f"chunk_size must be at least 3, got {chunk_size}")
    ids = np.asarray(ids)
    counts = {"dropped": 0, "backfilled": 0}
    if len(ids) == 0:
        return [], counts
    chunks = []
    prev = None
    for start in range(0, len(ids), body):
        piece = ids[start:start + body]
        if start > 0:
            if len(piece) < min_chunk:
                counts["dropped"] += 1
                continue
            if len(piece) < backfill:
                need = min(backfill, body) - len(piece)
                piece = np.concatenate([prev[len(prev) - need:], piece]) if need > 0 else piece
                counts["backfilled"] += 1
        prev = ids[start:start + body]
        chunks.append(np.concatenate([[cls_id], piece, [sep_id]]).astype(ids.dtype if ids.dtype.kind in "iu" else np.int64))
    return chunks, counts


# --------------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------------
_W: dict[str, Any] = {}


def _byte_lengths(backend) -> np.ndarray:
    """UTF-8 bytes each token id stands for (0 for special tokens)."""
    from tokenizers import pre_tokenizers  # noqa: F401  (the byte-level alphabet below)
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
    from tokenizers import Tokenizer
    backend = Tokenizer.from_str(tokenizer_json)
    backend.no_padding()
    backend.no_truncation()
    _W.update(backend=backend, cls=cls_id, sep=sep_id, chunk_size=chunk_size, min_chunk=min_chunk,
              backfill=backfill, nbytes=_byte_lengths(backend))


def _process(batch: list[tuple[int, bool, str]]) -> dict[str, Any]:
    backend = _W["backend"]
    texts = [t for _, _, t in batch]
    try:
        encs = backend.encode_batch_fast(texts, add_special_tokens=False)
    except AttributeError:  # older tokenizers
        encs = backend.encode_batch(texts, add_special_tokens=False)
    out = {False: ([], [], []), True: ([], [], [])}
    counts = Counter()
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
    result = {"counts": counts}
    for held, (toks, lens, docs) in out.items():
        flat = np.concatenate(toks) if toks else np.empty(0, np.int64)
        lens_a = np.asarray(lens, dtype=np.int64)
        per_tok = nbytes[flat] if len(flat) else np.empty(0, np.int64)
        chunk_bytes = np.add.reduceat(per_tok, np.concatenate([[0], np.cumsum(lens_a)[:-1]])) if len(lens_a) else lens_a
        result[held] = (flat, lens_a, np.asarray(docs, dtype=np.int64), chunk_bytes)
    return result


def _holdout_rule(holdout_docs: float, seed: int):
    """A function (doc ordinal, key) -> held out?  fraction < 1: each document with that probability;
    count >= 1: documents drawn with probability 1/10 until that many are held out."""
    if not holdout_docs:
        return lambda ordinal, key: False
    if holdout_docs < 0:
        raise ValueError(f"holdout_docs must be >= 0, got {holdout_docs}")
    fraction = holdout_docs if holdout_docs < 1 else 0.1
    limit = None if holdout_docs < 1 else int(holdout_docs)
    taken = [0]

    def rule(ordinal: int, key: str) -> bool:
        if limit is not None and taken[0] >= limit:
            return False
        h = int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "little") / 2 ** 64
        if h < fraction:
            taken[0] += 1
            return True
        return False

    return rule


def prepare(inputs: Iterable[Any], tokenizer: Any, out: str | Path, *, chunk_size: int = 1024,
            min_chunk: int | None = None, backfill: int | None = None, text_field: str = "text", holdout_docs: float = 0.0,
            holdout_out: str | Path | None = None, workers: int | None = None, threads: int | None = None,
            seed: int = 0,
            on_bad_input: str = "error", max_docs: int | None = None, batch_bytes: int = 1 << 20,
            overwrite: bool = True) -> dict[str, Any]:
    """Tokenize, chunk and shard `inputs` into `out` (and held-out documents into `holdout_out`, default
    `<out>-heldout`); returns the meta.json written. `tokenizer`: a PreTrainedTokenizerFast or a folder.
    min_chunk / backfill default to chunk_size/8 and chunk_size/2 (128 and 512 at the paper's 1,024).
    workers: tokenizer processes (default 1; 0 = tokenize in this process); threads: encoder threads per
    worker process (default: CPU count / workers). The main process reads while the workers encode."""
    from twinlm.data.tokenizer import load_tokenizer, special_ids, tokenizer_fingerprint
    t0 = time.time()
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    inputs = list(inputs)
    specs = resolve_inputs(inputs) if not all(isinstance(x, InputSpec) for x in inputs) else inputs
    if chunk_size < 3:
        raise ValueError(f"chunk_size must be at least 3 ([CLS] + 1 token + [SEP]), got {chunk_size}")
    # default: the paper's 128 / 512 at 1,024 tokens, scaled with the chunk size for short CPU sequences
    min_chunk = chunk_size // 8 if min_chunk is None else min_chunk
    backfill = chunk_size // 2 if backfill is None else backfill
    if min_chunk > chunk_size - 2 or backfill > chunk_size - 2:
        # short CPU sequences with the paper's 128/512: clamp to the chunk body, recorded in meta.json
        log.info("min_chunk %d / backfill %d exceed the chunk body (%d tokens): clamped", min_chunk, backfill,
                 chunk_size - 2)
        min_chunk, backfill = min(min_chunk, chunk_size - 2), min(backfill, chunk_size - 2)
    ids = special_ids(tok)
    fingerprint = tokenizer_fingerprint(tok)
    backend_json = tok.backend_tokenizer.to_str()
    vocab = len(tok)
    out = Path(out)
    holdout_out = Path(holdout_out) if holdout_out else out.with_name(out.name + "-heldout")
    writers = {False: ShardWriter(out, vocab, overwrite=overwrite)}
    if holdout_docs:
        writers[True] = ShardWriter(holdout_out, vocab, overwrite=overwrite)
    workers = 1 if workers is None else max(0, int(workers))
    threads = max(1, (os.cpu_count() or 1) // max(workers, 1)) if threads is None else max(1, int(threads))
    init_args = (backend_json, ids["cls"], ids["sep"], chunk_size, min_chunk, backfill)
    skipped: Counter = Counter()
    counts: Counter = Counter()
    docs = nbytes = 0
    held_docs = 0
    rule = _holdout_rule(holdout_docs, seed)

    def batches() -> Iterator[list[tuple[int, bool, str]]]:
        nonlocal docs, nbytes, held_docs
        batch, size = [], 0
        for key, text in iter_documents(specs, text_field, on_bad_input, skipped):
            if max_docs is not None and docs >= max_docs:
                break
            held = rule(docs, key)
            held_docs += held
            batch.append((docs, held, text))
            docs += 1
            size += len(text)
            nbytes += len(text.encode("utf-8")) if not text.isascii() else len(text)
            if size >= batch_bytes:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch

    def consume(result: dict[str, Any]) -> None:
        counts.update(result["counts"])
        for held, writer in writers.items():
            writer.add(*result[held])

    pool = None
    try:
        if workers == 0:
            _init_worker(*init_args)
            for b in batches():
                consume(_process(b))
        else:
            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=(*init_args, threads))
            pending: deque = deque()
            for b in batches():
                pending.append(pool.apply_async(_process, (b,)))
                while len(pending) >= 2 * workers + 1:
                    consume(pending.popleft().get())
            while pending:
                consume(pending.popleft().get())
            pool.close()
            pool.join()
            pool = None
    except BaseException:
        if pool is not None:
            pool.terminate()
        for w in writers.values():
            w.abort()
        raise
    if docs == 0:
        for w in writers.values():
            w.abort()
        raise DataError(f"no documents in the inputs ({', '.join(map(str, specs[:5]))}"
                        f"{', …' if len(specs) > 5 else ''}); skipped: {dict(skipped)}")
    seconds = time.time() - t0
    common = {
        "tokenizer": {"fingerprint": fingerprint, "name": getattr(tok, "name_or_path", ""), "vocab_size": vocab,
                      "special_ids": ids},
        "chunking": {"chunk_size": chunk_size, "min_chunk": min_chunk, "backfill": backfill},
        "inputs": [str(s) for s in specs][:1000], "text_field": text_field,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    stats = {"documents": docs, "bytes": nbytes, "seconds": round(seconds, 3), "workers": workers, "threads": threads,
             "skipped": dict(skipped), **{k: int(v) for k, v in counts.items()}}
    holdout_meta = None
    if True in writers:
        holdout_meta = writers[True].close({**common, "split": "heldout", "num_documents": held_docs,
                                            "holdout": {"docs": holdout_docs, "seed": seed}, "stats": stats})
    meta = writers[False].close({
        **common, "split": "train", "num_documents": docs - held_docs, "stats": stats,
        "holdout": ({"path": str(holdout_out), "num_documents": held_docs, "num_chunks": holdout_meta["num_chunks"],
                     "docs": holdout_docs, "seed": seed} if holdout_meta else None)})
    return meta
