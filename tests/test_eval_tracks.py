"""Classification, retrieval (with the sentence-transformers export), bits per byte and the comparison
report, end to end on toy data with freshly initialised model folders (the random-init control)."""

import json
import math

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard

import twinlm
from twinlm.errors import DataError
from twinlm.eval import bpb, classify, compare, retrieval
from twinlm.eval.common import embed, embed_layers, load_for_eval
from twinlm.eval.settings import BpbConfig, ClassifyConfig, RetrievalConfig
from twinlm.eval.tasks import RetrievalSet
from twinlm.eval.toy import (
    toy_classification,
    toy_model_dir,
    toy_retrieval,
    toy_sentences,
    toy_tokenizer,
    write_toy_classification,
)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaltracks")
    tok = toy_tokenizer()
    write_toy_classification(root)
    pair = toy_classification(30, 2, pair=True)
    (root / "pair.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pair))
    return {"root": root, "tok": tok, "enc": toy_model_dir(root / "random-encoder", False, tokenizer=tok),
            "dec": toy_model_dir(root / "random-decoder", True, tokenizer=tok), "results": root / "results"}


def test_classify_probe_baseline_and_finetune(env):
    root = env["root"]
    files = dict(train_file=root / "train.jsonl", eval_file=root / "dev.jsonl")
    tf = classify.run("tfidf", ClassifyConfig(["toy"], seeds=[0, 1], **files), out=env["results"] / "cls_bow.json",
                      log=None)
    assert tf["model"]["variant"] == "bag-of-words" and tf["tasks"]["toy"]["score"] >= 70
    for key in ("enc", "dec"):
        res = classify.run(str(env[key]), ClassifyConfig(["toy"], seeds=[0, 1], **files),
                           out=env["results"] / f"cls_{key}.json", log=None)
        t = res["tasks"]["toy"]
        assert res["track"] == "classification" and len(t["per_seed"]) == 2 and t["n_seeds"] == 2
        assert 0 <= t["score"] <= 100 and t["score_std"] >= 0 and res["average"]["std_kind"] == "over seeds"
        assert res["config"]["pooling"] == ("last" if key == "dec" else "cls")
    # fine-tuning with a 2-point learning-rate sweep, one seed; a pair task by k-fold
    ft = classify.run(str(env["enc"]), ClassifyConfig(["toy"], seeds=[0], mode="finetune", epochs=1,
                                                      lrs=[1e-4, 1e-3], max_train=24, **files), log=None)
    assert ft["tasks"]["toy"]["chosen"][0] in (1e-4, 1e-3)
    assert set(ft["tasks"]["toy"]["dev_sweep"]) == {"0.0001", "0.001"}
    kf = classify.run(str(env["dec"]), ClassifyConfig(["pairs"], seeds=[0], kfold=3, eval_file=root / "pair.jsonl"),
                      log=None)
    assert kf["tasks"]["pairs"]["split"] == "3-fold" and kf["tasks"]["pairs"]["n_seeds"] == 1



def test_classify_refuses_a_task_mixing_single_texts_and_pairs(env, tmp_path):
    # text_pair on some lines only: the model would get examples without their second text (the tokenizer
    # failed on them); the task is refused with the reason before any model is loaded
    rows = toy_classification(30, 2, pair=True)
    for r in rows[::3]:
        del r["text_pair"]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for model in (str(env["dec"]), "tfidf"):
        with pytest.raises(DataError, match=r"20 of 30 examples have a 'text_pair'"):
            classify.run(model, ClassifyConfig(["mixed"], seeds=[0], kfold=3, eval_file=mixed), log=None)
    # pairs in the training file only: the same mismatch across the files
    single = tmp_path / "single.jsonl"
    single.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "text_pair"}) + "\n"
                              for r in toy_classification(30, 1, pair=True)))
    with pytest.raises(DataError, match="'text_pair'"):
        classify.run(str(env["dec"]), ClassifyConfig(["x"], seeds=[0], train_file=env["root"] / "pair.jsonl",
                                                      eval_file=single), log=None)

def test_probe_depth_search_picks_the_informative_features(env):
    # select_features: one candidate carries the label, the others are noise
    rng = np.random.default_rng(0)
    y = np.arange(200) % 2
    informative = rng.normal(size=(200, 8)) + 2.0 * y[:, None]
    cands = {(0, "mean"): rng.normal(size=(200, 8)), (1, "mean"): informative, (2, "mean"): rng.normal(size=(200, 8))}
    key, scores = classify.select_features([(cands, y, 0)], None)
    assert key == (1, "mean") and scores[key] > 0.9 and set(scores) == set(cands)
    # averaged over several seeds' development splits: a candidate good on one split only loses
    lucky = {**cands, (2, "mean"): 10.0 * y[:, None] + rng.normal(size=(200, 8))}
    assert classify.select_features([(lucky, y, 0)], None)[0] == (2, "mean")
    key, scores = classify.select_features([(lucky, y, 0), (cands, y, 1), (cands, y, 2)], None)
    assert key == (1, "mean") and scores[(2, "mean")] < scores[(1, "mean")]
    # embed_layers: the last depth is exactly what `embed` pools, the first the embedding norm's output
    loaded = load_for_eval(str(env["enc"]))
    seqs = [[1, 5, 6, 7, 2], [1, 9, 2], [1, 4, 4, 4, 4, 4, 2]]
    depths = embed_layers(loaded.model, seqs, ["cls", "mean"])
    last = loaded.cfg.num_layers + 1
    assert set(depths) == {(i, p) for i in range(last + 1) for p in ("cls", "mean")}
    torch.testing.assert_close(depths[(last, "mean")], embed(loaded.model, seqs, "mean"))
    with torch.inference_mode():
        emb = loaded.model.embed_norm(loaded.model.tok_embeddings(torch.tensor(seqs[1])))
    torch.testing.assert_close(depths[(0, "cls")][1], emb[0])
    # end to end: the choice is recorded and is one of the candidates
    files = dict(train_file=env["root"] / "train.jsonl", eval_file=env["root"] / "dev.jsonl")
    for key in ("enc", "dec"):
        res = classify.run(str(env[key]), ClassifyConfig(["toy"], seeds=[0, 1], probe_layer="best", **files), log=None)
        f = res["tasks"]["toy"]["features"]
        assert 0 <= f["layer"] <= f["of_layers"] == last and res["config"]["probe_layer"] == "best"
        assert f["pooling"] in (("last", "mean") if key == "dec" else ("cls", "mean"))
        assert len(f["dev"]) == 2 * (last + 1)
    with pytest.raises(ValueError, match="probe_layer"):
        classify.run(str(env["enc"]), ClassifyConfig(["toy"], probe_layer="middle", **files), log=None)


def test_retrieval_finetune_export_loads_in_sentence_transformers(env):
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer

    c, q, r = toy_retrieval(40)
    sets = [RetrievalSet("toy", c, q, r)]
    bm = retrieval.run("bm25", RetrievalConfig(max_eval_queries=15), retrieval_sets=sets, log=None,
                       out=env["results"] / "ret_bow.json")
    assert bm["tasks"]["toy"]["ndcg@10"] > 50 and bm["model"]["variant"] == "bag-of-words"
    texts = ["the cat sees the house", "Water freezes the cold ice and it is good. Fine fine fine."]
    for key, pooling in (("enc", "mean"), ("dec", "last")):
        export = env["root"] / f"st-{key}"
        res = retrieval.run(str(env[key]), RetrievalConfig(max_eval_queries=15, epochs=1, batch_size=8),
                            retrieval_sets=sets, export_dir=export, out=env["results"] / f"ret_{key}.json", log=None)
        t = res["tasks"]["toy"]
        assert {"ndcg@10", "mrr@10", "recall@100"} <= set(t) and t["queries"] == 15 and t["corpus"] == 40
        assert res["config"]["pooling"] == pooling and res["config"]["training"][0]["steps"] >= 1
        pool_cfg = json.loads((export / "1_Pooling" / "config.json").read_text())
        assert pool_cfg["pooling_mode_lasttoken" if key == "dec" else "pooling_mode_mean_tokens"] is True
        st = SentenceTransformer(str(export), device="cpu")
        ours = retrieval.encode_texts(twinlm.load(export).eval(), env["tok"], texts, pooling)
        theirs = st.encode(texts, convert_to_numpy=True)
        np.testing.assert_allclose(theirs, ours, atol=1e-4)
        # a card of its own kind, with the exported (first seed's) model's own scores as model-index
        card = ModelCard.load(export / "README.md")
        assert (card.data.library_name, card.data.pipeline_tag) == ("sentence-transformers", "sentence-similarity")
        assert card.data.eval_results[0].metric_value == pytest.approx(t["per_seed"][0]["ndcg@10"], abs=1e-4)
        assert str(env["root"]) not in (export / "README.md").read_text()


def test_bits_per_byte(env):
    tok = env["tok"]
    texts = toy_sentences(12, seed=5)
    dec = twinlm.load(env["dec"]).eval()
    res = bpb.bits_per_byte(dec, tok, texts, max_length=8)   # windows of 7 tokens + [CLS]
    # by hand: every token predicted from [CLS] + its window's earlier tokens
    nll = 0.0
    for ids in tok(texts, add_special_tokens=False)["input_ids"]:
        for s in range(0, len(ids), 7):
            seq = [dec.config.cls_token_id] + ids[s:s + 7]
            with torch.no_grad():
                logp = torch.log_softmax(dec(torch.tensor([seq])).logits[0].double(), -1)
            nll -= sum(float(logp[i, seq[i + 1]]) for i in range(len(seq) - 1))
    n_bytes = sum(len(t.encode()) for t in texts)
    assert res["bpb"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)
    assert res["predicted"] == res["tokens"]
    enc = twinlm.load(env["enc"]).eval()
    for mntp in (False, True):
        r = bpb.bits_per_byte(enc, tok, texts, mntp=mntp)
        assert r["predicted"] == r["tokens"] and 0 < r["bpb"] < 50   # every token masked exactly once
    out = bpb.run(str(env["dec"]), texts=texts, out=env["results"] / "bpb_dec.json", log=None)
    assert out["track"] == "bpb" and out["tasks"]["texts"]["bpb"] == pytest.approx(
        bpb.bits_per_byte(dec, tok, texts)["bpb"])
    # a byte budget scores the leading bytes of the documents in order, the last one cut (at a character)
    budget = len(texts[0].encode()) + len(texts[1].encode()) + 5
    capped = bpb.run(str(env["dec"]), BpbConfig(max_bytes=budget), texts=texts + ["é" * 50], log=None)
    kept = [texts[0], texts[1], texts[2].encode()[:5].decode()]
    assert capped["tasks"]["texts"]["bytes"] == budget and capped["config"]["max_bytes"] == budget
    assert capped["tasks"]["texts"]["bpb"] == pytest.approx(bpb.bits_per_byte(dec, tok, kept)["bpb"])
    assert bpb._first_bytes(["é" * 4], 3) == ["é"]


def _fake_result(track, variant, size, params, scores, std=1.0):
    return {"track": track, "model": {"variant": variant, "size": size, "params": params, "arch": variant},
            "tasks": {t: {"score": v, "score_std": std, "headline": "accuracy"} for t, v in scores.items()},
            "average": {"mean": float(np.mean(list(scores.values()))), "std": std}, "config": {}}


def test_compare_writes_tables_and_plots(tmp_path):
    res_dir = tmp_path / "results"
    res_dir.mkdir()
    rng = np.random.default_rng(0)
    for size, params in (("7L-256d", 17e6), ("10L-384d", 32e6)):
        for v in ("encoder", "decoder", "enc-from-dec", "dec-from-enc"):
            for track in ("classification", "generative"):
                r = _fake_result(track, v, size, params, {t: float(rng.uniform(40, 90)) for t in ("sst2", "rte", "cb")})
                (res_dir / f"{track}-{v}-{size}.json").write_text(json.dumps(r))
    for v in ("bag-of-words", "minilm"):
        r = _fake_result("classification", v, "n/a", 0, {"sst2": 70.0, "rte": 55.0, "cb": 60.0}, 0.0)
        (res_dir / f"classification-{v}.json").write_text(json.dumps(r))
    run = tmp_path / "runs" / "encoder"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "tokens": 512 * i, "loss": 8 / (1 + i)}) + "\n"
                                               for i in range(1, 30)))
    suite_run = tmp_path / "train-decoder" / "run"   # the suite's layout: a generic folder name
    suite_run.mkdir(parents=True)
    (suite_run / "metrics.jsonl").write_text(json.dumps({"step": 1, "tokens": 512, "loss": 9.0}) + "\n")
    out = compare.compare([res_dir, tmp_path / "runs", suite_run], tmp_path / "report")
    md = (tmp_path / "report" / "comparison.md").read_text()
    assert "## classification" in md and "## generative" in md and "bag-of-words" in md and "**average**" in md
    data = json.loads((tmp_path / "report" / "comparison.json").read_text())
    assert len(data["rows"]) == 2 * 4 * 2 * 4 + 2 * 4
    assert [c["run"] for c in data["curves"]] == ["encoder", "train-decoder"]
    assert sorted(p.split("/")[-1] for p in out["plots"]) == ["classification.png", "generative.png", "loss_curves.png"]
    for p in out["plots"]:
        assert (tmp_path / "report" / p.split("/")[-1]).stat().st_size > 1000
    with pytest.raises(ValueError):
        compare.compare([run / "metrics.jsonl"], tmp_path / "bad")


def test_controls_without_parameters_are_reference_lines_not_sizes():
    """The n-gram controls (0 trained parameters) and the baselines are drawn as lines across every size, so
    no "0.0M" size appears on the x axis; every variant keeps its own colour."""
    rows = [{"variant": v, "params": p, "size": s, "task": "average", "mean": 50.0, "std": 1.0}
            for v, p, s in (("encoder", 6e6, "7L-256d"), ("decoder", 6e6, "7L-256d"), ("bigram", 0.0, "2-gram"),
                            ("trigram", 0.0, "3-gram"), ("bag-of-words", 0.0, "bow"))]
    models, refs = compare._models_and_references(rows)
    assert {r["variant"] for r in models} == {"encoder", "decoder"}
    assert refs == ["bag-of-words", "bigram", "trigram"]
    assert len({compare.COLORS[v] for v in ("encoder", "decoder", "enc-from-dec", "dec-from-enc", "random-encoder",
                                            "random-decoder", "bag-of-words", "minilm", "unigram", "bigram",
                                            "trigram")}) == 11


def test_cli_eval_and_compare(env, tmp_path, capsys):
    from twinlm.cli import main
    from twinlm.eval.toy import write_toy_mc_jsonl

    task = write_toy_mc_jsonl(tmp_path / "mc.jsonl", n=6)
    (tmp_path / "held.txt").write_text("\n\n".join(toy_sentences(6, seed=9)))
    out = tmp_path / "cli"
    assert main(["eval", "generative", str(env["dec"]), "--tasks", str(task), "--limit", "all",
                 "--out", str(out / "gen.json")]) == 0
    assert main(["eval", "bpb", str(env["enc"]), "--text-file", str(tmp_path / "held.txt"),
                 "--out", str(out / "bpb.json")]) == 0
    assert main(["eval", "classify", "tfidf", "--eval-file", str(env["root"] / "dev.jsonl"), "--seeds", "0",
                 "--kfold", "3", "--out", str(out / "cls.json")]) == 0
    assert json.loads((out / "gen.json").read_text())["tasks"]["mc"]["n"] == 6
    assert json.loads((out / "bpb.json").read_text())["tasks"]["held"]["bpb"] > 0
    assert main(["compare", str(out), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "comparison.md").exists() and (tmp_path / "report" / "generative.png").exists()
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "r2")]) == 2
