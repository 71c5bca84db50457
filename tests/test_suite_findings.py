import math

import pytest

from twinlm.suite.findings import Score, compare, findings_markdown, judge


def test_score_of_uses_sample_std():
    s = Score.of([1.0, 2.0, 3.0])
    assert s.mean == 2.0 and math.isclose(s.std, 1.0) and s.n == 3


def test_verdicts_follow_margin_against_spread():
    scores = {"encoder": {"classification": Score(80, 1, 3)}, "decoder": {"classification": Score(76, 1, 3)}}
    row = compare("c", "classification", "encoder", "decoder", scores)
    assert row.verdict == "reproduced" and math.isclose(row.margin, 4) and math.isclose(row.spread, math.sqrt(2))
    scores["decoder"]["classification"] = Score(79, 1, 3)
    assert compare("c", "classification", "encoder", "decoder", scores).verdict == "unresolved"
    scores["decoder"]["classification"] = Score(90, 1, 3)
    assert compare("c", "classification", "encoder", "decoder", scores).verdict == "contradicted"
    assert compare("c", "retrieval", "encoder", "decoder", scores) is None


def test_judge_combines_comparisons_and_reports_controls():
    scores = {
        "encoder": {"classification": Score(80, 0.5), "retrieval": Score(30, 0.5), "generative": Score(30, 0.5)},
        "decoder": {"classification": Score(75, 0.5), "retrieval": Score(20, 0.5), "generative": Score(35, 0.5)},
        "random-encoder": {"classification": Score(79, 0.5)},
        "bag-of-words": {"classification": Score(78, 0.0)},
    }
    judged = judge(scores)
    verdicts = [f["verdict"] for f in judged["findings"]]
    assert verdicts == ["reproduced", "reproduced", "not measured"]
    claims = {c["claim"]: c["verdict"] for c in judged["controls"]}
    assert claims["encoder > random-init encoder on classification"] == "unresolved"
    assert claims["encoder > bag-of-words on classification"] == "reproduced"
    text = findings_markdown(judged)
    assert "encoder > decoder on retrieval" in text and "+10.00" in text


def test_a_single_seed_without_spread_never_resolves():
    scores = {"encoder": {"retrieval": Score(30, 0.0, 1)}, "decoder": {"retrieval": Score(10, 0.0, 1)}}
    assert compare("c", "retrieval", "encoder", "decoder", scores).verdict == "unresolved"
    scores = {"encoder": {"retrieval": Score(30, 0.0, 3)}, "decoder": {"retrieval": Score(10, 0.0, 3)}}
    assert compare("c", "retrieval", "encoder", "decoder", scores).verdict == "reproduced"


def test_training_table_measures_loss_against_the_unigram_entropy(tmp_path):
    import json

    import numpy as np

    from twinlm.data.shards import write_meta
    from twinlm.errors import DataError
    from twinlm.suite.report import training_losses, training_table, unigram_entropy
    shards = tmp_path / "shards"
    shards.mkdir()
    np.array([1, 1, 2, 2], dtype=np.uint16).tofile(shards / "tokens.bin")
    write_meta(shards, {"format": "twinlm-shards", "dtype": "uint16"})
    assert math.isclose(unigram_entropy(shards), math.log(2))
    (shards / "tokens.bin").write_bytes(b"")  # no tokens: an error, not NaN
    with pytest.raises(DataError, match="no tokens"):
        unigram_entropy(shards)
    run = tmp_path / "train-encoder" / "run"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"tokens": 10 * i, "loss": 0.5}) + "\n" for i in range(12)))
    table = training_table(training_losses(tmp_path), math.log(2))
    assert "| encoder | 110 | 0.50 | +0.19 nats |" in table


