"""Training-loop overhead: the full trainer step vs the bare model step on the same batches.

    python bench/train_overhead.py [--preset cpu-small] [--objective mlm] [--steps 30] [--write]

Bare step: forward (fused head + loss on the objective's positions) + backward + StableAdamW step, on
micro-batches packed and masked beforehand. Loop step: `Trainer.fit` on the same recipe, seed and data (so the
same batches), with everything it does each step: batch-size schedule, reading and packing the samples, masking,
LR schedule, loss reduction, metrics.jsonl, the progress bar, periodic checkpoint checks. Each figure is the
median over steps after the first few (warm-up), measured as wall time and as process CPU time (one thread:
CPU time is what the step costs, regardless of other jobs on a shared machine). Data and logging shares are
the trainer's own `data_s` and `log_s` per step (metrics.jsonl). `--write` replaces this script's section of
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- train_overhead:begin -->", "<!-- train_overhead:end -->"


def recipe_for(args, data: Path) -> dict:
    return {
        "name": "bench", "objective": args.objective, "seed": 21, "data": str(data), "precision": "fp32",
        "progress": True, "tensorboard": False,
        "model": {"preset": args.preset, "overrides": {"attention_dropout": 0.0}},
        "optim": {"lr": 1e-3, "weight_decay": 1e-4},
        "checkpoint": {"every_tokens": 0},
        "phases": {"pretrain": {"tokens": args.steps * args.batch * args.seq_len, "seq_len": args.seq_len,
                                "batch_size": args.batch, "micro_batch_tokens": args.micro_tokens,
                                "mask_ratio": 0.3, "schedule": {"warmup_tokens": 0}}},
    }


class Clock:
    """Callback: wall and CPU time between consecutive steps (everything the loop does)."""

    def __init__(self):
        self.marks = []

    def __getattr__(self, name):
        return lambda *a, **k: None

    def on_log(self, trainer, row):
        self.marks.append((time.perf_counter(), time.process_time(), row["step_tokens"]))


def loop_times(args, data: Path, out: Path):
    from twinlm.train.recipe import load_recipe
    from twinlm.train.trainer import Trainer
    clock = Clock()
    trainer = Trainer(load_recipe(recipe_for(args, data)), out, callbacks=[clock], log=lambda m: None)
    trainer.fit()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    m = clock.marks
    wall = [b[0] - a[0] for a, b in zip(m, m[1:])][args.warmup:]
    cpu = [b[1] - a[1] for a, b in zip(m, m[1:])][args.warmup:]
    rows = rows[args.warmup + 1:]
    return wall, cpu, rows, trainer


def bare_times(args, trainer):
    """The same batches through model + optimizer only, on a fresh model (same init seed)."""
    from twinlm.data import BatchStream, pack
    from twinlm.model import Transformer
    from twinlm.train.datasets import build_dataset
    from twinlm.train.objectives import build_objective
    from twinlm.train.optim import build_optimizer
    r = trainer.recipe
    phase = r.phase_list()[0]
    torch.manual_seed(r.seed)
    model = Transformer(trainer.bare_model.config)
    model.train()
    opt = build_optimizer(model, lr=1e-3, betas=r.optim.betas, eps=r.optim.eps, weight_decay=1e-4)
    cfg = model.config
    obj = build_objective(r.objective, seed=r.seed, mask_ratio=phase.mask_ratio, mask_token_id=cfg.mask_token_id,
                          special_ids=(cfg.cls_token_id, cfg.sep_token_id, cfg.pad_token_id),
                          random_high=cfg.vocab_size)
    stream = BatchStream(build_dataset(r.data if not phase.data else phase.data, r.seed), r.seed)
    steps = []
    for s in range(args.steps):
        samples = [(i, a[:phase.seq_len]) for i, a in stream.next_step(phase.batch_size)]
        mbs = []
        for mb in pack(samples, phase.micro_batch_tokens):
            p = obj.prepare(mb.input_ids.numpy(), mb.cu_seqlens.numpy(), mb.sample_ids, salt=s + 1)
            mbs.append((p.input_ids, mb.cu_seqlens, mb.max_seqlen, p.positions, p.targets))
        steps.append(mbs)
    wall, cpu = [], []
    for mbs in steps:
        t0, c0 = time.perf_counter(), time.process_time()
        total = sum(int(m[4].numel()) for m in mbs)
        for ids, cu, ms, pos, tgt in mbs:
            loss = model(ids, cu_seqlens=cu, max_seqlen=ms, prediction_positions=pos, labels=tgt).loss
            (loss * (tgt.numel() / total)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall[args.warmup:], cpu[args.warmup:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu-small")
    ap.add_argument("--objective", default="mlm", choices=["mlm", "clm", "mntp"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-tokens", type=int, default=4096)
    ap.add_argument("--data", help="a shard folder (default: synthetic shards)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write", action="store_true", help="replace this script's section of bench/RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from twinlm.train.testing import make_shards
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = Path(args.data) if args.data else make_shards(tmp / "shards", n_docs=2000, min_len=args.seq_len // 2,
                                                             max_len=args.seq_len, vocab=4000)
        # alternate: bare, loop, bare (medians over both bare runs) to even out machine load drift
        b1 = None
        wall_l, cpu_l, rows, trainer = loop_times(args, data, tmp / "run")
        b1 = bare_times(args, trainer)
        wall_l2, cpu_l2, rows2, _ = loop_times(args, data, tmp / "run2")
        b2 = bare_times(args, trainer)
    med = statistics.median
    bare_wall, bare_cpu = med(b1[0] + b2[0]), med(b1[1] + b2[1])
    loop_wall, loop_cpu = med(wall_l + wall_l2), med(cpu_l + cpu_l2)
    rows = rows + rows2
    data_s = med(r["data_s"] for r in rows)
    log_s = med(r.get("log_s", 0.0) for r in rows)
    tokens = med(r["step_tokens"] for r in rows)
    load = os.getloadavg()[0]
    res = {
        "preset": args.preset, "objective": args.objective, "steps": args.steps, "tokens_per_step": tokens,
        "bare_wall_s": bare_wall, "bare_cpu_s": bare_cpu, "loop_wall_s": loop_wall, "loop_cpu_s": loop_cpu,
        "overhead_cpu": loop_cpu / bare_cpu - 1, "overhead_wall": loop_wall / bare_wall - 1,
        "data_share": data_s / loop_wall, "log_share": log_s / loop_wall, "data_s": data_s, "log_s": log_s,
        "load": load,
    }
    print(json.dumps(res, indent=2))
    if args.write:
        write(args, res)
    return 0


def write(args, r) -> None:
    path = ROOT / "bench" / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    cmd = " ".join(["python", "bench/train_overhead.py"] + sys.argv[1:])
    section = f"""{BEGIN}
