"""EKFAC against a dense reference built explicitly with torch.kron (George et al. 2018).

For a block with folded gradient G = [∇W ∇b] (d_out x d_a), K-FAC's eigenbases Q_A, Q_S of the
statistics A, S, and the column-major vec(X) = Xᵀ.reshape(-1) (vec(Q_Sᵀ X Q_A) = (Q_A ⊗ Q_S)ᵀ vec X),
the step is

    vec U = K diag(1 / (s + d)) Kᵀ vec G,    K = Q_A ⊗ Q_S,

with s = 1/N Σ_n (Kᵀ vec ∇ℓ̃_n)² from per-example gradients (torch.func.vmap over functional_call,
tests/references.py) taken in the bases of the last refresh, and, on a refresh step, that s carried
into the new basis: s_new = ((K_oldᵀ K_new)²)ᵀ s_old (elementwise square; K_old = I before the first
refresh, when the taps measure in the standard basis). Embeddings (A diagonal) have Q_A = I.
The damping d is λ (damping_kind="tikhonov") or, for damping_kind="factored", what K-FAC's
factored damping adds to A ⊗ S, seen in the eigenbasis: d = diag(Kᵀ [(A + π√λ I) ⊗ (S + √λ/π I)
- A ⊗ S] K), π = sqrt((tr A / dim A) / (tr S / dim S)), from the A and S of the last refresh.
Learning rates are powers of two (gnfx passes them as float32 tensors; see test_kfac.py).
"""
from __future__ import annotations

import io
import math
import re

import pytest
import torch
from torch import nn

import gnfx
from models import TanhMLP as MLP
from gnfx.preconditioners.kfac import KFAC
from references import cross_entropy, per_example_grads

DTYPE = torch.float64
TOL = dict(rtol=1e-8, atol=1e-11)
LR = 0.5
DAMPING = 0.1


# ----------------------------------------------------------------------------- models and helpers


