"""True-Fisher statistics (fisher="mc" and "type2", gnfx.fisher) against exact references.

For a loss L = 1/M Σ_m ℓ_m over M loss terms (rows of the output z), fisher="type2" backpropagates
the columns v_c of H_ℓ^{1/2} of every row (scaled by 1/M) instead of the training gradient, so that

    S = 1/M Σ_m Σ_c δ_{m,c} δ_{m,c}ᵀ          (δ = the backpropagated v_c at the block output)

is the K-FAC output factor of the GGN G = Jᵀ H_L J; fisher="mc" replaces the columns by
mc_samples sampled vectors with E[v vᵀ] = H_ℓ. The references:

* curvlinops' KFACLinearOperator with fisher_type="type-2" (its CrossEntropyLoss wants the classes
  second, so an (N, T, C) model is wrapped with an (N, T, C) -> (N, C, T) transpose for it only);
* the dense GGN of gnfx.ggn.ggn_matrix: for one linear layer z = W a + b with the MSE loss,
  H_ℓ = (2/C) I for every row, so G = (1/N Σ_n ā_n ā_nᵀ) ⊗ (2/C) I = A ⊗ S exactly, with ā = [a, 1]
  and vec([W b]) row-major (kron(S, A)); and for any (N, C) output, the type-2 per-example diagonal
  N Σ_n Σ_c (δ_{n,c} ā_nᵀ / N)² = Σ_n Σ_c (J_nᵀ v_{n,c})² / N is exactly diag(G).

Everything is float64 at 1e-10 (mc: convergence in the number of samples). `stat_decay=0` makes
the statistics those of the last statistic step.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from gnfx.ggn import ggn_matrix
from gnfx.targets import fold
from references import TOL, ClassDimSecond, cross_entropy

DTYPE = torch.float64
LOSSES = {"cross_entropy": cross_entropy, "mse": F.mse_loss,
          "binary_cross_entropy": F.binary_cross_entropy_with_logits}
CURVLINOPS_LOSSES = {"cross_entropy": nn.CrossEntropyLoss, "mse": nn.MSELoss}


def mlp(sizes=(5, 7, 4), seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(d_in, d_out)] + ([nn.Tanh()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers).to(DTYPE)


def data(shape, loss, classes=4, seed=0):
    """Inputs of `shape`; class labels per position (cross_entropy), soft multi-label targets in [0, 1]
    (binary_cross_entropy) or regression targets (mse)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=DTYPE)
    if loss == "cross_entropy":
        return x, torch.randint(0, classes, shape[:-1], generator=g)
    if loss == "binary_cross_entropy":
        return x, torch.rand(*shape[:-1], classes, generator=g, dtype=DTYPE)
    return x, torch.randn(*shape[:-1], classes, generator=g, dtype=DTYPE)


def statistics_after_one_step(model, x, y, loss, names, **hparams):
    """{block: statistics} of one statistic step on (x, y), and the compiled model."""
    settings = dict(optimizer="kfac", loss=loss, stat_every=1, stat_decay=0.0, statistics=("A", "S"), lr=1e-3)
    c = gnfx.compile(model, **(settings | hparams))
    LOSSES[loss](c(x), y).backward()
    c.step()
    c.zero_grad()
    return {n: c.statistics(n) for n in names}, c


def curvlinops_type2_factors(model, names, x, y, loss):
    """{layer: {"A", "S"}} from curvlinops' type-2 KFAC ([W b] layout, positions as examples)."""
    from curvlinops import KFACLinearOperator

    wrapped = ClassDimSecond(copy.deepcopy(model))
    modules = dict(wrapped.model.named_modules())
    params = [p for n in names for p in modules[n].parameters()]
    kfac = KFACLinearOperator(wrapped, CURVLINOPS_LOSSES[loss](), params, [(x, y)], fisher_type="type-2",
                              separate_weight_and_bias=False, check_deterministic=False)
    kfac.compute_kronecker_factors()
    return {n: {"A": kfac._input_covariances[f"model.{n}"], "S": kfac._gradient_covariances[f"model.{n}"]}
            for n in names}


