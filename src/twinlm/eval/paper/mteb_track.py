"""The `mteb` track (`twinlm eval mteb MODEL`, alias `retrieval-paper`): the paper's retrieval protocol.

1. MS MARCO fine-tuning with sentence-transformers' trainer and the Ettin recipe (eval/paper/msmarco.py), the
   model written as a sentence-transformers folder `work_dir/st-model/` (reused by a rerun with the same recipe);
   `finetune=False` evaluates the folder as it is (e.g. a sentence-transformers folder fine-tuned elsewhere).
2. mteb on the task list (eval/paper/mteb_tasks.py; default `paper`) with mteb's metrics, its results cached in
   `work_dir/mteb-cache/<model fingerprint>/` so a rerun reuses finished tasks (eval/paper/mteb_eval.py).

The result: `track` "mteb", `model` (eval/common.describe, plus the pooling), `tasks` {name: {score (nDCG@10),
main_score, metrics {split: {subset: {...}}}, seconds} or {error}}, `average` (mean nDCG@10 over the tasks run;
None with `incomplete` if any failed), `aggregates` (mteb_eval.aggregates), `training` (the fine-tuning record:
recipe, selected lr, held-out triplet accuracy before/after, seconds; None without fine-tuning), `rules` (how the
numbers are chosen and averaged), `config` (eval/common.result_config).

Needs the `paper` extra; without it, importing this module is a ConfigError naming the install.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twinlm.errors import ConfigError, MissingArtifactError

try:
    import mteb
    import sentence_transformers
    from sentence_transformers import SentenceTransformer

    from twinlm.eval.paper import msmarco, mteb_eval
except ImportError as e:  # the optional extra: say how to install it, in one line
    raise ConfigError(f"the mteb track needs {e.name or 'the paper extra'}: pip install 'twinlm[paper]' "
                      "(mteb, sentence-transformers[train], accelerate, datasets)") from e

from twinlm.eval.common import Timer, check_result, load_for_eval, result_config
from twinlm.eval.device import resolve_device
from twinlm.eval.paper.mteb_tasks import expand, get_tasks
from twinlm.eval.settings import MtebConfig
from twinlm.io import atomic_dir, write_json

RULES = {
    "score": "each task's score is mteb's main score, nDCG@10, averaged by mteb over the task's splits and subsets",
    "aggregates": "an aggregate is reported only when every one of its tasks scored; otherwise it is None and "
                  "'incomplete' names the tasks missing or failed",
    "mldr": "MultiLongDocRetrieval is evaluated on its English subset, test split only",
    "lr_selection": "with a sweep (lrs), the learning rate with the highest held-out triplet accuracy (cosine, "
                    "sentence-transformers' TripletEvaluator on the held-out triplets) is kept; ties: the first "
                    "listed",
    "held_out": "Ettin's 1,000 held-out triplets (train_test_split seed 12), or a tenth of a smaller set",
}


def fingerprint(folder: str | Path) -> str:
    """12 hex digits naming the files of a model folder (names, sizes, modification times): the mteb cache of
    one model instance, so a retrained or replaced model is never read from another's cache."""
    h = hashlib.sha256()
    root = Path(folder).resolve()
    h.update(str(root).encode())
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


def _model_info(path: Path, variant: str | None, pooling: str) -> dict[str, Any]:
    """eval/common.describe of the folder where twinlm can load it; else what the sentence-transformers folder
    says (a model twinlm cannot describe is still evaluated)."""
    try:
        info = load_for_eval(str(path), variant=variant, device="cpu").info
    except Exception:  # noqa: BLE001  (describing is best effort; the evaluation does not depend on it)
        st = SentenceTransformer(str(path), device="cpu")
        info = {"path": str(path), "arch": "decoder" if pooling == "lasttoken" else "encoder",
                "variant": variant or type(st[0].auto_model).__name__,
                "params": sum(p.numel() for p in st.parameters())}
    return {**info, "pooling": pooling}


def _context(st_model: Any) -> int:
    """The longest input the model's positions allow (its transformers config's max_position_embeddings)."""
    config = st_model[0].auto_model.config
    return int(getattr(config, "max_position_embeddings", None) or st_model.max_seq_length)


def run(model: str | Path, cfg: MtebConfig | None = None, *, variant: str | None = None, data_root=None,
        out: str | Path | None = None, log: Callable[[str], None] | None = print, device=None,
        work_dir: str | Path | None = None, export_dir: str | Path | None = None) -> dict[str, Any]:
    """The paper's retrieval protocol on the model folder `model` (module docstring). `work_dir` holds the
    fine-tuned model and mteb's cache (default: `<out>.work`); `export_dir` gets a copy of the evaluated
    sentence-transformers folder; `data_root` is unused (the data are mteb's and the hub's)."""
    cfg = cfg or MtebConfig()
    timer = Timer()
    path = Path(model)
    if not path.is_dir():
        raise MissingArtifactError(f"{model}: no model folder there (give a twinlm, transformers or "
                                   "sentence-transformers model folder)")
    if work_dir is None:
        if out is None:
            raise ConfigError("the mteb track keeps the fine-tuned model and mteb's cache in a work folder: give "
                              "work_dir= (or out=, whose <out>.work is used)")
        work_dir = Path(f"{Path(out).with_suffix('')}.work")
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    names = expand(cfg.tasks)
    get_tasks(names)  # an unknown task name is refused before any training
    where = resolve_device(device)
    training = None
    if cfg.finetune:
        st_dir, training = msmarco.finetune(path, cfg, work, device=str(where), log=log)
        st_model = SentenceTransformer(str(st_dir), device=str(where))
        pooling = training["pooling"]
    else:
        st_model, pooling = msmarco.build_model(path, max_seq_length=cfg.max_seq_length, device=str(where),
                                                work_dir=work, log=log)
        st_dir = work / msmarco.BASE_DIR if (work / msmarco.BASE_DIR).is_dir() and not (
            path / "modules.json").is_file() else path
    st_model.max_seq_length = cfg.eval_max_seq_length or _context(st_model)
    cache_dir = work / "mteb-cache" / fingerprint(st_dir)
    tasks = mteb_eval.evaluate_tasks(st_model, names, cache_dir, encode_batch_size=cfg.encode_batch_size, log=log)
    if export_dir is not None:
        with atomic_dir(export_dir, replace=True) as tmp:
            shutil.copytree(st_dir, tmp, dirs_exist_ok=True)
    info = _model_info(path, variant, pooling)
    result = {"track": "mteb", "model": info, "tasks": tasks, "average": mteb_eval.average(tasks),
              "aggregates": mteb_eval.aggregates(tasks), "training": training, "rules": RULES,
              "config": result_config(cfg, timer(), task_names=names, st_model=str(st_dir), work_dir=str(work),
                                      mteb_cache=str(cache_dir), export_dir=str(export_dir) if export_dir else None,
                                      device=str(where), library_versions={
                                          "mteb": mteb.__version__,
                                          "sentence_transformers": sentence_transformers.__version__})}
    check_result(result)
    if out:
        write_json(out, result)
    return result


__all__ = ["RULES", "fingerprint", "run"]
