"""bench/gpu_check.py --cpu: every section of the device check runs here in a tiny version and writes JSON,
so the script that will meet a GPU has already run end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _check(tmp_path, *sections):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu", *sections,
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=1800)
    rows = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    return r, rows


def test_sections_run_and_find_no_problem_on_cpu(tmp_path):
    r, rows = _check(tmp_path, "env", "syncs", "evaltracks")
    assert r.returncode == 0, r.stderr[-2000:]
    by = {row["section"]: row for row in rows}
    assert set(by) == {"env", "syncs", "evaltracks"} and not any("error" in row or "timeout" in row for row in rows)
    assert by["env"]["auto_backend_bf16"] == "sdpa"  # no CUDA here
    assert by["syncs"]["host_reads"] == 0
    tracks = [row for row in rows if row["section"] == "evaltracks"]  # the CPU against itself: exactly equal
    assert [t["model"] for t in tracks] == ["encoder", "decoder"]
    assert all(t["ok"] and t["bpb_rel_diff"] == 0 and t["loglik_max_rel_diff"] == 0 for t in tracks)


def test_each_timed_step_gets_the_roofline_prediction_for_its_card(monkeypatch):
    """The committed predictions (bench/roofline_predictions.json) are found for the cards and configurations
    gpu_check times, and for nothing else."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for card, planned_1b in (("NVIDIA H200", 32768), ("NVIDIA H100 80GB HBM3", 16384)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, card=card: card)
        eager = gpu_check.predicted("ettin-150m", "mlm", 32768, False)
        compiled = gpu_check.predicted("ettin-150m", "mlm", 32768, True)
        assert compiled["predicted_tok_s"] > eager["predicted_tok_s"] > 0
        assert gpu_check.predicted("ettin-17m", "mlm", 65536, True)["predicted_tok_s"] > 0
        # 1B at the micro-batch the memory plan fits on the card (the `targets` section), with its executed MFU
        assert 0 < gpu_check.predicted("ettin-1b", "mlm", planned_1b, True)["predicted_mfu_executed"] < 1
        assert gpu_check.predicted("ettin-150m", "mlm", 4096, True) == {}  # not predicted
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-80GB")
    assert gpu_check.predicted("ettin-150m", "mlm", 32768, True) == {}


@pytest.mark.devicecheck  # ~150 s: selected only (`pytest -m devicecheck`), run before a device run
def test_every_section_runs_on_cpu(tmp_path):
    r, rows = _check(tmp_path)
    errors = [row for row in rows if "error" in row or "timeout" in row]
    assert not errors and r.returncode == 0, (errors, r.stderr[-2000:])
    by = {row["section"]: row for row in rows}
    assert by["attn"]["all_ok"]
    assert by["compile"]["new_graphs_after_first_layout"] == 0
    assert by["graphs"]["blocks_tok_s"] > 0 and by["graphs"]["static_tok_s"] > 0
    assert {row["section"] for row in rows} >= {"env", "pytest", "attn", "model", "evaltracks", "syncs", "step",
                                               "memory", "bench", "profile", "compile", "train", "targets",
                                               "graphs"}
