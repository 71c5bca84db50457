"""Files and folders twinlm writes get the modes the umask gives any other new file (issue 25, item 2):
0644 / 0755 under umask 022, so teammates on a shared disk can read a run; private under 077."""

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from twinlm.io import _umask_by_setting, atomic_dir, atomic_path, umask, write_json
from twinlm.train import run
from twinlm.train.testing import make_shards, tiny_recipe


@pytest.fixture(params=[0o022, 0o077, 0o002], ids=["022", "077", "002"])
def mask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def modes_under(folder: Path) -> dict[str, int]:
    """{relative path: mode} of `folder` ('.') and everything in it."""
    out = {".": mode(folder)}
    for p in folder.rglob("*"):
        out[str(p.relative_to(folder))] = mode(p)
    return out


def expected(folder: Path, mask: int) -> dict[str, int]:
    return {name: (0o777 if (folder / name).is_dir() else 0o666) & ~mask for name in modes_under(folder)}


def test_umask_is_read_without_changing_it(mask):
    assert umask() == mask
    assert umask() == mask  # reading it twice: it was not changed by the first read
    assert _umask_by_setting() == mask  # the fallback where /proc cannot say it restores what it read
    assert umask() == mask


def test_without_proc_the_umask_read_at_import_is_used(monkeypatch):
    import twinlm.io

    monkeypatch.setattr(twinlm.io, "_umask_from_proc", lambda: None)
    monkeypatch.setattr(twinlm.io, "_UMASK_AT_IMPORT", 0o027)
    old = os.umask(0o022)
    try:
        assert umask() == 0o027  # os.umask is not called again: it would change the mask for every thread
        assert os.umask(0o022) == 0o022
    finally:
        os.umask(old)


def test_atomic_files_get_the_umask_mode_even_from_a_private_writer(tmp_path, mask):
    write_json(tmp_path / "a.json", {"x": 1})
    with atomic_path(tmp_path / "w.safetensors") as tmp:  # safetensors itself writes 0600
        save_file({"w": torch.zeros(2)}, str(tmp))
    assert mode(tmp_path / "a.json") == mode(tmp_path / "w.safetensors") == 0o666 & ~mask


def test_atomic_folders_and_their_contents_get_the_umask_modes(tmp_path, mask):
    with atomic_dir(tmp_path / "out") as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
        (tmp / "sub").mkdir()
        write_json(tmp / "sub" / "meta.json", {})
        os.chmod(tmp / "sub", 0o700)
    out = tmp_path / "out"
    assert modes_under(out) == expected(out, mask)
    assert mode(out) == 0o777 & ~mask


def test_a_runs_final_folder_and_checkpoints_are_readable_by_the_group_under_umask_022(tmp_path):
    old = os.umask(0o022)
    try:
        shards = make_shards(tmp_path / "shards", n_docs=40)
        final = run(tiny_recipe(shards, phases=1, tokens=400, every_tokens=200), tmp_path / "run")
    finally:
        os.umask(old)
    checkpoints = [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith("step-")]
    assert checkpoints
    for folder in (final, checkpoints[0], shards):
        assert modes_under(folder) == expected(folder, 0o022), folder
    assert mode(final / "model.safetensors") == 0o644 and mode(final) == 0o755
    assert mode(tmp_path / "run" / "config.yaml") == 0o644
