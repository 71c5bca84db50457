"""Where evaluation runs: the device a track's model and tensors live on, and the precision it computes in.

`resolve_device(name)` turns a `--device` value into a `torch.device`: `None` or `"auto"` is the accelerator
when there is one (under torchrun, this rank's GPU, `cuda:$LOCAL_RANK`), else the CPU; `"cuda"` alone is also
this rank's GPU; anything else is what torch makes of it (`cpu`, `cuda:1`, `mps`). Asking for a device the
machine lacks is a ConfigError naming what it has.

`autocast(device)` is the precision of scoring on that device: bf16 autocast on accelerators (what the model
was trained in; weights stay fp32), nothing on the CPU, so CPU results stay bit-identical to fp32 scoring.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from twinlm.errors import ConfigError

AUTO = "auto"


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """The device for `name` (None / "auto": this rank's accelerator if there is one, else the CPU)."""
    if isinstance(name, torch.device):
        return name
    if name is None or name == AUTO:
        if torch.cuda.is_available():
            return torch.device("cuda", _local_rank() % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: this machine has no CUDA GPU visible to torch; use --device cpu "
                              "(or auto)")
        if device.index is None:
            device = torch.device("cuda", _local_rank() % torch.cuda.device_count())
        elif device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) are visible "
                              f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    return device


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_accelerator(device: torch.device) -> bool:
    return device.type != "cpu"


@contextlib.contextmanager
def autocast(device: torch.device) -> Iterator[None]:
    """bf16 autocast on an accelerator; on the CPU nothing (fp32, bit-identical to plain scoring)."""
    if is_accelerator(device):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def model_device(model) -> torch.device:
    """The device a model's parameters live on (the CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


__all__ = ["AUTO", "resolve_device", "autocast", "is_accelerator", "model_device"]
