"""The one checksum manifest (twinlm.io): its exact bytes, and the same refusals for a training checkpoint
(CorruptCheckpointError) and a model folder (ModelLoadError)."""

import hashlib

import pytest

from twinlm.errors import CorruptCheckpointError, ModelLoadError
from twinlm.export import verify_manifest
from twinlm.io import MANIFEST, manifest_mismatch, read_manifest, write_manifest
from twinlm.train.checkpoint import MARKER, CheckpointManager, verify


def _folder(tmp_path, manifest: bytes | None = None):
    """A folder that is both a complete checkpoint and a model folder: state.json, config.json, the marker."""
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "state.json").write_text("{}\n")
    (folder / "config.json").write_text('{"a": 1}\n')
    (folder / MARKER).write_text("done\n")
    write_manifest(folder, ["state.json", "config.json"])
    if manifest is not None:
        (folder / MANIFEST).write_bytes(manifest)
    return folder


def test_write_manifest_bytes(tmp_path):
    folder = _folder(tmp_path)
    digest = {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in ("config.json", "state.json")}
    assert (folder / MANIFEST).read_bytes() == (f"{digest['config.json']}  config.json\n"
                                               f"{digest['state.json']}  state.json\n").encode()
    # names are sorted and deduplicated; files that are not there are left out; no files is a single newline
    write_manifest(folder, ["state.json", "absent.bin", "config.json", "state.json"])
    assert (folder / MANIFEST).read_text().splitlines() == [f"{digest['config.json']}  config.json",
                                                            f"{digest['state.json']}  state.json"]
    write_manifest(folder, [])
    assert (folder / MANIFEST).read_bytes() == b"\n"
    assert read_manifest(folder / MANIFEST, ValueError) == {}


def test_a_checkpoint_manifest_is_the_same_format(tmp_path):
    p = CheckpointManager(tmp_path / "ckpt").save(1, lambda folder: (folder / "w.bin").write_bytes(b"w"), {})
    text = (p / MANIFEST).read_bytes()
    write_manifest(p, ["w.bin", "state.json"])
    assert (p / MANIFEST).read_bytes() == text


GOOD = "0" * 64
MALFORMED = {
    "upper-case digest": f"{'A' * 64}  state.json\n",
    "short digest": f"{'0' * 63}  state.json\n",
    "one space": f"{GOOD} state.json\n",
    "three spaces": f"{GOOD}   state.json\n",
    "no name": f"{GOOD}  \n",
    "a path": f"{GOOD}  sub/state.json\n",
    "a hidden name": f"{GOOD}  .state.json\n",
    "garbage": "not a manifest\n",
    "no final newline": f"{GOOD}  state.json",
    "a vertical tab for a line break": f"{GOOD}  state.json\v{GOOD}  config.json\n",
    "not UTF-8": f"{GOOD}  state\xe9.json\n".encode("latin-1"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_both_readers_refuse_the_same_malformed_manifests(tmp_path, case):
    damaged = MALFORMED[case]
    folder = _folder(tmp_path, damaged if isinstance(damaged, bytes) else damaged.encode())
    with pytest.raises(ValueError, match="^damaged: (is not text|is cut short|line 1 is not)"):
        read_manifest(folder / MANIFEST, lambda what: ValueError(f"damaged: {what}"))
    with pytest.raises(CorruptCheckpointError, match=f"{MANIFEST} .*the manifest is damaged"):
        verify(folder)
    with pytest.raises(ModelLoadError, match=f"{MANIFEST}: .*the file is damaged; download or export"):
        verify_manifest(folder)


def test_both_readers_accept_what_twinlm_writes_and_name_the_altered_file(tmp_path):
    folder = _folder(tmp_path)
    verify(folder)
    verify_manifest(folder)
    assert manifest_mismatch(folder, read_manifest(folder / MANIFEST, ValueError)) is None
    (folder / "config.json").write_text('{"a": 2}\n')
    assert manifest_mismatch(folder, read_manifest(folder / MANIFEST, ValueError)) == ("config.json", "altered")
    with pytest.raises(CorruptCheckpointError, match="config.json does not match its sha256"):
        verify(folder)
    with pytest.raises(ModelLoadError, match="config.json: does not match its sha256"):
        verify_manifest(folder)
    (folder / "config.json").unlink()
    assert manifest_mismatch(folder, read_manifest(folder / MANIFEST, ValueError)) == ("config.json", "missing")
    with pytest.raises(CorruptCheckpointError, match="config.json is listed in the manifest but missing"):
        verify(folder)
    with pytest.raises(ModelLoadError, match="config.json: listed in MANIFEST.sha256 but missing"):
        verify_manifest(folder)
