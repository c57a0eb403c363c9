"""The cost model (gnfx.cost) against what the optimizer really allocates and computes.

Memory: after two training steps, the formula of every block and loose parameter, evaluated at its
sizes, equals the entries (per tensor name) and bytes of the optimizer state and of the statistics
(accumulators and averages), exactly, for every preconditioner on every layer kind (linear, conv,
embedding, a tied weight, a bias-free layer, a loose tensor of order 3), with blocking and rank
k > 1. FLOPs: the matrix products of a step, counted by torch's FlopCounterMode, equal the update
formula with its elementwise terms set to zero. Symbolically the formulas reproduce the seed's
complexity table.
"""
from __future__ import annotations

import collections

import pytest
import sympy as sp
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import gnfx
from gnfx import cost
from gnfx.transforms import Graft, HeavyBall, KLClip, Step
from gnfx.statistics import STATISTICS

S = cost.SYMBOLS
d_in, d_out = S["d_in"], S["d_out"]


class Mixed(nn.Module):
    """An embedding, a conv over the sequence, a linear layer applied twice (tied), a LayerNorm,
    an elementwise gain of order 3 (a loose tensor) and a bias-free head. Output (N, T, classes)."""

    def __init__(self, vocab=11, d=6, width=5, classes=7, length=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.conv = nn.Conv1d(d, width, 3, padding=1)
        self.fc = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.gain = nn.Parameter(1 + 0.1 * torch.randn(1, length, width))
        self.head = nn.Linear(width, classes, bias=False)

    def forward(self, idx):
        h = self.conv(self.emb(idx).transpose(1, 2)).transpose(1, 2)
        h = self.fc(torch.tanh(self.fc(torch.relu(h))))
        return self.head(self.norm(h) * self.gain)


def train(optimizer, steps=2, dtype=torch.float64, **hparams):
    torch.manual_seed(0)
    model = Mixed().to(dtype)
    c = gnfx.compile(model, optimizer=optimizer, **hparams)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, 11, (3, 4), generator=g)
        F.cross_entropy(c(idx).flatten(0, 1).float(), (idx % 7).flatten()).backward()
        c.step()
        c.zero_grad()
    return c


def allocated(c):
    """{block or parameter: {tensor name: (entries, bytes)}}: the optimizer state (a group's stacked
    tensors shared out over its pieces) and the statistics (accumulator plus average)."""
    opt = c.optimizer
    out = collections.defaultdict(lambda: collections.defaultdict(lambda: [0, 0]))
    owner = {n: b.name for b in c.layers for n in b.params}
    for pre in opt.curvature:
        for group in pre.groups:
            for key, v in pre.group_state(group).items():
                per_piece = v.numel() // len(group.pieces)
                for piece in group.pieces:
                    slot = out[piece.target.name][key]
                    slot[0] += per_piece
                    slot[1] += per_piece * v.element_size()
    for pre in opt.elementwise:
        for name in [n for b in pre.blocks for n in b.params] + pre.param_names:
            for key, v in opt.state_of(name).items():
                if torch.is_tensor(v):
                    slot = out[owner.get(name, name)][key]
                    slot[0] += v.numel()
                    slot[1] += v.numel() * v.element_size()
    for name, stats in opt.statistics.blocks.items():
        for key, v in [*accumulators(stats), *stats.values.items()]:
            slot = out[name]["stat." + key]
            slot[0] += v.numel()
            slot[1] += v.numel() * v.element_size()
    return out


def accumulators(stats):
    """(statistic, tensor) for every tensor a BlockStatistics holds besides its averages: `_A`,
    `_A_sum` (both of "A"), `_S`, ... — an attribute of no statistic fails the test."""
    for attr, v in vars(stats).items():
        if torch.is_tensor(v):
            yield next(k for k in STATISTICS if attr == "_" + k or attr.startswith(f"_{k}_")), v


def every_tensor_bytes(c) -> int:
    """Bytes of every tensor in the optimizer state and the statistics, counted independently."""
    opt = c.optimizer
    tensors = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    for stats in opt.statistics.blocks.values():
        tensors += [v for _, v in accumulators(stats)] + list(stats.values.values())
    return sum(v.numel() * v.element_size() for v in tensors)


