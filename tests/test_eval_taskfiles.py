"""Bad task files give a clear error naming the file and the line."""

import json

import pytest

from twinlm.eval.tasks import TaskFileError, read_cls_files, read_mc_jsonl


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"context": "The sky is", "choices": ["blue", "green"], "label": 0}


@pytest.mark.parametrize("bad, needle", [
    ({"context": "x", "choices": ["a", "b"]}, "missing field(s) label"),
    ({"choices": ["a", "b"], "label": 0}, "missing field(s) context"),
    ({"context": "x", "choices": ["a", "b"], "label": 2}, "out of range"),
    ({"context": "x", "choices": ["a", "b"], "label": -1}, "out of range"),
    ({"context": "x", "choices": [], "label": 0}, "non-empty list"),
    ({"context": "x", "choices": ["a", ""], "label": 0}, "choice 1 is empty"),
    ({"context": "x", "choices": "ab", "label": 0}, "non-empty list"),
    ({"context": "x", "choices": ["a", "b"], "label": "first"}, "integer index"),
    ("{not json", "not valid JSON"),
])
def test_multiple_choice_file_errors(tmp_path, bad, needle):
    path = _write(tmp_path / "task.jsonl", [GOOD, GOOD, bad])
    with pytest.raises(TaskFileError) as e:
        read_mc_jsonl(path)
    assert str(e.value).startswith(f"{path}:3: ") and needle in str(e.value)
    assert e.value.line == 3 and e.value.path == str(path)


def test_good_file_and_blank_lines(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps({**GOOD, "label": "1"}) + "\n")
    exs = read_mc_jsonl(path)
    assert [e.label for e in exs] == [0, 1] and exs[0].continuations == [" blue", " green"]


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TaskFileError, match="empty.jsonl: no examples"):
        read_mc_jsonl(tmp_path / "empty.jsonl")
    with pytest.raises(TaskFileError, match="nope.jsonl: file not found"):
        read_mc_jsonl(tmp_path / "nope.jsonl")


def test_classification_file_errors(tmp_path):
    train = _write(tmp_path / "train.jsonl", [{"text": "good", "label": 1}, {"text": "bad", "label": 0}])
    ev = _write(tmp_path / "dev.jsonl", [{"text": "fine", "label": 1}, {"text": "meh", "label": 2}])
    with pytest.raises(TaskFileError) as e:
        read_cls_files(ev, train)
    assert str(e.value).startswith(f"{ev}:2: ") and "out of range" in str(e.value)
    bad = _write(tmp_path / "bad.jsonl", [{"text": "x", "label": 0}, {"label": 1}])
    with pytest.raises(TaskFileError, match=r"bad.jsonl:2: missing field\(s\) text"):
        read_cls_files(bad)
    named = _write(tmp_path / "named.jsonl", [{"text": "x", "label": "pos"}, {"text": "y", "label": "neg"}])
    ev2 = _write(tmp_path / "named_dev.jsonl", [{"text": "z", "label": "pos"}, {"text": "w", "label": "other"}])
    with pytest.raises(TaskFileError, match=r"named_dev.jsonl:2: label 'other' is not among"):
        read_cls_files(ev2, named)
    task = read_cls_files(ev2.parent / "named.jsonl")
    assert task.labels == ["neg", "pos"] and [e.label for e in task.eval] == [1, 0]


def test_cli_reports_file_and_line(tmp_path, capsys):
    from twinlm.cli import main

    path = _write(tmp_path / "task.jsonl", [GOOD, {"context": "x", "choices": ["a"], "label": 3}])
    rc = main(["eval", "generative", str(tmp_path / "no-model"), "--tasks", str(path)])
    err = capsys.readouterr().err
    assert rc == 2 and f"{path}:2: 'label' 3 is out of range" in err


def test_training_text_overlapping_evaluation_sentences_is_dropped():
    from twinlm.eval.tasks import ClsExample, drop_overlapping
    train = [ClsExample("A charming and often affecting journey through the heart of France .", 1),
             ClsExample("unflinchingly bleak and desperate", 0),
             ClsExample("a completely different review about something else entirely", 1)]
    evals = ["it 's a charming and often affecting journey . ", "unflinchingly bleak and desperate"]
    kept, dropped = drop_overlapping(train, evals)
    assert dropped == 2 and [e.label for e in kept] == [1] and "different" in kept[0].text


def test_cli_reports_unknown_task_names_in_one_line(tmp_path, capsys):
    from twinlm.cli import main

    rc = main(["eval", "generative", str(tmp_path / "no-model"), "--tasks", "arc_easy_typo"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("twinlm: error: unknown generative task 'arc_easy_typo'")
    assert "Traceback" not in err
