"""KEY=VALUE overrides anywhere on the command line (cli/__init__.py): after an option as before it, for `twinlm
train`, `twinlm suite` and `twinlm eval curve`; a word that is neither an option nor KEY=VALUE is one line; an
unknown option stays argparse's usage error. A stopped suite exits 75, as `twinlm train` does."""

import subprocess
import sys

import pytest
import yaml

import twinlm.suite.pipeline as pipeline
import twinlm.suite.scales as scales
from twinlm.cli import main
from twinlm.errors import ConfigError


def printed(capsys, *argv: str) -> dict:
    assert main(["train", *argv, "--print"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_train_takes_overrides_after_any_option(tmp_path, capsys):
    out = str(tmp_path / "run")
    r = printed(capsys, "cpu/encoder", "--out", out, "optim.lr=1e-3", "model.preset=cpu-tiny")
    assert r["optim"]["lr"] == 1e-3 and r["model"]["preset"] == "cpu-tiny"
    assert main(["train", "cpu/encoder", "--print", "--out", out, "optim.lr=2e-3"]) == 0  # after --print too
    assert yaml.safe_load(capsys.readouterr().out)["optim"]["lr"] == 2e-3
    # before and after the options alike, in the order written: the later one wins
    r = printed(capsys, "--out", out, "cpu/encoder", "optim.lr=1e-3", "--print", "optim.lr=4e-3")
    assert r["optim"]["lr"] == 4e-3
    assert not (tmp_path / "run").exists()  # --print writes nothing


def test_an_override_that_makes_a_recipe_invalid_is_one_readable_line(tmp_path, capsys):
    assert main(["train", "cpu/encoder", "--out", str(tmp_path / "run"), "--print",
                 "phases.nosuch={tokens: 1M, seq_len: 128}"]) == 2
    assert capsys.readouterr().err == ("twinlm: error: invalid recipe 'cpu-encoder': phases.nosuch: no data (set "
                                       "`data:` or `phases.nosuch.data`)\n")


@pytest.mark.parametrize("word", ["optim.lr", "=3", " =3"])
def test_a_malformed_override_is_one_line(tmp_path, capsys, word):
    code = main(["train", "cpu/encoder", "--out", str(tmp_path / "run"), "--print", word])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "usage" not in err
    assert err.startswith(f"twinlm: error: {word!r} is neither an option of `twinlm train` nor a KEY=VALUE override")
    code = main(["train", "cpu/encoder", word, "--out", str(tmp_path / "run"), "--print"])  # before an option
    assert code == 2 and "KEY=VALUE override" in capsys.readouterr().err


def test_an_unknown_option_or_a_word_for_a_command_without_overrides_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "cpu/encoder", "--out", str(tmp_path / "run"), "--bogus", "optim.lr=1e-3"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus optim.lr=1e-3" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["data", "list", "--json", "x=1"])
    assert e.value.code == 2 and "unrecognized arguments: x=1" in capsys.readouterr().err


def test_suite_and_eval_curve_take_settings_after_options(tmp_path, monkeypatch, capsys):
    seen = {}

    def get_scale(name, overrides=None):
        seen["suite"] = (name, overrides)
        raise ConfigError("seen")

    monkeypatch.setattr(scales, "get_scale", get_scale)
    assert main(["suite", "pretrain_tokens=4M", "--scale", "quick", "classification.seeds=2", "--out",
                 str(tmp_path / "s"), "corpus_mb=1"]) == 2
    assert seen["suite"] == ("quick", ["pretrain_tokens=4M", "classification.seeds=2", "corpus_mb=1"])

    import twinlm.eval.curve as curve_module

    def curve(sources, tracks, out, **kw):
        seen["curve"] = (sources, kw["overrides"])
        raise ConfigError("seen")

    monkeypatch.setattr(curve_module, "curve", curve)
    assert main(["eval", "curve", "runs/a", "bpb.max_docs=5", "--tracks", "bpb", "--out", str(tmp_path / "c"),
                 "bpb.max_docs=7"]) == 2
    assert seen["curve"] == (["runs/a"], ["bpb.max_docs=5", "bpb.max_docs=7"])
    capsys.readouterr()


def test_a_suite_whose_training_stopped_exits_75(tmp_path, monkeypatch, capsys):
    """The suite's training step stopped before final/ (here: training returned its checkpoint, as after a
    SIGTERM) raises RunInterrupted, which the command line turns into 75 and one line."""
    monkeypatch.setattr(pipeline, "train", lambda recipe, out, overrides: out / "checkpoints" / "step-00000003")
    monkeypatch.setattr(pipeline.Suite, "run", lambda self: self._train("encoder")(tmp_path / "step"))
    assert main(["suite", "--quick", "--out", str(tmp_path / "s")]) == 75
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"twinlm: training of encoder stopped before the end (the newest checkpoint in "
                   f"{tmp_path / 'step' / 'run'} resumes it); run the same suite command again to go on")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")  # a torchrun worker: 0, or the agent restarts it
    assert main(["suite", "--quick", "--out", str(tmp_path / "s")]) == 0


def test_a_training_subprocess_stopped_with_75_is_no_crash_for_the_suite():
    pipeline._train_command([sys.executable, "-c", "raise SystemExit(75)"])  # the suite then finds no final/
    with pytest.raises(subprocess.CalledProcessError):
        pipeline._train_command([sys.executable, "-c", "raise SystemExit(1)"])
