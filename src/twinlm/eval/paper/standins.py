"""Offline stand-ins for the hub datasets of the paper's protocols: folders in the hub's own layout, written with
`datasets.Dataset.to_parquet` from real rows of the fetched bundle, so that the production calls
(`datasets.load_dataset(hub id, config)`, mteb's registered task classes) resolve them unchanged from a working
directory that holds them (`os.chdir(root)`: `datasets` reads a relative path that exists as a local folder).

They are imitations: the same columns, configs and splits as the real sets, not their rows. Every root gets a
`STANDIN.md` saying so and naming the rows used. Tests use them; a user can use them to smoke-test a pipeline
offline. Their scores say nothing about the paper's numbers.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import datasets

from twinlm.eval.settings import MSMARCO_TRIPLETS
from twinlm.eval.tasks import RetrievalSet, load_retrieval_set
from twinlm.io import atomic_path, write_bytes

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


__all__ = ["MSMARCO_TRIPLETS", "MSMARCO_CONFIG", "write_msmarco_standin", "write_mteb_standin"]
