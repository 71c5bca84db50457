"""Token shards on disk: one folder per prepared corpus.

    DIR/tokens.bin   flat uint16 (vocabulary ≤ 65,535) or uint32 token ids, every chunk `[CLS] … [SEP]`
    DIR/index.npy    int64 offsets into tokens.bin, one more than chunks (chunk i = tokens[index[i]:index[i+1]])
    DIR/docs.npy     int64 per chunk: the ordinal of the document it came from
    DIR/bytes.npy    int64 per chunk: UTF-8 bytes of text the chunk's tokens stand for (specials count 0)
    DIR/meta.json    written last: tokenizer fingerprint, counts, dtype, chunking, sha256 of each file, and
                     (format_version 2) `meta_sha256`, the sha256 of meta.json itself with that value zeroed

A folder without meta.json is not a shard folder (an interrupted write never gets that far: the
writer fills `.DIR.tmp-*` and renames it when done, through `twinlm.io.atomic_dir`).

Integrity, three levels. Reading meta.json (`read_meta`, on every open) checks its own checksum, so no byte of it
can change unseen (a folder of format_version 1, which has none, is read as it is). Opening (`ShardDataset`) checks
every file's size against meta.json and that the index covers tokens.bin exactly; reading chunk i checks that its
offsets increase and its length is at most meta.json's `max_chunk_len` (a flipped offset is a ShardError naming the
folder and chunk, never a negative-length chunk) and that its ids are below `id_bound` (meta.json's
`tokenizer.vocab_size`, or the training model's vocabulary when smaller): a flipped high byte in a folder verified
earlier, which the model would reject naming no file, is a ShardError naming tokens.bin, the chunk, the offset and
`twinlm data verify` (one max over the chunk, on the host). `verify_shards(path)` (and `twinlm data verify DIR…`)
also checks every file's sha256, that the whole index is monotonic, starts at 0 and ends at the token count, that
docs.npy and bytes.npy have one entry per chunk, and that every token id is below the tokenizer's vocabulary size
(meta.json `tokenizer.vocab_size`, when recorded). A full pass records the folder's `shard_signature` (meta.json's
hash and every file's size and modification time) in `DIR/.verified.json` when the folder is writable; a training
run's setup (train/setup.py) verifies a folder whose current signature matches no record (its own run's, or the
folder's), so a folder is hashed once, and again whenever it changed; the same pass writes `DIR/.chunk_sums.npy`
(per chunk: its ids' sum and the sum of their running sums, mod 2**32; 8 bytes a chunk, part of the signature), and
while the folder still matches its `.verified.json` every chunk read is checked against them: bit rot after the
verification that keeps the ids in the vocabulary and the mtime (which no signature sees) is a ShardError naming
tokens.bin, the chunk and its bytes (a folder verified only through a run's record, being read-only, has no sums
and no such check); under several ranks the parts of the verification (`verification_parts`: each file's hash, the
structural check) are dealt out among the ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from twinlm.data.tokenizer import tokenizer_fingerprint
from twinlm.errors import MissingShards, ShardError, TokenizerMismatch
from twinlm.io import atomic_dir, atomic_path, dumps_json, sha256_file, write_bytes, write_json

FORMAT_VERSION = 2  # 2: meta.json carries its own checksum (`meta_sha256`); 1 is read without one
_META_SUM = re.compile(rb'"meta_sha256": "([0-9a-f]{64})"')
FILES = ("tokens.bin", "index.npy", "docs.npy", "bytes.npy")
VERIFIED = ".verified.json"  # the signature of the folder's last full verification
# per chunk (its ids' sum, the sum of their running sums) mod 2**32, written by a full verification
SUMS = ".chunk_sums.npy"
_MASK = np.uint64(0xFFFFFFFF)


def _write_npy_from_raw(raw: Path, out: Path, dtype: str, count: int) -> None:
    """Turn a raw little-endian array file into .npy without loading it."""
    header = {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": (count,)}
    with open(out, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        with open(raw, "rb") as r:
            shutil.copyfileobj(r, f, 1 << 22)
    raw.unlink()


class _Aborted(Exception):
    """Thrown into the writer's atomic_dir block by `ShardWriter.abort`: the block ends as if by an error."""