# ----------------------------------------------------------------------------- type2 = curvlinops


@pytest.mark.parametrize("loss, shape", [("cross_entropy", (8, 5)), ("cross_entropy", (6, 3, 5)), ("mse", (8, 5))],
                         ids=["ce-NC", "ce-NTC", "mse-NC"])
def test_type2_factors_equal_curvlinops(loss, shape):
    model = mlp()
    x, y = data(shape, loss)
    ref = curvlinops_type2_factors(model, ["0", "2"], x, y, loss)
    got, _ = statistics_after_one_step(model, x, y, loss, ["0", "2"], fisher="type2")
    for name in ["0", "2"]:
        torch.testing.assert_close(got[name]["A"], ref[name]["A"], **TOL)
        torch.testing.assert_close(got[name]["S"], ref[name]["S"], **TOL)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "binary_cross_entropy"])
def test_mc_factors_converge_to_type2(loss):
    """A does not depend on the output gradients; ‖S_mc - S_type2‖ shrinks like 1/√mc_samples."""
    x, y = data((8, 5), loss)
    exact, _ = statistics_after_one_step(mlp(), x, y, loss, ["0", "2"], fisher="type2")
    errors = {}
    for samples in (10, 1000):
        torch.manual_seed(0)
        got, _ = statistics_after_one_step(mlp(), x, y, loss, ["0", "2"], fisher="mc", mc_samples=samples)
        for name in ["0", "2"]:
            torch.testing.assert_close(got[name]["A"], exact[name]["A"], **TOL)
        errors[samples] = max(float((got[n]["S"] - exact[n]["S"]).norm() / exact[n]["S"].norm()) for n in ["0", "2"])
    assert errors[1000] < errors[10] / 3, errors
    assert errors[1000] < 0.1, errors


def test_mc_binary_cross_entropy_samples_bernoulli_targets_whose_expectation_is_the_ggn():
    """fisher="mc" with binary cross-entropy: each sampled v is (p - y~)/√C for targets y~ in {0, 1}^C
    (p = σ(z)) drawn with mean p, and the expectation of v vᵀ under that Bernoulli law, enumerated over
    all 2^C outcomes, is exactly the sum of type2's outer products and M·H_ℓ of the row, H_ℓ from
    torch.func.hessian of F.binary_cross_entropy_with_logits."""
    from itertools import product

    from gnfx.fisher import backprop_vectors

    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, generator=g, dtype=DTYPE)
    rows, C = z.shape
    p = torch.sigmoid(z)
    samples = 2000
    vectors = [v for v, _ in backprop_vectors(z, "mc", "binary_cross_entropy", samples, generator=g)]
    drawn = p - C ** 0.5 * torch.stack(vectors)
    torch.testing.assert_close(drawn, drawn.round(), rtol=0, atol=1e-12)  # outcomes in {0, 1}
    assert set(drawn.round().unique().tolist()) <= {0.0, 1.0}
    # the draws' mean is p: 5 standard errors, at a fixed seed
    assert ((drawn.mean(0) - p).abs() <= 5 * (p * (1 - p) / samples).sqrt()).all()
    targets = torch.rand(rows, C, generator=g, dtype=DTYPE)  # any: H_ℓ does not depend on them
    H = torch.func.hessian(lambda out: F.binary_cross_entropy_with_logits(out, targets))(z)
    type2 = sum(torch.einsum("mi,mj->mij", v, v) for v, _ in backprop_vectors(z, "type2", "binary_cross_entropy", 0))
    for m in range(rows):
        expected = torch.zeros(C, C, dtype=DTYPE)
        for outcome in product((0.0, 1.0), repeat=C):
            y = torch.tensor(outcome, dtype=DTYPE)
            probability = torch.prod(p[m] ** y * (1 - p[m]) ** (1 - y))
            expected += probability * torch.outer(p[m] - y, p[m] - y) / C
        torch.testing.assert_close(expected, rows * H[m, :, m, :], **TOL)
        torch.testing.assert_close(type2[m], expected, **TOL)


