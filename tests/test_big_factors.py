"""K-FAC's big factors (`max_factor`, gnfx/layouts/base.py): a factor of more than max_factor entries is
kept as its diagonal blocks, A ≈ blockdiag(A_1, ..., A_m) over contiguous ranges of its entries (a
conv's input channels whole), likewise S, and the step is

    U = unvec(((Ã + λ_A I) ⊗ (S̃ + λ_S I))⁻¹ vec(G)),   Ã = blockdiag(A_i),  S̃ = blockdiag(S_j),

with π (hence λ_A, λ_S) from the whole factors' traces, which the blocks keep. The references here
are dense: the factors from plain forward/backward hooks (patches by F.unfold), cut into their
blocks by index masks, and the step solved with the explicit Kronecker product. Everything is float64.
"""
from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from gnfx.layouts.base import factor_blocks
from references import augment, cross_entropy

DTYPE = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


class Net(nn.Module):
    """A 3x3 conv (3 -> 8 channels, A of 3·9 + 1 = 28), a grouped 3x3 conv (2 groups of 4 -> 6
    channels, A of 4·9 + 1 = 37 per group), and a linear head 12·2·2 -> 13 (A of 49, S of 13)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 12, 3, padding=1, groups=2)
        self.head = nn.Linear(12 * 4, 13)

    def forward(self, x):
        h = torch.tanh(self.grouped(torch.tanh(self.conv(x))))
        return self.head(F.avg_pool2d(h, 2).flatten(1))


def make(seed=0):
    torch.manual_seed(seed)
    return Net().to(DTYPE)


def batch(seed=1, n=6):
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(n, 3, 4, 4, generator=g, dtype=DTYPE), torch.randint(0, 13, (n,), generator=g)


def compile_kfac(model, **hp):
    settings = dict(lr=0.5, momentum=0.0, weight_decay=0.0, kl_clip=0.0, damping=0.1,
                    stat_every=1, inv_every=1, stat_decay=0.0)
    return gnfx.compile(model, optimizer="kfac", **(settings | hp))


def step(c, x, y):
    cross_entropy(c(x), y).backward()
    c.step()
    c.zero_grad()


# ----------------------------------------------------------------------------- references


def hook_factors(model, x, y) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Whole A and S of every layer, per row group (stacked (groups, ., .)), from hooks: conv patches by
    F.unfold (channel-major, as weight.flatten(1)), A = mean ā āᵀ, S = M Σ g gᵀ over all positions."""
    model = copy.deepcopy(model)
    seen = {}
    for name, m in model.named_children():
        def hook(module, inputs, z, name=name):
            seen[name] = [inputs[0].detach(), None]
            z.register_hook(lambda g: seen[name].__setitem__(1, g.detach()))
        m.register_forward_hook(hook)
    out = model(x)
    cross_entropy(out, y).backward()
    factors = {}
    for name, m in model.named_children():
        inp, g = seen[name]
        if isinstance(m, nn.Conv2d):
            a = F.unfold(inp, 3, padding=1).transpose(1, 2).flatten(0, 1)  # (N L, C·9)
            g = g.flatten(2).transpose(1, 2).flatten(0, 1)  # (N L, C_out)
        else:
            a = inp
        groups = getattr(m, "groups", 1)
        a = augment(a.unflatten(-1, (groups, -1)), True).transpose(0, 1)  # (groups, rows, d_a)
        g = g.unflatten(-1, (groups, -1)).transpose(0, 1)
        factors[name] = (a.transpose(1, 2) @ a / a.shape[1], out.shape[0] * g.transpose(1, 2) @ g)
    return factors


def block_mask(d: int, m: int, b: int) -> torch.Tensor:
    """The d x d mask of the diagonal blocks [i·b, (i+1)·b)."""
    block = torch.arange(d) // b
    assert block.max() == m - 1
    return (block.unsqueeze(0) == block.unsqueeze(1)).to(DTYPE)


