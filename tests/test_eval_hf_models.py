"""Any transformers model in every track (issue 11, item 7): small random BERT (masked LM) and Llama (causal
LM) folders written by transformers itself go through classify, retrieval, generative and bpb with their own
tokenizer and special tokens, scored as twinlm models are (checked against transformers' own forward), and
`twinlm compare` puts them in the same tables as a twinlm model."""

import math
import shutil

import pytest
import torch

from twinlm.cli import main
from twinlm.errors import ConfigError
from twinlm.eval import bpb, classify, generative, retrieval
from twinlm.eval.common import embed, load_for_eval
from twinlm.eval.settings import BpbConfig, ClassifyConfig, GenerativeConfig, RetrievalConfig
from twinlm.eval.tasks import RetrievalSet, read_mc_jsonl
from twinlm.eval.toy import (
    toy_model_dir,
    toy_retrieval,
    toy_sentences,
    toy_tokenizer,
    write_toy_classification,
    write_toy_mc_jsonl,
)

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfmodels")
    tok = toy_tokenizer()
    vocab = len(tok)
    torch.manual_seed(0)
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, pad_token_id=tok.pad_token_id))
    bert.save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    # a Llama-style tokenizer: BOS/EOS only, no cls/sep/mask tokens
    llama_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, bos_token="[CLS]",
                                                     eos_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]")
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3))
    llama.save_pretrained(root / "llama")
    llama_tok.save_pretrained(root / "llama")
    write_toy_classification(root, 40, 20)
    return {"root": root, "bert": root / "bert", "llama": root / "llama",
            "twin": toy_model_dir(root / "random-encoder", False, tokenizer=tok)}


def test_loaded_with_their_own_special_tokens_and_scored_like_transformers(folders):
    b = load_for_eval(str(folders["bert"]))
    assert not b.causal and b.info["hf_class"] == "BertForMaskedLM" and b.info["arch"] == "encoder"
    assert b.cfg.cls_token_id == b.tokenizer.cls_token_id and b.cfg.mask_token_id == b.tokenizer.mask_token_id
    ll = load_for_eval(str(folders["llama"]))
    assert ll.causal and ll.info["hf_class"] == "LlamaForCausalLM"
    assert (ll.cfg.cls_token_id, ll.cfg.sep_token_id) == (ll.tokenizer.bos_token_id, ll.tokenizer.eos_token_id)
    # packed forwards equal transformers' own unpadded forward, sequence by sequence
    seqs = [[1, 40, 41, 42, 2], [1, 50, 2], [1, 60, 61, 62, 63, 64, 65, 2]]
    for loaded in (b, ll):
        pooled = embed(loaded.model, seqs, "last")
        for i, s in enumerate(seqs):
            with torch.no_grad():
                ref = loaded.model.hf(torch.tensor([s]), output_hidden_states=True).hidden_states[-1][0, -1]
            torch.testing.assert_close(pooled[i], ref, atol=1e-5, rtol=0)
    # a decoder's log-likelihood: log p(continuation | BOS context) by transformers' logits
    task = write_toy_mc_jsonl(folders["root"] / "mc.jsonl", n=4, n_choices=2, seed=2)
    exs = read_mc_jsonl(task)
    _, per_ex = generative.evaluate_examples(ll, exs)
    ctx = ll.tokenizer(exs[0].contexts[0], add_special_tokens=False)["input_ids"]
    whole = ll.tokenizer(exs[0].contexts[0] + exs[0].continuations[0], add_special_tokens=False)["input_ids"]
    ids = [ll.tokenizer.bos_token_id, *whole]
    with torch.no_grad():
        logp = torch.log_softmax(ll.model.hf(torch.tensor([ids])).logits[0], -1)
    ref = sum(float(logp[i - 1, ids[i]]) for i in range(1 + len(ctx), len(ids)))
    assert per_ex[0][0].loglikelihood == pytest.approx(ref, abs=1e-4)


def test_every_track_and_compare(folders, tmp_path):
    root, res_dir = folders["root"], tmp_path / "results"
    files = dict(train_file=root / "train.jsonl", eval_file=root / "dev.jsonl")
    task = write_toy_mc_jsonl(root / "mc2.jsonl", n=8, n_choices=3, seed=3)
    text = root / "held.txt"
    text.write_text("\n\n".join(toy_sentences(6, seed=7)))
    c, q, r = toy_retrieval(20)
    sets = [RetrievalSet("toy", c, q, r)]
    for key in ("bert", "llama", "twin"):
        path = str(folders[key])
        cl = classify.run(path, ClassifyConfig(["toy"], seeds=[0], **files), out=res_dir / f"{key}-cls.json", log=None)
        assert 0 <= cl["tasks"]["toy"]["score"] <= 100
        rt = retrieval.run(path, RetrievalConfig(max_eval_queries=8, finetune=False), retrieval_sets=sets,
                           out=res_dir / f"{key}-ret.json", log=None)
        assert 0 <= rt["tasks"]["toy"]["ndcg@10"] <= 100
        gen = generative.run(path, GenerativeConfig(tasks=[str(task)], limit=None), out=res_dir / f"{key}-gen.json",
                             log=None)
        (name,) = gen["tasks"]
        assert 0 <= gen["tasks"][name]["acc"] <= 100
        bp = bpb.run(path, BpbConfig(text_file=str(text), max_length=32), out=res_dir / f"{key}-bpb.json", log=None)
        score = next(iter(bp["tasks"].values()))["score"]
        assert math.isfinite(score) and score > 0
    # the generative track writes lm-eval's own output beside its result (NAME.lm_eval.json): not a result file
    results = [str(p) for p in sorted(res_dir.glob("*.json")) if not p.name.endswith(".lm_eval.json")]
    assert main(["compare", *results, "--out", str(tmp_path / "cmp")]) == 0
    table = "\n".join(p.read_text() for p in (tmp_path / "cmp").glob("*.md"))
    for key in ("bert", "llama"):
        assert key in table


def test_headless_and_unusable_models_say_why(folders, tmp_path):
    cfg = transformers.BertConfig(vocab_size=400, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64)
    transformers.BertModel(cfg).save_pretrained(tmp_path / "base")
    toy_tokenizer().save_pretrained(tmp_path / "base")
    loaded = load_for_eval(str(tmp_path / "base"))
    assert embed(loaded.model, [[1, 5, 2]], "cls").shape == (1, 32)
    task = write_toy_mc_jsonl(tmp_path / "mc.jsonl", n=2, n_choices=2)
    with pytest.raises(ConfigError, match="BertModel has no language-model head"):
        generative.evaluate_examples(loaded, read_mc_jsonl(task))


