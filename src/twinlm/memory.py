"""Per-rank training memory, planned before a run instead of discovered by running out of it.

`estimate(config, micro_batch_tokens=…, ranks=…, sharded=…, checkpointing=…, precision=…)` adds up, in bytes
per rank:

- model states: fp32 parameters (4 B each), fp32 gradients (4 B), StableAdamW's two fp32 moments (8 B);
  divided by the rank count when sharded (FSDP2), plus, sharded, the gathered parameters of two blocks (the
  one running and the one prefetched) in the compute dtype;
- the compute-dtype copies of the matmul weights that autocast saves for backward (bf16: 2 B per weight);
- activations saved for backward, per token of a micro-batch, from what each operation of a block saves
  (twinlm.model, twinlm.ops; B = 2 under bf16 autocast, 4 in fp32, LayerNorms and the residual stream fp32):

      attention norm input 4d, Wqkv input B·d, q k v and the attention output 4·B·d, dropout mask 1·d,
      MLP norm input 4d, Wi input B·d, GeGLU input 2·B·I and gelu(u) B·I, MLP Wo input B·I
      -> per layer (13 + 6B)·d + 4B·I  (bf16: 25d + 8I; fp32: 37d + 16I; layer 0 has no attention norm)

  with activation checkpointing only each block's input survives (4d per layer), and one block's full set
  exists again while it is recomputed; outside the layers: the embedding and final-norm inputs (8d per token),
  the prediction head on the predicted fraction of tokens (about (8 + 3B)·d each) and the fused loss's fp32
  (V, d) gradient accumulator plus one chunk of logits;
- a fixed reserve for the CUDA context, kernels' workspaces and allocator fragmentation (RESERVE_FRACTION of
  the card, at least RESERVE_MIN).

tests/test_memory.py checks the activation formula against the bytes torch actually saves for backward
(saved-tensor hooks) on CPU. `plan(...)` picks the largest micro-batch (halving from the recipe's) and
whether to checkpoint, so that the estimate fits a card; `CARDS` holds cards' memory by exact name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from twinlm.config import ModelConfig
from twinlm.errors import ConfigError

GiB = 1 << 30
# usable device memory by exact card name (bytes, as torch.cuda.mem_get_info reports a fresh device)
CARDS = {"H100": 79.1 * GiB, "H100-SXM": 79.1 * GiB, "H100-PCIe": 79.1 * GiB, "H200": 139.8 * GiB,
         "A100-80GB": 79.1 * GiB, "A100-40GB": 39.4 * GiB, "L40S": 44.4 * GiB, "A10G": 22.0 * GiB,
         "RTX4090": 23.5 * GiB}
RESERVE_FRACTION = 0.06
RESERVE_MIN = 1.5 * GiB
LOGITS_CHUNK_BYTES = 1 << 29  # twinlm.ops: fp32 logits of one loss chunk on an accelerator (512 MB)


@dataclass
class MemoryEstimate:
    micro_batch_tokens: int
    ranks: int
    sharded: bool
    checkpointing: bool
    precision: str
    parameters: int
    model_states: float  # params + grads + optimizer (+ gathered blocks when sharded), bytes per rank
    weight_copies: float  # compute-dtype weight copies saved for backward
    activation_bytes_per_token: float  # all layers plus the rest, per micro-batch token
    activations: float
    head_fixed: float  # loss accumulator and one logits chunk
    reserve: float
    total: float
    card: str | None = None
    card_bytes: float | None = None

    @property
    def fits(self) -> bool | None:
        return None if self.card_bytes is None else self.total <= self.card_bytes

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fits"] = self.fits
        return d


def layer_bytes_per_token(cfg: ModelConfig, precision: str = "bf16", first: bool = False) -> float:
    """Bytes one block saves for backward per token (see the module docstring)."""
    b = 2 if precision == "bf16" else 4
    d, inner = cfg.hidden_size, cfg.intermediate_size
    per = (13 + 6 * b) * d + 4 * b * inner
    return per - 4 * d if first else per


def parameter_count(cfg: ModelConfig) -> int:
    """The parameters of a model of config `cfg`, from the config alone (nothing is built)."""
    return _counts(cfg)[0]


def _counts(cfg: ModelConfig) -> tuple[int, int, int]:
    """(all parameters, matmul weights in the layers and the head's dense, one block's parameters)."""
    d, inner, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    block = 4 * d * d + 3 * d * inner + 2 * d
    total = v * d + v + cfg.num_layers * block + d * d + 3 * d - (d if cfg.num_layers else 0)
    matmul = cfg.num_layers * (4 * d * d + 3 * d * inner) + d * d + v * d
    return total, matmul, block


def estimate(cfg: ModelConfig, *, micro_batch_tokens: int, ranks: int = 1, sharded: bool = False,
             checkpointing: bool = False, precision: str = "bf16", predicted_fraction: float | None = None,
             card: str | None = None, card_bytes: float | None = None) -> MemoryEstimate:
    """Per-rank training memory of `cfg` at `micro_batch_tokens` tokens per forward pass (see the docstring).
    `card`: a name of CARDS; or `card_bytes`: the device's memory (e.g. torch.cuda.mem_get_info's total)."""
    if micro_batch_tokens <= 0 or ranks <= 0:
        raise ConfigError("micro-batch tokens and rank count must be positive")
    if precision not in ("bf16", "fp32"):
        raise ConfigError(f"precision must be bf16 or fp32, got {precision!r}")
    if card is not None:
        if card not in CARDS:
            raise ConfigError(f"unknown card {card!r}; choose one of: {', '.join(CARDS)}")
        card_bytes = CARDS[card]
    if predicted_fraction is None:
        predicted_fraction = 1.0 if cfg.causal else 0.3
    b = 2 if precision == "bf16" else 4
    d = cfg.hidden_size
    params, matmul, block = _counts(cfg)
    states = 16.0 * params
    if sharded and ranks > 1:
        states = states / ranks + 2 * block * b
    weights = float(matmul * b) if precision == "bf16" else 0.0
    layers = [layer_bytes_per_token(cfg, precision, first=i == 0) for i in range(cfg.num_layers)]
    if checkpointing:
        per_layer = 4.0 * d * cfg.num_layers + max(layers, default=0.0)
    else:
        per_layer = float(sum(layers))
    per_token = per_layer + 8 * d + predicted_fraction * (8 + 3 * b) * d
    head_fixed = 4.0 * cfg.vocab_size * (d + 1) + (LOGITS_CHUNK_BYTES if precision == "bf16" else 0)
    activations = per_token * micro_batch_tokens
    reserve = max(RESERVE_MIN, RESERVE_FRACTION * card_bytes) if card_bytes else RESERVE_MIN
    total = states + weights + activations + head_fixed + reserve
    return MemoryEstimate(micro_batch_tokens, ranks, sharded and ranks > 1, checkpointing, precision, params, states,
                          weights, per_token, activations, head_fixed, reserve, total, card, card_bytes)


def plan(cfg: ModelConfig, *, card: str | None = None, micro_batch_tokens: int, ranks: int = 1,
         sharded: bool = False, precision: str = "bf16", min_tokens: int = 4096,
         card_bytes: float | None = None) -> MemoryEstimate:
    """The largest micro-batch (the recipe's, halved as needed, never below `min_tokens`) that fits the card
    (`card` by name, or `card_bytes`), without activation checkpointing when one fits, else with it;
    ConfigError when nothing fits."""
    if card is None and card_bytes is None:
        raise ConfigError("a memory plan needs the device: name a card (--card H100) or give its memory")
    kw: dict[str, Any] = dict(ranks=ranks, sharded=sharded, precision=precision, card=card, card_bytes=card_bytes)
    for checkpointing in (False, True):
        tokens = micro_batch_tokens
        while tokens >= min(min_tokens, micro_batch_tokens):
            est = estimate(cfg, micro_batch_tokens=tokens, checkpointing=checkpointing, **kw)
            if est.fits:
                return est
            tokens //= 2
    est = estimate(cfg, micro_batch_tokens=min_tokens, checkpointing=True, **kw)
    raise ConfigError(f"{cfg.num_layers}-layer d={cfg.hidden_size} model does not fit a {card or 'device'} "
                      f"({(est.card_bytes or 0) / GiB:.0f} GiB) even at {min_tokens} tokens per micro-batch with "
                      f"activation checkpointing (estimate {est.total / GiB:.1f} GiB); use more ranks with "
                      "parallel=fsdp")


def check_fits(cfg: ModelConfig, *, micro_batch_tokens: int, checkpointing: bool, card_bytes: float,
               device: str, ranks: int = 1, sharded: bool = False, precision: str = "bf16") -> MemoryEstimate:
    """The training setup's pre-flight check (train/setup.py `check_memory`): the estimate of the recipe's own
    settings, or ConfigError naming the settings that fit (`plan`) when they do not: an out-of-memory error
    minutes into a run becomes one line before the first step. The estimate was within 4% of the peak measured
    on an H200 (bench/RESULTS.md)."""
    est = estimate(cfg, micro_batch_tokens=micro_batch_tokens, ranks=ranks, sharded=sharded,
                   checkpointing=checkpointing, precision=precision, card_bytes=card_bytes)
    if est.fits:
        return est
    where = f"{device} ({card_bytes / GiB:.1f} GiB)"
    try:
        chosen = plan(cfg, micro_batch_tokens=micro_batch_tokens, ranks=ranks, sharded=sharded,
                      precision=precision, card_bytes=card_bytes)
    except ConfigError as e:
        raise ConfigError(f"the run needs about {est.total / GiB:.1f} GiB per rank, more than {where}; {e}") from None
    fix = f"phases.*.micro_batch_tokens={chosen.micro_batch_tokens}"
    if chosen.checkpointing and not checkpointing:
        fix += " activation_checkpointing=true"
    raise ConfigError(f"the run needs about {est.total / GiB:.1f} GiB per rank at {micro_batch_tokens:,} tokens per "
                      f"micro-batch, more than {where}: set {fix} (estimate {chosen.total / GiB:.1f} GiB; the "
                      f"micro-batch splits the global batch, the training is unchanged), or memory_check=false")


def describe(est: MemoryEstimate) -> str:
    g = GiB
    lines = [f"per-rank memory at {est.micro_batch_tokens:,} tokens per micro-batch, {est.ranks} rank(s)"
             f"{' (FSDP-sharded states)' if est.sharded else ''}, {est.precision}, activation checkpointing "
             f"{'on' if est.checkpointing else 'off'}:",
             f"  parameters, gradients, optimizer  {est.model_states / g:8.2f} GiB",
             f"  autocast weight copies            {est.weight_copies / g:8.2f} GiB",
             f"  activations                       {est.activations / g:8.2f} GiB "
             f"({est.activation_bytes_per_token / 1024:.1f} KiB per token)",
             f"  loss accumulator + logits chunk   {est.head_fixed / g:8.2f} GiB",
             f"  reserve (context, fragmentation)  {est.reserve / g:8.2f} GiB",
             f"  total                             {est.total / g:8.2f} GiB"]
    if est.card is not None and est.card_bytes is not None:
        lines.append(f"  {est.card} ({est.card_bytes / g:.1f} GiB): {'fits' if est.fits else 'DOES NOT FIT'}")
    return "\n".join(lines)


__all__ = ["estimate", "plan", "check_fits", "describe", "MemoryEstimate", "layer_bytes_per_token", "CARDS",
           "parameter_count"]
