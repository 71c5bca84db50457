"""Outside models scored the way their folders say (issue 25, item 6): a sentence-transformers folder's own
pooling (`modules.json` + `1_Pooling/config.json`, written here by sentence-transformers itself) is the default,
with twinlm's pooled embeddings equal to `SentenceTransformer.encode`, and `--pooling` still overrides it; a
GPT-2-style decoder, whose tokenizer adds no BOS, gets none by default, and its log-likelihoods equal
lm-evaluation-harness's `hf` model with its default arguments on the same folder."""

import json

import pytest
import torch
from tokenizers import Tokenizer, processors

from twinlm.errors import ConfigError
from twinlm.eval import classify, generative
from twinlm.eval.common import choose_pooling, folder_pooling, load_for_eval, resolve_add_bos
from twinlm.eval.retrieval import encode_texts
from twinlm.eval.settings import ClassifyConfig
from twinlm.eval.tasks import lm_eval_task_yaml, read_mc_jsonl
from twinlm.eval.toy import toy_sentences, toy_tokenizer, write_toy_classification, write_toy_mc_jsonl

transformers = pytest.importorskip("transformers")


def _st_folder(root, mode: str):
    """A tiny BERT saved by sentence-transformers with `Pooling(mode)`: (folder, the SentenceTransformer)."""
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    tok = toy_tokenizer()
    bert_dir = root / "bert"
    if not bert_dir.exists():
        torch.manual_seed(0)
        transformers.BertModel(transformers.BertConfig(
            vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=128, pad_token_id=tok.pad_token_id)).save_pretrained(bert_dir)
        tok.save_pretrained(bert_dir)
    word = Transformer(str(bert_dir), max_seq_length=64)
    model = st.SentenceTransformer(modules=[word, Pooling(32, pooling_mode=mode)], device="cpu")
    out = root / f"st-{mode}"
    model.save(str(out))
    return out, model


@pytest.mark.parametrize("mode,ours", [("mean", "mean"), ("max", "max"), ("cls", "cls"), ("lasttoken", "last")])
def test_sentence_transformers_folder_pooling_is_the_default_and_equals_encode(tmp_path, mode, ours):
    folder, st_model = _st_folder(tmp_path, mode)
    assert json.loads((folder / "modules.json").read_text())[1]["path"] == "1_Pooling"  # ST's own layout
    assert folder_pooling(folder) == ours
    loaded = load_for_eval(str(folder))
    assert loaded.folder_pooling == ours
    assert choose_pooling(None, loaded, "classification") == (ours, "folder")
    assert choose_pooling("cls", loaded, "retrieval") == ("cls", "flag")  # --pooling overrides the folder
    texts = toy_sentences(7, seed=4)
    got = encode_texts(loaded.model, loaded.tokenizer, texts, ours, max_length=64)
    ref = st_model.encode(texts, convert_to_numpy=True, batch_size=3)
    assert got.shape == ref.shape
    assert abs(got - ref).max() < 1e-5


def test_classify_records_the_folder_pooling_and_the_flag_wins(tmp_path):
    folder, _ = _st_folder(tmp_path, "mean")
    train, dev = write_toy_classification(tmp_path, 24, 12)
    files = dict(train_file=str(train), eval_file=str(dev), seeds=[0])
    res = classify.run(str(folder), ClassifyConfig(["toy"], **files), log=None)
    assert (res["config"]["pooling"], res["config"]["pooling_source"]) == ("mean", "folder")
    res = classify.run(str(folder), ClassifyConfig(["toy"], pooling="cls", **files), log=None)
    assert (res["config"]["pooling"], res["config"]["pooling_source"]) == ("cls", "flag")


