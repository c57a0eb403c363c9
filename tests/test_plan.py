"""Per-layer policies and optimizer="auto" (gnfx.plan).

A policy maps glob patterns on block names to preconditioners (first match wins, unmatched blocks
get "diag"); per-pattern hyperparameters make separate instances that step exactly like separate
single-preconditioner runs. "auto" picks, per block, the most faithful preconditioner within the
memory and compute budgets: the cost of the chosen plan (gnfx.cost) respects them on models of
several sizes, and a larger budget never gives a less faithful choice.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from gnfx.layer_table import LayerTable
from gnfx.plan import Policy, make_plan
from models import CNN, GPT, SquashedAffine

DTYPE = torch.float64


class MLP(nn.Module):
    def __init__(self, widths=(5, 4, 4, 3)):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(widths, widths[1:]))
        self.to(DTYPE)

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == 0 else layer(torch.tanh(x))
        return x


class Loose(nn.Module):
    """A linear layer, then parameters used as no layer: a matrix and a vector squashed by tanh
    and sigmoid (loose parameters, which no block claims)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(5, 4)
        self.mix = nn.Parameter(torch.randn(4, 3))
        self.gate = SquashedAffine(3)
        self.to(DTYPE)

    def forward(self, x):
        return self.gate(torch.tanh(self.fc(x)) @ torch.tanh(self.mix))


def one_step(c, d_in=5, classes=3):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, d_in, generator=g, dtype=DTYPE), torch.randint(0, classes, (8,), generator=g)
    F.cross_entropy(c(x), y).backward()
    c.step()
    c.zero_grad()


# ----------------------------------------------------------------------------- policies


def test_first_matching_pattern_wins_and_unmatched_blocks_get_diag():
    c = gnfx.compile(GPT(), optimizer={"*.attn.*": "shampoo", "blocks.0.*": "kfac", "*.fc": "rank1"})
    chosen = {b.name: b.preconditioner for b in c.layers}
    assert chosen["blocks.0.attn.qkv"] == chosen["blocks.2.attn.mha.in_proj"] == "shampoo"
    assert chosen["blocks.0.fc"] == chosen["blocks.0.fc_out"] == "kfac"
    assert chosen["blocks.1.fc"] == "rank1"
    assert chosen["blocks.1.fc_out"] == chosen["emb"] == "diag"
    entries = c.layers.plan.entries
    assert entries["blocks.0.fc"].reason == "pattern 'blocks.0.*'"
    assert entries["emb"].reason == "no pattern matches it: diag"
    row = next(line for line in str(c).splitlines() if line.startswith("blocks.1.fc "))
    assert row.split()[5] == "rank1" and row.rstrip().endswith("pattern '*.fc'")
    # a loose parameter matched by a pattern whose preconditioner does not serve it gets diag
    loose = gnfx.compile(Loose(), optimizer={"*": "kfac"})
    assert {f.param: f.preconditioner for f in loose.layers.fallbacks} == {
        "mix": "diag", "gate.weight": "diag", "gate.bias": "diag"}


def test_a_policy_of_one_name_is_that_name():
    a = gnfx.compile(Loose(), optimizer={"*": "shampoo"})
    b = gnfx.compile(Loose(), optimizer="shampoo")
    assert [(f.param, f.preconditioner) for f in a.layers.fallbacks] == [
        (f.param, f.preconditioner) for f in b.layers.fallbacks]
    assert next(f for f in a.layers.fallbacks if f.param == "mix").preconditioner == "shampoo"  # a loose matrix
    assert a.update_code == b.update_code
    gpt_a, gpt_b = gnfx.compile(GPT(), optimizer={"*": "shampoo"}), gnfx.compile(GPT(), optimizer="shampoo")
    assert gpt_a.update_code == gpt_b.update_code


