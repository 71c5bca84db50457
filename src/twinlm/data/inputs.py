"""Input readers: command-line inputs -> (document key, text) pairs, in order (REFERENCE §2).

Inputs: plain text files (one document per file; a file over LARGE_TEXT_BYTES is cut at blank lines into
several), JSONL (`{"text": …}` per line; `.jsonl.gz` too; a `.json` file may be one array of records),
parquet (a text column), MosaicML Streaming folders (`index.json` + shards: a text column, data/mds.py),
folders (searched recursively for those), fetched pre-training sources by name
(`$TWINLM_HOME/pretrain/<name>.jsonl`), and Hugging Face datasets by name (`hf:NAME[:CONFIG][:SPLIT]`, read
with `datasets.load_dataset(..., streaming=True)`; a local file path as NAME uses the builder its suffix names).

Bad input (a missing or empty file, binary or non-UTF-8 content, invalid JSON, a record without the text
field) either stops with a DataError naming the file and line, or is skipped and counted by reason.
The tokenizer trainer and `prepare` both read their text through here.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twinlm.data.fetch import SOURCES, pretrain_files
from twinlm.data.mds import MDSFolder, is_mds_folder
from twinlm.errors import ConfigError, DataError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".text", ".tex", ".html", ".c", ".h", ".js")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
LARGE_TEXT_BYTES = 64 << 20  # a plain text file larger than this is read in pieces (see _iter_large_text)


@dataclass(frozen=True)
class InputSpec:
    kind: str                 # "text" | "jsonl" | "parquet" | "mds" | "hf"
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


def resolve_inputs(items: Iterable[Any] | None, fetched: bool = False,
                   home: str | Path | None = None) -> list[InputSpec]:
    """Turn command-line inputs into InputSpecs. Items: paths (files or folders, searched recursively for
    text/JSONL/parquet files), fetched pre-training source names, `hf:NAME[:CONFIG][:SPLIT]`, or InputSpecs."""
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
        if is_mds_folder(path) or path.name == "index.json" and is_mds_folder(path.parent):
            specs.append(InputSpec("mds", str(path if path.is_dir() else path.parent)))
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".") and _kind_of(p))
            if not found:
                raise DataError(f"{path}: no text, JSONL or parquet files in this folder")
            specs.extend(InputSpec(kind, str(p)) for p in found if (kind := _kind_of(p)))
        elif path.is_file():
            kind = _kind_of(path) or "text"
            specs.append(InputSpec(kind, str(path)))
        elif s in SOURCES:
            for f in pretrain_files(home, [s]):
                specs.append(InputSpec("jsonl", str(f), source=s))
        else:
            raise DataError(f"{s}: no such file or folder, and not a fetched source "
                            f"({', '.join(n for n, x in SOURCES.items() if x.group == 'pretrain')}) "
                            "nor hf:NAME")
    if fetched:
        for f in pretrain_files(home):
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
        raise ConfigError(f"on_bad_input must be 'error' or 'skip', got {on_bad_input!r}")
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
        if spec.kind == "mds":
            yield from _iter_mds(Path(spec.path), text_field, bad)
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
        if n == 0 and _has_no_lines(path):
            bad(_Bad("empty", str(path), "no records"))


def _has_no_lines(path: Path) -> bool:
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
    import pyarrow.parquet as pq  # imported here, like all pyarrow in twinlm.data: the package stays light
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
                reason = "missing_field" if not isinstance(text, str) else "empty"
                bad(_Bad(reason, where, f"no text in {text_field!r}"))
                continue
            yield where, text


def _iter_mds(path: Path, text_field: str, bad) -> Iterator[tuple[str, str]]:
    """The `text_field` column (a text encoding) of an MDS folder, sample by sample."""
    folder = MDSFolder(path)
    enc = folder.columns.get(text_field)
    if enc is None or enc.split(":")[0] not in ("str", "json"):
        raise DataError(f"{path}: no text column {text_field!r} (columns: "
                        f"{', '.join(f'{k} ({v})' for k, v in folder.columns.items())}): pass --text-field NAME")
    for i in range(len(folder)):
        text = folder[i][text_field]
        where = f"{path}:{i}"
        if not isinstance(text, str) or not text.strip():
            bad(_Bad("empty" if isinstance(text, str) else "missing_field", where, f"no text in {text_field!r}"))
            continue
        yield where, text


def _iter_hf(spec: InputSpec, text_field: str, bad) -> Iterator[tuple[str, str]]:
    import datasets  # imported here: over a second to import, and only hf: inputs need it
    kwargs: dict[str, Any] = {"streaming": True}
    name = spec.path
    if Path(name).is_file():  # a single local data file: use the builder its suffix names
        kind = _kind_of(Path(name))
        builder = {"jsonl": "json", "parquet": "parquet", "text": "text"}[kind or "text"]
        kwargs["data_files"] = name
        name = builder
    try:
        ds = datasets.load_dataset(name, spec.config, split=spec.split or "train", **kwargs)
    except (FileNotFoundError, ConnectionError) as e:  # an unknown name; the Hub out of reach and not cached
        raise DataError(f"{spec}: cannot load this Hugging Face dataset ({e}); check the name "
                        "(hf:NAME[:CONFIG][:SPLIT]), or fetch it once where the Hub is reachable") from e
    for i, rec in enumerate(ds):
        got = _field(rec, text_field, f"{spec}:{i}", bad)
        if got is not None:
            yield f"{spec}:{i}", got
