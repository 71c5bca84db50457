"""bench/roofline.py: its counting on small known cases (a matmul's FLOPs and bytes, an elementwise op, views,
an embedding's touched rows, the autocast emulation), a cpu-tiny trace, the time model's floor and max(), and
what CUDA compiles counted as inductor's kernels (the CE chunk body, the compiled optimizer)."""

import dataclasses
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import roofline  # noqa: E402
from twinlm import ModelConfig, Transformer, ops  # noqa: E402
from workloads import packed_batch  # noqa: E402


def _count(fn, *args, autocast=False):
    counter = roofline.Counter()
    with FakeTensorMode(allow_non_fake_inputs=True):
        with roofline.Labeller(autocast=autocast), counter:
            fn(*args)
    return counter.kernels


def test_matmul_flops_and_bytes():
    (k,) = _count(torch.mm, torch.empty(64, 32), torch.empty(32, 16))
    assert k.kind == "gemm" and k.flops == 2 * 64 * 32 * 16
    assert k.nbytes == 4 * (64 * 32 + 32 * 16 + 64 * 16)  # both inputs read, the output written


def test_elementwise_bytes_and_views_free():
    x, y = torch.empty(100, 10), torch.empty(100, 10, dtype=torch.bfloat16)
    kernels = _count(lambda a, b: (a.view(10, 100).t().reshape(100, 10) + b), x, y)
    assert [k.op for k in kernels] == ["add"]  # view, t, same-shape reshape: views, free
    assert kernels[0].nbytes == 1000 * 4 + 1000 * 2 + 1000 * 4  # fp32 + bf16 read, fp32 written


def test_out_argument_is_written_not_read():
    a, out = torch.empty(50), torch.empty(50)
    (k,) = _count(lambda: torch.mul(a, a, out=out))
    assert k.nbytes == 3 * 50 * 4


def test_embedding_counts_touched_rows_only():
    weight, ids = torch.empty(10_000, 64), torch.zeros(7, dtype=torch.long)
    (k,) = _count(F.embedding, ids, weight)
    assert k.category == "embedding, gather"
    assert k.nbytes == 7 * 8 + 2 * 7 * 64 * 4  # ids + the 7 rows read and written; not the 10,000-row table


def test_autocast_emulation_casts_linear_inputs_to_bf16():
    x, w = torch.empty(8, 16), torch.empty(4, 16)
    seen = []

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ == "mm":
                seen.append([a.dtype for a in args])
            return func(*args, **(kwargs or {}))

    with FakeTensorMode(allow_non_fake_inputs=True), roofline.Labeller(autocast=True), Spy():
        out = F.linear(x, w)
        ln = F.layer_norm(out, (4,))
    assert seen == [[torch.bfloat16, torch.bfloat16]] and out.dtype == torch.bfloat16
    assert ln.dtype == torch.float32  # LayerNorm runs in fp32 as CUDA's autocast runs it
    kernels = _count(lambda: F.linear(x, w), autocast=True)
    assert sum(k.category == "casts" for k in kernels) == 2  # x and w cast to bf16


def test_pair_count_matches_windows():
    cu = torch.tensor([0, 5, 8]).numpy()
    assert roofline.pair_count(cu, (-1, -1)) == 25 + 9
    assert roofline.pair_count(cu, (-1, 0)) == 15 + 6
    assert roofline.pair_count(cu, (1, 1)) == (2 + 3 + 3 + 3 + 2) + (2 + 3 + 2)


def test_time_model_floor_and_max():
    dev = roofline.Device("test", bandwidth=1e12, gemm=100e12, attention=50e12, attention_dense=100e12,
                          floor=3e-6, source="test", peak=200e12)
    assert roofline.kernel_seconds("other", 1e3, 0, dev) == 3e-6  # tiny kernel: the floor
    assert roofline.kernel_seconds("other", 1e9, 0, dev) == 1e-3  # bandwidth-bound
    assert roofline.kernel_seconds("gemm", 1e9, 1e9, dev) == 1e-3  # bytes dominate
    assert roofline.kernel_seconds("gemm", 1e3, 1e12, dev) == 1e-2  # FLOPs dominate
    assert roofline.kernel_seconds("attention", 1e12, 1e12, dev) == 1 / 50


def test_prediction_of_a_step_and_its_executed_mfu():
    """2 micro-batches of 1,000 tokens, each 10 ms and 1 TFLOP, and a 5 ms optimizer: a 25 ms step, 80,000
    tokens/s and 2 TFLOP in 25 ms = 80 TFLOP/s, 40% of a 200 TFLOP/s card."""
    mb = {"total": {"ms": 10.0, "flops": 1e12}}
    opt = {"total": {"ms": 5.0, "flops": 0.0}}
    pred = roofline.predict(mb, opt, 1000, 2, peak=200e12)
    assert pred["step_ms"] == 25.0 and abs(pred["tok_s"] - 80_000) < 1e-6
    assert abs(pred["mfu_executed"] - 0.4) < 1e-12
    assert "mfu_executed" not in roofline.predict(mb, opt, 1000, 2)


