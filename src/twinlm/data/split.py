"""The held-out rule: which documents a corpus holds out, the one rule of `twinlm data prepare --holdout-docs`
and of the suite's corpus (twinlm.data.corpus).

A document is held out when a hash of the seed and its text falls below the fraction: sha256 of
`"<seed>:<the text's first 2,000 characters>"` (UTF-8, a lone surrogate replaced), its first 8 bytes read as
a big-endian integer over 2^64. The split is a property of the text, not of where the files lie or in what
order they are read; copies of a document, and documents that share their first 2,000 characters (a
boilerplate header, a near duplicate), fall on the same side.
"""

from __future__ import annotations

import hashlib

PREFIX_CHARS = 2000  # enough text to tell documents apart; hashing it costs the same for any document size
# recorded in a prepared folder's meta.json `holdout`: folders of older twinlm drew by another hash (blake2b of
# the seed and the whole text), so their held-out documents differ for the same seed
RULE = f"sha256(seed:text[:{PREFIX_CHARS}])"
# which part of `twinlm data prepare --part I/N` a document belongs to: the same hash with the key "part" (not the
# seed, so the parts do not line up with the held-out split), scaled to N parts
PART_RULE = f"floor(N * sha256(part:text[:{PREFIX_CHARS}]))"


def draw(text: str, key: int | str) -> float:
    """The document's draw in [0, 1): sha256 of `"<key>:<the text's first 2,000 characters>"` (UTF-8, a lone
    surrogate replaced), its first 8 bytes read as a big-endian integer over 2^64."""
    digest = hashlib.sha256(f"{key}:{text[:PREFIX_CHARS]}".encode("utf-8", "replace")).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def heldout(text: str, seed: int, fraction: float) -> bool:
    """Whether the document `text` is held out at `fraction` (0 to 1) for `seed` (see the module docstring)."""
    return draw(text, seed) < fraction


def part_of(text: str, count: int) -> int:
    """Which of `count` parts (0 to count − 1) the document `text` belongs to (PART_RULE): a property of the
    text, so every machine that reads the same inputs assigns every document to the same one part."""
    return min(int(draw(text, "part") * count), count - 1)
