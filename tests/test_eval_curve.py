"""`twinlm eval curve`: every checkpoint of an encoder run and a decoder run evaluated (no export), cached,
tabled and plotted against tokens seen; the last point equals the track run on the exported final model."""

import csv
import json

import pytest

from twinlm.cli import main
from twinlm.errors import ConfigError
from twinlm.eval import bpb
from twinlm.eval.curve import curve
from twinlm.eval.settings import BpbConfig
from twinlm.eval.toy import toy_corpus, toy_model_dir, toy_sentences, toy_tokenizer
from twinlm.train import run
from twinlm.train.testing import tiny_recipe


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("curve")
    tok, _, held = toy_corpus(root, docs=400, held=30)
    out = {}
    for name, objective in (("enc", "mlm"), ("dec", "clm")):
        r = tiny_recipe(root / "shards", objective=objective, phases=1, tokens=900, tokenizer=str(tok))
        r["checkpoint"] = {"every_tokens": 300, "keep_last": 10}
        run(r, root / name)
        out[name] = root / name
    return root, out, held


@pytest.mark.slow
def test_curve_of_two_runs(runs, tmp_path):
    root, r, held = runs
    sets = [f"bpb.text_file={held}", "bpb.max_docs=30"]
    res = curve([str(r["enc"]), str(r["dec"])], ["bpb"], tmp_path / "c", overrides=sets, log=lambda m: None)
    pts = res["points"]
    n_ckpt = {k: len(list((v / "checkpoints").glob("step-*"))) for k, v in r.items()}
    assert len(pts) == sum(n_ckpt.values()) and min(n_ckpt.values()) >= 3
    assert {p["arch"] for p in pts} == {"encoder", "decoder"}
    enc = [p for p in pts if p["series"] == "enc"]
    assert [p["tokens"] for p in enc] == sorted(p["tokens"] for p in enc) and enc[0]["tokens"] > 0
    # the last checkpoint is the final model: the same score as the track run on the exported folder
    for name in ("enc", "dec"):
        last = [p for p in pts if p["series"] == name][-1]
        direct = bpb.run(str(r[name] / "final"), BpbConfig(text_file=str(held), max_docs=30), log=None)
        assert last["metrics"]["bpb"] == pytest.approx(direct["average"]["mean"], rel=1e-6)
    assert (tmp_path / "c" / "bpb.png").read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader((tmp_path / "c" / "curve.csv").open()))
    assert len(rows) == len(pts) and all(float(x["bpb"]) > 0 for x in rows)
    # a rerun evaluates nothing; every 2nd checkpoint (plus the last) comes from the cache as well
    again = curve([str(r["enc"]), str(r["dec"])], ["bpb"], tmp_path / "c", overrides=sets, log=lambda m: None)
    assert again["evaluated"] == 0 and again["points"] == pts
    sparse = curve([str(r["enc"])], ["bpb"], tmp_path / "c", every=2, overrides=sets, log=lambda m: None)
    assert sparse["evaluated"] == 0 and sparse["points"][-1] == enc[-1] and len(sparse["points"]) < len(enc)


def test_curve_command_over_model_folders(tmp_path, capsys):
    tok = toy_tokenizer()
    enc = toy_model_dir(tmp_path / "models" / "enc", causal=False, tokenizer=tok)
    dec = toy_model_dir(tmp_path / "models" / "dec", causal=True, tokenizer=tok)
    held = tmp_path / "held.txt"
    held.write_text("\n\n".join(toy_sentences(10, seed=9)) + "\n")
    out = tmp_path / "c"
    assert main(["eval", "curve", str(enc), str(dec), "--tracks", "bpb",
                 "--out", str(out), "--set", f"bpb.text_file={held}", "bpb.max_docs=3"]) == 0
    got = json.loads((out / "curve.json").read_text())
    assert [p["arch"] for p in got["points"]] == ["encoder", "decoder"]
    direct = bpb.run(str(dec), BpbConfig(text_file=str(held), max_docs=3), log=None)
    assert got["points"][1]["metrics"]["bpb"] == pytest.approx(direct["average"]["mean"], rel=1e-6)
    assert (out / "curve.md").read_text().count("\n") == 4 and (out / "bpb.png").is_file()
    with pytest.raises(ConfigError, match="choose from"):
        curve([str(enc)], ["nope"], tmp_path / "x")
    capsys.readouterr()
    assert main(["eval", "curve", str(enc), "--tracks", "bpb", "--out", str(tmp_path / "y"),
                 "--set", "bpb.bogus=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("twinlm: error:") and "bogus" in err[0]


@pytest.mark.slow
def test_a_corrupt_checkpoint_is_reported_and_skipped(runs, tmp_path):
    import shutil
    root, r, held = runs
    copy = tmp_path / "enc"
    shutil.copytree(r["enc"], copy)
    victim = sorted((copy / "checkpoints").glob("step-*"))[1] / "model.safetensors"
    b = bytearray(victim.read_bytes())
    b[-5] ^= 0xFF
    victim.write_bytes(bytes(b))
    logged = []
    res = curve([str(copy)], ["bpb"], tmp_path / "c", overrides=[f"bpb.text_file={held}", "bpb.max_docs=5"],
                log=logged.append)
    n = len(list((copy / "checkpoints").glob("step-*")))
    assert len(res["points"]) == n - 1 and victim.parent.name not in [p["label"] for p in res["points"]]
    assert any("skipping" in m and "model.safetensors" in m for m in logged)
    # CV4, CV5: a checkpoint whose state.json or model_config.json is damaged is reported and skipped the same way
    ckpts = sorted((copy / "checkpoints").glob("step-*"))
    shutil.copy(r["enc"] / "checkpoints" / ckpts[1].name / "model.safetensors", ckpts[1])  # whole again
    (ckpts[0] / "state.json").write_bytes(b"\xdf" + (ckpts[0] / "state.json").read_bytes()[1:])
    (ckpts[1] / "model_config.json").write_text("garbage")
    logged.clear()
    res = curve([str(copy)], ["bpb"], tmp_path / "c2", overrides=[f"bpb.text_file={held}", "bpb.max_docs=5"],
                log=logged.append)
    assert [p["label"] for p in res["points"]] == [c.name for c in ckpts[2:]]
    for name in ("state.json", "model_config.json"):
        assert any("skipping" in m and f"{name} does not match its sha256" in m for m in logged), (name, logged)


def test_a_full_disk_while_the_curve_is_written_is_one_line(runs, tmp_path, monkeypatch, capsys):
    """CV6: the PNG writer meets a full disk: one line, no file half-written, the cache kept."""
    import errno

    import matplotlib.figure

    root, r, held = runs

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    out = tmp_path / "c"
    assert main(["eval", "curve", str(r["dec"]), "--tracks", "bpb", "--out", str(out), "--every", "100",
                 "--set", f"bpb.text_file={held}", "bpb.max_docs=5"]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after the progress lines
    assert last.startswith("twinlm: error: ") and "is full: the curve's tables and plots were not all written" in last
    assert not list(out.glob("*.png")) and not list(out.glob(".*tmp*")) and list((out / "cache").iterdir())
