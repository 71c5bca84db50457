"""Model cards: the `README.md` of every exported Hugging Face folder, and the run summary it is built from.

A card is hub front matter (YAML between `---` lines) followed by a Markdown body. The front matter is built
with huggingface_hub's `ModelCardData` and the whole card parsed back with `ModelCard` before it is written,
so a card twinlm writes is one the hub's own library reads:

- front matter: `library_name: transformers`, `pipeline_tag` (`fill-mask` for encoders, `text-generation`
  for decoders), `tags` (twinlm, ettin, modernbert, encoder|decoder), `license` when one is known (the
  recipe's `license`, or `--license`: a hub license id such as `mit` or `apache-2.0`, or `other`, obvious
  spellings normalised (`Apache 2.0`, `MIT License`, `GPL-3.0-only`); anything else is refused by
  `check_license` when an export or conversion writes the card, while training warns at its start and writes
  final/'s card without a license), `base_model` only when the model was made from a hub model resolved into
  the local hub cache (`hub_id`; a local folder, or a bare relative string, is named in the body by its last
  parts, never by its absolute path), `datasets` / `language` when the recipe states them (hub dataset ids,
  ISO 639 codes), and `model-index` (huggingface_hub's `EvalResult`) from the twinlm evaluation results
  recorded for this very folder (`recorded_results`);
- body: what the model is (shape, parameters), how it was trained (recipe name and objective, tokens seen
  and sequence length per phase, final training loss; for a converted model: the conversion, then the
  training of the model it was converted from), the tokenizer (its folder's name, vocabulary, fingerprint),
  evaluation results, and a usage snippet for transformers that names the folder by its own name
  (decoders: the tokenizer prepends `[CLS]` only, so `generate` and lm-evaluation-harness work with their
  defaults).

`sentence_transformers_card` is the card of a sentence-transformers export (`twinlm eval retrieval --export`):
`library_name: sentence-transformers`, `pipeline_tag: sentence-similarity`, its pooling and length, the
contrastive fine-tuning, its retrieval scores, and a `SentenceTransformer` usage snippet.

`run_summary(run_dir)` reads what a card states from a run folder (`config.yaml` and `metrics.jsonl`); any
part it cannot find is left out of the card rather than guessed. Its `base_model` is the recipe's `init_from`,
as the hub cache snapshot it resolved to when it is a hub id found there (twinlm.hub resolves `init_from` so).
`add_results(folder, results)` puts evaluation results into a card already written (the suite does it once its
evaluations are done).
"""

from __future__ import annotations

import glob
import json
import re
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData, try_to_load_from_cache

from twinlm.errors import ConfigError
from twinlm.hub import parse_hub_id
from twinlm.io import write_bytes

CARD = "README.md"

# The license ids the Hugging Face hub accepts in a card's `license` field (its documented list), lower-case.
HUB_LICENSES = frozenset("""
apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0 bigcode-openrail-m
afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc cc0-1.0 cc-by-2.0
cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0
cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0
cdla-permissive-1.0 cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 eupl-1.2 agpl-3.0
gfdl gpl gpl-2.0 gpl-3.0 lgpl lgpl-2.1 lgpl-3.0 isc h-research intel-research lppl-1.3c ms-pl apple-ascl
apple-amlr mpl-2.0 odc-by odbl openrail++ osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib pddl lgpl-lr
deepfloyd-if-license llama2 llama3 llama3.1 llama3.2 llama3.3 gemma unknown other
""".split())

# a snapshot folder of the local hub cache: .../models--org--name/snapshots/<commit>
_HUB_CACHE = re.compile(r"(?:^|/)models--([\w.-]+?--[\w.-]+)/snapshots/[0-9a-f]+/?$")

# the hub task type (model-index `task.type`) of each twinlm evaluation track
_TASK_TYPES = {"classification": "text-classification", "retrieval": "sentence-similarity",
               "generative": "multiple-choice"}


# spellings of hub license ids seen in recipes and package metadata, after `_license_spelling`
_LICENSE_ALIASES = {"cc0": "cc0-1.0", "bsd-3": "bsd-3-clause", "bsd-2": "bsd-2-clause"}


