"""lm-evaluation-harness's own command line with twinlm's model registered:

    python -m twinlm.lm_eval --model twinlm --model_args pretrained=DIR --tasks arc_easy,hellaswag …
    twinlm lm-eval --model twinlm --model_args pretrained=DIR,end=period,score_sep=True --tasks triviaqa …

Every argument is lm-eval's (`lm_eval --help`); `--model twinlm` is eval/harness.py's class (its model_args are in
that module's docstring), and lm-eval's own models (`hf` …) stay available. lm-eval's evaluation settings default
the device to `cuda:0`; for `--model twinlm` without `--device` (and without `device=` in `--model_args`)
`--device auto` is passed instead, so the model takes the GPU when there is one, else the CPU. lm-eval's other
subcommands (`ls`, `validate`) and other models get the arguments unchanged.

(The module is named for what it runs; inside it `lm_eval` is the installed package: imports are absolute.)
"""

from __future__ import annotations

import sys


def with_device(args: list[str]) -> list[str]:
    """`args` with `--device auto` added for a `--model twinlm` run that names no device (lm-eval would pick
    cuda:0, which a machine without a GPU cannot give)."""
    def value(flag: str) -> str | None:
        for i, a in enumerate(args):
            if a == flag and i + 1 < len(args):
                return args[i + 1]
            if a.startswith(flag + "="):
                return a.split("=", 1)[1]
        return None

    names_device = value("--device") is not None or "device=" in (value("--model_args") or "")
    if value("--model") != "twinlm" or names_device:
        return args
    return [*args, "--device", "auto"]


def main(argv: list[str] | None = None) -> int:
    """Register twinlm's model, then hand `argv` (default: sys.argv[1:]) to lm-eval's CLI."""
    from twinlm.eval.generative import require_lm_eval  # lm-eval is optional: checked, then imported here

    require_lm_eval()
    import lm_eval.__main__ as lm_eval_main  # optional dependency: lm-eval's command line

    import twinlm.eval.harness  # noqa: F401  -- registers --model twinlm (after lm-eval's own models)

    sys.argv = [sys.argv[0], *with_device(list(sys.argv[1:] if argv is None else argv))]
    lm_eval_main.cli_evaluate()
    return 0


if __name__ == "__main__":
    from twinlm.errors import TwinlmError

    try:
        sys.exit(main())
    except TwinlmError as e:
        print(f"twinlm lm-eval: error: {e}", file=sys.stderr)
        sys.exit(2)
