"""`twinlm compare`: result JSONs of the eval tracks (and training runs' metrics.jsonl) side by side as
Markdown and JSON tables and PNG plots, in the manner of the paper's figures: per task, encoder vs
decoder vs cross-objective models, grouped by size, outside baselines as reference lines; and the
training loss curves.

Inputs: result files (`{"track", "model", "tasks", ...}`) or folders searched recursively for them and
for `metrics.jsonl` (one JSON object per optimizer step with `loss` and `step` / `tokens`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from twinlm.errors import DataError, MissingArtifactError
from twinlm.io import write_bytes, write_json

VARIANT_ORDER = ["encoder", "decoder", "enc-from-dec", "dec-from-enc", "random-encoder", "random-decoder",
                 "bag-of-words", "minilm", "unigram", "bigram", "trigram"]
COLORS = {"encoder": "#1f77b4", "decoder": "#d62728", "enc-from-dec": "#7fb2e5", "dec-from-enc": "#f08a8a",
          "random-encoder": "#9e9e9e", "random-decoder": "#5e5e5e", "bag-of-words": "#2ca02c", "minilm": "#9467bd",
          "unigram": "#17becf", "bigram": "#bcbd22", "trigram": "#ff7f0e"}
BASELINES = {"bag-of-words", "minilm"}
NGRAMS = {"unigram", "bigram", "trigram"}  # controls fitted by counting: no trained parameters, no size
TRACK_ORDER = ["classification", "retrieval", "generative", "bpb"]


def _is_result(obj) -> bool:
    return isinstance(obj, dict) and "track" in obj and isinstance(obj.get("tasks"), dict) and "model" in obj


def collect(paths: Iterable[str | Path]) -> tuple[list[dict], list[tuple[str, Path]]]:
    """(result dicts, [(run label, metrics.jsonl path)])."""
    results, curves = [], []
    for p in map(Path, paths):
        if not p.exists():
            raise MissingArtifactError(f"{p}: no such file or folder (give eval result files or folders holding them)")
        files = [p] if p.is_file() else sorted(p.rglob("*.json"))
        for f in files:
            if f.name.endswith(".tmp") or f.suffix != ".json":
                continue
            try:
                obj = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                if f == p:
                    raise DataError(f"{p}: not a JSON result file") from None
                continue
            if _is_result(obj):
                obj.setdefault("_source", str(f))
                results.append(obj)
            elif f == p:
                raise DataError(f"{p}: not an eval result (needs track, model, tasks)")
        if p.is_dir():
            for m in sorted(p.rglob("metrics.jsonl")):
                curves.append((_run_label(m, p), m))
    return results, curves


GENERIC_DIRS = {"run", "runs", "final", "out", "output", "train"}


def _run_label(metrics: Path, root: Path) -> str:
    """The run folder's name, relative to the input folder; generic names ("run") take their parent's."""
    folder = metrics.parent
    rel = folder.relative_to(root) if folder != root else Path(root.name)
    parts = [p for p in rel.parts if p not in GENERIC_DIRS]
    if not parts:
        parts = [p for p in folder.resolve().parts if p not in GENERIC_DIRS][-1:]
    return "/".join(parts) or folder.name


def _variant(r: dict) -> str:
    return r["model"].get("variant") or r["model"].get("arch") or "model"


def _size(r: dict) -> str:
    return r["model"].get("size") or "?"


def _params(r: dict) -> float:
    return float(r["model"].get("params") or 0)


def table(results: Sequence[dict]) -> list[dict]:
    """One row per (track, task, variant, size): headline score mean and std."""
    rows = []
    for r in results:
        for task, m in r["tasks"].items():
            score = m.get("score", m.get(m.get("headline", ""), None))
            if score is None:
                continue
            rows.append({"track": r["track"], "task": task, "metric": m.get("headline", "score"),
                         "variant": _variant(r), "size": _size(r), "params": _params(r),
                         "mean": float(score), "std": float(m.get("score_std", m.get("stderr", 0.0)) or 0.0),
                         "source": r.get("_source")})
        avg = r.get("average") or {}
        if "mean" in avg and len(r["tasks"]) > 1:
            rows.append({"track": r["track"], "task": "average", "metric": avg.get("metric", "mean"),
                         "variant": _variant(r), "size": _size(r), "params": _params(r),
                         "mean": float(avg["mean"]), "std": float(avg.get("std") or 0.0), "source": r.get("_source")})
    return rows


def _vkey(v: str) -> tuple:
    return (VARIANT_ORDER.index(v) if v in VARIANT_ORDER else len(VARIANT_ORDER), v)


def markdown(rows: list[dict]) -> str:
    lines = ["# twinlm comparison", "",
             "Mean ± spread per task (spread: std over seeds; for zero-shot generative scores, the standard "
             "error over examples). bpb: lower is better.", ""]
    for track in sorted({r["track"] for r in rows}, key=lambda t: (TRACK_ORDER.index(t) if t in TRACK_ORDER else 9, t)):
        trows = [r for r in rows if r["track"] == track]
        cols = sorted({(r["params"], r["size"], r["variant"]) for r in trows},
                      key=lambda c: (c[2] in BASELINES, c[0], _vkey(c[2])))
        tasks = sorted({r["task"] for r in trows}, key=lambda t: (t == "average", t))
        lines += [f"## {track}", "", "| task | metric | " + " | ".join(f"{v} {s}" for _, s, v in cols) + " |",
                  "|---|---|" + "---|" * len(cols)]
        for task in tasks:
            cells, metric = [], ""
            for _, s, v in cols:
                hit = [r for r in trows if r["task"] == task and r["size"] == s and r["variant"] == v]
                if hit:
                    metric = hit[0]["metric"]
                    cells.append(f"{hit[0]['mean']:.2f} ± {hit[0]['std']:.2f}" if track != "bpb"
                                 else f"{hit[0]['mean']:.4f}")
                else:
                    cells.append("—")
            name = f"**{task}**" if task == "average" else task
            lines.append(f"| {name} | {metric} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _pyplot():
    """pyplot with the file-only Agg backend. Imported here, not at the top: importing pyplot picks a GUI backend
    for the whole process, which a library must not do to a program that merely imports it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _models_and_references(trows: list[dict]) -> tuple[list[dict], list[str]]:
    """-> (rows drawn as bars per model size, variants drawn as reference lines): the baselines and the
    n-gram controls, which have no model size to stand at."""
    refs = sorted({r["variant"] for r in trows if r["variant"] in BASELINES | NGRAMS}, key=_vkey)
    return [r for r in trows if r["variant"] not in refs], refs