def _license_spelling(value: str) -> str:
    """`value` lower-case with spaces/underscores as dashes, `license`/`version` words, SPDX `-only` /
    `-or-later` and a `v` before the version dropped: `Apache License, Version 2.0` -> `apache-2.0`."""
    lic = re.sub(r"[\s_,]+", "-", value.strip().lower())
    lic = re.sub(r"(?:^|-)(?:the|license|licence|version)(?=-|$)", "", lic).strip("-")
    lic = re.sub(r"-(?:only|or-later)$", "", lic)
    return re.sub(r"(?<=[a-z])-?v(?=\d)", "-", lic)  # gplv3, apache-v2 -> gpl-3, apache-2


def license_problem(value: Any) -> str | None:
    """None when `value` is no license or one `check_license` takes; else the one-line reason it is refused."""
    try:
        check_license(value)
    except ConfigError as e:
        return str(e)
    return None


def check_license(value: str | None) -> str | None:
    """`value` as the hub's license id (lower-case), None for none. Obvious spellings are normalised (case,
    spaces for dashes, `Apache 2.0`, `MIT License`, `GPL-3.0-only`, `apache2`: `_license_spelling`, then a
    missing `.0` or `-` before the version, then `_LICENSE_ALIASES`); anything else not in HUB_LICENSES is a
    ConfigError naming the fix."""
    if value is None or str(value).strip() == "":
        return None
    raw = str(value).strip().lower()
    lic = _license_spelling(str(value))
    dashed = re.sub(r"^([a-z]+)(?=\d)", r"\1-", lic)  # apache2 -> apache-2 (llama3 is an id of its own)
    for candidate in (raw, lic, f"{lic}.0", dashed, f"{dashed}.0", _LICENSE_ALIASES.get(lic, "")):
        if candidate in HUB_LICENSES:
            return candidate
    raise ConfigError(f"license {value!r} is not a Hugging Face hub license id: pass --license (or the recipe's "
                      "`license:`) as an id such as mit, apache-2.0 or cc-by-4.0, or `other`")


def hub_id(value: Any) -> str | None:
    """`org/name` when `value` is a hub model as twinlm.hub resolved it: a snapshot folder of the local hub cache
    (`…/models--org--name/snapshots/<commit>`); else None. A string spelled like a hub id is not one by its
    spelling (`runs/enc` may be a folder of another working directory): `resolved_hub_model` finds the snapshot
    of one that was resolved."""
    if value is None:
        return None
    cached = _HUB_CACHE.search(str(value).replace("\\", "/"))
    return cached.group(1).replace("--", "/", 1) if cached else None


def resolved_hub_model(spec: Any) -> str | None:
    """The hub cache snapshot folder that `spec` (`org/name[@revision]`, as a recipe's `init_from` names a hub
    model) resolved to, when it is no folder here and that revision is in the local hub cache; else None. Reads
    the cache only (no network)."""
    if spec is None or Path(str(spec)).exists():
        return None
    parsed = parse_hub_id(str(spec))
    if parsed is None:
        return None
    try:
        found = try_to_load_from_cache(parsed[0], "config.json", revision=parsed[1])
    except ValueError:  # a spelling huggingface_hub does not take as a repository id
        return None
    return str(Path(found).parent) if isinstance(found, str) else None


def shown_name(value: Any, parts: int = 3) -> str:
    """How a card names a model or tokenizer: a hub id as it is, a local folder by its last `parts` path parts
    (`train-decoder/run/final`), never by its absolute path (nor the top folder of one)."""
    hub = hub_id(value)
    if hub is not None:
        return hub
    path = Path(str(value))
    if path.is_absolute():  # never the top folder of an absolute path: `/tmp/x/dec` is shown as `x/dec`
        parts = max(1, min(parts, len(path.parts) - 2))
    return "/".join(path.parts[-parts:]) or "model"


