"""Tokens per CPU second of a training step in fp32, bf16 autocast and `torch.compile`d blocks, and the loss
curve of bf16 against fp32 over a CPU recipe.

    python bench/cpu_precision.py throughput [--preset cpu-small] [--steps 12] [--threads 1] [--json FILE]
    python bench/cpu_precision.py curve --data SHARDS --tokenizer DIR [--curve-tokens 200K] [--json FILE]

throughput: the bare step (forward with the fused head + loss on 30% of the positions, backward, StableAdamW
step) on one packed 4,096-token micro-batch of random ids, for each variant in turn, round-robin (so that
the load of a shared machine falls on all variants alike); the figure is the median over steps after the
first two of each variant (compile's warm-up), as process CPU time (the step's cost whatever else runs) and
wall time.

curve: the cpu recipe's encoder and decoder (the shipped `recipes/cpu/{encoder,decoder}.yaml`, pre-training phase
only) trained for `--tokens` on the given shards with `precision=fp32`, `precision=bf16`, and `precision=fp32`
with another seed (the noise: how far two fp32 runs that differ only in initialisation and masks end apart).
bf16 is within noise when |bf16 - fp32| of the final loss (mean of the last 10 steps) is no larger than
|fp32 seed A - fp32 seed B|.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def cpu_flags() -> list[str]:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if "bf16" in f or f.startswith("amx"))


def throughput(args) -> dict:
    from twinlm.config import ModelConfig
    from twinlm.model import Transformer
    from twinlm.train.optim import build_optimizer

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    cfg = ModelConfig.preset(args.preset, causal=args.objective == "clm")
    n, seq = args.tokens, args.seq_len
    ids = torch.randint(5, cfg.vocab_size, (n,), generator=g)
    cu = torch.arange(0, n + 1, seq, dtype=torch.int32)
    pos = torch.randperm(n, generator=g)[: int(0.3 * n)].sort().values
    tgt = torch.randint(5, cfg.vocab_size, (len(pos),), generator=g)
    variants = {}
    for name in args.variants:
        torch.manual_seed(21)
        model = Transformer(cfg).train()
        if "compile" in name:
            for block in model.layers:
                block.compile()
        opt = build_optimizer(model, lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=1e-4)
        variants[name] = (model, opt, torch.bfloat16 if "bf16" in name else None)
    times = {name: ([], []) for name in variants}
    for _ in range(args.steps):
        for name, (model, opt, dtype) in variants.items():
            t0, c0 = time.perf_counter(), time.process_time()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                loss = model(ids, cu_seqlens=cu, max_seqlen=seq, prediction_positions=pos, labels=tgt).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times[name][0].append(time.perf_counter() - t0)
            times[name][1].append(time.process_time() - c0)
    out = {}
    for name, (wall, cpu) in times.items():
        w, c = statistics.median(wall[2:]), statistics.median(cpu[2:])
        out[name] = {"wall_s": w, "cpu_s": c, "tokens_per_cpu_s": n / c, "tokens_per_s": n / w}
    return out


def curve(args) -> dict:
    from twinlm.train import run as train
    from twinlm.train.recipe import find_recipe, load_raw

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for objective in args.objectives:
            recipe = load_raw(find_recipe(f"cpu/{objective}"))
            recipe["phases"] = {"pretrain": recipe["phases"]["pretrain"]}  # the pre-training phase only
            for label, precision, seed in (("fp32", "fp32", 21), ("bf16", "bf16", 21), ("fp32-seed2", "fp32", 22)):
                out = Path(tmp) / f"{objective}-{label}"
                overrides = [f"precision={precision}", f"seed={seed}", f"tokenizer={args.tokenizer}",
                             f"phases.pretrain.data={args.data}", f"phases.pretrain.seq_len={args.seq_len}",
                             f"phases.pretrain.tokens={args.curve_tokens}", "checkpoint.every_tokens=0",
                             f"phases.pretrain.batch_size={args.batch_size or 4096 // args.seq_len}",
                             "phases.pretrain.batch_warmup_tokens=0"]
                t0, c0 = time.perf_counter(), time.process_time()
                train(recipe, out, overrides, log=lambda m: None)
                rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
                runs[f"{objective}/{label}"] = {
                    "final_loss": statistics.mean(r["loss"] for r in rows[-10:]),
                    "losses": [round(r["loss"], 4) for r in rows], "tokens": rows[-1]["tokens"],
                    "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
                print(f"{objective}/{label}: final loss {runs[f'{objective}/{label}']['final_loss']:.4f}",
                      file=sys.stderr, flush=True)
    verdicts = {}
    for objective in args.objectives:
        a, b, c = (runs[f"{objective}/{k}"]["final_loss"] for k in ("fp32", "bf16", "fp32-seed2"))
        verdicts[objective] = {"bf16_minus_fp32": b - a, "seed_noise": abs(c - a),
                               "within_noise": abs(b - a) <= abs(c - a)}
    return {"runs": runs, "verdicts": verdicts}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["throughput", "curve"])
    ap.add_argument("--preset", default="cpu-small")
    ap.add_argument("--objective", default="mlm", choices=["mlm", "clm"])
    ap.add_argument("--variants", nargs="+", default=["fp32", "bf16", "fp32+compile", "bf16+compile"])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per step (throughput)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", help="curve: pre-training shard folder")
    ap.add_argument("--tokenizer", help="curve: its tokenizer folder")
    ap.add_argument("--curve-tokens", default="200K")
    ap.add_argument("--batch-size", type=int, help="curve: sequences per step (default: 4,096 tokens' worth)")
    ap.add_argument("--objectives", nargs="+", default=["encoder", "decoder"])
    ap.add_argument("--json", help="write the measurements here")
    args = ap.parse_args()
    env = {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "flags": cpu_flags(),
           "threads": args.threads if args.what == "throughput" else torch.get_num_threads()}
    res = {"env": env, **(throughput(args) if args.what == "throughput" else curve(args))}
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
