"""Folders twinlm writes load in transformers 4.x too (issue 25; pyproject allows `transformers>=4.56`): a
trained decoder's `final/`, an encoder converted from it, a sentence-transformers export and the tokenizer
folders twinlm trains, read by `AutoTokenizer` and `AutoConfig` of transformers 4.57 in a venv of its own (no
torch: loading a tokenizer or a config needs none), give the same ids, masks, special tokens, padding side and
`model_max_length` as transformers 5 here, and the same config classes.

The venv is built once with pip (PyPI) under pytest's cache folder, keyed by the version; without a registry
the test is skipped, saying so."""

import json
import os
import subprocess
import sys

import pytest

from twinlm.convert import convert
from twinlm.eval.retrieval import export_sentence_transformers
from twinlm.eval.toy import toy_tokenizer
from twinlm.loading import load

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

VERSION = "4.57.*"
TEXTS = ["the old man", "a small red fox ran to the [MASK] and back"]

PROBE = r"""
import json, sys
import transformers
from transformers import AutoConfig, AutoTokenizer

def probe(folder, config):
    tok = AutoTokenizer.from_pretrained(folder)
    texts = json.loads(sys.argv[1])
    batch = tok(texts, padding=True)
    out = {"class": type(tok).__name__, "single": [tok(t)["input_ids"] for t in texts],
           "pair": tok(texts[0], texts[1])["input_ids"], "batch": batch["input_ids"],
           "mask": batch["attention_mask"], "padding_side": tok.padding_side,
           "model_max_length": tok.model_max_length, "specials": dict(sorted(tok.special_tokens_map.items())),
           "special_ids": [tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, tok.mask_token_id],
           "model_input_names": list(tok.model_input_names)}
    if config:
        cfg = AutoConfig.from_pretrained(folder)
        out["config"] = [type(cfg).__name__, cfg.model_type, cfg.vocab_size, cfg.num_hidden_layers]
    return out

folders = json.loads(sys.argv[2])
print(json.dumps({"version": transformers.__version__,
                  "folders": {name: probe(path, config) for name, (path, config) in folders.items()}}))
"""


@pytest.fixture(scope="module")
def old_python(request):
    """The python of a plain venv with transformers 4.57 and tokenizers (built once, kept in pytest's cache)."""
    venv = request.config.cache.mkdir(f"transformers-{VERSION.replace('*', 'x')}-venv")
    py = venv / "bin" / "python"
    if subprocess.run([str(py), "-c", "import transformers"], capture_output=True).returncode if py.exists() else 1:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        pip = subprocess.run([str(py), "-m", "pip", "install", "--quiet", f"transformers=={VERSION}", "tokenizers"],
                             capture_output=True, text=True)
        if pip.returncode:
            pytest.skip(f"transformers {VERSION} could not be installed (no package registry?): "
                        f"{pip.stderr.strip().splitlines()[-1:]}")
    return py


def _probe(python, folders: dict) -> dict:
    """PROBE's answer from `python` (the venv's transformers 4, or this environment's 5.x)."""
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([str(python), "-c", PROBE, json.dumps(TEXTS), json.dumps(folders)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_folders_load_the_same_in_transformers_4(trained_decoder, tmp_path, old_python):
    final = trained_decoder["final"]
    enc = convert(final, "encoder", tmp_path / "enc", log=lambda *a: None)
    st = export_sentence_transformers(load(final), transformers.AutoTokenizer.from_pretrained(final),
                                      tmp_path / "st", "last", 48)
    toy_tokenizer(out_dir=tmp_path / "toy-tok")
    folders = {"decoder final": (str(final), True), "converted encoder": (str(enc), True),
               "sentence-transformers export": (str(st), True),
               "trained tokenizer": (str(trained_decoder["tok"]), False),
               "toy tokenizer": (str(tmp_path / "toy-tok"), False)}
    for path, _ in folders.values():
        conf = json.loads(open(os.path.join(path, "tokenizer_config.json")).read())
        assert conf["tokenizer_class"] == "PreTrainedTokenizerFast"
        assert not {"is_local", "local_files_only"} & set(conf)
    old, new = _probe(old_python, folders), _probe(sys.executable, folders)
    assert old["version"].startswith("4.57.") and new["version"].startswith("5.")
    for name in folders:
        # the one difference: transformers 5's PreTrainedTokenizerFast is its TokenizersBackend under another name
        assert old["folders"][name].pop("class") == "PreTrainedTokenizerFast"
        assert new["folders"][name].pop("class") in ("TokenizersBackend", "PreTrainedTokenizerFast")
        assert old["folders"][name] == new["folders"][name], name
    # what each kind's tokenizer does, in both versions: the decoder [CLS] text, the encoder [CLS] text [SEP],
    # the sentence-transformers export [CLS] text [SEP] (its decoder pools on that [SEP])
    dec, enc_ids, st_ids = (new["folders"][n] for n in ("decoder final", "converted encoder",
                                                        "sentence-transformers export"))
    cls, sep = dec["special_ids"][:2]
    assert dec["single"][0][0] == cls and sep not in dec["single"][0] and dec["padding_side"] == "left"
    assert enc_ids["single"][0][-1] == sep and enc_ids["padding_side"] == "right"
    assert st_ids["single"][0][-1] == sep and st_ids["model_max_length"] == 48
    assert dec["config"][0] == "ModernBertDecoderConfig" and enc_ids["config"][0] == "ModernBertConfig"
