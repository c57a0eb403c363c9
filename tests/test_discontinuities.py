"""quadratic_products="auto" (the default): finite differences where the captured forward is smooth in θ,
forward mode where passes/discontinuities.py finds a place it may not be (a jump, a stop-gradient, code the
graph does not hold). The expected verdicts are the operations' own mathematics: a comparison, rounding or
an argmax jumps, a max's value or a top-k's values do not."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import gnfx

WIDTH = 6


def found(model, x, capture="fx", **kw):
    """What the quadratic step of `model` compiled with loss="cross_entropy" finds after one training call."""
    c = gnfx.compile(model, optimizer="kfac", loss="cross_entropy", capture=capture, **kw)
    F.cross_entropy(c(x), torch.zeros(len(x), dtype=torch.long)).backward()
    return c.optimizer.quadratic.discontinuities()


class Between(nn.Module):
    """Linear, then `op` of its output (and of the input x), then Linear: `op` sees a value that depends on θ."""

    def __init__(self, op):
        super().__init__()
        self.op = op
        self.first, self.last = nn.Linear(4, WIDTH), nn.Linear(WIDTH, 3)

    def forward(self, x):
        return self.last(self.op(self.first(x), x))


class Straight(torch.autograd.Function):
    """A straight-through rounding: its forward rounds, its backward passes the gradient on."""

    @staticmethod
    def forward(ctx, h):
        return h.round()

    @staticmethod
    def backward(ctx, grad):
        return grad


def written_into_a_buffer(h, x):
    out = h.new_zeros(h.shape[0], 2 * WIDTH)  # depends on h by its shape only
    out.narrow(1, 0, WIDTH).copy_(h)  # an in-place write into a view: `out` depends on θ from here on
    return out[:, :WIDTH] + out.argmax(-1, keepdim=True).float()


def under_no_grad(h, x):
    with torch.no_grad():
        scale = h.norm(dim=-1, keepdim=True)
    return h / scale


def checked(h, x):
    torch._assert(h.isfinite().all(), "non-finite activations")  # a check whose comparison reaches no output
    return h


SMOOTH = {
    "tanh": lambda h, x: torch.tanh(h),
    "gelu_layer_norm": lambda h, x: F.gelu(F.layer_norm(h, (WIDTH,))),
    "softmax": lambda h, x: torch.softmax(h, -1) * h,
    "max_values": lambda h, x: h - h.max(-1, keepdim=True).values,
    "max_unpacked": lambda h, x: h - h.max(-1, keepdim=True)[0],
    "topk_values": lambda h, x: h + h.topk(2, -1).values.sum(-1, keepdim=True),
    "sort_values": lambda h, x: h.sort(-1).values,
    "input_mask": lambda h, x: h.masked_fill(x[:, :1] > 0, 0.0),
    "own_dtype": lambda h, x: h.to(h.dtype) * 2 + torch.zeros_like(h),
    "in_place": lambda h, x: h.add_(1.0),
    "checked": checked,
}
JUMPS = {
    "comparison": (lambda h, x: h * (h > 0), "jumps"),
    "round": (lambda h, x: h.round() + h, "jumps"),
    "remainder": (lambda h, x: torch.remainder(h, 1.0), "jumps"),
    "floor_division": (lambda h, x: torch.div(h, 0.5, rounding_mode="floor") + h, "jumps"),
    "integer_cast": (lambda h, x: h.long().float() + h, "jumps"),
    "half_cast": (lambda h, x: h.half().float(), "jumps"),
    "input_dtype_cast": (lambda h, x: h.to(x.long().dtype).to(x.dtype), "jumps"),
    "argmax": (lambda h, x: h + h.argmax(-1, keepdim=True), "jumps"),
    "router": (lambda h, x: h * F.one_hot(h.topk(1, -1).indices[:, 0], WIDTH), "indices jump"),
    "max_indices": (lambda h, x: h + h.max(-1, keepdim=True)[1], "indices jump"),
    "hardshrink": (lambda h, x: F.hardshrink(h, 0.1), "jumps"),
    "hard_gumbel": (lambda h, x: F.gumbel_softmax(h, tau=1.0, hard=True) * h, "jumps"),
    "written_into_a_buffer": (written_into_a_buffer, "jumps"),
    "straight_through": (lambda h, x: h + (h.round() - h).detach(), "stop-gradient"),
    "no_grad": (under_no_grad, "torch.no_grad"),
    "function": (lambda h, x: Straight.apply(h), "code the graph does not hold"),
    # continuous, with a kink in every entry: a difference crosses many of them (passes/discontinuities.py)
    "relu": (lambda h, x: F.relu(h), "kink"),
    "relu6": (lambda h, x: F.relu6(h), "kink"),
    "clamp": (lambda h, x: h.clamp(-1, 1), "kink"),
    "abs": (lambda h, x: h.abs(), "kink"),
    "leaky_relu": (lambda h, x: F.leaky_relu(h, 0.1), "kink"),
}


@pytest.mark.parametrize("name", SMOOTH)
def test_a_smooth_forward_has_no_discontinuity(name):
    torch.manual_seed(0)
    assert found(Between(SMOOTH[name]), torch.randn(8, 4)) == []


@pytest.mark.parametrize("name", JUMPS)
def test_a_jump_a_stop_gradient_or_foreign_code_is_found(name):
    op, why = JUMPS[name]
    torch.manual_seed(0)
    findings = found(Between(op), torch.randn(8, 4))
    assert findings and any(why in f for f in findings), findings


def test_an_activation_layer_with_kinks_is_found_and_steps_by_forward_mode():
    """nn.ReLU as a layer (torch.nn's own, which passes as a layer) is found for its kinks, and under "auto" the
    step of a ReLU network takes forward-mode products, not differences (which were 7-85% off forward mode's on
    float32 ReLU networks: passes/discontinuities.py)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    assert any("kink" in f for f in found(model, torch.randn(8, 4)))
    c = gnfx.compile(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), optimizer="kfac",
                     loss="cross_entropy")
    x, y = torch.randn(8, 4), torch.randint(3, (8,))
    F.cross_entropy(c(x), y).backward()
    c.step()
    assert c.optimizer.last_step["finite_differences"] is False