class ShardWriter:
    """Streams chunks into a temporary folder; `close(meta)` verifies, checksums and renames it to `out`."""

    def __init__(self, out: str | Path, vocab_size: int, overwrite: bool = False) -> None:
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise FileExistsError(f"{self.out} exists (pass overwrite=True / --overwrite to replace it)")
        # The writer outlives one `with` block (many `add` calls), so it enters atomic_dir here and leaves it in
        # `close` (rename to `out`, replacing an older folder) or `abort` (the temporary folder is removed).
        self._folder = atomic_dir(self.out, replace=True)
        self.tmp = self._folder.__enter__()
        self.dtype = np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)
        self._tokens = open(self.tmp / "tokens.bin", "wb")
        self._index = open(self.tmp / "index.raw", "wb")
        self._docs = open(self.tmp / "docs.raw", "wb")
        self._bytes = open(self.tmp / "bytes.raw", "wb")
        self._hash = hashlib.sha256()
        self.num_tokens = 0
        self.num_chunks = 0
        self.num_bytes = 0
        self.max_len = 0
        self._index.write(np.zeros(1, dtype="<i8").tobytes())
        self.overwrite = overwrite
        self._done = False

    def add(self, tokens: np.ndarray, lengths: np.ndarray, doc_ids: np.ndarray, nbytes: np.ndarray) -> None:
        """Append chunks given as flat tokens + per-chunk lengths, document ordinals and byte counts."""
        if len(lengths) == 0:
            return
        data = np.ascontiguousarray(tokens, dtype=self.dtype).tobytes()
        self._tokens.write(data)
        self._hash.update(data)
        offsets = self.num_tokens + np.cumsum(lengths, dtype=np.int64)
        self._index.write(offsets.astype("<i8").tobytes())
        self._docs.write(np.asarray(doc_ids, dtype="<i8").tobytes())
        self._bytes.write(np.asarray(nbytes, dtype="<i8").tobytes())
        self.num_tokens = int(offsets[-1])
        self.num_chunks += len(lengths)
        self.num_bytes += int(np.sum(nbytes))
        self.max_len = max(self.max_len, int(np.max(lengths)))

    def abort(self) -> None:
        """Drop the temporary folder (also on a full disk, where closing the files fails); once `close` has
        renamed the folder there is nothing to abort."""
        if self._done:
            return
        self._done = True
        for f in (self._tokens, self._index, self._docs, self._bytes):
            try:
                f.close()
            except OSError:  # buffered data that cannot be written (ENOSPC): the folder goes anyway
                pass
        self._folder.__exit__(_Aborted, _Aborted(), None)

    def close(self, meta: dict[str, Any]) -> dict[str, Any]:
        for f in (self._tokens, self._index, self._docs, self._bytes):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        _write_npy_from_raw(self.tmp / "index.raw", self.tmp / "index.npy", "<i8", self.num_chunks + 1)
        _write_npy_from_raw(self.tmp / "docs.raw", self.tmp / "docs.npy", "<i8", self.num_chunks)
        _write_npy_from_raw(self.tmp / "bytes.raw", self.tmp / "bytes.npy", "<i8", self.num_chunks)
        sha = {"tokens.bin": self._hash.hexdigest()}
        for name in FILES[1:]:
            sha[name] = sha256_file(self.tmp / name)
        meta = {
            "format": "twinlm-shards", "format_version": FORMAT_VERSION, **meta,
            "dtype": self.dtype.name, "num_chunks": self.num_chunks, "num_tokens": self.num_tokens,
            "num_bytes": self.num_bytes, "max_chunk_len": self.max_len,
            "sizes": {name: (self.tmp / name).stat().st_size for name in FILES}, "sha256": sha,
        }
        write_meta(self.tmp, meta)
        self._done = True
        self._folder.__exit__(None, None, None)
        return meta


