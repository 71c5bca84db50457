"""One attention entry point for padding-free (packed) batches, with interchangeable backends.

Every backend computes the same function: for a flat stream of N tokens made of documents whose
boundaries are `cu_seqlens`, token i attends to token j only when both are in the same document and

    (left < 0 or i - j <= left) and (right < 0 or j - i <= right)

`window=(left, right)` follows flash-attention's inclusive convention: (-1, -1) is full bidirectional
attention, (-1, 0) is causal, (64, 64) is the encoder's ±64 band, (63, 0) the decoder's 64-token window
(the current token and the 63 before it; this is what `transformers`' ModernBertDecoder computes for
`local_attention=128`).

Backends:
  "sdpa"   torch.nn.functional.scaled_dot_product_attention over documents padded to max_seqlen
           (no padding at all when every document has the same length). Sliding windows narrower than
           the documents run blocked over the flat stream instead: blocks of 64 queries against the key
           blocks the window reaches, so a local layer costs O(N · window), not O(D · L²). CPU and GPU.
  "flex"   FlexAttention with a document + window block mask over the flat stream (compiled on GPU); the
           BlockMask is built from the document boundaries at 128-token block granularity (no N×N mask).
           Not in "auto"; FlexAttention has no backward on the CPU.
  "eager"  explicit masked softmax, one document at a time: the reference the others are tested against.
  "flash"  flash_attn.flash_attn_varlen_func with window_size (CUDA, fp16/bf16, `flash-attn` installed).
  "varlen" torch.nn.attention.varlen.varlen_attn (CUDA, fp16/bf16), only where its signature takes
           `window_size` and `scale` (torch >= 2.11); an older one is skipped by "auto" with one warning.
  "auto"   flash > varlen > sdpa on CUDA with half precision, sdpa otherwise.

`PackedLayout` holds what every layer needs about the batch (computed once per forward): the device
`cu_seqlens`, and a host copy of the document lengths from which positions, padding indices and masks are
built without reading the device. `PackedLayout.from_cu_seqlens` given host boundaries copies them to the
device without blocking; given device boundaries it reads them back once.

Compiled code: the model's blocks call `packed_attention(q, k, v, cu_seqlens, max_seqlen, window=)`, which
takes tensors and ints only. flash and varlen are called directly (both are traceable custom operators); the
CPU backends (sdpa, flex, eager) depend on the layout's host-side structure, so under torch.compile they run
as one opaque custom operator, `torch.ops.twinlm.packed_attention`, which finds the batch's `PackedLayout`
(registered by `from_cu_seqlens`, keyed by the `cu_seqlens` tensor) at run time; its backward recomputes the
attention forward. Nothing in a compiled block therefore depends on the number or lengths of documents, and
one compiled block serves every packed layout.
"""

from __future__ import annotations

import importlib.util
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from twinlm.errors import ConfigError

BACKENDS = ("auto", "sdpa", "flex", "eager", "flash", "varlen")

_default_backend = "auto"


