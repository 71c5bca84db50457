import json

import numpy as np
import pytest

import twinlm.data.inputs as inputs_mod
import twinlm.data.prepare as prepare_mod
from twinlm.configs import build
from twinlm.data.inputs import iter_documents, resolve_inputs
from twinlm.data.prepare import PrepareConfig, chunk_document, prepare
from twinlm.data.shards import ShardDataset, ShardError, TokenizerMismatch, check_tokenizer, verify_shards
from twinlm.data.tokenizer import tokenizer_fingerprint, train_tokenizer
from twinlm.errors import ConfigError, DataError, MissingArtifactError

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega").split()


def make_doc(rng, n_words):
    return " ".join(rng.choice(WORDS, size=n_words)) + "."


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    rng = np.random.default_rng(0)
    texts = [make_doc(rng, 200) for _ in range(20)]
    return train_tokenizer(None, 300, tmp_path_factory.mktemp("tok") / "bpe", texts=texts)


@pytest.fixture()
def corpus(tmp_path):
    rng = np.random.default_rng(1)
    d = tmp_path / "corpus"
    d.mkdir()
    docs = [make_doc(rng, n) for n in (5, 40, 300, 1200, 60, 2500)]
    (d / "a.txt").write_text(docs[0])
    (d / "b.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(docs[1:4])) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": docs[4:], "n": [1, 2]}), d / "c.parquet")
    return d, docs


# --- chunking rules (REFERENCE §2) ---------------------------------------------------------------------
def test_chunk_document_rules():
    ids = np.arange(10, 10 + 25)
    chunks, c = chunk_document(ids, 1, 2, chunk_size=12, min_chunk=4, backfill=8)
    assert all(ch[0] == 1 and ch[-1] == 2 for ch in chunks)
    assert [len(ch) - 2 for ch in chunks] == [10, 10, 8]  # last piece (5 tokens) back-filled to 8
    assert list(chunks[2][1:-1]) == list(ids[17:25])       # 3 tokens of the previous piece's tail + the 5
    assert c == {"dropped": 0, "backfilled": 1}
    # a short tail (< min_chunk) is dropped, except as a document's first chunk
    chunks, c = chunk_document(np.arange(23), 1, 2, chunk_size=12, min_chunk=4, backfill=8)
    assert [len(ch) - 2 for ch in chunks] == [10, 10] and c["dropped"] == 1
    chunks, _ = chunk_document(np.arange(3), 1, 2, chunk_size=12, min_chunk=4, backfill=8)
    assert [list(ch) for ch in chunks] == [[1, 0, 1, 2, 2]]
    assert chunk_document(np.arange(0), 1, 2)[0] == []
    # defaults: 1024 / 128 / 512
    chunks, c = chunk_document(np.arange(1022 + 300), 1, 2)
    assert [len(ch) for ch in chunks] == [1024, 514] and c["backfilled"] == 1


