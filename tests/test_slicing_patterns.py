"""Parameters used in non-standard but common ways (benchmarks/results/first_contact_14_slicing.md): slimmable and
supernet layers that slice their parameters in the forward (passes/weight_slices.py), the numbers a forward reads
changed between steps (gnfx.variants, gnfx.opened_leaf), DARTS' architecture weights trained by an optimizer of
their own, and ensembles in stacked weights (passes/stacked_products.py).

Slimmable networks and once-for-all / dynamic-NAS supernets run a layer at an active width by slicing its
full parameter, `F.linear(x, W[:o, :i], b[:o])`, and an elastic kernel by cropping the center of a K x K
kernel, `F.conv2d(x, W[:o, :x.shape[1], s:s + k, s:s + k], b[:o], padding=k // 2)`; the width is an attribute
the training loop sets between steps. The block is the full parameter's: its statistics are those of the
active sub-layer (plain hooks on it, float64) placed at the window's entries of the full factors, zeros
elsewhere, and per-example gradients (torch.func) that are zero outside the window.
"""
from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx

from references import TOL, kfac_factors, per_example_fisher_diag
from steps import compile_for_statistics, statistic_step, train_on_batches


class SlimLinear(nn.Linear):
    """A slimmable linear layer: the first `out_width` rows and `in_width` columns of W are active."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__(d_in, d_out)
        self.in_width, self.out_width = d_in, d_out

    def forward(self, x):
        return F.linear(x, self.weight[:self.out_width, :self.in_width], self.bias[:self.out_width])


class SlimMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = SlimLinear(6, 16), SlimLinear(16, 3)

    def width(self, w: int) -> "SlimMLP":
        self.fc1.out_width = self.fc2.in_width = w
        return self

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class ElasticConv(nn.Conv2d):
    """A supernet convolution: the first `out_channels_active` filters, the input's channels, and the k x k
    center of the K x K kernel."""

    def __init__(self, c_in: int, c_out: int, k: int):
        super().__init__(c_in, c_out, k, padding=k // 2)
        self.out_channels_active, self.k = c_out, k

    def forward(self, x):
        start = (self.kernel_size[0] - self.k) // 2
        w = self.weight[:self.out_channels_active, :x.shape[1], start:start + self.k, start:start + self.k]
        return F.conv2d(x, w, self.bias[:self.out_channels_active], padding=self.k // 2)


class ElasticCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.head = ElasticConv(3, 8, 5), ElasticConv(8, 4, 3), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.c2(torch.tanh(self.c1(x)))).mean((2, 3)))


def active_calls(model, names, x, y):
    """{name: (a, g)} of the modules `names` on one forward and backward of the mean cross-entropy: the input
    and output gradient of the active sub-layer, by plain hooks (on a copy)."""
    model = copy.deepcopy(model)
    modules, calls = dict(model.named_modules()), {}

    def hook(module, inputs, output, name):
        calls[name] = [inputs[0].detach(), None]
        output.register_hook(lambda g: calls[name].__setitem__(1, g.detach()))

    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: hook(m, i, o, n)) for n in names]
    F.cross_entropy(model(x), y).backward()
    for h in handles:
        h.remove()
    return calls


def in_full(factor: torch.Tensor, active: list[int], d: int) -> torch.Tensor:
    """The factor of the active entries `active` (their order) placed into a d x d factor, zeros elsewhere."""
    out = factor.new_zeros(d, d)
    index = torch.tensor(active)
    out[index[:, None], index] = factor
    return out


def batch(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (shape[0],), generator=g)


def test_a_sliced_linear_is_a_block_of_the_full_weight_with_the_active_layers_statistics_in_its_window():
    """Before: W[:o, :i] and b[:o] fell back to the diagonal ('used by call_function getitem')."""
    torch.manual_seed(0)
    model = SlimMLP().double().width(10)
    reference, (x, y) = copy.deepcopy(model), batch((16, 6))
    c = compile_for_statistics(model, optimizer="kfac", capture="fx")
    statistic_step(c, x, y)
    assert {b.name: (b.kind, b.bias) for b in c.layers} == {"fc1": ("linear", "fc1.bias"),
                                                            "fc2": ("linear", "fc2.bias")}
    assert not c.layers.fallbacks
    calls = active_calls(reference, ["fc1", "fc2"], x, y)
    diag = per_example_fisher_diag(reference, x, y)
    for name, (rows_in, rows_out), d_in, d_out in (("fc1", (range(6), range(10)), 6, 16),
                                                   ("fc2", (range(10), range(3)), 16, 3)):
        want = kfac_factors([calls[name]], True, "expand", len(x))
        got = c.statistics(name)
        torch.testing.assert_close(got["A"], in_full(want["A"], [*rows_in, d_in], d_in + 1), **TOL)
        torch.testing.assert_close(got["S"], in_full(want["S"], list(rows_out), d_out), **TOL)
        full_diag = torch.cat([diag[f"{name}.weight"], diag[f"{name}.bias"][:, None]], 1)
        torch.testing.assert_close(got["diag"], full_diag, **TOL)


def test_the_width_set_between_steps_is_the_width_the_statistic_steps_run():
    """Before: the graph kept the width it was captured at (a Python number, a constant of the trace), so that
    after `width(8)` the statistic steps computed the 16-wide network: another output and loss than the
    model's own, silently. Now a changed number is another form of call, captured again."""
    torch.manual_seed(0)
    model = SlimMLP().double()
    reference = copy.deepcopy(model)
    x, y = batch((16, 6))
    c = compile_for_statistics(model, optimizer="kfac", capture="fx")
    for width in (16, 8, 4, 8):
        model.width(width), reference.width(width)
        out, out_ref = c(x), reference(x)
        assert torch.equal(out, out_ref), width
        F.cross_entropy(out, y).backward()
        c.step()
        c.zero_grad()
        reference.load_state_dict(model.state_dict())
    want = kfac_factors([active_calls(reference.width(8), ["fc2"], x, y)["fc2"]], True, "expand", len(x))
    model.width(8)
    statistic_step(c, x, y)
    torch.testing.assert_close(c.statistics("fc2")["A"], in_full(want["A"], [*range(8), 16], 17), **TOL)


