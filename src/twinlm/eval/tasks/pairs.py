"""Minimal pairs: a real sentence and a corrupted twin, built reproducibly from held-out text or read from
a JSONL file.

`build_pairs(texts, families, per_family, seed)` cuts the documents into sentences (ending in . ! or ?,
`min_words`..`max_words` words, starting with a capital, no digits-only noise) and, for each family, draws
sentences with a `random.Random(seed)` stream of its own and corrupts one place in each:

- `swap`: two adjacent words (both alphabetic, different, not the first word) exchange places.
- `replace`: a word becomes another of the same length and the same frequency band (⌊log2 count⌋ of its
  count over the held-out sentences), so the twin differs in what the word means, not in how rare or long
  it is.
- `splice`: the second half of the sentence is replaced by the second half of a sentence from another
  document (of 30 drawn, the one that makes the twin closest in length to the original).
- `agreement`: is↔are, was↔were, has↔have, does↔do (the verb's number no longer agrees).
- `article`: a↔an (the article no longer fits the next word's sound).

The two substitution families take as many pairs each way (is→are as are→is, a→an as an→a), so that
knowing only which word is more frequent scores 50%; `replace` keeps the length and the frequency band,
`swap` keeps every word. Each sentence is corrupted at most once per family; a family with no candidate
sentence yields no pair.
The same texts and seed give the same pairs on any machine (no hash of Python objects is used).

`read_pair_file(path)`: JSONL with `{"good", "bad", "family"}` per line; BLiMP's own files
(`sentence_good`, `sentence_bad`, `UID`) read unchanged, and a line without a family takes the file's
name. A bad line raises `TaskFileError("file:line: …")`, and so does a line whose good and bad texts are
the same (after stripping): it could only ever tie, which would count as half right.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from twinlm.errors import ConfigError, TaskFileError
from twinlm.eval.settings import PAIR_FAMILIES
from twinlm.eval.tasks.files import read_jsonl

FAMILIES = tuple(PAIR_FAMILIES)
AGREEMENT = {"is": "are", "are": "is", "was": "were", "were": "was", "has": "have", "have": "has",
             "does": "do", "do": "does"}
ARTICLE = {"a": "an", "an": "a"}
SUBSTITUTIONS = {"agreement": AGREEMENT, "article": ARTICLE}

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_WORD = re.compile(r"^[a-z]+$")


@dataclass(frozen=True)
class Pair:
    good: str
    bad: str
    family: str


def sentences(text: str, min_words: int, max_words: int) -> list[str]:
    """The well-formed sentences of one document (see the module docstring)."""
    out = []
    for raw in _SENTENCE_END.split(text.replace("\n", " ")):
        s = " ".join(raw.split())
        words = s.split(" ")
        if not (min_words <= len(words) <= max_words) or not s[0].isupper() or s[-1] not in ".!?":
            continue
        if sum(w.isalpha() for w in words) < 0.75 * len(words):  # tables, code, lists of numbers
            continue
        out.append(s)
    return out


def build_pairs(texts: Sequence[str], families: Sequence[str] = FAMILIES, per_family: int = 200, seed: int = 0,
                min_words: int = 6, max_words: int = 30) -> list[Pair]:
    """Up to `per_family` pairs of each family from the sentences of `texts`."""
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        raise ConfigError(f"unknown minimal-pair family {', '.join(bad)}: choose from {', '.join(FAMILIES)}")
    docs = [(d, s) for d, text in enumerate(texts) for s in sentences(text, min_words, max_words)]
    if not docs:
        return []
    counts = Counter(w.lower() for _, s in docs for w in s.split(" ") if w.isalpha())
    bands: dict[tuple[int, int], list[str]] = {}
    for w, c in counts.items():
        if _WORD.match(w):
            bands.setdefault((int(math.log2(c)), len(w)), []).append(w)
    for v in bands.values():
        v.sort()
    pairs = []
    for fam_index, family in enumerate(FAMILIES):
        if family not in families:
            continue
        rng = random.Random(seed * 1000 + fam_index)
        order = list(range(len(docs)))
        rng.shuffle(order)
        if family in SUBSTITUTIONS:
            pairs += _balanced(family, docs, order, per_family, rng)
            continue
        made = 0
        for i in order:
            if made >= per_family:
                break
            doc, good = docs[i]
            corrupted = _corrupt(family, good, doc, docs, counts, bands, rng)
            if corrupted is not None and corrupted != good:
                pairs.append(Pair(good, corrupted, family))
                made += 1
    return pairs


def _balanced(family: str, docs, order: list[int], per_family: int, rng: random.Random) -> list[Pair]:
    """A substitution family with as many pairs in each direction of every word pair (is→are as are→is):
    a model that only knows which word is more frequent scores 50%, not the frequency ratio."""
    table = SUBSTITUTIONS[family]
    groups: dict[str, list[tuple[str, int]]] = {w: [] for w in table}
    for i in order:
        words = docs[i][1].split(" ")
        spots = [j for j in range(1, len(words) - 1) if words[j] in table
                 and (family != "article" or words[j + 1][:1].isalpha())]  # "a 1990s" is no clean case
        if spots:
            j = rng.choice(spots)
            groups[words[j]].append((docs[i][1], j))
    canon = sorted({tuple(sorted((a, b))) for a, b in table.items()})
    taken = {pair: min(len(groups[pair[0]]), len(groups[pair[1]])) for pair in canon}
    out: list[Pair] = []
    for k in range(max(taken.values(), default=0)):  # round-robin over the word pairs, one each way per round
        for pair in canon:
            if k < taken[pair] and len(out) + 2 <= per_family:
                for w in pair:
                    good, j = groups[w][k]
                    words = good.split(" ")
                    words[j] = table[w]
                    out.append(Pair(good, " ".join(words), family))
    return out


def _corrupt(family, sentence, doc, docs, counts, bands, rng) -> str | None:
    words = sentence.split(" ")
    if family == "swap":
        spots = [i for i in range(1, len(words) - 2)
                 if _WORD.match(words[i]) and _WORD.match(words[i + 1]) and words[i] != words[i + 1]]
        if not spots:
            return None
        i = rng.choice(spots)
        words[i], words[i + 1] = words[i + 1], words[i]
    elif family == "replace":
        choices = []  # (word index, words of its band to put there)
        for i in range(1, len(words) - 1):
            w = words[i]
            if _WORD.match(w) and len(w) >= 3:
                others = [o for o in bands.get((int(math.log2(counts[w])), len(w)), []) if o != w]
                if others:
                    choices.append((i, others))
        if not choices:
            return None
        i, others = rng.choice(choices)
        words[i] = rng.choice(others)
    elif family == "splice":
        if len(words) < 8:
            return None
        head = words[:len(words) // 2]
        best = None
        for _ in range(30):  # of sentences from other documents, the one whose splice is closest in length
            other_doc, other = docs[rng.randrange(len(docs))]
            tail = other.split(" ")
            if other_doc == doc or len(tail) < 8:
                continue
            cand = " ".join(head + tail[len(tail) // 2:])
            if best is None or abs(len(cand) - len(sentence)) < abs(len(best) - len(sentence)):
                best = cand
        return best
    return " ".join(words)


def read_pair_file(path: str | Path) -> list[Pair]:
    """Pairs from a JSONL file of `{good, bad, family}` (or BLiMP's `sentence_good`, `sentence_bad`, `UID`)."""
    p = Path(path)
    out = []
    for lineno, row in read_jsonl(p):
        good = row.get("good", row.get("sentence_good"))
        bad = row.get("bad", row.get("sentence_bad"))
        family = row.get("family", row.get("UID", p.stem))
        for name, value in (("good", good), ("bad", bad)):
            if not isinstance(value, str) or not value.strip():
                raise TaskFileError(p, lineno, f"missing field {name} (a non-empty string; BLiMP's "
                                               f"sentence_{name} also works)")
        if not isinstance(family, str) or not family:
            raise TaskFileError(p, lineno, "field family must be a non-empty string")
        assert isinstance(good, str) and isinstance(bad, str)  # checked above
        if good.strip() == bad.strip():
            raise TaskFileError(p, lineno, "good and bad are the same text: a pair must differ (fix or remove the "
                                           "line)")
        out.append(Pair(good.strip(), bad.strip(), family))
    if not out:
        raise TaskFileError(p, None, "no pairs in the file: give JSONL lines {\"good\", \"bad\", \"family\"}")
    return out
