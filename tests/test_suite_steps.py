import json
from pathlib import Path

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


PIPELINE_SCRIPT = '''
import json, os, sys
from pathlib import Path
from twinlm.eval.ranks import ranks
from twinlm.suite.steps import Pipeline, Step

root, calls = Path(sys.argv[1]), Path(sys.argv[2])

def note(name):
    with open(calls, "a") as f:
        f.write(f"{name} {os.environ.get('RANK', '0')}\\n")

def serial(name):
    def run(folder):
        note(name)
        (folder / "out.txt").write_text(name)
        return {"name": name}
    return run

def compute(name):
    def work():
        note(name)
        return {"value": name * 2}
    return work

def write(folder, value):
    (folder / "value.json").write_text(json.dumps(value))
    return value

steps = [Step("a", serial("a"), {"x": 1})]
steps += [Step.shared(f"e{i}", compute(f"e{i}"), write, settings={"i": i}, after=["a"], estimate_s=i + 1)
          for i in range(4)]
steps.append(Step("report", serial("report"), {}, [f"e{i}" for i in range(4)]))
summaries = Pipeline(root, steps, log=lambda _: None, ranks=ranks()).run()
# one file per rank: lines printed by two ranks at once may interleave on a shared stdout
Path(f"{calls}.summary-{os.environ.get('RANK', '0')}.json").write_text(json.dumps(summaries, sort_keys=True))
'''


@pytest.mark.distributed
def test_shared_steps_are_dealt_out_among_ranks_and_rank_0_writes(tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "pipe.py"
    script.write_text(PIPELINE_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(nproc, root, calls):
        cmd = [sys.executable, str(script), str(root), str(calls)] if nproc == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
             str(script), str(root), str(calls)]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-3000:]
        return [json.loads(Path(f"{calls}.summary-{rank}.json").read_text()) for rank in range(nproc)]

    one = launch(1, tmp_path / "one", tmp_path / "one.txt")
    two = launch(2, tmp_path / "two", tmp_path / "two.txt")
    assert len(two) == 2 and two[0] == two[1] == one[0]  # every rank returns rank 0's summaries
    done = [line.split() for line in (tmp_path / "two.txt").read_text().splitlines()]
    assert sorted(n for n, _ in done) == ["a", "e0", "e1", "e2", "e3", "report"]  # each step once
    assert {r for n, r in done if n in ("a", "report")} == {"0"}
    assert {r for n, r in done if n.startswith("e")} == {"0", "1"}  # by estimate: e3+e0 on 0, e2+e1 on 1
    for name in ("a", "e0", "e1", "e2", "e3", "report"):
        assert (tmp_path / "one" / name / "STEP.json").read_text().split('"seconds"')[0] == \
            (tmp_path / "two" / name / "STEP.json").read_text().split('"seconds"')[0]
    assert launch(2, tmp_path / "two", tmp_path / "again.txt") == two  # all cached (no step noted a call)
    assert not (tmp_path / "again.txt").exists()


def test_the_stamp_is_recorded_in_each_marker_and_is_no_part_of_the_identity(tmp_path):
    """What made a step (the suite's provenance) is written into its marker; new code (another stamp) leaves a
    finished step cached, with the stamp of the run that made it, and gather says the folder mixes two."""
    from twinlm.suite.provenance import gather
    from twinlm.suite.steps import read_marker

    calls = []
    Pipeline(tmp_path, make_steps(calls), log=lambda _: None, stamp=lambda: {"commit": "aaa", "dirty": False}).run()
    assert read_marker(tmp_path / "c")["provenance"] == {"commit": "aaa", "dirty": False}
    Pipeline(tmp_path, make_steps(calls, settings_b=2), log=lambda _: None,
             stamp=lambda: {"commit": "bbb", "dirty": False}).run()
    assert calls == ["a", "b", "c", "d", "b", "c"]  # a and d stay cached under the new stamp
    markers = {step: read_marker(tmp_path / step) for step in "abcd"}
    assert markers["a"]["provenance"]["commit"] == "aaa" and markers["b"]["provenance"]["commit"] == "bbb"
    made = gather(markers)
    assert [(r["provenance"]["commit"], r["steps"]) for r in made["runs"]] == [("aaa", ["a", "d"]), ("bbb", ["b", "c"])]
    assert not made["single"]
    assert gather({"a": markers["a"], "d": markers["d"]})["single"]
