"""SOAP against a dense reference built explicitly with torch.kron (Vyas et al. 2024, Algorithm 3).

For a piece with gradient G (d_1 x ... x d_k) and bases Q_1, ..., Q_k, the row-major vectorization
vec(X) = X.reshape(-1) turns the rotation into the eigenbasis into one matrix:

    vec(G ×_1 Q_1ᵀ ⋯ ×_k Q_kᵀ) = Kᵀ vec(G),    K = Q_1 ⊗ ⋯ ⊗ Q_k    (a matrix: vec(Q_Lᵀ G Q_R))

and the step is Adam in those coordinates with m kept in the original ones:

    m ← β₁ m + (1-β₁) G,   v ← β₂ v + (1-β₂) (Kᵀ vec G)²,
    vec U = K ((Kᵀ vec m / (1-β₁ᵗ)) / (sqrt(v / (1-β₂ᵗ)) + ε)).

A refresh first sorts each old basis by decreasing Rayleigh quotient diag(Qᵀ F Q), permuting v
along that mode, then takes eigh's eigenvectors (decreasing eigenvalue) or qr(F Q_sorted).
Learning rates are powers of two (gnfx passes them as float32 tensors; see test_kfac.py).
"""
from __future__ import annotations

import io
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from models import TanhMLP as MLP

DTYPE = torch.float64
TOL = dict(rtol=1e-9, atol=1e-12)
LR = 0.5
BETAS = (0.5, 0.75)
EPS = 1e-8


# ----------------------------------------------------------------------------- models and helpers


class Tensor3(nn.Module):
    """A raw (3, 4, 5) parameter contracted by einsum: a loose order-3 tensor that SOAP claims."""

    def __init__(self):
        super().__init__()
        self.T = nn.Parameter(torch.randn(3, 4, 5) / 3)

    def forward(self, x):
        return torch.einsum("nij,ijk->nk", x, self.T)


MODELS = {"mlp": (MLP, (5,), 3), "tensor3": (Tensor3, (3, 4), 5)}


def refresh(pre):
    """SOAP's refresh as the optimizer runs it on one process (its bases need no statistics)."""
    pre.refresh(statistics=None, comm=None)


def make(name="mlp", seed=0, dtype=DTYPE, **kwargs):
    torch.manual_seed(seed)
    return MODELS[name][0](**kwargs).to(dtype)


def data(n, name="mlp", size=8, seed=1, dtype=DTYPE):
    _, in_shape, classes = MODELS[name]
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, *in_shape, generator=g, dtype=dtype),
             torch.randint(0, classes, (size,), generator=g)) for _ in range(n)]


def compile_soap(model, **hp):
    settings = dict(lr=LR, momentum=0.0, weight_decay=0.0, betas=BETAS, eps=EPS, stat_every=1,
                    stat_decay=0.5, precondition_frequency=1, refresh="eigh")
    settings.update(hp)
    return gnfx.compile(model, optimizer="soap", **settings)


def forward_backward(c, x, y):
    c.zero_grad()
    loss = F.cross_entropy(c(x), y)
    loss.backward()
    return loss.item()


def piece_tensor(c, piece, grad=False):
    """The piece's matrix [W b] (or loose tensor), or its gradient, read from the parameters."""
    tensors = [c.optimizer.parameter_store.param(n) for n in piece.target.params]
    tensors = [(t.grad if grad else t).detach().clone() for t in tensors]
    return torch.cat([tensors[0], tensors[1].unsqueeze(1)], 1) if len(tensors) == 2 else tensors[0]


def random_spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, n, generator=g, dtype=DTYPE)
    return X @ X.T + 0.1 * torch.eye(n, dtype=DTYPE)


def random_orthogonal(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DTYPE)).Q


def kron_all(matrices):
    # contiguous: torch.kron of a flipped eigenvector matrix's Kronecker product with an identity raises
    # "view size is not compatible" (torch 2.13)
    out = matrices[0].contiguous()
    for m in matrices[1:]:
        out = torch.kron(out, m.contiguous())
    return out


def sort_by_rayleigh_quotient(Q, F_):
    order = torch.diagonal(Q.T @ F_ @ Q).argsort(descending=True, stable=True)
    return Q[:, order], order