def test_the_plan_is_a_value_and_leaves_the_table_as_analyzed():
    """make_plan returns the choices (`plan.table`: copies of the blocks and fallbacks with them) and
    does not write them into the table it plans, which can be planned again with another policy."""
    c = gnfx.compile(GPT(), optimizer="kfac", max_factor=16)
    params = dict(c.named_parameters())
    analyzed = LayerTable(
        [dataclasses.replace(b, preconditioner=None, max_factor=None) for b in c.layers],
        [dataclasses.replace(f, preconditioner=None) for f in c.layers.fallbacks],
        c.layers.leaves, c.layers.form)
    before = (copy.deepcopy(analyzed.blocks), copy.deepcopy(analyzed.fallbacks))
    plans = {name: make_plan(analyzed, Policy(name, {}), {"max_factor": 16}, c._settings, params)
             for name in ("shampoo", "kfac")}
    assert (analyzed.blocks, analyzed.fallbacks) == before and analyzed.plan is None
    assert {b.preconditioner for b in plans["shampoo"].table} == {"shampoo"}
    assert [(b.name, b.preconditioner, b.max_factor) for b in plans["kfac"].table] == [
        (b.name, b.preconditioner, b.max_factor) for b in c.layers]
    assert {b.max_factor for b in plans["kfac"].table} == {16}
    assert plans["kfac"].table.plan is plans["kfac"]


def test_per_pattern_hyperparameters_step_like_separate_runs():
    """layers.0 with damping 0.1, the others with 1e-3: two K-FAC instances, whose first step
    equals that of a plain K-FAC run with the same damping (KL clipping, which couples the blocks
    of one instance, off)."""
    policy = {"layers.0": ("kfac", {"damping": 0.1}), "layers.1": ("kfac", {"damping": 1e-3}), "*": "kfac"}
    c = gnfx.compile(MLP(), optimizer=policy, kl_clip=0.0)
    assert [(p.name, p.hp["damping"]) for p in c.optimizer.curvature] == [("kfac", 0.1), ("kfac_v2", 1e-3)]
    assert [b.name for b in c.optimizer.curvature[1].blocks] == ["layers.1", "layers.2"]
    keys = [g.key for p in c.optimizer.curvature for g in p.groups]
    assert len(keys) == len(set(keys)) and any(k.startswith("kfac_v2_") for k in keys)
    assert "kfac_v2.direction(" in c.update_code and "kfac.direction(" in c.update_code
    one_step(c)
    for damping, names in ((0.1, ["layers.0"]), (1e-3, ["layers.1", "layers.2"])):
        plain = gnfx.compile(MLP(), optimizer="kfac", kl_clip=0.0, damping=damping)
        one_step(plain)
        mine, theirs = dict(c.named_parameters()), dict(plain.named_parameters())
        for name in (p for block in names for p in c.layers[block].params):
            torch.testing.assert_close(mine[name], theirs[name], rtol=1e-12, atol=1e-14)


def test_several_instances_resume_from_a_checkpoint():
    policy = {"layers.0": ("shampoo", {"max_block": 2}), "*": ("shampoo", {"damping": 1e-4})}
    c = gnfx.compile(MLP(), optimizer=policy, start_preconditioning_step=0)
    one_step(c)
    saved = {k: v.clone() for k, v in c.state_dict().items()}, c.optimizer.state_dict()
    resumed = gnfx.compile(MLP(), optimizer=policy, start_preconditioning_step=0)
    resumed.load_state_dict(saved[0])
    resumed.optimizer.load_state_dict(saved[1])
    one_step(c)
    one_step(resumed)
    for (_, p), (_, q) in zip(c.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q)


def test_keywords_reach_every_preconditioner_that_declares_them_with_its_own_defaults():
    c = gnfx.compile(MLP(), optimizer={"layers.0": "shampoo", "*": "kfac"})
    assert {p.name: p.hp["damping"] for p in c.optimizer.curvature} == {"shampoo": 1e-6, "kfac": 1e-3}
    c = gnfx.compile(MLP(), optimizer={"layers.0": "shampoo", "*": ("rank1", {"damping": 0.5})}, damping=1e-2)
    assert {p.name: p.hp["damping"] for p in c.optimizer.curvature} == {"shampoo": 1e-2, "rank1": 0.5}


@pytest.mark.parametrize("optimizer,message", [
    ({"*": "kfc"}, r"pattern '\*': 'kfc' is not a gnfx optimizer; valid names are: .*kfac.*auto"),
    ("adamw", r"optimizer='adamw' is not a gnfx optimizer; valid names are: .*diag"),
    ({}, "dict of glob patterns"),
    (3, "dict of glob patterns"),
    ({1: "kfac"}, "glob patterns on block names"),
    ({"layers.9": "kfac", "*": "diag"}, r"pattern 'layers.9' matches no block; blocks are: layers.0, layers.1"),
    ({"*": "kfac", "layers.0": "shampoo"}, r"pattern 'layers.0' takes nothing: layers.0 is taken by an earlier"),
    ({"*": ("kfac", {"dampin": 1.0})}, r"unknown hyperparameter 'dampin' for pattern '\*' \(kfac\)"),
    ({"*": ("kfac", {"damping": -1.0})}, r"damping=-1.0 is invalid for pattern '\*' \(kfac\)"),
    ({"*": ("kfac", {"lr": 0.1})}, r"unknown hyperparameter 'lr' for pattern"),
    ({"*": ("diag", {"betas": (0.8, 0.9)})}, "betas of diag are read from optimizer.param_groups"),
    ({"*": ("auto", {"damping": 1.0})}, r"unknown hyperparameter 'damping' for pattern '\*' \('auto'\)"),
])
def test_bad_policies_raise_config_errors_naming_the_problem(optimizer, message):
    with pytest.raises(gnfx.ConfigError, match=message):
        gnfx.compile(MLP(), optimizer=optimizer)


def test_budgets_apply_only_to_auto():
    with pytest.raises(gnfx.ConfigError, match="memory_budget only apply to optimizer='auto'"):
        gnfx.compile(MLP(), optimizer="kfac", memory_budget=4.0)


# ----------------------------------------------------------------------------- auto

MODELS = {"mlp": lambda: MLP((5, 40, 40, 3)), "wide_mlp": lambda: MLP((5, 300, 3)), "gpt": GPT,
          "gpt_d32": lambda: GPT(d=32, attentions=("sdpa",)), "cnn": CNN}
BUDGETS = [(2.0, 1.0), (4.0, 5.0), (8.0, 30.0), (16.0, 100.0)]


@pytest.mark.parametrize("model", MODELS)
def test_auto_plans_respect_the_budgets(model):
    chosen = []
    for memory, compute in BUDGETS:
        c = gnfx.compile(MODELS[model](), optimizer="auto", memory_budget=memory, compute_budget=compute)
        report = c.cost()
        for row in report.rows:
            assert row.memory_ratio <= memory and row.flops_ratio <= compute, (row.name, memory, compute)
        assert report.memory_ratio <= memory and report.flops_ratio <= compute
        chosen.append({b.name: b.preconditioner for b in c.layers})
        assert all(f.preconditioner == "diag" for f in c.layers.fallbacks)
    assert set(chosen[0].values()) == {"diag"}  # AdamW's memory and compute: nothing else fits
    assert set(chosen[-1].values()) <= {"shampoo", "kfac"}  # generous budgets: a Kronecker factorization


def plans(model, grid):
    """optimizer="auto" planned for each budget pair of `grid` on one captured model."""
    c = gnfx.compile(model, optimizer="diag")
    params = dict(model.named_parameters())
    out = {}
    for memory, compute in grid:
        given = {"memory_budget": memory, "compute_budget": compute}
        settings = {**c._settings, **given}
        out[memory, compute] = make_plan(c.layers, Policy("auto", given), given, settings, params).entries
    return c, out


def test_fidelity_never_drops_as_a_budget_grows():
    memories, computes = (2.0, 3.0, 5.0, 6.5, 8.0, 12.0, 24.0), (1.0, 3.0, 8.0, 15.0, 25.0, 40.0, 80.0, 500.0)
    c, planned = plans(GPT(), list(itertools.product(memories, computes)))
    for block in c.layers:
        rank = {key: entries[block.name].fidelity for key, entries in planned.items()}
        for m, (c0, c1) in itertools.product(memories, zip(computes, computes[1:])):
            assert rank[m, c1] <= rank[m, c0], block.name
        for cb, (m0, m1) in itertools.product(computes, zip(memories, memories[1:])):
            assert rank[m1, cb] <= rank[m0, cb], block.name
        assert rank[memories[0], computes[0]] > rank[memories[-1], computes[-1]] == 0
    assert len({tuple(sorted((k, e.name, e.reason) for k, e in entries.items())) for entries in planned.values()}) > 5


