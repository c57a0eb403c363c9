"""The rank-k plus diagonal preconditioner against the explicit matrices it sketches.

Per block, with n = the entries of vec([W b]) (row-major), the loss L = 1/M Σ_m ℓ_m over N examples
and M loss terms, and the GGN G = 1/M Σ_m J_mᵀ H_ℓ J_m of the block:

* w = √M v with v the block's gradient of the statistic backward (at labels sampled from the model
  with fisher="mc", E[w wᵀ] = G), and the sketch is the exponential moving average

      Ĝ_s = Σ_i (1-β) β^{t-i} w_i w_iᵀ          (β = stat_decay, zero start),

  kept as its top-k eigenpairs U diag(s) Uᵀ in O(k n) memory;
* D = T · diag, diag the per-example Fisher diagonal of the same backward (T = M/N), E[D] = diag(G);
* the step (graft="none") is Δθ = -η (D + U diag(s / (1-βᵗ)) Uᵀ + λ I)⁻¹ g, by Woodbury.

The tracker is tested on fixed vector sequences, the statistics against per-example gradients from
plain autograd at the same sampled labels and against the dense GGN (gnfx.ggn), the step against a
dense solve.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx
import gnfx.fisher
from gnfx.errors import ConfigError
from gnfx.preconditioners.rank1 import RankK

DTYPE = torch.float64
LR = 0.25  # a power of two: gnfx hands lr to the update function as a float32 tensor


def make_layer(d_in, d_out, bias, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_out, bias=bias)).to(DTYPE)


def fold(layer, grad=False):
    """vec([W b]) (or of the gradients), row-major."""
    w = layer.weight.grad if grad else layer.weight
    if layer.bias is None:
        return w.detach().clone().reshape(-1)
    b = layer.bias.grad if grad else layer.bias
    return torch.cat([w, b.unsqueeze(1)], dim=1).detach().clone().reshape(-1)


def state_of(c, block=0):
    pre = c.optimizer.curvature[0]
    group = pre.groups[block]
    assert len(group.pieces) == 1
    return pre.group_state(group)


def ema_matrix(ws, beta):
    """Σ_i (1-β) β^{t-i} w_i w_iᵀ, explicitly."""
    t = len(ws)
    return sum((1 - beta) * beta ** (t - 1 - i) * torch.outer(w, w) for i, w in enumerate(ws))


def top_eigenvectors(M, k):
    evals, evecs = torch.linalg.eigh(M)
    return evals.flip(0)[:k], evecs.flip(1)[:, :k]


def vector_sequence(n, steps, directions, scales, noise, seed=0):
    """w_i = Σ_j scale_j c_ij u_j + noise ε_i, c_ij ~ N(0, 1), fixed orthonormal u_j."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, directions, generator=g, dtype=DTYPE))
    ws = []
    for _ in range(steps):
        c = torch.randn(directions, generator=g, dtype=DTYPE) * torch.tensor(scales, dtype=DTYPE)
        ws.append(U @ c + noise * torch.randn(n, generator=g, dtype=DTYPE) / n ** 0.5)
    return ws


def track(ws, k, beta):
    """The tracker's state after the vectors ws, one statistic step each (RankK._update_sketch)."""
    n = ws[0].numel()
    state = {"U": torch.zeros(1, n, k, dtype=DTYPE), "s": torch.zeros(1, k, dtype=DTYPE),
             "t": torch.zeros(1, dtype=DTYPE), "failures": torch.zeros(1, dtype=torch.int64)}
    for w in ws:
        RankK._update_sketch(state, w.unsqueeze(0), beta, torch.ones(1, dtype=torch.bool))
    return state


class Recorder:
    """Wraps gnfx.fisher.backprop_vectors and keeps the vectors r it hands to the true-Fisher backward."""

    def __init__(self, monkeypatch):
        self.vectors = []
        original = gnfx.fisher.backprop_vectors

        def recording(*args, **kwargs):
            for r, weight in original(*args, **kwargs):
                self.vectors.append(r)
                yield r, weight
        monkeypatch.setattr(gnfx.fisher, "backprop_vectors", recording)


# ----------------------------------------------------------------------------- the tracker


