"""Every ```python block of README.md runs as pasted: each in a fresh interpreter, in an empty folder.

An HTML comment on the line right before a block's fence says what the block needs:

- `<!-- readme-test: skip (why) -->`: not run (fetched data, a long run);
- `<!-- readme-test: stand-ins PATH=encoder PATH=decoder … -->`: untrained toy model folders, written as
  `twinlm train` writes `RUN/final` (the model, its tokenizer and conventions, manifest, card), at those paths
  first — the block is about using a folder, not about what is in it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = re.compile(r"<!--\s*readme-test:\s*(.*?)\s*-->")
TIMEOUT_S = 60


def python_blocks(text: str) -> list[tuple[int, str, str]]:
    """(line of the opening fence, the block's code, the marker before it or '') for each ```python block."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip().startswith("```"):
            lang, start = lines[i].strip()[3:].strip(), i
            j = i + 1
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            if j == len(lines):
                raise AssertionError(f"README.md:{start + 1}: a code block that is never closed")
            if lang == "python":
                m = MARKER.fullmatch(lines[start - 1].strip()) if start else None
                blocks.append((start + 1, "\n".join(lines[start + 1:j]) + "\n", m.group(1) if m else ""))
            i = j + 1
        else:
            i += 1
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_readme_has_python_blocks():
    assert BLOCKS, "README.md has no ```python block: the parser or the README changed"
    for line, _, marker in BLOCKS:
        if marker:
            assert marker.split()[0] in ("skip", "stand-ins"), f"README.md:{line}: unknown marker {marker!r}"


def write_stand_ins(spec: str, where: Path) -> None:
    from twinlm.data.tokenizer import model_config_for, train_tokenizer
    from twinlm.model import Transformer

    texts = ["The old man walked to the sea.", "The capital of France is Paris."] * 20
    tok = train_tokenizer(None, 320, where / ".stand-in-tok", texts=texts)
    for item in spec.split()[1:]:
        if "=" not in item:
            break  # the reason in brackets
        path, kind = item.split("=")
        assert kind in ("encoder", "decoder"), f"stand-in kind {kind!r}: encoder or decoder"
        cfg = model_config_for(tok, "cpu-tiny", causal=kind == "decoder", num_layers=2)
        Transformer(cfg).save_pretrained(where / path, tokenizer=tok)


@pytest.mark.parametrize("line,code,marker", BLOCKS, ids=[f"README.md:{b[0]}" for b in BLOCKS])
def test_readme_python_block_runs(line, code, marker, tmp_path):
    if marker.startswith("skip"):
        pytest.skip(f"README.md:{line}: {marker}")
    if marker.startswith("stand-ins"):
        write_stand_ins(marker, tmp_path)
    (tmp_path / "snippet.py").write_text(code, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        done = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"README.md:{line}: the block ran longer than {TIMEOUT_S} s")
    assert done.returncode == 0, f"README.md:{line}: the block raised\n{code}\n--- stderr ---\n{done.stderr[-4000:]}"
