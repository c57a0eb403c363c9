"""Batched symmetric matrix functions for the amortized refresh.

`damped_inverse_power(F, damping, p)` returns `(F + λ I)^{-p}` for a stack of symmetric positive
semi-definite matrices from one symmetric eigendecomposition `F = Q diag(d) Qᵀ` (eigenvalues
clamped at 0 against round-off): `Q diag((d + λ)^{-p}) Qᵀ`. A decomposition that fails or yields
non-finite values is reported per matrix, so that the caller keeps its last good result.

On the CPU the eigendecomposition runs on one thread: measured on this project's 2-core machine,
a multi-threaded (MKL) eigh of a 32x32 matrix took 0.13 s against 0.0003 s on one thread, and a
256x256 one sometimes stalled for seconds.
"""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def one_thread(device: torch.device):
    """Run the body on one intra-op thread when on the CPU."""
    if device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _power(F: torch.Tensor, damping: torch.Tensor, p: float, relative: bool) -> torch.Tensor:
    with one_thread(F.device):
        d, Q = torch.linalg.eigh(F)
    d = d.clamp(min=0)
    if relative:
        damping = (damping * d[..., -1]).clamp(min=torch.finfo(d.dtype).tiny)
    d = (d + damping.unsqueeze(-1)).pow(-p)
    return (Q * d.unsqueeze(-2)) @ Q.transpose(-1, -2)


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
    with one_thread(M.device):
        nan = float("nan")
        return isolated(lambda i: torch.linalg.eigh(M[i]), M.shape[0],
                        lambda: (M.new_full(M[:1].shape[:-1], nan), torch.full_like(M[:1], nan)))


def damped_inverse_power(F: torch.Tensor, damping: torch.Tensor, p: float, dtype: torch.dtype,
                         relative: bool = False):
    """`(F_i + λ_i I)^{-p}` for each matrix i of the (k, n, n) stack `F`, computed in `dtype`;
    with `relative`, λ_i is `damping` times the largest eigenvalue of F_i.

    Returns (result in F's dtype, ok) where `ok` is a (k,) bool tensor: False where the
    decomposition failed or produced non-finite values (that entry of the result is undefined).
    """
    F64, lam = F.to(dtype), damping.to(dtype)
    out = isolated(lambda i: _power(F64[i], lam[i], p, relative), F.shape[0],
                   lambda: torch.full_like(F64[:1], float("nan")))
    out = out.to(F.dtype)
    # finite in F's dtype (a root that overflows float32 is a failure too), and from a factor that
    # holds statistics (an all-zero factor has none yet: its damped root would be λ^{-p} I)
    ok = torch.isfinite(out).flatten(1).all(1) & (F.flatten(1).abs().amax(1) > 0)
    return out, ok
