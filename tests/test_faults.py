"""Fault injection: corrupt checkpoints and shards, kill the trainer at chosen and random points (inside
checkpoint writes too), change the recipe under a run, fill a small filesystem; every case asserts what the
user gets (an exact resume, complete metrics, a one-line error, no debris, nothing lost).

The case ids (C09, K02, R10, …) are those of the reliability review. `pytest -m soak tests/test_faults.py`
runs the long randomized versions: TWINLM_SOAK_KILLS random SIGKILLs (default 20) aimed at rows spread over
the whole run, each followed by a restart (the final losses and weights must equal an uninterrupted run's and
metrics.jsonl must hold every step once); TWINLM_SOAK_CORRUPTIONS random injuries (default 2000: a flipped
bit or byte, a truncation, a deleted file, appended garbage) to a checkpoint, a shard folder or a model
folder, each of which must be named by the right error class in one line, then TWINLM_SOAK_COMMANDS more
(default 100), each met by the command a user runs next through the CLI (train resume or export of a
checkpoint, data verify or train on shards, eval bpb or export of a model folder, data order or replay of a
batch-order folder). TWINLM_SOAK_SEED
(default 0) seeds them all.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file

from twinlm.data.shards import ShardDataset, shard_signature, verify_shards, write_meta
from twinlm.errors import ConfigError, CorruptCheckpointError, ShardError
from twinlm.train import run
from twinlm.train.checkpoint import CheckpointManager, verify
from twinlm.train.testing import make_shards, tiny_recipe


# --- helpers ------------------------------------------------------------------------------------------
def flip(path: Path, frac: float = 0.5) -> None:
    """XOR one byte at `frac` of the file with 0xFF."""
    data = bytearray(path.read_bytes())
    data[int(len(data) * frac)] ^= 0xFF
    path.write_bytes(bytes(data))


def steps_logged(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["lr"], r["tokens"]) for r in
            map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def checkpoint_steps(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*") if (p / "COMPLETE").exists())


def recipe_for(shards: Path, **kw) -> dict:
    r = tiny_recipe(shards, objective=kw.pop("objective", "mlm"), phases=2, tokens=kw.pop("tokens", 3000),
                    every_tokens=kw.pop("every_tokens", 150), **kw)
    # a short first phase: its end is a kept checkpoint to fall back to
    r["phases"]["pretrain"].update(tokens=300, batch_warmup_tokens=150, schedule={"warmup_tokens": 75})
    return r


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("faults") / "shards", n_docs=200)


def _quiet(_msg: str) -> None:
    pass


# --- checkpoints -------------------------------------------------------------------------------------
def _save(m: CheckpointManager, step: int, keep: bool = False) -> Path:
    def write(folder):
        (folder / "model.safetensors").write_bytes(os.urandom(256))
    return m.save(step, write, {"keep": keep})


def test_C09_corrupt_newest_checkpoints_do_not_make_the_keep_policy_delete_fresh_ones(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=2, log=_quiet)
    kept = _save(m, 1, keep=True)
    for s in (8, 9):
        flip(_save(m, s) / "model.safetensors")
    assert m.latest() == kept and [p.name for p in m.corrupt] == ["step-00000009", "step-00000008"]
    # even without moving them aside, newer (corrupt) folders are not counted against a fresh save
    fresh = _save(m, 2)
    assert fresh.is_dir()
    moved = m.set_aside_corrupt()
    assert sorted(p.name for p in moved) == ["step-00000008", "step-00000009"]
    assert all(p.parent == tmp_path / "corrupt" for p in moved)
    third = _save(m, 3)
    assert fresh.is_dir() and third.is_dir() and kept.is_dir()
    assert m.latest() == third
    # a second corrupt step-00000009 does not overwrite the first one set aside
    flip(_save(m, 9) / "model.safetensors")
    m.latest()
    assert not (tmp_path / "corrupt" / "step-00000009.1").exists()  # not moved until set aside
    m.set_aside_corrupt()
    assert (tmp_path / "corrupt" / "step-00000009.1").is_dir()


@pytest.mark.parametrize("damage", ["empty", "shortened", "garbage"])
def test_C10_C11_a_damaged_manifest_fails_verification(tmp_path, damage):
    m = CheckpointManager(tmp_path, log=_quiet)
    p = _save(m, 1)
    man = p / "MANIFEST.sha256"
    lines = man.read_text().splitlines()
    man.write_text({"empty": "", "shortened": lines[0] + "\n", "garbage": "not a manifest\n"}[damage])
    with pytest.raises(CorruptCheckpointError, match="MANIFEST"):
        verify(p)
    assert m.latest() is None


def test_C09_trainer_falls_back_moves_corrupt_aside_and_keeps_new_checkpoints(tmp_path, shards):
    recipe = recipe_for(shards)
    out = tmp_path / "run"
    run(recipe, out, ["max_steps=9"], log=_quiet)
    have = checkpoint_steps(out)
    kept_phase_end = [s for s in have if json.loads((out / "checkpoints" / f"step-{s:08d}" / "state.json")
                                                    .read_text()).get("keep")]
    assert kept_phase_end and have[-2:] == [8, 9]
    for s in have:  # every checkpoint but the phase end is corrupt: fall back past `keep_last` of them
        if s not in kept_phase_end:
            flip(out / "checkpoints" / f"step-{s:08d}" / "model.safetensors")
    back = kept_phase_end[-1]
    logs = []
    res = run(recipe, out, [f"max_steps={back + 1}"], log=logs.append)
    assert res == out / "checkpoints" / f"step-{back + 1:08d}" and res.is_dir()  # the named checkpoint exists
    assert any("moved the corrupt checkpoint" in line for line in logs)
    assert sorted(p.name for p in (out / "checkpoints" / "corrupt").iterdir()) == \
        [f"step-{s:08d}" for s in have if s not in kept_phase_end]
    # the next interruption resumes from the fresh checkpoint, not from the phase end again
    logs.clear()
    run(recipe, out, [f"max_steps={back + 2}"], log=logs.append)
    assert any(f"resuming from {res}" in line for line in logs), logs
    assert checkpoint_steps(out)[-2:] == [back + 1, back + 2]
    assert steps_logged(out) == list(range(1, back + 3))


# --- shards ------------------------------------------------------------------------------------------
def _shard_copy(shards: Path, tmp_path: Path) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(shards, out)
    (out / ".verified.json").unlink(missing_ok=True)  # as freshly prepared: not verified yet
    return out


@pytest.mark.parametrize("target", ["tokens.bin", "docs.npy", "bytes.npy"])
def test_S03_a_flipped_byte_inside_a_shard_file_stops_training_naming_the_file(tmp_path, shards, target):
    data = _shard_copy(shards, tmp_path)
    flip(data / target, 0.7)
    ShardDataset(data)  # sizes still match: opening alone cannot see it...
    with pytest.raises(ShardError, match=f"{target}: sha256 .* prepare the shards again"):
        run(recipe_for(data), tmp_path / "run", ["max_steps=1"], log=_quiet)  # ...the first use verifies
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_S06_a_flipped_offset_in_index_is_an_error_not_a_negative_chunk(tmp_path, shards):
    data = _shard_copy(shards, tmp_path)
    idx = np.load(data / "index.npy")
    raw = bytearray((data / "index.npy").read_bytes())
    header = len(raw) - idx.nbytes
    raw[header + 8 * 50 + 1] ^= 0xFF  # one byte of offset 50 (sizes unchanged)
    (data / "index.npy").write_bytes(bytes(raw))
    ds = ShardDataset(data)
    with pytest.raises(ShardError, match="chunk 4[89] spans offsets"):
        ds[49], ds[50]  # noqa: B018 - reading is the test
    with pytest.raises(ShardError, match="index.npy"):
        verify_shards(data)


def test_S02_out_of_vocabulary_ids_and_bad_index_found_by_the_content_check(tmp_path, shards):
    data = _shard_copy(shards, tmp_path)
    meta = json.loads((data / "meta.json").read_text())
    meta["tokenizer"]["vocab_size"] = 1000  # the synthetic ids go up to 4095
    write_meta(data, meta)  # as if prepared so
    with pytest.raises(ShardError, match=r"tokens.bin: token \d+ has id \d+, outside the tokenizer's vocabulary"):
        verify_shards(data)


def test_shards_verified_once_per_run_and_again_when_changed(tmp_path, shards):
    data = _shard_copy(shards, tmp_path)
    recipe, out = recipe_for(data), tmp_path / "run"
    logs: list[str] = []
    run(recipe, out, ["max_steps=1"], log=logs.append)
    assert sum(line.startswith("verifying ") for line in logs) == 1, logs
    logs.clear()
    run(recipe, out, ["max_steps=2"], log=logs.append)
    assert not any(line.startswith("verifying ") for line in logs)
    run(recipe, tmp_path / "run2", ["max_steps=1"], log=logs.append)  # another run: the folder's own record
    assert not any(line.startswith("verifying ") for line in logs)
    flip(data / "tokens.bin", 0.3)
    with pytest.raises(ShardError, match="tokens.bin: sha256"):
        run(recipe, out, ["max_steps=3"], log=_quiet)


def test_data_verify_command(tmp_path, shards):
    data = _shard_copy(shards, tmp_path)
    ok = subprocess.run([sys.executable, "-m", "twinlm", "data", "verify", str(data)], env=_env(),
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "ok (200 chunks" in ok.stdout, ok.stderr
    assert json.loads((data / ".verified.json").read_text()) == shard_signature(data)
    flip(data / "tokens.bin", 0.3)
    bad = subprocess.run([sys.executable, "-m", "twinlm", "data", "verify", str(data)], env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("twinlm: error: ") and "tokens.bin: sha256" in bad.stderr


# --- data preparation and tokenizer: bad inputs --------------------------------------------------------
@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    from twinlm.data.tokenizer import train_tokenizer
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    rng = random.Random(0)
    texts = [" ".join(rng.choice(words) for _ in range(60)) for _ in range(30)]
    return train_tokenizer(None, 300, tmp_path_factory.mktemp("bpe") / "tok", texts=texts)


def _jsonl(path: Path, n: int, words: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    vocab = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(vocab) for _ in range(words))}) + "\n"
                            for _ in range(n)))
    return path


def test_P15_prepare_refuses_an_out_that_is_a_file_or_a_folder_of_other_things(tmp_path, bpe):
    from twinlm.data.prepare import prepare
    docs = _jsonl(tmp_path / "d.jsonl", 10)
    afile = tmp_path / "afile"
    afile.write_text("my notes")
    with pytest.raises(ConfigError, match="is not a folder"):
        prepare([docs], bpe, afile, chunk_size=32, workers=0)
    assert afile.read_text() == "my notes" and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="not a shard folder"):
        prepare([docs], bpe, other, chunk_size=32, workers=0)
    assert (other / "keep.txt").exists()
    # an earlier shard folder is replaced, an empty folder filled
    prepare([docs], bpe, tmp_path / "s", chunk_size=32, workers=0)
    prepare([docs], bpe, tmp_path / "s", chunk_size=32, workers=0)
    (tmp_path / "empty").mkdir()
    prepare([docs], bpe, tmp_path / "empty", chunk_size=32, workers=0)


def test_P16_holding_out_fewer_documents_than_asked_is_recorded_and_warned(tmp_path, bpe, caplog):
    from twinlm.data.prepare import prepare
    docs = _jsonl(tmp_path / "d.jsonl", 40)
    with caplog.at_level("WARNING", logger="twinlm.data.prepare"):
        meta = prepare([docs], bpe, tmp_path / "s", chunk_size=32, workers=0, holdout_docs=100)
    h = meta["holdout"]
    assert h["docs"] == 100 and h["num_documents"] < 100
    assert h["num_documents"] == ShardDataset(h["path"]).meta["num_documents"]
    assert any(f"held out {h['num_documents']} of the 100 documents" in r.getMessage() for r in caplog.records)


def test_the_held_out_split_depends_on_the_texts_not_on_where_the_files_lie(tmp_path, bpe):
    """The same documents under another name in another folder give the same held-out split; a second copy of
    every document falls on its original's side; a split of 0 documents is a shard folder that opens (empty)."""
    from twinlm.data.prepare import prepare

    docs = _jsonl(tmp_path / "d.jsonl", 60)
    (tmp_path / "elsewhere").mkdir()
    moved = tmp_path / "elsewhere" / "renamed.jsonl"
    moved.write_text(docs.read_text())
    twice = tmp_path / "twice.jsonl"
    twice.write_text(docs.read_text() * 2)

    def held(src, out):
        ds = ShardDataset(prepare([src], bpe, tmp_path / out, chunk_size=32, workers=0, holdout_docs=0.3)
                          ["holdout"]["path"])
        return sorted(tuple(ds[i].tolist()) for i in range(len(ds)))

    original = held(docs, "a")
    assert 0 < len(original)
    assert held(moved, "b") == original
    assert held(twice, "c") == sorted(original * 2)
    one = _jsonl(tmp_path / "one.jsonl", 1, seed=5)
    meta = prepare([one], bpe, tmp_path / "s1", chunk_size=32, workers=0, holdout_docs=1e-9)
    assert meta["holdout"]["num_documents"] == 0
    empty = ShardDataset(meta["holdout"]["path"], verify=True)
    assert len(empty) == 0 and empty.meta["num_documents"] == 0