def test_tiny_trace_has_positive_totals_and_the_categories():
    cfg = ModelConfig.preset("cpu-tiny")
    batch = packed_batch(cfg, 1024, "mlm")
    kernels = roofline.trace_twinlm(cfg, batch)
    mb = [k for k in kernels if k.phase != "optimizer"]
    s = roofline.summarize(mb, roofline.DEVICES["h200"], int(batch["input_ids"].numel()))
    assert s["total"]["bytes"] > 0 and s["total"]["flops"] > 0 and s["total"]["ms"] > 0
    assert {"RoPE", "block GEMMs", "attention", "CE", "LayerNorm", "GeGLU"} <= set(s["categories"])
    assert "other" not in s["categories"] or s["categories"]["other"]["bytes"] < 0.05 * s["total"]["bytes"]
    attn = [k for k in mb if k.category == "attention"]
    assert len(attn) == 2 * cfg.num_layers  # one kernel forward, one backward per layer
    assert any(k.phase == "optimizer" for k in kernels)


def test_transformers_compiled_adds_outside_globals_and_locals(monkeypatch):
    """The compiled transformers model is the 0-layer model plus each global and each local layer, taken as the
    differences of the 0-, 1- and 2-layer compiles: here a kernel of 10 bytes outside, 100 per global layer and
    1,000 per local one, for ettin-150m's 8 global and 14 local layers."""
    per_layer = {0: [10.0], 1: [10.0, 100.0], 2: [10.0, 100.0, 1000.0]}

    def fake(cfg, layers, rows, seq):
        return [roofline.Kernel("k", "fused (compiled)", "other", b, 0.0, "compiled") for b in per_layer[layers]]

    monkeypatch.setattr(roofline, "_compiled_hf_kernels", fake)
    dev = roofline.Device("test", bandwidth=1e9, gemm=1e12, attention=1e12, attention_dense=1e12, floor=0.0,
                          source="test", peak=1e12)
    cfg = ModelConfig.preset("ettin-150m")
    summary, info = roofline.hf_compiled_summary(cfg, roofline.hf_compiled_kernels(cfg, 2, 1024), 2, 1024, dev)
    assert info["layers"] == {"global": 8, "local": 14} and info["kernels_per_compile"] == [1, 2, 3]
    total = summary["total"]
    assert total["bytes"] == 10 + 8 * 100 + 14 * 1000 and total["kernels"] == 1 + 8 + 14
    assert abs(total["ms"] - 1e3 * total["bytes"] / 1e9) < 1e-9


def _chunk(rows, vocab):
    """A (rows, vocab) bf16 chunk of logits and the chunk body's other arguments."""
    return (torch.empty(rows, vocab, dtype=torch.bfloat16), torch.zeros(rows, dtype=torch.long),
            torch.ones(rows, dtype=torch.bool), torch.tensor(1.0 / rows))


def test_compiled_ce_body_is_four_kernels_moving_fewer_bytes_than_the_eager_body():
    rows, vocab = 64, 4096
    compiled = roofline.compiled_ce_body_kernels(rows, vocab, torch.bfloat16)
    eager = _count(ops._ce_chunk_body_eager, *_chunk(rows, vocab))
    per_element = sum(k.nbytes for k in compiled) / (rows * vocab)
    assert len(compiled) == 4 and len(eager) > 4  # ops.py: "compiled on CUDA into ~4 kernels (~10 bytes ...)"
    assert 8 <= per_element <= 12  # bf16 logits read three times, g written once and read once: 10 + the rows'
    assert sum(k.nbytes for k in eager) > 2 * sum(k.nbytes for k in compiled)
    assert {k.category for k in compiled} == {"CE"} and {k.phase for k in compiled} == {"forward"}


def test_trace_counts_the_ce_chunk_body_as_the_compiled_kernels():
    """The same trace with the chunk body compiled: the eager body's kernels are replaced by exactly the
    compiled body's, evaluated at the chunk's shape (one chunk at cpu-tiny), and nothing else changes."""
    cfg = ModelConfig.preset("cpu-tiny")
    batch = packed_batch(cfg, 512, "mlm")
    rows, vocab = batch["labels"].numel(), cfg.vocab_size
    assert rows <= ops._ce_chunk_rows(vocab, "cuda")
    body = roofline.compiled_ce_body_kernels(rows, vocab, torch.bfloat16)
    eager_body = _count(ops._ce_chunk_body_eager, *_chunk(rows, vocab))
    eager, compiled = (roofline.trace_twinlm(cfg, batch, optimizer=False, ce_compiled=c,
                                            standalone_compiled=False)
                       for c in (False, True))
    assert [(k.op, k.nbytes) for k in compiled if k.op.endswith("SchedulerNode")] == [(k.op, k.nbytes) for k in body]
    assert len(compiled) == len(eager) - len(eager_body) + len(body)
    assert sum(k.nbytes for k in compiled) == sum(k.nbytes for k in eager) - sum(k.nbytes for k in eager_body) \
        + sum(k.nbytes for k in body)


