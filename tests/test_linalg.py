"""gnfx.linalg: the coupled Newton inverse roots against eigendecompositions, failure reports,
and the thread policy of decompositions on the CPU."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from gnfx.linalg import (MULTITHREAD_FROM, _largest_eigenvalue, damped_inverse_power, decomposition_threads, method_computes,
                         newton_inverse_root)


def spd_stack(k, n, condition, dtype=torch.float64, seed=0):
    """k symmetric positive definite n x n matrices with eigenvalues log-spaced in [1/condition, 1]
    (times a scale), in random orthonormal bases."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(k, n, n, generator=g, dtype=torch.float64))
    d = torch.logspace(-torch.log10(torch.tensor(condition)).item(), 0, n, dtype=torch.float64)
    scale = 10.0 ** torch.randint(-3, 4, (k, 1, 1), generator=g)
    return ((Q * d) @ Q.transpose(1, 2) * scale).to(dtype)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 24), r=st.sampled_from([1, 2, 4, 6]), log_condition=st.integers(0, 8),
       k=st.integers(1, 3), seed=st.integers(0, 10 ** 6))
def test_newton_inverse_root_equals_the_eigendecomposition_root_in_float64(n, r, log_condition, k, seed):
    """To the accuracy the conditioning κ allows either method: relative 100 κ eps, at least 1e-10."""
    condition = 10.0 ** log_condition
    A = spd_stack(k, n, condition, seed=seed)
    X, converged = newton_inverse_root(A, r)
    assert converged.all()
    d, Q = torch.linalg.eigh(A)
    expected = (Q * d.pow(-1 / r).unsqueeze(-2)) @ Q.transpose(1, 2)
    tol = max(1e-10, 100 * condition * torch.finfo(A.dtype).eps)
    torch.testing.assert_close(X, expected, rtol=tol, atol=tol * expected.abs().amax().item())
    # the defining property: X^r A = I
    eye = torch.eye(n, dtype=A.dtype).expand_as(A)
    torch.testing.assert_close(torch.linalg.matrix_power(X, r) @ A, eye, rtol=0, atol=max(1e-8, tol))


