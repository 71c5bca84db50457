"""`twinlm suite`: the main job."""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path

from twinlm.configs import field_names
from twinlm.suite.scales import SCALES, Scale


def register(commands) -> None:
    scales = "; ".join(f"{name}: {s.description}" for name, s in SCALES.items())
    fields = textwrap.fill(", ".join(f for f in field_names(Scale) if f != "name"), 100)
    p = commands.add_parser(
        "suite",
        help="the whole paper in one command: data, paired training, cross-objective, all evaluations, report",
        description="Fetch the data, build the tokenizer, prepare shards, train an encoder and a decoder with one "
                    "recipe (three phases), continue each with the other objective, evaluate all four models and "
                    "random-initialisation controls on classification, retrieval, generation and bits per byte, "
                    "and write a report judging the paper's three findings. Every step is cached: running again "
                    "skips finished steps, and a changed setting reruns only what depends on it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"scales: {scales}\n\nsettings (KEY=VALUE) override any field of the scale, the evaluation settings "
               f"by a dotted key, e.g. pretrain_tokens=4M classification.seeds=5 sources='[wiki-gensim,gcide]'; "
               f"the fields:\n{fields}",
    )
    p.add_argument("settings", nargs="*", metavar="KEY=VALUE", help="override a scale setting (anywhere on the line)")
    p.add_argument("--scale", default="cpu", choices=sorted(SCALES), help="size and budgets (default: cpu)")
    p.add_argument("--quick", action="store_true", help="same as --scale quick: every step, smallest size, ~2 min")
    p.add_argument("--out", default=None, help="suite folder (default: runs/suite-<scale>)")
    p.add_argument("--nproc", type=int, default=None, help="train under torchrun with this many processes")
    p.add_argument("--device", default=None,
                   help="where the evaluation steps run: auto (the GPU when there is one, else the CPU), cpu, cuda; "
                        "default: the scale's eval_device (auto; cuda for --scale gpu). A device other than the CPU "
                        "is part of the evaluation steps' identity. Under torchrun (torchrun --nproc_per_node N -m "
                        "twinlm suite …) the evaluation steps are shared among the ranks, one GPU each; rank 0 runs "
                        "every other step and writes")
    p.add_argument("--status", action="store_true", help="show which steps are done, stale or to do, and exit")
    p.set_defaults(handler=_suite, key_values="settings")


def _suite(args) -> int:
    from twinlm.eval.ranks import ranks
    from twinlm.suite.pipeline import Suite
    from twinlm.suite.scales import get_scale

    name = "quick" if args.quick else args.scale
    settings = list(args.settings) + ([f"nproc={args.nproc}"] if args.nproc else []) + \
        ([f"eval_device={args.device}"] if args.device else [])
    scale = get_scale(name, settings)
    out = Path(args.out or f"runs/suite-{name}")
    if args.status:
        suite = Suite(out, scale)
        for step, state in suite.status().items():
            print(f"{state:8s} {step}")
        return 0
    job = ranks()  # under torchrun: this rank's place in the job (the evaluation steps are shared)
    suite = Suite(out, scale, ranks=job)
    if not job.writes:
        suite.run()
        return 0
    print(f"twinlm suite: scale {name} ({scale.description}) -> {out}", file=sys.stderr)
    t0 = time.monotonic()
    summaries = suite.run()
    report = summaries["report"]
    print(f"\nSuite finished in {(time.monotonic() - t0) / 60:.1f} min. Findings:")
    for finding, verdict in report["verdicts"].items():
        print(f"  {finding}: {verdict}")
    print(f"Report: {report['report']}")
    return 0
