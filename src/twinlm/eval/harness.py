"""twinlm's model for lm-evaluation-harness (lm-eval 0.4.13): `--model twinlm --model_args pretrained=DIR`.

lm-eval brings the tasks (prompts, choices, splits, metrics, aggregation, sample logs); this class scores its
requests with twinlm's batched, padding-free scorers (eval/scoring.py) on any folder `load_for_eval` accepts
(twinlm / Hugging Face ModernBERT folders, other transformers models, hub ids `org/name[@revision]`):

- decoders by log-likelihood (`loglikelihood`; `loglikelihood_rolling` over lm-eval's rolling windows, as its
  `hf` model cuts them; `generate_until` by greedy decoding, every open request advanced one token per packed
  forward pass, stopped at the request's `until` strings, the end token, or `max_gen_toks`);
- encoders by the paper's masked scoring: each continuation token on its own copy `[CLS] context cont[:j]
  [MASK] [MASK] [MASK] END`, read at the first mask (MNTP encoders: one position earlier; recognised from the
  folder's `twinlm_objective`, or `mntp=True|False`). `generate_until` is greedy decoding by repeated masked
  prediction with the same layout (TriviaQA); `loglikelihood_rolling` is the pseudo-log-likelihood of the
  text with the same masked scheme (left context only, rolling windows).

model_args (lm-eval's `key=value,…`):
  pretrained   model folder or hub id (required)
  device       None/auto: the GPU when there is one, else the CPU (twinlm.eval.device); `cpu`, `cuda`, `cuda:N`;
               or lm-eval's `--device` (not both)
  max_tokens   tokens per packed forward pass (default 16384); batch_size / max_batch_size are accepted and
               unused (packing is by tokens)
  max_length   tokens per scored sequence (default: the model's context length)
  add_bos      put [CLS]/BOS before the context (default: twinlm's models and encoders yes, as the authors'
               `add_bos_token=True`; another transformers decoder as its tokenizer does, lm-eval's `hf` default;
               eval/common.resolve_add_bos)
  mntp         override the MNTP detection (encoders)
  end          the token after the masks: `sep` (default, the paper's "end token" as twinlm trains it),
               `period` (the tokenizer's `.`; Ettin's id 15, what the authors' fork appends) or `id:N`
  score_sep    False (default, the paper's text); True: as the authors' fork, the context's closing [SEP] is
               moved into each answer and scored with it
Scoring runs under `twinlm.eval.device.autocast(device)`: bf16 on accelerators, nothing on the CPU (CPU scores
are bit-identical to twinlm's own scoring).

The authors' fork (orionw/lm-evaluation-harness) generates for encoders with two masks and reads the last
context token, one position off its own log-likelihood path; here generation reads as scoring does.

Ranks: under torchrun the class reports this process's rank and world size (twinlm.eval.ranks, a gloo group),
so lm-eval's evaluator splits the documents across ranks and gathers the per-document results on rank 0.

This module imports lm-eval at the top (the class derives from its TemplateLM): import it only where lm-eval is
wanted (the generative track and `python -m twinlm.lm_eval` do so inside functions). `import lm_eval.models`
comes before the registration: lm-eval fills its model registry from that module only while the registry is
empty, so registering first would hide its own models (`hf`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import lm_eval.models  # noqa: F401  -- lm-eval's own models first: registering into an empty registry hides `hf`
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string

from twinlm.errors import ConfigError
from twinlm.eval.common import Loaded, encode_plain, load_for_eval, placement, resolve_add_bos
from twinlm.eval.device import autocast, resolve_device
from twinlm.eval.ranks import Ranks
from twinlm.eval.ranks import ranks as job_ranks
from twinlm.eval.scoring import N_FUTURE_MASKS, Request, greedy_generate, score_requests, tokenize_requests

DEFAULT_MAX_GEN_TOKS = 256
END_CHOICES = "sep, period or id:N"


def _flag(name: str, value: Any) -> bool:
    """A model_args boolean (lm-eval passes True/False, the command line may give strings)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes"):
        return True
    if text in ("0", "false", "no"):
        return False
    raise ConfigError(f"model_args {name}={value!r}: use True or False")