def test_a_cropped_kernel_of_a_supernet_convolution_is_a_block_of_the_full_kernel():
    """Before: the elastic convolutions fell back to the diagonal. The reference A is the active layer's: its
    input unfolded with the k x k kernel and its padding, placed at the channels and the kernel's center."""
    torch.manual_seed(0)
    model = ElasticCNN().double()
    model.c1.out_channels_active, model.c1.k = 6, 3
    reference, (x, y) = copy.deepcopy(model), batch((4, 3, 6, 6))
    c = compile_for_statistics(model, optimizer="kfac", capture="fx")
    statistic_step(c, x, y)
    assert [(b.name, b.kind) for b in c.layers] == [("c1", "conv"), ("c2", "conv"), ("head", "linear")]
    assert not c.layers.fallbacks
    calls = active_calls(reference, ["c1", "c2"], x, y)
    diag = per_example_fisher_diag(reference, x, y)
    for name, k, channels, outputs, full in (("c1", 3, 3, 6, (8, 3, 5)), ("c2", 3, 6, 4, (4, 8, 3))):
        a, g = calls[name]
        patches = F.unfold(a, k, padding=k // 2).transpose(1, 2)  # (N, L, c·k·k)
        want = kfac_factors([(patches, g.flatten(2).transpose(1, 2))], True, "expand", len(x))
        c_out, c_in, K = full
        start = (K - k) // 2
        entries = torch.arange(c_in * K * K).reshape(c_in, K, K)[:channels, start:start + k, start:start + k]
        got = c.statistics(name)
        torch.testing.assert_close(got["A"], in_full(want["A"], [*entries.flatten().tolist(), c_in * K * K],
                                                     c_in * K * K + 1), **TOL)
        torch.testing.assert_close(got["S"], in_full(want["S"], list(range(outputs)), c_out), **TOL)
        full_diag = torch.cat([diag[f"{name}.weight"].flatten(1), diag[f"{name}.bias"][:, None]], 1)
        torch.testing.assert_close(got["diag"], full_diag, **TOL)


def test_kfac_at_defaults_trains_a_slimmable_network_at_a_width_drawn_per_step():
    """The loop draws each step's width (a slimmable network's training at random widths): each width is a
    form of call of its own, and the quadratic step's products run the model at that width."""
    torch.manual_seed(0)
    model = SlimMLP()
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    c = gnfx.compile(model, optimizer="kfac", loss="cross_entropy")
    widths = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(20):
        model.width((4, 8, 16)[torch.randint(0, 3, (1,), generator=widths).item()])
        losses += train_on_batches(c, [(x, y)], F.cross_entropy)
    assert not c.layers.fallbacks
    assert F.cross_entropy(model.width(16)(x), y).item() < 0.6 * losses[0]


class TemperedNet(nn.Module):
    """A forward that divides its logits by a temperature the training loop anneals (a number, not a flag)."""

    def __init__(self):
        super().__init__()
        self.fc, self.temperature = nn.Linear(6, 3), 1.0

    def forward(self, x):
        return self.fc(x) / self.temperature


def test_a_number_the_loop_changes_between_steps_is_the_one_the_statistic_steps_compute_with():
    """Before: the captured graph held the temperature of the capture, 1.0, as a constant: every statistic step
    after `temperature = 0.5` computed another output, loss and gradient than the model, silently."""
    torch.manual_seed(0)
    model = TemperedNet().double()
    x, y = batch((8, 6))
    c = compile_for_statistics(model, optimizer="kfac", capture="fx")
    statistic_step(c, x, y)
    model.temperature = 0.5
    assert torch.equal(c(x), TemperedNet.forward(model, x))


class SandwichMLP(SlimMLP):
    """The width drawn inside the forward (Python's random: the forward is no graph, its layers opened)."""

    def forward(self, x):
        self.width(random.choice([4, 8, 16]))
        return super().forward(x)


def test_a_width_the_forward_sets_on_an_opened_layer_runs_that_layers_own_forward_with_a_warning():
    """Before: the opened layers' graphs kept the width they were traced with, and the forward's own width was
    set on their stand-ins for the call only: the statistic steps computed another network, silently."""
    torch.manual_seed(0)
    model, (x, y) = SandwichMLP().double(), batch((8, 6))
    with pytest.warns(RuntimeWarning, match="neither torch.fx nor torch.export"):
        c = compile_for_statistics(model, optimizer="kfac", example_inputs=(x,))
    outputs = []
    with pytest.warns(RuntimeWarning, match=r"fc1.in_width|fc1.out_width|fc2.in_width"):
        for seed in range(6):
            random.seed(seed)
            out = c(x)
            random.seed(seed)
            outputs.append((out, model(x)))
            F.cross_entropy(out, y).backward()
            c.step()
            c.zero_grad()
    for out, own in outputs:
        assert torch.equal(out, own)


class MixedOp(nn.Module):
    """A DARTS cell edge: y = Σ_i softmax(α)_i op_i(x), α the architecture weights."""

    def __init__(self):
        super().__init__()
        self.ops = nn.ModuleList([nn.Linear(6, 6), nn.Sequential(nn.Linear(6, 6), nn.Tanh()), nn.Identity()])
        self.alpha = nn.Parameter(1e-3 * torch.randn(3))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        weights = F.softmax(self.alpha, 0)
        return self.head(weights[0] * self.ops[0](x) + weights[1] * self.ops[1](x) + weights[2] * self.ops[2](x))


def test_darts_architecture_weights_in_a_group_of_lr_0_are_adams_alone():
    """DARTS trains α with Adam on validation batches, the weights on training batches: with α moved to a group
    of lr 0, gnfx's steps (the quadratic step at defaults) leave it, Adam moves it, and both backwards give the
    module's gradients (the statistic forward's graph included)."""
    torch.manual_seed(0)
    model = MixedOp().double()
    (x, y), (x_val, y_val) = batch((32, 6)), batch((32, 6), seed=2)
    c = gnfx.compile(model, optimizer="kfac", loss="cross_entropy", example_inputs=(x,))
    assert [b.name for b in c.layers] == ["ops.0", "ops.1.0", "head"]
    group = c.optimizer.param_groups[0]
    group["params"] = [p for p in group["params"] if p is not model.alpha]
    c.optimizer.add_param_group({"params": [model.alpha], "lr": 0.0})
    adam = torch.optim.Adam([model.alpha], lr=1e-2)
    start = model.alpha.detach().clone()
    for _ in range(4):
        adam.zero_grad()
        F.cross_entropy(c(x_val), y_val).backward()
        reference = copy.deepcopy(model)
        reference.zero_grad()
        F.cross_entropy(reference(x_val), y_val).backward()
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, **TOL)
        adam.step()
        c.zero_grad()
        alpha = model.alpha.detach().clone()
        train_on_batches(c, [(x, y)], F.cross_entropy)
        assert torch.equal(model.alpha.detach(), alpha)
    assert not torch.equal(model.alpha.detach(), start)