def test_E01_MF11_a_twinlm_folder_with_another_config_is_never_scored_by_transformers(folders, tmp_path):
    from twinlm.errors import ModelLoadError

    twin = folders["twin"]
    assert (twin / "MANIFEST.sha256").is_file()
    # MF11: one byte of `architectures` changed, manifest kept: the manifest is checked before routing
    mf11 = tmp_path / "mf11"
    shutil.copytree(twin, mf11)
    cfg = (mf11 / "config.json").read_text()
    assert "ModernBertForMaskedLM" in cfg
    (mf11 / "config.json").write_text(cfg.replace("ModernBertForMaskedLM", "ModernBertForMaskedLN"))
    with pytest.raises(ModelLoadError, match=r"config.json: does not match its sha256 in MANIFEST.sha256"):
        load_for_eval(str(mf11))
    # E01c: a BERT config.json over twinlm weights, manifest kept; E01b: the same without the manifest
    e01c = tmp_path / "e01c"
    shutil.copytree(twin, e01c)
    shutil.copy(folders["bert"] / "config.json", e01c / "config.json")
    with pytest.raises(ModelLoadError, match="does not match its sha256"):
        load_for_eval(str(e01c))
    (e01c / "MANIFEST.sha256").unlink()
    with pytest.raises(ModelLoadError, match="holds a twinlm encoder's weights but config.json describes "
                                             "BertForMaskedLM"):
        load_for_eval(str(e01c))
    # a config whose base-model weights the folder does not hold (a 2-layer BERT config over one layer's
    # weights): transformers would draw layer 1 at random, so it is refused naming the missing weights
    short = tmp_path / "short"
    cfg = transformers.BertConfig(vocab_size=len(toy_tokenizer()), hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    transformers.BertForMaskedLM(cfg).save_pretrained(short)
    shutil.copy(folders["bert"] / "config.json", short / "config.json")
    toy_tokenizer().save_pretrained(short)
    with pytest.raises(ModelLoadError, match=r"weight\(s\) missing \(bert\.encoder\.layer\.1\."):
        load_for_eval(str(short))


def test_a_masked_lm_config_over_headless_weights_is_scored_as_its_base_model(folders, tmp_path):
    # sentence-transformers folders on the hub (all-mpnet-base-v2: MPNetForMaskedLM) name a masked LM over the
    # base model's weights alone: the missing head is no reason to refuse the embedding tracks
    headless = tmp_path / "headless"
    bert = transformers.BertForMaskedLM.from_pretrained(folders["bert"])
    bert.bert.save_pretrained(headless)
    shutil.copy(folders["bert"] / "config.json", headless / "config.json")
    toy_tokenizer().save_pretrained(headless)
    loaded = load_for_eval(str(headless))
    assert loaded.info["hf_class"] == "BertModel" and not loaded.causal
    seqs = [[1, 40, 41, 2], [1, 50, 2]]
    with torch.no_grad():  # the base model's own weights, not a random draw: the masked LM's encoder states
        ref = [bert.bert(torch.tensor([s])).last_hidden_state[0, 0] for s in seqs]
    torch.testing.assert_close(embed(loaded.model, seqs, "cls"), torch.stack(ref), atol=1e-5, rtol=0)
    # the same weights (no pooler: a masked LM's base model has none) under a BertModel config load alike
    conf = (headless / "config.json").read_text()
    (headless / "config.json").write_text(conf.replace("BertForMaskedLM", "BertModel"))
    torch.testing.assert_close(embed(load_for_eval(str(headless)).model, seqs, "cls"), torch.stack(ref), atol=1e-5,
                               rtol=0)
    task = write_toy_mc_jsonl(tmp_path / "mc.jsonl", n=2, n_choices=2)
    with pytest.raises(ConfigError, match="BertModel has no language-model head \\(its config.json names "
                                          "BertForMaskedLM, but the folder holds only the base model's weights\\)"):
        generative.evaluate_examples(loaded, read_mc_jsonl(task))


def test_minilm_under_a_masked_lm_config_embeds_as_before(tmp_path):
    # the reviewer's reproduction on a real hub folder: all-MiniLM-L6-v2 (BertModel weights), its config.json
    # saying BertForMaskedLM as all-mpnet-base-v2's says MPNetForMaskedLM
    from twinlm.eval.tasks import minilm_dir

    src = minilm_dir()
    if not (src / "model.safetensors").is_file():
        pytest.skip("the MiniLM baseline is not fetched (twinlm data fetch)")
    folder = tmp_path / "minilm-mlm"
    folder.mkdir()
    for f in src.iterdir():
        (folder / f.name).symlink_to(f)  # the weights are read, not copied
    (folder / "config.json").unlink()
    (folder / "config.json").write_text((src / "config.json").read_text().replace('"BertModel"', '"BertForMaskedLM"'))
    seqs = [[101, 7592, 2088, 102]]
    ours, theirs = load_for_eval(str(folder)), load_for_eval(str(src))
    assert ours.info["hf_class"] == "BertModel"
    torch.testing.assert_close(embed(ours.model, seqs, "mean"), embed(theirs.model, seqs, "mean"), atol=0, rtol=0)
