"""Typed errors that shoal raises for bad input; the CLI turns each into a one-line message and exit code 2.

Every message names the problem and says what to do about it, so a user never needs a traceback.
"""

from __future__ import annotations


class ShoalError(Exception):
    """Base class of every error shoal raises on purpose."""


class DeviceError(ShoalError):
    """The requested device is unknown, absent, or cannot do what was asked."""


class ModelNotFoundError(ShoalError):
    """The model path does not exist or holds no checkpoint."""


class ConfigError(ShoalError):
    """config.json is missing, unreadable, or lacks a field shoal needs."""


class UnsupportedArchitectureError(ConfigError):
    """config.json names an architecture shoal does not implement."""


class WeightError(ShoalError):
    """A weight is missing, has the wrong shape, or its file is damaged."""


class TokenizerError(ShoalError):
    """The tokenizer files are missing, unreadable, or do not match the model."""


class InvalidRequestError(ShoalError, ValueError):
    """A generation request carries an invalid parameter or prompt."""


class QueueFullError(ShoalError):
    """Too many requests are waiting for a slot; the caller should retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class GenerationError(ShoalError):
    """One request's step failed inside the engine (its logits were not finite, or the forward pass raised for
    it alone); that request ends with this error while the engine keeps serving the others."""


class EngineUnavailableError(ShoalError):
    """The engine failed or is shutting down; requests cannot be served."""
