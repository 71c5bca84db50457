"""Training-step throughput of twinlm against transformers' own ModernBERT classes, same run, same shape.

One step = forward + backward + AdamW step. Encoder: masked LM with 30% of tokens predicted (twinlm runs the
head on the masked positions only; transformers' ModernBertForMaskedLM as configured by default computes every
position's logits and ignores the unmasked labels). Decoder: next-token prediction on every position.

The models are timed alternately (twinlm step, transformers step, twinlm step, …) so that load from other
processes on a shared machine hits both alike; the median step time gives tokens/s.

    python bench/model_throughput.py                       # CPU: ettin-17m, fp32, batch 8 x 512 (RESULTS.md)
    python bench/model_throughput.py --device cuda         # GPU: ettin-150m, bf16 autocast, batch 32 x 1024, MFU
    python bench/model_throughput.py --no-write            # print only

Results go to bench/RESULTS.md between the model-throughput markers (other sections are kept).
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from peaks import peak_flops  # noqa: E402
from twinlm import ModelConfig, Transformer  # noqa: E402
from twinlm.train import dist  # noqa: E402
from twinlm.train.optim import build_optimizer  # noqa: E402
from workloads import executed_flops_per_token, packed_batch, train_step  # noqa: E402

START, END = "<!-- model_throughput:start -->", "<!-- model_throughput:end -->"
HF_COMPILED = "transformers (torch.compile)"


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    d = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
         "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        d["gpu"] = torch.cuda.get_device_name(0)
    return d


def hf_model(model: Transformer, causal: bool, sparse: bool, device):
    """transformers' class with twinlm's weights (through save_pretrained, i.e. the real interchange path)."""
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        cfg = json.loads((Path(tmp) / "config.json").read_text())
        # same computation on both sides: no dropout (transformers would apply attention_dropout to the attention
        # probabilities too, which the Ettin recipe does not; its released configs set 0.0)
        cfg["attention_dropout"] = 0.0
        if not causal:
            cfg["sparse_prediction"] = sparse
        (Path(tmp) / "config.json").write_text(json.dumps(cfg))
        cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModelForMaskedLM
        hf = cls.from_pretrained(tmp, attn_implementation="sdpa")
    return hf.to(device).train()


def make_batch(cfg: ModelConfig, batch: int, seq: int, mask_frac: float, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, min(cfg.vocab_size, 50280), (batch, seq), generator=g)
    n = batch * seq
    if cfg.causal:
        labels = torch.roll(ids, -1, 1)
        labels[:, -1] = -100
        twin = dict(labels=labels.to(device))
        hf = dict(labels=ids.to(device))  # transformers shifts inside its loss
        return ids.to(device), twin, hf
    pos = torch.randperm(n, generator=g)[: int(mask_frac * n)].sort().values
    labels_full = torch.full((n,), -100, dtype=torch.long)
    labels_full[pos] = ids.view(-1)[pos]
    inp = ids.clone().view(-1)
    inp[pos] = cfg.mask_token_id
    inp = inp.view(batch, seq)
    twin = dict(prediction_positions=pos.to(device), labels=ids.view(-1)[pos].to(device))
    hf = dict(labels=labels_full.view(batch, seq).to(device))
    return inp.to(device), twin, hf


def run(kind: str, args) -> dict:
    device = torch.device(args.device)
    causal = kind == "decoder"
    cfg = ModelConfig.preset(args.preset, causal=causal, attention_dropout=args.dropout)
    torch.manual_seed(0)
    twin = Transformer(cfg).to(device).train()
    models = {"twinlm": twin, "transformers": hf_model(twin, causal, False, device)}
    if args.hf_sparse and not causal:
        models["transformers (sparse_prediction=True)"] = hf_model(twin, causal, True, device)
    if args.hf_compile:  # transformers' own model under torch.compile (its default settings)
        models[HF_COMPILED] = torch.compile(hf_model(twin, causal, False, device))
    if args.compile:  # as the trainer's `compile: true` compiles it: each block, in place (train/dist.py)
        dist.parallelize(twin, dist.DistEnv(device=device), compile=True)
    compiled = {name for name in models if name == HF_COMPILED or (name == "twinlm" and args.compile)}
    ids, twin_kw, hf_kw = make_batch(cfg, args.batch, args.seq, args.mask, device)
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=1e-5,
                                    fused=True)
            for name, m in models.items()}
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu",
                                                                                                      enabled=False)
    steps = {}
    for name, m in models.items():
        kw = twin_kw if name == "twinlm" else hf_kw

        def step(m=m, kw=kw, opt=opts[name]):
            with amp:
                loss = m(ids, **kw).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        steps[name] = step
    times: dict[str, list[float]] = {name: [] for name in models}
    for name in models:  # warm-up (+ the compiling step for a compiled model)
        for _ in range(args.warmup + (name in compiled)):
            steps[name]()
    if device.type == "cuda":
        torch.cuda.synchronize()
    for _ in range(args.steps):
        for name in models:
            t0 = time.perf_counter()
            steps[name]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    tokens = args.batch * args.seq
    res = {"kind": kind, "preset": args.preset, "batch": args.batch, "seq": args.seq, "rows": {}}
    # MFU in two conventions: the paper's (REFERENCE.md §5: 6 x matmul params, tied head included, + 12 x layers x
    # hidden x seq: full attention everywhere, the full head for every token) and the FLOPs twinlm executes
    # (flops_per_token: windows, causality and the sparse head counted)
    matmul = sum(p.numel() for n, p in twin.named_parameters() if p.dim() == 2)
    ref_flops = 6 * matmul + 12 * cfg.num_layers * cfg.hidden_size * args.seq
    executed = twin.flops_per_token(args.seq, 1.0 if causal else args.mask)
    peak = peak_flops(torch.cuda.get_device_name(0) if device.type == "cuda" else None, args.peak_tflops)
    for name, ts in times.items():
        med = statistics.median(ts)
        row = {"step_s": med, "tok_s": tokens / med, "best_tok_s": tokens / min(ts), "all_s": [round(t, 3) for t in ts]}
        if peak:
            row["mfu"] = ref_flops * row["tok_s"] / peak
            row["mfu_executed"] = executed * row["tok_s"] / peak
        res["rows"][name] = row
    base, base_best = res["rows"]["transformers"]["tok_s"], res["rows"]["transformers"]["best_tok_s"]
    for name, row in res["rows"].items():
        row["ratio"] = row["tok_s"] / base
        row["ratio_best"] = row["best_tok_s"] / base_best
        # steps alternate, so step r of each model saw similar load: the median of per-round ratios is the
        # figure least moved by other processes
        row["ratio_paired"] = statistics.median(h / t for h, t in zip(times["transformers"], times[name]))
        if HF_COMPILED in times:
            row["ratio_vs_hf_compiled_paired"] = statistics.median(h / t for h, t in zip(times[HF_COMPILED],
                                                                                       times[name]))
    del models, opts, steps
    return res


def run_packed(kind: str, args) -> dict:
    """Eager vs compiled twinlm on the trainer's packed path with StableAdamW, alternating steps."""
    device = torch.device(args.device)
    causal = kind == "decoder"
    cfg = ModelConfig.preset(args.preset, causal=causal, attention_dropout=args.dropout)
    tokens = args.micro_batch_tokens or (32768 if device.type == "cuda" else 4096)
    batches = [packed_batch(cfg, tokens, "clm" if causal else "mlm", seed=s, max_doc=args.seq) for s in range(2)]
    models, steps = {}, {}
    for name in ("eager", "compiled"):
        torch.manual_seed(0)
        m = Transformer(cfg).to(device).train()
        if name == "compiled":
            dist.parallelize(m, dist.DistEnv(device=device), compile=True)
        opt = build_optimizer(m, lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=1e-5,  # as the trainer
                              compile=name == "compiled" and device.type == "cuda")
        models[name], steps[name] = m, train_step(m, batches, opt, device)
    times = {name: [] for name in steps}
    for name in steps:
        for _ in range(max(args.warmup, 1) + (1 if name == "compiled" else 0)):  # + the compiling step
            steps[name]()
    for _ in range(args.steps):
        for name in steps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            steps[name]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    ntok = sum(int(b["input_ids"].numel()) for b in batches)
    executed = executed_flops_per_token(models["eager"], batches)
    peak = peak_flops(torch.cuda.get_device_name(0) if device.type == "cuda" else None, args.peak_tflops)
    res = {"kind": kind, "preset": args.preset, "tokens_per_step": ntok, "rows": {}}
    for name, ts in times.items():
        row = {"step_s": statistics.median(ts), "tok_s": ntok / statistics.median(ts),
               "all_s": [round(t, 3) for t in ts]}
        if peak:
            row["mfu_executed"] = executed * row["tok_s"] / peak
        res["rows"][name] = row
    res["compiled_over_eager_paired"] = statistics.median(e / c for e, c in zip(times["eager"], times["compiled"]))
    return res


