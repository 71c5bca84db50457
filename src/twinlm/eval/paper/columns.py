"""`twinlm eval paper MODEL`: the paper's three columns for one model, the paper's way, beside its published row.

Columns and the track each runs (eval/tracks.py):
- `glue`: the `glue` track (eval/paper/glue.py), ModernBERT's GLUE protocol, every setting at its default;
- `retrieval`: the `mteb` track (eval/paper/mteb_track.py): MS MARCO fine-tuning, then the paper's mteb tasks;
- `generative`: the `generative` track with the paper's tasks (`tasks=[paper]`), every document (`limit=none`)
  and lm-eval's own datasets (`data=hub`, the paper's splits), one lm-eval task at a time.

`overrides` are `COLUMN.KEY=VALUE` words on those tracks' settings (`glue.seeds=1`, `retrieval.max_triplets=1000`,
`generative.limit=50`), for smoke runs and sweeps.

Nothing is computed twice: each column's result is kept in `OUT/<column>.result.json` (sealed: io.write_sealed_json)
under a key of the model's identity, the column's settings, the device and the data root; GLUE's fine-tuning runs
and the retrieval model and mteb's task results are kept in `OUT/glue/` and `OUT/retrieval/` by their tracks, and
the generative column keeps each task's result in `OUT/generative/<task>.json`. An interrupted run, rerun with the
same OUT, goes on where it stopped. A column (or generative task) that fails is recorded with its error (the
traceback in `OUT/<column>.error.txt`) and the others go on; its numbers are then missing from the table, never
replaced by a partial average.

The report: `OUT/paper.json` (the model's shape, the paper's row, every column's headline numbers or error, the
table) and `OUT/paper.md` (the table in Markdown, with its notes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from twinlm.configs import apply_overrides, build
from twinlm.errors import ConfigError, ModelLoadError, TwinlmError
from twinlm.eval.curve import source_identity
from twinlm.eval.paper.reference import ModelShape, model_shape, paper_row
from twinlm.eval.paper.table import table
from twinlm.eval.tracks import TRACKS
from twinlm.hub import resolve_model
from twinlm.io import dumps_json, read_sealed_json, write_bytes, write_json, write_sealed_json

COLUMN_TRACKS = {"glue": "glue", "retrieval": "mteb", "generative": "generative"}
COLUMNS = tuple(COLUMN_TRACKS)
# the paper's way where a track's default is the laptop's
PAPER_DEFAULTS: dict[str, dict[str, Any]] = {"generative": {"tasks": ["paper"], "limit": None, "data": "hub"}}


def column_settings(columns: Sequence[str], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """{column: its track's settings}: the paper's defaults, then `COLUMN.KEY=VALUE` overrides."""
    unknown = [c for c in columns if c not in COLUMN_TRACKS]
    if unknown or not columns:
        raise ConfigError(f"unknown column(s) {', '.join(unknown) or '(none)'}: choose from {', '.join(COLUMNS)}")
    raw = apply_overrides({c: dict(PAPER_DEFAULTS.get(c, {})) for c in columns}, list(overrides))
    extra = [k for k in raw if k not in columns]
    if extra:
        raise ConfigError(f"override for {', '.join(extra)}, which is not among the columns run "
                          f"({', '.join(columns)}); the columns are {', '.join(COLUMNS)}")
    return {c: build(TRACKS[COLUMN_TRACKS[c]].settings, raw[c], c) for c in columns}


def model_identity(model: str | Path) -> str:
    """What the columns' caches are keyed on: a folder's content (eval/curve.source_identity), a hub id's snapshot
    commit (resolving it downloads the snapshot, which the columns read anyway)."""
    return source_identity(model, resolve_model(model))


def _key(identity: str, column: str, settings: Any, device: str | None, data_root: str | None) -> str:
    payload = {"identity": identity, "column": column, "settings": dataclasses.asdict(settings),
               "device": device or "auto", "data_root": data_root}
    return hashlib.sha256(dumps_json(payload).encode()).hexdigest()


def _cached(path: Path, key: str, log: Callable[[str], None]) -> dict[str, Any] | None:
    payload, why = read_sealed_json(path)
    if payload is None:
        if why != "missing":
            log(f"[paper] {path}: {why}; computing it again")
        return None
    if payload.get("key") != key:
        log(f"[paper] {path} was computed for another model or settings; computing it again")
        return None
    return payload["result"]


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _generative(model: str, settings: Any, out: Path, identity: str, *, device, variant, data_root, log) -> dict:
    """The generative column one lm-eval task at a time (each cached), combined as the track combines them."""
    from twinlm.eval.generative import average  # imports lm-eval's helpers only when the column runs
    from twinlm.eval.tasks.generative import expand_tasks, lm_eval_name

    t = TRACKS["generative"]
    tasks: dict[str, Any] = {}
    errors: dict[str, str] = {}
    configs: dict[str, Any] = {}
    for name in expand_tasks(settings.tasks):
        one = dataclasses.replace(settings, tasks=[name])
        path = out / "generative" / f"{name}.json"
        key = _key(identity, "generative", one, device, data_root)
        res = _cached(path, key, log)
        if res is None:
            try:
                res = t.run(model, one, variant=variant, data_root=data_root, log=log, device=device)
            except (KeyboardInterrupt, SystemExit, ConfigError, ModelLoadError):
                raise  # the model or the settings: every task would fail the same way (the column fails)
            except Exception as e:  # reported with the task, and the other tasks go on
                errors[name] = _one_line(e)
                write_bytes(out / "generative" / f"{name}.error.txt", traceback.format_exc())
                log(f"[paper] generative {name} failed: {errors[name]}")
                continue
            write_sealed_json(path, {"key": key, "result": res})
        else:
            log(f"[paper] generative {name}: cached ({path})")
        tasks.update(res["tasks"])
        configs[name] = res["config"]
    names = [lm_eval_name(n) for n in expand_tasks(settings.tasks)]
    avg = average(tasks, names) if not errors else {"mean": None, "incomplete": sorted(errors)}
    return {"track": "generative", "tasks": {**tasks, **{n: {"error": e} for n, e in errors.items()}},
            "average": avg, "config": {"settings": dataclasses.asdict(settings), "per_task": configs},
            "errors": errors}


def run_column(column: str, model: str, settings: Any, out: Path, identity: str, *, device=None, variant=None,
               data_root=None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """One column's result (from its cache when it is there), written sealed to `OUT/<column>.result.json`."""
    path = out / f"{column}.result.json"
    key = _key(identity, column, settings, device, data_root)
    cached = _cached(path, key, log)
    if cached is not None:
        log(f"[paper] {column}: cached ({path})")
        return cached
    if column == "generative":
        res = _generative(model, settings, out, identity, device=device, variant=variant, data_root=data_root,
                          log=log)
        if res["errors"]:  # not sealed: the failed tasks are run again next time
            return res
    else:
        res = TRACKS[COLUMN_TRACKS[column]].run(model, settings, variant=variant, data_root=data_root, log=log,
                                                device=device, work_dir=out / column)
        errors = {name: task["error"] for name, task in res.get("tasks", {}).items() if "error" in task}
        if errors:  # not sealed: a rerun retries the failed tasks (the track's own work folder keeps the rest)
            write_bytes(out / f"{column}.error.txt", "".join(f"{n}: {e}\n" for n, e in errors.items()))
            for name, e in errors.items():
                log(f"[paper] {column} {name} failed: {e}")
            return res
    write_sealed_json(path, {"key": key, "result": res})
    return res


def _label(model: str, shape: ModelShape, variant: str | None) -> str:
    name = Path(model).name if Path(model).is_dir() else model
    return f"{name} ({variant or shape.kind}, {shape.params / 1e6:.1f}M)"


def paper(model: str, out: str | Path, *, columns: Sequence[str] = COLUMNS, overrides: Sequence[str] = (),
          device: str | None = None, variant: str | None = None, size: str | None = None,
          data_root: str | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run `columns` on `model` (a transformers folder or hub id) into `out` (module docstring); returns the
    report (also `OUT/paper.json`, with the table in `OUT/paper.md`)."""
    out = Path(out)
    shape = model_shape(model)  # a folder that is not a model fails here, before any column
    row = paper_row(shape, size)
    settings = column_settings(columns, overrides)
    identity = model_identity(model)
    entries: dict[str, dict[str, Any]] = {}
    for column in columns:
        log(f"[paper] {column}: {TRACKS[COLUMN_TRACKS[column]].help}")
        try:
            entries[column] = {"result": run_column(column, model, settings[column], out, identity, device=device,
                                                    variant=variant, data_root=data_root, log=log)}
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # the column is reported failed; the other columns go on
            entries[column] = {"error": _one_line(e)}
            write_bytes(out / f"{column}.error.txt", traceback.format_exc())
            kind = "" if isinstance(e, TwinlmError) else " (traceback in " + str(out / f"{column}.error.txt") + ")"
            log(f"[paper] {column} failed: {entries[column]['error']}{kind}")
    tab = table(_label(model, shape, variant), row, entries)
    report = {"model": {"path": str(model), "identity": identity, "variant": variant, "shape": shape.as_dict()},
              "paper_row": row,
              "columns": {c: ({"error": e["error"]} if "error" in e else
                              {"file": str(out / f"{c}.result.json"), "settings": dataclasses.asdict(settings[c])})
                          for c, e in entries.items()},
              "table": tab}
    write_json(out / "paper.json", report)
    write_bytes(out / "paper.md", tab["markdown"] + "\n" + "\n".join(f"- {n}" for n in tab["notes"]) + "\n")
    return report


def _glue_runs(settings: Any) -> list[dict[str, Any]]:
    from twinlm.eval.paper.glue_tasks import TASKS, sweep_configs
    from twinlm.eval.settings import seed_list

    seeds = len(seed_list(settings.seeds))
    return [{"task": name, "seeds": seeds, "max_train": settings.max_train_examples,
             "max_eval": settings.max_eval_examples,
             "hypers": [dataclasses.asdict(h) for h in sweep_configs(TASKS[name], settings.sweep, settings.batch_size)]}
            for name in settings.tasks]


def _lm_eval_configs(settings: Any) -> dict[str, dict[str, Any]]:
    """lm-eval's own config (dataset, splits) of each task the generative column runs, from its task index."""
    from twinlm.eval.generative import task_manager
    from twinlm.eval.tasks.generative import expand_tasks, is_task_file, lm_eval_name

    tm = task_manager()
    out = {}
    for name in expand_tasks(settings.tasks):
        if is_task_file(name):
            out[name] = {"dataset_path": name, "validation_split": "file"}
            continue
        entry = tm.task_index.get(lm_eval_name(name))
        if entry is None:
            raise ConfigError(f"generative: {name} is not an lm-eval task (lm-eval ls tasks lists them)")
        out[lm_eval_name(name)] = dict(entry.cfg or {})
    return out


def dry_run(model: str, *, columns: Sequence[str] = COLUMNS, overrides: Sequence[str] = (),
            size: str | None = None) -> dict[str, Any]:
    """What `paper(model, …)` would download and cost, without downloading or loading anything (eval/paper/plan.py):
    {"model": shape, "paper_row", "columns": {column: {"datasets": [...], "gpu_hours", "mfu"}}, "gpu_hours",
    "estimate"}."""
    from twinlm.eval.paper import plan

    shape = model_shape(model)
    settings = column_settings(columns, overrides)
    out: dict[str, Any] = {}
    for column in columns:
        s = settings[column]
        if column == "glue":
            out[column] = plan.glue_plan(shape, _glue_runs(s))
        elif column == "retrieval":
            from twinlm.eval.paper.mteb_tasks import task_plan  # imports mteb (its task metadata)

            out[column] = plan.retrieval_plan(shape, s, task_plan(s.tasks))
        else:
            out[column] = plan.generative_plan(shape, _lm_eval_configs(s), s.limit)
    return {"model": {"path": str(model), "shape": shape.as_dict()}, "paper_row": paper_row(shape, size),
            "columns": out, "gpu_hours": sum(c["gpu_hours"] for c in out.values()), "estimate": plan.LABEL}


def _gpu_time(hours: float) -> str:
    return f"{hours:.1f} GPU hours" if hours >= 1 else f"{hours * 60:.1f} GPU minutes"


def format_plan(p: dict[str, Any]) -> str:
    """The dry run as text: one table of datasets per column and the estimated GPU hours."""
    shape = p["model"]["shape"]
    lines = [f"model: {p['model']['path']} ({shape['kind']}, {shape['layers']} layers x {shape['hidden']}, "
             f"{shape['params'] / 1e6:.1f}M parameters); compared with the paper's {p['paper_row']['note']}", ""]
    for column, c in p["columns"].items():
        lines.append(f"{column}: {_gpu_time(c['gpu_hours'])} on one H100 (estimated, MFU {c['mfu']:.1%})")
        lines.append("| dataset | config | task | split: rows | reads |")
        lines.append("|---|---|---|---|---|")
        for d in c["datasets"]:
            splits = ", ".join(f"{k}: {v:,}" if isinstance(v, int) else f"{k}: ?" for k, v in d["splits"].items())
            reads = ", ".join(f"{k}: {v:,}" if isinstance(v, int) else f"{k}: ?" for k, v in d["reads"].items())
            lines.append(f"| {d['id']} | {d.get('config') or ''} | {d.get('task') or ''} | {splits} | {reads} |")
        lines.append("")
    lines.append(f"total: {_gpu_time(p['gpu_hours'])} on one H100, {p['estimate']}")
    return "\n".join(lines) + "\n"


__all__ = ["paper", "dry_run", "format_plan", "run_column", "column_settings", "model_identity", "COLUMNS",
           "COLUMN_TRACKS"]