# --- prepare ------------------------------------------------------------------------------------------------
def test_prepare_text_jsonl_parquet(tok, corpus, tmp_path):
    d, docs = corpus
    meta = prepare([d], tok, tmp_path / "shards", chunk_size=64, min_chunk=8, backfill=32, workers=0)
    ds = ShardDataset(tmp_path / "shards", verify=True)
    assert len(ds) == meta["num_chunks"] > len(docs)
    assert meta["num_documents"] == len(docs) and meta["stats"]["documents"] == len(docs)
    assert meta["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tok) == ds.fingerprint
    assert meta["stats"]["bytes"] == sum(len(t.encode()) for t in docs)
    assert ds.meta["dtype"] == "uint16" and ds.lengths.max() <= 64
    for i in range(len(ds)):
        ch = ds[i]
        assert ch[0] == tok.cls_token_id and ch[-1] == tok.sep_token_id
    # document order kept; the first chunk of each document decodes to the start of that document
    starts = np.flatnonzero(np.diff(np.concatenate([[-1], ds.doc_ids])))
    assert len(starts) == len(docs)
    for k, s in enumerate(starts):
        text = tok.decode(ds[s][1:-1])
        assert docs[k].startswith(text[:40])
    # bytes per chunk: chunks without back-fill add up to the document's bytes
    first_doc = ds.doc_ids == 0
    assert ds.chunk_bytes[first_doc].sum() == len(docs[0].encode())


def test_prepare_multiprocess_matches_single(tok, corpus, tmp_path):
    d, _ = corpus
    a = prepare([d], tok, tmp_path / "one", chunk_size=64, min_chunk=8, backfill=32, workers=0, batch_bytes=500)
    b = prepare([d], tok, tmp_path / "two", chunk_size=64, min_chunk=8, backfill=32, workers=2, batch_bytes=500)
    c = prepare([d], tok, tmp_path / "three", chunk_size=64, min_chunk=8, backfill=32, workers=1, threads=2,
                batch_bytes=500)
    assert a["sha256"] == b["sha256"] == c["sha256"]
    assert (b["stats"]["workers"], b["stats"]["threads"]) == (2, 1)


def test_prepare_takes_its_settings_as_one_object(tok, corpus, tmp_path):
    d, _ = corpus
    settings = build(PrepareConfig, {"chunk_size": "64", "min_chunk": 8, "backfill": 32, "workers": 0})
    a = prepare([d], tok, tmp_path / "a", settings)
    b = prepare([d], tok, tmp_path / "b", chunk_size=64, min_chunk=8, backfill=32, workers=0)
    assert a["sha256"] == b["sha256"] and a["chunking"] == b["chunking"]
    # fields given beside the settings replace theirs
    c = prepare([d], tok, tmp_path / "c", settings, backfill=16)
    assert c["chunking"] == {"chunk_size": 64, "min_chunk": 8, "backfill": 16}
    with pytest.raises(ConfigError, match="unknown prepare setting chunksize; known: chunk_size"):
        prepare([d], tok, tmp_path / "d", chunksize=64)
    with pytest.raises(ConfigError, match="chunk_size must be at least 3"):
        build(PrepareConfig, {"chunk_size": 2})
    with pytest.raises(ConfigError, match="holdout_docs must be >= 0"):
        PrepareConfig(holdout_docs=-1)
    assert not (tmp_path / "d").exists()


def test_holdout_split(tok, tmp_path):
    rng = np.random.default_rng(2)
    f = tmp_path / "many.jsonl"
    f.write_text("\n".join(json.dumps({"text": make_doc(rng, 30)}) for _ in range(200)))
    meta = prepare([f], tok, tmp_path / "tr", chunk_size=64, workers=0, holdout_docs=0.2, seed=3)
    held = ShardDataset(tmp_path / "tr-heldout")
    assert meta["holdout"]["num_documents"] == held.meta["num_documents"]
    assert 20 <= held.meta["num_documents"] <= 60
    assert meta["chunking"] == {"chunk_size": 64, "min_chunk": 8, "backfill": 32}  # 128/512 scaled from 1024
    assert meta["num_documents"] + held.meta["num_documents"] == 200
    assert held.meta["split"] == "heldout" and held.fingerprint == meta["tokenizer"]["fingerprint"]
    # both folders name the rule that drew the split (older folders drew by another hash)
    assert meta["holdout"]["rule"] == held.meta["holdout"]["rule"] == "sha256(seed:text[:2000])"
    # a count, deterministic for a seed
    m2 = prepare([f], tok, tmp_path / "tr2", chunk_size=64, workers=0, holdout_docs=7, seed=3)
    m3 = prepare([f], tok, tmp_path / "tr3", chunk_size=64, workers=0, holdout_docs=7, seed=3)
    assert m2["holdout"]["num_documents"] == 7 and m2["sha256"] == m3["sha256"]


def test_hf_dataset_by_name_on_local_files(tok, corpus, tmp_path):
    d, docs = corpus
    meta = prepare([f"hf:{d / 'b.jsonl'}"], tok, tmp_path / "hf", chunk_size=64, workers=0)
    ref = prepare([d / "b.jsonl"], tok, tmp_path / "ref", chunk_size=64, workers=0)
    assert meta["num_documents"] == 3 and meta["sha256"]["tokens.bin"] == ref["sha256"]["tokens.bin"]


def test_unknown_hf_dataset_is_a_data_error(monkeypatch):
    import datasets

    def missing(*args, **kwargs):
        raise FileNotFoundError("Dataset 'nope' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    with pytest.raises(DataError, match="hf:nope: cannot load this Hugging Face dataset"):
        list(iter_documents(resolve_inputs(["hf:nope"])))


# --- bad input ---------------------------------------------------------------------------------------------
def test_bad_inputs_error_or_skip(tok, tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("alpha beta gamma " * 20)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\x00\x01\x02binary\xff" * 10)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text(json.dumps({"body": "x"}) + "\n" + json.dumps({"text": "alpha beta"}) + "\n{broken\n")
    with pytest.raises(DataError, match="no such file"):
        resolve_inputs([tmp_path / "missing.txt"])
    for bad, what in [(empty, "empty"), (binary, "binary"), (latin, "UTF-8"), (nofield, "no 'text' field")]:
        with pytest.raises(DataError, match=what):
            prepare([good, bad], tok, tmp_path / "out", workers=0)
        assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary leftovers
    meta = prepare([good, empty, binary, latin, nofield], tok, tmp_path / "out", workers=0, on_bad_input="skip")
    assert meta["stats"]["skipped"] == {"empty": 1, "binary": 1, "not_utf8": 1, "missing_field": 1, "invalid_json": 1}
    assert meta["num_documents"] == 2
    with pytest.raises(DataError, match="no documents"):
        prepare([empty], tok, tmp_path / "none", workers=0, on_bad_input="skip")
    assert not (tmp_path / "none").exists()


def test_parquet_without_text_column(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match="no 'text' column"):
        list(iter_documents(resolve_inputs([tmp_path / "p.parquet"])))
    assert list(iter_documents(resolve_inputs([tmp_path / "p.parquet"]), text_field="body")) == [
        (f"{tmp_path / 'p.parquet'}:0", "x")]


def test_interrupted_prepare_leaves_nothing(tok, tmp_path, monkeypatch):
    P = prepare_mod
    f = tmp_path / "x.txt"
    f.write_text("alpha beta " * 500)
    calls = {"n": 0}
    real = P._process

    def boom(batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(batch)

    monkeypatch.setattr(P, "_process", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare([f, f, f], tok, tmp_path / "out", workers=0, batch_bytes=10)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


# --- shard integrity and tokenizer checks --------------------------------------------------------------------
def test_truncated_altered_incomplete_shards(tok, corpus, tmp_path):
    d, _ = corpus
    out = tmp_path / "s"
    prepare([d], tok, out, chunk_size=64, workers=0)
    verify_shards(out)
    tokens = out / "tokens.bin"
    data = tokens.read_bytes()
    # altered in place: same size, caught by the checksum
    tokens.write_bytes(data[:10] + bytes([data[10] ^ 0xFF]) + data[11:])
    ShardDataset(out)  # size check only: opens
    with pytest.raises(ShardError, match="altered"):
        ShardDataset(out, verify=True)
    # truncated
    tokens.write_bytes(data[:-6])
    with pytest.raises(ShardError, match="truncated"):
        ShardDataset(out)
    tokens.write_bytes(data)
    ShardDataset(out, verify=True)
    (out / "meta.json").unlink()
    with pytest.raises(ShardError, match="not a complete shard folder"):
        ShardDataset(out)
    with pytest.raises(ShardError, match="no such shard folder"):
        ShardDataset(tmp_path / "nope")
    with pytest.raises(MissingArtifactError, match="twinlm data prepare"):
        ShardDataset(tmp_path / "nope")


def test_shard_writer_replaces_a_folder_whole_and_abort_keeps_the_old_one(tmp_path):
    from twinlm.data.shards import ShardWriter

    def write(n, abort=False):
        w = ShardWriter(tmp_path / "s", vocab_size=100, overwrite=True)
        w.add(np.arange(n) % 100, np.asarray([n]), np.asarray([0]), np.asarray([n]))
        if abort:
            w.abort()
        else:
            w.close({"tokenizer": {"fingerprint": "x"}})

    write(5)
    write(7)
    assert ShardDataset(tmp_path / "s", verify=True).num_tokens == 7
    write(9, abort=True)
    assert ShardDataset(tmp_path / "s", verify=True).num_tokens == 7
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temporary or old folders left
    with pytest.raises(FileExistsError):
        ShardWriter(tmp_path / "s", vocab_size=100)


def test_check_tokenizer(tok, corpus, tmp_path):
    d, _ = corpus
    prepare([d], tok, tmp_path / "s", chunk_size=64, workers=0)
    ds = ShardDataset(tmp_path / "s")
    check_tokenizer(ds, tok)
    check_tokenizer(tmp_path / "s", tokenizer_fingerprint(tok))
    rng = np.random.default_rng(5)
    other = train_tokenizer(None, 280, tmp_path / "other", texts=[make_doc(rng, 100) for _ in range(5)])
    with pytest.raises(TokenizerMismatch, match="prepare the data again"):
        check_tokenizer(ds, other)


def test_cli_prepare_and_tokenizer(tmp_path, corpus, capsys):
    from twinlm.cli import main
    d, _ = corpus
    assert main(["tokenizer", "train", "--vocab-size", "300", "--out", str(tmp_path / "tok"), str(d)]) == 0
    assert main(["data", "prepare", str(d), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "sh"),
                 "--chunk-size", "64", "--min-chunk", "8", "--backfill", "16", "--workers", "0",
                 "--holdout-docs", "1"]) == 0
    out = capsys.readouterr().out
    assert "chunks" in out and "held out" in out
    assert ShardDataset(tmp_path / "sh").meta["chunking"] == {"chunk_size": 64, "min_chunk": 8, "backfill": 16}


def test_large_text_file_is_streamed_in_pieces(tok, tmp_path, monkeypatch):
    P = inputs_mod  # the input readers
    f = tmp_path / "big.txt"
    text = ("alpha beta gamma\ndelta\n\n" * 400 + "omega") * 5
    f.write_text(text)
    monkeypatch.setattr(P, "LARGE_TEXT_BYTES", 1000)
    docs = list(P._iter_large_text(f, lambda b: None, block=2048))
    assert len(docs) > 10 and "".join(t for _, t in docs) == text
    monkeypatch.setattr(P, "_iter_large_text", lambda path, bad: iter(docs))
    meta = prepare([f], tok, tmp_path / "s", chunk_size=64, workers=0)
    assert meta["num_documents"] == len(docs)
