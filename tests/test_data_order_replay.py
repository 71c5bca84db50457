"""Batch-order replay and recomputation: a run replayed from its own records (or from the released parquet
layout) trains on the same batches and reaches the same losses, step for step, also across a resume; the
order of an unrecorded run is recomputed equal to a recorded one; bad order folders fail in one line."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from twinlm.cli import main
from twinlm.data.order import ORDER_COLUMNS, OrderFolder, read_step
from twinlm.errors import ConfigError, DataError
from twinlm.eval.toy import toy_tokenizer
from twinlm.train import run
from twinlm.train.plan import order_of_step, step_batch
from twinlm.train.testing import make_shards, tiny_recipe


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards") / "tiny", n_docs=120)


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def recipe(data, **kw):
    # two phases: the replayed order must continue into the second one at the right global step
    return tiny_recipe(data, phases=2, tokens=600, batch_size=4, every_tokens=200, **kw)


@pytest.fixture(scope="module")
def original(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("orig") / "run"
    run(recipe(shards, record_order=True), out)
    return out


def test_replayed_run_has_the_original_losses_and_batches(shards, original, tmp_path):
    replay = tmp_path / "replay"
    run(recipe(str(original / "data_order"), record_order=True), replay)
    want = losses(original)
    assert len(want) > 6 and losses(replay) == want  # exact: same batches, masks, init
    for k in (1, len(want) // 2, len(want)):
        assert read_step(replay, k) == read_step(original, k)
    # the replay run's own order, recomputed from its recipe (which names the order folder), is the records'
    rows, how = order_of_step(replay, 3)
    assert how.startswith("recorded and recomputed") and [r["input_ids"] for r in rows] == \
        [r["input_ids"] for r in read_step(original, 3)]


@pytest.mark.slow
def test_replay_resumes_exactly(shards, original, tmp_path):
    replay = tmp_path / "replay"
    r = recipe(str(original))  # the run folder itself names its data_order/
    run({**r, "max_steps": 3}, replay)
    assert len(losses(replay)) == 3
    run(r, replay)
    assert losses(replay) == losses(original)


def test_order_of_an_unrecorded_run_is_recomputed_equal_to_the_records(shards, original, tmp_path, capsys):
    plain = tmp_path / "plain"
    run({**recipe(shards), "max_steps": 2}, plain)  # no records; the recipe alone defines every step
    n = len(losses(original))
    for k in (1, 2, n - 1, n):  # also steps the unrecorded run never reached, and the second phase
        rows, how = order_of_step(plain, k)
        assert how == "recomputed (not recorded)"
        assert [(r["sample_id"], r["input_ids"]) for r in rows] == \
            [(r["sample_id"], r["input_ids"]) for r in read_step(original, k)]
    # and through the CLI: --out writes the rows; the recorded run's records are checked against it
    out = tmp_path / "step.parquet"
    assert main(["data", "order", str(original), "--step", str(n), "--out", str(out)]) == 0
    assert "recorded and recomputed (equal)" in capsys.readouterr().out
    assert pq.read_table(out).column("input_ids").to_pylist() == [r["input_ids"] for r in read_step(original, n)]
    # the one batch-order schema: a step written by the command line is a file of the run's own records
    recorded = next((original / "data_order").glob("step-*/rank-*.parquet"))
    assert pq.read_schema(out) == pq.read_schema(recorded)
    assert [f.name for f in pq.read_schema(out)] == list(ORDER_COLUMNS)


def test_records_that_disagree_with_the_recipe_are_an_error(shards, original, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    cfg = (copy / "config.yaml").read_text().replace("seed: 21", "seed: 22")
    (copy / "config.yaml").write_text(cfg)
    with pytest.raises(DataError, match="differs from the one recomputed"):
        order_of_step(copy, 1)
    assert step_batch(copy, 1)  # recomputation alone still works


def released_layout(run_dir, out, group="checkpoint", per_file=3, drop_step=None, mutate=None):
    """The run's records rewritten in the released layout: <group>_NNN folders per checkpoint interval with
    steps_AAAAAA_to_BBBBBB.parquet files holding input_ids and step (no sample ids)."""
    order = OrderFolder(run_dir)
    for iv in order.intervals:
        steps = list(range(iv.first, iv.last + 1))
        folder = out / f"{group}_{iv.last:06d}"
        folder.mkdir(parents=True)
        for i in range(0, len(steps), per_file):
            part = [s for s in steps[i:i + per_file] if s != drop_step]
            ids, st = [], []
            for s in part:
                for r in order.rows(s):
                    seq = [int(v) for v in r["input_ids"]]
                    ids.append(mutate(seq) if mutate else seq)
                    st.append(s)
            if ids:
                pq.write_table(pa.table({"input_ids": pa.array(ids, pa.list_(pa.int32())),
                                         "step": pa.array(st, pa.int64())}),
                               folder / f"steps_{part[0]:06d}_to_{part[-1]:06d}.parquet")
    return out


@pytest.fixture(scope="module")
def decoder_run(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("dec") / "run"
    run(tiny_recipe(shards, objective="clm", phases=1, tokens=500, batch_size=4, every_tokens=250,
                    record_order=True), out)
    return out


@pytest.mark.slow
def test_released_layout_replays_with_the_same_losses(shards, decoder_run, tmp_path):
    # a decoder's loss does not depend on sample ids (no masking), so the released layout, which has none,
    # must reproduce the losses exactly
    rel = released_layout(decoder_run, tmp_path / "order")
    (rel / "ext_000001").mkdir()  # another phase's folder: steps restart there, so it is a separate group
    pq.write_table(pa.table({"input_ids": pa.array([[1, 5, 2]], pa.list_(pa.int32())), "step": [1]}),
                   rel / "ext_000001" / "steps_000001_to_000001.parquet")
    with pytest.raises(ConfigError, match="order_group"):
        OrderFolder(rel)
    order = OrderFolder(rel, group="checkpoint")
    assert order.layout == "released" and order.first_step == 1
    replay = tmp_path / "replay"
    r = {**tiny_recipe(shards, objective="clm", phases=1, tokens=500, batch_size=4),
         "data": {"path": str(rel), "order_group": "checkpoint"}}
    run(r, replay)
    assert losses(replay) == losses(decoder_run)
    # and from a later step on: start_step picks where the continuation starts
    later = {**tiny_recipe(shards, objective="clm", phases=1, tokens=200, batch_size=4),
             "data": {"path": str(rel), "order_group": "checkpoint", "start_step": 4}}
    run(later, tmp_path / "later")
    assert read_step(rel, 4, group="checkpoint")[0]["input_ids"] == \
        [int(v) for v in step_batch(tmp_path / "later", 1)[0]["input_ids"]]


def test_bad_order_folders_are_one_line_errors(shards, original, tmp_path, capsys):
    gap = released_layout(original, tmp_path / "gap", per_file=1, drop_step=3)
    with pytest.raises(DataError, match="steps 3–3 are missing"):
        OrderFolder(gap)
    long = released_layout(original, tmp_path / "long", mutate=lambda s: s + [5] * 100)
    r = tiny_recipe(str(long), objective="clm", phases=1, tokens=500, batch_size=4)
    with pytest.raises(DataError, match="longer than the phase's seq_len 64"):
        run(r, tmp_path / "r1")
    big = released_layout(original, tmp_path / "big", mutate=lambda s: s[:-1] + [999_999])
    assert main(["data", "order", str(big), "--step", "1"]) == 0  # reading is fine; training refuses
    with pytest.raises(DataError, match="outside the vocabulary"):
        run(tiny_recipe(str(big), objective="clm", phases=1, tokens=500, batch_size=4), tmp_path / "r3")
    capsys.readouterr()
    assert main(["data", "order", str(gap), "--step", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("twinlm: error:") and "missing" in err[0]
    assert not (tmp_path / "r1" / "final").exists() and not (tmp_path / "r3" / "final").exists()
    assert np.isfinite(losses(original)).all()


def _change_a_token(f):
    """Rewrite parquet file `f` with one token id changed: still a valid file, as a silent bit flip would leave."""
    table = pq.read_table(f)
    ids = table.column("input_ids").to_pylist()
    ids[0][3] = (ids[0][3] + 1) % 4096
    pq.write_table(table.set_column(table.schema.get_field_index("input_ids"), "input_ids",
                                    pa.array(ids, pa.list_(pa.int32()))), f)


def test_OF01_an_altered_order_file_is_named_before_it_is_used(shards, original, tmp_path, capsys):
    # twinlm's records carry a sha256 record per file: a file rewritten with one token changed (still valid
    # parquet) is refused by `data order` and by replay, naming it
    copy = tmp_path / "order"
    shutil.copytree(original / "data_order", copy)
    f = sorted(copy.glob("step-*/rank-*.parquet"))[0]
    assert f.with_name(f.name + ".sha256").is_file()
    _change_a_token(f)
    first = OrderFolder(copy).first_step
    with pytest.raises(DataError, match=r"rank-00000.parquet: sha256 .* differs from rank-00000.parquet.sha256"):
        read_step(copy, first)
    with pytest.raises(DataError, match="differs from"):
        run(recipe(copy), tmp_path / "replay")
    capsys.readouterr()
    assert main(["data", "order", str(copy), "--step", str(first)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(f) in err[0]
    # a released folder gets its fingerprint on first read; a later change is then named
    rel = released_layout(original, tmp_path / "rel")
    read_step(rel, 1)
    file = sorted(rel.glob("checkpoint_*/*.parquet"))[0]
    assert file.with_name(file.name + ".sha256").is_file()
    _change_a_token(file)
    with pytest.raises(DataError, match="differs from"):
        read_step(rel, 1)


def test_O5_O7_order_out_keeps_other_files_and_the_tokenizer_must_be_the_runs(original, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    capsys.readouterr()
    assert main(["data", "order", str(original), "--step", "1", "--out", str(notes)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an earlier `twinlm data order` output" in err[0]
    assert notes.read_text() == "my notes\n"
    out = tmp_path / "step.parquet"
    assert main(["data", "order", str(original), "--step", "1", "--out", str(out)]) == 0
    assert main(["data", "order", str(original), "--step", "2", "--out", str(out)]) == 0  # an earlier output
    assert set(pq.read_table(out).column("step").to_pylist()) == {2}
    assert main(["data", "order", str(original), "--step", "1", "--out", str(notes), "--overwrite"]) == 0
    assert pq.read_table(notes).num_rows > 0
    assert main(["data", "order", str(original), "--step", "1", "--out", str(tmp_path)]) == 2  # a folder
    # O7: the run records its tokenizer's fingerprint; another tokenizer is refused, and for a bare
    # released folder (no fingerprint) one too small for the ids is
    tok = toy_tokenizer(out_dir=tmp_path / "tok")
    capsys.readouterr()
    assert main(["data", "order", str(original), "--step", "1", "--tokenizer", str(tmp_path / "tok")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not the tokenizer" in err[0]
    rel = released_layout(original, tmp_path / "rel", mutate=lambda s: s[:-1] + [len(tok) + 5])
    assert main(["data", "order", str(rel), "--step", "1", "--tokenizer", str(tmp_path / "tok")]) == 2
    assert "ids reach" in capsys.readouterr().err