def run_summary(run_dir: str | Path) -> dict[str, Any]:
    """{recipe, objective, license, base_model, language, datasets, phases: [{name, tokens, seq_len}],
    final_loss} of a run folder, from its resolved `config.yaml` and its `metrics.jsonl` (tokens actually trained
    per phase)."""
    run = Path(run_dir)
    out: dict[str, Any] = {}
    try:
        recipe = yaml.safe_load((run / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        recipe = {}
    if isinstance(recipe, dict):
        start = recipe.get("init_from")
        out.update(recipe=recipe.get("name") or None, objective=recipe.get("objective"),
                   license=recipe.get("license"), base_model=resolved_hub_model(start) or start,
                   language=recipe.get("language") or None, datasets=recipe.get("datasets") or None)
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


# --- evaluation results ------------------------------------------------------------------------------
def _is_result(obj: Any) -> bool:
    return isinstance(obj, dict) and "track" in obj and isinstance(obj.get("tasks"), dict) and "model" in obj


def recorded_results(folder: str | Path) -> list[dict]:
    """The twinlm evaluation results (the JSON `twinlm eval … --out` and the suite's `result.json` hold) of the
    model in `folder`: result files whose `model.path` is this very folder. Only three places are read, so an
    export of one checkpoint never parses a tree of other runs: `*.json` in the folder itself, `*.json` beside it
    (an `--out` next to the folder), and the suite's evaluation steps of this model (`SUITE/eval-NAME-*/result.json`
    for `SUITE/train-NAME/run/final` and a control's `SUITE/NAME/model`). lm-eval's own output
    (`*.lm_eval.json`) is no result. Sorted by track and file name; [] when there are none."""
    folder = Path(folder).resolve()
    files = [*folder.glob("*.json"), *folder.parent.glob("*.json")]
    for suite, name in _suite_places(folder):
        files += suite.glob(f"eval-{glob.escape(name)}-*/result.json")
    found: dict[Path, dict] = {}
    for f in sorted(set(files)):
        if f.name.endswith(".lm_eval.json"):
            continue
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        path = (data.get("model") or {}).get("path") if _is_result(data) else None
        if isinstance(path, str) and Path(path).resolve() == folder:
            found[f] = data
    return [found[f] for f in sorted(found, key=lambda f: (found[f]["track"], f.as_posix()))]


def _suite_places(folder: Path) -> list[tuple[Path, str]]:
    """(suite folder, model name) of `folder` in the suite's layout (twinlm.suite.pipeline `model_dir`): a
    trained model's `SUITE/train-NAME/run/final`, a control's `SUITE/NAME/model`; [] elsewhere."""
    if folder.name == "final" and folder.parent.name == "run" and folder.parent.parent.name.startswith("train-"):
        return [(folder.parents[2], folder.parent.parent.name.removeprefix("train-"))]
    if folder.name == "model":
        return [(folder.parents[1], folder.parent.name)]
    return []


def eval_results(results: list[dict], pipeline_tag: str) -> list[EvalResult]:
    """huggingface_hub `EvalResult`s (one per task and track) of twinlm evaluation results: the task's headline
    score (`score`, named by `headline`). The task's name stands for the dataset (twinlm's tasks are built from
    fetched copies, not hub datasets)."""
    rows = []
    for r in results:
        for task, t in sorted((r.get("tasks") or {}).items()):
            value = t.get("score") if isinstance(t, dict) else None
            if not isinstance(value, (int, float)):
                continue
            metric = str(t.get("headline") or "score")
            rows.append(EvalResult(task_type=_TASK_TYPES.get(r["track"], pipeline_tag),
                                   task_name=f"{r['track']}: {task}", dataset_type=task, dataset_name=task,
                                   metric_type=metric, metric_name=metric, metric_value=round(float(value), 4)))
    return rows


def _results_lines(rows: list[EvalResult]) -> list[str]:
    if not rows:
        return []
    lines = ["## Evaluation", "", "Measured with `twinlm eval` on this folder:", "",
             "| track | task | metric | value |", "|---|---|---|---|"]
    for e in rows:
        lines.append(f"| {str(e.task_name).split(':')[0]} | {e.dataset_name} | {e.metric_name} | {e.metric_value} |")
    return lines + [""]


# --- cards ---------------------------------------------------------------------------------------------
def _card(data: ModelCardData, body: list[str]) -> str:
    """The card text; parsed back with huggingface_hub's ModelCard (the front matter must read as card data)."""
    text = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body).rstrip() + "\n"
    ModelCard(text)  # raises on front matter huggingface_hub cannot read (e.g. model-index without a name)
    return text


def _data(info: dict[str, Any], library: str, pipeline_tag: str, tags: list[str], name: str,
          rows: list[EvalResult]) -> ModelCardData:
    base = hub_id(info.get("base_model"))
    return ModelCardData(library_name=library, pipeline_tag=pipeline_tag, tags=tags,
                         license=check_license(info.get("license")), base_model=base,
                         datasets=info.get("datasets") or None, language=info.get("language") or None,
                         model_name=name if rows else None, eval_results=rows or None)


def model_card(cfg, info: dict[str, Any] | None = None) -> str:
    """The README.md text for a folder holding a model of ModelConfig `cfg`; `info` as `run_summary` returns,
    plus optional `name` (the folder's name, used in the snippets and as the model-index name; default
    `model`), `tokenizer` ({name, vocab, fingerprint}), `params`, `note` (a sentence on provenance),
    `converted` ({from, to}: a model converted from the other kind; the training listed is its source's),
    `results` (twinlm evaluation results of this model, `recorded_results`), `datasets` and `language`."""
    info = dict(info or {})
    kind = "decoder" if cfg.causal else "encoder"
    name = str(info.get("name") or "model")
    pipeline_tag = "text-generation" if cfg.causal else "fill-mask"
    rows = eval_results(info.get("results") or [], pipeline_tag)
    data = _data(info, "transformers", pipeline_tag, ["twinlm", "ettin", "modernbert", kind], name, rows)
    arch = "ModernBertDecoderForCausalLM" if cfg.causal else "ModernBertForMaskedLM"
    size = f", {info['params'] / 1e6:.1f}M parameters" if info.get("params") else ""
    lines = [f"# {name}", "",
             f"A ModernBERT-architecture {kind} (`{arch}`: {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
             f"{cfg.num_heads} heads, vocabulary {cfg.vocab_size}{size}), written by twinlm. It loads in "
             f"transformers with no custom code and in `twinlm.load`.", ""]
    if info.get("note"):
        lines += [info["note"], ""]
    converted = info.get("converted") or {}
    if converted:
        lines += ["## Conversion", "",
                  f"- converted from a {converted.get('from')} by `twinlm convert --to {converted.get('to')}`: the "
                  f"same weights, {'causal' if cfg.causal else 'bidirectional'} attention, the tokenizer's "
                  f"{kind} conventions; no training since"]
        if info.get("base_model"):
            lines.append(f"- source: `{shown_name(info['base_model'])}`")
        lines += ["", f"## Training of the source {converted.get('from')}", ""]
    else:
        lines += ["## Training", ""]
    start = len(lines)
    if info.get("recipe") or info.get("objective"):
        lines.append(f"- recipe: `{info.get('recipe', '?')}`, objective `{info.get('objective', '?')}`")
    if info.get("base_model") and not converted:
        lines.append(f"- started from: `{shown_name(info['base_model'])}`")
    for p in info.get("phases", []):
        seen = p.get("tokens_seen")
        tokens = f"{seen:,} tokens seen" if seen is not None else f"{p.get('tokens')} tokens planned"
        lines.append(f"- phase `{p['name']}`: {tokens}, sequence length {p.get('seq_len')}")
    if info.get("final_loss") is not None:
        lines.append(f"- final training loss: {info['final_loss']:.4f}")
    if len(lines) == start:
        lines.append("- not recorded (the folder was written outside a training run)")
    lines += ["", "## Tokenizer", ""]
    tok = info.get("tokenizer") or {}
    if tok:
        tok_name = shown_name(tok["name"], 2) if tok.get("name") else "byte-level BPE"
        lines.append(f"- `{tok_name}`, {tok.get('vocab', '?')} tokens, fingerprint "
                     f"`{str(tok.get('fingerprint', '?'))[:16]}`")
    if cfg.causal:
        lines.append("- the tokenizer prepends `[CLS]` (the beginning of a document) and appends nothing, "
                     "and pads on the left, so `generate`, the text-generation pipeline and "
                     "lm-evaluation-harness with default arguments see text as the model was trained on it")
    else:
        lines.append("- the tokenizer wraps text as `[CLS] text [SEP]` and pads on the right, as in training")
    lines += ["", *_results_lines(rows), "## Usage", "",
              f"`{name}` is this folder (or its hub id once pushed).", "", "```python"]
    if cfg.causal:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                  f'tok = AutoTokenizer.from_pretrained("{name}")',
                  f'model = AutoModelForCausalLM.from_pretrained("{name}")',
                  'out = model.generate(**tok("The old man", return_tensors="pt"), max_new_tokens=20)',
                  "print(tok.decode(out[0], skip_special_tokens=True))", "```", "",
                  f"lm-evaluation-harness: `lm_eval --model hf --model_args pretrained={name} --tasks arc_easy`"]
    else:
        lines += ["from transformers import pipeline",
                  f'fill = pipeline("fill-mask", model="{name}")',
                  'print(fill("The capital of France is [MASK]."))', "```"]
    return _card(data, lines)


