"""Training: one recipe, three objectives (mlm, clm, mntp), all phases, cross-objective starts, 1 CPU or N GPUs.

Python API:

    from twinlm.train import run, load_recipe
    final = run("recipes/cpu/encoder.yaml", "runs/enc", overrides=["optim.lr=1e-3"])   # -> runs/enc/final
    recipe = load_recipe("recipes/ettin/150m/decoder.yaml", ["phases.pretrain.tokens=1B"])

`run` resumes from the newest intact checkpoint in `out_dir` by itself. Under torchrun, call it in every
process (the `twinlm train` command does). See docs/architecture.md (Training) for the run-folder layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twinlm.errors import RunInterrupted
from twinlm.train.recipe import Recipe, load_recipe

__all__ = ["run", "load_recipe", "Recipe", "RunInterrupted"]


def run(recipe: Any, out_dir: str | Path, overrides: list[str] | None = None, *, callbacks=None,
        raise_on_interrupt: bool = False, log=None) -> Path:
    """Train `recipe` (a YAML path, dict or Recipe, plus dotted overrides) into `out_dir`.

    Returns the final model folder (`out_dir/final`, a Hugging Face folder that `twinlm.load` and transformers
    read). If the run stopped early (SIGTERM, max_steps, the `stop_after` deadline), returns the checkpoint it
    wrote (or raises RunInterrupted when asked).
    """
    from twinlm.train.trainer import Trainer  # torch: not when only train.recipe is read (it runs this file too)
    r = load_recipe(recipe, overrides)
    trainer = Trainer(r, out_dir, callbacks=callbacks, log=log)
    out = trainer.fit()
    if trainer.interrupted and raise_on_interrupt:
        raise RunInterrupted(f"stopped by {trainer.stop_reason}; resume by running again (checkpoint {out})")
    return out
