"""Accepting one's own edits to a model folder: `reseal(folder)`, the command `twinlm reseal DIR`.

A model folder twinlm writes carries `MANIFEST.sha256` (twinlm.export), and `twinlm.load` refuses a folder
whose listed files differ from it, so that a damaged download or disk is never loaded silently. An edit made
on purpose (`tokenizer.save_pretrained(DIR)` to change `model_max_length`, `AutoConfig.save_pretrained(DIR)`)
trips the same check; resealing is the sanctioned way to accept it:

1. compare the folder with its manifest: the files `changed` (sha256 differs), `added` (in the folder, not
   listed) and `removed` (listed, gone). Not counted: the manifest itself, the card `README.md` (never listed:
   users edit it), sub-folders, and names a manifest cannot hold (starting with `.`: temporaries; white space
   other than the space). A folder without a manifest, or with one that cannot be read, counts every file
   as added (`Reseal.manifest` says which);
2. refuse changed, added or removed weights (`model*.safetensors`, `pytorch_model*.bin` and their indexes)
   when the manifest is whole: no routine edit rewrites them, and a flipped bit in them still loads, so
   sealing them would hide exactly the damage the manifest exists to catch. `accept_weights=True`
   (`--accept-weights`) accepts weights the user replaced;
3. check that the folder still loads: every changed or added `.json` file parses, `twinlm.load` loads the
   weights (ignoring the manifest), transformers' `AutoConfig` reads `config.json`, and a tokenizer, when the
   folder has tokenizer files, loads with `AutoTokenizer` and agrees with the model's vocabulary and special
   ids (twinlm.export.check_tokenizer_matches);
4. rewrite `MANIFEST.sha256` atomically, listing every counted file now in the folder (twinlm.io.write_manifest),
   unless nothing changed or `dry_run`.

A failed check raises ModelLoadError (MissingArtifactError for a folder that is not there) naming the file and
the fix; the manifest is then left as it was. A training checkpoint (`model_config.json`) is refused: its
manifest guards resuming; export it (`twinlm export`) and edit the export.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import transformers

from twinlm.card import CARD
from twinlm.errors import MissingArtifactError, ModelLoadError, TokenizerMismatch
from twinlm.export import TOKENIZER_FILES, TWINLM_CONFIG, check_tokenizer_matches
from twinlm.io import MANIFEST, listable_in_manifest, read_manifest, sha256_file, write_manifest
from twinlm.loading import load


@dataclass
class Reseal:
    """What `reseal` found and did: file names relative to the folder, each list sorted."""

    folder: Path
    manifest: str  # "whole", "missing" or "damaged (<why>)": the manifest the folder had
    changed: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)  # the checks that passed, in words
    written: bool = False  # whether MANIFEST.sha256 was rewritten

    @property
    def edited(self) -> bool:
        return bool(self.changed or self.added or self.removed) or self.manifest != "whole"


def is_weights_file(name: str) -> bool:
    """Whether `name` holds (or indexes) model weights: `model*.safetensors`, `pytorch_model*.bin`, and their
    `.index.json` files."""
    return ((name.startswith("model") and (name.endswith(".safetensors") or name.endswith(".safetensors.index.json")))
            or (name.startswith("pytorch_model") and (name.endswith(".bin") or name.endswith(".bin.index.json"))))


def _sealable(folder: Path) -> list[str]:
    """The files of `folder` a manifest lists (see the module docstring, step 1)."""
    return sorted(p.name for p in folder.iterdir()
                  if p.is_file() and not p.is_symlink() and p.name not in (MANIFEST, CARD)
                  and listable_in_manifest(p.name))


def compare(folder: str | Path) -> Reseal:
    """Step 1 of the module docstring: how `folder` differs from its manifest. Writes nothing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingArtifactError(f"{folder}: no such folder: pass the model folder to reseal (RUN/final, an export)")
    present = _sealable(folder)
    listed: dict[str, str] = {}
    if not (folder / MANIFEST).is_file():
        state = "missing"
    else:
        try:
            listed = read_manifest(folder / MANIFEST, lambda what: ModelLoadError(what))
            state = "whole"
        except ModelLoadError as e:
            state = f"damaged ({e})"
    return Reseal(folder, state,
                  changed=[n for n in present if n in listed and sha256_file(folder / n) != listed[n]],
                  added=[n for n in present if n not in listed],
                  removed=sorted(n for n in listed if not (folder / n).is_file()))


def reseal(folder: str | Path, *, accept_weights: bool = False, dry_run: bool = False) -> Reseal:
    """Check `folder` and rewrite its MANIFEST.sha256 (the module docstring, steps 1–4); returns what was found,
    checked and done. `dry_run`: compare and check, write nothing."""
    folder = Path(folder)
    if (folder / TWINLM_CONFIG).is_file():
        raise ModelLoadError(f"{folder}: a training checkpoint, whose manifest guards resuming: export it "
                             f"(`twinlm export {folder} --out DIR`) and edit the export")
    found = compare(folder)
    again = f"then run `twinlm reseal {folder}` again"
    weights = [n for n in found.changed + found.added + found.removed if is_weights_file(n)]
    if weights and not accept_weights:  # without a whole manifest, nothing says the weights are the sealed ones
        why = "differ from" if found.manifest == "whole" else "cannot be checked against"
        raise ModelLoadError(f"{folder / weights[0]}: the weights {why} {MANIFEST} (damaged, or replaced): "
                             "restore them (download or export the folder again), or pass --accept-weights if you "
                             "replaced them yourself")
    for name in found.changed + found.added:
        if name.endswith(".json"):
            try:
                json.loads((folder / name).read_text(encoding="utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                raise ModelLoadError(f"{folder / name}: not valid JSON ({e}): fix or restore it, {again}") from None
    try:
        model = load(folder, check_manifest=False)
    except (ModelLoadError, MissingArtifactError) as e:
        raise ModelLoadError(f"the folder no longer loads, so {MANIFEST} was not rewritten: {e}") from None
    cfg = model.config
    found.checked.append(f"the weights load ({'decoder' if cfg.causal else 'encoder'}, {cfg.num_layers} layers)")
    try:
        transformers.AutoConfig.from_pretrained(folder)
    except Exception as e:  # transformers raises ValueError, OSError, KeyError… for a config it cannot read
        raise ModelLoadError(f"{folder / 'config.json'}: transformers cannot read it ({e}): fix or restore it, "
                             f"{again}") from None
    found.checked.append("transformers reads config.json")
    if any((folder / n).is_file() for n in TOKENIZER_FILES):
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        except Exception as e:  # as above: any failure to build the tokenizer from these files
            raise ModelLoadError(f"{folder}: the tokenizer does not load ({type(e).__name__}: {e}): fix or restore "
                                 f"its files, {again}") from None
        try:
            check_tokenizer_matches(tokenizer, cfg)
        except TokenizerMismatch as e:
            raise ModelLoadError(f"{folder}: {str(e).split(': pass')[0]}: restore the tokenizer files the model was "
                                 f"trained with, {again}") from None
        found.checked.append("the tokenizer loads and matches the model")
    if found.edited and not dry_run:
        write_manifest(folder, _sealable(folder))
        found.written = True
    return found


__all__ = ["Reseal", "compare", "reseal", "is_weights_file"]
