"""Evaluation throughput on CPU: generative (zero-shot) scoring of HellaSwag items.

1. Decoder: twinlm's batched, padding-free scoring (sparse head on the scored positions only) against
   lm-evaluation-harness's `hf` model on the same exported folder and the same items (a local task
   through TaskManager), back to back in one process. Also checks that both give the same accuracies.
2. Encoder: the masked scoring needs one masked copy per continuation token; batched copies (many per
   packed forward pass, cu_seqlens) against one forward pass per copy (`score_requests_naive`), and the same
   requests through twinlm's lm-eval model class (eval/harness.py `TwinlmLM.loglikelihood`, lm-eval's Instances)
   against twinlm's own batched scoring, in the same run (the class should cost nothing on top).

Items: lm-eval's own `hellaswag` task on the fetched local copy (validation), its first requests.

Models: freshly initialised `cpu-small` shapes (7 layers, 256 wide, 8,192-token BPE trained here on the
fetched pre-training text; ≈6M parameters): throughput does not depend on the weights.

    python bench/eval_throughput.py --items 100 --naive-items 5 --encoder-items 50
    python bench/eval_throughput.py --tokenizer ettin --items 100 --skip-encoder   # Ettin 17M shape, 50,368 vocab

Needs `twinlm data fetch` (HellaSwag and pre-training text) and lm-eval (the `test` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from twinlm.eval import scoring as G  # noqa: E402
from twinlm.eval.common import load_for_eval as load  # noqa: E402
from twinlm.eval.generative import plan_tasks, task_manager  # noqa: E402
from twinlm.eval.settings import GenerativeConfig  # noqa: E402
from twinlm.eval.tasks import MCExample, lm_eval_task_yaml  # noqa: E402
from twinlm.eval.toy import toy_model_dir, toy_tokenizer  # noqa: E402


def pretrain_texts(max_bytes: int) -> list[str]:
    from twinlm.data.fetch import home

    out, n = [], 0
    for name in ("nlp-corpus", "wiki-gensim", "moby-dick", "sotu"):
        path = home() / "pretrain" / f"{name}.jsonl"
        if not path.exists():
            continue
        with open(path) as f:
            for line in f:
                t = json.loads(line)["text"]
                out.append(t)
                n += len(t)
                if n >= max_bytes:
                    return out
    if not out:
        raise SystemExit("no pre-training text: run `twinlm data fetch` first")
    return out


def hellaswag_items(limit: int):
    """(MCExamples, lm-eval Instances) of the first `limit` HellaSwag documents, built by lm-eval's task."""

    tm = task_manager()
    (item,) = plan_tasks(GenerativeConfig(["hellaswag"], data="local"), tm)
    (task,) = tm.load([item["spec"]])["tasks"].values()
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    by_doc: dict[int, list] = {}
    for inst in task.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst)
    exs = []
    for insts in by_doc.values():
        insts.sort(key=lambda i: i.idx)
        ctxs = [i.args[0] for i in insts]
        conts = [i.args[1] for i in insts]
        exs.append(MCExample(ctxs, conts, int(task.doc_to_target(insts[0].doc)), [c[1:] for c in conts]))
    return exs, list(task.instances)