def set_default_backend(name: str) -> None:
    """Backend used when `attention(..., backend=None)`; one of BACKENDS."""
    global _default_backend
    if name not in BACKENDS:
        raise ConfigError(f"unknown attention backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    _default_backend = name


_availability: dict[str, bool] = {}  # probed once per process: find_spec costs tens of µs per call


@torch._dynamo.assume_constant_result
def flash_attn_available() -> bool:
    if "flash" not in _availability:
        _availability["flash"] = importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()
    return _availability["flash"]


def varlen_signature_ok(fn) -> bool:
    """Whether a varlen_attn function takes the sliding window and the scale (torch >= 2.11)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return {"window_size", "scale"} <= params.keys()


@torch._dynamo.assume_constant_result
def varlen_available() -> bool:
    """torch's varlen_attn exists, runs on this machine, and takes `window_size` and `scale` (warns once if it
    exists without them: "auto" then uses the next backend)."""
    if "varlen" not in _availability:
        ok = importlib.util.find_spec("torch.nn.attention.varlen") is not None and torch.cuda.is_available()
        if ok:
            from torch.nn.attention.varlen import varlen_attn  # optional: torch >= 2.10
            ok = varlen_signature_ok(varlen_attn)
            if not ok:
                warnings.warn(f"torch {torch.__version__}'s varlen_attn takes no window_size/scale (torch >= 2.11 "
                              "does); attention backend 'auto' uses sdpa instead", stacklevel=2)
        _availability["varlen"] = ok
    return _availability["varlen"]


# cu_seqlens tensor -> its PackedLayout: how code that gets only tensors (a compiled block) finds the batch's
# host-side structure. Weak keys: an entry lives as long as the batch's cu_seqlens.
_LAYOUTS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def layout_of(cu_seqlens: torch.Tensor, max_seqlen: int) -> PackedLayout:
    """The PackedLayout registered for this cu_seqlens tensor, else one built from it (reads it on the host)."""
    layout = _LAYOUTS.get(cu_seqlens)
    if layout is None:
        layout = PackedLayout.from_cu_seqlens(cu_seqlens, max_seqlen)
    return layout


@dataclass
class PackedLayout:
    """Document structure of a flat token stream: built once per forward, shared by all layers."""

    cu_seqlens: torch.Tensor  # int32 (D+1,), on the tokens' device
    max_seqlen: int  # an upper bound on the document length (kernels' max_seqlen)
    seqlens: list[int] | None  # host copy of the document lengths (None: a layout traced by torch.compile)
    _cache: dict = field(default_factory=dict, repr=False)
    num_tokens: int | None = None  # only for traced layouts (seqlens None)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, max_seqlen: int | None = None,
                        device: torch.device | str | None = None) -> PackedLayout:
        """Layout of boundaries `cu_seqlens`, on `device` (default: cu_seqlens' own). Host boundaries are read
        there and copied to an accelerator without blocking; device boundaries are read back once."""
        device = torch.device(device) if device is not None else cu_seqlens.device
        # host boundaries are read through numpy (free); device ones come back in one copy
        host = torch.from_numpy(cu_seqlens.detach().to("cpu", torch.int64).numpy().copy())
        seqlens = np.diff(host.numpy()).tolist()
        true_max = max(seqlens) if seqlens else 0
        if max_seqlen is None or max_seqlen < true_max:
            max_seqlen = true_max
        if cu_seqlens.device == device:
            cu = cu_seqlens.to(torch.int32)
        elif device.type == "cpu":
            cu = cu_seqlens.to(device, torch.int32)
        else:
            cu = cu_seqlens.to(torch.int32).pin_memory().to(device, non_blocking=True)
        layout = cls(cu, int(max_seqlen), seqlens)
        layout._cache["host_cu"] = host
        _LAYOUTS[cu] = layout
        return layout

    @classmethod
    def uniform(cls, n_docs: int, length: int, device) -> PackedLayout:
        cu = torch.arange(0, (n_docs + 1) * length, length, dtype=torch.int32, device=device)
        layout = cls(cu, length, [length] * n_docs)
        _LAYOUTS[cu] = layout
        return layout

    @classmethod
    def traced(cls, cu_seqlens: torch.Tensor, max_seqlen: int, num_tokens: int) -> PackedLayout:
        """A layout for code traced by torch.compile: device boundaries only, no host lengths."""
        return cls(cu_seqlens, max_seqlen, None, num_tokens=num_tokens)

    @property
    def lengths(self) -> list[int]:
        """The host lengths of the documents; only a layout built on the host has them (not a traced one)."""
        if self.seqlens is None:
            raise RuntimeError("a layout traced by torch.compile has no host lengths (a host-side backend was "
                               "reached inside compiled code)")
        return self.seqlens

    @property
    def host_cu(self) -> torch.Tensor:
        """int64 host copy of cu_seqlens."""
        if "host_cu" not in self._cache:
            self._cache["host_cu"] = torch.tensor([0] + np.cumsum(self.lengths).tolist(), dtype=torch.int64)
        return self._cache["host_cu"]

    @property
    def n_docs(self) -> int:
        return len(self.lengths)

    @property
    def total(self) -> int:
        if self.seqlens is None:
            assert self.num_tokens is not None  # a traced layout is built with its token count
            return self.num_tokens
        return int(sum(self.seqlens))

    @property
    def is_uniform(self) -> bool:
        return len(set(self.lengths)) <= 1

    def _from_host(self, t: torch.Tensor) -> torch.Tensor:
        device = self.cu_seqlens.device
        if device.type == "cpu":
            return t
        return t.pin_memory().to(device, non_blocking=True)

    def position_ids(self) -> torch.Tensor:
        """Position of each token inside its document (restarts at 0 at every boundary)."""
        if "pos" not in self._cache:
            if self.seqlens is None:  # traced: device arithmetic with a known output size, no host read
                cu = self.cu_seqlens.long()
                starts = torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1], output_size=self.num_tokens)
                pos = torch.arange(self.total, device=cu.device) - starts
            elif self.is_uniform and self.seqlens:
                pos = torch.arange(self.seqlens[0], device=self.cu_seqlens.device).repeat(self.n_docs)
            else:  # built on the host from the host lengths, then copied
                lens = torch.tensor(self.seqlens, dtype=torch.int64)
                starts = torch.repeat_interleave(self.host_cu[:-1], lens, output_size=self.total)
                pos = self._from_host(torch.arange(self.total) - starts)
            self._cache["pos"] = pos
        return self._cache["pos"]

    def doc_ids(self) -> torch.Tensor:
        if "doc" not in self._cache:
            lens = torch.tensor(self.seqlens, dtype=torch.int64)
            doc = torch.repeat_interleave(torch.arange(self.n_docs), lens, output_size=self.total)
            self._cache["doc"] = self._from_host(doc)
        return self._cache["doc"]

    def unpad_index(self) -> torch.Tensor:
        """(N,) index of each flat token in the (D*L) padded documents of pad_index (the inverse gather)."""
        if "unpad" not in self._cache:
            self._cache["unpad"] = self.doc_ids() * self.max_seqlen + self.position_ids()
        return self._cache["unpad"]

    def pad_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(index (D*L,) into the flat stream, valid (D, L) bool) to scatter tokens into padded documents."""
        if "pad" not in self._cache:
            device = self.cu_seqlens.device
            L = self.max_seqlen
            col = torch.arange(L, device=device)
            lens = torch.tensor(self.seqlens, device=device)
            valid = col[None, :] < lens[:, None]
            index = (self.cu_seqlens[:-1].long()[:, None] + col[None, :]).masked_fill(~valid, 0).reshape(-1)
            self._cache["pad"] = (index, valid)
        return self._cache["pad"]

    def band_mask(self, window: tuple[int, int], with_padding: bool) -> torch.Tensor | None:
        """Boolean SDPA mask (True = attend) for padded documents; None when no mask is needed."""
        key = ("mask", window, with_padding)
        if key not in self._cache:
            left, right = window
            L = self.max_seqlen
            device = self.cu_seqlens.device
            i = torch.arange(L, device=device)[:, None]
            j = torch.arange(L, device=device)[None, :]
            allowed = torch.ones(L, L, dtype=torch.bool, device=device)
            if left >= 0:
                allowed &= (i - j) <= left
            if right >= 0:
                allowed &= (j - i) <= right
            mask = allowed[None, None]  # (1, 1, L, L)
            if with_padding:
                _, valid = self.pad_index()
                # keys past a document's end are masked; padded query rows keep their own (padded) key so no
                # row is empty (an all-masked row gives NaN); those rows are dropped afterwards.
                mask = (mask & valid[:, None, None, :]) | torch.eye(L, dtype=torch.bool, device=device)
            self._cache[key] = mask
        return self._cache[key]


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout) -> None:
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"attention expects q, k, v of one shape (tokens, heads, head_dim); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != layout.total:
        raise ValueError(f"attention got {q.shape[0]} tokens but cu_seqlens describes {layout.total}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout, *,
              window: tuple[int, int] = (-1, -1), backend: str | None = None,
              scale: float | None = None) -> torch.Tensor:
    """Attention over packed documents. q, k, v: (N, heads, head_dim) -> (N, heads, head_dim)."""
    _check(q, k, v, layout)
    backend = backend or _default_backend
    if backend == "auto":
        backend = _auto_backend(q)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if layout.total == 0:
        return q.clone()
    if backend == "sdpa":
        return _sdpa(q, k, v, layout, window, scale)
    if backend == "eager":
        return _eager(q, k, v, layout, window, scale)
    if backend == "flex":
        return _flex(q, k, v, layout, window, scale)
    if backend == "flash":
        return _flash(q, k, v, layout, window, scale)
    if backend == "varlen":
        return _varlen(q, k, v, layout, window, scale)
    raise ConfigError(f"unknown attention backend {backend!r}; choose one of: {', '.join(BACKENDS)}")


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                     *, window: tuple[int, int] = (-1, -1), backend: str | None = None,
                     scale: float | None = None) -> torch.Tensor:
    """`attention` for code that holds tensors and ints only (the model's blocks, compiled or not).

    cu_seqlens: (D+1,) int32 on q's device; max_seqlen: an upper bound on the document length. flash and
    varlen take them as they are; the CPU backends look up the batch's PackedLayout (see the module docstring).
    """
    backend = backend or _default_backend
    if backend == "auto":
        backend = _auto_backend(q)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if backend in ("flash", "varlen"):
        kernel = _flash if backend == "flash" else _varlen
        return kernel(q, k, v, PackedLayout.traced(cu_seqlens, max_seqlen, q.shape[0]), window, scale)
    if backend not in BACKENDS:
        raise ConfigError(f"unknown attention backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if torch.compiler.is_compiling():
        return torch.ops.twinlm.packed_attention(q, k, v, cu_seqlens, max_seqlen, window[0], window[1], scale,
                                                 backend)
    return attention(q, k, v, layout_of(cu_seqlens, max_seqlen), window=window, backend=backend, scale=scale)


# The CPU backends as one opaque operator for compiled code: the layout's Python bookkeeping stays out of the
# graph. The backward recomputes the forward under autograd (attention saves nothing for it).
@torch.library.custom_op("twinlm::packed_attention", mutates_args=())
def _packed_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                         max_seqlen: int, left: int, right: int, scale: float, backend: str) -> torch.Tensor:
    out = attention(q, k, v, layout_of(cu_seqlens, max_seqlen), window=(left, right), backend=backend, scale=scale)
    return out.clone() if out.data_ptr() in (q.data_ptr(), k.data_ptr(), v.data_ptr()) else out.contiguous()


