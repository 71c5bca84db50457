"""MDS folders written by mosaicml-streaming's own MDSWriter (tests/fixtures/mds, see make_fixtures.py): read
sample for sample (plain and zstd), as `data prepare` input (the same shards as the same text from JSONL),
and as token-id training data (the same losses as twinlm shards of the same sequences); bad folders fail in
one line."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from twinlm.cli import main
from twinlm.data.mds import MDSFolder, MDSTokens
from twinlm.data.prepare import prepare
from twinlm.data.shards import ShardWriter
from twinlm.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from twinlm.errors import ConfigError, DataError, MissingShards, TokenizerMismatch
from twinlm.eval.toy import toy_tokenizer
from twinlm.train import run
from twinlm.train.datasets import stream_for
from twinlm.train.recipe import load_recipe
from twinlm.train.setup import warn_unhashed_mds
from twinlm.train.testing import tiny_recipe

FIX = Path(__file__).parent / "fixtures" / "mds"
EXPECTED = json.loads((FIX / "expected.json").read_text())


def test_shard_bytes_follow_the_specification():
    # read the first shard by hand: uint32 n, uint32 offsets[n + 1], the config JSON, then the samples
    index = json.loads((FIX / "text" / "index.json").read_text())
    shard = index["shards"][0]
    data = (FIX / "text" / shard["raw_data"]["basename"]).read_bytes()
    n = int(np.frombuffer(data[:4], np.uint32)[0])
    offsets = np.frombuffer(data[4:8 + 4 * n], np.uint32)
    config = json.loads(data[8 + 4 * n:offsets[0]])
    assert n == shard["samples"] and config["column_names"] == ["id", "text"] and offsets[-1] == len(data)
    first = data[offsets[0]:offsets[1]]  # id is fixed (8 bytes), text variable: one uint32 size first
    size = int(np.frombuffer(first[:4], np.uint32)[0])
    assert int(np.frombuffer(first[4:12], np.int64)[0]) == 0 and first[12:12 + size].decode() == EXPECTED["texts"][0]


@pytest.mark.parametrize("name", ["text", "text-zstd"])
def test_text_folders_read_sample_for_sample(name):
    folder = MDSFolder(FIX / name)
    assert len(folder) == len(EXPECTED["texts"]) and len(folder.shards) > 1
    assert [folder[i]["text"] for i in range(len(folder))] == EXPECTED["texts"]
    assert [folder[i]["id"] for i in range(len(folder))] == list(range(len(folder)))


@pytest.mark.parametrize("name, kw", [("tokens", {}), ("tokens-bytes", {"dtype": "int64"})])
def test_token_folders(name, kw):
    ds = MDSTokens(FIX / name, **kw)
    assert [ds[i].tolist() for i in range(len(ds))] == EXPECTED["tokens"]
    assert ds.lengths.tolist() == [len(t) for t in EXPECTED["tokens"]]
    assert ds.max_id == max(max(t) for t in EXPECTED["tokens"])


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tok"
    toy_tokenizer(out_dir=out)
    return out


def test_prepare_reads_an_mds_folder_like_the_same_jsonl(tok, tmp_path):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in EXPECTED["texts"]))
    kw = dict(chunk_size=16, min_chunk=4, backfill=8, workers=0)
    a = prepare([jsonl], str(tok), tmp_path / "from-jsonl", **kw)
    assert main(["data", "prepare", str(FIX / "text-zstd"), "--tokenizer", str(tok), "--out",
                 str(tmp_path / "from-mds"), "--chunk-size", "16", "--min-chunk", "4", "--backfill", "8",
                 "--workers", "0"]) == 0
    b = json.loads((tmp_path / "from-mds" / "meta.json").read_text())
    assert a["num_chunks"] == b["num_chunks"] > 40
    assert (tmp_path / "from-jsonl" / "tokens.bin").read_bytes() == (tmp_path / "from-mds" / "tokens.bin").read_bytes()


@pytest.mark.slow
def test_training_on_mds_token_ids_equals_training_on_the_same_shards(tok, tmp_path):
    seqs = [np.asarray(t, dtype=np.int64) for t in EXPECTED["tokens"]]
    shards = tmp_path / "shards"
    w = ShardWriter(shards, vocab_size=384, overwrite=True)
    lengths = np.array([len(s) for s in seqs])
    w.add(np.concatenate(seqs), lengths, np.arange(len(seqs)), lengths * 4)
    w.close({"tokenizer": {"fingerprint": tokenizer_fingerprint(load_tokenizer(tok))}})
    base = tiny_recipe(shards, objective="mlm", phases=1, tokens=600, batch_size=4, tokenizer=str(tok))
    run(base, tmp_path / "shards-run")
    run({**base, "data": str(FIX / "tokens")}, tmp_path / "mds-run")

    def losses(d):
        return [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert len(losses(tmp_path / "mds-run")) > 3 and losses(tmp_path / "mds-run") == losses(tmp_path / "shards-run")


def test_mds_ids_are_checked_against_the_recipes_tokenizer(tok, tmp_path):
    base = tiny_recipe(FIX / "tokens", phases=1, tokens=600, batch_size=4, tokenizer=str(tok))
    stream = stream_for(load_recipe(base), 0, vocab_size=384)
    assert [a.tolist() for _, a in stream.next_step(4)] == \
        [EXPECTED["tokens"][int(i)] for i in stream.global_ids(0, 4)]
    # ids beyond the recipe's tokenizer are refused before training; so is a folder without a tokenizer
    with pytest.raises(TokenizerMismatch, match="outside the vocabulary"):
        run({**base, "data": str(FIX / "tokens-wide")}, tmp_path / "wide")
    with pytest.raises(ConfigError, match="records no tokenizer"):
        stream_for(load_recipe({**base, "tokenizer": None}), 0, vocab_size=384)
    assert not (tmp_path / "wide" / "final").exists()


def test_bad_mds_folders_are_one_line_errors(tok, tmp_path, capsys):
    missing = tmp_path / "missing"
    shutil.copytree(FIX / "text", missing)
    (missing / "shard.00003.mds").unlink()
    with pytest.raises(MissingShards, match="shard.00003.mds listed in index.json is missing"):
        MDSFolder(missing)
    altered = tmp_path / "altered"
    shutil.copytree(FIX / "text-zstd", altered)
    f = altered / "shard.00001.mds.zstd"
    b = bytearray(f.read_bytes())
    b[-3] ^= 0xFF
    f.write_bytes(bytes(b))
    folder = MDSFolder(altered)
    assert folder[0]["id"] == 0  # shard 0 is intact
    with pytest.raises(DataError, match="sha1 .* differs"):
        [folder[i] for i in range(len(folder))]
    with pytest.raises(DataError, match="'obj' has the encoding 'pkl'"):
        MDSFolder(FIX / "pickled")
    for bad in (missing, altered, FIX / "pickled"):
        capsys.readouterr()
        assert main(["data", "prepare", str(bad), "--tokenizer", str(tok), "--out", str(tmp_path / "o"),
                     "--workers", "0", "--text-field", "text"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("twinlm: error:")


@pytest.mark.parametrize("basename", ["../outside/shard.00000.mds", "/etc/hostname"])
def test_SEC7_a_shard_basename_outside_the_folder_is_refused(tmp_path, basename):
    # SEC7/SEC7b: the index names a file outside its folder (a real shard moved out, or an absolute path)
    folder = tmp_path / "mds_in"
    shutil.copytree(FIX / "tokens-wide", folder)
    (tmp_path / "outside").mkdir()
    shutil.copy(folder / "shard.00000.mds", tmp_path / "outside" / "shard.00000.mds")
    index = json.loads((folder / "index.json").read_text())
    index["shards"][0]["raw_data"]["basename"] = basename
    (folder / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match="is not a file inside the folder"):
        MDSFolder(folder)


def test_a_hub_snapshot_whose_shards_are_links_into_its_blob_store_is_read(tmp_path):
    # a huggingface_hub snapshot: every file a symlink into ../../blobs; the names stay inside the folder
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for f in (FIX / "tokens-wide").iterdir():
        shutil.copy(f, blobs / f.name)
        (snap / f.name).symlink_to(Path("../..") / "blobs" / f.name)
    linked, plain = MDSFolder(snap), MDSFolder(FIX / "tokens-wide")
    assert len(linked) == len(plain) > 0
    assert str(linked[len(linked) - 1]) == str(plain[len(plain) - 1])


def test_MD06_an_mds_folder_without_hashes_is_named_in_a_warning(tok, tmp_path):
    recipe = tiny_recipe(FIX / "tokens-wide", phases=1, tokens=600, batch_size=4, tokenizer=str(tok))
    said: list[str] = []
    warn_unhashed_mds(load_recipe(recipe), said.append)
    assert MDSFolder(FIX / "tokens-wide").unhashed == ["shard.00000.mds"]
    assert len(said) == 1 and said[0].startswith(f"warning: {FIX / 'tokens-wide'}: 1 MDS shard(s)")
    said.clear()
    warn_unhashed_mds(load_recipe({**recipe, "data": str(FIX / "tokens")}), said.append)  # sha1 + xxh64
    assert MDSFolder(FIX / "tokens").unhashed == [] and said == []
