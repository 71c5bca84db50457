"""`twinlm eval {classify,retrieval,generative,bpb,pairs} MODEL` and `twinlm compare RUN … --out DIR`.

MODEL is a model folder (HF ModernBERT / ModernBERT-decoder, or a twinlm checkpoint), or a baseline
name: classify takes `tfidf` / `minilm`, retrieval `bm25` / `minilm`, bpb and pairs `unigram` / `bigram` /
`trigram` (n-gram models fitted on `--shards DIR` with `--tokenizer DIR`). The flags fill the track's settings
dataclass (twinlm.eval.settings); user errors reach `twinlm.cli.main`, which prints them as one line."""

from __future__ import annotations

import json
import sys


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _names(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _opt_int(s: str):
    return None if s.lower() in ("none", "all", "0") else int(s)


def _common(p, with_seeds: bool = True) -> None:
    p.add_argument("model", help="model folder, or a baseline name")
    p.add_argument("--out", help="write the result JSON here (also printed)")
    p.add_argument("--variant", help="label in reports: encoder, decoder, enc-from-dec, dec-from-enc, "
                                     "random-encoder, random-decoder (default: guessed from the path)")
    p.add_argument("--data-root", help="$TWINLM_HOME holding the fetched data (default: the usual one)")
    p.add_argument("--threads", type=int, help="torch CPU threads")


def register(commands) -> None:
    ev = commands.add_parser("eval", help="evaluate a model on one track (classify, retrieval, generative, bpb, pairs)",
                             description=__doc__)
    tracks = ev.add_subparsers(dest="track", metavar="TRACK", required=True)

    p = tracks.add_parser("classify", help="linear probe or fine-tuning on labelled tasks, mean ± std over seeds")
    _common(p)
    p.add_argument("--tasks", type=_names, default=None,
                   help="comma list (default: sst2,rte,mrpc,cb,boolq,spam,brown)")
    p.add_argument("--mode", choices=["probe", "finetune"], default="probe")
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2])
    p.add_argument("--max-train", type=_opt_int, default=2000)
    p.add_argument("--max-eval", type=_opt_int, default=1000)
    p.add_argument("--kfold", type=int, default=5)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lrs", type=_floats, default=None, help="fine-tuning learning rates swept (comma list)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--pooling", choices=["cls", "mean", "last"])
    p.add_argument("--probe-layer", choices=["final", "best"], default="final",
                   help="probe the final layer, or the depth and pooling that score best on the dev split")
    p.add_argument("--train-file", help="JSONL {text, text_pair?, label} training file of a custom task")
    p.add_argument("--eval-file", help="JSONL validation file of a custom task (k-fold without --train-file)")
    p.set_defaults(handler=_classify)

    p = tracks.add_parser("retrieval", help="contrastive fine-tuning, then nDCG@10 / MRR@10 / Recall@100")
    _common(p)
    p.add_argument("--sets", type=_names, default=None, help="comma list (default: squad,boolq,sciq)")
    p.add_argument("--no-finetune", action="store_true", help="score the pooled embeddings as they are")
    p.add_argument("--seeds", type=_ints, default=[0])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--max-train-pairs", type=_opt_int, default=2000)
    p.add_argument("--max-eval-queries", type=int, default=300)
    p.add_argument("--max-corpus", type=_opt_int, default=None)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--pooling", choices=["cls", "mean", "last"])
    p.add_argument("--export", help="save the fine-tuned model here as a sentence-transformers folder")
    p.set_defaults(handler=_retrieval)

    p = tracks.add_parser("generative", help="zero-shot multiple choice / completion by log-likelihood")
    _common(p)
    p.add_argument("--tasks", type=_names, default=None,
                   help="comma list of built-in names and/or JSONL files {context, choices, label} (default: "
                        "arc_easy,arc_challenge,hellaswag,piqa,sciq,siqa,winogrande,openbookqa,boolq,copa,lambada)")
    p.add_argument("--limit", type=_opt_int, default=500, help="examples per task (seeded draw; 'all' for every one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=16384, help="tokens per packed forward pass")
    p.add_argument("--no-bos", action="store_true", help="do not put [CLS] before the context")
    p.add_argument("--delimiter", default=" ", help="between context and choice in JSONL tasks (default ' ')")
    p.add_argument("--mntp", action="store_true", default=None,
                   help="encoder trained with masked next-token prediction: read one position earlier")
    p.set_defaults(handler=_generative)

    p = tracks.add_parser("bpb", help="bits per byte on held-out text")
    _common(p)
    p.add_argument("--text-file", help=".txt (blank-line separated documents) or JSONL {text}; default LAMBADA")
    p.add_argument("--max-docs", type=_opt_int, default=500)
    p.add_argument("--max-bytes", type=_opt_int, default=None, help="score only the first N bytes of the documents")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--mntp", action="store_true", default=None)
    _ngram_args(p)
    p.set_defaults(handler=_bpb)

    p = tracks.add_parser("curve", help="every checkpoint of runs (or model folders / hub revisions) on tracks: "
                                        "tables and a PNG per metric against tokens seen (eval/curve.py)")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="run folders, model folders or hub ids org/name@revision (TRACK.KEY=VALUE words among "
                        "them are settings, as with --set)")
    p.add_argument("--tracks", type=_names, required=True, help="comma list of bpb, generative, classify, retrieval")
    p.add_argument("--out", required=True, help="output folder (results are cached in OUT/cache/)")
    p.add_argument("--every", type=int, default=1, help="every k-th checkpoint of a run (the last always)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="TRACK.KEY=VALUE",
                   help="the tracks' settings, e.g. --set bpb.max_docs=50 generative.limit=100")
    p.add_argument("--data-root", default=None)
    p.set_defaults(handler=_curve)
    p = tracks.add_parser("pairs", help="minimal pairs: real sentence vs corrupted twin, accuracy per family with "
                                        "bootstrap intervals")
    _common(p)
    p.add_argument("--pairs-file", help="JSONL {good, bad, family} (BLiMP's files work unchanged); default: pairs "
                                        "built from --text-file or the LAMBADA passages")
    p.add_argument("--text-file", help="held-out text to build pairs from: .txt (blank-line separated) or JSONL {text}")
    p.add_argument("--families", type=_names, default=None,
                   help="built pairs: comma list of swap,replace,splice,agreement,article (default: all)")
    p.add_argument("--per-family", type=_opt_int, default=200,
                   help="pairs per family (a seeded draw from a file; 'all' for every one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")
    p.add_argument("--mntp", action="store_true", default=None)
    _ngram_args(p)
    p.set_defaults(handler=_pairs)

    c = commands.add_parser("compare", help="tables (Markdown, JSON) and plots (PNG) of eval results side by side")
    c.add_argument("runs", nargs="+", help="result JSON files or folders (searched for results and metrics.jsonl)")
    c.add_argument("--out", required=True, help="output folder")
    c.set_defaults(handler=_compare)