def test_P20_stale_temporary_folders_of_a_killed_prepare_are_removed(tmp_path, bpe):
    from twinlm.data.prepare import prepare
    docs = _jsonl(tmp_path / "d.jsonl", 10)
    stale = tmp_path / ".s.tmp-killed"
    stale.mkdir()
    (stale / "tokens.bin").write_bytes(b"\0" * 1000)
    prepare([docs], bpe, tmp_path / "s", chunk_size=32, workers=0)
    assert not stale.exists() and verify_shards(tmp_path / "s")


def test_T02_tokenizer_train_on_no_text_is_an_error(tmp_path):
    from twinlm.data.tokenizer import train_tokenizer
    from twinlm.errors import DataError
    with pytest.raises(DataError, match="no text to train a tokenizer on"):
        train_tokenizer(None, 300, tmp_path / "tok", texts=["", "   "])
    assert not (tmp_path / "tok").exists()


def test_R18_R19_seq_len_against_the_shards_chunk_size(tmp_path, bpe):
    from twinlm.data.prepare import prepare
    docs = _jsonl(tmp_path / "d.jsonl", 60, words=80)
    data = tmp_path / "s32"
    prepare([docs], bpe, data, chunk_size=32, workers=0)
    longer = tiny_recipe(data, phases=1, tokens=200, seq_len=64, batch_size=4)
    longer["model"]["preset"] = "cpu-tiny"
    with pytest.raises(ConfigError, match="seq_len 64 but .* chunks of at most 32 tokens"):
        run(longer, tmp_path / "long", log=_quiet)
    assert not (tmp_path / "long").exists()  # refused before the run folder was made
    logs: list[str] = []
    shorter = tiny_recipe(data, phases=1, tokens=200, seq_len=16, batch_size=4)
    run(shorter, tmp_path / "short", ["max_steps=1"], log=logs.append)
    assert any("seq_len 16 is shorter than the 32-token chunks" in line for line in logs)


