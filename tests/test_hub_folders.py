"""Folders twinlm writes, used as a Hugging Face user uses them (issue 11): a decoder trained by twinlm
tokenizes as `[CLS] text` with left padding, transformers' `generate` and pipeline equal twinlm's greedy
decoding, the folders carry a card, a generation config, hub tokenizer settings and a checksum manifest that
`twinlm.load` checks; checkpoints export to HF folders; `.bin` folders load safely; other folders are named."""

import json
import os

import pytest
import torch

from twinlm import load
from twinlm.cli import main
from twinlm.convert import CHECKPOINT_MARKER, convert, export_model
from twinlm.data.tokenizer import train_tokenizer
from twinlm.errors import MissingArtifactError, ModelLoadError, TokenizerMismatch
from twinlm.eval.toy import toy_sentences
from twinlm.generate import continue_text, greedy
from twinlm.train.checkpoint import MARKER

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = ["the old man", "a small red", "she said that the"]


@pytest.fixture(scope="module")
def trained(trained_decoder):
    return trained_decoder


def test_decoder_folder_tokenizes_as_training_did(trained):
    final = trained["final"]
    tok = transformers.AutoTokenizer.from_pretrained(final)
    ids = tok("the old man")["input_ids"]
    assert ids[0] == tok.cls_token_id and tok.sep_token_id not in ids
    assert ids[1:] == tok("the old man", add_special_tokens=False)["input_ids"]
    assert tok.padding_side == "left"
    assert tok.model_max_length == 64  # the context it was trained at, not 8192
    assert tok.model_input_names == ["input_ids", "attention_mask"]
    # the run's own tokenizer folder (an encoder's view) still wraps [CLS] … [SEP]
    plain = transformers.AutoTokenizer.from_pretrained(trained["tok"])
    assert plain("the old man")["input_ids"][-1] == plain.sep_token_id