def write_meta(path: str | Path, meta: dict[str, Any]) -> None:
    """Write `path/meta.json` (atomically) with its own checksum `meta_sha256` as the last field: the sha256 of
    the file's bytes with that value written as 64 zeros."""
    meta = {k: v for k, v in meta.items() if k != "meta_sha256"}
    meta["format_version"] = max(int(meta.get("format_version", FORMAT_VERSION)), FORMAT_VERSION)
    text = dumps_json({**meta, "meta_sha256": "0" * 64}).encode()
    head, sep, tail = text.rpartition(b'"meta_sha256": "' + b"0" * 64)
    digest = hashlib.sha256(text).hexdigest().encode()
    write_bytes(Path(path) / "meta.json", head + b'"meta_sha256": "' + digest + tail)


def read_meta(path: str | Path) -> dict[str, Any]:
    """meta.json of the shard folder `path`, checked: ShardError if it is missing, not JSON, not a shard
    description, or (format_version 2) not what was written (its `meta_sha256`)."""
    path = Path(path)
    if not path.is_dir():
        raise MissingShards(f"{path}: no such shard folder (make one with `twinlm data prepare … --out {path}`)")
    meta_path = path / "meta.json"
    if not meta_path.exists():
        raise ShardError(f"{path}: no meta.json, so not a complete shard folder (an interrupted "
                         "`twinlm data prepare`?); prepare it again")
    raw = meta_path.read_bytes()
    try:
        meta = json.loads(raw.decode("utf-8"))
    except ValueError as e:  # not UTF-8 or not JSON
        raise ShardError(f"{meta_path}: unreadable ({e}): the file is damaged; prepare the shards again") from None
    if not isinstance(meta, dict) or meta.get("format") != "twinlm-shards":
        raise ShardError(f"{meta_path}: not a twinlm shard description; prepare the shards again")
    found = list(_META_SUM.finditer(raw))
    if found:
        m = found[-1]
        zeroed = raw[:m.start(1)] + b"0" * 64 + raw[m.end(1):]
        if hashlib.sha256(zeroed).hexdigest() != m.group(1).decode() or meta.get("meta_sha256") != m.group(1).decode():
            raise ShardError(f"{meta_path}: does not match its own checksum (meta_sha256): the file was altered; "
                             "prepare the shards again")
    elif meta.get("format_version") != 1 or "meta_sha256" in meta:
        raise ShardError(f"{meta_path}: no valid meta_sha256 (format_version {meta.get('format_version')!r} has one): "
                         "the file was altered; prepare the shards again")
    return meta


def shard_signature(path: str | Path) -> dict[str, Any]:
    """A cheap fingerprint of a shard folder's state on disk (no data read): meta.json's sha256 and every
    file's size and modification time. A changed signature means the folder must be verified again."""
    path = Path(path)
    sig: dict[str, Any] = {"meta.json": sha256_file(path / "meta.json")}
    for name in FILES:
        st = (path / name).stat()
        sig[name] = [st.st_size, st.st_mtime_ns]
    if (path / SUMS).exists():  # rewritten sums (a later verification) void the record: verified again
        st = (path / SUMS).stat()
        sig[SUMS] = [st.st_size, st.st_mtime_ns]
    return sig


def is_verified(path: str | Path) -> bool:
    """Whether the folder passed a full `verify_shards` in its current state (its `.verified.json`)."""
    try:
        return json.loads((Path(path) / VERIFIED).read_text()) == shard_signature(path)
    except (OSError, ValueError):
        return False


def read_tokens(path: Path, dtype: str) -> np.ndarray:
    """A shard folder's tokens.bin, memory-mapped read-only (an empty file, as a held-out split of 0 documents
    writes, cannot be mapped: an empty array)."""
    tokens = path / "tokens.bin"
    return np.memmap(tokens, dtype=np.dtype(dtype), mode="r") if tokens.stat().st_size else np.zeros(0, dtype)


