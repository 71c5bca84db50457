"""`twinlm` subcommands of the suite area."""

from __future__ import annotations


def register(commands) -> None:
    pass
