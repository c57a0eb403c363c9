"""How the statistics tests drive gnfx: compile for statistics on every step, take one step."""
import warnings

import torch
import torch.nn.functional as F

import gnfx
from references import cross_entropy

ALL = ("A", "S", "diag")


def compile_for_statistics(model, **options):
    """Statistics on every step, no moving average: c.statistics(name) is the last batch's."""
    defaults = dict(stat_every=1, stat_decay=0.0, statistics=ALL, lr=1e-2)
    return gnfx.compile(model, **(defaults | options))


def statistic_step(c, x, y, **kwargs):
    """One forward, backward and step of the compiled model on (x, y) with cross-entropy."""
    cross_entropy(c(x, **kwargs), y).backward()
    c.step()
    c.zero_grad()


def backward_and_step(c, loss, scaler=None) -> None:
    """loss.backward() and c.step(), or under `scaler` (a torch.amp.GradScaler) the scaled loss's backward,
    scaler.step(c.optimizer) and scaler.update(); then c.zero_grad()."""
    if scaler is None:
        loss.backward()
        c.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(c.optimizer)
        scaler.update()
    c.zero_grad()


def step_beside(c, model, reference, loss, loss_ref) -> None:
    """The compiled model's backward and step beside `reference`, a plain copy of `model` (the module it
    was compiled from): the parameter gradients of `loss` and of the copy's `loss_ref` must be equal, bit
    for bit; then the compiled model steps and the copy takes its parameters."""
    loss.backward()
    loss_ref.backward()
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p.grad, p_ref.grad), name
    step_and_follow(c, model, reference)
    reference.load_state_dict(model.state_dict())  # the buffers too


def step_and_follow(c, model, reference) -> None:
    """The compiled model steps, both models' gradients are zeroed, and `reference` (a plain copy of `model`, the
    module it was compiled from) takes the stepped parameters; its buffers stay its own."""
    c.step()
    c.zero_grad()
    reference.zero_grad()
    with torch.no_grad():
        for p, p_ref in zip(model.parameters(), reference.parameters(), strict=True):
            p_ref.copy_(p)


def train(c, x, y, loss_fn, steps: int) -> list[float]:
    """`steps` forwards, backwards and steps of the compiled model on (x, y); the losses."""
    return train_on_batches(c, [(x, y)] * steps, loss_fn)


def train_on_batches(c, batches, loss_fn, forward=None) -> list[float]:
    """A forward (by `forward`, the compiled model itself by default: e.g. torch.compile of it), backward
    and step of the compiled model `c` on each (x, y) of `batches`; the losses."""
    forward = c if forward is None else forward
    losses = []
    for x, y in batches:
        loss = loss_fn(forward(x), y)
        loss.backward()
        c.step()
        c.zero_grad()
        losses.append(loss.item())
    return losses


def train_in_blocks(model, x, y, optimizer: str, steps: int = 4) -> list[float]:
    """Compile `model` (torch.fx, lr 1e-2, the capture's warnings silenced) with `optimizer`, check that
    every trainable parameter is in a curvature block, and train it `steps` steps on (x, y) with a
    mean squared error; the losses."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = gnfx.compile(model, optimizer=optimizer, lr=1e-2, capture="fx", example_inputs=(x,))
    assert not c.layers.fallbacks
    return train(c, x, y, F.mse_loss, steps)
