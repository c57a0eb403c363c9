"""gnfx.register_layer_kind: a layer kind from outside the package (the einsum linear map of
examples/custom_layer_kind.py), its statistics against independent references, and the errors for
a layout or detector that cannot be one. (The example itself trains, costs, diagnoses and
checkpoints the kind end to end: tests/test_examples.py.)

For the einsum block z = W a + b (W = weightᵀ, d_out x d_in) on N examples of T tokens, with
g = ∂L/∂z and M loss terms, K-FAC's factors and the per-example diagonal are those of any linear
block (tests/test_statistics.py):

    expand:  A = 1/(N T) Σ ā āᵀ                    S = M Σ g gᵀ
    reduce:  A = 1/N Σ_n ā_n ā_nᵀ, ā_n = mean_t ā   S = M Σ_n (Σ_t g)(Σ_t g)ᵀ
    diag  = 1/N Σ_n (∇ℓ̃_n)²  in the [W b] layout (the stored weight's gradient transposed)

The references are forward hooks on the module plus a hook on its output tensor, and per-example
gradients from torch.func.vmap; float64, compared at 1e-10.
"""
import copy
import importlib.util
import os
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from gnfx.errors import ConfigError, GnfxError
from gnfx.layouts import KINDS
from gnfx.layouts.base import Layout
from gnfx.layouts.linear import LinearLayout
from gnfx.passes.linear import find_linear_sites
from references import TOL, hook_statistics, per_example_grads
from steps import compile_for_statistics, statistic_step
from test_cost import every_tensor_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("custom_layer_kind", os.path.join(ROOT, "examples", "custom_layer_kind.py"))
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)

DTYPE = torch.float64


@pytest.fixture(autouse=True)
def kinds():
    """Every test leaves the registered layer kinds as it found them."""
    with mock.patch.dict(KINDS):
        yield


def register():
    return gnfx.register_layer_kind("einsum_linear", example.EinsumLayout, example.find_einsum_sites)


def token_model():
    torch.manual_seed(0)
    return example.TokenClassifier().to(DTYPE)


def token_batch(n=6, t=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, t, 8, generator=g, dtype=DTYPE), torch.randint(0, 4, (n,), generator=g)


