"""Batch-order records, like the paper's released data order, and their exact replay.

Two layouts are read, recognised by what is on disk (`OrderFolder`):

- twinlm's own records (`record_order: true`), one folder per checkpoint interval, one file per rank:

      RUN/data_order/step-XXXXXXXX/rank-RRRRR.parquet
      columns: step int64 (the run's global optimizer step, 1-based), rank int32, position int32 (the sample's
      place in that rank's share), sample_id int64, input_ids list<int32>

  A step's global batch is its rows sorted by position·world_size + rank (rank r took every world_size-th).
- the released Ettin layout: folders per checkpoint interval named `checkpoint_*` (pre-training), `ext_*`
  (context extension) and `decay_*` (decay) holding parquet files (`steps_000001_to_000100.parquet`) with an
  `input_ids` column and a `step` column; step numbers restart in each phase, so one group (`checkpoint`,
  `ext` or `decay`) is read at a time. A step's batch is its rows in file order; the sample id of a row is
  its ordinal in the group (what the masking hash is salted with).

An order folder's steps must be contiguous (a gap or an overlap between intervals is a `DataError` naming
both); each step read is checked (rows present, length at most the phase's `seq_len`, ids below the
vocabulary size) before a single token of it is trained on. `ReplayStream` serves a phase its batches from an
order folder with the same interface as `BatchStream`, so training consumes exactly the recorded batches
(step k of the phase reads order step `first_step + k − 1`) and resumes exactly (its state is the number of
steps consumed). Records are written under a temporary name and renamed when complete.

Checksums: every parquet file has a record `FILE.parquet.sha256` beside it (one manifest line, `<sha256>
FILE.parquet`, io.py's format). twinlm writes it with each record; a file without one (a released order, or
a record whose checksum file was lost) gets it on its first read when the folder is writable (a fingerprint:
damage before that first read is not seen, nor is any damage in a read-only released folder). Each file is
hashed once per `OrderFolder` before its first row is used, and a file that differs from its record is a
`DataError` naming it (fetch it again, or for a run's own records, train the interval again).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from twinlm.errors import ConfigError, DataError, MissingArtifactError, StepNotRecorded, TokenizerMismatch
from twinlm.io import atomic_path, read_manifest, sha256_file, write_bytes


def _to_list(x: Any) -> list[int]:
    if hasattr(x, "tolist"):
        return [int(v) for v in x.tolist()]
    return [int(v) for v in x]


ORDER_COLUMNS = ("step", "rank", "position", "sample_id", "input_ids")  # twinlm's records, in file order


def write_order_file(path: str | Path, columns: Mapping[str, Sequence[Any]]) -> None:
    """Atomically write rows given column by column (`ORDER_COLUMNS`; input_ids: one list of ints per row) as
    a parquet file of twinlm's layout: step int64, rank int32, position int32, sample_id int64, input_ids
    list<int32>; then its sha256 record beside it (`checksum_path`)."""
    # pyarrow is imported where it is used: `import twinlm.data` (every training rank) stays light.
    import pyarrow as pa
    import pyarrow.parquet as pq
    types = {"step": pa.int64(), "rank": pa.int32(), "position": pa.int32(), "sample_id": pa.int64(),
             "input_ids": pa.list_(pa.int32())}
    table = pa.table({name: pa.array(columns[name], types[name]) for name in ORDER_COLUMNS})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    record_checksum(Path(path))


def checksum_path(file: Path) -> Path:
    """Where the sha256 record of an order file lies (module docstring)."""
    return file.with_name(file.name + ".sha256")


def record_checksum(file: Path, digest: str | None = None) -> None:
    """Write the sha256 record of an order file (`digest`, else hashed now)."""
    write_bytes(checksum_path(file), f"{digest or sha256_file(file)}  {file.name}\n")


def check_checksum(file: Path) -> None:
    """Compare an order file with its sha256 record, recording one where there is none and the folder is writable
    (module docstring); a mismatch or a damaged record is a `DataError` naming the file."""
    record = checksum_path(file)
    digest = sha256_file(file)
    if not record.exists():
        try:
            record_checksum(file, digest)
        except OSError:  # a read-only released folder: read on trust (docs/bad-input.md)
            pass
        return
    listed = read_manifest(record, lambda what: DataError(f"{record}: the checksum record {what}: delete it to record "
                                                          "the file's current state, or fetch the folder again"))
    if listed.get(file.name) != digest:
        raise DataError(f"{file}: sha256 {digest[:16]}… differs from {record.name} "
                        f"({(listed.get(file.name) or 'no entry')[:16]}…): the file was altered; fetch the order "
                        "folder again (a run's own records: train that checkpoint interval again)")


def verify_order_folder(path: str | Path) -> dict[str, int]:
    """Compare every parquet file of a batch-order folder (or a run's `data_order/`) with its sha256 record,
    writing nothing: a mismatch or a damaged record is a `DataError` naming the file (check_checksum's);
    {"files", "unrecorded"} (files without a record yet: a released folder not read before)."""
    root = Path(path) / "data_order" if (Path(path) / "data_order").is_dir() else Path(path)
    files = sorted(root.rglob("*.parquet"))
    recorded = [f for f in files if checksum_path(f).exists()]
    for f in recorded:
        check_checksum(f)
    return {"files": len(files), "unrecorded": len(files) - len(recorded)}


class OrderRecorder:
    """Collects the batches of one checkpoint interval; `flush(interval_name)` writes them.

    recorder = OrderRecorder(run_dir, rank=rank)
    recorder.record(step, sample_ids, input_ids)   # input_ids: one sequence per sample (lists/arrays/tensors),
                                                   # or a PackedBatch via record_batch(step, batch)
    recorder.flush("step-00001000")                # at each checkpoint: RUN/data_order/step-00001000/rank-00000.parquet
    """

    def __init__(self, run_dir: str | Path, rank: int = 0) -> None:
        self.root = Path(run_dir) / "data_order"
        self.rank = int(rank)
        self._rows: dict[str, list] = {name: [] for name in ORDER_COLUMNS}
        self._positions: dict[int, int] = {}

    def record(self, step: int, sample_ids: Sequence[int], input_ids: Sequence[Any]) -> None:
        sample_ids = _to_list(sample_ids)
        if len(sample_ids) != len(input_ids):
            raise ValueError(f"{len(sample_ids)} sample ids but {len(input_ids)} sequences")
        pos = self._positions.get(step, 0)
        for sid, seq in zip(sample_ids, input_ids):
            self._rows["step"].append(int(step))
            self._rows["rank"].append(self.rank)
            self._rows["position"].append(pos)
            self._rows["sample_id"].append(sid)
            self._rows["input_ids"].append(_to_list(seq))
            pos += 1
        self._positions[step] = pos

    def record_batch(self, step: int, batch: Any) -> None:
        """Record a PackedBatch (its documents in order)."""
        self.record(step, batch.sample_ids, batch.sequences())

    def __len__(self) -> int:
        return len(self._rows["step"])

    def flush(self, interval_name: str) -> Path | None:
        """Write the rows recorded since the last flush to RUN/data_order/<interval_name>/rank-XXXXX.parquet."""
        if not len(self):
            return None
        final = self.root / interval_name / f"rank-{self.rank:05d}.parquet"
        write_order_file(final, self._rows)
        for v in self._rows.values():
            v.clear()
        self._positions.clear()
        return final


_RELEASED = re.compile(r"^(checkpoint|ext|decay)_")


def _released_group(name: str) -> str:
    """The phase group of a released order folder's name (`checkpoint_*`, `ext_*`, `decay_*`)."""
    m = _RELEASED.match(name)
    if m is None:
        raise ValueError(f"{name} is not a released batch-order folder name")
    return m.group(1)
ORDER_GROUPS = ("checkpoint", "ext", "decay")  # the released layout's phases: pre-training, extension, decay


def _order_root(run: str | Path) -> Path:
    run = Path(run)
    if (run / "data_order").is_dir():
        return run / "data_order"
    if run.is_dir():
        return run
    raise MissingArtifactError(f"{run}: no data_order/ folder: not a training run folder, or the run has not reached "
                               "its first checkpoint (`twinlm train` records the batches of each checkpoint interval "
                               "when the recipe sets record_order: true)")


def is_order_folder(path: str | Path) -> bool:
    """Whether `path` is a batch-order folder (either layout) or a run folder holding one: the test a recipe's
    `data:` entry goes through to be replayed instead of read as shards."""
    p = Path(path)
    if (p / "data_order").is_dir():
        return True
    if not p.is_dir() or (p / "meta.json").exists():
        return False
    subdirs = [d for d in p.iterdir() if d.is_dir()]
    if any(d.name.startswith("step-") and any(d.glob("rank-*.parquet")) for d in subdirs):
        return True
    if any(_RELEASED.match(d.name) for d in subdirs):
        return True
    return p.name.startswith(tuple(g + "_" for g in ORDER_GROUPS)) and any(p.glob("*.parquet"))


@dataclass
class _Part:
    """One row group of one parquet file: the steps it covers and the ordinal of its first row in the group."""
    file: Path
    row_group: int
    first: int
    last: int
    rows: int
    row_offset: int = 0


@dataclass
class _Interval:
    folder: Path
    parts: list[_Part]

    @property
    def first(self) -> int:
        return min(p.first for p in self.parts)

    @property
    def last(self) -> int:
        return max(p.last for p in self.parts)


class OrderFolder:
    """A batch-order folder of either layout (module docstring), indexed from the parquet metadata only.

    order = OrderFolder("RUN")                          # or RUN/data_order, or a released folder (+ group=)
    order.layout, order.first_step, order.last_step     # "twinlm" | "released"; contiguous steps
    order.rows(k)                                       # step k's global batch: dicts with sample_id, input_ids, …
    """

    def __init__(self, path: str | Path, group: str | None = None) -> None:
        # pyarrow is imported where parquet is read: `import twinlm.data` stays light
        import pyarrow.parquet as pq
        root = _order_root(path)
        self.root = root
        subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        own = [d for d in subdirs if d.name.startswith("step-") and any(d.glob("rank-*.parquet"))]
        released = [d for d in subdirs if _RELEASED.match(d.name)]
        if group is not None and group not in ORDER_GROUPS:
            raise ConfigError(f"order group {group!r}: expected one of {', '.join(ORDER_GROUPS)}")
        if own and not released:
            self.layout, self.group, folders = "twinlm", None, own
        elif released:
            groups = sorted({_released_group(d.name) for d in released}, key=ORDER_GROUPS.index)
            if group is None and len(groups) > 1:
                raise ConfigError(f"{root} holds the batch order of several phases ({', '.join(groups)}), whose "
                                  f"step numbers restart: name one with `order_group: {groups[0]}` in the data entry")
            group = group or groups[0]
            if group not in groups:
                raise MissingArtifactError(f"{root} has no {group}_* folders (it has {', '.join(groups)})")
            self.layout, self.group = "released", group
            folders = [d for d in released if d.name.startswith(group + "_")]
        elif _RELEASED.match(root.name) and any(root.glob("*.parquet")):
            self.layout, self.group, folders = "released", group or _released_group(root.name), [root]
        else:
            raise MissingArtifactError(f"{root}: not a batch-order folder (expected twinlm's step-*/rank-*.parquet "
                                       "records or the released checkpoint_*/ext_*/decay_* parquet folders)")
        intervals = []
        for folder in folders:
            files = sorted(folder.glob("rank-*.parquet" if self.layout == "twinlm" else "*.parquet"))
            parts = [part for f in files for part in self._parts(pq, f)]
            if parts:
                intervals.append(_Interval(folder, parts))
        if not intervals:
            raise DataError(f"{root}: the order folder holds no rows")
        intervals.sort(key=lambda iv: iv.first)
        if self.layout == "released":  # one file sequence: consecutive files continue the steps (a step may straddle)
            parts = sorted((p for iv in intervals for p in iv.parts), key=lambda p: (p.first, p.last))
            for a, b in zip(parts, parts[1:]):
                if b.first > a.last + 1:
                    raise DataError(f"{root}: steps {a.last + 1}–{b.first - 1} are missing between {a.file.name} and "
                                    f"{b.file.name} (a gap in the batch order): restore those files before replaying")
                if b.first < a.last:
                    raise DataError(f"{root}: {a.file.name} and {b.file.name} hold the same steps: drop one")
        for prev, nxt in zip(intervals, intervals[1:]):
            if nxt.first <= prev.last:
                raise DataError(f"{root}: {prev.folder.name} (steps {prev.first}–{prev.last}) and {nxt.folder.name} "
                                f"(steps {nxt.first}–{nxt.last}) overlap: remove the duplicate interval")
            if nxt.first != prev.last + 1:
                raise DataError(f"{root}: steps {prev.last + 1}–{nxt.first - 1} are missing between "
                                f"{prev.folder.name} and {nxt.folder.name} (a gap in the batch order): restore those "
                                "files before replaying")
        offset = 0
        for iv in intervals:
            for part in iv.parts:
                part.row_offset = offset
                offset += part.rows
        self.intervals = intervals
        self.num_rows = offset
        self._cache: tuple[tuple[Path, int], Any] | None = None
        self._checked: set[Path] = set()

    @staticmethod
    def _parts(pq: Any, file: Path) -> list[_Part]:
        try:
            meta = pq.ParquetFile(file).metadata
        except Exception as e:  # pyarrow raises several kinds for a truncated or foreign file
            raise DataError(f"{file}: not a readable parquet file ({e}): fetch it again") from None
        names = [meta.schema.column(i).path.split(".")[0] for i in range(meta.num_columns)]
        if "step" not in names or "input_ids" not in names:
            raise DataError(f"{file}: a batch-order file needs `step` and `input_ids` columns, it has "
                            f"{sorted(set(names))}")
        col = names.index("step")
        parts = []
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            if rg.num_rows == 0:
                continue
            st = rg.column(col).statistics
            if st is not None and st.has_min_max:
                lo, hi = int(st.min), int(st.max)
            else:  # no statistics: read the step column of this row group
                steps = pq.ParquetFile(file).read_row_group(g, columns=["step"]).column("step").to_numpy()
                lo, hi = int(steps.min()), int(steps.max())
            parts.append(_Part(file, g, lo, hi, rg.num_rows))
        return parts

    @property
    def first_step(self) -> int:
        return self.intervals[0].first

    @property
    def last_step(self) -> int:
        return self.intervals[-1].last

    def describe(self) -> str:
        what = "twinlm records" if self.layout == "twinlm" else f"released order, {self.group}_*"
        return f"{self.root} ({what}, steps {self.first_step}–{self.last_step})"

    def _read(self, part: _Part) -> Any:
        import pyarrow.parquet as pq
        key = (part.file, part.row_group)
        if part.file not in self._checked:
            check_checksum(part.file)
            self._checked.add(part.file)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, pq.ParquetFile(part.file).read_row_group(part.row_group))
        return self._cache[1]

    def rows(self, step: int) -> list[dict[str, Any]]:
        """Step `step`'s global batch in order: dicts with step, rank, position, sample_id, input_ids (int64
        array). A step inside the folder's range with no rows is a `DataError` (a gap inside a file)."""
        step = int(step)
        if not self.first_step <= step <= self.last_step:
            raise StepNotRecorded(f"step {step} is not in {self.describe()}")
        out: list[dict[str, Any]] = []
        for iv in self.intervals:
            if not iv.first <= step <= iv.last:
                continue
            for part in iv.parts:
                if not part.first <= step <= part.last:
                    continue
                table = self._read(part)
                steps = table.column("step").to_numpy()
                hits = np.flatnonzero(steps == step)
                if not len(hits):
                    continue
                ids = table.column("input_ids").take(hits).to_pylist()
                cols = {c: table.column(c).take(hits).to_numpy() for c in ("rank", "position", "sample_id")
                        if c in table.column_names}
                for j, h in enumerate(hits):
                    out.append({"step": step,
                                "rank": int(cols["rank"][j]) if "rank" in cols else 0,
                                "position": int(cols["position"][j]) if "position" in cols else len(out),
                                "sample_id": int(cols["sample_id"][j]) if "sample_id" in cols
                                else part.row_offset + int(h),
                                "input_ids": np.asarray(ids[j], dtype=np.int64)})
        if not out:
            raise DataError(f"{self.describe()}: step {step} has no rows (a gap in the batch order): restore the "
                            "file that held it before replaying")
        if self.layout == "twinlm":
            world = max(r["rank"] for r in out) + 1
            out.sort(key=lambda r: r["position"] * world + r["rank"])
        return out


def check_order_out(out: str | Path, overwrite: bool = False) -> None:
    """Refuse `data order --out FILE` over an existing path unless it is an earlier order output (a parquet file
    with twinlm's order columns) or `overwrite` is set: the user's file is never replaced by mistake."""
    path = Path(out)
    if path.is_dir():
        raise ConfigError(f"--out {out} is a folder: name a .parquet file to write the step's rows to")
    if not path.exists() or overwrite:
        return
    import pyarrow.parquet as pq
    try:
        names = pq.ParquetFile(path).schema_arrow.names
    except Exception:  # noqa: BLE001 - any file pyarrow cannot read as parquet is not an order output
        names = []
    if tuple(names) != ORDER_COLUMNS:
        raise ConfigError(f"--out {out} exists and is not an earlier `twinlm data order` output: choose another name "
                          "or pass --overwrite to replace it")


def run_tokenizer_fingerprint(run: str | Path) -> str | None:
    """The tokenizer fingerprint a run folder records (its checkpoints' state.json), or None (a bare order folder)."""
    root = Path(run)
    root = root.parent if root.name == "data_order" else root
    for state in sorted((root / "checkpoints").glob("*/state.json"), reverse=True):
        try:
            fp = json.loads(state.read_text()).get("tokenizer_fingerprint")
        except (OSError, ValueError):
            continue  # a damaged checkpoint: another one, or the ids bound below, decides
        if fp:
            return str(fp)
    return None


def check_order_tokenizer(run: str | Path, tok: Any, rows: Sequence[Mapping[str, Any]], name: str) -> None:
    """Refuse decoding a step with a tokenizer the run was not trained with (its recorded fingerprint), or, for
    an order folder that records none, one too small for the ids (TokenizerMismatch)."""
    from twinlm.data.tokenizer import tokenizer_fingerprint  # here: `import twinlm.data` stays light
    want = run_tokenizer_fingerprint(run)
    if want is not None and tokenizer_fingerprint(tok) != want:
        raise TokenizerMismatch(f"{name} is not the tokenizer {run} was trained with (fingerprint "
                                f"{tokenizer_fingerprint(tok)[:12]}… vs {want[:12]}…): pass the run's tokenizer, or "
                                "leave out --tokenizer to print token ids")
    top = max((int(max(r["input_ids"])) for r in rows if len(r["input_ids"])), default=-1)
    if top >= len(tok):
        raise TokenizerMismatch(f"{name} has {len(tok)} tokens but the step's ids reach {top}: these ids come from "
                                "another tokenizer; pass the one the order was made with")


def read_step(run: str | Path, step: int, group: str | None = None) -> list[dict[str, Any]]:
    """The recorded rows of one step, all ranks, in global batch order (rank r's i-th sample is global
    position i·world_size + r); `input_ids` as lists of ints."""
    order = OrderFolder(run, group=group)
    try:
        rows = order.rows(step)
    except StepNotRecorded:
        raise StepNotRecorded(f"step {step} is not recorded under {order.root} (it holds steps {order.first_step}–"
                              f"{order.last_step}; records exist only up to the run's last checkpoint)") from None
    for r in rows:
        r["input_ids"] = [int(v) for v in r["input_ids"]]
    return rows


def replay_step(run: str | Path, step: int) -> list[tuple[int, np.ndarray]]:
    """The exact samples of a recorded step as (sample_id, tokens), in global batch order."""
    return [(r["sample_id"], np.asarray(r["input_ids"], dtype=np.int64)) for r in read_step(run, step)]


class ReplayStream:
    """A phase's batches served from an order folder, with BatchStream's interface (data/loader.py; trainer
    and planner alike).

    stream = ReplayStream(OrderFolder(path), first_step=1, rank=r, world_size=w, seq_len=1024, vocab_size=50368)
    bs = stream.next_batch_size(scheduled)   # the recorded batch's size (the schedule's `scheduled` is ignored)
    mine = stream.next_step(bs)          # this rank's share [(sample_id, tokens)], rows r, r + w, … (may be empty)
    """

    def __init__(self, order: OrderFolder, first_step: int, rank: int = 0, world_size: int = 1,
                 seq_len: int | None = None, vocab_size: int | None = None) -> None:
        if not order.first_step <= first_step <= order.last_step:
            raise DataError(f"{order.describe()}: the phase would start at order step {first_step}, outside the "
                            "folder (set `start_step:` in the recipe's data entry to a step it holds)")
        self.order = order
        self.first_step = int(first_step)
        self.rank, self.world_size = rank, world_size
        self.seq_len, self.vocab_size = seq_len, vocab_size
        self.position = 0   # steps consumed
        self.step = 0
        self._batch: tuple[int, list[tuple[int, np.ndarray]]] | None = None

    @property
    def next_order_step(self) -> int:
        return self.first_step + self.position

    def _load(self) -> list[tuple[int, np.ndarray]]:
        k = self.next_order_step
        if self._batch is not None and self._batch[0] == k:
            return self._batch[1]
        if k > self.order.last_step:
            raise DataError(f"{self.order.describe()} ends at step {self.order.last_step}, but the phase needs more "
                            "batches: lower the phase's `tokens` or add the following intervals to the folder")
        batch = []
        for r in self.order.rows(k):
            ids = r["input_ids"]
            if self.seq_len is not None and len(ids) > self.seq_len:
                raise DataError(f"{self.order.describe()}: step {k} has a row of {len(ids)} tokens, longer than the "
                                f"phase's seq_len {self.seq_len}: this order belongs to another phase or recipe")
            if len(ids) and (ids.min() < 0 or (self.vocab_size is not None and ids.max() >= self.vocab_size)):
                raise DataError(f"{self.order.describe()}: step {k} has token id {int(ids.max())} outside the "
                                f"vocabulary of {self.vocab_size}: the order was tokenized with another tokenizer "
                                "(set the recipe's `tokenizer:` to the one it was made with)")
            batch.append((int(r["sample_id"]), ids))
        self._batch = (k, batch)
        return batch

    def next_batch_size(self, scheduled: int | None = None) -> int:  # noqa: ARG002 - the recorded size rules
        return len(self._load())

    def next_global(self, global_batch_size: int | None = None) -> list[tuple[int, np.ndarray]]:
        """The whole recorded batch of the next step (every rank's rows, in global order), consumed."""
        batch = self._load()
        if global_batch_size is not None and int(global_batch_size) != len(batch):
            raise DataError(f"step {self.next_order_step} of {self.order.describe()} holds {len(batch)} rows, "
                            f"not the {global_batch_size} asked for")
        self.position += 1
        self.step += 1
        return batch

    def next_step(self, global_batch_size: int | None = None, *,
                  empty_shares: bool = True) -> list[tuple[int, np.ndarray]]:  # noqa: ARG002 - rows decide
        """This rank's share of the recorded batch (empty when the batch has fewer rows than the ranks)."""
        return self.next_global(global_batch_size)[self.rank::self.world_size]

    def next_global_lengths(self, global_batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The next recorded batch's sample ids and lengths, consumed."""
        batch = self.next_global(global_batch_size)
        return (np.asarray([sid for sid, _ in batch], dtype=np.int64),
                np.asarray([len(t) for _, t in batch], dtype=np.int64))

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "replay", "position": int(self.position), "step": int(self.step),
                "first_step": self.first_step, "order": str(self.order.root), "group": self.order.group}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "replay":
            raise ConfigError("the checkpoint's phase read shards, this recipe replays the order folder "
                              f"{self.order.root}: train into a new run folder, or restore the recipe's data")
        if int(state["first_step"]) != self.first_step:
            raise ConfigError(f"the checkpoint replayed from order step {state['first_step']}, the recipe now starts "
                              f"at {self.first_step}: restore the recipe's start_step, or train into a new run folder")
        self.position = int(state["position"])
        self.step = int(state.get("step", self.position))
