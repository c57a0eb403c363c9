"""Lazy modules compiled before their first forward (gnfx.lazy_modules).

A model of nn.LazyLinear / nn.LazyConv2d / nn.LazyBatchNorm2d compiled before it was ever called trains
exactly as the same model (same seed) that the user materialized first, by the dry run PyTorch's
documentation asks for (eval mode, without gradients), and then compiled: every optimizer, its
first call materializing the model, or `example_inputs` at gnfx.compile. Float64; equal bitwise
(the same operations on the same values), dropout included: the quadratic step replays the training
forward with its random state, recorded after the dry run drew the initializations.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from gnfx.preconditioners import REGISTRY

DTYPE = torch.float64
STEPS = 3
# torch's first forward-mode call loads jvp decompositions through the deprecated torch.jit.script.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def lazy_mlp():
    return nn.Sequential(nn.LazyLinear(6, dtype=DTYPE), nn.Tanh(), nn.Dropout(0.2), nn.LazyLinear(3, dtype=DTYPE))


def lazy_cnn():
    return nn.Sequential(nn.LazyConv2d(3, 3, dtype=DTYPE), nn.LazyBatchNorm2d(dtype=DTYPE), nn.ReLU(), nn.Flatten(),
                         nn.LazyLinear(3, dtype=DTYPE))


MODELS = {"mlp": (lazy_mlp, (8, 5)), "cnn": (lazy_cnn, (8, 2, 5, 5))}


def data(shape):
    g = torch.Generator().manual_seed(1)
    return torch.randn(*shape, generator=g, dtype=DTYPE), torch.randint(0, 3, (shape[0],), generator=g)


def options(optimizer):
    """kfac and ekfac at their defaults with loss= (the quadratic step), the others with an lr."""
    quadratic = optimizer in ("kfac", "ekfac")
    return dict(loss="cross_entropy") if quadratic else dict(lr=0.05, stat_every=1)


def run(make, shape, optimizer, how):
    """Seeded model `make()`, compiled `how`: 'first call' (lazy at gnfx.compile), 'example_inputs'
    (lazy, materialized by gnfx.compile from the example) or 'materialized' (the user's dry run
    first); STEPS steps. The losses, the parameters and the buffers."""
    x, y = data(shape)
    torch.manual_seed(0)
    model = make()
    if how == "materialized":
        model.eval()
        with torch.no_grad():
            model(x)
        model.train()
    kwargs = dict(example_inputs=(x,)) if how == "example_inputs" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = gnfx.compile(model, optimizer=optimizer, **kwargs, **options(optimizer))
        losses = []
        for _ in range(STEPS):
            loss = F.cross_entropy(c(x), y)
            loss.backward()
            c.step()
            c.zero_grad()
            losses.append(loss.item())
    return losses, dict(model.named_parameters()), dict(model.named_buffers()), c


@pytest.mark.parametrize("how", ["first call", "example_inputs"])
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("optimizer", [*REGISTRY, "auto"])
def test_compiled_lazy_model_trains_as_the_materialized_one(optimizer, model, how):
    make, shape = MODELS[model]
    losses, params, buffers, c = run(make, shape, optimizer, how)
    expected_losses, expected_params, expected_buffers, expected = run(make, shape, optimizer, "materialized")
    assert losses == expected_losses
    assert losses[-1] < losses[0]
    assert params.keys() == expected_params.keys() and buffers.keys() == expected_buffers.keys()
    for name in params:
        assert torch.equal(params[name], expected_params[name]), name
    for name in buffers:
        assert torch.equal(buffers[name], expected_buffers[name]), name
    assert [(b.name, b.kind) for b in c.layers] == [(b.name, b.kind) for b in expected.layers]


def test_lazy_model_waits_for_its_first_call_and_keeps_its_parameter_objects():
    """Before the first call nothing is captured and the optimizer already holds the parameters (an
    LR scheduler can be built); the first call materializes them in place, the same objects, and
    in the modes the model had (a submodule in eval mode stays in it)."""
    torch.manual_seed(0)
    model = lazy_cnn()
    model[1].eval()
    c = gnfx.compile(model, optimizer="kfac", lr=0.1)
    held = list(c.optimizer.param_groups[0]["params"])
    scheduler = torch.optim.lr_scheduler.StepLR(c.optimizer, step_size=1, gamma=0.5)
    assert "not captured yet" in repr(c.layers)
    x, y = data(MODELS["cnn"][1])
    F.cross_entropy(c(x), y).backward()
    c.step()
    scheduler.step()
    assert [p.shape for p in held] == [p.shape for p in model.parameters()]
    assert all(p is q for p, q in zip(held, model.parameters()))
    assert [m.training for m in model.modules()] == [True, True, False, True, True, True]
    assert {b.name for b in c.layers} >= {"0", "4"}


@pytest.mark.parametrize("load", ["before gnfx.compile", "after gnfx.compile"])
def test_lazy_model_loaded_from_a_checkpoint_trains_as_the_checkpoints_model(load):
    """torch materializes a lazy model's parameters on load_state_dict but leaves its modules lazy (their
    class and the pre-hook that infers them) until a forward: such a model is compiled as the model
    the checkpoint came from, with its layers as blocks, and trains as that one does (float64, bitwise)."""
    make, shape = MODELS["cnn"]
    x, y = data(shape)
    torch.manual_seed(1)
    source = make()
    source(x)
    checkpoint = {k: v.clone() for k, v in source.state_dict().items()}

    def train(model, before_compile, after_compile):
        if before_compile:
            model.load_state_dict(checkpoint)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            c = gnfx.compile(model, optimizer="kfac", lr=0.1, stat_every=1)
            if after_compile:
                c.load_state_dict(checkpoint)
            for _ in range(STEPS):
                F.cross_entropy(c(x), y).backward()
                c.step()
                c.zero_grad()
        return c, model.state_dict()

    c, trained = train(make(), load == "before gnfx.compile", load == "after gnfx.compile")
    expected_c, expected = train(source, True, False)
    assert [(b.name, b.kind) for b in c.layers] == [(b.name, b.kind) for b in expected_c.layers]
    assert {b.kind for b in c.layers} == {"conv", "norm", "linear"}
    assert trained.keys() == expected.keys()
    for name in trained:
        assert torch.equal(trained[name], expected[name]), name
