"""train/setup.py: each pre-flight check as a function of (recipe, checkpoint state, shard metas, device), and
the order "every check before the first write", shown on a run folder that must come out of every refusal
byte for byte as it went in. Also the pieces the setup is made of: in-memory conversion (convert.as_kind),
callbacks' own state in checkpoints (old checkpoints included) and the one stream interface."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from twinlm.config import ModelConfig
from twinlm.convert import as_kind
from twinlm.data import BatchStream, ShardDataset
from twinlm.errors import ConfigError, CorruptCheckpointError, MissingArtifactError, ModelLoadError, TokenizerMismatch
from twinlm.model import Transformer
from twinlm.train import callbacks as cbs
from twinlm.train import dist, run, setup
from twinlm.train.callback import Callback, keyed
from twinlm.train.checkpoint import callback_states, periodic_ordinal, read_state
from twinlm.train.dist import DistEnv
from twinlm.train.recipe import Optim, ShardSource, load_recipe, model_overrides, optim_problem
from twinlm.train.testing import SYNTHETIC_FINGERPRINT, make_shards, tiny_recipe
from twinlm.train.trainer import Trainer


def _quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("setup") / "shards", n_docs=120)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _meta(chunk: int | None = None, fp: str | None = SYNTHETIC_FINGERPRINT) -> dict:
    meta: dict = {"tokenizer": {"fingerprint": fp, "name": "synthetic"} if fp else {}}
    if chunk:
        meta["chunking"] = {"chunk_size": chunk}
    return meta


# --- the checks, one by one -------------------------------------------------------------------------
def test_check_out_refuses_a_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("mine")
    with pytest.raises(ConfigError, match="afile exists and is not a folder"):
        setup.check_out(f)
    setup.check_out(tmp_path / "new")  # nothing there: fine
    setup.check_out(tmp_path)


def test_check_resume_names_what_changed(tmp_path, shards):
    recipe = load_recipe(tiny_recipe(shards, phases=1))
    state = {"recipe": recipe.to_dict(), "tokenizer_fingerprint": "a" * 64}
    setup.check_resume(recipe, tmp_path, tmp_path / "ck", state, "a" * 64)  # unchanged: accepted
    setup.check_resume(recipe, tmp_path, tmp_path / "ck", state, None)  # no tokenizer to compare
    other = load_recipe(tiny_recipe(shards, phases=1), ["model.overrides.attention_dropout=0.5"])
    with pytest.raises(ConfigError, match=r"another model \(model.overrides.attention_dropout: 0.0 -> 0.5\)"):
        setup.check_resume(other, tmp_path, tmp_path / "ck", state, None)
    with pytest.raises(ConfigError, match="another objective"):
        setup.check_resume(load_recipe(tiny_recipe(shards, phases=1, objective="clm")), tmp_path, tmp_path, state,
                           None)
    with pytest.raises(TokenizerMismatch, match="another tokenizer"):
        setup.check_resume(recipe, tmp_path, tmp_path / "ck", state, "b" * 64)
    assert setup.changes("m", {"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}, "d": 4}) == \
        ["m.b.c: 2 -> 3", "m.d: None -> 4"]


def test_check_seq_lens_longer_is_an_error_shorter_a_warning(shards):
    recipe = load_recipe(tiny_recipe(shards, phases=1, seq_len=64))
    phase, src = recipe.phase_list()[0], ShardSource(str(shards))
    logs: list[str] = []
    setup.check_seq_lens([(phase, src, _meta(chunk=64)), (phase, src, _meta())], logs.append)
    assert logs == []
    setup.check_seq_lens([(phase, src, _meta(chunk=128))], logs.append)
    assert "shorter than the 128-token chunks" in logs[0]
    with pytest.raises(ConfigError, match="seq_len 64 but .* holds chunks of at most 32 tokens"):
        setup.check_seq_lens([(phase, src, _meta(chunk=32))], logs.append)


def test_run_fingerprint_and_the_shards_against_it(shards):
    recipe = load_recipe(tiny_recipe(shards, phases=1))
    phase, src = recipe.phase_list()[0], ShardSource(str(shards))
    metas = [(phase, src, _meta(fp=None)), (phase, src, _meta(fp="s" * 64))]
    assert setup.run_fingerprint("t" * 64, {"tokenizer_fingerprint": "c" * 64}, metas) == "t" * 64
    assert setup.run_fingerprint(None, {"tokenizer_fingerprint": "c" * 64}, metas) == "c" * 64
    assert setup.run_fingerprint(None, None, metas) == "s" * 64  # the first shards that record one
    assert setup.run_fingerprint(None, None, metas[:1]) is None
    setup.check_shard_tokenizers(metas, "s" * 64)
    setup.check_shard_tokenizers(metas, None)
    with pytest.raises(TokenizerMismatch, match="was prepared with tokenizer"):
        setup.check_shard_tokenizers(metas, "t" * 64)


def test_model_config_fresh_converted_and_resumed(tmp_path, shards):
    recipe = load_recipe(tiny_recipe(shards, phases=1, objective="clm"), ["model.overrides.num_layers=4"])
    cfg = setup.model_config(recipe, None, None)
    assert cfg == ModelConfig.preset("cpu-tiny", num_layers=4, attention_dropout=0.0, causal=True)
    with pytest.raises(ConfigError, match="hidden_size 128 is not divisible by num_heads 3"):
        setup.model_config(load_recipe(tiny_recipe(shards), ["model.overrides.num_heads=3"]), None, None)
    # a cross-objective start: the source's shape, the recipe's other overrides
    src = tmp_path / "enc"
    Transformer(ModelConfig.preset("cpu-tiny", num_layers=2)).save_pretrained(src)
    mntp = load_recipe(tiny_recipe(shards, objective="mntp", init_from=str(src)))
    assert setup.check_init_from(mntp) == src
    got = setup.model_config(mntp, None, None, src)
    assert got.num_layers == 2 and not got.causal and got.attention_dropout == 0.0
    with pytest.raises(ConfigError, match="num_layers=4 .*would change the shape"):
        setup.model_config(load_recipe(mntp, ["model.overrides.num_layers=4"]), None, None, src)
    with pytest.raises(MissingArtifactError, match="init_from: .*nope does not exist"):
        setup.check_init_from(load_recipe(mntp, [f"init_from={tmp_path / 'nope'}"]))
    # a resume: the checkpoint's config, whatever the recipe says
    ck = tmp_path / "ck"
    ck.mkdir()
    ModelConfig.preset("cpu-tiny", num_layers=3).save(ck / "model_config.json")
    assert setup.model_config(recipe, None, ck).num_layers == 3


def test_check_memory_only_where_memory_is_known(monkeypatch, shards):
    recipe = load_recipe(tiny_recipe(shards, phases=1, micro_batch_tokens=1 << 20))
    cfg = ModelConfig.preset("cpu-tiny")
    setup.check_memory(recipe, DistEnv(), cfg)  # the CPU: not planned
    monkeypatch.setattr(setup, "device_memory", lambda device: 2 * 2**30)
    with pytest.raises(ConfigError, match="more than cpu"):
        setup.check_memory(recipe, DistEnv(), cfg)
    setup.check_memory(load_recipe(recipe, ["memory_check=false"]), DistEnv(), cfg)


def test_recipe_validation_of_the_optimizer_and_the_model_overrides():
    assert optim_problem(Optim()) is None
    for bad, needle in ((dict(lr=-1.0), "lr must be a number >= 0"), (dict(lr=float("nan")), "lr must be"),
                        (dict(betas=(0.9, 1.0)), "betas must both lie in"), (dict(betas=(-0.1, 0.9)), "betas"),
                        (dict(eps=0.0), "eps must be a number > 0"), (dict(weight_decay=-1e-3), "weight_decay")):
        with pytest.raises(ConfigError, match=needle):
            Optim(**bad)
    assert model_overrides({"num_layers": "4K", "attention_dropout": "0"}) == {"num_layers": 4000,
                                                                                 "attention_dropout": 0.0}
    with pytest.raises(ConfigError, match=r"unknown key model.overrides.hiden_size \(did you mean hidden_size\?\); "
                                          r"known under model.overrides: vocab_size, hidden_size"):
        model_overrides({"hiden_size": 64})
    with pytest.raises(ConfigError, match="model.overrides.causal: the objective decides"):
        model_overrides({"causal": True})
    with pytest.raises(ConfigError, match="model.overrides.num_layers: cannot read 'many' as int"):
        model_overrides({"num_layers": "many"})


# --- every refusal before the first write ------------------------------------------------------------
def test_every_pre_flight_refusal_leaves_the_run_folder_as_it_was(tmp_path, shards, monkeypatch):
    """A run folder with a checkpoint, then each check's refusal in turn: not one file added, removed or
    changed (config.yaml, starts.jsonl, metrics.jsonl, checkpoints, verified_shards.json)."""
    recipe = tiny_recipe(shards, phases=1, tokens=400)
    out = tmp_path / "run"
    run(recipe, out, ["max_steps=1"], log=_quiet)
    before = _snapshot(out)
    assert "config.yaml" in before and any(k.startswith("checkpoints/step-") for k in before)

    def refused(error: type, match: str, r: dict, overrides: list[str] | None = None) -> None:
        with pytest.raises(error, match=match):
            run(r, out, overrides, log=_quiet)
        assert _snapshot(out) == before

    refused(MissingArtifactError, "the recipe's tokenizer", {**recipe, "tokenizer": str(tmp_path / "no-tok")})
    refused(ConfigError, "another model", recipe, ["model.overrides.attention_dropout=0.5"])  # check_resume
    other = make_shards(tmp_path / "other", n_docs=40, seed=3)
    meta = json.loads((other / "meta.json").read_text())
    meta["tokenizer"]["fingerprint"] = "0" * 64
    from twinlm.data.shards import write_meta
    write_meta(other, meta)
    refused(TokenizerMismatch, "was prepared with tokenizer", {**recipe, "data": [str(shards), str(other)]})
    chunked = make_shards(tmp_path / "chunked", n_docs=40)
    meta = json.loads((chunked / "meta.json").read_text())
    meta["chunking"] = {"chunk_size": 32}
    write_meta(chunked, meta)
    refused(ConfigError, "holds chunks of at most 32", {**recipe, "data": str(chunked)})
    monkeypatch.setattr(setup, "device_memory", lambda device: 2**30)
    refused(ConfigError, "more than cpu", recipe, ["phases.pretrain.micro_batch_tokens=1M"])
    monkeypatch.undo()
    # a fresh folder: init_from missing, an impossible shape; nothing is made
    fresh = tmp_path / "fresh"
    with pytest.raises(MissingArtifactError, match="init_from"):
        run({**recipe, "objective": "mntp", "init_from": str(tmp_path / "nope")}, fresh, log=_quiet)
    with pytest.raises(ConfigError, match="not divisible by num_heads"):
        run(recipe, fresh, ["model.overrides.num_heads=3"], log=_quiet)
    assert not fresh.exists()


def test_check_run_writes_nothing_and_open_run_writes_the_folder(tmp_path, shards):
    recipe = load_recipe(tiny_recipe(shards, phases=1, tokens=200)).resolved_paths()
    out = tmp_path / "run"
    checked = setup.check_run(recipe, out, DistEnv(), _quiet)
    assert not out.exists() and checked.resume is None and checked.fingerprint == SYNTHETIC_FINGERPRINT
    assert checked.config.num_layers == ModelConfig.preset("cpu-tiny").num_layers
    opened = setup.open_run(checked)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "env.json", "starts.jsonl"]
    assert opened.state.step == 0 and opened.step.model is opened.model
    assert dist.unwrap(opened.model).config == checked.config


# --- cross-objective start in memory ---------------------------------------------------------------
def test_as_kind_converts_in_memory_and_leaves_the_source(tmp_path, shards):
    torch.manual_seed(0)
    enc = Transformer(ModelConfig.preset("cpu-tiny", num_layers=2))
    dec = as_kind(enc, True, attention_dropout=0.0, global_rope_theta=160000.0)
    assert dec.config == enc.config.replace(causal=True, attention_dropout=0.0, global_rope_theta=160000.0)
    assert not enc.config.causal
    for (n, a), (_, b) in zip(enc.state_dict().items(), dec.state_dict().items()):
        if "rope" not in n:
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    # a cross-objective run writes no converted copy (nothing named init/ in the run folder)
    src = tmp_path / "dec"
    dec.save_pretrained(src)
    out = tmp_path / "run"
    cross = tiny_recipe(shards, phases=1, tokens=200, objective="mntp", init_from=str(src))
    run(cross, out, log=_quiet, overrides=["model.preset=cpu-tiny", "max_steps=1"])
    assert not (out / "init").exists()
    # a damaged source is named by the checks, before a new run folder is made
    weights = src / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        run(cross, tmp_path / "run2", log=_quiet, overrides=["model.preset=cpu-tiny", "max_steps=1"])
    assert not (tmp_path / "run2").exists()


def test_a_run_set_up_for_one_folder_is_not_trained_into_another(tmp_path, shards):
    recipe = load_recipe(tiny_recipe(shards, phases=1, tokens=200)).resolved_paths()
    opened = setup.open_run(setup.check_run(recipe, tmp_path / "a", DistEnv(), _quiet))
    with pytest.raises(ConfigError, match="set up for"):
        Trainer(recipe, tmp_path / "b", log=_quiet).fit(opened)
    assert not (tmp_path / "b").exists()


# --- callbacks own their state -------------------------------------------------------------------------
class _Counter(Callback):
    def __init__(self):
        self.n = 0

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]

    def on_step_end(self, trainer, row):
        self.n += 1


def test_callbacks_save_and_restore_their_own_state(tmp_path, shards):
    recipe = tiny_recipe(shards, phases=1, tokens=600, every_tokens=150)
    out = tmp_path / "run"
    first = _Counter()
    run(recipe, out, ["max_steps=3"], callbacks=[first], log=_quiet)
    last = sorted((out / "checkpoints").glob("step-*"))[-1]
    state = read_state(last)
    assert state["callbacks"]["_Counter"] == {"n": 3}
    assert state["callbacks"]["periodic_checkpoint"]["ordinal"] >= 1
    assert "checkpoint_ordinal" not in state["trainer"] and "eval_ordinal" not in state["trainer"]
    assert periodic_ordinal(state) == state["callbacks"]["periodic_checkpoint"]["ordinal"]
    again = _Counter()
    run(recipe, out, ["max_steps=5"], callbacks=[again], log=_quiet)
    last_step = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert last_step > 3 and again.n == last_step  # 3 restored, then one per new step


def test_checkpoints_of_older_versions_keep_their_counters():
    old = {"trainer": {"step": 4, "checkpoint_ordinal": 3, "eval_ordinal": 2}, "checkpoint_ordinal": 3}
    assert callback_states(old) == {"periodic_checkpoint": {"ordinal": 3}, "evaluate": {"ordinal": 2}}
    assert periodic_ordinal(old) == 3
    assert setup.restored_state(old).step == 4  # the counters it no longer has are ignored
    with pytest.raises(CorruptCheckpointError, match="no trainer state"):
        setup.restored_state({"checkpoint_ordinal": 3})  # would restart at step 0 on trained weights
    periodic = cbs.PeriodicCheckpoint(100)
    periodic.load_state_dict(callback_states(old)["periodic_checkpoint"])
    assert periodic.ordinal == 3
    assert [k for k, _ in keyed([_Counter(), periodic, _Counter()])] == ["_Counter", "periodic_checkpoint",
                                                                          "_Counter.2"]


def test_default_callbacks_follow_the_recipe(tmp_path, shards):
    recipe = load_recipe(tiny_recipe(shards, every_tokens=100), ["progress=true", "record_order=true"])
    names = [type(c).__name__ for c in cbs.defaults(recipe, tmp_path)]
    assert names == ["Throughput", "MetricsLogger", "ProgressBar", "PeriodicCheckpoint", "RecordOrder"]


# --- one stream interface ------------------------------------------------------------------------------
def test_a_batch_smaller_than_the_ranks_leaves_empty_shares(shards):
    ds = ShardDataset(shards)
    world = 4
    streams = [BatchStream(ds, seed=5, rank=r, world_size=world) for r in range(world)]
    whole = BatchStream(ds, seed=5)
    for bs in (2, 7, 1):
        shares = [s.next_step(bs, empty_shares=True) for s in streams]
        assert [len(x) for x in shares] == [len(range(r, bs, world)) for r in range(world)]
        want = whole.next_global(bs)
        got = sorted((i * world + r, sid) for r, x in enumerate(shares) for i, (sid, _) in enumerate(x))
        assert [sid for _, sid in got] == [sid for sid, _ in want]
    planner = BatchStream(ds, seed=5)
    ids, lengths = planner.next_global_lengths(9)
    assert [int(i) for i in ids] == [sid for sid, _ in BatchStream(ds, seed=5).next_global(9)]
    assert np.array_equal(lengths, [len(ds[int(i)]) for i in ids])
    assert whole.next_batch_size(12) == 12
