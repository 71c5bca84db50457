"""The device check: everything a first GPU run could get wrong, and the speed targets, on one H100/H200.

Each section runs in its own process, time-boxed (BUDGET: at most 19 minutes in all; 268 s for the first nine
sections on an H200). Where a command may run 10 minutes at most, split it, e.g.
`syncs profile train targets` then `bench`.

    python bench/gpu_check.py                   # every section
    python bench/gpu_check.py attn syncs        # some sections
    python bench/gpu_check.py --cpu             # a tiny version of every section on the CPU (tests/test_gpu_check.py)
    python bench/gpu_check.py --out DIR         # JSON lines to DIR/gpu_check.jsonl (default: $OUT, else bench/)

Sections (each prints one or more JSON lines; a failure is recorded as {"error": ...}, never raised, and a
section that overruns its time box is recorded as {"timeout": seconds}):

  env      versions, flash-attn / FA3 presence, varlen_attn's signature, what "auto" picks in bf16
  pytest   the `gpu`-marked tests (attention, model, and the eval tracks on the device vs the CPU)
  attn     every backend against the fp32 eager reference: outputs and q/k/v gradients, bf16, six windows,
           documents of mixed lengths
  model    the tiny model on the device vs the CPU (fp32 and bf16), packed vs one document at a time
  evaltracks  the bpb and pairs tracks on the device (bf16 autocast) vs the CPU (fp32) on tiny toy models:
           agreement (bpb, per-sentence log-likelihoods) and seconds on each
  syncs    host syncs in one trainer micro-batch (forward + backward), counted by source line under
           torch.cuda.set_sync_debug_mode (on the CPU: the host reads of tests/test_syncs.py's emulation)
  step     the trainer's step at 150M (packed documents, the real objective, StableAdamW, bf16, dropout 0.1):
           tokens/s, peak memory, MFU in the paper's convention and in executed FLOPs (flops_per_token)
  memory   400M and 1B: measured peak per micro-batch token against twinlm.memory's estimate
  bench    bench/model_throughput.py at 150M: twinlm with compiled blocks against transformers eager and
           under torch.compile, encoder and decoder
  profile  torch.profiler over two 150M training steps, eager and with compiled blocks: the ops taking the most
           device time
  compile  compiled blocks over six packed layouts: graphs per layout, step time eager vs compiled
  targets  17M tok/s in the trainer's step (compiled blocks, 65,536-token micro-batches) and 1B MFU in
           executed FLOPs (compiled blocks, the largest micro-batch the memory plan fits)
  graphs   17M MLM at 16,384 and 65,536-token micro-batches: compiled blocks (dynamic shapes) against the whole
           model compiled at static shapes (train/static.py) and against CUDA graphs (`cuda_graphs: true`)

`speed` names the speed sections (bench, graphs, targets: at most 8 minutes in all):
`python bench/gpu_check.py speed`.
  train    the real trainer (`twinlm train`'s Trainer) on the device: ettin-17m on synthetic shards, two phases,
           compiled blocks and bf16 (tokens/s, loss first -> last, final/ loads); then eager: a run stopped
           at a checkpoint and resumed against an uninterrupted run (per-step loss differences), with a second
           uninterrupted run as the noise floor of the device's non-deterministic kernels
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from peaks import peak_flops  # noqa: E402
from workloads import executed_flops_per_token, packed_batch, train_step  # noqa: E402

# seconds per section on a GPU, at most 1,100 s in all: the sections that compile come last (bench onwards), so
# an overrun of a time-limited command loses only them
BUDGET = {"env": 30, "pytest": 90, "attn": 50, "model": 25, "evaltracks": 45, "syncs": 40, "step": 80, "memory": 50,
          "bench": 210, "profile": 90, "train": 150, "compile": 90, "targets": 150, "graphs": 120}
GROUPS = {"speed": ["bench", "graphs", "targets"]}  # 480 s
CPU_BUDGET = 400  # per section with --cpu (a loaded 2-core machine)
# bench/roofline.py's predictions for the configurations these sections time (`roofline.py --gpu-check`), put
# beside each measurement so that the roofline is checked (and refitted) whenever a GPU runs this
PREDICTIONS = ROOT / "bench" / "roofline_predictions.json"
# torch's name of a card -> the roofline's name of the card it has constants for (bench/roofline.py DEVICES)
ROOFLINE_CARDS = {"NVIDIA H100 80GB HBM3": "NVIDIA H100 SXM", "NVIDIA H200": "NVIDIA H200"}


def predicted(preset: str, objective: str, tokens: int, compiled: bool) -> dict:
    """{"predicted_tok_s": …} from PREDICTIONS for this card and configuration, or {} when there is none."""
    card = ROOFLINE_CARDS.get(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else None
    if card is None or not PREDICTIONS.exists():
        return {}
    model = "twinlm (compiled blocks)" if compiled else "twinlm"
    for entry in json.loads(PREDICTIONS.read_text()):
        if (entry["device"]["name"], entry["preset"], entry["objective"]) == (card, preset, objective) \
                and model in entry["models"] and entry["models"][model]["micro_batch_tokens"] == tokens:
            pred = entry["models"][model]["predicted"]
            return {"predicted_tok_s": round(pred["tok_s"]), "predicted_mfu_executed": round(pred["mfu_executed"], 4),
                    "predicted_by": "bench/roofline.py"}
    return {}
SECTIONS = list(BUDGET)


class Check:
    def __init__(self, section: str, cpu: bool, out: Path):
        self.section, self.cpu, self.out = section, cpu, out
        self.dev = torch.device("cpu" if cpu else "cuda")

    def emit(self, row: dict) -> None:
        line = json.dumps({"section": self.section, **row}, default=str)
        print(line, flush=True)
        with open(self.out, "a") as f:
            f.write(line + "\n")

    def sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn, steps: int, warmup: int) -> float:
        for _ in range(warmup):
            fn()
        self.sync()
        ts = []
        for _ in range(steps):
            t0 = time.perf_counter()
            fn()
            self.sync()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    # --- sections ---------------------------------------------------------------------------------------------
    def env(self):
        from twinlm.attention import _auto_backend, varlen_available, varlen_signature_ok

        row = {"torch": torch.__version__, "cuda": torch.version.cuda,
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               "flash_attn": importlib.util.find_spec("flash_attn") is not None,
               "flash_attn_interface (FA3)": importlib.util.find_spec("flash_attn_interface") is not None}
        if importlib.util.find_spec("torch.nn.attention.varlen") is not None:
            from torch.nn.attention.varlen import varlen_attn

            row["varlen_attn_params"] = list(inspect.signature(varlen_attn).parameters)
            row["varlen_has_window_size_and_scale"] = varlen_signature_ok(varlen_attn)
        row["varlen_available"] = varlen_available()
        row["auto_backend_bf16"] = _auto_backend(torch.zeros(4, 2, 64, device=self.dev, dtype=torch.bfloat16))
        row["peak_bf16_tflops"] = (peak_flops(row["gpu"]) or 0) / 1e12 or None
        self.emit(row)

    def pytest(self):
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-m", "gpu", "-p", "no:cacheprovider",
               "tests/test_attention.py", "tests/test_model.py", "tests/test_eval_bpb_pairs_placement.py",
               "tests/test_eval_cls_ret_placement.py", "tests/test_eval_harness.py"]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        self.emit({"returncode": r.returncode, "summary": (r.stdout.strip().splitlines() or [""])[-1]})

    def attn(self):
        from twinlm.attention import PackedLayout, attention, flash_attn_available, varlen_available

        lens = [30, 70, 5] if self.cpu else [100, 300, 7, 150, 1024, 5]
        windows = [(-1, -1), (-1, 0), (64, 64), (63, 0), (3, 3), (2, 0)]
        backends = ["sdpa"] + (["varlen"] if varlen_available() else []) + (["flash"] if flash_attn_available() else [])
        backends += [] if self.cpu else ["flex"]  # FlexAttention has no backward on the CPU
        dt = torch.float32 if self.cpu else torch.bfloat16
        g = torch.Generator().manual_seed(0)
        n = sum(lens)
        base = [torch.randn(n, 4, 64, generator=g) for _ in range(3)]
        gout = torch.randn(n, 4, 64, generator=g).to(self.dev)
        cu = torch.tensor([0, *np.cumsum(lens).tolist()], dtype=torch.int32, device=self.dev)
        results = {}
        for w in windows:
            q, k, v = (t.to(self.dev).requires_grad_() for t in base)
            ref = attention(q, k, v, PackedLayout.from_cu_seqlens(cu), window=w, backend="eager")
            ref.backward(gout)
            ref_grads = [t.grad for t in (q, k, v)]
            for be in backends:
                try:
                    q, k, v = (t.to(self.dev, dt).requires_grad_() for t in base)
                    out = attention(q, k, v, PackedLayout.from_cu_seqlens(cu), window=w, backend=be)
                    out.backward(gout.to(dt))
                    errs = [float((a.float() - b).norm() / b.norm()) for a, b in
                            zip([out.detach(), q.grad, k.grad, v.grad], [ref.detach(), *ref_grads])]
                    results[f"{be} {w}"] = {"rel_err_out_dq_dk_dv": [round(e, 5) for e in errs],
                                            "ok": max(errs) < 0.03}
                except Exception as e:  # noqa: BLE001 - recorded, the check goes on
                    results[f"{be} {w}"] = {"error": repr(e)[:300]}
        self.emit({"backends": backends, "dtype": str(dt), "results": results,
                   "all_ok": all(r.get("ok", False) for r in results.values())})

    def model(self):
        from twinlm import ModelConfig, Transformer

        out = {}
        for causal in (False, True):
            cfg = ModelConfig.preset("cpu-tiny", causal=causal, attention_dropout=0.0)
            torch.manual_seed(0)
            m = Transformer(cfg).eval()
            lens = [5, 300, 1, 133]
            g = torch.Generator().manual_seed(0)
            docs = [torch.randint(5, 4000, (n,), generator=g) for n in lens]
            flat, cu = torch.cat(docs), torch.tensor([0, *np.cumsum(lens).tolist()], dtype=torch.int32)
            with torch.no_grad():
                ref = m(flat, cu_seqlens=cu).logits
                m = m.to(self.dev)
                fp32 = m(flat, cu_seqlens=cu).logits.cpu()
                with torch.autocast(self.dev.type, dtype=torch.bfloat16):
                    bf = m(flat, cu_seqlens=cu).logits.float().cpu()
                    alone = max(float((m(d[None].to(self.dev)).logits[0].float().cpu()
                                       - bf[cu[i]:cu[i + 1]]).abs().max()) for i, d in enumerate(docs))
            out["decoder" if causal else "encoder"] = {
                "device_fp32_vs_cpu": float((fp32 - ref).abs().max()), "bf16_vs_cpu": float((bf - ref).abs().max()),
                "bf16_packed_vs_alone": alone}
        self.emit(out)

    def evaltracks(self):
        import tempfile

        from twinlm.eval import bpb, pairs
        from twinlm.eval.common import load_for_eval
        from twinlm.eval.settings import BpbConfig, PairsConfig
        from twinlm.eval.toy import toy_model_dir, toy_sentences, toy_tokenizer

        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            sents = toy_sentences(100 if self.cpu else 2000, seed=9)
            held = root / "held.txt"
            held.write_text("\n\n".join(" ".join(sents[i:i + 5]) for i in range(0, len(sents), 5)) + "\n")
            tok = toy_tokenizer()
            for kind in ("encoder", "decoder"):
                folder = toy_model_dir(root / kind, causal=kind == "decoder", tokenizer=tok)
                row: dict = {"model": kind}
                bpb_cfg = BpbConfig(text_file=str(held), max_tokens=4096)
                pairs_cfg = PairsConfig(text_file=str(held), per_family=10 if self.cpu else 100)
                texts = [p.good for p in pairs.load_pairs(pairs_cfg)[1]]
                lls = []  # per-sentence log-likelihoods: the CPU's, then the device's
                for where in ("cpu", self.dev.type):  # (with --cpu: the CPU twice)
                    dev = torch.device(where)
                    t0 = time.perf_counter()
                    res = bpb.run(str(folder), bpb_cfg, log=None, device=dev)
                    self.sync()
                    row[f"bpb_{where}"] = res["average"]["mean"]
                    row[f"bpb_s_{where}"] = round(time.perf_counter() - t0, 2)
                    row[f"precision_{where}"] = res["config"]["precision"]
                    t0 = time.perf_counter()
                    res = pairs.run(str(folder), pairs_cfg, log=None, device=dev)
                    row[f"pairs_{where}"] = res["average"]["mean"]
                    row[f"pairs_s_{where}"] = round(time.perf_counter() - t0, 2)
                    loaded = load_for_eval(str(folder), device=dev)
                    lls.append(np.array(pairs.sentence_logliks(loaded.model, loaded.tokenizer, texts)))
                ll_cpu, ll_dev = lls
                row["bpb_rel_diff"] = abs(row[f"bpb_{self.dev.type}"] / row["bpb_cpu"] - 1)
                row["loglik_max_rel_diff"] = float(np.max(np.abs(ll_dev - ll_cpu) / np.maximum(1.0, np.abs(ll_cpu))))
                row["ok"] = row["bpb_rel_diff"] < 2e-2 and row["loglik_max_rel_diff"] < 3e-2
                self.emit(row)

    def syncs(self):
        from twinlm import ModelConfig, Transformer

        preset, tokens = ("cpu-tiny", 2048) if self.cpu else ("ettin-150m", 16384)
        cfg = ModelConfig.preset(preset, attention_dropout=0.1)
        m = Transformer(cfg).to(self.dev).train()
        batch = packed_batch(cfg, tokens, "mlm")
        amp = torch.autocast(self.dev.type, dtype=torch.bfloat16)
        with amp:  # warm-up: kernels loaded, allocator filled
            m(**batch).loss.backward()
        self.sync()
        if self.cpu:
            sys.path.insert(0, str(ROOT / "tests"))
            from test_syncs import HostReadError, no_host_reads_context

            try:
                with no_host_reads_context(), amp:
                    m(**batch).loss.backward()
                self.emit({"mode": "cpu emulation (tests/test_syncs.py)", "host_reads": 0})
            except HostReadError as e:
                self.emit({"mode": "cpu emulation (tests/test_syncs.py)", "host_reads": 1, "first": str(e)})
            return
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with amp:
                    loss = m(**batch).loss
                loss.backward()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        by_line: dict[str, int] = {}
        for w in caught:  # a warning from C++ is attributed to the Python line that called the op
            key = f"{w.filename.split('/site-packages/')[-1].split('/src/')[-1]}:{w.lineno}"
            by_line[key] = by_line.get(key, 0) + 1
        row = {"sync_warnings": len(caught), "by_line": by_line}
        if caught:  # again with syncs made errors: the stack of the first one names the code that asked for it
            torch.cuda.set_sync_debug_mode("error")
            try:
                with amp:
                    loss = m(**batch).loss
                loss.backward()
            except RuntimeError:
                frames = traceback.extract_tb(sys.exc_info()[2])
                row["first_sync_stack"] = [f"{f.filename.split('/site-packages/')[-1].split('/src/')[-1]}:"
                                           f"{f.lineno} {f.line}" for f in frames][-6:]
            finally:
                torch.cuda.set_sync_debug_mode(0)
        self.emit(row)

    def step(self):
        preset = "cpu-tiny" if self.cpu else os.environ.get("PRESET", "ettin-150m")
        tokens = 2048 if self.cpu else int(os.environ.get("MB_TOKENS", "32768"))
        for objective in ("mlm", "clm"):
            self.emit(self._step_row(preset, tokens, objective))

    def _training(self, preset: str, tokens: int, objective: str, *, compiled: bool = False,
                  checkpointing: bool = False):
        """-> (config, model, batches, step): the trainer's step on the device (2 packed micro-batches of <=
        `tokens`, StableAdamW, bf16 on the device, dropout 0.1), eager or with compiled blocks."""
        from twinlm import ModelConfig, Transformer
        from twinlm.train import dist
        from twinlm.train.optim import build_optimizer

        cfg = ModelConfig.preset(preset, causal=objective == "clm", attention_dropout=0.1)
        torch.manual_seed(0)
        m = Transformer(cfg).to(self.dev).train()
        if compiled or checkpointing:
            dist.parallelize(m, dist.DistEnv(device=self.dev), compile=compiled,
                             activation_checkpointing=checkpointing,
                             compile_backend="aot_eager" if self.cpu else "inductor")
        batches = [packed_batch(cfg, tokens, objective, seed=s) for s in range(2)]
        # compiled as the trainer compiles it with `compile: true` (on CUDA the update too)
        opt = build_optimizer(m, lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=1e-5,
                              compile=compiled and not self.cpu)
        return cfg, m, batches, train_step(m, batches, opt, self.dev)

    def _step_row(self, preset: str, tokens: int, objective: str, *, compiled: bool = False,
                  checkpointing: bool = False) -> dict:
        """The trainer's step (`_training`) timed: tokens/s, peak memory, FLOPs per token and both MFUs."""
        peak = None if self.cpu else peak_flops(torch.cuda.get_device_name(0))
        cfg, m, batches, step = self._training(preset, tokens, objective, compiled=compiled,
                                               checkpointing=checkpointing)
        ntok = sum(int(b["input_ids"].numel()) for b in batches)
        row = {"preset": preset, "objective": objective, "compiled_blocks": compiled,
               "activation_checkpointing": checkpointing, "micro_batch_tokens": tokens, "tokens_per_step": ntok}
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        s = self.timed(step, steps=2 if self.cpu else 6,
                       warmup=(1 if self.cpu else 2) + compiled)  # + the compiling step
        row.update(step_s=round(s, 4), tok_s=round(ntok / s), **predicted(preset, objective, tokens, compiled))
        if self.dev.type == "cuda":
            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        matmul = sum(p.numel() for p in m.parameters() if p.dim() == 2)
        paper = 6 * matmul + 12 * cfg.num_layers * cfg.hidden_size * 1024
        executed = executed_flops_per_token(m, batches)
        row.update(flops_per_token_paper=paper, flops_per_token_executed=round(executed))
        if peak:
            row.update(mfu_paper=round(paper * ntok / s / peak, 4), mfu_executed=round(executed * ntok / s / peak, 4))
        del m, step
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()
        return row

    def targets(self):
        """Two of the speed targets, each measured as it is stated: 17M tokens/s in the trainer's step with
        compiled blocks at the recipe's 65,536-token micro-batches (target >= 2M per H100), and 1B MFU in
        executed FLOPs with compiled blocks at the largest micro-batch the memory plan fits on this card (target
        >= 50%). The 150M targets are the `bench` section's."""
        from twinlm import ModelConfig
        from twinlm.memory import plan

        if self.cpu:
            self.emit({"target": "17M tok/s", **self._step_row("cpu-tiny", 2048, "mlm", compiled=True)})
            return
        self.emit({"target": "17M >= 2M tok/s", **self._step_row("ettin-17m", 65536, "mlm", compiled=True)})
        chosen = plan(ModelConfig.preset("ettin-1b"), micro_batch_tokens=32768,
                      card_bytes=torch.cuda.get_device_properties(0).total_memory)
        self.emit({"target": "1B >= 50% executed MFU",
                   **self._step_row("ettin-1b", chosen.micro_batch_tokens, "mlm", compiled=True,
                                    checkpointing=chosen.checkpointing)})

    def train(self):
        import tempfile

        import twinlm
        from twinlm.train.recipe import from_dict
        from twinlm.train.testing import make_shards, tiny_recipe
        from twinlm.train.trainer import Trainer

        # before the first cuBLAS call: cuBLAS is deterministic only with a fixed workspace
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        tmp = Path(tempfile.mkdtemp(prefix="twinlm-gpu-train-"))
        if self.cpu:
            preset, seq, docs, tokens, bs, mbt = "cpu-tiny", 64, 400, 3000, 8, 256
        else:
            preset, seq, docs, tokens, bs, mbt = "ettin-17m", 512, 6000, 400_000, 32, 8192
        data = make_shards(tmp / "shards", n_docs=docs, min_len=seq // 4, max_len=seq, vocab=4096)

        def run(name: str, *, compile: bool, max_steps: int | None = None):
            raw = tiny_recipe(data, objective="mlm", phases=2, tokens=tokens, batch_size=bs, seq_len=seq,
                              micro_batch_tokens=mbt, every_tokens=tokens // 2, precision="auto", compile=compile,
                              max_steps=max_steps)
            raw["model"] = {"preset": preset, "overrides": {"attention_dropout": 0.0}}
            t0 = time.perf_counter()
            trainer = Trainer(from_dict(raw), tmp / name, log=lambda m: None)
            out = trainer.fit()
            wall = time.perf_counter() - t0
            rows = [json.loads(x) for x in (tmp / name / "metrics.jsonl").read_text().splitlines()]
            rows = [r for r in rows if "loss" in r and "step" in r and not r.get("eval")]
            return trainer, out, wall, {r["step"]: r["loss"] for r in rows}, rows

        trainer, final, wall, losses, rows = run("compiled", compile=True)
        steps = sorted(losses)
        ntok = sum(r.get("step_tokens", 0) for r in rows)
        late = [r["step_s"] for r in rows[len(rows) // 2:]]  # compile's warm-up excluded
        late_tok = sum(r.get("step_tokens", 0) for r in rows[len(rows) // 2:])
        loaded = twinlm.load(final)
        self.emit({"run": "compiled, precision auto", "device": str(trainer.env.device), "preset": preset,
                   "steps": len(steps), "tokens": ntok, "wall_s": round(wall, 1),
                   "tok_s_second_half": round(late_tok / max(sum(late), 1e-9)),
                   "loss_first": round(losses[steps[0]], 4), "loss_last": round(losses[steps[-1]], 4),
                   "final_loads": type(loaded).__name__, "skipped": sum(bool(r.get("skipped")) for r in rows)})
        self.emit({"run": "compiled", "losses": [round(losses[k], 4) for k in steps]})

        def diff(a, b, sel):
            d = [abs(a[k] - b[k]) for k in sel if k in a and k in b]
            return {"max_abs": max(d) if d else None, "exact": sum(x == 0 for x in d), "of": len(d)}

        # eager, as the device runs by default, then with deterministic kernels (where a kernel has no
        # deterministic version torch warns; the warnings are recorded): resume exactness needs the latter
        for mode in ("default", "deterministic"):
            if mode == "deterministic":
                torch.use_deterministic_algorithms(True, warn_only=True)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                _, _, _, ref, _ = run(f"eager-a-{mode}", compile=False)
                _, _, _, again, _ = run(f"eager-b-{mode}", compile=False)
                stop = max(2, len(ref) // 3)
                run(f"resumed-{mode}", compile=False, max_steps=stop)
                _, _, _, resumed, _ = run(f"resumed-{mode}", compile=False)
            after = [k for k in ref if k > stop]
            nondet = sorted({str(w.message)[:120] for w in caught if "deterministic" in str(w.message)})
            self.emit({"run": f"eager ({mode} kernels): stopped at step {stop} and resumed vs uninterrupted",
                       "resumed_steps_vs_uninterrupted": diff(resumed, ref, after),
                       "noise_two_uninterrupted_runs": diff(again, ref, list(ref)),
                       "complete_metrics": sorted(resumed) == sorted(ref),
                       "losses_a_b_first_12": [[round(ref[k], 4), round(again.get(k, float("nan")), 4)]
                                               for k in sorted(ref)[:12]],
                       "nondeterministic_kernels": nondet})
        torch.use_deterministic_algorithms(False)

    def profile(self):
        from torch.profiler import ProfilerActivity, profile

        preset, tokens = ("cpu-tiny", 2048) if self.cpu else ("ettin-150m", 32768)
        acts = [ProfilerActivity.CPU] + ([] if self.cpu else [ProfilerActivity.CUDA])
        for compiled in (False, True):
            _, m, _, step = self._training(preset, tokens, "mlm", compiled=compiled)
            for _ in range(2):
                step()
            self.sync()
            with profile(activities=acts) as prof:
                for _ in range(2):
                    step()
                self.sync()
            key = "self_cpu_time_total" if self.cpu else "self_device_time_total"
            events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
            total = sum(getattr(e, key) for e in events) or 1
            top = [{"op": e.key[:90], "share": round(getattr(e, key) / total, 4), "calls": e.count}
                   for e in events[:18]]
            self.emit({"preset": preset, "compiled_blocks": compiled, "tokens_per_step": 2 * tokens,
                       "device_ms_per_step": round(total / 2 / 1000, 2), "top_self_time": top})
            del m, step

    def memory(self):
        from twinlm import ModelConfig, Transformer
        from twinlm.memory import estimate

        presets = ["cpu-tiny"] if self.cpu else os.environ.get("MEM_PRESETS", "ettin-400m,ettin-1b").split(",")
        sizes = (1024, 2048) if self.cpu else (4096, 8192)
        for preset in presets:
            # on the CPU: global layers and equal documents, where sdpa saves what a flash kernel saves (the
            # CPU's padded and banded paths keep extra copies the estimate does not describe)
            extra = dict(global_attn_every_n_layers=1) if self.cpu else {}
            cfg = ModelConfig.preset(preset, attention_dropout=0.1, **extra)
            m = Transformer(cfg).to(self.dev).train()
            per = {}
            for n in sizes:
                docs = dict(min_doc=256, max_doc=256) if self.cpu else {}
                batch = packed_batch(cfg, n, "mlm", **docs)
                n_real = int(batch["input_ids"].numel())
                if self.cpu:  # bytes saved for backward (storages once, parameters excluded)
                    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
                    seen = {}

                    def pack(t, seen=seen, params=params):
                        if t.untyped_storage().data_ptr() not in params:
                            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                        return t

                    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                        loss = m(**batch).loss
                    per[n_real] = sum(seen.values())
                    loss.backward()
                else:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        loss = m(**batch).loss
                    loss.backward()
                    per[n_real] = torch.cuda.max_memory_allocated() - base
                m.zero_grad(set_to_none=True)
            (n0, b0), (n1, b1) = sorted(per.items())
            measured = (b1 - b0) / (n1 - n0)
            est = estimate(cfg, micro_batch_tokens=65536, precision="fp32" if self.cpu else "bf16")
            self.emit({"preset": preset, "measured_bytes_per_token": round(measured),
                       "estimated_bytes_per_token": round(est.activation_bytes_per_token),
                       "ratio": round(measured / est.activation_bytes_per_token, 3),
                       "gib_at_65536_tokens_measured": round(measured * 65536 / 2**30, 1)})
            del m

    def graphs(self):
        """17M MLM, one optimizer step of 2 micro-batches, three ways: compiled blocks (dynamic shapes, the
        default `compile: true`), the whole model compiled at the phase's static shapes (`static_shapes: true`),
        and the same replayed as CUDA graphs (`cuda_graphs: true`; CUDA only)."""
        from twinlm import ModelConfig, Transformer
        from twinlm.train import dist
        from twinlm.train.optim import build_optimizer
        from twinlm.train.static import pad_packed

        preset, sizes, seq = ("cpu-tiny", [512], 128) if self.cpu else ("ettin-17m", [16384, 65536], 1024)
        cfg = ModelConfig.preset(preset, attention_dropout=0.1)
        for tokens in sizes:
            batches = [packed_batch(cfg, tokens, "mlm", seed=s, max_doc=seq) for s in range(2)]
            static = []
            for b in batches:
                ids, cu, max_seqlen, pos, tgt = pad_packed(b["input_ids"], b["cu_seqlens"], b["prediction_positions"],
                                                           b["labels"], tokens=tokens, seq_len=seq,
                                                           pad_id=cfg.pad_token_id)
                static.append(dict(input_ids=ids, cu_seqlens=cu, max_seqlen=max_seqlen, prediction_positions=pos,
                                   labels=tgt))
            ntok = sum(int(b["input_ids"].numel()) for b in batches)
            row: dict = {"preset": preset, "micro_batch_tokens": tokens, "tokens_per_step": ntok,
                         **{f"blocks_{k}": v for k, v in predicted(preset, "mlm", tokens, True).items()}}
            ways = [("blocks", False, False), ("static", True, False)] + ([] if self.cpu else [("graphs", True, True)])
            for name, is_static, graphs in ways:
                torch.manual_seed(0)
                m = Transformer(cfg).to(self.dev).train()
                dist.parallelize(m, dist.DistEnv(device=self.dev), compile=True, static_shapes=is_static,
                                 cuda_graphs=graphs, compile_backend="aot_eager" if self.cpu else "inductor")
                opt = build_optimizer(m, lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=1e-5,
                                      compile=not self.cpu)  # as the trainer's `compile: true` on CUDA
                step = train_step(m, static if is_static else batches, opt, self.dev, mark_steps=is_static,
                                  keep_grads=graphs)
                try:
                    s = self.timed(step, steps=2 if self.cpu else 8, warmup=2 if self.cpu else 3)
                    row[f"{name}_tok_s"] = round(ntok / s)
                except Exception as e:  # noqa: BLE001 - one way failing must not hide the others
                    row[f"{name}_error"] = repr(e)[:300]
                del m, opt, step
                if self.dev.type == "cuda":
                    torch.cuda.empty_cache()
            self.emit(row)

    def bench(self):
        """twinlm with compiled blocks (the trainer's `compile: true`) against transformers eager (target >= 2.5x
        at 150M) and transformers under torch.compile (>= 1.3x), encoder and decoder."""
        args = ["--no-write", "--compile", "--hf-compile", "--steps", "2" if self.cpu else "8",
                "--warmup", "1" if self.cpu else "2"]
        args += ["--preset", "cpu-tiny", "--batch", "2", "--seq", "128"] if self.cpu else ["--device", "cuda"]
        # killed a little before the section's time box, which kills this process only
        limit = (CPU_BUDGET if self.cpu else BUDGET[self.section]) - 15
        r = subprocess.run([sys.executable, str(ROOT / "bench" / "model_throughput.py"), *args], cwd=ROOT,
                           capture_output=True, text=True, timeout=limit)
        rows = [line for line in r.stdout.splitlines() if "tok/s" in line]
        if r.returncode:  # the section's error
            raise RuntimeError(f"model_throughput.py exited {r.returncode}: {r.stderr[-300:]} (rows: {rows})")
        self.emit({"returncode": r.returncode, "rows": rows})

    def compile(self):
        from torch._dynamo.testing import CompileCounterWithBackend

        from twinlm import ModelConfig, Transformer
        from twinlm.train import dist
        from twinlm.train.optim import build_optimizer

        preset, tokens = ("cpu-tiny", 512) if self.cpu else ("ettin-17m", 32768)
        cfg = ModelConfig.preset(preset, attention_dropout=0.0)
        counter = CompileCounterWithBackend("aot_eager" if self.cpu else "inductor")
        rows = []
        models = {}
        for name in ("eager", "compiled"):
            torch.manual_seed(0)
            m = Transformer(cfg).to(self.dev).train()
            if name == "compiled":
                dist.parallelize(m, dist.DistEnv(device=self.dev), compile=True, compile_backend=counter)
            models[name] = (m, build_optimizer(m, lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=1e-5))
        for s in range(3 if self.cpu else 6):
            batch = [packed_batch(cfg, tokens, "mlm", seed=s, max_doc=512)]
            row = {"docs": int(batch[0]["cu_seqlens"].numel() - 1)}
            for name, (m, opt) in models.items():
                t0 = time.perf_counter()
                train_step(m, batch, opt, self.dev)()
                self.sync()
                row[f"{name}_s"] = round(time.perf_counter() - t0, 3)
            row["graphs"] = sum(1 for g in counter.graphs if any(n.op == "call_function" for n in g.graph.nodes))
            rows.append(row)
        later = rows[1:]
        self.emit({"per_layout": rows, "new_graphs_after_first_layout": rows[-1]["graphs"] - rows[0]["graphs"],
                   "compiled_over_eager_after_first": round(statistics.median(r["eager_s"] / r["compiled_s"]
                                                                              for r in later), 3)})


def run_section(name: str, cpu: bool, out: Path) -> None:
    check = Check(name, cpu, out)
    try:
        getattr(check, name)()
    except Exception as e:  # noqa: BLE001 - the check records every failure and goes on
        check.emit({"error": repr(e)[:500], "trace": traceback.format_exc()[-1500:]})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sections", nargs="*", choices=[*SECTIONS, *GROUPS, []], default=[], metavar="SECTION",
                   help=f"default: all ({', '.join(SECTIONS)}); or a group: {', '.join(GROUPS)}")
    p.add_argument("--cpu", action="store_true", help="a tiny version of every section on the CPU")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench"), help="folder for gpu_check.jsonl")
    p.add_argument("--inline", action="store_true", help=argparse.SUPPRESS)  # run one section in this process
    args = p.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        p.error("no CUDA device: pass --cpu for the CPU version")
    out = Path(args.out) / "gpu_check.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    sections = [s for name in args.sections or SECTIONS for s in GROUPS.get(name, [name])]
    if args.inline:
        for name in sections:
            run_section(name, args.cpu, out)
        return 0
    failed = 0
    for name in sections:  # each in its own process, time-boxed: an overrun loses only that section
        limit = CPU_BUDGET if args.cpu else BUDGET[name]
        cmd = [sys.executable, __file__, name, "--inline", "--out", str(out.parent)] + (["--cpu"] if args.cpu else [])
        t0 = time.perf_counter()
        try:
            r = subprocess.run(cmd, timeout=limit)
            failed += r.returncode != 0
        except subprocess.TimeoutExpired:
            failed += 1
            Check(name, args.cpu, out).emit({"timeout": limit})
        print(f"# {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
