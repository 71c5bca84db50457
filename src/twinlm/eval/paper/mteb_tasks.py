"""The paper's retrieval task list as mteb tasks, and a plan of what each one loads.

- `mteb-v2`: the 10 Retrieval tasks of `mteb.get_benchmark("MTEB(eng, v2)")`, read from mteb (and checked
  against `MTEB_V2_RETRIEVAL`, which names them for plans made without a run);
- `paper`: those 10, then `MSMARCO` (its dev split, mteb's only one), `CodeSearchNetRetrieval` (its six
  languages; mteb's main score averages them) and `MultiLongDocRetrieval` restricted to English (subset `en`,
  split `test`: MTEB's reported split; mteb's default also evaluates `dev` and 12 other languages);
- any other mteb task name.

`get_tasks(names)` gives the task objects with those restrictions; `task_plan(names)` gives, offline, each one's
dataset id, pinned revision, splits, subsets and size (mteb's own descriptive statistics).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mteb

from twinlm.errors import ConfigError, UnknownName

BENCHMARK = "MTEB(eng, v2)"
# the 10 Retrieval tasks of MTEB(eng, v2) in mteb 2.26 (get_tasks checks that mteb still says so)
MTEB_V2_RETRIEVAL = ("ArguAna", "CQADupstackGamingRetrieval", "CQADupstackUnixRetrieval", "ClimateFEVERHardNegatives",
                     "FEVERHardNegatives", "FiQA2018", "HotpotQAHardNegatives", "SCIDOCS", "TRECCOVID",
                     "Touche2020Retrieval.v3")
MSMARCO, CODESEARCHNET, MLDR = "MSMARCO", "CodeSearchNetRetrieval", "MultiLongDocRetrieval"
PAPER_EXTRA = (MSMARCO, CODESEARCHNET, MLDR)
TASK_SETS: dict[str, tuple[str, ...]] = {"paper": MTEB_V2_RETRIEVAL + PAPER_EXTRA, "mteb-v2": MTEB_V2_RETRIEVAL}
# the paper's restrictions of a task: {name: get_task keyword arguments}
RESTRICT: dict[str, dict[str, Any]] = {MLDR: {"hf_subsets": ["en"], "eval_splits": ["test"]}}


def mteb_v2_retrieval() -> list[str]:
    """The Retrieval tasks of `MTEB(eng, v2)` as the installed mteb defines them; ConfigError unless they are the
    10 of `MTEB_V2_RETRIEVAL` (another mteb version: install the pinned one)."""
    bench = mteb.get_benchmark(BENCHMARK)
    names = [t.metadata.name for t in bench.tasks if t.metadata.type == "Retrieval"]
    if sorted(names) != sorted(MTEB_V2_RETRIEVAL):
        raise ConfigError(f"mteb {mteb.__version__}'s {BENCHMARK} has Retrieval tasks {names}, not the 10 this "
                          f"protocol was written for: pip install 'twinlm[paper]' (mteb==2.26.24)")
    return names


def expand(names: Sequence[str]) -> list[str]:
    """Task names with the sets (`paper`, `mteb-v2`) expanded, in order, each once. Unknown names are refused
    (UnknownName lists the sets) by `get_tasks`, not here."""
    out: list[str] = []
    for name in names:
        for n in (mteb_v2_retrieval() + list(PAPER_EXTRA) if name == "paper" else mteb_v2_retrieval()
                  if name == "mteb-v2" else [name]):
            if n not in out:
                out.append(n)
    return out


def get_tasks(names: Sequence[str]) -> list[Any]:
    """The mteb task objects of `names` (sets expanded), restricted as the paper evaluates them (`RESTRICT`);
    a fresh object per call. UnknownName for a name mteb does not know."""
    tasks = []
    for name in expand(names):
        try:
            tasks.append(mteb.get_task(name, **RESTRICT.get(name, {})))
        except KeyError:
            raise UnknownName(f"unknown mteb task {name!r}: give an mteb task name (as in mteb.get_tasks()) or one "
                              f"of the sets {', '.join(TASK_SETS)}") from None
    return tasks


def _count(stats: dict, key: str, text_key: str) -> int | None:
    """A count mteb records (`num_queries`), else, in its older statistics, the number of texts its text
    statistics cover (total length / average length); None when neither is there."""
    if stats.get(key) is not None:
        return int(stats[key])
    text = stats.get(text_key) or {}
    if text.get("average_text_length"):
        return round(text["total_text_length"] / text["average_text_length"])
    return None


def _size(stats: dict, subsets: list[str], split: str) -> tuple[int | None, int | None]:
    """(queries, documents) of `split` over `subsets` from a task's descriptive statistics; None when unrecorded."""
    split_stats = stats.get(split) or {}
    per_subset = split_stats.get("hf_subset_descriptive_stats") or {}
    found = [per_subset.get(s) for s in subsets] if subsets != ["default"] and per_subset else [split_stats]
    parts: list[dict] = [p for p in found if isinstance(p, dict)]
    if not parts or len(parts) < len(found):
        return None, None
    q = [_count(p, "num_queries", "queries_text_statistics") for p in parts]
    d = [_count(p, "num_documents", "documents_text_statistics") for p in parts]
    return _total(q), _total(d)


def _chars(stats: dict, subsets: list[str], split: str, text_key: str) -> float | None:
    """Mean characters per text of `text_key` (queries_text_statistics …) over `subsets` of `split`; None when
    unrecorded (the dry run's token estimate)."""
    split_stats = stats.get(split) or {}
    per_subset = split_stats.get("hf_subset_descriptive_stats") or {}
    parts = [per_subset.get(s) for s in subsets] if subsets != ["default"] and per_subset else [split_stats]
    texts = [(p or {}).get(text_key) or {} for p in parts]
    if not texts or not all(t.get("average_text_length") for t in texts):
        return None
    total = sum(t["total_text_length"] for t in texts)
    return total / sum(t["total_text_length"] / t["average_text_length"] for t in texts)


def _total(counts: list[int | None]) -> int | None:
    return None if any(c is None for c in counts) else sum(c for c in counts if c is not None)


def task_plan(names: Sequence[str]) -> list[dict[str, Any]]:
    """What each task of `names` evaluates, read offline from mteb's metadata: name, dataset (hub id),
    revision (pinned), splits and subsets evaluated (`split`: the first), main_score, and, from mteb's descriptive
    statistics over those splits and subsets, queries and documents (None where mteb records no count) and their mean
    characters in the first split (`queries_chars`, `documents_chars`)."""
    plan = []
    for task in get_tasks(names):
        meta = task.metadata
        subsets = list(task.hf_subsets) if meta.is_multilingual else ["default"]
        stats = meta.descriptive_stats or {}
        sizes = [_size(stats, subsets, split) for split in task.eval_splits]
        queries, documents = _total([q for q, _ in sizes]), _total([d for _, d in sizes])
        plan.append({"name": meta.name, "dataset": meta.dataset["path"], "revision": meta.dataset["revision"],
                     "split": task.eval_splits[0], "splits": list(task.eval_splits), "subsets": subsets,
                     "main_score": meta.main_score, "queries": queries, "documents": documents,
                     "queries_chars": _chars(stats, subsets, task.eval_splits[0], "queries_text_statistics"),
                     "documents_chars": _chars(stats, subsets, task.eval_splits[0], "documents_text_statistics")})
    return plan


__all__ = ["BENCHMARK", "MTEB_V2_RETRIEVAL", "PAPER_EXTRA", "TASK_SETS", "RESTRICT", "mteb_v2_retrieval", "expand",
           "get_tasks", "task_plan"]
