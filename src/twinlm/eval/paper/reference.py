"""The paper's published numbers, and which of its rows a model is compared with.

`PAPER` holds the headline results of the Ettin paper (arXiv 2507.11412) as REFERENCE.md §3 lists them: per size
and kind (encoder, decoder), the GLUE average (encoders only), MNLI, MS MARCO dev nDCG@10 and the generative
average, in percent. Values read off the paper's figures rather than its tables are marked approximate
(`Published.approx`); a value the paper does not give is absent.

`model_shape(model)` reads a model's kind and size from its `config.json` alone (no weights are loaded, so the
dry run is instant): encoder or decoder from `model_type` / `architectures` / `is_decoder`, layers and width from
the usual fields, and the parameter count from the safetensors headers when the folder has them (else a formula
from the shape). `paper_row(shape)` is the paper's row for the same size and kind: the exact Ettin shape when the
layers and width match one, else the Ettin size nearest in non-embedding parameters, labelled as a stand-in.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from twinlm.errors import ConfigError, ModelLoadError

# (layers, hidden) of each Ettin size (REFERENCE §1): how a model is matched to its paper row
ETTIN_SHAPES: dict[str, tuple[int, int]] = {
    "17M": (7, 256), "32M": (10, 384), "68M": (19, 512), "150M": (22, 768), "400M": (28, 1024), "1B": (28, 1792),
}
ETTIN_INTERMEDIATE = {"17M": 384, "32M": 576, "68M": 768, "150M": 1152, "400M": 2624, "1B": 3840}
COLUMNS = ("glue", "mnli", "msmarco", "generative")  # the paper's headline columns REFERENCE §3 gives


@dataclass(frozen=True)
class Published:
    value: float  # percent
    approx: bool = False  # read off a figure ("≈" in REFERENCE §3)


def _p(v: float | None, approx: bool = False) -> Published | None:
    return None if v is None else Published(v, approx)


def _row(glue, mnli, mnli_approx, msmarco, generative, generative_approx) -> dict[str, Published | None]:
    return {"glue": _p(glue), "mnli": _p(mnli, mnli_approx), "msmarco": _p(msmarco, True),
            "generative": _p(generative, generative_approx)}


# REFERENCE §3 "Headline results to compare against (paper)"; the decoders have no GLUE average there
PAPER: dict[str, dict[str, dict[str, Published | None]]] = {
    "17M": {"encoder": _row(79.2, 79.5, False, 31.0, 35.1, True), "decoder": _row(None, 77.6, True, 29.1, 36.4, False)},
    "32M": {"encoder": _row(83.5, 83.4, False, 35.1, 36.6, True), "decoder": _row(None, 80.4, True, 33.0, 38.7, False)},
    "68M": {"encoder": _row(87.2, 87.0, False, 38.2, 39.1, True), "decoder": _row(None, 83.9, True, 36.1, 41.8, False)},
    "150M": {"encoder": _row(88.9, 89.2, False, 40.0, 42.9, True),
             "decoder": _row(None, 85.6, True, 37.7, 46.2, False)},
    "400M": {"encoder": _row(90.8, 91.3, False, 42.2, 48.2, True),
             "decoder": _row(None, 88.2, False, 39.9, 53.1, False)},
    "1B": {"encoder": _row(91.6, 91.8, False, 43.4, 50.7, True), "decoder": _row(None, 89.9, True, 41.7, 59.0, False)},
}


@dataclass(frozen=True)
class ModelShape:
    kind: str  # encoder | decoder
    model_type: str
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    params: int  # every parameter
    non_embedding: int  # without the token embeddings (the work per token)
    counted: str  # "safetensors" (exact) or "formula" (from the shape)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _config(model: str | Path) -> dict[str, Any]:
    folder = Path(model)
    if folder.is_dir():
        path = folder / "config.json"
        if not path.is_file():
            raise ModelLoadError(f"{folder} has no config.json: give a transformers model folder (or a hub id)")
        return json.loads(path.read_text())
    if folder.exists():
        raise ModelLoadError(f"{folder} is a file: give a transformers model folder (or a hub id)")
    text = str(model)
    if os.path.isabs(text) or text.startswith(("./", "../", "~")) or text.count("/") != 1:  # not org/name
        raise ModelLoadError(f"{model}: no such model folder (a hub id is org/name)")
    from transformers import AutoConfig  # a hub id: its config.json alone (from the hub cache when offline)

    try:
        return AutoConfig.from_pretrained(str(model)).to_dict()
    except OSError as e:
        raise ModelLoadError(f"cannot read the config of {model}: {str(e).splitlines()[0]} (a hub id needs internet "
                             "or a warm hub cache; a folder must exist)") from None


def _kind(cfg: dict[str, Any]) -> str:
    archs = " ".join(cfg.get("architectures") or [])
    if cfg.get("model_type") == "modernbert-decoder" or "CausalLM" in archs or cfg.get("is_decoder"):
        return "decoder"
    return "encoder"


def _safetensors_params(folder: Path) -> tuple[int, int] | None:
    """(all parameters, token-embedding parameters) from the safetensors headers of `folder`, or None."""
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    total = embed = 0
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            count = math.prod(info["shape"])
            total += count
            if name.endswith(("tok_embeddings.weight", "word_embeddings.weight", "embed_tokens.weight")):
                embed += count
    return total, embed


def model_shape(model: str | Path) -> ModelShape:
    """The kind and size of `model` (a folder or a hub id) from its config and weight headers."""
    cfg = _config(model)
    try:
        layers, hidden = int(cfg["num_hidden_layers"]), int(cfg["hidden_size"])
    except KeyError as e:
        raise ModelLoadError(f"{model}: config.json has no {e.args[0]}; twinlm reads the size of transformers "
                             "encoder and decoder configs (num_hidden_layers, hidden_size)") from None
    inter = int(cfg.get("intermediate_size") or 4 * hidden)
    vocab = int(cfg.get("vocab_size") or 0)
    counted = _safetensors_params(Path(model))
    if counted is not None:
        params, embed = counted
        how = "safetensors"
    else:  # attention 4d², MLP (ModernBERT's GLU 3·d·I, BERT's 2·d·I); embeddings V·d
        mlp = 3 * hidden * inter if str(cfg.get("model_type", "")).startswith("modernbert") else 2 * hidden * inter
        embed = vocab * hidden
        params, how = layers * (4 * hidden * hidden + mlp) + embed, "formula"
    return ModelShape(_kind(cfg), str(cfg.get("model_type", "")), layers, hidden, inter, vocab, params,
                      params - embed, how)


def _ettin_non_embedding(size: str) -> int:
    layers, d = ETTIN_SHAPES[size]
    return layers * (4 * d * d + 3 * d * ETTIN_INTERMEDIATE[size])


def paper_size(shape: ModelShape, size: str | None = None) -> tuple[str, bool]:
    """(the Ettin size whose row `shape` is compared with, whether the shape is that size's own). `size` names it
    outright (17M … 1B)."""
    if size is not None:
        key = size.upper()
        if key not in PAPER:
            raise ConfigError(f"size {size!r}: the paper reports {', '.join(PAPER)}")
        return key, ETTIN_SHAPES[key] == (shape.layers, shape.hidden)
    for key, dims in ETTIN_SHAPES.items():
        if dims == (shape.layers, shape.hidden):
            return key, True
    nearest = min(PAPER, key=lambda k: abs(math.log(max(shape.non_embedding, 1) / _ettin_non_embedding(k))))
    return nearest, False


def paper_row(shape: ModelShape, size: str | None = None) -> dict[str, Any]:
    """The paper's published numbers for the size and kind of `shape`: {size, kind, same_shape, note, values:
    {column: {value, approx} or None}}."""
    key, same = paper_size(shape, size)
    note = (f"Ettin-{key} {shape.kind}" if same else
            f"Ettin-{key} {shape.kind}, the paper's size nearest this model's {shape.non_embedding / 1e6:.1f}M "
            f"non-embedding parameters ({shape.layers} layers x {shape.hidden}); not the same shape")
    values = {c: (None if (p := PAPER[key][shape.kind][c]) is None else {"value": p.value, "approx": p.approx})
              for c in COLUMNS}
    return {"size": key, "kind": shape.kind, "same_shape": same, "note": note, "values": values}


__all__ = ["PAPER", "Published", "ModelShape", "model_shape", "paper_row", "paper_size", "ETTIN_SHAPES", "COLUMNS"]