CASES = [
    ("diag", {}),
    ({"fc": ("diag", {"source": "fisher"}), "head": ("diag", {"source": "fisher"}), "*": "diag"}, {}),
    ("diag", {"statistics": ("A", "S", "eigen_diag")}),
    ("kfac", {}),
    ("kfac", {"kfac_approx": "reduce"}),
    ("kfac", {"max_factor": 4}),  # every factor above 4 entries blocked (the conv's by its 3-entry channels)
    ("kfac", {"max_factor": 4, "kfac_approx": "reduce"}),
    ("kfac", {"cost_rows": 1}),  # each block's factors in blocks below max_factor (K-FAC's factor_bound)
    ("ekfac", {}),
    ("ekfac", {"damping_kind": "factored"}),  # with the factors' eigenvalues, an embedding's diagonal A included
    ("shampoo", {}),
    ("shampoo", {"max_block": 4}),
    ("shampoo", {"max_block": 4, "refresh_tolerance": 1e-3}),  # with the drift bounds and refresh steps
    ("shampoo", {"max_block": 4, "diagonal_above": 6}),  # diagonal factors over the dimensions above 6
    ("shampoo", {"max_block": 4, "diagonal_above": 6, "refresh_tolerance": 1e-3}),
    ("soap", {"max_block": 4}),
    ("soap", {"max_block": 4, "diagonal_above": 6}),  # no factor or basis along the dimensions above 6
    ("rank1", {}),
    ("rank1", {"rank": 3}),
    ({"conv": ("shampoo", {"max_block": 3}), "emb": "ekfac", "fc": ("rank1", {"rank": 2}), "*": "kfac"}, {}),
    # chains given by the user: their stages' state, not the default chain's
    ("kfac", {"chain": [Graft("adam"), HeavyBall(0.9), Step()]}),
    ("shampoo", {"max_block": 4, "chain": [KLClip(1e-3), Step()]}),
]


@pytest.mark.parametrize("optimizer,hparams", CASES, ids=lambda x: str(x)[:40])
def test_memory_formulas_equal_the_allocated_state_and_statistics_exactly(optimizer, hparams):
    c = train(optimizer, **hparams)
    report = c.cost()
    real = allocated(c)
    assert {r.name for r in report.rows} == set(real) | {f.param for f in c.layers.fallbacks}
    for row in report.rows:
        f = report.formulas[row.name]
        at = report.values[row.name]
        # a formula of 0 entries is a tensor not kept (SOAP's basis along an unrotated mode: its formula
        # holds the rule's above(d, diagonal_above), known only with the sizes)
        expected = {k: int(e.subs(at)) for k, e in f["state"].items() if int(e.subs(at)) or k in real[row.name]}
        expected.update({"stat." + k: int(e.subs(at)) for k, e in f["tap_statistics"].items()})
        assert {k: v[0] for k, v in real[row.name].items()} == expected, row.name
        assert sum(v[1] for v in real[row.name].values()) == row.memory_bytes == int(f["memory"].subs(at)), row.name
        assert int(f["elements"].subs(at)) == sum(expected.values())
        # the symbolic formulas give the numbers of the table
        for key, value in (("statistics", row.statistics_flops), ("refresh", row.refresh_flops),
                           ("update", row.update_flops), ("flops", row.flops)):
            assert float(f[key].subs(at)) == pytest.approx(value, rel=1e-12), (row.name, key)
    assert report.total_memory_bytes == every_tensor_bytes(c)


def test_bfloat16_parameters_keep_float32_factors_and_float32_moments():
    c = train({"fc": "kfac", "*": "diag"}, dtype=torch.bfloat16)
    report = c.cost()
    assert report.total_memory_bytes == every_tensor_bytes(c)
    fc, head = report["fc"], report["head"]
    assert head.memory_bytes == 2 * 2 * head.param_bytes  # AdamW's moments, float32 for bfloat16 parameters
    n = 5 * 6
    # inverses, averages of A and S, their accumulators (A's: Σ a aᵀ and Σ a), momentum; failures
    assert fc.memory_bytes == 4 * (2 * (6 * 6 + 5 * 5) + (5 * 5 + 5 + 5 * 5) + n) + 8


ELEMENTWISE = ("ADAMW", "ADAM_ROTATED", "DIAGONAL_A", "DAMPED_DIVIDE", "FACTORED_DAMPING", "SOLVE", "DIAGONAL_SCALE")


@pytest.mark.parametrize("optimizer,hparams", [
    ("kfac", {}), ("kfac", {"max_factor": 4}), ("ekfac", {}), ("shampoo", {"max_block": 4}), ("soap", {"max_block": 4}),
    ("shampoo", {"max_block": 4, "diagonal_above": 6}), ("soap", {"max_block": 4, "diagonal_above": 6}),
    ("rank1", {"rank": 3}), ("diag", {}),
])
def test_matrix_products_of_a_step_are_the_update_formula_without_elementwise_terms(optimizer, hparams, monkeypatch):
    quiet = {"stat_every": 1000, "inv_every": 1000, "precondition_frequency": 1000,
             "start_preconditioning_step": 0}
    hp = {k: v for k, v in quiet.items() if k in gnfx.COMMON or k in gnfx.REGISTRY[optimizer].HPARAMS}
    c = train(optimizer, **hp, **hparams)  # steps 0 and 1: statistics and refreshes are done
    idx = torch.randint(0, 11, (3, 4), generator=torch.Generator().manual_seed(2))
    F.cross_entropy(c(idx).flatten(0, 1), (idx % 7).flatten()).backward()
    with FlopCounterMode(display=False) as counter:
        c.step()  # step 2: no statistics, no refresh
    for name in ELEMENTWISE:
        monkeypatch.setattr(cost, name, 0)
    for stage in (Graft, KLClip, HeavyBall, Step):  # the update chain's elementwise stages
        monkeypatch.setattr(stage, "flops_per_entry", lambda self: 0)
    assert counter.get_total_flops() == sum(r.update_flops for r in c.cost().rows)


WHOLE = {"max_factor": 0}  # K-FAC with every factor whole: the seed's complexity table


def symbolic(name, kind="linear", bias=True, needs=frozenset(), at=None, **hp):
    hp = {**{k: v.default for k, v in gnfx.REGISTRY[name].HPARAMS.items()}, **hp}
    at = {**S, **(at or {})}
    return cost.formulas(name, hp, cost.block_geometry(kind, bias, at), needs, "expand", at)


def entries(f, *names):
    return sp.expand(sum(f.state[n][0] for n in names))


def test_formulas_reproduce_the_seed_complexity_table():
    d_a = d_in + 1
    kfac = symbolic("kfac", needs=frozenset({"A", "S"}), at=WHOLE)
    assert entries(kfac, "A_inv", "S_inv") == sp.expand(d_a ** 2 + d_out ** 2)
    # averages d_a² and d_out², accumulators Σ a aᵀ (d_in²), Σ a (d_in) and Σ g gᵀ (d_out²)
    assert sp.expand(kfac.statistics["A"][0] + kfac.statistics["S"][0]) == sp.expand(
        d_a ** 2 + d_in ** 2 + d_in + 2 * d_out ** 2)
    assert entries(symbolic("kfac", kind="embedding", bias=False, at=WHOLE), "A_inv") == d_in  # a diagonal A
    # Shampoo: one factor (and its root) per dimension; unblocked when max_block and diagonal_above >= both dims
    shampoo = symbolic("shampoo")
    unblocked = {S["max_block"]: d_in + d_out + 1, S["diagonal_above"]: d_in + d_out + 1}
    assert sp.expand(entries(shampoo, "factor0", "factor1").subs(unblocked)) == sp.expand(d_out ** 2 + d_a ** 2)
    # blocked: 10 x 7 with max_block 4 is cut into 3 x 2 blocks of sizes (3, 4, 3) x (4, 3)
    sizes = {d_out: 10, d_in: 6, S["max_block"]: 4, S["diagonal_above"]: 10}
    assert entries(shampoo, "factor0").subs(sizes) == 2 * (3 ** 2 + 4 ** 2 + 3 ** 2)
    assert entries(shampoo, "factor1").subs(sizes) == 3 * (4 ** 2 + 3 ** 2)
    # the 10 rows above diagonal_above 8: kept whole, a diagonal of 10 entries per block (4, 3) of the other side
    sizes[S["diagonal_above"]] = 8
    assert entries(shampoo, "factor0").subs(sizes) == 2 * 10
    assert entries(shampoo, "factor1").subs(sizes) == 1 * (4 ** 2 + 3 ** 2)
    assert shampoo.state["failures"][0].subs(sizes) == 2
    # rank-k and diag: O(n)
    n = d_out * d_a
    rank = symbolic("rank1")
    # U (k n), its diagonal D, the graft's second moment and the momentum (n each); s, t, counters
    assert sp.expand(rank.elements.subs(sp.Min(S["k"], n), S["k"])) == sp.expand((S["k"] + 3) * n + S["k"] + 3)
    assert sp.expand(symbolic("diag").elements) == sp.expand(2 * n)
    # K-FAC: statistics O(B R d²), refresh O(d³), update O(n d)
    assert sp.degree(sp.expand(kfac.refresh_flops), d_out) == 3
    assert sp.expand(kfac.update_flops).coeff(d_out ** 2) == sp.expand(2 * d_a)
    assert sp.expand(kfac.statistics_flops).coeff(S["B"] * S["R"] * d_out ** 2) == 2


