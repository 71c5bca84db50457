"""Generative scoring (eval/scoring.py): batched padding-free scoring equals the one-forward-per-sequence
reference, the encoder's masked copies are built as the paper describes (and with another end token), and the
track runs end to end through lm-eval on JSONL tasks with freshly initialised model folders (the
random-initialisation control)."""

import json

import pytest
import torch

import twinlm
from twinlm.eval import generative
from twinlm.eval import scoring as G
from twinlm.eval.settings import GenerativeConfig
from twinlm.eval.toy import toy_model_dir, toy_tokenizer, write_toy_mc_jsonl

PAIRS = [("The cat sees", " the house."), ("A dog ", "likes a red ball and it is good"), ("", "the moon"),
         ("Water freezes", " the cold ice!"), ("Our team builds an answer and it is", " lovely")]


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer()


def _model(tok, causal, seed=0):
    torch.manual_seed(seed)
    vocab = ((len(tok) + 63) // 64) * 64
    return twinlm.Transformer(twinlm.ModelConfig.preset("cpu-tiny", causal=causal, vocab_size=vocab)).eval()


def test_tokenization_splits_like_lm_eval(tok):
    cfg = _model(tok, True).config
    (r,) = G.tokenize_requests(tok, cfg, [("A dog ", "likes it")])
    # the trailing space moves to the continuation; the pair is tokenized whole
    whole = tok("A dog likes it", add_special_tokens=False).input_ids
    ctx = tok("A dog", add_special_tokens=False).input_ids
    assert r.ctx == [cfg.cls_token_id] + ctx and r.cont == whole[len(ctx):]
    (r,) = G.tokenize_requests(tok, cfg, [("", "the moon")])
    assert r.ctx == [cfg.cls_token_id]


def test_decoder_loglikelihood_equals_naive_forward(tok):
    model = _model(tok, True)
    reqs = G.tokenize_requests(tok, model.config, PAIRS)
    batched = G.score_requests(model, reqs, max_tokens=24)   # several packs
    # by hand: one padded forward per example over [CLS] context continuation, full head
    for r, b in zip(reqs, batched):
        seq = r.ctx + r.cont
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), -1)
        ll = sum(float(logp[len(r.ctx) - 1 + k, t]) for k, t in enumerate(r.cont))
        greedy = all(int(logp[len(r.ctx) - 1 + k].argmax()) == t for k, t in enumerate(r.cont))
        assert b.loglikelihood == pytest.approx(ll, abs=1e-4)
        assert b.is_greedy == greedy and b.n_tokens == len(r.cont)


@pytest.mark.parametrize("mntp", [False, True])
def test_encoder_batched_masked_scoring_equals_one_forward_per_token(tok, mntp):
    model = _model(tok, False, seed=1)
    reqs = G.tokenize_requests(tok, model.config, PAIRS)
    batched = G.score_requests(model, reqs, mntp=mntp, max_tokens=64)
    naive = G.score_requests_naive(model, reqs, mntp=mntp)
    for a, b in zip(batched, naive):
        assert a.loglikelihood == pytest.approx(b.loglikelihood, abs=1e-4)
        assert a.is_greedy == b.is_greedy and a.n_tokens == b.n_tokens


def test_encoder_masked_copy_layout(tok):
    cfg = _model(tok, False).config
    req = G.Request([cfg.cls_token_id, 10, 11], [20, 21])
    items = G._encoder_items(req, cfg, mntp=False)
    M, S = cfg.mask_token_id, cfg.sep_token_id
    assert items[0] == ([1, 10, 11, M, M, M, S], 3, 20)
    assert items[1] == ([1, 10, 11, 20, M, M, M, S], 4, 21)
    assert [i[1] for i in G._encoder_items(req, cfg, mntp=True)] == [2, 3]
    assert G._encoder_items(req, cfg, mntp=False, end_id=15)[0] == ([1, 10, 11, M, M, M, 15], 3, 20)


def test_greedy_generation_equals_one_argmax_per_step(tok):
    """Batched greedy decoding (all prompts one token per round, packed) = a loop of full forwards per prompt."""
    for causal in (True, False):
        model = _model(tok, causal, seed=2)
        cfg = model.config
        prompts = [r.ctx for r in G.tokenize_requests(tok, cfg, PAIRS[:3])]
        got = G.greedy_generate(model, prompts, [4, 2, 3], max_tokens=32)
        for p, g, k in zip(prompts, got, [4, 2, 3]):
            ref: list[int] = []
            for _ in range(k):
                seq, pos = (p + ref, len(p + ref) - 1) if causal else G.masked_query(p + ref, cfg, False)
                with torch.no_grad():
                    ref.append(int(model(torch.tensor([seq])).logits[0, pos].argmax()))
            assert g == ref
        stopped = G.greedy_generate(model, prompts, [5, 5, 5], stop=lambda i, gen: i == 0)
        assert len(stopped[0]) == 1 and len(stopped[1]) == 5


def test_run_on_jsonl_task_with_random_init_folders(tmp_path, tok):
    task = write_toy_mc_jsonl(tmp_path / "toy.jsonl", n=12)
    comp = tmp_path / "comp.jsonl"
    comp.write_text("".join(json.dumps({"context": "The cat sees", "choices": ["the house"], "label": 0}) + "\n"
                            for _ in range(3)))
    for causal in (True, False):
        folder = toy_model_dir(tmp_path / f"m{causal}", causal, tokenizer=tok)
        res = generative.run(str(folder), GenerativeConfig([str(task), str(comp)], limit=None),
                             out=tmp_path / f"r{causal}.json", log=None)
        assert res["track"] == "generative" and res["model"]["causal"] == causal
        t = res["tasks"]["toy"]
        assert t["n"] == 12 and 0 <= t["acc"] <= 100 and {"acc_norm", "acc_bytes"} <= set(t)
        assert res["tasks"]["comp"]["ppl"] > 1 and "acc" in res["tasks"]["comp"]
        saved = json.loads((tmp_path / f"r{causal}.json").read_text())
        assert saved["average"]["n_tasks"] == 2


def test_winogrande_style_partial_contexts(tok):
    model = _model(tok, True)
    from twinlm.eval.tasks import MCExample

    ex = MCExample(["The cat", "The dog"], [" sees it", " sees it"], 1, [" sees it", " sees it"])
    from twinlm.eval.common import Loaded

    metrics, per_ex = G.evaluate_examples(Loaded(model, tok, None, {"mntp": False}), [ex])
    lls = [s.loglikelihood for s in per_ex[0]]
    assert lls[0] != lls[1] and metrics["n"] == 1


def test_mntp_detected_from_the_run_config(tmp_path, tok):
    from twinlm.eval.common import load_for_eval as load

    run = tmp_path / "enc-from-dec"
    folder = toy_model_dir(run / "final", causal=False, tokenizer=tok)
    assert load(str(folder)).info["mntp"] is False
    (run / "config.yaml").write_text("objective: mntp\nmodel:\n  preset: cpu-tiny\n")
    info = load(str(folder)).info
    assert info["mntp"] is True and info["objective"] == "mntp" and info["variant"] == "enc-from-dec"
    assert load(str(folder), mntp=False).info["mntp"] is False
