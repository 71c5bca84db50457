"""Hugging Face interop: the only module that knows transformers' ModernBERT weight and config names.

- `save_pretrained(model, dir, tokenizer=None)`: a folder that `AutoModelForMaskedLM` (encoders, model_type
  `modernbert`, `ModernBertForMaskedLM`) or `AutoModelForCausalLM` (decoders, model_type `modernbert-decoder`,
  `ModernBertDecoderForCausalLM`) loads with no custom code.
- `save_checkpoint(model, dir)`: twinlm's own folder, `model.safetensors` in twinlm names + `model_config.json`.
- `load(path)`: either kind of folder (also ones written by transformers itself) -> `Transformer`.

Naming (twinlm <- HF encoder / HF decoder):
    tok_embeddings.weight        model.embeddings.tok_embeddings.weight (both)
    embed_norm.weight            model.embeddings.norm.weight
    layers.i.attn_norm.weight    model.layers.i.attn_norm.weight        (i > 0)
    layers.i.attn.Wqkv.weight    model.layers.i.attn.Wqkv.weight / cat(q_proj, k_proj, v_proj); twinlm keeps the
                                 q and k rows of each head interleaved (see twinlm.model), HF half-split
    layers.i.attn.Wo.weight      model.layers.i.attn.Wo.weight
    layers.i.mlp_norm.weight     model.layers.i.mlp_norm.weight
    layers.i.mlp.Wi.weight       model.layers.i.mlp.Wi.weight
    layers.i.mlp.Wo.weight       model.layers.i.mlp.Wo.weight
    final_norm.weight            model.final_norm.weight
    head.dense.weight            head.dense.weight / lm_head.dense.weight
    head.norm.weight             head.norm.weight / lm_head.norm.weight
    decoder_bias                 decoder.bias                            (decoder.weight is tied, not stored)

Config: `local_attention` = ModelConfig.local_window in both classes (the encoder reads it as ±64, the decoder as a
64-token left window: transformers' own definitions, checked against its code); `rope_parameters` per layer type
carries the global and local RoPE θ (transformers 5), `global_rope_theta` / `local_rope_theta` are written too for
transformers 4.x; `layer_types` is written explicitly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from twinlm.errors import ModelLoadError
from twinlm.config import ETTIN_SPECIAL_TOKENS, ModelConfig
from twinlm.model import qk_half_to_interleaved, qk_interleaved_to_half

ENCODER_TYPE, DECODER_TYPE = "modernbert", "modernbert-decoder"
ENCODER_ARCH, DECODER_ARCH = "ModernBertForMaskedLM", "ModernBertDecoderForCausalLM"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TWINLM_CONFIG = "model_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "chat_template.jinja")


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
        "attention_dropout": cfg.attention_dropout,
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


def _special_from_tokenizer(folder: Path, token: str) -> int | None:
    tj = folder / "tokenizer.json"
    if not tj.is_file():
        return None
    try:
        data = json.loads(tj.read_text())
    except (OSError, ValueError):
        return None
    for t in data.get("added_tokens", []):
        if t.get("content") == token:
            return int(t["id"])
    vocab = (data.get("model") or {}).get("vocab")
    if isinstance(vocab, dict) and token in vocab:
        return int(vocab[token])
    return None


def config_from_hf(d: dict[str, Any], folder: Path | None = None) -> ModelConfig:
    mt = d.get("model_type")
    if mt not in (ENCODER_TYPE, DECODER_TYPE):
        raise ModelLoadError(f"{folder or 'config'}: model_type {mt!r} is not supported; twinlm loads "
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
        raise ModelLoadError(f"{folder or 'config'}: config.json lacks the field {e.args[0]!r}") from None
    for hf_name, ours in (("hidden_activation", "gelu"), ("norm_bias", False), ("attention_bias", False),
                          ("mlp_bias", False), ("decoder_bias", True), ("tie_word_embeddings", True)):
        if hf_name in d and d[hf_name] != ours and not (hf_name == "hidden_activation" and d[hf_name] == "gelu"):
            raise ModelLoadError(f"{folder or 'config'}: {hf_name}={d[hf_name]!r} is not supported "
                                 f"(twinlm models have {hf_name}={ours!r})")
    if d.get("head_dim") not in (None, hidden // max(cfg_kw["num_heads"], 1)):
        raise ModelLoadError(f"{folder or 'config'}: head_dim {d['head_dim']} != hidden_size / num_attention_heads")
    # global attention pattern: from layer_types (explicit) or the old integer field
    every = int(d.get("global_attn_every_n_layers", 3) or 3)
    layer_types = d.get("layer_types")
    if layer_types is not None:
        if len(layer_types) != n_layers:
            raise ModelLoadError(f"{folder or 'config'}: layer_types has {len(layer_types)} entries for "
                                 f"{n_layers} layers")
        globals_ = [i for i, t in enumerate(layer_types) if t == "full_attention"]
        unknown = set(layer_types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise ModelLoadError(f"{folder or 'config'}: unknown layer types {sorted(unknown)}")
        candidates = [e for e in [every, *range(1, n_layers + 1)]
                      if [i for i in range(n_layers) if i % e == 0] == globals_]
        if not candidates:
            raise ModelLoadError(f"{folder or 'config'}: layer_types puts global attention on layers {globals_}; "
                                 f"twinlm supports every n-th layer starting at layer 0")
        every = candidates[0]
    cfg_kw["global_attn_every_n_layers"] = every
    local = d.get("local_attention", 128)
    if local is None or (isinstance(local, (int, float)) and local <= 0):
        raise ModelLoadError(f"{folder or 'config'}: local_attention={local!r} is not supported")
    cfg_kw["local_window"] = int(local)
    rope = d.get("rope_parameters") or {}
    g = (rope.get("full_attention") or {}).get("rope_theta", d.get("global_rope_theta", 160_000.0))
    loc = (rope.get("sliding_attention") or {}).get("rope_theta", d.get("local_rope_theta", 10_000.0))
    for kind in ("full_attention", "sliding_attention"):
        rt = (rope.get(kind) or {}).get("rope_type", "default")
        if rt != "default":
            raise ModelLoadError(f"{folder or 'config'}: rope_type {rt!r} ({kind}) is not supported")
    cfg_kw.update(global_rope_theta=float(g), local_rope_theta=float(loc))
    for ours, theirs in (("max_position_embeddings", "max_position_embeddings"), ("norm_eps", "norm_eps"),
                         ("init_std", "initializer_range"), ("init_cutoff_factor", "initializer_cutoff_factor"),
                         ("attention_dropout", "attention_dropout")):
        if d.get(theirs) is not None:
            cfg_kw[ours] = type(getattr(ModelConfig, ours, 0.0))(d[theirs]) if ours != "max_position_embeddings" \
                else int(d[theirs])
    # special tokens: config, else the folder's tokenizer, else Ettin's ids, else the pad id
    names = {"pad": "[PAD]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]", "unk": "[UNK]"}
    fallback_keys = {"cls": ("cls_token_id", "bos_token_id"), "sep": ("sep_token_id", "eos_token_id"),
                     "pad": ("pad_token_id",), "mask": ("mask_token_id",), "unk": ("unk_token_id",)}
    for short, keys in fallback_keys.items():
        value = next((d[k] for k in keys if isinstance(d.get(k), int)), None)
        if value is None and folder is not None:
            value = _special_from_tokenizer(folder, names[short])
        if value is None or not 0 <= value < vocab:
            value = ETTIN_SPECIAL_TOKENS[short]
        if not 0 <= value < vocab:
            value = next((d[k] for k in ("pad_token_id",) if isinstance(d.get(k), int) and 0 <= d[k] < vocab), 0)
        cfg_kw[f"{short}_token_id"] = int(value)
    try:
        return ModelConfig(**cfg_kw)
    except ValueError as e:
        raise ModelLoadError(f"{folder or 'config'}: {e}") from None


# --------------------------------------------------------------------------------------------------
# weights
def _prefixes(causal: bool) -> str:
    return "lm_head" if causal else "head"


def to_hf_state_dict(model) -> dict[str, torch.Tensor]:
    cfg = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out = {
        "model.embeddings.tok_embeddings.weight": sd["tok_embeddings.weight"],
        "model.embeddings.norm.weight": sd["embed_norm.weight"],
        "model.final_norm.weight": sd["final_norm.weight"],
        f"{_prefixes(cfg.causal)}.dense.weight": sd["head.dense.weight"],
        f"{_prefixes(cfg.causal)}.norm.weight": sd["head.norm.weight"],
        "decoder.bias": sd["decoder_bias"],
    }
    d, h = cfg.hidden_size, cfg.num_heads
    for i in range(cfg.num_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        if i > 0:
            out[q + "attn_norm.weight"] = sd[p + "attn_norm.weight"]
        wqkv = sd[p + "attn.Wqkv.weight"]
        wq, wk, wv = (qk_interleaved_to_half(wqkv[:d], h), qk_interleaved_to_half(wqkv[d:2 * d], h), wqkv[2 * d:])
        if cfg.causal:
            out[q + "attn.q_proj.weight"], out[q + "attn.k_proj.weight"], out[q + "attn.v_proj.weight"] = wq, wk, wv
        else:
            out[q + "attn.Wqkv.weight"] = torch.cat([wq, wk, wv], 0)
        out[q + "attn.Wo.weight"] = sd[p + "attn.Wo.weight"]
        out[q + "mlp_norm.weight"] = sd[p + "mlp_norm.weight"]
        out[q + "mlp.Wi.weight"] = sd[p + "mlp.Wi.weight"]
        out[q + "mlp.Wo.weight"] = sd[p + "mlp.Wo.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig, where: str = "weights") -> dict[str, torch.Tensor]:
    """HF names (either class) -> twinlm names. Accepts the other class's names too (conversion)."""
    sd = dict(sd)
    # strip a common wrapper prefix if the base model was saved alone (ModernBertModel: no "model.")
    if not any(k.startswith("model.") for k in sd) and any(k.startswith("embeddings.") for k in sd):
        sd = {("model." + k if k.startswith(("embeddings.", "layers.", "final_norm.")) else k): v for k, v in sd.items()}
    used: set[str] = set()

    def take(*names: str) -> torch.Tensor:
        for n in names:
            if n in sd:
                used.add(n)
                return sd[n]
        raise ModelLoadError(f"{where}: missing weight {names[0]!r}")

    out = {
        "tok_embeddings.weight": take("model.embeddings.tok_embeddings.weight"),
        "embed_norm.weight": take("model.embeddings.norm.weight"),
        "final_norm.weight": take("model.final_norm.weight"),
    }
    for name in ("dense", "norm"):
        first, second = ("lm_head", "head") if cfg.causal else ("head", "lm_head")
        if f"{first}.{name}.weight" not in sd and f"{second}.{name}.weight" not in sd:
            raise ModelLoadError(f"{where}: missing weight '{first}.{name}.weight' (the prediction head; a folder "
                                 f"saved from a base model without a head cannot be loaded as a language model)")
        out[f"head.{name}.weight"] = take(f"{first}.{name}.weight", f"{second}.{name}.weight")
    out["decoder_bias"] = take("decoder.bias")
    if "decoder.weight" in sd:
        used.add("decoder.weight")
        if not torch.equal(sd["decoder.weight"], out["tok_embeddings.weight"]):
            raise ModelLoadError(f"{where}: decoder.weight differs from the token embeddings; twinlm ties them")
    for i in range(cfg.num_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        if i > 0:
            out[p + "attn_norm.weight"] = take(q + "attn_norm.weight")
        elif q + "attn_norm.weight" in sd:
            raise ModelLoadError(f"{where}: layer 0 has an attention norm; ModernBERT's layer 0 has none")
        if q + "attn.Wqkv.weight" in sd:
            wq, wk, wv = take(q + "attn.Wqkv.weight").chunk(3, 0)
        else:
            wq, wk, wv = take(q + "attn.q_proj.weight"), take(q + "attn.k_proj.weight"), take(q + "attn.v_proj.weight")
        if not wq.shape == wk.shape == wv.shape or wq.shape[0] % cfg.num_heads or wq.dim() != 2:
            raise ModelLoadError(f"{where}: attention projection of layer {i} has shape {tuple(wq.shape)} x 3, which "
                                 f"does not fit {cfg.num_heads} heads of hidden size {cfg.hidden_size} (the config "
                                 f"contradicts the weights)")
        out[p + "attn.Wqkv.weight"] = torch.cat([qk_half_to_interleaved(wq, cfg.num_heads),
                                                 qk_half_to_interleaved(wk, cfg.num_heads), wv], 0)
        out[p + "attn.Wo.weight"] = take(q + "attn.Wo.weight")
        out[p + "mlp_norm.weight"] = take(q + "mlp_norm.weight")
        out[p + "mlp.Wi.weight"] = take(q + "mlp.Wi.weight")
        out[p + "mlp.Wo.weight"] = take(q + "mlp.Wo.weight")
    extra = sorted(set(sd) - used)
    if extra:
        shown = ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else "")
        raise ModelLoadError(f"{where}: {len(extra)} unexpected weights for a {cfg.num_layers}-layer model: {shown} "
                             f"(does config.json contradict the weights?)")
    return out


