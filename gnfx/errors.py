"""The errors gnfx raises. Each message names the problem and the fix."""


class GnfxError(Exception):
    """Base class of every error gnfx raises on purpose."""


class CaptureError(GnfxError):
    """The model's forward could not be captured as a graph."""


class StatisticsError(GnfxError, KeyError):
    """`model.statistics(name)` has nothing to return: no block of that name, a block that collects
    no statistics under the plan, or none collected yet (before the first statistic step)."""

    def __str__(self) -> str:  # the message itself, not KeyError's quoted repr of it
        return str(self.args[0]) if self.args else ""


class ConfigError(GnfxError, ValueError):
    """An optimizer name, hyperparameter or option is invalid."""


class NoCostModel(GnfxError):
    """A preconditioner defines no cost formulas (`cost_parts`): `model.cost()` cannot be computed;
    `print(model)` shows its state memory as unknown."""
