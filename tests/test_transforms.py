"""The update chain (gnfx.transforms): each stage against a per-piece reference in float64, the
whole chain of every curvature preconditioner against the tail's math written out per piece, a
user-composed chain, invalid chains, and checkpoints written before the chain existed.

The references here are plain Python over single pieces (no foreach kernels, no stacking), of
the math in the stages' docstrings:

    graft:     D from Adam (v ← β₂v + (1-β₂)G², D = G/(√(v/(1-β₂ᵗ)) + ε)) or AdaGrad (v ← v + G²,
               D = G/(√v + ε)),  U ← U ‖D‖/‖U‖  (D alone before a preconditioner is active)
    KL clip:   U ← ν U,  ν = min(1, √(κ / Σ_pieces η² ⟨U, G⟩))
    momentum:  m ← μ m + U,  U ← m
    step:      θ ← θ(1 - ηλ) - η U
"""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gnfx
from gnfx.transforms import Graft, HeavyBall, KLClip, Step

SHAPES = [(3, 4, 5), (2, 6)]  # two groups: 3 pieces of 4x5, 2 pieces of 6


class Pre:
    """What a stage asks of its preconditioner, outside a compiled model."""

    def __init__(self, active=None):
        self.active = active
        self.started = True if active is None else bool(active)  # as CurvaturePreconditioner keeps it

    def sum_over_owners(self, x):
        return x


def stacks(generator, scale=1.0):
    return [scale * torch.randn(shape, generator=generator, dtype=torch.float64) for shape in SHAPES]


def zeros_state(transform):
    return [{k: torch.zeros((shape[0],) + s, dtype=torch.float64) for k, s in transform.state_shapes(shape[1:]).items()}
            for shape in SHAPES]


def grafted_reference(kind, G, v, t, beta2, eps):
    """D of one piece and its new (v, t)."""
    if kind == "adagrad":
        v = v + G * G
        return G / (v.sqrt() + eps), v, t
    t = t + 1
    v = beta2 * v + (1 - beta2) * G * G
    return G / ((v / (1 - beta2 ** t)).sqrt() + eps), v, t


# ----------------------------------------------------------------------------- the stages alone


@pytest.mark.parametrize("active", [None, True, False])
@pytest.mark.parametrize("kind", ["adam", "adagrad"])
def test_graft_takes_each_pieces_norm_from_the_grafted_method(kind, active):
    g = torch.Generator().manual_seed(0)
    graft = Graft(kind, beta2=0.9, eps=1e-3)
    states = zeros_state(graft)
    flag = None if active is None else torch.tensor(active)
    ref = {(j, i): (torch.zeros(SHAPES[j][1:], dtype=torch.float64), 0) for j in range(2) for i in range(SHAPES[j][0])}
    for step in range(3):
        Us, Gs = stacks(g, scale=10.0), stacks(g)
        if step == 0:
            Us[0][1].zero_()  # a zero direction stays zero
        out = graft(Pre(flag), [U.clone() for U in Us], Gs, states, None, None)
        for j in range(2):
            for i in range(SHAPES[j][0]):
                v, t = ref[j, i]
                D, v, t = grafted_reference(kind, Gs[j][i], v, t, 0.9, 1e-3)
                ref[j, i] = (v, t)
                U = Us[j][i]
                expected = D if active is False else U * (D.norm() / U.norm()) if U.norm() > 0 else U
                torch.testing.assert_close(out[j][i], expected, rtol=1e-12, atol=1e-14)
                torch.testing.assert_close(states[j]["graft_v"][i], v, rtol=1e-12, atol=0)
                assert states[j]["graft_t"][i].item() == (t if kind == "adam" else 0)
    assert out[0][1].abs().max() > 0  # the zeroed piece took its norm on the later steps


def test_graft_none_leaves_the_directions_and_keeps_the_old_state_keys():
    graft = Graft("none")
    Us = stacks(torch.Generator().manual_seed(1))
    assert graft(Pre(), Us, Us, zeros_state(graft), None, None) is Us
    assert set(graft.state_shapes((4, 5))) == {"graft_v", "graft_t"}