def test_statistics_asked_for_do_not_decide_what_auto_chooses():
    """statistics=("A", "S") are taken whatever auto chooses: the plan is the one without them, also for a block as
    small as a Conv2d(1, 1, 3), whose A (10 x 10 for 10 parameters) counted against memory_budget left nothing
    that fits (a ConfigError, found by tests/test_composed_models.py)."""
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 1, 3), nn.Flatten(), nn.Linear(4, 3))
    x = torch.randn(2, 1, 4, 4)
    plain = gnfx.compile(model(), optimizer="auto", example_inputs=(x,))
    asked = gnfx.compile(model(), optimizer="auto", statistics=("A", "S"), example_inputs=(x,))
    assert {n: (e.name, e.hparams) for n, e in asked.layers.plan.entries.items()} == \
        {n: (e.name, e.hparams) for n, e in plain.layers.plan.entries.items()}
    asked(x).sum().backward()
    asked.step()
    assert asked.statistics("0")["A"].shape == (10, 10)


def test_auto_blocks_shampoo_before_giving_up_fidelity_and_says_why():
    c = gnfx.compile(GPT(), optimizer="auto", memory_budget=8.0, compute_budget=30.0)
    fc = c.layers.plan.entries["blocks.0.fc"]  # 64 x 17: unblocked Shampoo and K-FAC exceed the budgets
    assert (fc.name, fc.hparams["max_block"], fc.fidelity) == ("shampoo", 32, 2)
    assert fc.reason.startswith("auto (max_block=32): memory 6.8x, compute 20.2x within 8x, 30x; shampoo needs")
    pre = next(p for p in c.optimizer.curvature if c.layers["blocks.0.fc"] in p.blocks)
    assert pre.hp["max_block"] == 32 and all(max(g.shape) <= 32 for g in pre.groups)
    row = next(line for line in str(c).splitlines() if line.startswith("blocks.0.fc "))
    assert "auto (max_block=32)" in row
    # deterministic
    again = gnfx.compile(GPT(), optimizer="auto", memory_budget=8.0, compute_budget=30.0)
    assert [(k, e.name, e.hparams, e.reason) for k, e in again.layers.plan.entries.items()] == [
        (k, e.name, e.hparams, e.reason) for k, e in c.layers.plan.entries.items()]


def test_auto_takes_kfac_where_only_shampoo_exceeds_the_compute_budget():
    """With few statistic rows K-FAC's step is cheaper than Shampoo's (no grafting), so a compute
    budget between the two gives K-FAC, the next in the fidelity order."""
    c = gnfx.compile(GPT(), optimizer="auto", memory_budget=20.0, compute_budget=12.0, cost_rows=1)
    entry = c.layers.plan.entries["blocks.1.attn.q"]
    assert (entry.name, entry.fidelity) == ("kfac", 1)
    assert "; shampoo needs memory 6.0x, compute 12.7x" in entry.reason


def test_auto_in_a_policy_takes_its_own_budgets():
    c = gnfx.compile(GPT(), optimizer={"*.attn.*": ("auto", {"memory_budget": 16.0, "compute_budget": 100.0}),
                                       "*": "auto"}, memory_budget=4.0, compute_budget=5.0)
    report = c.cost()
    for block in c.layers:
        limit = 16.0 if ".attn." in block.name else 4.0
        assert report[block.name].memory_ratio <= limit
    assert c.layers["blocks.0.attn.qkv"].preconditioner == "shampoo"
    # within 4x only diag: Shampoo blocked (max_block 16) needs 6.8x, rank1 (U, D, its statistics, the
    # graft's moment and the momentum) 8x
    assert c.layers["blocks.0.fc"].preconditioner == "diag"


def test_auto_raises_when_even_diag_exceeds_the_budget():
    with pytest.raises(gnfx.ConfigError, match=r"nothing fits block 'layers.0' within memory_budget=1.5.*diag"):
        gnfx.compile(MLP(), optimizer="auto", memory_budget=1.5)
