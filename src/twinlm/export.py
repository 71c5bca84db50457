"""Writing model folders. Two kinds, both read back by `twinlm.load` (twinlm.loading):

- Hugging Face folder (`save_pretrained`, also `Transformer.save_pretrained`): `config.json`
  (twinlm.hf.hf_config_dict, plus any non-architectural fields passed on, e.g. by `convert`, plus
  `twinlm_objective` when the objective that trained the weights is known: `mlm`, `clm` or `mntp`; evaluation
  reads it, since an MNTP encoder is scored one position earlier; `recorded_objective` reads it back) and
  `model.safetensors` in transformers' names (twinlm.hf.to_hf_state_dict), fp32, plus the tokenizer's files
  when one is given (a transformers tokenizer or a folder to copy them from), a model card `README.md`
  (twinlm.card), for decoders `generation_config.json` (bos = `[CLS]`, eos = `[SEP]`, pad; kept for an
  encoder converted from a decoder, so a round trip loses nothing), and last
  `MANIFEST.sha256` (twinlm.io.write_manifest: "<sha256>  <file>" for every file written except the card,
  which users edit; the format of a training checkpoint's manifest), which
  `twinlm.load` checks: it must list the weights, config.json and every file the weights file records as
  written with it (`twinlm_files` in its metadata), and every file it lists must match. Files added to the
  folder later (a tokenizer copied in) are not required. `AutoModelForMaskedLM` (encoders) and
  `AutoModelForCausalLM` (decoders) load it with no custom code.
- The tokenizer files are made to follow hub conventions (`apply_tokenizer_conventions`): `model_input_names`
  = input_ids, attention_mask; `model_max_length` = the context the model was trained at (else its
  `max_position_embeddings`); decoders get the single-sequence template `[CLS] $A` (pair `[CLS] $A $B`) and
  left padding, so that `generate`, the text-generation pipeline and lm-evaluation-harness with default
  arguments see `[CLS] text`, as in training; encoders get `[CLS] $A [SEP]` (pair `[CLS] $A [SEP] $B [SEP]`,
  twinlm's own tokenizer template) and right padding, so that fill-mask, sentence-transformers and `Trainer`
  see `[CLS] text [SEP]`, as in training. An encoder's template that already ends with its `[SEP]` is kept
  (an outside tokenizer's own); any other (a decoder's `[CLS] $A`, in a folder converted to an encoder by
  twinlm.convert) is replaced. The template's special tokens are the model's ids, under the tokenizer's own
  names for them. `tokenizer_config.json` names the class `PreTrainedTokenizerFast` and carries no
  machine-local keys (twinlm.data.tokenizer.portable_tokenizer_config), so transformers 4 loads it too.
  A tokenizer whose special ids or size contradict the model is refused (TokenizerMismatch).
- twinlm checkpoint folder (`save_checkpoint`): `model.safetensors` in twinlm's own names, the state dict as
  it is, plus `model_config.json` (ModelConfig.to_dict).

Each file is written atomically (twinlm.io), into the folder as it is: other files there are kept. Only the
model's `config` and `state_dict()` are used, so this module needs no `Transformer` class.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from twinlm.card import CARD, model_card
from twinlm.config import OBJECTIVES
from twinlm.data.tokenizer import portable_tokenizer_config
from twinlm.errors import ConfigError, MissingArtifactError, ModelLoadError, TokenizerMismatch
from twinlm.hf import ARCHITECTURE_FIELDS, hf_config_dict, to_hf_state_dict
from twinlm.io import MANIFEST, atomic_path, manifest_mismatch, read_manifest, write_bytes, write_json, write_manifest

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # sharded weights (written by transformers, read by twinlm)
TWINLM_CONFIG = "model_config.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "chat_template.jinja")
MODEL_INPUT_NAMES = ["input_ids", "attention_mask"]
OBJECTIVE_KEY = "twinlm_objective"  # config.json: the objective that trained the weights (one of OBJECTIVES)


def save_pretrained(model, path, tokenizer=None, *, max_length: int | None = None,
                    card: dict[str, Any] | None = None, extra_config: dict[str, Any] | None = None,
                    generation_config: dict[str, Any] | None = None, objective: str | None = None) -> Path:
    """Write `model` as a Hugging Face folder (see the module docstring); returns the folder.

    `max_length`: the context the model was trained at (the tokenizer's `model_max_length`); `card`: what
    the model card states (twinlm.card.model_card's `info`); `extra_config`: config.json fields to keep (those
    not in twinlm.hf.ARCHITECTURE_FIELDS: classifier settings, labels); `generation_config`: a decoder's
    generation settings to keep (its token ids are always the model's); `objective`: the objective that trained
    the weights (mlm, clm, mntp), written to config.json as `twinlm_objective` (only from here: one in
    `extra_config` is dropped; None writes none)."""
    if objective is not None and objective not in OBJECTIVES:
        raise ConfigError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}: pass the objective the "
                          "weights were trained with, or None")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        check_tokenizer_matches(tokenizer, cfg)
    sd = {k: v.to("cpu", torch.float32) if v.is_floating_point() else v.cpu()
          for k, v in to_hf_state_dict(model).items()}
    written = [WEIGHTS, "config.json"]
    config = hf_config_dict(cfg)
    config.update({k: v for k, v in (extra_config or {}).items()
                   if k not in ARCHITECTURE_FIELDS and k != OBJECTIVE_KEY})
    if objective is not None:
        config[OBJECTIVE_KEY] = objective
    write_json(path / "config.json", config)
    written += _save_tokenizer(tokenizer, path, cfg)
    if any((path / n).is_file() for n in TOKENIZER_FILES):
        apply_tokenizer_conventions(path, cfg, max_length=max_length)
    if cfg.causal or generation_config:  # an encoder keeps a source's settings, so a round trip loses nothing
        gen = {**(generation_config or {}), "bos_token_id": cfg.cls_token_id, "eos_token_id": cfg.sep_token_id,
               "pad_token_id": cfg.pad_token_id}
        gen.pop("transformers_version", None)
        write_json(path / GENERATION_CONFIG, gen)
        written.append(GENERATION_CONFIG)
    # the weights record every file the manifest lists, so that a manifest cut short is seen as such
    _save_weights(sd, path / WEIGHTS, {"format": "pt", KIND_KEY: kind_of(model.config),
                                       FILES_KEY: ",".join(sorted(set(written)))})
    info = dict(card or {})
    info.setdefault("params", sum(p.numel() for p in model.parameters()))
    info.setdefault("name", path.name)  # the snippets name the folder by its own name, never its full path
    write_bytes(path / CARD, model_card(cfg, info))
    write_manifest(path, written)
    return path


def apply_tokenizer_conventions(folder, cfg, *, max_length: int | None = None, append_sep: bool | None = None) -> None:
    """Rewrite the tokenizer files in `folder` for a model of config `cfg` (see the module docstring): the one
    place that decides a kind's tokenizer conventions (save_pretrained, and through it convert and export).
    `append_sep`: the template is `[CLS] $A [SEP]` (True) or `[CLS] $A` (False); default, the kind's: decoders
    get `[CLS] $A`, encoders `[CLS] $A [SEP]` unless theirs already appends `[SEP]` (then it is kept). A
    decoder's sentence-transformers export passes True: it pools on that `[SEP]`, as twinlm's decoder
    retrieval does."""
    folder = Path(folder)
    tj = folder / "tokenizer.json"
    if tj.is_file():
        data = json.loads(tj.read_text())
        if append_sep is None:
            append_sep = False if cfg.causal else None if _appends_sep(data.get("post_processor"), cfg) else True
        if append_sep is not None:
            data["post_processor"] = _template(cfg, append_sep, _token_names(data))
            write_bytes(tj, json.dumps(data, ensure_ascii=False, indent=2) + "\n")
    tc = folder / "tokenizer_config.json"
    if tc.is_file():
        conf = json.loads(tc.read_text())
        conf["model_input_names"] = list(MODEL_INPUT_NAMES)
        conf["model_max_length"] = int(max_length or cfg.max_position_embeddings)
        conf["padding_side"] = "left" if cfg.causal else "right"
        for k in ("add_bos_token", "add_eos_token"):  # transformers 5 would rebuild the template from these
            conf.pop(k, None)
        write_json(tc, portable_tokenizer_config(conf))  # a class and keys transformers 4 reads too


def _token_names(data: dict) -> dict[int, str]:
    """id -> name of the special (added) tokens in a tokenizer.json."""
    return {t["id"]: t["content"] for t in data.get("added_tokens") or []
            if isinstance(t, dict) and isinstance(t.get("id"), int) and isinstance(t.get("content"), str)}


def _appends_sep(post: Any, cfg) -> bool:
    """Whether a tokenizer.json post-processor ends a single sequence with the model's `[SEP]` (an encoder's
    template: BERT/RoBERTa processing, or a TemplateProcessing whose last piece is the sep id)."""
    if not isinstance(post, dict):
        return False
    kind = post.get("type")
    if kind == "Sequence":
        return any(_appends_sep(p, cfg) for p in post.get("processors") or [])
    if kind in ("BertProcessing", "RobertaProcessing"):
        sep = post.get("sep")
        return isinstance(sep, list) and len(sep) == 2 and sep[1] == cfg.sep_token_id
    if kind != "TemplateProcessing" or not post.get("single"):
        return False
    last = post["single"][-1].get("SpecialToken") if isinstance(post["single"][-1], dict) else None
    special = (post.get("special_tokens") or {}).get((last or {}).get("id"))
    return isinstance(special, dict) and special.get("ids") == [cfg.sep_token_id]


def _template(cfg, append_sep: bool, names: dict[int, str] | None = None) -> dict[str, Any]:
    """A `tokenizers` TemplateProcessing post-processor (its JSON form) with the model's special ids, named as
    the tokenizer names them (`names`: id -> token; `[CLS]` / `[SEP]` when it has no such token)."""
    names = names or {}
    cls, sep = names.get(cfg.cls_token_id, "[CLS]"), names.get(cfg.sep_token_id, "[SEP]")

    def spec(name, type_id=0):
        return {"SpecialToken": {"id": name, "type_id": type_id}}

    def seq(which, type_id):
        return {"Sequence": {"id": which, "type_id": type_id}}

    single = [spec(cls), seq("A", 0)] + ([spec(sep)] if append_sep else [])
    if append_sep:
        pair = [spec(cls), seq("A", 0), spec(sep), seq("B", 1), spec(sep, 1)]
    else:
        pair = [spec(cls), seq("A", 0), seq("B", 1)]
    specials = {cls: {"id": cls, "ids": [cfg.cls_token_id], "tokens": [cls]}}
    if append_sep:
        specials[sep] = {"id": sep, "ids": [cfg.sep_token_id], "tokens": [sep]}
    return {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials}


def check_tokenizer_matches(tokenizer, cfg) -> None:
    """Refuse a tokenizer whose size or special token ids contradict the model config (TokenizerMismatch)."""
    if hasattr(tokenizer, "__len__") and len(tokenizer) > cfg.vocab_size:
        raise TokenizerMismatch(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is "
                                f"{cfg.vocab_size}: pass the tokenizer the model was trained with")
    for attr, field in (("cls_token", "cls_token_id"), ("sep_token", "sep_token_id"), ("pad_token", "pad_token_id"),
                        ("mask_token", "mask_token_id")):
        token = getattr(tokenizer, attr, None)
        if token is None:
            continue
        got = tokenizer.convert_tokens_to_ids(token)
        if got != getattr(cfg, field):
            raise TokenizerMismatch(f"the tokenizer's {token} is id {got} but the model's {field} is "
                                    f"{getattr(cfg, field)}: pass the tokenizer the model was trained with")


def verify_manifest(folder) -> None:
    """Check `folder/MANIFEST.sha256` (no manifest: nothing to check). It must be whole (twinlm.io.read_manifest)
    and list the weights, config.json and the files the weights record as written with them; each file it
    lists must be there and match. Anything else raises ModelLoadError naming the file and what to do: for a
    model folder, download or export it again, or accept one's own edits with `twinlm reseal DIR`
    (twinlm.reseal)."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return
    if (folder / TWINLM_CONFIG).is_file():  # a checkpoint: its manifest guards resuming, nothing reseals it
        again = f"download or export the folder again, or delete {MANIFEST} to accept the files as they are"
        own = "download or export it again"
    else:
        again = f"download or export the folder again, or run `twinlm reseal {folder}` if you edited it yourself"
        own = f"download or export it again, or run `twinlm reseal {folder}` if you removed it yourself"
    listed = read_manifest(manifest, lambda what: ModelLoadError(
        f"{manifest}: {what}: the file is damaged; {again}"))
    required = [WEIGHTS, "config.json", *(weights_metadata(folder).get(FILES_KEY) or "").split(",")]
    unlisted = sorted({n for n in required if n and n not in listed and (folder / n).is_file()})
    if unlisted:
        raise ModelLoadError(f"{manifest}: does not list {', '.join(unlisted)} (the manifest is cut short or "
                             f"damaged): {again}")
    bad = manifest_mismatch(folder, listed)
    if bad is not None and bad[1] == "missing":
        raise ModelLoadError(f"{folder / bad[0]}: listed in {MANIFEST} but missing: the folder is incomplete; "
                             f"{own}")
    if bad is not None:
        raise ModelLoadError(f"{folder / bad[0]}: does not match its sha256 in {MANIFEST} (corrupt, truncated or "
                             f"edited after export): {again}")


def save_checkpoint(model, path) -> Path:
    """Write `model` as a twinlm checkpoint folder (twinlm names + model_config.json); returns the folder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _save_weights(sd, path / WEIGHTS, {"format": "pt", "names": "twinlm", KIND_KEY: kind_of(model.config)})
    model.config.save(path / TWINLM_CONFIG)
    return path


def copy_tokenizer_files(src, dst) -> list[str]:
    """Copy the tokenizer files (TOKENIZER_FILES) that `src` has into `dst`; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            with atomic_path(Path(dst) / name) as tmp:
                shutil.copy2(Path(src) / name, tmp)
            copied.append(name)
    return copied


# The weights file says which kind of model it was saved from, so that a folder mixing one model's weights with
# another kind's config (same names and shapes for encoders and decoders) is refused when loaded; and which
# files were written with it (a Hugging Face folder's manifest must list them).
KIND_KEY = "twinlm_kind"
FILES_KEY = "twinlm_files"


def weights_metadata(folder) -> dict[str, str]:
    """The metadata of `folder/model.safetensors` ({} when there is none or it cannot be read: reading the
    weights then names the problem)."""
    f = Path(folder) / WEIGHTS
    if not f.is_file():
        return {}
    try:
        with safe_open(str(f), "pt") as weights:
            return dict(weights.metadata() or {})
    except Exception:  # safetensors raises its own error types for damaged files
        return {}


def recorded_objective(folder) -> str | None:
    """The objective `folder/config.json` records as `twinlm_objective` (mlm, clm, mntp), or None when there is
    no config.json or no such key (folders written before twinlm recorded it, or by other tools). A value
    outside those three is a ModelLoadError."""
    f = Path(folder) / "config.json"
    try:
        value = json.loads(f.read_text()).get(OBJECTIVE_KEY)
    except (OSError, ValueError, AttributeError):  # no file, not JSON, not an object: loading names the problem
        return None
    if value is None:
        return None
    if value not in OBJECTIVES:
        raise ModelLoadError(f"{f}: {OBJECTIVE_KEY} {value!r} is not one of {', '.join(OBJECTIVES)}: set it to the "
                             "objective the model was trained with, or remove the key")
    return str(value)


def kind_of(config) -> str:
    return "decoder" if config.causal else "encoder"


def _save_weights(sd: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata=metadata)
        sort_metadata(tmp)


def sort_metadata(path: Path) -> None:
    """Rewrite a safetensors file's header with its metadata keys sorted. safetensors writes them in the order of a
    hash map seeded per process, so the same weights and metadata gave files of other bytes (and checksums) from run
    to run; sorted, they give one file. The header keeps its length, so the tensors' offsets are unchanged."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        raw = f.read(size)
        header = json.loads(raw)
        if len(header.get("__metadata__") or {}) < 2:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:  # cannot happen for the same content; never corrupt the file over an ordering
            return
        f.seek(8)
        f.write(text.ljust(size, b" "))


def _save_tokenizer(tokenizer, path: Path, cfg) -> list[str]:
    if tokenizer is None:
        return []
    if isinstance(tokenizer, (str, Path)):
        src = Path(tokenizer)
        copied = copy_tokenizer_files(src, path)
        if not copied:
            raise MissingArtifactError(f"no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}) in {src}: pass the "
                                       f"folder a tokenizer was saved to")
        return copied
    if not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(f"tokenizer must be a transformers tokenizer or a folder, got {type(tokenizer).__name__}")
    tokenizer.save_pretrained(str(path))
    return [n for n in TOKENIZER_FILES if (path / n).is_file()]


__all__ = ["save_pretrained", "save_checkpoint", "copy_tokenizer_files", "apply_tokenizer_conventions",
           "check_tokenizer_matches", "write_manifest", "verify_manifest", "WEIGHTS", "WEIGHTS_INDEX",
           "TWINLM_CONFIG", "GENERATION_CONFIG", "MANIFEST", "TOKENIZER_FILES", "FILES_KEY",
           "weights_metadata", "OBJECTIVE_KEY", "OBJECTIVES", "recorded_objective"]