@_packed_attention_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, left, right, scale, backend):
    return torch.empty_like(q)


@torch.library.custom_op("twinlm::packed_attention_backward", mutates_args=())
def _packed_attention_backward_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  cu_seqlens: torch.Tensor, max_seqlen: int, left: int, right: int, scale: float,
                                  backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    layout = layout_of(cu_seqlens, max_seqlen)
    # torch.func.vjp: autograd is switched off inside an operator's implementation; functorch brings its own
    vjp = torch.func.vjp(lambda a, b, c: attention(a, b, c, layout, window=(left, right), backend=backend,
                                                   scale=scale), q, k, v)[1]
    return tuple(g.contiguous() for g in vjp(grad))


@_packed_attention_backward_op.register_fake
def _(grad, q, k, v, cu_seqlens, max_seqlen, left, right, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _packed_attention_setup(ctx, inputs, output):
    q, k, v, cu, *rest = inputs
    ctx.save_for_backward(q, k, v, cu)
    ctx.rest = rest


def _packed_attention_backward(ctx, grad):
    q, k, v, cu = ctx.saved_tensors
    gq, gk, gv = _packed_attention_backward_op(grad.contiguous(), q, k, v, cu, *ctx.rest)
    return gq, gk, gv, None, None, None, None, None, None


_packed_attention_op.register_autograd(_packed_attention_backward, setup_context=_packed_attention_setup)


def _auto_backend(q: torch.Tensor) -> str:
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        if flash_attn_available():
            return "flash"
        if varlen_available():
            return "varlen"
    return "sdpa"


# --- sdpa -----------------------------------------------------------------------------------------
def _sdpa(q, k, v, layout: PackedLayout, window: tuple[int, int], scale):
    if _band_pays(layout, *window):
        return _sdpa_blocked_band(q, k, v, layout, *window, scale)
    N, H, Dh = q.shape
    D, L = layout.n_docs, layout.max_seqlen
    uniform = layout.is_uniform and layout.total == D * L  # max_seqlen is an upper bound: may exceed every length
    if uniform:
        # (N, H, Dh) -> (D, H, L, Dh) as a view: no copy of the stream.
        qp, kp, vp = (t.view(D, L, H, Dh).transpose(1, 2) for t in (q, k, v))
    else:
        index, _ = layout.pad_index()
        qp, kp, vp = (t.index_select(0, index).view(D, L, H, Dh).transpose(1, 2) for t in (q, k, v))
    left, right = window
    full_left, full_right = left < 0 or left >= L - 1, right < 0 or right >= L - 1
    if uniform and full_left and full_right:
        out = F.scaled_dot_product_attention(qp, kp, vp, scale=scale)
    elif uniform and full_left and right == 0:
        out = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale)
    else:
        eff = (-1 if full_left else left, -1 if full_right else right)
        mask = layout.band_mask(eff, with_padding=not uniform)
        out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale)
    out = out.transpose(1, 2)  # (D, L, H, Dh)
    if uniform:
        return out.reshape(N, H, Dh)
    # a gather with a known size (a boolean mask index would read its count back from the device)
    return out.reshape(D * L, H, Dh).index_select(0, layout.unpad_index())


