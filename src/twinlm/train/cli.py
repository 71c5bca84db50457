"""`twinlm` subcommands of the train area."""

from __future__ import annotations


def register(commands) -> None:
    pass
