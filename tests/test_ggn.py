"""Tests of gnfx.ggn against explicit matrices built with torch.autograd.functional.

The reference GGN is Jᵀ H_ℓ J with J the Jacobian of the flattened model output with respect to
the flattened trainable parameters and H_ℓ the Hessian of torch's own loss (F.cross_entropy,
F.mse_loss, F.binary_cross_entropy_with_logits) with respect to the flattened output. Everything runs
in float64 at 1e-10.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

import gnfx
import gnfx.ggn as ggn

DTYPE = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)
LOSSES = ["cross_entropy", "mse", "binary_cross_entropy"]

# torch's first forward-mode call loads jvp decompositions through the deprecated torch.jit.script.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


# ----------------------------------------------------------------------------- tiny models


class TinyLM(nn.Module):
    """(B, T, d) inputs to (B, T, V) logits, mixing tokens through a learned (T, T) matrix."""

    def __init__(self, d: int = 3, hidden: int = 4, vocab: int = 5, tokens: int = 3):
        super().__init__()
        self.inp = nn.Linear(d, hidden)
        self.mix = nn.Parameter(torch.randn(tokens, tokens) / tokens)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(torch.einsum("st,btd->bsd", self.mix, h))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(4, 2, bias=False)

    def forward(self, x, w):
        return torch.tanh(self.a(x)) * self.b(w)


class Wrapper(nn.Module):
    """Owns no parameters of its own: they are those of the inner model."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        return self.inner(*args)


def tiny_conv() -> nn.Module:
    bn = nn.BatchNorm2d(2).eval()  # eval mode: its running statistics are buffers in use
    bn.running_mean.copy_(torch.randn(2))
    bn.running_var.copy_(torch.rand(2) + 0.5)
    return nn.Sequential(nn.Conv2d(1, 2, 3), bn, nn.Tanh(), nn.Flatten(), nn.Linear(18, 3))


def batch_norm_train() -> nn.Module:
    """In training mode: normalized by the batch's statistics, which each forward would also fold
    into its running ones in place."""
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).train()


# name -> (model factory, input factory)
CASES = {
    "mlp_tanh": (
        lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)),
        lambda: torch.randn(6, 4),
    ),
    "mlp_no_bias": (
        lambda: nn.Sequential(nn.Linear(4, 5, bias=False), nn.ReLU(), nn.Linear(5, 3, bias=False)),
        lambda: torch.randn(6, 4),
    ),
    "lm": (TinyLM, lambda: torch.randn(2, 3, 3)),
    "conv": (tiny_conv, lambda: torch.randn(2, 1, 5, 5)),
    "two_inputs": (TwoInputs, lambda: (torch.randn(5, 3), torch.randn(5, 4))),
    "batch_norm_train": (batch_norm_train, lambda: torch.randn(6, 4)),
}


def make_case(name: str, loss: str, seed: int = 0):
    """A float64 model, its inputs, and targets of the right kind for the loss."""
    torch.manual_seed(seed)
    model_fn, inputs_fn = CASES[name]
    model = model_fn().to(DTYPE)
    inputs = inputs_fn()
    inputs = tuple(x.to(DTYPE) for x in inputs) if isinstance(inputs, tuple) else inputs.to(DTYPE)
    with torch.no_grad():
        z = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    return model, inputs, make_targets(z, loss)


def make_targets(z: torch.Tensor, loss: str) -> torch.Tensor:
    if loss == "cross_entropy":
        return torch.randint(0, z.shape[-1], z.shape[:-1])
    if loss == "binary_cross_entropy":  # soft multi-label targets in [0, 1]
        return torch.rand_like(z)
    return torch.randn_like(z)


def random_vector(model: nn.Module) -> list[torch.Tensor]:
    return [torch.randn_like(p) for p in model.parameters() if p.requires_grad]


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


# ----------------------------------------------------------------------------- references


def torch_loss(loss):
    """torch's own functional losses, the classes of language-model logits on the last axis."""
    if loss == "cross_entropy":
        return lambda z, y: F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1))
    if loss == "mse":
        return F.mse_loss
    if loss == "binary_cross_entropy":
        return F.binary_cross_entropy_with_logits
    return loss


