"""Two torchrun agents as two nodes (tests/agents.py): an unshared run folder is refused before step 1, a hung or
dead rank ends the run in one line per rank within the configured timeout, a killed worker is restarted by
torchrun and the run resumes bit for bit, the topology is recorded, and torchrun restarts across nodes without
the variable they need are warned about. The slowest are selected only: `pytest -m multinode`."""

import json
import os
import re
import signal

import pytest
import yaml
from safetensors.torch import load_file

from agents import RESTART_VARIABLE, finish, kill_tree, rows, start_agents, wait_for, worker_pids
from test_train_distributed import setup as two_rank_recipe
from twinlm.train.testing import make_shards, tiny_recipe

pytestmark = pytest.mark.distributed


@pytest.fixture
def recipe(tmp_path):
    shards = make_shards(tmp_path / "shards", n_docs=200)
    r = tiny_recipe(shards, objective="clm", phases=2, tokens=900, batch_size=6, micro_batch_tokens=128,
                    every_tokens=300)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("twinlm: error:")]


def no_twinlm_traceback(output: str) -> bool:
    """No Python frame of twinlm's in the output (torchrun's own report of a failed worker is allowed)."""
    return not re.search(r'File ".*/twinlm/', output)


def test_a_run_folder_not_shared_is_refused_before_step_1(tmp_path, recipe):
    """Each agent in its own working directory with a relative --out, as on nodes with their own disks: every
    rank stops with one line naming the rank that does not see the folder and its host; no step is trained."""
    cwds = [tmp_path / "node0", tmp_path / "node1"]
    for c in cwds:
        c.mkdir()
    results = finish(start_agents(recipe, "run", cwds=cwds, TWINLM_SHARED_WAIT="2"), timeout=300)
    for code, output in results:
        assert code != 0, output
        lines = errors(output)
        assert len(lines) == 1, output
        assert "is not visible on rank 1 (host " in lines[0] and "filesystem every node shares" in lines[0]
        assert no_twinlm_traceback(output), output
    assert not (cwds[0] / "run" / "metrics.jsonl").exists() and not (cwds[0] / "run" / "checkpoints").exists()
    assert not (cwds[1] / "run").exists()


@pytest.mark.multinode
def test_two_nodes_record_their_topology_and_warn_about_restarts(tmp_path, recipe):
    """The run folder's starts.jsonl names both nodes and the restart count; torchrun restarts across nodes
    without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 are warned about (a restart would hang)."""
    out = tmp_path / "run"
    results = finish(start_agents(recipe, out, max_restarts=1, **{RESTART_VARIABLE: None}), timeout=300)
    assert [code for code, _ in results] == [0, 0], results
    warned = [o for _, o in results if f"need {RESTART_VARIABLE}=1 in every agent's environment" in o]
    assert len(warned) == 1  # rank 0's
    start = json.loads((out / "starts.jsonl").read_text().splitlines()[-1])
    topo = start["topology"]
    assert topo["nodes"] == 2 and topo["world_size"] == 2 and topo["max_restarts"] == 1 and topo["restart"] == 0
    assert sorted(r["node"] for r in topo["ranks"]) == [0, 1] and all(r["host"] for r in topo["ranks"])
    assert json.loads((out / "env.json").read_text())["topology"] == topo
    assert rows(out)[-1]["step"] > 1


@pytest.mark.multinode
def test_a_hung_rank_ends_the_run_within_the_timeout_in_one_line(tmp_path, recipe):
    """Node 1's worker is stopped (SIGSTOP) mid-run: rank 0 gives up after TWINLM_DIST_TIMEOUT seconds with one
    line naming itself, its host, the step and what it waited in, and the last checkpoint (not after 30
    minutes with a gloo traceback)."""
    out = tmp_path / "run"
    agents = start_agents(recipe, out, TWINLM_DIST_TIMEOUT="4")
    wait_for(lambda: (out / "checkpoints").exists() and any((out / "checkpoints").glob("step-*"))
             and (out / "metrics.jsonl").exists() and len(rows(out)) >= 5, agents, what="a checkpoint")
    stopped = worker_pids(agents[1])
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        code, output = finish(agents[:1], timeout=120)[0]
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGKILL)
        finish(agents[1:], timeout=120)
    assert code != 0, output
    lines = errors(output)
    assert len(lines) == 1, output
    assert re.search(r"rank 0 \(host .+\) waited 4 s for the other ranks \(step \d+: ", lines[0]), lines[0]
    assert "another rank hung" in lines[0] and "last checkpoint " in lines[0] and "step-0000" in lines[0]
    assert no_twinlm_traceback(output), output


