"""`twinlm reseal DIR`: accepting one's own in-place edits to a sealed model folder (issue 25, item 4), while a
damaged folder is still refused."""

import json
import shutil

import pytest
import transformers

from twinlm.cli import main
from twinlm.errors import ModelLoadError
from twinlm.io import MANIFEST
from twinlm.loading import load


@pytest.fixture
def folder(trained_decoder, tmp_path):
    out = tmp_path / "final"
    shutil.copytree(trained_decoder["final"], out)
    return out


def test_transformers_in_place_edits_are_accepted_by_reseal(folder, capsys):
    before = (folder / MANIFEST).read_text()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    tok.model_max_length = 32
    tok.save_pretrained(folder)  # what a user does to change model_max_length
    cfg = transformers.AutoConfig.from_pretrained(folder)
    cfg.classifier_pooling = "cls"
    cfg.save_pretrained(folder)
    with pytest.raises(ModelLoadError, match=rf"does not match its sha256 in {MANIFEST}.*`twinlm reseal {folder}`"):
        load(folder)

    assert main(["reseal", str(folder), "--dry-run"]) == 0
    assert (folder / MANIFEST).read_text() == before  # a dry run writes nothing
    capsys.readouterr()
    assert main(["reseal", str(folder)]) == 0
    out = capsys.readouterr().out
    changed = next(line for line in out.splitlines() if line.startswith("changed:"))
    assert "config.json" in changed and "tokenizer_config.json" in changed and "model.safetensors" not in changed
    assert "checked: the weights load (decoder" in out and "the tokenizer loads and matches the model" in out
    assert f"resealed {folder}" in out
    model = load(folder)  # accepted now, and still checked against the new manifest
    assert model.config.causal
    assert transformers.AutoTokenizer.from_pretrained(folder).model_max_length == 32
    assert main(["reseal", str(folder)]) == 0
    assert "nothing changed" in capsys.readouterr().out
    (folder / "config.json").write_text((folder / "config.json").read_text().replace('"cls"', '"mean"'))
    with pytest.raises(ModelLoadError, match="twinlm reseal"):  # the new manifest protects as the old one did
        load(folder)


def test_a_removed_file_is_listed_and_an_added_one_sealed(folder, capsys):
    (folder / "generation_config.json").unlink()
    with pytest.raises(ModelLoadError, match="listed in MANIFEST.sha256 but missing.*twinlm reseal"):
        load(folder)
    (folder / "notes.txt").write_text("fine-tuned on my data\n")
    assert main(["reseal", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "removed: generation_config.json" in out and "added:   notes.txt" in out
    assert "notes.txt" in (folder / MANIFEST).read_text()
    load(folder)


@pytest.mark.parametrize("damage", ["truncated", "flipped byte"])
def test_damaged_weights_are_not_resealed(folder, damage, capsys):
    before = (folder / MANIFEST).read_text()
    w = folder / "model.safetensors"
    data = bytearray(w.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[-5] ^= 0x01  # in the tensor data: the file still loads, so only the manifest can tell
    w.write_bytes(bytes(data))
    assert main(["reseal", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("twinlm: error: ") and len(err.strip().splitlines()) == 1
    assert "model.safetensors: the weights differ from MANIFEST.sha256" in err and "--accept-weights" in err
    if damage == "truncated":  # even when the user says they replaced them: they must still load
        assert main(["reseal", str(folder), "--accept-weights"]) == 2
        assert "the folder no longer loads" in capsys.readouterr().err
    assert (folder / MANIFEST).read_text() == before


def test_weights_under_a_damaged_manifest_need_accept_weights(folder, capsys):
    """With the manifest itself damaged nothing vouches for the weights: sealing them takes --accept-weights."""
    (folder / MANIFEST).write_text("not a manifest\n")
    assert main(["reseal", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "the weights cannot be checked against MANIFEST.sha256" in err and "--accept-weights" in err
    assert main(["reseal", str(folder), "--accept-weights"]) == 0


def test_a_broken_edit_is_refused_and_the_manifest_kept(folder, trained_decoder, capsys):
    before = (folder / MANIFEST).read_text()
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 32,')  # an edit saved half-way
    assert main(["reseal", str(folder)]) == 2
    assert "tokenizer_config.json: not valid JSON" in capsys.readouterr().err
    conf = json.loads((trained_decoder["final"] / "config.json").read_text())
    conf["vocab_size"] = 10  # the weights no longer fit the config
    (folder / "config.json").write_text(json.dumps(conf))
    shutil.copy(trained_decoder["final"] / "tokenizer_config.json", folder)
    assert main(["reseal", str(folder)]) == 2
    assert "the folder no longer loads" in capsys.readouterr().err
    assert (folder / MANIFEST).read_text() == before


def test_a_training_checkpoint_is_not_resealed(trained_decoder, capsys):
    ck = sorted((trained_decoder["run"] / "checkpoints").glob("step-*"))[0]
    assert main(["reseal", str(ck)]) == 2
    assert "twinlm export" in capsys.readouterr().err
