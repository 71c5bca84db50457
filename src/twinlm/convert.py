"""Rewriting a model folder as a Hugging Face folder: of the other kind (`convert`, cross-objective) or of
its own kind (`export_model`, e.g. an intermediate training checkpoint).

The two objectives share every weight; only the attention mask differs (config.causal). In Hugging Face
terms the conversion splits/fuses the attention input projection (encoder `Wqkv` <-> decoder `q_proj`,
`k_proj`, `v_proj`) and renames the prediction head (`head.*` <-> `lm_head.*`); twinlm.hf does both when the
folder of the other class is written.

What travels with the weights:
- the tokenizer: the source folder's files; for a twinlm checkpoint (`RUN/checkpoints/step-N`), the run's
  tokenizer (the recipe's `tokenizer` in the checkpoint's state, else `RUN/final`); `tokenizer=` names one
  explicitly. The files are written with the target kind's conventions (twinlm.export's
  apply_tokenizer_conventions, through save_pretrained): a decoder's `[CLS] $A` becomes an encoder's
  `[CLS] $A [SEP]` with right padding, an encoder's template a decoder's `[CLS] $A` with left padding. A
  tokenizer whose fingerprint differs from the one the checkpoint records is refused. With no tokenizer to
  write, `convert` warns through `log` (the folder is still usable in Python with a tokenizer
  passed separately) and `export_model` refuses unless `allow_no_tokenizer`.
- the source's config.json fields that are not architecture (`classifier_pooling`, `id2label`, …: every key
  outside twinlm.hf.ARCHITECTURE_FIELDS) and its `generation_config.json` settings (for a decoder result);
- a model card (twinlm.card): for `convert`, the conversion and the source's training, the source named by
  its last path parts (`base_model` only when it is a hub id); for `export_model`, the run, phase and step,
  and the evaluation results recorded for the source folder (twinlm.card.recorded_results) as `model-index`.
  The license (`license=`, else the run's recipe) must be a hub license id or `other` (twinlm.card.check_license);
- the objective that trained the weights, as config.json's `twinlm_objective` (twinlm.export; evaluation reads
  it to score an MNTP encoder one position earlier): the source's own key, else for a training checkpoint its
  state's recipe, else the `config.yaml` of the run around the source; none is written when none of these
  says. `convert` trains nothing, so the converted model keeps the source's objective: a decoder converted to
  an encoder says `clm` (its head still predicts the next token, so evaluation reads it one position earlier,
  as an MNTP encoder), an encoder converted to a decoder says `mlm` (a decoder is scored left to right
  whatever its objective). Training the converted model (a cross-objective run) records its own objective in
  its `final/`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twinlm.card import check_license, recorded_results, run_summary, shown_name
from twinlm.data.tokenizer import check_tokenizer_file, tokenizer_fingerprint
from twinlm.errors import ConfigError, CorruptCheckpointError, MissingArtifactError, OutOfSpace, TokenizerMismatch
from twinlm.export import GENERATION_CONFIG, OBJECTIVES, TOKENIZER_FILES, TWINLM_CONFIG, recorded_objective
from twinlm.hub import resolve_model
from twinlm.io import MANIFEST, atomic_dir, is_disk_full, manifest_mismatch, read_manifest
from twinlm.loading import load
from twinlm.model import Transformer

TARGETS = ("encoder", "decoder")
CHECKPOINT_MARKER = "COMPLETE"  # twinlm.train.checkpoint.MARKER: written last into a whole training checkpoint


def convert(src, to: str, out, *, global_rope_theta: float | None = None,
            local_rope_theta: float | None = None, overwrite: bool = False, tokenizer=None,
            license: str | None = None, log=print) -> Path:
    """Write `out`: the model in `src` (HF folder or twinlm checkpoint) as the `to` kind, in HF format."""
    if to not in TARGETS:
        raise ConfigError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    src, out = Path(src), Path(out)
    _check_out(src, out, overwrite)
    check_license(license)
    model = load(src)
    causal = to == "decoder"
    if model.config.causal == causal:
        raise ConfigError(f"{src} already holds an {to}; nothing to convert (to write it as a Hugging Face "
                          f"folder of its own kind: `twinlm export {src} --out DIR`)")
    changes: dict[str, Any] = {}
    if global_rope_theta is not None:
        changes["global_rope_theta"] = float(global_rope_theta)
    if local_rope_theta is not None:
        changes["local_rope_theta"] = float(local_rope_theta)
    converted = as_kind(model, causal, **changes)
    tok = find_tokenizer(src, tokenizer)
    if tok is None:
        log(f"warning: {src} has no tokenizer files and none was given (--tokenizer DIR): {out} holds no "
            f"tokenizer; transformers and `twinlm eval` need one beside the weights")
    card = _summary(src)
    card.pop("base_model", None)  # the source's own start (a cross-objective run's), not this model's
    card.update(base_model=str(src), name=out.name,
                converted={"from": "decoder" if model.config.causal else "encoder", "to": to})
    if license:
        card["license"] = license
    check_license(card.get("license"))  # before any file is written
    converted.save_pretrained(out, tokenizer=tok, card=card, extra_config=_source_config(src),
                              generation_config=_source_json(src, GENERATION_CONFIG),
                              max_length=_tokenizer_max_length(tok), objective=source_objective(src))
    return out


def as_kind(model: Transformer, causal: bool, **changes: Any) -> Transformer:
    """A new model of the `causal` kind holding `model`'s weights (in memory; `model` is left as it is).

    Both kinds share every twinlm weight name, so this is a config change and a copy. `changes` are other
    ModelConfig fields to set (RoPE θ, dropout, …); one that changes a weight's shape fails in
    `load_state_dict`. The new model's weights are initialised before the copy (the RNG advances as for a
    fresh model of that shape)."""
    converted = Transformer(model.config.replace(**changes, causal=causal))
    converted.load_state_dict(model.state_dict())
    return converted


def export_model(src, out, *, tokenizer=None, overwrite: bool = False, license: str | None = None,
                 allow_no_tokenizer: bool = False) -> Path:
    """Write `out`: the model in `src` (a training checkpoint, any model folder, or a hub id `org/name[@rev]`,
    twinlm.hub) as a Hugging Face folder of its own kind, with the run's tokenizer and a model card.

    The export certifies what it writes (its MANIFEST.sha256), so nothing unchecked goes in: a training
    checkpoint (a folder with state.json and model_config.json) must pass its own manifest as resuming does
    (its COMPLETE marker, a MANIFEST.sha256 listing every file, every file matching it; else
    CorruptCheckpointError), a model folder with a manifest must match it (twinlm.load), and the
    tokenizer's tokenizer.json must be one `tokenizers` can read and no larger than the model's vocabulary
    (ConfigError / TokenizerMismatch naming the file). The folder is written whole or not at all: into a
    temporary sibling, renamed to `out` at the end (twinlm.io.atomic_dir; `overwrite` replaces an existing
    folder as a whole, other files there included); a full disk is an OutOfSpace error, with nothing left
    behind."""
    src, out = resolve_model(src), Path(out)
    _check_out(src, out, overwrite)
    check_license(license)
    _check_checkpoint(src)
    model = load(src)
    tok = find_tokenizer(src, tokenizer)
    if tok is None and not allow_no_tokenizer:
        raise MissingArtifactError(f"{src}: no tokenizer found (not in the folder, nor the run's recipe, nor "
                                   f"RUN/final): pass --tokenizer DIR (or --no-tokenizer to write the weights only)")
    if tok is not None:
        _check_tokenizer(tok, model.config.vocab_size)
    state = _json(src / "state.json")
    card = _summary(src)
    if state:
        step = (state.get("trainer") or {}).get("step")
        tokens = (state.get("trainer") or {}).get("tokens")
        card["note"] = (f"Exported by `twinlm export` from training checkpoint `{src.name}` (phase "
                        f"`{state.get('phase')}`, step {step}, {tokens:,} tokens trained)." if tokens is not None
                        else f"Exported by `twinlm export` from `{shown_name(src)}`.")
        card.pop("final_loss", None)  # the run's last loss is not this checkpoint's
        card.pop("phases", None)
    if license:
        card["license"] = license
    check_license(card.get("license"))  # before any file is written
    card.update(name=out.name, results=recorded_results(src))
    try:
        with atomic_dir(out, replace=out.exists()) as tmp:
            model.save_pretrained(tmp, tokenizer=tok, card=card, extra_config=_source_config(src),
                                  generation_config=_source_json(src, GENERATION_CONFIG),
                                  max_length=_trained_length(state) or _tokenizer_max_length(tok),
                                  objective=source_objective(src))
    except Exception as e:
        if is_disk_full(e):  # atomic_dir removed the temporary folder; `out` is as it was
            raise OutOfSpace(f"the disk holding {out} is full: the export was not written (nothing is left "
                             f"behind): free space or pass another --out, and run the same command again") from e
        raise
    return out


def _check_checkpoint(src: Path) -> None:
    """Refuse a training checkpoint that its manifest does not vouch for (see export_model): the checks of
    twinlm.train.checkpoint.verify, which resuming makes (this floor cannot import the trainer's)."""
    if not ((src / "state.json").is_file() and (src / TWINLM_CONFIG).is_file()):
        return
    fix = ("export certifies only checkpoints that pass their manifest, as resuming does; export another "
           "checkpoint of the run (RUN/checkpoints/step-*) or RUN/final")
    manifest = src / MANIFEST
    if not (src / CHECKPOINT_MARKER).is_file():
        raise CorruptCheckpointError(f"{src}: incomplete (no {CHECKPOINT_MARKER} marker: the save was interrupted): "
                                     f"{fix}")
    if not manifest.is_file():
        raise CorruptCheckpointError(f"{src}: no {MANIFEST}: {fix}")
    listed = read_manifest(manifest, lambda what: CorruptCheckpointError(f"{manifest}: {what} (damaged): {fix}"))
    present = {p.name for p in src.iterdir() if p.is_file()} - {MANIFEST, CHECKPOINT_MARKER}
    unlisted = sorted(present - set(listed))
    if unlisted:
        raise CorruptCheckpointError(f"{src}: {MANIFEST} does not list {', '.join(unlisted)}: {fix}")
    bad = manifest_mismatch(src, listed)
    if bad is not None:
        how = "is listed in the manifest but missing" if bad[1] == "missing" else \
            f"does not match its sha256 in {MANIFEST}"
        raise CorruptCheckpointError(f"{src}: {bad[0]} {how}: {fix}")


def _check_tokenizer(tok: Path, vocab_size: int) -> None:
    """Refuse a tokenizer.json that cannot be read or holds more tokens than the model's vocabulary."""
    backend = check_tokenizer_file(Path(tok) / "tokenizer.json")
    if backend.get_vocab_size() > vocab_size:
        raise TokenizerMismatch(f"{Path(tok) / 'tokenizer.json'}: the tokenizer has {backend.get_vocab_size()} "
                                f"tokens but the model's vocabulary is {vocab_size}: pass the tokenizer the model "
                                "was trained with (--tokenizer DIR)")


def source_objective(src: Path) -> str | None:
    """The objective that trained the weights in `src` (see the module docstring), or None."""
    recorded = recorded_objective(src)
    if recorded is not None:
        return recorded
    objective = ((_json(src / "state.json") or {}).get("recipe") or {}).get("objective")
    if objective is None:
        objective = _summary(src).get("objective")  # the run's config.yaml, around a final/ of before the key
    return objective if objective in OBJECTIVES else None


def find_tokenizer(src: Path, explicit=None):
    """The tokenizer folder to write beside `src`'s weights (see the module docstring), or None."""
    if explicit is not None:
        tok = Path(explicit)
        if not (tok / "tokenizer.json").is_file():
            raise MissingArtifactError(f"{tok}: no tokenizer.json (pass the folder a tokenizer was saved to)")
        _check_fingerprint(src, tok)
        return tok
    if (src / "tokenizer.json").is_file():
        return src
    candidates = []
    recipe_tok = ((_json(src / "state.json") or {}).get("recipe") or {}).get("tokenizer")
    if recipe_tok:
        candidates.append(Path(recipe_tok))
    for run in (src.parent.parent, src.parent):  # RUN/checkpoints/step-N -> RUN
        candidates.append(run / "final")
    for c in candidates:
        if (c / "tokenizer.json").is_file():
            _check_fingerprint(src, c)
            return c
    return None


def _check_fingerprint(src: Path, tok: Path) -> None:
    recorded = (_json(src / "state.json") or {}).get("tokenizer_fingerprint")
    if recorded and recorded != tokenizer_fingerprint(tok):
        raise TokenizerMismatch(f"{tok} is not the tokenizer {src} was trained with (fingerprint "
                                f"{recorded[:12]}…): pass the run's tokenizer with --tokenizer DIR")


def _check_out(src: Path, out: Path, overwrite: bool) -> None:
    """Refuse an output that would touch the source (the same folder, one holding it, or one inside it), a file,
    and a non-empty folder without `overwrite`; with it, only a model folder (config.json or MANIFEST.sha256) is
    replaced, so a mistyped --out never empties a folder of other things."""
    s, o = src.resolve(), out.resolve()
    if s == o or s.is_relative_to(o) or o.is_relative_to(s):
        raise ConfigError(f"--out {out} would overwrite the source ({src}) or lie inside it: give --out a folder "
                          "outside the source")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a folder: give --out a folder to write the model into")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out} exists and is not empty (pass overwrite=True / --overwrite to replace it)")
        if not any((out / name).is_file() for name in ("config.json", MANIFEST)):
            raise ConfigError(f"{out} is not a model folder (no config.json or {MANIFEST}), so --overwrite will not "
                              "replace it: give --out a new folder or an earlier export")


