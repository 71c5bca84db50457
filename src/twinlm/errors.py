"""Every error twinlm raises for a user to act on derives from `TwinlmError`.

The `twinlm` command prints such an error as one line, `twinlm: error: <message>`, and exits with status 2;
anything else is a bug and keeps its traceback (as does every error under `twinlm --debug`). So the message
of a `TwinlmError` must stand alone: it names what is wrong (the file, the field, the value) and what to do.

The subclasses say which stage failed. Each also derives from the built-in exception it replaced
(`ValueError` for bad input, `RuntimeError` for a failed process, `FileNotFoundError` for something not
there yet), so `except ValueError` in user code keeps working.
"""

from __future__ import annotations


class TwinlmError(Exception):
    """A problem the user can fix; the message says how."""


def one_line(error: BaseException) -> str:
    """The error's message on one line, as `twinlm` prints it: its lines joined with '; ', or with a space after a
    line ending in ':' (a heading such as "invalid recipe 'x':" and the list under it)."""
    parts = [part.strip() for part in (str(error).strip() or type(error).__name__).splitlines() if part.strip()]
    line = parts[0]
    for part in parts[1:]:
        line += (" " if line.endswith(":") else "; ") + part
    return line


class ConfigError(TwinlmError, ValueError):
    """A recipe, scale, setting or command-line value that cannot be used."""


class MissingArtifactError(TwinlmError, FileNotFoundError):
    """Something an earlier command makes is not there yet (fetched data, a tokenizer, shards, a run)."""


class UnknownName(ConfigError, KeyError):
    """A name (a preset, a data source, a suite scale, a task, a baseline) that is not in its table; the message
    lists the known ones. Also a `KeyError`, which these lookups raised before."""

    __str__ = Exception.__str__  # KeyError's would quote the message


class StepNotRecorded(MissingArtifactError, KeyError):
    """A training step whose batch order the run did not record (a `KeyError` too, as a lookup by step)."""

    __str__ = Exception.__str__


class DataError(TwinlmError, ValueError):
    """Input text or records that cannot be read (names the file and line)."""


class FetchError(TwinlmError, RuntimeError):
    """Downloading or unpacking a data source failed."""


class ShardError(TwinlmError, RuntimeError):
    """A shard folder is missing, truncated, altered or inconsistent."""


class MissingShards(ShardError, MissingArtifactError):
    """No shard folder at the path given: `twinlm data prepare` makes it."""


class TokenizerMismatch(ShardError):
    """Shards, tokenizer and model disagree on the vocabulary."""


class TaskFileError(TwinlmError, ValueError):
    """An evaluation task file (JSONL) that cannot be used; the message starts with `file:line:`."""

    def __init__(self, path, line: int | None, problem: str):
        self.path, self.line, self.problem = str(path), line, problem
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}")


class ModelLoadError(TwinlmError, ValueError):
    """A model folder or checkpoint that cannot be loaded as a twinlm model."""


class CorruptCheckpointError(TwinlmError, RuntimeError):
    """A training checkpoint that is incomplete or fails its checksums."""


class OutOfSpace(TwinlmError, OSError):
    """The disk filled up while writing an artifact; the temporary files were removed and every earlier
    artifact is intact (the message says where and how to go on)."""


class ScoreError(TwinlmError, ValueError):
    """An evaluation score that cannot be reported: computed from no data, or not a finite number."""


class TrainingDiverged(TwinlmError, RuntimeError):
    """Too many non-finite losses in a row: the run stopped."""


class RunInterrupted(TwinlmError):
    """SIGTERM or the `stop_after` deadline stopped a run before its end, after a checkpoint: running the same
    command again resumes it (raised only when the caller asks for it). The command line exits `exit_status`."""

    exit_status = 75  # EX_TEMPFAIL (sysexits.h): a temporary stop, try again; what a job script requeues on


class PeerFailure(TwinlmError, RuntimeError):
    """Another rank of a distributed run hung (a collective timed out) or died (its connection closed); the
    message names the rank that noticed, its host, the step, what it was doing, and the last checkpoint."""


class NotShared(ConfigError):
    """A folder rank 0 sees is not there on another rank: the run folder, shards or tokenizer are not on a
    filesystem every node shares."""