def test_a_parameter_taken_out_of_every_group_is_named_with_the_fix():
    """Before: a KeyError (an object id) from deep in the diagonal preconditioner's step."""
    torch.manual_seed(0)
    model = MixedOp().double()
    x, y = batch((32, 6))
    c = gnfx.compile(model, optimizer="kfac", loss="cross_entropy", example_inputs=(x,))
    group = c.optimizer.param_groups[0]
    group["params"] = [p for p in group["params"] if p is not model.alpha]
    with pytest.raises(gnfx.ConfigError, match="'alpha' is in no param group.*'lr': 0.0"):
        train_on_batches(c, [(x, y)], F.cross_entropy)


class BatchedEnsemble(nn.Module):
    """E = 3 MLPs in stacked weights: the first layer reads one input for all members (`"bi,eoi->beo"`), the
    second each member's hidden units (`"bei,eoi->beo"`, or `bmm` of (E, N, d) with W stored (E, d_in, d_out));
    the output is the members' mean."""

    def __init__(self, bmm: bool):
        super().__init__()
        self.bmm = bmm
        self.W1 = nn.Parameter(torch.randn(3, 8, 6) / 6 ** 0.5)
        self.W2 = nn.Parameter(torch.randn(3, 8, 4) / 8 ** 0.5 if bmm else torch.randn(3, 4, 8) / 8 ** 0.5)

    def products(self, x):
        """(the layers' inputs, their outputs)."""
        z1 = torch.einsum("bi,eoi->beo", x, self.W1)
        h = torch.tanh(z1)
        a2 = h.transpose(0, 1) if self.bmm else h
        z2 = torch.bmm(a2, self.W2) if self.bmm else torch.einsum("bei,eoi->beo", a2, self.W2)
        return (x, a2), (z1, z2)

    def forward(self, x):
        z2 = self.products(x)[1][1]
        return (z2.mean(0) if self.bmm else z2.mean(1)) @ torch.eye(4, 3, dtype=x.dtype)