## Training-loop overhead (`bench/train_overhead.py`)

Command: `{cmd}`
Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared; 1-minute load average {r['load']:.1f} at the end),
torch {torch.__version__}, {args.threads} thread(s). Model `{r['preset']}`, objective {r['objective']}, fp32,
{int(r['tokens_per_step'])} tokens per step (batch {args.batch} × ≤{args.seq_len}),
medians over {args.steps - args.warmup} steps × 2 runs. Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.

| | bare model step | trainer step | overhead |
|---|---|---|---|
| CPU time per step (s) | {r['bare_cpu_s']:.3f} | {r['loop_cpu_s']:.3f} | {100 * r['overhead_cpu']:+.1f}% |
| wall time per step (s) | {r['bare_wall_s']:.3f} | {r['loop_wall_s']:.3f} | {100 * r['overhead_wall']:+.1f}% |

Shares of the trainer step (wall): data (read, pack, mask, count reduction) {100 * r['data_share']:.2f}%
({1000 * r['data_s']:.1f} ms); logging (metrics.jsonl line) {100 * r['log_share']:.3f}% ({1000 * r['log_s']:.2f} ms).
Bare step = forward + backward + StableAdamW on batches packed and masked beforehand; trainer step = the time
between consecutive steps of `Trainer.fit` (everything included: schedule, data, masking, reductions,
metrics file, progress bar). CPU time is the figure to read on this shared machine; wall time moves with the
load of other jobs.
{END}"""
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


if __name__ == "__main__":
    raise SystemExit(main())
