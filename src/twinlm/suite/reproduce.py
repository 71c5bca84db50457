"""Two suite folders compared figure by figure: does the suite reproduce?

`differences(a, b)` lists every way two runs of the suite disagree in what they computed: a step one has and the
other lacks, a step of another identity, any value of an evaluation step's `result.json`, any row of a training
run's `metrics.jsonl`, and the report's figures (`report.json`: scores, findings, what pre-training taught, the
intrinsic figures, final losses). Values are compared exactly (floats as stored, not within a tolerance).
What is expected to differ between two runs is left out: wall-clock times (`seconds`, a key ending in `_s`,
`tok_per_s` …), where each folder and data file lies (the suite folder's path is read as `<suite>`, a `path`
key is left out), and the report's record of times and of the machine (`step_seconds`, `provenance`, `written`,
`plots`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# keys whose values are timings or throughputs, never figures
TIMING_KEYS = {"seconds", "time", "elapsed", "wall", "tok_per_s", "tokens_per_s", "samples_per_s", "mfu"}
# keys naming where a file lies (a data file under TWINLM_HOME: its content is named by the hash in its name)
PLACE_KEYS = {"path"}
REPORT_FIGURES = ("scores", "findings", "taught", "intrinsic", "training", "unigram_entropy", "scale")


def _timing(key: str) -> bool:
    return key in TIMING_KEYS or key.endswith(("_s", "_seconds", "_per_s"))


def _normal(value: Any, root: Path) -> Any:
    """`value` with timing keys dropped and the suite folder's path (absolute or as given) read as `<suite>`."""
    if isinstance(value, dict):
        return {k: _normal(v, root) for k, v in value.items() if not _timing(k) and k not in PLACE_KEYS}
    if isinstance(value, list):
        return [_normal(v, root) for v in value]
    if isinstance(value, str):
        for form in (str(root.resolve()), str(root)):
            value = value.replace(form, "<suite>")
    return value


def _diff(a: Any, b: Any, where: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{where}.{k}: only in {'the first' if k in a else 'the second'}")
            else:
                _diff(a[k], b[k], f"{where}.{k}", out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{where}[{i}]", out)
    elif not (a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))):
        out.append(f"{where}: {a!r} != {b!r}")


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _jsonl(path: Path) -> list[Any]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _report(path: Path) -> dict[str, Any]:
    return {k: v for k, v in _json(path).items() if k in REPORT_FIGURES}


# what each step folder may hold, and how it is read for comparison
FILES = {"result.json": _json, "report.json": _report, "run/metrics.jsonl": _jsonl}


def differences(a: str | Path, b: str | Path) -> list[str]:
    """Every disagreement between the suite folders `a` and `b` (module docstring); empty when they agree."""
    a, b = Path(a), Path(b)
    out: list[str] = []
    steps = {p.parent.name for root in (a, b) for p in root.glob("*/STEP.json")}
    for step in sorted(steps):
        ma, mb = (root / step / "STEP.json" for root in (a, b))
        if not ma.exists() or not mb.exists():
            out.append(f"{step}: finished only in {a if ma.exists() else b}")
            continue
        if _json(ma)["identity"] != _json(mb)["identity"]:
            out.append(f"{step}: identities differ (other settings or inputs)")
        for name, read in FILES.items():
            fa, fb = a / step / name, b / step / name
            if not fa.exists() and not fb.exists():
                continue
            if not fa.exists() or not fb.exists():
                out.append(f"{step}/{name}: only in {a if fa.exists() else b}")
                continue
            _diff(_normal(read(fa), a), _normal(read(fb), b), f"{step}/{name}", out)
    return out


def report_scores(folder: str | Path) -> dict[str, Any]:
    """The figures of a suite folder's report.json (`REPORT_FIGURES`)."""
    report = _json(Path(folder) / "report" / "report.json")
    return {k: report.get(k) for k in REPORT_FIGURES}
