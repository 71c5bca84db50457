"""Reading model folders: `load(path)` (also `twinlm.load`) -> a `Transformer`, and `read_config(path)`.

Reads both kinds twinlm.export writes, and folders transformers itself wrote (ModernBertForMaskedLM,
ModernBertDecoderForCausalLM or a base ModernBertModel with a head; one `model.safetensors`, a sharded
`model.safetensors.index.json`, or the older `pytorch_model.bin` / `pytorch_model.bin.index.json`, read
with `torch.load(weights_only=True)`, so a pickle that is anything but tensors is refused):

- a folder with `model_config.json` is a twinlm checkpoint: weights in twinlm names, loaded as they are;
- otherwise `config.json` is translated by twinlm.hf.config_from_hf and the weights by from_hf_state_dict.

A folder with a `MANIFEST.sha256` (every folder twinlm exports, every training checkpoint) is checked against it
first: a missing or changed file is named, with what to do. The weights are checked against the config before
they are loaded (names, shapes, floating-point dtype); a folder of another architecture (a sequence classifier,
a base model without a head, a BERT or Llama folder) is named as such.
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
from twinlm.export import (
    KIND_KEY,
    TWINLM_CONFIG,
    WEIGHTS,
    WEIGHTS_INDEX,
    kind_of,
    verify_manifest,
    weights_metadata,
)
from twinlm.hf import SPECIAL_TOKEN_NAMES, config_from_hf, from_hf_state_dict
from twinlm.hub import resolve_model
from twinlm.memory import parameter_count
from twinlm.model import Transformer


def load(path, *, revision=None, device=None, dtype=None, check_manifest: bool = True):
    """Load a Transformer from an HF ModernBERT / ModernBERT-decoder folder or a twinlm checkpoint folder
    (or a hub id `org/name[@revision]`, fetched by twinlm.hub). `check_manifest=False` skips the
    MANIFEST.sha256 check: for `twinlm reseal` (twinlm.reseal), which checks a folder before sealing it; a user
    who edited a folder reseals it instead."""
    folder = resolve_model(path, revision)
    if folder.is_dir() and check_manifest:
        verify_manifest(folder)  # first: a damaged file is named as such, not by what it now says
    cfg = read_config(folder)
    _check_kind(folder, cfg)
    raw = _read_weights(folder)
    check_size(folder, cfg, sum(v.numel() for v in raw.values()))  # before building: a config can ask for 10^7 layers
    if (folder / TWINLM_CONFIG).is_file():
        sd = raw
    else:
        _check_architecture(folder, raw)
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
        except RecursionError:  # hostile nesting: json recurses once per level
            raise ModelLoadError(f"{folder / 'config.json'}: JSON nested too deeply to read (damaged or hostile): "
                                 "restore the model's config.json") from None
        if not isinstance(d, dict):
            raise ModelLoadError(f"{folder / 'config.json'}: expected a JSON object")
        return config_from_hf(d, tokenizer_ids=_tokenizer_special_ids(folder), where=str(folder))
    raise ModelLoadError(f"{folder}: neither config.json (Hugging Face) nor {TWINLM_CONFIG} (twinlm checkpoint) found")


# the most layers a config may ask for when there are no weights to compare it with (the largest published
# transformers have about 100; building a model, even on the meta device, costs memory per layer)
MAX_LAYERS = 1024


def check_size(folder: Path, cfg: ModelConfig, held: int | None = None) -> None:
    """Refuse, before a model is built, a config that does not describe the folder's weights by its size (a
    damaged or hostile config.json asking for 10^7 layers would otherwise grow the process by gigabytes first):
    the parameter count the config implies (twinlm.memory.parameter_count) must be at most twice `held`, the
    number of elements in the weights, or, when `held` is None, the bytes of the folder's weights files (a
    parameter takes at least one byte); a folder without weights may ask for at most MAX_LAYERS layers.
    ModelLoadError names the config file."""
    name = folder / (TWINLM_CONFIG if (folder / TWINLM_CONFIG).is_file() else "config.json")
    wanted = parameter_count(cfg)
    if held is not None:
        if wanted <= 2 * held:
            return
        what = f"the weights hold {held:,}"
    else:
        files = [p for p in folder.iterdir() if p.is_file() and p.name.endswith((".safetensors", ".bin"))]
        size = sum(p.stat().st_size for p in files)
        if not files and cfg.num_layers > MAX_LAYERS:
            raise ModelLoadError(f"{name}: asks for {cfg.num_layers:,} layers (more than {MAX_LAYERS}; damaged or "
                                 "edited?): restore the model's config")
        if not files or wanted <= size:
            return
        what = f"the weights files hold {size:,} bytes"
    raise ModelLoadError(f"{name}: describes a model of {wanted:,} parameters ({cfg.num_layers:,} layers, hidden "
                         f"{cfg.hidden_size:,}) but {what}: the config does not belong to these weights (damaged or "
                         "edited?); restore the model's config")


def _tokenizer_special_ids(folder: Path) -> dict[str, int]:
    """Ids of the special tokens (SPECIAL_TOKEN_NAMES) that the folder's tokenizer.json defines ({} without one or
    when it cannot be read: the config's ids or Ettin's then apply)."""
    try:
        data = json.loads((folder / "tokenizer.json").read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(data, dict):
        return {}
    found = {t.get("content"): int(t["id"]) for t in data.get("added_tokens") or [] if isinstance(t, dict)}
    vocab = (data.get("model") or {}).get("vocab")
    out = {}
    for token in SPECIAL_TOKEN_NAMES.values():
        if token in found:
            out[token] = found[token]
        elif isinstance(vocab, dict) and token in vocab:
            out[token] = int(vocab[token])
    return out


BIN_WEIGHTS, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"  # transformers' older format


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    files: list[Path]
    if (folder / WEIGHTS).is_file():
        files = [folder / WEIGHTS]
    elif (folder / WEIGHTS_INDEX).is_file() or (folder / BIN_INDEX).is_file():
        index_file = folder / (WEIGHTS_INDEX if (folder / WEIGHTS_INDEX).is_file() else BIN_INDEX)
        try:
            index = json.loads(index_file.read_text())
            files = [folder / f for f in sorted(set(index["weight_map"].values()))]
        except (ValueError, KeyError, AttributeError) as e:
            raise ModelLoadError(f"{index_file}: not a valid weights index ({e})") from None
    elif (folder / BIN_WEIGHTS).is_file():
        files = [folder / BIN_WEIGHTS]
    else:
        others = [p.name for p in folder.glob("*.pt")] + [p.name for p in folder.glob("*.ckpt")]
        hint = f" (found {', '.join(others)}: save it with save_pretrained)" if others else ""
        raise ModelLoadError(f"{folder}: no weights file ({WEIGHTS}, {WEIGHTS_INDEX}, {BIN_WEIGHTS}){hint}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise ModelLoadError(f"{f}: weights file missing (listed in the folder's weights index)")
        sd.update(_read_bin(f) if f.suffix == ".bin" else _read_safetensors(f))
    return sd


def _read_safetensors(f: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(f))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ModelLoadError(f"{f}: cannot read the weights file (corrupt or truncated?): {e}") from None


def _read_bin(f: Path) -> dict[str, torch.Tensor]:
    """A PyTorch pickle of a plain state dict, read without running code (weights_only=True)."""
    try:
        sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # an UnpicklingError for anything but tensors and plain containers, or a bad file
        raise ModelLoadError(f"{f}: not a plain PyTorch state dict that can be read safely (weights only): "
                             f"{str(e).splitlines()[0]}; re-save it with transformers' save_pretrained") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise ModelLoadError(f"{f}: expected a state dict (names -> tensors), got {type(sd).__name__}; "
                             f"re-save it with transformers' save_pretrained")
    return sd


def _check_kind(folder: Path, cfg: ModelConfig) -> None:
    """Refuse a folder whose config describes the other kind than its weights were saved from (twinlm writes the
    kind into the weights file; encoders and decoders share every name and shape, so nothing else tells)."""
    saved = weights_metadata(folder).get(KIND_KEY)  # an unreadable file is named when the weights are read
    if saved is not None and saved != kind_of(cfg):
        def a(kind: str) -> str:
            return ("an " if kind == "encoder" else "a ") + kind

        raise ModelLoadError(f"{folder}: {WEIGHTS} was saved from {a(saved)} but the folder's config describes "
                             f"{a(kind_of(cfg))}: the folder mixes two models; export the model again, or use "
                             f"`twinlm convert {folder} --to {kind_of(cfg)}` on the {saved}'s own folder")


def _check_architecture(folder: Path, sd: dict[str, torch.Tensor]) -> None:
    """Name the class of an HF folder that has no language-model head (what a user saved it from)."""
    has_head = any(k.startswith(("head.", "lm_head.")) for k in sd)
    if has_head and not any(k.startswith("classifier.") for k in sd):
        return
    try:
        archs = json.loads((folder / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        archs = []
    what = archs[0] if archs else ("a sequence/token classifier" if any(k.startswith("classifier.") for k in sd)
                                   else "a base model without a head")
    raise ModelLoadError(f"{folder}: this is a {what} folder; twinlm loads language models "
                         f"(ModernBertForMaskedLM, ModernBertDecoderForCausalLM): save the masked-LM or causal-LM "
                         f"model, or evaluate this one with `twinlm eval` as any transformers model")


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
