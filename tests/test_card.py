"""Model cards the hub takes (issue 25): front matter built and read back with huggingface_hub, a hub license id
or `other`, `base_model` only as a hub id, no local absolute path anywhere, snippets naming the folder, the
evaluation results twinlm recorded for the folder as `model-index`, a sentence-transformers card for retrieval
exports. Cheap: toy models of the cpu-tiny preset."""

import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import yaml
from huggingface_hub import ModelCard, ModelCardData

from twinlm.card import (
    add_results,
    check_license,
    hub_id,
    license_problem,
    model_card,
    recorded_results,
    resolved_hub_model,
    run_summary,
    shown_name,
)
from twinlm.cli import main
from twinlm.convert import convert, export_model
from twinlm.errors import ConfigError
from twinlm.eval import bpb
from twinlm.eval.retrieval import export_sentence_transformers
from twinlm.eval.settings import BpbConfig
from twinlm.eval.toy import toy_hub_revision, toy_model_dir, toy_sentences, toy_tokenizer
from twinlm.loading import load
from twinlm.suite import pipeline
from twinlm.suite.pipeline import Suite
from twinlm.suite.scales import get_scale
from twinlm.train import run as train_run
from twinlm.train.recipe import from_dict
from twinlm.train.testing import tiny_recipe


def _card(folder) -> ModelCard:
    """The folder's card, parsed by huggingface_hub, checked to carry no local absolute path and to round-trip
    through ModelCardData."""
    text = (folder / "README.md").read_text()
    for root in {str(folder.parent), str(folder.resolve().parent)}:
        assert root not in text, f"a local path in {folder}/README.md"
    card = ModelCard.load(folder / "README.md")
    assert ModelCardData(**card.data.to_dict()).to_dict() == card.data.to_dict()
    return card


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cards")
    tok = toy_tokenizer()
    return {"root": root, "dec": toy_model_dir(root / "tiny-dec", causal=True, tokenizer=tok),
            "enc": toy_model_dir(root / "tiny-enc", causal=False, tokenizer=tok), "tok": tok}


def test_license_is_a_hub_id_or_other():
    assert check_license("MIT") == "mit" and check_license("other") == "other" and check_license(None) is None
    # obvious spellings of hub ids are normalised, not refused
    for spelling, lic in [("Apache 2.0", "apache-2.0"), ("apache-2.0 ", "apache-2.0"), ("MIT License", "mit"),
                          ("Apache License, Version 2.0", "apache-2.0"), ("apache2", "apache-2.0"),
                          ("GPL-3.0-only", "gpl-3.0"), ("gplv3", "gpl-3.0"), ("CC BY 4.0", "cc-by-4.0"),
                          ("BSD 3-Clause", "bsd-3-clause"), ("LLaMA3", "llama3"), ("cc0", "cc0-1.0")]:
        assert check_license(spelling) == lic, spelling
    with pytest.raises(ConfigError, match="not a Hugging Face hub license id: pass --license"):
        check_license("My License 1.0")
    assert "license 'GPL please'" in license_problem("GPL please") and license_problem("Apache 2.0") is None


