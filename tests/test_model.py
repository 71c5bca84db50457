import math

import pytest
import torch
import torch.nn.functional as F

from twinlm import ModelConfig, Transformer
from twinlm.train.optim import param_groups


def tiny(causal=False, **kw):
    # 4 layers (0 and 3 global, 1-2 local), a small window so that short sequences exercise it
    cfg = ModelConfig.preset("cpu-tiny", causal=causal, vocab_size=512, local_window=16, **kw)
    torch.manual_seed(0)
    return Transformer(cfg).eval()


def _docs(lens, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, vocab, (n,), generator=g) for n in lens]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    return docs, torch.cat(docs), cu


@pytest.mark.parametrize("causal", [False, True])
def test_packed_equals_alone(causal):
    m = tiny(causal)
    docs, flat, cu = _docs([5, 70, 1, 33], m.config.vocab_size)
    with torch.no_grad():
        out = m(flat, cu_seqlens=cu, max_seqlen=70)
        assert out.logits.shape == (flat.numel(), m.config.vocab_size)
        assert out.hidden_states.shape == (flat.numel(), m.config.hidden_size)
        for i, d in enumerate(docs):
            alone = m(d[None])
            assert (alone.logits[0] - out.logits[cu[i]:cu[i + 1]]).abs().max() <= 1e-5
            assert (alone.hidden_states[0] - out.hidden_states[cu[i]:cu[i + 1]]).abs().max() <= 1e-5


@pytest.mark.parametrize("causal", [False, True])
def test_padded_equals_alone(causal):
    m = tiny(causal)
    docs, flat, cu = _docs([5, 40, 1, 33], m.config.vocab_size)
    T = 40
    ids = torch.full((4, T), m.config.pad_token_id)
    mask = torch.zeros(4, T, dtype=torch.long)
    for i, d in enumerate(docs):  # rows 0, 2 left-padded, rows 1, 3 right-padded
        sl = slice(T - len(d), T) if i % 2 == 0 else slice(0, len(d))
        ids[i, sl], mask[i, sl] = d, 1
    with torch.no_grad():
        out = m(ids, attention_mask=mask)
        assert out.logits.shape == (4, T, m.config.vocab_size)
        for i, d in enumerate(docs):
            alone = m(d[None]).logits[0]
            assert (out.logits[i][mask[i].bool()] - alone).abs().max() <= 1e-5
        # an all-ones mask is the same as no mask
        full = torch.ones_like(mask)
        torch.testing.assert_close(m(ids, attention_mask=full).logits, m(ids).logits)


def test_decoder_is_causal_encoder_is_not():
    for causal in (False, True):
        m = tiny(causal)
        ids = torch.randint(0, 512, (1, 30))
        ids2 = ids.clone()
        ids2[0, 20] = (ids[0, 20] + 1) % 512
        with torch.no_grad():
            a, b = m(ids).logits, m(ids2).logits
        same_prefix = torch.allclose(a[0, :20], b[0, :20])
        assert same_prefix == causal


def test_sparse_prediction_and_no_logits():
    m = tiny()
    _, flat, cu = _docs([10, 20], 512)
    idx = torch.tensor([0, 3, 29, 15])
    with torch.no_grad():
        full = m(flat, cu_seqlens=cu).logits
        sparse = m(flat, cu_seqlens=cu, prediction_positions=idx)
        assert sparse.logits.shape == (4, 512)
        torch.testing.assert_close(sparse.logits, full[idx])
        none = m(flat, cu_seqlens=cu, return_logits=False)
        assert none.logits is None and none.hidden_states.shape == (30, m.config.hidden_size)
        # padded input: positions index the B*T flat tokens
        ids = flat.view(2, 15)
        torch.testing.assert_close(m(ids, prediction_positions=idx).logits, m(ids).logits.view(30, -1)[idx])