def flat_model(model, inputs):
    """theta ↦ model output as a function of the flattened trainable parameters, and theta0."""
    named = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    args = inputs if isinstance(inputs, tuple) else (inputs,)

    def output(theta):
        chunks = theta.split([p.numel() for p in named.values()])
        params = {n: c.reshape(p.shape) for (n, p), c in zip(named.items(), chunks)}
        return functional_call(model, params, args)

    return output, flat(named.values())


def reference_ggn(model, loss, inputs, targets) -> torch.Tensor:
    output, theta0 = flat_model(model, inputs)
    z = output(theta0).detach()
    J = jacobian(lambda theta: output(theta).reshape(-1), theta0)
    H = hessian(lambda zf: torch_loss(loss)(zf.reshape(z.shape), targets), z.reshape(-1))
    return J.T @ H @ J


def reference_hessian(model, loss, inputs, targets) -> torch.Tensor:
    output, theta0 = flat_model(model, inputs)
    return hessian(lambda theta: torch_loss(loss)(output(theta), targets), theta0)


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("case", CASES)
def test_ggn_vp_matches_explicit_jt_h_j(case, loss):
    model, inputs, targets = make_case(case, loss)
    v = random_vector(model)
    gv = ggn.ggn_vp(model, loss, inputs, targets, v)
    assert [g.shape for g in gv] == [t.shape for t in v]
    expected = reference_ggn(model, loss, inputs, targets) @ flat(v)
    torch.testing.assert_close(flat(gv), expected, **TOL)


def test_products_leave_batch_norm_running_statistics_alone():
    model, inputs, targets = make_case("batch_norm_train", "cross_entropy")
    before = {n: b.clone() for n, b in model.named_buffers()}
    ggn.ggn_vp(model, "cross_entropy", inputs, targets, random_vector(model))
    ggn.ggn_matrix(model, "cross_entropy", inputs, targets)
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(buffer, before[name], rtol=0, atol=0)


def test_ggn_vp_language_model_with_ignored_tokens():
    model, inputs, targets = make_case("lm", "cross_entropy")
    targets[0, 1] = targets[1, 2] = -100
    v = random_vector(model)
    expected = reference_ggn(model, "cross_entropy", inputs, targets) @ flat(v)
    torch.testing.assert_close(flat(ggn.ggn_vp(model, "cross_entropy", inputs, targets, v)), expected, **TOL)
    torch.testing.assert_close(flat(ggn.fisher_vp(model, "cross_entropy", inputs, targets, v)), expected, **TOL)


def test_the_cross_entropy_output_product_of_rows_none_of_which_counts_is_zero():
    """H_ℓ u of cross-entropy with every target ignored is 0: the rows' weights 1/(rows kept) would be 0/0
    (the quadratic step marks the rows its output gradient does not reach as ignored: a batch the model fits
    to rounding, tests/test_quadratic_step.py), and the rows the mean counts are none."""
    z, u = torch.randn(2, 3, 5, dtype=DTYPE), torch.randn(4, 2, 3, 5, dtype=DTYPE)
    ignored = torch.full((2, 3), -100)
    assert torch.equal(ggn.output_hessian_product("cross_entropy", z, ignored, u), torch.zeros_like(u))
    one_kept = ignored.clone()
    one_kept[1, 2] = 0  # one row counts: its weight is 1
    p = torch.softmax(z[1, 2], -1)
    expected = torch.zeros_like(u)
    expected[:, 1, 2] = u[:, 1, 2] @ (torch.diag(p) - torch.outer(p, p))
    torch.testing.assert_close(ggn.output_hessian_product("cross_entropy", z, one_kept, u), expected, **TOL)


