"""Reading task files of your own (JSONL, one object per line): every problem raises `TaskFileError` naming
the file and the line. The formats themselves are the task families' (`read_mc_jsonl`, `read_cls_files`)."""

from __future__ import annotations

import json
from pathlib import Path

from twinlm.errors import TaskFileError


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) of every non-blank line; an empty or missing file is an error."""
    if not path.exists():
        raise TaskFileError(path, None, "file not found")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskFileError(path, lineno, f"not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise TaskFileError(path, lineno, f"expected a JSON object, got {type(row).__name__}")
            rows.append((lineno, row))
    if not rows:
        raise TaskFileError(path, None, "no examples in file")
    return rows


def int_label(path, lineno, value, n: int | None, field_name: str = "label") -> int:
    """An integer index (also from a digit string) in 0..n-1."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        else:
            raise TaskFileError(path, lineno, f"'{field_name}' must be an integer index, got {value!r}")
    if n is not None and not 0 <= value < n:
        raise TaskFileError(path, lineno, f"'{field_name}' {value} is out of range: must be in 0..{n - 1}")
    return value