def test_decoder_folder_card_generation_config_and_dropout(trained):
    final = trained["final"]
    gen = json.loads((final / "generation_config.json").read_text())
    cfg = load(final).config
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (cfg.cls_token_id, cfg.sep_token_id,
                                                                                 cfg.pad_token_id)
    hf_cfg = json.loads((final / "config.json").read_text())
    assert hf_cfg["attention_dropout"] == 0.0  # transformers would also drop attention probabilities
    assert cfg.attention_dropout == pytest.approx(0.1)  # twinlm's training value is kept
    card = (final / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: transformers" in front and "pipeline_tag: text-generation" in front
    assert "license: mit" in front
    metrics = [json.loads(line) for line in (trained["run"] / "metrics.jsonl").read_text().splitlines()]
    assert f"final training loss: {metrics[-1]['loss']:.4f}" in card
    assert f"{metrics[-1]['tokens']:,} tokens seen" in card
    assert str(trained["root"]) not in card and 'from_pretrained("dec/final")' in card  # the run's name, no path
    conf = json.loads((final / "tokenizer_config.json").read_text())  # what transformers 4 reads too
    assert conf["tokenizer_class"] == "PreTrainedTokenizerFast" and not {"is_local", "local_files_only"} & set(conf)
    assert "AutoModelForCausalLM" in card


def test_generate_and_pipeline_equal_twinlm_greedy(trained):
    final = trained["final"]
    ours = load(final)
    tok = transformers.AutoTokenizer.from_pretrained(final)
    hf = transformers.AutoModelForCausalLM.from_pretrained(final).eval()
    singles = []
    for prompt in PROMPTS:
        enc = tok(prompt, return_tensors="pt")  # default arguments, as a user calls it
        out = hf.generate(**enc, max_new_tokens=12, do_sample=False)[0].tolist()
        ref = greedy(ours, enc["input_ids"][0].tolist(), 12, eos_token_id=ours.config.sep_token_id)
        assert out[:len(ref)] == ref
        singles.append(tok.decode(out[enc["input_ids"].shape[1]:], skip_special_tokens=True))
        assert singles[-1] == continue_text(ours, tok, prompt, 12)
    # a left-padded batch gives each prompt's own continuation
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    outs = hf.generate(**batch, max_new_tokens=12, do_sample=False)
    texts = tok.batch_decode(outs[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert texts == singles
    pipe = transformers.pipeline("text-generation", model=str(final), device="cpu")
    got = pipe(PROMPTS[0], max_new_tokens=12, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert got == singles[0]


def test_trained_bpe_mask_swallows_the_space(trained):
    tok = transformers.AutoTokenizer.from_pretrained(trained["tok"])
    pieces = tok.convert_ids_to_tokens(tok("the [MASK].", add_special_tokens=False)["input_ids"])
    assert pieces[-2:] == ["[MASK]", "."] and "Ġ" not in pieces  # no lone space token before the mask
    pieces = tok.convert_ids_to_tokens(tok("a man [MASK] the", add_special_tokens=False)["input_ids"])
    assert "Ġ" not in pieces and "[MASK]" in pieces


def test_manifest_is_checked_on_load(trained, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(trained["final"], folder)
    lines = (folder / "MANIFEST.sha256").read_text().split()
    assert {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json"} <= set(lines)
    (folder / "README.md").write_text("edited card\n")  # the card is the user's to edit
    load(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["classifier_pooling"] = "cls"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"config.json: does not match its sha256 in MANIFEST.sha256.*export"):
        load(folder)
    assert main(["info", str(folder)]) == 0  # reading the shape needs no weights
    (folder / "config.json").unlink()
    shutil.copy(trained["final"] / "config.json", folder / "config.json")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="tokenizer.json: listed in MANIFEST.sha256 but missing"):
        load(folder)


def test_export_intermediate_checkpoint(trained, tmp_path, capsys):
    ckpts = sorted((trained["run"] / "checkpoints").glob("step-*"))
    assert ckpts, "the fixture keeps intermediate checkpoints"
    ck = ckpts[0]
    out = tmp_path / "exported"
    assert main(["export", str(ck), "--out", str(out)]) == 0
    assert "as a Hugging Face folder" in capsys.readouterr().out
    ours = load(ck)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    enc = tok("the old man and the sea", return_tensors="pt")
    with torch.no_grad():
        assert (hf(**enc).logits - ours(enc["input_ids"]).logits).abs().max() < 1e-4
    assert enc["input_ids"][0, 0] == tok.cls_token_id and tok.sep_token_id not in enc["input_ids"][0].tolist()
    card = (out / "README.md").read_text()
    assert ck.name in card and "pipeline_tag: text-generation" in card
    # another tokenizer than the run's is refused; no tokenizer at all is refused unless asked for
    other = train_tokenizer(None, 300, tmp_path / "other-tok", texts=toy_sentences(300, seed=9))
    with pytest.raises(TokenizerMismatch, match="not the tokenizer"):
        export_model(ck, tmp_path / "x", tokenizer=tmp_path / "other-tok")
    del other


def _flip_byte(path, at=-100):
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_export_refuses_what_it_cannot_vouch_for(trained, tmp_path, capsys, monkeypatch):
    """X4, N_T2, SEC8, X9: an export certifies nothing unchecked, and is written whole or not at all."""
    import shutil

    ck = tmp_path / "step"
    shutil.copytree(sorted((trained["run"] / "checkpoints").glob("step-*"))[0], ck)
    _flip_byte(ck / "model.safetensors")
    assert main(["export", str(ck), "--out", str(tmp_path / "x")]) == 2  # the manifest names the damage
    assert "model.safetensors does not match its sha256" in capsys.readouterr().err
    (ck / "MANIFEST.sha256").unlink()  # X4: and without the manifest resume refuses, nothing vouches for it
    assert main(["export", str(ck), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"{ck}: no MANIFEST.sha256" in err and "export another checkpoint" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()
    assert CHECKPOINT_MARKER == MARKER  # the export's check reads the trainer's marker
    # N_T2: a model folder without a manifest whose tokenizer.json is garbage (or nested past reading: SEC8)
    folder = tmp_path / "badtok"
    shutil.copytree(trained["final"], folder)
    (folder / "MANIFEST.sha256").unlink()
    for garbage in ("garbage", "[" * 200_000 + "]" * 200_000, '{"model": {"type": "Nope"}}'):
        (folder / "tokenizer.json").write_text(garbage)
        assert main(["export", str(folder), "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert f"{folder / 'tokenizer.json'}: not a tokenizer file" in err and len(err.splitlines()) == 1
        assert not (tmp_path / "x").exists()
    # X9: a full disk while the weights are written leaves no folder and no temporary, in one line
    import twinlm.export

    def full(*a, **k):
        raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(twinlm.export, "save_file", full)
    assert main(["export", str(trained["final"]), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "is full: the export was not written" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["badtok", "step"]


def test_export_overwrite_never_touches_the_source_or_a_folder_of_other_things(trained, tmp_path, capsys):
    """--overwrite replaces an earlier model folder whole, and nothing else: not a folder holding the source,
    one inside it, or a folder of other files."""
    import shutil

    parent = tmp_path / "project"
    shutil.copytree(trained["final"], parent / "model")
    (parent / "notes.txt").write_text("mine")
    for out in (parent, parent / "model" / "sub"):  # holds the source; inside it
        assert main(["export", str(parent / "model"), "--out", str(out), "--overwrite"]) == 2
        assert "would overwrite the source" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("mine")
    assert main(["export", str(parent / "model"), "--out", str(other), "--overwrite"]) == 2
    assert "is not a model folder" in capsys.readouterr().err
    assert (parent / "notes.txt").read_text() == (other / "thesis.tex").read_text() == "mine"
    assert (parent / "model" / "model.safetensors").is_file()
    out = tmp_path / "export"
    assert main(["export", str(parent / "model"), "--out", str(out)]) == 0
    (out / "stale.bin").write_text("old")
    assert main(["export", str(parent / "model"), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "stale.bin").exists() and (out / "model.safetensors").is_file()  # replaced whole


def test_export_refuses_without_tokenizer(tmp_path):
    from twinlm import ModelConfig, Transformer

    Transformer(ModelConfig.preset("cpu-tiny", num_layers=2, vocab_size=256)).save_checkpoint(tmp_path / "ck")
    with pytest.raises(MissingArtifactError, match="no tokenizer found.*--tokenizer DIR"):
        export_model(tmp_path / "ck", tmp_path / "out")
    export_model(tmp_path / "ck", tmp_path / "out", allow_no_tokenizer=True)
    assert transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "out") is not None
    logs = []
    convert(tmp_path / "ck", "decoder", tmp_path / "dec", log=logs.append)
    assert logs and "no tokenizer" in logs[0]


def test_convert_keeps_fields_and_generation_config(trained, tmp_path):
    src = tmp_path / "src"
    import shutil

    shutil.copytree(trained["final"], src)
    (src / "MANIFEST.sha256").unlink()  # edited below on purpose
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(classifier_pooling="cls", id2label={"0": "neg", "1": "pos"}, label2id={"neg": 0, "pos": 1})
    (src / "config.json").write_text(json.dumps(cfg))
    gen = json.loads((src / "generation_config.json").read_text())
    gen["max_new_tokens"] = 33
    (src / "generation_config.json").write_text(json.dumps(gen))
    enc = convert(src, "encoder", tmp_path / "enc")
    got = json.loads((enc / "config.json").read_text())
    assert got["classifier_pooling"] == "cls" and got["id2label"] == {"0": "neg", "1": "pos"}
    assert got["model_type"] == "modernbert"
    card = (enc / "README.md").read_text()  # a local source is named in the body, never as base_model
    assert "base_model" not in card and str(tmp_path) not in card and "converted from a decoder" in card
    back = convert(enc, "decoder", tmp_path / "dec")
    assert json.loads((back / "generation_config.json").read_text())["max_new_tokens"] == 33
    tok = transformers.AutoTokenizer.from_pretrained(back)
    assert tok("the man")["input_ids"][-1] != tok.sep_token_id and tok.padding_side == "left"
    assert tok.model_max_length == 64


def test_pytorch_bin_folders_load_safely(trained, tmp_path):
    hf = transformers.AutoModelForCausalLM.from_pretrained(trained["final"])
    binf = tmp_path / "bin"
    _save_bin(hf, binf)  # what older transformers wrote (and many hub repositories still hold)
    ours = load(trained["final"])
    got = load(binf)
    ids = torch.randint(5, 300, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, ours(ids).logits, rtol=0, atol=0)
    # sharded .bin
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((binf / "config.json").read_text())
    sd = torch.load(binf / "pytorch_model.bin", weights_only=True)
    names = sorted(sd)
    half = len(names) // 2
    torch.save({k: sd[k] for k in names[:half]}, sharded / "pytorch_model-00001-of-00002.bin")
    torch.save({k: sd[k] for k in names[half:]}, sharded / "pytorch_model-00002-of-00002.bin")
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        k: f"pytorch_model-0000{1 if i < half else 2}-of-00002.bin" for i, k in enumerate(names)}}))
    with torch.no_grad():
        torch.testing.assert_close(load(sharded)(ids).logits, ours(ids).logits, rtol=0, atol=0)
    # a pickle that is not a plain state dict is refused without running it
    torch.save({"model": _NotATensor()}, binf / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="not a plain PyTorch state dict.*weights only"):
        load(binf)


class _NotATensor:
    pass


def _save_bin(hf, folder):
    folder.mkdir(exist_ok=True)
    hf.config.save_pretrained(folder)
    torch.save({k: v.contiguous() for k, v in hf.state_dict().items()}, folder / "pytorch_model.bin")


def test_other_architectures_are_named(tmp_path):
    cfg = transformers.ModernBertConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=2, pad_token_id=3, bos_token_id=1, eos_token_id=2,
                                        cls_token_id=1, sep_token_id=2)
    torch.manual_seed(0)
    transformers.ModernBertForSequenceClassification(cfg).save_pretrained(tmp_path / "cls")
    with pytest.raises(ModelLoadError, match="this is a ModernBertForSequenceClassification folder"):
        load(tmp_path / "cls")
    transformers.ModernBertModel(cfg).save_pretrained(tmp_path / "base")
    with pytest.raises(ModelLoadError, match="this is a ModernBertModel folder"):
        load(tmp_path / "base")


def test_a_tokenizer_that_contradicts_the_model_is_refused(trained, tmp_path):
    import shutil

    from twinlm.eval.common import load_for_eval

    model = load(trained["final"])
    tok = transformers.AutoTokenizer.from_pretrained(trained["final"])
    wrong = model.config.replace(cls_token_id=model.config.sep_token_id, sep_token_id=model.config.cls_token_id)
    from twinlm import Transformer

    with pytest.raises(TokenizerMismatch, match=r"the tokenizer's \[CLS\] is id 1 but the model's cls_token_id is 2"):
        Transformer(wrong).save_pretrained(tmp_path / "x", tokenizer=tok)
    small = model.config.replace(vocab_size=64)
    with pytest.raises(TokenizerMismatch, match="tokens but the model's vocabulary is 64"):
        Transformer(small).save_pretrained(tmp_path / "y", tokenizer=tok)
    # a folder whose tokenizer was swapped for one with other special ids
    folder = tmp_path / "swapped"
    shutil.copytree(trained["final"], folder)
    (folder / "MANIFEST.sha256").unlink()
    conf = json.loads((folder / "config.json").read_text())
    conf.update(cls_token_id=4, bos_token_id=4)
    (folder / "config.json").write_text(json.dumps(conf))
    with pytest.raises(TokenizerMismatch, match="cls_token_id is 4"):
        load_for_eval(str(folder))
