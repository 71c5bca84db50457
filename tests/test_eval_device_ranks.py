"""Where evaluation runs (eval/device.py) and how its work is shared among torchrun's ranks (eval/ranks.py)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from twinlm.cli import main
from twinlm.errors import ConfigError
from twinlm.eval.device import autocast, resolve_device
from twinlm.eval.ranks import Ranks, ranks


def test_auto_is_the_cpu_without_an_accelerator():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "gpu7", "mps"])
def test_a_device_the_machine_lacks_is_one_line_naming_the_choices(name):
    if torch.cuda.is_available() or (name == "mps" and torch.backends.mps.is_available()):
        pytest.skip("this machine has that device")
    with pytest.raises(ConfigError, match="--device"):
        resolve_device(name)


def test_cli_refuses_a_missing_gpu_in_one_line(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from twinlm.eval.toy import toy_model_dir

    model = toy_model_dir(tmp_path / "m", causal=True)
    assert main(["eval", "bpb", str(model), "--max-docs", "2", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("twinlm: error: --device cuda") and "--device cpu" in err[0]


def test_cpu_scoring_is_plain_fp32():
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with autocast(torch.device("cpu")):
        c = a @ b
    assert c.dtype == torch.float32 and torch.equal(c, a @ b)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_assign_gives_every_unit_to_exactly_one_rank_balanced(world):
    costs = [7, 1, 3, 3, 9, 2, 2, 5, 1, 1, 4]
    shares = [Ranks(r, world).assign(costs) for r in range(world)]
    flat = sorted(i for s in shares for i in s)
    assert flat == list(range(len(costs)))
    loads = [sum(costs[i] for i in s) for s in shares]
    # longest-first greedy: no rank exceeds the mean by more than the largest unit
    assert max(loads) <= sum(costs) / world + max(costs)
    assert all(s == sorted(s) for s in shares)


def test_mine_strides_and_alone_collect_is_identity():
    assert Ranks(1, 3).mine(list("abcdefg")) == [1, 4]
    alone = Ranks()
    assert alone.writes and alone.gather("x") == ["x"]
    assert alone.collect(3, {0: "a", 1: "b", 2: "c"}) == ["a", "b", "c"]
    with pytest.raises(RuntimeError, match="computed by no rank"):
        alone.collect(3, {0: "a", 2: "c"})


def test_alone_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert ranks() == Ranks()


@pytest.mark.distributed
def test_two_gloo_ranks_collect_every_unit_in_order(tmp_path):
    script = tmp_path / "share.py"
    script.write_text(textwrap.dedent("""
        import json
        from twinlm.eval.ranks import ranks
        r = ranks()
        mine = r.assign([5, 1, 1, 3, 2, 2])
        out = r.collect(6, {i: [i, r.rank] for i in mine})
        row = {"rank": r.rank, "world": r.world, "writes": r.writes, "mine": mine, "out": out}
        with open(f"{__file__}.rank{r.rank}.json", "w") as f:  # a shared stdout may interleave the ranks' lines
            json.dump(row, f)
    """))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                        str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads((tmp_path / f"share.py.rank{rank}.json").read_text()) for rank in range(2)]
    assert [(r["rank"], r["world"], r["writes"]) for r in rows] == [(0, 2, True), (1, 2, False)]
    assert sorted(rows[0]["mine"] + rows[1]["mine"]) == list(range(6))
    owner = {i: r["rank"] for r in rows for i in r["mine"]}
    for r in rows:  # every rank holds every unit, in order, computed by its owner
        assert r["out"] == [[i, owner[i]] for i in range(6)]
