"""`twinlm eval paper`: the model's paper row, the table, and the column runner's caches and failures."""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors.torch import load_file

from twinlm.errors import ConfigError, DataError, ModelLoadError
from twinlm.eval.paper import columns as cols
from twinlm.eval.paper.reference import model_shape, paper_row
from twinlm.eval.paper.table import table
from twinlm.eval.toy import toy_model_dir


def _config_only(folder: Path, **cfg) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_ettin_shapes_get_their_own_row_and_others_the_nearest_labelled(tmp_path):
    enc = _config_only(tmp_path / "e150", model_type="modernbert", num_hidden_layers=22, hidden_size=768,
                       intermediate_size=1152, vocab_size=50368, architectures=["ModernBertForMaskedLM"])
    dec = _config_only(tmp_path / "d400", model_type="modernbert-decoder", num_hidden_layers=28, hidden_size=1024,
                       intermediate_size=2624, vocab_size=50368, architectures=["ModernBertDecoderForCausalLM"])
    row = paper_row(model_shape(enc))
    assert (row["size"], row["kind"], row["same_shape"]) == ("150M", "encoder", True)
    assert row["values"]["glue"] == {"value": 88.9, "approx": False}
    assert row["values"]["msmarco"]["approx"] is True
    row = paper_row(model_shape(dec))
    assert (row["size"], row["kind"], row["same_shape"]) == ("400M", "decoder", True)
    assert row["values"]["glue"] is None and row["values"]["mnli"] == {"value": 88.2, "approx": False}
    # a BERT-base shape is no Ettin size: the nearest by non-embedding parameters (85M: Ettin-150M's 110M), labelled
    bert = _config_only(tmp_path / "bert", model_type="bert", num_hidden_layers=12, hidden_size=768,
                        intermediate_size=3072, vocab_size=30522, architectures=["BertForMaskedLM"])
    row = paper_row(model_shape(bert))
    assert (row["size"], row["same_shape"]) == ("150M", False) and "not the same shape" in row["note"]
    assert paper_row(model_shape(bert), size="1b")["size"] == "1B"
    with pytest.raises(ConfigError, match="17M"):
        paper_row(model_shape(bert), size="2B")


def test_parameter_count_is_the_weights_own(tmp_path):
    folder = toy_model_dir(tmp_path / "enc", causal=False)
    shape = model_shape(folder)
    weights = load_file(str(folder / "model.safetensors"))
    assert shape.counted == "safetensors"
    assert shape.params == sum(t.numel() for t in weights.values())
    assert shape.non_embedding == shape.params - weights["model.embeddings.tok_embeddings.weight"].numel()
    assert shape.kind == "encoder" and model_shape(toy_model_dir(tmp_path / "dec", causal=True)).kind == "decoder"


def _row(tmp_path):
    return paper_row(model_shape(_config_only(
        tmp_path / "m", model_type="modernbert", num_hidden_layers=22, hidden_size=768, intermediate_size=1152,
        vocab_size=50368)))


def test_table_reads_each_column_and_takes_differences_only_of_numbers(tmp_path):
    glue = {"average": {"mean": 0.801}, "tasks": {"mnli": {"score": 0.85}}}
    retrieval = {"aggregates": {"mteb_v2_retrieval": {"score": 0.41}, "msmarco_dev": {"score": 0.35},
                                "codesearchnet": {"score": None, "incomplete": ["CodeSearchNetRetrieval"]},
                                "mldr_en": {"score": 0.2}}}
    t = table("enc", _row(tmp_path), {"glue": {"result": glue}, "retrieval": {"result": retrieval},
                                      "generative": {"error": "FetchError: offline"}})
    assert t["model"]["glue"] == pytest.approx(80.1) and t["model"]["mnli"] == pytest.approx(85.0)
    assert t["difference"]["glue"] == pytest.approx(80.1 - 88.9)
    assert t["difference"]["msmarco"] == pytest.approx(35.0 - 40.0)
    assert t["status"]["codesearchnet"] == "incomplete" and t["model"]["codesearchnet"] is None
    assert t["status"]["generative"] == "failed" and t["difference"]["generative"] is None
    assert t["difference"]["mteb_v2"] is None  # not in the paper's headline table
    md = t["markdown"].splitlines()
    assert md[2].startswith("| enc | 80.1 | 85.0 | 41.0 | 35.0 | incomplete | 20.0 | failed |")
    assert md[3].startswith("| paper: Ettin-150M encoder | 88.9 | 89.2 | — | ≈40.0 |")