@pytest.mark.parametrize("bmm", [False, True])
def test_an_ensemble_in_stacked_weights_is_one_block_with_each_members_factors(bmm):
    """Before: W1 and W2 fell back to the diagonal ('used by call_function einsum' / 'bmm'). Reference: each
    member's input rows and output gradients (a tensor hook on the product), and torch.func's per-example
    gradients for the diagonal."""
    torch.manual_seed(0)
    model = BatchedEnsemble(bmm).double()
    reference, (x, y) = copy.deepcopy(model), batch((16, 6))
    c = compile_for_statistics(model, optimizer="kfac", capture="fx")
    statistic_step(c, x, y)
    assert [(b.name, b.kind) for b in c.layers] == [("W1", "stacked"), ("W2", "stacked")]
    (a1, a2), (z1, z2) = reference.products(x)
    grads = {}
    z1.register_hook(lambda g: grads.__setitem__("W1", g))
    z2.register_hook(lambda g: grads.__setitem__("W2", g))
    F.cross_entropy((z2.mean(0) if bmm else z2.mean(1)) @ torch.eye(4, 3, dtype=x.dtype), y).backward()
    diag = per_example_fisher_diag(reference, x, y)
    for name, a, member_in in (("W1", a1, None), ("W2", a2, 0 if bmm else 1)):
        g = grads[name].transpose(0, 1) if (bmm and name == "W2") else grads[name]  # (N, E, d_out)
        a = a.unsqueeze(1).expand(-1, 3, -1) if member_in is None else a.movedim(member_in, 1)  # (N, E, d_in)
        want_A = torch.einsum("nei,nej->eij", a, a) / len(x)
        want_S = len(x) * torch.einsum("neo,nep->eop", g, g)
        got = c.statistics(name)
        torch.testing.assert_close(got["A"], want_A, **TOL)
        torch.testing.assert_close(got["S"], want_S, **TOL)
        w_diag = diag[name].transpose(1, 2) if (bmm and name == "W2") else diag[name]
        torch.testing.assert_close(got["diag"], w_diag.flatten(0, 1), **TOL)


@pytest.mark.parametrize("bmm", [False, True])
def test_kfac_at_defaults_trains_an_ensemble_in_stacked_weights(bmm):
    """Before: 0% of the parameters in blocks, the diagonal's steps."""
    torch.manual_seed(0)
    model = BatchedEnsemble(bmm)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    c = gnfx.compile(model, optimizer="kfac", loss="cross_entropy")
    losses = train_on_batches(c, [(x, y)] * 20, F.cross_entropy)
    assert not c.layers.fallbacks
    assert losses[-1] < 0.25 * losses[0]  # (AdamW at lr 1e-2: 0.88x in these 20 steps)


class DynamicDepthwise(nn.Module):
    """once-for-all's DynamicSeparableConv2d: a depthwise kernel cut to the active channels, `groups` them."""

    def __init__(self):
        super().__init__()
        self.weight, self.head, self.channels = nn.Parameter(torch.randn(8, 1, 5, 5)), nn.Linear(6, 3), 6

    def forward(self, x):
        w = self.weight[:self.channels, :, 1:4, 1:4]
        return self.head(F.conv2d(x, w, padding=1, groups=self.channels).mean((2, 3)))


def test_a_window_of_a_grouped_convolutions_output_channels_falls_back_saying_why():
    """Before: the generic "used by call_function 'getitem'"."""
    c = gnfx.compile(DynamicDepthwise(), optimizer="kfac", lr=1e-2, example_inputs=(torch.randn(2, 6, 5, 5),))
    (fallback,) = c.layers.fallbacks
    assert fallback.param == "weight" and "grouped convolution (groups=6) that cuts its output" in fallback.reason