def test_tracked_top_eigenvector_aligns_with_the_exact_ema_top_eigenvector():
    """With one dominant direction (scale 3 against noise of norm 2), after 60 statistic steps
    the tracked U[:, 0] is the top eigenvector of the explicit EMA matrix: |cos| > 0.99."""
    beta, n = 0.9, 28
    ws = vector_sequence(n, 60, directions=1, scales=[3.0], noise=2.0)
    state = track(ws, 1, beta)
    lam, top = top_eigenvectors(ema_matrix(ws, beta), 2)
    u = state["U"][0, :, 0]
    assert abs(torch.dot(u, top[:, 0]) / u.norm()) > 0.99
    # the test could fail: the last vector alone is not that well aligned
    assert abs(torch.dot(ws[-1], top[:, 0]) / ws[-1].norm()) < 0.99
    # and the tracked eigenvalue underestimates the top one only by the mass the sketch dropped
    s = state["s"][0, 0]
    assert lam[1] < s <= lam[0] * (1 + 1e-12) and s > 0.8 * lam[0]


def test_rank3_tracks_the_top3_eigenspace():
    """Three dominant directions (scales 3, 2.5, 2, noise 2), rank=3: the cosines of the principal
    angles between span(U) and the exact top-3 eigenspace all exceed 0.99."""
    beta, n = 0.9, 28
    ws = vector_sequence(n, 80, directions=3, scales=[3.0, 2.5, 2.0], noise=2.0)
    U = track(ws, 3, beta)["U"][0]
    _, top = top_eigenvectors(ema_matrix(ws, beta), 3)
    assert U.shape == (n, 3)
    torch.testing.assert_close(U.T @ U, torch.eye(3, dtype=DTYPE), rtol=0, atol=1e-10)  # orthonormal
    cosines = torch.linalg.svdvals(top.T @ U)
    assert cosines.min() > 0.99, cosines
    # the test could fail: the span of the last three vectors is not that space
    Q, _ = torch.linalg.qr(torch.stack(ws[-3:], dim=1))
    assert torch.linalg.svdvals(top.T @ Q).min() < 0.9


@pytest.mark.parametrize("k", [2, 3])
def test_sketch_is_exact_when_the_vectors_span_at_most_k_directions(k):
    """Vectors confined to a k-dimensional subspace: U diag(s) Uᵀ equals the EMA matrix."""
    beta = 0.8
    ws = vector_sequence(15, 12, directions=k, scales=[1.0] * k, noise=0.0)
    state = track(ws, k, beta)
    U, s = state["U"][0], state["s"][0]
    torch.testing.assert_close(U @ torch.diag(s) @ U.T, ema_matrix(ws, beta), rtol=1e-10, atol=1e-12)
    assert state["t"].item() == len(ws)


# ----------------------------------------------------------------------------- the statistics


def per_example_gradients(model, x, r, terms):
    """vec([W b]) of ∂/∂θ (1/M Σ_{t} r_{n,t}·z_{n,t}) for each example n, by plain autograd (M = N T):
    the per-example gradients ∇_n L of the loss whose output gradient is r / M."""
    layer = model[-1]
    rows = []
    for n in range(len(x)):
        model.zero_grad()
        z = model(x[n:n + 1])
        (z * r[n:n + 1]).sum().div(terms).backward()
        rows.append(fold(layer, grad=True))
    model.zero_grad()
    return torch.stack(rows)


@pytest.mark.parametrize("sequence", [False, True], ids=["classifier", "sequence"])
def test_the_sketch_vector_and_the_diagonal_are_those_of_the_sampled_labels(sequence, monkeypatch):
    """fisher="mc", β = 0, one statistic step: the sketch U diag(s) Uᵀ is w wᵀ with w = √M Σ_n ∇_n L
    at the sampled labels, and D = T · N Σ_n (∇_n L)² (T = M/N), the per-example gradients ∇_n L
    computed by plain autograd from the same sampled output vectors r (one per loss term)."""
    recorder = Recorder(monkeypatch)
    torch.manual_seed(0)
    N, T, C = 6, 3 if sequence else 1, 4
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, C)).to(DTYPE)
    x = torch.randn((N, T, 5) if sequence else (N, 5), dtype=DTYPE)
    y = torch.randint(0, C, (N, T) if sequence else (N,))
    c = gnfx.compile(model, optimizer="rank1", loss="cross_entropy", fisher="mc", lr=LR, graft="none",
                     momentum=0.0, stat_every=1, stat_decay=0.0)
    F.cross_entropy(c(x).reshape(-1, C), y.reshape(-1)).backward()
    before = copy.deepcopy(model)  # the parameters the statistics were taken at
    c.step()
    (r,) = recorder.vectors  # the sampled p - onehot(y~) of every loss term
    assert r.shape == (N, T, C) if sequence else (N, C)
    M = N * T
    grads = per_example_gradients(before, x, r, M)
    w = M ** 0.5 * grads.sum(0)
    state = state_of(c, block=1)
    U, s = state["U"][0], state["s"][0]
    torch.testing.assert_close(U @ torch.diag(s) @ U.T, torch.outer(w, w), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state["D"][0], T * N * grads.square().sum(0), rtol=1e-10, atol=1e-14)
    # the vector is not the training gradient: the labels were sampled
    F.cross_entropy(before(x).reshape(-1, C), y.reshape(-1)).backward()
    assert (fold(before[-1], grad=True) - grads.sum(0)).abs().max() > 1e-3


