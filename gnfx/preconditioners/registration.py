"""`gnfx.register_preconditioner`: a preconditioner defined outside gnfx, usable by name.

A preconditioner is a class (docs/design.md, "Adding a preconditioner"): a subclass of
`CurvaturePreconditioner` (gnfx.preconditioners.curvature), whose batched `direction` the generated
update runs on the stacked gradients of its blocks and which gets the update chain (momentum,
weight decay, the step: gnfx.transforms, `default_chain`) for free, or of `Preconditioner` (gnfx.preconditioners.base) that updates
its parameters itself (`update`). Once registered, its `name` is an `optimizer=` of gnfx.compile
and of policies, and `print(model)`, `model.cost()`, `gnfx.diagnose` and checkpoints ask the class.
"""
from __future__ import annotations

import keyword

from gnfx.errors import ConfigError
from gnfx.hparams import HParam
from gnfx.preconditioners import REGISTRY
from gnfx.preconditioners.base import Preconditioner
from gnfx.preconditioners.curvature import CurvaturePreconditioner

# names the generated update (gnfx.codegen) already binds, and the policy's "auto"
RESERVED = ("torch", "fold", "stack_folded", "index", "grads", "states", "lrs", "wds", "collect", "auto")


def _defined_by(cls, method: str):
    """The class of `cls`'s MRO that defines `method`, None if none does."""
    return next((k for k in cls.__mro__ if method in vars(k)), None)


def register_preconditioner(cls):
    """Register the preconditioner class `cls` under `cls.name`; returns `cls` (so it also serves as
    a class decorator). Raises a ConfigError naming the problem and the fix for a class that is not
    a preconditioner, a name that is taken or cannot name its variables in the generated update,
    hyperparameters that are not gnfx.hparams.HParam, or missing methods. Registering the same class
    again does nothing."""
    if not (isinstance(cls, type) and issubclass(cls, Preconditioner)):
        raise ConfigError(f"register_preconditioner takes a subclass of gnfx.preconditioners.curvature."
                          f"CurvaturePreconditioner (or of gnfx.preconditioners.base.Preconditioner); got {cls!r}")
    name = cls.name
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name) or name in RESERVED:
        raise ConfigError(f"{cls.__qualname__}.name = {name!r}: a preconditioner's name must be a Python identifier "
                          f"(it names the preconditioner's variables in the generated update), not a keyword nor "
                          f"one of {', '.join(RESERVED)}; set the class attribute name")
    if REGISTRY.get(name) is cls:
        return cls
    if name in REGISTRY:
        taken = REGISTRY[name]
        raise ConfigError(f"the preconditioner name {name!r} is taken by {taken.__module__}.{taken.__qualname__}; "
                          f"give {cls.__module__}.{cls.__qualname__} another name")
    hparams = cls.HPARAMS if isinstance(cls.HPARAMS, dict) else {}
    bad = sorted(k for k, v in hparams.items() if not isinstance(v, HParam))
    if not isinstance(cls.HPARAMS, dict) or bad:
        raise ConfigError(f"{cls.__qualname__}.HPARAMS must map names to gnfx.hparams.HParam (e.g. "
                          f"gnfx.hparams.positive(help, default)); not: {', '.join(bad) or type(cls.HPARAMS).__name__}")
    if issubclass(cls, CurvaturePreconditioner):
        required, base = ("init_group", "direction"), CurvaturePreconditioner
    else:
        required, base = ("update",), Preconditioner
    missing = [m for m in required if _defined_by(cls, m) in (None, base)]
    if missing:
        raise ConfigError(f"{cls.__qualname__} does not define {', '.join(missing)}, which a "
                          f"{base.__name__} must (docs/design.md, 'Adding a preconditioner')")
    retired = [m for m in ("safeguard", "apply") if issubclass(cls, CurvaturePreconditioner) and _defined_by(cls, m)]
    if retired:
        raise ConfigError(f"{cls.__qualname__} defines {', '.join(retired)}, which gnfx no longer calls: the update "
                          f"after the direction is a chain of gnfx.transforms; declare it with the classmethod "
                          f"default_chain(hp) (e.g. [KLClip(kappa), HeavyBall(momentum), Step()]; docs/design.md, "
                          f"'The update chain')")
    if cls.in_auto and _defined_by(cls, "cost_parts") is Preconditioner:
        raise ConfigError(f"{cls.__qualname__}.in_auto is set but it has no cost_parts: optimizer='auto' weighs "
                          f"every candidate by its cost; define cost_parts or leave in_auto False")
    REGISTRY[name] = cls
    return cls