def subspace_error(Q, E):
    """The sine of the largest principal angle between span(Q[:, :j]) and span(E[:, :j]), over j:
    ‖(I - E_j E_jᵀ) Q_j‖₂ for the leading j columns."""
    eye = torch.eye(Q.shape[0], dtype=Q.dtype)
    return max(torch.linalg.matrix_norm((eye - E[:, :j] @ E[:, :j].T) @ Q[:, :j], ord=2).item()
               for j in range(1, Q.shape[1]))


# ----------------------------------------------------------------------------- tests


def test_kronecker_form_of_the_rotation():
    """The identity the reference relies on: vec(G ×_1 Q_1ᵀ ×_2 Q_2ᵀ ×_3 Q_3ᵀ) = (Q_1⊗Q_2⊗Q_3)ᵀ vec(G)."""
    Qs = [random_orthogonal(d, s) for d, s in ((3, 0), (4, 1), (2, 2))]
    G = torch.randn(3, 4, 2, dtype=DTYPE)
    expected = torch.einsum("abc,ai,bj,ck->ijk", G, *Qs)
    torch.testing.assert_close(kron_all(Qs).T @ G.reshape(-1), expected.reshape(-1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("refresh", ["eigh", "qr"])
@pytest.mark.parametrize("model_name", ["mlp", "tensor3"])
def test_step_with_known_factors_equals_rotate_adam_rotate_back(model_name, refresh):
    """Step 0 is Adam in the standard basis. Then each piece is given known factors F_j and an
    old basis Q_j; step 1 refreshes the bases from them (eigh, or one QR step warm-started at the
    sorted old basis), permutes v, and takes the rotated Adam step of the module docstring; the
    factors then take in G₁: F_j ← β F_j + (1-β) G_(j) G_(j)ᵀ."""
    model = make(model_name)
    c = compile_soap(model, refresh=refresh)
    pre = c.optimizer.curvature[0]
    pieces = [(g, g.pieces[0]) for g in pre.groups]
    assert {g.shape for g, _ in pieces} == ({(4, 6), (3, 5)} if model_name == "mlp" else {(3, 4, 5)})
    beta1, beta2 = BETAS
    batches = data(2, model_name)

    forward_backward(c, *batches[0])
    G0 = {g.key: piece_tensor(c, p, grad=True) for g, p in pieces}
    before = {g.key: piece_tensor(c, p) for g, p in pieces}
    c.step()
    for g, p in pieces:  # m̂ = G, v̂ = G²: the step is G / (|G| + ε)
        G = G0[g.key]
        torch.testing.assert_close(piece_tensor(c, p) - before[g.key], -LR * G / (G.abs() + EPS), **TOL)

    known = {}
    for i, (g, p) in enumerate(pieces):
        state = pre.group_state(g)
        factors = [random_spd(d, 10 * i + j) for j, d in enumerate(g.shape)]
        old = [random_orthogonal(d, 100 + 10 * i + j) for j, d in enumerate(g.shape)]
        for j in range(len(g.shape)):
            state[f"factor{j}"][0] = factors[j]
            state[f"basis{j}"][0] = old[j]
        state["refreshes"].fill_(1)  # as after an earlier refresh: "qr" warm-starts at the old basis
        known[g.key] = factors, old

    forward_backward(c, *batches[1])
    G1 = {g.key: piece_tensor(c, p, grad=True) for g, p in pieces}
    before = {g.key: piece_tensor(c, p) for g, p in pieces}
    c.step()
    for g, p in pieces:
        factors, old = known[g.key]
        G, shape = G1[g.key], g.shape
        bases, v = [], (1 - beta2) * G0[g.key] ** 2
        for j, (F_, Q) in enumerate(zip(factors, old)):
            Q_sorted, order = sort_by_rayleigh_quotient(Q, F_)
            v = v.index_select(j, order)
            bases.append(torch.linalg.eigh(F_).eigenvectors.flip(-1) if refresh == "eigh"
                         else torch.linalg.qr(F_ @ Q_sorted).Q)
        K = kron_all(bases)
        m = beta1 * (1 - beta1) * G0[g.key] + (1 - beta1) * G
        v = beta2 * v.reshape(-1) + (1 - beta2) * (K.T @ G.reshape(-1)) ** 2
        m_hat, v_hat = K.T @ m.reshape(-1) / (1 - beta1 ** 2), v / (1 - beta2 ** 2)
        U = (K @ (m_hat / (v_hat.sqrt() + EPS))).reshape(shape)
        torch.testing.assert_close(piece_tensor(c, p) - before[g.key], -LR * U, **TOL)
        state = pre.group_state(g)
        for j, F_ in enumerate(factors):
            X = G.movedim(j, 0).reshape(shape[j], -1)
            torch.testing.assert_close(state[f"factor{j}"][0], 0.5 * F_ + 0.5 * X @ X.T, **TOL)
        assert state["refreshes"].tolist() == [1 + len(shape)] and state["skipped"].tolist() == [0]


def test_qr_refresh_converges_to_the_eigenbasis():
    """refresh="qr": the first basis of a piece comes from eigh; later refreshes are one step of
    orthogonal iteration Q ← qr(F Q), which converges to the eigenbasis of a new fixed factor at
    the rate of its eigenvalue ratios (here 1/2: an error of about 2⁻ⁿ after n refreshes)."""
    c = compile_soap(make(), refresh="qr")
    pre = c.optimizer.curvature[0]
    group = next(g for g in pre.groups if g.shape == (4, 6))
    state = pre.group_state(group)
    state["factor0"][0], state["factor1"][0] = random_spd(4, 0), random_spd(6, 1)
    refresh(pre)
    first = torch.linalg.eigh(random_spd(4, 0)).eigenvectors.flip(-1)
    assert subspace_error(state["basis0"][0], first) < 1e-12  # the first basis: eigh's

    E = random_orthogonal(4, 2)  # the new factor's eigenvectors, eigenvalues 8, 4, 2, 1
    state["factor0"][0] = E @ torch.diag(torch.tensor([8.0, 4, 2, 1], dtype=DTYPE)) @ E.T
    errors = []
    for _ in range(40):
        refresh(pre)
        errors.append(subspace_error(state["basis0"][0], E))
    assert errors[0] > 1e-2, errors[0]  # one step is not enough: a warm start, not a decomposition
    assert errors[9] < 4 * 0.5 ** 10 and errors[-1] < 1e-10, errors
    Q = state["basis0"][0]
    torch.testing.assert_close(Q.T @ Q, torch.eye(4, dtype=DTYPE), rtol=0, atol=1e-12)
    assert state["refreshes"].tolist() == [2 * 41] and state["failures"].tolist() == [0]


def test_adaptive_refresh_skips_unchanged_factors_and_counts():
    """refresh_tolerance τ: a basis is kept while ‖offdiag(QᵀFQ)‖_F ≤ τ ‖QᵀFQ‖_F. Right after a
    refresh both factors are diagonal in their bases (skipped, bases untouched); a changed factor
    is refreshed, the unchanged one skipped; τ = 0 always refreshes."""
    c = compile_soap(make(), refresh="eigh", refresh_tolerance=1e-6)
    pre = c.optimizer.curvature[0]
    group = next(g for g in pre.groups if g.shape == (4, 6))
    state = pre.group_state(group)
    state["factor0"][0], state["factor1"][0] = random_spd(4, 0), random_spd(6, 1)

    def counts(state):
        return state["refreshes"].item(), state["skipped"].item(), state["failures"].item()

    refresh(pre)
    assert counts(state) == (2, 0, 0)
    bases = [state["basis0"].clone(), state["basis1"].clone()]
    refresh(pre)
    assert counts(state) == (2, 2, 0)
    assert torch.equal(state["basis0"], bases[0]) and torch.equal(state["basis1"], bases[1])

    u = torch.randn(4, 1, dtype=DTYPE)
    state["factor0"][0] += u @ u.T
    refresh(pre)
    assert counts(state) == (3, 3, 0)
    assert not torch.allclose(state["basis0"], bases[0]) and torch.equal(state["basis1"], bases[1])

    # a perturbation below a large tolerance keeps the basis
    loose = compile_soap(make(), refresh="eigh", refresh_tolerance=0.5)
    pre = loose.optimizer.curvature[0]
    state = pre.group_state(group)
    state["factor0"][0], state["factor1"][0] = random_spd(4, 0), random_spd(6, 1)
    refresh(pre)
    state["factor0"][0] += 1e-3 * u @ u.T
    refresh(pre)
    assert counts(state) == (2, 2, 0)

    always = compile_soap(make(), refresh="eigh")  # τ = 0
    pre = always.optimizer.curvature[0]
    state = pre.group_state(group)
    state["factor0"][0], state["factor1"][0] = random_spd(4, 0), random_spd(6, 1)
    refresh(pre)
    refresh(pre)
    assert counts(state) == (4, 0, 0)


def test_failed_decomposition_keeps_the_last_basis_and_counts_it():
    c = compile_soap(make(), refresh="eigh")
    pre = c.optimizer.curvature[0]
    group = next(g for g in pre.groups if g.shape == (4, 6))
    state = pre.group_state(group)
    state["factor0"][0], state["factor1"][0] = random_spd(4, 0), random_spd(6, 1)
    refresh(pre)
    basis0, basis1 = state["basis0"].clone(), state["basis1"].clone()
    state["factor0"][0, 0, 0] = float("nan")
    state["factor1"][0] = random_spd(6, 2)
    refresh(pre)
    assert torch.equal(state["basis0"], basis0) and not torch.allclose(state["basis1"], basis1)
    assert (state["refreshes"].item(), state["failures"].item()) == (3, 1)


def test_training_counts_refreshes_on_schedule():
    """precondition_frequency=3: refreshes before steps 1, 4, 7 (two factors each); momentum
    defaults to 0 for SOAP (Adam's first moment already averages)."""
    c = gnfx.compile(make(), optimizer="soap", lr=2 ** -4, stat_every=1, precondition_frequency=3)
    pre = c.optimizer.curvature[0]
    assert pre.hp["momentum"] == 0.0 and pre.hp["refresh"] == "qr"
    for x, y in data(8):
        forward_backward(c, x, y)
        c.step()
    for g in pre.groups:
        state = pre.group_state(g)
        assert state["refreshes"].tolist() == [6] and state["skipped"].tolist() == [0]
        assert state["t"].tolist() == [8]


def run(model, hp, batches, optimizer="soap"):
    c = gnfx.compile(model, optimizer=optimizer, **hp)
    for x, y in batches:
        forward_backward(c, x, y)
        c.step()
    return c


CHECKPOINT_HP = dict(lr=2 ** -3, momentum=0.5, weight_decay=2 ** -4, stat_every=2, precondition_frequency=2,
                     refresh="qr", refresh_tolerance=1e-3, max_block=4)


def test_checkpoint_resume_is_bit_exact():
    """Save after 3 steps (torch.save / torch.load(weights_only=True)), load into a fresh model and
    optimizer, train 4 more: parameters and optimizer state equal the uninterrupted run's."""
    batches = data(7)
    full = run(make(), CHECKPOINT_HP, batches)

    first = run(make(), CHECKPOINT_HP, batches[:3])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first.optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = gnfx.compile(make(seed=5), optimizer="soap", **CHECKPOINT_HP)
    resumed.load_state_dict(saved["model"])
    resumed.optimizer.load_state_dict(saved["optimizer"])
    for x, y in batches[3:]:
        forward_backward(resumed, x, y)
        resumed.step()
    for (n, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n
    states = [full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]]
    assert states[0].keys() == states[1].keys()
    for i in states[0]:
        for k, v in states[0][i].items():
            assert torch.equal(v, states[1][i][k]), k
    assert sum(s["refreshes"].sum() for s in [full.optimizer.curvature[0].group_state(g)
                                              for g in full.optimizer.curvature[0].groups]) > 0


def test_compiled_update_equals_eager():
    """compile=True (torch.compile of the generated update) gives the eager steps to 1e-6 in float32
    (one layer: torch.compile's first compilation dominates this file's runtime). One refresh, from
    the factors of step 0: later float32 factors differ by round-off between the two runs, and the
    eigenvectors of their small, close eigenvalues (in which Adam's step is O(1) whatever their
    size) would differ by far more than 1e-6."""
    batches = data(3, dtype=torch.float32)
    hp = dict(lr=2 ** -3, stat_every=1, precondition_frequency=2, refresh="qr")
    eager = run(make(dtype=torch.float32, widths=(5, 3)), hp, batches)
    compiled = run(make(dtype=torch.float32, widths=(5, 3)), {**hp, "compile": True}, batches)
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    assert not torch.equal(next(make(dtype=torch.float32, widths=(5, 3)).parameters()), next(eager.parameters()))


def test_training_on_a_fixed_batch_decreases_the_loss():
    c = gnfx.compile(make(), optimizer="soap", lr=2 ** -4, stat_every=1, precondition_frequency=2)
    (x, y), = data(1, size=32)
    losses = []
    for _ in range(20):
        losses.append(forward_backward(c, x, y))
        c.step()
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("name, value", [("refresh", "svd"), ("refresh_tolerance", -1.0),
                                         ("precondition_frequency", 0), ("max_block", 0), ("eps", 0),
                                         ("betas", (1.0, 0.5)), ("momentum", 1.0), ("diagonal_above", -1)])
def test_bad_hyperparameters_raise_config_error_naming_the_parameter(name, value):
    with pytest.raises(gnfx.ConfigError, match=re.escape(f"{name}={value!r}")):
        gnfx.compile(make(), optimizer="soap", **{name: value})


@pytest.mark.parametrize("diagonal_above", [None, 4], ids=["every-mode", "mode-3-unrotated"])
@pytest.mark.parametrize("refresh", ["eigh", "qr"])
def test_step_sequence_equals_dense_reference(refresh, diagonal_above):
    """Eight steps of SOAP on the order-3 tensor against an independent dense SOAP trained from a
    copy of the same weights on the same batches: statistics on steps 0, 2, 4, 6 (stat_every=2),
    refreshes before steps 1, 4, 7 (precondition_frequency=3), each sorting the old bases and
    permuting v before recomputing them (the first by eigh under either refresh), Adam's moments
    and bias corrections carried across the changes of basis. The reference keeps its own weights,
    so any difference in one step would carry into every later one. Factors of a single gradient
    (batch 8) have full rank along modes 1 and 2 and one null vector (the ones: softmax's δ sums
    to zero) along mode 3, so each basis is unique up to signs, which Adam's step does not see. With
    diagonal_above=4 mode 3 (5 entries) keeps the identity as its basis, no factor and no sort."""
    stat_every, frequency, beta, steps = 2, 3, 0.5, 8
    model = make("tensor3")
    T = model.T.detach().clone().requires_grad_(True)
    above = {} if diagonal_above is None else {"diagonal_above": diagonal_above}
    c = compile_soap(model, refresh=refresh, stat_every=stat_every, stat_decay=beta,
                     precondition_frequency=frequency, **above)
    beta1, beta2 = BETAS
    dims = T.shape
    rotated = [j for j, d in enumerate(dims) if diagonal_above is None or d <= diagonal_above]
    factors = [torch.zeros(d, d, dtype=DTYPE) for d in dims]
    bases = [torch.eye(d, dtype=DTYPE) for d in dims]
    m, v = torch.zeros_like(T), torch.zeros_like(T)
    for t, (x, y) in enumerate(data(steps, "tensor3")):
        forward_backward(c, x, y)
        c.step()
        G, = torch.autograd.grad(F.cross_entropy(torch.einsum("nij,ijk->nk", x, T), y), T)
        if t >= 1 and (t - 1) % frequency == 0:
            for j in rotated:
                Q_sorted, order = sort_by_rayleigh_quotient(bases[j], factors[j])
                v = v.index_select(j, order)
                bases[j] = (torch.linalg.qr(factors[j] @ Q_sorted).Q if refresh == "qr" and t > 1
                            else torch.linalg.eigh(factors[j]).eigenvectors.flip(-1))
        K = kron_all(bases)
        m = beta1 * m + (1 - beta1) * G
        v = beta2 * v + (1 - beta2) * (K.T @ G.reshape(-1)).reshape(dims) ** 2
        m_hat = K.T @ m.reshape(-1) / (1 - beta1 ** (t + 1))
        v_hat = v.reshape(-1) / (1 - beta2 ** (t + 1))
        with torch.no_grad():
            T -= LR * (K @ (m_hat / (v_hat.sqrt() + EPS))).reshape(dims)
        if t % stat_every == 0:
            for j in range(len(dims)):
                X = G.movedim(j, 0).reshape(dims[j], -1)
                factors[j] = beta * factors[j] + (1 - beta) * X @ X.T
        torch.testing.assert_close(model.T.detach(), T.detach(), rtol=1e-9, atol=1e-11, msg=f"step {t}")
    state = c.optimizer.curvature[0].group_state(c.optimizer.curvature[0].groups[0])
    assert state["refreshes"].tolist() == [3 * len(rotated)]
    assert {f"basis{j}" for j in range(len(dims))} & set(state) == {f"basis{j}" for j in rotated}
