"""Model commands: `twinlm info` and `twinlm convert`."""

from __future__ import annotations


def register(commands) -> None:
    pass
