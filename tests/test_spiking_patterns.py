"""Spiking-network patterns (spikingjelly, norse, snntorch) in plain torch: stateful neurons that keep their
membrane potential on the module between calls, reset by the user after each batch."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx

T, N = 3, 6


class DictStateNeuron(nn.Module):
    """spikingjelly's MemoryModule: the membrane potential v kept in a dict of the module (`self._memories`,
    a float until the first call), carried from one call to the next until `reset()`."""

    def __init__(self):
        super().__init__()
        self._memories = {"v": 0.0}

    def forward(self, x):
        v = 0.5 * self._memories["v"] + x
        self._memories["v"] = v
        return torch.tanh(v)

    def reset(self):
        self._memories["v"] = 0.0


class AttributeStateNeuron(DictStateNeuron):
    """snntorch's `init_hidden=True` neurons: the potential a tensor attribute of the module (`self.mem`)."""

    def __init__(self):
        nn.Module.__init__(self)
        self.mem = torch.zeros(())

    def forward(self, x):
        self.mem = 0.5 * self.mem + x
        return torch.tanh(self.mem)

    def reset(self):
        self.mem = torch.zeros(())


def single_step_net(neuron: type) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), neuron(), nn.Linear(8, 3))


def rate_loss(model: nn.Module, plain: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """spikingjelly's lif_fc_mnist loop: the single-step network called once per time step, its outputs
    averaged over the T steps (the rate), mean squared error to the one-hot labels; the state reset after."""
    rate = sum(model(x[t]) for t in range(T)) / T
    for m in plain.modules():
        if isinstance(m, DictStateNeuron):
            m.reset()
    return F.mse_loss(rate, F.one_hot(y, 3).to(rate.dtype))


@pytest.mark.parametrize("neuron", [DictStateNeuron, AttributeStateNeuron])
def test_a_neuron_state_carried_between_calls_is_carried_by_the_compiled_model(neuron):
    """torch.fx traced through the neuron: its graph read the state the trace saw (0.0) on every call, so the
    second and third time steps of the compiled model computed without the potential carried over, silently, and
    the dict was left holding the trace's Proxy. A forward that stores a tensor on its module (an attribute, or an
    entry of a dict or list it holds) is a side effect no graph repeats: the neuron runs as its Python code."""
    model = single_step_net(neuron)
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(T, N, 4, generator=g), torch.randint(0, 3, (N,), generator=g)
    c = gnfx.compile(model, "kfac", lr=1e-2, stat_every=1)
    for _ in range(3):
        loss, loss_ref = rate_loss(c, model, x, y), rate_loss(reference, reference, x, y)
        loss.backward()
        loss_ref.backward()
        torch.testing.assert_close(loss, loss_ref, rtol=0, atol=1e-6)
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-6)
        c.step()
        c.zero_grad()
        reference.zero_grad()
        reference.load_state_dict(model.state_dict())
    state = model[1]._memories["v"] if neuron is DictStateNeuron else model[1].mem
    assert isinstance(state, (float, torch.Tensor)) and type(state).__name__ in ("float", "Tensor")
    assert c.layers.coverage(dict(model.named_parameters()))[0] == sum(p.numel() for p in model.parameters())


class Looped(nn.Module):
    """A multi-step network: the loop over the T time steps in its forward, the neuron's state on the neuron."""

    def __init__(self):
        super().__init__()
        self.fc1, self.lif, self.fc2 = nn.Linear(4, 8), DictStateNeuron(), nn.Linear(8, 3)

    def forward(self, x):
        return torch.stack([self.fc2(self.lif(self.fc1(x[t]))) for t in range(x.shape[0])]).mean(0)


class Restarted(Looped):
    """The same function of x, its state set to `v0` by its own forward: replaying it needs no state kept."""

    def __init__(self, v0: torch.Tensor):
        super().__init__()
        self.v0 = v0

    def forward(self, x):
        self.lif._memories["v"] = self.v0
        return super().forward(x)


