"""bpb, pairs and `eval curve` on a device and across ranks: `device="cpu"` is today's scoring exactly, a CUDA
run agrees with the CPU within bf16's precision (`gpu`), the n-gram baselines stay on the CPU, and two gloo
ranks under torchrun write the same result files as one process (`distributed`)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from twinlm.eval import bpb, pairs
from twinlm.eval.common import load_for_eval
from twinlm.eval.ngram import load_ngram
from twinlm.eval.ranks import Ranks
from twinlm.eval.settings import BpbConfig, PairsConfig
from twinlm.eval.toy import toy_corpus, toy_model_dir, toy_sentences, toy_tokenizer

TIMING = {"seconds", "versions"}


@pytest.fixture(scope="module")
def toys(tmp_path_factory):
    root = tmp_path_factory.mktemp("device-ranks")
    tok = toy_tokenizer()
    models = {kind: toy_model_dir(root / kind, causal=kind == "decoder", tokenizer=tok)
              for kind in ("encoder", "decoder")}
    sents = toy_sentences(60, seed=9)
    held = root / "held.txt"  # 12 documents of five sentences: several packed passes at small max_tokens
    held.write_text("\n\n".join(" ".join(sents[i:i + 5]) for i in range(0, len(sents), 5)) + "\n")
    return {"root": root, "tok": tok, "held": held, **models}


def _bpb_cfg(toys, **kw):
    return BpbConfig(**{"text_file": str(toys["held"]), "max_tokens": 512, **kw})


def _pairs_cfg(toys, **kw):
    return PairsConfig(**{"text_file": str(toys["held"]), "per_family": 4, "bootstrap": 100, "max_tokens": 1024, **kw})


def _strip(result):
    """A result without what legitimately differs between runs: its timings (and versions)."""
    if isinstance(result, dict):
        return {k: _strip(v) for k, v in result.items() if k not in TIMING and not k.endswith("_per_s")}
    if isinstance(result, list):
        return [_strip(v) for v in result]
    return result


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_cpu_device_is_the_default_scoring_bit_for_bit(toys, kind):
    plain = {}
    for track, cfg in ((bpb, _bpb_cfg(toys)), (pairs, _pairs_cfg(toys))):
        plain[track] = track.run(str(toys[kind]), cfg, log=None)
        cpu = track.run(str(toys[kind]), cfg, log=None, device="cpu", ranks=Ranks())
        assert _strip(plain[track]) == _strip(cpu)
        assert cpu["config"]["device"] == "cpu" and cpu["config"]["precision"] == "fp32"
    # the comparison can fail: other packs (max_tokens) change an encoder's sum in its last bits
    other = bpb.run(str(toys[kind]), _bpb_cfg(toys, max_tokens=300), log=None)
    assert other["average"]["mean"] == pytest.approx(plain[bpb]["average"]["mean"], rel=1e-5)
    assert kind == "decoder" or _strip(other)["tasks"] != _strip(plain[bpb])["tasks"]


def test_ngram_baselines_stay_on_the_cpu(toys):
    tok, shards, held = toy_corpus(toys["root"] / "corpus", docs=300, held=20)
    from transformers import AutoTokenizer

    loaded = load_ngram("bigram", shards, AutoTokenizer.from_pretrained(str(tok)))
    res = pairs.run(loaded, _pairs_cfg(toys), log=None, device="meta")  # any device but the CPU: not moved
    assert res["config"]["device"] == "cpu" and loaded.device.type == "cpu"
    assert load_for_eval(loaded, device="meta").device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_cuda_agrees_with_the_cpu_within_bf16(toys, kind):
    cpu_bpb = bpb.run(str(toys[kind]), _bpb_cfg(toys), log=None, device="cpu")
    gpu_bpb = bpb.run(str(toys[kind]), _bpb_cfg(toys), log=None, device="cuda")
    assert gpu_bpb["config"]["precision"] == "bf16 autocast" and gpu_bpb["config"]["device"].startswith("cuda")
    assert gpu_bpb["average"]["mean"] == pytest.approx(cpu_bpb["average"]["mean"], rel=2e-2)
    texts = [p.good for p in pairs.load_pairs(_pairs_cfg(toys))[1]]
    lls = {}
    for device in ("cpu", "cuda"):
        loaded = load_for_eval(str(toys[kind]), device=device)
        lls[device] = pairs.sentence_logliks(loaded.model, loaded.tokenizer, texts, max_tokens=1024)
    for a, b in zip(lls["cpu"], lls["cuda"]):
        assert b == pytest.approx(a, rel=3e-2, abs=0.05)
    cpu_pairs = pairs.run(str(toys[kind]), _pairs_cfg(toys), log=None, device="cpu")
    gpu_pairs = pairs.run(str(toys[kind]), _pairs_cfg(toys), log=None, device="cuda")
    assert abs(gpu_pairs["average"]["mean"] - cpu_pairs["average"]["mean"]) <= 10.0  # near-ties may flip


# --- across ranks ---------------------------------------------------------------------------------------------
def _env():
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return e


def _twinlm(nproc, *args):
    if nproc == 1:
        cmd = [sys.executable, "-m", "twinlm", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
               "-m", "twinlm", *args]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["encoder", pytest.param("decoder", marks=pytest.mark.slow)])
def test_two_ranks_write_one_process_result(toys, tmp_path, kind):
    outs = {}
    for nproc in (1, 2):
        for track, flags in (("bpb", ["--max-tokens", "512"]),
                             ("pairs", ["--per-family", "4", "--bootstrap", "100", "--max-tokens", "1024"])):
            out = tmp_path / f"{track}-{nproc}.json"
            p = _twinlm(nproc, "eval", track, str(toys[kind]), "--text-file", str(toys["held"]), "--device", "cpu",
                        "--out", str(out), *flags)
            assert p.stdout.count('"track"') == 1  # rank 0 alone prints the summary
            outs[track, nproc] = json.loads(out.read_text())
    for track in ("bpb", "pairs"):
        assert _strip(outs[track, 2]) == _strip(outs[track, 1])


@pytest.mark.distributed
@pytest.mark.slow  # ~35 s: the default suite keeps the per-track two-rank checks
def test_curve_on_two_ranks_equals_one_process(toys, tmp_path):
    sets = ["--set", f"bpb.text_file={toys['held']}", "bpb.max_tokens=512", f"pairs.text_file={toys['held']}",
            "pairs.per_family=4", "pairs.bootstrap=100", "pairs.max_tokens=1024"]
    runs = {}
    for nproc in (1, 2):
        # four evaluations (dealt out among the ranks), then one that both ranks run together
        out = tmp_path / f"curve-{nproc}"
        _twinlm(nproc, "eval", "curve", str(toys["encoder"]), str(toys["decoder"]), "--tracks", "bpb,pairs",
                "--out", str(out), "--device", "cpu", *sets)
        one = tmp_path / f"one-{nproc}"
        _twinlm(nproc, "eval", "curve", str(toys["encoder"]), "--tracks", "bpb", "--out", str(one),
                "--device", "cpu", *sets[:3])
        runs[nproc] = {folder.name.split("-")[0]: (
            json.loads((folder / "curve.json").read_text()),
            {p.name: _strip(json.loads(p.read_text())) for p in sorted((folder / "cache").glob("*.json"))},
            sorted(p.name for p in folder.iterdir())) for folder in (out, one)}
    for name in ("curve", "one"):
        (c1, cache1, files1), (c2, cache2, files2) = runs[1][name], runs[2][name]
        assert c2 == c1 and cache2 == cache1 and files2 == files1
        assert len(cache1) == (4 if name == "curve" else 1)