# ----------------------------------------------------------------------------- type2 = exact GGN


def folded_order(layer: nn.Linear) -> torch.Tensor:
    """Indices into the flat parameter vector (weight row-major, then bias; ggn_matrix's order)
    that list the entries of vec([W b]) row-major (K-FAC's kron(S, A) order)."""
    d_out, d_in = layer.weight.shape
    w = torch.arange(d_out * d_in).reshape(d_out, d_in)
    return fold(w, d_out * d_in + torch.arange(d_out)).flatten()


def test_type2_kfac_of_one_linear_layer_with_mse_is_the_exact_ggn():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).to(DTYPE)
    x, y = data((10, 4), "mse", classes=3)
    G = ggn_matrix(layer, "mse", x, y)
    got, c = statistics_after_one_step(copy.deepcopy(layer), x, y, "mse", ["weight"], fisher="type2")
    order = folded_order(layer)
    torch.testing.assert_close(torch.kron(got["weight"]["S"], got["weight"]["A"]), G[order][:, order], **TOL)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy", "binary_cross_entropy"])
def test_type2_diagonal_is_the_exact_ggn_diagonal(loss):
    """One linear layer with MSE, as asked; the identity holds for any (N, C) output, so also an MLP with CE."""
    if loss == "mse":
        torch.manual_seed(0)
        model, (x, y) = nn.Linear(4, 3).to(DTYPE), data((10, 4), loss, classes=3)
    else:
        model, (x, y) = mlp(), data((10, 5), loss)
    diag_G = ggn_matrix(model, loss, x, y).diagonal()
    settings = dict(optimizer="diag", source="fisher", fisher="type2", loss=loss, stat_every=1, stat_decay=0.0,
                    statistics=("diag",))
    c = gnfx.compile(copy.deepcopy(model), **settings)
    LOSSES[loss](c(x), y).backward()
    c.step()
    offset = 0
    for block in c.layers:
        W, b = (dict(model.named_parameters())[n] for n in block.params)
        flat = torch.arange(offset, offset + W.numel() + b.numel())
        offset += W.numel() + b.numel()
        expected = fold(diag_G[flat[:W.numel()]].reshape(W.shape), diag_G[flat[W.numel():]])
        torch.testing.assert_close(c.statistics(block.name)["diag"], expected, **TOL)


def test_type2_diagonal_leaves_out_ignored_targets():
    """F.cross_entropy's mean runs over the rows whose target is not -100 (gnfx.ggn does the same)."""
    model, (x, y) = mlp(), data((10, 5), "cross_entropy")
    y[:3] = -100
    diag_G = ggn_matrix(model, "cross_entropy", x, y).diagonal()
    c = gnfx.compile(copy.deepcopy(model), optimizer="diag", source="fisher", fisher="type2", loss="cross_entropy",
                     stat_every=1, stat_decay=0.0, statistics=("diag",))
    cross_entropy(c(x), y).backward()
    c.step()
    W = model[2].weight
    expected = fold(diag_G[-W.numel() - 4:-4].reshape(W.shape), diag_G[-4:])
    torch.testing.assert_close(c.statistics("2")["diag"], expected, **TOL)


# ----------------------------------------------------------------------------- the training gradient


@pytest.mark.parametrize("fisher", ["mc", "type2"])
@pytest.mark.parametrize("loss, shape", [("cross_entropy", (8, 5)), ("cross_entropy", (6, 3, 5)), ("mse", (8, 5)),
                                         ("binary_cross_entropy", (8, 5))],
                         ids=["ce-NC", "ce-NTC", "mse-NC", "bce-NC"])
