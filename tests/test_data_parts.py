"""`twinlm data prepare --part I/N` + `twinlm data merge`: parts of one corpus merge into the whole."""

import json

import numpy as np
import pytest

from twinlm.cli import main
from twinlm.data.merge import merge_parts
from twinlm.data.prepare import PrepareConfig, prepare
from twinlm.data.shards import FILES, ShardDataset, read_meta, verify_shards
from twinlm.data.split import part_of
from twinlm.data.tokenizer import train_tokenizer
from twinlm.errors import ConfigError

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega").split()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    rng = np.random.default_rng(3)
    docs = [" ".join(rng.choice(WORDS, size=int(n))) + "." for n in rng.integers(5, 400, size=60)]
    tok = train_tokenizer(None, 300, root / "bpe", texts=docs[:20])
    (root / "big.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[:50]))  # one big file
    (root / "small.txt").write_text(docs[50])
    return root, tok, [root / "big.jsonl", root / "small.txt"], docs


def _prepare(setup, out, **kw):
    root, tok, inputs, _ = setup
    return prepare(inputs, tok, root / out, PrepareConfig(chunk_size=64, workers=0, **kw))


def test_parts_merge_byte_identical_to_the_whole(setup):
    root = setup[0]
    whole = _prepare(setup, "whole", holdout_docs=0.2, seed=1)
    parts = [_prepare(setup, f"p{i}", holdout_docs=0.2, seed=1, part=(i, 2)) for i in range(2)]
    assert all(p["num_documents"] > 0 for p in parts)  # both parts hold documents of the one big file
    assert parts[0]["part"]["index"] == 0 and parts[1]["part"]["count"] == 2 and "part" in parts[0]["part"]["rule"]
    assert sum(p["num_chunks"] for p in parts) == whole["num_chunks"]
    merged = merge_parts([root / "p1", root / "p0"], root / "merged")  # any order
    held = merge_parts([root / "p0-heldout", root / "p1-heldout"], root / "merged-heldout")
    for a, b in (("whole", "merged"), ("whole-heldout", "merged-heldout")):
        for name in FILES:
            assert (root / a / name).read_bytes() == (root / b / name).read_bytes(), (a, name)
        verify_shards(root / b)
        ShardDataset(root / b)  # the reader opens it
    assert merged["num_documents"] == whole["num_documents"] and "part" not in merged
    assert held["num_documents"] == whole["holdout"]["num_documents"] > 0
    assert merged["holdout"]["num_chunks"] == whole["holdout"]["num_chunks"]
    assert read_meta(root / "merged")["merged_from"][0]["index"] == 0
    merge_parts([root / "p0", root / "p1"], root / "small-windows", block=2)  # documents of more chunks than that
    assert (root / "small-windows" / "tokens.bin").read_bytes() == (root / "whole" / "tokens.bin").read_bytes()
    assert (root / "small-windows" / "docs.npy").read_bytes() == (root / "whole" / "docs.npy").read_bytes()


def test_mixed_or_incomplete_parts_are_refused(setup):
    root = setup[0]
    _prepare(setup, "c0", part=(0, 2))
    _prepare(setup, "c1", part=(1, 2))
    prepare(setup[2], setup[1], root / "d1", PrepareConfig(chunk_size=48, workers=0, part=(1, 2)))
    with pytest.raises(ConfigError, match="chunking"):
        merge_parts([root / "c0", root / "d1"], root / "bad")
    other = train_tokenizer(None, 280, root / "bpe2", texts=setup[3][20:40])
    prepare(setup[2], other, root / "t1", PrepareConfig(chunk_size=64, workers=0, part=(1, 2)))
    with pytest.raises(ConfigError, match="tokenizer fingerprint"):
        merge_parts([root / "c0", root / "t1"], root / "bad")
    with pytest.raises(ConfigError, match="part 1/2 is missing"):
        merge_parts([root / "c0"], root / "bad")
    with pytest.raises(ConfigError, match="more than once"):
        merge_parts([root / "c0", root / "c0"], root / "bad")
    assert not (root / "bad").exists()


def test_part_with_a_heldout_count_is_refused():
    with pytest.raises(ConfigError, match="fraction"):
        PrepareConfig(holdout_docs=5, part=(0, 2))
    with pytest.raises(ConfigError, match="0 <= I < N"):
        PrepareConfig(part=(2, 2))
    PrepareConfig(holdout_docs=0.1, part=(0, 2))  # a fraction is allowed


def test_part_rule_is_a_property_of_the_text():
    texts = [f"document {i}" for i in range(400)]
    assigned = [part_of(t, 4) for t in texts]
    assert assigned == [part_of(t, 4) for t in texts] and set(assigned) == {0, 1, 2, 3}


def test_cli_part_and_merge(setup, capsys):
    root, _, inputs, _ = setup
    args = ["data", "prepare", *map(str, inputs), "--tokenizer", str(root / "bpe"), "--chunk-size", "64",
            "--workers", "0"]
    assert main([*args, "--out", str(root / "cw")]) == 0
    for i in range(2):
        assert main([*args, "--out", str(root / f"cp{i}"), "--part", f"{i}/2"]) == 0
    assert main(["data", "merge", str(root / "cp0"), str(root / "cp1"), "--out", str(root / "cm")]) == 0
    assert "merged from 2 parts" in capsys.readouterr().out
    assert (root / "cw" / "tokens.bin").read_bytes() == (root / "cm" / "tokens.bin").read_bytes()
    assert main([*args, "--out", str(root / "cx"), "--part", "0/2", "--holdout-docs", "5"]) != 0
    err = capsys.readouterr().err.strip()
    assert "fraction" in err and len(err.splitlines()) == 1
