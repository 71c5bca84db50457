"""Durable output: every file or folder twinlm writes for later reading goes through here.

A reader never sees a half-written artifact: files are written to a temporary name in the same folder,
flushed to disk, then renamed over the final name (`os.replace` is atomic on one filesystem); folders are
filled under a temporary name and renamed when complete. A failure removes the temporary file or folder
and leaves whatever was at the final name before untouched. Temporary files and folders are both named
`.<name>.tmp-*` beside their final name, so that a later run can find and remove what a killed writer left
(`remove_stale_temporaries`). `sha256_file` is the one checksum that fetch archives, shards and checkpoints
are verified with.

Modes: what is written here gets the modes the user's umask gives any other new file or folder (`0o666 &
~umask`, `0o777 & ~umask`; 0644 / 0755 under the usual umask 022, private under 077), so teammates on a shared
disk can read a run. `mkstemp` / `mkdtemp` create 0600 / 0700 and safetensors writes 0600, so the mode is set
on the temporary before the rename (`atomic_dir` sets it on everything inside too): a reader never sees the
final name with another mode. `umask()` reads the umask without changing it where the system can say it.

The checksum manifest `MANIFEST.sha256` of a training checkpoint and of an exported model folder has one
format, written by `write_manifest` and read by `read_manifest`: one line `<sha256>  <file>` per file (64
lowercase hex digits, two spaces, a plain file name of the same folder: no `/`, no white space but the
space, not starting with `.` or a space), sorted by name, each ending in a line feed, so a manifest cut
short at any byte is seen (a manifest of no files is a single line feed). The text must be UTF-8 and lines
are split on the line feed only (a vertical tab or a form feed is not a line break). Each reader keeps its
own error class, its required files and its messages.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any


def _umask_by_setting() -> int:
    # os.umask can only be read by setting it. It is process-wide: a file another thread creates between the two
    # calls gets the stand-in, so the stand-in is the most private one (077), never a more open one.
    old = os.umask(0o077)
    os.umask(old)
    return old


def _umask_from_proc() -> int | None:
    # Linux 4.7 and later say it in /proc/self/status without changing it; None where it cannot be read there
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


_proc_umask = _umask_from_proc()
_UMASK_AT_IMPORT = _proc_umask if _proc_umask is not None else _umask_by_setting()


def umask() -> int:
    """The process's umask, without changing it: read from `/proc/self/status` (Linux 4.7 and later, so a later
    `os.umask` call is followed), else the value read once when this module was imported (by setting and
    restoring it there, before twinlm writes anything; never again, since `os.umask` is process-wide)."""
    now = _umask_from_proc()
    return now if now is not None else _UMASK_AT_IMPORT


def file_mode() -> int:
    """The mode a new file gets from the umask: `0o666 & ~umask`."""
    return 0o666 & ~umask()


def apply_modes(path: str | Path) -> None:
    """Give `path` the modes of a file or folder newly made under the umask; a folder's whole tree too (files
    keep being executable or not; symbolic links are left as they are)."""
    path = Path(path)
    mask = umask()

    def chmod(p: str | Path) -> None:
        st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode):
            return
        full = 0o777 if stat.S_ISDIR(st.st_mode) or st.st_mode & 0o111 else 0o666
        os.chmod(p, full & ~mask)

    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in files + dirs:
                chmod(os.path.join(root, name))
    chmod(path)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 hex digest of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def fsync_file(path: str | Path) -> None:
    """Flush a written file's data (or a folder's entries) to disk; best effort where the filesystem cannot."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without error, fsync it and rename it to `path`.

    For writers that want a file name (pyarrow, numpy, torch, safetensors). Before the rename the file gets
    the mode the umask gives new files (`file_mode`), whatever the writer made it. On error the temporary file
    is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, file_mode())
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path: str | Path, data: str | bytes) -> None:
    """Atomically write `data` (text is UTF-8 encoded) to `path`, creating its folder."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def _jsonable(o: Any) -> Any:
    if hasattr(o, "item"):  # numpy and torch scalars
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def dumps_json(obj: Any, indent: int | None = 2) -> str:
    """The one JSON text format of twinlm files: strict JSON (NaN is an error), numpy/torch scalars as numbers."""
    return json.dumps(obj, indent=indent, default=_jsonable, allow_nan=False) + "\n"


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write `obj` as indented JSON. NaN or infinity raise ValueError: they are not JSON."""
    write_bytes(path, dumps_json(obj))


def _seal(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_jsonable, allow_nan=False).encode()).hexdigest()


def write_sealed_json(path: str | Path, obj: Any) -> None:
    """Atomically write `{"sha256": …, "payload": obj}`: a cached result whose reader can tell it whole and
    unaltered (`read_sealed_json`). The digest is over `obj` as sorted-key compact JSON."""
    write_json(path, {"sha256": _seal(obj), "payload": obj})


