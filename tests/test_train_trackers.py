"""Experiment tracking (issue 25, item 7): TensorBoard shows each step once after a kill and resume (the event
files read back with TensorBoard's own EventAccumulator), a recipe's `tracker: wandb` writes an offline W&B run
under RUN/wandb and resumes the same W&B run id, and a chosen tracker that is not installed says so in one
line naming its `pip install`. The tracker tests skip when their package is not installed."""

import shutil
import sys

import pytest

from twinlm.errors import ConfigError
from twinlm.train import run
from twinlm.train.recipe import Recipe
from twinlm.train.testing import make_shards, tiny_recipe


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards") / "tiny", n_docs=200)


def recipe(shards, **extra):
    # one phase of ~16 steps; a checkpoint every few steps
    return tiny_recipe(shards, phases=1, tokens=8000, every_tokens=150, **extra)


def checkpoints(out):
    return sorted(p for p in (out / "checkpoints").glob("step-*") if p.is_dir())


def test_tensorboard_shows_each_step_once_after_a_kill_and_resume(shards, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    r = recipe(shards, tensorboard=True)  # tiny_recipe turns it off; the default tracker is tensorboard
    run(r, out, ["max_steps=4"], log=lambda _: None)
    # a kill after step 4's events were written but before its checkpoint: resume from an earlier one
    shutil.rmtree(checkpoints(out)[-1])
    back = int(checkpoints(out)[-1].name.split("-")[1])
    assert back < 4
    logs: list[str] = []
    run(r, out, ["max_steps=5"], log=logs.append)
    assert any(f"step-{back:08d}" in line for line in logs if "resuming" in line), logs
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    for tag in ("train/loss", "train/lr"):
        assert [e.step for e in acc.Scalars(tag)] == list(range(1, 6)), tag


@pytest.mark.parametrize("tracker,module,package", [("tensorboard", "torch.utils.tensorboard", "tensorboard"),
                                                    ("wandb", "wandb", "wandb")])
def test_a_missing_tracker_says_so_once(shards, tmp_path, monkeypatch, tracker, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # `import` raises ImportError, as when it is not installed
    logs: list[str] = []
    run(recipe(shards, tracker=tracker, tensorboard=True), tmp_path / "run", ["max_steps=2"], log=logs.append)
    said = [line for line in logs if f"pip install {package}" in line]
    assert len(said) == 1 and f"tracker {tracker}" in said[0], logs


def test_tracker_choice_is_checked_and_none_tracks_nothing(shards, tmp_path):
    with pytest.raises(ConfigError, match="tracker: 'mlflow' is not one of tensorboard, wandb, none"):
        Recipe(**{**recipe(shards), "tracker": "mlflow"})  # type: ignore[arg-type]
    out = tmp_path / "run"
    logs: list[str] = []
    run(recipe(shards, tracker="none", tensorboard=True), out, ["max_steps=1"], log=logs.append)
    assert not (out / "tensorboard").exists() and not (out / "wandb").exists()
    assert not any("pip install" in line for line in logs)


def test_wandb_offline_run_and_resume_keep_one_run_id(shards, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb)")
    for var in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    calls: list[dict] = []
    real_init = wandb.init

    def init(**kwargs):
        calls.append(kwargs)
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", init)
    out = tmp_path / "run"
    r = recipe(shards, tracker="wandb")
    run(r, out, ["max_steps=2"], log=lambda _: None)
    run(r, out, ["max_steps=3"], log=lambda _: None)
    assert len(calls) == 2
    run_id = (out / "wandb" / "twinlm-run-id").read_text().strip()
    for kw in calls:
        assert (kw["id"], kw["resume"], kw["dir"]) == (run_id, "allow", str(out))
    assert calls[0]["config"]["tracker"] == "wandb"
    import os
    assert os.environ["WANDB_MODE"] == "offline"
    offline = sorted((out / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(run_id) for p in offline)
    assert all(list(p.glob("*.wandb")) for p in offline)
