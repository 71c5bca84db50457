"""Downloading the pinned archives with their ordinary clients, checking their hashes, and reading them.

`ensure_archive` returns the verified archive under `downloads/` (reused when its sha256 still matches,
downloaded again when not); a download is staged in a temporary folder (`downloads/.<file>.tmp-*`) and
moved into `downloads/` only once its hash matches, so an interrupted download never leaves a file there
that looks complete. Superseded Debian versions fall back to the mirror's current one, recorded as unpinned:
its sha256 is written beside it (`<file>.sha256`, before the file is moved in) and checked whenever it is
reused; a fallback file without a matching record is removed and downloaded again.
A pinned source distribution (`*.tar.gz` from pip's index) is not fetched with `pip download`, which runs
the package's `setup.py` to read its metadata before twinlm could check the hash: its file is found on the
project's page of the index pip is configured with (`index.py`: `PIP_INDEX_URL`, else pip's configuration,
else PyPI; credentials, PEP 691 JSON or PEP 503 HTML) and downloaded as bytes, so no package code runs and
the sha256 is checked before anything opens the file.
`iter_archive` reads members of wheels, zips, tarballs and .deb packages (without dpkg); `unpack` writes
them under a folder, refusing members that would escape it.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from twinlm.data.fetch.catalog import Archive
from twinlm.data.fetch.index import Index, open_url, pip_index, project_files, project_page
from twinlm.errors import FetchError
from twinlm.io import sha256_file, write_bytes


def client_available(client: str) -> bool:
    if client == "pip" or client == "local":
        return True
    return shutil.which({"npm": "npm", "apt": "apt-get"}[client]) is not None


def is_sdist(archive: Archive) -> bool:
    """Whether a pip archive is a source distribution (whose metadata `pip download` would build)."""
    return archive.client == "pip" and archive.filename.endswith((".tar.gz", ".zip"))


def download_sdist(archive: Archive, dest: Path, index: Index | None = None) -> Path:
    """Download a pinned sdist's file from the index (`pip_index()` unless given) as bytes into `dest`.

    No package code runs. The file whose name is `archive.filename` on the project's page is downloaded; a
    sha256 the page gives that differs from the pinned one is refused before downloading. The caller checks
    the file's own sha256 before anything opens it.
    """
    index = index or pip_index()
    page = project_page(index, archive.spec.split("==")[0])
    try:
        files = project_files(index, page)
        found = next((f for f in files if f.filename == archive.filename), None)
        if found is None:
            raise FetchError(f"{archive.filename} is not listed on {page} ({len(files)} files are): "
                             "is this the index pip uses (PIP_INDEX_URL, `pip config get global.index-url`)?")
        if found.sha256 and archive.sha256 and found.sha256 != archive.sha256:
            raise FetchError(f"{page} lists {archive.filename} with sha256 {found.sha256}, not the pinned "
                             f"{archive.sha256}: the index serves another file; nothing was downloaded")
        target = dest / archive.filename
        with open_url(index, found.url) as r, open(target, "wb") as out:
            shutil.copyfileobj(r, out)
    except (OSError, ValueError) as e:  # URLError, HTTPError (a 401, a 404): OSError; a malformed URL: ValueError
        raise FetchError(f"downloading {archive.filename} from {page} failed: {e}") from e
    return target


def default_downloader(archive: Archive, dest: Path) -> Path:
    """Download one archive into folder `dest` with its ordinary client; return the file."""
    if is_sdist(archive):
        return download_sdist(archive, dest)
    if archive.client == "pip":
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               "-d", str(dest), *archive.extra_args, archive.spec]
    elif archive.client == "npm":
        cmd = ["npm", "pack", "--silent", "--pack-destination", str(dest), archive.spec]
    elif archive.client == "apt":
        cmd = ["apt-get", "download", "-q", archive.spec]
    else:
        raise FetchError(f"no downloader for client {archive.client!r}")
    result = subprocess.run(cmd, cwd=dest, capture_output=True, text=True)
    if result.returncode != 0 and archive.client == "apt":
        # Debian drops superseded versions from its mirrors: fall back to the current one (hash unpinned).
        name = archive.spec.split("=")[0]
        result = subprocess.run(["apt-get", "download", "-q", name], cwd=dest, capture_output=True, text=True)
    if result.returncode != 0:
        hint = " (run `apt-get update` once first)" if archive.client == "apt" else ""
        raise FetchError(f"`{' '.join(cmd)}` failed{hint}:\n{result.stderr.strip()[-2000:]}")
    files = [p for p in dest.iterdir() if p.is_file()]
    exact = dest / archive.filename
    if exact.exists():
        return exact
    if len(files) == 1:
        return files[0]
    raise FetchError(f"{archive.spec}: expected {archive.filename} in {dest}, found {[p.name for p in files]}")


def ensure_archive(archive: Archive, root: Path, downloader: Callable = default_downloader,
                   log: Callable[[str], None] = print) -> tuple[Path, str, bool]:
    """The verified archive file under downloads/ (downloaded if missing); returns (path, sha256, pinned)."""
    downloads = root / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    final = downloads / archive.filename
    if final.exists():
        digest = sha256_file(final)
        if archive.sha256 is None or digest == archive.sha256:
            return final, digest, archive.sha256 is not None
        log(f"  {final.name}: sha256 {digest[:12]}… differs from the pinned {archive.sha256[:12]}…; downloading again")
        final.unlink()
    # Another version of an apt package may already be there (an unpinned fallback): reused if it still
    # matches the sha256 recorded when it was downloaded.
    if archive.client == "apt":
        for other in sorted(downloads.glob(archive.filename.split("_")[0] + "_*.deb")):
            record = other.with_name(other.name + ".sha256")
            digest = sha256_file(other)
            if record.is_file() and record.read_text().strip() == digest:
                return other, digest, False
            log(f"  {other.name}: no matching sha256 record (an interrupted or altered download); downloading again")
            other.unlink()
            record.unlink(missing_ok=True)
    if not client_available(archive.client):
        raise FetchError(f"the `{archive.client}` client is not installed on this machine; cannot fetch {archive.spec}")
    # The client writes into a staging folder: only a file whose hash checks out is moved into downloads/.
    with tempfile.TemporaryDirectory(dir=downloads, prefix=f".{archive.filename}.tmp-",
                                     ignore_cleanup_errors=True) as staging:
        t0 = time.time()
        got = downloader(archive, Path(staging))
        digest = sha256_file(got)
        pinned = True
        if archive.sha256 is not None and digest != archive.sha256:
            if archive.client == "apt" and got.name != archive.filename:
                log(f"  {archive.spec} is no longer on the mirror; using {got.name} (sha256 not pinned: {digest})")
                pinned = False
            else:
                raise FetchError(f"sha256 mismatch for {got.name}: got {digest}, pinned {archive.sha256}. "
                                 "The download is corrupt or the package was replaced; nothing was kept.")
        target = downloads / got.name
        if not pinned:  # the record is there before the file: a file without one is never trusted
            write_bytes(target.with_name(target.name + ".sha256"), digest + "\n")
        os.replace(got, target)
        log(f"  downloaded {got.name} ({target.stat().st_size / 1e6:.1f} MB, {time.time() - t0:.1f} s)")
        return target, digest, pinned and archive.sha256 is not None


def archive_version(archive: Archive, path: Path) -> str:
    """The version of the file actually used: the pinned one, or a Debian fallback's (`name_VERSION_arch.deb`)."""
    if path.name == archive.filename or archive.client != "apt":
        return archive.version
    parts = path.name.split("_")
    return parts[1].replace("%3a", ":") if len(parts) == 3 else path.name


