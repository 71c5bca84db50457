"""The suite's report: what pre-training taught (against random-init and n-gram controls on bits per byte and
minimal pairs), the three findings judged on measured scores, the controls, every table and plot.

It reads only the suite folder (the eval steps' result files, the training runs' metrics, the step markers)
and what the pipeline passes in (the scale, the model preset, the shards), never the pipeline itself.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from twinlm.configs import parse_count
from twinlm.data.shards import read_meta, read_tokens
from twinlm.errors import DataError
from twinlm.eval.compare import compare
from twinlm.io import write_bytes, write_json
from twinlm.suite.findings import (
    INTRINSIC,
    NGRAM_CONTROLS,
    Score,
    findings_markdown,
    judge,
    proxies,
    taught,
    taught_markdown,
)
from twinlm.suite.provenance import gather
from twinlm.suite.scales import Scale
from twinlm.suite.steps import read_marker

# Which outside baseline stands for "bag-of-words" on each track.
BAG_OF_WORDS = {"classification": "tfidf", "retrieval": "bm25"}
TRACK_UNITS = {"classification": "accuracy / F1 (%)", "retrieval": "nDCG@10 (%)", "generative": "accuracy (%)",
               "bpb": "bits per byte (lower is better)", "pairs": "minimal-pair accuracy (%)"}


def collect_scores(root: Path) -> dict[str, dict[str, Score]]:
    """`scores[model][track]` from every finished eval step under the suite folder."""
    scores: dict[str, dict[str, Score]] = {}
    for folder in sorted(root.glob("eval-*")):
        result_path = folder / "result.json"
        if read_marker(folder) is None or not result_path.exists():
            continue
        result = json.loads(result_path.read_text())
        model = folder.name[len("eval-"):].rsplit("-", 1)[0]
        track = result["track"]
        avg = result["average"]
        n = len(avg.get("per_seed") or []) or 1
        scores.setdefault(model, {})[track] = Score(float(avg["mean"]), float(avg.get("std") or 0.0), n)
    for track, baseline in BAG_OF_WORDS.items():
        if track in scores.get(baseline, {}):
            scores.setdefault("bag-of-words", {})[track] = scores[baseline][track]
    return scores


def score_table(scores: dict[str, dict[str, Score]]) -> str:
    tracks = [t for t in TRACK_UNITS if any(t in per for per in scores.values())]
    lines = ["| model | " + " | ".join(f"{t} ({TRACK_UNITS[t]})" for t in tracks) + " |",
             "|---|" + "---|" * len(tracks)]
    for model in sorted(scores, key=_model_order):
        if model == "bag-of-words":
            continue
        cells = []
        for t in tracks:
            s = scores[model].get(t)
            cells.append("—" if s is None else (f"{s.mean:.3f} ± {s.std:.3f}" if t == "bpb" else
                                                f"{s.mean:.2f} ± {s.std:.2f}"))
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _model_order(name: str) -> tuple:
    order = ["encoder", "decoder", "enc-from-dec", "dec-from-enc", "random-encoder", "random-decoder",
             *NGRAM_CONTROLS]
    return (order.index(name) if name in order else len(order), name)


def step_times(root: Path) -> list[tuple[str, float]]:
    rows = []
    for marker in sorted(root.glob("*/STEP.json")):
        rows.append((marker.parent.name, float(json.loads(marker.read_text()).get("seconds", 0.0))))
    return rows


def unigram_entropy(shards: Path, max_tokens: int = 5_000_000) -> float:
    """Entropy (nats) of the token distribution of a shard folder: the loss of a model that ignores context."""
    tokens = read_tokens(shards, read_meta(shards)["dtype"])
    if not len(tokens):
        raise DataError(f"{shards}: no tokens, so no unigram entropy; prepare the shards again")
    counts = np.bincount(np.asarray(tokens[:max_tokens]))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def training_losses(root: Path) -> dict[str, dict]:
    """{run: {"tokens", "loss"}}: each training run's tokens seen and final loss (mean of its last 10 steps)."""
    out = {}
    for metrics in sorted(root.glob("train-*/run/metrics.jsonl")):
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if not rows:
            continue
        last = [r["loss"] for r in rows[-10:] if r.get("loss") is not None and math.isfinite(r["loss"])]
        out[metrics.parent.parent.name[len("train-"):]] = {"tokens": rows[-1]["tokens"],
                                                          "loss": sum(last) / max(1, len(last))}
    return out


def training_table(losses: dict[str, dict], entropy: float | None) -> str:
    """Final training loss of each run (`training_losses`) against the context-free loss."""
    lines = ["| run | tokens | final loss (last 10 steps) | below the unigram entropy by |", "|---|---|---|---|"]
    for run, row in losses.items():
        gap = "—" if entropy is None else f"{entropy - row['loss']:+.2f} nats"
        lines.append(f"| {run} | {row['tokens']:,} | {row['loss']:.2f} | {gap} |")
    return "\n".join(lines)


