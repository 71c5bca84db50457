"""`twinlm` command line: the root parser and `main`. One module per command group registers its subcommands
(data.py, train.py, model.py, eval.py, lmeval.py, suite.py); handlers import their heavy modules lazily, so
`twinlm --help` imports no torch. This package sits above every area: it may import any of them, and none
imports it.

Exit status: 0 done; 2 a user error (bad arguments, or any `TwinlmError`: one line, `twinlm: error: …`, that
says what to do; `--debug` shows the traceback too); 3 training diverged; 130 interrupted by Ctrl-C; anything
else is a bug and prints its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from twinlm import __version__
from twinlm.errors import TrainingDiverged, TwinlmError, one_line


def build_parser() -> argparse.ArgumentParser:
    from twinlm.cli.data import register as register_data
    from twinlm.cli.eval import register as register_eval
    from twinlm.cli.lmeval import register as register_lm_eval
    from twinlm.cli.model import register as register_model
    from twinlm.cli.suite import register as register_suite
    from twinlm.cli.train import register as register_train

    parser = argparse.ArgumentParser(
        prog="twinlm",
        description="Train paired encoder and decoder language models with one recipe, convert them into "
                    "each other, and evaluate them side by side (the Ettin suite).",
    )
    parser.add_argument("--version", action="version", version=f"twinlm {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of user errors too")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in (register_suite, register_data, register_train, register_model, register_eval, register_lm_eval):
        register(commands)
    return parser


class _Warnings(logging.Handler):
    """Prints what twinlm's modules log at WARNING and above as `warning: …` on the current stderr, once (without
    it Python's last-resort handler prints the bare message, and a command that also printed it said it twice)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        print(f"{record.levelname.lower()}: {record.getMessage()}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logger = logging.getLogger("twinlm")
    if not any(isinstance(h, _Warnings) for h in logger.handlers):
        logger.addHandler(_Warnings())
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
