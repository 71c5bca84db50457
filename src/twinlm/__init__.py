"""twinlm: paired encoder-only and decoder-only language models trained with one recipe (the Ettin suite)."""

from twinlm.config import ModelConfig

__version__ = "0.1.0"
__all__ = ["ModelConfig", "Transformer", "load", "__version__"]


def __getattr__(name: str):
    # torch-heavy names load on first use so that `twinlm --help` and config work stay fast.
    if name == "Transformer":
        from twinlm.model import Transformer
        return Transformer
    if name == "load":
        from twinlm.loading import load
        return load
    raise AttributeError(f"module 'twinlm' has no attribute {name!r}")
