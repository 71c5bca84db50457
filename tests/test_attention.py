import pytest
import torch

from twinlm import attention as attention_module
from twinlm.attention import BACKENDS, PackedLayout, attention, mean_keys_per_query

WINDOWS = [(-1, -1), (-1, 0), (3, 3), (2, 0), (64, 64), (63, 0)]


def _inputs(lens, heads=2, dim=16, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(lens)
    q, k, v = (torch.randn(n, heads, dim, generator=g).to(device, dtype) for _ in range(3))
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    return q, k, v, PackedLayout.from_cu_seqlens(cu)


@pytest.mark.parametrize("lens", [[5, 40, 1, 17], [24, 24, 24]])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_cpu_backends_agree_with_reference(lens, window, backend):
    q, k, v, layout = _inputs(lens)
    ref = attention(q, k, v, layout, window=window, backend="eager")
    out = attention(q, k, v, layout, window=window, backend=backend)
    assert out.shape == q.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (3, 3), (2, 0)])
def test_sdpa_gradients_agree_with_reference(window):
    q, k, v, layout = _inputs([7, 30, 2])
    grads = []
    for backend in ("eager", "sdpa"):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        (attention(qq, kk, vv, layout, window=window, backend=backend) ** 2).sum().backward()
        grads.append([t.grad for t in (qq, kk, vv)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [(63, 0), (64, 64), (10, 3), (130, 0)])
@pytest.mark.parametrize("lens", [[256, 256, 256], [300, 5, 64, 190, 1, 129]])
def test_blocked_sliding_window_path_agrees_with_reference(window, lens, monkeypatch):
    # windows narrower than the documents take the blocked path over the packed stream: values and gradients
    calls = []
    real = attention_module._sdpa_blocked_band
    monkeypatch.setattr(attention_module, "_sdpa_blocked_band", lambda *a: calls.append(1) or real(*a))
    q, k, v, layout = _inputs(lens, heads=2, dim=8)
    grads = []
    for backend in ("eager", "sdpa"):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out = attention(qq, kk, vv, layout, window=window, backend=backend)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([out.detach(), *(t.grad for t in (qq, kk, vv))])
    # a window reaching (nearly) every key of a document gains nothing from blocks: the masked matrix is used
    assert bool(calls) == (window != (130, 0) or lens[0] == 300)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_no_attention_across_documents():
    q, k, v, layout = _inputs([6, 6])
    out = attention(q, k, v, layout, backend="sdpa")
    v2 = v.clone()
    v2[6:] += 100.0  # change the second document only
    out2 = attention(q, k, v2, layout, backend="sdpa")
    torch.testing.assert_close(out[:6], out2[:6])


def test_window_semantics():
    # value j = one-hot of j: the output's support shows which keys a query saw
    n = 12
    v = torch.eye(n)[:, None, :].repeat(1, 1, 1)
    q = torch.zeros(n, 1, n)
    k = torch.zeros(n, 1, n)
    layout = PackedLayout.from_cu_seqlens(torch.tensor([0, n], dtype=torch.int32))
    seen = attention(q, k, v, layout, window=(3, 3), backend="sdpa")[:, 0] > 0
    assert seen[6].nonzero().flatten().tolist() == [3, 4, 5, 6, 7, 8, 9]
    seen = attention(q, k, v, layout, window=(2, 0), backend="sdpa")[:, 0] > 0
    assert seen[6].nonzero().flatten().tolist() == [4, 5, 6]


def test_mean_keys_per_query():
    assert mean_keys_per_query(4, (-1, -1)) == 4
    assert mean_keys_per_query(4, (-1, 0)) == 2.5
    assert mean_keys_per_query(1000, (64, 64)) < 129


def test_bad_inputs():
    q, k, v, layout = _inputs([4, 4])
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, k, v, layout, backend="nope")
    with pytest.raises(ValueError, match="tokens but cu_seqlens"):
        attention(q[:5], k[:5], v[:5], layout)
    with pytest.raises(ValueError, match="one shape"):
        attention(q, k[:, :1], v, layout)
    assert set(BACKENDS) >= {"sdpa", "flex", "eager", "flash", "varlen"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("window", WINDOWS)
def test_gpu_backends_agree(window):
    from twinlm.attention import flash_attn_available, varlen_available

    q, k, v, layout = _inputs([100, 300, 7, 150], heads=4, dim=64, dtype=torch.bfloat16, device="cuda")
    ref = attention(q.float(), k.float(), v.float(), layout, window=window, backend="eager")
    backends = ["sdpa"] + (["flash"] if flash_attn_available() else []) + (["varlen"] if varlen_available() else [])
    for backend in backends:
        out = attention(q, k, v, layout, window=window, backend=backend)
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2, msg=backend)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("window", WINDOWS)
def test_gpu_backend_gradients_agree(window):
    """bf16 kernels' q/k/v gradients against the fp32 eager reference (relative error of each gradient)."""
    from twinlm.attention import flash_attn_available, varlen_available

    q, k, v, layout = _inputs([100, 300, 7, 150], heads=4, dim=64, device="cuda")
    up = torch.randn_like(q)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    attention(qq, kk, vv, layout, window=window, backend="eager").backward(up)
    ref = [t.grad for t in (qq, kk, vv)]
    backends = ["sdpa"] + (["flash"] if flash_attn_available() else []) + (["varlen"] if varlen_available() else [])
    for backend in backends:
        qq, kk, vv = (t.to(torch.bfloat16).requires_grad_() for t in (q, k, v))
        attention(qq, kk, vv, layout, window=window, backend=backend).backward(up.to(torch.bfloat16))
        for name, ours, theirs in zip("qkv", (qq.grad, kk.grad, vv.grad), ref):
            rel = float((ours.float() - theirs).norm() / theirs.norm())
            assert rel < 0.03, (backend, name, rel)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("window", WINDOWS)
