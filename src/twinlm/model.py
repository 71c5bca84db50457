"""The one twinlm network. Encoder and decoder are the same module; `config.causal` is the only switch.

Architecture (ModernBERT / Ettin, REFERENCE.md §1), for hidden size d, GLU half-width I, L layers:

    tokens -> tok_embeddings (V x d) -> embed_norm (LayerNorm, no bias)
    for layer i in 0..L-1:                          (global attention when i % global_attn_every_n_layers == 0)
        h = x if i == 0 else attn_norm(x)           (layer 0 has no attention pre-norm)
        q, k, v = split(Wqkv h)                     (fused d -> 3d, no bias; heads of head_dim)
        q, k = RoPE(q, k)                           (global layers: global_rope_theta, local: local_rope_theta;
                                                     positions restart at 0 in every packed document)
        a = attention(q, k, v)                      encoder global: full; encoder local: |i - j| <= window/2
                                                     decoder global: causal; decoder local: 0 <= i - j < window/2
                                                     never across a document boundary (cu_seqlens)
        x = x + dropout(Wo a)                       (attention-output dropout, training only)
        u, g = split(Wi mlp_norm(x))                (fused GeGLU input d -> 2I, no bias)
        x = x + Wo_mlp(gelu(u) * g)                 (I -> d, no bias)
    x = final_norm(x)                               -> output.hidden_states
    logits = tok_embeddings.weight @ norm(gelu(dense(x))) + decoder_bias
                                                    (prediction head: dense d->d no bias, GELU, LayerNorm; the
                                                     vocabulary projection is tied to the embeddings, with a bias)

All LayerNorms have no bias, eps = config.norm_eps. Initialisation: truncated normal at ±2σ with σ = 0.02
for the embeddings and input projections (Wqkv, Wi), σ/√(2L) for output projections (attention Wo, MLP Wo,
prediction-head dense, as in transformers); norms 1, decoder bias 0.

Inputs: padded (B, T) ids with an optional HF-style `attention_mask` (left or right padding), or a padding-free
flat stream (N,) with `cu_seqlens` document boundaries. `prediction_positions` runs the head on chosen tokens
only (sparse prediction); `labels` computes the cross-entropy with a chunked, fused head + loss that never holds
all logits at once (`twinlm.ops.fused_linear_cross_entropy`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from twinlm import export
from twinlm.attention import PackedLayout, mean_keys_per_query, packed_attention
from twinlm.config import ModelConfig
from twinlm.ops import IGNORE_INDEX, fused_linear_cross_entropy, geglu, host_reads_are_free, qkv_rope


@dataclass
class TransformerOutput:
    logits: torch.Tensor | None  # (B, T, V) padded, (N, V) packed, (K, V) with prediction_positions
    hidden_states: torch.Tensor  # final-norm output: (B, T, d) padded (zeros at pads) or (N, d) packed
    loss: torch.Tensor | None = None  # with labels=: mean cross-entropy over labels != -100


# --------------------------------------------------------------------------------------------------
# rotary embeddings
#
# Internally the query/key dims of each head are stored *interleaved* ([x0, x32, x1, x33, ...] for head_dim 64)
# instead of transformers' half-split layout ([x0..x31 | x32..x63]). Attention scores are unchanged (q and k are
# permuted alike) and RoPE rotates contiguous pairs with real cos/sin arithmetic (twinlm.ops.qkv_rope).
# twinlm.hf permutes the q/k rows of Wqkv when it reads or writes Hugging Face weights (`qk_half_to_interleaved`).
def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def rope_freqs(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotations [cos, sin](pos·f), fp32, of shape (N, 1, 1, head_dim // 2, 2) for positions (N,).

    Real-valued (no complex dtype), so torch.compile fuses the rotation with its neighbours."""
    angles = positions.to(torch.float32)[:, None] * inv_freq.to(positions.device)[None, :]
    return torch.stack((angles.cos(), angles.sin()), -1)[:, None, None]


