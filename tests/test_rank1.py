"""The rank-k curvature preconditioner against the explicit matrices it sketches.

For a block with vectorized gradients v_1, ..., v_t (v = vec([∇W ∇b]), row-major, n entries)
collected on statistic steps, the curvature it estimates is the exponential moving average

    Ĝ_t = Σ_i (1-β) β^{t-i} v_i v_iᵀ          (β = stat_decay, zero start)

kept as its top-k eigenpairs U diag(s) Uᵀ in O(k n) memory, and the step (graft="none") is

    Δθ = -η (U diag(s / (1-βᵗ)) Uᵀ + λ I)⁻¹ v.

The gradient sequences are fixed: the tests write `.grad` themselves (rank-k needs no statistics
from the taps, only gradients), so the explicit n x n matrices are built from known vectors.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import gnfx

DTYPE = torch.float64
LR = 0.25  # a power of two: gnfx hands lr to the update function as a float32 tensor


def make_layer(d_in, d_out, bias, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_out, bias=bias)).to(DTYPE)


def compile_rank(model, **hp):
    settings = dict(lr=LR, momentum=0.0, weight_decay=0.0, graft="none", damping=0.1, stat_every=1,
                    stat_decay=0.9, rank=1)
    settings.update(hp)
    return gnfx.compile(model, optimizer="rank1", **settings)


def fold(layer, grad=False):
    w = layer.weight.grad if grad else layer.weight
    if layer.bias is None:
        return w.detach().clone()
    b = layer.bias.grad if grad else layer.bias
    return torch.cat([w, b.unsqueeze(1)], dim=1).detach().clone()


def set_gradient(layer, v):
    """Write the vectorized gradient v = vec([∇W ∇b]) (row-major) into .grad."""
    G = v.reshape(layer.out_features, -1)
    layer.weight.grad = G[:, :layer.in_features].clone()
    if layer.bias is not None:
        layer.bias.grad = G[:, layer.in_features].clone()


def state_of(c):
    pre = c.optimizer.curvature[0]
    assert len(pre.groups) == 1 and len(pre.groups[0].pieces) == 1
    return pre.group_state(pre.groups[0])


def ema_matrix(vs, beta):
    """Σ_i (1-β) β^{t-i} v_i v_iᵀ, explicitly."""
    t = len(vs)
    return sum((1 - beta) * beta ** (t - 1 - i) * torch.outer(v, v) for i, v in enumerate(vs))


def top_eigenvectors(M, k):
    evals, evecs = torch.linalg.eigh(M)
    return evals.flip(0)[:k], evecs.flip(1)[:, :k]


def gradient_sequence(n, steps, directions, scales, noise, seed=0):
    """v_i = Σ_j scale_j c_ij u_j + noise ε_i, c_ij ~ N(0, 1), fixed orthonormal u_j."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, directions, generator=g, dtype=DTYPE))
    vs = []
    for _ in range(steps):
        c = torch.randn(directions, generator=g, dtype=DTYPE) * torch.tensor(scales, dtype=DTYPE)
        vs.append(U @ c + noise * torch.randn(n, generator=g, dtype=DTYPE) / n ** 0.5)
    return vs


def run(c, layer, vs):
    for v in vs:
        c.zero_grad()
        set_gradient(layer, v)
        c.step()


# ----------------------------------------------------------------------------- tests


def test_tracked_top_eigenvector_aligns_with_the_exact_ema_top_eigenvector():
    """With one dominant direction (scale 3 against noise of norm 2), after 60 statistic steps
    the tracked U[:, :, 0] is the top eigenvector of the explicit EMA matrix: |cos| > 0.99."""
    beta = 0.9
    model = make_layer(6, 4, bias=True)
    n = 4 * 7
    c = compile_rank(model, stat_decay=beta, rank=1)
    vs = gradient_sequence(n, 60, directions=1, scales=[3.0], noise=2.0)
    run(c, model[0], vs)
    lam, top = top_eigenvectors(ema_matrix(vs, beta), 2)
    u = state_of(c)["U"][0, :, 0]
    assert abs(torch.dot(u, top[:, 0]) / u.norm()) > 0.99
    # the test could fail: the last gradient alone is not that well aligned
    assert abs(torch.dot(vs[-1], top[:, 0]) / vs[-1].norm()) < 0.99
    # and the tracked eigenvalue underestimates the top one only by the mass the sketch dropped
    s = state_of(c)["s"][0, 0]
    assert lam[1] < s <= lam[0] * (1 + 1e-12) and s > 0.8 * lam[0]


def test_rank3_tracks_the_top3_eigenspace():
    """Three dominant directions (scales 3, 2.5, 2, noise 2), rank=3: the cosines of the principal
    angles between span(U) and the exact top-3 eigenspace all exceed 0.99."""
    beta = 0.9
    model = make_layer(6, 4, bias=True)
    n = 4 * 7
    c = compile_rank(model, stat_decay=beta, rank=3)
    vs = gradient_sequence(n, 80, directions=3, scales=[3.0, 2.5, 2.0], noise=2.0)
    run(c, model[0], vs)
    _, top = top_eigenvectors(ema_matrix(vs, beta), 3)
    U = state_of(c)["U"][0]
    assert U.shape == (n, 3)
    torch.testing.assert_close(U.T @ U, torch.eye(3, dtype=DTYPE), rtol=0, atol=1e-10)  # orthonormal
    cosines = torch.linalg.svdvals(top.T @ U)
    assert cosines.min() > 0.99, cosines
    # the test could fail: the span of the last three gradients is not that space
    Q, _ = torch.linalg.qr(torch.stack(vs[-3:], dim=1))
    assert torch.linalg.svdvals(top.T @ Q).min() < 0.9


