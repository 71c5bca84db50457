import json

import pytest

from twinlm.suite.steps import Pipeline, Step


def make_steps(calls, settings_b=1, fail_c=False):
    def runner(name, fail=False):
        def run(folder):
            calls.append(name)
            (folder / "partial.txt").write_text("started")
            if fail:
                raise RuntimeError("interrupted")
            return {"name": name}
        return run
    return [
        Step("a", runner("a"), settings={"x": 1}),
        Step("b", runner("b"), settings={"y": settings_b}, after=["a"]),
        Step("c", runner("c", fail_c), settings={}, after=["b"]),
        Step("d", runner("d"), settings={}, after=["a"]),
    ]


def test_second_run_is_all_cached(tmp_path):
    calls = []
    Pipeline(tmp_path, make_steps(calls), log=lambda _: None).run()
    assert calls == ["a", "b", "c", "d"]
    summaries = Pipeline(tmp_path, make_steps(calls), log=lambda _: None).run()
    assert calls == ["a", "b", "c", "d"]
    assert summaries["c"] == {"name": "c"}


def test_changed_setting_reruns_only_what_depends_on_it(tmp_path):
    calls = []
    Pipeline(tmp_path, make_steps(calls), log=lambda _: None).run()
    (tmp_path / "b" / "leftover").write_text("old")
    calls.clear()
    Pipeline(tmp_path, make_steps(calls, settings_b=2), log=lambda _: None).run()
    assert calls == ["b", "c"]
    assert not (tmp_path / "b" / "leftover").exists()  # a stale folder is emptied


def test_interrupted_step_is_not_marked_done_and_resumes_in_place(tmp_path):
    calls = []
    with pytest.raises(RuntimeError):
        Pipeline(tmp_path, make_steps(calls, fail_c=True), log=lambda _: None).run()
    pipe = Pipeline(tmp_path, make_steps(calls), log=lambda _: None)
    assert pipe.status() == {"a": "done", "b": "done", "c": "partial", "d": "todo"}
    calls.clear()
    pipe.run()
    assert calls == ["c", "d"]
    assert json.loads((tmp_path / "c" / "STEP.json").read_text())["summary"] == {"name": "c"}


def test_step_reading_a_later_step_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="do not run before it"):
        Pipeline(tmp_path, [Step("a", lambda f: {}, after=["b"]), Step("b", lambda f: {})])


def test_partial_step_of_other_settings_starts_from_an_empty_folder(tmp_path):
    calls = []
    with pytest.raises(RuntimeError):
        Pipeline(tmp_path, make_steps(calls, fail_c=True), log=lambda _: None).run()
    (tmp_path / "c" / "checkpoint").write_text("from the old settings")
    changed = make_steps(calls, settings_b=2)
    pipe = Pipeline(tmp_path, changed, log=lambda _: None)
    assert pipe.status()["c"] == "stale"
    pipe.run()
    assert not (tmp_path / "c" / "checkpoint").exists()