def read_sealed_json(path: str | Path) -> tuple[Any, str | None]:
    """`(payload, None)` for a file `write_sealed_json` wrote whole and nobody altered since; `(None, why)` for
    one that is missing, cut short, not JSON, or whose payload does not match its digest (`why` says which, for
    the log line of a caller that then recomputes)."""
    path = Path(path)
    if not path.is_file():
        return None, "missing"
    try:
        sealed = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"not whole JSON ({e.__class__.__name__})"
    if not isinstance(sealed, dict) or set(sealed) != {"sha256", "payload"}:
        return None, "not a sealed result file"
    if _seal(sealed["payload"]) != sealed["sha256"]:
        return None, "its contents do not match its sha256"
    return sealed["payload"], None


MANIFEST = "MANIFEST.sha256"
# a file name of the folder: no "/", no white space but the space (a \v or \x1c read as a line break by
# another reader would hide an entry), not starting with "." (temporaries) or a space
_MANIFEST_LINE = re.compile(r"([0-9a-f]{64})  ([^\s./](?:[^\s/]| )*)")


def listable_in_manifest(name: str) -> bool:
    """Whether a manifest line can hold the file name `name` (see the module docstring)."""
    return _MANIFEST_LINE.fullmatch(f"{'0' * 64}  {name}") is not None


def write_manifest(folder: str | Path, names: Iterable[str]) -> None:
    """Atomically write `folder/MANIFEST.sha256` listing the files `names` that exist in `folder`, by name."""
    folder = Path(folder)
    lines = [f"{sha256_file(folder / n)}  {n}" for n in sorted(set(names)) if (folder / n).is_file()]
    write_bytes(folder / MANIFEST, "\n".join(lines) + "\n")


def read_manifest(path: str | Path, damaged: Callable[[str], Exception]) -> dict[str, str]:
    """The entries of the manifest file `path`, {file name: sha256}. A manifest that is not whole (not UTF-8,
    no final newline, a line not `<sha256>  <file>`) raises `damaged(what)`: the caller's own error, built
    from a phrase saying what is wrong (e.g. "line 3 is not '<sha256>  <file>'")."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise damaged("is not text (not UTF-8)") from None
    if not text.endswith("\n"):
        raise damaged("is cut short (no final newline)")
    listed: dict[str, str] = {}
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines: \v, \f, \x1c… would pass as line breaks
        if not line:
            continue
        m = _MANIFEST_LINE.fullmatch(line)
        if m is None:
            raise damaged(f"line {n} is not '<sha256>  <file>' ({line[:80]!r})")
        listed[m.group(2)] = m.group(1)
    return listed


def manifest_mismatch(folder: str | Path, listed: dict[str, str]) -> tuple[str, str] | None:
    """The first file of `listed` (a manifest's entries) that is not in `folder` as listed: (name, "missing")
    or (name, "altered") when its sha256 differs; None when every listed file matches."""
    folder = Path(folder)
    for name, digest in listed.items():
        path = folder / name
        if not path.is_file():
            return name, "missing"
        if sha256_file(path) != digest:
            return name, "altered"
    return None


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; when the block ends without error, rename it to `path`.

    With `replace=True` an existing `path` is swapped out and removed after the rename (never a moment
    without a complete folder there); otherwise an existing `path` is an error (FileExistsError). On error
    the temporary folder is removed and `path` is left as it was. Temporary folders are named
    `.<name>.tmp-*` so that a later run can recognise and remove those a killed process left behind. Before
    the rename the folder and everything in it get the modes the umask gives new files and folders
    (`apply_modes`: `mkdtemp` makes it 0700, and some writers, safetensors among them, make files 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        apply_modes(tmp)
        if path.exists():
            if not replace:
                raise FileExistsError(f"{path} already exists")
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def is_disk_full(e: BaseException | None) -> bool:
    """Whether `e` (or an exception it was raised from) is a full disk: ENOSPC, or a library's or a client's
    report of it (safetensors: "No space left on device (os error 28)" in a plain Exception; pip, npm and
    apt-get print "No space left on device" / "ENOSPC", which a FetchError quotes)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "no space left on device" in text.lower() or "os error 28" in text or "ENOSPC" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def remove_stale_temporaries(folder: str | Path, name: str) -> list[Path]:
    """Remove the `.<name>.tmp-*` folders and files a killed writer left in `folder`; return what was removed.

    `name` may be a glob pattern (`*`: every temporary in the folder). Only call it where no other writer can
    be at work on those names (the caller holds the output, or a lock on it)."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for p in folder.glob(f".{name}.tmp-*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed
