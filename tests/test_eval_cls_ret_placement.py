"""Classification and retrieval on any device and across ranks: `device="cpu"` is exactly the default on a machine
without a GPU, a GPU run agrees with the CPU within bf16's tolerance, `--device cuda` without a GPU is one error
line, every unit (a seed's fine-tuning, a probe) gives the same result whatever ran before it, and two gloo ranks
under torchrun write the very file one process writes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from twinlm.eval import classify, retrieval
from twinlm.eval.common import embed, load_for_eval
from twinlm.eval.ranks import Ranks
from twinlm.eval.settings import ClassifyConfig, RetrievalConfig
from twinlm.eval.tasks import RetrievalSet
from twinlm.eval.toy import toy_model_dir, toy_retrieval, toy_tokenizer, write_toy_classification

TIMING = {"seconds", "versions"}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls-ret-placement")
    tok = toy_tokenizer()
    write_toy_classification(root)
    return {"root": root, "tok": tok, "enc": toy_model_dir(root / "encoder", False, tokenizer=tok),
            "dec": toy_model_dir(root / "decoder", True, tokenizer=tok)}


def files(toy):
    return dict(train_file=toy["root"] / "train.jsonl", eval_file=toy["root"] / "dev.jsonl")


def sets():
    return [RetrievalSet("toy", *toy_retrieval(40)), RetrievalSet("toy2", *toy_retrieval(30, seed=1))]


def scores(result, drop=TIMING | {"device", "precision"}):
    """The result without timings and placement: what must not depend on where or how it ran."""
    if isinstance(result, dict):
        return {k: scores(v, drop) for k, v in result.items() if k not in drop}
    if isinstance(result, list):
        return [scores(v, drop) for v in result]
    return result


# --- one process ---------------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="the default device is the GPU here")
def test_device_cpu_is_the_default_bit_for_bit(toy):
    for cfg in (ClassifyConfig(["toy"], seeds=[0, 1], **files(toy)),
                ClassifyConfig(["toy"], seeds=[0], mode="finetune", epochs=1, lrs=[1e-3], max_train=24, **files(toy))):
        plain = classify.run(str(toy["enc"]), cfg, log=None)
        cpu = classify.run(str(toy["enc"]), cfg, log=None, device="cpu")
        assert scores(cpu, TIMING) == scores(plain, TIMING)
        assert (cpu["config"]["device"], cpu["config"]["precision"]) == ("cpu", "fp32")
    rcfg = RetrievalConfig(max_eval_queries=15, epochs=1, batch_size=8)
    plain = retrieval.run(str(toy["dec"]), rcfg, retrieval_sets=sets(), log=None)
    cpu = retrieval.run(str(toy["dec"]), rcfg, retrieval_sets=sets(), log=None, device="cpu")
    assert scores(cpu, TIMING) == scores(plain, TIMING)
    assert (cpu["config"]["device"], cpu["config"]["precision"]) == ("cpu", "fp32")


def test_a_unit_does_not_depend_on_the_units_before_it(toy):
    # seed 1 alone and seed 1 after seed 0 in the same process: the same fine-tuning, the same scores (each unit
    # seeds torch and its batch order itself, so it can run on any rank after any other unit); on the CPU, where
    # the kernels are deterministic
    ft = dict(mode="finetune", epochs=1, lrs=[1e-4, 1e-3], max_train=24, **files(toy))
    both = classify.run(str(toy["enc"]), ClassifyConfig(["toy"], seeds=[0, 1], **ft), log=None,
                        device="cpu")["tasks"]["toy"]
    alone = classify.run(str(toy["enc"]), ClassifyConfig(["toy"], seeds=[1], **ft), log=None,
                         device="cpu")["tasks"]["toy"]
    assert both["per_seed"][1] == alone["per_seed"][0] and both["chosen"][1] == alone["chosen"][0]
    rcfg = dict(max_eval_queries=15, epochs=1, batch_size=8)
    both = retrieval.run(str(toy["enc"]), RetrievalConfig(seeds=[0, 1], **rcfg), retrieval_sets=sets(), log=None,
                         device="cpu")
    alone = retrieval.run(str(toy["enc"]), RetrievalConfig(seeds=[1], **rcfg), retrieval_sets=sets(), log=None,
                          device="cpu")
    assert both["tasks"]["toy"]["per_seed"][1] == alone["tasks"]["toy"]["per_seed"][0]
    assert both["config"]["training"][1]["first_loss"] == alone["config"]["training"][1]["first_loss"]


def test_embedding_groups_are_packed_alone_and_land_on_the_cpu(toy):
    # embed_groups packs each group on its own: a group's rows are exactly `embed` of that group, in input order,
    # float32 on the CPU; one rank of one is the whole job
    from twinlm.eval.common import embed_groups

    loaded = load_for_eval(str(toy["enc"]), device="cpu")
    a = [[1, 5, 6, 7, 2], [1, 9, 2], [1, *[4] * 30, 2]]
    b = [[1, 8, 8, 2], [1, 7, 2]]
    both = embed_groups(loaded.model, [a, b], ["cls", "mean"], max_tokens=16)
    for group, got in zip((a, b), both):
        for pooling in ("cls", "mean"):
            assert torch.equal(got[pooling], embed(loaded.model, group, pooling, max_tokens=16))
            assert got[pooling].dtype == torch.float32 and got[pooling].device.type == "cpu"
    assert torch.equal(embed_groups(loaded.model, [a], ["mean"], ranks=Ranks())[0]["mean"],
                       embed(loaded.model, a, "mean"))
    assert embed(loaded.model, [], "mean").numel() == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_is_one_error_line(toy, capsys):
    from twinlm.cli import main

    for track in ("classification", "retrieval"):
        assert main(["eval", track, str(toy["enc"]), "--device", "cuda", "--out", str(toy["root"] / "x.json"),
                     *(["--eval-file", str(toy["root"] / "dev.jsonl")] if track == "classification" else [])]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["twinlm: error: --device cuda: this machine has no CUDA GPU visible to torch; use --device cpu "
                       "(or auto)"]
    assert not (toy["root"] / "x.json").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_scores_agree_with_the_cpu(toy):
    seqs = [[1, *range(5, 5 + n), 2] for n in (3, 17, 40)]
    on = {d: load_for_eval(str(toy["enc"]), device=d) for d in ("cpu", "cuda")}
    assert on["cuda"].device.type == "cuda"
    cpu, gpu = (embed(on[d].model, seqs, "mean") for d in ("cpu", "cuda"))
    assert gpu.device.type == "cpu" and gpu.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(cpu, gpu).min() > 0.99  # bf16 autocast on the GPU
    for cfg in (ClassifyConfig(["toy"], seeds=[0, 1], **files(toy)),
                ClassifyConfig(["toy"], seeds=[0], mode="finetune", epochs=1, lrs=[1e-3], max_train=24, **files(toy))):
        res = {d: classify.run(str(toy["enc"]), cfg, log=None, device=d) for d in ("cpu", "cuda")}
        assert res["cuda"]["config"]["precision"] == "bf16 autocast" and res["cuda"]["config"]["device"] == "cuda:0"
        assert abs(res["cuda"]["tasks"]["toy"]["score"] - res["cpu"]["tasks"]["toy"]["score"]) <= 10.0
    rcfg = RetrievalConfig(max_eval_queries=15, epochs=1, batch_size=8)
    res = {d: retrieval.run(str(toy["enc"]), rcfg, retrieval_sets=sets(), log=None, device=d) for d in ("cpu", "cuda")}
    for name in ("toy", "toy2"):
        assert abs(res["cuda"]["tasks"][name]["ndcg@10"] - res["cpu"]["tasks"][name]["ndcg@10"]) <= 10.0
    cpu_loss, gpu_loss = (res[d]["config"]["training"][0]["first_loss"] for d in ("cpu", "cuda"))
    assert gpu_loss == pytest.approx(cpu_loss, rel=5e-2)  # the first step: bf16 forward, fp32 similarities


# --- two ranks under torchrun --------------------------------------------------------------------------------------
def env():
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
             PYTHONPATH=os.pathsep.join(p for p in (str(_src()), e.get("PYTHONPATH")) if p))
    return e


def _src():
    import twinlm

    return os.path.dirname(os.path.dirname(twinlm.__file__))


def launch(args, nproc):
    head = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                 str(nproc), "--standalone"]
    p = subprocess.run([*head, *args], env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def same_file(one, two):
    """The same result but for timings and the export folder's name."""
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    drop = TIMING | {"export_dir"}
    assert scores(a, drop) == scores(b, drop)