def test_trace_counts_rope_and_geglu_as_the_compiled_kernels():
    """Eager code on CUDA runs RoPE and GeGLU compiled on their own (`ops.qkv_rope`, `ops.geglu`): the trace
    replaces the CPU Functions' kernels by inductor's, a few per layer (forward and backward), fewer bytes,
    and leaves every other kernel as it was."""
    cfg = ModelConfig.preset("cpu-tiny")
    batch = packed_batch(cfg, 512, "mlm")
    tokens = int(batch["input_ids"].numel())
    rope = roofline.compiled_rope_kernels(tokens, cfg.num_heads, cfg.head_dim, torch.bfloat16)
    glu = roofline.compiled_geglu_kernels(tokens, 2 * cfg.intermediate_size, torch.bfloat16)
    for kernels in (rope, glu):
        assert 1 <= len(kernels) <= 4 and {k.phase for k in kernels} == {"forward", "backward"}
    eager, compiled = (roofline.trace_twinlm(cfg, batch, optimizer=False, standalone_compiled=c)
                       for c in (False, True))
    for category, kernels in (("RoPE", rope), ("GeGLU", glu)):
        counted = [k for k in compiled if k.category == category and k.op.endswith("SchedulerNode")]
        assert [(k.op, k.nbytes, k.phase) for k in counted] == [(k.op, k.nbytes, k.phase)
                                                                for k in kernels] * cfg.num_layers
        before, after = (sum(k.nbytes for k in t if k.category == category) for t in (eager, compiled))
        assert after < before
    others = [(k.op, k.nbytes) for k in compiled if k.category not in ("RoPE", "GeGLU")]
    assert others == [(k.op, k.nbytes) for k in eager if k.category not in ("RoPE", "GeGLU")]


def test_compiled_optimizer_is_two_passes_and_moves_fewer_bytes_than_eager():
    cfg = dataclasses.replace(ModelConfig.preset("cpu-tiny"), num_layers=1)  # fewer tensors: a quicker compile
    compiled = roofline.trace_compiled_optimizer(cfg)
    eager = [k for k in roofline.trace_twinlm(cfg, packed_batch(cfg, 256, "mlm")) if k.phase == "optimizer"]
    with torch.device("meta"):
        params = sum(p.numel() for p in Transformer(cfg).parameters())
    assert any(k.op == "ForeachKernelSchedulerNode" for k in compiled)  # one kernel over a list, as on CUDA
    assert {k.phase for k in compiled} == {"optimizer"}
    nbytes = sum(k.nbytes for k in compiled)
    # at least p, g, m, v read and p, m, v written; at most the two passes' 36 bytes and the per-tensor numbers
    assert 28 * params <= nbytes <= 37 * params < sum(k.nbytes for k in eager)
    assert len(compiled) <= 4 * len(list(Transformer(cfg).parameters())) + 16, len(compiled)


def test_compiled_blocks_listed_kernel_by_kernel():
    """Each block kind compiled by inductor: its GEMMs (2·m·n·k FLOPs), attention charged analytically, the rest
    fused kernels; `listed` names each kernel's phase and fused ops, and its bytes per token add up to the
    kind's kernels."""
    cfg = dataclasses.replace(ModelConfig.preset("cpu-tiny"), num_layers=2)  # layer 0 and a local layer
    tokens = 4096
    pairs = {w: 1000 * tokens for w in set(roofline.twinlm_windows(cfg))}
    kernels, info = roofline.trace_compiled_blocks(cfg, tokens, 256, pairs, listed=True)
    assert set(info["block_kinds"]) == {"layer 0", "local"}
    listed = [k for about in info["block_kinds"].values() for k in about["kernels"]]
    assert len(listed) == len(kernels)  # one use of each kind
    assert {k["phase"] for k in listed} == {"forward", "backward"}
    gemms = [k for k in kernels if k.category == "block GEMMs"]
    # per layer Wqkv, Wo, Wi, Wo_mlp: one GEMM forward, two backward (the input's and the weight's gradients)
    assert len(gemms) == 2 * 4 * 3 and all(k.flops > 0 for k in gemms)
    assert sum(k.flops for k in gemms) == 2 * 3 * 2 * tokens * (4 * cfg.hidden_size ** 2
                                                                 + 3 * cfg.hidden_size * cfg.intermediate_size)
    assert sum(k.category == "attention" for k in kernels) == 2 * 2
    assert all("mm" in k["ops"] for k in listed if k["kind"] == "block GEMMs")
    assert abs(sum(k["bytes_per_token"] for k in listed) * tokens - sum(k.nbytes for k in kernels)) < 1
