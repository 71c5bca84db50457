"""Any transformers model in the eval tracks: a masked-LM, causal-LM or headless encoder folder (BERT, RoBERTa,
Llama, GPT-2 style, ModernBERT classifiers …) wrapped so that the tracks call it exactly as they call a twinlm
`Transformer`, and so score it the same way.

- `is_twinlm_folder(path)`: folders `twinlm.load` reads as a language model (twinlm checkpoints, and
  ModernBERT(-decoder) masked/causal-LM folders); every other folder with a `config.json` goes through
  `load_hf_model`. A folder that would go that way is first checked against its `MANIFEST.sha256` when it has
  one (an edited `architectures` or `model_type` is named as a changed config.json, not scored by
  transformers), and one whose weights twinlm wrote (the kind recorded in `model.safetensors`) is refused:
  its config.json no longer describes it.
- `load_hf_model(path)`: the class is chosen from `architectures` (`…ForCausalLM` / `…LMHeadModel`: a decoder;
  `…ForMaskedLM`: an encoder with its LM head; anything else: the headless `AutoModel`, an encoder for the
  embedding tracks). fp32, eval mode. A model some of whose base-model weights (those under its
  `base_model_prefix`) the folder does not hold is refused, naming them: transformers would initialise them at
  random (another architecture's weights under this config). A folder that holds the base model but not the
  head its `architectures` names (sentence-transformers folders such as all-mpnet-base-v2 say
  `MPNetForMaskedLM` over headless weights) is loaded as the headless `AutoModel`: the embedding tracks score
  it, and a track that needs token predictions says it has no language-model head. A headless model's pooler,
  which a masked LM's weights lack and `HFModel` never reads, may be missing.
- `HFModel`: packed input (`cu_seqlens`) is unpacked into a right-padded batch with an attention mask (causal
  models see no padding before their tokens), run with `output_hidden_states`, and the real positions packed
  back; `.hidden_states` is the model's last hidden state, `.logits` its LM head's output (only the
  `prediction_positions` rows when given). `config` is an `HFConfig` with the fields the tracks read.
- Special tokens are the model's own: `[CLS]`-role = the tokenizer's cls token, else its BOS; `[SEP]`-role =
  sep, else EOS; pad = pad, else EOS; mask = the mask token (masked LMs). A decoder without a BOS token or an
  encoder without cls/sep cannot be scored as twinlm scores and is refused with one line.
- Not supported for these models: `probe_layer: best` (the depth search hooks twinlm's layers).
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import torch
from torch import nn

from twinlm.errors import ConfigError, ModelLoadError
from twinlm.export import KIND_KEY, WEIGHTS, verify_manifest, weights_metadata

TWINLM_ARCHS = ("ModernBertForMaskedLM", "ModernBertDecoderForCausalLM")
TWINLM_TYPES = ("modernbert", "modernbert-decoder")


@dataclass(frozen=True)
class HFConfig:
    """The ModelConfig fields the tracks read, for a transformers model."""

    causal: bool
    vocab_size: int
    hidden_size: int
    num_layers: int
    max_position_embeddings: int
    cls_token_id: int
    sep_token_id: int
    pad_token_id: int
    mask_token_id: int | None
    unk_token_id: int | None
    model_type: str
    hf_class: str  # the class scored (the one `architectures` names, or AutoModel's when its head is missing)
    headless: str = ""  # why a model whose config names a head was loaded without it (load_hf_model)


def is_twinlm_folder(path) -> bool:
    """True for a folder `twinlm.load` reads as a language model; False for other transformers folders, after
    their manifest (if any) is checked and weights written by twinlm are refused (module docstring)."""
    p = Path(path)
    if (p / "model_config.json").is_file() or not (p / "config.json").is_file():
        return True  # twinlm's own checkpoint, or not a transformers folder at all (twinlm.load names the problem)
    try:
        d = json.loads((p / "config.json").read_text())
    except (OSError, ValueError, RecursionError):
        return True
    archs = (d.get("architectures") or []) if isinstance(d, dict) else []
    if isinstance(d, dict) and d.get("model_type") in TWINLM_TYPES and (not archs or archs[0] in TWINLM_ARCHS):
        return True  # twinlm.load checks the manifest
    verify_manifest(p)  # before config.json's word is taken: a changed byte is named, not routed
    kind = weights_metadata(p).get(KIND_KEY)
    if kind is not None:
        raise ModelLoadError(f"{p}: {WEIGHTS} holds a twinlm {kind}'s weights but config.json describes "
                             f"{(archs or [d.get('model_type') if isinstance(d, dict) else '?'])[0]}: the config was "
                             "replaced or edited; export the model again (`twinlm export`) or restore its config.json")
    return False


class HFModel(nn.Module):
    """A transformers model called like a twinlm Transformer (see the module docstring)."""

    def __init__(self, hf: nn.Module, config: HFConfig):
        super().__init__()
        self.hf = hf
        self.config = config

    def forward(self, input_ids, attention_mask=None, *, cu_seqlens=None, max_seqlen=None,
                prediction_positions=None, return_logits: bool = True, **_):
        flat = cu_seqlens is not None
        if flat:
            lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
            width = max(lens)
            ids = input_ids.new_full((len(lens), width), self.config.pad_token_id)
            mask = torch.zeros(len(lens), width, dtype=torch.long, device=input_ids.device)
            for i, (start, n) in enumerate(zip(cu_seqlens[:-1].tolist(), lens)):
                ids[i, :n] = input_ids[start:start + n]
                mask[i, :n] = 1
        else:
            ids = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
            mask = attention_mask if attention_mask is not None else torch.ones_like(ids)
        out = self.hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        logits = getattr(out, "logits", None) if return_logits else None
        if return_logits and logits is None:
            why = f" ({self.config.headless})" if self.config.headless else ""
            raise ConfigError(f"{self.config.hf_class} has no language-model head{why}: this track needs token "
                              f"predictions (use a …ForMaskedLM or …ForCausalLM folder that holds its head)")
        if flat:
            keep = mask.bool()
            hidden = hidden[keep]
            logits = logits[keep] if logits is not None else None
        if logits is not None and prediction_positions is not None:
            logits = logits.reshape(-1, logits.shape[-1])[prediction_positions]
        return SimpleNamespace(logits=logits, hidden_states=hidden)

    def eval(self):
        self.hf.eval()
        return super().eval()


def load_hf_model(path, tokenizer) -> HFModel:
    """The transformers model in folder `path` (see the module docstring), with `tokenizer`'s special ids."""
    import transformers

    p = Path(path)
    try:
        conf = transformers.AutoConfig.from_pretrained(str(p))
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{p}: transformers cannot read its config.json ({str(e).splitlines()[0]})") from None
    arch = (getattr(conf, "architectures", None) or [type(conf).__name__])[0]
    cls: type[transformers.AutoModelForCausalLM | transformers.AutoModelForMaskedLM | transformers.AutoModel]
    if arch.endswith(("ForCausalLM", "LMHeadModel")):
        cls, causal = transformers.AutoModelForCausalLM, True
    elif arch.endswith("ForMaskedLM"):
        cls, causal = transformers.AutoModelForMaskedLM, False
    else:
        cls, causal = transformers.AutoModel, bool(getattr(conf, "is_decoder", False))
    hf, missing = _from_pretrained(cls, p, arch)
    headless = ""
    if missing and cls is not transformers.AutoModel and not _base_weights(hf, missing):
        # only the head is missing (a sentence-transformers folder under its masked-LM config): the base model
        # is whole, and the embedding tracks never use the head
        headless = f"its config.json names {arch}, but the folder holds only the base model's weights"
        hf, missing = _from_pretrained(transformers.AutoModel, p, arch)
    if isinstance(hf, transformers.PreTrainedModel) and getattr(hf, "base_model", None) is hf:
        # a masked LM's base model has no pooler, so its weights lack one: HFModel reads the hidden states only
        missing = [n for n in missing if not n.startswith("pooler.")]
    if missing:  # transformers initialised them at random: scoring would measure noise
        raise ModelLoadError(f"{p}: the weights do not fit its config.json ({arch}): {len(missing)} weight(s) "
                             f"missing ({', '.join(missing[:3])}{', …' if len(missing) > 3 else ''}), which "
                             "transformers would initialise at random; use the folder's own config.json")
    cfg = _config(p, conf, tokenizer, causal, type(hf).__name__ if headless else arch, headless)
    return HFModel(hf.eval(), cfg).eval()