@pytest.mark.distributed
def test_classification_on_two_ranks_writes_what_one_process_writes(toy, tmp_path):
    base = ["-m", "twinlm", "eval", "classification", str(toy["enc"]), "--train-file", str(toy["root"] / "train.jsonl"),
            "--eval-file", str(toy["root"] / "dev.jsonl"), "--device", "cpu"]
    runs = {"probe": ["--seeds", "0,1,2"],
            "finetune": ["--mode", "finetune", "--seeds", "0,1", "--epochs", "1", "--lrs", "1e-4,1e-3",
                         "--max-train", "20", "--max-eval", "16"]}
    for name, extra in runs.items():
        launch([*base, *extra, "--out", str(tmp_path / f"{name}-1.json")], 1)
        p = launch([*base, *extra, "--out", str(tmp_path / f"{name}-2.json")], 2)
        same_file(tmp_path / f"{name}-1.json", tmp_path / f"{name}-2.json")
        assert p.stderr.count("[classify] encoder custom:") == 1  # rank 0 alone logs
    assert sorted(f.name for f in tmp_path.iterdir()) == ["finetune-1.json", "finetune-2.json", "probe-1.json",
                                                          "probe-2.json"]


@pytest.mark.distributed
@pytest.mark.slow
def test_depth_search_on_two_ranks_equals_one_process(toy, tmp_path):
    base = ["-m", "twinlm", "eval", "classification", str(toy["dec"]), "--eval-file", str(toy["root"] / "dev.jsonl"),
            "--kfold", "3", "--seeds", "0,1", "--probe-layer", "best", "--device", "cpu"]
    launch([*base, "--out", str(tmp_path / "one.json")], 1)
    launch([*base, "--out", str(tmp_path / "two.json")], 2)
    same_file(tmp_path / "one.json", tmp_path / "two.json")


