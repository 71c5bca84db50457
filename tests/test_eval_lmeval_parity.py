"""For a decoder, our batched scoring gives the same log-likelihoods and the same acc / acc_norm /
acc_bytes as lm-evaluation-harness (its `hf` model on the exported folder, a local task through
TaskManager(include_path=...)), on the same examples."""

import json
import math

import pytest

from twinlm.eval import generative as G
from twinlm.eval.tasks import lm_eval_task_yaml, read_mc_jsonl
from twinlm.eval.toy import toy_model_dir, toy_tokenizer, write_toy_mc_jsonl

lm_eval = pytest.importorskip("lm_eval")



def lm_eval_scores(model_dir, task_file, name, tmp_path):
    """(per-doc list of log-likelihoods, {acc, acc_norm, acc_bytes} in percent) from lm-eval."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks_dir = tmp_path / "lm_eval_tasks"
    tasks_dir.mkdir(exist_ok=True)
    (tasks_dir / f"{name}.yaml").write_text(lm_eval_task_yaml(name, task_file))
    out = simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=[name],
                          task_manager=TaskManager(include_path=str(tasks_dir)), batch_size=4, device="cpu",
                          log_samples=True)
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    res = out["results"][name]
    return lls, {k: 100.0 * res[f"{k},none"] for k in ("acc", "acc_norm", "acc_bytes")}


def ours(model_dir, task_file):
    from twinlm.eval.common import load_for_eval as load

    loaded = load(str(model_dir))
    exs = read_mc_jsonl(task_file)
    metrics, per_ex = G.evaluate_examples(loaded, exs)
    return [[s.loglikelihood for s in row] for row in per_ex], metrics


@pytest.mark.slow
def test_decoder_accuracies_equal_lm_eval_harness(tmp_path):
    tok = toy_tokenizer()
    model_dir = toy_model_dir(tmp_path / "decoder", causal=True, tokenizer=tok, seed=3)
    task = write_toy_mc_jsonl(tmp_path / "toy.jsonl", n=24, n_choices=4, seed=1)
    # a context with a trailing space and one with non-ASCII choices exercise the split and acc_bytes
    rows = [json.loads(line) for line in task.read_text().splitlines()]
    rows[0]["context"] += " "
    rows[1]["choices"][0] = "the café naïve"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))

    ref_lls, ref = lm_eval_scores(model_dir, task, "twinlm_parity", tmp_path)
    our_lls, got = ours(model_dir, task)
    assert len(ref_lls) == len(our_lls) == 24
    for a, b in zip(ref_lls, our_lls):
        assert a == pytest.approx(b, abs=2e-4)
    for k in ("acc", "acc_norm", "acc_bytes"):
        assert math.isclose(got[k], ref[k], abs_tol=1e-9), (k, got[k], ref[k])


@pytest.mark.slow
def test_twinlm_trained_decoder_equals_lm_eval_with_default_arguments(trained_decoder, tmp_path):
    """lm-eval exactly as a user runs it on a twinlm-trained decoder: `pretrained=DIR` and nothing else, a task
    template with no special tokens in it. Its log-likelihoods and accuracies equal `twinlm eval generative`
    with its defaults (the folder's tokenizer prepends [CLS] only, so lm-eval splits context and continuation
    after it, as twinlm does)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from twinlm.cli import main

    model_dir = trained_decoder["final"]
    task = write_toy_mc_jsonl(tmp_path / "toy.jsonl", n=16, n_choices=4, seed=5)
    tasks_dir = tmp_path / "lm_eval_tasks"
    tasks_dir.mkdir()
    yaml_text = lm_eval_task_yaml("twinlm_default", task, prefix="")
    assert "[CLS]" not in yaml_text
    (tasks_dir / "twinlm_default.yaml").write_text(yaml_text)
    out = simple_evaluate(model="hf", model_args=f"pretrained={model_dir}", tasks=["twinlm_default"],
                          task_manager=TaskManager(include_path=str(tasks_dir)), device="cpu", log_samples=True)
    samples = sorted(out["samples"]["twinlm_default"], key=lambda s: s["doc_id"])
    ref_lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    ref = {k: 100.0 * out["results"]["twinlm_default"][f"{k},none"] for k in ("acc", "acc_norm")}

    our_lls, _ = ours(model_dir, task)
    assert len(ref_lls) == len(our_lls) == 16
    for a, b in zip(ref_lls, our_lls):
        assert a == pytest.approx(b, abs=2e-4)
    result_file = tmp_path / "ours.json"
    assert main(["eval", "generative", str(model_dir), "--tasks", str(task), "--limit", "all",
                 "--out", str(result_file)]) == 0
    got = json.loads(result_file.read_text())["tasks"]
    (name,) = got
    for k in ("acc", "acc_norm"):
        assert math.isclose(got[name][k], ref[k], abs_tol=1e-9), (k, got[name][k], ref[k])
