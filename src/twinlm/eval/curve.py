"""`twinlm eval curve`: evaluate every checkpoint of runs (or a list of model folders / hub revisions) and plot
each metric against the tokens seen, encoders and decoders side by side: training-dynamics curves.

Sources (each argument):
- a run folder (`RUN/checkpoints/step-*` marked COMPLETE): every intact checkpoint, or every k-th
  (`every=k`, the last always included); twinlm checkpoints are loaded as they are (no export needed), the
  tokenizer is the run's (`RUN/final`, else the recipe's `tokenizer`), tokens seen come from each
  checkpoint's `state.json`, MNTP scoring from the recipe's objective; a checkpoint is checked against its
  manifest before it is evaluated (not on a cache hit), and one that fails is reported and skipped, as is one
  whose state.json or model_config.json cannot be read (named by its manifest check when that fails);
- a model folder or a hub id `org/name@revision` (twinlm.hub): one point; hub revisions of one repository
  form one series ordered step{N} < ext{N} < decay{N}. Tokens seen are known only for twinlm checkpoints; a
  plot whose series lack them uses the checkpoints' order on its x axis.

Tracks are the eval tracks of twinlm.eval.tracks (`classification`, `retrieval`, `generative`, `bpb`, `pairs`;
`classify` is still accepted) run on one device (`device`: the accelerator when there is one, else the CPU)
with their settings dataclass (eval/settings.py), changed by dotted overrides
(`bpb.max_docs=50`, `generative.limit=100`). Each result is
cached under OUT/cache/ keyed by the checkpoint's identity (its manifest, or the folder's file sizes and
times), the track and its settings (and the device type, when not the CPU): a rerun, or one that adds runs or
tracks, evaluates only what is new. Under torchrun the evaluations are shared among the ranks and rank 0
alone writes (`curve`).

Output: OUT/curve.json (every point: series, arch, label, step, tokens, metrics), OUT/curve.csv, OUT/curve.md
and one PNG per metric (`<track>.png` for the track's average, `<track>-<task>.png` for each task), with
one panel per architecture. A metric that is NaN or missing is an error, never a silent gap. A full disk while
these are written is an OutOfSpace error (each file is written whole or not at all; the cache is kept).
"""

from __future__ import annotations

import csv
import hashlib
import io as _io
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from twinlm.configs import apply_overrides, build
from twinlm.errors import ConfigError, CorruptCheckpointError, DataError, MissingArtifactError, OutOfSpace, TwinlmError
from twinlm.eval.tracks import TRACKS, canonical_name, canonical_overrides
from twinlm.hub import parse_hub_id, resolve_model
from twinlm.io import atomic_path, dumps_json, is_disk_full, write_bytes, write_json

_PHASE_ORDER = {"step": 0, "ext": 1, "decay": 2}
_REVISION = re.compile(r"^(step|ext|decay)[-_]?(\d+)$")


@dataclass
class Point:
    series: str
    label: str
    path: Path
    step: int | None = None
    tokens: int | None = None
    tokenizer: str | None = None   # folder of the tokenizer (None: the model folder's own)
    objective: str | None = None   # mlm | clm | mntp when the run says
    identity: str = ""
    checkpoint: bool = False       # a twinlm checkpoint: verified against its manifest before it is evaluated
    arch: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


