"""What the paper's generative column costs: the requests lm-evaluation-harness builds for the paper's ten tasks, the
tokens twinlm's scorers push through the model for them (a decoder reads each request once; an encoder reads one
masked copy per continuation token), and the time that takes per model size on one GPU, *estimated*.

Counts come from lm-eval's own task definitions on the fetched local copies (`twinlm data fetch`), tokenized with
the Ettin tokenizer, scaled to the documents of the split the paper reads where the local copy is another split
(ARC, OpenBookQA and SciQ: test; their tokens per document taken from the validation copy). WSC273 has no local
copy: its 273 documents are counted at WinoGrande's tokens per document. TriviaQA's generations are counted at the
gold answer's length + 1 rounds (greedy decoding re-reads the prefix each round: no cache).

The time is an estimate, not a measurement: forward FLOPs (2 x non-embedding matmul parameters per token, the
attention's 4 x layers x hidden x length per token, and the vocabulary head only at scored positions) divided by
an assumed fraction of one H100's 989 dense bf16 TFLOP/s. The fractions (MFU) are those of the training-step
anchors in REFERENCE §5 and bench/RESULTS.md (17M 7.6%, 150M 21.5%, 1B 26%; between them interpolated on log
parameters): forward-only scoring of short documents has less work per launch than training, so treat the figures
as a lower bound until `bench/gpu_check.py` measures them.

    python bench/generative_cost.py            # table on stdout, JSON with --out FILE
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from twinlm.config import ModelConfig  # noqa: E402
from twinlm.data.tokenizer import build_ettin_tokenizer  # noqa: E402
from twinlm.eval.generative import load_tasks, plan_tasks, task_manager  # noqa: E402
from twinlm.eval.paper.plan import PEAK, SCORING_MFU, interpolated_mfu  # noqa: E402
from twinlm.eval.scoring import N_FUTURE_MASKS, tokenize_requests  # noqa: E402
from twinlm.eval.settings import GenerativeConfig  # noqa: E402
from twinlm.eval.tasks.generative import PAPER_TASKS  # noqa: E402

# documents of the split the paper (lm-eval) reads, where the local copy is another split or missing
PAPER_SPLIT_DOCS = {"arc_easy": 2376, "arc_challenge": 1172, "openbookqa": 500, "sciq": 1000, "wsc273": 273}
SIZES = ["ettin-17m", "ettin-32m", "ettin-68m", "ettin-150m", "ettin-400m", "ettin-1b"]


def count(tok, cfg) -> dict[str, dict[str, float]]:
    """Per task: documents, requests, decoder tokens, encoder tokens (masked copies), scored positions, mean
    sequence length."""
    tm = task_manager()
    gen = GenerativeConfig(tasks=[t for t in PAPER_TASKS if t != "wsc273"], data="local", limit=None)
    out: dict[str, dict[str, float]] = {}
    plan = plan_tasks(gen, tm)
    for item, leaves in zip(plan, load_tasks(tm, plan)):
        for task in leaves.values():
            task.build_all_requests(limit=None, rank=0, world_size=1)
            docs = len(task.eval_docs)
            insts = task.instances
            if task.OUTPUT_TYPE == "generate_until":
                prompts = [i.args[0] for i in insts]
                golds = [task.doc_to_target(i.doc) for i in insts]
                golds = [g[0] if isinstance(g, list) else g for g in golds]
                reqs = tokenize_requests(tok, cfg, list(zip(prompts, [" " + str(g) for g in golds])))
                dec = enc = scored = 0.0
                for r in reqs:
                    rounds = len(r.cont) + 1
                    dec += sum(len(r.ctx) + t for t in range(rounds))
                    enc += sum(len(r.ctx) + t + 1 + N_FUTURE_MASKS + 1 for t in range(rounds))
                    scored += rounds
            else:
                reqs = tokenize_requests(tok, cfg, [i.args for i in insts])
                dec = float(sum(len(r.ctx) + len(r.cont) - 1 for r in reqs))
                enc = float(sum(len(r.ctx) + j + 1 + N_FUTURE_MASKS + 1 for r in reqs for j in range(len(r.cont))))
                scored = float(sum(len(r.cont) for r in reqs))
            out[item["key"]] = {"docs": docs, "requests": len(reqs), "decoder_tokens": dec, "encoder_tokens": enc,
                                "scored": scored, "split": item["data"]["split"]}
            print(f"{item['key']}: {docs} docs, {len(reqs)} requests", file=sys.stderr)
    wg = out["winogrande"]
    out["wsc273"] = {k: (v / wg["docs"] * 273 if k not in ("split", "docs") else v) for k, v in wg.items()}
    out["wsc273"].update(docs=273, split="test (estimated at WinoGrande's tokens per document)")
    for name, docs in PAPER_SPLIT_DOCS.items():
        row = out[name]
        if row["docs"] != docs:
            f = docs / row["docs"]
            out[name] = {**{k: (v * f if isinstance(v, float) or k == "requests" else v) for k, v in row.items()},
                         "docs": docs, "split": f"test (scaled from {row['split']})"}
    return out


def estimate(counts: dict[str, dict[str, float]]) -> list[dict[str, float | str]]:
    rows = []
    for size in SIZES:
        c = ModelConfig.preset(size)
        d, L, V = c.hidden_size, c.num_layers, c.vocab_size
        per_layer = 4 * d * d + 3 * d * c.intermediate_size  # q, k, v, o; GeGLU in (2x) and out
        total_params = L * per_layer + V * d
        mfu = interpolated_mfu(total_params, SCORING_MFU)
        row: dict[str, float | str] = {"size": size, "params": total_params, "mfu": mfu}
        for kind in ("decoder", "encoder"):
            flops = 0.0
            for t in counts.values():
                toks = t[f"{kind}_tokens"]
                seq = toks / max(1.0, t["requests"] if kind == "decoder" else t["scored"])
                flops += 2 * L * per_layer * toks + 4 * L * d * seq * toks + 2 * d * V * t["scored"]
            row[f"{kind}_tflop"] = flops / 1e12
            row[f"{kind}_minutes"] = flops / (row["mfu"] * PEAK) / 60  # type: ignore[operator]
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the counts and estimates as JSON")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tok = build_ettin_tokenizer(tmp)
        cfg = ModelConfig.preset("ettin-150m")
        counts = count(tok, cfg)
    rows = estimate(counts)
    total = {k: sum(float(t[k]) for t in counts.values())
             for k in ("docs", "requests", "decoder_tokens", "encoder_tokens", "scored")}
    print("| task | split | documents | requests | decoder tokens | encoder tokens (masked copies) |")
    print("|---|---|---|---|---|---|")
    for name, t in counts.items():
        print(f"| {name} | {t['split']} | {t['docs']:,.0f} | {t['requests']:,.0f} | {t['decoder_tokens'] / 1e6:.2f}M "
              f"| {t['encoder_tokens'] / 1e6:.1f}M |")
    print(f"| all | | {total['docs']:,.0f} | {total['requests']:,.0f} | {total['decoder_tokens'] / 1e6:.2f}M | "
          f"{total['encoder_tokens'] / 1e6:.1f}M |")
    print("\n| size | assumed MFU | decoder, estimated minutes on one H100 | encoder, estimated minutes |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {float(r['mfu']):.1%} | {float(r['decoder_minutes']):.1f} | "
              f"{float(r['encoder_minutes']):.1f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"counts": counts, "total": total, "estimates": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