def _from_pretrained(cls: Any, p: Path, arch: str) -> tuple[Any, list[str]]:
    """(model, the names of the weights the folder does not hold) of `cls` loaded from folder `p`."""
    try:
        # with output_loading_info, from_pretrained returns (model, {"missing_keys": …, …})
        hf, info = cast(tuple[Any, dict], cls.from_pretrained(str(p), dtype=torch.float32, output_loading_info=True))
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{p}: transformers cannot load this {arch} folder ({str(e).splitlines()[0]})") from None
    except pickle.UnpicklingError as e:  # torch's weights-only reader refused a pickle: nothing in it ran
        raise ModelLoadError(f"{p}: its weights are a pickle that cannot be read safely ({str(e).splitlines()[0]}; "
                             "nothing in it was run): use a folder saved with save_pretrained (safetensors)") from None
    return hf, sorted(info.get("missing_keys") or [])


def _base_weights(hf: nn.Module, names: list[str]) -> list[str]:
    """Those of the weight `names` of model `hf` (a model with a head) that belong to its base model: under its
    `base_model_prefix`; all of them when the model has no separate base model."""
    prefix = getattr(hf, "base_model_prefix", "") or ""
    if not prefix or getattr(hf, "base_model", hf) is hf:
        return names
    return [n for n in names if n.startswith(prefix + ".")]


def _config(path: Path, conf: Any, tok, causal: bool, arch: str, headless: str = "") -> HFConfig:
    def tid(*names):
        return next((getattr(tok, n) for n in names if getattr(tok, n, None) is not None), None)

    cls, sep = tid("cls_token_id", "bos_token_id"), tid("sep_token_id", "eos_token_id")
    pad = tid("pad_token_id", "eos_token_id", "sep_token_id")
    if causal and cls is None:
        raise ModelLoadError(f"{path}: the tokenizer has no BOS (or CLS) token; twinlm scores decoders from a "
                             f"beginning-of-document token")
    if cls is None or sep is None:
        raise ModelLoadError(f"{path}: the tokenizer lacks a cls/bos or sep/eos token, which twinlm wraps text with")
    text_conf = conf.get_text_config() if hasattr(conf, "get_text_config") else conf
    return HFConfig(
        causal=causal, vocab_size=int(text_conf.vocab_size), hidden_size=int(text_conf.hidden_size),
        num_layers=int(getattr(text_conf, "num_hidden_layers", 0) or 0),
        max_position_embeddings=int(getattr(text_conf, "max_position_embeddings", 0) or 512),
        cls_token_id=int(cls), sep_token_id=int(sep), pad_token_id=int(pad if pad is not None else 0),
        mask_token_id=tid("mask_token_id"), unk_token_id=tid("unk_token_id"),
        model_type=str(getattr(conf, "model_type", "")), hf_class=arch, headless=headless)


__all__ = ["HFConfig", "HFModel", "is_twinlm_folder", "load_hf_model"]
