"""`twinlm train RECIPE.yaml --out RUN [key=value …]` (works under torchrun: `torchrun … -m twinlm train …`)."""

from __future__ import annotations

import argparse
import os
import sys

from twinlm.errors import RunInterrupted

DESCRIPTION = """\
Train a YAML recipe into a run folder: every phase in order, checkpoints, metrics.jsonl, and final/ (a Hugging
Face folder). Running the same command again resumes from the newest intact checkpoint.

RECIPE is a YAML file, or a recipe shipped with twinlm named from any directory: recipes/cpu/encoder.yaml,
cpu/encoder, ettin/150m/decoder, cross/150m/enc-from-dec (a file that exists is read as it is first). With
TWINLM_RECIPES=DIR set, names are looked up in DIR instead of the shipped recipes (and twinlm suite reads
its recipes there).

Overrides are dotted KEY=VALUE words, anywhere on the line: optim.lr=1e-3 phases.pretrain.tokens=2M
data=/path/to/shards model.overrides.attention_dropout=0.

Exit status: 0 finished (RUN/final), or stopped at the recipe's max_steps; 75 stopped before the end by
SIGTERM or the stop_after deadline, with a checkpoint and RUN/stopped.json saying why: run the same command
again to resume (a scheduler requeues on 75); 2 a user error; 3 diverged. Under torchrun a worker exits 0
after such a stop instead: torchrun takes any other status for a crash (it restarts the workers up to
--max-restarts, then exits 1), and a SIGTERM to torchrun itself makes it exit non-zero whatever the workers
do. There RUN/stopped.json, present only while a run stands stopped, tells a stop from the end, as
scripts/slurm/train.sbatch does.

Multi-GPU/CPU: torchrun --nproc_per_node N -m twinlm train RECIPE --out RUN.
"""


def register(commands) -> None:
    p = commands.add_parser(
        "train", help="train a recipe (all its phases); resumes by itself", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", metavar="RECIPE",
                   help="recipe YAML file, or a shipped recipe's name (cpu/encoder, ettin/150m/decoder)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted recipe overrides (anywhere on the line)")
    p.add_argument("--out", required=True, metavar="RUN", help="run folder (created; resumed if it holds checkpoints)")
    p.add_argument("--print", dest="print_only", action="store_true",
                   help="print the resolved recipe and exit")
    p.set_defaults(handler=_train, key_values="overrides")


def under_elastic_agent() -> bool:
    """Whether this process is a worker of torchrun's elastic agent (which sets TORCHELASTIC_RUN_ID for them)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def _train(args) -> int:
    # user errors (a bad recipe, missing data, diverging: exit 3) reach `twinlm.cli.main`, which prints them
    from twinlm.train.recipe import load_recipe
    recipe = load_recipe(args.recipe, args.overrides)
    if args.print_only:
        print(recipe.resolved_paths().to_yaml(), end="")
        return 0
    from twinlm.train import dist
    from twinlm.train.trainer import Trainer
    _check_data(recipe, args.recipe)
    trainer = Trainer(recipe, args.out)
    try:
        out = trainer.fit()
    finally:
        dist.shutdown()
    main_rank = trainer.env is None or trainer.env.is_main
    if trainer.interrupted and main_rank:
        then = ("run the same command again to resume" if trainer.resumable
                else "raise or drop max_steps to train on from it")
        print(f"stopped by {trainer.stop_reason}; checkpoint {out}; {then}", file=sys.stderr)
    elif main_rank:
        print(out)
    # every rank exits alike: a launcher without an agent (srun, mpirun) sees the status of any of them
    return RunInterrupted.exit_status if trainer.resumable and not under_elastic_agent() else 0


def _check_data(recipe, recipe_arg: str) -> None:
    """A missing tokenizer or shard folder names the command that builds what the recipe's paths need."""
    from twinlm.data.for_recipe import needs
    from twinlm.errors import MissingShards
    missing = [n for n in needs(recipe.resolved_paths()) if not n.exists]
    if missing:
        n = missing[0]
        if n.kind == "shards" and n.path.is_dir() and any(n.path.iterdir()):  # there, but not whole (S04)
            raise MissingShards(f"{n.path}: not a complete shard folder (no meta.json: an interrupted prepare, or "
                                f"files of another kind; `twinlm data verify {n.path}` says which): move it aside "
                                f"and prepare it again (`twinlm data prepare INPUT… --tokenizer DIR --out "
                                f"{n.path}`, or `twinlm data prepare --for {recipe_arg}`), or point the recipe at "
                                "another folder (data=DIR)")
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        own = (f"make one with `twinlm tokenizer ettin|train --out {n.path}`" if n.kind == "tokenizer"
               else f"make them with `twinlm data prepare INPUT… --tokenizer DIR --out {n.path}`")
        raise MissingShards(f"{n.path}: no {n.kind} folder{more}: build what {recipe_arg} needs with `twinlm data "
                            f"fetch && twinlm data prepare --for {recipe_arg}`, {own}, or point the recipe at "
                            f"your own (tokenizer=DIR data=DIR)")
