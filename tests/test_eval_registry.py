"""One record per evaluation track (twinlm.eval.tracks) read by `twinlm eval`, `eval curve` and the suite; the
`twinlm eval` flags generated from the settings dataclasses (twinlm.cli.flags); the other spelling `classify`
accepted wherever users type it; every setting in each result's config."""

import dataclasses
import json
import typing

import pytest

from twinlm.cli import build_parser, main
from twinlm.cli.flags import settings_from_flags
from twinlm.errors import ConfigError
from twinlm.eval import bpb, classify, generative, pairs, retrieval
from twinlm.eval.curve import track_settings
from twinlm.eval.settings import ClassifyConfig, GenerativeConfig, PairsConfig, RetrievalConfig
from twinlm.eval.tasks import RetrievalSet
from twinlm.eval.toy import (
    toy_classification,
    toy_model_dir,
    toy_retrieval,
    toy_sentences,
    toy_tokenizer,
    write_toy_mc_jsonl,
)
from twinlm.eval.tracks import TRACKS, canonical_key, track
from twinlm.suite.scales import TRACKS as SUITE_TRACKS
from twinlm.suite.scales import Scale, get_scale


def _settings(argv: list[str]):
    args = build_parser().parse_args(argv)
    return settings_from_flags(track(args.track_name).settings, args)


def test_one_record_per_track_and_the_suite_has_settings_for_each():
    assert list(TRACKS) == ["classification", "retrieval", "generative", "bpb", "pairs", "glue", "mteb"]
    assert SUITE_TRACKS == tuple(name for name, t in TRACKS.items() if t.suite) == tuple(TRACKS)[:5]
    hints = typing.get_type_hints(Scale)
    for name in SUITE_TRACKS:
        t = TRACKS[name]
        assert hints[name] is t.settings and dataclasses.is_dataclass(t.settings)
    for name, t in TRACKS.items():
        assert track(name) is t and all(track(a) is t for a in t.aliases)
    assert track("classify").name == "classification"
    with pytest.raises(ConfigError, match="unknown track 'classifyy': choose from classification, retrieval"):
        track("classifyy")


def test_no_flag_gives_the_dataclass_defaults():
    for name, t in TRACKS.items():
        assert _settings(["eval", name, "m"]) == t.settings(), name
    assert _settings(["eval", "classify", "m"]) == ClassifyConfig()


def test_existing_flags_keep_their_meaning():
    cfg = _settings(["eval", "classify", "m", "--seeds", "0,1,2", "--max-train", "all", "--max-eval", "0",
                     "--kfold", "3", "--pooling", "mean", "--tasks", "sst2,rte", "--lrs", "1e-4,1e-3",
                     "--mode", "finetune", "--probe-layer", "best", "--batch-size", "4", "--epochs", "2"])
    assert cfg == ClassifyConfig(tasks=["sst2", "rte"], mode="finetune", seeds=[0, 1, 2], max_train=None,
                                 max_eval=None, kfold=3, epochs=2, batch_size=4, lrs=[1e-4, 1e-3], pooling="mean",
                                 probe_layer="best")
    assert _settings(["eval", "classify", "m", "--seeds", "3"]).seeds == [3]  # a comma list, as before
    ret = _settings(["eval", "retrieval", "m", "--no-finetune", "--sets", "sciq", "--max-corpus", "none",
                     "--lr", "3e-4"])
    assert ret == RetrievalConfig(sets=["sciq"], finetune=False, lr=3e-4, max_corpus=None)
    gen = _settings(["eval", "generative", "m", "--no-bos", "--limit", "all", "--delimiter", "\n"])
    assert gen == GenerativeConfig(add_bos=False, limit=None, delimiter="\n")
    assert _settings(["eval", "pairs", "m", "--families", "swap,article", "--per-family", "all"]) == \
        PairsConfig(families=["swap", "article"], per_family=None)


def test_the_unreachable_settings_are_reachable():
    assert _settings(["eval", "classify", "m", "--Cs", "0.5,2"]).Cs == [0.5, 2.0]
    assert _settings(["eval", "classify", "m", "--cs", "1"]).Cs == [1.0]
    assert _settings(["eval", "retrieval", "m", "--query-max-length", "32"]).query_max_length == 32
    assert _settings(["eval", "generative", "m", "--max-length", "128"]).max_length == 128
    b = _settings(["eval", "bpb", "m", "--max-tokens", "4K", "--seed", "7"])
    assert (b.max_tokens, b.seed) == (4000, 7)
    p = _settings(["eval", "pairs", "m", "--min-words", "4", "--max-words", "20", "--max-tokens", "2048"])
    assert (p.min_words, p.max_words, p.max_tokens) == (4, 20, 2048)


