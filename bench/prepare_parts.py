"""Preparation split across processes (as across machines): `twinlm data prepare --part I/N` side by side, then
`twinlm data merge`, against one whole `prepare` of the same text.

    python bench/prepare_parts.py [--mb 24] [--parts 2] [--tokenizer ettin|bpe] [--write]

Each `prepare` is its own `twinlm` process with one tokenizer worker of one thread, as one machine's share would
be; the whole prepare is timed alone, the N parts started together. Reports wall-clock seconds, CPU seconds of
every process, the merge's time, the speed-up (whole / (parts + merge)), and checks that the merged files are
byte-identical to the whole's. --write replaces this script's section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from data_prepare import corpus, tokenizer

BEGIN, END = "<!-- prepare_parts:begin -->", "<!-- prepare_parts:end -->"
FILES = ("tokens.bin", "index.npy", "docs.npy", "bytes.npy")


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "twinlm", "data", *args]


def timed(commands: list[list[str]]) -> tuple[float, float]:
    """Run the commands side by side; (wall seconds, CPU seconds of all of them)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for c in commands]
    for p, c in zip(procs, commands):
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"{' '.join(c)} failed:\n{err}")
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def digest(folder: Path) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in FILES}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=24.0)
    ap.add_argument("--parts", type=int, default=2)
    ap.add_argument("--tokenizer", choices=["ettin", "bpe"], default="ettin")
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--write", action="store_true", help="write the figures into bench/RESULTS.md")
    args = ap.parse_args()
    n = args.parts
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        text, desc = corpus(work / "corpus.jsonl", args.mb)
        tok, tok_desc = tokenizer(args.tokenizer, work, text)
        tok_dir = work / "tok"
        tok.save_pretrained(tok_dir)
        common = ["--tokenizer", str(tok_dir), "--chunk-size", str(args.chunk_size), "--workers", "1",
                  "--threads", "1", str(text)]
        whole_wall, whole_cpu = timed([cli("prepare", *common, "--out", str(work / "whole"))])
        parts = [work / f"part-{i}" for i in range(n)]
        parts_wall, parts_cpu = timed([cli("prepare", *common, "--part", f"{i}/{n}", "--out", str(p))
                                       for i, p in enumerate(parts)])
        merge_wall, merge_cpu = timed([cli("merge", *map(str, parts), "--out", str(work / "merged"))])
        identical = digest(work / "whole") == digest(work / "merged")
    load = os.getloadavg()[0]
    speedup = whole_wall / (parts_wall + merge_wall)
    lines = [
        "## Preparation in parts (`bench/prepare_parts.py`)", "",
        f"Command: `python bench/prepare_parts.py --mb {args.mb:g} --parts {n} --tokenizer {args.tokenizer} "
        f"--chunk-size {args.chunk_size} --write`",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}; 1-minute "
        f"load average at the end: {load:.1f}. Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"Input: {desc}; tokenizer: {tok_desc}; chunks of {args.chunk_size} tokens; every `twinlm data prepare` "
        "with one worker of one thread.", "",
        "| run | wall s | CPU s |",
        "|---|---|---|",
        f"| whole `prepare` | {whole_wall:.1f} | {whole_cpu:.1f} |",
        f"| {n} × `prepare --part I/{n}`, side by side | {parts_wall:.1f} | {parts_cpu:.1f} |",
        f"| `merge` of the {n} parts | {merge_wall:.1f} | {merge_cpu:.1f} |",
        "",
        f"Speed-up, whole / (parts + merge): **{speedup:.2f}×** on {os.cpu_count()} cores; merged files "
        f"{'byte-identical to' if identical else 'DIFFERENT from'} the whole's (sha256 of {', '.join(FILES)}). "
        "Each part reads the whole input and tokenizes its own documents (assigned by a hash of the text), so "
        "reading and JSON decoding are repeated in every part; the CPU column shows what that costs.",
    ]
    section = "\n".join(lines) + "\n"
    print(section)
    if args.write:
        path = Path(__file__).with_name("RESULTS.md")
        old = path.read_text()
        block = f"{BEGIN}\n{section}{END}"
        if BEGIN in old and END in old:
            new = old[:old.index(BEGIN)] + block + old[old.index(END) + len(END):]
        else:
            i = old.index("<!-- data_prepare:end -->") + len("<!-- data_prepare:end -->")
            new = old[:i] + "\n\n" + block + old[i:]
        path.write_text(new)
        print(f"wrote {path}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
