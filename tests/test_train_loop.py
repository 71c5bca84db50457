"""The training loop in-process: phases chain, metrics, final folder, NaN skipping, cross-objective start."""

import json
import math
import threading

import pytest
import torch
import yaml

from twinlm.data.shards import write_meta
from twinlm.errors import TrainingDiverged
from twinlm.train import run
from twinlm.train.recipe import load_recipe
from twinlm.train.step import TrainStep
from twinlm.train.testing import make_shards, tiny_recipe
from twinlm.train.trainer import Trainer


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards") / "tiny", n_docs=200)


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_three_phases_chain_and_write_a_loadable_model(shards, tmp_path, objective):
    import twinlm
    out = tmp_path / "run"
    recipe = tiny_recipe(shards, objective=objective, phases=3, tokens=800, every_tokens=500)
    final = run(recipe, out)
    assert final == out / "final" and (final / "config.json").is_file()
    r = rows(out)
    assert [x["step"] for x in r] == list(range(1, len(r) + 1))
    for key in ("step", "tokens", "loss", "lr", "phase", "batch_size", "tokens_per_s"):
        assert key in r[0]
    phases = [x["phase"] for x in r]
    assert phases == sorted(phases, key=["pretrain", "extension", "decay"].index)
    assert set(phases) == {"pretrain", "extension", "decay"}
    # the phases' token budgets are met, tokens are cumulative
    assert r[-1]["tokens"] >= 2400 and all(b["tokens"] > a["tokens"] for a, b in zip(r, r[1:]))
    # LR: warmup in pretrain, 1-sqrt to 0.5 x peak, decay ends at 0.02 x peak
    peak = recipe["optim"]["lr"]
    pre = [x["lr"] for x in r if x["phase"] == "pretrain"]
    assert pre[0] < peak and pre[-1] == pytest.approx(peak)
    assert [x["lr"] for x in r if x["phase"] == "extension"][-1] == pytest.approx(0.5 * peak)
    dec = [x["lr"] for x in r if x["phase"] == "decay"]
    assert dec[0] <= 0.5 * peak and dec[-1] == pytest.approx(0.02 * peak)
    # batch-size warmup in pretrain
    bs = [x["batch_size"] for x in r if x["phase"] == "pretrain"]
    assert bs[0] < bs[-1] == 8
    assert all(math.isfinite(x["loss"]) for x in r)
    # run folder describes itself
    cfg = load_recipe(str(out / "config.yaml"))
    assert cfg.objective == objective
    env = json.loads((out / "env.json").read_text())
    assert {"versions", "hardware", "git"} <= set(env) and env["versions"]["torch"] == torch.__version__
    # phase-end checkpoints are kept; RoPE θ switched to 160k from the extension phase on
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert len(ckpts) >= 3
    model = twinlm.load(ckpts[-1])  # a checkpoint is a twinlm model folder
    assert model.config.global_rope_theta == 160_000 and model.config.causal == (objective == "clm")
    loaded = twinlm.load(final)
    assert loaded.config.global_rope_theta == 160_000
    # the final weights are the last checkpoint's
    a = dict(model.state_dict())
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, a[k]), k
    # transformers reads the final folder
    import transformers
    cls = transformers.AutoModelForCausalLM if objective == "clm" else transformers.AutoModelForMaskedLM
    hf = cls.from_pretrained(final)
    assert hf.config.vocab_size == model.config.vocab_size
    # a second run of a finished folder does nothing
    assert run(recipe, out) == final
    assert len(rows(out)) == len(r)


class NaNStep(TrainStep):
    """The loss of every forward pass of the listed (1-based) steps is NaN."""
    bad_steps: set = set()
    current = 0

    def backward(self, batch, phase, **kwargs):
        self.current = batch.step
        return super().backward(batch, phase, **kwargs)

    def forward_loss(self, mb):
        loss = super().forward_loss(mb)
        if self.current in self.bad_steps:
            return loss * float("nan")
        return loss


class NaNAt(Trainer):
    step_class = NaNStep


def test_nan_loss_skips_the_step(shards, tmp_path):
    recipe = load_recipe(tiny_recipe(shards, phases=1, tokens=1200))
    NaNStep.bad_steps = {3, 4}
    snapshots = {}

    class Snap:
        def __getattr__(self, name):
            return lambda *a, **k: None

        def on_step_end(self, trainer, row):
            snapshots[row["step"]] = {k: v.clone() for k, v in trainer.bare_model.state_dict().items()}

    logs = []
    t = NaNAt(recipe, tmp_path / "run", callbacks=[Snap()], log=logs.append)
    t.fit()
    r = rows(tmp_path / "run")
    assert [x["skipped"] for x in r[:5]] == [False, False, True, True, False]
    assert r[2]["loss"] is None and r[2]["loss_repr"] == "nan"
    for k, v in snapshots[2].items():  # skipped steps leave the weights alone
        assert torch.equal(v, snapshots[4][k])
    assert any("non-finite" in line for line in logs)
    assert t.state.skipped_steps == 2 and t.state.bad_streak == 0


