"""Bad input to the newer commands (the second reliability review's cases; docs/bad-input.md, "Round two"):
each is one `twinlm: error:` line (exit 2) naming the file and the fix, never a traceback, a runaway process or a
message that points the wrong way. Every case runs the command a user runs, on tiny folders written by twinlm."""

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from twinlm.cli import main
from twinlm.data.order import OrderRecorder
from twinlm.eval.toy import toy_model_dir, toy_tokenizer
from twinlm.train.testing import make_shards, tiny_recipe


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny decoder folder as twinlm writes it (with a manifest)."""
    root = tmp_path_factory.mktemp("round2")
    return toy_model_dir(root / "model", causal=True, tokenizer=toy_tokenizer())


def _copy_without_manifest(src, dst):
    shutil.copytree(src, dst)
    (dst / "MANIFEST.sha256").unlink()  # as the review's cases: a folder nothing vouches for
    return dst


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


def test_N_T1_SEC8_a_damaged_tokenizer_json_is_named(model_dir, tmp_path, capsys):
    folder = _copy_without_manifest(model_dir, tmp_path / "badtok")
    for text in ("garbage", "[" * 200_000 + "]" * 200_000):
        (folder / "tokenizer.json").write_text(text)
        assert main(["eval", "bpb", str(folder)]) == 2
        line = _error_line(capsys)
        assert line.startswith(f"twinlm: error: {folder / 'tokenizer.json'}: not a tokenizer file"), line


def test_SEC9_SEC11_a_hostile_config_json_is_refused_before_anything_is_built(model_dir, tmp_path, capsys):
    nested = _copy_without_manifest(model_dir, tmp_path / "nest")
    (nested / "config.json").write_text('{"a": ' + "[" * 200_000 + "]" * 200_000 + "}")
    huge = _copy_without_manifest(model_dir, tmp_path / "big")
    cfg = json.loads((huge / "config.json").read_text())
    big = {k: v for k, v in cfg.items() if k != "layer_types"}  # the pattern of global layers then applies
    (huge / "config.json").write_text(json.dumps({**big, "num_hidden_layers": 10_000_000}))
    for argv in (["info", str(nested)], ["eval", "bpb", str(nested)]):
        assert main(argv) == 2
        assert "config.json: JSON nested too deeply" in _error_line(capsys)
    for argv in (["info", str(huge)], ["eval", "bpb", str(huge)]):
        assert main(argv) == 2  # in moments, not after growing to gigabytes
        line = _error_line(capsys)
        assert "config.json: describes a model of" in line and "10,000,000 layers" in line, line
    # without weights a shape is still read, up to a sane number of layers
    (huge / "model.safetensors").unlink()
    assert main(["info", str(huge)]) == 2
    assert "asks for 10,000,000 layers" in _error_line(capsys)
    (huge / "config.json").write_text(json.dumps(cfg))
    assert main(["info", str(huge)]) == 0


def test_SEC2_a_pickle_on_the_transformers_path_is_one_line_and_never_run(model_dir, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "pk_bert"
    folder.mkdir()
    transformers.BertConfig(vocab_size=384, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, architectures=["BertForMaskedLM"]).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, folder / name)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    torch.save({"bert.embeddings.word_embeddings.weight": Payload()}, folder / "pytorch_model.bin")
    assert main(["eval", "bpb", str(folder)]) == 2
    line = _error_line(capsys)
    assert f"{folder}: its weights are a pickle that cannot be read safely" in line and "nothing in it was run" in line
    assert not marker.exists()


def test_N_V3_N_V7_N_V8_data_verify_checks_every_folder_and_every_kind(tmp_path, capsys):
    """Every folder is checked though earlier ones failed (N_V3); MDS folders (N_V7) are read against index.json's
    sizes and hashes and batch-order folders (N_V8) against their sha256 records, good ones ok, damaged ones named."""
    def flip(f):
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))

    good = make_shards(tmp_path / "good", n_docs=20)
    bad = make_shards(tmp_path / "bad", n_docs=20)
    flip(bad / "tokens.bin")
    mds, bad_mds = tmp_path / "mds", tmp_path / "bad_mds"
    for d in (mds, bad_mds):
        shutil.copytree(Path(__file__).parent / "fixtures" / "mds" / "tokens", d)
    flip(bad_mds / "shard.00001.mds.zstd")
    orders = []
    for name in ("run", "bad_run"):
        rec = OrderRecorder(tmp_path / name)
        rec.record(1, [0, 1], [[1, 5, 2], [1, 6, 2]])
        rec.flush("step-00000001")
        orders.append(tmp_path / name / "data_order")
    order, bad_order = orders
    flip(next(bad_order.rglob("*.parquet")))
    assert main(["data", "verify", str(bad), str(mds), str(bad_mds), str(order), str(bad_order), str(good)]) == 2
    out, err = capsys.readouterr()
    assert f"{good}: ok (20 chunks" in out  # checked though earlier folders failed
    assert f"{mds}: ok (an MDS folder: 4 shards" in out and "sizes and hashes checked" in out
    assert f"{order}: ok (a batch-order folder: 1 parquet files; sha256 records checked" in out
    lines = err.strip().splitlines()
    assert lines[0].startswith(f"{bad}: FAILED: ") and "tokens.bin: sha256" in lines[0]
    assert lines[1].startswith(f"{bad_mds}: FAILED: {bad_mds / 'shard.00001.mds.zstd'}: ")
    assert lines[2].startswith(f"{bad_order}: FAILED: ") and "the file was altered" in lines[2]
    assert lines[3] == f"twinlm: error: 3 of 6 folders failed verification ({bad}, {bad_mds}, {bad_order}; each " \
                       "is named above with what to do)"


def test_O6_data_order_out_a_folder(tmp_path, capsys):
    rec = OrderRecorder(tmp_path / "run")
    rec.record(1, [0], [[1, 5, 2]])
    rec.flush("step-00000001")
    (tmp_path / "adir").mkdir()
    assert main(["data", "order", str(tmp_path / "run"), "--step", "1", "--out", str(tmp_path / "adir")]) == 2
    assert f"{tmp_path / 'adir'} is a folder: name a .parquet file" in _error_line(capsys)
    assert list((tmp_path / "adir").iterdir()) == []


def test_S04_a_shard_folder_without_meta_json_is_called_that(tmp_path, capsys):
    shards = make_shards(tmp_path / "shards", n_docs=20)
    (shards / "meta.json").unlink()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(shards, phases=1)))
    assert main(["train", str(recipe), "--out", str(tmp_path / "run")]) == 2
    line = _error_line(capsys)
    assert f"{shards}: not a complete shard folder (no meta.json" in line and "move it aside" in line, line
    assert "no shards folder" not in line


def test_P16_the_holdout_warning_is_printed_once(tmp_path, capsys):
    tok = toy_tokenizer(out_dir=tmp_path / "tok")
    del tok
    docs = tmp_path / "d.jsonl"
    docs.write_text("".join(json.dumps({"text": f"the old man and the sea {i} " * 8}) + "\n" for i in range(40)))
    assert main(["data", "prepare", str(docs), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "s"),
                 "--chunk-size", "32", "--holdout-docs", "100", "--workers", "0"]) == 0
    err = capsys.readouterr().err
    assert err.count("of the 100 documents asked for") == 1 and "warning: held out " in err, err