class Sequence(nn.Module):
    """Token ids (N, T) -> embedding -> tanh -> linear -> (N, T, C): an embedding block (diagonal
    A) and a linear block whose T positions are extra examples of A and S."""

    def __init__(self, vocab=7, d=4, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.out = nn.Linear(d, classes)

    def forward(self, x):
        return self.out(torch.tanh(self.embed(x)))


def make(name="mlp", seed=0, dtype=DTYPE, **kwargs):
    torch.manual_seed(seed)
    return {"mlp": MLP, "sequence": Sequence}[name](**kwargs).to(dtype)


def data(n, name="mlp", size=8, seed=1, dtype=DTYPE):
    g = torch.Generator().manual_seed(seed)
    if name == "sequence":
        return [(torch.randint(0, 7, (size, 5), generator=g), torch.randint(0, 3, (size, 5), generator=g))
                for _ in range(n)]
    return [(3 * torch.randn(size, 5, generator=g, dtype=dtype), torch.randint(0, 3, (size,), generator=g))
            for _ in range(n)]


def compile_ekfac(model, **hp):
    settings = dict(lr=LR, momentum=0.0, weight_decay=0.0, kl_clip=0.0, damping=DAMPING,
                    stat_every=1, inv_every=1, stat_decay=0.5)
    settings.update(hp)
    return gnfx.compile(model, optimizer="ekfac", **settings)


def forward_backward(c, x, y):
    c.zero_grad()
    loss = cross_entropy(c(x), y)
    loss.backward()
    return loss.item()


def matrix(tensors, view):
    """[W b] of a block from its (weight, bias) tensors; an embedding's weight reads transposed."""
    w = tensors[0].T if view == "t" else tensors[0]
    return torch.cat([w, tensors[1].unsqueeze(-1)], -1) if len(tensors) == 2 else w


def block_matrix(c, block, grad=False):
    ts = [c.optimizer.parameter_store.param(n) for n in block.params]
    return matrix([(t.grad if grad else t).detach().clone() for t in ts], "t" if block.kind == "embedding" else "")


def vec(X):
    return X.T.reshape(-1)


def unvec(v, shape):
    return v.reshape(shape[1], shape[0]).T


def kron_basis(A, S):
    """K = Q_A ⊗ Q_S from the eigenvectors of A (the identity for a diagonal A) and S, by decreasing
    eigenvalue as gnfx orders them (so that s compares entry by entry; U does not depend on it)."""
    def eigenvectors(F_):
        return torch.linalg.eigh(F_).eigenvectors.flip(-1).contiguous()

    Q_A = torch.eye(len(A), dtype=A.dtype) if A.dim() == 1 else eigenvectors(A)
    return torch.kron(Q_A, eigenvectors(S))


def measured_scale(model, block, K, x, y):
    """s = 1/N Σ_n (Kᵀ vec ∇ℓ̃_n)² from per-example gradients."""
    grads = per_example_grads(model, x, y)
    per_example = [grads[n] for n in block.params]
    view = "t" if block.kind == "embedding" else ""
    rotated = torch.stack([K.T @ vec(matrix([g[i] for g in per_example], view)) for i in range(len(x))])
    return rotated.square().mean(0)


def factored_damping(A, S, damping=DAMPING):
    """((A + π√λ I) ⊗ (S + √λ/π I) - A ⊗ S, (A + π√λ I) ⊗ (S + √λ/π I)) built with torch.kron (a
    diagonal A as the matrix diag(A))."""
    A = torch.diag(A) if A.dim() == 1 else A
    pi = math.sqrt((A.trace() / len(A)) / (S.trace() / len(S)))
    root = math.sqrt(damping)
    damped = torch.kron(A + pi * root * torch.eye(len(A), dtype=A.dtype), S + root / pi * torch.eye(len(S), dtype=S.dtype))
    return damped - torch.kron(A, S), damped


def eigenbasis_damping(kind, K, A, S):
    """d of the module docstring for the bases K and the factors A, S of the last refresh."""
    return DAMPING if kind == "tikhonov" else torch.diagonal(K.T @ factored_damping(A, S)[0] @ K)


def ekfac_direction(K, s, G, d=DAMPING):
    return unvec(K @ ((K.T @ vec(G)) / (s + d)), G.shape)


# ----------------------------------------------------------------------------- tests


def test_vec_convention_turns_the_rotation_into_a_kronecker_product():
    torch.manual_seed(0)
    Q_S, X, Q_A = torch.randn(3, 3, dtype=DTYPE), torch.randn(3, 4, dtype=DTYPE), torch.randn(4, 4, dtype=DTYPE)
    torch.testing.assert_close(vec(Q_S.T @ X @ Q_A), torch.kron(Q_A, Q_S).T @ vec(X), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("damping_kind", ["tikhonov", "factored"])
@pytest.mark.parametrize("model_name", ["mlp", "sequence"])
def test_steps_equal_the_dense_reference(model_name, damping_kind):
    """inv_every=2, statistics every step, stat_decay=0 (each statistic is its batch's): step 0
    refreshes the bases and carries s from the standard basis; step 1 uses s measured in the
    bases of step 0 (and the factored damping of step 0's A and S); step 2 refreshes again and
    carries the s measured in the old bases."""
    model = make(model_name)
    c = compile_ekfac(model, inv_every=2, stat_decay=0.0, damping_kind=damping_kind)
    blocks = list(c.layers)
    assert {b.kind for b in blocks} == ({"linear"} if model_name == "mlp" else {"linear", "embedding"})
    bases = {b.name: None for b in blocks}
    damping = {}
    for step, (x, y) in enumerate(data(3, model_name)):
        reference_model = make(model_name)
        reference_model.load_state_dict(model.state_dict())
        forward_backward(c, x, y)
        grads = {b.name: block_matrix(c, b, grad=True) for b in blocks}
        before = {b.name: block_matrix(c, b) for b in blocks}
        c.step()
        for b in blocks:
            n = b.name
            st = c.statistics(n)
            d = grads[n].numel()
            K_old = torch.eye(d, dtype=DTYPE) if bases[n] is None else bases[n]
            s = measured_scale(reference_model, b, K_old, x, y)
            if step % 2 == 0:
                bases[n] = kron_basis(st["A"], st["S"])
                s = ((K_old.T @ bases[n]).square()).T @ s
                damping[n] = eigenbasis_damping(damping_kind, bases[n], st["A"], st["S"])
            else:  # the statistic is the batch's, measured in the current bases
                torch.testing.assert_close(vec(st["eigen_diag"]), s, **TOL)
            U = ekfac_direction(bases[n], s, grads[n], damping[n])
            torch.testing.assert_close(block_matrix(c, b) - before[n], -LR * U, **TOL)


def test_eigen_diag_without_a_basis_is_the_diag_statistic():
    """Unset, the basis is the standard one: "eigen_diag" equals "diag" exactly."""
    model = make("sequence")
    c = gnfx.compile(model, stat_every=1, statistics=("diag", "eigen_diag"))
    for x, y in data(2, "sequence"):
        forward_backward(c, x, y)
        c.step()
    for b in c.layers:
        st = c.statistics(b.name)
        assert torch.equal(st["eigen_diag"], st["diag"])


def test_kronecker_eigenvalue_scaling_reproduces_kfac_with_exact_damping():
    """damping_kind="tikhonov" with s = diag(Λ_S) diag(Λ_A)ᵀ (the eigenvalues of A ⊗ S in its
    eigenbasis): the direction is (A ⊗ S + λ I)⁻¹ vec G."""
    model = make()
    c = compile_ekfac(model, damping_kind="tikhonov")
    (x, y), = data(1)
    forward_backward(c, x, y)
    c.step()
    pre = c.optimizer.curvature[0]
    for group in pre.groups:
        state = dict(pre.group_state(group))
        block = group.pieces[0].target.block
        A, S = c.statistics(block.name)["A"], c.statistics(block.name)["S"]
        lam_S = torch.diagonal(state["Q_S"][0].T @ S @ state["Q_S"][0])
        lam_A = torch.diagonal(state["Q_A"][0].T @ A @ state["Q_A"][0])
        state["scale"] = torch.outer(lam_S, lam_A).unsqueeze(0)
        G = torch.randn(group.shape, dtype=DTYPE)
        U = pre.direction(G.unsqueeze(0), state, False)[0]
        K = torch.kron(A, S) + DAMPING * torch.eye(G.numel(), dtype=DTYPE)
        torch.testing.assert_close(U, unvec(torch.linalg.solve(K, vec(G)), G.shape), **TOL)


@pytest.mark.parametrize("model_name", ["mlp", "sequence"])
def test_kronecker_eigenvalue_scaling_reproduces_kfac_with_factored_damping(model_name):
    """damping_kind="factored" with s = diag(Λ_S) diag(Λ_A)ᵀ (the correction off): the direction is
    ((A + π√λ I) ⊗ (S + √λ/π I))⁻¹ vec G, K-FAC's, equal to kfac's own direction from the same
    statistics (an embedding's diagonal A included)."""
    (x, y), = data(1, model_name)
    compiled = {}
    for optimizer in ("ekfac", "kfac"):
        c = compile_ekfac(make(model_name), damping_kind="factored") if optimizer == "ekfac" else \
            gnfx.compile(make(model_name), optimizer="kfac", lr=LR, momentum=0.0, kl_clip=0.0, damping=DAMPING,
                         stat_every=1, inv_every=1)
        forward_backward(c, x, y)
        c.step()
        compiled[optimizer] = c
    pre, kfac = (compiled[o].optimizer.curvature[0] for o in ("ekfac", "kfac"))
    torch.manual_seed(2)
    for group, kfac_group in zip(pre.groups, kfac.groups):
        for i, piece in enumerate(group.pieces):
            state = {k: v[i:i + 1] for k, v in pre.group_state(group).items()}
            A, S = (compiled["ekfac"].statistics(piece.target.block.name)[k] for k in ("A", "S"))
            lam_S = torch.diagonal(state["Q_S"][0].T @ S @ state["Q_S"][0])
            lam_A = A if A.dim() == 1 else torch.diagonal(state["Q_A"][0].T @ A @ state["Q_A"][0])
            state["scale"] = torch.outer(lam_S, lam_A).unsqueeze(0)
            G = torch.randn(group.shape, dtype=DTYPE)
            U = pre.direction(G.unsqueeze(0), state, False)[0]
            torch.testing.assert_close(U, unvec(torch.linalg.solve(factored_damping(A, S)[1], vec(G)), G.shape), **TOL)
            kfac_state = {k: v[i:i + 1] for k, v in kfac.group_state(kfac_group).items()}
            torch.testing.assert_close(U, kfac.direction(G.unsqueeze(0), kfac_state, False)[0], **TOL)


def test_adaptive_refresh_skips_unchanged_factors_and_counts():
    """inv_every=1, statistics every other step: on odd steps A and S have not changed, both bases
    are still exact (skipped, untouched); on even steps they are recomputed."""
    c = compile_ekfac(make(), stat_every=2, refresh_tolerance=1e-6)
    pre = c.optimizer.curvature[0]
    previous = None
    for step, (x, y) in enumerate(data(6)):
        forward_backward(c, x, y)
        c.step()
        for g in pre.groups:
            state = pre.group_state(g)
            assert state["refreshes"].tolist() == [2 * (step // 2 + 1)]
            assert state["skipped"].tolist() == [2 * ((step + 1) // 2)]
            assert state["failures"].tolist() == [0]
        bases = [pre.group_state(g)[k].clone() for g in pre.groups for k in ("Q_S", "Q_A")]
        if step % 2:
            assert all(torch.equal(a, b) for a, b in zip(bases, previous))
        elif previous is not None:
            assert not any(torch.allclose(a, b) for a, b in zip(bases, previous))
        previous = bases


def test_kl_clipping_is_kfacs():
    """Δ_clipped = ν Δ, ν = min(1, sqrt(κ / Σ_blocks η² ⟨U, G⟩)), as for K-FAC (the same method)."""
    assert gnfx.REGISTRY["ekfac"].default_chain.__func__ is KFAC.default_chain.__func__
    (x, y), = data(1)
    steps, vfv = {}, 0.0
    for kappa in (0.0, 1e-4):
        model = make()
        c = compile_ekfac(model, kl_clip=kappa)
        forward_backward(c, x, y)
        grads = {b.name: block_matrix(c, b, grad=True) for b in c.layers}
        before = {b.name: block_matrix(c, b) for b in c.layers}
        c.step()
        steps[kappa] = {b.name: block_matrix(c, b) - before[b.name] for b in c.layers}
    for n, G in grads.items():
        vfv += ((steps[0.0][n] / -LR) * G).sum().item() * LR ** 2
    nu = min(1.0, math.sqrt(1e-4 / vfv))
    assert nu < 0.5
    for n in grads:
        torch.testing.assert_close(steps[1e-4][n], nu * steps[0.0][n], **TOL)


def run(model, hp, batches):
    c = gnfx.compile(model, optimizer="ekfac", **hp)
    for x, y in batches:
        forward_backward(c, x, y)
        c.step()
    return c


CHECKPOINT_HP = dict(lr=2 ** -3, momentum=0.5, weight_decay=2 ** -4, stat_every=2, inv_every=3,
                     refresh_tolerance=1e-3)


@pytest.mark.parametrize("model_name", ["mlp", "sequence"])
def test_checkpoint_resume_is_bit_exact(model_name):
    """Save after 4 steps (torch.save / torch.load(weights_only=True)), load into a fresh model and
    optimizer, train 3 more: parameters and optimizer state equal the uninterrupted run's (the taps
    of the resumed run measure s in the loaded bases)."""
    batches = data(7, model_name)
    full = run(make(model_name), CHECKPOINT_HP, batches)
    first = run(make(model_name), CHECKPOINT_HP, batches[:4])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first.optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = gnfx.compile(make(model_name, seed=5), optimizer="ekfac", **CHECKPOINT_HP)
    resumed.load_state_dict(saved["model"])
    resumed.optimizer.load_state_dict(saved["optimizer"])
    for x, y in batches[4:]:
        forward_backward(resumed, x, y)
        resumed.step()
    for (n, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n
    states = [full.optimizer.state_dict(), resumed.optimizer.state_dict()]
    for i in states[0]["state"]:
        for k, v in states[0]["state"][i].items():
            assert torch.equal(v, states[1]["state"][i][k]), k
    for name, st in states[0]["gnfx"]["statistics"].items():
        for k, v in st["values"].items():
            assert torch.equal(v, states[1]["gnfx"]["statistics"][name]["values"][k]), (name, k)


def test_compiled_update_equals_eager():
    """compile=True (torch.compile of the generated update) gives the eager steps to 1e-6 in float32
    (one layer: torch.compile's first compilation dominates this file's runtime)."""
    batches = data(3, dtype=torch.float32)
    hp = dict(lr=2 ** -3, stat_every=1, inv_every=2, kl_clip=1e-2)
    eager = run(make(dtype=torch.float32, widths=(5, 3)), hp, batches)
    compiled = run(make(dtype=torch.float32, widths=(5, 3)), {**hp, "compile": True}, batches)
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    assert not torch.equal(next(make(dtype=torch.float32, widths=(5, 3)).parameters()), next(eager.parameters()))


def test_training_on_a_fixed_batch_decreases_the_loss():
    c = gnfx.compile(make(), optimizer="ekfac", lr=2 ** -4, stat_every=1, inv_every=2)
    (x, y), = data(1, size=32)
    losses = []
    for _ in range(20):
        losses.append(forward_backward(c, x, y))
        c.step()
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("name, value", [("damping", 0), ("inv_every", 0), ("kl_clip", -1),
                                         ("refresh_tolerance", -1.0), ("momentum", 1.0),
                                         ("decomposition_dtype", "float16")])
def test_bad_hyperparameters_raise_config_error_naming_the_parameter(name, value):
    with pytest.raises(gnfx.ConfigError, match=re.escape(f"{name}={value!r}")):
        gnfx.compile(make(), optimizer="ekfac", **{name: value})