def folder_identity(folder: Path) -> str:
    """What a model folder's cached results are keyed on: its checkpoint manifest's digest, else every file's
    name, size and modification time (a changed file is another model)."""
    manifest = folder / "MANIFEST.sha256"
    if manifest.is_file():  # a twinlm checkpoint: its manifest names every file's sha256
        return "manifest:" + hashlib.sha256(manifest.read_bytes()).hexdigest()
    parts = sorted(f"{p.relative_to(folder)}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                   for p in folder.rglob("*") if p.is_file())
    return "files:" + hashlib.sha256("\n".join([str(folder.resolve())] + parts).encode()).hexdigest()


def source_identity(model: str | Path, folder: str | Path | None = None) -> str:
    """The content identity of the source model `model` (resolved to the local `folder`, default `model`): a hub
    id `org/name[@rev]` is `hub:org/name@rev:<snapshot commit>` (a new commit of that revision is another model);
    a folder is `twinlm.eval.curve.folder_identity` (its MANIFEST.sha256 digest, else every file's name, size and
    modification time), so new weights written into the same folder are another model."""
    local = Path(folder if folder is not None else model)
    parsed = None if isinstance(model, Path) or Path(str(model)).exists() else parse_hub_id(str(model))
    if parsed is not None:
        repo, rev = parsed
        return f"hub:{repo}@{rev or 'main'}:{local.name}"  # the snapshot folder is named by its commit
    return folder_identity(local)


def _run_points(run: Path, every: int, log: Callable) -> list[Point]:
    # the train package is imported only for run folders (its checkpoint format)
    import yaml

    from twinlm.train.checkpoint import CheckpointManager, read_state
    cfg = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
    tok = str(run / "final") if (run / "final" / "tokenizer.json").is_file() else cfg.get("tokenizer")
    if not tok or not Path(tok).exists():
        raise MissingArtifactError(f"{run}: no tokenizer (neither RUN/final nor the recipe's tokenizer {tok!r} "
                                   "exists): restore the tokenizer folder the run was trained with")
    good = CheckpointManager(run / "checkpoints").complete()  # marked; the manifest is checked when evaluated
    if not good:
        raise MissingArtifactError(f"{run}: no complete checkpoint under checkpoints/ (train it, or pass model "
                                   "folders instead)")
    chosen = good[::every]
    if chosen[-1] != good[-1]:
        chosen.append(good[-1])
    out = []
    for c in chosen:
        try:
            trainer = read_state(c).get("trainer", {})
        except (OSError, ValueError, RecursionError, AttributeError) as e:  # damaged: skipped, as a corrupt one
            log(f"warning: skipping {_verify_folder(c) or f'{c}/state.json: unreadable ({e})'}")
            continue
        out.append(Point(series=run.name, label=c.name, path=c, step=trainer.get("step"),
                         tokens=trainer.get("tokens"), tokenizer=tok, objective=cfg.get("objective"),
                         identity=folder_identity(c), checkpoint=True))
    if not out:
        raise MissingArtifactError(f"{run}: no checkpoint could be read (every one is damaged, see the warnings)")
    return out


def _model_point(spec: str) -> Point:
    folder = resolve_model(spec)
    if not folder.is_dir():
        raise MissingArtifactError(f"{spec}: not a run folder, a model folder, nor a hub id in the cache")
    parsed = parse_hub_id(spec) if not Path(spec).exists() else None
    if parsed:
        series, label = parsed[0], parsed[1] or "main"
    else:
        series, label = folder.resolve().parent.name, folder.name
    m = _REVISION.match(label)
    step = int(m.group(2)) if m else None
    tokens = None
    if (folder / "state.json").is_file():  # a twinlm checkpoint folder named directly
        trainer = json.loads((folder / "state.json").read_text()).get("trainer", {})
        step, tokens = trainer.get("step", step), trainer.get("tokens")
    return Point(series=series, label=label, path=folder, step=step, tokens=tokens, identity=folder_identity(folder))


def collect_points(sources: Sequence[str], every: int = 1, log: Callable = print) -> list[Point]:
    """The checkpoints named by `sources` (module docstring), in series order."""
    if every < 1:
        raise ConfigError(f"every must be at least 1, got {every}")
    points: list[Point] = []
    for s in sources:
        p = Path(s)
        if (p / "checkpoints").is_dir():
            points.extend(_run_points(p, every, log))
        else:
            points.append(_model_point(str(s)))

    def order(pt: Point) -> tuple:
        m = _REVISION.match(pt.label)
        return (_PHASE_ORDER[m.group(1)], int(m.group(2))) if m else (-1, pt.tokens or 0)
    series = list(dict.fromkeys(pt.series for pt in points))
    return [pt for name in series for pt in sorted((x for x in points if x.series == name), key=order)]


def track_settings(tracks: Sequence[str], overrides: Sequence[str] | None = None) -> dict[str, Any]:
    """{track name: its settings dataclass}, with `track.field=value` overrides applied (aliases such as
    `classify` read as the track's name, in `tracks` and in the overrides)."""
    tracks = [canonical_name(t) for t in tracks]
    unknown = [t for t in tracks if t not in TRACKS]
    if unknown or not tracks:
        raise ConfigError(f"unknown track(s) {unknown or tracks}: choose from {', '.join(TRACKS)}")
    raw = apply_overrides({t: {} for t in tracks}, canonical_overrides(list(overrides or [])))
    extra = [k for k in raw if k not in tracks]
    if extra:
        raise ConfigError(f"override for {', '.join(extra)}, which is not among --tracks {','.join(tracks)}")
    return {t: build(TRACKS[t].settings, raw[t], t) for t in tracks}


def _metrics(track: str, result: dict[str, Any], where: str) -> dict[str, float]:
    avg = (result.get("average") or {}).get("mean")
    out: dict[str, Any] = {track: avg}  # values as the result JSON holds them: checked below
    for name, task in (result.get("tasks") or {}).items():
        if len(result["tasks"]) > 1:
            out[f"{track}-{name}"] = task.get("score")
    bad = [k for k, v in out.items() if v is None or not math.isfinite(float(v))]
    if bad:
        raise DataError(f"{where}: {track} gave no finite score for {', '.join(bad)} (no data, or NaN)")
    return {k: float(v) for k, v in out.items()}


def _evaluate(point: Point, name: str, settings: Any, data_root: str | None, device: Any, ranks: Any) -> dict[str, Any]:
    # the tracks (torch, transformers) are imported when a checkpoint is actually evaluated, not for a cache hit
    from transformers import AutoTokenizer

    from twinlm.eval.common import load_for_eval
    tok = AutoTokenizer.from_pretrained(point.tokenizer) if point.tokenizer else None
    mntp = (point.objective == "mntp") if point.objective else None
    loaded = load_for_eval(str(point.path), tok, mntp=mntp, device=device)
    t = TRACKS[name]
    options: dict[str, Any] = {"mntp": mntp} if t.mntp else {}
    if t.ranks:
        options["ranks"] = ranks
    return t.run(loaded, settings, data_root=data_root, log=None, device=device, **options)


def cache_key(point: Point, track: str, settings: Any, data_root: str | None, device_type: str) -> str:
    """The cache key of one (checkpoint, track) result: the checkpoint's identity, the track and its settings,
    the tokenizer, the objective, the data root, and the device type when it is not the CPU (a GPU's bf16
    result is not a CPU's fp32 one; CPU keys are those of caches written before devices were recorded)."""
    payload: dict[str, Any] = {"identity": point.identity, "track": track, "settings": asdict(settings),
                               "tokenizer": point.tokenizer, "objective": point.objective, "data_root": data_root}
    if device_type != "cpu":
        payload["device"] = device_type
    return hashlib.sha256(dumps_json(payload).encode()).hexdigest()


def _cached(out: Path, key: str) -> dict[str, Any] | None:
    cached = out / "cache" / f"{key[:24]}.json"
    if cached.is_file():
        entry = json.loads(cached.read_text())
        if entry.get("key") == key:
            return entry["result"]
    return None


def _verify(point: Point) -> str | None:
    """None when the checkpoint matches its manifest, else the error's message."""
    return _verify_folder(point.path)


def _verify_folder(folder: Path) -> str | None:
    # the train package is imported only for checkpoints (its checkpoint format)
    from twinlm.train.checkpoint import verify
    try:
        verify(folder)
    except CorruptCheckpointError as e:
        return str(e)
    return None


def curve(sources: Sequence[str], tracks: Sequence[str], out: str | Path, *, every: int = 1,
          overrides: Sequence[str] | None = None, data_root: str | None = None, log: Callable = print,
          device: Any = None, ranks: Any = None) -> dict:
    """Evaluate every point of `sources` on `tracks`; write the table and the plots to `out` (module
    docstring). Returns the curve.json object.

    Every track runs on `device` (twinlm.eval.device.resolve_device: None is this rank's accelerator when there
    is one, else the CPU), whose type is part of the cache key (`cache_key`). Under torchrun (`ranks` None:
    twinlm.eval.ranks.ranks() joins the job) the uncached (checkpoint, track) evaluations are dealt out among
    the ranks, round robin within each track, each evaluated whole by one rank (the tracks that share their own
    work get `Ranks()`); when there are fewer of them than ranks (every track shares its own work,
    `Track.ranks`), each is run by all ranks together instead. Checkpoint manifests are checked the same way.
    The results are gathered, and rank 0 alone writes the cache files, the tables and the plots; every rank
    returns rank 0's curve.json object, equal to one process's."""
    # torch (device, process group) and the model config reader are imported when a curve is made, not for --help
    from twinlm.eval.device import resolve_device
    from twinlm.eval.ranks import Ranks
    from twinlm.eval.ranks import ranks as job_ranks
    from twinlm.loading import read_config
    r = job_ranks() if ranks is None else ranks
    dev = resolve_device(device)
    say = log if r.writes else (lambda *_: None)
    out = Path(out)
    settings = track_settings(tracks, overrides)
    points = collect_points(sources, every, say)
    results: dict[tuple[int, str], dict[str, Any]] = {}
    jobs: list[tuple[int, str, str]] = []  # (point index, track, cache key) of every result not cached
    unreadable: dict[int, str] = {}  # checkpoints whose config cannot be read: reported and skipped
    for i, pt in enumerate(points):
        try:
            pt.arch = "decoder" if read_config(pt.path).causal else "encoder"
        except TwinlmError as e:
            if not pt.checkpoint:
                raise
            unreadable[i] = _verify(pt) or str(e)
            continue
        for track, cfg in settings.items():
            key = cache_key(pt, track, cfg, data_root, dev.type)
            result = _cached(out, key)
            if result is None:
                jobs.append((i, track, key))
            else:
                results[(i, track)] = result
    # rank 0's view of the cache decides, the same on every rank (its cached results too: a rank on another node
    # may not see rank 0's cache folder)
    jobs, results = r.gather((jobs, results))[0]
    need = sorted({i for i, _, _ in jobs if points[i].checkpoint})  # checked before they are evaluated
    verdicts = r.collect(len(need), {k: _verify(points[need[k]]) for k in r.mine(need)})
    corrupt = {need[k] for k, message in enumerate(verdicts) if message} | set(unreadable)
    for message in [*unreadable.values(), *verdicts]:
        if message:
            say(f"warning: skipping {message}")
    jobs = [j for j in jobs if j[0] not in corrupt]
    together = r.world > 1 and len(jobs) < r.world and all(TRACKS[t].ranks for _, t, _ in jobs)
    by_track = sorted(range(len(jobs)), key=lambda k: (list(settings).index(jobs[k][1]), k))
    mine = range(len(jobs)) if together else sorted(by_track[j] for j in r.mine(by_track))
    done = {}
    for k in mine:
        i, track, _ = jobs[k]
        pt = points[i]
        (say if together else log)(f"[{i + 1}/{len(points)}] {pt.series} {pt.label}: {track}"
                                   + (f" (rank {r.rank})" if r.world > 1 and not together else ""))
        done[k] = _evaluate(pt, track, settings[track], data_root, dev, r if together else Ranks())
    evaluated = [done[k] for k in range(len(jobs))] if together else r.collect(len(jobs), done)
    for (i, track, key), result in zip(jobs, evaluated):
        if r.writes:
            write_json(out / "cache" / f"{key[:24]}.json",
                       {"key": key, "path": str(points[i].path), "track": track, "result": result})
        results[(i, track)] = result
    kept = [(i, p) for i, p in enumerate(points) if i not in corrupt]
    if not kept:
        raise MissingArtifactError("no checkpoint could be evaluated (every one failed its manifest)")
    for i, pt in kept:
        for track in settings:
            pt.metrics.update(_metrics(track, results[(i, track)], f"{pt.series} {pt.label}"))
    points = [p for _, p in kept]
    table = [{"series": p.series, "arch": p.arch, "label": p.label, "step": p.step, "tokens": p.tokens,
              "path": str(p.path), "metrics": p.metrics} for p in points]
    metric_names = list(dict.fromkeys(m for p in points for m in p.metrics))
    summary = {"tracks": list(settings), "settings": {t: asdict(c) for t, c in settings.items()},
               "points": table, "metrics": metric_names, "evaluated": len(jobs),
               "cached": len(points) * len(settings) - len(jobs)}
    if r.writes:
        try:
            write_json(out / "curve.json", summary)
            _write_tables(out, points, metric_names)
            summary["plots"] = [str(_plot(out, points, m)) for m in metric_names]
        except OSError as e:
            if not is_disk_full(e):
                raise
            raise OutOfSpace(f"the disk holding {out} is full: the curve's tables and plots were not all written "
                             f"(each file is whole or absent; the evaluations are cached in {out / 'cache'}): free "
                             "space and run the same command again, which reuses them") from e
    return r.gather(summary)[0]


def _write_tables(out: Path, points: list[Point], metrics: list[str]) -> None:
    head = ["series", "arch", "label", "step", "tokens"] + metrics
    rows: list[list[Any]] = [[p.series, p.arch, p.label, p.step, p.tokens] + [p.metrics.get(m) for m in metrics]
                             for p in points]
    buf = _io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([head, *rows])
    write_bytes(out / "curve.csv", buf.getvalue())

    def fmt(v: Any) -> str:
        return "" if v is None else f"{v:.4f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    write_bytes(out / "curve.md", "\n".join(md) + "\n")


def _plot(out: Path, points: list[Point], metric: str) -> Path:
    # matplotlib is imported for plotting only (and without a display)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    archs = [a for a in ("encoder", "decoder") if any(p.arch == a for p in points)]
    by_tokens = all(p.tokens is not None for p in points)
    fig, axes = plt.subplots(1, len(archs), figsize=(6 * len(archs), 4), squeeze=False, sharey=True)
    for ax, arch in zip(axes[0], archs):
        for series in dict.fromkeys(p.series for p in points if p.arch == arch):
            pts = [p for p in points if p.series == series and p.arch == arch and metric in p.metrics]
            xs = [p.tokens for p in pts] if by_tokens else list(range(len(pts)))
            ax.plot(xs, [p.metrics[metric] for p in pts], marker="o", label=series)
            if not by_tokens:
                ax.set_xticks(xs, [p.label for p in pts], rotation=45, ha="right", fontsize=7)
        ax.set_title(arch)
        ax.set_xlabel("tokens seen" if by_tokens else "checkpoint")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel(metric)
    fig.tight_layout()
    path = out / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', metric)}.png"
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path
