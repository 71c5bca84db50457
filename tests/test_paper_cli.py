"""`twinlm eval paper` from the command line: the dry run for any model folder, and (pytest -m paper) every column
end to end on the offline stand-ins for a twinlm encoder, a twinlm decoder and a transformers BERT."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import twinlm
from twinlm.eval.toy import toy_model_dir

SRC = os.path.dirname(os.path.dirname(twinlm.__file__))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p),
       "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _twinlm(*args, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "twinlm", *map(str, args)], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def _bert(folder: Path) -> Path:
    """A transformers BERT masked LM, written by transformers, with a real BERT WordPiece tokenizer (MiniLM's)."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from twinlm.eval.tasks import minilm_dir

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    cfg = BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=512)
    BertForMaskedLM(cfg).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


@pytest.mark.data
def test_dry_run_lists_every_dataset_and_an_estimate_for_any_folder(tmp_path):
    enc = toy_model_dir(tmp_path / "enc", causal=False)
    p = _twinlm("eval", "paper", enc, "--dry-run", "--out", tmp_path / "plan")
    assert p.returncode == 0, p.stderr[-3000:]
    for text in ("nyu-mll/glue", "| mnli |", "sentence-transformers/msmarco-co-condenser-margin-mse-sym-mnrl-mean-v1",
                 "mteb/arguana", "mteb/msmarco", "mteb/MultiLongDocRetrieval", "allenai/ai2_arc", "Rowan/hellaswag",
                 "lighteval/winograd_wsc", "estimated (no GPU measurement recorded)"):
        assert text in p.stdout, text
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert set(plan["columns"]) == {"glue", "retrieval", "generative"}
    assert len(plan["columns"]["retrieval"]["datasets"]) == 14  # the triplets + the paper's 13 mteb tasks
    assert plan["paper_row"]["size"] == "17M" and not plan["paper_row"]["same_shape"]
    # the shape of a 400M decoder from its config alone: the paper's own row, and a larger estimate
    dec = tmp_path / "d400"
    dec.mkdir()
    (dec / "config.json").write_text(json.dumps({
        "model_type": "modernbert-decoder", "num_hidden_layers": 28, "hidden_size": 1024, "intermediate_size": 2624,
        "vocab_size": 50368, "architectures": ["ModernBertDecoderForCausalLM"]}))
    p = _twinlm("eval", "paper", dec, "--dry-run", "--tracks", "glue", "--set", "glue.sweep=random:4",
                "--out", tmp_path / "plan400")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "compared with the paper's Ettin-400M decoder" in p.stdout
    big = json.loads((tmp_path / "plan400" / "plan.json").read_text())["columns"]["glue"]
    assert big["gpu_hours"] > plan["columns"]["glue"]["gpu_hours"]
    assert all(d["fine_tuning_runs"] == 12 for d in big["datasets"])  # 4 configurations x 3 seeds


def test_paper_needs_an_out_folder_and_names_bad_columns(tmp_path):
    enc = toy_model_dir(tmp_path / "enc", causal=False)
    p = _twinlm("eval", "paper", enc)
    assert p.returncode != 0 and "needs --out DIR" in p.stderr and "Traceback" not in p.stderr
    p = _twinlm("eval", "paper", enc, "--dry-run", "--tracks", "glue,classification")
    assert p.returncode != 0 and "choose from glue, retrieval, generative" in p.stderr


SMALL = ["glue.seeds=1", "glue.max_train_examples=16", "glue.max_eval_examples=16", "retrieval.max_triplets=32",
         "retrieval.batch_size=8", "retrieval.loss=mnrl", "generative.limit=3"]


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    from twinlm.eval.paper.mteb_tasks import expand
    from twinlm.eval.paper.standins import (
        write_generative_standin,
        write_glue_standin,
        write_msmarco_standin,
        write_mteb_standin,
    )

    root = tmp_path_factory.mktemp("standins")
    write_glue_standin(root, train_rows=32, eval_rows=24)
    write_msmarco_standin(root, n=64)
    write_mteb_standin(root, expand(["paper"]), queries=8, documents=24)
    write_generative_standin(root, rows=6)
    return root


@pytest.mark.paper
@pytest.mark.data
@pytest.mark.parametrize("kind", ["encoder", "decoder", "bert"])
def test_every_column_end_to_end_offline(kind, standins, tmp_path):
    model = (_bert(tmp_path / "bert") if kind == "bert" else
             toy_model_dir(tmp_path / kind, causal=kind == "decoder"))
    out = tmp_path / "out"
    p = _twinlm("eval", "paper", model, "--out", out, "--set", *SMALL, cwd=standins, timeout=1800)
    assert p.returncode == 0, p.stderr[-4000:]
    report = json.loads((out / "paper.json").read_text())
    status = report["table"]["status"]
    assert all(v == "" for v in status.values()), status  # every column, every headline number
    assert report["paper_row"]["kind"] == ("decoder" if kind == "decoder" else "encoder")
    md = (out / "paper.md").read_text()
    assert "| paper: Ettin-17M" in md and "| difference |" in md
    glue = json.loads(json.dumps(report["columns"]["glue"]))
    assert Path(glue["file"]).is_file()
    # a rerun computes nothing: every column comes from its cache
    p = _twinlm("eval", "paper", model, "--out", out, "--set", *SMALL, cwd=standins, timeout=600)
    assert p.returncode == 0 and all(f"[paper] {c}: cached" in p.stderr for c in ("glue", "retrieval", "generative"))