def test_a_recipe_license_the_hub_would_not_take_never_stops_training(trained_decoder, tmp_path):
    # a run whose recipe names a license the hub would not take resumes with the same command: a warning at the
    # start, final/'s card without a license; export then refuses it until --license names one
    assert from_dict(tiny_recipe("shards", license="GPL please")).license == "GPL please"
    run_dir = tmp_path / "dec"
    shutil.copytree(trained_decoder["run"], run_dir)
    shutil.rmtree(run_dir / "final")  # resumed from its last checkpoint, the run writes final/ again
    recipe = yaml.safe_load((run_dir / "config.yaml").read_text())
    recipe["license"] = "GPL please"
    lines: list[str] = []
    final = train_run(recipe, run_dir, log=lambda *a: lines.append(" ".join(map(str, a))))
    assert any(line.startswith("warning: license 'GPL please' is not a Hugging Face hub license id") for line in lines)
    assert _card(final).data.license is None
    with pytest.raises(ConfigError, match="license 'GPL please'.*pass --license"):
        export_model(final, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert _card(export_model(final, tmp_path / "y", license="Apache 2.0")).data.license == "apache-2.0"


def test_a_bad_license_is_one_line_before_anything_is_written(models, tmp_path, capsys):
    out = tmp_path / "x"
    assert main(["convert", str(models["dec"]), "--to", "encoder", "--out", str(out),
                 "--license", "My License 1.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("twinlm: error: license 'My License 1.0'") and "\n" not in err and "--license" in err
    assert not out.exists()


def test_base_model_is_a_hub_id_or_nothing(tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--jhu-clsp--ettin-decoder-17m" / "snapshots" / "0123abcd"
    assert hub_id(str(snapshot)) == "jhu-clsp/ettin-decoder-17m"  # a hub model resolved into the cache
    # a string is no hub id by its spelling: `runs/dec` may be a folder of another working directory
    assert hub_id("jhu-clsp/ettin-encoder-17m@main") is None and hub_id("runs/dec") is None
    assert hub_id(str(tmp_path)) is None and hub_id("./run/final") is None and hub_id(None) is None
    monkeypatch.chdir(tmp_path)
    assert shown_name(tmp_path / "suite" / "train-decoder" / "run" / "final") == "train-decoder/run/final"
    assert shown_name("/tmp/x/dec") == "x/dec" and shown_name("/dec") == "dec"
    assert shown_name("runs/a/final") == "runs/a/final"


def test_a_run_summary_names_a_hub_start_only_when_it_was_resolved_from_the_hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text("{}")
    commit = toy_hub_revision(cache, "ettin-org/tiny-encoder", "main", tmp_path / "src")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    for start, base in [("ettin-org/tiny-encoder", "ettin-org/tiny-encoder"), ("runs/enc/final", None)]:
        (run / "config.yaml").write_text(yaml.safe_dump({"name": "x", "objective": "clm", "init_from": start}))
        summary = run_summary(run)
        assert hub_id(summary["base_model"]) == base, start
        assert (summary["base_model"] == start) == (base is None)  # a local start is named as the recipe names it
    assert resolved_hub_model("ettin-org/tiny-encoder").endswith(commit)
    assert resolved_hub_model("ettin-org/tiny-encoder@step3") is None  # a revision not in the cache


def test_recorded_results_read_the_folder_and_beside_it_never_sibling_runs(tmp_path, monkeypatch):
    ckpt = tmp_path / "runs" / "a" / "checkpoints" / "step-00000010"
    ckpt.mkdir(parents=True)
    result = {"track": "bpb", "model": {"path": str(ckpt)}, "tasks": {"t": {"score": 2.0}}}
    (ckpt.parent / "bpb.json").write_text(json.dumps(result))
    (ckpt.parent / "bpb.lm_eval.json").write_text(json.dumps(result))  # lm-eval's own output: no result
    for sibling in ("b", "c"):  # other runs' results, one of them even naming this checkpoint
        (tmp_path / "runs" / sibling).mkdir()
        (tmp_path / "runs" / sibling / "result.json").write_text(json.dumps(result))
    read: list[Path] = []
    real = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: read.append(self) or real(self, *a, **k))
    assert [r["model"]["path"] for r in recorded_results(ckpt)] == [str(ckpt)]
    assert read == [ckpt.parent / "bpb.json"]


def test_plain_folder_card(models):
    card = _card(models["dec"])
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.base_model is None and card.data.license is None and card.data.eval_results is None
    assert 'AutoTokenizer.from_pretrained("tiny-dec")' in card.text and "PATH" not in card.text
    assert _card(models["enc"]).data.pipeline_tag == "fill-mask"


def test_converted_card_describes_the_conversion(models, tmp_path):
    out = convert(models["dec"], "encoder", tmp_path / "as-enc", license="apache-2.0", log=lambda *a: None)
    card = _card(out)
    assert card.data.license == "apache-2.0" and card.data.base_model is None  # a local source is no hub id
    assert card.data.pipeline_tag == "fill-mask"
    assert "## Conversion" in card.text and "converted from a decoder by `twinlm convert --to encoder`" in card.text
    assert "## Training of the source decoder" in card.text and "/tiny-dec`" in card.text
    assert 'pipeline("fill-mask", model="as-enc")' in card.text


def test_export_card_carries_the_recorded_results_as_model_index(models, tmp_path):
    src = models["root"] / "scored-enc"
    if not src.exists():
        toy_model_dir(src, causal=False, tokenizer=models["tok"])
    text = tmp_path / "held.txt"
    text.write_text("\n\n".join(toy_sentences(6, seed=3)))
    result = bpb.run(str(src), BpbConfig(text_file=str(text), max_docs=6), out=src.parent / "bpb-scored-enc.json",
                     log=None)
    assert [r["track"] for r in recorded_results(src)] == ["bpb"]
    out = export_model(src, tmp_path / "exported", license="mit")
    card = _card(out)
    (row,) = card.data.eval_results
    task, score = next(iter(result["tasks"].items()))
    assert row.dataset_name == task and row.metric_value == pytest.approx(score["score"], abs=1e-4)
    assert card.data.model_name == "exported" and "model-index" in (out / "README.md").read_text()
    assert "## Evaluation" in card.text


def test_suite_adds_results_to_a_written_card(models, tmp_path):
    folder = toy_model_dir(tmp_path / "random-encoder" / "model", causal=False, tokenizer=models["tok"])
    result = {"track": "classification", "model": {"path": str(folder)},
              "tasks": {"sst2": {"score": 61.5, "headline": "accuracy"}}, "average": {"mean": 61.5}}
    (tmp_path / "eval-random-encoder-classification").mkdir()
    (tmp_path / "eval-random-encoder-classification" / "result.json").write_text(json.dumps(result))
    assert add_results(folder, recorded_results(folder))
    assert not add_results(folder, recorded_results(folder))  # the same results: the card stays as it is
    card = _card(folder)
    assert [(e.dataset_name, e.metric_value) for e in card.data.eval_results] == [("sst2", 61.5)]
    assert card.text.count("## Evaluation") == 1 and card.text.index("## Evaluation") < card.text.index("## Usage")


def test_sentence_transformers_export_has_a_card_of_its_kind(models, tmp_path):
    loaded = load(models["dec"])
    out = export_sentence_transformers(loaded, models["tok"], tmp_path / "st-dec", "last", 64, card={
        "source": str(models["dec"]), "base_model": str(models["dec"]),
        "scores": {"sciq": {"ndcg@10": 12.5, "mrr@10": 10.0}},
        "training": {"pairs": 64, "sets": ["sciq"], "epochs": 1, "seed": 0}})
    card = _card(out)
    assert card.data.library_name == "sentence-transformers" and card.data.pipeline_tag == "sentence-similarity"
    assert card.data.base_model is None
    assert [(e.dataset_name, e.metric_type, e.metric_value) for e in card.data.eval_results] == [
        ("sciq", "ndcg@10", 12.5)]
    assert 'SentenceTransformer("st-dec")' in card.text and "/tiny-dec`" in card.text
    assert "64 question–passage pairs from sciq" in card.text


def test_recipe_language_and_datasets_reach_the_card(models, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"name": "cpu-decoder", "objective": "clm", "license": "MIT",
                                                     "language": ["en"], "datasets": ["org/corpus"]}))
    (run / "metrics.jsonl").write_text(json.dumps({"phase": "pretrain", "tokens": 4096, "loss": 3.25}) + "\n")
    text = model_card(load(models["dec"]).config, {**run_summary(run), "name": "run/final"})
    data = ModelCard(text).data
    assert (data.license, data.language, data.datasets) == ("mit", ["en"], ["org/corpus"])
    assert "final training loss: 3.2500" in text


def test_the_suite_report_step_puts_each_models_results_in_its_card(models, tmp_path, monkeypatch):
    suite = Suite(tmp_path / "suite", get_scale("quick"))
    folder = toy_model_dir(suite.model_dir("encoder"), causal=False, tokenizer=models["tok"])
    step = suite.path("eval-encoder-bpb")
    step.mkdir()
    (step / "result.json").write_text(json.dumps({"track": "bpb", "model": {"path": str(folder)},
                                                  "tasks": {"heldout": {"score": 2.5, "headline": "bpb"}}}))
    monkeypatch.setattr(pipeline, "write_report", lambda *a, **k: {})  # the report itself is tested elsewhere
    suite._report(suite.path("report"))
    assert [(e.dataset_name, e.metric_value) for e in _card(folder).data.eval_results] == [("heldout", 2.5)]
