"""Static shapes (train/static.py): every micro-batch of a phase padded to fixed sizes gives the loss and the
gradients of the unpadded one, and a whole model compiled with dynamic=False compiles once over many layouts."""

import json

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from test_train_step import make_samples, make_step, phase
from twinlm.attention import packed_attention
from twinlm.errors import ConfigError
from twinlm.ops import IGNORE_INDEX
from twinlm.train import dist, run
from twinlm.train.recipe import load_recipe
from twinlm.train.static import (
    MIN_DOC_CAPACITY,
    TARGET_BUCKET,
    doc_capacity,
    pad_packed,
    target_bucket,
    target_capacity,
)
from twinlm.train.testing import make_shards, tiny_recipe


def test_padding_fills_tokens_documents_and_targets_to_their_buckets():
    ids = torch.arange(100, 190)  # 90 tokens in 3 documents
    cu = torch.tensor([0, 30, 70, 90], dtype=torch.int32)
    pos, tgt = torch.tensor([3, 40, 80]), torch.tensor([7, 8, 9])
    p_ids, p_cu, max_seqlen, p_pos, p_tgt = pad_packed(ids, cu, pos, tgt, tokens=256, seq_len=64, pad_id=3)
    assert p_ids.shape == (256,) and torch.equal(p_ids[:90], ids) and (p_ids[90:] == 3).all()
    lens = torch.diff(p_cu.long())
    assert p_cu.dtype == torch.int32 and len(p_cu) == MIN_DOC_CAPACITY + 1 and int(p_cu[-1]) == 256
    assert lens[:3].tolist() == [30, 40, 20] and (lens >= 0).all() and int(lens.max()) <= 64 == max_seqlen
    assert lens[3:6].tolist() == [64, 64, 38] and (lens[6:] == 0).all()  # padding documents, then empty ones
    assert p_pos.shape == p_tgt.shape == (TARGET_BUCKET,)
    assert torch.equal(p_tgt[:3], tgt) and (p_tgt[3:] == IGNORE_INDEX).all() and (p_pos[3:] == 0).all()
    assert doc_capacity(65) == 128 and doc_capacity(1) == MIN_DOC_CAPACITY
    assert target_bucket(0) == target_bucket(256) == 256 and target_bucket(257) == 512


def test_a_partly_filled_micro_batch_has_the_shapes_of_a_full_one():
    """A step's last micro-batch (few tokens, few targets) is padded to the phase's target capacity, not to its
    own target count: the compiled graph sees one shape whatever the fill (MLM: the masked share + 5%; CLM:
    every token)."""
    assert target_capacity(65536, 0.3) == target_bucket(round(65536 * 0.3 * 1.05)) < 65536
    assert target_capacity(65536, None) == 65536
    full = pad_packed(torch.arange(500), torch.tensor([0, 250, 500], dtype=torch.int32), torch.arange(150),
                      torch.arange(150), tokens=512, seq_len=256, pad_id=3, targets_to=target_capacity(512, 0.3))
    part = pad_packed(torch.arange(40), torch.tensor([0, 40], dtype=torch.int32), torch.arange(12), torch.arange(12),
                      tokens=512, seq_len=256, pad_id=3, targets_to=target_capacity(512, 0.3))
    def shapes(padded):
        return [t.shape for t in padded if isinstance(t, torch.Tensor)]

    assert shapes(full) == shapes(part)
    many = pad_packed(torch.arange(500), torch.tensor([0, 500], dtype=torch.int32), torch.arange(400),
                      torch.arange(400), tokens=512, seq_len=512, pad_id=3, targets_to=256)
    assert many[3].shape == (512,)  # over the capacity: the next bucket (a new graph, never a lost target)


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_a_padded_micro_batch_gives_the_loss_and_gradients_of_the_unpadded_one(objective):
    plain, static = make_step(objective), make_step(objective)
    static.static_shapes = True
    p = phase(micro_batch_tokens=512, seq_len=64)
    samples = make_samples(6)
    [a] = plain.micro_batches(samples, p, plain.objective_for(p), salt=3)
    [b] = static.micro_batches(samples, p, static.objective_for(p), salt=3)
    assert b.input_ids.numel() == 512 and b.num_tokens == a.num_tokens and b.num_targets == a.num_targets
    la, lb = plain.forward_loss(a), static.forward_loss(b)
    la.backward()
    lb.backward()
    assert torch.allclose(la, lb, rtol=1e-6, atol=0)
    for (name, pa), pb in zip(plain.bare_model.named_parameters(), static.bare_model.parameters()):
        assert torch.allclose(pa.grad, pb.grad, rtol=1e-5, atol=1e-7), name


def test_the_whole_model_compiles_once_over_many_layouts():
    """Twenty micro-batches of different documents and masks, one graph (dynamic=False, fullgraph)."""
    step = make_step("mlm")
    step.static_shapes = True
    counter = CompileCounterWithBackend("aot_eager")
    dist.parallelize(step.bare_model, dist.DistEnv(), compile=True, compile_backend=counter, static_shapes=True)
    p = phase(micro_batch_tokens=512, seq_len=64)
    for i in range(20):
        for mb in step.micro_batches(make_samples(5 + i % 4, seed=i, lo=10, hi=62), p, step.objective_for(p),
                                     salt=i):
            step.forward_loss(mb).backward()
    assert counter.frame_count == 1


def test_max_seqlen_is_an_upper_bound_for_every_backend():
    """One document shorter than max_seqlen (it used to fail in sdpa with a reshape error)."""
    q, k, v = (torch.randn(384, 2, 16) for _ in range(3))
    cu = torch.tensor([0, 384], dtype=torch.int32)
    ref = packed_attention(q, k, v, cu, 384, backend="eager")
    for backend in ("sdpa", "eager"):
        out = packed_attention(q, k, v, cu, 512, backend=backend)
        assert torch.allclose(out, ref, atol=1e-5), backend


def test_cuda_graphs_need_compile_and_a_cuda_device(tmp_path):
    shards = make_shards(tmp_path / "shards", n_docs=20)
    recipe = tiny_recipe(shards)
    with pytest.raises(ConfigError, match="cuda_graphs: true needs compile: true"):
        load_recipe(recipe, ["cuda_graphs=true"])
    with pytest.raises(ConfigError, match="cuda_graphs: true needs a CUDA device"):
        run(recipe, tmp_path / "run", ["cuda_graphs=true", "compile=true"], log=lambda m: None)
    assert not (tmp_path / "run").exists()


def test_training_with_static_shapes_logs_the_same_steps(tmp_path):
    shards = make_shards(tmp_path / "shards", n_docs=120)
    recipe = tiny_recipe(shards, objective="mlm", phases=2, tokens=1200)
    rows = {}
    for name, over in (("plain", []), ("static", ["static_shapes=true"])):
        run(recipe, tmp_path / name, over, log=lambda m: None)
        rows[name] = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    a, b = rows["plain"], rows["static"]
    assert [(r["step"], r["tokens"], r["targets"]) for r in a] == [(r["step"], r["tokens"], r["targets"]) for r in b]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4), x["step"]
