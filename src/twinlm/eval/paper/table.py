"""The paper's table for one model: its headline numbers beside the paper's published row for the same size and
kind, and the difference.

`headline(column, result)` reads a column's headline numbers (percent) from its track's result JSON; `table(…)`
lays them out as the paper does (one row per model, one column per benchmark) with the reference row and the
difference, as a dict (written as JSON) and as Markdown. A column that failed shows `failed`, one whose average
is incomplete `incomplete`: neither is a number, and no difference is taken from them.
"""

from __future__ import annotations

import math
from typing import Any

# (key, header, the paper's column in reference.PAPER or None, the result column it is read from)
METRICS: list[tuple[str, str, str | None, str]] = [
    ("glue", "GLUE avg", "glue", "glue"),
    ("mnli", "MNLI", "mnli", "glue"),
    ("mteb_v2", "MTEB v2 retrieval (nDCG@10)", None, "retrieval"),
    ("msmarco", "MS MARCO dev nDCG@10", "msmarco", "retrieval"),
    ("codesearchnet", "CodeSearchNet nDCG@10", None, "retrieval"),
    ("mldr", "MLDR-en nDCG@10", None, "retrieval"),
    ("generative", "Generative avg", "generative", "generative"),
]


# the table's retrieval columns: the mteb track's aggregates (eval/paper/mteb_eval.py AGGREGATES)
RETRIEVAL_AGGREGATES = {"mteb_v2": "mteb_v2_retrieval", "msmarco": "msmarco_dev", "codesearchnet": "codesearchnet",
                        "mldr": "mldr_en"}


def _pct(v: Any, fraction: bool) -> float | None:
    if v is None:
        return None
    v = float(v)
    if not math.isfinite(v):
        return None
    return 100.0 * v if fraction else v


def headline(column: str, result: dict[str, Any]) -> dict[str, float | None]:
    """The headline numbers (percent) of one column's result: glue -> glue, mnli; retrieval -> mteb_v2, msmarco,
    codesearchnet, mldr; generative -> generative. None where the result has no complete value."""
    if column == "glue":  # scores are fractions (scikit-learn's metrics)
        mnli = (result.get("tasks", {}).get("mnli") or {}).get("score")
        return {"glue": _pct((result.get("average") or {}).get("mean"), True), "mnli": _pct(mnli, True)}
    if column == "retrieval":  # mteb's nDCG@10, a fraction
        agg = result.get("aggregates") or {}
        return {ours: _pct((agg.get(theirs) or {}).get("score"), True) for ours, theirs in RETRIEVAL_AGGREGATES.items()}
    if column == "generative":
        return {"generative": _pct((result.get("average") or {}).get("mean"), False)}
    raise KeyError(column)


def _cell(v: float | None, approx: bool = False) -> str:
    return "—" if v is None else f"{'≈' if approx else ''}{v:.1f}"


def table(model_label: str, row: dict[str, Any], columns: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The table: `row` is reference.paper_row's; `columns` maps a column name to {"result": …} or
    {"error": "..."} (a column not run is absent). Returns {"headers", "model", "paper", "difference",
    "markdown", "notes"}."""
    ours: dict[str, Any] = {}
    status: dict[str, str] = {}
    for key, _, _, column in METRICS:
        entry = columns.get(column)
        if entry is None:
            ours[key], status[key] = None, "not run"
        elif "error" in entry:
            ours[key], status[key] = None, "failed"
        elif key == "mnli" and "mnli" not in entry["result"].get("tasks", {}):
            ours[key], status[key] = None, "not run"
        else:
            value = headline(column, entry["result"]).get(key)
            ours[key], status[key] = value, ("" if value is not None else "incomplete")
    paper: dict[str, Any] = {}
    diff: dict[str, float | None] = {}
    for key, _, paper_key, _ in METRICS:
        pub = row["values"].get(paper_key) if paper_key else None
        paper[key] = pub
        diff[key] = None if pub is None or ours[key] is None else ours[key] - pub["value"]
    headers = [h for _, h, _, _ in METRICS]
    keys = [k for k, _, _, _ in METRICS]
    lines = ["| model | " + " | ".join(headers) + " |", "|---|" + "---|" * len(headers)]
    lines.append(f"| {model_label} | " + " | ".join(
        _cell(ours[k]) if ours[k] is not None else (status[k] or "—") for k in keys) + " |")
    lines.append(f"| paper: {row['note']} | " + " | ".join(
        _cell(paper[k]["value"], paper[k]["approx"]) if paper[k] else "—" for k in keys) + " |")
    lines.append("| difference | " + " | ".join(
        "—" if diff[k] is None else f"{diff[k]:+.1f}" for k in keys) + " |")
    notes = ["Percent. ≈: read off the paper's figures (REFERENCE.md §3). —: not run, or not in the paper's "
             "headline table (the paper reports GLUE averages for encoders only).",
             "The paper's GLUE numbers come from unpublished scripts and sweeps; twinlm runs ModernBERT's GLUE "
             "protocol (eval/paper/glue.py). Differences beyond seed noise are expected for that reason alone.",
             "MNLI is the mean of the matched and mismatched accuracies (ModernBERT's rule); the paper does not say "
             "which of them its MNLI number is."]
    if not row["same_shape"]:
        notes.append(f"This model is not an Ettin shape: the reference row is {row['note']}.")
    return {"headers": dict(zip(keys, headers)), "model": ours, "status": status, "paper": paper,
            "difference": diff, "markdown": "\n".join(lines) + "\n", "notes": notes}


__all__ = ["METRICS", "headline", "table"]