@pytest.mark.parametrize("kappa", [1e-4, 1e4])
def test_kl_clip_scales_every_piece_by_one_nu(kappa):
    g = torch.Generator().manual_seed(2)
    Us, Gs = stacks(g), stacks(g)
    Gs = [G + 0.5 * U for U, G in zip(Us, Gs)]  # ⟨U, G⟩ > 0 on the whole
    lr = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5], dtype=torch.float64)
    pieces = [(U, G) for Uj, Gj in zip(Us, Gs) for U, G in zip(Uj, Gj)]
    vfv = sum(float(eta) ** 2 * float((U * G).sum()) for eta, (U, G) in zip(lr, pieces))
    nu = min(1.0, math.sqrt(kappa / abs(vfv)))
    assert (nu < 0.1) if kappa < 1 else (nu == 1.0)
    out = KLClip(kappa)(Pre(), Us, Gs, [{}, {}], lr, None)
    for U, expected in zip(out, Us):
        torch.testing.assert_close(U, nu * expected, rtol=1e-12, atol=0)


def test_heavy_ball_keeps_the_moving_sum_and_returns_it():
    g = torch.Generator().manual_seed(3)
    momentum = HeavyBall(0.7)
    states = zeros_state(momentum)
    m = [torch.zeros(shape, dtype=torch.float64) for shape in SHAPES]
    for _ in range(3):
        Us = stacks(g)
        out = momentum(Pre(), Us, Us, states, None, None)
        m = [0.7 * mj + Uj for mj, Uj in zip(m, Us)]
        for j in range(2):
            torch.testing.assert_close(out[j], m[j], rtol=1e-14, atol=0)
            assert out[j] is states[j]["momentum"]


# ----------------------------------------------------------------------------- a model

LR, WD = 0.05, 0.1
GROUPS = ({"lr": LR, "weight_decay": WD}, {"lr": 3 * LR, "weight_decay": 0.3})  # layers 0, 2 | 4, 6


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(),
                         nn.Linear(6, 3)).double()


def compile_two_groups(net, optimizer, **hp):
    """Layers 0 and 2 in a param group at (LR, WD), layers 4 and 6 in one at (3 LR, 0.3)."""
    c = gnfx.compile(net, optimizer=optimizer, lr=LR, weight_decay=WD, stat_every=1, step="lr", **hp)
    params = list(net.parameters())
    c.optimizer.param_groups[0]["params"] = params[:4]
    c.optimizer.add_param_group({"params": params[4:], **GROUPS[1]})
    return c


def batches(seed):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randint(3, (8,), generator=g)


def piece_value(named, piece):
    """A piece's values in the parameters: [W b] for a block with its bias folded in, else the tensor."""
    t = piece.target
    if t.folded_bias:
        return torch.cat([named[t.params[0]], named[t.params[1]].unsqueeze(1)], 1)[piece.index]
    return named[t.params[0]][piece.index]


