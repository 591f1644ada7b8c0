"""The errors a user can act on. Each message says what happened, what was expected and the fix."""


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