@pytest.mark.parametrize("name", ["router", "straight_through", "comparison", "max_indices"])
def test_torch_exports_graphs_are_read_alike(name):
    op, why = JUMPS[name]
    torch.manual_seed(0)
    findings = found(Between(op), torch.randn(8, 4), capture="export")
    assert findings and any(why in f for f in findings), findings
    assert found(Between(SMOOTH["topk_values"]), torch.randn(8, 4), capture="export") == []


class Cubed(torch.autograd.Function):
    """h³ with its own backward (which is its derivative): torch.export's graph holds its forward's operations."""

    @staticmethod
    def forward(ctx, h):
        ctx.save_for_backward(h)
        return h ** 3

    @staticmethod
    def backward(ctx, grad):
        h, = ctx.saved_tensors
        return 3 * h ** 2 * grad


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_custom_function_is_named_in_either_graph(capture):
    """torch.fx's graph calls the Function; torch.export's holds the operations of its forward (passes/capture.py
    records which Functions it applied): either way its backward is its own, which a difference does not see."""
    torch.manual_seed(0)
    findings = found(Between(lambda h, x: Cubed.apply(h)), torch.randn(8, 4), capture=capture)
    assert findings and any("Cubed" in f for f in findings), findings


def test_jumps_only_in_what_no_parameter_reaches_are_none():
    """A comparison of the inputs alone, and torch's own smooth layers (an LSTM, attention) on the way."""

    class Sequence(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.rnn = nn.Embedding(10, WIDTH), nn.LSTM(WIDTH, WIDTH, batch_first=True)
            self.attention, self.out = nn.MultiheadAttention(WIDTH, 2, batch_first=True), nn.Linear(WIDTH, 3)

        def forward(self, ids):
            h, _ = self.rnn(self.embed(ids))
            a, _ = self.attention(h, h, h, key_padding_mask=ids == 0)
            return self.out(a[:, -1])

    ids = torch.randint(1, 10, (8, 5))
    assert found(Sequence(), ids) == []
    assert found(Sequence(), ids, capture="export") == []


def test_an_opaque_submodule_is_code_the_graph_does_not_hold():
    class Scaled(nn.Module):
        def forward(self, h):
            return h * 2

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, WIDTH), Scaled(), nn.Linear(WIDTH, 3))
    assert found(copy.deepcopy(model), torch.randn(8, 4)) == []
    findings = found(model, torch.randn(8, 4), leaf_modules=["1"])
    assert len(findings) == 1 and "opaque (Scaled)" in findings[0]


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(smooth=st.lists(st.sampled_from(sorted(SMOOTH)), min_size=1, max_size=4),
       jump=st.one_of(st.none(), st.sampled_from(sorted(JUMPS))), where=st.integers(0, 4))
def test_a_chain_of_smooth_operations_is_smooth_until_one_jumps(smooth, jump, where):
    """Any chain of the smooth operations above, with or without one of the others inserted anywhere in it: found
    exactly when one was inserted."""
    ops = [SMOOTH[name] for name in smooth]
    if jump is not None:
        ops.insert(min(where, len(ops)), JUMPS[jump][0])

    def chain(h, x):
        for op in ops:
            h = op(h, x)
        return h

    torch.manual_seed(0)
    assert bool(found(Between(chain), torch.randn(8, 4))) == (jump is not None)


# ----------------------------------------------------------------------------- the step the verdict chooses


def steps(model, x, y, **kw):
    """The parameters after each of three quadratic steps, and how each took its products."""
    c = gnfx.compile(model, optimizer="kfac", loss="cross_entropy", stat_every=1, inv_every=1, **kw)
    torch.manual_seed(1)  # the Fisher's sampled labels
    trajectory, products = [], []
    for _ in range(3):
        F.cross_entropy(c(x), y).backward()
        c.step()
        c.zero_grad()
        trajectory.append([p.detach().clone() for p in model.parameters()])
        products.append("difference" if c.optimizer.last_step["finite_differences"] else "forward")
    return trajectory, products


@pytest.mark.parametrize("op, taken", [(SMOOTH["gelu_layer_norm"], "difference"), (JUMPS["router"][0], "forward")])
def test_auto_steps_as_the_products_it_chooses(op, taken):
    """At the default, a smooth model's steps are those of quadratic_products="difference", bit for bit, and a
    router's those of "forward"."""
    torch.manual_seed(0)
    model = Between(op).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    auto, products = steps(copy.deepcopy(model), x, y)
    chosen, _ = steps(model, x, y, quadratic_products=taken)
    assert products == [taken] * 3
    for a, b in zip(auto, chosen):
        assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_auto_takes_forward_mode_for_sixteen_bit_outputs():
    """A bfloat16 model, which quadratic_products="difference" refuses (tests/test_quadratic_step.py), steps at
    the default by forward mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(torch.bfloat16)
    x, y = torch.randn(8, 4, dtype=torch.bfloat16), torch.randint(0, 3, (8,))
    _, products = steps(model, x, y)
    assert products == ["forward"] * 3
