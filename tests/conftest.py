import os

# Hub calls retry for ~45 s before failing; everything here runs on local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import json  # noqa: E402  (after the environment settings above, which must come first)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def trained_decoder(tmp_path_factory):
    """A decoder trained by twinlm itself (its own BPE, shards, `twinlm.train.run`) on toy text, with an
    intermediate checkpoint: {"tok": tokenizer folder, "final": RUN/final, "run": RUN}. About 20 s on 2 cores."""
    from twinlm.data.prepare import prepare
    from twinlm.data.tokenizer import train_tokenizer
    from twinlm.eval.toy import toy_sentences
    from twinlm.train import run
    from twinlm.train.testing import tiny_recipe

    root = tmp_path_factory.mktemp("trained-decoder")
    texts = toy_sentences(1500, seed=4)
    tok = train_tokenizer(None, 320, root / "tok", texts=texts)
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": " ".join(texts[i:i + 6])}) + "\n"
                                             for i in range(0, len(texts), 6)))
    prepare([root / "docs.jsonl"], tok, root / "shards", chunk_size=64, min_chunk=8, backfill=32, workers=0)
    recipe = tiny_recipe(root / "shards", objective="clm", phases=1, tokens=4000, every_tokens=2000,
                         dropout=0.1, tokenizer=str(root / "tok"), license="mit")
    recipe["optim"]["lr"] = 1e-2
    final = run(recipe, root / "dec", log=lambda *a: None)
    return {"root": root, "tok": root / "tok", "final": final, "run": root / "dec"}


SELECTED_ONLY = {"soak": "soak test: run with `pytest -m soak`",
                 "paper": "the paper's protocols end to end (minutes): run with `pytest -m paper`",
                 "multinode": "two torchrun agents as two nodes, with faults (minutes): run with `pytest -m multinode`",
                 "devicecheck": "bench/gpu_check.py --cpu, every section (minutes): run with `pytest -m devicecheck`",
                 "compileall": "another combination of a compile test (minutes): run with `pytest -m compileall`",
                 "reproduce": "the quick suite twice (tens of minutes): run with `pytest -m reproduce`"}


def pytest_collection_modifyitems(config, items):
    """`soak` tests (minutes of random kills), `paper` tests (every paper column end to end), `multinode`
    tests (two torchrun agents killed, hung, stopped and resumed), the `devicecheck` test (every section of
    bench/gpu_check.py on the CPU), the `compileall` cases (the compile tests' other encoder/decoder and
    checkpointing combinations) and the `reproduce` test (two quick suites) run only when selected with
    `-m soak` / `-m paper` / `-m multinode` / `-m devicecheck` / `-m compileall` / `-m reproduce`."""
    expr = config.getoption("markexpr") or ""
    for marker, reason in SELECTED_ONLY.items():
        if marker in expr:
            continue
        skip = pytest.mark.skip(reason=reason)
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)