def timed(fn):
    t = time.perf_counter()
    r = fn()
    return r, time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=300)
    ap.add_argument("--naive-items", type=int, default=5, help="items for the one-forward-per-copy encoder")
    ap.add_argument("--encoder-items", type=int, default=50, help="items for the batched encoder throughput")
    ap.add_argument("--preset", default=None, help="default: cpu-small (bpe8k) / ettin-17m (ettin)")
    ap.add_argument("--tokenizer", choices=["bpe8k", "ettin"], default="bpe8k",
                    help="bpe8k: an 8,192-token BPE trained here (the CPU presets); ettin: the 50,368-token Ettin one")
    ap.add_argument("--skip-encoder", action="store_true")
    ap.add_argument("--lm-eval-batch", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-lm-eval", action="store_true")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved decoder runs (median reported)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="twinlm-evalbench-"))
    if args.tokenizer == "ettin":
        from twinlm.data.tokenizer import build_ettin_tokenizer

        tok, t_tok = timed(lambda: build_ettin_tokenizer(work / "tokenizer"))
        args.preset = args.preset or "ettin-17m"
    else:
        tok, t_tok = timed(lambda: toy_tokenizer(8192, texts=pretrain_texts(3_000_000)))
        args.preset = args.preset or "cpu-small"
    dec_dir = toy_model_dir(work / "decoder", True, preset=args.preset, tokenizer=tok)
    enc_dir = toy_model_dir(work / "encoder", False, preset=args.preset, tokenizer=tok)
    exs, instances = hellaswag_items(args.items)
    n_req = sum(len(e.continuations) for e in exs)
    machine = f"{platform.machine()} {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    figures = {"tokenizer": args.tokenizer, "vocab": len(tok), "machine": machine,
               "torch": torch.__version__, "preset": args.preset, "items": len(exs), "requests": n_req,
               "tokenizer_train_s": round(t_tok, 1)}
    dec = load(str(dec_dir))
    enc = load(str(enc_dir))
    figures["params"] = dec.info["params"]
    print(f"{len(exs)} HellaSwag items, {n_req} requests; {args.preset} ({dec.info['params'] / 1e6:.1f}M params)",
          file=sys.stderr)

    # --- decoder: ours vs lm-evaluation-harness ---------------------------------------------------
    G.evaluate_examples(dec, exs[:8], max_tokens=args.max_tokens)  # warm-up
    lm = None
    if not args.skip_lm_eval:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        data = work / "hellaswag.jsonl"
        with open(data, "w") as f:
            for e in exs:
                f.write(json.dumps({"context": e.contexts[0], "choices": [c[1:] for c in e.continuations],
                                    "label": e.label}) + "\n")
        tdir = work / "tasks"
        tdir.mkdir()
        yaml_text = lm_eval_task_yaml("bench_hellaswag", data, metrics=("acc", "acc_norm"))
        (tdir / "bench_hellaswag.yaml").write_text(yaml_text)
        tm = TaskManager(include_path=str(tdir))
        # the model is built once, outside the timed region, like ours
        lm = HFLM(pretrained=str(dec_dir), dtype="float32", device="cpu", batch_size=args.lm_eval_batch)

        def run_lm():
            return simple_evaluate(model=lm, tasks=["bench_hellaswag"], task_manager=tm, batch_size=args.lm_eval_batch)
    # alternate ours / lm-eval `repeats` times (the machine is shared: medians of interleaved runs)
    t_ours_all, t_lm_all = [], []
    for _ in range(args.repeats):
        (ours, _), t = timed(lambda: G.evaluate_examples(dec, exs, max_tokens=args.max_tokens))
        t_ours_all.append(t)
        if lm is not None:
            out, t = timed(run_lm)
            t_lm_all.append(t)
    t_ours = float(np.median(t_ours_all))
    figures["decoder_twinlm_s"] = round(t_ours, 2)
    figures["decoder_twinlm_runs_s"] = [round(t, 2) for t in t_ours_all]
    figures["decoder_twinlm_items_per_s"] = round(len(exs) / t_ours, 1)
    figures["decoder_twinlm_acc"], figures["decoder_twinlm_acc_norm"] = ours["acc"], ours["acc_norm"]
    print(f"decoder, twinlm: {t_ours:.1f}s ({len(exs) / t_ours:.1f} items/s)", file=sys.stderr)
    if lm is not None:
        t_lm = float(np.median(t_lm_all))
        res = out["results"]["bench_hellaswag"]
        figures.update(decoder_lm_eval_s=round(t_lm, 2), decoder_lm_eval_runs_s=[round(t, 2) for t in t_lm_all],
                       decoder_lm_eval_items_per_s=round(len(exs) / t_lm, 1),
                       decoder_lm_eval_batch=args.lm_eval_batch, decoder_lm_eval_acc=100 * res["acc,none"],
                       decoder_lm_eval_acc_norm=100 * res["acc_norm,none"],
                       decoder_speedup=round(t_lm / t_ours, 2))
        print(f"decoder, lm-eval (batch {args.lm_eval_batch}): {t_lm:.1f}s -> twinlm is {t_lm / t_ours:.2f}x faster; "
              f"acc {ours['acc']:.2f} vs {100 * res['acc,none']:.2f}, acc_norm {ours['acc_norm']:.2f} vs "
              f"{100 * res['acc_norm,none']:.2f}", file=sys.stderr)

    # --- encoder: batched masked copies vs one forward per copy ----------------------------------
    if args.skip_encoder:
        print(json.dumps(figures, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
        return 0
    G.evaluate_examples(enc, exs[:4], max_tokens=args.max_tokens)
    sub = exs[:args.naive_items]
    (b_sub, _), t_b_sub = timed(lambda: G.evaluate_examples(enc, sub, max_tokens=args.max_tokens))
    (n_sub, _), t_n_sub = timed(lambda: G.evaluate_examples(enc, sub, naive=True))
    enc_exs = exs[:args.encoder_items]
    (b_all, _), t_b_all = timed(lambda: G.evaluate_examples(enc, enc_exs, max_tokens=args.max_tokens))
    t_dec_same = t_ours * len(enc_exs) / len(exs)
    from twinlm.eval.harness import TwinlmLM  # imports lm-eval (optional: --skip-lm-eval runs without it)

    cls = TwinlmLM(pretrained=str(enc_dir), device="cpu", max_tokens=args.max_tokens)
    n_req = sum(len(e.continuations) for e in enc_exs)
    enc_inst = instances[:n_req]
    cls_lls, t_cls = timed(lambda: cls.loglikelihood(enc_inst))
    (_, own_rows), t_own = timed(lambda: G.evaluate_examples(enc, enc_exs, max_tokens=args.max_tokens))
    own_lls = [s.loglikelihood for row in own_rows for s in row]
    figures.update(encoder_class_s=round(t_cls, 2), encoder_own_s=round(t_own, 2),
                   encoder_class_over_own=round(t_cls / t_own, 2),
                   encoder_class_max_abs_diff=max(abs(a[0] - b) for a, b in zip(cls_lls, own_lls)))
    print(f"encoder, {len(enc_exs)} items through the lm-eval class: {t_cls:.1f}s; twinlm's own: {t_own:.1f}s",
          file=sys.stderr)
    figures.update(encoder_items_naive=len(sub), encoder_naive_s=round(t_n_sub, 2),
                   encoder_batched_same_items_s=round(t_b_sub, 2), encoder_speedup=round(t_n_sub / t_b_sub, 2),
                   encoder_same_acc=b_sub["acc"] == n_sub["acc"] and b_sub["acc_norm"] == n_sub["acc_norm"],
                   encoder_masked_copies=b_all["scored_tokens"], encoder_batched_all_s=round(t_b_all, 2),
                   encoder_batched_items=len(enc_exs), encoder_batched_items_per_s=round(len(enc_exs) / t_b_all, 2),
                   encoder_naive_items_per_s=round(len(sub) / t_n_sub, 2),
                   encoder_vs_decoder_time_per_item=round(t_b_all / t_dec_same, 1))
    print(f"encoder, {len(sub)} items: one forward per copy {t_n_sub:.1f}s, batched {t_b_sub:.1f}s -> "
          f"{t_n_sub / t_b_sub:.1f}x; {len(enc_exs)} items batched: {t_b_all:.1f}s "
          f"({b_all['scored_tokens']} masked copies)", file=sys.stderr)
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