def intrinsic_results(root: Path) -> dict[str, dict[str, dict]]:
    """{model: {track: result}} of the bits-per-byte and minimal-pairs steps."""
    out: dict[str, dict[str, dict]] = {}
    for track in INTRINSIC:
        for path in sorted(root.glob(f"eval-*-{track}/result.json")):
            if read_marker(path.parent) is None:
                continue
            out.setdefault(path.parent.name[len("eval-"):-len(track) - 1], {})[track] = json.loads(path.read_text())
    return out


def intrinsic_table(results: dict[str, dict[str, dict]]) -> str:
    """Bits per byte and minimal-pair accuracy (per family) of every model, with 95% intervals."""
    families = sorted({f for per in results.values() for f in per.get("pairs", {}).get("tasks", {})})
    lines = ["| model | bits per byte [95% CI] | minimal pairs (%) [95% CI] | " + " | ".join(families) + " |",
             "|---|---|---|" + "---|" * len(families)]
    for model in sorted(results, key=_model_order):
        per = results[model]
        cells = []
        if "bpb" in per:
            (b,) = per["bpb"]["tasks"].values()
            ci = b.get("bpb_ci95")
            cells.append(f"{b['bpb']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
        else:
            cells.append("—")
        if "pairs" in per:
            avg = per["pairs"]["average"]
            cells.append(f"{avg['mean']:.1f} [{avg['ci95'][0]:.1f}, {avg['ci95'][1]:.1f}]")
            tasks = per["pairs"]["tasks"]
            cells += [f"{tasks[f]['accuracy']:.1f} [{tasks[f]['ci95'][0]:.0f}, {tasks[f]['ci95'][1]:.0f}]"
                      if f in tasks else "—" for f in families]
        else:
            cells += ["—"] * (1 + len(families))
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def intrinsic_summary(results: dict[str, dict[str, dict]]) -> dict[str, dict[str, dict]]:
    """{model: {"bpb": {"value", "ci95"}, "pairs": {"value", "ci95"}}}: the figures of `intrinsic_table`, and
    the tokens an n-gram control counted ("trained_tokens"), for report.json."""
    out: dict[str, dict[str, dict]] = {}
    for model, per in results.items():
        row: dict[str, dict] = {}
        if "bpb" in per:
            (b,) = per["bpb"]["tasks"].values()
            row["bpb"] = {"value": b["bpb"], "ci95": b.get("bpb_ci95")}
        if "pairs" in per:
            avg = per["pairs"]["average"]
            row["pairs"] = {"value": avg["mean"], "ci95": avg.get("ci95")}
        seen = [p["model"].get("trained_tokens") for p in per.values() if p["model"].get("arch") == "n-gram"]
        if seen and seen[0]:
            row["trained_tokens"] = {"value": seen[0]}
        out[model] = row
    return out


def provenance_section(prov: dict) -> str:
    """Which code and versions made the report's figures (twinlm.suite.provenance)."""
    made = prov["report"]
    lines = [f"This report was written at commit `{made.get('commit')}`" + (" (with uncommitted changes)"
             if made.get("dirty") else "") + f", Python {made.get('python')}, torch {made.get('torch')}, "
             f"transformers {made.get('transformers')}, on {made.get('cpu')} with {made.get('torch_threads')} "
             "torch threads."]
    if prov["single"] and prov["runs"][0]["provenance"] == made:
        lines.append("Every step was computed by the same code and versions.")
    else:
        lines.append("**The steps were not all computed by this code and these versions** (steps cached from "
                     "another commit or library version keep their figures): " + "; ".join(
                         f"{', '.join(r['steps'])}: commit `{r['provenance'].get('commit')}`"
                         + (" (uncommitted changes)" if r["provenance"].get("dirty") else "")
                         for r in prov["runs"])
                     + ("; recorded nothing: " + ", ".join(prov["unknown"]) if prov["unknown"] else "")
                     + ". Run the suite into an empty folder for figures of one commit.")
    return "\n".join(lines)


def _ngram_note(results: dict[str, dict[str, dict]], scale: Scale) -> str:
    """How much text the n-gram controls counted against how much each model trained on."""
    seen = {m: per[t]["model"].get("trained_tokens") for m, per in results.items() for t in per
            if per[t]["model"].get("arch") == "n-gram"}
    if not seen or not any(seen.values()):
        return ""
    pretrain = sum(parse_count(t) for t in (scale.pretrain_tokens, scale.extension_tokens, scale.decay_tokens))
    return (f"The n-gram controls counted {max(v or 0 for v in seen.values()):,} tokens (every token of the "
            f"pre-training shards, once); each pre-trained model saw {pretrain:,} tokens in its three phases.")


def write_report(folder: Path, *, root: Path, scale: Scale, preset: str, shards: Path, steps: list[str],
                 made_by: dict) -> dict:
    """`report.md` and `report.json` (and the comparison tables and plots) in `folder` for the suite in `root`,
    run at `scale` with model `preset`; `shards` is the pre-training shard folder (for the unigram entropy);
    `steps` names the suite's steps, whose markers say what made them, and `made_by` is this process's
    provenance (twinlm.suite.provenance)."""
    scores = collect_scores(root)
    judged = judge({m: {t: s for t, s in per.items() if t not in INTRINSIC} for m, per in scores.items()
                    if m not in NGRAM_CONTROLS})
    learned = taught(scores)
    proxy_rows = proxies(scores, judged["findings"])
    intrinsic = intrinsic_results(root)
    pairs_cfg = scale.pairs
    results = sorted(str(p) for p in root.glob("eval-*/result.json"))
    runs = sorted(str(p.parent) for p in root.glob("train-*/run/metrics.jsonl"))
    tables = compare(results + runs, folder)
    times = step_times(root)
    total = sum(t for _, t in times)
    plots = [Path(p).name for p in tables["plots"]]
    s = scale
    entropy = unigram_entropy(shards) if (shards / "meta.json").exists() else None
    losses = training_losses(root)
    prov = {"report": made_by, **gather({step: read_marker(root / step) for step in steps if step != folder.name})}
    lines = [
        f"# twinlm suite report: scale `{s.name}`",
        "",
        f"{s.description}. Model preset `{preset}`, {s.tokenizer} tokenizer ({s.vocab_size}), "
        f"pre-training {s.pretrain_tokens} + extension {s.extension_tokens} + decay {s.decay_tokens} tokens "
        f"per model, cross-objective {s.cross_tokens} tokens. Steps took {total / 60:.1f} minutes in all "
        "(cached steps count with the time they took when they ran).",
        "",
        "## What pre-training taught",
        "",
        "Downstream tasks at this budget may sit at chance; intrinsic measures show what the models learned. "
        "Each pre-trained model against the random-initialisation control of its architecture and the best "
        f"n-gram control ({', '.join(scale.ngrams) or 'none'}, interpolated Witten-Bell, fitted on every token of "
        "the pre-training shards) on bits per byte of the held-out split and on minimal pairs built from it "
        + (f"(from `{pairs_cfg.pairs_file}`; " if pairs_cfg.pairs_file else
           f"({', '.join(pairs_cfg.families)}; up to {pairs_cfg.per_family} pairs per family; ")
        + "decoders and n-grams "
        "by log-likelihood, encoders by pseudo-log-likelihood, both per byte). A comparison is resolved beyond "
        "2× its combined bootstrap spread.",
        "",
        intrinsic_table(intrinsic),
        "",
        _ngram_note(intrinsic, scale),
        "",
        taught_markdown(learned, proxy_rows),
        "## The paper's findings at this scale",
        "",
        findings_markdown(judged),
        "## How far training got",
        "",
        "A model that ignores its input can at best predict the unigram distribution: "
        + (f"{entropy:.2f} nats per token on these shards. " if entropy is not None else "")
        + "Until a run's loss is well below that, its representations carry little about the input, and "
        "random-initialisation controls (whose random features still separate tokens) can beat it.",
        "",
        training_table(losses, entropy),
        "",
        "## Scores per track (mean ± spread over seeds; generative: ± standard error)",
        "",
        score_table(scores),
        "",
        "## Per task",
        "",
        Path(tables["markdown"]).read_text(),
        "",
        "## Plots",
        "",
        *[f"![{p}]({p})" for p in plots],
        "",
        "## What made these figures",
        "",
        provenance_section(prov),
        "",
        "## Step times",
        "",
        "| step | seconds |",
        "|---|---|",
        *[f"| {name} | {sec:.0f} |" for name, sec in times],
        "",
    ]
    write_bytes(folder / "report.md", "\n".join(lines))
    payload = {"scale": s.as_dict(), "findings": {**judged, "proxies": proxy_rows}, "taught": learned,
               "unigram_entropy": entropy, "intrinsic": intrinsic_summary(intrinsic), "training": losses,
               "provenance": prov, "written": time.strftime("%Y-%m-%d", time.gmtime()),
               "scores": {m: {t: vars(sc) for t, sc in per.items()} for m, per in scores.items()},
               "step_seconds": dict(times), "plots": plots}
    write_json(folder / "report.json", payload)
    return {"report": str(folder / "report.md"),
            "verdicts": {f["finding"]: f["verdict"] for f in judged["findings"]},
            "taught": {r["claim"]: r["verdict"] for r in learned["comparisons"]}}

