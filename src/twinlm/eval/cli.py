"""`twinlm` subcommands of the eval area."""

from __future__ import annotations


def register(commands) -> None:
    pass