def check_contents(path: Path, meta: dict[str, Any]) -> None:
    """The full structural check of `verify_shards`: index, per-chunk arrays and token id range."""
    index = np.load(path / "index.npy", mmap_mode="r")
    n = int(meta["num_chunks"])
    if len(index) != n + 1 or (n >= 0 and len(index) and (int(index[0]) != 0 or int(index[-1]) != meta["num_tokens"])):
        raise ShardError(f"{path / 'index.npy'}: does not cover tokens.bin (0..{meta['num_tokens']}): the file is "
                         "damaged; prepare the shards again")
    limit = int(meta.get("max_chunk_len") or meta["num_tokens"])
    block = 1 << 24
    for start in range(0, n, block):
        d = np.diff(np.asarray(index[start:start + block + 1]))
        bad = np.flatnonzero((d < 0) | (d > limit))
        if len(bad):
            i = start + int(bad[0])
            raise ShardError(f"{path / 'index.npy'}: chunk {i} spans offsets {int(index[i])}..{int(index[i + 1])} "
                             f"(lengths must be 0..{limit}): the file is damaged; prepare the shards again")
    for name in ("docs.npy", "bytes.npy"):
        if len(np.load(path / name, mmap_mode="r")) != n:
            raise ShardError(f"{path / name}: not one entry per chunk ({n}): the file is damaged; prepare again")
    vocab = (meta.get("tokenizer") or {}).get("vocab_size")
    tokens = read_tokens(path, meta["dtype"])
    if vocab:
        for start in range(0, len(tokens), block):
            part = tokens[start:start + block]
            top = int(part.max()) if len(part) else 0
            if top >= vocab:
                at = start + int(np.argmax(part >= vocab))
                raise ShardError(f"{path / 'tokens.bin'}: token {at} has id {int(tokens[at])}, outside the "
                                 f"tokenizer's vocabulary of {vocab}: the file is damaged; prepare the shards again")
    write_chunk_sums(path, tokens, index, n)


def chunk_sums(ids: np.ndarray) -> list[int]:
    """The check sums of one chunk (see `SUMS`): with c its running sums, [c[-1], sum(c)] mod 2**32: any changed
    id changes the first, two ids swapped change the second."""
    c = np.cumsum(ids, dtype=np.uint64)
    return [int(c[-1]) & 0xFFFFFFFF if len(c) else 0, int(c.sum(dtype=np.uint64)) & 0xFFFFFFFF]


def write_chunk_sums(path: Path, tokens: np.ndarray, index: np.ndarray, n: int, block: int = 1 << 20) -> None:
    """Write `SUMS` for every chunk, blockwise and vectorised (from the running sums of each block's tokens and
    their running sums); best effort, like `.verified.json` (a read-only folder gets no read-time check)."""
    if n == 0:
        return
    try:
        with atomic_path(path / SUMS) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint32, shape=(n, 2))
            for c0 in range(0, n, block):
                c1 = min(n, c0 + block)
                offsets = np.asarray(index[c0:c1 + 1], dtype=np.int64)
                rel = offsets - offsets[0]
                zero = np.zeros(1, np.uint64)
                cs = np.concatenate([zero, np.cumsum(tokens[int(offsets[0]):int(offsets[-1])], dtype=np.uint64)])
                cc = np.concatenate([zero, np.cumsum(cs[1:], dtype=np.uint64)])
                a, b = rel[:-1], rel[1:]
                out[c0:c1, 0] = ((cs[b] - cs[a]) & _MASK).astype(np.uint32)
                out[c0:c1, 1] = ((cc[b] - cc[a] - (b - a).astype(np.uint64) * cs[a]) & _MASK).astype(np.uint32)
            out.flush()
            del out
    except OSError:
        pass