def test_k_nan_losses_in_a_row_stop_the_run(shards, tmp_path):
    recipe = load_recipe(tiny_recipe(shards, phases=1, tokens=3000, max_bad_steps=3))
    NaNStep.bad_steps = {2, 3, 4, 5, 6}
    with pytest.raises(TrainingDiverged, match="3 non-finite losses in a row"):
        NaNAt(recipe, tmp_path / "run", log=lambda m: None).fit()


def test_cross_objective_starts_from_converted_weights_with_a_fresh_optimizer(shards, tmp_path):
    import twinlm
    dec = run(tiny_recipe(shards, objective="clm", phases=1, tokens=600), tmp_path / "dec")
    recipe = tiny_recipe(shards, objective="mntp", phases=1, tokens=400, init_from=str(dec), seed=210)
    recipe["phases"]["pretrain"]["rope_theta"] = 160000
    logs = []
    final = run(recipe, tmp_path / "enc", log=logs.append)
    assert any("converted weights" in line and "fresh optimizer" in line for line in logs)
    enc = twinlm.load(final)
    assert enc.config.causal is False and enc.config.global_rope_theta == 160000
    # the first step started from the decoder's weights (fresh optimizer: step count restarts)
    ck = sorted((tmp_path / "enc" / "checkpoints").glob("step-*"))[-1]
    from safetensors.torch import load_file
    opt = load_file(str(ck / "optimizer.safetensors"))
    steps = {float(v) for k, v in opt.items() if k.endswith("::step")}
    assert steps == {float(len(rows(tmp_path / "enc")))}
    r = rows(tmp_path / "enc")
    assert r[0]["step"] == 1 and math.isfinite(r[0]["loss"])


def test_batch_order_is_recorded_per_checkpoint(shards, tmp_path):
    from twinlm.data import read_step
    out = tmp_path / "run"
    run(tiny_recipe(shards, phases=1, tokens=600, every_tokens=300, record_order=True), out)
    folders = sorted((out / "data_order").glob("step-*"))
    assert folders and all((f / "rank-00000.parquet").exists() for f in folders)
    n = len(rows(out))
    first = read_step(out, 1)
    last = read_step(out, n)
    assert first and last and all(len(r["input_ids"]) <= 64 for r in first)


def test_eval_hook_logs_a_held_out_loss(shards, tmp_path):
    held = make_shards(tmp_path / "held", n_docs=20, seed=7)
    recipe = tiny_recipe(shards, phases=1, tokens=600, eval={"data": str(held), "every_tokens": 300, "samples": 8})
    run(recipe, tmp_path / "run")
    r = rows(tmp_path / "run")
    evals = [x["eval_loss"] for x in r if "eval_loss" in x]
    assert len(evals) >= 1 and all(math.isfinite(v) for v in evals)


def test_activation_checkpointing_gives_the_same_losses(shards, tmp_path):
    base = tiny_recipe(shards, phases=1, tokens=400)
    run(base, tmp_path / "plain")
    run({**base, "activation_checkpointing": True}, tmp_path / "ac")
    a = [x["loss"] for x in rows(tmp_path / "plain")]
    b = [x["loss"] for x in rows(tmp_path / "ac")]
    assert a == pytest.approx(b, rel=1e-6)


def test_user_errors_print_one_line(shards, tmp_path, capsys):
    """Missing shards, a missing init_from model, a missing tokenizer, shards of another tokenizer and a
    malformed override each end the command with one line that says what to do (exit 2), no traceback."""
    from twinlm.cli import main

    def train(recipe, *extra):
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        code = main(["train", str(path), "--out", str(tmp_path / f"run{len(list(tmp_path.iterdir()))}"), *extra])
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return code, err.strip().splitlines()[-1]

    code, line = train(tiny_recipe(tmp_path / "no-shards", phases=1, tokens=200))
    assert code == 2 and line.startswith("twinlm: error:") and "twinlm data prepare" in line
    code, line = train(tiny_recipe(shards, phases=1, tokens=200, init_from=str(tmp_path / "no-model")))
    assert code == 2 and "init_from" in line and "train the source model first" in line
    code, line = train(tiny_recipe(shards, phases=1, tokens=200, tokenizer=str(tmp_path / "no-tokenizer")))
    assert code == 2 and "tokenizer" in line and "twinlm tokenizer" in line
    code, line = train(tiny_recipe(shards, phases=1, tokens=200), "not-an-override")
    assert code == 2 and "KEY=VALUE" in line
    # the second phase's shards were made with another tokenizer than the first's
    other = make_shards(tmp_path / "other", n_docs=50, seed=3)
    meta = json.loads((other / "meta.json").read_text())
    meta["tokenizer"]["fingerprint"] = "0" * 64
    write_meta(other, meta)  # as if prepared with another tokenizer
    recipe = tiny_recipe(shards, phases=2, tokens=200)
    recipe["phases"]["extension"]["data"] = str(other)
    code, line = train(recipe)
    assert code == 2 and f"{other} was prepared with tokenizer" in line and "prepare the data again" in line