class ThreeAxisEinsum(nn.Module):
    """A map of the features of (N, T, C) by a weight of three axes, as an einsum: no kind of gnfx's takes
    it (a linear map of the channels of (N, C, T), "nct,cd->ndt", was this example until the linear kind
    took it)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 4, 4, dtype=DTYPE))

    def forward(self, x):
        return torch.einsum("ntc,cdk->ntdk", x, self.weight).flatten(2).mean(1)


def test_an_einsum_no_kind_takes_falls_back_naming_register_layer_kind():
    x, _ = token_batch()
    with pytest.warns(UserWarning, match="gnfx.register_layer_kind"):
        c = gnfx.compile(ThreeAxisEinsum(), optimizer="kfac", example_inputs=(x,))
    reasons = {f.param: f.reason for f in c.layers.fallbacks}
    assert set(reasons) == {"weight"} and "einsum" in reasons["weight"]


def test_a_registered_kind_takes_the_nodes_it_claims_from_the_built_in_kinds():
    """gnfx's linear kind takes the example's einsum (and its bias); once registered, the example's
    kind, registered after the built-in ones, takes it."""
    x, _ = token_batch()
    before = gnfx.compile(token_model(), optimizer="kfac", example_inputs=(x,))
    block = before.layers["mix"]
    assert (block.kind, block.params, block.d_in, block.d_out) == ("linear", ("mix.weight", "mix.bias"), 8, 16)
    kind = register()
    assert KINDS["einsum_linear"] is kind and register() is kind  # registering it again does nothing
    after = gnfx.compile(token_model(), optimizer="kfac", example_inputs=(x,))
    block = after.layers["mix"]
    assert (block.kind, block.params, block.d_in, block.d_out) == ("einsum_linear", ("mix.weight", "mix.bias"), 8, 16)
    assert block.preconditioner == "kfac" and not after.layers.fallbacks
    assert block.shapes == {"A": (9, 9), "S": (16, 16), "W": (8, 16)}
    assert "einsum_linear" in repr(after)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_the_statistics_of_a_registered_kind_equal_hooks_and_per_example_gradients(approx):
    register()
    model, (x, y) = token_model(), token_batch()
    ref = hook_statistics(model, ["mix"], x, y, approx)["mix"]
    grads = per_example_grads(model, x, y)
    diag = torch.cat([grads["mix.weight"].transpose(1, 2), grads["mix.bias"].unsqueeze(2)], 2).square().mean(0)
    c = compile_for_statistics(model, optimizer="kfac", kfac_approx=approx, example_inputs=(x,))
    statistic_step(c, x, y)
    got = c.statistics("mix")
    torch.testing.assert_close(got["A"], ref["A"], **TOL)
    torch.testing.assert_close(got["S"], ref["S"], **TOL)
    torch.testing.assert_close(got["diag"], diag, **TOL)


class LinearTokenClassifier(nn.Module):
    """TokenClassifier with nn.Linear in place of the einsum, on the same parameter values."""

    def __init__(self, einsum_model):
        super().__init__()
        self.mix = nn.Linear(8, 16).to(DTYPE)
        self.head = copy.deepcopy(einsum_model.head)
        with torch.no_grad():
            self.mix.weight.copy_(einsum_model.mix.weight.t())
            self.mix.bias.copy_(einsum_model.mix.bias)

    def forward(self, x):
        return self.head(torch.tanh(self.mix(x)).mean(1))


def test_kfac_trains_a_registered_kind_exactly_as_the_built_in_linear_kind():
    """The einsum block and an nn.Linear block of the same values take the same K-FAC steps: its
    layout reads the stored (d_in, d_out) weight as the same W (d_out x d_in)."""
    register()
    einsum = token_model()
    linear = LinearTokenClassifier(einsum)
    x = token_batch()[0]
    compiled = [gnfx.compile(m, optimizer="kfac", lr=0.1, example_inputs=(x,)) for m in (einsum, linear)]
    for step in range(3):
        x, y = token_batch(seed=step)
        for c in compiled:
            F.cross_entropy(c(x), y).backward()
            c.step()
            c.zero_grad()
    torch.testing.assert_close(einsum.mix.weight.t(), linear.mix.weight, **TOL)
    torch.testing.assert_close(einsum.mix.bias, linear.mix.bias, **TOL)
    torch.testing.assert_close(einsum.head.weight, linear.head.weight, **TOL)


def test_the_cost_model_counts_every_tensor_a_registered_kind_allocates():
    register()
    x, y = token_batch()
    c = gnfx.compile(token_model(), optimizer="kfac", stat_every=1, example_inputs=(x,))
    statistic_step(c, x, y)
    assert c.cost().total_memory_bytes == every_tensor_bytes(c)


def rows(self, a):
    yield a.reshape(a.shape[0], -1, a.shape[-1])


@pytest.mark.parametrize("name,layout,detector,needle", [
    ("tensor", example.EinsumLayout, example.find_einsum_sites, "identifier other than tensor, fallback"),
    ("two words", example.EinsumLayout, example.find_einsum_sites, "identifier"),
    ("einsum_linear", int, example.find_einsum_sites, "subclass of gnfx.layouts.base.Layout"),
    ("einsum_linear", type("NoRows", (Layout,), {}), example.find_einsum_sites, "does not define input_chunks"),
    ("einsum_linear", type("Ids", (Layout,), {"input_chunks": rows, "diagonal_A": True}), example.find_einsum_sites,
     "does not define per_example_gradient"),
    ("einsum_linear", type("Routed", (Layout,), {"input_chunks": rows, "routed": True}), example.find_einsum_sites,
     "does not define routed_rows"),
    ("einsum_linear", type("BadView", (Layout,), {"input_chunks": rows, "view": "T"}), example.find_einsum_sites,
     "view = 'T' is not one of"),
    ("einsum_linear", type("NoGroups", (Layout,), {"input_chunks": rows, "groups": 0}), example.find_einsum_sites,
     "groups = 0 is not a positive int"),
    ("einsum_linear", example.EinsumLayout, lambda gm: ([], []), "detector(graph_module, param_of, shape_of)"),
    ("einsum_linear", example.EinsumLayout, "find_einsum_sites", "detector(graph_module, param_of, shape_of)"),
    ("linear", example.EinsumLayout, example.find_einsum_sites, "'linear' is taken"),
])
def test_a_kind_that_cannot_be_registered_is_a_config_error_naming_the_fix(name, layout, detector, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        gnfx.register_layer_kind(name, layout, detector)
    assert set(KINDS) == {"linear", "conv", "conv_transpose", "embedding", "norm", "position", "scale", "recurrent",
                          "weighted_sum", "shift", "experts", "bilinear", "stacked"}


def test_the_built_in_kinds_are_registered_as_a_users_are():
    assert gnfx.register_layer_kind("linear", LinearLayout, find_linear_sites) is KINDS["linear"]


def test_a_detector_that_returns_no_sites_is_an_error_naming_its_kind():
    gnfx.register_layer_kind("broken", example.EinsumLayout, lambda gm, param_of, shape_of: (["einsum"], []))
    with pytest.raises(GnfxError, match="detector of layer kind 'broken' returned 'einsum'"):
        gnfx.compile(token_model(), example_inputs=(token_batch()[0],))
