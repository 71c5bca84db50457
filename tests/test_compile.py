"""torch.compile for real: the blocks and the whole training call trace as full graphs (no graph break, no
silent fall back to eager), one compiled block serves every packed layout of a phase (recompiles counted),
checkpointing composes with compile, and compiled results equal eager ones.

The fast tests use the "aot_eager" backend: the same dynamo graphs and AOTAutograd forward/backward tracing as
inductor, without generating C++; the `slow` test runs inductor itself.
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from twinlm.config import ModelConfig
from twinlm.model import Transformer
from twinlm.train import dist


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # each test counts its own graphs: compiled code from earlier tests in this process must not count
    # against dynamo's per-code-object recompile limit
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _layouts(n, seed=0, vocab=4096):
    """Trainer-like packed micro-batches: 2-5 documents of 3-120 tokens, ~20% of positions predicted."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lens = torch.randint(3, 120, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g)
        total = int(lens.sum())
        cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(torch.int32)
        ids = torch.randint(5, vocab, (total,), generator=g)
        k = max(1, total // 5)
        positions = torch.randperm(total, generator=g)[:k]
        out.append(dict(input_ids=ids, cu_seqlens=cu, max_seqlen=int(lens.max()), prediction_positions=positions,
                        labels=torch.randint(5, vocab, (k,), generator=g)))
    return out


def _pair(causal):
    torch.manual_seed(0)
    cfg = ModelConfig.preset("cpu-tiny", causal=causal, attention_dropout=0.0)
    eager, other = Transformer(cfg), Transformer(cfg)
    other.load_state_dict(eager.state_dict())
    return eager, other


def _loss_and_grads(model, batch):
    bare = getattr(model, "_orig_mod", model)  # torch.compile(model) wraps it
    bare.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in bare.named_parameters()}


def _graphs(counter):
    """Graphs with operations in them (dynamo also reports empty frames around module calls)."""
    return sum(1 for g in counter.graphs if any(n.op == "call_function" for n in g.graph.nodes))


def _assert_same(eager, compiled, batch):
    loss_e, grads_e = _loss_and_grads(eager, batch)
    loss_c, grads_c = _loss_and_grads(compiled, batch)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for name, g in grads_e.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-4, atol=1e-6, msg=name)


# 35-125 s each on 2 loaded cores: the decoder with checkpointing runs by default, the other three only when
# selected (`pytest -m compileall`): the same property, other combinations
COMPILE_ALL = (pytest.mark.slow, pytest.mark.compileall)


@pytest.mark.parametrize("causal,checkpointing", [
    (True, True),
    pytest.param(False, True, marks=COMPILE_ALL),
    pytest.param(False, False, marks=COMPILE_ALL),
    pytest.param(True, False, marks=COMPILE_ALL)])
def test_compiled_blocks_serve_every_packed_layout(causal, checkpointing):
    eager, model = _pair(causal)
    counter = CompileCounterWithBackend("aot_eager")
    dist.parallelize(model, dist.DistEnv(), compile=True, activation_checkpointing=checkpointing,
                     compile_backend=counter)
    batches = _layouts(4, seed=int(causal))
    _assert_same(eager, model, batches[0])
    # one graph per kind of block: layer 0 (global, no attention norm), local layers, other global layers
    kinds = {(type(b.attn_norm), b.attn.window) for b in model.layers}
    assert len(kinds) == 3 and _graphs(counter) == len(kinds)
    for batch in batches[1:]:  # other document counts and lengths: no recompile
        _assert_same(eager, model, batch)
    assert _graphs(counter) == len(kinds)


@pytest.mark.parametrize("causal", [False, pytest.param(True, marks=COMPILE_ALL)])
def test_the_whole_training_call_is_one_graph(causal):
    """Packed input with cu_seqlens and max_seqlen, sparse prediction, labels -> loss: fullgraph=True."""
    eager, model = _pair(causal)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    batches = _layouts(3, seed=2 + int(causal))
    _assert_same(eager, compiled, batches[0])
    assert _graphs(counter) == 1
    for batch in batches[1:]:
        _assert_same(eager, compiled, batch)
    assert _graphs(counter) == 1


def test_compiled_training_call_needs_max_seqlen():
    _, model = _pair(False)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    batch = _layouts(1)[0]
    batch["max_seqlen"] = None
    with pytest.raises(Exception, match="max_seqlen"):
        compiled(**batch)


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, pytest.param(True, marks=COMPILE_ALL)])
def test_inductor_blocks_equal_eager(causal):
    eager, model = _pair(causal)
    dist.parallelize(model, dist.DistEnv(), compile=True)
    for batch in _layouts(3, seed=7):
        _assert_same(eager, model, batch)