# --- a full disk (a small tmpfs; needs root, skipped elsewhere) ------------------------------------------
@pytest.fixture()
def small_fs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()

    def mount(size_mb: int) -> Path:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mnt)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip() or 'not root'})")
        return mnt

    yield mount
    gc.collect()  # a run stopped by the full disk may still hold its metrics file open
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(folder: Path, leave_mb: float) -> Path:
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    filler = folder / "filler"
    with open(filler, "wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(0, free - int(leave_mb * (1 << 20))))
    return filler


def test_disk_full_during_prepare_leaves_no_debris_and_the_old_shards_intact(tmp_path, bpe, small_fs):
    from twinlm.data.prepare import prepare
    from twinlm.errors import OutOfSpace
    mnt = small_fs(4)
    small, big = _jsonl(tmp_path / "small.jsonl", 20), _jsonl(tmp_path / "big.jsonl", 4000, words=200)
    old = prepare([small], bpe, mnt / "s", chunk_size=64, workers=0)
    _fill(mnt, 0.5)
    with pytest.raises(OutOfSpace, match="is full.* earlier shard folder there is intact"):
        prepare([big], bpe, mnt / "s", chunk_size=64, workers=0)
    assert sorted(p.name for p in mnt.iterdir()) == ["filler", "s"]
    assert verify_shards(mnt / "s")["sha256"] == old["sha256"]


def test_disk_full_during_a_checkpoint_is_one_error_and_the_run_resumes(tmp_path, shards, small_fs):
    from twinlm.errors import OutOfSpace
    mnt = small_fs(48)
    recipe, out = recipe_for(shards), mnt / "run"
    run(recipe, out, ["max_steps=1"], log=_quiet)
    filler = _fill(mnt, 6)  # less than one checkpoint (~13 MB)
    with pytest.raises(OutOfSpace, match="checkpoint step 2 was not written.* newest checkpoint is step-00000001"):
        run(recipe, out, ["max_steps=2"], log=_quiet)
    assert checkpoint_steps(out) == [1] and [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000001"]
    verify(out / "checkpoints" / "step-00000001")
    filler.unlink()
    run(recipe, out, ["max_steps=3"], log=_quiet)
    assert steps_logged(out) == [1, 2, 3] and checkpoint_steps(out)[-1] == 3


@pytest.mark.parametrize("fills_on", ["download", "jsonl"])
def test_disk_full_during_fetch_keeps_earlier_sources_and_the_next_fetch_completes(tmp_path, small_fs, monkeypatch,
                                                                                   fills_on):
    import zipfile

    from twinlm.cli import one_line
    from twinlm.data import fetch as F
    from twinlm.errors import OutOfSpace
    from twinlm.io import sha256_file
    store = tmp_path / "store"
    store.mkdir()

    def archive(name: str, files: dict[str, bytes]) -> F.Archive:
        with zipfile.ZipFile(store / f"{name}-1.0-py3-none-any.whl", "w", zipfile.ZIP_DEFLATED) as z:
            for member, data in files.items():
                z.writestr(member, data)
        return F.Archive("pip", f"{name}==1.0", f"{name}-1.0-py3-none-any.whl",
                         sha256_file(store / f"{name}-1.0-py3-none-any.whl"), version="1.0")

    def downloader(a, dest):
        shutil.copy(store / a.filename, dest / a.filename)
        return dest / a.filename

    def docs(path, source):
        for member, data in F.iter_archive(path, ("text/",)):
            if member.endswith(".txt"):
                yield member, data.decode()

    monkeypatch.setitem(F.PRETRAIN_EXTRACTORS, "test_docs", docs)
    rng = random.Random(0)
    big = ({"text/blob.bin": os.urandom(3 << 20), "text/a.txt": b"some text"} if fills_on == "download" else
           {f"text/{i}.txt": " ".join(f"w{rng.randrange(50)}" for _ in range(30000)).encode() for i in range(20)})
    sources = {"early": F.DataSource("early", "eval", archive("early", {"e/a.txt": b"eval text"}), "MIT", "e",
                                     "unzip"),
               "big": F.DataSource("big", "pretrain", archive("big", big), "MIT", "b", "test_docs")}
    for name, source in sources.items():
        monkeypatch.setitem(F.SOURCES, name, source)
    mnt = small_fs(8)
    root = mnt / "home"
    F.fetch(["early"], root=root, downloader=downloader, sources=sources, decontaminate_with=None, log=_quiet)
    before = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    filler = _fill(mnt, 1)
    with pytest.raises(OutOfSpace) as e:
        F.fetch(root=root, downloader=downloader, sources=sources, decontaminate_with=None, log=_quiet)
    msg = one_line(e.value)
    assert f"the disk holding {root} is full" in msg and "big was not fetched" in msg and "free space" in msg
    after = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    kept = after.pop("downloads/big-1.0-py3-none-any.whl", None)  # the verified archive may stay, whole
    assert (kept is None) == (fills_on == "download")
    assert kept is None or kept == (store / "big-1.0-py3-none-any.whl").read_bytes()
    assert after == before  # the earlier source and manifest intact; nothing else of `big`, no temporaries
    filler.unlink()
    manifest = F.fetch(root=root, downloader=downloader, sources=sources, decontaminate_with=None, log=_quiet)
    assert set(manifest["sources"]) == {"early", "big"} and (root / "pretrain" / "big.jsonl").read_text().strip()
    assert [p.name for p in root.rglob(".*") if p.name != F.LOCK] == []


# --- evaluation: no score from no data, no NaN score, arguments that cannot mean anything -------------
@pytest.fixture(scope="module")
def toy_models(tmp_path_factory):
    from twinlm.eval.toy import toy_model_dir
    root = tmp_path_factory.mktemp("toy")
    return {"encoder": toy_model_dir(root / "enc", causal=False), "decoder": toy_model_dir(root / "dec", causal=True)}


def _twinlm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "twinlm", *map(str, args)], env=_env(), capture_output=True,
                          text=True, timeout=300)


def _one_line_error(p: subprocess.CompletedProcess, *needles: str) -> None:
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("twinlm: error: ") and all(n in last for n in needles), last


