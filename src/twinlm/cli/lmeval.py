"""`twinlm lm-eval …`: lm-evaluation-harness's own command line with `--model twinlm` registered (every argument is
forwarded to it unchanged; twinlm.lm_eval)."""

from __future__ import annotations

import argparse
from typing import Any


def register(commands: Any) -> None:
    # prefix_chars without "-": every word after `lm-eval` (flags included, --help too) is forwarded to lm-eval
    p = commands.add_parser("lm-eval", prefix_chars="\0", add_help=False,
                            help="lm-evaluation-harness's command line with --model twinlm (arguments forwarded; "
                                 "`twinlm lm-eval --help` is lm-eval's help)")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(handler=_lm_eval)


def _lm_eval(args: argparse.Namespace) -> int:
    from twinlm.lm_eval import main  # lm-eval and torch: imported when the command runs

    return main(list(args.args))
