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
accelerator in `devices` (those of the forward's inputs); `replayed()` sets them for the duration
of a block and restores the states they had before it.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch


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

    def __init__(self, devices: Iterable[torch.device] = ()):
        accelerators = {d for d in devices if d.type != "cpu"}
        self.states = [(device, _get(device)) for device in (None, *accelerators)]

    @contextlib.contextmanager
    def replayed(self) -> Iterator[None]:
        """Run the block with the recorded states; the generators' states before it are restored after."""
        current = [(device, _get(device)) for device, _ in self.states]
        for device, state in self.states:
            _set(device, state)
        try:
            yield
        finally:
            for device, state in current:
                _set(device, state)
