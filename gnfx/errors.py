"""The errors gnfx raises. Each message names the problem and the fix."""


class GnfxError(Exception):
    """Base class of every error gnfx raises on purpose."""


class CaptureError(GnfxError):
    """The model's forward could not be captured as a graph."""


class ConfigError(GnfxError, ValueError):
    """An optimizer name, hyperparameter or option is invalid."""
