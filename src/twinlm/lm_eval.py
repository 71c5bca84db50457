"""lm-evaluation-harness's own command line with twinlm's model registered:

    python -m twinlm.lm_eval --model twinlm --model_args pretrained=DIR --tasks arc_easy,hellaswag …
    twinlm lm-eval --model twinlm --model_args pretrained=DIR,end=period,score_sep=True --tasks triviaqa …

Every argument is lm-eval's (`lm_eval --help`); `--model twinlm` is eval/harness.py's class (its model_args are in
that module's docstring), and lm-eval's own models (`hf` …) stay available. Without `--device` the twinlm model
picks the GPU when there is one, else the CPU (`--device auto` is added; lm-eval's
own default would be CUDA).

(The module is named for what it runs; inside it `lm_eval` is the installed package: imports are absolute.)
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Register twinlm's model, then hand `argv` (default: sys.argv[1:]) to lm-eval's CLI."""
    from twinlm.eval.generative import require_lm_eval  # lm-eval is optional: checked, then imported here

    require_lm_eval()
    import lm_eval.__main__ as lm_eval_main  # optional dependency: lm-eval's command line

    import twinlm.eval.harness  # noqa: F401  -- registers --model twinlm (after lm-eval's own models)

    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--device" or a.startswith("--device=") for a in args):
        args += ["--device", "auto"]  # lm-eval's own default is CUDA; twinlm's model takes auto = GPU if any, else CPU
    sys.argv = [sys.argv[0], *args]
    lm_eval_main.cli_evaluate()
    return 0


if __name__ == "__main__":
    from twinlm.errors import TwinlmError

    try:
        sys.exit(main())
    except TwinlmError as e:
        print(f"twinlm lm-eval: error: {e}", file=sys.stderr)
        sys.exit(2)
