"""Tiny stand-ins for tests, smoke runs and the random-initialisation control: a small byte-level BPE
tokenizer trained in a second on built-in sentences, and toy task data in every format the eval loaders read.

Nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from twinlm.config import ModelConfig
from twinlm.data.prepare import prepare
from twinlm.data.tokenizer import make_portable
from twinlm.model import Transformer

SPECIALS = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]  # ids 0..4, as in the cpu-* presets

_SUBJECTS = ["the cat", "a dog", "the teacher", "my friend", "the old man", "a small bird", "the river",
             "the scientist", "our team", "the children", "a farmer", "the engine", "the moon", "water"]
_VERBS = ["sees", "likes", "builds", "finds", "moves toward", "carries", "follows", "hates", "watches",
          "explains", "freezes", "heats", "measures", "helps"]
_OBJECTS = ["the house", "a red ball", "the long road", "some bread", "the bright star", "a heavy stone",
            "the garden", "an answer", "the cold ice", "a green leaf", "the market", "the question"]
_ADJ = ["good", "bad", "great", "terrible", "wonderful", "boring", "fine", "awful", "lovely", "dull"]


def toy_sentences(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
        if rng.random() < 0.5:
            s += f" and it is {rng.choice(_ADJ)}"
        out.append(s.capitalize() + rng.choice([".", ".", "!", "?"]))
    return out


def toy_tokenizer(vocab_size: int = 384, out_dir: str | Path | None = None, texts=None):
    """A `PreTrainedTokenizerFast` with the twinlm special tokens at ids 0..4 and a `[CLS] … [SEP]`
    post-processor (pairs: `[CLS] a [SEP] b [SEP]`), trained on the toy sentences or on `texts`.
    Saved to `out_dir` when given."""
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts if texts is not None else toy_sentences(2000) + list(_ADJ), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]",
                                   bos_token="[CLS]", eos_token="[SEP]")
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
        make_portable(out_dir)
    return fast


def toy_corpus(root: str | Path, docs: int, held: int) -> tuple[Path, Path, Path]:
    """A toy tokenizer, shards of `docs` toy documents (64-token chunks) and a held-out text file of `held`
    others under `root`: (tokenizer folder, shard folder, held-out file), for tests that train a tiny run."""
    root = Path(root)
    tok = root / "tok"
    toy_tokenizer(out_dir=tok)
    corpus = root / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in toy_sentences(docs, seed=1)))
    prepare([corpus], str(tok), root / "shards", chunk_size=64, min_chunk=8, backfill=32, workers=0)
    heldout = root / "held.txt"
    heldout.write_text("\n\n".join(toy_sentences(held, seed=9)) + "\n")
    return tok, root / "shards", heldout


def toy_model_dir(out_dir: str | Path, causal: bool, preset: str = "cpu-tiny", seed: int = 0,
                  tokenizer=None, **overrides) -> Path:
    """A freshly initialised model folder (HF format + tokenizer): the random-initialisation control."""
    tok = tokenizer if tokenizer is not None else toy_tokenizer()
    vocab = ((len(tok) + 63) // 64) * 64
    cfg = ModelConfig.preset(preset, causal=causal, vocab_size=vocab, **overrides)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    out = Path(out_dir)
    model.save_pretrained(str(out), tokenizer=tok)
    return out


# --- toy task files -------------------------------------------------------------------------------
def write_toy_mc_jsonl(path: str | Path, n: int = 20, n_choices: int = 3, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        ctx = f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)}"
        choices = rng.sample(_OBJECTS, n_choices)
        rows.append({"context": ctx, "choices": choices, "label": rng.randrange(n_choices)})
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Path(path)


def write_toy_classification(root: str | Path, n_train: int = 60, n_dev: int = 30) -> tuple[Path, Path]:
    """`root/train.jsonl` and `root/dev.jsonl` of `toy_classification` rows (seeds 0 and 1): a task file pair."""
    paths = []
    for name, rows in (("train", toy_classification(n_train, 0)), ("dev", toy_classification(n_dev, 1))):
        path = Path(root) / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    return paths[0], paths[1]


def toy_classification(n: int = 80, seed: int = 0, pair: bool = False) -> list[dict]:
    """Sentences labelled 1 when they end with a positive adjective, else 0 (learnable from bag of words)."""
    rng = random.Random(seed)
    pos, neg = _ADJ[0::2], _ADJ[1::2]
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} and it is " \
            f"{rng.choice(pos if label else neg)}."
        row = {"text": s, "label": label}
        if pair:
            row["text_pair"] = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."
        rows.append(row)
    return rows


def toy_retrieval(n: int = 30, seed: int = 0) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, int]]]:
    """(corpus, queries, qrels): each query shares its subject and object with its one relevant passage."""
    rng = random.Random(seed)
    corpus, queries, qrels = {}, {}, {}
    for i in range(n):
        s, v, o = rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)
        corpus[f"d{i}"] = f"{s.capitalize()} {v} {o}. {' '.join(rng.sample(_ADJ, 3))}."
        queries[f"q{i}"] = f"who {v} {o}?"
        qrels[f"q{i}"] = {f"d{i}": 1}
    return corpus, queries, qrels


# --- a hub cache laid out by hand (hub ids offline) -----------------------------------------------------------
def toy_hub_revision(cache: str | Path, repo: str, revision: str, folder: str | Path) -> str:
    """Put `folder`'s files into the hub cache `cache` as one commit of `repo` named `revision`, laid out as
    huggingface_hub lays it out (models--org--name/refs/<revision> -> snapshots/<commit>/ -> blobs), so that a hub
    id resolves offline; returns the commit (the snapshot folder's name)."""
    store = Path(cache) / ("models--" + repo.replace("/", "--"))
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    commit = hashlib.sha1(b"".join(p.read_bytes() for p in files)).hexdigest()
    for p in files:
        blob = store / "blobs" / hashlib.sha256(p.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(p.read_bytes())
        link = store / "snapshots" / commit / p.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (store / "refs").mkdir(exist_ok=True)
    (store / "refs" / revision).write_text(commit)
    return commit