def test_bad_flag_values_name_the_flag():
    with pytest.raises(ConfigError, match="--kfold: cannot read 'x' as int"):
        _settings(["eval", "classify", "m", "--kfold", "x"])
    with pytest.raises(ConfigError, match="at least 2 folds"):
        _settings(["eval", "classify", "m", "--kfold", "1"])
    with pytest.raises(ConfigError, match="families: scramble is not one of"):
        _settings(["eval", "pairs", "m", "--families", "scramble"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "classify", "m", "--pooling", "median"])


def test_help_shows_every_setting_with_its_default(capsys):
    for name, t in TRACKS.items():
        with pytest.raises(SystemExit):
            main(["eval", name, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for f in dataclasses.fields(t.settings):
            assert "--" + f.name.replace("_", "-") in text, (name, f.name)
        assert text.count("(default:") >= len(dataclasses.fields(t.settings))
    with pytest.raises(SystemExit):
        main(["eval", "classify", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--seeds A,B,… the seeds" in text and "(default: 0,1,2)" in text and "--max-train N" in text


def test_classify_is_accepted_wherever_it_was_typed():
    assert track_settings(["classify"], ["classify.seeds=4"]) == {"classification": ClassifyConfig(seeds=4)}
    assert track_settings(["classification", "bpb"], ["classification.max_eval=10"])["classification"].max_eval == 10
    with pytest.raises(ConfigError, match="unknown key classify.sedes; known under classify: tasks"):
        track_settings(["classify"], ["classify.sedes=4"])
    scale = get_scale("quick", ["classify.seeds=5", "control_tracks=[classify, bpb]"])
    assert scale.classification.seeds == 5 and scale.control_tracks == ["classification", "bpb"]
    assert get_scale("quick", ["classification.seeds=5"]).classification.seeds == 5
    assert scale.track_settings("classify") is scale.classification
    assert canonical_key("classify") == "classification" and canonical_key("bpb.seed") == "bpb.seed"
    assert canonical_key("pretrain_tokens") == "pretrain_tokens"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    tok = toy_tokenizer()
    (root / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_classification(30, 1)))
    (root / "held.txt").write_text("\n\n".join(toy_sentences(6, seed=9)))
    pairs_file = root / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps({"good": f"the cat sat on mat {i}", "bad": f"cat the sat on mat {i}",
                                              "family": "swap"}) + "\n" for i in range(6)))
    return {"root": root, "enc": toy_model_dir(root / "enc", False, tokenizer=tok),
            "dec": toy_model_dir(root / "dec", True, tokenizer=tok), "pairs": pairs_file,
            "mc": write_toy_mc_jsonl(root / "mc.jsonl", n=4)}


def test_every_result_config_holds_every_setting_seconds_and_versions(toy):
    c, q, r = toy_retrieval(20)
    runs = {
        "classification": classify.run("tfidf", ClassifyConfig(seeds=[0], kfold=3,
                                                               eval_file=str(toy["root"] / "dev.jsonl")), log=None),
        "retrieval": retrieval.run(str(toy["enc"]), RetrievalConfig(max_eval_queries=5, finetune=False),
                                   retrieval_sets=[RetrievalSet("toy", c, q, r)], log=None),
        "generative": generative.run(str(toy["dec"]), GenerativeConfig(tasks=[str(toy["mc"])], limit=None,
                                                                       max_length=64), log=None),
        "bpb": bpb.run(str(toy["dec"]), TRACKS["bpb"].settings(text_file=str(toy["root"] / "held.txt"),
                                                               max_tokens=512), log=None),
        "pairs": pairs.run(str(toy["dec"]), PairsConfig(pairs_file=str(toy["pairs"])), log=None),
    }
    for name, result in runs.items():
        assert result["track"] == name
        config = result["config"]
        missing = {f.name for f in dataclasses.fields(TRACKS[name].settings)} - set(config)
        assert not missing, (name, missing)
        assert config["seconds"] >= 0 and "torch" in config["versions"], name
    assert runs["generative"]["config"]["max_length"] == 64 and runs["bpb"]["config"]["max_tokens"] == 512
    # resolved values stand over the settings: the task read, the pooling chosen, the mode a baseline runs
    assert runs["classification"]["config"]["tasks"] == ["dev"] and runs["retrieval"]["config"]["pooling"] == "mean"


def test_the_command_line_names_a_task_file_custom_as_before(toy, tmp_path):
    out = tmp_path / "cls.json"
    assert main(["eval", "classify", "tfidf", "--eval-file", str(toy["root"] / "dev.jsonl"), "--seeds", "0",
                 "--kfold", "3", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert list(result["tasks"]) == ["custom"] and result["track"] == "classification"