def test_refresh_flops_follow_the_root_method():
    """K-FAC's refresh per factor: Cholesky d³ (+ d² for the damping), eigh 11d³, Newton an
    estimate of NEWTON_ITERATIONS iterations of two products (r = 1); Shampoo's "paper" root of a
    matrix (r = 4) takes four products per iteration."""
    d_a = d_in + 1
    for method, coefficient in (("cholesky", 1), ("eigh", 11), ("newton", 4 * cost.NEWTON_ITERATIONS)):
        kfac = symbolic("kfac", needs=frozenset({"A", "S"}), at=WHOLE, root_method=method)
        expected = coefficient * (d_a ** 3 + d_out ** 3) + d_a ** 2 + d_out ** 2
        assert sp.expand(kfac.refresh_flops - expected) == 0, method
    unblocked = {S["max_block"]: d_in + d_out + 1, S["diagonal_above"]: d_in + d_out + 1}
    for method, coefficient in (("eigh", 11), ("newton", 8 * cost.NEWTON_ITERATIONS)):
        shampoo = symbolic("shampoo", root_method=method)
        expected = coefficient * (d_a ** 3 + d_out ** 3) + d_a ** 2 + d_out ** 2
        assert sp.expand(shampoo.refresh_flops.subs(unblocked) - expected) == 0, method


def test_cost_table_totals_and_formulas_for_larger_sizes():
    c = train("kfac")
    report = c.cost(batch_size=32, positions=4)
    text = str(report)
    assert all(name in text for name in ("emb", "conv", "fc", "head", "gain", "total", "AdamW"))
    assert float(report.total_memory_bytes) == sum(r.memory_bytes for r in report.rows)
    assert report.param_count == sum(p.numel() for p in c.parameters())
    assert report.adamw_flops == 10 * report.param_count and report.adamw_memory_bytes == 2 * report.param_bytes
    assert report.flops_ratio == pytest.approx(report.total_flops / report.adamw_flops)
    # the tied fc is applied twice: R = 2 x 4 positions per example
    assert report.values["fc"][S["R"]] == 8 and report.values["fc"][S["B"]] == 32
    # substituting larger sizes: a 4096 x 4096 linear layer with bias under K-FAC, float64
    # with every factor whole (max_factor=0): inverses, averages, A's accumulator Σ a aᵀ and Σ a, S's, momentum
    memory = report.formulas["fc"]["memory"].subs({**report.values["fc"], d_in: 4096, d_out: 4096, S["max_factor"]: 0})
    assert memory == 8 * (2 * (4097 ** 2 + 4096 ** 2) + 4096 * 4097 + 4096 ** 2 + 4096 * 4097) + 8
    # with max_factor=1024: A (4096 inputs and the bias) as 4 blocks of 1025, S (4096) as 4 blocks of 1024, each
    # kept as an inverse, an average and an accumulator of its blocks
    memory = report.formulas["fc"]["memory"].subs({**report.values["fc"], d_in: 4096, d_out: 4096,
                                                   S["max_factor"]: 1024})
    assert memory == 8 * (3 * (4 * 1025 ** 2 + 4 * 1024 ** 2) + 4096 * 4097) + 8


def test_diag_costs_exactly_an_adamw_step():
    report = train("diag").cost()
    assert report.memory_ratio == 2.0 and report.flops_ratio == 1.0
    assert all(r.memory_ratio == 2.0 and r.flops_ratio == 1.0 for r in report.rows)


def test_a_given_chain_replaces_the_default_chains_state_and_flops():
    """K-FAC's default chain is [KLClip, HeavyBall, Step]; with [Graft("adam"), HeavyBall, Step] the
    cost holds the graft's v (n) and t (one per piece) and 7 + 5 FLOPs per entry of grafting (the
    grafted direction, the norms and the rescaling) instead of KL clipping's 4."""
    n = d_out * (d_in + 1)
    default = symbolic("kfac", at=WHOLE)
    grafted = symbolic("kfac", at=WHOLE, chain=[Graft("adam"), HeavyBall(0.9), Step()])
    assert set(grafted.state) - set(default.state) == {"graft_v", "graft_t"}
    assert grafted.state["graft_v"][0] == n and grafted.state["graft_t"][0] == 1
    assert sp.expand(grafted.update_flops - default.update_flops) == sp.expand((7 + 5 - 4) * n)
    assert sp.expand(default.update_flops - symbolic("kfac", at=WHOLE, kl_clip=0).update_flops) == sp.expand(4 * n)
