"""The trainer's real workload for benchmarks: packed micro-batches of documents of random lengths, masked by
the recipe's objective (twinlm.train.objectives), as `TrainStep.micro_batches` builds them, and a step that
runs them the way `TrainStep` does (host tensors into the model, bf16 autocast on CUDA, StableAdamW)."""

from __future__ import annotations

import inspect

import numpy as np
import torch

from twinlm.data import pack
from twinlm.train.objectives import build_objective


def packed_batch(cfg, n_tokens: int, objective: str, seed: int = 0, min_doc: int = 64, max_doc: int = 1024):
    """-> dict of host tensors for Transformer.forward: input_ids, cu_seqlens, max_seqlen, prediction_positions,
    labels (documents of min_doc..max_doc tokens packed to at most n_tokens)."""
    rng = np.random.default_rng(seed)
    samples, used = [], 0
    max_doc = min(max_doc, n_tokens)
    while True:
        n = int(rng.integers(min(min_doc, max_doc), max_doc + 1))
        if used + n > n_tokens and samples:
            break
        samples.append((len(samples), rng.integers(5, min(cfg.vocab_size, 50280) - 5, size=n)))
        used += n
    mb = pack(samples, n_tokens)[0]
    obj = build_objective(objective, seed=21, mask_ratio=0.3, mask_token_id=cfg.mask_token_id,
                          special_ids=(cfg.cls_token_id, cfg.sep_token_id, cfg.pad_token_id, cfg.mask_token_id),
                          random_high=min(cfg.vocab_size, 50280))
    cu = np.asarray(mb.cu_seqlens)
    p = obj.prepare(np.asarray(mb.input_ids), cu, list(mb.sample_ids), salt=seed + 1)
    return dict(input_ids=p.input_ids, cu_seqlens=torch.as_tensor(cu, dtype=torch.int32),
                max_seqlen=int(mb.max_seqlen), prediction_positions=p.positions, labels=p.targets)


def train_step(model, batches: list[dict], optimizer, device: torch.device, mark_steps: bool = False,
               keep_grads: bool = False):
    """One optimizer step over `batches` (micro-batches), as TrainStep runs it; returns a closure. `mark_steps`:
    each pass starts a new CUDA-graph step, as TrainStep does at static shapes; `keep_grads`: gradients
    accumulate in buffers of their own, zeroed in place (TrainStep with CUDA graphs)."""
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
           else torch.autocast("cpu", enabled=False))
    if keep_grads:
        for p in model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)

    # StableAdamW takes the trainer's skip flag (the step's summed loss not finite), decided on the device
    skips = "found_inf" in inspect.signature(optimizer.step).parameters

    def run():
        loss = total = None
        for b in batches:
            if mark_steps:
                torch.compiler.cudagraph_mark_step_begin()
            with amp:
                loss = model(**b).loss
            loss.backward()
            # summed before the next pass: a CUDA graph's replay overwrites the outputs of the one before
            total = loss.detach().clone() if total is None else total + loss.detach()
        if skips:
            optimizer.step(found_inf=~torch.isfinite(total))
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=not keep_grads)
        return loss

    return run


def executed_flops_per_token(model, batches: list[dict]) -> float:
    """FLOPs per token the step really executes: flops_per_token at the batches' mean document length and
    predicted fraction (windows, causality and the sparse head counted)."""
    tokens = sum(int(b["input_ids"].numel()) for b in batches)
    predicted = sum(int(b["labels"].numel()) for b in batches) / tokens
    mean_doc = float(np.mean([np.diff(b["cu_seqlens"].numpy()).mean() for b in batches]))
    return model.flops_per_token(max(1, round(mean_doc)), predicted_fraction=predicted)
