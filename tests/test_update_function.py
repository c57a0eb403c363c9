"""The generated update function: readable code that batches equal-shaped blocks, the same numbers
compiled (torch.compile) and eager, no recompilation once warm, and exact checkpoint resumption.
"""
from __future__ import annotations

import ast
import io

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import gnfx
from models import SquashedAffine

CURVATURE = ["kfac", "shampoo", "rank1"]


class Deep(nn.Module):
    """8 -> 16 -> 16 -> 16 -> 16 -> 4: three 16x16 hidden layers ([W b] of 16x17 each)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.hidden = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.inp(x))
        for layer in self.hidden:
            x = torch.relu(layer(x))
        return self.out(x)


class Small(nn.Module):
    """Two equal-shaped blocks (one group of two pieces), a SquashedAffine (fallback) and a head."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 4)
        self.norm = SquashedAffine(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.norm(torch.tanh(self.fc2(torch.tanh(self.fc1(x))))))


class Pair(nn.Module):
    """Two equal-shaped blocks, one group of two pieces: the smallest model whose update
    function batches (kept small, since torch.compile of every graph costs seconds on a CPU)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def make(cls=Small, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return cls().to(dtype)


def batches(n, d_in=4, classes=3, size=8, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, d_in, generator=g, dtype=dtype), torch.randint(0, classes, (size,), generator=g))
            for _ in range(n)]


def train(c, data):
    for x, y in data:
        c.zero_grad()
        F.cross_entropy(c(x), y).backward()
        c.step()


def flat_params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# hyperparameters of each preconditioner with amortization that is not aligned with the steps
HP = {
    "kfac": dict(inv_every=3, kl_clip=1e-2, damping=1e-2),
    "shampoo": dict(precondition_frequency=3, start_preconditioning_step=1, damping=1e-3),
    # λ of the order of this model's D (0.006-0.25) and ŝ (0.05-0.12): float32 round-off in (D + λ)⁻¹ and
    # in the Woodbury correction stays below the 1e-6 of the compiled-vs-eager claim
    "rank1": dict(rank=2, damping=1e-1),
}


# ----------------------------------------------------------------------------- the code


@pytest.mark.parametrize("optimizer", CURVATURE)
def test_update_code_is_python_that_stacks_equal_shaped_blocks_into_one_group(optimizer):
    """`update_code` parses as Python, names every group, and stacks the three 16x16 hidden
    layers ([W b]: 16x17) into one group of three pieces: one stack_folded of three weight and three
    bias gradients (a group of one [W b]: its fold with a leading dimension; else a torch.stack)."""
    c = gnfx.compile(make(Deep), optimizer=optimizer)
    code = c.update_code
    tree = ast.parse(code)  # valid Python
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    assert [f.name for f in functions] == ["gnfx_update"]
    assert c.optimizer.update_function.source in code
    pre = c.optimizer.curvature[0]
    stacks = {}  # assigned name -> number of pieces it stacks
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            call, args = ast.unparse(node.value.func), node.value.args
            if call == "torch.stack":
                stacks[node.targets[0].id] = len(args[0].elts)
            elif call == "stack_folded":
                assert len(args[0].elts) == len(args[1].elts)
                stacks[node.targets[0].id] = len(args[0].elts)
            elif call.startswith("fold(") and call.endswith(".unsqueeze") and args[0].value == 0:
                stacks[node.targets[0].id] = 1
    for g in pre.groups:
        stacked = [n for name, n in stacks.items() if name.endswith(g.key)]
        assert stacked == [len(g.pieces)], (g.key, stacks)
    by_shape = {g.shape: g for g in pre.groups}
    hidden = by_shape[(16, 17)]
    assert [p.target.name for p in hidden.pieces] == ["hidden.0", "hidden.1", "hidden.2"]
    assert len(pre.groups) == 3  # 16x9, 16x17 (x3), 4x17
    comment = next(line for line in code.splitlines() if line.strip().startswith(f"# {hidden.key}:"))
    assert all(name in comment for name in ("hidden.0", "hidden.1", "hidden.2"))


def test_stack_folded_is_the_stack_of_the_folded_pieces():
    """One copy into the stack gives exactly torch.stack of the folds [W b], for contiguous weights,
    views (a conv kernel's flatten, a transpose) and mixed dtypes (promoted as torch.stack does)."""
    from gnfx.codegen import stack_folded
    from gnfx.targets import fold
    torch.manual_seed(0)
    cases = [([torch.randn(5, 3) for _ in range(3)], [torch.randn(5) for _ in range(3)]),
             ([torch.randn(4, 2, 3, 3).flatten(1), torch.randn(4, 2, 3, 3).flatten(1)], [torch.randn(4), torch.randn(4)]),
             ([torch.randn(3, 5).t(), torch.randn(5, 3)], [torch.randn(5), torch.randn(5, dtype=torch.float64)])]
    for weights, biases in cases:
        expected = torch.stack([fold(w, b) for w, b in zip(weights, biases)])
        got = stack_folded(weights, biases)
        assert got.dtype == expected.dtype and got.is_contiguous()
        assert torch.equal(got, expected)


@pytest.mark.parametrize("optimizer", ["rank1", "shampoo"])
def test_a_changed_learning_rate_and_weight_decay_apply_at_the_next_step(optimizer):
    """The step reads lr and weight decay from the param groups whenever they change (their tensors are
    refilled only then): twins in float64 take two equal steps, then one lowers lr 0.05 → 0.01 and
    decays by λ = 0.5, so that its third change is θ(1 - ηλ) - θ plus 1/5 of the other's (the direction
    does not depend on η for these chains: grafting and momentum, no KL clipping)."""
    data = batches(3, dtype=torch.float64)
    twins = [gnfx.compile(make(dtype=torch.float64), optimizer=optimizer, lr=0.05) for _ in range(2)]
    for c in twins:
        train(c, data[:2])
    before = flat_params(twins[0])
    for g in twins[0].optimizer.param_groups:
        g["lr"], g["weight_decay"] = 0.01, 0.5
    for c in twins:
        train(c, data[2:])
    changed, kept = flat_params(twins[0]), flat_params(twins[1])
    torch.testing.assert_close(changed - before * (1 - 0.01 * 0.5), (kept - before) / 5, rtol=1e-9, atol=1e-15)
    assert (kept - before).abs().min() > 0


# ----------------------------------------------------------------------------- compiled vs eager


@pytest.mark.parametrize("optimizer", CURVATURE)
def test_compiled_equals_eager_and_compiles_no_new_graph_after_warm_up(optimizer):
    """Float32, stat_every=2 (statistic and plain steps alternate), an LR scheduler that changes
    lr every step: the compiled run follows the eager one to 1e-6 at every step, and the number
    of graphs dynamo has compiled stops growing after a warm-up of 3 steps. The two runs take the same
    operations, but Inductor's kernels sum in other orders than ATen's: the parameters (|θ| ≤ 0.6) part by
    about ε·max|θ| every two steps (ε = 2⁻²³), 3.3 ε·max|θ| ≈ 2.3e-7 after the 7 steps at most (measured
    under AVX-512, AVX2, ATen's scalar kernels, MKL_CBWR=COMPATIBLE, 1 and 2 threads); 1e-6 is 14 ε·max|θ|.
    Not a bound on each run's own round-off: against float64, eager float32 is 4e-6 off for rank-1
    and 8e-6 for Shampoo, both runs sharing the rounding of the same float32 statistics."""
    steps, warm_up = 7, 3
    data = batches(steps, classes=4)
    hp = HP[optimizer]
    trajectories, graphs = {}, []
    torch._dynamo.reset()
    counters.clear()
    for use_compile in (False, True):
        model = make(Pair)
        c = gnfx.compile(model, optimizer=optimizer, lr=0.05, stat_every=2, compile=use_compile, **hp)
        schedule = torch.optim.lr_scheduler.LambdaLR(c.optimizer, lambda s: 1 / (1 + 0.5 * s))
        trajectory = []
        for x, y in data:
            c.zero_grad()
            F.cross_entropy(c(x), y).backward()
            c.step()
            schedule.step()
            trajectory.append(flat_params(model))
            if use_compile:
                graphs.append(counters["stats"]["unique_graphs"])
        trajectories[use_compile] = trajectory
        if not use_compile:
            assert counters["stats"]["unique_graphs"] == 0  # compile=False ran no dynamo
    assert graphs[0] >= 1  # the compiled run did compile
    assert graphs[warm_up - 1:] == [graphs[warm_up - 1]] * (steps - warm_up + 1), graphs
    lrs = [g["lr"] for g in c.optimizer.param_groups]
    assert lrs[0] < 0.05 / 3  # the scheduler did change the learning rate
    for t, (eager, compiled) in enumerate(zip(trajectories[False], trajectories[True])):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-6, msg=lambda m: f"step {t}: {m}")
    assert not torch.equal(trajectories[True][-1], trajectories[True][0])