# (optimizer, hyperparameters, the tail they mean: graft kind, κ, μ (None: no momentum), steps before
# Shampoo's start)
CASES = [
    ("kfac", {"kl_clip": 0.0}, dict(mu=0.9)),
    ("kfac", {"kl_clip": 1e-7, "momentum": 0.0}, dict(kappa=1e-7, mu=0.0)),
    ("kfac", {"kl_clip": 1e-7, "momentum": 0.5}, dict(kappa=1e-7, mu=0.5)),
    ("ekfac", {"kl_clip": 1e-7}, dict(kappa=1e-7, mu=0.9)),
    ("shampoo", {"graft": "adam", "start_preconditioning_step": 2, "precondition_frequency": 1},
     dict(graft="adam", mu=0.9, start=2)),
    ("shampoo", {"graft": "adagrad", "start_preconditioning_step": 2, "precondition_frequency": 1, "momentum": 0.0},
     dict(graft="adagrad", mu=0.0, start=2)),
    ("shampoo", {"graft": "none", "start_preconditioning_step": 2, "precondition_frequency": 1},
     dict(mu=0.9)),
    ("rank1", {"graft": "adam", "betas": (0.9, 0.99), "eps": 1e-6}, dict(graft="adam", beta2=0.99, eps=1e-6, mu=0.9)),
    ("rank1", {"graft": "adagrad"}, dict(graft="adagrad", mu=0.9)),
    ("rank1", {"graft": "none", "momentum": 0.0}, dict(mu=0.0)),
    ("soap", {}, dict(mu=0.0)),
    ("soap", {"momentum": 0.6}, dict(mu=0.6)),
    ("muon", {}, dict(mu=None)),
    # user-composed chains
    ("soap", {"chain": [Graft("adagrad"), KLClip(1e-7), HeavyBall(0.5), Step()]},
     dict(graft="adagrad", kappa=1e-7, mu=0.5)),
    ("kfac", {"chain": [Step()]}, dict(mu=None)),
    ("shampoo", {"chain": [HeavyBall(0.3), Step()], "precondition_frequency": 1, "start_preconditioning_step": 0},
     dict(mu=0.3)),
]


def _id(case):
    name, hp, _ = case
    return name + "-" + "-".join(f"{k}={v!r}" for k, v in hp.items())


@pytest.mark.parametrize("name, hp, tail", CASES, ids=[_id(c) for c in CASES])
def test_the_chain_steps_as_the_tail_written_out_per_piece(name, hp, tail):
    """Each step of each piece: θ ← θ(1 - ηλ) - η U with U the direction after grafting, KL clipping
    and momentum (as `tail` says), from the direction and gradient the preconditioner produced."""
    net = mlp()
    named = dict(net.named_parameters())
    c = compile_two_groups(net, name, **hp)
    data = batches(0)
    x, y = next(data)
    F.cross_entropy(c(x), y).backward()  # the first call captures the model
    curvature = c.optimizer.curvature
    recorded = []
    for pre in curvature:
        def record(G, state, collect, direction=pre.direction):
            U = direction(G, state, collect)
            recorded.append((G.clone(), U.clone()))
            return U
        pre.direction = record
    pieces = [p for pre in curvature for g in pre.groups for p in g.pieces]
    group_of = {n: i for i, grp in enumerate(c.optimizer.param_groups) for n, p in named.items()
                if any(p is q for q in grp["params"])}
    graft, kappa, mu, start = tail.get("graft"), tail.get("kappa"), tail["mu"], tail.get("start", 0)
    beta2, eps = tail.get("beta2", 0.999), tail.get("eps", 1e-8)
    memory = {i: {"m": 0.0, "v": 0.0, "t": 0} for i in range(len(pieces))}
    clipped = False
    for step in range(4):
        before = [piece_value(named, p).detach().clone() for p in pieces]
        recorded.clear()
        c.step()
        GU = [(G[i], U[i]) for G, U in recorded for i in range(len(G))]
        assert len(GU) == len(pieces)
        lrs, wds = zip(*[(GROUPS[group_of[p.target.params[0]]]["lr"], GROUPS[group_of[p.target.params[0]]]["weight_decay"])
                         for p in pieces])
        directions = []
        for i, (G, U) in enumerate(GU):
            G = G.to(U.dtype)
            if graft is not None:
                D, memory[i]["v"], memory[i]["t"] = grafted_reference(graft, G, memory[i]["v"], memory[i]["t"], beta2, eps)
                U = U * (D.norm() / U.norm()) if step >= start else D
            directions.append(U)
        if kappa is not None:
            vfv = sum(lr ** 2 * float((U * G).sum()) for lr, U, (G, _) in zip(lrs, directions, GU))
            nu = min(1.0, math.sqrt(kappa / abs(vfv)))
            clipped |= nu < 1
            directions = [nu * U for U in directions]
        for i, (p, U) in enumerate(zip(pieces, directions)):
            if mu is not None:
                memory[i]["m"] = mu * memory[i]["m"] + U
                U = memory[i]["m"]
            expected = before[i] * (1 - lrs[i] * wds[i]) - lrs[i] * U
            torch.testing.assert_close(piece_value(named, p), expected, rtol=1e-10, atol=1e-12,
                                       msg=lambda m: f"step {step}, piece {p.target.name}: {m}")
        c.zero_grad()
        x, y = next(data)
        F.cross_entropy(c(x), y).backward()
    assert clipped or kappa is None  # the KL cases do clip
    assert len({lr for lr in lrs}) == 2  # pieces in both param groups