@pytest.mark.parametrize("p, relative, damping", [(1.0, False, 1e-3), (0.25, True, 1e-6), (1 / 3, True, 1e-4)])
def test_damped_inverse_power_by_newton_equals_eigh(p, relative, damping):
    """Both methods on rank-deficient PSD factors (half their rank), as K-FAC (absolute damping,
    p = 1) and Shampoo (damping relative to the largest eigenvalue, p = 1/4, 1/3) use them."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 40, 20, generator=g, dtype=torch.float64)
    F = X @ X.transpose(1, 2) / 20
    lam = torch.full((3,), damping, dtype=torch.float64)
    by_eigh, ok_eigh = damped_inverse_power(F, lam, p, torch.float64, relative, method="eigh")
    by_newton, ok_newton = damped_inverse_power(F, lam, p, torch.float64, relative, method="newton")
    assert ok_eigh.all() and ok_newton.all()
    torch.testing.assert_close(by_newton, by_eigh, rtol=1e-8, atol=1e-8 * by_eigh.abs().amax().item())


@pytest.mark.parametrize("structure", ["ones", "alternating"])
def test_largest_eigenvalue_of_factors_with_structured_null_spaces(structure):
    """λ_max by power iteration equals eigh's when the factor's null space holds a structured vector:
    the output factor of a softmax layer has 1 in its null space (cross-entropy gradients sum to zero
    over the classes). The factors s (I - u uᵀ/2)·2 of u = (1, 1) or (1, -1) make F u exactly zero and
    every normalized squaring exact (entries ±s/2s), so a start vector in that null space gives 0 on
    any machine, not λ_max = 2s."""
    u = torch.tensor([1.0, 1.0 if structure == "ones" else -1.0], dtype=torch.float64)
    B = 2 * torch.eye(2, dtype=torch.float64) - torch.outer(u, u)
    F = torch.stack([s * B for s in (1.0, 3.0, 1e-3)])
    assert (F @ u).abs().max() == 0
    torch.testing.assert_close(_largest_eigenvalue(F), torch.linalg.eigvalsh(F)[:, -1], rtol=1e-12, atol=0)


def test_largest_eigenvalue_equals_eigh_on_generic_factors():
    X = torch.randn(4, 30, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    F = X @ X.transpose(1, 2)
    torch.testing.assert_close(_largest_eigenvalue(F), torch.linalg.eigvalsh(F)[:, -1], rtol=1e-12, atol=0)


def test_newton_in_float32_is_accurate_to_float32_conditioning():
    """In float32, with the condition number at most 1e3: relative error below 1e-3 (eigh in float64
    as the reference)."""
    A = spd_stack(4, 64, 1e3)
    X, converged = newton_inverse_root(A.float(), 4)
    assert converged.all()
    d, Q = torch.linalg.eigh(A)
    expected = (Q * d.pow(-0.25).unsqueeze(-2)) @ Q.transpose(1, 2)
    error = torch.linalg.matrix_norm(X.double() - expected) / torch.linalg.matrix_norm(expected)
    assert error.max() < 1e-3, error


def test_an_iteration_that_does_not_converge_is_reported_and_becomes_a_failure():
    A = spd_stack(2, 16, 1e8)
    _, converged = newton_inverse_root(A, 4, max_iterations=3)
    assert not converged.any()
    F = A.clone()
    F[1] = 0  # a factor with no statistics yet is no success either
    out, ok = damped_inverse_power(F, torch.full((2,), 1e-3, dtype=F.dtype), 1.0, F.dtype, method="newton")
    assert ok.tolist() == [True, False]


def test_which_powers_each_method_computes():
    assert all(method_computes("newton", p, True) for p in (1.0, 0.25, 1 / 6))
    assert not method_computes("newton", 0.3, False) and not method_computes("newton", 2 / 3, False)
    assert method_computes("cholesky", 1.0, False)
    assert not method_computes("cholesky", 0.5, False) and not method_computes("cholesky", 1.0, True)
    assert method_computes("eigh", 0.3, True)
    F = torch.eye(3).expand(1, 3, 3)
    with pytest.raises(ValueError, match="'cholesky' does not compute"):
        damped_inverse_power(F, torch.ones(1), 0.25, torch.float32, relative=True, method="cholesky")


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_cholesky_inverse_equals_eigh_and_falls_back_where_not_positive_definite(dtype, tol):
    """K-FAC's inverses by Cholesky equal the eigendecomposition's on PSD factors of half rank; a
    matrix with a negative eigenvalue below -λ (no Cholesky factor) is computed by eigh instead."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 30, 15, generator=g, dtype=torch.float64)
    F = (X @ X.transpose(1, 2) / 15).to(dtype)
    F[2] -= 0.5 * torch.eye(30, dtype=dtype)  # indefinite: eigh clamps its eigenvalues at 0
    lam = torch.full((3,), 1e-2, dtype=dtype)
    by_eigh, ok_eigh = damped_inverse_power(F, lam, 1.0, dtype, method="eigh")
    by_cholesky, ok_cholesky = damped_inverse_power(F, lam, 1.0, dtype, method="cholesky")
    assert ok_eigh.all() and ok_cholesky.all()
    torch.testing.assert_close(by_cholesky, by_eigh, rtol=tol, atol=tol * by_eigh.abs().amax().item())


@pytest.mark.parametrize("method", ["eigh", "cholesky"])
def test_a_result_is_ok_when_finite_in_the_factors_dtype_and_from_a_factor_with_statistics(method):
    """`ok` per matrix: a diagonal factor is fine; an all-zero factor holds no statistics; a factor with
    a NaN fails; an inverse that overflows float32 (1/1e-40, computed in float64) fails; the rest of
    the stack is unaffected and equals the float64 reference."""
    F = torch.zeros(4, 3, 3)
    F[0] = torch.diag(torch.tensor([4.0, 1.0, 0.25]))
    F[2] = F[0]
    F[2, 0, 1] = F[2, 1, 0] = float("nan")
    F[3] = torch.diag(torch.tensor([1e-40, 1.0, 1.0]))  # float32 subnormal
    out, ok = damped_inverse_power(F, torch.zeros(4), 1.0, torch.float64, method=method)
    assert ok.tolist() == [True, False, False, False]
    torch.testing.assert_close(out[0], torch.diag(torch.tensor([0.25, 1.0, 4.0])), rtol=1e-6, atol=0)


def test_small_decompositions_run_on_one_thread_and_large_ones_on_all():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with decomposition_threads(torch.device("cpu"), MULTITHREAD_FROM - 1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with decomposition_threads(torch.device("cpu"), MULTITHREAD_FROM):
            assert torch.get_num_threads() == 2
        with decomposition_threads(torch.device("meta"), 4):  # other devices: threads untouched
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
