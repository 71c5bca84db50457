"""Bad input to the newer commands (the second reliability review's cases; docs/bad-input.md, "Round two"):
each is one `twinlm: error:` line (exit 2) naming the file and the fix, never a traceback, a runaway process or a
message that points the wrong way. Every case runs the command a user runs, on tiny folders written by twinlm."""

import json
import os
import shutil

import pytest

from twinlm.cli import main
from twinlm.eval.toy import toy_model_dir, toy_tokenizer


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