@pytest.mark.parametrize("k", [2, 3])
def test_sketch_is_exact_when_the_gradients_span_at_most_k_directions(k):
    """Gradients confined to a k-dimensional subspace: U diag(s) Uᵀ equals the EMA matrix."""
    beta = 0.8
    model = make_layer(5, 3, bias=False)
    c = compile_rank(model, stat_decay=beta, rank=k)
    vs = gradient_sequence(15, 12, directions=k, scales=[1.0] * k, noise=0.0)
    run(c, model[0], vs)
    state = state_of(c)
    U, s = state["U"][0], state["s"][0]
    torch.testing.assert_close(U @ torch.diag(s) @ U.T, ema_matrix(vs, beta), rtol=1e-10, atol=1e-12)
    assert state["t"].item() == len(vs)


@pytest.mark.parametrize("k, stat_every", [(1, 1), (3, 1), (2, 2)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_step_is_the_damped_inverse_of_the_bias_corrected_sketch(k, stat_every, bias):
    """graft="none": Δ vec([W b]) = -η (Ĝ + λI)⁻¹ v, solved densely, Ĝ = U diag(s/(1-βᵗ)) Uᵀ with
    t the number of statistic steps so far (steps between them reuse the last sketch)."""
    beta, damping = 0.9, 0.1
    model = make_layer(5, 3, bias=bias)
    layer = model[0]
    n = 3 * (5 + bias)
    c = compile_rank(model, stat_decay=beta, rank=k, damping=damping, stat_every=stat_every)
    vs = gradient_sequence(n, 7, directions=2, scales=[3.0, 1.0], noise=0.5)
    for step, v in enumerate(vs):
        c.zero_grad()
        set_gradient(layer, v)
        before = fold(layer).reshape(-1)
        c.step()
        state = state_of(c)
        U, s = state["U"][0], state["s"][0]
        t = step // stat_every + 1
        G_hat = U @ torch.diag(s / (1 - beta ** t)) @ U.T
        expected = -LR * torch.linalg.solve(G_hat + damping * torch.eye(n, dtype=DTYPE), v)
        torch.testing.assert_close(fold(layer).reshape(-1) - before, expected, rtol=1e-10, atol=1e-12)
        # the curvature matters: plain damped SGD, -η v / λ, is a different step
        assert (expected + LR * v / damping).abs().max() > 1e-3 * expected.abs().max()


@pytest.mark.parametrize("k", [1, 4])
def test_state_memory_is_linear_in_the_block_size(k):
    """A 64x65 block ([W b] of Linear(64, 64)), n = 4160: all state tensors of the block
    together hold at most (k + 4) n + 16 numbers, and no n x n matrix."""
    model = make_layer(64, 64, bias=True)
    layer = model[0]
    n = 64 * 65
    c = compile_rank(model, rank=k, graft="adam")
    c.zero_grad()
    set_gradient(layer, torch.randn(n, dtype=DTYPE))
    c.step()
    tensors = [v for name in ("0.weight", "0.bias") for v in c.optimizer.state_of(name).values()
               if isinstance(v, torch.Tensor)]
    tensors += [v for stats in c.optimizer.statistics.blocks.values() for v in stats.values.values()]
    total = sum(t.numel() for t in tensors)
    assert state_of(c)["U"].numel() == k * n  # the sketch itself is there
    assert k * n <= total <= (k + 4) * n + 16, total
    assert max(t.numel() for t in tensors) <= max(k, 1) * n


@pytest.mark.parametrize("graft", ["adam", "adagrad"])
def test_grafted_step_has_the_direction_of_the_solve_and_the_norm_of_the_grafted_method(graft):
    """Δ vec([W b]) = -η P ‖D‖/‖P‖ with P = (Ĝ + λI)⁻¹ v (dense solve) and D the Adam direction
    v/(sqrt(m₂/(1-β₂ᵗ))+eps) (m₂ the EMA of v²) or the AdaGrad one v/(sqrt(Σ v²)+eps)."""
    beta, beta2, eps, damping = 0.9, 0.99, 1e-8, 0.1
    model = make_layer(5, 3, bias=True)
    layer = model[0]
    n = 3 * 6
    c = compile_rank(model, stat_decay=beta, rank=2, damping=damping, graft=graft, betas=(0.9, beta2), eps=eps)
    vs = gradient_sequence(n, 5, directions=2, scales=[3.0, 1.0], noise=0.5)
    second_moment = torch.zeros(n, dtype=DTYPE)
    for step, v in enumerate(vs):
        c.zero_grad()
        set_gradient(layer, v)
        before = fold(layer).reshape(-1)
        c.step()
        state = state_of(c)
        U, s = state["U"][0], state["s"][0]
        G_hat = U @ torch.diag(s / (1 - beta ** (step + 1))) @ U.T
        P = torch.linalg.solve(G_hat + damping * torch.eye(n, dtype=DTYPE), v)
        if graft == "adam":
            second_moment = beta2 * second_moment + (1 - beta2) * v ** 2
            D = v / ((second_moment / (1 - beta2 ** (step + 1))).sqrt() + eps)
        else:
            second_moment = second_moment + v ** 2
            D = v / (second_moment.sqrt() + eps)
        expected = -LR * P * (D.norm() / P.norm())
        torch.testing.assert_close(fold(layer).reshape(-1) - before, expected, rtol=1e-10, atol=1e-12)
