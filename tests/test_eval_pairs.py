"""Minimal pairs: building them from text, reading pair files (BLiMP's too), scoring by (pseudo-)
log-likelihood checked by hand, bootstrap intervals, and the CLI."""

import json
import math

import numpy as np
import pytest
import torch

import twinlm
from twinlm.cli import main
from twinlm.errors import ConfigError, TaskFileError
from twinlm.eval import pairs as pairs_track
from twinlm.eval.metrics import bootstrap_macro, bootstrap_ratio
from twinlm.eval.settings import PairsConfig
from twinlm.eval.tasks.pairs import AGREEMENT, FAMILIES, build_pairs, read_pair_file, sentences
from twinlm.eval.toy import toy_model_dir, toy_tokenizer

TEXTS = [
    "The old man was walking to the market with his dog. He has a small house near the river and it is quiet. "
    "An owl lives in the tall tree behind the house, and the children were watching it every night.",
    "Our team builds an engine that measures the heat of the water. The engine was tested in a cold room today. "
    "The results were good and the scientist is happy with the new design of the machine.",
    "My friend likes the garden in the spring because the flowers are bright. She does her work early in the "
    "morning. Then she reads a book about an island far away from the city where she was born.",
]


def test_sentences_keep_prose_only():
    text = "Short one. This sentence is long enough to keep here. 12 34 56 78 90 11 22 33. lowercase start is dropped."
    assert sentences(text, 6, 30) == ["This sentence is long enough to keep here."]


def test_build_pairs_is_reproducible_and_each_family_corrupts_as_documented():
    got = build_pairs(TEXTS, per_family=50, seed=3)
    assert got == build_pairs(TEXTS, per_family=50, seed=3)
    assert got != build_pairs(TEXTS, per_family=50, seed=4)
    fams = {p.family for p in got}
    assert fams == set(FAMILIES)
    for p in got:
        g, b = p.good.split(" "), p.bad.split(" ")
        assert p.good != p.bad
        if p.family == "swap":
            diff = [i for i in range(len(g)) if g[i] != b[i]]
            assert len(diff) == 2 and diff[1] == diff[0] + 1 and g[diff[0]] == b[diff[1]]
            assert sorted(p.good) == sorted(p.bad)
        elif p.family == "replace":
            diff = [i for i in range(len(g)) if g[i] != b[i]]
            assert len(diff) == 1 and len(g[diff[0]]) == len(b[diff[0]])
        elif p.family == "splice":
            assert b[:len(g) // 2] == g[:len(g) // 2] and not p.bad.endswith(" ".join(g[len(g) // 2:]))
        else:
            diff = [i for i in range(len(g)) if g[i] != b[i]]
            table = AGREEMENT if p.family == "agreement" else {"a": "an", "an": "a"}
            assert len(diff) == 1 and table[g[diff[0]]] == b[diff[0]]
    # substitution families go both ways equally: word frequency alone scores 50%
    for family in ("agreement", "article"):
        moves = [next((g, b) for g, b in zip(p.good.split(" "), p.bad.split(" ")) if g != b)
                 for p in got if p.family == family]
        for a, b in {tuple(sorted(m)) for m in moves}:
            assert moves.count((a, b)) == moves.count((b, a)) > 0
    per_sentence = {(p.family, p.good) for p in got}
    assert len(per_sentence) == len(got)  # a sentence is corrupted once per family
    assert len(build_pairs(TEXTS, families=["swap"], per_family=2)) == 2
    with pytest.raises(ConfigError):
        build_pairs(TEXTS, families=["scramble"])
    with pytest.raises(ConfigError):
        PairsConfig(families=["scramble"])


def test_pair_files_ours_and_blimps(tmp_path):
    ours = tmp_path / "mine.jsonl"
    ours.write_text(json.dumps({"good": "The cat sleeps.", "bad": "The cat sleep.", "family": "agr"}) + "\n"
                    + json.dumps({"good": "A dog runs.", "bad": "A dog run."}) + "\n")
    assert [(p.good, p.family) for p in read_pair_file(ours)] == [("The cat sleeps.", "agr"), ("A dog runs.", "mine")]
    # a line as BLiMP's own files have them (anaphor_gender_agreement.jsonl)
    blimp = tmp_path / "anaphor_gender_agreement.jsonl"
    blimp.write_text(json.dumps({"sentence_good": "Katherine can't help herself.",
                                 "sentence_bad": "Katherine can't help himself.", "field": "morphology",
                                 "linguistics_term": "anaphor_agreement", "UID": "anaphor_gender_agreement",
                                 "simple_LM_method": True, "one_prefix_method": True, "two_prefix_method": False,
                                 "lexically_identical": False, "pairID": "0"}) + "\n")
    (p,) = read_pair_file(blimp)
    assert (p.good, p.bad, p.family) == ("Katherine can't help herself.", "Katherine can't help himself.",
                                         "anaphor_gender_agreement")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"good": "x"}) + "\n")
    with pytest.raises(TaskFileError, match=r"bad.jsonl:1: missing field bad"):
        read_pair_file(bad)
    # N_P_same: identical texts could only tie (counted half right): refused, naming the line
    same = tmp_path / "same.jsonl"
    same.write_text(json.dumps({"good": "A dog runs.", "bad": "A dog run."}) + "\n"
                    + json.dumps({"good": "The cat sleeps.", "bad": " The cat sleeps. ", "family": "f"}) + "\n")
    with pytest.raises(TaskFileError, match=r"same.jsonl:2: good and bad are the same text"):
        read_pair_file(same)