def iter_archive(path: Path, prefixes: tuple[str, ...] = ()) -> Iterator[tuple[str, bytes]]:
    name = path.name
    want = (lambda n: any(n.startswith(p) for p in prefixes)) if prefixes else (lambda n: True)
    if name.endswith(".whl") or name.endswith(".zip"):
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if not info.is_dir() and want(info.filename):
                    yield info.filename, z.read(info)
    elif name.endswith((".tar.gz", ".tgz", ".tar")):
        with tarfile.open(path) as t:
            for m in t:
                n = m.name[2:] if m.name.startswith("./") else m.name
                f = t.extractfile(m) if m.isfile() else None
                if f is not None and want(n):
                    yield n, f.read()
    elif name.endswith(".deb"):
        yield from _iter_deb(path, want)
    else:
        raise FetchError(f"unknown archive type: {path}")


def _iter_deb(path: Path, want: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """Members of a .deb (an `ar` archive holding data.tar.*), read without dpkg."""
    with open(path, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise FetchError(f"{path} is not a Debian package")
        while True:
            header = f.read(60)
            if len(header) < 60:
                break
            member = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58].decode().strip())
            data = f.read(size)
            if size % 2:
                f.read(1)
            if member.startswith("data.tar"):
                mode = {"gz": "r:gz", "xz": "r:xz", "bz2": "r:bz2", "zst": None}.get(member.rsplit(".", 1)[-1], "r:")
                if mode is None:
                    import zstandard  # only for zstd-compressed packages
                    data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
                    mode = "r:"
                # `mode` is one of the read modes above (the stubs want a literal)
                with tarfile.open(fileobj=io.BytesIO(data), mode=mode) as t:  # type: ignore[call-overload]
                    for m in t:
                        n = m.name[2:] if m.name.startswith("./") else m.name
                        if m.isfile() and want(n):
                            yield n, t.extractfile(m).read()
                return
    raise FetchError(f"{path}: no data.tar member")


def safe_join(root: Path, member: str) -> Path:
    """`root / member`, resolved; refused when it lands outside `root` (`..`, an absolute name, a link)."""
    target = (root / member).resolve()
    if not target.is_relative_to(root.resolve()):  # a path test: a sibling `root-evil/` shares the prefix
        raise FetchError(f"archive member escapes the target folder: {member}")
    return target


def unpack(path: Path, dest: Path, prefixes: tuple[str, ...] = (), strip: str = "") -> int:
    n = 0
    for member, data in iter_archive(path, prefixes):
        rel = member[len(strip):] if strip and member.startswith(strip) else member
        target = safe_join(dest, rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        n += 1
    return n
