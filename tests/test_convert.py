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


def _tokenize(folder):
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    single, pair = tok("hello world"), tok("hello world", "the end")
    return tok, single["input_ids"], pair["input_ids"], pair.get("token_type_ids")


def test_convert_writes_the_target_kinds_tokenizer_conventions(trained_decoder, tmp_path):
    """Issue 25 item 3: a decoder converted to an encoder tokenizes as a twinlm-trained encoder's final/
    (`[CLS] text [SEP]`, right padding), not with the decoder's `[CLS] text`; and the reverse."""
    from twinlm.eval.toy import toy_tokenizer

    dec_final = trained_decoder["final"]
    enc = convert(dec_final, "encoder", tmp_path / "enc", log=lambda *a: None)
    # what a twinlm-trained encoder's final/ holds: the run's tokenizer through save_pretrained
    ref = tmp_path / "ref-enc"
    enc_model = Transformer(load(dec_final).config.replace(causal=False))
    enc_model.save_pretrained(ref, tokenizer=str(trained_decoder["tok"]))
    tok, single, pair, types = _tokenize(enc)
    _, ref_single, ref_pair, ref_types = _tokenize(ref)
    assert single[0] == tok.cls_token_id and single[-1] == tok.sep_token_id
    assert (single, pair, types) == (ref_single, ref_pair, ref_types)
    assert pair.count(tok.sep_token_id) == 2 and tok.padding_side == "right" and tok.mask_token == "[MASK]"
    # the decoder it came from: `[CLS] text`, nothing appended
    dtok, dsingle, _, _ = _tokenize(dec_final)
    assert dsingle == single[:-1] and dtok.padding_side == "left"
    # HF fill-mask runs on the converted encoder and sees `[CLS] … [MASK] … [SEP]`
    fill = transformers.pipeline("fill-mask", model=str(enc), tokenizer=str(enc), device="cpu")
    out = fill("the old [MASK] is here.", top_k=3)
    assert len(out) == 3 and all("score" in o for o in out)
    # and back: a decoder again, with the decoder's conventions (BOS first, no [SEP] appended)
    back = convert(enc, "decoder", tmp_path / "dec", log=lambda *a: None)
    btok, bsingle, bpair, _ = _tokenize(back)
    assert bsingle == dsingle and bsingle[0] == btok.cls_token_id and btok.sep_token_id not in bsingle
    assert btok.sep_token_id not in bpair and btok.padding_side == "left"

    # an encoder trained by twinlm (toy tokenizer) converted to a decoder, and its own template kept on export
    toy = toy_tokenizer(vocab_size=256, out_dir=tmp_path / "toy")
    cfg = ModelConfig.preset("cpu-tiny", num_layers=1, vocab_size=256)
    src = tmp_path / "toy-enc"
    Transformer(cfg).save_pretrained(src, tokenizer=str(tmp_path / "toy"))
    assert (json.loads((src / "tokenizer.json").read_text())["post_processor"]
            == json.loads((tmp_path / "toy" / "tokenizer.json").read_text())["post_processor"])
    e2d = convert(src, "decoder", tmp_path / "toy-dec", log=lambda *a: None)
    e2d_tok, e2d_single, _, _ = _tokenize(e2d)
    assert e2d_single == toy("hello world")["input_ids"][:-1] and e2d_tok.padding_side == "left"


def test_encoder_template_detection():
    """An encoder's own template is kept when it already appends the model's [SEP] (BERT / RoBERTa
    processing, a TemplateProcessing ending with the sep id, inside a Sequence); anything else is replaced."""
    from twinlm.export import _appends_sep, _template

    cfg = ModelConfig.preset("cpu-tiny", num_layers=1, vocab_size=256)
    assert _appends_sep(_template(cfg, True), cfg) and not _appends_sep(_template(cfg, False), cfg)
    assert _appends_sep({"type": "BertProcessing", "sep": ["[SEP]", cfg.sep_token_id], "cls": ["[CLS]", 1]}, cfg)
    assert _appends_sep({"type": "Sequence", "processors": [{"type": "ByteLevel"}, _template(cfg, True)]}, cfg)
    assert not _appends_sep(None, cfg) and not _appends_sep({"type": "ByteLevel"}, cfg)
    named = _template(cfg, True, {cfg.cls_token_id: "<s>", cfg.sep_token_id: "</s>"})
    assert named["special_tokens"]["</s>"]["ids"] == [cfg.sep_token_id] and _appends_sep(named, cfg)