def _plot_track(track: str, trows: list[dict], out: Path) -> Path:
    plt = _pyplot()

    tasks = sorted({r["task"] for r in trows}, key=lambda t: (t != "average", t))
    models, refs = _models_and_references(trows)
    sizes = sorted({(r["params"], r["size"]) for r in models})
    variants = sorted({r["variant"] for r in models}, key=_vkey)
    ncols = min(4, len(tasks))
    nrows = math.ceil(len(tasks) / ncols)
    height = 3.4 * nrows + 0.9  # 0.9 inch on top for the title and the legend
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, height), squeeze=False)
    width = 0.8 / max(1, len(variants))
    for ax, task in zip(axes.flat, tasks):
        for vi, v in enumerate(variants):
            xs, ys, es = [], [], []
            for si, (_, s) in enumerate(sizes):
                hit = [r for r in models if r["task"] == task and r["variant"] == v and r["size"] == s]
                if hit:
                    xs.append(si - 0.4 + width * (vi + 0.5))
                    ys.append(hit[0]["mean"])
                    es.append(hit[0]["std"])
            if xs:
                ax.bar(xs, ys, width=width * 0.95, yerr=es, capsize=2, color=COLORS.get(v), label=v)
        for b in refs:
            hit = [r for r in trows if r["task"] == task and r["variant"] == b]
            if hit:
                ax.axhline(hit[0]["mean"], ls="--", lw=1.2, color=COLORS.get(b), label=b)
        metric = next((r["metric"] for r in trows if r["task"] == task), "")
        ax.set_title(f"{task}", fontsize=10)
        ax.set_ylabel(metric if len(metric) < 30 else "score", fontsize=8)
        ax.set_xticks(range(len(sizes)))
        ax.set_xticklabels([f"{s}\n{p / 1e6:.1f}M" for p, s in sizes], fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    handles: dict[str, Any] = {}  # legend label -> artist
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    top = 1 - 0.9 / height
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.suptitle(f"{track}" + (" (bits per byte, lower is better)" if track == "bpb" else ""),
                 y=1 - 0.12 / height, fontsize=12)
    fig.legend(list(handles.values()), list(handles), loc="upper center", bbox_to_anchor=(0.5, 1 - 0.4 / height),
               ncol=min(8, len(handles)), fontsize=9, frameon=False)
    path = out / f"{track}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def read_curve(path: Path) -> tuple[list[float], list[float], str]:
    xs, ys, xkey = [], [], "step"
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if rows and all("tokens" in r for r in rows if "loss" in r):
        xkey = "tokens"
    for i, r in enumerate(rows):
        if "loss" in r and r["loss"] is not None and math.isfinite(float(r["loss"])):
            xs.append(float(r.get(xkey, r.get("step", i))))
            ys.append(float(r["loss"]))
    return xs, ys, xkey


def _plot_curves(curves: list[tuple[str, Path]], out: Path) -> Path | None:
    plt = _pyplot()

    data = [(label, *read_curve(p)) for label, p in curves]
    data = [d for d in data if d[1]]
    if not data:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    xkey = "tokens" if all(d[3] == "tokens" for d in data) else "step"
    for label, xs, ys, _ in data:
        low = label.lower()
        color = next((COLORS[v] for v in ("enc-from-dec", "dec-from-enc", "encoder", "decoder") if v in low), None)
        ax.plot(xs, ys, label=label, lw=1.2, color=color,
                ls="--" if ("from" in low or "cross" in low) else "-")
    ax.set_xlabel(xkey)
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("training loss")
    fig.tight_layout()
    path = out / "loss_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare(inputs: Sequence[str | Path], out_dir: str | Path) -> dict:
    """Writes `comparison.md`, `comparison.json`, one `<track>.png` per track and `loss_curves.png`;
    returns {"markdown", "json", "plots": [...], "rows": n}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results, curves = collect(inputs)
    if not results and not curves:
        raise DataError(f"no eval results and no metrics.jsonl found in {', '.join(map(str, inputs))}: "
                        "give the files `twinlm eval --out` wrote, or folders holding them")
    rows = table(results)
    md = markdown(rows)
    write_bytes(out / "comparison.md", md + "\n")
    payload = {"rows": rows, "models": _models(results), "curves": [{"run": run, "path": str(p)} for run, p in curves]}
    write_json(out / "comparison.json", payload)
    plots = []
    for track in sorted({r["track"] for r in rows}):
        plots.append(str(_plot_track(track, [r for r in rows if r["track"] == track], out)))
    if curves:
        p = _plot_curves(curves, out)
        if p:
            plots.append(str(p))
    return {"markdown": str(out / "comparison.md"), "json": str(out / "comparison.json"), "plots": plots,
            "rows": len(rows)}


def _models(results) -> list[dict]:
    seen, out = set(), []
    for r in results:
        m = r["model"]
        key = (m.get("variant"), m.get("size"), m.get("path"))
        if key not in seen:
            seen.add(key)
            out.append({k: m.get(k) for k in ("variant", "arch", "size", "params", "path", "objective")})
    return out