def test_the_statistics_estimate_the_ggn_on_its_scale():
    """E[M v vᵀ] = G and E[T · diag] = diag(G) for the last layer of a sequence model (T = 3, the
    constants M = N T and T = M/N matter): averaged over 1500 sampled labels at fixed parameters, both
    are within Monte-Carlo error (15% of ‖G‖ and of ‖diag G‖; a wrong constant is off by 3x) of the
    dense GGN block from gnfx.ggn."""
    torch.manual_seed(0)
    N, T, C, d = 4, 3, 3, 4
    model = nn.Sequential(nn.Linear(2, d), nn.Tanh(), nn.Linear(d, C)).to(DTYPE)
    x = torch.randn(N, T, 2, dtype=DTYPE)
    y = torch.randint(0, C, (N, T))
    c = gnfx.compile(model, optimizer="kfac", fisher="mc", loss="cross_entropy", lr=1e-30, stat_every=1,
                     stat_decay=0.0, statistics=("grad", "inverse_counts", "diag"))
    block = c.optimizer.statistics[c.layers.blocks[1].name]
    samples = 1500
    sketch, diagonal = 0, 0
    for _ in range(samples):
        F.cross_entropy(c(x).reshape(-1, C), y.reshape(-1)).backward()
        c.step()
        c.zero_grad()
        inverse_n, inverse_m = block.values["inverse_counts"].tolist()
        assert (1 / inverse_n, 1 / inverse_m) == (N, N * T)
        v = block.values["grad"].flatten()
        sketch = sketch + torch.outer(v, v) / inverse_m / samples
        diagonal = diagonal + block.values["diag"].flatten() * (inverse_n / inverse_m) / samples
    G = gnfx.ggn.ggn_matrix(model, "cross_entropy", x, y)
    # the last layer's [W b] entries in row-major order, from model.parameters()' W then b
    first = sum(p.numel() for p in model[0].parameters())
    W = first + torch.arange(C * d).reshape(C, d)
    b = first + C * d + torch.arange(C).unsqueeze(1)
    index = torch.cat([W, b], dim=1).flatten()
    G = G[index][:, index]
    assert (sketch - G).norm() < 0.15 * G.norm(), ((sketch - G).norm() / G.norm())
    assert (diagonal - G.diagonal()).norm() < 0.15 * G.diagonal().norm()


# ----------------------------------------------------------------------------- the step


def train_step(c, x, y):
    c.zero_grad()
    F.cross_entropy(c(x), y).backward()
    c.step()


