"""Domain errors of the steering core.

Each kind says what went wrong in words a user can act on; callers (the CLI, later the
gRPC servicers) map the kind to an exit code or a status code without parsing messages.
"""


class SteeringError(Exception):
    """Base of every error the steering core raises on purpose."""


class ConfigError(SteeringError):
    """The registry or a setting is wrong (unknown model, bad field)."""


class NotFoundError(SteeringError):
    """A named model, concept or file does not exist."""


class ModelLoadError(SteeringError):
    """A model's weights or tokenizer could not be loaded."""


class VectorError(SteeringError):
    """A vector file is unusable: wrong model, corrupt, non-finite, incomplete."""


class InvalidArgument(SteeringError):
    """A request field is out of range or malformed."""


class PermissionDenied(SteeringError):
    """The request asks for something this profile never serves (a blocked concept)."""


class FailedPrecondition(SteeringError):
    """The model or concept exists but has not earned steering (unvalidated, failed gate)."""


class ResourceExhausted(SteeringError):
    """The server is at capacity; retry later."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(SteeringError):
    """A dependency (the tagger, a model) cannot be reached right now."""


class SamplingError(SteeringError):
    """A row's next-token distribution is unusable (non-finite or empty): that row ends, the
    batch goes on. Its cause is the model or the steering, not the request: an internal error."""
