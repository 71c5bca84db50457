"""`twinlm` subcommands of the data area."""

from __future__ import annotations


def register(commands) -> None:
    pass
