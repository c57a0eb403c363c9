"""The global random generators' states at one moment, to replay a forward with its random numbers.

The quadratic-model step (gnfx.quadratic_step) runs the step's training forward again: the
forward-mode products J v at θ, and the loss L(θ+s) of ρ. A model that draws random numbers in its
forward (dropout, timm's DropPath, stochastic depth) would draw new ones in each replay: the
products would be those of another sub-network than the gradient's, and ρ = (L(θ) - L(θ+s)) /
(-q(c)) would compare the losses of two different sub-networks. That difference is noise of the
size of the loss's change under a new mask, not of the step: on a look-alike of timm's
EfficientNet/ConvNeXt blocks with DropPath 0.1 it was ±0.1-0.5 on a batch loss of ~0.45, against
predicted reductions that shrink with the step, so ρ fell to -10⁹, every adaptation rejected the
step and raised λ, and λ stayed at its maximum with the step at 0 from step ~45 on
(benchmarks/results/library_models.md). Replayed with the generators' states of the training
forward, every replay draws the same masks, as torch.utils.checkpoint's `preserve_rng_state`
recomputes a checkpointed forward: J is the Jacobian of the gradient's own sub-network and ρ
exact, as for a deterministic model. The replays leave the generators as they found them, so the
training loop's random numbers do not depend on how many replays a step made. With
`model.step(closure)` the loss at θ+s is the closure's second call, the user's forward: it runs with
the states recorded before the first call's training forward as well, so it draws that call's masks.

`RandomState(devices)` records the CPU generator's state and that of the default generator of each
accelerator in `devices` (those of the forward's inputs), and with `python` Python's and numpy's
global generators (`python_state`: a forward that draws with them, which capture notes,
passes/python_random.py, draws again in a replay; recording them costs ~0.1 ms, so a forward that
does not draw skips it); `replayed()` sets them for the duration of a block and restores the states
they had before it.
"""
from __future__ import annotations

import contextlib
import random
import sys
from typing import Iterable, Iterator

import torch


def numpy_random():
    """numpy.random, where the process has imported numpy (else None)."""
    numpy = sys.modules.get("numpy")  # only a numpy the model's code could have imported
    return None if numpy is None else numpy.random


def python_state():
    """The states of Python's `random` and of numpy's global generator (None without numpy)."""
    np_random = numpy_random()
    return random.getstate(), None if np_random is None else np_random.get_state()


def same_python_state(a, b) -> bool:
    """Whether two `python_state()`s are the same."""
    (python_a, numpy_a), (python_b, numpy_b) = a, b
    if python_a != python_b:
        return False
    if numpy_a is None or numpy_b is None:
        return numpy_a is numpy_b
    return numpy_a[2:] == numpy_b[2:] and numpy_a[1].tobytes() == numpy_b[1].tobytes()


def restore_python_state(state) -> None:
    """Set Python's and numpy's generators to a `python_state()`."""
    python, numpy_state = state
    random.setstate(python)
    if numpy_state is not None:
        numpy_random().set_state(numpy_state)


def _get(device: torch.device | None) -> torch.Tensor:
    if device is None:
        return torch.get_rng_state()
    return torch.get_device_module(device.type).get_rng_state(device)


def _set(device: torch.device | None, state: torch.Tensor) -> None:
    if device is None:
        torch.set_rng_state(state)
    else:
        torch.get_device_module(device.type).set_rng_state(state, device)


class RandomState:
    """The states of the CPU generator (device None) and of the accelerators `devices`, now."""

    def __init__(self, devices: Iterable[torch.device] = (), python: bool = True):
        accelerators = {d for d in devices if d.type != "cpu"}
        self.states = [(device, _get(device)) for device in (None, *accelerators)]
        self.python = python_state() if python else None

    @contextlib.contextmanager
    def replayed(self) -> Iterator[None]:
        """Run the block with the recorded states; the generators' states before it are restored after."""
        current = [(device, _get(device)) for device, _ in self.states]
        current_python = None if self.python is None else python_state()
        for device, state in self.states:
            _set(device, state)
        if self.python is not None:
            restore_python_state(self.python)
        try:
            yield
        finally:
            for device, state in current:
                _set(device, state)
            if current_python is not None:
                restore_python_state(current_python)
