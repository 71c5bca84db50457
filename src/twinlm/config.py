"""Model shape: one dataclass whose defaults are the reference model (Ettin 150M), sizes as presets.

Encoder and decoder share every field; `causal` is the only switch between them. A config that cannot be
built raises ConfigError listing every problem at once; an unknown preset raises UnknownName.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twinlm.errors import ConfigError, UnknownName
from twinlm.io import write_json

# The training objectives (train/objectives.py): what a recipe trains and what a model folder records.
OBJECTIVES = ("mlm", "clm", "mntp")

# Ettin / ModernBERT special tokens in the 50,368-token vocabulary (REFERENCE §1).
ETTIN_VOCAB_SIZE = 50368
ETTIN_SPECIAL_TOKENS = {"unk": 50280, "cls": 50281, "sep": 50282, "pad": 50283, "mask": 50284}


@dataclass
class ModelConfig:
    """Architecture of one Ettin-style transformer (REFERENCE §1). Defaults: Ettin 150M encoder."""

    vocab_size: int = ETTIN_VOCAB_SIZE
    hidden_size: int = 768
    intermediate_size: int = 1152  # half-width of the fused GeGLU input projection
    num_layers: int = 22
    num_heads: int = 12
    causal: bool = False  # False: bidirectional encoder (MLM); True: decoder (next token)
    global_attn_every_n_layers: int = 3  # layers 0, n, 2n, ... use full attention
    local_window: int = 128  # total sliding window: encoder ±window/2, decoder window/2 to the left
    global_rope_theta: float = 10_000.0  # 160,000 from the context-extension phase on
    local_rope_theta: float = 10_000.0
    max_position_embeddings: int = 8192
    norm_eps: float = 1e-5
    attention_dropout: float = 0.1  # on the attention output, training only
    init_std: float = 0.02
    init_cutoff_factor: float = 2.0  # truncated normal at ±cutoff·σ
    unk_token_id: int = ETTIN_SPECIAL_TOKENS["unk"]
    cls_token_id: int = ETTIN_SPECIAL_TOKENS["cls"]  # doubles as BOS
    sep_token_id: int = ETTIN_SPECIAL_TOKENS["sep"]  # doubles as EOS
    pad_token_id: int = ETTIN_SPECIAL_TOKENS["pad"]
    mask_token_id: int = ETTIN_SPECIAL_TOKENS["mask"]

    def __post_init__(self) -> None:
        problems = []
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.local_window % 2:
            problems.append(f"local_window must be even (±window/2), got {self.local_window}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "global_attn_every_n_layers", "local_window"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("unk_token_id", "cls_token_id", "sep_token_id", "pad_token_id", "mask_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                problems.append(f"{name}={getattr(self, name)} is outside the vocabulary (size {self.vocab_size})")
        if problems:
            raise ConfigError("invalid ModelConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def layer_types(self) -> list[str]:
        """Per layer: "full_attention" (global) or "sliding_attention" (local), as transformers names them."""
        return ["full_attention" if i % self.global_attn_every_n_layers == 0 else "sliding_attention"
                for i in range(self.num_layers)]

    def is_global(self, layer: int) -> bool:
        return layer % self.global_attn_every_n_layers == 0

    # --- presets ---------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise UnknownName(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def preset_names(cls) -> list[str]:
        return list(PRESETS)

    # --- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown ModelConfig fields: {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _shape(layers: int, hidden: int, intermediate: int, heads: int, **extra: Any) -> dict[str, Any]:
    return dict(num_layers=layers, hidden_size=hidden, intermediate_size=intermediate, num_heads=heads, **extra)


# Exact paper shapes (REFERENCE §1), then small shapes for CPUs and tests. CPU presets keep head_dim 64
# and the Ettin layer pattern but use a small vocabulary: at this size the 50k head is most of the work.
_CPU_SPECIALS = dict(vocab_size=8192, unk_token_id=0, cls_token_id=1, sep_token_id=2, pad_token_id=3,
                     mask_token_id=4)
PRESETS: dict[str, dict[str, Any]] = {
    "ettin-17m": _shape(7, 256, 384, 4),
    "ettin-32m": _shape(10, 384, 576, 6),
    "ettin-68m": _shape(19, 512, 768, 8),
    "ettin-150m": _shape(22, 768, 1152, 12),
    "ettin-400m": _shape(28, 1024, 2624, 16),
    "ettin-1b": _shape(28, 1792, 3840, 28),
    # 17M body with an 8K vocabulary: the CPU suite's default shape.
    "cpu-small": _shape(7, 256, 384, 4, **_CPU_SPECIALS),
    # 4 layers so that layer 3 is global and layers 1–2 local; for --quick runs and tests.
    "cpu-tiny": _shape(4, 128, 192, 2, **{**_CPU_SPECIALS, "vocab_size": 4096}),
}