def test_a_dead_rank_ends_the_run_in_one_line(tmp_path, recipe):
    """Node 1's worker is killed (no restarts): rank 0 says it lost its connection, at which step, and where to
    resume from."""
    out = tmp_path / "run"
    agents = start_agents(recipe, out)
    wait_for(lambda: (out / "metrics.jsonl").exists() and len(rows(out)) >= 3, agents, what="step 3")
    for pid in worker_pids(agents[1]):
        os.kill(pid, signal.SIGKILL)
    (code, output), (code1, _) = finish(agents, timeout=180)
    assert code != 0 and code1 != 0, output
    lines = errors(output)
    assert len(lines) == 1, output
    assert re.search(r"rank 0 \(host .+\) lost its connection to another rank \(", lines[0]), lines[0]
    assert "run the same command again to resume" in lines[0]
    assert no_twinlm_traceback(output), output
    topo = json.loads((out / "starts.jsonl").read_text())["topology"]  # the one start, both nodes in it
    assert topo["nodes"] == 2 and sorted(r["node"] for r in topo["ranks"]) == [0, 1] and topo["restart"] == 0


def run_two_nodes(recipe, out, **kw):
    procs = start_agents(recipe, out, **kw)
    try:
        return finish(procs, timeout=600)
    finally:
        for p in procs:
            kill_tree(p)


@pytest.mark.multinode
def test_killed_worker_restarts_on_two_nodes_and_resumes_bit_for_bit(tmp_path):
    """`--max-restarts 2` with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in both agents' environment: kill -9 of node
    1's worker after a periodic checkpoint → torchrun restarts the workers of both nodes, the trainer resumes from
    the checkpoint, both agents exit 0, and the losses and final weights equal those of an uninterrupted two-node run
    bit for bit. Without the variable (pytorch/pytorch#135712) three tries here gave one hang (no step in 150 s)
    and two recoveries only at the second restart, after the first died with `Gloo connectFullMesh failed …
    Connection refused` to the killed worker's old port: not robust enough for a test, so none."""
    recipe = two_rank_recipe(tmp_path)
    fix = {RESTART_VARIABLE: "1"}
    ref = run_two_nodes(recipe, tmp_path / "ref", **fix)
    assert [code for code, _ in ref] == [0, 0], ref

    out = tmp_path / "run"
    procs = start_agents(recipe, out, max_restarts=2, **fix)
    try:
        wait_for(lambda: any(out.glob("checkpoints/step-*/COMPLETE")), procs, what="a periodic checkpoint")
        [worker] = worker_pids(procs[1])
        os.kill(worker, signal.SIGKILL)
        results = finish(procs, timeout=600)
    finally:
        for p in procs:
            kill_tree(p)
    assert [code for code, _ in results] == [0, 0], results
    assert "exitcode: -9" in results[1][1]  # node 1's agent saw its worker killed, and restarted it
    assert "resuming from" in results[0][1]  # rank 0 (node 0) resumed from the checkpoint

    a, b = rows(tmp_path / "ref"), rows(out)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    wa = load_file(tmp_path / "ref" / "final" / "model.safetensors")
    wb = load_file(out / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].dtype == wb[k].dtype and wa[k].equal(wb[k]), k


@pytest.mark.multinode
def test_two_nodes_stop_at_a_deadline_and_resume_bit_for_bit(tmp_path, recipe):
    """`stop_after` passed when the first step is finished (a deadline of a millisecond): both nodes checkpoint
    the same step and exit 0, twice; the run then resumes to the end with the losses and final weights of an
    uninterrupted two-node run, bit for bit. (Several ranks stop a step or two after the one that found the
    deadline passed: the next step may be queued already, and the flag travels with the one after it.)"""
    ref = tmp_path / "ref"
    assert [code for code, _ in finish(start_agents(recipe, ref))] == [0, 0]
    out = tmp_path / "run"
    done = 0
    for _ in range(2):
        results = finish(start_agents(recipe, out, "stop_after=0.001s"))
        assert [code for code, _ in results] == [0, 0], results
        assert "stopped by the deadline (stop_after=0.001s)" in results[0][1]
        steps = [r["step"] for r in rows(out)]
        assert steps == list(range(1, len(steps) + 1)) and done < len(steps) <= done + 3, (done, steps)
        assert (out / "checkpoints" / f"step-{len(steps):08d}" / "COMPLETE").exists() and not (out / "final").exists()
        done = len(steps)
    assert [code for code, _ in finish(start_agents(recipe, out))] == [0, 0]
    assert [(r["step"], r["loss"]) for r in rows(out)] == [(r["step"], r["loss"]) for r in rows(ref)]
    wa, wb = load_file(ref / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)


