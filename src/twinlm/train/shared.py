"""Whether every rank sees the files a run reads and writes: a run folder, shards or a tokenizer that are not on a
filesystem every node shares are refused before step 1, in one line naming the rank and its host.

Rank 0 alone writes the run folder (checkpoints, `final/`, metrics) and picks the checkpoint to resume from, and
every rank reads that checkpoint, the shards and the tokenizer. On nodes with their own disks (a relative `--out`
in a node-local folder, /tmp, a copy of the data on one node) a fresh run would train with every checkpoint on
rank 0's disk only, and the first resume would fail on the other ranks. So:

- `check_visible(paths, env, what)`: every rank tells which of `paths` it sees; one that rank 0 sees and another
  rank does not is a NotShared error on every rank (the same message everywhere, so all of them stop);
- `check_run_folder_shared(out, env)`: rank 0 writes a probe file into the run folder and every rank must see it
  (a fresh run: nothing else in the folder to look for yet).

Paths rank 0 does not see either are left to the checks that report missing things.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from pathlib import Path

from twinlm.errors import ConfigError, NotShared
from twinlm.train import dist

FIX = ("put the run folder, the shards and the tokenizer on a filesystem every node shares (and give absolute "
       "paths, or start every node in the same folder)")
WAIT_VARIABLE = "TWINLM_SHARED_WAIT"  # seconds a rank looks again for a file it does not see (default 30)


def check_visible(paths: list[Path], env: dist.DistEnv, what: str, wait_s: float = 0.0) -> None:
    """Collective. Raise NotShared on every rank if some rank does not see a path of `paths` that rank 0 sees;
    `what` says what the paths are (e.g. "the checkpoint to resume from"). `wait_s`: how long a rank looks
    again for a path it does not see (a file just written elsewhere reaches a network filesystem's clients
    with a delay)."""
    if not env.distributed:
        return
    seen = [_appears(Path(p), wait_s) for p in paths]
    views = dist.all_gather_object({"rank": env.rank, "host": dist.host(), "cwd": os.getcwd(), "seen": seen})
    first = views[0]
    for view in views[1:]:
        for path, ref, own in zip(paths, first["seen"], view["seen"]):
            if ref and not own:
                where = "" if Path(path).is_absolute() else f", relative to {view['cwd']}"
                raise NotShared(f"{path} ({what}) is not visible on rank {view['rank']} (host {view['host']}"
                                f"{where}) but is on rank 0 (host {first['host']}): {FIX}")


def _appears(path: Path, wait_s: float) -> bool:
    """Whether `path` exists, looking again for up to `wait_s` seconds; each look lists its folder first, which
    makes a network filesystem's client drop a cached "no such file" (NFS keeps one for up to ~30 s)."""
    deadline = time.monotonic() + wait_s
    while not path.exists():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)
        with contextlib.suppress(OSError):
            os.listdir(path.parent)
    return True


def probe_wait() -> float:
    """How long a rank waits for rank 0's probe file (TWINLM_SHARED_WAIT, else 30 s): paid only when the run
    folder is not shared, or shared slowly."""
    raw = os.environ.get(WAIT_VARIABLE, "")
    try:
        return max(0.0, float(raw)) if raw.strip() else 30.0
    except ValueError:
        raise ConfigError(f"{WAIT_VARIABLE}={raw!r}: give a number of seconds, or unset it") from None


def check_run_folder_shared(out: Path, env: dist.DistEnv) -> None:
    """Collective, after rank 0 made the run folder: rank 0 writes a probe file into it, every rank must see it
    (NotShared otherwise); the probe is removed."""
    if not env.distributed:
        return
    name = dist.broadcast_object(f".shared-probe-{uuid.uuid4().hex}" if env.is_main else None)
    probe = out / name
    if env.is_main:
        probe.write_text("written by rank 0 to check that every rank sees this run folder\n")
    dist.barrier()
    try:
        check_visible([probe], env, "a file rank 0 wrote into the run folder", wait_s=probe_wait())
    finally:
        dist.barrier()
        if env.is_main:
            probe.unlink(missing_ok=True)
