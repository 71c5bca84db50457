"""`twinlm` command line. Each area registers its own subcommands; handlers import their heavy modules lazily."""

from __future__ import annotations

import argparse
import sys

from twinlm import __version__


def build_parser() -> argparse.ArgumentParser:
    from twinlm.data.cli import register as register_data
    from twinlm.eval.cli import register as register_eval
    from twinlm.model_cli import register as register_model
    from twinlm.suite.cli import register as register_suite
    from twinlm.train.cli import register as register_train

    parser = argparse.ArgumentParser(
        prog="twinlm",
        description="Train paired encoder and decoder language models with one recipe, convert them into "
                    "each other, and evaluate them side by side (the Ettin suite).",
    )
    parser.add_argument("--version", action="version", version=f"twinlm {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in (register_suite, register_data, register_train, register_model, register_eval):
        register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
