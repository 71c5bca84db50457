"""Model cards: the `README.md` of every exported Hugging Face folder, and the run summary it is built from.

A card is hub front matter (YAML between `---` lines) followed by a Markdown body:

- front matter: `library_name: transformers`, `pipeline_tag` (`fill-mask` for encoders, `text-generation`
  for decoders), `tags` (twinlm, ettin, modernbert, encoder|decoder), `license` when one is known (the
  recipe's `license`, or `twinlm export --license`), `base_model` for converted and cross-objective models;
- body: what the model is (shape, parameters), how it was trained (recipe name and objective, tokens seen
  and sequence length per phase, final training loss), the tokenizer (name, vocabulary, fingerprint) and a
  usage snippet for transformers (decoders: the tokenizer prepends `[CLS]` only, so `generate` and
  lm-evaluation-harness work with their defaults).

`run_summary(run_dir)` reads what a card states from a run folder (`config.yaml` and `metrics.jsonl`); any
part it cannot find is left out of the card rather than guessed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

CARD = "README.md"


def run_summary(run_dir: str | Path) -> dict[str, Any]:
    """{recipe, objective, license, base_model, phases: [{name, tokens, seq_len}], final_loss} of a run
    folder, from its resolved `config.yaml` and its `metrics.jsonl` (tokens actually trained per phase)."""
    run = Path(run_dir)
    out: dict[str, Any] = {}
    try:
        recipe = yaml.safe_load((run / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        recipe = {}
    if isinstance(recipe, dict):
        out.update(recipe=recipe.get("name") or None, objective=recipe.get("objective"),
                   license=recipe.get("license"), base_model=recipe.get("init_from"))
        phases = recipe.get("phases") or {}
        if isinstance(phases, dict):
            out["phases"] = [{"name": n, "tokens": (p or {}).get("tokens"), "seq_len": (p or {}).get("seq_len")}
                             for n, p in phases.items()]
    seen: dict[str, int] = {}
    last_loss = None
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a killed run
        if isinstance(row.get("tokens"), int) and row.get("phase"):
            seen[row["phase"]] = max(seen.get(row["phase"], 0), row["tokens"])
        if isinstance(row.get("loss"), (int, float)) and not row.get("skipped"):
            last_loss = float(row["loss"])
    if seen and out.get("phases"):
        before = 0
        for p in out["phases"]:  # metrics count tokens over the whole run: a phase's own = its end - the last
            if p["name"] in seen:
                p["tokens_seen"] = seen[p["name"]] - before
                before = seen[p["name"]]
    out["final_loss"] = last_loss
    return {k: v for k, v in out.items() if v is not None}


def model_card(cfg, info: dict[str, Any] | None = None) -> str:
    """The README.md text for a folder holding a model of ModelConfig `cfg`; `info` as `run_summary` returns,
    plus optional `tokenizer` ({name, vocab, fingerprint}), `params` and `note` (a sentence on provenance)."""
    info = dict(info or {})
    kind = "decoder" if cfg.causal else "encoder"
    front: dict[str, Any] = {"library_name": "transformers",
                             "pipeline_tag": "text-generation" if cfg.causal else "fill-mask",
                             "tags": ["twinlm", "ettin", "modernbert", kind]}
    if info.get("license"):
        front["license"] = info["license"]
    if info.get("base_model"):
        front["base_model"] = str(info["base_model"])
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {info.get('recipe') or 'twinlm'} ({kind})", ""]
    arch = "ModernBertDecoderForCausalLM" if cfg.causal else "ModernBertForMaskedLM"
    size = f", {info['params'] / 1e6:.1f}M parameters" if info.get("params") else ""
    lines += [f"A ModernBERT-architecture {kind} (`{arch}`: {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
              f"{cfg.num_heads} heads, vocabulary {cfg.vocab_size}{size}), written by twinlm. It loads in "
              f"transformers with no custom code and in `twinlm.load`.", ""]
    if info.get("note"):
        lines += [info["note"], ""]
    lines += ["## Training", ""]
    if info.get("recipe") or info.get("objective"):
        lines.append(f"- recipe: `{info.get('recipe', '?')}`, objective `{info.get('objective', '?')}`")
    if info.get("base_model"):
        lines.append(f"- started from: `{info['base_model']}`")
    for p in info.get("phases", []):
        seen = p.get("tokens_seen")
        tokens = f"{seen:,} tokens seen" if seen is not None else f"{p.get('tokens')} tokens planned"
        lines.append(f"- phase `{p['name']}`: {tokens}, sequence length {p.get('seq_len')}")
    if info.get("final_loss") is not None:
        lines.append(f"- final training loss: {info['final_loss']:.4f}")
    if lines[-1] == "":
        lines.append("- not recorded (the folder was written outside a training run)")
    tok = info.get("tokenizer") or {}
    if tok:
        lines += ["", "## Tokenizer", "",
                  f"- {tok.get('name') or 'byte-level BPE'}, {tok.get('vocab', '?')} tokens, fingerprint "
                  f"`{str(tok.get('fingerprint', '?'))[:16]}`"]
    if cfg.causal:
        lines.append("- the tokenizer prepends `[CLS]` (the beginning of a document) and appends nothing, "
                     "and pads on the left, so `generate`, the text-generation pipeline and "
                     "lm-evaluation-harness with default arguments see text as the model was trained on it")
    lines += ["", "## Usage", "", "```python"]
    if cfg.causal:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                  'tok = AutoTokenizer.from_pretrained("PATH")',
                  'model = AutoModelForCausalLM.from_pretrained("PATH")',
                  'out = model.generate(**tok("The old man", return_tensors="pt"), max_new_tokens=20)',
                  "print(tok.decode(out[0], skip_special_tokens=True))", "```", "",
                  "lm-evaluation-harness: `lm_eval --model hf --model_args pretrained=PATH --tasks arc_easy`"]
    else:
        lines += ["from transformers import pipeline",
                  'fill = pipeline("fill-mask", model="PATH")',
                  'print(fill("The capital of France is [MASK]."))', "```"]
    return "\n".join(lines) + "\n"


__all__ = ["CARD", "model_card", "run_summary"]
