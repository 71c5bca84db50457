import json

import pytest
import torch

from twinlm import ModelConfig, Transformer, load
from twinlm.errors import ModelLoadError
from twinlm.hf import HF_TO_TWINLM, TWINLM_TO_HF, from_hf_state_dict, hf_names, to_hf_state_dict
from twinlm.loading import read_config

transformers = pytest.importorskip("transformers")


def _twin(causal, layers=5, heads=2, hidden=128, seed=0, **kw):
    cfg = ModelConfig.preset("cpu-tiny", causal=causal, num_layers=layers, num_heads=heads, hidden_size=hidden,
                             vocab_size=512, global_rope_theta=160_000.0, **kw)
    torch.manual_seed(seed)
    m = Transformer(cfg).eval()
    with torch.no_grad():  # move off the init (norms = 1, bias = 0) so that every weight matters
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def _hf_class(causal):
    return transformers.AutoModelForCausalLM if causal else transformers.AutoModelForMaskedLM


def _batch(T=300, B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 512, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if B > 1:
        mask[1, T - 70:] = 0  # right padding
    if B > 2:
        mask[2, :90] = 0  # left padding
    return ids, mask


def _max_diff(a, b, mask):
    keep = mask.bool()
    return (a[keep] - b[keep]).abs().max().item()


# shapes: (layers, heads, hidden); 5 layers: the last layer (4) is local, 2 layers: layer 1 local
SHAPES = [(5, 2, 128), (2, 4, 256), (4, 2, 128)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_twinlm_to_transformers(tmp_path, causal, shape):
    layers, heads, hidden = shape
    m = _twin(causal, layers, heads, hidden)
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["layer_types"] == m.config.layer_types
    assert cfg["rope_parameters"]["full_attention"]["rope_theta"] == 160_000.0
    assert cfg["rope_parameters"]["sliding_attention"]["rope_theta"] == 10_000.0
    ids, mask = _batch()
    with torch.no_grad():
        ours = m(ids, attention_mask=mask).logits
        for impl in ("sdpa", "eager") if shape == SHAPES[0] else ("sdpa",):
            hf = _hf_class(causal).from_pretrained(tmp_path, attn_implementation=impl).eval()
            assert type(hf).__name__ == ("ModernBertDecoderForCausalLM" if causal else "ModernBertForMaskedLM")
            assert _max_diff(ours, hf(input_ids=ids, attention_mask=mask).logits, mask) <= 1e-4
            if impl == "sdpa":
                assert _max_diff(ours[:1], hf(input_ids=ids[:1]).logits, mask[:1]) <= 1e-4


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES[:2])
def test_transformers_to_twinlm(tmp_path, causal, shape):
    layers, heads, hidden = shape
    kw = dict(vocab_size=512, hidden_size=hidden, intermediate_size=96, num_hidden_layers=layers,
              num_attention_heads=heads, pad_token_id=3, bos_token_id=1, eos_token_id=2, cls_token_id=1,
              sep_token_id=2)
    if causal:
        hf_cfg = transformers.ModernBertDecoderConfig(**kw)
        hf = transformers.ModernBertDecoderForCausalLM(hf_cfg)
    else:
        hf_cfg = transformers.ModernBertConfig(**kw)
        hf = transformers.ModernBertForMaskedLM(hf_cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.eval().save_pretrained(tmp_path)
    m = load(tmp_path)
    assert m.config.causal == causal and m.config.num_layers == layers
    assert m.config.global_rope_theta == 160_000.0 and m.config.local_rope_theta == 10_000.0
    ids, mask = _batch(T=320)
    with torch.no_grad():
        assert _max_diff(m(ids, attention_mask=mask).logits, hf(input_ids=ids, attention_mask=mask).logits,
                         mask) <= 1e-4


def test_twinlm_checkpoint_round_trip(tmp_path):
    m = _twin(True)
    m.save_checkpoint(tmp_path)
    assert (tmp_path / "model_config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    m2 = load(tmp_path)
    assert m2.config == m.config
    ids, _ = _batch(T=40, B=1)
    with torch.no_grad():
        torch.testing.assert_close(m2(ids).logits, m(ids).logits, rtol=0, atol=0)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]", "hello", "world"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]",
                                                sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]")


def test_tokenizer_files_saved(tmp_path):
    m = _twin(False, layers=2)
    m.save_pretrained(tmp_path, tokenizer=_tokenizer())
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    # an encoder tokenizes `[CLS] text [SEP]` (as twinlm trains it) even from a tokenizer that adds nothing
    assert tok.mask_token_id == 4 and tok("hello world")["input_ids"] == [1, 5, 6, 2]


def test_bad_folders_are_named(tmp_path):
    m = _twin(False, layers=2)
    good = tmp_path / "good"
    m.save_pretrained(good)
    # another model type
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(ModelLoadError, match="model_type 'bert' is not supported"):
        load(other)
    # missing weights
    nowt = tmp_path / "noweights"
    nowt.mkdir()
    (nowt / "config.json").write_text((good / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="no weights file"):
        load(nowt)
    # corrupt (truncated) weights
    (nowt / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="cannot read the weights"):
        load(nowt)
    # a config that contradicts its weights
    cfg = json.loads((good / "config.json").read_text())
    (nowt / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    (nowt / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 64}))
    with pytest.raises(ModelLoadError, match="contradicts the weights"):
        load(nowt)
    (nowt / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1, "layer_types": None}))
    with pytest.raises(ModelLoadError, match="unexpected weights"):
        load(nowt)
    (nowt / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3, "layer_types": None}))
    with pytest.raises(ModelLoadError, match="missing weight"):
        load(nowt)
    (nowt / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load(nowt)
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        load(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="neither config.json"):
        read_config(empty)


@pytest.mark.parametrize("causal", [False, True])
def test_name_table_covers_every_weight_both_ways(causal):
    m = _twin(causal, layers=4)
    assert {v: k for k, v in TWINLM_TO_HF.items()} == HF_TO_TWINLM  # one table, the inverse derived
    names = hf_names(m.config)
    assert set(names) == set(m.state_dict())
    assert "layers.0.attn_norm.weight" not in names and names["layers.1.attn_norm.weight"].startswith("model.")
    hf = to_hf_state_dict(m)
    if causal:
        assert "model.layers.2.attn.q_proj.weight" in hf and "lm_head.dense.weight" in hf
        assert not any("Wqkv" in k for k in hf)
    else:
        assert "model.layers.2.attn.Wqkv.weight" in hf and "head.dense.weight" in hf
    back = from_hf_state_dict(hf, m.config)
    assert set(back) == set(m.state_dict())
    for k, v in m.state_dict().items():
        torch.testing.assert_close(back[k], v, rtol=0, atol=0, msg=k)


def test_name_table_special_cases():
    m = _twin(False, layers=2)
    hf = to_hf_state_dict(m)
    # a base ModernBertModel saved alone (no "model." prefix) with a head
    bare = {k.removeprefix("model."): v for k, v in hf.items()}
    torch.testing.assert_close(from_hf_state_dict(bare, m.config)["layers.1.mlp.Wi.weight"],
                               m.state_dict()["layers.1.mlp.Wi.weight"], rtol=0, atol=0)
    # the tied projection is accepted when it equals the embeddings, refused otherwise
    emb = hf["model.embeddings.tok_embeddings.weight"]
    from_hf_state_dict({**hf, "decoder.weight": emb.clone()}, m.config)
    with pytest.raises(ModelLoadError, match="differs from the token embeddings"):
        from_hf_state_dict({**hf, "decoder.weight": emb + 1}, m.config)
    with pytest.raises(ModelLoadError, match="layer 0 has an attention norm"):
        from_hf_state_dict({**hf, "model.layers.0.attn_norm.weight": torch.ones(128)}, m.config)
    # the decoder class's head and split projections load as an encoder (conversion)
    dec = to_hf_state_dict(_twin(True, layers=2))
    assert set(from_hf_state_dict(dec, m.config)) == set(m.state_dict())
    with pytest.raises(ModelLoadError, match="missing weight 'head.dense.weight' \\(the prediction head"):
        from_hf_state_dict({k: v for k, v in hf.items() if not k.startswith("head.dense")}, m.config)
