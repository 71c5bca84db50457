"""Cross-objective weight conversion: an encoder folder -> a decoder folder, or the reverse.

The two objectives share every weight; only the attention mask differs (config.causal). In Hugging Face
terms the conversion splits/fuses the attention input projection (encoder `Wqkv` <-> decoder `q_proj`,
`k_proj`, `v_proj`) and renames the prediction head (`head.*` <-> `lm_head.*`); twinlm.hf does both when the
folder of the other class is written. Tokenizer files are copied along.
"""

from __future__ import annotations

from pathlib import Path

from twinlm.errors import ConfigError
from twinlm.export import copy_tokenizer_files
from twinlm.loading import load
from twinlm.model import Transformer

TARGETS = ("encoder", "decoder")


def convert(src, to: str, out, *, global_rope_theta: float | None = None,
            local_rope_theta: float | None = None, overwrite: bool = False) -> Path:
    """Write `out`: the model in `src` (HF folder or twinlm checkpoint) as the `to` kind, in HF format."""
    if to not in TARGETS:
        raise ConfigError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise ConfigError(f"the output folder must differ from the source ({src})")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty (pass overwrite=True / --overwrite)")
    model = load(src)
    causal = to == "decoder"
    if model.config.causal == causal:
        raise ConfigError(f"{src} already holds an {to}; nothing to convert")
    changes = {"causal": causal}
    if global_rope_theta is not None:
        changes["global_rope_theta"] = float(global_rope_theta)
    if local_rope_theta is not None:
        changes["local_rope_theta"] = float(local_rope_theta)
    converted = Transformer(model.config.replace(**changes))
    converted.load_state_dict(model.state_dict())
    converted.save_pretrained(out)
    copy_tokenizer_files(src, out)
    return out


__all__ = ["convert", "TARGETS"]