def test_per_family_none_needs_a_pair_file(tmp_path):
    # "none" (--per-family none|all) means every pair of a file: pairs built from text need a count, and
    # say so rather than failing inside the builder
    with pytest.raises(ConfigError, match="per_family none"):
        pairs_track.load_pairs(PairsConfig(per_family=None), TEXTS)
    ours = tmp_path / "mine.jsonl"
    ours.write_text("".join(json.dumps({"good": f"The cat sleeps {i}.", "bad": f"The cat sleep {i}."}) + "\n"
                            for i in range(3)))
    name, got = pairs_track.load_pairs(PairsConfig(pairs_file=str(ours), per_family=None))
    assert name == "mine" and len(got) == 3

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    tok = toy_tokenizer()
    return {"tok": tok, "dec": toy_model_dir(root / "dec", True, tokenizer=tok),
            "enc": toy_model_dir(root / "enc", False, tokenizer=tok), "root": root}


def test_loglik_and_pseudo_loglik_by_hand(models):
    tok = models["tok"]
    texts = ["The cat sees a dog.", "Water heats the moon!"]
    dec = twinlm.load(models["dec"]).eval()
    enc = twinlm.load(models["enc"]).eval()
    cfg = dec.config
    with torch.no_grad():
        for text, got in zip(texts, pairs_track.sentence_logliks(dec, tok, texts, max_tokens=16)):
            ids = [cfg.cls_token_id] + tok(text, add_special_tokens=False)["input_ids"]
            logp = torch.log_softmax(dec(torch.tensor([ids])).logits[0].double(), -1)
            assert got == pytest.approx(sum(float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1)), rel=1e-5)
        for mntp in (False, True):
            for text, got in zip(texts, pairs_track.sentence_logliks(enc, tok, texts, mntp=mntp, max_tokens=40)):
                t = tok(text, add_special_tokens=False)["input_ids"]
                want = 0.0
                for j in range(len(t)):
                    seq = [cfg.cls_token_id, *t, cfg.sep_token_id]
                    seq[1 + j] = cfg.mask_token_id
                    logp = torch.log_softmax(enc(torch.tensor([seq])).logits[0].double(), -1)
                    want += float(logp[j if mntp else 1 + j, t[j]])
                assert got == pytest.approx(want, rel=1e-5)


def test_run_scores_families_with_intervals_and_writes_the_result(models, tmp_path):
    cfg = PairsConfig(per_family=20, bootstrap=200)
    res = pairs_track.run(str(models["dec"]), cfg, texts=TEXTS, out=tmp_path / "p.json", log=None)
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["track"] == "pairs" and set(saved["tasks"]) == set(FAMILIES)
    for fam in res["tasks"].values():
        acc = np.mean(fam["correct"]) * 100
        assert fam["accuracy"] == pytest.approx(acc) and fam["ci95"][0] <= acc <= fam["ci95"][1]
        assert fam["n"] == len(fam["correct"]) and 0 <= fam["se"] < 50
    every = [c for f in res["tasks"].values() for c in f["correct"]]
    assert res["average"]["mean"] == pytest.approx(100 * np.mean(every)) and res["average"]["n_pairs"] == len(every)
    assert res["average"]["macro"] == pytest.approx(np.mean([f["accuracy"] for f in res["tasks"].values()]))
    assert res["average"]["std"] > 0 and res["config"]["scoring"] == "log-likelihood per byte"
    # the same pairs are scored by a model of each kind; the outcome of each pair follows its scores
    pairs = pairs_track.load_pairs(cfg, TEXTS)[1]
    ll = pairs_track.sentence_logliks(twinlm.load(models["dec"]).eval(), models["tok"],
                                      [p.good for p in pairs] + [p.bad for p in pairs])
    n = len(pairs)
    right = [ll[i] / len(p.good.encode()) > ll[n + i] / len(p.bad.encode()) for i, p in enumerate(pairs)]
    flat = [c for fam in sorted(res["tasks"]) for c in res["tasks"][fam]["correct"]]
    by_family = [r for fam in sorted(res["tasks"]) for p, r in zip(pairs, right) if p.family == fam]
    assert flat == [float(r) for r in by_family]


def test_bootstrap_helpers():
    b = bootstrap_ratio([1, 0, 1, 1], [1, 1, 1, 1], samples=500)
    assert b["value"] == 0.75 and b["lo"] <= 0.75 <= b["hi"] and b["se"] > 0
    assert bootstrap_ratio([2.0, 2.0], [1.0, 1.0])["se"] == 0.0
    m = bootstrap_macro({"a": [1, 1], "b": [0, 0, 0, 1]})
    assert m["value"] == pytest.approx(0.625) and m["se"] > 0
    with pytest.raises(ValueError, match="no data"):
        bootstrap_ratio([], [])
    assert math.isfinite(m["hi"])


def test_cli_pairs(models, tmp_path, capsys):
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps({"good": p.good, "bad": p.bad, "family": p.family}) + "\n"
                         for p in build_pairs(TEXTS, per_family=5)))
    out = tmp_path / "res.json"
    assert main(["eval", "pairs", str(models["enc"]), "--pairs-file", str(f), "--out", str(out),
                 "--bootstrap", "200"]) == 0
    res = json.loads(out.read_text())
    assert res["model"]["arch"] == "encoder" and set(res["tasks"]) == set(FAMILIES)
    assert "pseudo-log-likelihood" in res["config"]["scoring"]
    assert main(["eval", "pairs", "bigram", "--pairs-file", str(f)]) == 2
    assert "--shards" in capsys.readouterr().err
