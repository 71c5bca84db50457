"""`twinlm train RECIPE.yaml --out RUN [key=value …]` (works under torchrun: `torchrun … -m twinlm train …`)."""

from __future__ import annotations

import argparse
import sys

from twinlm.errors import ConfigError


def register(commands) -> None:
    p = commands.add_parser(
        "train", help="train a recipe (all its phases); resumes by itself",
        description="Train a YAML recipe into a run folder: every phase in order, checkpoints, metrics.jsonl, "
                    "and final/ (a Hugging Face folder). Running the same command again resumes from the newest "
                    "intact checkpoint. Overrides are dotted KEY=VALUE pairs: optim.lr=1e-3 "
                    "phases.pretrain.tokens=2M data=/path/to/shards model.overrides.attention_dropout=0. "
                    "Multi-GPU/CPU: torchrun --nproc_per_node N -m twinlm train RECIPE --out RUN.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="recipe YAML file (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted recipe overrides")
    # nargs="+": overrides may follow the run folder (`--out RUN optim.lr=1e-3`); argparse cannot otherwise
    # take positionals on both sides of an option.
    p.add_argument("--out", required=True, nargs="+", metavar="RUN",
                   help="run folder (created; resumed if it holds checkpoints); KEY=VALUE overrides may follow")
    p.add_argument("--print", dest="print_only", action="store_true",
                   help="print the resolved recipe and exit")
    p.set_defaults(handler=_train)


def _train(args) -> int:
    # user errors (a bad recipe, missing data, diverging: exit 3) reach `twinlm.cli.main`, which prints them
    from twinlm.train.recipe import load_recipe
    args.out, extra = args.out[0], args.out[1:]
    args.overrides = list(args.overrides) + list(extra)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must be KEY=VALUE, got {bad}")
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
    if trainer.env is not None and not trainer.env.is_main:
        return 0
    if trainer.interrupted:
        print(f"stopped by {trainer.stop_reason}; checkpoint {out}; run the same command again to resume",
              file=sys.stderr)
    else:
        print(out)
    return 0


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
