"""Shared machinery of the eval tracks: loading a model folder with its tokenizer (twinlm's own, or any
transformers model through eval/hf_models.py), padding-free packing of many sequences per forward pass,
pooling (the folder's own when it is a sentence-transformers folder: `folder_pooling`, `choose_pooling`), and
describing the model in result files."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
import yaml
from transformers import AutoTokenizer

import twinlm
from twinlm.data.tokenizer import check_tokenizer_file
from twinlm.errors import ConfigError, MissingArtifactError, ScoreError
from twinlm.eval.device import autocast, is_accelerator, model_device, resolve_device
from twinlm.eval.hf_models import HFModel, is_twinlm_folder, load_hf_model
from twinlm.eval.ranks import Ranks
from twinlm.export import check_tokenizer_matches, recorded_objective
from twinlm.hub import resolve_model


@dataclass
class Loaded:
    model: Any                  # twinlm.Transformer
    tokenizer: Any              # PreTrainedTokenizerFast
    path: str | None
    info: dict[str, Any] = field(default_factory=dict)
    folder_pooling: str | None = None  # a sentence-transformers folder's own pooling (`folder_pooling`)

    @property
    def causal(self) -> bool:
        return bool(self.model.config.causal)

    @property
    def cfg(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return model_device(self.model)


def placement(device: torch.device, fp32: bool = False) -> dict[str, str]:
    """A result's record of where it was computed: the device and the precision scoring used there (`fp32`: a
    model that never runs under autocast, such as the MiniLM baseline)."""
    return {"device": str(device), "precision": "bf16 autocast" if is_accelerator(device) and not fp32 else "fp32"}


def load_for_eval(model, tokenizer=None, *, mntp: bool | None = None, variant: str | None = None,
                  threads: int | None = None, device: str | torch.device | None = None) -> Loaded:
    """A model folder (HF ModernBERT / ModernBERT-decoder or twinlm checkpoint, via `twinlm.load`; any other
    transformers masked-LM, causal-LM or encoder folder through eval/hf_models.py) with the tokenizer saved in
    it, or an in-memory `(Transformer, tokenizer)` pair, on `device` (twinlm.eval.device.resolve_device: None is
    the accelerator when there is one, else the CPU, for a folder; an in-memory model named without a device
    stays where it is). On a GPU, that GPU becomes the process's current one. Already-`Loaded` is
    moved to `device` when one is named, else passes; a model marked `host_only` (the n-gram baselines) stays
    on the CPU whatever `device` says."""
    if isinstance(model, Loaded):
        if device is not None and not getattr(model.model, "host_only", False):
            model.model.to(resolve_device(device))
        return model
    if threads:
        torch.set_num_threads(threads)
    path = None
    if isinstance(model, (str, os.PathLike)):
        path = str(resolve_model(model))  # a hub id org/name@revision -> its snapshot folder
        if is_twinlm_folder(path):
            net = twinlm.load(path)
            if tokenizer is None:
                tokenizer = _folder_tokenizer(path)
            check_tokenizer_matches(tokenizer, net.config)  # scores use the config's special ids
        else:  # any other transformers model: BERT, RoBERTa, Llama, GPT-2 style … (eval/hf_models.py)
            if tokenizer is None:
                tokenizer = _folder_tokenizer(path)
            net = load_hf_model(path, tokenizer)
        model = net
    if tokenizer is None:
        raise ConfigError("an in-memory model needs its tokenizer: pass tokenizer=")
    if path is not None or device is not None:  # an in-memory model named without a device stays where it is
        target = resolve_device(device)
        if target.type == "cuda":
            torch.cuda.set_device(target)  # this rank's GPU is the current one (no context on GPU 0 from every rank)
        model.to(target)
    model.eval()
    info = describe(model, path, mntp=mntp, variant=variant)
    return Loaded(model, tokenizer, path, info, folder_pooling(path) if path is not None else None)


TOKENIZER_FILE_NAMES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                        "spiece.model")


def _folder_tokenizer(path: str):
    """The tokenizer saved in a model folder; a folder without one (e.g. `twinlm convert` of a training
    checkpoint) is named, instead of transformers' message about sentencepiece and tiktoken."""
    if not any((Path(path) / name).is_file() for name in TOKENIZER_FILE_NAMES):
        raise MissingArtifactError(f"{path}: no tokenizer in the model folder (no tokenizer.json): write one with "
                                   f"`twinlm convert … --tokenizer DIR` / `twinlm export … --tokenizer DIR`, or "
                                   f"copy the tokenizer files of the run into {path}")
    if (Path(path) / "tokenizer.json").is_file():
        check_tokenizer_file(Path(path) / "tokenizer.json")  # a damaged file is named, not a JSON traceback
    return AutoTokenizer.from_pretrained(path)


