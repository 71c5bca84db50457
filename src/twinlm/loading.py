"""Reading model folders: `load(path)` (also `twinlm.load`) -> a `Transformer`, and `read_config(path)`.

Reads both kinds twinlm.export writes, and folders transformers itself wrote (ModernBertForMaskedLM,
ModernBertDecoderForCausalLM or a base ModernBertModel with a head; one `model.safetensors` or a sharded
`model.safetensors.index.json`):

- a folder with `model_config.json` is a twinlm checkpoint: weights in twinlm names, loaded as they are;
- otherwise `config.json` is translated by twinlm.hf.config_from_hf and the weights by from_hf_state_dict.

The weights are checked against the config before they are loaded (names, shapes, floating-point dtype).
A folder that is not there raises MissingArtifactError; one that cannot be used raises ModelLoadError naming
the file and what contradicts what. The model is returned in eval mode, fp32 on the CPU unless `device` /
`dtype` say otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from twinlm.config import ModelConfig
from twinlm.errors import MissingArtifactError, ModelLoadError
from twinlm.export import TWINLM_CONFIG, WEIGHTS, WEIGHTS_INDEX
from twinlm.hf import config_from_hf, from_hf_state_dict
from twinlm.hub import resolve_model
from twinlm.model import Transformer


def load(path, *, revision=None, device=None, dtype=None):
    """Load a Transformer from an HF ModernBERT / ModernBERT-decoder folder or a twinlm checkpoint folder
    (or a hub id `org/name[@revision]`, fetched by twinlm.hub)."""
    folder = resolve_model(path, revision)
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


def read_config(path) -> ModelConfig:
    """The ModelConfig of a twinlm checkpoint folder or an HF ModernBERT(-decoder) folder."""
    folder = Path(path)
    if not folder.exists():
        raise MissingArtifactError(f"{folder}: no such model folder")
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


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
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


__all__ = ["load", "read_config"]
