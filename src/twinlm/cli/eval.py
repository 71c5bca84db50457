"""`twinlm eval {classification,retrieval,generative,bpb,pairs,glue,mteb} MODEL`, `twinlm eval curve`, `twinlm eval
paper MODEL` (the paper's three columns and its table; eval/paper/columns.py) and `twinlm compare RUN … --out DIR`.

MODEL is a model folder (HF ModernBERT / ModernBERT-decoder, or a twinlm checkpoint), or a baseline
name: classification takes `tfidf` / `minilm`, retrieval `bm25` / `minilm`, bpb and pairs `unigram` / `bigram` /
`trigram` (n-gram models fitted on `--shards DIR` with `--tokenizer DIR`). One subcommand per track of
twinlm.eval.tracks (`classify` is still accepted for classification); its settings flags are generated from the
track's settings dataclass (twinlm.cli.flags), the others (the model, `--out`, `--device`, `--mntp`, `--shards` …)
are written here. Under torchrun (`torchrun --nproc_per_node N -m twinlm eval TRACK …`) every track, and `eval
curve`, splits its work among the ranks; rank 0 alone writes and prints. User errors reach
`twinlm.cli.main`, which prints them as one line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from twinlm.cli.flags import add_settings_flags, flags_given, settings_from_flags
from twinlm.eval.tracks import TRACKS, Track, track


def _names(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model folder, or a baseline name")
    p.add_argument("--out", help="write the result JSON here (also printed)")
    p.add_argument("--variant", help="label in reports: encoder, decoder, enc-from-dec, dec-from-enc, "
                                     "random-encoder, random-decoder (default: guessed from the path)")
    p.add_argument("--data-root", help="$TWINLM_HOME holding the fetched data (default: the usual one)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--device", default=None,
                   help="auto (the default: this rank's GPU when there is one, else the CPU), cpu, cuda, cuda:N; "
                        "bf16 autocast on a GPU, fp32 on the CPU")


def _track_parser(tracks: Any, t: Track) -> None:
    """The subcommand of one track: the common arguments, its settings' flags, and what its `run` takes besides."""
    p = tracks.add_parser(t.name, aliases=list(t.aliases), help=t.help,
                          description=f"{t.help[0].upper()}{t.help[1:]} ({t.module}; the suite's {t.name}.KEY "
                                      "settings are the same fields).")
    _common(p)
    add_settings_flags(p, t.settings, f"settings ({t.settings.__name__}; in the suite: {t.name}.KEY=VALUE)")
    if t.mntp:
        p.add_argument("--mntp", action=argparse.BooleanOptionalAction, default=None,
                       help="an encoder trained with masked next-token prediction: read one position earlier "
                            "(default: what the model folder's config.json records as twinlm_objective, else its "
                            "run's config.yaml)")
    if t.ngrams:
        p.add_argument("--shards", help="n-gram baselines (MODEL unigram, bigram, trigram): the training shard "
                                        "folder they are fitted on")
        p.add_argument("--tokenizer", help="n-gram baselines: the tokenizer folder of those shards")
    if t.export:
        p.add_argument("--export", help="save the fine-tuned model here as a sentence-transformers folder")
    if t.work_dir:
        p.add_argument("--work-dir", help="a folder the track keeps and reuses on a rerun (finished fine-tuning "
                                          "runs, models, caches; default: <out>.work beside --out, else a "
                                          "temporary folder)")
    p.set_defaults(handler=_run_track, track_name=t.name)


