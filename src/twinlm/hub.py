"""Hugging Face hub ids as model arguments: `org/name` or `org/name@revision` -> a local snapshot folder.

The released Ettin checkpoints are hub repositories whose intermediate states are git revisions (`step{N}`
pre-training, `ext{N}` context extension, `decay{N}` decay). Everywhere a model folder is accepted
(`twinlm.load`, every command's MODEL argument) one may write

    org/name                 the default branch
    org/name@step590532      a branch, tag or commit of the repository

`resolve_model` returns a local folder unchanged and fetches a hub id through `huggingface_hub.snapshot_download`
(its cache, its authentication, `HF_HUB_OFFLINE=1` to use the cache only; the cache is laid out as
`models--org--name/refs/<revision>` -> `snapshots/<commit>/`). An existing local path always wins over a
hub id of the same spelling. A revision that is neither on the hub nor in the offline cache, a repository
that does not exist, or an incomplete cached snapshot is a `ModelLoadError` naming it and the fix.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from twinlm.errors import ConfigError, ModelLoadError

# owner/name as the hub spells them (letters, digits, - _ .), optionally @revision (branch, tag or commit)
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@(?P<rev>[\w./-]+))?$")


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """("org/name", revision or None) if `spec` is spelled like a hub id, else None."""
    m = _HUB_ID.match(str(spec))
    if not m or ".." in m.group("repo"):
        return None
    return m.group("repo"), m.group("rev")


def resolve_model(spec: str | os.PathLike, revision: str | None = None, *, cache_dir: str | None = None) -> Path:
    """A local model folder for `spec`: the path itself if it exists, else the hub snapshot of `org/name[@rev]`
    (an `@rev` in `spec` and `revision=` must agree)."""
    if isinstance(spec, os.PathLike) or Path(str(spec)).exists():
        if revision is not None and not Path(str(spec)).exists():
            raise ConfigError(f"revision={revision!r} applies to hub ids, and {spec} is a local path")
        return Path(spec)
    parsed = parse_hub_id(str(spec))
    if parsed is None:
        return Path(spec)  # neither a folder nor a hub id: the loader says the folder is missing
    repo, rev = parsed
    if rev and revision and rev != revision:
        raise ConfigError(f"{spec}: the revision is given twice ({rev!r} and revision={revision!r}): keep one")
    rev = rev or revision
    # huggingface_hub is imported where a hub id is resolved: local folders never need it
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    where = f"{repo}@{rev}" if rev else repo
    try:
        return Path(snapshot_download(repo, revision=rev, cache_dir=cache_dir))
    except RevisionNotFoundError:
        raise ModelLoadError(f"{where}: the repository has no revision {rev!r} (Ettin checkpoints are named "
                             "step{N}, ext{N} and decay{N}; see the repository's branches)") from None
    except (RepositoryNotFoundError, GatedRepoError):
        raise ModelLoadError(f"{spec}: no such local folder, and the hub has no repository {repo} that you may "
                             "read (check the name, or log in with `hf auth login` for a gated one)") from None
    except IncompleteSnapshotError:
        raise ModelLoadError(f"{where}: the cached snapshot is incomplete: download it again with network access "
                             "(unset HF_HUB_OFFLINE)") from None
    except LocalEntryNotFoundError:
        raise ModelLoadError(f"{spec}: no such local folder, and revision {rev or 'main'!r} of {repo} is not in the "
                             "Hugging Face cache while offline (HF_HUB_OFFLINE=1): download it once online, or "
                             "check the folder's path") from None
    except HFValidationError as e:
        raise ModelLoadError(f"{spec}: not a model folder nor a valid hub id ({e})") from None
    except HfHubHTTPError as e:
        raise ModelLoadError(f"{where}: the hub answered {e.__class__.__name__}: {str(e).splitlines()[0]}") from None
