"""User-facing error types. The CLI prints these as one line; the server maps them to 400s."""
from __future__ import annotations


class HalserveError(Exception):
    """Base for errors caused by user input or the environment, not by a bug."""


class ModelLoadError(HalserveError):
    """A model directory that cannot be loaded (missing file, unknown architecture...)."""


class BackendUnavailable(HalserveError):
    """A forced backend that cannot run here; the message carries the probe's reason."""


class OpRefused(HalserveError):
    """A HAL op called with a spec its backend's ``supports`` refuses; the message names the
    op, the spec and the reason."""


def is_user_error(e: BaseException) -> bool:
    from halserve.config import ConfigError

    return isinstance(e, (HalserveError, ConfigError, FileNotFoundError, ValueError))
