"""Batched symmetric matrix functions for the amortized refresh.

`damped_inverse_power(F, damping, p)` returns `(F + λ I)^{-p}` for a stack of symmetric positive
semi-definite matrices, by one of three methods:

  "eigh"      one symmetric eigendecomposition `F = Q diag(d) Qᵀ` (eigenvalues clamped at 0
              against round-off): `Q diag((d + λ)^{-p}) Qᵀ`;
  "cholesky"  p = 1 only: `F + λI = L Lᵀ`, inverted from L (n³/3 + 2n³/3 FLOPs, no iteration:
              several times faster than eigh on a CPU); a matrix that is not numerically positive
              definite falls back to "eigh";
  "newton"    the coupled Newton iteration for the inverse r-th root, r = 1/p an integer
              (`newton_inverse_root`): matrix products only, which a GPU or torch.compile runs far
              faster than an eigendecomposition.

A decomposition that fails or yields non-finite values (or an iteration that does not converge)
is reported per matrix, so that the caller keeps its last good result.

Threads (CPU). Measured on this project's 2-core machine (benchmarks/results/profile.md): an
eigendecomposition of n ≥ 512 runs 1.3-1.8x faster on both cores (n = 1025, float64: 0.16 s
against 0.21 s), while for small matrices multi-threading gains nothing and was seen to stall (a
multi-threaded 32x32 eigh once took 0.13 s against 0.0003 s on one thread; the issue tracker saw
a 256x256 one take 2.6 s in some fresh processes). So decompositions of matrices smaller than
`MULTITHREAD_FROM` run on one thread, larger ones on all. A batched eigh of a stack was as fast
as a loop over its matrices at every size measured (32-512), so stacks are decomposed at once.
"""
from __future__ import annotations

import contextlib

import torch

MULTITHREAD_FROM = 512
METHODS = ("eigh", "newton", "cholesky")