@pytest.mark.parametrize("optimizer", ["ekfac", "rank1"])
def test_the_compiled_update_compiles_no_new_graph_when_the_quadratic_step_moves_damping(optimizer):
    """EKFAC and rank-1 read λ inside the update ((s + D)⁻¹, (D + λ)⁻¹); under step="quadratic" λ is
    the Levenberg–Marquardt λ, which moves at each adaptation (every step during the warm-up). Read as a
    Python float, dynamo guarded on its value and compiled a graph at each change (8 graphs, then its
    recompile limit and an eager update); read from a 0-d tensor, the graphs stop growing after the
    first statistic and plain steps, and the run follows the eager one (float64: the quadratic step's
    α and μ solve a 2x2 system, in float32 a few 1e-6 apart after 6 steps)."""
    steps = 8
    data = batches(steps, classes=4, dtype=torch.float64)
    trajectories, graphs, dampings = {}, [], set()
    torch._dynamo.reset()
    counters.clear()
    for use_compile in (False, True):
        model = make(Pair, dtype=torch.float64)
        # forward-mode products: finite differences would amplify the compiled update's rounding to ~1e-8
        c = gnfx.compile(model, optimizer=optimizer, loss="cross_entropy", step="quadratic", stat_every=2,
                         compile=use_compile, quadratic_products="forward")
        trajectory = []
        for x, y in data:
            c.zero_grad()
            F.cross_entropy(c(x), y).backward()
            c.step()
            trajectory.append(flat_params(model))
            if use_compile:
                graphs.append(counters["stats"]["unique_graphs"])
                dampings.add(c.optimizer.last_step["damping"])
        trajectories[use_compile] = trajectory
    assert len(dampings) >= 4  # λ did move
    assert graphs[0] >= 1 and graphs[2:] == [graphs[2]] * (steps - 2), graphs
    for t, (eager, compiled) in enumerate(zip(trajectories[False], trajectories[True])):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-12, msg=lambda m: f"step {t}: {m}")


