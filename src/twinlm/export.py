"""Writing model folders. Two kinds, both read back by `twinlm.load` (twinlm.loading):

- Hugging Face folder (`save_pretrained`, also `Transformer.save_pretrained`): `config.json`
  (twinlm.hf.hf_config_dict) and `model.safetensors` in transformers' names (twinlm.hf.to_hf_state_dict),
  fp32, plus the tokenizer's files when one is given (a transformers tokenizer or a folder to copy them from).
  `AutoModelForMaskedLM` (encoders) and `AutoModelForCausalLM` (decoders) load it with no custom code.
- twinlm checkpoint folder (`save_checkpoint`): `model.safetensors` in twinlm's own names, the state dict as
  it is, plus `model_config.json` (ModelConfig.to_dict).

Each file is written atomically (twinlm.io), into the folder as it is: other files there are kept. Only the
model's `config` and `state_dict()` are used, so this module needs no `Transformer` class.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from twinlm.errors import ConfigError, MissingArtifactError
from twinlm.hf import hf_config_dict, to_hf_state_dict
from twinlm.io import atomic_path, write_json

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # sharded weights (written by transformers, read by twinlm)
TWINLM_CONFIG = "model_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "chat_template.jinja")


def save_pretrained(model, path, tokenizer=None) -> Path:
    """Write `model` as a Hugging Face folder (see the module docstring); returns the folder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    if tokenizer is not None and hasattr(tokenizer, "__len__") and len(tokenizer) > cfg.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is "
                          f"{cfg.vocab_size}")
    sd = {k: v.to("cpu", torch.float32) if v.is_floating_point() else v.cpu()
          for k, v in to_hf_state_dict(model).items()}
    _save_weights(sd, path / WEIGHTS, {"format": "pt"})
    write_json(path / "config.json", hf_config_dict(cfg))
    _save_tokenizer(tokenizer, path)
    return path


def save_checkpoint(model, path) -> Path:
    """Write `model` as a twinlm checkpoint folder (twinlm names + model_config.json); returns the folder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _save_weights(sd, path / WEIGHTS, {"format": "pt", "names": "twinlm"})
    model.config.save(path / TWINLM_CONFIG)
    return path


def copy_tokenizer_files(src, dst) -> list[str]:
    """Copy the tokenizer files (TOKENIZER_FILES) that `src` has into `dst`; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            with atomic_path(Path(dst) / name) as tmp:
                shutil.copy2(Path(src) / name, tmp)
            copied.append(name)
    return copied


def _save_weights(sd: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata=metadata)


def _save_tokenizer(tokenizer, path: Path) -> None:
    if tokenizer is None:
        return
    if isinstance(tokenizer, (str, Path)):
        src = Path(tokenizer)
        copied = copy_tokenizer_files(src, path)
        if not copied:
            raise MissingArtifactError(f"no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}) in {src}: pass the "
                                       f"folder a tokenizer was saved to")
        return
    if not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(f"tokenizer must be a transformers tokenizer or a folder, got {type(tokenizer).__name__}")
    tokenizer.save_pretrained(str(path))


__all__ = ["save_pretrained", "save_checkpoint", "copy_tokenizer_files", "WEIGHTS", "TWINLM_CONFIG",
           "TOKENIZER_FILES"]