def test_E17_E18_bpb_of_an_empty_or_undecodable_file_is_an_error(tmp_path, toy_models):
    from twinlm.errors import ScoreError, TaskFileError
    from twinlm.eval import bpb
    from twinlm.eval.settings import BpbConfig
    empty, blank, latin = tmp_path / "empty.txt", tmp_path / "blank.txt", tmp_path / "latin1.txt"
    empty.write_text("")
    blank.write_text("\n\n   \n\n")
    latin.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    for f in (empty, blank):
        with pytest.raises(ScoreError, match="no text to score"):
            bpb.run(toy_models["encoder"], BpbConfig(text_file=str(f)), out=tmp_path / "r.json", log=None)
    with pytest.raises(TaskFileError, match="latin1.txt: not UTF-8"):
        bpb.run(toy_models["encoder"], BpbConfig(text_file=str(latin)), log=None)
    utf16 = tmp_path / "utf16.txt"  # valid UTF-8 byte for byte (re-run of E18: it was scored as text)
    utf16.write_bytes("plain words here".encode("utf-16-le"))
    with pytest.raises(TaskFileError, match=r"utf16.txt: contains NUL bytes \(byte 1\)"):
        bpb.run(toy_models["encoder"], BpbConfig(text_file=str(utf16)), log=None)
    assert not (tmp_path / "r.json").exists()
    _one_line_error(_twinlm("eval", "bpb", toy_models["encoder"], "--text-file", empty), "empty.txt", "no text")


def test_E08_a_model_producing_nan_gets_no_score(tmp_path, toy_models):
    from safetensors.torch import save_file

    from twinlm.errors import ScoreError
    from twinlm.eval import bpb
    from twinlm.eval.settings import BpbConfig
    bad = tmp_path / "nan-model"
    shutil.copytree(toy_models["decoder"], bad)
    w = load_file(str(bad / "model.safetensors"))
    name = next(k for k in w if "embed" in k and w[k].dim() == 2)
    w[name][:, 3] = float("nan")  # one feature of every token embedding: what a flipped exponent byte does
    save_file(w, str(bad / "model.safetensors"), metadata={"format": "pt"})
    # a model whose own weights produce NaN (as if trained into it): its manifest describes these weights
    (bad / "MANIFEST.sha256").unlink(missing_ok=True)
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"the cat sat on mat number {i} and it was fine" for i in range(8)))
    with pytest.raises(ScoreError, match="non-finite"):
        bpb.run(bad, BpbConfig(text_file=str(text), max_docs=None), out=tmp_path / "r.json", log=None)
    assert not (tmp_path / "r.json").exists()


def test_E15_E19_E20_eval_arguments_that_cannot_mean_anything(tmp_path, toy_models):
    from twinlm.errors import ConfigError
    from twinlm.eval import classify
    from twinlm.eval.settings import ClassifyConfig, RetrievalConfig
    with pytest.raises(ConfigError, match="at least 2 folds"):
        ClassifyConfig(kfold=1)
    with pytest.raises(ConfigError, match="names no seed"):
        ClassifyConfig(seeds=[])
    with pytest.raises(ConfigError, match="names no seed"):
        RetrievalConfig(seeds=0)
    f = tmp_path / "cls.jsonl"
    f.write_text("".join(json.dumps({"text": f"word {i}", "label": i % 2}) + "\n" for i in range(20)))
    with pytest.raises(ConfigError, match="pooling 'cls' on a decoder"):
        classify.run(toy_models["decoder"], ClassifyConfig(pooling="cls", eval_file=str(f), seeds=[0]), log=None)


@pytest.mark.slow
def test_E15_E19_E20_on_the_command_line(toy_models):
    p = _twinlm("eval", "classify", toy_models["decoder"], "--pooling", "cls", "--tasks", "sst2")
    _one_line_error(p, "pooling 'cls' on a decoder")
    _one_line_error(_twinlm("eval", "classify", toy_models["encoder"], "--kfold", "1"), "kfold", "2 folds")
    _one_line_error(_twinlm("eval", "classify", toy_models["encoder"], "--seeds", ","), "no seed")


# --- resume with a changed recipe --------------------------------------------------------------------
@pytest.mark.parametrize("change", [["model.preset=cpu-small"], ["objective=clm"],
                                    ["model.overrides.attention_dropout=0.5"]])
def test_R10_R11_a_resume_that_changes_the_model_is_refused_before_writing(tmp_path, shards, change):
    recipe = recipe_for(shards)
    out = tmp_path / "run"
    run(recipe, out, ["max_steps=2"], log=_quiet)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match="another|restore them"):
        run(recipe, out, change, log=_quiet)
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before  # config.yaml, starts.jsonl, metrics.jsonl untouched; no config.previous.yaml