@pytest.mark.parametrize("optimizer", ["kfac", "shampoo", "soap", "rank1"])
def test_the_update_compiles_once_per_value_of_collect_across_statistic_and_refresh_cycles(monkeypatch, optimizer):
    """A backend that counts the graphs dynamo hands it: the update compiles on the first
    statistic step (0) and the first plain step (1) and never again over 13 steps, that is four
    stat_every=3 cycles with refreshes every 2 steps (shampoo: preconditioning starts at step 5,
    which must not recompile) and a learning rate that changes every step."""
    import gnfx.codegen

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(gnfx.codegen, "BACKEND", counting_backend)
    torch._dynamo.reset()
    hp = {"kfac": dict(inv_every=2), "shampoo": dict(precondition_frequency=2, start_preconditioning_step=5),
          "soap": dict(precondition_frequency=2), "rank1": dict(rank=2)}[optimizer]
    c = gnfx.compile(make(Pair), optimizer=optimizer, lr=0.05, stat_every=3, compile=True, **hp)
    schedule = torch.optim.lr_scheduler.LambdaLR(c.optimizer, lambda s: 1 / (1 + 0.5 * s))
    counts = []
    for x, y in batches(13, classes=4):
        c.zero_grad()
        F.cross_entropy(c(x), y).backward()
        c.step()
        schedule.step()
        counts.append(len(graphs))
    assert 1 <= counts[1] <= 2 and counts[1:] == [counts[1]] * 12, counts
    assert torch.isfinite(flat_params(c)).all()


def failing_backend(gm, example_inputs):
    raise RuntimeError("injected: no working C++ compiler")


def test_auto_compiles_a_plan_from_its_size_per_device_type(monkeypatch):
    """compile='auto' compiles when the curvature targets hold at least the device type's
    AUTO_COMPILE_ELEMENTS entries (Pair's two blocks, [W b] 4x5 each, hold 40), never where it is
    None, and by default never on a CPU (compiling costs more there than the 2 s allowed)."""
    import gnfx.codegen

    assert gnfx.codegen.AUTO_COMPILE_ELEMENTS["cpu"] is None
    for threshold, compiled in ((40, True), (41, False), (None, False)):
        monkeypatch.setitem(gnfx.codegen.AUTO_COMPILE_ELEMENTS, "cpu", threshold)
        c = gnfx.compile(make(Pair), optimizer="kfac")
        assert c.optimizer.update_function.compiled is compiled
    assert gnfx.codegen.auto_compiles(2 ** 20, torch.device("cuda")) and not gnfx.codegen.auto_compiles(
        2 ** 20 - 1, torch.device("cuda"))
    monkeypatch.undo()
    torch._dynamo.reset()
    counters.clear()
    c = gnfx.compile(make(Pair), optimizer="rank1")  # the default, "auto", on a CPU: eager
    train(c, batches(3))
    assert counters["stats"]["unique_graphs"] == 0