def _min_max(t: torch.Tensor) -> tuple[int, int]:
    """Smallest and largest value; free on the host, one device->host read for a device tensor."""
    if host_reads_are_free(t):
        a = t.numpy()
        return int(a.min()), int(a.max())
    both = torch.stack((t.min(), t.max())).cpu()  # one read, not two
    return int(both[0]), int(both[1])


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`; a host tensor bound for an accelerator goes through pinned memory without blocking."""
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type != "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# --------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.is_global = cfg.is_global(layer)
        half = cfg.local_window // 2
        if self.is_global:
            self.window = (-1, 0) if cfg.causal else (-1, -1)
        else:
            # decoder: the current token and the (window/2 - 1) before it, as transformers' ModernBertDecoder
            self.window = (half - 1, 0) if cfg.causal else (half, half)
        self.Wqkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)  # q/k rows interleaved per head
        self.Wo = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.out_drop = nn.Dropout(cfg.attention_dropout)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        N = x.shape[0]
        q, k, v = qkv_rope(self.Wqkv(x).view(N, 3, self.num_heads, self.head_dim), rope[:, 0])
        a = packed_attention(q, k, v, cu_seqlens, max_seqlen, window=self.window)
        return self.out_drop(self.Wo(a.reshape(N, -1)))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.Wi = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.Wo = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.Wo(geglu(self.Wi(x)))


def _norm(cfg: ModelConfig) -> nn.LayerNorm:
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=False)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attn_norm = nn.Identity() if layer == 0 else _norm(cfg)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = _norm(cfg)
        self.mlp = MLP(cfg)

    @property
    def is_global(self) -> bool:
        return self.attn.is_global

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """x (N, d) flat tokens; rope: this layer type's rotations (rope_freqs); cu_seqlens (D+1,) int32 document
        boundaries on x's device; max_seqlen: an upper bound on the document length.

        Only tensors and an int come in (no Python lists, no per-batch objects), so one compiled block serves
        every packed layout; the layout's host-side bookkeeping lives in twinlm.attention."""
        x = x + self.attn(self.attn_norm(x), rope, cu_seqlens, max_seqlen)
        return x + self.mlp(self.mlp_norm(x))


class PredictionHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.norm = _norm(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(x)))


# --------------------------------------------------------------------------------------------------
class Transformer(nn.Module):
    """Ettin/ModernBERT encoder (config.causal=False) or decoder (config.causal=True). See the module docstring."""

    global_inv_freq: torch.Tensor  # buffers, declared for the type checker
    local_inv_freq: torch.Tensor

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"Transformer expects a twinlm ModelConfig, got {type(config).__name__}")
        self.config = config
        cfg = config
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_norm = _norm(cfg)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.final_norm = _norm(cfg)
        self.head = PredictionHead(cfg)
        self.decoder_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.register_buffer("global_inv_freq", rope_inv_freq(cfg.head_dim, cfg.global_rope_theta), persistent=False)
        self.register_buffer("local_inv_freq", rope_inv_freq(cfg.head_dim, cfg.local_rope_theta), persistent=False)
        self.reset_parameters()

    @property
    def blocks(self) -> list[Block]:
        """The layers, typed (`self.layers` is the ModuleList that parallelisation wraps)."""
        return cast("list[Block]", list(self.layers))

    # --- init ------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        cfg = self.config
        std, cut = cfg.init_std, cfg.init_cutoff_factor
        out_std = std / math.sqrt(2.0 * cfg.num_layers)

        def tn(w: torch.Tensor, s: float) -> None:
            nn.init.trunc_normal_(w, mean=0.0, std=s, a=-cut * s, b=cut * s)

        tn(self.tok_embeddings.weight, std)
        for block in self.blocks:
            tn(block.attn.Wqkv.weight, std)
            tn(block.attn.Wo.weight, out_std)
            tn(block.mlp.Wi.weight, std)
            tn(block.mlp.Wo.weight, out_std)
        tn(self.head.dense.weight, out_std)
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
        nn.init.zeros_(self.decoder_bias)
        self.set_rope_theta()

    @torch.no_grad()
    def set_rope_theta(self, global_theta: float | None = None, local_theta: float | None = None) -> None:
        """Set the RoPE bases (None keeps the config's) and recompute the frequency buffers from the config.

        Context extension raises global θ 10k → 160k; loading from the meta device calls it with no arguments
        to fill the non-persistent buffers.
        """
        if global_theta is not None:
            self.config.global_rope_theta = float(global_theta)
        if local_theta is not None:
            self.config.local_rope_theta = float(local_theta)
        cfg = self.config
        self.global_inv_freq.copy_(rope_inv_freq(cfg.head_dim, cfg.global_rope_theta))
        self.local_inv_freq.copy_(rope_inv_freq(cfg.head_dim, cfg.local_rope_theta))

    # --- inputs ----------------------------------------------------------------------------------
    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"input_ids must hold integer token ids (int64/int32), got dtype {input_ids.dtype}")
        if input_ids.numel() == 0:  # shape metadata only: no device read
            raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): give at least one token")
        if not torch.compiler.is_compiling():
            lo, hi = _min_max(input_ids)
            if lo < 0 or hi >= self.config.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"token id {bad} is out of range for a vocabulary of {self.config.vocab_size} "
                                 f"(valid ids: 0..{self.config.vocab_size - 1})")

    def _layout(self, input_ids, attention_mask, cu_seqlens, max_seqlen, position_ids):
        """-> flat ids (N,), positions (N,), PackedLayout, unpad info (B, T, keep-mask or None) or None.

        Packed input given on the host is checked there and then moved to the model's device without blocking
        (no device->host read); under torch.compile the value checks are skipped and the layout is built from
        device tensors alone (max_seqlen is then required)."""
        device = self.tok_embeddings.weight.device
        self._check_ids(input_ids)
        if cu_seqlens is not None:  # packed input may come from the host: checked there, copied without blocking
            input_ids = _to_device(input_ids, device)
        if cu_seqlens is not None and torch.compiler.is_compiling():
            if max_seqlen is None:
                raise ValueError("pass max_seqlen with cu_seqlens when the model is compiled (an upper bound on "
                                 "the document length, e.g. the sequence length)")
            layout = PackedLayout.traced(cu_seqlens.to(device, torch.int32), int(max_seqlen), input_ids.shape[0])
            positions = layout.position_ids() if position_ids is None else position_ids.to(device)
            return input_ids, positions, layout, None
        if cu_seqlens is not None:
            if attention_mask is not None:
                raise ValueError("pass either attention_mask (padded input) or cu_seqlens (packed input), not both")
            if input_ids.dim() != 1:
                raise ValueError(f"packed input (cu_seqlens given) must be a flat (N,) tensor of ids, "
                                 f"got shape {tuple(input_ids.shape)}")
            if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 \
                    or cu_seqlens.dtype.is_floating_point:
                raise ValueError("cu_seqlens must be a 1-D integer tensor [0, end_1, ..., N] of document boundaries")
            layout = PackedLayout.from_cu_seqlens(cu_seqlens, max_seqlen, device=input_ids.device)
            cu = layout.host_cu.numpy().tolist()
            if cu[0] != 0 or layout.total != input_ids.shape[0] or min(layout.seqlens) < 0:
                raise ValueError(f"cu_seqlens must start at 0, never decrease and end at the number of tokens "
                                 f"({input_ids.shape[0]}); got {cu[:8]}{'...' if len(cu) > 8 else ''}")
            if position_ids is None:
                positions = layout.position_ids()
            else:
                if position_ids.shape != input_ids.shape:
                    raise ValueError(f"position_ids shape {tuple(position_ids.shape)} does not match input_ids "
                                     f"{tuple(input_ids.shape)}")
                positions = _to_device(position_ids, input_ids.device)
            return input_ids, positions, layout, None
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq) for padded input, or flat (N,) with cu_seqlens; "
                             f"got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if position_ids is not None and position_ids.shape[-1] != T:
            raise ValueError(f"position_ids shape {tuple(position_ids.shape)} does not match input_ids {(B, T)}")
        keep = None
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids "
                                 f"{tuple(input_ids.shape)}")
            keep = attention_mask.bool()
            if bool(keep.all()):
                keep = None
        if keep is None:
            layout = PackedLayout.uniform(B, T, input_ids.device)
            if position_ids is None:
                positions = layout.position_ids()
            else:
                positions = position_ids.expand(B, T).reshape(-1)
            return input_ids.reshape(-1), positions, layout, None
        lens = keep.sum(1)
        cols = torch.arange(T, device=input_ids.device).expand(B, T)
        first = torch.where(keep, cols, T).min(1).values
        last = torch.where(keep, cols, -1).max(1).values
        if bool(((last - first + 1).clamp(min=0) != lens).any()):
            raise ValueError("attention_mask must mark one contiguous run of real tokens per row "
                             "(left or right padding); holes are not supported")
        cu = torch.zeros(B + 1, dtype=torch.int32, device=input_ids.device)
        cu[1:] = lens.cumsum(0)
        layout = PackedLayout.from_cu_seqlens(cu)
        if position_ids is None:
            positions = cols[keep]  # transformers' convention: the column index
        else:
            positions = position_ids.expand(B, T)[keep]
        return input_ids[keep], positions, layout, (B, T, keep)

    # --- forward ---------------------------------------------------------------------------------
    def encode(self, ids: torch.Tensor, positions: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        """Flat ids (N,) -> final-norm hidden states (N, d). Each block gets tensors and an int only."""
        x = self.embed_norm(self.tok_embeddings(ids))
        rope_g = rope_freqs(positions, self.global_inv_freq)
        rope_l = rope_g if self.config.local_rope_theta == self.config.global_rope_theta else \
            rope_freqs(positions, self.local_inv_freq)
        cu, max_seqlen = layout.cu_seqlens, layout.max_seqlen
        for block in self.layers:
            x = block(x, rope_g if block.is_global else rope_l, cu, max_seqlen)
        return self.final_norm(x)

    def logits_from_hidden(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(self.head(h), self.tok_embeddings.weight, self.decoder_bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                position_ids: torch.Tensor | None = None, prediction_positions: torch.Tensor | None = None,
                return_logits: bool = True, labels: torch.Tensor | None = None) -> TransformerOutput:
        ids, positions, layout, unpad = self._layout(input_ids, attention_mask, cu_seqlens, max_seqlen, position_ids)
        h = self.encode(ids, positions, layout)
        if unpad is not None:
            B, T, keep = unpad
            full = h.new_zeros(B, T, h.shape[-1])
            full[keep] = h
            hidden = full
        elif cu_seqlens is None:
            hidden = h.view(input_ids.shape[0], input_ids.shape[1], -1)
        else:
            hidden = h
        flat = hidden.reshape(-1, hidden.shape[-1])
        selected = None
        if prediction_positions is not None:
            if prediction_positions.dim() != 1 or prediction_positions.dtype.is_floating_point:
                raise ValueError("prediction_positions must be a 1-D integer tensor of flat token indices")
            if prediction_positions.numel() and not torch.compiler.is_compiling():
                lo, hi = _min_max(prediction_positions)
                if lo < 0 or hi >= flat.shape[0]:
                    raise ValueError(f"prediction_positions must index the {flat.shape[0]} flat tokens")
            selected = flat.index_select(0, _to_device(prediction_positions.long(), flat.device))
        if labels is not None:
            target_rows = selected if selected is not None else flat
            if labels.numel() != target_rows.shape[0]:
                raise ValueError(f"labels has {labels.numel()} entries but the head runs on {target_rows.shape[0]} "
                                 f"positions (labels align with prediction_positions, or with input_ids)")
            labels = labels.reshape(-1).long()
            if host_reads_are_free(labels) and labels.numel():  # checked on the host, before the copy
                lab = labels.numpy()
                bad = lab[(lab != IGNORE_INDEX) & ((lab < 0) | (lab >= self.config.vocab_size))]
                if bad.size:
                    raise ValueError(f"label {int(bad[0])} is out of range for a vocabulary of "
                                     f"{self.config.vocab_size}")
            loss = fused_linear_cross_entropy(self.head(target_rows), self.tok_embeddings.weight, self.decoder_bias,
                                              _to_device(labels, flat.device))
            return TransformerOutput(logits=None, hidden_states=hidden, loss=loss)
        if not return_logits:
            return TransformerOutput(logits=None, hidden_states=hidden)
        if selected is not None:
            return TransformerOutput(logits=self.logits_from_hidden(selected), hidden_states=hidden)
        return TransformerOutput(logits=self.logits_from_hidden(hidden), hidden_states=hidden)

    # --- utilities -------------------------------------------------------------------------------
    def num_parameters(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_embeddings.weight.numel() + self.decoder_bias.numel()
        return n

    def flops_per_token(self, seq_len: int, predicted_fraction: float = 1.0) -> float:
        """Training FLOPs (forward + backward) per token for documents of `seq_len` tokens.

        6 × (matmul weights per token) for the layers, plus 6 × predicted_fraction × (head dense + tied vocabulary
        projection), plus attention 12 × d × (keys each query really attends to: windows and causality counted).
        The embedding lookup costs no FLOPs.
        """
        cfg = self.config
        d, inter = cfg.hidden_size, cfg.intermediate_size
        per_layer = 4 * d * d + 3 * d * inter
        flops = 6.0 * cfg.num_layers * per_layer
        flops += 6.0 * predicted_fraction * (d * d + cfg.vocab_size * d)
        for block in self.blocks:
            flops += 12.0 * d * mean_keys_per_query(seq_len, block.attn.window)
        return flops

    def save_pretrained(self, path, tokenizer=None, **options) -> None:
        """Hugging Face folder (config.json, model.safetensors, tokenizer files, card); see twinlm.export
        (`options`: max_length, card, extra_config, generation_config, objective)."""
        export.save_pretrained(self, path, tokenizer=tokenizer, **options)

    def save_checkpoint(self, path) -> None:
        """twinlm's own folder: model.safetensors (twinlm names) + model_config.json."""
        export.save_checkpoint(self, path)


__all__ = ["Transformer", "TransformerOutput", "rope_inv_freq", "rope_freqs"]
