"""Hyperparameter specifications: defaults, valid ranges, and the errors for bad values.

Every hyperparameter gnfx accepts is declared once as an `HParam`; `resolve` fills defaults,
rejects unknown names (listing the valid ones) and checks every value against its range, so that
a bad value fails at compile time with a message naming it, its value and the valid range.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from gnfx.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class HParam:
    default: Any
    valid: str  # the valid range, in words, for error messages
    check: Callable[[Any], bool]
    doc: str = ""


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def positive(doc: str, default) -> HParam:
    return HParam(default, "a finite number > 0", lambda x: _number(x) and x > 0, doc)


def nonnegative(doc: str, default) -> HParam:
    return HParam(default, "a finite number >= 0", lambda x: _number(x) and x >= 0, doc)


def unit_interval(doc: str, default) -> HParam:
    return HParam(default, "a number in [0, 1)", lambda x: _number(x) and 0 <= x < 1, doc)


def open_unit_interval(doc: str, default) -> HParam:
    return HParam(default, "a number in (0, 1)", lambda x: _number(x) and 0 < x < 1, doc)


def positive_int(doc: str, default) -> HParam:
    return HParam(default, "an integer >= 1", lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 1, doc)


def nonnegative_int(doc: str, default) -> HParam:
    return HParam(default, "an integer >= 0", lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0, doc)


def choice(doc: str, default, options) -> HParam:
    return HParam(default, f"one of {tuple(options)}", lambda x: x in options, doc)


def flag(doc: str, default) -> HParam:
    return HParam(default, "True or False", lambda x: isinstance(x, bool), doc)


def betas(doc: str, default) -> HParam:
    return HParam(default, "a pair (beta1, beta2) of numbers in [0, 1)",
                  lambda x: isinstance(x, (tuple, list)) and len(x) == 2
                  and all(_number(b) and 0 <= b < 1 for b in x), doc)


def resolve(specs: dict[str, HParam], given: dict[str, Any], context: str) -> dict[str, Any]:
    """Defaults of `specs` overridden by `given`; raises ConfigError for unknown names or bad values."""
    unknown = sorted(set(given) - set(specs))
    if unknown:
        raise ConfigError(f"unknown hyperparameter{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))} "
                          f"for {context}; valid ones are: {', '.join(sorted(specs))}")
    values = {name: spec.default for name, spec in specs.items()}
    values.update(given)
    for name, value in given.items():
        if not specs[name].check(value):
            raise ConfigError(f"{name}={value!r} is invalid for {context}: expected {specs[name].valid}")
    return values