def register(commands: Any) -> None:
    ev = commands.add_parser("eval", help=f"evaluate a model on one track ({', '.join(TRACKS)}) or every "
                                          "checkpoint of runs (curve)", description=__doc__)
    tracks = ev.add_subparsers(dest="track", metavar="TRACK", required=True)
    for t in TRACKS.values():
        _track_parser(tracks, t)

    p = tracks.add_parser("curve", help="every checkpoint of runs (or model folders / hub revisions) on tracks: "
                                        "tables and a PNG per metric against tokens seen (eval/curve.py)")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="run folders, model folders or hub ids org/name@revision (TRACK.KEY=VALUE words among "
                        "them are settings, as with --set)")
    p.add_argument("--tracks", type=_names, required=True, help=f"comma list of {', '.join(TRACKS)}")
    p.add_argument("--out", required=True, help="output folder (results are cached in OUT/cache/)")
    p.add_argument("--every", type=int, default=1, help="every k-th checkpoint of a run (the last always)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="TRACK.KEY=VALUE",
                   help="the tracks' settings, e.g. --set bpb.max_docs=50 generative.limit=100")
    p.add_argument("--data-root", default=None)
    p.add_argument("--device", default=None,
                   help="every track on this device: auto (the default: this rank's GPU when there is one, else "
                        "the CPU), cpu, cuda, cuda:N; part of the cache key")
    p.set_defaults(handler=_curve, key_values="set")

    p = tracks.add_parser("paper", help="the paper's three columns (GLUE, MS MARCO + MTEB, generative) the paper's "
                                        "way, in a table beside the paper's numbers (eval/paper/columns.py)",
                          description="The paper's columns for MODEL: GLUE fine-tuning (the glue track), MS MARCO "
                                      "fine-tuning then MTEB retrieval (the mteb track) and the generative tasks "
                                      "(the generative track, --tasks paper --limit all --data hub), cached per task "
                                      "in OUT, with OUT/paper.md: the table beside the paper's row for the same size "
                                      "and kind. Needs the paper extra: pip install 'twinlm[paper]'.")
    p.add_argument("model", help="a transformers encoder or decoder folder, or a hub id")
    p.add_argument("--out", help="output folder (results cached there; required unless --dry-run)")
    p.add_argument("--tracks", type=_names, default=["glue", "retrieval", "generative"],
                   help="comma list of the columns: glue, retrieval, generative (default: all three)")
    p.add_argument("--dry-run", action="store_true",
                   help="list every dataset the run downloads and its estimated GPU hours, then stop")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="COLUMN.KEY=VALUE",
                   help="the columns' settings, e.g. --set glue.seeds=1 retrieval.max_triplets=100000 "
                        "generative.limit=200 (the keys of twinlm eval glue / mteb / generative)")
    p.add_argument("--size", help="the paper's size to compare with, 17M … 1B (default: read from the config)")
    p.add_argument("--variant", help="label in the table (default: encoder or decoder from the config)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--device", default=None,
                   help="auto (the default: the GPU when there is one, else the CPU), cpu, cuda, cuda:N")
    p.set_defaults(handler=_paper)

    c = commands.add_parser("compare", help="tables (Markdown, JSON) and plots (PNG) of eval results side by side")
    c.add_argument("runs", nargs="+", help="result JSON files or folders (searched for results and metrics.jsonl)")
    c.add_argument("--out", required=True, help="output folder")
    c.set_defaults(handler=_compare)


def _model(args):
    """The model argument, with an n-gram baseline name fitted on --shards."""
    from twinlm.eval.ngram import NGRAMS

    if args.model not in NGRAMS:
        return args.model
    from twinlm.errors import ConfigError
    from twinlm.eval.ngram import load_ngram

    if not args.shards or not args.tokenizer:
        raise ConfigError(f"the {args.model} baseline is fitted on training shards: give --shards DIR and "
                          "--tokenizer DIR (the shards' tokenizer folder)")
    from transformers import AutoTokenizer

    return load_ngram(args.model, args.shards, AutoTokenizer.from_pretrained(args.tokenizer))


def _threads(args):
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def _rank0() -> bool:
    """Whether this process prints the summary: alone, or rank 0 of torchrun's job (every rank has the result)."""
    return os.environ.get("RANK", "0") == "0"


