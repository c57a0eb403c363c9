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


def check_chain(chain, context: str = "chain") -> list[Transform]:
    """`chain` as a list, or a ConfigError that names what is wrong with it and the fix."""
    from gnfx import transforms  # the stages, for the message

    known = ", ".join(f"gnfx.transforms.{name}" for name in transforms.__all__ if name != "Transform")
    if not isinstance(chain, (list, tuple)) or not chain:
        raise ConfigError(f"{context}={chain!r} is not a chain: pass a list of transforms ending in "
                          f"gnfx.transforms.Step() (available: {known}), or None for the preconditioner's own")
    unknown = [t for t in chain if not isinstance(t, Transform)]
    if unknown:
        raise ConfigError(f"{context}: {unknown[0]!r} is not a transform; a chain holds instances of {known} "
                          f"(or of a subclass of gnfx.transforms.Transform)")
    writes = [i for i, t in enumerate(chain) if t.writes_parameters]
    if len(writes) != 1 or writes[0] != len(chain) - 1:
        found = f"{len(writes)} parameter writes" if len(writes) != 1 else f"its parameter write at position {writes[0]}"
        raise ConfigError(f"{context} {list(chain)!r} has {found}: a chain ends in exactly one parameter write "
                          f"(gnfx.transforms.Step(), the last stage)")
    owner: dict[str, Transform] = {}
    for t in chain:
        for key in t.state_shapes((1,)):
            if key in owner:
                raise ConfigError(f"{context}: {owner[key]!r} and {t!r} both keep state {key!r}; a chain holds each "
                                  f"stateful transform once")
            owner[key] = t
    return list(chain)


def _valid(chain) -> bool:
    return chain is None or bool(check_chain(chain))


def chain_hparam() -> HParam:
    """The `chain` hyperparameter of a curvature preconditioner."""
    return HParam(None, "None or a list of gnfx.transforms ending in gnfx.transforms.Step()", _valid,
                  "the update chain after the direction (None: the preconditioner's default_chain)")


def stage_names(prefix: str, chain: list[Transform]) -> list[str]:
    """The names of the chain's stages in the generated update: `<prefix>_<label>`, numbered where
    a label repeats."""
    labels = [t.label for t in chain]
    return [f"{prefix}_{label}" + (f"{labels[:i].count(label)}" if labels.count(label) > 1 else "")
            for i, label in enumerate(labels)]
