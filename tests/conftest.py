import os

# Hub calls retry for ~45 s before failing; everything here runs on local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    """`soak` tests (minutes of random kills) run only when selected with `-m soak`."""
    if "soak" in (config.getoption("markexpr") or ""):
        return
    import pytest

    skip = pytest.mark.skip(reason="soak test: run with `pytest -m soak`")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)
