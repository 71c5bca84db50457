"""Exact resume: a run stopped by SIGTERM and then killed outright (SIGKILL), started again each time, logs
the same per-step losses as an uninterrupted run (fp32 on CPU: bit-identical), dropout included."""

import json
import os
import signal
import subprocess
import sys
import time

import yaml

from twinlm.train.testing import make_shards, tiny_recipe


def env():
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return e


def start(recipe_path, out):
    return subprocess.Popen([sys.executable, "-m", "twinlm", "train", str(recipe_path), "--out", str(out)],
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_rows(proc, metrics, n, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early:\n{proc.stdout.read()}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the run")


def losses(out):
    return [(r["step"], r["loss"], r["lr"], r["tokens"]) for r in
            map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def test_resume_after_sigterm_and_sigkill_is_exact(tmp_path):
    shards = make_shards(tmp_path / "shards", n_docs=200)
    recipe = tiny_recipe(shards, objective="mlm", phases=2, tokens=1600, dropout=0.1, every_tokens=400)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))

    ref = tmp_path / "ref"
    p = start(path, ref)
    assert p.wait(timeout=600) == 0, p.stdout.read()

    out = tmp_path / "run"
    metrics = out / "metrics.jsonl"
    # 1) SIGTERM: finishes the step, checkpoints, exits 75 (stopped before the end: run again to resume)
    p = start(path, out)
    wait_for_rows(p, metrics, 4)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 75
    log = p.stdout.read()
    assert "SIGTERM" in log
    stopped_at = len(metrics.read_text().splitlines())
    ck = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert int(ck.name.split("-")[1]) == stopped_at and (ck / "COMPLETE").exists()
    # 2) SIGKILL a few steps later, well into the next stretch (possibly mid-checkpoint)
    p = start(path, out)
    wait_for_rows(p, metrics, stopped_at + 9)
    p.kill()
    p.wait(timeout=60)
    # 3) run to the end
    p = start(path, out)
    assert p.wait(timeout=600) == 0, p.stdout.read()
    a, b = losses(ref), losses(out)
    assert len(a) == len(b) > stopped_at + 9
    assert a == b  # bit-identical losses, LRs and token counts
    assert (out / "final" / "config.json").exists()
