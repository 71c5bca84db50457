import json

import pytest

from twinlm.data.corpus import build_corpus
from twinlm.errors import ConfigError
from twinlm.suite.pipeline import Suite
from twinlm.suite.scales import SCALES, get_scale
from twinlm.suite.steps import Pipeline


def write_jsonl(path, texts):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


@pytest.fixture
def fake_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    write_jsonl(home / "pretrain" / "nlp-corpus.jsonl", [f"sentence number {i} is short." for i in range(2000)])
    write_jsonl(home / "pretrain" / "sotu.jsonl", ["a long address " * 400 + str(i) for i in range(40)])
    monkeypatch.setenv("TWINLM_HOME", str(home))
    return home


def read(path):
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def test_corpus_groups_short_documents_splits_heldout_and_respects_the_budget(fake_home, tmp_path):
    out = tmp_path / "corpus"
    out.mkdir()
    counts = build_corpus(out, ["nlp-corpus", "sotu"], max_mb=0.1, heldout_fraction=0.2, min_doc_bytes=1000)
    train, held = read(out / "train.jsonl"), read(out / "heldout.jsonl")
    assert counts["train_docs"] == len(train) and counts["heldout_docs"] == len(held)
    assert held and train and not set(train) & set(held)
    # sentences were joined into documents of at least 1,000 bytes (but the last of a source)
    sentences = [d for d in train + held if "sentence number" in d]
    assert sum(len(d.encode()) < 1000 for d in sentences) <= 1
    assert all("\n" in d for d in sentences[:-1])
    # an equal share per source, within one document of the 100 KB budget
    assert counts["train_bytes"] + counts["heldout_bytes"] <= 100_000 + 6100 * 2
    # the split is a property of the text: a rebuild is identical
    again = tmp_path / "again"
    again.mkdir()
    build_corpus(again, ["nlp-corpus", "sotu"], max_mb=0.1, heldout_fraction=0.2, min_doc_bytes=1000)
    assert (again / "heldout.jsonl").read_text() == (out / "heldout.jsonl").read_text()


def test_scale_overrides_are_typed_and_checked():
    scale = get_scale("quick", ["pretrain_tokens=1M", "classify.seeds=5", "sources=[sotu]"])
    assert scale.pretrain_tokens == "1M" and scale.classify.seeds == 5 and scale.sources == ["sotu"]
    with pytest.raises(ValueError, match="unknown suite setting"):
        get_scale("quick", ["pretrain_tokenz=1M"])
    assert get_scale("quick", ["peak_lr=3e-3"]).peak_lr == 0.003
    with pytest.raises(ValueError, match="expects a number"):
        get_scale("quick", ["peak_lr=fast"])
    for bad in ("classify.probe_layer=middle", "control_tracks=[bpbb]", "baselines=[bm52]"):
        with pytest.raises(ValueError, match="is not one of"):
            get_scale("quick", [bad])
    with pytest.raises(KeyError, match="unknown suite scale"):
        get_scale("huge")


def test_every_scale_builds_a_consistent_pipeline(tmp_path):
    for name in SCALES:
        suite = Suite(tmp_path / name, get_scale(name))
        names = [s.name for s in suite.steps()]
        assert names[0] == "fetch" and names[-1] == "report"
        scale = get_scale(name)
        for model in ("encoder", "decoder", "enc-from-dec", "dec-from-enc", "random-encoder", "random-decoder"):
            for track in ("classification", "retrieval", "generative", "bpb"):
                wanted = not model.startswith("random-") or track in scale.control_tracks
                assert (f"eval-{model}-{track}" in names) == wanted, (name, model, track)
        # the controls are always compared where the findings need them
        assert {"classification", "retrieval", "generative"} <= set(scale.control_tracks)
        assert set(suite.status().values()) == {"todo"}


def test_changing_a_training_budget_invalidates_training_and_everything_after(tmp_path):
    a = Suite(tmp_path, get_scale("quick")).steps()
    b = Suite(tmp_path, get_scale("quick", ["cross_tokens=50K"])).steps()
    from twinlm.suite.steps import Pipeline
    ids_a, ids_b = Pipeline(tmp_path, a).identities(), Pipeline(tmp_path, b).identities()
    changed = {n for n in ids_a if ids_a[n] != ids_b[n]}
    assert "train-enc-from-dec" in changed and "train-dec-from-enc" in changed and "report" in changed
    assert "train-encoder" not in changed and "eval-encoder-classification" not in changed
    assert "eval-enc-from-dec-generative" in changed