def check_sizes(path: Path, meta: dict[str, Any]) -> None:
    """Raise ShardError if a file is missing or of another size than meta.json records (truncated, replaced)."""
    for name in FILES:
        f = path / name
        if not f.exists():
            raise ShardError(f"{path}: {name} is missing")
        size = f.stat().st_size
        if size != meta["sizes"][name]:
            raise ShardError(f"{f}: {size} bytes, meta.json says {meta['sizes'][name]} (truncated or replaced); "
                             "prepare the shards again")


CONTENTS = "contents"  # the verification part that is not one file's hash: check_contents


def verification_parts(meta: dict[str, Any]) -> list[tuple[str, int]]:
    """The independent parts of a full verification, with the bytes each reads: every file's sha256 (named by
    the file) and the structural check (CONTENTS: the index, the per-chunk arrays, the token ids). Parts of
    several folders can be dealt out to several processes (train/verify.py does, over the ranks)."""
    sizes = meta["sizes"]
    contents = int(sizes["index.npy"]) + int(sizes["tokens.bin"])
    return [(name, int(sizes[name])) for name in FILES] + [(CONTENTS, contents)]


def verify_part(path: str | Path, meta: dict[str, Any], part: str) -> None:
    """One part of `verify_shards` (`verification_parts`): raise ShardError naming the file if it fails."""
    path = Path(path)
    if part == CONTENTS:
        check_contents(path, meta)
        return
    got = sha256_file(path / part)
    if got != meta["sha256"][part]:
        raise ShardError(f"{path / part}: sha256 {got[:16]}… differs from meta.json "
                         f"({meta['sha256'][part][:16]}…): the file was altered; prepare the shards again")


def mark_verified(path: str | Path) -> None:
    """Record that the folder passed every part of a full verification in its current state (`.verified.json`;
    best effort: a read-only folder is verified again by the next run)."""
    try:
        write_json(Path(path) / VERIFIED, shard_signature(path))
    except OSError:
        pass


def verify_shards(path: str | Path, checksums: bool = True) -> dict[str, Any]:
    """Raise ShardError if a file is missing, of the wrong size (truncated) or (checksums=True) altered or
    inconsistent (see the module docstring: hashes, index, per-chunk arrays, token ids)."""
    path = Path(path)
    meta = read_meta(path)
    check_sizes(path, meta)
    if checksums:
        for part, _ in verification_parts(meta):
            verify_part(path, meta, part)
        mark_verified(path)
    return meta