def markdown(results: list[dict], info: dict, args, cmd: str) -> str:
    lines = [START, "## Model throughput (`bench/model_throughput.py`)", "",
             f"Command: `{cmd}`  ", f"Machine: {info.get('gpu', info['cpu'])}, {info['cores']} cores "
             f"(torch threads {info['torch_threads']}), torch {info['torch']}, transformers {info['transformers']}, "
             f"Python {info['python']}  ",
             f"Shape: {args.preset}, batch {args.batch} x {args.seq}, "
             f"{'bf16 autocast' if args.device == 'cuda' else 'fp32'}, step = forward + backward + AdamW; "
             f"encoder masked LM at {args.mask:.0%}, decoder next-token on every position. {args.steps} alternating "
             f"steps per model after {args.warmup} warm-up step(s); median and best (least disturbed) step.", "",
             "| model | implementation | median step (s) | tokens/s (median) | tokens/s (best step) | "
             "vs transformers (median of per-round ratios) | vs transformers (median / median) |" +
             (" MFU paper convention | MFU executed (flops_per_token) |" if args.device == "cuda" else ""),
             "|---|---|---|---|---|---|---|" + ("---|---|" if args.device == "cuda" else "")]
    for r in results:
        for name, row in r["rows"].items():
            mfu = f" {row['mfu']:.1%} | {row['mfu_executed']:.1%} |" if "mfu" in row else ""
            lines.append(f"| {r['kind']} | {name} | {row['step_s']:.2f} | {row['tok_s']:,.0f} | "
                         f"{row['best_tok_s']:,.0f} | {row['ratio_paired']:.2f}x | {row['ratio']:.2f}x |{mfu}")
        lines.append("| | step times (s) | " + "; ".join(
            f"{n}: {', '.join(f'{t:.2f}' for t in row['all_s'])}" for n, row in r["rows"].items()) + " | | | | |" +
            (" | |" if args.device == "cuda" else ""))
    lines += ["", "Notes: twinlm runs the masked-LM head on the masked positions only (sparse prediction) and the "
              "decoder's head + cross-entropy chunked (`labels=`); transformers runs as its classes are configured "
              "by default (dense MLM logits). Both run without dropout (the same computation; twinlm's recipe "
              "value 0.1 is `--dropout 0.1`). The machine is shared with other processes: absolute numbers move, "
              "the ratios are from "
              "alternating steps in one process." + (" " + args.note if args.note else ""), END]
    return "\n".join(lines) + "\n"