BAND_BLOCK = 64  # queries per block of the blocked sliding-window path


def _band_reach(width: int) -> int:
    return -(-width // BAND_BLOCK)  # blocks one side of a window spans


def _band_pays(layout: PackedLayout, left: int, right: int) -> bool:
    """Whether the blocked path does less work than the masked (D, L, L) matrices of padded documents."""
    if left < 0 or right < 0:
        return False
    keys = (_band_reach(left) + 1 + _band_reach(right)) * BAND_BLOCK
    return layout.total * keys < layout.n_docs * layout.max_seqlen ** 2


def _band_mask(layout: PackedLayout, left: int, right: int) -> torch.Tensor:
    """(blocks, 1, B, K·B) mask over the flat stream cut into blocks of B queries, each facing the K key blocks
    its window can reach: same document and -left <= key - query <= right (a padding query keeps itself)."""
    key = ("band", left, right)
    if key not in layout._cache:
        B, before = BAND_BLOCK, _band_reach(left)
        K = before + 1 + _band_reach(right)
        n, device = layout.total, layout.cu_seqlens.device
        nb = -(-n // B)
        doc = torch.full((nb * B + (K - 1) * B,), -1, dtype=torch.long, device=device)
        doc[before * B: before * B + n] = layout.doc_ids()  # doc id per key slot; -1 outside the stream
        block = torch.arange(nb, device=device)[:, None, None]
        r = torch.arange(B, device=device)[None, :, None]
        c = torch.arange(K * B, device=device)[None, None, :]
        delta = c - r - before * B  # key position - query position
        query_doc = doc[before * B + block * B + r]  # (nb, B, 1)
        key_doc = doc[block * B + c]  # (nb, 1, K·B)
        allowed = (delta >= -left) & (delta <= right) & (key_doc == query_doc) & (query_doc >= 0)
        layout._cache[key] = (allowed | (delta == 0))[:, None]
    return layout._cache[key]


def _sdpa_blocked_band(q, k, v, layout: PackedLayout, left: int, right: int, scale):
    """Sliding-window attention over the packed stream: queries in blocks of 64 attend only to the key blocks the
    window reaches (two for the decoder's 64-token window, three for the encoder's ±64), so a local layer costs
    O(N·window) instead of O(D·L²) for a full masked matrix per document, and needs no padding per document."""
    N, H, Dh = q.shape
    B, before, after = BAND_BLOCK, _band_reach(left), _band_reach(right)
    nb = -(-N // B)
    tail = nb * B - N

    def blocks(t, lead=0, trail=0):  # (N, H, Dh) -> (nb + lead + trail, B, H, Dh), zero blocks around
        return F.pad(t, (0, 0, 0, 0, lead * B, tail + trail * B)).view(-1, B, H, Dh)

    def neighbours(t):
        kb = blocks(t, before, after)
        return torch.cat([kb[j:j + nb] for j in range(before + 1 + after)], dim=1).transpose(1, 2)

    out = F.scaled_dot_product_attention(blocks(q).transpose(1, 2), neighbours(k), neighbours(v), scale=scale,
                                         attn_mask=_band_mask(layout, left, right))
    return out.transpose(1, 2).reshape(nb * B, H, Dh)[:N]


# --- eager (reference) ----------------------------------------------------------------------------
def _eager(q, k, v, layout: PackedLayout, window, scale):
    outs = []
    left, right = window
    starts = [0]
    for n in layout.lengths:
        starts.append(starts[-1] + n)
    for s, e in zip(starts[:-1], starts[1:]):
        qd, kd, vd = (t[s:e].transpose(0, 1).float() for t in (q, k, v))  # (H, n, Dh)
        scores = (qd @ kd.transpose(-1, -2)) * scale
        n = e - s
        i = torch.arange(n, device=q.device)[:, None]
        j = torch.arange(n, device=q.device)[None, :]
        allowed = torch.ones(n, n, dtype=torch.bool, device=q.device)
        if left >= 0:
            allowed &= (i - j) <= left
        if right >= 0:
            allowed &= (j - i) <= right
        scores = scores.masked_fill(~allowed, float("-inf"))
        outs.append((scores.softmax(-1) @ vd).transpose(0, 1).to(q.dtype))
    return torch.cat(outs, 0)


# --- flex -----------------------------------------------------------------------------------------
_flex_compiled: Callable[..., torch.Tensor] | None = None


def _flex(q, k, v, layout: PackedLayout, window, scale):
    global _flex_compiled
    # optional backends import on first use: FlexAttention needs torch >= 2.5, flash_attn a separate install,
    # varlen_attn torch >= 2.10
    from torch.nn.attention.flex_attention import flex_attention

    left, right = window
    doc = layout.doc_ids()

    def mask_mod(b, h, qi, ki):
        ok = doc[qi] == doc[ki]
        if left >= 0:
            ok = ok & (qi - ki <= left)
        if right >= 0:
            ok = ok & (ki - qi <= right)
        return ok

    key = ("flex", window)
    if key not in layout._cache:
        layout._cache[key] = _flex_block_mask(layout, window, mask_mod, q.device)
    block_mask = layout._cache[key]
    fn: Callable[..., torch.Tensor] = flex_attention
    if q.is_cuda:
        if _flex_compiled is None:
            _flex_compiled = torch.compile(flex_attention, dynamic=True)
        fn = _flex_compiled
    out = fn(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
             block_mask=block_mask, scale=scale)
    return out[0].transpose(0, 1)


FLEX_BLOCK = 128


def _flex_block_mask(layout: PackedLayout, window, mask_mod, device):
    """FlexAttention's BlockMask built from the document boundaries at block granularity: O((N/128)²) booleans on
    the host instead of create_block_mask's N×N evaluation of mask_mod. A key block is listed for a query block
    when some pair in them can share a document and lie within the window (mask_mod then decides per token)."""
    from torch.nn.attention.flex_attention import BlockMask

    n, B = layout.total, FLEX_BLOCK
    nb = -(-n // B)
    doc = np.repeat(np.arange(layout.n_docs), layout.lengths)
    first = np.arange(nb) * B
    last = np.minimum(first + B, n) - 1
    lo_doc, hi_doc = doc[first], doc[last]  # documents a block touches: [lo_doc, hi_doc]
    reach = (lo_doc[:, None] <= hi_doc[None, :]) & (lo_doc[None, :] <= hi_doc[:, None])
    left, right = window
    if left >= 0:  # some key k >= q - left: the key block's last token reaches the query block's first
        reach &= last[None, :] >= first[:, None] - left
    if right >= 0:
        reach &= first[None, :] <= last[:, None] + right
    counts = reach.sum(1).astype(np.int32)
    order = np.argsort(~reach, axis=1, kind="stable").astype(np.int32)  # reachable key blocks first
    kv_num = torch.from_numpy(counts)[None, None].to(device)
    kv_idx = torch.from_numpy(order)[None, None].to(device)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, BLOCK_SIZE=B, mask_mod=mask_mod, seq_lengths=(n, n))


# --- CUDA varlen kernels --------------------------------------------------------------------------
def _flash(q, k, v, layout: PackedLayout, window, scale):
    from flash_attn import flash_attn_varlen_func

    cu = layout.cu_seqlens
    return flash_attn_varlen_func(q, k, v, cu, cu, layout.max_seqlen, layout.max_seqlen,
                                  dropout_p=0.0, softmax_scale=scale, causal=window == (-1, 0),
                                  window_size=window if window != (-1, 0) else (-1, -1))


def _varlen(q, k, v, layout: PackedLayout, window, scale):
    from torch.nn.attention.varlen import varlen_attn

    cu = layout.cu_seqlens
    return varlen_attn(q, k, v, cu, cu, layout.max_seqlen, layout.max_seqlen, scale=scale, window_size=window)


def mean_keys_per_query(seq_len: int, window: tuple[int, int]) -> float:
    """Average number of keys each query attends to in a document of `seq_len` tokens."""
    if seq_len <= 0:
        return 0.0
    left, right = window
    i = torch.arange(seq_len, dtype=torch.float64)
    lo = torch.zeros_like(i) if left < 0 else (i - left).clamp(min=0)
    hi = torch.full_like(i, seq_len - 1) if right < 0 else (i + right).clamp(max=seq_len - 1)
    total = float((hi - lo + 1).sum())
    return total / seq_len


__all__ = ["attention", "packed_attention", "PackedLayout", "layout_of", "BACKENDS", "set_default_backend",
           "mean_keys_per_query", "flash_attn_available", "varlen_available"]