def test_training_overrides_reach_only_the_phases_a_recipe_has(tmp_path):
    from twinlm.train.recipe import load_recipe
    suite = Suite(tmp_path, get_scale("cpu"))
    for name in ("encoder", "enc-from-dec"):
        overrides = suite._train_overrides(name)
        recipe = load_recipe(suite.recipes / "cpu" / f"{name}.yaml", overrides)
        batch = {p: ph.batch_size for p, ph in recipe.phases.items()}
        assert batch == ({"pretrain": 32, "extension": 16, "decay": 16} if name == "encoder" else {"cross": 16})
    # a scale's peak LR reaches pre-training whole and cross-objective training at half, as the recipes do
    suite = Suite(tmp_path, get_scale("cpu", ["peak_lr=3e-3"]))
    lrs = {name: load_recipe(suite.recipes / "cpu" / f"{name}.yaml", suite._train_overrides(name)).optim.lr
           for name in ("decoder", "dec-from-enc")}
    assert lrs == {"decoder": 3e-3, "dec-from-enc": 1.5e-3}
    plain = Suite(tmp_path, get_scale("cpu"))
    assert not any(o.startswith("optim.lr") for o in plain._train_overrides("encoder"))


def test_eval_settings_are_the_tracks_dataclasses_and_reach_only_their_steps(tmp_path):
    from twinlm.eval.settings import BpbConfig, ClassifyConfig, GenerativeConfig, RetrievalConfig
    from twinlm.suite.steps import Pipeline

    quick = get_scale("quick")
    assert quick.classify == ClassifyConfig(tasks=["sst2"], seeds=2, max_train=500, max_eval=300, probe_layer="best")
    assert quick.classification is quick.classify  # the track's name now; `classify` still reads it
    assert quick.retrieval == RetrievalConfig(sets=["sciq"], seeds=1, max_train_pairs=100, max_eval_queries=100)
    assert quick.generative == GenerativeConfig(tasks=["arc_easy", "copa"], limit=100, add_bos=True)
    assert quick.bpb == BpbConfig(max_docs=50)
    scale = get_scale("quick", ["classify.seeds=[0, 4]", "retrieval.max_corpus=50"])
    assert scale.classify.seeds == [0, 4] and scale.retrieval.max_corpus == 50
    with pytest.raises(ValueError, match="unknown suite setting classify.sedes"):
        get_scale("quick", ["classify.sedes=5"])
    a = Pipeline(tmp_path, Suite(tmp_path, quick).steps()).identities()
    b = Pipeline(tmp_path, Suite(tmp_path, scale).steps()).identities()
    changed = {n for n in a if a[n] != b[n]}
    assert changed == {n for n in a if n.endswith(("-classification", "-retrieval"))} | {"report"}


def test_every_scale_measures_pairs_and_bits_per_byte_for_every_model_and_its_controls(tmp_path):
    for name in SCALES:
        scale = get_scale(name)
        steps = {s.name: s for s in Suite(tmp_path / name, scale).steps()}
        for model in ("encoder", "decoder", "enc-from-dec", "dec-from-enc", "random-encoder", "random-decoder",
                      "unigram", "bigram", "trigram"):
            for track in ("bpb", "pairs"):
                assert f"eval-{model}-{track}" in steps, (name, model, track)
        # n-gram controls are fitted on the pre-training shards, scored on the held-out split
        assert set(steps["eval-bigram-pairs"].after) == {"tokenizer", f"shards-{scale.short_seq}", "corpus"}
        assert "eval-bigram-pairs" in steps["report"].after
    assert get_scale("quick", ["ngrams=[bigram]", "pairs.per_family=7"]).pairs.per_family == 7
    for bad in ("ngrams=[fourgram]", "pairs.families=[scramble]"):
        with pytest.raises(ValueError, match="is not one of"):
            get_scale("quick", [bad])


def test_a_device_other_than_the_cpu_is_part_of_the_eval_steps_identity_the_cpu_is_not(tmp_path):
    cpu = {s.name: s for s in Suite(tmp_path, get_scale("quick", ["eval_device=cpu"])).steps()}
    gpu = {s.name: s for s in Suite(tmp_path, get_scale("quick", ["eval_device=cuda"])).steps()}
    assert get_scale("gpu").eval_device == "cuda" and get_scale("quick").eval_device == "auto"
    for name, step in cpu.items():
        if not name.startswith("eval-"):
            assert gpu[name].settings == step.settings
        elif name.split("-")[1] in ("unigram", "bigram", "trigram", "tfidf", "bm25"):  # these run on the CPU anyway
            assert gpu[name].settings == step.settings and "device" not in step.settings
        else:
            assert "device" not in step.settings and gpu[name].settings == {**step.settings, "device": "cuda"}
            assert step.compute is not None  # any rank may compute an evaluation (suite/steps.py)
    ids_cpu = Pipeline(tmp_path, list(cpu.values())).identities()
    ids_gpu = Pipeline(tmp_path, list(gpu.values())).identities()
    assert ids_cpu["train-encoder"] == ids_gpu["train-encoder"]
    assert ids_cpu["eval-encoder-bpb"] != ids_gpu["eval-encoder-bpb"]
    with pytest.raises(ConfigError, match="not a device"):
        Suite(tmp_path, get_scale("quick", ["eval_device=gpu0"])).steps()
