import pytest

from twinlm import ModelConfig


def test_paper_presets_have_paper_shapes():
    expected = {  # layers, hidden, intermediate, heads (REFERENCE §1)
        "ettin-17m": (7, 256, 384, 4), "ettin-32m": (10, 384, 576, 6), "ettin-68m": (19, 512, 768, 8),
        "ettin-150m": (22, 768, 1152, 12), "ettin-400m": (28, 1024, 2624, 16), "ettin-1b": (28, 1792, 3840, 28),
    }
    for name, shape in expected.items():
        cfg = ModelConfig.preset(name)
        assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads) == shape
        assert cfg.head_dim == 64 and cfg.vocab_size == 50368 and not cfg.causal
        assert cfg.layer_types[0] == "full_attention" and cfg.layer_types[-1] == "full_attention"
        assert cfg.layer_types[1] == "sliding_attention"


def test_causal_is_the_only_difference():
    enc, dec = ModelConfig.preset("ettin-17m"), ModelConfig.preset("ettin-17m", causal=True)
    diff = {k for k, v in enc.to_dict().items() if dec.to_dict()[k] != v}
    assert diff == {"causal"}


def test_bad_config_is_rejected_with_reason():
    with pytest.raises(ValueError, match="not divisible"):
        ModelConfig(hidden_size=100, num_heads=3)
    with pytest.raises(KeyError, match="unknown preset"):
        ModelConfig.preset("ettin-2b")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ModelConfig(vocab_size=100)


def test_round_trip(tmp_path):
    cfg = ModelConfig.preset("cpu-tiny", causal=True)
    cfg.save(tmp_path / "c.json")
    assert ModelConfig.load(tmp_path / "c.json") == cfg
