import json

import pytest
import torch

from twinlm import ModelConfig, Transformer, load
from twinlm.cli import main
from twinlm.convert import convert

transformers = pytest.importorskip("transformers")


def _save_encoder(path, tokenizer=True):
    cfg = ModelConfig.preset("cpu-tiny", num_layers=2, vocab_size=256)
    torch.manual_seed(0)
    m = Transformer(cfg)
    m.save_pretrained(path)
    if tokenizer:
        (path / "tokenizer.json").write_text('{"dummy": true}')
        (path / "tokenizer_config.json").write_text("{}")
    return m


def test_encoder_to_decoder_and_back(tmp_path):
    enc = _save_encoder(tmp_path / "enc")
    dec_dir = convert(tmp_path / "enc", "decoder", tmp_path / "dec")
    # the tokenizer is carried along, with the decoder's template (issue 11: `[CLS] $A`, nothing appended)
    tok_json = json.loads((dec_dir / "tokenizer.json").read_text())
    assert tok_json["dummy"] is True
    assert [next(iter(x.values()))["id"] for x in tok_json["post_processor"]["single"]] == ["[CLS]", "A"]
    cfg = json.loads((dec_dir / "config.json").read_text())
    assert cfg["model_type"] == "modernbert-decoder" and cfg["architectures"] == ["ModernBertDecoderForCausalLM"]
    dec = load(dec_dir)
    assert dec.config.causal and dec.config.replace(causal=False) == enc.config
    for (n, a), (_, b) in zip(enc.state_dict().items(), dec.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    hf = transformers.AutoModelForCausalLM.from_pretrained(dec_dir).eval()
    assert type(hf).__name__ == "ModernBertDecoderForCausalLM"
    ids = torch.randint(5, 256, (2, 150))
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - dec(ids).logits).abs().max() <= 1e-4
    # and back: an encoder again, identical to the original
    back = convert(dec_dir, "encoder", tmp_path / "enc2")
    hf_enc = transformers.AutoModelForMaskedLM.from_pretrained(back).eval()
    assert type(hf_enc).__name__ == "ModernBertForMaskedLM"
    with torch.no_grad():
        assert (hf_enc(input_ids=ids).logits - enc.eval()(ids).logits).abs().max() <= 1e-4


def test_convert_from_twinlm_checkpoint_and_rope(tmp_path):
    cfg = ModelConfig.preset("cpu-tiny", num_layers=2, vocab_size=256, causal=True)
    Transformer(cfg).save_checkpoint(tmp_path / "ckpt")
    out = convert(tmp_path / "ckpt", "encoder", tmp_path / "enc", global_rope_theta=160_000.0)
    m = load(out)
    assert not m.config.causal and m.config.global_rope_theta == 160_000.0


def test_cli(tmp_path, capsys):
    _save_encoder(tmp_path / "enc")
    assert main(["convert", str(tmp_path / "enc"), "--to", "decoder", "--out", str(tmp_path / "dec")]) == 0
    assert load(tmp_path / "dec").config.causal
    # already a decoder / output exists: clear errors, exit code 2
    assert main(["convert", str(tmp_path / "dec"), "--to", "decoder", "--out", str(tmp_path / "x")]) == 2
    assert "already holds a" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "enc"), "--to", "decoder", "--out", str(tmp_path / "dec")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "nope"), "--to", "decoder", "--out", str(tmp_path / "y")]) == 2
    assert "no such model folder" in capsys.readouterr().err


def test_info_cli(capsys):
    assert main(["info", "ettin-17m"]) == 0
    out = capsys.readouterr().out
    assert "16,913,600" in out and "non-embedding" in out and "FLOPs/token" in out
    assert main(["info", "cpu-tiny", "--decoder", "--json", "--seq-len", "256"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["kind"] == "decoder" and d["flops_per_token"] > 0
    # an unknown preset is a user error: one line, exit status 2
    assert main(["info", "ettin-2b"]) == 2
    assert "'ettin-2b' is neither a preset" in capsys.readouterr().err
