"""Stopping in time: the `stop_after` deadline (a stop like SIGTERM's, exact resume, counted per process),
checkpoints by time (`checkpoint.every_minutes`, decided on rank 0's clock and agreed through the step), and
each save's duration against the scheduler's grace (`checkpoint.grace_s`).

Clocks are fakes (`Trainer.now`, the trainer's `time.perf_counter`): nothing here depends on real timings."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from twinlm.errors import ConfigError
from twinlm.train import run
from twinlm.train import trainer as trainer_module
from twinlm.train.checkpoint import CheckpointManager, periodic_ordinal
from twinlm.train.recipe import load_recipe, parse_duration
from twinlm.train.rundir import without_run_knobs
from twinlm.train.testing import make_shards, tiny_recipe
from twinlm.train.trainer import Trainer


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards") / "tiny", n_docs=200)


def recipe_for(shards, **kw):
    return tiny_recipe(shards, phases=2, tokens=kw.pop("tokens", 900), dropout=0.1, **kw)


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """An uninterrupted run of `recipe_for(shards)`."""
    out = tmp_path_factory.mktemp("ref") / "run"
    run(recipe_for(shards), out, log=_quiet)
    return out


def _quiet(_msg):
    pass


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out):
    return [(r["step"], r["loss"], r["lr"], r["tokens"]) for r in rows(out)]


def weights(out):
    return load_file(str(out / "final" / "model.safetensors"))


def checkpoint_steps(out):
    return sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*") if (p / "COMPLETE").exists())


def same_run(out, ref):
    assert losses(out) == losses(ref)  # bit-identical losses, LRs and token counts, each step once
    a, b = weights(out), weights(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def step_clock(monkeypatch, seconds_per_step=1.0):
    """The trainer's clock reads `seconds_per_step` per step this process finished: deterministic deadlines and
    intervals (a resumed process starts at 0 again, as a real clock would start where the job starts)."""
    finish = Trainer._finish

    def counted(self, *args, **kwargs):
        if self._queued is not None:
            self._ticks = getattr(self, "_ticks", 0) + 1
        return finish(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_finish", counted)
    monkeypatch.setattr(Trainer, "now", lambda self: getattr(self, "_ticks", 0) * seconds_per_step)


# --- durations --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, seconds", [("20s", 20), ("90m", 5400), ("11h30m", 41400), ("1d12h", 129600),
                                            ("1.5h", 5400), (3600, 3600), ("3600", 3600), (0.5, 0.5)])
def test_durations_read_as_seconds(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["90 minutes", "", "h", "30m1h", "1h-5m", 0, -3, "nan", True])
def test_a_bad_duration_is_a_one_line_error_naming_the_forms(value):
    with pytest.raises(ConfigError) as e:
        parse_duration(value)
    assert "\n" not in str(e.value) and "stop_after" in str(e.value) and "11h30m" in str(e.value)


def test_the_recipe_refuses_a_bad_deadline_or_interval_when_read(shards):
    with pytest.raises(ConfigError, match=r"^stop_after: cannot read '90 minutes'[^\n]*20s, 90m, 11h30m"):
        load_recipe(recipe_for(shards), ["stop_after=90 minutes"])
    with pytest.raises(ConfigError, match=r"^checkpoint\.every_minutes must be a number >= 0[^\n]*$"):
        load_recipe(recipe_for(shards), ["checkpoint.every_minutes=-1"])
    assert load_recipe(recipe_for(shards), ["stop_after=11h30m"]).stop_after == "11h30m"


def test_deadline_and_time_settings_are_run_knobs(shards):
    base = load_recipe(recipe_for(shards))
    other = load_recipe(recipe_for(shards), ["stop_after=2h", "checkpoint.every_minutes=20", "checkpoint.grace_s=90"])
    assert without_run_knobs(other.to_yaml()) == without_run_knobs(base.to_yaml())
    assert without_run_knobs(load_recipe(recipe_for(shards), ["checkpoint.keep_last=5"]).to_yaml()) != \
        without_run_knobs(base.to_yaml())


# --- the deadline -----------------------------------------------------------------------------------------
def test_deadline_stops_with_a_checkpoint_per_process_and_resumes_exactly(shards, reference, tmp_path, monkeypatch):
    step_clock(monkeypatch)  # one "second" per step
    recipe, out = recipe_for(shards), tmp_path / "run"
    logs: list[str] = []
    res = run(recipe, out, ["stop_after=3s"], log=logs.append)
    # one rank: the step that finds the deadline passed is checkpointed, and the run returns
    assert res == out / "checkpoints" / "step-00000003" and (res / "COMPLETE").exists()
    assert [r["step"] for r in rows(out)] == [1, 2, 3] and not (out / "final").exists()
    assert any("stopped by the deadline (stop_after=3s) at step 3" in m and "the same command resumes" in m
               for m in logs), logs
    stopped = json.loads((out / "stopped.json").read_text())  # what a job script requeues on
    assert stopped["step"] == 3 and stopped["max_steps"] is False and "deadline" in stopped["reason"]
    # a requeued job: the deadline counts from this process's start, so it trains 3 more steps
    logs.clear()
    res = run(recipe, out, ["stop_after=3s"], log=logs.append)
    assert res == out / "checkpoints" / "step-00000006" and [r["step"] for r in rows(out)] == list(range(1, 7))
    logs.clear()
    run(recipe, out, log=logs.append)  # no deadline: to the end
    assert not any("differs from this recipe" in m for m in logs)  # stop_after is a run knob
    assert not (out / "stopped.json").exists()
    same_run(out, reference)


def test_the_command_exits_75_on_a_stop_to_resume_and_0_when_finished_or_at_max_steps(shards, tmp_path,
                                                                                       monkeypatch, capsys):
    """75 (EX_TEMPFAIL) tells a scheduler "stopped, run me again" from 0, "done": after the deadline (through
    `python -m twinlm`, the status a job script sees); 0 once the same command has run to final/, again for the
    finished run, after the recipe's own max_steps, and from a worker of torchrun's agent (for which any other
    status is a crash to restart), whose run folder's stopped.json tells the stop."""
    from twinlm.cli import main

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(shards, phases=1, tokens=600)))  # a few steps
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("TORCHELASTIC_RUN_ID", None)
    # a deadline that passes before the first step is done: the run still trains (and checkpoints) one step
    p = subprocess.run([sys.executable, "-m", "twinlm", "train", str(path), "--out", str(out), "stop_after=0.001s"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 75, p.stderr[-3000:]
    assert "stopped by the deadline (stop_after=0.001s); checkpoint" in p.stderr
    assert "run the same command again to resume" in p.stderr
    assert checkpoint_steps(out) == [1] and (out / "stopped.json").exists()

    assert main(["train", str(path), "--out", str(out)]) == 0  # the same command, no deadline: to the end
    assert capsys.readouterr().out.strip() == str(out / "final") and not (out / "stopped.json").exists()
    assert main(["train", str(path), "--out", str(out)]) == 0  # already finished

    assert main(["train", str(path), "--out", str(tmp_path / "capped"), "max_steps=1"]) == 0
    assert capsys.readouterr().err.strip().endswith("; raise or drop max_steps to train on from it")
    assert json.loads((tmp_path / "capped" / "stopped.json").read_text())["max_steps"] is True

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")  # what torchrun's agent sets for its workers
    assert main(["train", str(path), "--out", str(tmp_path / "worker"), "stop_after=0.001s"]) == 0
    stopped = json.loads((tmp_path / "worker" / "stopped.json").read_text())
    assert stopped["max_steps"] is False and "deadline" in stopped["reason"]


# --- checkpoints by time ------------------------------------------------------------------------------------
def test_checkpoints_by_time_land_two_steps_after_rank_0_asks_and_change_nothing(shards, reference, tmp_path,
                                                                                   monkeypatch):
    step_clock(monkeypatch, 60.0)  # one minute per step
    out = tmp_path / "run"
    run(recipe_for(shards, every_tokens=0), out, ["checkpoint.every_minutes=1", "checkpoint.keep_last=100"],
        log=_quiet)
    same_run(out, reference)
    n_first = sum(r["phase"] == "pretrain" for r in rows(out))
    n = len(rows(out))
    # asked in step 1's row (a minute after the start), saved at step 3 (sent with the step queued next); then a
    # minute after each checkpoint; a phase's end is checkpointed anyway (and restarts the interval)
    expected = _expected_timed(n_first, n)
    assert expected[0] == 3 and len(set(expected) - {n_first, n}) >= 2
    assert checkpoint_steps(out) == expected


def _expected_timed(n_first, n):
    """The checkpoint steps of the rule: rank 0 asks in the row of step k once a minute (a step) passed since
    the last checkpoint, the checkpoint is of step k+2 (unless a phase ends at k+1 or k+2); phase ends too."""
    saved, last, pending = [], 0, None
    for step in range(1, n + 1):
        if pending == step:
            pending = None
            if step not in (n_first, n):
                saved.append(step)
                last = step
        elif pending is None and step - last >= 1:
            pending = step + 2
        if step in (n_first, n):
            saved.append(step)
            last, pending = step, None
    return saved


def test_a_checkpoint_by_time_or_on_a_stop_is_never_kept_as_a_periodic_one(tmp_path):
    def state(step, ordinal, periodic_step):
        return {"trainer": {"step": step}, "keep": False,
                "callbacks": {"periodic_checkpoint": {"ordinal": ordinal, "step": periodic_step}}}

    assert periodic_ordinal(state(10, 2, 10)) == 2
    assert periodic_ordinal(state(12, 2, 10)) is None  # written later: carries the count, is not the periodic one
    assert periodic_ordinal({"trainer": {"step": 12}, "callbacks": {"periodic_checkpoint": {"ordinal": 2}}}) == 2

    def write(folder):
        (folder / "x").write_text("x")

    m = CheckpointManager(tmp_path, keep_last=1, keep_every=2, log=_quiet)
    for step, ordinal, periodic_step in [(5, 1, 5), (8, 1, 5), (10, 2, 10), (12, 2, 10), (14, 2, 10)]:
        m.save(step, write, state(step, ordinal, periodic_step))
    assert [p.name for p in m.complete()] == ["step-00000010", "step-00000014"]  # 12 (by time) went


# --- each save's duration -----------------------------------------------------------------------------------
class _SlowClock:
    """The trainer module's `time`: perf_counter moves 41.2 s per read (a save measures 41.2 s)."""

    monotonic = staticmethod(time.monotonic)

    def __init__(self):
        self.t = 0.0

    def perf_counter(self):
        self.t += 41.2
        return self.t


def test_a_save_longer_than_the_grace_is_warned_about_and_recorded(shards, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "time", _SlowClock())
    out, logs = tmp_path / "run", []
    recipe = recipe_for(shards, every_tokens=300)
    run(recipe, out, ["max_steps=5", "checkpoint.keep_last=100"], log=logs.append)  # grace_s: 30 by default
    first = checkpoint_steps(out)
    assert len(first) >= 2
    assert [m for m in logs if m.startswith("warning: saving")] == [
        f"warning: saving step-{s:08d} took 41.2 s, longer than the 30 s a scheduler gives between SIGTERM and "
        "SIGKILL (checkpoint.grace_s): a checkpoint on SIGTERM would be cut off; checkpoint more often by time "
        "(checkpoint.every_minutes) or stop before the limit (stop_after)" for s in first]
    logs.clear()
    run(recipe, out, ["max_steps=10", "checkpoint.keep_last=100", "checkpoint.grace_s=60"], log=logs.append)
    later = [s for s in checkpoint_steps(out) if s > 5]
    assert later and not any(m.startswith("warning") for m in logs)
    assert [m for m in logs if " saved in " in m] == [f"checkpoint step-{s:08d} saved in 41.2 s" for s in later]
    # recorded in the row after each save (the save falls in that step's period); the last save ends a run
    saved = sorted(set(first + later))
    recorded = [r["step"] - 1 for r in rows(out) if r["save_s"] == pytest.approx(41.2)]
    assert recorded == [s for s in saved if s not in (5, 10)]
    assert all(r["save_s"] == 0 for r in rows(out) if r["step"] - 1 not in recorded)


# --- two ranks ----------------------------------------------------------------------------------------------
_TWO_RANKS = textwrap.dedent('''
    import json, sys
    from twinlm.train import dist
    from twinlm.train.recipe import load_recipe
    from twinlm.train.trainer import Trainer

    recipe, ref, out = sys.argv[1:]

    class RankClock(Trainer):
        def now(self):  # rank 1's clock: a second per finished step; rank 0's stands still
            return float(self.state.step) if self.env.rank == 1 else 0.0

    env = dist.init()
    quiet = lambda m: None
    Trainer(load_recipe(recipe), ref, env=env, log=quiet).fit()
    t = RankClock(load_recipe(recipe, ["stop_after=3s"]), out, env=env, log=quiet)
    t.fit()
    print(json.dumps({"rank": env.rank, "interrupted": t.interrupted, "step": t.state.step, "why": t.stop_reason,
                      "checkpoint": t.last_checkpoint.name if t.last_checkpoint else None}))
    sys.stdout.flush()
    Trainer(load_recipe(recipe), out, env=env, log=quiet).fit()
    dist.shutdown()
''')


@pytest.mark.distributed
def test_two_ranks_stop_together_when_one_rank_passes_the_deadline(shards, tmp_path):
    """Rank 1's deadline passes when its step 3 is finished; rank 0's never does: the flag travels with the next
    step queued (5), both ranks checkpoint it and stop, and the resumed run equals the uninterrupted one."""
    recipe = recipe_for(shards, objective="clm", batch_size=6, micro_batch_tokens=128)
    path, script = tmp_path / "recipe.yaml", tmp_path / "two_ranks.py"
    path.write_text(yaml.safe_dump(recipe))
    script.write_text(_TWO_RANKS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                        str(script), str(path), str(tmp_path / "ref"), str(tmp_path / "run")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    stops = sorted((json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")),
                   key=lambda d: d["rank"])
    assert [(s["rank"], s["interrupted"], s["step"]) for s in stops] == [(0, True, 5), (1, True, 5)]
    assert stops[0]["why"] == "another rank's SIGTERM or deadline (stop_after)"
    assert stops[1]["why"] == "the deadline (stop_after=3s)"
    assert stops[0]["checkpoint"] == "step-00000005"  # written by rank 0, saved by both (a collective)
    same_run(tmp_path / "run", tmp_path / "ref")
