"""The paper's three findings (REFERENCE §3), judged on measured scores with their spread over seeds, and
what pre-training taught (each pre-trained model against its random-initialisation control and the best
n-gram control on bits per byte and minimal pairs).

A finding is never reported as a bare "reproduced": each comparison states its margin, the spread it
must clear, and how many spreads the margin is, so a reader sees how far it is from being resolved. On
bits per byte and minimal pairs the spread is the bootstrap standard error of each score (documents or
pairs resampled), combined as for seeds; on bits per byte lower is better, so margins there are the
control's bits minus the model's (positive: the model is better).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# A margin counts as resolved when it exceeds this many combined standard deviations.
RESOLVED_AT = 2.0


@dataclass(frozen=True)
class Score:
    mean: float
    std: float = 0.0  # over seeds; 0 when a single deterministic run
    n: int = 1

    @classmethod
    def of(cls, values: list[float]) -> Score:
        if not values:
            raise ValueError("no values to summarise")
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
        return cls(mean, math.sqrt(var), len(values))


@dataclass(frozen=True)
class Comparison:
    claim: str  # e.g. "encoder > decoder on classification"
    winner: str
    loser: str
    track: str
    margin: float  # winner.mean - loser.mean (positive supports the claim)
    spread: float  # combined standard error-like spread of the two means
    verdict: str  # "reproduced", "contradicted", or "unresolved"

    @property
    def spreads(self) -> float:
        return self.margin / self.spread if self.spread > 0 else math.copysign(math.inf, self.margin or 1.0)

    def as_dict(self) -> dict:
        return {**asdict(self), "spreads": None if math.isinf(self.spreads) else round(self.spreads, 2)}


def compare(claim: str, track: str, winner: str, loser: str, scores: dict[str, dict[str, Score]]) -> Comparison | None:
    """`scores[model][track]`; None when either side was not measured."""
    a, b = scores.get(winner, {}).get(track), scores.get(loser, {}).get(track)
    if a is None or b is None:
        return None
    margin = a.mean - b.mean
    spread = math.sqrt(a.std ** 2 + b.std ** 2)
    if spread == 0 and min(a.n, b.n) < 2 and not (a.std or b.std):
        verdict = "unresolved"  # one seed each: no spread to judge the margin against
    elif spread == 0:
        verdict = "reproduced" if margin > 0 else ("contradicted" if margin < 0 else "unresolved")
    elif margin > RESOLVED_AT * spread:
        verdict = "reproduced"
    elif margin < -RESOLVED_AT * spread:
        verdict = "contradicted"
    else:
        verdict = "unresolved"
    return Comparison(claim, winner, loser, track, margin, spread, verdict)


FINDINGS = {
    "1. encoders beat same-size decoders on classification and retrieval": [
        ("encoder > decoder on classification", "classification", "encoder", "decoder"),
        ("encoder > decoder on retrieval", "retrieval", "encoder", "decoder"),
    ],
    "2. decoders beat same-size encoders on generation": [
        ("decoder > encoder on generative tasks", "generative", "decoder", "encoder"),
    ],
    "3. cross-objective training trails the native model": [
        ("encoder > enc-from-dec on classification", "classification", "encoder", "enc-from-dec"),
        ("encoder > enc-from-dec on retrieval", "retrieval", "encoder", "enc-from-dec"),
        ("decoder > dec-from-enc on generative tasks", "generative", "decoder", "dec-from-enc"),
    ],
}

CONTROLS = [
    # Pre-training has to beat its own controls before any architecture comparison means anything.
    ("encoder > random-init encoder on {track}", "encoder", "random-encoder"),
    ("decoder > random-init decoder on {track}", "decoder", "random-decoder"),
    ("encoder > bag-of-words on {track}", "encoder", "bag-of-words"),
    ("decoder > bag-of-words on {track}", "decoder", "bag-of-words"),
]


# What pre-training taught: each pre-trained model, the random-initialisation control of its architecture.
TAUGHT = {"encoder": "random-encoder", "decoder": "random-decoder", "enc-from-dec": "random-encoder",
          "dec-from-enc": "random-decoder"}
NGRAM_CONTROLS = ("unigram", "bigram", "trigram")
INTRINSIC = {"bpb": "bits per byte", "pairs": "minimal pairs"}
LOWER_IS_BETTER = {"bpb"}
# The small-scale reading of finding 2 where the paper's generative tasks cannot see a difference.
PROXIES = [("2. decoders beat same-size encoders on generation",
            "decoder > encoder on minimal pairs (proxy for generative ability)", "pairs", "decoder", "encoder",
            "generative")]


def _oriented(scores: dict[str, dict[str, Score]], track: str) -> dict[str, dict[str, Score]]:
    """`scores` restricted to `track` with higher = better (bits per byte negated)."""
    sign = -1.0 if track in LOWER_IS_BETTER else 1.0
    return {m: {track: Score(sign * per[track].mean, per[track].std, per[track].n)}
            for m, per in scores.items() if track in per}


def taught(scores: dict[str, dict[str, Score]]) -> dict:
    """Each pre-trained model against its random-init control and the best n-gram control, on bits per byte
    and minimal pairs. `best_ngram[track]` is the n-gram control that scores best there."""
    rows, best = [], {}
    for track, label in INTRINSIC.items():
        oriented = _oriented(scores, track)
        ngrams = [n for n in NGRAM_CONTROLS if n in oriented]
        if ngrams:
            best[track] = max(ngrams, key=lambda n: oriented[n][track].mean)
        for model, control in TAUGHT.items():
            for other, what in ((control, "random init"), (best.get(track), f"{best.get(track)} control")):
                row = compare(f"{model} beats {what} on {label}", track, model, other, oriented) if other else None
                if row:
                    rows.append({**row.as_dict(), "model": model, "control": other,
                                 "kind": "random-init" if other == control else "n-gram"})
    return {"comparisons": rows, "best_ngram": best, "lower_is_better": sorted(LOWER_IS_BETTER)}


def proxies(scores: dict[str, dict[str, Score]], judged_findings: list[dict]) -> list[dict]:
    """The proxy comparisons, each with the verdict of the finding it stands in for."""
    out = []
    for finding, claim, track, winner, loser, paper_track in PROXIES:
        row = compare(claim, track, winner, loser, _oriented(scores, track))
        if row:
            paper = next((f["verdict"] for f in judged_findings if f["finding"] == finding), "not measured")
            out.append({**row.as_dict(), "finding": finding, "paper_track": paper_track, "paper_verdict": paper})
    return out


def judge(scores: dict[str, dict[str, Score]]) -> dict:
    """All findings and controls. A finding is reproduced only when all its comparisons are."""
    findings = []
    for title, claims in FINDINGS.items():
        rows = [c for c in (compare(claim, track, win, lose, scores) for claim, track, win, lose in claims) if c]
        verdicts = {r.verdict for r in rows}
        if not rows:
            verdict = "not measured"
        elif verdicts == {"reproduced"}:
            verdict = "reproduced"
        elif "contradicted" in verdicts and "reproduced" not in verdicts:
            verdict = "contradicted"
        else:
            verdict = "unresolved"
        findings.append({"finding": title, "verdict": verdict, "comparisons": [r.as_dict() for r in rows]})
    tracks = sorted({t for per_model in scores.values() for t in per_model})
    controls = []
    for track in tracks:
        for template, winner, loser in CONTROLS:
            row = compare(template.format(track=track), track, winner, loser, scores)
            if row:
                controls.append(row.as_dict())
    return {"resolved_at_spreads": RESOLVED_AT, "findings": findings, "controls": controls}


def findings_markdown(judged: dict) -> str:
    lines = [f"A comparison is resolved when its margin exceeds {judged['resolved_at_spreads']:g}× the combined "
             "spread over seeds; `spreads` says how far it is.", ""]
    header = "| comparison | margin | spread | spreads | verdict |\n|---|---|---|---|---|"
    for finding in judged["findings"]:
        lines += [f"### {finding['finding']}: **{finding['verdict']}**", "", header]
        lines += [_row(c) for c in finding["comparisons"]] + [""]
    if judged["controls"]:
        lines += ["### Controls: does pre-training beat random initialisation and bag-of-words?", "", header]
        lines += [_row(c) for c in judged["controls"]] + [""]
    return "\n".join(lines)


def taught_markdown(t: dict, proxy_rows: list[dict]) -> str:
    """The "what pre-training taught" section's comparison tables."""
    header = "| comparison | margin | spread | spreads | verdict |\n|---|---|---|---|---|"
    lines = ["Margins are the model's advantage (bits per byte: the control's bits minus the model's; minimal pairs: "
             "accuracy points); spread is the combined bootstrap standard error.", ""]
    if t["best_ngram"]:
        lines += ["Best n-gram control: " + ", ".join(f"{INTRINSIC[k]}: `{v}`" for k, v in t["best_ngram"].items()),
                  ""]
    lines += [header] + [_row(c) for c in t["comparisons"]] + [""]
    if proxy_rows:
        lines += ["### Finding 2 at this scale, read on minimal pairs (a proxy, not the paper's measure)", "",
                  "The paper's generative tasks are the measure of finding 2; where they are at chance they cannot "
                  "tell the two apart, and the minimal pairs stand in as the small-scale reading of generative "
                  "ability.", "", header]
        lines += [_row(c) for c in proxy_rows]
        lines += [""] + [f"On the paper's own {c['paper_track']} tasks this finding is **{c['paper_verdict']}**."
                         for c in proxy_rows] + [""]
    return "\n".join(lines)


def _row(c: dict) -> str:
    spreads = "∞" if c["spreads"] is None else f"{c['spreads']:+.2f}"
    return f"| {c['claim']} | {c['margin']:+.2f} | {c['spread']:.2f} | {spreads} | {c['verdict']} |"