def test_the_update_code_shows_one_line_per_stage():
    net = mlp()
    chain = [KLClip(1e-3), KLClip(1e-2), HeavyBall(0.5), Step()]
    c = gnfx.compile(net, optimizer="kfac", chain=chain, example_inputs=(torch.randn(2, 5, dtype=torch.float64),))
    code = c.update_code
    assert "# kfac's chain: KLClip(kappa=0.001) → KLClip(kappa=0.01) → HeavyBall(momentum=0.5) → Step()" in code
    lines = [line.strip() for line in code.splitlines()]
    calls = [line.split("(")[0] for line in lines if "(kfac, U_kfac, G_kfac, S_kfac, lr_kfac" in line]
    assert calls == ["U_kfac = kfac_kl_clip0", "U_kfac = kfac_kl_clip1", "U_kfac = kfac_momentum", "kfac_step"]
    # the parameter write reads each parameter's own group (gnfx.codegen), the other stages the piece's
    assert "kfac_step(kfac, U_kfac, G_kfac, S_kfac, lr_kfac_write, wd_kfac_write)" in code
    default = gnfx.compile(mlp(), optimizer="shampoo", example_inputs=(torch.randn(2, 5, dtype=torch.float64),))
    assert "shampoo_graft(shampoo, U_shampoo" in default.update_code


def test_a_chain_per_pattern():
    """A policy may give one pattern's preconditioner a chain of its own."""
    net = mlp()
    c = gnfx.compile(net, optimizer={"0": ("kfac", {"chain": [Step()]}), "*": "kfac"},
                     example_inputs=(torch.randn(2, 5, dtype=torch.float64),))
    chains = sorted(repr(pre.chain) for pre in c.optimizer.curvature)
    assert chains == ["[KLClip(kappa=0.001), HeavyBall(momentum=0.9), Step()]", "[Step()]"]


@pytest.mark.parametrize("chain, message", [
    ("momentum", "it is not a list of transforms"),
    ([], "it is not a list of transforms"),
    (["momentum", Step()], "'momentum' is not a transform"),
    ([HeavyBall(0.9)], "it has 0 parameter writes"),
    ([Step(), Step()], "it has 2 parameter writes"),
    ([Step(), HeavyBall(0.9)], "its parameter write is at position 0"),
    ([HeavyBall(0.9), HeavyBall(0.5), Step()], "both keep state 'momentum'"),
])
def test_invalid_chains_are_config_errors(chain, message):
    with pytest.raises(gnfx.ConfigError, match=message):
        gnfx.compile(mlp(), optimizer="kfac", chain=chain)
    with pytest.raises(gnfx.ConfigError, match=message):  # per pattern too
        gnfx.compile(mlp(), optimizer={"0": ("kfac", {"chain": chain}), "*": "diag"})


def test_invalid_stages_and_a_chain_that_takes_muons_own_state_are_config_errors():
    for make, message in ((lambda: Graft("sgd"), "kind must be one of"), (lambda: HeavyBall(1.0), r"in \[0, 1\)"),
                          (lambda: KLClip(0.0), "must be > 0")):
        with pytest.raises(gnfx.ConfigError, match=message):
            make()
    with pytest.raises(gnfx.ConfigError, match=r"muon keeps state \['momentum'\] itself"):
        gnfx.compile(mlp(), optimizer="muon", chain=[HeavyBall(0.9), Step()],
                     example_inputs=(torch.randn(2, 5, dtype=torch.float64),))


# ----------------------------------------------------------------------------- checkpoints