class ShardDataset:
    """A prepared shard folder as a dataset: `len(ds)` chunks, `ds[i]` -> np.ndarray of token ids."""

    def __init__(self, path: str | Path, verify: bool = False) -> None:
        self.path = Path(path)
        self.meta = verify_shards(self.path, checksums=verify)
        self.tokens = read_tokens(self.path, self.meta["dtype"])
        self.index = np.load(self.path / "index.npy", mmap_mode="r")
        n = len(self.index)
        if n != self.meta["num_chunks"] + 1 or (n and int(self.index[-1]) != len(self.tokens)):
            raise ShardError(f"{self.path}: index.npy does not match tokens.bin")
        self._docs: np.ndarray | None = None
        self._bytes: np.ndarray | None = None
        self._limit = int(self.meta.get("max_chunk_len") or len(self.tokens))
        # the ids' bound, checked on every chunk read: meta.json's vocabulary (0: none recorded); a trainer
        # lowers it to its model's vocabulary (train/datasets.py)
        self.id_bound = int((self.meta.get("tokenizer") or {}).get("vocab_size") or 0)
        # the sums of the folder's last full verification, when the folder is still in that state (SUMS)
        self._sums: np.ndarray | None = None
        if (self.path / SUMS).is_file() and is_verified(self.path):
            try:
                sums = np.load(self.path / SUMS, mmap_mode="r")
            except (OSError, ValueError):  # a damaged cache: no read-time check until the next verification
                sums = None
            # a plain array over the mapped file: indexing a np.memmap row costs several µs more
            self._sums = np.asarray(sums) if sums is not None and sums.shape == (len(self), 2) else None

    def __len__(self) -> int:
        return len(self.index) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"chunk {i} out of range ({len(self)} chunks)")
        a, b = int(self.index[i]), int(self.index[i + 1])
        if not 0 <= b - a <= self._limit or b > len(self.tokens):
            raise ShardError(f"{self.path / 'index.npy'}: chunk {i} spans offsets {a}..{b} (lengths must be "
                             f"0..{self._limit}): the file is damaged; run `twinlm data verify {self.path}` and "
                             "prepare the shards again")
        ids = np.asarray(self.tokens[a:b])
        if self.id_bound and len(ids) and int(ids.max()) >= self.id_bound:
            j = int(np.argmax(ids >= self.id_bound))
            where = f"token {a + j} (byte {(a + j) * self.tokens.dtype.itemsize}, chunk {i})"
            raise ShardError(f"{self.path / 'tokens.bin'}: {where} is id {int(ids[j])}, outside the "
                             f"vocabulary of {self.id_bound}: the file was altered since it was verified (bit rot?); "
                             f"run `twinlm data verify {self.path}` and prepare or copy the shards again")
        if self._sums is not None and chunk_sums(ids) != [int(self._sums[i, 0]), int(self._sums[i, 1])]:
            raise ShardError(f"{self.path / 'tokens.bin'}: chunk {i} (tokens {a}..{b}, bytes "
                             f"{a * self.tokens.dtype.itemsize}..{b * self.tokens.dtype.itemsize}) differs from its "
                             f"check sums in {SUMS}, recorded when the folder was verified: one of the two was "
                             f"altered since (bit rot?); run `twinlm data verify {self.path}` and prepare or copy "
                             "the shards again")
        return ids

    @property
    def fingerprint(self) -> str:
        return self.meta["tokenizer"]["fingerprint"]

    @property
    def num_tokens(self) -> int:
        return int(self.meta["num_tokens"])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(np.asarray(self.index))

    @property
    def doc_ids(self) -> np.ndarray:
        if self._docs is None:
            self._docs = np.load(self.path / "docs.npy", mmap_mode="r")
        return self._docs

    @property
    def chunk_bytes(self) -> np.ndarray:
        """UTF-8 bytes each chunk stands for (for bits per byte)."""
        if self._bytes is None:
            self._bytes = np.load(self.path / "bytes.npy", mmap_mode="r")
        return self._bytes

    def __repr__(self) -> str:
        return f"ShardDataset({str(self.path)!r}, chunks={len(self)}, tokens={self.num_tokens})"


def check_tokenizer(dataset: Any, tokenizer: Any, where: str | Path | None = None) -> None:
    """Raise TokenizerMismatch unless `dataset` (ShardDataset, Mixture, folder path, or meta dict) was made with
    `tokenizer` (a tokenizer, a folder, or a fingerprint string). The trainer calls this before training.
    `where`: the folder a meta dict was read from (named in the error)."""
    if isinstance(tokenizer, str) and len(tokenizer) == 64 and not Path(tokenizer).exists():
        want = tokenizer
    else:
        want = tokenizer_fingerprint(tokenizer)
    if isinstance(dataset, (str, Path)):
        metas = [(str(dataset), read_meta(dataset))]
    elif isinstance(dataset, dict):
        metas = [(str(where or "shards"), dataset)]
    elif hasattr(dataset, "datasets"):
        metas = [(str(getattr(d, "path", d)), d.meta) for d in dataset.datasets]
    else:
        metas = [(str(getattr(dataset, "path", dataset)), dataset.meta)]
    for where, meta in metas:
        got = meta["tokenizer"]["fingerprint"]
        if got != want:
            raise TokenizerMismatch(
                f"{where} was prepared with tokenizer {meta['tokenizer'].get('name', '?')} "
                f"(fingerprint {got[:12]}…), but this run uses fingerprint {want[:12]}…: prepare the data again "
                "with the recipe's tokenizer (`twinlm data prepare --tokenizer DIR`) or point the recipe at the "
                "tokenizer the shards were made with")
