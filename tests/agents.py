"""Two torchrun agents on this machine acting as two nodes (c10d rendezvous over 127.0.0.1), for the multi-node
tests: each agent is its own process tree, started in its own working directory, as on two hosts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from twinlm.train.dist import RESTART_VARIABLE  # noqa: F401 - the tests set it through here


def env(**extra: str | None) -> dict[str, str]:
    """The agents' environment: this one, one thread each, offline, with `extra` (None: unset)."""
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for k, v in extra.items():
        if v is None:
            e.pop(k, None)
        else:
            e[k] = v
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_command(nnodes: int, port: int, rdzv_id: str, max_restarts: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc_per_node", "1",
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", rdzv_id,
            "--max-restarts", str(max_restarts), "--monitor-interval", "0.5", *args]


def start_agents(recipe: Path, out: str | Path, *overrides: str, cwds: list[Path] | None = None,
                 max_restarts: int = 0, nnodes: int = 2, **extra_env: str | None) -> list[subprocess.Popen]:
    """`nnodes` agents training `recipe` into `out` (relative to each agent's `cwds` entry, where given: folders
    that are not shared), one worker each; their output is merged into a pipe per agent."""
    port, rdzv = free_port(), uuid.uuid4().hex[:8]
    procs = []
    for node in range(nnodes):
        cwd = cwds[node] if cwds else None
        cmd = agent_command(nnodes, port, rdzv, max_restarts, "-m", "twinlm", "train", str(recipe), "--out",
                            str(out), *overrides)
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env(**extra_env), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 600) -> list[tuple[int, str]]:
    """Each agent's exit code and output, once all have ended (all are killed past `timeout`)."""
    t0 = time.time()
    results = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, timeout - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            for q in procs:
                kill_tree(q)
            out, _ = p.communicate()
            out += "\n[killed by the test: timed out]"
        results.append((p.returncode, out))
    return results


def descendants(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [d for c in map(int, found) for d in (c, *descendants(c))]


def kill_tree(p: subprocess.Popen) -> None:
    """SIGKILL `p`'s process group and every process below it (torchrun starts each worker in a session of its
    own, so the group alone would leave the workers running)."""
    below = descendants(p.pid)
    for kill, target in [(os.killpg, p.pid), *((os.kill, d) for d in below)]:
        try:
            kill(target, 9)
        except ProcessLookupError:
            pass


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def wait_for(predicate, procs: list[subprocess.Popen], timeout: float = 300, what: str = "the run") -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return
        if any(p.poll() is not None for p in procs):
            outs = finish(procs, 30)
            raise AssertionError(f"an agent ended while waiting for {what}: {outs}")
        time.sleep(0.1)
    for p in procs:
        kill_tree(p)
    raise AssertionError(f"timed out waiting for {what}")


def worker_pids(agent: subprocess.Popen) -> list[int]:
    """The twinlm worker processes started by an agent (its children running `twinlm train`)."""
    found = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
    return [int(x) for x in found]