# objectives whose head predicts the next token: an encoder trained (or converted from a decoder trained) with one
# reads a masked token's logits one position earlier
NEXT_TOKEN_OBJECTIVES = ("mntp", "clm")


def model_objective(path: str | None) -> str | None:
    """The objective that trained the model in folder `path`: what its config.json records
    (`twinlm_objective`, twinlm.export.recorded_objective; export, a run's final/ and convert write it), else,
    for an older folder without the key, `mntp` when the run's `config.yaml` around it (in the folder, its
    parent or grandparent) says so; else None."""
    if not path:
        return None
    recorded = recorded_objective(path)
    if recorded is not None:
        return recorded
    return "mntp" if _run_says_mntp(Path(path)) else None


def _run_says_mntp(p: Path) -> bool:
    """The fallback for folders written before the objective was recorded: an `objective` (or `loss`) of `mntp`
    anywhere in a `config.yaml` of the folder, its parent or grandparent."""
    for cand in (p / "config.yaml", p.parent / "config.yaml", p.parent.parent / "config.yaml"):
        try:
            text = cand.read_text()
        except OSError:
            continue
        if "mntp" in text.lower():
            try:
                d = yaml.safe_load(text)
            except yaml.YAMLError:
                continue

            def walk(o):
                if isinstance(o, dict):
                    return any((k in ("objective", "loss") and str(v).lower() == "mntp") or walk(v)
                               for k, v in o.items())
                if isinstance(o, list):
                    return any(walk(v) for v in o)
                return False
            if walk(d):
                return True
    return False


def describe(model, path: str | None, *, mntp: bool | None = None, variant: str | None = None) -> dict:
    """The result's `model` entry. `mntp` (read masked-token logits one position earlier) is the caller's when
    given, else whether the folder's objective (`model_objective`) is one whose head predicts the next token;
    never for a decoder. `objective` is the recorded one when known, else what the scoring implies."""
    cfg = model.config
    causal = bool(cfg.causal)
    objective = model_objective(path)
    mntp = objective in NEXT_TOKEN_OBJECTIVES if mntp is None else bool(mntp)
    if causal:
        mntp = False
    params = sum(p.numel() for p in model.parameters())
    if variant is None:  # another transformers model is named by its type (bert, llama …) in tables
        variant = getattr(cfg, "model_type", None) or _guess_variant(path, causal)
    return {"path": path, "arch": "decoder" if causal else "encoder", "causal": causal,
            "objective": objective or ("clm" if causal else ("mntp" if mntp else "mlm")), "mntp": mntp,
            "variant": variant, "params": params,
            "non_embedding_params": params - cfg.vocab_size * cfg.hidden_size,
            "size": f"{cfg.num_layers}L-{cfg.hidden_size}d", "num_layers": cfg.num_layers,
            "hidden_size": cfg.hidden_size, "hf_class": getattr(cfg, "hf_class", None)}


def _guess_variant(path: str | None, causal: bool) -> str:
    """encoder / decoder / enc-from-dec / dec-from-enc / random-encoder / random-decoder, from names in
    the path (the suite passes `variant` explicitly)."""
    base = "decoder" if causal else "encoder"
    if path:
        low = str(path).lower().replace("_", "-")
        for tag in ("enc-from-dec", "dec-from-enc"):
            if tag in low:
                return tag
        if "random" in low:
            return f"random-{base}"
    return base


# --- tokenization ----------------------------------------------------------------------------------
def encode_plain(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids without special tokens, whole: callers cut long texts into windows themselves, so the
    tokenizer's warning about texts longer than `model_max_length` would only mislead (verbose=False)."""
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]


def tokenizer_adds_bos(tokenizer, bos_id: int) -> bool:
    """Whether `tokenizer`'s own rule (its post-processor, `add_special_tokens=True`) puts `bos_id` before a
    text: what lm-evaluation-harness's `hf` model does by default (`add_bos_token=None`: the tokenizer decides).
    Llama-style tokenizers do; GPT-2-style ones add nothing."""
    with_specials = tokenizer("a", verbose=False)["input_ids"]
    plain = encode_plain(tokenizer, ["a"])[0]
    return bool(with_specials) and with_specials[0] == bos_id and plain[:1] != [bos_id]