def test_the_optimizer_receives_the_true_loss_gradient(fisher, loss, shape):
    """The extra backward from the output leaves p.grad as a plain backward of the loss makes it."""
    model = mlp()
    plain = copy.deepcopy(model)
    x, y = data(shape, loss)
    LOSSES[loss](plain(x), y).backward()
    c = gnfx.compile(model, optimizer="kfac", fisher=fisher, loss=loss, mc_samples=3, stat_every=1)
    LOSSES[loss](c(x), y).backward()
    assert c.optimizer.collected  # the step that was measured collected statistics
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL, msg=name)


class Squeezed(nn.Module):
    """One output per example returned as an (N,) tensor, as a binary classifier's logit often is."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).squeeze(-1)


@pytest.mark.parametrize("fisher", ["mc", "type2"])
@pytest.mark.parametrize("loss", ["binary_cross_entropy", "mse"])
def test_a_one_dimensional_output_has_the_statistics_of_the_same_output_as_n_by_1(loss, fisher):
    """An (N,) output is N rows of one entry each: the statistics of the (N, 1) output it squeezes (it
    raised a RuntimeError in the true-Fisher backward)."""
    x, y = data((8, 5), loss, classes=1)
    got = {}
    for squeezed in (False, True):
        model = mlp(sizes=(5, 7, 1))
        torch.manual_seed(0)  # the same sampled targets of fisher="mc"
        got[squeezed], _ = statistics_after_one_step(Squeezed(model) if squeezed else model, x,
                                                     y.squeeze(-1) if squeezed else y, loss,
                                                     ["model.0" if squeezed else "0"], fisher=fisher)
    for key in ("A", "S"):
        torch.testing.assert_close(got[True]["model.0"][key], got[False]["0"][key], **TOL)


@pytest.mark.parametrize("fisher", ["mc", "type2"])
def test_true_fisher_needs_the_loss(fisher):
    with pytest.raises(gnfx.ConfigError, match="needs the training loss"):
        gnfx.compile(mlp(), optimizer="kfac", fisher=fisher)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("fisher", ["mc", "type2"])
@pytest.mark.parametrize("optimizer, hparams", [
    ("kfac", dict(lr=0.1, damping=1e-2, inv_every=1)),
    ("diag", dict(lr=0.05, source="fisher")),
], ids=["kfac", "diag"])
def test_training_with_a_true_fisher_lowers_the_loss(optimizer, hparams, fisher):
    x, y = data((32, 5), "cross_entropy")
    c = gnfx.compile(mlp(sizes=(5, 16, 4)), optimizer=optimizer, fisher=fisher, loss="cross_entropy",
                     stat_every=1, **hparams)
    torch.manual_seed(0)
    losses = []
    for _ in range(30):
        loss = cross_entropy(c(x), y)
        loss.backward()
        c.step()
        c.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < 0.9 * losses[0], losses


def test_type2_factors_of_a_float16_model_on_many_loss_terms_do_not_underflow():
    """Under float16 autocast the vectors backpropagated from z are float16: divided by M before the
    backward, v / M of a batch of M = 2¹⁶ loss terms sits in float16's subnormals (below 6.1e-5) and loses
    its digits in the products after it. The factors of the float16 run agree with those of the same
    model in float32 to float16's rounding of the forward (2.5e-4 here) only when the 1/M comes after the
    backward (before: 1.5-5.7e-2)."""
    rows = 2 ** 16
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(rows, 8, generator=g), torch.randint(0, 32, (rows,), generator=g)
    model = mlp((8, 16, 16, 32)).float()
    got = {}
    for half in (True, False):
        c = gnfx.compile(copy.deepcopy(model), optimizer="kfac", loss="cross_entropy", fisher="type2", stat_every=1,
                         stat_decay=0.0, statistics=("A", "S"), lr=1e-3)
        with torch.autocast("cpu", dtype=torch.float16, enabled=half):
            z = c(x)
        F.cross_entropy(z.float(), y).backward()
        c.step()
        got[half] = {n: c.statistics(n)["S"] for n in ("0", "2", "4")}
    for name in ("0", "2", "4"):
        half, full = got[True][name], got[False][name]
        assert (half - full).norm() <= 2e-3 * full.norm(), name
