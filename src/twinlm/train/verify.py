"""The shard folders a run trains on, verified in full once, the work dealt out over the ranks.

A folder is verified (data/shards.py: every file's sha256, the index, the per-chunk arrays, the token ids) when
its current state matches no record: neither the run's (RUN/verified_shards.json: path -> `shard_signature`) nor
the folder's own (`.verified.json`). Rank 0 decides which folders need it and broadcasts the list; the parts of
their verification (`verification_parts`: one per file's hash, one for the structural check) are dealt out,
largest first, each to the rank with the fewest bytes so far, so terabytes are read by every rank at once
instead of by rank 0 while the others wait in a collective. A rank verifies its hash parts before its structural
ones, and any failure of a part (a hash that differs, a file numpy cannot read) is that folder's damage. The
ranks' problems are gathered and the first (in the folders' order, hashes before structure) is a ShardError on
every rank. When none failed, rank 0 records every folder (its `.verified.json` and the run's record).

One file is hashed by one rank (a sha256 is sequential): a folder's largest file bounds the time. Every rank
plans the same wait from the shares' sizes (at VERIFY_BYTES_PER_S, a slow disk), and when that is longer than
the start-up timeout the collectives wait that long for the verification; `twinlm data verify DIR` beforehand
takes it out of the run's start.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from twinlm.data.shards import (
    CONTENTS,
    FILES,
    check_sizes,
    is_verified,
    mark_verified,
    read_meta,
    shard_signature,
    verification_parts,
    verify_part,
)
from twinlm.errors import MissingShards, ShardError
from twinlm.io import write_json
from twinlm.train import dist

VERIFIED_SHARDS = "verified_shards.json"  # in the run folder: shard folders verified, with their signature
VERIFY_BYTES_PER_S = 200e6  # a slow disk's sha256 rate: what the collectives' wait is planned with
Part = tuple[str, str, int]  # (folder, part, bytes)


def _record(out: Path) -> dict:
    path = out / VERIFIED_SHARDS
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:
        return {}


def unverified(paths: list[str], record: dict) -> tuple[list[str], str | None]:
    """The folders of `paths` whose current state matches no record, and the first problem found on the way (a
    folder too damaged to sign: a missing meta.json is not one, the phase that opens it reports it)."""
    todo: list[str] = []
    for path in sorted(set(paths)):
        try:
            if not Path(path, "meta.json").exists():
                continue
            sig = shard_signature(path)
            if record.get(path) == sig or is_verified(path):
                continue
            check_sizes(Path(path), read_meta(path))
        except MissingShards:
            continue
        except ShardError as e:
            return todo, str(e)
        except OSError:
            continue  # a file missing under the folder: check_sizes's own message comes when it is opened
        todo.append(path)
    return todo, None


def deal(parts: list[Part], ranks: int) -> list[list[Part]]:
    """The parts dealt out: largest first, each to the rank with the fewest bytes so far (ties: lowest rank)."""
    shares: list[list[Part]] = [[] for _ in range(ranks)]
    load = [0] * ranks
    for part in sorted(parts, key=lambda p: (-p[2], p[0], p[1])):
        r = min(range(ranks), key=lambda i: (load[i], i))
        shares[r].append(part)
        load[r] += part[2]
    return shares


def verify_run_shards(paths: list[str], out: Path, env: dist.DistEnv, log: Callable[[str], None]) -> None:
    """Collective: verify the shard folders `paths` that need it (the module docstring), ShardError on every rank
    when one fails."""
    found = (unverified(paths, _record(out)) if env.is_main else None)
    todo, problem = dist.broadcast_object(found)
    if problem:
        raise ShardError(problem)
    if not todo:
        return
    metas = {path: read_meta(path) for path in todo}
    parts = [(path, name, size) for path in todo for name, size in verification_parts(metas[path])]
    total = sum(p[2] for p in parts)
    log(f"verifying {len(todo)} shard folder(s), {total / 1e9:.2f} GB read in all, over {env.world_size} "
        f"rank(s): sha256 of every file, index, token ids")
    shares = deal(parts, env.world_size)
    # every rank's collectives wait for the slowest rank's share: longer than the start-up timeout for a big file
    longest = max(sum(p[2] for p in share) for share in shares) / VERIFY_BYTES_PER_S + 60
    if env.distributed and longest > env.init_timeout_s:
        dist.set_timeout(longest)
    say = log if env.is_main else (lambda m: print(m, file=sys.stderr, flush=True))
    failure: tuple[int, int, str] | None = None
    order = [*FILES, CONTENTS]  # the hashes first, then the structure (verification_parts' order)
    for path, name, size in sorted(shares[env.rank], key=lambda p: order.index(p[1])):
        t0 = time.perf_counter()
        try:
            verify_part(path, metas[path], name)
        except Exception as e:  # noqa: BLE001 - any failure is this folder's damage, reported on every rank
            message = str(e) if isinstance(e, ShardError) else \
                f"{path}: {name} cannot be read ({type(e).__name__}: {e}): the folder is damaged; prepare it again"
            failure = (todo.index(path), order.index(name), message)
            break
        say(f"rank {env.rank}: verified {path} {name} ({size / 1e6:,.1f} MB) in {time.perf_counter() - t0:.1f} s")
    failures = [f for f in dist.all_gather_object(failure) if f is not None]
    if env.distributed and longest > env.init_timeout_s:
        dist.set_timeout(env.init_timeout_s)
    if failures:
        raise ShardError(min(failures)[2])
    if env.is_main:
        record = _record(out)
        for path in todo:
            mark_verified(path)
            record[path] = shard_signature(path)
        write_json(out / VERIFIED_SHARDS, record)