def as_blocks(F_whole: torch.Tensor, m: int, b: int) -> torch.Tensor:
    """The diagonal blocks (m, b, b) of a d x d matrix, zero-padded to m·b."""
    pad = m * b - F_whole.shape[-1]
    P = F.pad(F_whole, (0, pad, 0, pad))
    return torch.stack([P[i * b:(i + 1) * b, i * b:(i + 1) * b] for i in range(m)])


def from_blocks(blocks: torch.Tensor, d: int) -> torch.Tensor:
    """blockdiag(blocks) cut back to d x d (the padding dropped)."""
    return torch.block_diag(*blocks)[:d, :d]


def folded(layer, grad=False):
    w = layer.weight.grad if grad else layer.weight
    b = layer.bias.grad if grad else layer.bias
    return torch.cat([w.flatten(1), b.unsqueeze(1)], dim=1).detach().clone()


def damped_solve(A, S, G, damping):
    """unvec(((A + λ_A I) ⊗ (S + λ_S I))⁻¹ vec(G)), π from the traces of A and S (column-major vec)."""
    pi = math.sqrt((A.trace() / A.shape[0]) / (S.trace() / S.shape[0]))
    K = torch.kron(A + pi * math.sqrt(damping) * torch.eye(A.shape[0], dtype=DTYPE),
                   S + math.sqrt(damping) / pi * torch.eye(S.shape[0], dtype=DTYPE))
    return torch.linalg.solve(K, G.T.reshape(-1)).reshape(G.shape[1], G.shape[0]).T


# ----------------------------------------------------------------------------- the blocking rule


@pytest.mark.parametrize("max_factor", [1, 4, 5, 7, 20, 1024, 2048])
@pytest.mark.parametrize("unit", [1, 3, 9])
@pytest.mark.parametrize("extra", [0, 1])
def test_blocks_are_near_equal_whole_units_within_max_factor_covering_every_entry(max_factor, unit, extra):
    for d in [*range(1 + extra, 60), 1000, 1025, 2049, 4097, 4608, 4609, 50257]:
        m, b = factor_blocks(d, max_factor, unit, extra)
        if d - extra <= max_factor:
            assert (m, b) == (1, d)
            continue
        assert (m - 1) * b < d <= m * b  # every entry in a block, no block empty
        assert b <= max_factor + extra and m >= math.ceil(d / (max_factor + extra))
        if unit <= max_factor:
            assert b % unit == 0  # whole input channels
        assert factor_blocks(d, None, unit, extra) == (1, d)


def test_a_conv_of_512_channels_is_cut_into_channel_aligned_blocks_and_a_bias_rides_along():
    assert factor_blocks(512 * 9, 1024, 9) == (5, 927) and 927 == 103 * 9
    assert factor_blocks(512 * 9, 2048, 9) == (3, 1539) and 1539 == 171 * 9
    assert factor_blocks(512 * 9 + 1, 2048, 9, extra=1) == (3, 1539)  # the bias entry in the last block
    assert factor_blocks(1025, 1024, 1, extra=1) == (1, 1025)  # 1024 inputs and a bias: whole
    assert factor_blocks(2049, 1024, 1, extra=1) == (2, 1025)


# ----------------------------------------------------------------------------- statistics, step, diagnose


@pytest.mark.parametrize("max_factor", [5, 20])
def test_statistics_are_the_diagonal_blocks_of_the_hook_factors(max_factor):
    """max_factor 5 (the 9-entry channel patches do not fit: single entries) and 20 (two channels a block)."""
    model = make()
    x, y = batch()
    ref = hook_factors(model, x, y)
    c = compile_kfac(model, max_factor=max_factor)
    step(c, x, y)
    blocked = 0
    for block in c.layers:
        layout = gnfx.layouts.layout_of(block)
        for name in ("A", "S"):
            whole = ref[block.name][0 if name == "A" else 1]  # (groups, d, d)
            got = c.statistics(block.name)[name]
            blocks = layout.factor_blocking()[name]
            if blocks is None:
                assert whole.shape[-1] <= max_factor
                torch.testing.assert_close(got, whole.squeeze(0) if layout.groups == 1 else whole, **TOL)
                continue
            blocked += 1
            assert got.shape == (layout.groups, *blocks, blocks[1])
            torch.testing.assert_close(got, torch.stack([as_blocks(W, *blocks) for W in whole]), **TOL)
    assert blocked == 6 if max_factor == 5 else blocked == 3  # 20: the A of each layer