@pytest.mark.parametrize("causal", [False, True])
def test_labels_loss_matches_cross_entropy(causal):
    m = tiny(causal).train()
    assert m.config.attention_dropout > 0  # dropout active: compare with the same seed
    _, flat, cu = _docs([10, 20], 512)
    labels = torch.randint(0, 512, (30,))
    labels[::4] = -100
    torch.manual_seed(1)
    loss = m(flat, cu_seqlens=cu, labels=labels).loss
    loss.backward()
    g1 = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    torch.manual_seed(1)
    ref = F.cross_entropy(m(flat, cu_seqlens=cu).logits, labels, ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for n, p in m.named_parameters():
        torch.testing.assert_close(g1[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)


def test_dropout_only_in_training():
    m = tiny()
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, m(ids).logits)
        m.train()
        assert not torch.allclose(m(ids).logits, m(ids).logits)


def test_structure_and_init():
    cfg = ModelConfig.preset("cpu-small")
    m = Transformer(cfg)
    assert isinstance(m.layers, torch.nn.ModuleList) and len(m.layers) == cfg.num_layers
    assert isinstance(m.layers[0].attn_norm, torch.nn.Identity)
    assert [b.is_global for b in m.layers] == [t == "full_attention" for t in cfg.layer_types]
    assert m.layers[1].attn.window == (64, 64)
    assert Transformer(cfg.replace(causal=True)).layers[1].attn.window == (63, 0)
    for n, p in m.named_parameters():
        if "norm" in n:
            assert p.dim() == 1 and torch.all(p == 1), n
    assert not any("bias" in n for n, _ in m.named_parameters() if n != "decoder_bias")
    emb = m.tok_embeddings.weight
    assert emb.abs().max() <= 2 * 0.02 + 1e-6 and abs(emb.std().item() - 0.02 * 0.88) < 2e-3
    out_std = 0.02 / math.sqrt(2 * cfg.num_layers)
    wo = m.layers[2].mlp.Wo.weight
    assert wo.abs().max() <= 2 * out_std + 1e-6
    # the vocabulary projection is tied to the embeddings
    with torch.no_grad():
        logits = m(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, cfg.vocab_size)


def _meta(cfg):
    with torch.device("meta"):
        return Transformer(cfg)


def test_flops_per_token():
    cfg = ModelConfig.preset("ettin-17m")
    m = _meta(cfg)
    f = m.flops_per_token(512)
    dense = 6 * (m.num_parameters(non_embedding=True) - sum(p.numel() for p in m.parameters() if p.dim() == 1)
                 + cfg.vocab_size * cfg.hidden_size)
    assert f > dense
    assert m.flops_per_token(512, predicted_fraction=0.3) < f
    # windows: local layers cost less than global ones at long length; the decoder attends to fewer keys
    assert m.flops_per_token(4096) - m.flops_per_token(512) < 12 * 256 * 7 * (4096 - 512)
    assert _meta(cfg.replace(causal=True)).flops_per_token(512) < f


def test_parameter_groups():
    # the trainer's optimizer groups (twinlm.train.optim) on the real network: norms and biases undecayed
    m = tiny()
    groups = param_groups(m, 0.1)
    n_total = sum(1 for _ in m.parameters())
    assert sum(len(g["params"]) for g in groups) == n_total
    names = {id(p): n for n, p in m.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert "decoder_bias" in no_decay and "final_norm.weight" in no_decay
    assert "layers.1.attn.Wqkv.weight" not in no_decay and "layers.1.attn.Wqkv.weight" in decay
    assert "tok_embeddings.weight" in decay  # the trainer decays the (tied) embeddings like every matrix


def test_bad_inputs_are_named():
    m = tiny()
    with pytest.raises(ValueError, match="out of range"):
        m(torch.tensor([[1, 512]]))
    with pytest.raises(ValueError, match="out of range"):
        m(torch.tensor([[-1, 2]]))
    with pytest.raises(TypeError, match="integer token ids"):
        m(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="batch, seq"):
        m(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="attention_mask shape"):
        m(torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 2))
    with pytest.raises(ValueError, match="contiguous"):
        m(torch.tensor([[1, 2, 3]]), attention_mask=torch.tensor([[1, 0, 1]]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        m(torch.tensor([1, 2, 3]), cu_seqlens=torch.tensor([0, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="flat"):
        m(torch.tensor([[1, 2, 3]]), cu_seqlens=torch.tensor([0, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="prediction_positions"):
        m(torch.tensor([[1, 2, 3]]), prediction_positions=torch.tensor([3]))
    with pytest.raises(ValueError, match="labels"):
        m(torch.tensor([[1, 2, 3]]), labels=torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="ModelConfig"):
        Transformer({"hidden_size": 4})


def test_labels_loss_under_bf16_autocast():
    # the accelerator code path of the fused loss (logsumexp, low-precision matmuls), exercised on CPU
    m = tiny()
    _, flat, cu = _docs([10, 20], 512)
    labels = torch.randint(0, 512, (30,))
    with torch.no_grad():
        ref = F.cross_entropy(m(flat, cu_seqlens=cu).logits, labels)
    m.train()
    m.config.attention_dropout = 0.0
    for block in m.layers:
        block.attn.out_drop.p = 0.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(flat, cu_seqlens=cu, labels=labels).loss
    loss.backward()
    assert abs(loss.item() - ref.item()) < 0.05
    assert m.tok_embeddings.weight.grad is not None and torch.isfinite(m.tok_embeddings.weight.grad).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_packed_equals_alone_and_matches_cpu(causal):
    m = tiny(causal)
    docs, flat, cu = _docs([5, 300, 1, 133], m.config.vocab_size)
    with torch.no_grad():
        cpu = m(flat, cu_seqlens=cu).logits
        g = m.cuda()
        out = g(flat.cuda(), cu_seqlens=cu.cuda()).logits
        torch.testing.assert_close(out.cpu(), cpu, atol=1e-4, rtol=1e-4)
        with torch.autocast("cuda", dtype=torch.bfloat16):  # flash / varlen kernels when available
            bf = g(flat.cuda(), cu_seqlens=cu.cuda()).logits.float()
            for i, d in enumerate(docs):
                alone = g(d[None].cuda()).logits[0].float()
                assert (alone - bf[cu[i]:cu[i + 1]]).abs().max() < 0.1
        assert (bf.cpu() - cpu).abs().max() < 0.1
    g.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = g(flat.cuda(), cu_seqlens=cu.cuda(), labels=flat.cuda()).loss
    loss.backward()
    assert torch.isfinite(loss)
