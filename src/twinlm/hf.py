"""Hugging Face interop: the only module that knows transformers' ModernBERT weight and config names.

twinlm encoders are `ModernBertForMaskedLM` (model_type `modernbert`) and decoders
`ModernBertDecoderForCausalLM` (model_type `modernbert-decoder`); both load in transformers with no custom code.
This module translates, in both directions, without touching files or the `Transformer` class:

- Weight names: one table, `HF_TO_TWINLM` (templates with `{i}` for the layer and `{head}` for the class's
  prediction-head prefix, `head` or `lm_head`); `TWINLM_TO_HF` is its inverse and `hf_names(config)` its
  expansion for one model. `to_hf_state_dict` / `from_hf_state_dict` follow the table, with code only for the
  real special cases: the attention input projection (the encoder class stores the fused `Wqkv`, the decoder
  class `q_proj`, `k_proj`, `v_proj`; twinlm keeps the q and k rows of each head interleaved, transformers
  half-split: `qk_half_to_interleaved`), layer 0's missing attention norm (transformers' `nn.Identity`), and
  `decoder.weight`, the vocabulary projection tied to the embeddings (never written; checked when present).
  Reading accepts either class's names, so a folder converts between encoder and decoder on load.
- Config (`hf_config_dict`, `config_from_hf`): `local_attention` = ModelConfig.local_window in both classes
  (the encoder reads it as ±64, the decoder as a 64-token left window: transformers' own definitions, checked
  against its code); `rope_parameters` per layer type carries the global and local RoPE θ (transformers 5),
  `global_rope_theta` / `local_rope_theta` are written too for transformers 4.x; `layer_types` is written
  explicitly.

Folders are written by twinlm.export and read by twinlm.loading.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from twinlm.config import ETTIN_SPECIAL_TOKENS, ModelConfig
from twinlm.errors import ModelLoadError

ENCODER_TYPE, DECODER_TYPE = "modernbert", "modernbert-decoder"
ENCODER_ARCH, DECODER_ARCH = "ModernBertForMaskedLM", "ModernBertDecoderForCausalLM"
TWINLM_ATTENTION_DROPOUT = "twinlm_attention_dropout"  # twinlm's training value (output-only dropout)
# config.json fields that describe the architecture (written by hf_config_dict from the ModelConfig); every other
# field (classifier settings, labels, task-specific settings) is the folder's own and `convert` carries it
ARCHITECTURE_FIELDS = frozenset({
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "max_position_embeddings", "local_attention", "global_attn_every_n_layers", "layer_types",
    "rope_parameters", "global_rope_theta", "local_rope_theta", "sliding_window", "use_cache", "is_decoder",
    "transformers_version", "dtype", "torch_dtype", "pad_token_id", "bos_token_id", "eos_token_id", "cls_token_id",
    "sep_token_id", "mask_token_id", "unk_token_id", "attention_dropout", TWINLM_ATTENTION_DROPOUT, "head_dim",
    "sparse_prediction", "sparse_pred_ignore_index", "deterministic_flash_attn"})


# --------------------------------------------------------------------------------------------------
# q/k layout: transformers stores each head's q and k dims half-split ([x0..x31 | x32..x63] for head_dim 64),
# twinlm interleaved ([x0, x32, x1, x33, ...]) so that RoPE is a complex multiply on contiguous pairs.
def qk_half_to_interleaved(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder the rows of a (heads*head_dim, d) q or k projection from half-split to interleaved per head."""
    hd = w.shape[0] // num_heads
    return w.view(num_heads, 2, hd // 2, -1).transpose(1, 2).reshape(w.shape)


def qk_interleaved_to_half(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The inverse of qk_half_to_interleaved."""
    hd = w.shape[0] // num_heads
    return w.view(num_heads, hd // 2, 2, -1).transpose(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------------------------------
# config
def hf_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    causal = cfg.causal
    d = {
        "architectures": [DECODER_ARCH if causal else ENCODER_ARCH],
        "model_type": DECODER_TYPE if causal else ENCODER_TYPE,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "hidden_activation": "gelu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.init_std,
        "initializer_cutoff_factor": cfg.init_cutoff_factor,
        "norm_eps": cfg.norm_eps,
        "norm_bias": False,
        "pad_token_id": cfg.pad_token_id,
        "bos_token_id": cfg.cls_token_id,
        "eos_token_id": cfg.sep_token_id,
        "cls_token_id": cfg.cls_token_id,
        "sep_token_id": cfg.sep_token_id,
        "mask_token_id": cfg.mask_token_id,
        "unk_token_id": cfg.unk_token_id,
        "attention_bias": False,
        # transformers applies attention_dropout to the attention probabilities as well as the output; twinlm
        # trains with dropout on the output only, so HF fine-tuning gets none and twinlm keeps its own value
        "attention_dropout": 0.0,
        TWINLM_ATTENTION_DROPOUT: cfg.attention_dropout,
        "embedding_dropout": 0.0,
        "mlp_bias": False,
        "mlp_dropout": 0.0,
        "decoder_bias": True,
        "classifier_bias": False,
        "classifier_activation": "gelu",
        "classifier_dropout": 0.0,
        "local_attention": cfg.local_window,
        "global_attn_every_n_layers": cfg.global_attn_every_n_layers,
        "layer_types": cfg.layer_types,
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": float(cfg.global_rope_theta)},
            "sliding_attention": {"rope_type": "default", "rope_theta": float(cfg.local_rope_theta)},
        },
        "global_rope_theta": float(cfg.global_rope_theta),
        "local_rope_theta": float(cfg.local_rope_theta),
        "tie_word_embeddings": True,
        "dtype": "float32",
    }
    if causal:
        d["use_cache"] = True
    else:
        d.update(classifier_pooling="mean", sparse_prediction=False, sparse_pred_ignore_index=-100,
                 deterministic_flash_attn=False)
    return d


SPECIAL_TOKEN_NAMES = {"pad": "[PAD]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]", "unk": "[UNK]"}


def config_from_hf(d: dict[str, Any], *, tokenizer_ids: dict[str, int] | None = None,
                   where: str = "config") -> ModelConfig:
    """The ModelConfig of a Hugging Face config.json's dict `d`. Special token ids come from the config, else
    `tokenizer_ids` (token text -> id, e.g. read from the folder's tokenizer.json by loading.py), else Ettin's
    ids, else the pad id. `where` names the folder in errors."""
    mt = d.get("model_type")
    if mt not in (ENCODER_TYPE, DECODER_TYPE):
        raise ModelLoadError(f"{where}: model_type {mt!r} is not supported; twinlm loads "
                             f"{ENCODER_TYPE!r} ({ENCODER_ARCH}) and {DECODER_TYPE!r} ({DECODER_ARCH}) folders")
    causal = mt == DECODER_TYPE
    try:
        n_layers = int(d["num_hidden_layers"])
        hidden = int(d["hidden_size"])
        vocab = int(d["vocab_size"])
        cfg_kw: dict[str, Any] = dict(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=int(d["intermediate_size"]),
            num_layers=n_layers, num_heads=int(d["num_attention_heads"]), causal=causal)
    except KeyError as e:
        raise ModelLoadError(f"{where}: config.json lacks the field {e.args[0]!r}") from None
    for hf_name, ours in (("hidden_activation", "gelu"), ("norm_bias", False), ("attention_bias", False),
                          ("mlp_bias", False), ("decoder_bias", True), ("tie_word_embeddings", True)):
        if hf_name in d and d[hf_name] != ours and not (hf_name == "hidden_activation" and d[hf_name] == "gelu"):
            raise ModelLoadError(f"{where}: {hf_name}={d[hf_name]!r} is not supported "
                                 f"(twinlm models have {hf_name}={ours!r})")
    if d.get("head_dim") not in (None, hidden // max(cfg_kw["num_heads"], 1)):
        raise ModelLoadError(f"{where}: head_dim {d['head_dim']} != hidden_size / num_attention_heads")
    # global attention pattern: from layer_types (explicit) or the old integer field
    every = int(d.get("global_attn_every_n_layers", 3) or 3)
    layer_types = d.get("layer_types")
    if layer_types is not None:
        if len(layer_types) != n_layers:
            raise ModelLoadError(f"{where}: layer_types has {len(layer_types)} entries for "
                                 f"{n_layers} layers")
        globals_ = [i for i, t in enumerate(layer_types) if t == "full_attention"]
        unknown = set(layer_types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise ModelLoadError(f"{where}: unknown layer types {sorted(unknown)}")
        candidates = [e for e in [every, *range(1, n_layers + 1)]
                      if [i for i in range(n_layers) if i % e == 0] == globals_]
        if not candidates:
            raise ModelLoadError(f"{where}: layer_types puts global attention on layers {globals_}; "
                                 f"twinlm supports every n-th layer starting at layer 0")
        every = candidates[0]
    cfg_kw["global_attn_every_n_layers"] = every
    local = d.get("local_attention", 128)
    if local is None or (isinstance(local, (int, float)) and local <= 0):
        raise ModelLoadError(f"{where}: local_attention={local!r} is not supported")
    cfg_kw["local_window"] = int(local)
    rope = d.get("rope_parameters") or {}
    g = (rope.get("full_attention") or {}).get("rope_theta", d.get("global_rope_theta", 160_000.0))
    loc = (rope.get("sliding_attention") or {}).get("rope_theta", d.get("local_rope_theta", 10_000.0))
    for kind in ("full_attention", "sliding_attention"):
        rt = (rope.get(kind) or {}).get("rope_type", "default")
        if rt != "default":
            raise ModelLoadError(f"{where}: rope_type {rt!r} ({kind}) is not supported")
    cfg_kw.update(global_rope_theta=float(g), local_rope_theta=float(loc))
    for ours, theirs in (("max_position_embeddings", "max_position_embeddings"), ("norm_eps", "norm_eps"),
                         ("init_std", "initializer_range"), ("init_cutoff_factor", "initializer_cutoff_factor"),
                         ("attention_dropout", TWINLM_ATTENTION_DROPOUT if TWINLM_ATTENTION_DROPOUT in d
                          else "attention_dropout")):
        if d.get(theirs) is not None:
            cfg_kw[ours] = int(d[theirs]) if ours == "max_position_embeddings" else float(d[theirs])
    # special tokens: config, else the folder's tokenizer, else Ettin's ids, else the pad id
    fallback_keys = {"cls": ("cls_token_id", "bos_token_id"), "sep": ("sep_token_id", "eos_token_id"),
                     "pad": ("pad_token_id",), "mask": ("mask_token_id",), "unk": ("unk_token_id",)}
    for short, keys in fallback_keys.items():
        value = next((d[k] for k in keys if isinstance(d.get(k), int)), None)
        if value is None and tokenizer_ids:
            value = tokenizer_ids.get(SPECIAL_TOKEN_NAMES[short])
        if value is None or not 0 <= value < vocab:
            value = ETTIN_SPECIAL_TOKENS[short]
        if not 0 <= value < vocab:
            value = next((d[k] for k in ("pad_token_id",) if isinstance(d.get(k), int) and 0 <= d[k] < vocab), 0)
        cfg_kw[f"{short}_token_id"] = int(value)
    try:
        return ModelConfig(**cfg_kw)
    except ValueError as e:
        raise ModelLoadError(f"{where}: {e}") from None


# --------------------------------------------------------------------------------------------------
# weight names
HEAD_PREFIX = {False: "head", True: "lm_head"}  # the prediction head in the encoder / decoder class (by causal)

# HF name -> twinlm name, model-wide weights first, then one layer's, in the order they are read.
HF_TO_TWINLM = {
    "model.embeddings.tok_embeddings.weight": "tok_embeddings.weight",
    "model.embeddings.norm.weight": "embed_norm.weight",
    "model.final_norm.weight": "final_norm.weight",
    "{head}.dense.weight": "head.dense.weight",
    "{head}.norm.weight": "head.norm.weight",
    "decoder.bias": "decoder_bias",
    "model.layers.{i}.attn_norm.weight": "layers.{i}.attn_norm.weight",  # not in layer 0
    "model.layers.{i}.attn.Wqkv.weight": "layers.{i}.attn.Wqkv.weight",  # decoder class: q_proj, k_proj, v_proj
    "model.layers.{i}.attn.Wo.weight": "layers.{i}.attn.Wo.weight",
    "model.layers.{i}.mlp_norm.weight": "layers.{i}.mlp_norm.weight",
    "model.layers.{i}.mlp.Wi.weight": "layers.{i}.mlp.Wi.weight",
    "model.layers.{i}.mlp.Wo.weight": "layers.{i}.mlp.Wo.weight",
}
TWINLM_TO_HF = {ours: theirs for theirs, ours in HF_TO_TWINLM.items()}

# the special cases
_NOT_IN_LAYER_0 = "layers.{i}.attn_norm.weight"  # transformers' layer 0 has nn.Identity for this norm
_QKV = "attn.Wqkv.weight"  # fused in the encoder class; q/k rows permuted in both classes
_SPLIT_QKV = ("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight")  # the decoder class's names
_TIED = "decoder.weight"  # the vocabulary projection = the token embeddings: never written, checked if present


def hf_names(cfg: ModelConfig) -> dict[str, str]:
    """twinlm name -> HF name of every weight of one model (the fused Wqkv name for attention inputs)."""
    head = HEAD_PREFIX[cfg.causal]
    names = {ours: theirs.format(head=head) for ours, theirs in TWINLM_TO_HF.items() if "{i}" not in ours}
    for i in range(cfg.num_layers):
        names.update((ours.format(i=i), theirs.format(i=i)) for ours, theirs in TWINLM_TO_HF.items()
                     if "{i}" in ours and not (i == 0 and ours == _NOT_IN_LAYER_0))
    return names


def _split_names(fused: str) -> list[str]:
    return [fused.replace(_QKV, name) for name in _SPLIT_QKV]


def to_hf_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights under the HF names of its class (encoder or decoder), q/k rows half-split."""
    cfg = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    d, h = cfg.hidden_size, cfg.num_heads
    out = {}
    for ours, theirs in hf_names(cfg).items():
        if not ours.endswith(_QKV):
            out[theirs] = sd[ours]
            continue
        w = sd[ours]
        qkv = (qk_interleaved_to_half(w[:d], h), qk_interleaved_to_half(w[d:2 * d], h), w[2 * d:])
        if cfg.causal:
            out.update(zip(_split_names(theirs), qkv))
        else:
            out[theirs] = torch.cat(qkv, 0)
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig,
                       where: str = "weights") -> dict[str, torch.Tensor]:
    """HF names (either class) -> twinlm names. Accepts the other class's names too (conversion)."""
    sd = dict(sd)
    # strip a common wrapper prefix if the base model was saved alone (ModernBertModel: no "model.")
    if not any(k.startswith("model.") for k in sd) and any(k.startswith("embeddings.") for k in sd):
        sd = {("model." + k if k.startswith(("embeddings.", "layers.", "final_norm.")) else k): v
              for k, v in sd.items()}
    used: set[str] = set()

    def take(*names: str) -> torch.Tensor:
        for n in names:
            if n in sd:
                used.add(n)
                return sd[n]
        raise ModelLoadError(f"{where}: missing weight {names[0]!r}")

    own, other = HEAD_PREFIX[cfg.causal], HEAD_PREFIX[not cfg.causal]
    out = {}
    for ours, theirs in hf_names(cfg).items():
        if ours.endswith(_QKV):
            out[ours] = _qkv_from_hf(take, theirs in sd, theirs, int(ours.split(".")[1]), cfg, where)
        elif theirs.startswith(own + "."):
            alt = other + theirs[len(own):]
            if theirs not in sd and alt not in sd:
                raise ModelLoadError(f"{where}: missing weight {theirs!r} (the prediction head; a folder saved "
                                     f"from a base model without a head cannot be loaded as a language model)")
            out[ours] = take(theirs, alt)
        else:
            out[ours] = take(theirs)
    if _TIED in sd:
        used.add(_TIED)
        if not torch.equal(sd[_TIED], out["tok_embeddings.weight"]):
            raise ModelLoadError(f"{where}: {_TIED} differs from the token embeddings; twinlm ties them")
    if TWINLM_TO_HF[_NOT_IN_LAYER_0].format(i=0) in sd:
        raise ModelLoadError(f"{where}: layer 0 has an attention norm; ModernBERT's layer 0 has none")
    extra = sorted(set(sd) - used)
    if extra:
        shown = ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else "")
        raise ModelLoadError(f"{where}: {len(extra)} unexpected weights for a {cfg.num_layers}-layer model: {shown} "
                             f"(does config.json contradict the weights?)")
    return out


def _qkv_from_hf(take: Callable[..., torch.Tensor], fused: bool, name: str, layer: int, cfg: ModelConfig,
                 where: str) -> torch.Tensor:
    """twinlm's Wqkv of one layer from the fused (encoder class) or split (decoder class) HF projections."""
    wq, wk, wv = take(name).chunk(3, 0) if fused else (take(n) for n in _split_names(name))
    if not wq.shape == wk.shape == wv.shape or wq.shape[0] % cfg.num_heads or wq.dim() != 2:
        raise ModelLoadError(f"{where}: attention projection of layer {layer} has shape {tuple(wq.shape)} x 3, "
                             f"which does not fit {cfg.num_heads} heads of hidden size {cfg.hidden_size} (the "
                             f"config contradicts the weights)")
    h = cfg.num_heads
    return torch.cat([qk_half_to_interleaved(wq, h), qk_half_to_interleaved(wk, h), wv], 0)


__all__ = ["HF_TO_TWINLM", "TWINLM_TO_HF", "hf_names", "to_hf_state_dict", "from_hf_state_dict", "hf_config_dict",
           "config_from_hf", "qk_half_to_interleaved", "qk_interleaved_to_half"]
