"""Batch-order records, like the paper's released data order: for each checkpoint interval a parquet file
of (step, rank, position, sample_id, input_ids).

    RUN/data_order/<interval>/rank-00000.parquet     one file per rank (each rank records its own share)

Columns: step int64, rank int32, position int32 (the sample's place in that rank's step), sample_id int64,
input_ids list<int32>. Files are written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from twinlm.data.tokenizer import load_tokenizer
from twinlm.errors import MissingArtifactError, StepNotRecorded
from twinlm.io import atomic_path


def _to_list(x: Any) -> list[int]:
    if hasattr(x, "tolist"):
        return [int(v) for v in x.tolist()]
    return [int(v) for v in x]


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
        self._rows: dict[str, list] = {"step": [], "rank": [], "position": [], "sample_id": [], "input_ids": []}
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
        # pyarrow is imported where it is used: `import twinlm.data` (every training rank) stays light.
        import pyarrow as pa
        import pyarrow.parquet as pq
        if not len(self):
            return None
        table = pa.table({
            "step": pa.array(self._rows["step"], pa.int64()),
            "rank": pa.array(self._rows["rank"], pa.int32()),
            "position": pa.array(self._rows["position"], pa.int32()),
            "sample_id": pa.array(self._rows["sample_id"], pa.int64()),
            "input_ids": pa.array(self._rows["input_ids"], pa.list_(pa.int32())),
        })
        final = self.root / interval_name / f"rank-{self.rank:05d}.parquet"
        with atomic_path(final) as tmp:
            pq.write_table(table, tmp)
        for v in self._rows.values():
            v.clear()
        self._positions.clear()
        return final


def _order_root(run: str | Path) -> Path:
    run = Path(run)
    if (run / "data_order").is_dir():
        return run / "data_order"
    if run.name == "data_order" and run.is_dir():
        return run
    raise MissingArtifactError(f"{run}: no data_order/ folder: not a training run folder, or the run has not reached "
                               "its first checkpoint (`twinlm train` records the batches of each checkpoint interval)")


def read_step(run: str | Path, step: int) -> list[dict[str, Any]]:
    """The recorded rows of one step, all ranks, in global batch order (rank r's i-th sample is global
    position i·world_size + r)."""
    import pyarrow.dataset as pads  # half a second to import: only reading records needs it
    root = _order_root(run)
    rows = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(folder.glob("rank-*.parquet"))
        if not files:
            continue
        ds = pads.dataset([str(f) for f in files], format="parquet")
        table = ds.to_table(filter=pads.field("step") == step)
        if table.num_rows:
            rows.extend(table.to_pylist())
    if not rows:
        raise StepNotRecorded(f"step {step} is not recorded under {root} (records exist only for the steps up to "
                              "the run's last checkpoint)")
    world = max(r["rank"] for r in rows) + 1
    rows.sort(key=lambda r: (r["position"] * world + r["rank"]))
    return rows


def replay_step(run: str | Path, step: int) -> list[tuple[int, np.ndarray]]:
    """The exact samples of a recorded step as (sample_id, tokens), in global batch order."""
    return [(r["sample_id"], np.asarray(r["input_ids"], dtype=np.int64)) for r in read_step(run, step)]


def show_step(run: str | Path, step: int, tokenizer: str | Path | None = None, out: str | Path | None = None,
              max_chars: int = 300, file: Any = None) -> list[dict[str, Any]]:
    """Print (or write to parquet `out`) the batch of a recorded step; decode with `tokenizer` if given
    (default: RUN/final or RUN/tokenizer when they hold a tokenizer)."""
    file = file or sys.stdout
    rows = read_step(run, step)
    if out:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), str(out))
        print(f"{out}: {len(rows)} samples of step {step}", file=file)
        return rows
    tok = None
    if tokenizer is None:
        for cand in (Path(run) / "final", Path(run) / "tokenizer"):
            if (cand / "tokenizer.json").exists():
                tokenizer = cand
                break
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    total = sum(len(r["input_ids"]) for r in rows)
    print(f"step {step}: {len(rows)} samples, {total} tokens", file=file)
    for r in rows:
        ids = r["input_ids"]
        if tok is not None:
            text = tok.decode(ids)
        else:
            text = " ".join(map(str, ids))
        if len(text) > max_chars:
            text = text[:max_chars] + "…"
        print(f"[rank {r['rank']} #{r['position']}] sample {r['sample_id']} ({len(ids)} tokens): {text!r}", file=file)
    return rows