# the state keys of the first group that gnfx wrote before the update chain (gnfx 9945364)
OLD_KEYS = {
    "kfac": {"A_inv", "S_inv", "failures", "momentum"},
    "ekfac": {"Q_A", "Q_S", "failures", "momentum", "refreshes", "scale", "skipped"},
    "shampoo": {"factor0", "factor1", "failures", "graft_t", "graft_v", "momentum", "root0", "root1"},
    # rank1's sketch gained its diagonal D (a checkpoint without it is refused naming the change,
    # tests/test_rank1.py)
    "rank1": {"D", "U", "failures", "graft_t", "graft_v", "momentum", "s", "t"},
    "soap": {"basis0", "basis1", "exp_avg", "exp_avg_sq", "factor0", "factor1", "failures", "momentum", "refreshes",
             "skipped", "t"},
    "muon": {"momentum"},
}


# ekfac's factored damping (its default since) keeps the factors' eigenvalues too: its checkpoints
# before the chain were of damping_kind="tikhonov"
@pytest.mark.parametrize("name, hp", [("kfac", {}), ("ekfac", {"damping_kind": "tikhonov"}),
                                      ("shampoo", {"start_preconditioning_step": 1}),
                                      ("shampoo", {"graft": "none"}), ("rank1", {}), ("rank1", {"graft": "none"}),
                                      ("soap", {}), ("muon", {})])
def test_a_checkpoint_keeps_the_old_keys_and_resumes_exactly(name, hp):
    """The state keys are those gnfx wrote before the chain, so its checkpoints load; a checkpoint
    taken after 3 steps and loaded into a fresh model steps exactly as the run it came from."""
    def run(c, data, steps):
        for _ in range(steps):
            x, y = next(data)
            F.cross_entropy(c(x), y).backward()
            c.step()
            c.zero_grad()

    net = mlp()
    c = gnfx.compile(net, optimizer=name, lr=LR, weight_decay=WD, stat_every=1, step="lr", **hp)
    run(c, batches(0), 3)
    saved = copy.deepcopy((net.state_dict(), c.optimizer.state_dict()))
    holder = c.optimizer.curvature[0].state_holder[f"{name}_0"]
    keys = {k.partition(".")[2] for k in c.optimizer.state_of(holder) if k.startswith(f"{name}_0.")}
    assert keys == OLD_KEYS[name]
    run(c, batches(1), 2)
    fresh = mlp()
    resumed = gnfx.compile(fresh, optimizer=name, lr=LR, weight_decay=WD, stat_every=1, step="lr", **hp)
    run(resumed, batches(2), 1)  # captured, then overwritten by the checkpoint
    fresh.load_state_dict(saved[0])
    resumed.optimizer.load_state_dict(saved[1])
    run(resumed, batches(1), 2)
    for (k, a), b in zip(net.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k


def test_an_ekfac_checkpoint_of_the_tikhonov_kind_names_the_cause_when_loaded_into_the_factored_default():
    """ekfac's default (factored) keeps eigenvalues_A/S that a tikhonov-kind checkpoint (every one
    written before damping_kind) lacks: loading it raises a ConfigError naming what is missing and
    the damping_kind that loads it, and loads nothing."""
    x, y = next(batches(0))
    old = gnfx.compile(mlp(), optimizer="ekfac", lr=LR, stat_every=1, step="lr", damping_kind="tikhonov")
    F.cross_entropy(old(x), y).backward()
    old.step()
    new = gnfx.compile(mlp(), optimizer="ekfac", lr=LR, stat_every=1, step="lr")
    F.cross_entropy(new(x), y).backward()
    new.step()
    before = copy.deepcopy(new.optimizer.state_dict())
    with pytest.raises(gnfx.ConfigError, match=r"lacks 'ekfac_0\.eigenvalues_A'.*loads with damping_kind='tikhonov'"):
        new.optimizer.load_state_dict(old.optimizer.state_dict())
    after = new.optimizer.state_dict()
    for i, entries in before["state"].items():
        for k, v in entries.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(after["state"][i][k])), k