def end_token_id(spec: Any, tokenizer, cfg) -> int | None:
    """The id `end=` names (None: [SEP], the scorers' default)."""
    text = str(spec).strip().lower()
    if text in ("sep", "none", ""):
        return None
    if text == "period":
        ids = encode_plain(tokenizer, ["."])[0]
        if len(ids) != 1:
            raise ConfigError(f"end=period: the tokenizer spells '.' as {len(ids)} tokens; give end=id:N")
        return int(ids[0])
    if text.startswith("id:") and text[3:].isdigit():
        n = int(text[3:])
        if n >= cfg.vocab_size:
            raise ConfigError(f"end={spec}: id {n} is outside the vocabulary (0..{cfg.vocab_size - 1})")
        return n
    raise ConfigError(f"model_args end={spec!r}: use {END_CHOICES}")


@register_model("twinlm")
class TwinlmLM(TemplateLM):
    """lm-eval's view of a twinlm (or other transformers) model folder; see the module docstring."""

    backend = "causal"  # pairs split as for decoders: the whole text tokenized, cut where the context ends

    def __init__(self, pretrained: Any = None, device: Any = None, max_tokens: int = 16384,
                 max_length: int | None = None, add_bos: Any = None, mntp: Any = None, end: Any = "sep",
                 score_sep: Any = False, batch_size: Any = None, max_batch_size: Any = None,
                 variant: str | None = None, tokenizer: Any = None, ranks: Ranks | None = None,
                 **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise ConfigError(f"unknown model_args for twinlm: {', '.join(sorted(unknown))} (known: pretrained, "
                              "device, max_tokens, max_length, add_bos, mntp, end, score_sep, batch_size)")
        if pretrained is None:
            raise ConfigError("model_args needs pretrained=DIR (a model folder or hub id)")
        self._device = resolve_device(None if device in (None, "", "auto") else str(device))
        loaded = load_for_eval(pretrained, tokenizer, mntp=None if mntp is None else _flag("mntp", mntp),
                               variant=variant, device=self._device)
        self.loaded: Loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.max_tokens = int(max_tokens)
        self.max_length = int(max_length) if max_length else int(loaded.cfg.max_position_embeddings)
        self.add_bos = resolve_add_bos(None if add_bos is None else _flag("add_bos", add_bos), loaded)
        self.score_sep = _flag("score_sep", score_sep)
        self.end_id = end_token_id(end, self.tokenizer, loaded.cfg)
        self.end = str(end)
        self.mntp = bool(loaded.info.get("mntp"))
        self._ranks = job_ranks() if ranks is None else ranks  # the suite and eval curve pass Ranks(): alone
        self._rank, self._world_size = self._ranks.rank, self._ranks.world
        self.scored_tokens: dict[str, int] = defaultdict(int)  # per task: tokens (encoder: masked copies) scored

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> TwinlmLM:
        """lm-eval's way in (`--model_args`, then its own settings such as `--device` and `--batch_size`): a key
        given in `--model_args` wins over lm-eval's value of the same name (lm-eval would pass both and fail)."""
        args = simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    @property
    def place(self) -> Ranks:
        """This process's place among the ranks the documents are shared by (alone: `Ranks()`)."""
        return self._ranks

    # --- what lm-eval asks of a TemplateLM ---------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.loaded.cfg.sep_token_id)

    @property
    def prefix_token_id(self) -> int:
        return int(self.loaded.cfg.cls_token_id)

    @property
    def causal(self) -> bool:
        return self.loaded.causal

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        ids = encode_plain(self.tokenizer, [string])[0]
        return [self.prefix_token_id, *ids] if add_special_tokens else list(ids)

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def settings(self) -> dict[str, Any]:
        """What this model scores with, for result files."""
        return {**placement(self._device), "max_tokens": self.max_tokens, "scored_max_length": self.max_length,
                "add_bos": self.add_bos,
                "mntp": self.mntp, "end": self.end, "end_id": self.end_id, "score_sep": self.score_sep,
                "n_future_masks": N_FUTURE_MASKS}

    def _score(self, reqs: list[Request]):
        with autocast(self._device):
            return score_requests(self.loaded.model, reqs, mntp=self.mntp, max_tokens=self.max_tokens,
                                  end_id=self.end_id)

    def _extras(self) -> int:
        """Tokens a scored sequence carries besides its text: the masks and the end token (encoders)."""
        return 0 if self.causal else 2 + N_FUTURE_MASKS

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Each task's requests scored together, in their order (so packs, and scores, are those of twinlm's own
        scoring of that task)."""
        by_task: dict[str, list[int]] = defaultdict(list)
        seen: set[int] = set()
        first = []  # lm-eval pads a rank's share with repeats of its last request: those are not counted
        for i, r in enumerate(requests):
            by_task[getattr(r, "task_name", None) or ""].append(i)
            first.append(id(r) not in seen)
            seen.add(id(r))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for task, idx in by_task.items():
            reqs = tokenize_requests(self.tokenizer, self.loaded.cfg, [requests[i].args for i in idx],
                                     add_bos=self.add_bos, max_length=self.max_length - self._extras())
            if self.score_sep and not self.causal:
                for r in reqs:
                    r.cont = [*r.cont, self.eot_token_id]
            for i, s in zip(idx, self._score(reqs)):
                out[i] = (s.loglikelihood, s.is_greedy)
                self.scored_tokens[task] += s.n_tokens if first[i] else 0
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """(key, context ids, continuation ids) requests, as lm-eval tokenizes them."""
        scored = self._score([Request(list(ctx), list(cont)) for _, ctx, cont in requests])
        return [(s.loglikelihood, s.is_greedy) for s in scored]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts over disjoint rolling windows of the context length (lm-eval's
        `get_rolling_token_windows`, prefix [CLS], one token of context); encoders: pseudo-log-likelihood."""
        width = self.max_length - self._extras()
        windows: list[Request] = []
        owner: list[int] = []
        for i, r in enumerate(requests):
            (text,) = r.args
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=encode_plain(self.tokenizer, [text])[0], prefix_token=self.prefix_token_id,
                    max_seq_len=width, context_len=1)):
                windows.append(Request(list(ctx), list(cont)))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, s in zip(owner, self._score(windows)):
            totals[i] += s.loglikelihood
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut before the first of the request's `until` strings."""
        prompts, budgets, untils = [], [], []
        for r in requests:
            context, kwargs = r.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or [self.tok_decode([self.eot_token_id]) or "\n\n"]
            until = [until] if isinstance(until, str) else list(until)
            budget = int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            ids = encode_plain(self.tokenizer, [context])[0]
            bos = [self.prefix_token_id] if self.add_bos or not ids else []  # an empty prompt: the prefix token
            room = max(1, self.max_length - budget - self._extras() - len(bos))
            prompts.append(bos + ids[-room:])
            budgets.append(budget)
            untils.append(until)

        def stop(i: int, gen: list[int]) -> bool:
            if gen[-1] == self.eot_token_id:
                return True
            text = self.tok_decode(gen)
            return any(u in text for u in untils[i])

        with autocast(self._device):
            gens = greedy_generate(self.loaded.model, prompts, budgets, stop=stop, mntp=self.mntp,
                                   end_id=self.end_id, max_tokens=self.max_tokens)
        out = []
        for gen, until in zip(gens, untils):
            text = self.tok_decode([t for t in gen if t != self.eot_token_id])
            for u in until:
                text = text.split(u)[0]
            out.append(text)
        return out

    # --- ranks: lm-eval's evaluator splits documents by these and gathers on rank 0 ------------------
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's tensor, concatenated in rank order (0-d tensors stacked)."""
        parts = self._ranks.gather(tensor.detach().cpu())
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        parts = self._ranks.gather(obj)
        return parts if self._rank == dst else None

    def barrier(self) -> None:
        self._ranks.barrier()


__all__ = ["TwinlmLM", "end_token_id", "DEFAULT_MAX_GEN_TOKS"]
