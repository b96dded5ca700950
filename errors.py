"""Typed domain errors shared by every stage; the HTTP layer maps each class to one status.

Stages raise these for problems with what the caller gave them and for expected states of a
deployment (models still loading, a full disk); anything else escaping a stage is a server bug
(500), never mapped to a client error by message text.
"""

from __future__ import annotations

from pathlib import Path


class StepAudioError(Exception):
    """Base of every error the service reports to a client."""

    code: str = "server_error"


class InvalidInputError(StepAudioError, ValueError):
    """The request's content cannot be used (400)."""

    code = "invalid_value"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class TooLargeError(InvalidInputError):
    """Input over a configured limit: bytes, seconds, characters (413)."""

    code = "too_large"


class NotFoundError(StepAudioError, LookupError):
    """A named resource (voice, model variant) does not exist (404)."""

    code = "not_found"


class BusyError(StepAudioError):
    """The request queue is full; retry after ``retry_after`` seconds (429)."""

    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotReadyError(StepAudioError):
    """Models are still loading (503)."""

    code = "not_ready"


class ModelLoadError(StepAudioError, RuntimeError):
    """A model or variant cannot be loaded here; the message names it and the reason."""

    code = "model_load_failed"


class StorageError(StepAudioError):
    """A store on disk (voices, the token cache) cannot be written: a read-only file system, a
    full disk, no permission (503). An expected state of a deployment, not a bug, so it is
    reported like one; what was stored before is left as it was."""

    code = "storage_unavailable"

    def __init__(self, message: str, directory: Path | None = None) -> None:
        super().__init__(message)
        self.directory = directory


class RequestCancelledError(Exception):
    """The caller went away and its work was stopped; nobody is left to answer (not a client error)."""
