"""The `mteb` track (`twinlm eval mteb MODEL`, alias `retrieval-paper`): the paper's retrieval protocol.

MODEL is a model folder (twinlm, transformers or sentence-transformers) or a hub id `org/name[@revision]`,
resolved to its local snapshot by twinlm.hub.resolve_model (with HF_HUB_OFFLINE=1 the snapshot must be in the
Hugging Face cache; an uncached id is a one-line ModelLoadError naming it).

1. MS MARCO fine-tuning with sentence-transformers' trainer and the Ettin recipe (eval/paper/msmarco.py), the
   model written as a sentence-transformers folder `work_dir/st-model/`, reused by a rerun only when the source
   model's content identity (eval/curve.source_identity: not its path) and the recipe are the same;
   `finetune=False` evaluates the folder as it is (e.g. a sentence-transformers folder fine-tuned elsewhere; a
   twinlm folder is exported once per source identity to `work_dir/st-base/`).
2. mteb on the task list (eval/paper/mteb_tasks.py; default `paper`) with mteb's metrics, its results cached in
   `work_dir/mteb-cache/<key>/` so a rerun reuses finished tasks (eval/paper/mteb_eval.py). The key
   (`cache_key`, written beside the results as `key.json`) is the evaluated model's identity plus what changes
   the scores: the encoding length (eval_max_seq_length, resolved), the paper's task restrictions and the mteb
   version; not the task list (adding tasks reuses the finished ones) nor encode_batch_size.

The result: `track` "mteb", `model` (eval/common.describe, plus the pooling, the `source` as given and its
content `identity`), `tasks` {name: {score (nDCG@10),
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
from twinlm.hub import resolve_model

try:
    import mteb
    import sentence_transformers
    from sentence_transformers import SentenceTransformer

    from twinlm.eval.paper import msmarco, mteb_eval
except ImportError as e:  # the optional extra: say how to install it, in one line
    raise ConfigError(f"the mteb track needs {e.name or 'the paper extra'}: pip install 'twinlm[paper]' "
                      "(mteb, sentence-transformers[train], accelerate, datasets)") from e

from twinlm.eval.common import Timer, check_result, load_for_eval, result_config
from twinlm.eval.curve import folder_identity, source_identity
from twinlm.eval.device import resolve_device
from twinlm.eval.paper.mteb_tasks import RESTRICT, expand, get_tasks
from twinlm.eval.settings import MtebConfig
from twinlm.io import atomic_dir, dumps_json, write_json

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


def cache_key(model_identity: str, eval_max_seq_length: int) -> dict[str, Any]:
    """What mteb's cached task results depend on: the evaluated model's content identity, the length it encodes
    at, the paper's task restrictions (mteb_tasks.RESTRICT) and the mteb version."""
    return {"model": model_identity, "eval_max_seq_length": eval_max_seq_length,
            "restrict": RESTRICT, "mteb": mteb.__version__}


def cache_dir_for(work: Path, key: dict[str, Any]) -> Path:
    """`work/mteb-cache/<12 hex digits of the key's sha256>`."""
    return work / "mteb-cache" / hashlib.sha256(dumps_json(key).encode()).hexdigest()[:12]


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
    """The paper's retrieval protocol on the model folder or hub id `model` (module docstring). `work_dir` holds
    the fine-tuned model and mteb's cache (default: `<out>.work`); `export_dir` gets a copy of the evaluated
    sentence-transformers folder; `data_root` is unused (the data are mteb's and the hub's)."""
    cfg = cfg or MtebConfig()
    timer = Timer()
    path = resolve_model(model)  # a hub id -> its snapshot; offline and uncached: ModelLoadError naming the fix
    if not path.is_dir():
        raise MissingArtifactError(f"{model}: no model folder there, nor a hub id org/name[@revision] (give a "
                                   "twinlm, transformers or sentence-transformers model folder, or a hub id)")
    identity = source_identity(model, path)
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
        st_dir, training = msmarco.finetune(path, cfg, work, device=str(where), log=log, identity=identity)
        st_model = SentenceTransformer(str(st_dir), device=str(where))
        pooling = training["pooling"]
        evaluated = folder_identity(st_dir)  # new files (a retrained model) are a new identity
    else:
        st_model, pooling = msmarco.build_model(path, max_seq_length=cfg.max_seq_length, device=str(where),
                                                work_dir=work, log=log, identity=identity)
        exported = msmarco.exports_base(path)
        st_dir = work / msmarco.BASE_DIR if exported else path
        evaluated = folder_identity(st_dir) if exported else identity
    st_model.max_seq_length = cfg.eval_max_seq_length or _context(st_model)
    key = cache_key(evaluated, st_model.max_seq_length)
    cache_dir = cache_dir_for(work, key)
    known = (cache_dir / "key.json").is_file()
    if log:
        log(f"[mteb] {'reusing' if known else 'starting'} the mteb cache {cache_dir} (encoding at "
            f"{st_model.max_seq_length} tokens)")
    if not known:
        write_json(cache_dir / "key.json", key)  # what the folder's results are computed for, to inspect
    tasks = mteb_eval.evaluate_tasks(st_model, names, cache_dir, encode_batch_size=cfg.encode_batch_size, log=log)
    if export_dir is not None:
        with atomic_dir(export_dir, replace=True) as tmp:
            shutil.copytree(st_dir, tmp, dirs_exist_ok=True)
    info = {**_model_info(path, variant, pooling), "source": str(model), "identity": identity}
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


__all__ = ["RULES", "cache_key", "cache_dir_for", "run"]
