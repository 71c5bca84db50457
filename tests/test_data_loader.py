import numpy as np
import pytest
import torch

from twinlm.data import BatchStream, Mixture, OrderRecorder, ShardDataset, pack, read_step, replay_step
from twinlm.data.shards import ShardWriter


def make_shards(path, n, lo=5, hi=40, seed=0, fingerprint="fp-test", vocab=1000, offset=0):
    rng = np.random.default_rng(seed)
    chunks = [np.concatenate([[1], rng.integers(5, vocab, int(rng.integers(lo, hi)) - 2), [2]]) for _ in range(n)]
    for i, c in enumerate(chunks):  # make chunk i recognisable
        c[1] = 5 + (i + offset) % (vocab - 5)
    lens = np.array([len(c) for c in chunks])
    w = ShardWriter(path, vocab)
    w.add(np.concatenate(chunks), lens, np.arange(n), lens * 3)
    w.close({"tokenizer": {"fingerprint": fingerprint}})
    return ShardDataset(path), chunks


@pytest.fixture()
def ds(tmp_path):
    return make_shards(tmp_path / "a", 103)


def test_dataset_roundtrip(ds):
    d, chunks = ds
    assert len(d) == 103
    for i in (0, 50, 102, -1):
        assert np.array_equal(d[i], chunks[i])
    with pytest.raises(IndexError):
        d[103]


def test_order_independent_of_world_size(ds):
    d, _ = ds
    sizes = [8, 8, 16, 4, 12, 64, 33, 100, 16]  # batch-size warmup, several epochs
    ref = BatchStream(d, seed=7)
    expected = [[sid for sid, _ in ref.next_step(b)] for b in sizes]
    for world in (2, 4):
        streams = [BatchStream(d, seed=7, rank=r, world_size=world) for r in range(world)]
        for b, want in zip(sizes, expected):
            shares = [[sid for sid, _ in s.next_step(b)] for s in streams]
            merged = [None] * b
            for r, share in enumerate(shares):
                merged[r::world] = share
            assert merged == want
    # the samples are the dataset's
    sid, toks = BatchStream(d, seed=7).next_step(1)[0]
    assert np.array_equal(toks, d[sid])


def test_epochs_are_permutations_reshuffled(ds):
    d, _ = ds
    s = BatchStream(d, seed=1)
    e0 = s.global_ids(0, len(d))
    e1 = s.global_ids(len(d), len(d))
    assert sorted(e0) == sorted(e1) == list(range(len(d)))
    assert list(e0) != list(e1)
    assert list(BatchStream(d, seed=1).global_ids(0, len(d))) == list(e0)
    assert list(BatchStream(d, seed=2).global_ids(0, len(d))) != list(e0)


def test_resume_gives_same_batches(ds):
    d, _ = ds
    sizes = [10, 20, 30, 40, 50, 60]
    full = BatchStream(d, seed=3, rank=1, world_size=2)
    want = [[sid for sid, _ in full.next_step(b)] for b in sizes]
    first = BatchStream(d, seed=3, rank=0, world_size=4)  # saved on 4 ranks...
    for b in sizes[:3]:
        first.next_step(b)
    state = first.state_dict()
    resumed = BatchStream(d, seed=3, rank=1, world_size=2)  # ...resumed on 2
    resumed.load_state_dict(state)
    assert [[sid for sid, _ in resumed.next_step(b)] for b in sizes[3:]] == want[3:]
    with pytest.raises(ValueError, match="seed"):
        BatchStream(d, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="smaller than world_size"):
        BatchStream(d, seed=3, rank=0, world_size=4).next_step(2)


def test_pack_padding_free(ds):
    d, _ = ds
    samples = BatchStream(d, seed=0).next_step(30)
    batches = pack(samples, max_tokens=100)
    assert all(b.num_tokens <= 100 for b in batches)
    assert [sid for b in batches for sid in b.sample_ids] == [sid for sid, _ in samples]
    for b in batches:
        assert b.input_ids.dtype == torch.long and b.cu_seqlens.dtype == torch.int32
        assert b.cu_seqlens[0] == 0 and b.cu_seqlens[-1] == b.num_tokens
        assert b.max_seqlen == int(torch.diff(b.cu_seqlens).max())
        for sid, seq in zip(b.sample_ids, b.sequences()):
            assert np.array_equal(seq.numpy(), d[sid])
    with pytest.raises(ValueError, match="budget"):
        pack(samples, max_tokens=10)


def test_mixture_weights_by_tokens(tmp_path):
    a, _ = make_shards(tmp_path / "a", 300, 10, 20, seed=1)
    b, _ = make_shards(tmp_path / "b", 50, 60, 100, seed=2, offset=500)
    mix = Mixture([(a, 0.25), (b, 0.75)], seed=5)
    shares = {row["source"]: row["token_share"] for row in mix.describe()}
    assert abs(shares[str(a.path)] - 0.25) < 0.02 and abs(shares[str(b.path)] - 0.75) < 0.02
    # b is upsampled: every chunk appears floor/ceil(r) times
    counts = np.bincount(mix.index_in_source[mix.source_of == 1], minlength=len(b))
    assert counts.max() - counts.min() <= 1
    again = Mixture([(a, 0.25), (b, 0.75)], seed=5)
    assert np.array_equal(again.index_in_source, mix.index_in_source)
    s, j = mix.locate(7)
    assert np.array_equal(mix[7], (a, b)[s][j])
    assert len(Mixture([(a, 1), (b, 1)], seed=5, num_tokens=1000)) < len(mix)
    c, _ = make_shards(tmp_path / "c", 10, fingerprint="other")
    with pytest.raises(ValueError, match="different tokenizers"):
        Mixture([(a, 1), (c, 1)])
    m2 = Mixture.from_spec({tmp_path / "a": 1, tmp_path / "b": 3}, seed=5)
    assert len(m2) == len(mix)
    stream = BatchStream(mix, seed=0)
    assert len(stream.next_step(16)) == 16


def test_order_recorder_and_replay(ds, tmp_path, capsys):
    d, _ = ds
    run = tmp_path / "run"
    world = 2
    streams = [BatchStream(d, seed=9, rank=r, world_size=world) for r in range(world)]
    recs = [OrderRecorder(run, rank=r) for r in range(world)]
    global_batches = {}
    for step in range(1, 5):
        global_batches[step] = list(streams[0].peek_global(6))
        for s, rec in zip(streams, recs):
            samples = s.next_step(6)
            for b in pack(samples, 64):
                rec.record_batch(step, b)
        if step == 2:
            for rec in recs:
                rec.flush("step-00000002")
    for rec in recs:
        path = rec.flush("step-00000004")
    assert path.name == "rank-00001.parquet" and not list(path.parent.glob(".*"))
    for step in (1, 3, 4):
        got = replay_step(run, step)
        assert [sid for sid, _ in got] == global_batches[step]
        for sid, toks in got:
            assert np.array_equal(toks, d[sid])
    import pyarrow.parquet as pq
    t = pq.read_table(run / "data_order" / "step-00000002" / "rank-00000.parquet")
    assert set(t.column_names) >= {"step", "sample_id", "input_ids"} and set(t.column("step").to_pylist()) == {1, 2}
    from twinlm.cli import main
    assert main(["data", "order", str(run), "--step", "3"]) == 0
    out = capsys.readouterr().out
    assert "step 3: 6 samples" in out
    assert main(["data", "order", str(run), "--step", "3", "--out", str(tmp_path / "s3.parquet")]) == 0
    assert pq.read_table(tmp_path / "s3.parquet").num_rows == 6
    with pytest.raises(KeyError):
        read_step(run, 99)
