"""twinlm.memory against what torch really keeps: the activation formula vs bytes saved for backward
(saved-tensor hooks, storages counted once, parameters excluded) on CPU, and the planner's choices."""

import pytest
import torch

from twinlm.config import ModelConfig
from twinlm.errors import ConfigError
from twinlm.memory import CARDS, GiB, estimate, layer_bytes_per_token, plan
from twinlm.model import Transformer
from twinlm.train import dist


def _saved_bytes(model, n_tokens, doc_len):
    """Bytes of distinct storages saved for backward by one packed training forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, (n_tokens,), generator=g)
    cu = torch.arange(0, n_tokens + 1, doc_len, dtype=torch.int32)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, cu_seqlens=cu, max_seqlen=doc_len, prediction_positions=torch.arange(0, n_tokens, 4),
                    labels=torch.randint(5, 100, (n_tokens // 4,), generator=g))
    out.loss.backward()
    return sum(seen.values())


def _per_layer_measured(checkpointing=False, n_tokens=1024, doc_len=256):
    """Bytes per token one more layer saves (the difference between 3 and 2 layers, all global)."""
    sizes = []
    for layers in (2, 3):
        cfg = ModelConfig.preset("cpu-tiny", num_layers=layers, global_attn_every_n_layers=1, attention_dropout=0.1)
        model = Transformer(cfg).train()
        if checkpointing:
            dist.parallelize(model, dist.DistEnv(), activation_checkpointing=True)
        sizes.append(_saved_bytes(model, n_tokens, doc_len))
    return (sizes[1] - sizes[0]) / n_tokens, cfg


def test_layer_activation_formula_matches_saved_tensors():
    measured, cfg = _per_layer_measured()
    predicted = layer_bytes_per_token(cfg, "fp32")
    assert abs(measured - predicted) / predicted < 0.05, (measured, predicted)


def test_checkpointing_keeps_only_the_block_input():
    measured, cfg = _per_layer_measured(checkpointing=True)
    assert abs(measured - 4 * cfg.hidden_size) / (4 * cfg.hidden_size) < 0.05, measured


def test_the_paper_sizes_on_80_gb():
    big = ModelConfig.preset("ettin-1b")
    full = estimate(big, micro_batch_tokens=65536, ranks=8, sharded=True, card="H100")
    assert not full.fits and full.activations > 80 * GiB  # the recipes' micro-batch, as it was
    chosen = plan(big, card="H100", micro_batch_tokens=65536, ranks=8, sharded=True)
    assert chosen.fits and chosen.total <= CARDS["H100"]
    small = plan(ModelConfig.preset("ettin-150m"), card="H100", micro_batch_tokens=65536)
    assert small.micro_batch_tokens == 65536 and not small.checkpointing
    ckpt = estimate(big, micro_batch_tokens=65536, ranks=8, sharded=True, checkpointing=True)
    assert ckpt.activations < full.activations / 4


def test_bad_requests_are_named():
    cfg = ModelConfig.preset("ettin-1b")
    with pytest.raises(ConfigError, match="unknown card"):
        estimate(cfg, micro_batch_tokens=1024, card="H1000")
    with pytest.raises(ConfigError, match="does not fit"):  # 2B parameters' states alone exceed 22 GiB
        plan(ModelConfig.preset("ettin-1b", num_layers=56), card="A10G", micro_batch_tokens=65536)


def test_trainer_refuses_a_micro_batch_that_does_not_fit_the_device(tmp_path, monkeypatch):
    """The pre-flight check: on a device the estimate says is too small, one line naming the settings that fit,
    before any step; with memory_check=false, or memory enough, the run trains."""
    import twinlm.train.setup as trainer_module
    from twinlm.errors import ConfigError
    from twinlm.train import run
    from twinlm.train.testing import make_shards, tiny_recipe

    shards = make_shards(tmp_path / "shards", n_docs=60)
    cfg = ModelConfig.preset("cpu-tiny")
    fits_small = estimate(cfg, micro_batch_tokens=128, precision="fp32").total
    needs_big = estimate(cfg, micro_batch_tokens=1 << 20, precision="fp32").total
    monkeypatch.setattr(trainer_module, "device_memory", lambda device: (fits_small + needs_big) / 2)
    recipe = tiny_recipe(shards, phases=1, tokens=300, micro_batch_tokens=1 << 20)
    with pytest.raises(ConfigError, match=r"more than cpu .*: set phases\.\*\.micro_batch_tokens=\d+") as e:
        run(recipe, tmp_path / "big")
    assert "\n" not in str(e.value)
    suggested = int(str(e.value).split("micro_batch_tokens=")[1].split()[0])
    assert estimate(cfg, micro_batch_tokens=suggested, precision="fp32").total <= (fits_small + needs_big) / 2
    assert not (tmp_path / "big" / "checkpoints").exists()
    run({**recipe, "memory_check": False}, tmp_path / "unchecked", log=lambda *a: None)
    run(tiny_recipe(shards, phases=1, tokens=300, micro_batch_tokens=128), tmp_path / "fits", log=lambda *a: None)


def test_a_plan_without_a_device_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="needs the device"):
        plan(ModelConfig.preset("ettin-17m"), micro_batch_tokens=8192)
