"""Model cards the hub takes (issue 25): front matter built and read back with huggingface_hub, a hub license id
or `other`, `base_model` only as a hub id, no local absolute path anywhere, snippets naming the folder, the
evaluation results twinlm recorded for the folder as `model-index`, a sentence-transformers card for retrieval
exports. Cheap: toy models of the cpu-tiny preset."""

import json

import pytest
import yaml
from huggingface_hub import ModelCard, ModelCardData

from twinlm.card import add_results, check_license, hub_id, model_card, recorded_results, run_summary, shown_name
from twinlm.cli import main
from twinlm.convert import convert, export_model
from twinlm.errors import ConfigError
from twinlm.eval import bpb
from twinlm.eval.retrieval import export_sentence_transformers
from twinlm.eval.settings import BpbConfig
from twinlm.eval.toy import toy_model_dir, toy_sentences, toy_tokenizer
from twinlm.loading import load
from twinlm.suite import pipeline
from twinlm.suite.pipeline import Suite
from twinlm.suite.scales import get_scale
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
    with pytest.raises(ConfigError, match="not a Hugging Face hub license id: pass --license"):
        check_license("My License 1.0")
    with pytest.raises(ConfigError, match="license 'GPL please'"):
        from_dict(tiny_recipe("shards", license="GPL please"))


def test_a_bad_license_is_one_line_before_anything_is_written(models, tmp_path, capsys):
    out = tmp_path / "x"
    assert main(["convert", str(models["dec"]), "--to", "encoder", "--out", str(out),
                 "--license", "My License 1.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("twinlm: error: license 'My License 1.0'") and "\n" not in err and "--license" in err
    assert not out.exists()


def test_base_model_is_a_hub_id_or_nothing(tmp_path, monkeypatch):
    assert hub_id("jhu-clsp/ettin-encoder-17m@main") == "jhu-clsp/ettin-encoder-17m"
    assert hub_id(str(tmp_path)) is None and hub_id("./run/final") is None and hub_id(None) is None
    snapshot = tmp_path / "hub" / "models--jhu-clsp--ettin-decoder-17m" / "snapshots" / "0123abcd"
    assert hub_id(str(snapshot)) == "jhu-clsp/ettin-decoder-17m"  # a hub model resolved into the cache
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "enc").mkdir(parents=True)
    assert hub_id("runs/enc") is None and hub_id("runs/dec") == "runs/dec"  # a folder that exists here is local
    assert shown_name(tmp_path / "suite" / "train-decoder" / "run" / "final") == "train-decoder/run/final"
    assert shown_name("/tmp/x/dec") == "x/dec" and shown_name("/dec") == "dec"
    assert shown_name("runs/a/final") == "runs/a/final"


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
