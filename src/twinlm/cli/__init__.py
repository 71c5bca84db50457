"""`twinlm` command line: the root parser and `main`. One module per command group registers its subcommands
(data.py, train.py, model.py, eval.py, lmeval.py, suite.py); handlers import their heavy modules lazily, so
`twinlm --help` imports no torch. This package sits above every area: it may import any of them, and none
imports it.

Exit status: 0 done; 2 a user error (bad arguments, or any `TwinlmError`: one line, `twinlm: error: …`, that
says what to do; `--debug` shows the traceback too); 3 training diverged; 75 (EX_TEMPFAIL, sysexits.h) training
stopped before its end by SIGTERM or its `stop_after` deadline after writing a checkpoint: the same command
resumes it (`twinlm train`, `twinlm suite`; under torchrun's agent a worker exits 0 instead: cli/train.py says why);
130 interrupted by Ctrl-C; anything else is a bug and prints its traceback.

KEY=VALUE overrides may stand anywhere among a command's arguments, after its options too (as with Hydra): a
subcommand that takes them names the attribute they are collected into as its `key_values` default.
"""

from __future__ import annotations

import argparse
import logging
import sys

from twinlm import __version__
from twinlm.cli.train import under_elastic_agent
from twinlm.errors import ConfigError, RunInterrupted, TrainingDiverged, TwinlmError, one_line


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
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    logger = logging.getLogger("twinlm")
    if not any(isinstance(h, _Warnings) for h in logger.handlers):
        logger.addHandler(_Warnings())
    try:
        _take_key_values(parser, args, extra)
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except RunInterrupted as e:
        print(f"twinlm: {one_line(e)}", file=sys.stderr)
        # a torchrun worker ending non-zero is restarted or called failed by the agent (cli/train.py)
        return 0 if under_elastic_agent() else RunInterrupted.exit_status
    except TwinlmError as e:
        if args.debug:
            raise
        print(f"twinlm: error: {one_line(e)}", file=sys.stderr)
        return 3 if isinstance(e, TrainingDiverged) else 2


def _take_key_values(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> None:
    """The words argparse left over (those after an option) join the command's KEY=VALUE list, and every word of
    that list must be KEY=VALUE (ConfigError, one line, otherwise). A left-over option, or a word for a command
    that takes no overrides, is argparse's own usage error."""
    dest = getattr(args, "key_values", None)
    if extra and (dest is None or any(word.startswith("-") for word in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if dest is None:
        return
    words = [*getattr(args, dest), *extra]
    bad = [w for w in words if "=" not in w or not w.split("=", 1)[0].strip()]
    if bad:
        raise ConfigError(f"{bad[0]!r} is neither an option of `twinlm {args.command}` nor a KEY=VALUE override: "
                          "write overrides as dotted.key=value (anywhere on the line)")
    setattr(args, dest, words)

