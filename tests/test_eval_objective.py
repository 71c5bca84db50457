"""A model folder says which objective trained it (config.json's `twinlm_objective`), so that an MNTP encoder is
scored as one wherever it is evaluated from: the run's final/, a copy of it, an exported checkpoint; `convert`
keeps the source's objective; `--mntp` / `--no-mntp` still decide when given; old folders without the key fall
back to the run's config.yaml."""

import json
import shutil

import pytest

import twinlm
from twinlm.cli import main
from twinlm.convert import convert, export_model
from twinlm.errors import ConfigError, ModelLoadError
from twinlm.eval import bpb
from twinlm.eval.common import load_for_eval
from twinlm.eval.settings import BpbConfig
from twinlm.eval.toy import toy_corpus, toy_model_dir, toy_tokenizer
from twinlm.export import OBJECTIVE_KEY, recorded_objective, verify_manifest
from twinlm.train import run
from twinlm.train.testing import tiny_recipe


@pytest.fixture(scope="module")
def mntp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("objective")
    tok, _, held = toy_corpus(root, docs=200, held=12)
    recipe = tiny_recipe(root / "shards", objective="mntp", phases=1, tokens=600, tokenizer=str(tok))
    recipe["checkpoint"] = {"every_tokens": 300, "keep_last": 10}
    run(recipe, root / "enc-mntp-run")
    return root / "enc-mntp-run", held


def _bpb(folder, held, **kw):
    return bpb.run(str(folder), BpbConfig(text_file=str(held), max_docs=None), log=None, **kw)


def test_final_records_the_objective_and_loads_as_before(mntp_run):
    run_dir, _ = mntp_run
    final = run_dir / "final"
    assert json.loads((final / "config.json").read_text())[OBJECTIVE_KEY] == "mntp"
    assert recorded_objective(final) == "mntp"
    verify_manifest(final)  # config.json, key included, is in the manifest
    twinlm.load(final)
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForMaskedLM.from_pretrained(str(final))  # default settings: the key is ignored
    assert type(model).__name__ == "ModernBertForMaskedLM"


def test_an_mntp_encoder_is_scored_as_mntp_from_anywhere(mntp_run, tmp_path):
    run_dir, held = mntp_run
    in_run = _bpb(run_dir / "final", held)
    assert in_run["model"]["mntp"] is True and in_run["model"]["objective"] == "mntp"
    # a copy of final/ outside its run: no config.yaml around it, the key says it
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(run_dir / "final", copy)
    copied = _bpb(copy, held)
    assert copied["model"]["mntp"] is True and copied["average"]["mean"] == in_run["average"]["mean"]
    # `twinlm export` of the last checkpoint (the final weights), evaluated from another place
    last = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    out = tmp_path / "exported"
    assert main(["export", str(last), "--out", str(out)]) == 0
    assert recorded_objective(out) == "mntp"
    exported = _bpb(out, held)
    assert exported["model"]["mntp"] is True
    assert exported["average"]["mean"] == pytest.approx(in_run["average"]["mean"], rel=1e-6)
    # the same weights without the key (as before this key existed) are plain MLM unless --mntp says so
    keyless = tmp_path / "keyless"
    export_model(copy, keyless)
    cfg = json.loads((keyless / "config.json").read_text())
    assert cfg[OBJECTIVE_KEY] == "mntp"  # export_model carries it from the source
    cfg.pop(OBJECTIVE_KEY)
    (keyless / "config.json").write_text(json.dumps(cfg))
    (keyless / "MANIFEST.sha256").unlink()
    plain = _bpb(keyless, held)
    assert plain["model"]["mntp"] is False and plain["average"]["mean"] != in_run["average"]["mean"]
    flagged = _bpb(keyless, held, mntp=True)
    assert flagged["model"]["mntp"] is True and flagged["average"]["mean"] == in_run["average"]["mean"]
    # an explicit choice wins over the key
    assert _bpb(copy, held, mntp=False)["average"]["mean"] == plain["average"]["mean"]


def test_mntp_flags_on_the_command_line(mntp_run, tmp_path, capsys):
    run_dir, held = mntp_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir / "final", copy)
    results = {}
    for name, flag in (("auto", []), ("on", ["--mntp"]), ("off", ["--no-mntp"])):
        out = tmp_path / f"{name}.json"
        assert main(["eval", "bpb", str(copy), "--text-file", str(held), "--max-docs", "all", "--out", str(out),
                     *flag]) == 0
        results[name] = json.loads(out.read_text())
    assert results["auto"]["model"]["mntp"] is True and results["on"]["model"]["mntp"] is True
    assert results["off"]["model"]["mntp"] is False
    assert results["auto"]["average"] == results["on"]["average"] != results["off"]["average"]


def test_convert_keeps_the_source_objective(tmp_path):
    tok = toy_tokenizer()
    dec = tmp_path / "dec"
    twinlm.load(toy_model_dir(tmp_path / "toy-dec", causal=True, tokenizer=tok)).save_pretrained(
        dec, tokenizer=tok, objective="clm")
    enc = convert(dec, "encoder", tmp_path / "enc", log=lambda m: None)
    # a converted decoder's head predicts the next token: the encoder says clm and is read one position earlier
    assert recorded_objective(enc) == "clm"
    assert load_for_eval(str(enc)).info["mntp"] is True
    back = convert(enc, "decoder", tmp_path / "back", log=lambda m: None)
    assert recorded_objective(back) == "clm" and load_for_eval(str(back)).info["mntp"] is False
    mlm = tmp_path / "mlm"
    twinlm.load(enc).save_pretrained(mlm, tokenizer=tok, objective="mlm")
    assert recorded_objective(convert(mlm, "decoder", tmp_path / "mlm-dec", log=lambda m: None)) == "mlm"
    # a source that records nothing (and has no run around it) gives a folder that records nothing
    bare = convert(toy_model_dir(tmp_path / "bare", causal=False, tokenizer=tok), "decoder", tmp_path / "bare-dec",
                   log=lambda m: None)
    assert OBJECTIVE_KEY not in json.loads((bare / "config.json").read_text())


def test_the_key_wins_over_the_run_folder_and_is_checked(tmp_path):
    tok = toy_tokenizer()
    run_dir = tmp_path / "enc-from-dec"
    folder = toy_model_dir(run_dir / "final", causal=False, tokenizer=tok)
    (run_dir / "config.yaml").write_text("objective: mntp\n")
    assert load_for_eval(str(folder)).info["mntp"] is True  # an old folder: the run's config.yaml says it
    twinlm.load(folder).save_pretrained(run_dir / "mlm", tokenizer=tok, objective="mlm")
    info = load_for_eval(str(run_dir / "mlm")).info
    assert info["mntp"] is False and info["objective"] == "mlm"
    with pytest.raises(ConfigError, match="objective 'mask' is not one of mlm, clm, mntp"):
        twinlm.load(folder).save_pretrained(tmp_path / "bad", objective="mask")
    cfg = json.loads((run_dir / "mlm" / "config.json").read_text())
    (run_dir / "mlm" / "config.json").write_text(json.dumps({**cfg, OBJECTIVE_KEY: "mask"}))
    with pytest.raises(ModelLoadError, match="twinlm_objective 'mask' is not one of"):
        recorded_objective(run_dir / "mlm")