RETRIEVAL = '''
import sys
from twinlm.eval import retrieval
from twinlm.eval.settings import RetrievalConfig
from twinlm.eval.tasks import RetrievalSet
from twinlm.eval.toy import toy_retrieval

sets = [RetrievalSet("toy", *toy_retrieval(40)), RetrievalSet("toy2", *toy_retrieval(30, seed=1))]
retrieval.run(sys.argv[1], RetrievalConfig(max_eval_queries=15, epochs=1, batch_size=8, seeds=[0, 1]),
              retrieval_sets=sets, out=sys.argv[2], export_dir=sys.argv[3], device="cpu", log=None)
'''


@pytest.mark.distributed
def test_retrieval_on_two_ranks_writes_what_one_process_writes(toy, tmp_path):
    # two seeds: each rank fine-tunes one, the copies are exchanged, the encoding of both sets is shared out;
    # rank 0 alone writes the result and the first seed's sentence-transformers folder
    script = tmp_path / "ret.py"
    script.write_text(RETRIEVAL)
    for n in (1, 2):
        launch([str(script), str(toy["enc"]), str(tmp_path / f"ret-{n}.json"), str(tmp_path / f"st-{n}")], n)
    same_file(tmp_path / "ret-1.json", tmp_path / "ret-2.json")
    weights = [load_file(tmp_path / f"st-{n}" / "model.safetensors") for n in (1, 2)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    per_seed = json.loads((tmp_path / "ret-2.json").read_text())["tasks"]["toy"]["per_seed"]
    assert len(per_seed) == 2 and not np.isnan(per_seed[1]["ndcg@10"])


@pytest.mark.data
def test_minilm_batches_in_input_order():
    # the MiniLM baseline embeds in batches on the device named and returns rows in input order: what
    # sentence-transformers gives text by text, to float precision
    from twinlm.eval import baselines
    from twinlm.eval.tasks import minilm_dir

    if not minilm_dir().is_dir():
        pytest.skip("the MiniLM baseline is not fetched (twinlm data fetch)")
    texts = [f"text number {i} " * (i % 7 + 1) for i in range(20)]
    ours = baselines.minilm_encode(texts, device="cpu", batch_size=4)
    theirs = baselines._minilm(None, "cpu").encode(texts, batch_size=1, convert_to_numpy=True, show_progress_bar=False)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert baselines.minilm_encode([], device="cpu").shape == (0, 384)