def resolve_add_bos(add_bos: bool | None, loaded: Loaded) -> bool:
    """Whether scoring puts the `[CLS]`/BOS token before each context: `add_bos` when given (`--bos` /
    `--no-bos`); else True for twinlm's own models (trained with `[CLS]` first) and for encoders, and for another
    transformers decoder whatever its tokenizer does (`tokenizer_adds_bos`), as lm-eval's default does."""
    if add_bos is not None:
        return bool(add_bos)
    if not loaded.causal or not isinstance(loaded.model, HFModel):
        return True
    return tokenizer_adds_bos(loaded.tokenizer, loaded.cfg.cls_token_id)


def encode_with_specials(tokenizer, cfg, texts: Sequence[str], pairs: Sequence[str] | None = None,
                         max_length: int = 512) -> list[list[int]]:
    """`[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]`, truncated to `max_length` (longest side first), built
    from the model config's special ids (so it does not depend on the tokenizer's post-processor)."""
    a_ids = encode_plain(tokenizer, texts)
    b_ids = encode_plain(tokenizer, pairs) if pairs is not None else [None] * len(a_ids)
    out = []
    for a, b in zip(a_ids, b_ids):
        if b is None:
            a = a[:max_length - 2]
            out.append([cfg.cls_token_id, *a, cfg.sep_token_id])
        else:
            budget = max_length - 3
            a, b = list(a), list(b)
            while len(a) + len(b) > budget:
                if len(a) >= len(b):
                    a.pop()
                else:
                    b.pop()
            out.append([cfg.cls_token_id, *a, cfg.sep_token_id, *b, cfg.sep_token_id])
    return out


