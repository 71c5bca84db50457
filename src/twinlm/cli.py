"""`twinlm` command line. Each area registers its own subcommands; handlers import their heavy modules lazily.

Exit status: 0 done; 2 a user error (bad arguments, or any `TwinlmError`: one line, `twinlm: error: …`, that
says what to do; `--debug` shows the traceback too); 3 training diverged; 130 interrupted by Ctrl-C; anything
else is a bug and prints its traceback.
"""

from __future__ import annotations

import argparse
import sys

from twinlm import __version__
from twinlm.errors import TrainingDiverged, TwinlmError


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
    parser.add_argument("--debug", action="store_true", help="show the full traceback of user errors too")
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
    except TwinlmError as e:
        if args.debug:
            raise
        print(f"twinlm: error: {one_line(e)}", file=sys.stderr)
        return 3 if isinstance(e, TrainingDiverged) else 2


def one_line(error: BaseException) -> str:
    """The error's message on one line (multi-line messages are joined with '; ')."""
    text = str(error).strip() or type(error).__name__
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())