@pytest.mark.parametrize("optimizer", CURVATURE)
def test_auto_runs_eagerly_when_compiling_fails_and_true_raises(monkeypatch, optimizer):
    """A backend that fails (as inductor does without a working C++ compiler): 'auto' warns once and
    steps exactly as compile=False does; compile=True raises, before any parameter changed."""
    import gnfx.codegen

    data = batches(4)
    eager = make(Pair)
    train(gnfx.compile(eager, optimizer=optimizer, stat_every=2, compile=False, **HP[optimizer]), data)
    monkeypatch.setitem(gnfx.codegen.AUTO_COMPILE_ELEMENTS, "cpu", 1)
    monkeypatch.setattr(gnfx.codegen, "BACKEND", failing_backend)
    torch._dynamo.reset()
    fallback = make(Pair)
    c = gnfx.compile(fallback, optimizer=optimizer, stat_every=2, **HP[optimizer])
    assert c.optimizer.update_function.compiled
    with pytest.warns(RuntimeWarning, match="compiling the update function failed.*runs it eagerly"):
        train(c, data)
    assert not c.optimizer.update_function.compiled
    assert torch.equal(flat_params(fallback), flat_params(eager))

    torch._dynamo.reset()
    strict = make(Pair)
    before = flat_params(strict)
    c = gnfx.compile(strict, optimizer=optimizer, stat_every=2, compile=True, **HP[optimizer])
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="no working C"):
        train(c, data[:1])
    assert torch.equal(flat_params(strict), before)


# ----------------------------------------------------------------------------- checkpoints


def checkpoint(c):
    buffer = io.BytesIO()
    torch.save({"model": c.state_dict(), "optimizer": c.optimizer.state_dict()}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("resume_at", [6, 7])
@pytest.mark.parametrize("optimizer", CURVATURE + ["diag"])
def test_resuming_from_a_checkpoint_is_bit_for_bit(optimizer, resume_at):
    """Train `resume_at` steps, checkpoint through torch.save/torch.load(weights_only=True), go on
    6 steps; a fresh compile of a differently initialised model loaded from the checkpoint takes
    the same 6 steps to the same bits. stat_every=2 and refreshes every 3 steps: resuming at 7
    is in the middle of both cycles, at 6 the next step collects statistics and refreshes."""
    hp = dict(lr=0.05, stat_every=2, weight_decay=0.1, **HP.get(optimizer, {}))
    if optimizer != "diag":
        hp["momentum"] = 0.5
    data = batches(resume_at + 6, dtype=torch.float64)
    model = make(dtype=torch.float64)
    c = gnfx.compile(model, optimizer=optimizer, **hp)
    train(c, data[:resume_at])
    saved = checkpoint(c)
    train(c, data[resume_at:])

    fresh_model = make(seed=123, dtype=torch.float64)
    fresh = gnfx.compile(fresh_model, optimizer=optimizer, **hp)
    assert not torch.equal(flat_params(fresh_model), flat_params(model))
    fresh.load_state_dict(saved["model"])
    fresh.optimizer.load_state_dict(saved["optimizer"])
    assert fresh.optimizer.steps == resume_at
    train(fresh, data[resume_at:])

    for (name, p), q in zip(model.named_parameters(), fresh_model.parameters()):
        assert torch.equal(p, q), name
    for name, stats in c.optimizer.statistics.blocks.items():
        for key, value in stats.values.items():
            assert torch.equal(value, fresh.optimizer.statistics[name].values[key]), (name, key)
    # the resumed run is not the same as restarting the optimizer from scratch
    restarted_model = make(seed=123, dtype=torch.float64)
    restarted_model.load_state_dict(saved["model"])
    restarted = gnfx.compile(restarted_model, optimizer=optimizer, **hp)
    train(restarted, data[resume_at:])
    assert not torch.equal(flat_params(restarted_model), flat_params(model))