@contextlib.contextmanager
def decomposition_threads(device: torch.device, n: int):
    """Run the body on one intra-op thread when on the CPU and the matrices (n x n) are smaller
    than MULTITHREAD_FROM; else with the threads as they are."""
    if device.type != "cpu" or n >= MULTITHREAD_FROM:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _start_vector(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The power iteration's start: a fixed Gaussian vector (seeded, drawn on the CPU in float64, so
    the same on every machine). A structured start such as the all-ones vector can be exactly
    orthogonal to the top eigenvector: the output factor of a softmax layer has 1 in its null space
    (cross-entropy gradients sum to zero over the classes), and the iteration then runs on round-off
    alone, whose outcome depends on the BLAS. A generic vector has a nonzero top component for every
    factor that model structure can produce."""
    g = torch.Generator().manual_seed(n)
    return torch.randn(n, 1, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


def _largest_eigenvalue(F: torch.Tensor, squarings: int = 5, iterations: int = 20) -> torch.Tensor:
    """λ_max of each symmetric PSD F_i: power iteration from `_start_vector` on F^(2^squarings)
    (normalized squarings: a gap λ_2/λ_1 closes as its 2^squarings-th power per iteration), then the
    Rayleigh quotient of F (so it never exceeds the true λ_max)."""
    tiny = torch.finfo(F.dtype).tiny
    P = F
    for _ in range(squarings):
        P = P / torch.linalg.matrix_norm(P).clamp(min=tiny).view(-1, 1, 1)
        P = P @ P
    v = _start_vector(F.shape[-1], F.dtype, F.device).expand(F.shape[:-1] + (1,))
    for _ in range(iterations):
        v = P @ v
        v = v / torch.linalg.vector_norm(v, dim=-2, keepdim=True).clamp(min=tiny)
    return (v.transpose(-1, -2) @ F @ v).flatten(1)[:, 0].clamp(min=0)


def newton_inverse_root(A: torch.Tensor, r: int, max_iterations: int = 100):
    """`A^{-1/r}` for each symmetric positive definite A_i of the stack A (k, n, n), r ≥ 1 an integer,
    by the coupled Newton iteration (Guo & Higham 2006; as in Anil et al. 2020's Shampoo):

        z = (1 + r) / (2 ‖A‖_F),   X_0 = z^{1/r} I,   M_0 = z A,
        T_k = ((r + 1) I - M_k) / r,   X_{k+1} = X_k T_k,   M_{k+1} = T_k^r M_k,

    which keeps `M_k = X_k^r A` (all iterates are polynomials in A and commute) and drives M_k to I,
    hence X_k to A^{-1/r}; ‖A‖_F ≥ ‖A‖_2 keeps M_0's eigenvalues in (0, (1+r)/2], where it
    converges. It stops when every `max|M_k - I|` is below √eps of the dtype, after one more
    (quadratically convergent) iteration.

    Returns (X, converged): converged is a (k,) bool tensor (False: not within max_iterations).
    """
    n = A.shape[-1]
    eye = torch.eye(n, dtype=A.dtype, device=A.device)
    z = (1 + r) / (2 * torch.linalg.matrix_norm(A)).clamp(min=torch.finfo(A.dtype).tiny)
    X = eye * z.pow(1 / r).view(-1, 1, 1)
    M = A * z.view(-1, 1, 1)
    tolerance = torch.finfo(A.dtype).eps ** 0.5
    error = torch.full((len(A),), float("inf"), dtype=A.dtype, device=A.device)
    last = False
    for _ in range(max_iterations):
        T = ((r + 1) * eye - M) / r
        X = X @ T
        M = torch.linalg.matrix_power(T, r) @ M
        if last:
            break
        error = (M - eye).abs().flatten(1).amax(1)
        last = bool((error < tolerance).all())
    converged = error < tolerance
    return X, converged


def _damped(F: torch.Tensor, damping: torch.Tensor) -> torch.Tensor:
    """F_i + λ_i I for each matrix of the stack (a copy of F with λ added to its diagonal)."""
    M = F.clone()
    M.diagonal(dim1=-2, dim2=-1).add_(damping.unsqueeze(-1))
    return M


def _power(F: torch.Tensor, damping: torch.Tensor, p: float, relative: bool, method: str) -> torch.Tensor:
    n = F.shape[-1]
    if method == "cholesky":
        with decomposition_threads(F.device, n):
            L, info = torch.linalg.cholesky_ex(_damped(F, damping))
            out = torch.cholesky_inverse(L)
        failed = info != 0
        if failed.any():  # F + λI not numerically positive definite: the eigendecomposition clamps F at 0
            out[failed] = _power(F[failed], damping[failed], p, relative, "eigh")
        return out
    if method == "newton":
        if relative:
            damping = (damping * _largest_eigenvalue(F)).clamp(min=torch.finfo(F.dtype).tiny)
        X, converged = newton_inverse_root(_damped(F, damping), round(1 / p))
        return X.masked_fill(~converged.view(-1, 1, 1), float("nan"))
    with decomposition_threads(F.device, n):
        d, Q = torch.linalg.eigh(F)
    d = d.clamp(min=0)
    if relative:
        damping = (damping * d[..., -1]).clamp(min=torch.finfo(d.dtype).tiny)
    d = (d + damping.unsqueeze(-1)).pow(-p)
    return (Q * d.unsqueeze(-2)) @ Q.transpose(-1, -2)


def method_computes(method: str, p: float, relative: bool) -> bool:
    """Whether `method` computes (F + λI)^{-p}: "newton" needs 1/p an integer, "cholesky" p = 1 and
    an absolute λ."""
    if method == "newton":
        return abs(1 / p - round(1 / p)) < 1e-9
    if method == "cholesky":
        return p == 1 and not relative
    return True


def isolated(fn, k: int, failed):
    """`fn(slice(None))` over a stack of k matrices; if it raises (torch.linalg.LinAlgError, or MKL
    failing on one matrix), `fn` per matrix, with `failed()` (NaN, of one matrix's result) for the
    ones that fail: callers test finiteness."""
    try:
        return fn(slice(None))
    except RuntimeError:
        parts = []
        for i in range(k):
            try:
                parts.append(fn(slice(i, i + 1)))
            except RuntimeError:
                parts.append(failed())
        if isinstance(parts[0], tuple):
            return tuple(torch.cat([p[j] for p in parts]) for j in range(len(parts[0])))
        return torch.cat(parts)


def eigh(M: torch.Tensor):
    """Batched symmetric eigendecomposition (eigenvalues ascending); a matrix whose decomposition
    fails gets NaN instead of failing the whole batch (eager only: under torch.compile, plain eigh)."""
    if torch.compiler.is_compiling():
        return torch.linalg.eigh(M)
    with decomposition_threads(M.device, M.shape[-1]):
        nan = float("nan")
        return isolated(lambda i: torch.linalg.eigh(M[i]), M.shape[0],
                        lambda: (M.new_full(M[:1].shape[:-1], nan), torch.full_like(M[:1], nan)))


def damped_diagonal_power(F: torch.Tensor, damping: float, p: float):
    """`(F_i + λ_i)^{-p}` entrywise for each diagonal factor i of the (k, n) stack `F` (its diagonal
    entries), λ_i = `damping` times the largest entry of F_i: `damped_inverse_power` with `relative` for
    diagonal matrices. Returns (result, ok) as that does: ok False where a root is not finite or the
    factor holds no statistics yet (all zero)."""
    out = (F + damping * F.amax(1, keepdim=True)).pow(-p)
    return out, (out.mul(0).sum(1) == 0) & F.ne(0).any(1)


def damped_inverse_power(F: torch.Tensor, damping: torch.Tensor, p: float, dtype: torch.dtype,
                         relative: bool = False, method: str = "eigh"):
    """`(F_i + λ_i I)^{-p}` for each matrix i of the (k, n, n) stack `F`, computed in `dtype` by
    `method` (see the module docstring and `method_computes`); with `relative`, λ_i is `damping`
    times the largest eigenvalue of F_i.

    Returns (result in F's dtype, ok) where `ok` is a (k,) bool tensor: False where the
    decomposition failed or produced non-finite values (that entry of the result is undefined).
    """
    if not method_computes(method, p, relative):
        raise ValueError(f"method {method!r} does not compute (F + λI)^(-{p:g}) with {'relative' if relative else 'absolute'} "
                         f"damping (see gnfx.linalg.method_computes)")
    F64, lam = F.to(dtype), damping.to(dtype)
    out = isolated(lambda i: _power(F64[i], lam[i], p, relative, method), F.shape[0],
                   lambda: torch.full_like(F64[:1], float("nan")))
    out = out.to(F.dtype)
    # finite in F's dtype (a root that overflows float32 is a failure too): 0·x sums to exactly 0
    # when every x is finite and to NaN otherwise (one multiply and a sum: 0.07 ms for a 2 x 257² stack
    # on this project's CPU, where isfinite().all() took 0.54 ms); and from a factor that holds statistics
    # (an all-zero factor has none yet: its damped root would be λ^{-p} I; a PSD matrix is zero iff
    # its diagonal is)
    finite = out.flatten(1).mul(0).sum(1) == 0
    ok = finite & F.diagonal(dim1=-2, dim2=-1).ne(0).any(-1)
    return out, ok
