"""Shard verification at a run's start is dealt out over the ranks: each verifies its share of the parts (every
file's hash, the structural check), and a damaged folder stops every rank with the same one-line error."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from agents import env
from twinlm.cli import main
from twinlm.data.shards import (
    SUMS,
    VERIFIED,
    ShardDataset,
    is_verified,
    shard_signature,
    verification_parts,
    verify_shards,
)
from twinlm.errors import ShardError
from twinlm.train import run
from twinlm.train.testing import make_shards, tiny_recipe
from twinlm.train.verify import VERIFIED_SHARDS, deal

VERIFY = '''
import json, sys
from pathlib import Path
from twinlm.errors import ShardError
from twinlm.train import dist
from twinlm.train.verify import verify_run_shards

env = dist.init()
lines = []
try:
    verify_run_shards(sys.argv[2:], Path(sys.argv[1]), env, lines.append)
    error = None
except ShardError as e:
    error = str(e)
json.dump({"lines": lines, "error": error}, open(f"{sys.argv[1]}/rank{env.rank}.json", "w"))
dist.shutdown()
'''


def verify_on_two_ranks(tmp_path, out, folders):
    script = tmp_path / "verify.py"
    script.write_text(VERIFY)
    out.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(script),
           str(out), *map(str, folders)]
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    printed = p.stdout + p.stderr  # rank 1 prints its own lines; rank 0's go to the log (collected above)
    return ranks, printed


@pytest.mark.distributed
def test_two_ranks_share_the_verification_and_agree_on_a_damaged_folder(tmp_path):
    folders = [make_shards(tmp_path / f"shards{i}", n_docs=40 + 10 * i, seed=i) for i in range(4)]
    ranks, printed = verify_on_two_ranks(tmp_path, tmp_path / "run", folders)
    assert ranks[0]["error"] is None and ranks[1]["error"] is None
    own = [line for line in ranks[0]["lines"] if line.startswith("rank 0: verified ")]
    other = [line for line in printed.splitlines() if line.startswith("rank 1: verified ")]
    parts = sum(len(verification_parts(json.loads((f / "meta.json").read_text()))) for f in folders)
    assert own and other and len(own) + len(other) == parts  # every part once, on one of the two ranks
    record = json.loads((tmp_path / "run" / VERIFIED_SHARDS).read_text())
    for f in folders:
        assert record[str(f)] == shard_signature(f)
        assert json.loads((f / VERIFIED).read_text()) == shard_signature(f)

    # a flipped byte in one folder's index header (numpy cannot even read it; the rank that checks the structure
    # sees that, another the hash): both ranks stop with the same error, the hash's
    damaged = make_shards(tmp_path / "damaged", n_docs=50, seed=9)
    raw = bytearray((damaged / "index.npy").read_bytes())
    raw[12] ^= 0x20
    (damaged / "index.npy").write_bytes(bytes(raw))
    ranks, _ = verify_on_two_ranks(tmp_path, tmp_path / "run2", [*folders, damaged])
    assert ranks[0]["error"] == ranks[1]["error"]
    assert ranks[0]["error"].startswith(f"{damaged / 'index.npy'}: sha256 ")
    assert not (damaged / VERIFIED).exists()


def test_parts_are_dealt_largest_first_to_the_least_loaded_rank():
    parts = [("a", "tokens.bin", 100), ("a", "contents", 120), ("b", "tokens.bin", 50), ("b", "index.npy", 10),
             ("c", "tokens.bin", 60)]
    shares = deal(parts, 2)
    assert sorted(p for s in shares for p in s) == sorted(parts)
    assert [sum(p[2] for p in s) for s in shares] == [170, 170]
    assert deal(parts, 1) == [sorted(parts, key=lambda p: -p[2])]
    assert deal(parts[:1], 3) == [[parts[0]], [], []]


def test_SH13_an_out_of_vocabulary_id_in_a_verified_folder_names_the_file(tmp_path):
    # bit rot after the full verification (mtime kept, so the record still matches): the out-of-vocabulary id a
    # flipped high byte makes is caught as the chunk is read, naming tokens.bin and `twinlm data verify`
    shards = make_shards(tmp_path / "shards", n_docs=40)
    verify_shards(shards)
    assert (shards / VERIFIED).is_file()
    tokens = shards / "tokens.bin"
    stat = tokens.stat()
    index = np.load(shards / "index.npy")
    data = bytearray(tokens.read_bytes())
    for start in index[:-1]:  # every chunk's second token gets a high byte of 0xF0 (id >= 61440 > 4096)
        data[2 * int(start) + 3] = 0xF0
    tokens.write_bytes(bytes(data))
    os.utime(tokens, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert is_verified(shards)  # the record cannot see it: the read-time check must
    ds = ShardDataset(shards)
    ds.id_bound = 4096  # what the trainer sets: its model's vocabulary (these synthetic shards record none)
    with pytest.raises(ShardError, match=r"tokens.bin: token \d+ \(byte \d+, chunk 0\) is id 6\d{4}, outside the "
                                         r"vocabulary of 4096: .*twinlm data verify"):
        ds[0]
    with pytest.raises(ShardError, match="tokens.bin: token .*outside the vocabulary"):
        run({**tiny_recipe(shards, phases=1, tokens=200, batch_size=4), "max_steps": 1}, tmp_path / "run")
    assert not (tmp_path / "run" / "final").exists()


def test_SH10_in_vocabulary_bit_rot_in_a_verified_folder_is_caught_by_the_chunk_sums(tmp_path, capsys):
    # a flipped low bit (the id stays in the vocabulary) with the mtime kept: the size+mtime record still matches,
    # so no hash pass runs; the chunk's sums, recorded by the full verification, name it as it is read
    shards = make_shards(tmp_path / "shards", n_docs=20)
    verify_shards(shards)
    assert (shards / SUMS).is_file() and is_verified(shards)
    intact = [ShardDataset(shards)[i].copy() for i in range(20)]  # every chunk passes its sums
    tokens = shards / "tokens.bin"
    stat = tokens.stat()
    index = np.load(shards / "index.npy")
    data = bytearray(tokens.read_bytes())
    at = int(index[7]) + 3  # a token of chunk 7
    data[2 * at] ^= 0x01
    tokens.write_bytes(bytes(data))
    os.utime(tokens, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert is_verified(shards)
    ds = ShardDataset(shards)
    assert [ds[i].tolist() for i in range(7)] == [c.tolist() for c in intact[:7]]
    with pytest.raises(ShardError, match=r"tokens.bin: chunk 7 \(tokens \d+..\d+, bytes \d+..\d+\) differs from its "
                                         r"check sums in .chunk_sums.npy.*twinlm data verify"):
        ds[7]
    # a swap of two tokens inside a chunk (the plain sum unchanged) is caught by the position-weighted sum
    swapped = tmp_path / "swapped"
    make_shards(swapped, n_docs=20)
    verify_shards(swapped)
    st = (swapped / "tokens.bin").stat()
    t = np.fromfile(swapped / "tokens.bin", dtype=np.uint16)
    j = int(np.load(swapped / "index.npy")[2]) + 1
    assert t[j] != t[j + 1]
    t[j], t[j + 1] = t[j + 1], t[j]
    t.tofile(swapped / "tokens.bin")
    os.utime(swapped / "tokens.bin", ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ShardError, match="chunk 2 .* differs from its check sums"):
        ShardDataset(swapped)[2]
    # and `twinlm data verify` hashes whatever the record says
    capsys.readouterr()
    assert main(["data", "verify", str(shards)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tokens.bin: sha256" in err[0] and "differs from meta.json" in err[0]
