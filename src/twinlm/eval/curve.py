"""`twinlm eval curve`: evaluate every checkpoint of runs (or a list of model folders / hub revisions) and plot
each metric against the tokens seen, encoders and decoders side by side: training-dynamics curves.

Sources (each argument):
- a run folder (`RUN/checkpoints/step-*` marked COMPLETE): every intact checkpoint, or every k-th
  (`every=k`, the last always included); twinlm checkpoints are loaded as they are (no export needed), the
  tokenizer is the run's (`RUN/final`, else the recipe's `tokenizer`), tokens seen come from each
  checkpoint's `state.json`, MNTP scoring from the recipe's objective; a checkpoint is checked against its
  manifest before it is evaluated (not on a cache hit), and one that fails is reported and skipped;
- a model folder or a hub id `org/name@revision` (twinlm.hub): one point; hub revisions of one repository
  form one series ordered step{N} < ext{N} < decay{N}. Tokens seen are known only for twinlm checkpoints; a
  plot whose series lack them uses the checkpoints' order on its x axis.

Tracks are the eval tracks of twinlm.eval.tracks (`classification`, `retrieval`, `generative`, `bpb`, `pairs`;
`classify` is still accepted) run with their settings dataclass (eval/settings.py), changed by dotted overrides
(`bpb.max_docs=50`, `generative.limit=100`). Each result is
cached under OUT/cache/ keyed by the checkpoint's identity (its manifest, or the folder's file sizes and
times), the track and its settings: a rerun, or one that adds runs or tracks, evaluates only what is new.

Output: OUT/curve.json (every point: series, arch, label, step, tokens, metrics), OUT/curve.csv, OUT/curve.md
and one PNG per metric (`<track>.png` for the track's average, `<track>-<task>.png` for each task), with
one panel per architecture. A metric that is NaN or missing is an error, never a silent gap.
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
from twinlm.errors import ConfigError, CorruptCheckpointError, DataError, MissingArtifactError
from twinlm.eval.tracks import TRACKS, canonical_name, canonical_overrides
from twinlm.hub import parse_hub_id, resolve_model
from twinlm.io import atomic_path, dumps_json, write_bytes, write_json

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


def _folder_identity(folder: Path) -> str:
    manifest = folder / "MANIFEST.sha256"
    if manifest.is_file():  # a twinlm checkpoint: its manifest names every file's sha256
        return "manifest:" + hashlib.sha256(manifest.read_bytes()).hexdigest()
    parts = sorted(f"{p.relative_to(folder)}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                   for p in folder.rglob("*") if p.is_file())
    return "files:" + hashlib.sha256("\n".join([str(folder.resolve())] + parts).encode()).hexdigest()


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
        trainer = read_state(c).get("trainer", {})
        out.append(Point(series=run.name, label=c.name, path=c, step=trainer.get("step"),
                         tokens=trainer.get("tokens"), tokenizer=tok, objective=cfg.get("objective"),
                         identity=_folder_identity(c), checkpoint=True))
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
    return Point(series=series, label=label, path=folder, step=step, tokens=tokens, identity=_folder_identity(folder))


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


def _evaluate(point: Point, name: str, settings: Any, data_root: str | None) -> dict[str, Any]:
    # the tracks (torch, transformers) are imported when a checkpoint is actually evaluated, not for a cache hit
    from transformers import AutoTokenizer

    from twinlm.eval.common import load_for_eval
    tok = AutoTokenizer.from_pretrained(point.tokenizer) if point.tokenizer else None
    mntp = (point.objective == "mntp") if point.objective else None
    loaded = load_for_eval(str(point.path), tok, mntp=mntp)
    t = TRACKS[name]
    options = {"mntp": mntp} if t.mntp else {}
    return t.run(loaded, settings, data_root=data_root, log=None, **options)


def curve(sources: Sequence[str], tracks: Sequence[str], out: str | Path, *, every: int = 1,
          overrides: Sequence[str] | None = None, data_root: str | None = None, log: Callable = print) -> dict:
    """Evaluate every point of `sources` on `tracks`; write the table and the plots to `out` (module
    docstring). Returns the curve.json object."""
    from twinlm.loading import read_config
    from twinlm.train.checkpoint import verify
    out = Path(out)
    settings = track_settings(tracks, overrides)
    points = collect_points(sources, every, log)
    done = 0
    corrupt = []
    for i, pt in enumerate(points):
        pt.arch = "decoder" if read_config(pt.path).causal else "encoder"
        verified = False
        for track, cfg in settings.items():
            key = hashlib.sha256(dumps_json({"identity": pt.identity, "track": track, "settings": asdict(cfg),
                                             "tokenizer": pt.tokenizer, "objective": pt.objective,
                                             "data_root": data_root}).encode()).hexdigest()
            cached = out / "cache" / f"{key[:24]}.json"
            result = None
            if cached.is_file():
                entry = json.loads(cached.read_text())
                if entry.get("key") == key:
                    result = entry["result"]
            if result is None and pt.checkpoint and not verified:
                try:
                    verify(pt.path)
                    verified = True
                except CorruptCheckpointError as e:
                    log(f"warning: skipping {e}")
                    corrupt.append(pt)
                    break
            if result is None:
                log(f"[{i + 1}/{len(points)}] {pt.series} {pt.label}: {track}")
                result = _evaluate(pt, track, cfg, data_root)
                write_json(cached, {"key": key, "path": str(pt.path), "track": track, "result": result})
                done += 1
            pt.metrics.update(_metrics(track, result, f"{pt.series} {pt.label}"))
    points = [p for p in points if p not in corrupt]
    if not points:
        raise MissingArtifactError("no checkpoint could be evaluated (every one failed its manifest)")
    table = [{"series": p.series, "arch": p.arch, "label": p.label, "step": p.step, "tokens": p.tokens,
              "path": str(p.path), "metrics": p.metrics} for p in points]
    metric_names = list(dict.fromkeys(m for p in points for m in p.metrics))
    summary = {"tracks": list(settings), "settings": {t: asdict(c) for t, c in settings.items()},
               "points": table, "metrics": metric_names, "evaluated": done,
               "cached": len(points) * len(settings) - done}
    write_json(out / "curve.json", summary)
    _write_tables(out, points, metric_names)
    summary["plots"] = [str(_plot(out, points, m)) for m in metric_names]
    return summary


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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