def test_R05_R08_R16_R20_refused_before_the_run_folder_is_written(tmp_path, shards, bpe):
    """Re-run of the review: shards of another tokenizer (R05) and a missing init_from (R16) were refused only
    after the run folder was made; --out naming a file (R08) was a FileExistsError traceback; a negative
    mixture weight with one source (R20) trained without a word, with two it failed after the model was built."""
    from twinlm.errors import MissingArtifactError, TokenizerMismatch
    recipe = tiny_recipe(shards, phases=1, tokens=400)
    with pytest.raises(TokenizerMismatch, match=f"{shards} was prepared with tokenizer"):
        run({**recipe, "tokenizer": bpe.name_or_path}, tmp_path / "r05", log=_quiet)
    with pytest.raises(MissingArtifactError, match="init_from: .*nope does not exist"):
        run({**recipe, "objective": "mntp", "init_from": str(tmp_path / "nope")}, tmp_path / "r16", log=_quiet)
    afile = tmp_path / "afile"
    afile.write_text("mine")
    with pytest.raises(ConfigError, match="afile exists and is not a folder"):
        run(recipe, afile, log=_quiet)
    assert afile.read_text() == "mine"
    for data in ([{"path": str(shards), "weight": -1}], [{"path": str(shards), "weight": -1}, str(shards)],
                 [{"path": str(shards), "weight": 0}, {"path": str(shards), "weight": 0}]):
        with pytest.raises(ConfigError, match=r"data: weights must be >= 0 with a positive sum"):
            run({**recipe, "data": data}, tmp_path / "r20", log=_quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # no run folder made


def test_R21_R24_optimizer_settings_and_model_overrides_are_refused_before_writing(tmp_path, shards, capsys,
                                                                                  monkeypatch):
    """Re-run of the second review: `optim.lr=-1` (R21), `optim.betas=[0.9,1.5]` (R22), a mistyped override
    key (R23) and `model.overrides.num_layers=4K` (R24) ended in a traceback with config.yaml, env.json and
    starts.jsonl already written. Now: exit 2, one line naming the fix, the run folder as it was; `4K` is
    read as 4000 and meets the resume check or, in a new folder, the memory pre-flight check."""
    import twinlm.train.setup as setup_module
    from twinlm.cli import main

    rp = tmp_path / "recipe.yaml"
    rp.write_text(yaml.safe_dump(tiny_recipe(shards, phases=1, tokens=400), sort_keys=False))
    out = tmp_path / "run"

    def train(folder: Path, *overrides: str) -> tuple[int, str]:
        code = main(["train", str(rp), "--out", str(folder), *overrides])
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return code, err.strip().splitlines()[-1]

    assert train(out, "max_steps=1")[0] == 0
    before = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    cases = [(["optim.lr=-1"], "optim.lr must be a number >= 0"),
             (["optim.betas=[0.9,1.5]"], "optim.betas must both lie in [0, 1)"),
             (["model.overrides.hiden_size=64"], "unknown key model.overrides.hiden_size (did you mean hidden_size?)"),
             (["model.overrides.num_layers=4K"], "model.overrides.num_layers: None -> 4000")]
    for overrides, needle in cases:
        code, line = train(out, *overrides)
        assert code == 2 and line.startswith("twinlm: error: ") and needle in line, line
        assert {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    monkeypatch.setattr(setup_module, "device_memory", lambda device: 4 * 2**30)
    code, line = train(tmp_path / "big", "model.overrides.num_layers=4K")
    assert code == 2 and "GiB per rank" in line and "more than cpu (4.0 GiB)" in line, line
    assert not (tmp_path / "big").exists()


def test_F01_a_damaged_final_folder_of_a_finished_run_is_written_again(tmp_path, shards):
    """Re-run of the review: a finished run returned its corrupted final/ as it was ('already finished')."""
    from twinlm.loading import load
    recipe, out = tiny_recipe(shards, phases=1, tokens=400), tmp_path / "run"
    final = run(recipe, out, log=_quiet)
    good = {k: v.clone() for k, v in load_file(str(final / "model.safetensors")).items()}  # not the mapped file
    flip(final / "model.safetensors", 0.6)
    logs: list[str] = []
    assert run(recipe, out, log=logs.append) == final
    assert any("final/ fails its manifest, so it is written again" in line for line in logs), logs
    load(final)  # verifies
    again = load_file(str(final / "model.safetensors"))
    assert again.keys() == good.keys() and all(bool((again[k] == good[k]).all()) for k in good)
    logs.clear()
    run(recipe, out, log=logs.append)
    assert any("is already finished" in line for line in logs)


def test_C08_a_run_with_every_checkpoint_corrupt_says_it_starts_again(tmp_path, shards):
    """Re-run of the review: with every checkpoint corrupt the run restarted from step 0 without a word."""
    recipe, out = tiny_recipe(shards, phases=1, tokens=400), tmp_path / "run"
    run(recipe, out, log=_quiet)
    shutil.rmtree(out / "final")
    for p in (out / "checkpoints").glob("step-*"):
        flip(p / "model.safetensors")
    logs: list[str] = []
    run(recipe, out, log=logs.append)
    assert any("no intact checkpoint in" in line and "starts again from step 0" in line for line in logs), logs
    assert steps_logged(out) == [1, 2, 3]


def test_T04_fetch_of_an_unknown_source_writes_nothing(tmp_path):
    from twinlm.data import fetch as F
    from twinlm.errors import UnknownName
    with pytest.raises(UnknownName, match="unknown source"):
        F.fetch(["nosuchsource"], root=tmp_path / "home", log=_quiet)
    assert not (tmp_path / "home").exists()


def test_every_earlier_recipe_of_a_run_is_kept(tmp_path, shards):
    recipe, out = recipe_for(shards), tmp_path / "run"
    run(recipe, out, ["max_steps=1"], log=_quiet)
    run(recipe, out, ["max_steps=2", "optim.lr=2e-3"], log=_quiet)
    run(recipe, out, ["max_steps=3", "optim.lr=1e-3"], log=_quiet)
    lrs = [yaml.safe_load((out / n).read_text())["optim"]["lr"]
           for n in ("config.previous.1.yaml", "config.previous.yaml", "config.yaml")]
    assert lrs == [3e-3, 2e-3, 1e-3]


# --- kills at chosen points (subprocess, SIGKILL from inside at an exact place) ----------------------
DRIVER = textwrap.dedent("""
    import os, signal, sys, yaml
    from pathlib import Path
    from twinlm.train import run
    from twinlm.train import checkpoint as ck
    from twinlm.train.callback import Callback
    recipe, out, where, at = yaml.safe_load(open(sys.argv[1])), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)

    class AfterCheckpoint(Callback):   # K02: checkpoint complete, the step's row maybe not written
        def on_checkpoint(self, trainer, path):
            if where == "after_checkpoint" and trainer.state.step == at:
                die()

    real_write, real_rmtree, real_save_file = ck.write_bytes, ck.shutil.rmtree, ck.save_file
    def write_bytes(path, data):       # between the folder's rename and its COMPLETE marker
        if where == "before_marker" and Path(path).name == ck.MARKER and Path(path).parent.name == f"step-{at:08d}":
            die()
        return real_write(path, data)
    def save_file(tensors, filename, *a, **k):   # half-way through the tensor files of a save
        if where == "in_tmp" and f".step-{at:08d}.tmp-" in filename and filename.endswith("optimizer.safetensors"):
            open(filename, "wb").write(b"partial")
            die()
        return real_save_file(tensors, filename, *a, **k)
    def rmtree(path, *a, **k):         # the keep policy half-way through removing an old checkpoint
        if where == "in_prune" and Path(path).name.startswith("step-"):
            (Path(path) / ck.MARKER).unlink(missing_ok=True)
            die()
        return real_rmtree(path, *a, **k)
    ck.write_bytes, ck.shutil.rmtree, ck.save_file = write_bytes, rmtree, save_file
    run(recipe, out, callbacks=[AfterCheckpoint()], log=lambda m: None)
""")


def _env() -> dict:
    e = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
             PYTHONPATH=src + os.pathsep + e.get("PYTHONPATH", ""))
    return e


def _drive(tmp_path: Path, recipe: dict, out: Path, where: str = "none", at: int = 0) -> int:
    rp = tmp_path / "recipe.yaml"
    rp.write_text(yaml.safe_dump(recipe, sort_keys=False))
    drv = tmp_path / "driver.py"
    drv.write_text(DRIVER)
    p = subprocess.run([sys.executable, str(drv), str(rp), str(out), where, str(at)], env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode in (0, -signal.SIGKILL), p.stderr[-3000:]
    return p.returncode


@pytest.mark.slow
def test_K01_K02_kills_at_chosen_points_resume_exact_with_every_metrics_row(tmp_path, shards):
    recipe = recipe_for(shards)
    ref = tmp_path / "ref"
    assert _drive(tmp_path, recipe, ref) == 0  # the same process setup (threads) as the killed runs
    out = tmp_path / "run"
    plan = [("after_checkpoint", 3), ("before_marker", 5), ("in_tmp", 6), ("in_prune", 8), ("after_checkpoint", 10)]
    for where, at in plan:
        assert _drive(tmp_path, recipe, out, where, at) == -signal.SIGKILL, (where, at)
        if where == "after_checkpoint":  # K02: the row of the checkpointed step is already on disk
            assert steps_logged(out)[-1] == at
    assert _drive(tmp_path, recipe, out) == 0
    assert losses(out) == losses(ref)  # every step once, bit-identical
    a = load_file(str(ref / "final" / "model.safetensors"))
    b = load_file(str(out / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    left = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert left == [], left


# --- the soak: N random SIGKILLs from outside, then an exact comparison ----------------------------------
@pytest.mark.soak
def test_soak_random_kills_resume_exact_with_complete_metrics(tmp_path, shards):
    kills_wanted = int(os.environ.get("TWINLM_SOAK_KILLS", "20"))
    rng = random.Random(int(os.environ.get("TWINLM_SOAK_SEED", "0")))
    recipe = recipe_for(shards, tokens=20000, every_tokens=120)
    recipe["checkpoint"]["keep_last"] = 3
    ref = tmp_path / "ref"
    assert _drive(tmp_path, recipe, ref) == 0
    total = len(losses(ref))
    # the kills aim at rows spread over the whole run: the k-th at a row drawn from the k-th of kills_wanted
    # equal stretches of its first 90% (the last stretch leaves room for a checkpoint to be written after it)
    span = max(1, int(total * 0.9) - 1)
    bounds = [(1 + k * span // kills_wanted, (k + 1) * span // kills_wanted) for k in range(kills_wanted)]
    targets = [rng.randint(lo, max(lo, hi)) for lo, hi in bounds]
    out, ck = tmp_path / "run", tmp_path / "run" / "checkpoints"
    rp, drv = tmp_path / "recipe.yaml", tmp_path / "driver.py"
    landed: list[str] = []
    starts = 0
    metrics = out / "metrics.jsonl"

    def rows() -> int:
        return len(metrics.read_text().splitlines()) if metrics.exists() else 0

    while len(landed) < kills_wanted:
        starts += 1
        assert starts < 10 * kills_wanted, "the run never got far enough to be killed"
        target = targets[len(landed)]
        p = subprocess.Popen([sys.executable, str(drv), str(rp), str(out), "none", "0"], env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        # where to kill: 0-0.3 s after the run has logged its target row (and one row of this start), 0-20 ms
        # into the first checkpoint write from its target row on, or 0-3 s after the start (startup, restore)
        mode = rng.choice(["step", "step", "checkpoint", "checkpoint", "startup"])
        t_start, t_row, where = time.time(), None, None
        delay = rng.uniform(0, 3.0 if mode == "startup" else 0.3)
        rows0 = rows()
        before = {x.name for x in ck.iterdir()} if ck.is_dir() else set()  # leftovers of an earlier kill
        while p.poll() is None:
            if mode == "startup" and time.time() - t_start >= delay:
                where = "startup"
            elif mode == "step":
                if t_row is None and rows() > rows0 and rows() >= target:
                    t_row = time.time()
                if t_row is not None and time.time() - t_row >= delay:
                    where = "training"
            elif mode == "checkpoint":
                if rows() < target:  # the checkpoints written before the target are left alone
                    before = {x.name for x in ck.iterdir()} if ck.is_dir() else set()
                elif ck.is_dir() and any(x.name.startswith(".step-") and x.name not in before for x in ck.iterdir()):
                    time.sleep(rng.uniform(0, 0.02))
                    where = "checkpoint write"
            if where:
                p.kill()
                break
            time.sleep(0.001)
        rc = p.wait()
        if rc == 0:
            break  # finished before the kill: nothing more to kill
        assert rc == -signal.SIGKILL, p.stderr.read()[-3000:]
        landed.append(f"{where} ({rows()} rows)")
    assert _drive(tmp_path, recipe, out) == 0
    print(f"{len(landed)} kills over the {total} steps (target rows {targets}): " + "; ".join(landed))
    assert len(landed) >= kills_wanted
    assert losses(out) == losses(ref)  # every step once, bit-identical
    a = load_file(str(ref / "final" / "model.safetensors"))
    b = load_file(str(out / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    assert [x.name for x in ck.iterdir() if x.name.startswith(".")] == []


# --- randomized corruption: every injury to a checkpoint, a shard folder or a model folder is named ----------
INJURIES = ("flip", "truncate", "delete", "append")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, shards, toy_models) -> dict[str, Path]:
    """One intact artifact of each kind: a training checkpoint, a shard folder, an exported model folder."""
    root = tmp_path_factory.mktemp("pristine")
    run(recipe_for(shards), root / "run", ["max_steps=1"], log=_quiet)
    return {"checkpoint": root / "run" / "checkpoints" / "step-00000001", "shards": shards,
            "model": Path(toy_models["decoder"])}


def _check_artifact(kind: str, folder: Path) -> None:
    """What a user's next command does with the folder: resume from it, train on it, load it."""
    from twinlm.loading import load
    from twinlm.train.checkpoint import TRAINING_FILES
    if kind == "checkpoint":
        verify(folder, TRAINING_FILES)
    elif kind == "shards":
        verify_shards(folder)
    else:
        load(folder)


def _error_class(kind: str) -> type:
    from twinlm.errors import ModelLoadError
    return {"checkpoint": CorruptCheckpointError, "shards": ShardError, "model": ModelLoadError}[kind]


def _targets(kind: str, folder: Path) -> list[tuple[str, str]]:
    """(file, injury) pairs that must be detected. Not targets, by design: a checkpoint's COMPLETE marker's
    content (a timestamp nobody reads; deleting it is a target), a model folder's README.md (the card users
    edit, outside the manifest) and deleting its MANIFEST.sha256 (the documented way to accept edited files),
    a shard folder's .verified.json and .chunk_sums.npy (caches a full verification writes: damaged, the folder is
    verified again)."""
    pairs = []
    for f in sorted(p.name for p in folder.iterdir() if p.is_file()):
        if f in ("README.md", ".verified.json", ".chunk_sums.npy"):
            continue
        for injury in INJURIES:
            if (f == "COMPLETE" and injury != "delete") or (kind == "model" and f == "MANIFEST.sha256"
                                                            and injury == "delete"):
                continue
            pairs.append((f, injury))
    return pairs


def _injure(rng: random.Random, path: Path, injury: str) -> str:
    data = path.read_bytes()
    if injury == "delete":
        path.unlink()
        return "deleted"
    if injury == "flip":  # one bit (bit rot; text stays ASCII) or a random byte
        at, mask = rng.randrange(len(data)), rng.choice([1 << rng.randrange(8), rng.randrange(1, 256)])
        path.write_bytes(data[:at] + bytes([data[at] ^ mask]) + data[at + 1:])
        return f"byte {at} ^= {mask:#04x}"
    if injury == "truncate":
        at = rng.randrange(len(data))
        path.write_bytes(data[:at])
        return f"truncated to {at} of {len(data)} bytes"
    junk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    if not junk.strip():  # whitespace after JSON changes nothing it says
        junk += b"x"
    path.write_bytes(data + junk)
    return f"{len(junk)} bytes appended"


def _corrupt_and_check(rng: random.Random, pristine: dict[str, Path], work: Path, kind: str, target: str,
                       injury: str) -> str:
    """Injure `target` in a copy of `kind`'s artifact; the check must raise that kind's error class with one
    line naming the file. Returns what was done (for the soak's report)."""
    folder = work / kind
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(pristine[kind], folder)
    (folder / ".verified.json").unlink(missing_ok=True)
    what = f"{kind}/{target}: {_injure(rng, folder / target, injury)}"
    try:
        _check_artifact(kind, folder)
    except _error_class(kind) as e:
        msg = str(e)
        assert "\n" not in msg.strip() and target in msg, f"{what}: the message does not name the file: {msg}"
        return what
    except Exception as e:  # noqa: BLE001 - any other class is the failure this test looks for
        raise AssertionError(f"{what}: {type(e).__name__} instead of {_error_class(kind).__name__}: {e}") from e
    raise AssertionError(f"{what}: not detected (the check passed)")


def test_every_injury_to_every_file_is_named(tmp_path, pristine):
    """Each (file, injury) of each kind once, at offsets drawn from fixed seeds (the default-suite version of
    the corruption soak below)."""
    for seed in range(5):
        rng = random.Random(seed)
        for kind in ("checkpoint", "shards", "model"):
            for target, injury in _targets(kind, pristine[kind]):
                _corrupt_and_check(rng, pristine, tmp_path, kind, target, injury)


def test_meta_json_checks_itself(tmp_path, shards):
    """Found by the corruption soak: a bit flipped in meta.json (num_bytes: bits per byte; the tokenizer's
    fingerprint) went unseen, a non-UTF-8 byte was a UnicodeDecodeError. Folders of format_version 1 (no
    checksum) are still read."""
    data = _shard_copy(shards, tmp_path)
    raw = (data / "meta.json").read_bytes()
    assert json.loads(raw)["format_version"] == 2
    meta = json.loads(raw)
    for old, new in ((f'"num_bytes": {meta["num_bytes"]}', f'"num_bytes": {meta["num_bytes"] ^ 1}'),
                     (f'"fingerprint": "{meta["tokenizer"]["fingerprint"][:4]}', '"fingerprint": "0000'),
                     ("{", "\udcfb")):  # the first byte not UTF-8
        damaged = raw.replace(old.encode("utf-8", "surrogateescape"), new.encode("utf-8", "surrogateescape"), 1)
        assert damaged != raw
        (data / "meta.json").write_bytes(damaged)
        with pytest.raises(ShardError, match=r"meta.json: (does not match its own checksum|unreadable)"):
            verify_shards(data)
    legacy = dict(meta)
    del legacy["meta_sha256"]
    legacy["format_version"] = 1
    (data / "meta.json").write_text(json.dumps(legacy))
    assert verify_shards(data)["num_chunks"] == 200  # an older folder, read as it is
    legacy["format_version"] = 2  # ... but a folder of this version without its checksum is refused
    (data / "meta.json").write_text(json.dumps(legacy))
    with pytest.raises(ShardError, match="no valid meta_sha256"):
        verify_shards(data)


def test_manifests_cut_short_or_with_a_changed_line_break_are_named(tmp_path, pristine):
    """Found by the corruption soak: a model folder's MANIFEST.sha256 cut at a line boundary (its last lines
    gone) or a line break flipped to \\v (which splitlines() also splits on) verified; a non-UTF-8 byte was a
    UnicodeDecodeError; a flipped byte in config.json was reported by what it now said, not as a damaged file."""
    from twinlm.errors import ModelLoadError
    from twinlm.loading import load
    from twinlm.train.checkpoint import TRAINING_FILES
    model, ckpt = tmp_path / "model", tmp_path / "ckpt"
    shutil.copytree(pristine["model"], model)
    shutil.copytree(pristine["checkpoint"], ckpt)
    for folder, check, error in ((model, load, ModelLoadError), (ckpt, lambda f: verify(f, TRAINING_FILES),
                                                                  CorruptCheckpointError)):
        man = folder / "MANIFEST.sha256"
        text = man.read_bytes()
        lines = text.splitlines(keepends=True)
        for damaged in (b"".join(lines[:-1]), b"".join(lines[:-2]), text[:-1], text.replace(b"\n", b"\v", 1),
                        text[:10] + b"\xe9" + text[11:]):
            man.write_bytes(damaged)
            with pytest.raises(error, match="MANIFEST.sha256"):
                check(folder)
        man.write_bytes(text)
        check(folder)
    cfg = model / "config.json"
    cfg.write_text(cfg.read_text().replace('"default"', '"defa]lt"', 1))
    with pytest.raises(ModelLoadError, match=r"config.json: does not match its sha256"):
        load(model)
    # a tokenizer copied into a folder exported without one is not required to be listed
    bare = tmp_path / "bare"
    load(pristine["model"]).save_pretrained(bare)
    shutil.copy(pristine["model"] / "tokenizer.json", bare / "tokenizer.json")
    assert load(bare).config.causal


# the commands a user runs next on each kind of injured artifact (the corruption soak runs them through the CLI)
USER_COMMANDS = {"checkpoint": ("export", "train resume"), "shards": ("data verify", "train"),
                 "model": ("eval bpb", "export"), "order": ("data order", "replay")}


def _cli(argv: list[str]) -> tuple[int, list[str]]:
    """`twinlm ARGV` in this process: (exit status, the lines it printed on stdout and stderr)."""
    from twinlm.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, (out.getvalue() + err.getvalue()).splitlines()


@pytest.fixture(scope="module")
def resumable(tmp_path_factory, shards) -> dict:
    """A run stopped after step 4 (with two checkpoints, the newest at step 4) and its recipe file, and the losses
    of the same run taken to step 5 uninterrupted: what a resume from an injured step 4 must reproduce."""
    root = tmp_path_factory.mktemp("resumable")
    recipe = root / "recipe.yaml"
    r = recipe_for(shards)
    r["checkpoint"]["keep_last"] = 3
    recipe.write_text(yaml.safe_dump(r, sort_keys=False))
    assert _cli(["train", recipe, "--out", root / "run", "max_steps=4"])[0] == 0
    assert _cli(["train", recipe, "--out", root / "ref", "max_steps=5"])[0] == 0
    assert len(checkpoint_steps(root / "run")) >= 2 and checkpoint_steps(root / "run")[-1] == 4
    return {"recipe": recipe, "run": root / "run", "ref_losses": losses(root / "ref")}


@pytest.fixture(scope="module")
def ordered(tmp_path_factory, shards) -> dict:
    """A run that recorded its batch order (RUN/data_order: one parquet file per checkpoint interval, each with its
    sha256 record), the recipe that replays it, and the (file, injury) pairs a replay must name: any flip,
    truncation or appended bytes in a parquet file or its record (a deleted record is recorded again on the next
    read, as a released folder's is: docs/bad-input.md)."""
    root = tmp_path_factory.mktemp("ordered")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**recipe_for(shards), "record_order": True}, sort_keys=False))
    assert _cli(["train", recipe, "--out", root / "run", "max_steps=3"])[0] == 0
    folder = root / "run" / "data_order"
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.parquet"))
    pairs = [(name + suffix, injury) for name in files for suffix in ("", ".sha256")
             for injury in INJURIES if injury != "delete"]
    return {"recipe": recipe, "folder": folder, "targets": pairs}


def _user_command_on_injury(rng: random.Random, pristine: dict[str, Path], resumable: dict, work: Path, kind: str,
                            target: str, injury: str, command: str, text: Path) -> str:
    """Injure `target` in a copy of `kind`'s artifact and run `command` on it through the CLI, as a user would
    next. Every command must refuse with one `twinlm: error:` line naming the file (exit 2), and write nothing,
    except a resume: it must name the injured checkpoint's file, set the checkpoint aside and resume from the one
    before, with losses equal to an uninterrupted run's (a checkpoint without its COMPLETE marker is an interrupted
    save: ignored). Returns what was done (for the soak's report)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if command == "train resume":
        run_dir = work / "run"
        shutil.copytree(resumable["run"], run_dir)
        folder = run_dir / "checkpoints" / "step-00000004"
    else:
        folder = work / kind
        shutil.copytree(pristine[kind], folder)
        (folder / ".verified.json").unlink(missing_ok=True)
    what = f"{command} on {kind}/{target}: {_injure(rng, folder / target, injury)}"
    step = int(target.split("/")[0].split("-")[1]) if kind == "order" else 0  # an interval's last step
    if command == "train resume":
        rc, lines = _cli(["train", resumable["recipe"], "--out", run_dir, "max_steps=5"])
        assert rc == 0, f"{what}: exit {rc}: {lines[-3:]}"
        if not (target == "COMPLETE" and injury == "delete"):
            assert any("skipping checkpoint" in x and target in x for x in lines), f"{what}: not named: {lines}"
            assert (run_dir / "checkpoints" / "corrupt" / "step-00000004").is_dir(), f"{what}: not set aside"
        assert losses(run_dir) == resumable["ref_losses"], f"{what}: the resumed run differs"
        return what
    argv = {"export": ["export", folder, "--out", work / "exported", "--no-tokenizer"],
            "eval bpb": ["eval", "bpb", folder, "--text-file", text],
            "data verify": ["data", "verify", folder],
            "train": ["train", resumable["recipe"], "--out", work / "fresh", f"data={folder}", "max_steps=1"],
            "data order": ["data", "order", folder, "--step", step],
            "replay": ["train", pristine.get("order_recipe", ""), "--out", work / "fresh", f"data={folder}",
                       f"max_steps={step}"]}[command]
    rc, lines = _cli(argv)
    assert rc == 2 and lines and lines[-1].startswith("twinlm: error: "), f"{what}: exit {rc}: {lines[-3:]}"
    assert Path(target).name in lines[-1], f"{what}: the error does not name the file: {lines[-1]}"
    assert not (work / "exported").exists(), f"{what}: exported"
    return what


@pytest.mark.soak
def test_soak_random_corruption_is_always_named(tmp_path, pristine, resumable, ordered):
    """TWINLM_SOAK_CORRUPTIONS (default 2000, about a minute) random injuries, seeded by TWINLM_SOAK_SEED, each
    named by the check a command makes; then TWINLM_SOAK_COMMANDS (default 100) more, each followed by the command
    a user runs next on that kind of artifact (USER_COMMANDS) through the CLI."""
    n = int(os.environ.get("TWINLM_SOAK_CORRUPTIONS", "2000"))
    n_commands = int(os.environ.get("TWINLM_SOAK_COMMANDS", "100"))
    rng = random.Random(int(os.environ.get("TWINLM_SOAK_SEED", "0")))
    targets = {kind: _targets(kind, pristine[kind]) for kind in ("checkpoint", "shards", "model")}
    resume_targets = _targets("checkpoint", resumable["run"] / "checkpoints" / "step-00000004")
    done = Counter()
    for _ in range(n):
        kind = rng.choice(sorted(targets))
        target, injury = rng.choice(targets[kind])
        _corrupt_and_check(rng, pristine, tmp_path, kind, target, injury)
        done[kind, injury] += 1
    print(f"{n} injuries, all named: " + ", ".join(f"{k}/{i} {c}" for (k, i), c in sorted(done.items())))
    text = tmp_path / "held.txt"
    text.write_text("the old man and the sea\n\na small red boat on the water\n")
    commands = Counter()
    artifacts = {**pristine, "order": ordered["folder"], "order_recipe": ordered["recipe"]}
    targets["order"] = ordered["targets"]
    for _ in range(n_commands):
        kind = rng.choice(sorted(USER_COMMANDS))
        command = rng.choice(USER_COMMANDS[kind])
        target, injury = rng.choice(resume_targets if command == "train resume" else targets[kind])
        _user_command_on_injury(rng, artifacts, resumable, tmp_path / "cli", kind, target, injury, command, text)
        commands[command, kind] += 1
    print(f"{n_commands} injuries, each met by the user's next command: "
          + ", ".join(f"{c} on {k} {n}" for (c, k), n in sorted(commands.items())))


def test_P11_a_damaged_tokenizer_file_is_named(tmp_path):
    from twinlm.data.tokenizer import load_tokenizer, tokenizer_fingerprint
    bad = tmp_path / "badtok"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("garbage")
    for read in (load_tokenizer, tokenizer_fingerprint):
        with pytest.raises(ConfigError, match=r"badtok/tokenizer.json: not a tokenizer file"):
            read(bad)
    (bad / "tokenizer.json").write_text("[1, 2]")  # valid JSON, but no tokenizer in it
    with pytest.raises(ConfigError, match="no tokenizer model"):
        load_tokenizer(bad)


def test_V05_convert_to_a_file_is_refused_and_the_file_kept(tmp_path, toy_models):
    from twinlm.convert import convert
    afile = tmp_path / "afile"
    afile.write_text("mine")
    with pytest.raises(ConfigError, match="exists and is not a folder"):
        convert(toy_models["encoder"], "decoder", afile)
    assert afile.read_text() == "mine"


def test_E05_a_model_folder_without_a_tokenizer_is_named(tmp_path, toy_models):
    from twinlm.errors import MissingArtifactError
    from twinlm.eval.common import load_for_eval
    notok = tmp_path / "notok"
    notok.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(toy_models["encoder"]) / name, notok / name)
    with pytest.raises(MissingArtifactError, match="no tokenizer in the model folder"):
        load_for_eval(notok)


def test_E13_a_task_file_with_one_class_is_refused(tmp_path):
    from twinlm.errors import TaskFileError
    from twinlm.eval.tasks import read_cls_files
    one = tmp_path / "one.jsonl"
    one.write_text("".join(json.dumps({"text": f"text {i}", "label": "pos"}) + "\n" for i in range(6)))
    with pytest.raises(TaskFileError, match="at least two classes"):
        read_cls_files(one)
    two = tmp_path / "two.jsonl"
    two.write_text(one.read_text() + json.dumps({"text": "other", "label": "neg"}) + "\n")
    assert read_cls_files(two).num_labels == 2


def test_M04_an_empty_batch_is_named():
    import torch

    from twinlm.config import ModelConfig
    from twinlm.model import Transformer
    m = Transformer(ModelConfig.preset("cpu-tiny"))
    for ids in (torch.zeros(0, 16, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long)):
        with pytest.raises(ValueError, match="input_ids is empty"):
            m(ids)


def test_E04_a_folder_mixing_a_decoders_weights_with_an_encoders_config_is_refused(tmp_path, toy_models):
    from twinlm.errors import ModelLoadError
    from twinlm.loading import load
    mixed = tmp_path / "mixed"
    shutil.copytree(toy_models["encoder"], mixed)
    shutil.copy(Path(toy_models["decoder"]) / "model.safetensors", mixed / "model.safetensors")
    (mixed / "MANIFEST.sha256").unlink(missing_ok=True)  # as if put together by hand
    with pytest.raises(ModelLoadError, match="saved from a decoder but the folder's config describes an encoder"):
        load(mixed)
    assert load(toy_models["encoder"]).config.causal is False  # an intact folder loads