# --------------------------------------------------------------------------------------------------
# saving
def _save_tokenizer(tokenizer, path: Path) -> None:
    if tokenizer is None:
        return
    if isinstance(tokenizer, (str, Path)):
        src = Path(tokenizer)
        copied = copy_tokenizer_files(src, path)
        if not copied:
            raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}) in {src}")
        return
    if not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(f"tokenizer must be a transformers tokenizer or a folder, got {type(tokenizer).__name__}")
    tokenizer.save_pretrained(str(path))


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def save_pretrained(model, path, tokenizer=None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    if tokenizer is not None and hasattr(tokenizer, "__len__") and len(tokenizer) > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {cfg.vocab_size}")
    sd = {k: v.to("cpu", torch.float32) if v.is_floating_point() else v.cpu()
          for k, v in to_hf_state_dict(model).items()}
    save_file(sd, str(path / WEIGHTS), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf_config_dict(cfg), indent=2) + "\n")
    _save_tokenizer(tokenizer, path)
    return path


def save_checkpoint(model, path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path / WEIGHTS), metadata={"format": "pt", "names": "twinlm"})
    model.config.save(path / TWINLM_CONFIG)
    return path


# --------------------------------------------------------------------------------------------------
# loading
def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files: list[Path]
    if (folder / WEIGHTS).is_file():
        files = [folder / WEIGHTS]
    elif (folder / WEIGHTS_INDEX).is_file():
        try:
            index = json.loads((folder / WEIGHTS_INDEX).read_text())
            files = [folder / f for f in sorted(set(index["weight_map"].values()))]
        except (ValueError, KeyError) as e:
            raise ModelLoadError(f"{folder / WEIGHTS_INDEX}: not a valid safetensors index ({e})") from None
    else:
        others = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        hint = f" (found {', '.join(others)}: convert them to safetensors)" if others else ""
        raise ModelLoadError(f"{folder}: no weights file {WEIGHTS}{hint}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise ModelLoadError(f"{f}: weights file missing (listed in {WEIGHTS_INDEX})")
        try:
            sd.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise ModelLoadError(f"{f}: cannot read the weights file (corrupt or truncated?): {e}") from None
    return sd


def _check_shapes(model, sd: dict[str, torch.Tensor], where: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise ModelLoadError(f"{where}: missing weights {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    unexpected = sorted(set(sd) - set(expected))
    if unexpected:
        raise ModelLoadError(f"{where}: unexpected weights {', '.join(unexpected[:5])}"
                             f"{' ...' if len(unexpected) > 5 else ''} (does the config contradict the weights?)")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ModelLoadError(f"{where}: weight {k} has shape {tuple(v.shape)} but the config implies "
                                 f"{tuple(expected[k].shape)} (the config contradicts the weights)")
        if not v.is_floating_point():
            raise ModelLoadError(f"{where}: weight {k} has dtype {v.dtype}, expected a floating-point tensor")


def read_config(path) -> ModelConfig:
    """The ModelConfig of a twinlm checkpoint folder or an HF ModernBERT(-decoder) folder."""
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: no such model folder")
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: expected a model folder (config.json or model_config.json + {WEIGHTS})")
    if (folder / TWINLM_CONFIG).is_file():
        try:
            return ModelConfig.load(folder / TWINLM_CONFIG)
        except (ValueError, TypeError) as e:
            raise ModelLoadError(f"{folder / TWINLM_CONFIG}: invalid twinlm model config: {e}") from None
    if (folder / "config.json").is_file():
        try:
            d = json.loads((folder / "config.json").read_text())
        except ValueError as e:
            raise ModelLoadError(f"{folder / 'config.json'}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ModelLoadError(f"{folder / 'config.json'}: expected a JSON object")
        return config_from_hf(d, folder)
    raise ModelLoadError(f"{folder}: neither config.json (Hugging Face) nor {TWINLM_CONFIG} (twinlm checkpoint) found")


def load(path, *, device=None, dtype=None):
    """Load a Transformer from an HF ModernBERT / ModernBERT-decoder folder or a twinlm checkpoint folder."""
    from twinlm.model import Transformer

    folder = Path(path)
    cfg = read_config(folder)
    raw = _read_weights(folder)
    if (folder / TWINLM_CONFIG).is_file():
        sd = raw
    else:
        sd = from_hf_state_dict(raw, cfg, where=str(folder))
    with torch.device("meta"):
        model = Transformer(cfg)
    _check_shapes(model, sd, str(folder))
    model = model.to_empty(device="cpu")
    model.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()}, strict=True)
    model.set_rope_theta()  # non-persistent RoPE buffers were left empty by to_empty
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model.eval()


__all__ = ["save_pretrained", "save_checkpoint", "load", "read_config", "hf_config_dict", "config_from_hf",
           "to_hf_state_dict", "from_hf_state_dict", "copy_tokenizer_files", "ModelLoadError"]
