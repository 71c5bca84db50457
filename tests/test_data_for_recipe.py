"""`twinlm data prepare --for RECIPE` (issue 11, item 8): on a fresh $TWINLM_HOME holding only fetched text,
it builds the tokenizer and every shard folder a shipped cpu recipe names, after which `twinlm train` runs
with no other step; before it, `twinlm train` names that command; for an Ettin recipe it says what is needed."""

import json

import pytest

from twinlm.cli import main
from twinlm.data.for_recipe import needs
from twinlm.eval.toy import toy_sentences
from twinlm.train.recipe import load_recipe, shipped_recipes

RECIPES = shipped_recipes()


def test_prepare_for_a_cpu_recipe_then_train(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    (home / "pretrain").mkdir(parents=True)
    texts = toy_sentences(3000, seed=1)
    (home / "pretrain" / "shakespeare.jsonl").write_text("".join(
        json.dumps({"id": str(i), "text": " ".join(texts[i:i + 40])}) + "\n" for i in range(0, len(texts), 40)))
    monkeypatch.setenv("TWINLM_HOME", str(home))
    recipe = str(RECIPES / "cpu" / "encoder.yaml")
    small = ["model.preset=cpu-tiny", "phases.pretrain.tokens=3K", "phases.pretrain.batch_warmup_tokens=1K",
             "phases.pretrain.schedule.warmup_tokens=1K", "phases.extension.tokens=1K", "phases.decay.tokens=1K",
             "checkpoint.every_tokens=100K"]
    # before: the missing data is named with the command that builds it
    assert main(["train", recipe, "--out", str(tmp_path / "run0"), *small]) == 2
    err = capsys.readouterr().err
    assert f"twinlm data prepare --for {recipe}" in err and err.count("\n") == 1
    assert main(["data", "prepare", "--for", recipe, "--vocab-size", "400"]) == 0
    assert f"now: twinlm train {recipe}" in capsys.readouterr().out
    got = needs(load_recipe(recipe).resolved_paths())
    assert [(n.kind, n.path.name, n.seq_len, n.exists) for n in got] == [
        ("tokenizer", "cpu", None, True), ("shards", "cpu-256", 256, True), ("shards", "cpu-512", 512, True)]
    meta = json.loads((home / "shards" / "cpu-512" / "meta.json").read_text())
    assert meta["num_tokens"] > 0
    # a second call builds nothing
    assert main(["data", "prepare", "--for", recipe]) == 0
    assert "nothing to build" in capsys.readouterr().out
    assert main(["train", recipe, "--out", str(tmp_path / "run"), *small]) == 0
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_prepare_for_an_ettin_recipe_says_what_is_needed(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TWINLM_HOME", str(tmp_path / "empty"))
    recipe = sorted((RECIPES / "ettin").glob("*/encoder.yaml"))[0]
    assert main(["data", "prepare", "--for", str(recipe)]) == 2
    out, err = capsys.readouterr()
    assert "twinlm tokenizer ettin --out" in out and "--chunk-size" in out
    assert "does not hold" in err


def test_prepare_needs_tokenizer_and_out_without_for(capsys):
    assert main(["data", "prepare", "x.jsonl"]) == 2
    assert "--tokenizer DIR and --out DIR (or --for RECIPE)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "prepare", "--for"])