@dataclass
class _Settings:
    x: int = 1


class _FakeTrack:
    """A column's track that counts its runs and fails when told to (the runner's bookkeeping, not a track)."""

    settings = _Settings
    help = "fake"

    def __init__(self, result=None, fail=False):
        self.calls, self.result, self.fail = 0, result, fail

    def run(self, model, settings, **options):
        self.calls += 1
        if self.fail:
            raise DataError("no rows")
        return dict(self.result, x=settings.x)


def test_a_failed_column_is_reported_the_others_go_on_and_finished_columns_are_not_rerun(tmp_path, monkeypatch):
    model = toy_model_dir(tmp_path / "enc", causal=False)
    glue = _FakeTrack({"average": {"mean": 0.5}, "tasks": {"mnli": {"score": 0.6}}})
    retrieval = _FakeTrack(fail=True)
    monkeypatch.setattr(cols, "TRACKS", {"glue": glue, "mteb": retrieval})
    logs: list[str] = []
    out = tmp_path / "out"
    report = cols.paper(str(model), out, columns=["glue", "retrieval"], log=logs.append)
    assert report["columns"]["retrieval"] == {"error": "DataError: no rows"}
    assert report["table"]["model"]["glue"] == pytest.approx(50.0)
    assert (out / "retrieval.error.txt").read_text().startswith("Traceback")
    assert json.loads((out / "paper.json").read_text())["table"]["status"]["msmarco"] == "failed"
    assert "| paper: Ettin-17M encoder" in (out / "paper.md").read_text()

    cols.paper(str(model), out, columns=["glue", "retrieval"], log=logs.append)
    assert (glue.calls, retrieval.calls) == (1, 2)  # the finished column came from its cache; the failed one reran
    assert any("glue: cached" in line for line in logs)

    cols.paper(str(model), out, columns=["glue"], overrides=["glue.x=2"], log=logs.append)
    assert glue.calls == 2  # other settings: another result

    text = (out / "glue.result.json").read_text()
    (out / "glue.result.json").write_text(text.replace('"x": 2', '"x": 3'))
    cols.paper(str(model), out, columns=["glue"], overrides=["glue.x=2"], log=logs.append)
    assert glue.calls == 3 and any("do not match its sha256" in line for line in logs)


def test_column_settings_take_the_papers_defaults_and_name_bad_keys():
    s = cols.column_settings(["generative"], ["generative.limit=20"])
    assert (s["generative"].tasks, s["generative"].limit, s["generative"].data) == (["paper"], 20, "hub")
    with pytest.raises(ConfigError, match="not among the columns run"):
        cols.column_settings(["generative"], ["glue.seeds=1"])
    with pytest.raises(ConfigError, match="choose from glue, retrieval, generative"):
        cols.column_settings(["classification"])


def test_a_column_with_failed_tasks_is_not_cached_and_its_tasks_are_named(tmp_path, monkeypatch):
    model = toy_model_dir(tmp_path / "enc", causal=False)
    glue = _FakeTrack({"average": {"mean": None, "incomplete": ["cola"]},
                       "tasks": {"mnli": {"score": 0.6}, "cola": {"error": "MissingArtifactError: offline"}}})
    monkeypatch.setattr(cols, "TRACKS", {"glue": glue})
    out = tmp_path / "out"
    logs: list[str] = []
    report = cols.paper(str(model), out, columns=["glue"], log=logs.append)
    assert report["table"]["status"]["glue"] == "incomplete" and report["table"]["model"]["mnli"] == pytest.approx(60)
    assert (out / "glue.error.txt").read_text() == "cola: MissingArtifactError: offline\n"
    assert "[paper] glue cola failed: MissingArtifactError: offline" in logs
    cols.paper(str(model), out, columns=["glue"], log=logs.append)
    assert glue.calls == 2  # retried, not read back from a cache


def test_mnli_not_asked_for_is_not_run_and_a_missing_path_is_one_line(tmp_path):
    t = table("enc", _row(tmp_path), {"glue": {"result": {"average": {"mean": None}, "tasks": {"rte": {"score": 1}}}}})
    assert t["status"]["mnli"] == "not run" and t["status"]["glue"] == "incomplete"
    for missing in (tmp_path / "nope", "./nope", "a/b/c"):
        with pytest.raises(ModelLoadError, match="no such model folder"):
            model_shape(missing)
