#!/usr/bin/env python3
"""Compare two suite folders figure by figure (twinlm.suite.reproduce): every result.json, every training run's
metrics.jsonl and the report's figures, exactly; times and paths left out. Prints each difference; exit 1 when
there is one, 0 when the two runs agree.

    scripts/suite_diff.py runs/suite-a runs/suite-b
"""

from __future__ import annotations

import argparse
import sys

from twinlm.suite.reproduce import differences


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a")
    p.add_argument("b")
    args = p.parse_args(argv)
    found = differences(args.a, args.b)
    for line in found:
        print(line)
    print(f"{len(found)} difference(s)" if found else "identical figures")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