def test_taught_compares_each_model_with_its_random_init_and_the_best_ngram():
    from twinlm.suite.findings import proxies, taught, taught_markdown

    scores = {
        "encoder": {"bpb": Score(2.0, 0.02), "pairs": Score(70, 2.0)},
        "decoder": {"bpb": Score(1.6, 0.02), "pairs": Score(80, 2.0), "generative": Score(30, 1.0)},
        "random-encoder": {"bpb": Score(3.3, 0.01), "pairs": Score(51, 2.0)},
        "random-decoder": {"bpb": Score(3.2, 0.01), "pairs": Score(50, 2.0)},
        "unigram": {"bpb": Score(2.4, 0.03), "pairs": Score(60, 2.0)},
        "bigram": {"bpb": Score(1.9, 0.03), "pairs": Score(75, 2.0)},
    }
    t = taught(scores)
    assert t["best_ngram"] == {"bpb": "bigram", "pairs": "bigram"}  # bits per byte: lower is better
    rows = {c["claim"]: c for c in t["comparisons"]}
    # the encoder: far better than random init on both; worse than the bigram on bits per byte (margin < 0)
    assert rows["encoder beats random init on bits per byte"]["verdict"] == "reproduced"
    assert math.isclose(rows["encoder beats random init on bits per byte"]["margin"], 1.3)
    assert rows["encoder beats bigram control on bits per byte"]["verdict"] == "contradicted"
    assert rows["encoder beats bigram control on minimal pairs"]["verdict"] == "unresolved"  # 5 < 2·√8
    assert rows["decoder beats bigram control on bits per byte"]["verdict"] == "reproduced"
    assert {c["model"] for c in t["comparisons"]} == {"encoder", "decoder"}  # the others were not measured
    judged = judge({m: {k: v for k, v in per.items() if k == "generative"} for m, per in scores.items()})
    (proxy,) = proxies(scores, judged["findings"])
    assert proxy["verdict"] == "reproduced" and proxy["paper_verdict"] == "not measured"
    text = taught_markdown(t, [proxy])
    assert "a proxy" in text and "decoder > encoder on minimal pairs" in text and "bits per byte: `bigram`" in text


def test_report_shows_what_pretraining_taught_from_the_result_files(tmp_path):
    import json

    from twinlm.suite.provenance import provenance
    from twinlm.suite.report import write_report
    from twinlm.suite.scales import get_scale

    def result(track, model, arch, mean, se, extra=None):
        task = ({"bpb": mean, "bpb_se": se, "bpb_ci95": [mean - 2 * se, mean + 2 * se], "score": mean}
                if track == "bpb" else
                {"accuracy": mean, "ci95": [mean - 2 * se, mean + 2 * se], "se": se, "score": mean, "n": 100,
                 "headline": "accuracy"})
        tasks = {"heldout": task} if track == "bpb" else {"swap": task}
        avg = {"mean": mean, "std": se, **({"ci95": [mean - 2 * se, mean + 2 * se]} if track == "pairs" else {})}
        return {"track": track, "model": {"variant": model, "arch": arch, "size": "x", "params": 1, **(extra or {})},
                "tasks": tasks, "average": avg, "config": {}}

    rows = [("encoder", "encoder", 2.0, 70.0), ("random-encoder", "encoder", 3.5, 50.0),
            ("decoder", "decoder", 1.8, 75.0), ("random-decoder", "decoder", 3.4, 50.0),
            ("bigram", "n-gram", 2.5, 60.0)]
    for model, arch, bits, acc in rows:
        for track, mean, se in (("bpb", bits, 0.02), ("pairs", acc, 2.0)):
            folder = tmp_path / f"eval-{model}-{track}"
            folder.mkdir()
            extra = {"trained_tokens": 123456} if arch == "n-gram" else None
            (folder / "result.json").write_text(json.dumps(result(track, model, arch, mean, se, extra)))
            (folder / "STEP.json").write_text(json.dumps({"identity": "x", "seconds": 1.0}))
    steps = [f"eval-{model}-{track}" for model, *_ in rows for track in ("bpb", "pairs")] + ["report"]
    out = write_report(tmp_path / "report", root=tmp_path, scale=get_scale("quick"), preset="cpu-tiny",
                       shards=tmp_path / "none", steps=steps, made_by=provenance())
    assert out["taught"]["encoder beats random init on bits per byte"] == "reproduced"
    assert out["taught"]["encoder beats bigram control on minimal pairs"] == "reproduced"
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["taught"]["best_ngram"] == {"bpb": "bigram", "pairs": "bigram"}
    assert saved["findings"]["proxies"][0]["verdict"] == "unresolved"  # 5 points < 2 x sqrt(8)
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## What pre-training taught" in text and "counted 123,456 tokens" in text
    assert "| encoder | 2.000 [1.960, 2.040] | 70.0 [66.0, 74.0] | 70.0 [66, 74] |" in text
    assert saved["intrinsic"]["encoder"] == {"bpb": {"value": 2.0, "ci95": [1.96, 2.04]},
                                             "pairs": {"value": 70.0, "ci95": [66.0, 74.0]}}
    assert saved["intrinsic"]["bigram"]["trained_tokens"] == {"value": 123456}
    # these markers predate provenance: the report says its steps were not all made by its own code
    assert saved["provenance"]["unknown"] == sorted(steps[:-1]) and not saved["provenance"]["single"]
    assert saved["provenance"]["report"]["torch"] and "were not all computed by this code" in text
