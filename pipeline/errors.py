"""The errors a user can act on. Each message says what happened, what was expected and the fix."""

from __future__ import annotations

import errno
import re


class PipelineError(Exception):
    """Base class: a problem with the user's config, files or data, not a bug of ours."""


class ConfigError(PipelineError):
    """A config value is missing, unknown or of the wrong type or range."""


class SourceError(PipelineError):
    """The pre-trained source model cannot be found, fetched or used."""


class DataError(PipelineError):
    """The data cannot be read or does not fit the task."""


class TrackingError(PipelineError):
    """The tracking store cannot be reached or written."""


class ExportError(PipelineError):
    """An export could not be written or does not reproduce the in-memory model."""


class TrainingDiverged(PipelineError):
    """The loss became NaN or infinite."""


class IncompatibleVersion(PipelineError):
    """An installed library no longer has the private API that a patch in `pipeline.compat` needs."""


class RunStopped(PipelineError):
    """The run stopped for a reason outside the model: a full disk, a permission, a signal.

    Its MLflow run ends KILLED, not FAILED, so that the same command resumes it (`resume=auto`).
    """


class TrialPruned(Exception):
    """An Optuna sweep's pruner stopped this trial after `epochs_completed` epochs: not an error.

    Its MLflow run ends FINISHED with the tag `trial_state=PRUNED`, without evaluation or
    export, and the sweeper tells the study PRUNED (`pipeline.trials`).
    """

    def __init__(self, message: str, epochs_completed: int = 0):
        super().__init__(message, epochs_completed)  # both in `args`: it pickles across processes
        self.epochs_completed = epochs_completed

    def __str__(self) -> str:
        return str(self.args[0])


_NO_SPACE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
_NO_PERMISSION = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                  errno.EROFS: "read-only file system"}
# TensorFlow reports the same refusals as its own errors (a SavedModel or checkpoint write).
_TENSORFLOW_TEXT = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
                    "Permission denied": errno.EACCES, "Read-only file system": errno.EROFS}


def write_fault(error: BaseException) -> OSError | None:
    """The refusal behind `error` when the machine would not let a file be written: a full
    disk or quota, a permission, a read-only file system. None for every other error.

    Looks through what `error` was raised from, since stages wrap OS errors in their own.
    """
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and (cause.errno in _NO_SPACE or cause.errno in _NO_PERMISSION):
            return cause
        if type(cause).__module__.startswith("tensorflow"):
            text = str(cause)
            for phrase, number in _TENSORFLOW_TEXT.items():
                if phrase in text:
                    path = re.search(r"(/[^\s;:'\"]+)", text)
                    return OSError(number, phrase, path.group(1) if path else None)
        cause = cause.__cause__ or (None if cause.__suppress_context__ else cause.__context__)
    return None


def is_disk_full(fault: OSError) -> bool:
    return fault.errno in _NO_SPACE


def describe_write_fault(fault: OSError) -> str:
    """`no space left on device writing /runs/x/export`, `permission denied on /runs/x`, for
    `write_fault`'s result."""
    if fault.errno in _NO_SPACE:
        return _NO_SPACE[fault.errno] + (f" writing {fault.filename}" if fault.filename else "")
    what = _NO_PERMISSION.get(fault.errno) or fault.strerror or str(fault)
    return what + (f" on {fault.filename}" if fault.filename else "")


def outside_the_model(error: BaseException) -> str | None:
    """Why the run stopped, when the reason lies outside the model: a signal, a full disk, a
    permission, the tracking store. None when the run failed on its own (config, data, code),
    which no rerun of the same command would change.
    """
    if isinstance(error, KeyboardInterrupt):
        return f"interrupted ({error})" if str(error) else "interrupted (Ctrl-C)"
    if isinstance(error, (RunStopped, TrackingError)):
        return str(error)
    fault = write_fault(error)
    return describe_write_fault(fault) if fault is not None else None