def test_a_plain_folder_keeps_the_architecture_default_and_odd_pooling_is_named(tmp_path):
    folder, _ = _st_folder(tmp_path, "mean")
    assert folder_pooling(tmp_path / "bert") is None
    assert choose_pooling(None, load_for_eval(str(tmp_path / "bert")), "classification") == ("cls", "default")
    conf = folder / "1_Pooling" / "config.json"
    # the boolean layout older sentence-transformers (and twinlm's own --export) write
    legacy = {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
              "pooling_mode_max_tokens": True, "pooling_mode_lasttoken": False}
    conf.write_text(json.dumps(legacy))
    assert folder_pooling(folder) == "max"
    conf.write_text(json.dumps({**legacy, "pooling_mode_mean_tokens": True}))
    with pytest.raises(ConfigError, match="mean_tokens\\+max_tokens .*--pooling"):
        folder_pooling(folder)
    conf.write_text(json.dumps({"embedding_dimension": 32, "pooling_mode": "weightedmean"}))
    with pytest.raises(ConfigError, match="weightedmean .*--pooling"):
        folder_pooling(folder)


# --- BOS: the tokenizer's own rule -----------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny GPT-2 whose tokenizer adds nothing (one token for BOS/EOS/UNK, no pad), as GPT-2's own."""
    root = tmp_path_factory.mktemp("gpt2")
    backend = Tokenizer.from_str(toy_tokenizer().backend_tokenizer.to_str())
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="[CLS]", eos_token="[CLS]",
                                               unk_token="[UNK]")
    assert tok("the cat")["input_ids"][0] != tok.bos_token_id
    torch.manual_seed(1)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id))
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root


def test_a_decoder_whose_tokenizer_adds_no_bos_gets_none_by_default(gpt2_dir, tmp_path):
    loaded = load_for_eval(str(gpt2_dir))
    assert loaded.causal and resolve_add_bos(None, loaded) is False
    assert resolve_add_bos(True, loaded) is True  # --bos forces it
    llama_style = load_for_eval(str(_llama_dir(tmp_path)))
    assert resolve_add_bos(None, llama_style) is True  # its tokenizer prepends BOS
    exs = read_mc_jsonl(write_toy_mc_jsonl(tmp_path / "mc.jsonl", n=2, n_choices=2, seed=5))
    _, plain = generative.evaluate_examples(loaded, exs)
    _, forced = generative.evaluate_examples(loaded, exs, add_bos=True)
    ids = loaded.tokenizer(exs[0].contexts[0] + exs[0].continuations[0])["input_ids"]  # no BOS: as the tokenizer
    ctx = loaded.tokenizer(exs[0].contexts[0])["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(loaded.model.hf(torch.tensor([ids])).logits[0], -1)
    ref = sum(float(logp[i - 1, ids[i]]) for i in range(len(ctx), len(ids)))
    assert plain[0][0].loglikelihood == pytest.approx(ref, abs=1e-4)
    assert forced[0][0].loglikelihood != pytest.approx(ref, abs=1e-4)


def _llama_dir(root):
    tok = toy_tokenizer()  # `[CLS] $A [SEP]`: the BOS-role token first, as a Llama tokenizer's `<s>`
    out = root / "llama"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
        pad_token_id=0)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_gpt2_style_decoder_equals_lm_eval_default(gpt2_dir, tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    task = write_toy_mc_jsonl(tmp_path / "toy.jsonl", n=6, n_choices=3, seed=1)
    tasks_dir = tmp_path / "lm_eval_tasks"
    tasks_dir.mkdir()
    (tasks_dir / "gpt2_bos.yaml").write_text(lm_eval_task_yaml("gpt2_bos", task, prefix=""))  # a stock prompt
    out = simple_evaluate(model="hf", model_args=f"pretrained={gpt2_dir},dtype=float32", tasks=["gpt2_bos"],
                          task_manager=TaskManager(include_path=str(tasks_dir)), batch_size=4, device="cpu",
                          log_samples=True)
    samples = sorted(out["samples"]["gpt2_bos"], key=lambda s: s["doc_id"])
    ref = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    _, per_ex = generative.evaluate_examples(load_for_eval(str(gpt2_dir)), read_mc_jsonl(task))
    got = [[s.loglikelihood for s in row] for row in per_ex]
    assert len(ref) == len(got) == 6
    for a, b in zip(ref, got):
        assert a == pytest.approx(b, abs=2e-4)
