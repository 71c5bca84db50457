"""A sentence-transformers model on mteb tasks, with mteb's own loaders, search and metrics, and the paper's
aggregates over them.

`evaluate_tasks(model, names, cache_dir)` runs `mteb.evaluate` one task at a time with a `ResultCache` at
`cache_dir` (mteb skips a task whose result is cached there: a rerun reuses finished tasks), so that a failed task
is recorded as `{"error": "..."}` and the others go on. Each task's entry: `score` = mteb's main score
(`ndcg_at_10`, averaged by mteb over the task's splits and subsets: CodeSearchNet's six languages), `metrics` =
every numeric score mteb reports, per split and subset (None for one mteb gives as NaN). A main score that is
missing or not finite is an error.

`aggregates(tasks)`: the MTEB v2 retrieval mean (the 10 tasks' nDCG@10), MS MARCO dev, CodeSearchNet, MLDR-en.
An aggregate whose tasks did not all give a score is None with `incomplete` naming them: never a mean over fewer
tasks reported as the full one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import mteb
from mteb.cache import ResultCache

from twinlm.eval.common import Timer
from twinlm.eval.paper.mteb_tasks import CODESEARCHNET, MLDR, MSMARCO, MTEB_V2_RETRIEVAL, get_tasks

MAIN = "ndcg_at_10"
AGGREGATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "mteb_v2_retrieval": ("mean nDCG@10 over the 10 Retrieval tasks of MTEB(eng, v2)", MTEB_V2_RETRIEVAL),
    "msmarco_dev": ("MSMARCO dev nDCG@10", (MSMARCO,)),
    "codesearchnet": ("CodeSearchNetRetrieval nDCG@10 (mteb's main score: the mean over its 6 languages)",
                      (CODESEARCHNET,)),
    "mldr_en": ("MultiLongDocRetrieval English (test) nDCG@10", (MLDR,)),
}


def _why(e: BaseException, task: Any) -> str:
    """A task failure as one line; an unreachable dataset says how to reach it."""
    text = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    if isinstance(e, (ConnectionError, FileNotFoundError)) or "Hub" in str(e) or "OfflineMode" in str(e):
        path = task.metadata.dataset["path"]
        text += (f" -- the dataset {path} is not reachable: with HF_HUB_OFFLINE=1 it needs a warm Hugging Face "
                 f"cache, else internet access (or a folder ./{path} in the hub's layout)")
    return text


def task_entry(result: Any) -> dict[str, Any]:
    """One task's entry from mteb's TaskResult: score (its main score) and metrics {split: {subset: {name: value}}}.
    ValueError when the main score is missing or not finite."""
    metrics: dict[str, dict[str, dict[str, float | None]]] = {}
    for split, rows in result.scores.items():
        for row in rows:
            # a secondary score mteb cannot compute (its nAUC ones on a few queries) is NaN there: None here
            metrics.setdefault(split, {})[row.get("hf_subset", "default")] = {
                k: float(v) if math.isfinite(v) else None for k, v in row.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}
    score = result.get_score()
    if score is None or not math.isfinite(float(score)):
        raise ValueError(f"mteb gave {result.task_name} a main score of {score} (no data, or non-finite embeddings)")
    return {"score": float(score), "main_score": MAIN, "metrics": metrics}


def evaluate_tasks(model: Any, names: Sequence[str], cache_dir: str | Path, *, encode_batch_size: int = 128,
                   log: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
    """{task name: entry or {"error": ...}} for `model` (a SentenceTransformer, or anything `mteb.evaluate` takes)
    on the tasks `names` (mteb_tasks.get_tasks: sets expanded, the paper's restrictions). One `mteb.evaluate` per
    task with the cache at `cache_dir`; a cached task is read back, not run again."""
    cache = ResultCache(str(cache_dir))
    out: dict[str, dict[str, Any]] = {}
    for task in get_tasks(names):
        name = task.metadata.name
        timer = Timer()
        try:
            res = mteb.evaluate(model, [task], cache=cache, encode_kwargs={"batch_size": encode_batch_size},
                                show_progress_bar=False)
            if not res.task_results:
                raise ValueError(f"mteb returned no result for {name}")
            out[name] = {**task_entry(res.task_results[0]), "seconds": timer()}
            if log:
                log(f"[mteb] {name}: nDCG@10 {out[name]['score']:.4f}")
        except Exception as e:  # noqa: BLE001  (one task's failure is recorded; the others go on)
            out[name] = {"error": _why(e, task)}
            if log:
                log(f"[mteb] {name} failed: {out[name]['error']}")
    return out


def aggregates(tasks: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The paper's aggregates over task entries: {name: {metric, tasks, score, incomplete}}; score None (and
    `incomplete` the tasks without a score: not run, or failed) unless every task of the aggregate scored."""
    out = {}
    for key, (metric, members) in AGGREGATES.items():
        missing = [t for t in members if "score" not in tasks.get(t, {})]
        score = None if missing else sum(tasks[t]["score"] for t in members) / len(members)
        out[key] = {"metric": metric, "tasks": list(members), "score": score, "incomplete": missing}
    return out


def average(tasks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The mean nDCG@10 over every task run; None (with `incomplete`) when any of them failed."""
    failed = [t for t, e in tasks.items() if "score" not in e]
    scores = [e["score"] for e in tasks.values() if "score" in e]
    return {"metric": "mean nDCG@10 over the tasks run", "mean": None if failed or not scores else
            sum(scores) / len(scores), "n_tasks": len(tasks), "incomplete": failed}


__all__ = ["MAIN", "AGGREGATES", "task_entry", "evaluate_tasks", "aggregates", "average"]
