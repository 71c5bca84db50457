"""Hub ids with a revision (`org/name@step3`) wherever a model folder is accepted, read offline from a local
cache laid out the way huggingface_hub lays it out (refs/<revision> -> snapshots/<commit>/ -> blobs)."""


import huggingface_hub.constants
import pytest
import torch

import twinlm
from twinlm.cli import main
from twinlm.errors import ModelLoadError
from twinlm.eval import bpb
from twinlm.eval.curve import curve
from twinlm.eval.toy import toy_hub_revision, toy_model_dir, toy_sentences, toy_tokenizer
from twinlm.hub import parse_hub_id, resolve_model


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    tok = toy_tokenizer()
    cache = root / "cache"
    toy_hub_revision(cache, "ettin-org/tiny-decoder", "main", toy_model_dir(root / "main", causal=True, tokenizer=tok))
    toy_hub_revision(cache, "ettin-org/tiny-decoder", "step3",
                 toy_model_dir(root / "step3", causal=True, tokenizer=tok, seed=3))
    return root, cache


@pytest.fixture
def offline_cache(hub, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub[1]))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return hub


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_parse_hub_ids():
    assert parse_hub_id("jhu-clsp/ettin-encoder-17m@step590532") == ("jhu-clsp/ettin-encoder-17m", "step590532")
    assert parse_hub_id("org/name") == ("org/name", None)
    assert parse_hub_id("just-a-name") is None and parse_hub_id("../x/y") is None


def test_load_any_revision_from_the_cache(offline_cache):
    root, _ = offline_cache
    step3 = twinlm.load("ettin-org/tiny-decoder", revision="step3")
    same = twinlm.load("ettin-org/tiny-decoder@step3")
    main_ = twinlm.load("ettin-org/tiny-decoder")
    want = twinlm.load(root / "step3")
    for k, v in weights(want).items():
        assert torch.equal(step3.state_dict()[k], v) and torch.equal(same.state_dict()[k], v)
    assert any(not torch.equal(main_.state_dict()[k], v) for k, v in weights(want).items())
    folder = resolve_model("ettin-org/tiny-decoder@step3")
    assert folder.parent.name == "snapshots" and (folder / "config.json").is_file()
    assert resolve_model(root / "main") == root / "main"  # a local folder is itself


def test_commands_take_hub_ids(offline_cache, tmp_path, capsys):
    root, _ = offline_cache
    texts = toy_sentences(20)
    by_id = bpb.run("ettin-org/tiny-decoder@step3", texts=texts, log=None)
    by_folder = bpb.run(str(root / "step3"), texts=texts, log=None)
    assert by_id["tasks"]["texts"]["bpb"] == by_folder["tasks"]["texts"]["bpb"]
    assert main(["info", "ettin-org/tiny-decoder@step3", "--json"]) == 0
    assert '"kind": "decoder"' in capsys.readouterr().out
    assert main(["convert", "ettin-org/tiny-decoder@step3", "--to", "encoder", "--out", str(tmp_path / "enc")]) == 0
    assert twinlm.load(tmp_path / "enc").config.causal is False
    assert main(["export", "ettin-org/tiny-decoder@step3", "--out", str(tmp_path / "exp")]) == 0  # N_H3, N_H7
    assert torch.equal(twinlm.load(tmp_path / "exp").state_dict()["tok_embeddings.weight"],
                       twinlm.load(root / "step3").state_dict()["tok_embeddings.weight"])
    # revisions of one repository are one series of a curve, in step order
    held = tmp_path / "held.txt"
    held.write_text("\n\n".join(texts[:3]) + "\n")
    res = curve(["ettin-org/tiny-decoder@step3", "ettin-org/tiny-decoder"], ["bpb"], tmp_path / "curve",
                overrides=[f"bpb.text_file={held}"], log=lambda m: None)
    assert [(p["series"], p["label"]) for p in res["points"]] == [("ettin-org/tiny-decoder", "main"),
                                                                  ("ettin-org/tiny-decoder", "step3")]


@pytest.mark.parametrize("spec, words", [("ettin-org/tiny-decoder@step9", "step9"),
                                         ("ettin-org/no-such-model", "not in the Hugging Face cache")])
def test_missing_revisions_are_one_line_errors(offline_cache, capsys, spec, words):
    with pytest.raises(ModelLoadError, match=words):
        twinlm.load(spec)
    assert main(["info", spec]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("twinlm: error:") and words in err[0]