def test_shards_of_a_larger_vocabulary_than_the_model_are_refused_before_training(tmp_path):
    import numpy as np

    from twinlm.data.shards import ShardWriter
    from twinlm.errors import TokenizerMismatch
    from twinlm.train.testing import SYNTHETIC_FINGERPRINT

    ids = np.arange(5, 405, dtype=np.int64) % 8000 + 4090  # ids past cpu-tiny's 4,096
    w = ShardWriter(tmp_path / "big", vocab_size=8192)
    w.add(ids, np.full(10, 40, dtype=np.int64), np.arange(10, dtype=np.int64), np.full(10, 160, dtype=np.int64))
    w.close({"tokenizer": {"fingerprint": SYNTHETIC_FINGERPRINT, "vocab_size": 8192}, "source": "synthetic"})
    with pytest.raises(TokenizerMismatch, match="vocabulary of 8192 tokens, larger than the model's 4096"):
        run(tiny_recipe(tmp_path / "big", phases=1, tokens=200), tmp_path / "run")
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.exists() or not metrics.read_text().strip()  # refused before the first step


class _Crash(Exception):
    pass


def _final_weights(out):
    from safetensors.torch import load_file
    return load_file(str(out / "final" / "model.safetensors"))


def test_prefetch_gives_the_same_run_and_checkpoints_the_consumed_position(shards, tmp_path):
    """The next batch drawn on a background thread: the same batches, losses and weights as drawing it in line;
    a checkpoint written while a later batch is already drawn records the position after the batch trained on,
    so a run killed right after it resumes bit-exact (dropout on)."""
    from twinlm.data import read_step
    from twinlm.train.callback import Callback

    recipe = tiny_recipe(shards, phases=2, tokens=900, dropout=0.1, every_tokens=200, record_order=True)
    quiet = lambda m: None  # noqa: E731

    class Threads(Callback):  # the threads alive at each step's end: the prefetch thread's name, or not
        def __init__(self):
            self.seen = set()

        def on_step_end(self, trainer, row):
            self.seen.update(t.name.split("_")[0] for t in threading.enumerate())

    off, on = Threads(), Threads()
    Trainer(load_recipe({**recipe, "prefetch": False}), tmp_path / "off", log=quiet, callbacks=[off]).fit()
    Trainer(load_recipe(recipe), tmp_path / "on", log=quiet, callbacks=[on]).fit()
    assert "twinlm-prefetch" in on.seen and "twinlm-prefetch" not in off.seen  # the recipe's switch works
    keys = ("step", "phase", "tokens", "loss", "lr", "batch_size", "targets", "step_tokens", "skipped")
    off, on = [[tuple(x[k] for k in keys) for x in rows(tmp_path / d)] for d in ("off", "on")]
    assert off == on and len(on) > 6
    a, b = _final_weights(tmp_path / "off"), _final_weights(tmp_path / "on")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for s in (1, len(on)):
        assert [r["sample_id"] for r in read_step(tmp_path / "off", s)] == \
            [r["sample_id"] for r in read_step(tmp_path / "on", s)]

    # killed (an exception out of fit) right after a periodic checkpoint in the first phase's middle
    class CrashAfter(Callback):
        def on_checkpoint(self, trainer, path):
            if trainer.state.step == 3:
                raise _Crash

    out = tmp_path / "killed"
    with pytest.raises(_Crash):
        Trainer(load_recipe(recipe), out, callbacks=[CrashAfter()], log=quiet).fit()
    state = json.loads((out / "checkpoints" / "step-00000003" / "state.json").read_text())["trainer"]
    assert state["stream"]["position"] == sum(x["batch_size"] for x in rows(out)[:3])  # not the prefetched one
    assert [x["step"] for x in rows(out)] == [1, 2, 3]
    Trainer(load_recipe(recipe), out, log=quiet).fit()
    assert [tuple(x[k] for k in keys) for x in rows(out)] == on
    c = _final_weights(out)
    assert all(torch.equal(a[k], c[k]) for k in a)