def _finish(result: dict, args) -> int:
    """Print the result's summary (a task's score to 4 places, or "failed: <error>" for a task recorded as
    {"error": ...}); the exit status is 1 when a task failed, with a stderr line naming them."""
    if not _rank0():
        return 0
    failed = [k for k, v in result["tasks"].items() if "error" in v]
    summary = {"track": result["track"], "model": result["model"].get("variant"),
               "average": result.get("average", {}).get("mean"),
               "tasks": {k: f"failed: {v['error']}" if k in failed else round(v.get("score", float("nan")), 4)
                         for k, v in result["tasks"].items()}}
    print(json.dumps(summary, indent=2))
    if args.out:
        print(f"wrote {args.out}", file=sys.stderr)
    if failed:
        config = result.get("config", {})
        resume = (f"the finished runs in {config['work_dir']} are reused" if config.get("work_dir") else
                  "give --out or --work-dir so that finished runs are kept" if "work_dir" in config else
                  "finished tasks are not run again where the track caches them")
        print(f"failed: {', '.join(failed)} (errors in the summary above); rerun the same command to retry them: "
              f"{resume}", file=sys.stderr)
        return 1
    return 0


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _run_track(args: argparse.Namespace) -> int:
    """One track on one model: its settings from the flags given (the rest the dataclass's defaults)."""
    t = track(args.track_name)
    _threads(args)
    given: dict[str, Any] = {}
    flags = flags_given(args)
    # a task file of your own without --tasks is named "custom" in the result (the Python default: the file's name)
    if t.name == "classification" and flags.get("eval_file") and "tasks" not in flags:
        given["tasks"] = ["custom"]
    settings = settings_from_flags(t.settings, args, given)
    options: dict[str, Any] = {"variant": args.variant, "data_root": args.data_root, "out": args.out, "log": _log,
                               "device": args.device}
    if t.mntp:
        options["mntp"] = args.mntp
    if t.export:
        options["export_dir"] = args.export
    if t.work_dir:
        options["work_dir"] = args.work_dir or (f"{os.path.splitext(args.out)[0]}.work" if args.out else None)
    res = t.run(_model(args) if t.ngrams else args.model, settings, **options)
    return _finish(res, args)


def _curve(args) -> int:
    from twinlm.eval.curve import curve

    sources = [s for s in args.sources if "=" not in s]  # KEY=VALUE words may follow the sources
    overrides = [s for s in args.sources if "=" in s] + args.set
    res = curve(sources, args.tracks, args.out, every=args.every, overrides=overrides, data_root=args.data_root,
                log=_log, device=args.device)
    if not _rank0():
        return 0
    print(json.dumps({"points": len(res["points"]), "metrics": res["metrics"], "evaluated": res["evaluated"],
                      "cached": res["cached"], "plots": res["plots"]}, indent=2))
    return 0


def _paper(args) -> int:
    from twinlm.errors import ConfigError
    from twinlm.eval.paper.columns import dry_run, format_plan, paper

    if args.dry_run:
        plan = dry_run(args.model, columns=args.tracks, overrides=args.set, size=args.size)
        print(format_plan(plan), end="")
        if args.out:
            from twinlm.io import write_json

            write_json(os.path.join(args.out, "plan.json"), plan)
            print(f"wrote {os.path.join(args.out, 'plan.json')}", file=sys.stderr)
        return 0
    if not args.out:
        raise ConfigError("twinlm eval paper needs --out DIR (results are cached there), or --dry-run")
    _threads(args)
    report = paper(args.model, args.out, columns=args.tracks, overrides=args.set, device=args.device,
                   variant=args.variant, size=args.size, data_root=args.data_root, log=_log)
    print(report["table"]["markdown"], end="")
    failed = [k for k, v in report["table"]["status"].items() if v in ("failed", "incomplete")]
    print(f"wrote {os.path.join(args.out, 'paper.md')} and paper.json", file=sys.stderr)
    if failed:
        print(f"incomplete: {', '.join(failed)} (see the [paper] lines above and {args.out}/*.error.txt); rerun "
              "the same command to retry them, the finished parts are cached", file=sys.stderr)
        return 1
    return 0


def _compare(args) -> int:
    from twinlm.eval.compare import compare

    print(json.dumps(compare(args.runs, args.out), indent=2))
    return 0