def write_results(section: str, path: Path, start: str = START, end: str = END) -> None:
    """Replaces the section between `start` and `end` in RESULTS.md (or appends it); `section` includes both."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1]
        text = before + section.rstrip("\n") + after
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--preset", default=None, help="default: ettin-17m on CPU, ettin-150m on CUDA")
    p.add_argument("--batch", type=int, default=None, help="default: 8 on CPU, 32 on CUDA")
    p.add_argument("--seq", type=int, default=None, help="default: 512 on CPU, 1024 on CUDA")
    p.add_argument("--mask", type=float, default=0.3, help="encoder masking fraction")
    p.add_argument("--steps", type=int, default=None, help="timed steps per model (default 5 CPU, 20 CUDA)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--kinds", default="encoder,decoder")
    p.add_argument("--compile", action="store_true",
                   help="twinlm with compiled blocks, as the trainer's `compile: true` (train/dist.py)")
    p.add_argument("--hf-compile", action="store_true",
                   help="also time transformers under torch.compile; ratios against it are reported too")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="twinlm's attention-output dropout (default 0: the same computation as transformers)")
    p.add_argument("--hf-sparse", action="store_true", help="also time transformers with sparse_prediction=True")
    p.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    p.add_argument("--note", default="", help="a sentence appended to the notes in RESULTS.md")
    p.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"))
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the card's dense bf16 peak in TFLOP/s (default: looked up by exact device name)")
    p.add_argument("--packed", action="store_true",
                   help="the trainer's workload instead: packed documents, the real objective, StableAdamW; twinlm "
                        "eager against twinlm with compiled blocks (train/dist.py), no transformers")
    p.add_argument("--micro-batch-tokens", type=int, default=None, help="--packed: default 4096 CPU, 32768 CUDA")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is available")
    args.preset = args.preset or ("ettin-150m" if cuda else "ettin-17m")
    args.batch = args.batch or (32 if cuda else 8)
    args.seq = args.seq or (1024 if cuda else 512)
    args.steps = args.steps or (20 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    info = machine()
    print(json.dumps(info))
    if args.packed:
        for kind in args.kinds.split(","):
            print(json.dumps(run_packed(kind.strip(), args)), flush=True)
        return 0
    results = []
    for kind in args.kinds.split(","):
        r = run(kind.strip(), args)
        results.append(r)
        for name, row in r["rows"].items():
            extra = f", MFU {row['mfu']:.1%}" if "mfu" in row else ""
            if "ratio_vs_hf_compiled_paired" in row:
                extra += f", {row['ratio_vs_hf_compiled_paired']:.2f}x transformers compiled (paired)"
            print(f"{kind:8s} {name:40s} {row['tok_s']:10,.0f} tok/s median ({row['ratio']:.2f}x; paired "
                  f"{row['ratio_paired']:.2f}x), {row['best_tok_s']:,.0f} best  steps {row['all_s']}{extra}",
                  flush=True)
    cmd = "python bench/model_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = markdown(results, info, args, cmd.strip())
    if not args.no_write:
        write_results(section, Path(args.results))
        print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