def _json(path: Path) -> dict | None:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def _source_json(src: Path, name: str) -> dict | None:
    return None if (src / TWINLM_CONFIG).is_file() else _json(src / name)


def _source_config(src: Path) -> dict | None:
    return _source_json(src, "config.json")


def _summary(src: Path) -> dict[str, Any]:
    """What the source's run recorded (for a checkpoint or a run's final folder), else nothing."""
    for run in (src.parent.parent, src.parent):
        if (run / "config.yaml").is_file() and (run / "metrics.jsonl").is_file():
            return run_summary(run)
    return {}


def _trained_length(state: dict | None) -> int | None:
    """The longest sequence length of the phases a checkpoint has gone through."""
    if not state:
        return None
    phases = (state.get("recipe") or {}).get("phases") or {}
    lengths = []
    for name, p in phases.items():
        lengths.append(int((p or {}).get("seq_len") or 0))
        if name == state.get("phase"):
            break
    return max(lengths) if lengths and max(lengths) > 0 else None


def _tokenizer_max_length(tok) -> int | None:
    """The source tokenizer's `model_max_length` (transformers writes a huge number for "no limit")."""
    conf = _json(Path(tok) / "tokenizer_config.json") if tok is not None else None
    value = (conf or {}).get("model_max_length")
    return int(value) if isinstance(value, int) and value < 10**9 else None


__all__ = ["as_kind", "convert", "export_model", "find_tokenizer", "source_objective", "TARGETS",
           "TOKENIZER_FILES"]
