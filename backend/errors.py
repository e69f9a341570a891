"""Every error the backend raises on purpose, in one module (as RQ keeps its exceptions), under one base.

`BackendError.status` is the HTTP status a request failing with the error answers, and the only thing the
HTTP layer reads; a subclass sets its usual status and a raise may give another. Each class also keeps the
built-in base it had (ValueError, RuntimeError, FileNotFoundError), so `except ValueError` around parsing
code still sees it. Errors pickle with their message and status, so one raised on a queue worker comes back
to the web tier whole.
"""

from __future__ import annotations

RETRY_AFTER_S = 5  # what every 503 tells the caller to wait before asking again


class BackendError(Exception):
    """Base of every deliberate error: a message for the user and the HTTP status to answer with."""

    status = 500

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[object, tuple[type[BackendError], str, int]]:
        return _restore, (type(self), self.message, self.status)


def _restore(cls: type[BackendError], message: str, status: int) -> BackendError:
    error = cls.__new__(cls)
    BackendError.__init__(error, message, status)
    return error


class SettingsError(BackendError, ValueError):
    """A setting that cannot be used: the message names the variable and what it accepts."""


class BadRequest(BackendError):
    """A request body or query that is not what the route takes."""

    status = 400


class VideoRegionError(BadRequest, ValueError):
    """A VideoRectangle region that is not what Label Studio sends: the message names the field and what to fix."""

    status = 422


class ConfigError(BackendError, ValueError):
    """The label config cannot be served by this backend."""

    status = 422


class PromptError(BackendError, ValueError):
    """The context cannot be turned into prompts."""

    status = 422


class ImageError(BackendError):
    """An image that cannot be fetched or decoded."""

    status = 422


class VideoError(BackendError):
    """A video that cannot be fetched or decoded, or that is larger than the limits allow."""

    status = 422


class BlockedAddress(BackendError):
    """The host resolved only to addresses that image downloads must not reach."""

    status = 403


class AuthError(BackendError, RuntimeError):
    """Label Studio refused the API key."""

    status = 502


class RleError(BackendError, ValueError):
    """Bytes that are not a brush RLE stream of the expected size."""

    status = 422


class WebhookError(BackendError, ValueError):
    """A webhook body that cannot be recorded."""

    status = 400


class Rejected(BackendError, ValueError):
    """An annotation (or one region of it) that cannot become training data; the message says why."""

    status = 422


class ModelNotReady(BackendError, RuntimeError):
    """The models are still loading, or failed to load (then the message says why)."""

    status = 503


class InferenceUnavailable(ModelNotReady):
    """No queue worker can answer in time."""


class DeadlineExceeded(BackendError):
    """The request ran out of time; the caller should retry after RETRY_AFTER_S."""

    status = 503


class ModelDirNotShared(BackendError, RuntimeError):
    """A worker's MODEL_DIR is not the folder the web tier records webhook events in."""

    status = 503


class CheckpointMissing(BackendError, FileNotFoundError):
    """A checkpoint file is absent; the message names the file and what fetches it."""

    status = 503


class DownloadFailed(BackendError, RuntimeError):
    """Official weights could not be fetched; the message names the address, the setting for a local copy and
    a command that fetches them elsewhere."""


class WrongCheckpoint(BackendError, ValueError):
    """A weights file that is not what its setting takes (another model's, truncated, a folder); the message
    says which."""

    status = 503


class CorruptVersion(BackendError, RuntimeError):
    """A fine-tuned version whose files are missing, damaged, or do not fit the loaded SAM."""


class LockBusy(BackendError, RuntimeError):
    """Someone else holds the lock."""

    status = 409


class ProjectApiError(BackendError, RuntimeError):
    """Label Studio refused or failed a REST call; the message says which and why."""

    status = 422


class LabelStudioUnavailable(ProjectApiError):
    """Label Studio did not answer a REST call, or failed it (5xx, 429): the same call may succeed later."""

    status = 502