def test_segmentation_logits_take_their_classes_on_dimension_1_as_f_cross_entropy_does():
    """(N, C, H, W) logits with (N, H, W) class-index masks: the named loss is F.cross_entropy(z, y), the
    mean over the kept pixels of each pixel's softmax over dimension 1 (before: flattened as if the
    classes were the last axis, which these shapes reject), in every product and the dense matrix."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 4, 1)).to(DTYPE)
    inputs, targets = torch.randn(2, 2, 3, 5, dtype=DTYPE), torch.randint(0, 4, (2, 3, 5))
    targets[0, 1, :2] = -100
    v = random_vector(model)
    native = lambda z, y: F.cross_entropy(z, y)  # noqa: E731
    expected = reference_ggn(model, native, inputs, targets)
    torch.testing.assert_close(flat(ggn.ggn_vp(model, "cross_entropy", inputs, targets, v)), expected @ flat(v), **TOL)
    torch.testing.assert_close(flat(ggn.fisher_vp(model, "cross_entropy", inputs, targets, v)), expected @ flat(v),
                               **TOL)
    torch.testing.assert_close(ggn.ggn_matrix(model, "cross_entropy", inputs, targets), expected, **TOL)
    torch.testing.assert_close(flat(ggn.hvp(model, "cross_entropy", inputs, targets, v)),
                               reference_hessian(model, native, inputs, targets) @ flat(v), **TOL)


def test_ggn_vp_custom_loss_callable():
    def quartic(z, y):
        return ((z - y) ** 4).mean() + torch.logsumexp(z, dim=-1).mean()

    model, inputs, targets = make_case("mlp_tanh", "mse")
    v = random_vector(model)
    expected = reference_ggn(model, quartic, inputs, targets) @ flat(v)
    torch.testing.assert_close(flat(ggn.ggn_vp(model, quartic, inputs, targets, v)), expected, **TOL)


@settings(max_examples=15, deadline=None)
@given(
    widths=st.lists(st.integers(1, 4), min_size=2, max_size=5),
    batch=st.integers(1, 4),
    loss=st.sampled_from(LOSSES),
    activation=st.sampled_from([nn.Tanh, nn.Sigmoid]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_ggn_vp_random_mlps(widths, batch, loss, activation, bias, seed):
    torch.manual_seed(seed)
    layers = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(fan_in, fan_out, bias=bias), activation()]
    model = nn.Sequential(*layers[:-1]).to(DTYPE)
    inputs = torch.randn(batch, widths[0], dtype=DTYPE)
    targets = make_targets(model(inputs).detach(), loss)
    v = random_vector(model)
    expected = reference_ggn(model, loss, inputs, targets) @ flat(v)
    torch.testing.assert_close(flat(ggn.ggn_vp(model, loss, inputs, targets, v)), expected, **TOL)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("case", ["mlp_tanh", "lm", "conv"])
def test_hvp_matches_autograd_hessian(case, loss):
    model, inputs, targets = make_case(case, loss)
    v = random_vector(model)
    expected = reference_hessian(model, loss, inputs, targets) @ flat(v)
    torch.testing.assert_close(flat(ggn.hvp(model, loss, inputs, targets, v)), expected, **TOL)


@pytest.mark.parametrize("loss", LOSSES)
def test_hvp_equals_ggn_for_a_linear_model(loss):
    model = nn.Linear(4, 3).to(DTYPE)  # linear in θ: the Hessian has no model-curvature term
    inputs = torch.randn(5, 4, dtype=DTYPE)
    targets = make_targets(model(inputs).detach(), loss)
    v = random_vector(model)
    torch.testing.assert_close(
        flat(ggn.hvp(model, loss, inputs, targets, v)), flat(ggn.ggn_vp(model, loss, inputs, targets, v)), **TOL
    )


# ----------------------------------------------------------------------------- Fisher


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("case", ["mlp_tanh", "lm", "conv"])
def test_fisher_vp_equals_ggn_vp(case, loss):
    model, inputs, targets = make_case(case, loss)
    v = random_vector(model)
    torch.testing.assert_close(
        flat(ggn.fisher_vp(model, loss, inputs, targets, v)), flat(ggn.ggn_vp(model, loss, inputs, targets, v)), **TOL
    )


def test_fisher_vp_equals_ggn_vp_for_soft_targets():
    model, inputs, _ = make_case("lm", "cross_entropy")
    targets = torch.softmax(torch.randn(2, 3, 5, dtype=DTYPE), dim=-1)
    v = random_vector(model)
    torch.testing.assert_close(
        flat(ggn.fisher_vp(model, "cross_entropy", inputs, targets, v)),
        flat(ggn.ggn_vp(model, "cross_entropy", inputs, targets, v)),
        **TOL,
    )


def test_fisher_vp_rejects_loss_callable():
    model, inputs, targets = make_case("mlp_tanh", "mse")
    with pytest.raises(ValueError, match="Fisher needs a known likelihood"):
        ggn.fisher_vp(model, lambda z, y: ((z - y) ** 2).sum(), inputs, targets, random_vector(model))


# ----------------------------------------------------------------------------- dense matrix, batches


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("case", ["mlp_tanh", "conv"])
def test_ggn_matrix_symmetric_psd_and_stacks_unit_products(case, loss):
    model, inputs, targets = make_case(case, loss)
    G = ggn.ggn_matrix(model, loss, inputs, targets)
    P = sum(p.numel() for p in model.parameters())
    assert G.shape == (P, P) and G.dtype == DTYPE
    torch.testing.assert_close(G, G.T, **TOL)
    assert torch.linalg.eigvalsh(G).min() > -1e-10
    torch.testing.assert_close(G, reference_ggn(model, loss, inputs, targets), **TOL)
    params = list(model.parameters())
    for i, unit in enumerate(torch.eye(P, dtype=DTYPE)):
        chunks = unit.split([p.numel() for p in params])
        column = ggn.ggn_vp(model, loss, inputs, targets, [c.reshape(p.shape) for c, p in zip(chunks, params)])
        torch.testing.assert_close(G[:, i], flat(column), **TOL)


def test_ggn_matrix_size_limit():
    model, inputs, targets = make_case("mlp_tanh", "mse")  # P = 4*5 + 5 + 5*3 + 3 = 43
    with pytest.raises(ValueError, match="43 trainable parameters.*max_params=40"):
        ggn.ggn_matrix(model, "mse", inputs, targets, max_params=40)
    assert ggn.ggn_matrix(model, "mse", inputs, targets, max_params=43).shape == (43, 43)


@pytest.mark.parametrize("loss", LOSSES)
def test_ggn_vps_matches_one_product_at_a_time(loss):
    model, inputs, targets = make_case("lm", loss)
    vectors = [random_vector(model) for _ in range(3)]
    stacked = [torch.stack(entries) for entries in zip(*vectors)]
    for chunk_size in (None, 2):
        batched = ggn.ggn_vps(model, loss, inputs, targets, stacked, chunk_size=chunk_size)
        for k, v in enumerate(vectors):
            torch.testing.assert_close(
                flat(b[k] for b in batched), flat(ggn.ggn_vp(model, loss, inputs, targets, v)), **TOL
            )


# ----------------------------------------------------------------------------- parameters, modules, dtypes


def test_frozen_parameter_is_excluded():
    model, inputs, targets = make_case("mlp_tanh", "cross_entropy")
    model[0].weight.requires_grad_(False)
    v = random_vector(model)
    assert [t.shape for t in v] == [(5,), (3, 5), (3,)]
    expected = reference_ggn(model, "cross_entropy", inputs, targets) @ flat(v)
    torch.testing.assert_close(flat(ggn.ggn_vp(model, "cross_entropy", inputs, targets, v)), expected, **TOL)
    assert ggn.ggn_matrix(model, "cross_entropy", inputs, targets).shape == (23, 23)
    with pytest.raises(ValueError, match="expected a list of 3 tensors"):
        ggn.ggn_vp(model, "cross_entropy", inputs, targets, [torch.randn_like(p) for p in model.parameters()])


@pytest.mark.parametrize("loss", LOSSES)
def test_wrapper_module_matches_inner_model(loss):
    model, inputs, targets = make_case("conv", loss)
    v = random_vector(model)
    for product in (ggn.ggn_vp, ggn.hvp, ggn.fisher_vp):
        torch.testing.assert_close(
            flat(product(Wrapper(model), loss, inputs, targets, v)), flat(product(model, loss, inputs, targets, v)), **TOL
        )


def test_gnfx_compiled_model_at_statistic_and_plain_steps():
    """A model returned by gnfx.compile, at step 0 (statistic step: the instrumented forward, which
    checks the parameters that functional_call swaps) and steps 1, 2: the products are those of
    the explicit JᵀHJ and Hessian of its original module, and computing them adds nothing to the
    statistics (the same training as a twin whose products were never asked for)."""
    model, inputs, targets = make_case("mlp_tanh", "cross_entropy")
    twin = copy.deepcopy(model)
    compiled, reference = (gnfx.compile(m, optimizer="kfac", stat_every=2, stat_decay=0.5, lr=0.1) for m in (model, twin))
    for step in range(3):
        v = random_vector(model)
        expected = reference_ggn(model, "cross_entropy", inputs, targets) @ flat(v)
        for product in (ggn.ggn_vp, ggn.fisher_vp):
            got = product(compiled, "cross_entropy", inputs, targets, v)
            torch.testing.assert_close(flat(got), expected, **TOL, msg=lambda m: f"{product.__name__} step {step}: {m}")
        hv = flat(ggn.hvp(compiled, "cross_entropy", inputs, targets, v))
        torch.testing.assert_close(hv, reference_hessian(model, "cross_entropy", inputs, targets) @ flat(v), **TOL)
        for c in (compiled, reference):
            F.cross_entropy(c(inputs), targets).backward()
            c.step()
            c.zero_grad()
    for name in ("0", "2"):
        for k, value in reference.statistics(name).items():
            torch.testing.assert_close(compiled.statistics(name)[k], value, rtol=0, atol=0)
    torch.testing.assert_close(flat(model.parameters()), flat(twin.parameters()), rtol=0, atol=0)


def test_model_and_buffers_are_left_unchanged():
    model, inputs, targets = make_case("conv", "cross_entropy")
    before = {k: t.clone() for k, t in model.state_dict().items()}
    gv = ggn.ggn_vp(model, "cross_entropy", inputs, targets, random_vector(model))
    ggn.hvp(model, "cross_entropy", inputs, targets, random_vector(model))
    assert not any(g.requires_grad for g in gv)
    assert all(p.grad is None for p in model.parameters())
    for k, t in model.state_dict().items():
        assert torch.equal(t, before[k]), k


@pytest.mark.parametrize("loss", LOSSES)
def test_float32_matches_float64(loss):
    model, inputs, targets = make_case("lm", loss)
    v = random_vector(model)
    expected = flat(ggn.ggn_vp(model, loss, inputs, targets, v))
    targets32 = targets.float() if targets.is_floating_point() else targets
    got = ggn.ggn_vp(model.float(), loss, inputs.float(), targets32, [t.float() for t in v])
    assert all(g.dtype == torch.float32 for g in got)
    torch.testing.assert_close(flat(got).double(), expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", ["CrossEntropy", "MSE", "nll"])
def test_unknown_loss_name_lists_valid_names(name):
    model, inputs, targets = make_case("mlp_tanh", "mse")
    v = random_vector(model)
    for product in (ggn.ggn_vp, ggn.hvp, ggn.fisher_vp):
        with pytest.raises(ValueError, match="'cross_entropy', 'mse'"):
            product(model, name, inputs, targets, v)
    with pytest.raises(ValueError, match="'cross_entropy', 'mse'"):
        ggn.ggn_matrix(model, name, inputs, targets)


def test_vector_of_wrong_length_or_shape():
    model, inputs, targets = make_case("mlp_tanh", "mse")
    v = random_vector(model)
    with pytest.raises(ValueError, match="expected a list of 4 tensors.*got 3 entries"):
        ggn.ggn_vp(model, "mse", inputs, targets, v[:3])
    with pytest.raises(ValueError, match="got a tensor"):
        ggn.ggn_vp(model, "mse", inputs, targets, flat(v))
    bad = [v[0], v[1].reshape(1, 5), v[2], v[3]]
    with pytest.raises(ValueError, match=r"entry 1 has shape \(1, 5\) but must be \(5,\) for parameter '0.bias'"):
        ggn.hvp(model, "mse", inputs, targets, bad)
    with pytest.raises(ValueError, match=r"entry 0 has shape \(5, 4\) but must be \(K, 5, 4\)"):
        ggn.ggn_vps(model, "mse", inputs, targets, v)
    with pytest.raises(ValueError, match="different leading sizes"):
        ggn.ggn_vps(model, "mse", inputs, targets, [t.expand(2 + (i == 0), *t.shape) for i, t in enumerate(v)])
