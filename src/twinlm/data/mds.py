"""MosaicML Streaming (MDS) shard folders, read without the `mosaicml-streaming` package.

Implemented from the format as the package's own writer produces it (mosaicml-streaming 0.13.0,
`streaming/base/format/{index,base/writer,mds/writer,mds/encodings}.py`, read from its wheel):

- `index.json`: `{"version": 2, "shards": [shard, …]}`; each shard: `format: "mds"`, `version: 2`,
  `column_names` (sorted), `column_encodings`, `column_sizes` (bytes for fixed-size encodings, else null),
  `samples`, `compression` (null or `zstd[:level]`, …), `hashes` (algorithm names), `raw_data` and
  `zip_data` (`{basename, bytes, hashes: {algo: hex}}`; `zip_data` null when uncompressed). Files are
  `shard.NNNNN.mds`, compressed `shard.NNNNN.mds.zstd`; `raw_data` describes the decompressed bytes.
- a shard file: uint32 sample count n, uint32 offsets[n + 1] (absolute, little-endian), the shard's config
  JSON, then the samples; sample i is bytes [offsets[i], offsets[i + 1]).
- a sample: one uint32 size for each variable-size column (in column order), then the columns' bytes.
- encodings read here: `str` (UTF-8), `bytes`, `int` (int64), the scalars `uint8`…`uint64`, `int8`…`int64`,
  `float16/32/64`, `str_int`, `str_float`, `json`, and `ndarray[:dtype[:shape]]` (without a dtype: one dtype
  byte first, 8/9/16/17/18/32/33/34/64/65/66 = uint8, int8, uint16, int16, float16, uint32, int32, float32,
  uint64, int64, float64; without a shape: one byte (ndim << 2 | shape dtype 0–3 = uint8…uint64), then the
  shape). Images and `pkl` (pickle runs code) are refused with a `DataError` naming the column.

Checks: a shard file named in the index but absent, of another size than the index says, or whose hash
(any `hashlib` algorithm, and xxh* when `xxhash` is installed) differs is a `DataError` naming the file and
the fix; each shard is checked when first read. A shard listed without any hash this reader can check
(the writer's `hashes=[]`, the default) is read on trust: `unhashed` names such shards, and `twinlm train`
prints one warning naming the folder (bit rot in it cannot be detected; the fix is to write it with
`hashes=["sha1"]`, or to prepare its text with `twinlm data prepare`, whose shards are hashed). A shard
`basename` that is absolute or leads outside the folder (`../x`) is a `DataError` naming index.json: a
folder's index never makes twinlm read another file. zstd shards need the `zstandard` package (optional:
`pip install zstandard`, the `mds` extra).

    folder = MDSFolder("data/pretrain")             # len(folder), folder[i] -> {column: value}
    MDSTokens("data/tokens", column="input_ids")    # a token-id dataset for training (len, [i], lengths)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from twinlm.errors import ConfigError, DataError, MissingShards

_SCALARS = {name: np.dtype(name) for name in ("uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32",
                                              "int64", "float16", "float32", "float64")}
_ND_DTYPES = {8: "uint8", 9: "int8", 16: "uint16", 17: "int16", 18: "float16", 32: "uint32", 33: "int32",
              34: "float32", 64: "uint64", 65: "int64", 66: "float64"}
_SHAPE_DTYPES = {0: "uint8", 1: "uint16", 2: "uint32", 3: "uint64"}
_TEXT = ("str", "str_int", "str_float", "json")


def _base(encoding: str) -> str:
    return encoding.split(":", 1)[0]


def supported(encoding: str) -> bool:
    return _base(encoding) in ("str", "bytes", "int", "ndarray", "str_int", "str_float", "json") or encoding in _SCALARS


def decode(encoding: str, data: bytes) -> Any:
    """One column value from its bytes (module docstring)."""
    base = _base(encoding)
    if base == "str":
        return data.decode("utf-8")
    if base == "bytes":
        return data
    if base == "int":
        return int(np.frombuffer(data, np.int64)[0])
    if encoding in _SCALARS:
        return np.frombuffer(data, _SCALARS[encoding])[0]
    if base == "str_int":
        return int(data.decode("utf-8"))
    if base == "str_float":
        return float(data.decode("utf-8"))
    if base == "json":
        return json.loads(data.decode("utf-8"))
    if base == "ndarray":
        args = encoding.split(":")[1:]
        dtype = args[0] if args else None
        shape = tuple(int(x) for x in args[1].split(",")) if len(args) > 1 else None
        i = 0
        if dtype is None:
            dtype = _ND_DTYPES[data[0]]
            i = 1
        if shape is None:
            ndim, sdt = data[i] >> 2, np.dtype(_SHAPE_DTYPES[data[i] & 3])
            i += 1
            shape = tuple(int(x) for x in np.frombuffer(data[i:i + ndim * sdt.itemsize], sdt))
            i += ndim * sdt.itemsize
        return np.frombuffer(data[i:], np.dtype(dtype)).reshape(shape)
    raise DataError(f"unsupported MDS encoding {encoding!r}")


def _digest(algo: str, data: bytes) -> str | None:
    if algo in hashlib.algorithms_available and not algo.startswith("shake_"):
        return hashlib.new(algo, data).hexdigest()
    if algo.startswith("xxh"):
        try:
            import xxhash  # optional: only for xxh* hashes
        except ImportError:
            return None
        return getattr(xxhash, algo)(data).hexdigest()
    return None


def _decompress(algo: str, data: bytes, size: int, where: str) -> bytes:
    name = algo.split(":", 1)[0]
    if name == "zstd":
        try:
            import zstandard  # optional dependency: only compressed shards need it
        except ImportError:
            raise DataError(f"{where}: zstd-compressed MDS shards need the zstandard package: "
                            "pip install zstandard") from None
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
    if name == "gz":
        import gzip
        return gzip.decompress(data)
    if name == "bz2":
        import bz2
        return bz2.decompress(data)
    raise DataError(f"{where}: MDS compression {algo!r} is not supported here (zstd, gz, bz2 are): decompress the "
                    "folder with mosaicml-streaming first")


class MDSFolder:
    """Random access to the samples of an MDS folder (`index.json` + shards), checked as they are read."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index = self.path / "index.json"
        if not index.is_file():
            raise MissingShards(f"{self.path}: no index.json: not an MDS folder")
        try:
            obj = json.loads(index.read_text())
        except ValueError as e:
            raise DataError(f"{index}: not valid JSON ({e}): the folder was not completely written") from None
        if obj.get("version") != 2:
            raise DataError(f"{index}: MDS index version {obj.get('version')!r}, this reader knows version 2")
        self.shards = obj.get("shards") or []
        if not self.shards:
            raise DataError(f"{index}: lists no shards")
        for i, s in enumerate(self.shards):
            if s.get("format") != "mds":
                raise DataError(f"{index}: shard {i} is in format {s.get('format')!r}; only MDS shards are read")
            for name, enc in zip(s["column_names"], s["column_encodings"]):
                if not supported(enc):
                    raise DataError(f"{self.path}: column {name!r} has the encoding {enc!r}, which twinlm does not "
                                    "read (text, bytes, numbers, json and ndarray columns are read; pickle never)")
            info = s.get("zip_data") or s["raw_data"]
            f = self._file(info)
            if not f.is_file():
                raise MissingShards(f"{self.path}: shard {info['basename']} listed in index.json is missing: "
                                    "download the folder again")
            if f.stat().st_size != int(info["bytes"]):
                raise DataError(f"{f}: {f.stat().st_size} bytes, index.json says {info['bytes']}: the file is "
                                "truncated or altered; download it again")
        first = self.shards[0]
        self.columns = dict(zip(first["column_names"], first["column_encodings"]))
        counts = np.asarray([int(s["samples"]) for s in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self._cache: tuple[int, bytes, np.ndarray] | None = None

    def _file(self, info: dict) -> Path:
        """The shard file `info["basename"]` names, refused unless the name stays inside the folder. The name is
        judged as written, not through symlinks: a hub snapshot's shards are links into its blob store."""
        name = str(info.get("basename") or "")
        if not name or PurePosixPath(name).is_absolute() or Path(name).is_absolute() \
                or ".." in PurePosixPath(name.replace("\\", "/")).parts:
            raise DataError(f"{self.path / 'index.json'}: shard basename {name!r} is not a file inside the folder: "
                            "the index is damaged or hostile; download the folder again")
        return self.path / name

    @property
    def unhashed(self) -> list[str]:
        """The basenames of the shards whose stored file has no hash this reader can check (read on trust)."""
        out = []
        for s in self.shards:
            info = s.get("zip_data") or s["raw_data"]
            if not any(_digest(algo, b"") is not None for algo in (info.get("hashes") or {})):
                out.append(str(info["basename"]))
        return out

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _shard(self, k: int) -> tuple[bytes, np.ndarray]:
        if self._cache is not None and self._cache[0] == k:
            return self._cache[1], self._cache[2]
        s = self.shards[k]
        stored = s.get("zip_data") or s["raw_data"]
        f = self._file(stored)
        data = f.read_bytes()
        self._check(f, data, stored)
        if s.get("zip_data"):
            data = _decompress(s.get("compression") or "", data, int(s["raw_data"]["bytes"]), str(f))
            self._check(f, data, s["raw_data"], "decompressed ")
        n = int(np.frombuffer(data[:4], np.uint32)[0])
        if n != int(s["samples"]):
            raise DataError(f"{f}: holds {n} samples, index.json says {s['samples']}: download it again")
        offsets = np.frombuffer(data[4:4 + 4 * (n + 1)], np.uint32).astype(np.int64)
        self._cache = (k, data, offsets)
        return data, offsets

    def verify(self) -> dict[str, int]:
        """Read every shard, checking its size, hashes and sample count as a training read does (DataError naming
        the file): {"shards", "samples", "unhashed"} (`unhashed` shards were read on trust)."""
        for k in range(len(self.shards)):
            self._shard(k)
        return {"shards": len(self.shards), "samples": len(self), "unhashed": len(self.unhashed)}

    @staticmethod
    def _check(f: Path, data: bytes, info: dict, what: str = "") -> None:
        if len(data) != int(info["bytes"]):
            raise DataError(f"{f}: {what}size {len(data)} differs from index.json's {info['bytes']}: download it again")
        for algo, want in (info.get("hashes") or {}).items():
            got = _digest(algo, data)
            if got is not None and got != want:
                raise DataError(f"{f}: {what}{algo} {got} differs from index.json's {want}: the file is corrupt; "
                                "download it again")

    def locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} of {len(self)}")
        k = int(np.searchsorted(self.starts, i, side="right") - 1)
        return k, i - int(self.starts[k])

    def raw(self, i: int) -> tuple[int, dict[str, bytes]]:
        """(shard, {column: encoded bytes}) of sample i."""
        k, j = self.locate(int(i))
        data, offsets = self._shard(k)
        s = self.shards[k]
        sample = data[offsets[j]:offsets[j + 1]]
        sizes, pos = [], 0
        for size in s["column_sizes"]:
            if size is None:
                size = int(np.frombuffer(sample[pos:pos + 4], np.uint32)[0])
                pos += 4
            sizes.append(int(size))
        out = {}
        for name, size in zip(s["column_names"], sizes):
            out[name] = sample[pos:pos + size]
            pos += size
        return k, out

    def __getitem__(self, i: int) -> dict[str, Any]:
        k, cols = self.raw(i)
        encs = dict(zip(self.shards[k]["column_names"], self.shards[k]["column_encodings"]))
        return {name: decode(encs[name], b) for name, b in cols.items()}


class MDSTokens:
    """An MDS folder of token ids as a training dataset: `ds[i]` -> int array, `lengths`, `num_tokens`,
    `max_id` (the largest id, checked against the recipe's tokenizer). The ids column is `column` (default:
    the one ndarray/bytes column, or `input_ids`/`tokens`); a `bytes` column needs `dtype` (how the writer
    packed the ids, e.g. int64 or uint32)."""

    fingerprint = None  # MDS folders record no tokenizer: the recipe states it and the ids' range is checked

    def __init__(self, path: str | Path, column: str | None = None, dtype: str | None = None) -> None:
        self.folder = MDSFolder(path)
        self.path = self.folder.path
        cols = self.folder.columns
        if column is None:
            ids = [c for c, e in cols.items() if _base(e) in ("ndarray", "bytes")]
            named = [c for c in ("input_ids", "tokens") if c in cols]
            column = named[0] if named else ids[0] if len(ids) == 1 else None
            if column is None:
                raise ConfigError(f"{self.path}: which column holds the token ids? It has {cols}: set `column:` in "
                                  "the recipe's data entry")
        if column not in cols:
            raise ConfigError(f"{self.path}: no column {column!r} (it has {', '.join(cols)})")
        enc = cols[column]
        if _base(enc) not in ("ndarray", "bytes"):
            raise DataError(f"{self.path}: column {column!r} is {enc!r}, not token ids (ndarray or bytes): prepare "
                            "text columns with `twinlm data prepare` instead")
        if _base(enc) == "bytes" and not dtype:
            raise ConfigError(f"{self.path}: column {column!r} stores ids as raw bytes: set `dtype:` (e.g. int64 or "
                              "uint32) in the recipe's data entry")
        self.column, self.encoding, self.dtype = column, enc, dtype
        self.meta: dict[str, Any] = {"format": "mds", "column": column, "encoding": enc}
        self._lengths: np.ndarray | None = None
        self._max_id: int | None = None

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int) -> np.ndarray:
        _, cols = self.folder.raw(int(i))
        b = cols[self.column]
        arr = np.frombuffer(b, np.dtype(self.dtype)) if _base(self.encoding) == "bytes" else decode(self.encoding, b)
        return np.asarray(arr).reshape(-1)

    def _scan(self) -> tuple[np.ndarray, int]:
        """Every sample's length and the largest id (read once)."""
        if self._lengths is not None and self._max_id is not None:
            return self._lengths, self._max_id
        lengths = np.empty(len(self), dtype=np.int64)
        top = -1
        for i in range(len(self)):
            a = self[i]
            lengths[i] = len(a)
            if len(a):
                if a.min() < 0:
                    raise DataError(f"{self.path}: sample {i} has a negative token id")
                top = max(top, int(a.max()))
        self._lengths, self._max_id = lengths, top
        return lengths, top

    @property
    def lengths(self) -> np.ndarray:
        return self._scan()[0]

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def max_id(self) -> int:
        return self._scan()[1]

    def __repr__(self) -> str:
        return f"MDSTokens({self.path}, column={self.column!r}, {len(self)} samples)"


def is_mds_folder(path: str | Path) -> bool:
    return (Path(path) / "index.json").is_file()