def test_the_compiled_path_operator_equals_the_python_path(window, backend):
    """torch.ops.twinlm.packed_attention (what compiled blocks call): values and gradients of its recomputing
    backward equal the eager path's, on a layout found through the registry and on one rebuilt from cu_seqlens."""
    q, k, v, layout = _inputs([70, 5, 130, 1, 40], heads=2, dim=8)
    up = torch.randn_like(q)
    results = []
    for call in ("python", "op", "op-unregistered"):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        if call == "python":
            out = attention(qq, kk, vv, layout, window=window, backend=backend)
        else:
            cu = layout.cu_seqlens if call == "op" else layout.cu_seqlens.clone()
            out = torch.ops.twinlm.packed_attention(qq, kk, vv, cu, layout.max_seqlen, *window, 8 ** -0.5, backend)
        out.backward(up)
        results.append([out.detach(), qq.grad, kk.grad, vv.grad])
    assert attention_module.layout_of(layout.cu_seqlens, 0) is layout
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_varlen_is_used_only_with_window_and_scale():
    def old(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        pass

    def new(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
            window_size=(-1, -1)):
        pass

    assert not attention_module.varlen_signature_ok(old)  # torch 2.9/2.10: would raise TypeError at the first call
    assert attention_module.varlen_signature_ok(new)


def test_layouts_from_host_boundaries_are_read_on_the_host():
    layout = PackedLayout.from_cu_seqlens(torch.tensor([0, 3, 10, 11], dtype=torch.int32), device="cpu")
    assert layout.seqlens == [3, 7, 1] and layout.max_seqlen == 7
    assert layout.position_ids().tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 0]
    assert layout.doc_ids().tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 2]
    assert attention_module.layout_of(layout.cu_seqlens, 7) is layout


@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (64, 64), (63, 0), (2, 0)])
def test_flex_block_mask_from_document_boundaries(window, monkeypatch):
    """FlexAttention over several 128-token blocks and documents crossing them, with the block mask built from
    cu_seqlens (create_block_mask, which evaluates the mask on N×N pairs, is never called)."""
    import torch.nn.attention.flex_attention as fa

    monkeypatch.setattr(fa, "create_block_mask", lambda *a, **k: pytest.fail("N×N block mask built"))
    q, k, v, layout = _inputs([300, 5, 64, 190, 1, 129], heads=2, dim=8)
    ref = attention(q, k, v, layout, window=window, backend="eager")
    out = attention(q, k, v, layout, window=window, backend="flex")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