# --- the pieces, without processes --------------------------------------------------------------------------
GLOO = "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/"


@pytest.mark.parametrize("error, kind", [
    (RuntimeError(GLOO + "unbound_buffer.cc:78] Timed out waiting 1800000ms for recv operation to complete"), "hung"),
    (RuntimeError(GLOO + "pair.cc:553] Connection closed by peer [127.0.0.1]:45264"), "died"),
    (RuntimeError("Gloo connectFullMesh failed with " + GLOO + "pair.cc:152] timed out connecting: SO_ERROR: "
                  "Connection refused, remote=[127.0.0.1]:21407"), "died"),
    (RuntimeError("shape mismatch: timed out is not a backend word here"), None),
    (ValueError(GLOO + "Timed out"), None),
])
def test_peer_failures_are_told_from_other_errors(error, kind):
    from twinlm.train.dist import peer_failure

    assert peer_failure(error) == kind


def test_a_folder_another_rank_does_not_see_is_named_with_the_rank_and_host(monkeypatch, tmp_path):
    """check_visible on the gathered views of two ranks (the collective faked): the checkpoint rank 0 sees and
    rank 1 does not is a NotShared error naming both hosts; paths rank 0 does not see are left alone."""
    from twinlm.errors import NotShared
    from twinlm.train import dist, shared

    ck, missing = tmp_path / "step-00000012", tmp_path / "nowhere"
    ck.mkdir()
    views = [{"rank": 0, "host": "node-a", "cwd": "/a", "seen": [True, False]},
             {"rank": 1, "host": "node-b", "cwd": "/b", "seen": [False, False]}]
    monkeypatch.setattr(dist, "all_gather_object", lambda obj: views)
    with pytest.raises(NotShared, match=r"step-00000012 \(the checkpoint to resume from\) is not visible on rank 1 "
                                        r"\(host node-b\) but is on rank 0 \(host node-a\): put the run folder"):
        shared.check_visible([ck, missing], dist.DistEnv(rank=1, world_size=2), "the checkpoint to resume from")
    views[1]["seen"] = [True, False]
    shared.check_visible([ck, missing], dist.DistEnv(rank=1, world_size=2), "the checkpoint to resume from")


def test_timeouts_come_from_the_environment_or_the_recipe(monkeypatch):
    from twinlm.errors import ConfigError
    from twinlm.train.dist import TIMEOUT_VARIABLE, timeout_from_env

    monkeypatch.delenv(TIMEOUT_VARIABLE, raising=False)
    assert timeout_from_env(TIMEOUT_VARIABLE, 600) == 600.0
    monkeypatch.setenv(TIMEOUT_VARIABLE, "42.5")
    assert timeout_from_env(TIMEOUT_VARIABLE, 600) == 42.5
    for bad in ("ten", "0", "-3"):
        monkeypatch.setenv(TIMEOUT_VARIABLE, bad)
        with pytest.raises(ConfigError, match=f"{TIMEOUT_VARIABLE}=.*positive number of seconds"):
            timeout_from_env(TIMEOUT_VARIABLE, 600)


def test_the_restart_warning_only_for_restarts_across_nodes_without_the_variable(monkeypatch):
    from twinlm.train.dist import restart_warning

    monkeypatch.delenv(RESTART_VARIABLE, raising=False)
    assert restart_warning({"max_restarts": 2, "nodes": 2}) is not None
    assert restart_warning({"max_restarts": 0, "nodes": 2}) is None
    assert restart_warning({"max_restarts": 2, "nodes": 1}) is None
    monkeypatch.setenv(RESTART_VARIABLE, "1")
    assert restart_warning({"max_restarts": 2, "nodes": 2}) is None
