"""`torch.compile(gnfx_model)` trains exactly as the gnfx model does without the wrapper.

The compiled model decides per call, outside dynamo's tracing, whether the call collects statistics
(gnfx.compiled): statistic steps run the instrumented graph eagerly (its taps record `a` with Python
side effects and `δ` with gradient hooks), the other steps run the original forward as dynamo
compiled it. The reference is the same float64 run without torch.compile: statistics, optimizer
state and parameters agree to round-off at the end, and the step counter the switch reads costs
no recompilation (dynamo sees one graph, the original forward, whatever the step).
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

import gnfx
from models import CNN, TanhMLP

PRECONDITIONERS = ["diag", "rank1", "kfac", "ekfac", "shampoo", "soap"]
STEPS = 5  # with stat_every=2: statistic steps 0, 2, 4 and plain steps 1, 3
# float64 and the same kernels on both sides (backends "eager" and "aot_eager" run torch's own ops):
# what remains is summation order, ~1e-16 relative, grown by a few preconditioned steps.
TOL = dict(rtol=1e-10, atol=1e-12)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Dynamo's caches are per code object (CompiledModel.forward): each test starts with none."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class CountingBackend:
    """A dynamo backend that counts the graphs it compiles and runs them with `backend`."""

    def __init__(self, backend: str = "eager"):
        self.inner = torch._dynamo.lookup_backend(backend)
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.inner(gm, example_inputs)


def batches(steps: int, shape=(6, 3, 8, 8), classes: int = 5):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(shape, dtype=torch.float64, generator=g), torch.randint(0, classes, (shape[0],), generator=g))
            for _ in range(steps)]


def mlp() -> TanhMLP:
    """The tiny float64 MLP 5 -> 4 -> 3, the same initial weights on every call."""
    torch.manual_seed(0)
    return TanhMLP().double()


def train(model, data, backend=None, **hparams):
    """Train `model` with gnfx on `data`, the forward wrapped in torch.compile(backend) if given."""
    c = gnfx.compile(model, **({"stat_every": 2, "stat_decay": 0.5, "lr": 0.05, "compile": False} | hparams))
    forward = c if backend is None else torch.compile(c, backend=backend)
    for x, y in data:
        F.cross_entropy(forward(x), y).backward()
        c.step()
        c.zero_grad()
    return c


def assert_same_training(compiled, eager) -> None:
    """Statistics of every block, optimizer state and parameters agree."""
    store = eager.optimizer.statistics
    for name in store.blocks:
        expected, got = eager.statistics(name), compiled.statistics(name)
        assert got.keys() == expected.keys(), name
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], **TOL, msg=lambda m: f"{name} {k}: {m}")
    expected, got = eager.optimizer.state_dict()["state"], compiled.optimizer.state_dict()["state"]
    assert got.keys() == expected.keys()
    for i in expected:
        for k, v in expected[i].items():
            torch.testing.assert_close(got[i][k], v, **TOL, msg=lambda m: f"state {i} {k}: {m}")
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q, p, **TOL, msg=lambda m: f"parameter {name}: {m}")


@pytest.mark.parametrize("optimizer", PRECONDITIONERS)
def test_statistics_and_updates_equal_eager(optimizer):
    """A CNN (conv and linear taps) under torch.compile with AOT autograd, every preconditioner,
    statistic and plain steps alternating; A, S and the per-example diagonal collected for every
    block whatever the preconditioner needs, so that every plan runs the taps."""
    data = batches(STEPS)
    hp = dict(optimizer=optimizer, statistics=("A", "S", "diag"))
    eager = train(CNN(width=4), data, **hp)
    backend = CountingBackend("aot_eager")
    compiled = train(CNN(width=4), data, backend=backend, **hp)
    assert backend.graphs >= 1  # the plain steps did run a compiled graph
    assert compiled.statistics("head")["S"].abs().sum() > 0
    assert_same_training(compiled, eager)
    assert not torch.equal(compiled.head.weight, CNN(width=4).head.weight)  # it trained


@pytest.mark.parametrize("optimizer", ["kfac", "shampoo"])
def test_statistic_switch_compiles_no_new_graph(optimizer):
    """The step counter the switch reads is not guarded by dynamo: one graph (the original forward)
    after the first plain step, none more over statistic and plain steps (before, every step
    recompiled until torch's recompile limit, then ran without statistics)."""
    data = batches(2 * STEPS, shape=(4, 5), classes=3)
    backend = CountingBackend()
    c = gnfx.compile(mlp(), optimizer=optimizer, stat_every=2, compile=False)
    forward = torch.compile(c, backend=backend)
    graphs = []
    for x, y in data:
        F.cross_entropy(forward(x), y).backward()
        c.step()
        c.zero_grad()
        graphs.append(backend.graphs)
    assert graphs[1:] == [1] * (len(data) - 1), graphs  # kfac's step 0 collects statistics: no graph yet


@pytest.mark.parametrize("fisher", ["mc", "type2"])
def test_true_fisher_statistics_equal_eager(fisher):
    """The extra backward of fisher='mc'/'type2' starts from the eager statistic step's output: the
    same S (mc: the same sampled labels, from the same seed)."""
    data = batches(STEPS, shape=(4, 5), classes=3)
    hp = dict(optimizer="kfac", fisher=fisher, loss="cross_entropy")
    eager = train(mlp(), data, **hp)  # mlp() seeds the sampling too
    compiled = train(mlp(), data, backend="aot_eager", **hp)
    assert_same_training(compiled, eager)


def test_fullgraph_is_refused_at_the_first_call_with_the_fix():
    """A statistic step cannot be one graph: the first call raises, naming gnfx and the fix."""
    c = gnfx.compile(mlp(), optimizer="kfac")
    with pytest.raises(torch._dynamo.exc.Unsupported, match="gnfx runs statistic steps eagerly.*fullgraph=False"):
        torch.compile(c, backend="eager", fullgraph=True)(torch.randn(4, 5, dtype=torch.float64))
    assert c.optimizer.statistics.forward_id == 0 and not c.optimizer.collected  # nothing was recorded