def test_the_quadratic_steps_replays_start_from_the_neuron_state_the_training_forward_started_from():
    """The quadratic-model step replays the training forward (J v, L(θ + s)): each replay advanced the neuron's
    potential again from where the training forward left it, so its GGN was of another function than the one
    trained and the state the next batch starts from (carried over, as spikingjelly's detach_net loops do) had
    moved T steps per replay, silently. Now the replays start from the training forward's state and leave the
    state that forward left: the step equals that of a network which sets the same starting state itself."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(T, N, 4, generator=g), torch.randint(0, 3, (N,), generator=g)
    torch.manual_seed(0)
    carried = Looped()
    with torch.no_grad():
        carried(x)  # an earlier batch: the state carried into this one
    v0 = carried.lif._memories["v"]
    restarted = Restarted(v0)
    restarted.load_state_dict(carried.state_dict())
    steps = []
    for model in (carried, restarted):
        c = gnfx.compile(model, "kfac", loss="cross_entropy")
        torch.manual_seed(2)  # the sampled Fisher's labels alike
        F.cross_entropy(c(x), y).backward()
        left = model.lif._memories["v"]
        c.step()
        assert model.lif._memories["v"] is left  # the state the training forward left, for the next batch
        steps.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*steps):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


class LogSoftmaxNet(nn.Module):
    """norse's tutorial decoder and PyTorch's MNIST example: the forward ends in log_softmax, the loss is nll_loss."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return F.log_softmax(self.fc(x), dim=1)


class LogitsNet(LogSoftmaxNet):
    """The same layers returning the logits, trained with F.cross_entropy."""

    def forward(self, x):
        return self.fc(x)


@pytest.mark.parametrize("hp", [{"quadratic_products": "forward"}, {"lr": 0.1, "fisher": "mc"}, {"lr": 0.1}],
                         ids=["quadratic_step", "mc-fisher", "empirical"])
def test_nll_loss_of_log_softmax_outputs_trains_as_the_cross_entropy_of_the_logits(hp):
    """F.nll_loss(log_softmax(a)) is the cross-entropy of a, but its gradient at the log-probabilities z is
    -onehot/M, whose rows do not sum to zero: loss='cross_entropy' refused it (the check reads a cross-entropy's
    targets from such rows). Through the log_softmax the two losses have the same gradients and GGN, so the
    model ending in log_softmax, trained with nll_loss, now takes the steps of the same layers returning logits
    under F.cross_entropy, with an ignored target (-100) among the rows: with the quadratic step (whose loss for ρ is
    recovered from the gradient at z; forward-mode products, whose rounding the two nets share to ~1e-12 where
    finite differences would amplify it to ~1e-8), with the sampled Fisher and with the empirical one."""
    runs = []
    for net, loss_fn in ((LogSoftmaxNet, F.nll_loss), (LogitsNet, F.cross_entropy)):
        torch.manual_seed(0)
        c = gnfx.compile(net().double(), "kfac", loss="cross_entropy", stat_every=1, **hp)
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            x, y = torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
            y[2] = -100
            loss_fn(c(x), y).backward()
            c.step()
            c.zero_grad()
        runs.append([p.detach().clone() for p in c.parameters()])
    torch.manual_seed(0)
    start = LogSoftmaxNet().double()
    assert any((p - q).abs().max() > 1e-3 for p, q in zip(runs[0], start.parameters()))  # it trained
    for p, q in zip(*runs):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


class SegmentationNet(nn.Module):
    """A 1x1 convolution's per-pixel class scores, (N, C, H, W): log_softmax over dimension 1 with
    `log_probabilities`, the logits otherwise."""

    def __init__(self, log_probabilities: bool):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)
        self.log_probabilities = log_probabilities

    def forward(self, x):
        z = self.conv(x)
        return F.log_softmax(z, dim=1) if self.log_probabilities else z


def test_nll_loss_of_per_pixel_log_softmax_finds_the_classes_axis_and_trains_as_the_cross_entropy():
    """An (N, C, H, W) output of log-probabilities under F.nll_loss: the gradient's rows sum to -1/M over either
    axis, so the classes' axis is the one over which z's logsumexp is 0; the steps of kfac's quadratic step
    (forward-mode products, as above) are those of the logits under F.cross_entropy."""
    runs = []
    for log_probabilities, loss_fn in ((True, F.nll_loss), (False, F.cross_entropy)):
        torch.manual_seed(0)
        c = gnfx.compile(SegmentationNet(log_probabilities).double(), "kfac", loss="cross_entropy", stat_every=1,
                         quadratic_products="forward")
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            x, y = torch.randn(2, 2, 4, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (2, 4, 5), generator=g)
            loss_fn(c(x), y).backward()
            c.step()
            c.zero_grad()
        runs.append([p.detach().clone() for p in c.parameters()])
    torch.manual_seed(0)
    start = SegmentationNet(True).double()
    assert any((p - q).abs().max() > 1e-3 for p, q in zip(runs[0], start.parameters()))  # it trained
    for p, q in zip(*runs):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