@pytest.mark.parametrize("k, stat_every", [(1, 1), (3, 1), (2, 2)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_step_is_the_woodbury_solve_of_the_damped_diagonal_plus_low_rank(k, stat_every, bias):
    """graft="none": Δ vec([W b]) = -η (D + U diag(s/(1-βᵗ)) Uᵀ + λI)⁻¹ g, solved densely, with D, U,
    s the state after the step's refresh and t the statistic steps so far (steps between them reuse the
    last sketch and D); g the training gradient."""
    beta, damping = 0.9, 0.1
    model = make_layer(5, 3, bias=bias)
    layer = model[0]
    n = 3 * (5 + bias)
    c = gnfx.compile(model, optimizer="rank1", lr=LR, momentum=0.0, graft="none", damping=damping,
                     stat_every=stat_every, stat_decay=beta, rank=k)
    g = torch.Generator().manual_seed(1)
    for step in range(7):
        x, y = torch.randn(8, 5, generator=g, dtype=DTYPE), torch.randint(0, 3, (8,), generator=g)
        before = fold(layer)
        train_step(c, x, y)
        state = state_of(c)
        U, s, D = state["U"][0], state["s"][0], state["D"][0]
        t = step // stat_every + 1
        G_hat = torch.diag(D) + U @ torch.diag(s / (1 - beta ** t)) @ U.T
        v = fold(layer, grad=True)
        expected = -LR * torch.linalg.solve(G_hat + damping * torch.eye(n, dtype=DTYPE), v)
        torch.testing.assert_close(fold(layer) - before, expected, rtol=1e-10, atol=1e-12)
        # both parts matter: the diagonal alone, or the low rank alone, is a different step
        without_sketch = -LR * v / (D + damping)
        without_diagonal = -LR * torch.linalg.solve(G_hat - torch.diag(D) + damping * torch.eye(n, dtype=DTYPE), v)
        assert (expected - without_sketch).abs().max() > 1e-3 * expected.abs().max()
        assert (expected - without_diagonal).abs().max() > 1e-3 * expected.abs().max()


@pytest.mark.parametrize("k", [1, 4])
def test_state_memory_is_linear_in_the_block_size(k):
    """A 64x65 block ([W b] of Linear(64, 64)), n = 4160: all state tensors and statistics of the
    block together hold at most (k + 5) n + 16 numbers (U, D, the diagonal statistic, the graft's
    second moment and the momentum), and no n x n matrix."""
    model = make_layer(64, 64, bias=True)
    n = 64 * 65
    c = gnfx.compile(model, optimizer="rank1", lr=LR, rank=k, graft="adam")
    train_step(c, torch.randn(16, 64, dtype=DTYPE), torch.randint(0, 64, (16,)))
    tensors = [v for name in ("0.weight", "0.bias") for v in c.optimizer.state_of(name).values()
               if isinstance(v, torch.Tensor)]
    tensors += [v for stats in c.optimizer.statistics.blocks.values() for v in stats.values.values()]
    total = sum(t.numel() for t in tensors)
    assert state_of(c)["U"].numel() == k * n  # the sketch itself is there
    assert k * n <= total <= (k + 5) * n + 16, total
    assert max(t.numel() for t in tensors) <= max(k, 1) * n


@pytest.mark.parametrize("graft", ["adam", "adagrad"])
def test_grafted_step_has_the_direction_of_the_solve_and_the_norm_of_the_grafted_method(graft):
    """Δ vec([W b]) = -η P ‖A‖/‖P‖ with P = (D + U diag(ŝ) Uᵀ + λI)⁻¹ g (dense solve) and A the Adam
    direction g/(sqrt(m₂/(1-β₂ᵗ))+eps) (m₂ the EMA of g²) or the AdaGrad one g/(sqrt(Σ g²)+eps)."""
    beta, beta2, eps, damping = 0.9, 0.99, 1e-8, 0.1
    model = make_layer(5, 3, bias=True)
    layer = model[0]
    n = 3 * 6
    c = gnfx.compile(model, optimizer="rank1", lr=LR, momentum=0.0, stat_every=1, stat_decay=beta, rank=2,
                     damping=damping, graft=graft, betas=(0.9, beta2), eps=eps)
    second_moment = torch.zeros(n, dtype=DTYPE)
    g = torch.Generator().manual_seed(2)
    for step in range(5):
        x, y = torch.randn(8, 5, generator=g, dtype=DTYPE), torch.randint(0, 3, (8,), generator=g)
        before = fold(layer)
        train_step(c, x, y)
        state = state_of(c)
        U, s, D = state["U"][0], state["s"][0], state["D"][0]
        G_hat = torch.diag(D) + U @ torch.diag(s / (1 - beta ** (step + 1))) @ U.T
        v = fold(layer, grad=True)
        P = torch.linalg.solve(G_hat + damping * torch.eye(n, dtype=DTYPE), v)
        if graft == "adam":
            second_moment = beta2 * second_moment + (1 - beta2) * v ** 2
            A = v / ((second_moment / (1 - beta2 ** (step + 1))).sqrt() + eps)
        else:
            second_moment = second_moment + v ** 2
            A = v / (second_moment.sqrt() + eps)
        expected = -LR * P * (A.norm() / P.norm())
        torch.testing.assert_close(fold(layer) - before, expected, rtol=1e-10, atol=1e-12)


def test_a_checkpoint_of_the_earlier_rank1_is_refused_naming_the_change():
    """A state without D (the rank1 before the diagonal) raises a ConfigError that says what changed."""
    model = make_layer(5, 3, bias=True)
    c = gnfx.compile(model, optimizer="rank1", lr=LR)
    train_step(c, torch.randn(8, 5, dtype=DTYPE), torch.randint(0, 3, (8,)))
    checkpoint = copy.deepcopy(c.optimizer.state_dict())
    for entries in checkpoint["state"].values():
        for key in [k for k in entries if k.endswith(".D")]:
            del entries[key]
    with pytest.raises(ConfigError, match="lacks 'rank1_0.D'.*empirical sketch"):
        c.optimizer.load_state_dict(checkpoint)
    c.optimizer.load_state_dict(c.optimizer.state_dict())  # its own checkpoint loads


# ----------------------------------------------------------------------------- the weight's part of `grad` from autograd


class TwoSites(nn.Module):
    """A linear layer, a convolution and a head; `tied` calls the first layer twice (two sites of one block)."""

    def __init__(self, tied=False):
        super().__init__()
        self.tied = tied
        self.a, self.c, self.b = nn.Linear(6, 6), nn.Conv2d(2, 3, 3, padding=1), nn.Linear(6 + 3 * 16, 4)

    def forward(self, x, img):
        h = torch.tanh(self.a(x))
        if self.tied:
            h = torch.tanh(self.a(h))
        return self.b(torch.cat([h, self.c(img).flatten(1)], 1))


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(16, 6, generator=g, dtype=DTYPE), torch.randn(16, 2, 4, 4, generator=g, dtype=DTYPE),
            torch.randint(0, 4, (16,), generator=g))


def _site_gradients(model, x, img, y):
    """[∇W ∇b] of the cross-entropy alone, by plain autograd on a copy: the sum Σ g aᵀ over each block's sites."""
    model.zero_grad()
    F.cross_entropy(model(x, img), y).backward()
    return {name: torch.cat([m.weight.grad.flatten(1), m.bias.grad.unsqueeze(1)], 1)
            for name, m in (("a", model.a), ("c", model.c), ("b", model.b))}


@pytest.mark.parametrize("tied", [False, True], ids=["one_site", "tied"])
def test_grad_is_the_sites_sum_whatever_else_the_loss_adds_to_the_weights_gradient(tied, monkeypatch):
    """With fisher="empirical" a block of one site reads the weight's part of `grad` from autograd's gradient of
    an alias of W (gnfx.taps.WeightTap), not from the taps' product: it must still be the sites' Σ g aᵀ of the
    cross-entropy (float64 plain autograd on a copy, to rounding), while W's `.grad` also holds a penalty on W
    added outside the model and is clipped after the backward (the parameter gradients themselves stay bitwise
    those of the plain model). The tied layer (two sites) takes the taps' product (the fallback), with the same
    value; so does every block under fisher="mc" (no alias in the graph)."""
    torch.manual_seed(0)
    model = TwoSites(tied).to(DTYPE)
    plain = copy.deepcopy(model)
    c = gnfx.compile(model, optimizer="rank1", stat_every=1, stat_decay=0.0, lr=1e-30, nan_policy="off")
    formed = []
    original = type(c.optimizer.statistics["a"])._record_gradient
    monkeypatch.setattr(type(c.optimizer.statistics["a"]), "_record_gradient",
                        lambda self, g, rows: (formed.append(self.block.name), original(self, g, rows))[1])
    x, img, y = _batch()
    (F.cross_entropy(c(x, img), y) + 0.5 * model.a.weight.square().sum() + model.c.weight.sum()).backward()
    (F.cross_entropy(plain(x, img), y) + 0.5 * plain.a.weight.square().sum() + plain.c.weight.sum()).backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    c.step()
    assert sorted(set(formed)) == (["a"] if tied else [])
    expected = _site_gradients(copy.deepcopy(plain), x, img, y)
    for name in ("a", "c", "b"):
        torch.testing.assert_close(c.statistics(name)["grad"], expected[name], rtol=1e-12, atol=1e-14)
    assert (model.a.weight.grad - expected["a"][:, :-1]).abs().max() > 1e-6  # .grad is not the statistic

    mc = gnfx.compile(copy.deepcopy(plain), optimizer="rank1", loss="cross_entropy", stat_every=1)
    assert not any(name.endswith("_w") for name, _ in mc.graph_module.named_modules())


def test_a_backward_that_keeps_its_graph_leaves_grad_to_the_taps(monkeypatch):
    """After a backward with create_graph=True reached the blocks (a gradient penalty on the input), ∂L/∂W' of
    the loss of that gradient would hold the penalty's path through the backward's own use of W beside Σ g aᵀ
    (gnfx.filled_gradients): every block's taps form `grad` themselves."""
    torch.manual_seed(0)
    c = gnfx.compile(TwoSites().to(DTYPE), optimizer="rank1", stat_every=1, stat_decay=0.0, lr=1e-30)
    formed = []
    original = type(c.optimizer.statistics["a"])._record_gradient
    monkeypatch.setattr(type(c.optimizer.statistics["a"]), "_record_gradient",
                        lambda self, g, rows: (formed.append(self.block.name), original(self, g, rows))[1])
    x, img, y = _batch()
    x.requires_grad_(True)
    loss = F.cross_entropy(c(x, img), y)
    with pytest.warns(RuntimeWarning, match="create_graph=True"):
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    (loss + gx.square().sum()).backward()
    c.step()
    assert set(formed) == {"a", "b", "c"}