# --- packing ---------------------------------------------------------------------------------------
def length_batches(lengths: Sequence[int], max_tokens: int, max_docs: int | None = None,
                   sort: bool = True) -> Iterator[list[int]]:
    """Groups of indices whose total length stays under `max_tokens` (a longer sequence goes alone);
    longest first so that similar lengths share a pack (the SDPA backend pads inside a pack)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if sort else list(range(len(lengths)))
    batch: list[int] = []
    total = 0
    for i in order:
        n = lengths[i]
        if batch and (total + n > max_tokens or (max_docs and len(batch) >= max_docs)):
            yield batch
            batch, total = [], 0
        batch.append(i)
        total += n
    if batch:
        yield batch


def pack_sequences(seqs: Sequence[Sequence[int]], device="cpu") -> tuple[torch.Tensor, torch.Tensor, int, list[int]]:
    """Flat ids (N,), cu_seqlens int32 (D+1,), max_seqlen, start offset of each sequence."""
    lens = [len(s) for s in seqs]
    offsets, acc = [], 0
    for n in lens:
        offsets.append(acc)
        acc += n
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long, device=device)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return ids, cu, max(lens), offsets


def forward_packed(model, seqs: Sequence[Sequence[int]], prediction_positions: Sequence[int] | None = None,
                   return_logits: bool = True):
    """One padding-free forward pass over `seqs`; prediction positions are flat indices."""
    device = next(model.parameters()).device
    ids, cu, m, offsets = pack_sequences(seqs, device)
    kwargs = {}
    if prediction_positions is not None:
        kwargs["prediction_positions"] = torch.tensor(list(prediction_positions), dtype=torch.long, device=device)
    out = model(ids, cu_seqlens=cu, max_seqlen=m, return_logits=return_logits, **kwargs)
    return out, offsets


# --- pooling ---------------------------------------------------------------------------------------
POOLINGS = ("cls", "last", "mean", "max")

# sentence-transformers' Pooling modes (1_Pooling/config.json) and twinlm's names for them
ST_POOLING_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                    "pooling_mode_max_tokens": "max", "pooling_mode_lasttoken": "last"}


def pool_packed(hidden: torch.Tensor, seq_lens: Sequence[int], pooling: str) -> torch.Tensor:
    """(N, d) packed hidden states -> (D, d): "cls" (first token), "last" (last token), "mean" or "max" (over
    every token of the sequence, specials included, as sentence-transformers' Pooling does)."""
    starts = torch.tensor([0, *torch.tensor(list(seq_lens)).cumsum(0).tolist()[:-1]], dtype=torch.long,
                          device=hidden.device)
    lens = torch.tensor(list(seq_lens), dtype=torch.long, device=hidden.device)
    if pooling == "cls":
        return hidden.index_select(0, starts)
    if pooling == "last":
        return hidden.index_select(0, starts + lens - 1)
    if pooling in ("mean", "max"):
        doc = torch.repeat_interleave(torch.arange(len(seq_lens), device=hidden.device), lens,
                                      output_size=int(sum(seq_lens)))  # known here: no wait for the device
        if pooling == "max":
            out = hidden.new_full((len(seq_lens), hidden.shape[-1]), float("-inf"))
            return out.scatter_reduce(0, doc.unsqueeze(1).expand_as(hidden), hidden, reduce="amax")
        sums = hidden.new_zeros(len(seq_lens), hidden.shape[-1]).index_add_(0, doc, hidden)
        return sums / lens.unsqueeze(1).to(hidden.dtype)
    raise ConfigError(f"unknown pooling {pooling!r}: use cls, last, mean or max")


def default_pooling(causal: bool, track: str = "classification") -> str:
    """The paper's choices: encoders [CLS] for classification and mean for retrieval; decoders last token."""
    if causal:
        return "last"
    return "cls" if track in ("classification", "classify") else "mean"


def folder_pooling(path: str | os.PathLike | None) -> str | None:
    """The pooling a sentence-transformers folder declares: its `modules.json` names a Pooling module whose
    `config.json` (e.g. `1_Pooling/config.json`) turns on one mode, returned in twinlm's name (cls, mean, max,
    last for `lasttoken`). None for a folder that is not a sentence-transformers folder (no `modules.json`, or no
    Pooling module in it). A Pooling config twinlm cannot reproduce (several modes at once, weightedmean,
    mean_sqrt_len) is refused with one line naming `--pooling`, rather than scored another way silently."""
    if path is None:
        return None
    p = Path(path)
    try:
        modules = json.loads((p / "modules.json").read_text())
    except (OSError, ValueError):
        return None
    module = next((m for m in modules if isinstance(m, dict) and str(m.get("type", "")).endswith("Pooling")), None)
    if module is None:
        return None
    conf_path = p / str(module.get("path", "")) / "config.json"
    try:
        conf = json.loads(conf_path.read_text())
    except (OSError, ValueError):
        raise ConfigError(f"{conf_path}: the sentence-transformers Pooling config cannot be read; choose the "
                          f"pooling with --pooling cls|mean|max|last") from None
    if "pooling_mode" in conf:  # sentence-transformers 6 saves the constructor's spelling
        mode = conf["pooling_mode"]
        on = [str(m) for m in mode] if isinstance(mode, list) else [str(mode)]
    else:
        on = [k.removeprefix("pooling_mode_") for k, v in conf.items() if k.startswith("pooling_mode_") and v]
    names = {k.removeprefix("pooling_mode_"): v for k, v in ST_POOLING_MODES.items()}
    names.update(mean="mean", cls="cls", max="max", lasttoken="last")
    if len(on) != 1 or on[0] not in names:
        raise ConfigError(f"{conf_path}: pooling {'+'.join(on) or 'none'} is not one twinlm reproduces; choose "
                          f"one with --pooling cls|mean|max|last")
    return names[on[0]]


def choose_pooling(pooling: str | None, loaded: Loaded, track: str) -> tuple[str, str]:
    """The pooling a track uses, and where it came from: the caller's (`flag`), else the folder's own
    sentence-transformers Pooling (`folder`: `folder_pooling`), else the architecture's (`default`:
    `default_pooling`). `cls` on a decoder is refused (`check_pooling`)."""
    if pooling:
        check_pooling(pooling, loaded.causal)
        return pooling, "flag"
    if loaded.folder_pooling:
        check_pooling(loaded.folder_pooling, loaded.causal)
        return loaded.folder_pooling, "folder"
    return default_pooling(loaded.causal, track), "default"


def check_pooling(pooling: str | None, causal: bool) -> None:
    """Refuse `cls` pooling on a decoder: in a causal model the first token attends to itself only, so its
    state says nothing about the text (the score would be chance)."""
    if pooling == "cls" and causal:
        raise ConfigError("pooling 'cls' on a decoder reads the first token, which in a causal model sees only "
                          "itself: use --pooling last (the decoder default) or mean")


def check_result(result: dict) -> dict:
    """Raise ScoreError unless every task score and the average are finite numbers: a NaN or infinite score
    (a model that produced non-finite values) is never reported or written as a result."""
    scores = [(f"tasks.{name}.score", t.get("score")) for name, t in result.get("tasks", {}).items()]
    scores.append(("average.mean", (result.get("average") or {}).get("mean")))
    for where, v in scores:
        if isinstance(v, (int, float)) and not math.isfinite(v):
            raise ScoreError(f"{result.get('track', 'eval')} result {where} is {v}: the model produced non-finite "
                             f"values (damaged or diverged weights?); check the model folder "
                             f"{(result.get('model') or {}).get('path', '')}".rstrip())
    return result


def embed(model, seqs: Sequence[Sequence[int]], pooling: str, max_tokens: int = 8192,
          ranks: Ranks | None = None) -> torch.Tensor:
    """Pooled embeddings (D, d) of token sequences, packed `max_tokens` at a time, in input order: float32 on
    the CPU (for scikit-learn and numpy) wherever the model runs; `embed_groups` of one group."""
    return embed_groups(model, [seqs], [pooling], max_tokens=max_tokens, ranks=ranks)[0].get(pooling, torch.empty(0))


def embed_layers(model, seqs: Sequence[Sequence[int]], poolings: Sequence[str], max_tokens: int = 8192,
                 ranks: Ranks | None = None) -> dict[tuple[int, str], torch.Tensor]:
    """Pooled embeddings of every depth: {(layer, pooling): (D, d)}. Layer 0 is the embedding norm's output,
    1..L the blocks' outputs (the residual stream), L + 1 the final norm's output (what `embed` pools)."""
    return embed_groups(model, [seqs], poolings, max_tokens=max_tokens, layers=True, ranks=ranks)[0]


def embed_groups(model, groups: Sequence[Sequence[Sequence[int]]], poolings: Sequence[str], *, max_tokens: int = 8192,
                 layers: bool = False, ranks: Ranks | None = None) -> list[dict[Any, torch.Tensor]]:
    """Pooled embeddings of several groups of sequences: for each group {pooling: (D, d)} (with `layers`,
    {(layer, pooling): (D, d)} of every depth, as `embed_layers`), float32 on the CPU, in input order.

    Each group is packed on its own (`length_batches`, `max_tokens` per pack), so a group's embeddings are
    exactly what `embed` / `embed_layers` of that group alone give (a sequence's values depend, in the last
    bits, on the pack it shares). The packs run on the model's device under its autocast
    (twinlm.eval.device: bf16 on accelerators, fp32 on the CPU); with `ranks` (twinlm.eval.ranks) the packs of
    all groups are shared out by tokens (`Ranks.assign`) and gathered, so every rank gets every group's
    embeddings, equal to one process's. The pooled rows stay on the device until every pack of this rank has
    run (one wait for the device, not one per pack)."""
    if layers and not hasattr(model, "embed_norm"):
        raise ConfigError("the depth search (probe_layer=best) needs a twinlm model; use probe_layer=final for "
                          "other transformers models")
    rk = ranks or Ranks()
    jobs = [(g, batch) for g, seqs in enumerate(groups)
            for batch in length_batches([len(s) for s in seqs], max_tokens)]
    mine = rk.assign([sum(len(groups[g][i]) for i in batch) for g, batch in jobs])
    device = model_device(model)
    caught: list[torch.Tensor] = []
    hooks = ([m.register_forward_hook(lambda _m, _i, o: caught.append(o)) for m in (model.embed_norm, *model.layers)]
             if layers else [])
    done: dict[int, dict[Any, torch.Tensor]] = {}
    try:
        with torch.inference_mode():
            for j in mine:
                g, batch = jobs[j]
                sub = [groups[g][i] for i in batch]
                with autocast(device):
                    out, _ = forward_packed(model, sub, return_logits=False)
                lens = [len(s) for s in sub]
                states = [*caught, out.hidden_states] if layers else [out.hidden_states]
                done[j] = {((layer, p) if layers else p): pool_packed(h.float(), lens, p)
                           for layer, h in enumerate(states) for p in poolings}
                caught.clear()
    finally:
        for h in hooks:
            h.remove()
    pooled = rk.collect(len(jobs), {j: {k: v.cpu() for k, v in d.items()} for j, d in done.items()})
    cols: list[dict[Any, list]] = [{} for _ in groups]
    for (g, batch), part in zip(jobs, pooled):
        for key, rows in part.items():
            column = cols[g].setdefault(key, [None] * len(groups[g]))
            for j, i in enumerate(batch):
                column[i] = rows[j]
    return [{key: torch.stack(column) for key, column in c.items()} for c in cols]


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


def versions() -> dict:
    return {"twinlm": twinlm.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


def result_config(settings: Any, seconds: float, **resolved: Any) -> dict[str, Any]:
    """A result's `config`: every setting (`dataclasses.asdict`), then what the run resolved over them (the
    task names read, the pooling chosen, the seeds as a list …) and facts of its own, then the seconds the run
    took and the versions."""
    return {**dataclasses.asdict(settings), **resolved, "seconds": seconds, "versions": versions()}