def sentence_transformers_card(cfg, info: dict[str, Any]) -> str:
    """The README.md of a sentence-transformers export: `info` has `name` (the folder's name), `pooling`,
    `max_seq_length`, optional `source` (the folder fine-tuned), `base_model`, `license`, `training`
    ({pairs, sets, epochs, seed}; None: not fine-tuned) and `scores` ({set: {ndcg@10, mrr@10, recall@100}}, the exported
    model's own retrieval scores)."""
    name = str(info.get("name") or "model")
    kind = "decoder" if cfg.causal else "encoder"
    results = [{"track": "retrieval", "tasks": {s: {"score": m.get("ndcg@10"), "headline": "ndcg@10"}
                                               for s, m in (info.get("scores") or {}).items()}}]
    rows = eval_results(results, "sentence-similarity")
    data = _data(info, "sentence-transformers", "sentence-similarity",
                 ["sentence-transformers", "sentence-similarity", "feature-extraction", "twinlm", "modernbert", kind],
                 name, rows)
    pooling = str(info.get("pooling"))
    pooled = {"mean": "the mean of the token states", "cls": "the `[CLS]` state", "max": "the max of the token states",
              "last": "the last token's state (the `[SEP]` that closes `[CLS] text [SEP]`)"}.get(pooling, pooling)
    lines = [f"# {name}", "",
             f"A sentence-transformers model: a ModernBERT-architecture {kind} ({cfg.num_layers} layers, hidden "
             f"{cfg.hidden_size}) fine-tuned for retrieval by twinlm, pooled as {pooled}, texts cut at "
             f"{info.get('max_seq_length')} tokens. Embeddings are {cfg.hidden_size}-dimensional and compared "
             "by cosine similarity.", "", "## Training", ""]
    if info.get("source"):
        lines.append(f"- fine-tuned from `{shown_name(info['source'])}`")
    t = info.get("training") or {}
    if "training" in info and info["training"] is None:
        lines.append("- not fine-tuned: the source model's embeddings as they are")
    elif t:
        lines.append(f"- contrastive fine-tuning with in-batch negatives (MultipleNegativesRankingLoss) on "
                     f"{t.get('pairs')} question–passage pairs from {', '.join(t.get('sets') or []) or '?'}, "
                     f"{t.get('epochs')} epoch(s), seed {t.get('seed')}")
    else:
        lines.append("- not recorded")
    lines += ["", *_results_lines(rows), "## Usage", "",
              f"`{name}` is this folder (or its hub id once pushed).", "", "```python",
              "from sentence_transformers import SentenceTransformer",
              f'model = SentenceTransformer("{name}")',
              'emb = model.encode(["What do plants need?", "Plants need light and water."])',
              "print(model.similarity(emb[:1], emb[1:]))", "```"]
    return _card(data, lines)


def add_results(folder: str | Path, results: list[dict]) -> bool:
    """Put `results` (twinlm evaluation results of the model in `folder`) into the card already there: its
    `model-index` and its Evaluation section, replacing earlier ones. Returns whether the card changed (no
    card, or no scores: nothing to do)."""
    path = Path(folder) / CARD
    if not path.is_file():
        return False
    card = ModelCard.load(path)
    rows = eval_results(results, card.data.pipeline_tag or "fill-mask")
    if not rows:
        return False
    card.data.eval_results = rows
    card.data.model_name = card.data.model_name or Path(folder).name
    body = re.sub(r"## Evaluation\n.*?(?=^## )", "", card.text, flags=re.S | re.M)
    body = body.replace("## Usage", "\n".join(_results_lines(rows)) + "\n## Usage", 1)
    text = _card(card.data, [body.strip()])
    if text == path.read_text():
        return False
    write_bytes(path, text)
    return True


__all__ = ["CARD", "HUB_LICENSES", "add_results", "check_license", "eval_results", "hub_id", "license_problem",
           "model_card", "recorded_results", "resolved_hub_model", "run_summary", "sentence_transformers_card",
           "shown_name"]