@pytest.mark.parametrize("root_method", ["cholesky", "eigh"])
def test_one_step_equals_the_kronecker_solve_with_blockdiag_factors(root_method):
    model = make()
    assert_one_step_is_the_blockdiag_kronecker_solve(model, compile_kfac(model, max_factor=5, root_method=root_method))


def assert_one_step_is_the_blockdiag_kronecker_solve(model, c):
    """One step of `c` (compiled from `model` by compile_kfac) on a batch, with every factor blocked, against
    the dense solve with the hook factors cut to the blocks of each block's layout (and the curvature
    product gnfx.diagnose reads against S̃ V Ã)."""
    x, y = batch()
    layers = dict(model.named_children())
    before = {n: folded(m) for n, m in layers.items()}
    cross_entropy(c(x), y).backward()
    grads = {n: folded(m, grad=True) for n, m in layers.items()}
    c.step()
    kfac = c.optimizer.curvature[0]
    for block in c.layers:
        layout = gnfx.layouts.layout_of(block)
        stats = c.statistics(block.name)
        blocks = layout.factor_blocking()
        assert blocks["A"] is not None and blocks["S"] is not None
        d_a, s = block.d_in + 1, block.d_out // layout.groups
        A = [from_blocks(F_j, d_a) for F_j in stats["A"]]  # per row group
        S = [from_blocks(F_j, s) for F_j in stats["S"]]
        # the blocks are what is left of the whole factor by the block mask (no entry moved)
        assert all(torch.equal(A_j, A_j * block_mask(d_a, *blocks["A"])) for A_j in A)
        G = grads[block.name].unflatten(0, (layout.groups, s))
        U = torch.cat([damped_solve(A_j, S_j, G_j, 0.1) for A_j, S_j, G_j in zip(A, S, G)])
        torch.testing.assert_close(folded(layers[block.name]) - before[block.name], -0.5 * U, **TOL)
        # the curvature gnfx.diagnose reads: (Ã ⊗ S̃) vec(V) = S̃ V Ã per row group
        group = next(g for g in kfac.groups if g.pieces[0].target.block is block)
        V = torch.randn(block.d_out, d_a, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
        expected = torch.cat([S_j @ V_j @ A_j for S_j, V_j, A_j in zip(S, V.unflatten(0, (layout.groups, s)), A)])
        torch.testing.assert_close(kfac.curvature_product(group, 0, V, c.optimizer.statistics), expected, **TOL)


# ----------------------------------------------------------------------------- the factor bound at few rows


class Wide(nn.Module):
    """Linear(300, 40): A of 301 entries (a bias), S of 40."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(300, 40)

    def forward(self, x):
        return self.fc(x)


def product_per_entry(bound: int) -> float:
    """The FLOPs of S̃⁻¹ G Ã⁻¹ per entry of Wide's 40 x 301 [∇W ∇b] with its factors blocked at `bound`:
    m blocks of b entries, the last one of the d - (m-1)·b left, a product (b x b)(b x c) costing 2b²c."""
    def squares(d, m, b):
        return sum(size ** 2 for size in [b] * (m - 1) + [d - (m - 1) * b])
    return 2 * (squares(40, *factor_blocks(40, bound)) * 301 + squares(301, *factor_blocks(301, bound, 1, 1)) * 40) / (40 * 301)


@pytest.mark.parametrize("rows,bound", [(1, 4), (2, 8), (8, 32), (256, 64)])
def test_k_fac_halves_a_blocks_bound_until_its_product_is_within_4x_the_layers_at_the_cost_rows(rows, bound):
    c = compile_kfac(Wide().to(DTYPE), max_factor=64, cost_rows=rows)
    block, = c.layers
    assert block.max_factor == bound
    # the layer's own forward and backward, 6 FLOPs per entry and row: within 4x of it at the bound, and
    # over it at twice the bound (or the bound is max_factor)
    assert product_per_entry(bound) <= 4 * 6 * rows
    assert bound == 64 or product_per_entry(2 * bound) > 4 * 6 * rows


def test_max_factor_0_keeps_every_factor_whole_at_any_rows():
    block, = compile_kfac(Wide().to(DTYPE), max_factor=0, cost_rows=1).layers
    assert block.max_factor is None and block.shapes["A"] == (301, 301) and block.shapes["S"] == (40, 40)


def test_the_block_table_gives_the_bounded_blocks_and_why():
    few = repr(compile_kfac(Wide().to(DTYPE), max_factor=64, cost_rows=2).layers)
    assert "A(38 blocks of 8) S(5 blocks of 8) W40x300" in few
    asked = product_per_entry(64)
    assert (f"optimizer='kfac'; factors in blocks of at most 8 (max_factor=64: S⁻¹GA⁻¹ {asked:.0f} FLOPs per entry, "
            f"over 4x the layer's forward and backward at 2 rows (cost_rows per call site), 12)") in few
    many = repr(compile_kfac(Wide().to(DTYPE), max_factor=64, cost_rows=256).layers)
    assert "A(5 blocks of 61) S40x40 W40x300" in many and "factors in blocks" not in many


def first_steps_warnings(model, rows, steps=2, features=2048, **hparams):
    """The warnings of `steps` statistic steps of K-FAC on batches of `rows` rows, one list per step
    (`model` a compiled model, or a module compiled here with `hparams`)."""
    c = model if isinstance(model, gnfx.CompiledModel) else gnfx.compile(model, "kfac", lr=1e-3, stat_every=1,
                                                                         **hparams)
    found = []
    for _ in range(steps):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            F.cross_entropy(c(torch.randn(rows, features)), torch.randint(10, (rows,))).backward()
            c.step()
            c.zero_grad()
        found.append([str(w.message) for w in caught])
    return found


def wide_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))


def test_with_cost_rows_given_the_first_statistic_forward_with_far_fewer_rows_names_the_cost_rows_to_pass():
    """A plan at a given cost_rows (256) is the user's: at 4 rows a step the 2048x2048 layer's blocks of 1024
    cost ~170x its own products, blocks of the bound the plan picks at cost_rows=4 ~3x. The first statistic
    forward warns once, naming that bound and cost_rows=4, and keeps the plan; the head (2048 -> 10), whose
    smaller blocks would save under REBOUND_FLOPS, is not named."""
    expected = gnfx.compile(wide_mlp(), "kfac", lr=1e-3, cost_rows=4).layers["0"].max_factor
    assert expected < 1024
    c = gnfx.compile(wide_mlp(), "kfac", lr=1e-3, stat_every=1, cost_rows=256)
    first, second = first_steps_warnings(c, rows=4)
    message, = first
    assert "Pass cost_rows=4 to gnfx.compile" in message and "cost_rows was given, so the plan is kept" in message
    assert f"0: 4 rows, blocks of at most 1024 planned, {expected} at these rows" in message and "2:" not in message
    assert second == []
    assert c.layers["0"].max_factor == 1024


def test_at_the_defaults_a_wide_block_at_few_rows_is_bounded_at_the_rows_it_saw():
    """Without cost_rows, the first statistic forward re-plans the 2048x2048 layer at the 4 rows it saw: the
    bound gnfx.compile(..., cost_rows=4) gives it, with the rows in the block table, and no warning. The head
    (2048 -> 10), whose smaller blocks would save under REBOUND_FLOPS, keeps the bound of the plan at
    cost_rows=256 (cost_rows=4 would block it too)."""
    at_4 = gnfx.compile(wide_mlp(), "kfac", lr=1e-3, cost_rows=4).layers
    planned = gnfx.compile(wide_mlp(), "kfac", lr=1e-3).layers
    assert at_4["2"].max_factor < planned["2"].max_factor
    c = gnfx.compile(wide_mlp(), "kfac", lr=1e-3, stat_every=1)
    assert c.layers["0"].max_factor == 1024  # before any batch: the plan at cost_rows=256
    assert first_steps_warnings(c, rows=4) == [[], []]
    assert c.layers["0"].max_factor == at_4["0"].max_factor and c.layers["0"].shapes == at_4["0"].shapes
    assert c.layers["2"].max_factor == planned["2"].max_factor
    assert (f"factors in blocks of at most {at_4['0'].max_factor} (max_factor=1024: ") in repr(c.layers)
    assert "at 4 rows (4 per call site, seen by the first statistic forward)" in repr(c.layers)
    # the statistics and the preconditioner are laid out in the new blocks
    S = c.statistics("0")["S"]
    assert S.shape == at_4["0"].shapes["S"]


def test_at_the_defaults_a_wide_convolution_is_bounded_at_its_output_positions():
    """A conv's rows are its examples x output positions: one 2x2 example padded to 2x2 outputs is 4 rows,
    at which the 512 -> 512 3x3 conv (A of 4609) is bounded as at cost_rows=4."""
    def conv():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(512, 512, 3, padding=1), nn.Flatten(), nn.Linear(2048, 3))
    at_4 = gnfx.compile(conv(), "kfac", lr=1e-3, cost_rows=4).layers["0"]
    c = gnfx.compile(conv(), "kfac", lr=1e-3)
    assert c.layers["0"].max_factor > at_4.max_factor
    F.cross_entropy(c(torch.randn(1, 512, 2, 2)), torch.tensor([1])).backward()
    c.step()
    assert c.layers["0"].max_factor == at_4.max_factor


def reloaded(c, fresh):
    """`fresh` (a compiled model) with the model and optimizer state of `c`, saved and loaded through bytes."""
    buffer = io.BytesIO()
    torch.save({"model": c.state_dict(), "optimizer": c.optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    fresh.load_state_dict(saved["model"])
    fresh.optimizer.load_state_dict(saved["optimizer"])
    return fresh


def wide():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2048, 1024))


def wide_trained(steps=3, checkpoint_at=None, **hparams):
    """Parameters of `wide` after `steps` K-FAC steps on 4 rows (statistics and refresh every step),
    optionally saved and loaded into a fresh compiled model before step `checkpoint_at`."""
    def compiled():
        return compile_kfac(wide().to(DTYPE), stat_decay=0.5, **hparams)
    c = compiled()
    g = torch.Generator().manual_seed(3)
    for i in range(steps):
        if i == checkpoint_at:
            c = reloaded(c, compiled())
            bound = c.layers["0"].max_factor  # the checkpoint's bound, before any forward
        x, y = torch.randn(4, 2048, generator=g, dtype=DTYPE), torch.randint(0, 1024, (4,), generator=g)
        step(c, x, y)
    if checkpoint_at is not None:
        assert bound == c.layers["0"].max_factor
    return c, {k: v.detach().clone() for k, v in c.state_dict().items()}


def test_at_the_defaults_training_is_exactly_that_at_cost_rows_of_the_rows_seen():
    """From its first step (the re-plan precedes every statistic), and across a checkpoint."""
    c, default = wide_trained()
    at_4, given = wide_trained(cost_rows=4)
    assert c.layers["0"].max_factor == at_4.layers["0"].max_factor < 1024
    assert all(torch.equal(default[k], given[k]) for k in default)
    _, resumed = wide_trained(checkpoint_at=2)
    assert all(torch.equal(default[k], resumed[k]) for k in default)


def test_a_checkpoint_bounded_at_its_rows_is_refused_where_cost_rows_was_given():
    c, _ = wide_trained(steps=1)
    other = compile_kfac(wide().to(DTYPE), cost_rows=256)
    with pytest.raises(gnfx.ConfigError, match="shape"):
        other.optimizer.load_state_dict(c.optimizer.state_dict())
    assert other.layers["0"].max_factor == 1024


@pytest.mark.parametrize("rows,hparams", [(4, dict(cost_rows=4)), (512, {})])
def test_no_rows_warning_and_no_re_plan_where_the_plan_had_the_rows_right(rows, hparams):
    c = gnfx.compile(wide_mlp(), "kfac", lr=1e-3, stat_every=1, **hparams)
    planned = [(b.max_factor, c.layers.plan.entries[b.name].why) for b in c.layers]
    assert first_steps_warnings(c, rows, steps=1) == [[]]
    assert [(b.max_factor, c.layers.plan.entries[b.name].why) for b in c.layers] == planned


def test_no_rows_warning_where_smaller_blocks_would_save_little():
    """Wide (300 -> 40) at 2 rows: its bound at 2 rows is 8, not 64, but the product saves ~10⁶ FLOPs: at
    the defaults it keeps the bound of the plan at cost_rows=256, and with cost_rows=256 given nothing warns."""
    assert compile_kfac(Wide().to(DTYPE), max_factor=64, cost_rows=2).layers["fc"].max_factor == 8
    for hparams in ({}, dict(cost_rows=256)):
        c = gnfx.compile(nn.Sequential(Wide().fc), "kfac", lr=1e-3, stat_every=1, max_factor=64, **hparams)
        assert first_steps_warnings(c, rows=2, steps=1, features=300) == [[]]
        assert c.layers["0"].max_factor == 64


def test_one_step_with_factors_bounded_at_few_rows_equals_the_kronecker_solve_with_their_blocks():
    model = make()
    c = compile_kfac(model, cost_rows=1)  # max_factor 1024: every factor whole but for the bound
    assert all(b.max_factor < 1024 for b in c.layers)
    assert_one_step_is_the_blockdiag_kronecker_solve(model, c)


def trained(max_factor, steps=3, checkpoint_at=None):
    """Parameters after `steps` steps on two alternating batches (statistics every step, refresh every
    second), optionally saving and loading the model and optimizer into a fresh compiled model."""
    c = compile_kfac(make(), max_factor=max_factor, inv_every=2, stat_decay=0.5, momentum=0.5)
    data = [batch(1), batch(2)]
    for i in range(steps):
        if i == checkpoint_at:
            c = reloaded(c, compile_kfac(make(seed=5), max_factor=max_factor, inv_every=2, stat_decay=0.5,
                                         momentum=0.5))
        step(c, *data[i % 2])
    return {k: v.detach().clone() for k, v in c.state_dict().items()}


def test_max_factor_at_least_every_dimension_is_exactly_k_fac_with_whole_factors():
    whole = trained(0)
    # 48: the largest factor, the head's A of 48 inputs and a bias
    assert all(torch.equal(whole[k], v) for k, v in trained(48).items())
    blocked = trained(47)
    assert any(not torch.equal(whole[k], v) for k, v in blocked.items())


def test_checkpoint_round_trip_continues_exactly():
    straight = trained(5, steps=4)
    resumed = trained(5, steps=4, checkpoint_at=2)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_checkpoint_of_other_blocking_is_refused():
    c = compile_kfac(make(), max_factor=5)
    step(c, *batch())
    other = compile_kfac(make(), max_factor=0)
    step(other, *batch())
    with pytest.raises(gnfx.ConfigError, match="shape"):
        other.optimizer.load_state_dict(c.optimizer.state_dict())


def test_the_block_table_and_cost_report_the_blocks():
    c = compile_kfac(make(), max_factor=20)
    step(c, *batch())
    table = repr(c.layers)
    assert "A(2 blocks of 18)" in table  # 3 channels of 9 and the bias: 2 + 1 channels a block
    assert "A(2x3 blocks of 18)" in table  # per group of 4 channels and the bias: 2 + 2 + 0 channels
    assert "A(3 blocks of 17)" in table and "S13x13" in table
    # the state the cost model counts is what is allocated: the blocked inverses
    kfac = c.optimizer.curvature[0]
    for group in kfac.groups:
        block = group.pieces[0].target.block
        state = kfac.group_state(group)
        assert c.cost()[block.name].memory_bytes >= 8 * (state["A_inv"].numel() + state["S_inv"].numel())
        assert tuple(state["A_inv"].shape[1:]) == gnfx.layouts.layout_of(block).factor_shapes()["A"]


def test_ekfac_refuses_max_factor():
    with pytest.raises(gnfx.ConfigError, match="max_factor"):
        gnfx.compile(make(), optimizer="ekfac", max_factor=5)
