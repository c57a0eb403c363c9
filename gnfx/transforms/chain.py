"""A chain of transforms: what makes one valid, and the `chain` hyperparameter that passes one.

A chain is a list of gnfx.transforms stages run in order on a curvature preconditioner's
directions (gnfx.transforms.base), ending in exactly one parameter write (`Step`). Its stages keep
their state under distinct keys. `chain=None` (the default) is the preconditioner's own
`default_chain(hp)`, built from its hyperparameters (momentum, graft, kl_clip, ...).
"""
from __future__ import annotations

from gnfx.errors import ConfigError
from gnfx.hparams import HParam
from gnfx.transforms.base import Transform


VALID = "None or a list of gnfx.transforms ending in gnfx.transforms.Step()"


def check_chain(chain) -> bool:
    """True for a valid chain (or None); else a ConfigError naming `chain=<value>`, what is wrong
    with it and the valid range."""
    from gnfx import transforms  # the stages, for the message

    if chain is None:
        return True

    def fail(reason: str):
        raise ConfigError(f"chain={chain!r} is invalid: {reason}; expected {VALID}")

    known = ", ".join(f"gnfx.transforms.{name}" for name in transforms.__all__ if name != "Transform")
    if not isinstance(chain, (list, tuple)) or not chain:
        fail(f"it is not a list of transforms (available: {known}); None gives the preconditioner's own chain")
    unknown = [t for t in chain if not isinstance(t, Transform)]
    if unknown:
        fail(f"{unknown[0]!r} is not a transform: a chain holds instances of {known} (or of a subclass of "
             f"gnfx.transforms.Transform)")
    writes = [i for i, t in enumerate(chain) if t.writes_parameters]
    if len(writes) != 1 or writes[0] != len(chain) - 1:
        fail((f"it has {len(writes)} parameter writes" if len(writes) != 1 else
              f"its parameter write is at position {writes[0]}") + ": a chain ends in exactly one, gnfx.transforms.Step()")
    owner: dict[str, Transform] = {}
    for t in chain:
        for key in t.state_shapes((1,)):
            if key in owner:
                fail(f"{owner[key]!r} and {t!r} both keep state {key!r}: a chain holds each stateful transform once")
            owner[key] = t
    return True


def chain_hparam() -> HParam:
    """The `chain` hyperparameter of a curvature preconditioner."""
    return HParam(None, VALID, check_chain,
                  "the update chain after the direction (None: the preconditioner's default_chain)")


def stage_names(prefix: str, chain: list[Transform]) -> list[str]:
    """The names of the chain's stages in the generated update: `<prefix>_<label>`, numbered where
    a label repeats."""
    labels = [t.label for t in chain]
    return [f"{prefix}_{label}" + (f"{labels[:i].count(label)}" if labels.count(label) > 1 else "")
            for i, label in enumerate(labels)]
