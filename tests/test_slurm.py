"""scripts/slurm/train.sbatch run as it is, under a fake Slurm on this machine: `srun` starts the command once per
"node" (two torchrun agents, c10d over 127.0.0.1), `scontrol` names the nodes and records a requeue, `scancel
--signal` signals the step's tasks. The template trains like one process, and before the time limit (SIGUSR1 to the
batch shell) it checkpoints, requeues the job, and the requeued job resumes to the same losses."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import twinlm
from agents import env, finish, free_port, kill_tree, rows, wait_for
from test_train_distributed import close, setup, train

pytestmark = pytest.mark.distributed

TEMPLATE = Path(__file__).resolve().parents[1] / "scripts" / "slurm" / "train.sbatch"
SRC = str(Path(twinlm.__file__).resolve().parents[1])  # the twinlm under test, for every process the job starts

SRUN = '''
import os, subprocess, sys
args = sys.argv[1:]
while args and args[0].startswith("-"):  # srun's own options (all given as --name=value)
    args.pop(0)
procs = [subprocess.Popen(args, env=dict(os.environ, SLURM_NODEID=str(n), SLURM_PROCID=str(n), SLURM_LOCALID="0"))
         for n in range(int(os.environ["SLURM_NNODES"]))]
with open(os.environ["FAKE_SLURM"] + "/step.pids", "w") as f:
    f.write(" ".join(str(p.pid) for p in procs))
codes = [p.wait() for p in procs]
bad = [c for c in codes if c]
sys.exit(0 if not bad else (128 - bad[0] if bad[0] < 0 else bad[0]))
'''

SCONTROL = '''
import os, sys
if sys.argv[1:3] == ["show", "hostnames"]:
    print("\\n".join(["127.0.0.1"] * int(os.environ["SLURM_NNODES"])))
else:
    with open(os.environ["FAKE_SLURM"] + "/scontrol.log", "a") as f:
        f.write(" ".join(sys.argv[1:]) + "\\n")
'''

SCANCEL = '''
import os, signal, sys
assert sys.argv[1] == "--signal=TERM", sys.argv
for pid in open(os.environ["FAKE_SLURM"] + "/step.pids").read().split():
    os.kill(int(pid), signal.SIGTERM)
'''


def fake_slurm(root: Path) -> dict[str, str]:
    """A `bin/` with stub srun, scontrol and scancel first on PATH, and a two-node job's variables."""
    bin_ = root / "bin"
    bin_.mkdir(parents=True)
    for name, code in [("srun", SRUN), ("scontrol", SCONTROL), ("scancel", SCANCEL)]:
        (bin_ / name).write_text(f"#!{sys.executable}\n{code}")
        (bin_ / name).chmod(0o755)
    pythonpath = os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p)
    return env(PATH=f"{bin_}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=pythonpath, FAKE_SLURM=str(root),
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node[1-2]", SLURM_NNODES="2", SLURM_CPUS_PER_TASK="1",
               TWINLM_PYTHON=sys.executable, TWINLM_RDZV_PORT=str(free_port()), TWINLM_NPROC_PER_NODE="1")


def sbatch(recipe: Path, out: Path, slurm_env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(TEMPLATE), str(recipe), str(out)], cwd=cwd, env=slurm_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def requeues(root: Path) -> list[str]:
    log = root / "scontrol.log"
    return log.read_text().splitlines() if log.exists() else []


def test_template_is_valid_bash():
    p = subprocess.run(["bash", "-n", str(TEMPLATE)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    text = TEMPLATE.read_text()
    for line in ["#SBATCH --ntasks-per-node=1", "#SBATCH --signal=B:USR1@", "#SBATCH --requeue",
                 "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"]:
        assert line in text


def test_usage_and_outside_a_job_are_refused():
    outside = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    p = subprocess.run(["bash", str(TEMPLATE)], env=outside, capture_output=True, text=True)
    assert p.returncode == 2 and "usage: sbatch" in p.stderr
    p = subprocess.run(["bash", str(TEMPLATE), "recipe.yaml", "run"], env=outside, capture_output=True, text=True)
    assert p.returncode == 2 and "not inside a Slurm job" in p.stderr


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The recipe of tests/test_train_distributed.py and its one-process metrics."""
    root = tmp_path_factory.mktemp("slurm-ref")
    recipe = setup(root)
    return recipe, train(recipe, root / "one")


@pytest.mark.multinode
def test_template_trains_on_two_nodes_like_one_process(tmp_path, reference):
    recipe, one = reference
    slurm_env = fake_slurm(tmp_path / "slurm")
    (tmp_path / "submit").mkdir()
    job = sbatch(recipe, tmp_path / "run", slurm_env, tmp_path / "submit")
    [(code, out)] = finish([job], timeout=300)
    assert code == 0, out[-4000:]
    assert (tmp_path / "run" / "final").is_dir()
    assert "rendezvous 127.0.0.1:" in out and "finished" in out
    assert requeues(tmp_path / "slurm") == []
    close(one, rows(tmp_path / "run"))


@pytest.mark.multinode
def test_time_limit_checkpoints_requeues_and_the_requeued_job_resumes(tmp_path, reference):
    """SIGUSR1 to the batch shell (what `--signal=B:USR1@300` sends) → SIGTERM to the step → checkpoint, exit 0,
    `scontrol requeue JOBID`; the requeued job (the same script and arguments) resumes and finishes with the
    losses of one uninterrupted process. (About 25 s: selected with `pytest -m multinode`.)"""
    recipe, one = reference
    slurm_env = fake_slurm(tmp_path / "slurm")
    run = tmp_path / "run"
    job = sbatch(recipe, run, slurm_env, tmp_path)
    try:
        wait_for(lambda: (run / "metrics.jsonl").exists() and len(rows(run)) >= 2, [job], what="two steps")
        os.kill(job.pid, signal.SIGUSR1)
        [(code, out)] = finish([job], timeout=300)
    finally:
        kill_tree(job)
    assert code == 0, out[-4000:]
    assert "requeueing job 4242" in out
    assert requeues(tmp_path / "slurm") == ["requeue 4242"]
    assert not (run / "final").exists()
    stopped_at = len(rows(run))
    assert 2 <= stopped_at < len(one)
    assert sorted(run.glob("checkpoints/step-*/COMPLETE"))

    again = sbatch(recipe, run, dict(slurm_env, SLURM_RESTART_COUNT="1"), tmp_path)
    [(code, out)] = finish([again], timeout=300)
    assert code == 0, out[-4000:]
    assert "resuming from" in out and "finished" in out
    assert requeues(tmp_path / "slurm") == ["requeue 4242"]  # no second requeue
    close(one, rows(run))
