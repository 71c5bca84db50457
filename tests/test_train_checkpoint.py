"""Checkpoint folders: atomic (marker last), manifest-verified, keep policy."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from twinlm.train.checkpoint import CheckpointManager, CorruptCheckpointError, verify


def _writer(value: float):
    def write(folder):
        save_file({"w": torch.full((64,), value)}, str(folder / "model.safetensors"))
    return write


def test_save_writes_manifest_and_marker_last(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=3)
    p = m.save(7, _writer(1.0), {"trainer": {"step": 7}})
    assert p.name == "step-00000007"
    names = sorted(x.name for x in p.iterdir())
    assert names == ["COMPLETE", "MANIFEST.sha256", "model.safetensors", "state.json"]
    manifest = (p / "MANIFEST.sha256").read_text()
    assert "model.safetensors" in manifest and "state.json" in manifest
    verify(p)
    assert m.latest() == p
    assert not any(x.name.startswith(".tmp") for x in tmp_path.iterdir())


def test_interrupted_saves_are_ignored(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=3)
    good = m.save(1, _writer(1.0), {})
    # a save killed before its marker: a finished-looking folder without COMPLETE, and a temp folder
    half = tmp_path / "step-00000002"
    half.mkdir()
    save_file({"w": torch.zeros(64)}, str(half / "model.safetensors"))
    (tmp_path / ".tmp-step-00000003").mkdir()
    assert m.latest() == good
    with pytest.raises(CorruptCheckpointError, match="incomplete"):
        verify(half)
    # the next save cleans them up
    m.save(4, _writer(4.0), {})
    assert not half.exists() and not (tmp_path / ".tmp-step-00000003").exists()


def test_writer_failure_leaves_no_checkpoint(tmp_path):
    m = CheckpointManager(tmp_path)

    def boom(folder):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        m.save(5, boom, {})
    assert m.latest() is None and m.complete() == []


def test_corruption_is_detected_and_resume_falls_back(tmp_path):
    logs = []
    m = CheckpointManager(tmp_path, keep_last=5, log=logs.append)
    first = m.save(1, _writer(1.0), {})
    second = m.save(2, _writer(2.0), {})
    f = second / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF  # a flipped byte inside the tensor data: safetensors would load it silently
    f.write_bytes(bytes(data))
    assert load_file(str(f))["w"].shape == (64,)  # loads without complaint...
    with pytest.raises(CorruptCheckpointError, match="sha256"):
        verify(second)  # ...but the manifest catches it
    assert m.latest() == first
    assert any("skipping" in line for line in logs)
    # truncation, too
    g = first / "model.safetensors"
    g.write_bytes(g.read_bytes()[:-10])
    assert m.latest() is None


def test_keep_last_plus_every_mth_plus_phase_ends(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=2, keep_every=3)
    for step in range(1, 11):
        m.save(step, _writer(float(step)), {"checkpoint_ordinal": step, "keep": step == 5})
    kept = [int(p.name.split("-")[1]) for p in m.complete()]
    # every 3rd (3, 6, 9), the phase end (5), the last two (9, 10)
    assert kept == [3, 5, 6, 9, 10]
    st = json.loads((m.path_for(5) / "state.json").read_text())
    assert st["keep"] is True