def _ngram_args(p) -> None:
    p.add_argument("--shards", help="n-gram baselines (MODEL unigram, bigram, trigram): the training shard folder "
                                    "they are fitted on")
    p.add_argument("--tokenizer", help="n-gram baselines: the tokenizer folder of those shards")


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


def _finish(result: dict, args) -> int:
    summary = {"track": result["track"], "model": result["model"].get("variant"),
               "average": result.get("average", {}).get("mean"),
               "tasks": {k: round(v.get("score", float("nan")), 4) for k, v in result["tasks"].items()}}
    print(json.dumps(summary, indent=2))
    if args.out:
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _classify(args) -> int:
    _threads(args)
    from twinlm.eval import classify
    from twinlm.eval.settings import ClassifyConfig

    given = {"tasks": args.tasks or (["custom"] if args.eval_file else None), "lrs": args.lrs}
    cfg = ClassifyConfig(mode=args.mode, seeds=args.seeds, max_train=args.max_train, max_eval=args.max_eval,
                         kfold=args.kfold, epochs=args.epochs, batch_size=args.batch_size, max_length=args.max_length,
                         pooling=args.pooling, probe_layer=args.probe_layer, train_file=args.train_file,
                         eval_file=args.eval_file, **{k: v for k, v in given.items() if v})
    res = classify.run(args.model, cfg, data_root=args.data_root, variant=args.variant, out=args.out, log=_log)
    return _finish(res, args)


def _retrieval(args) -> int:
    _threads(args)
    from twinlm.eval import retrieval
    from twinlm.eval.settings import RetrievalConfig

    cfg = RetrievalConfig(finetune=not args.no_finetune, seeds=args.seeds, epochs=args.epochs,
                          batch_size=args.batch_size, lr=args.lr, max_train_pairs=args.max_train_pairs,
                          max_eval_queries=args.max_eval_queries, max_corpus=args.max_corpus,
                          max_length=args.max_length, pooling=args.pooling,
                          **({"sets": args.sets} if args.sets else {}))
    res = retrieval.run(args.model, cfg, export_dir=args.export, data_root=args.data_root, variant=args.variant,
                        out=args.out, log=_log)
    return _finish(res, args)


def _generative(args) -> int:
    _threads(args)
    from twinlm.eval import generative
    from twinlm.eval.settings import GenerativeConfig

    cfg = GenerativeConfig(limit=args.limit, seed=args.seed, max_tokens=args.max_tokens, add_bos=not args.no_bos,
                           delimiter=args.delimiter, **({"tasks": args.tasks} if args.tasks else {}))
    res = generative.run(args.model, cfg, mntp=args.mntp, variant=args.variant, data_root=args.data_root,
                         out=args.out, log=_log)
    return _finish(res, args)


def _bpb(args) -> int:
    _threads(args)
    from twinlm.eval import bpb
    from twinlm.eval.settings import BpbConfig

    cfg = BpbConfig(text_file=args.text_file, max_docs=args.max_docs, max_bytes=args.max_bytes,
                    max_length=args.max_length)
    res = bpb.run(_model(args), cfg, mntp=args.mntp, variant=args.variant, data_root=args.data_root, out=args.out,
                  log=_log)
    return _finish(res, args)


def _curve(args) -> int:
    from twinlm.eval.curve import curve

    sources = [s for s in args.sources if "=" not in s]  # KEY=VALUE words may follow the sources
    overrides = [s for s in args.sources if "=" in s] + args.set
    res = curve(sources, args.tracks, args.out, every=args.every, overrides=overrides, data_root=args.data_root,
                log=_log)
    print(json.dumps({"points": len(res["points"]), "metrics": res["metrics"], "evaluated": res["evaluated"],
                      "cached": res["cached"], "plots": res["plots"]}, indent=2))
    return 0


def _pairs(args) -> int:
    _threads(args)
    from twinlm.eval import pairs
    from twinlm.eval.settings import PairsConfig

    cfg = PairsConfig(pairs_file=args.pairs_file, text_file=args.text_file, per_family=args.per_family,
                      seed=args.seed, bootstrap=args.bootstrap,
                      **({"families": args.families} if args.families else {}))
    res = pairs.run(_model(args), cfg, mntp=args.mntp, variant=args.variant, data_root=args.data_root, out=args.out,
                    log=_log)
    return _finish(res, args)


def _compare(args) -> int:
    from twinlm.eval.compare import compare

    print(json.dumps(compare(args.runs, args.out), indent=2))
    return 0
