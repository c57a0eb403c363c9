"""The layers inside submodules torch.fx keeps opaque, opened into blocks of their own graphs
(passes/opaque_children.py, gnfx/opened_leaf.py).

A block whose forward branches on a tensor's value cannot be traced (nor exported): it is one opaque
call, whose Python code runs eagerly, and the nn.Linear layers it calls are blocks whose statistics
must equal those of plain hooks on the uncompiled model (tests/references.py) at 1e-10 in float64,
on batches taking either branch, for a layer called once, twice or not at all by the opaque code,
with the training loss's δ and with a true Fisher's (fisher="type2" against curvlinops, "mc"); the
model's outputs must be its own, the quadratic step's α and μ the minimizers of the dense GGN
quadratic, and torch.compile must change nothing.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import warnings

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import gnfx
from gnfx.passes.opaque_children import OPENED
from references import TOL, augment, cross_entropy, hook_statistics, kfac_factors, record_linear_calls
from steps import ALL, compile_for_statistics, statistic_step, train
from test_fisher import curvlinops_type2_factors, statistics_after_one_step
from test_quadratic_step import assert_minimizer, flat

DTYPE = torch.float64
LINEARS = ["inp", "b1.fc1", "b1.fc2", "b2.fc1", "b2.fc2", "out"]


class Block(nn.Module):
    """A residual block whose branch depends on the value of its hidden activation."""

    def __init__(self, d=6, hidden=8):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        h = F.relu(self.fc1(x.to(self.fc1.weight.dtype)))  # reading a parameter's dtype is no use of it
        if (h > 0).float().mean() > 0.5:  # data-dependent: neither torch.fx nor torch.export takes it
            h = h * 0.5
        return x + self.fc2(h)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.b1, self.b2, self.out = nn.Linear(5, 6), Block(), Block(), nn.Linear(6, 3)
        self.to(DTYPE)

    def forward(self, x):
        return self.out(self.b2(self.b1(self.inp(x))))


def batch(seed, n=8, d=5, classes=3):
    """For Net() as initialized: seed 0, b1 keeps h; seed 2, b1 halves it (b2 halves it on both)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=DTYPE), torch.randint(0, classes, (n,), generator=g)


def branch_batch(model: Net, halved: bool):
    """The first batch on which b1 of `model` (at its current parameters) halves h, or keeps it."""
    for seed in range(100):
        x, y = batch(seed)
        with torch.no_grad():
            if bool((F.relu(model.b1.fc1(model.inp(x))) > 0).float().mean() > 0.5) == halved:
                return x, y
    raise AssertionError("no batch takes the branch")


def hook_diag(calls, bias: bool) -> torch.Tensor:
    """diag = N Σ_n (Σ_calls g_n ā_nᵀ)², [W b] layout, from the hooks' records of one layer's calls: the
    per-example gradient of the batch loss sums the example's terms of every call."""
    per_example = sum(torch.einsum("no,ni->noi", g, augment(a, bias)) for a, g in calls)
    return per_example.shape[0] * per_example.square().sum(0)


def assert_statistics_match(c, model, names, x, y, approx="expand", **kwargs):
    """One statistic step of c on (x, y) (`kwargs`: the forward's keyword inputs): A, S of each layer vs
    the hooks, and the per-example diagonal."""
    ref = hook_statistics(model, names, x, y, approx, **kwargs)
    calls, _ = record_linear_calls(model, names, x, y, **kwargs)
    statistic_step(c, x, y, **kwargs)
    for name in names:
        got = c.statistics(name)
        torch.testing.assert_close(got["A"], ref[name]["A"], **TOL)
        torch.testing.assert_close(got["S"], ref[name]["S"], **TOL)
        torch.testing.assert_close(got["diag"], hook_diag(calls[name], True), **TOL)


# ----------------------------------------------------------------------------- the report


def test_the_layers_of_a_data_dependent_block_are_blocks_called_by_its_code():
    """Before: b1 and b2 were opaque and their four layers (91% of the parameters) fell back."""
    c = gnfx.compile(Net(), optimizer="kfac", loss="cross_entropy")
    c(batch(0)[0])  # captured at the first call: torch.export fails on the branch, fx keeps b1, b2 opaque
    assert c.layers.form == "fx" and sorted(c.layers.leaves) == ["b1", "b2"]
    assert [b.name for b in c.layers] == LINEARS and not c.layers.fallbacks
    assert [b.called_by for b in c.layers] == [None, "b1", "b1", "b2", "b2", None]
    assert not any(b.model_input or b.model_output for b in c.layers if b.called_by)
    report = c.report()
    assert "(100.0%)" in report
    assert "b1.fc1.weight  8x6    block b1.fc1 (called by the Python code of opaque submodule 'b1')" in report
    assert "    b1.fc1: opened: its layers are curvature blocks" in report


# ----------------------------------------------------------------------------- statistics


class InPlaceBlock(Block):
    """Block with its activation an nn.ReLU(inplace=True) (or not) called by its own Python code on the output
    of its opened fc1, as torchvision's and timm's blocks call `self.act(self.bn(x))`."""

    def __init__(self, in_place: bool):
        super().__init__()
        self.act = nn.ReLU(inplace=in_place)

    def forward(self, x):
        h = self.act(self.fc1(x))
        if (h > 0).float().mean() > 0.5:
            h = h * 0.5
        return x + self.fc2(h)


@pytest.mark.parametrize("fisher", ["empirical", "type2"])
def test_an_opened_layers_output_written_over_in_place_by_the_opaque_code_keeps_its_statistics(fisher):
    """fc1's output goes back to the opaque block's code, whose in-place ReLU overwrote it: the true Fisher's
    backward then differentiated with respect to the activation. Every block's S equals the out-of-place
    twin's, over two statistic steps."""
    twins = []
    for in_place in (True, False):
        model = Net()
        model.b1, model.b2 = InPlaceBlock(in_place).to(DTYPE), InPlaceBlock(in_place).to(DTYPE)
        model.load_state_dict(Net().state_dict())
        options = {"fisher": fisher, "loss": "cross_entropy"} if fisher != "empirical" else {}
        twins.append(compile_for_statistics(model, capture="fx", optimizer="kfac", **options))
    for seed in range(2):
        for c in twins:
            statistic_step(c, *batch(seed))
        assert sorted(twins[0].layers.leaves) == ["b1", "b2"] and [b.name for b in twins[0].layers] == LINEARS
        for name in LINEARS:
            torch.testing.assert_close(twins[0].statistics(name)["S"], twins[1].statistics(name)["S"], **TOL)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_statistics_of_opened_layers_equal_the_hooks_on_either_branch(approx):
    model = Net()
    c = compile_for_statistics(model, capture="fx", optimizer="kfac", kfac_approx=approx)
    for halved in (False, True, False):
        assert_statistics_match(c, model, LINEARS, *branch_batch(model, halved), approx)


class Repeat(nn.Module):
    """Its layer is called once, or twice when its input's mean is positive."""

    def __init__(self, d=6):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        if x.mean() > 0:
            h = torch.tanh(self.fc(h))
        return h


class Skip(nn.Module):
    """Its layer is called when its input's mean is positive, else not at all."""

    def __init__(self, d=6):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.fc(x)) if x.mean() > 0 else x


class Around(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.body, self.out = nn.Linear(5, 6), body, nn.Linear(6, 3)
        self.to(DTYPE)

    def forward(self, x):
        return self.out(self.body(self.inp(x)))


def signed_batch(model: Around, sign: int, seed=0):
    """A batch whose body input `inp(x)` has mean `sign` (±1): each row shifted along w, the mean of
    inp's rows, as inp(x).mean() = mean_n w·x_n + mean(b)."""
    x, y = batch(seed)
    with torch.no_grad():
        w = model.inp.weight.mean(0)
        x = x + (sign - model.inp(x).mean()) * w / (w @ w)
        torch.testing.assert_close(model.inp(x).mean(), torch.tensor(float(sign), dtype=DTYPE))
    return x, y


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_a_layer_called_twice_pools_its_calls_as_a_tied_weight(approx):
    """One site per call, as for a weight tied across sites: A and S over the rows of both calls, and
    the per-example diagonal of the sum of both calls' terms (squared after summing)."""
    model = Around(Repeat())
    c = compile_for_statistics(model, capture="fx", optimizer="kfac", kfac_approx=approx)
    assert c.layers["body.fc"].called_by == "body"
    for sign in (1, -1, 1):  # two calls, one call, two calls
        assert_statistics_match(c, model, ["inp", "body.fc", "out"], *signed_batch(model, sign), approx)


def test_a_layer_skipped_by_a_forward_gets_nothing_from_it():
    """A forward that does not call the layer adds no statistics (its weight gets no gradient from it
    either): on a step of such forwards its statistics keep their average, and a later forward that
    calls it collects as before."""
    model = Around(Skip())
    c = compile_for_statistics(model, capture="fx", optimizer="kfac")
    assert_statistics_match(c, model, ["inp", "body.fc", "out"], *signed_batch(model, 1))
    before = {k: v.clone() for k, v in c.statistics("body.fc").items()}
    updates = c.optimizer.statistics["body.fc"].updates
    weight = model.body.fc.weight.detach().clone()
    x, y = signed_batch(model, -1, seed=1)
    assert_statistics_match(c, model, ["inp", "out"], x, y)
    assert c.optimizer.statistics["body.fc"].updates == updates
    for k, v in c.statistics("body.fc").items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    torch.testing.assert_close(model.body.fc.weight, weight, rtol=0, atol=0)
    assert_statistics_match(c, model, ["inp", "body.fc", "out"], *signed_batch(model, 1, seed=2))


class Teacher(nn.Module):
    """Calls its layer once without gradients (a target) and once with them."""

    def __init__(self, d=6):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        with torch.no_grad():
            target = torch.tanh(self.fc(2 * x))
        h = torch.tanh(self.fc(x))
        return (h if h.mean() < 1e6 else -h) + target  # data-dependent


def test_a_call_without_gradients_adds_nothing():
    """A call under torch.no_grad has no output gradient: its input must not enter A either (A and S
    over the rows of the calls that are backpropagated)."""
    model = Around(Teacher())
    c = compile_for_statistics(model, capture="fx", optimizer="kfac")
    x, y = batch(0)
    calls, M = record_linear_calls(model, ["body.fc"], x, y)
    assert [g is None for _, g in calls["body.fc"]] == [True, False]
    ref = kfac_factors([call for call in calls["body.fc"] if call[1] is not None], True, "expand", M)
    statistic_step(c, x, y)
    for k in ("A", "S"):
        torch.testing.assert_close(c.statistics("body.fc")[k], ref[k], **TOL)


class Checkpointed(nn.Module):
    """Calls its layer through activation checkpointing (reentrant: the forward under torch.no_grad,
    recomputed in backward; non-reentrant: recomputed in backward), or plainly (`reentrant` None)."""

    def __init__(self, reentrant: bool | None, d=6):
        super().__init__()
        self.fc, self.reentrant = nn.Linear(d, d), reentrant

    def forward(self, x):
        h = self.fc(x) if self.reentrant is None else checkpoint(self.fc, x, use_reentrant=self.reentrant)
        return torch.tanh(h) if h.mean() < 1e6 else h  # data-dependent


@pytest.mark.parametrize("reentrant", [True, False])
def test_a_checkpointed_call_collects_as_a_plain_one(reentrant):
    torch.manual_seed(3)
    plain = Around(Checkpointed(None))
    torch.manual_seed(3)
    model = Around(Checkpointed(reentrant))
    c = compile_for_statistics(model, capture="fx", optimizer="kfac")
    x, y = batch(0)
    ref = hook_statistics(plain, ["body.fc"], x, y)
    statistic_step(c, x, y)
    for k in ("A", "S"):
        torch.testing.assert_close(c.statistics("body.fc")[k], ref["body.fc"][k], **TOL)


def test_type2_fisher_statistics_of_opened_layers_equal_curvlinops():
    """The true-Fisher backward differentiates with respect to the opened layers' outputs as to the
    graph's (fisher="type2": exact; curvlinops hooks the uncompiled model)."""
    x, y = batch(2)
    ref = curvlinops_type2_factors(Net(), LINEARS, x, y, "cross_entropy")
    got, c = statistics_after_one_step(Net(), x, y, "cross_entropy", LINEARS, fisher="type2", capture="fx")
    assert c.layers["b1.fc1"].called_by == "b1"
    for name in LINEARS:
        torch.testing.assert_close(got[name]["A"], ref[name]["A"], **TOL)
        torch.testing.assert_close(got[name]["S"], ref[name]["S"], **TOL)


def test_mc_fisher_statistics_of_opened_layers_converge_to_type2():
    x, y = batch(2)
    exact, _ = statistics_after_one_step(Net(), x, y, "cross_entropy", LINEARS, fisher="type2", capture="fx")
    torch.manual_seed(0)
    got, _ = statistics_after_one_step(Net(), x, y, "cross_entropy", LINEARS, fisher="mc", mc_samples=2000,
                                       capture="fx")
    for name in ("b1.fc1", "b2.fc2"):
        torch.testing.assert_close(got[name]["A"], exact[name]["A"], **TOL)
        assert (got[name]["S"] - exact[name]["S"]).norm() < 0.1 * exact[name]["S"].norm()


# ----------------------------------------------------------------------------- the forward and training


def test_outputs_over_calls_are_the_models_and_the_model_keeps_its_layers():
    model = Net()
    reference = copy.deepcopy(model)
    c = gnfx.compile(model, optimizer="kfac", capture="fx", lr=0.1)
    layer = model.b1.fc1
    for seed in (0, 2, 0, 2):  # statistic forwards (no step yet): the instrumented graph runs
        x, _ = batch(seed)
        torch.testing.assert_close(c(x), reference(x), rtol=0, atol=0)
        assert model.b1.fc1 is layer and type(model.b1).forward is Block.forward
    assert c.optimizer.statistics["b1.fc1"]._staged  # the opened layer's tap ran
    c.eval()
    for seed in (0, 2):
        x, _ = batch(seed)
        torch.testing.assert_close(c(x), reference(x), rtol=0, atol=0)


def test_training_at_the_defaults_lowers_the_loss():
    """optimizer="kfac" with loss=: step="quadratic", fisher="mc", every layer a K-FAC block."""
    model = Net()
    c = gnfx.compile(model, optimizer="kfac", loss="cross_entropy")
    x, y = batch(2, n=32)
    losses = train(c, x, y, cross_entropy, 15)
    assert {b.preconditioner for b in c.layers} == {"kfac"} and not c.layers.fallbacks
    assert c.optimizer.statistics["b1.fc1"].updates >= 1
    assert losses[-1] < 0.5 * losses[0], losses


def dense_ggn(model: nn.Module, x, y) -> torch.Tensor:
    """G = Σ_n J_nᵀ H_n J_n of the mean cross-entropy, by reverse-mode Jacobians (no vmap: the model
    branches on values), H_n = (diag(p_n) - p_n p_nᵀ)/N."""
    names = [n for n, _ in model.named_parameters()]
    theta = flat(p.detach() for p in model.parameters())
    shapes = [p.shape for p in model.parameters()]

    def output(t):
        params, start = {}, 0
        for n, s in zip(names, shapes):
            params[n] = t[start:start + s.numel()].reshape(s)
            start += s.numel()
        return torch.func.functional_call(model, params, (x,))

    J = torch.autograd.functional.jacobian(output, theta)  # (N, C, P)
    p = torch.softmax(output(theta), dim=-1).detach()
    H = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / x.shape[0]
    return torch.einsum("ncp,ncd,ndq->pq", J, H, J)


def test_quadratic_step_alpha_and_mu_minimize_the_dense_ggn_quadratic():
    """The quadratic step replays the model's own forward (its branches included): with opened layers in
    K-FAC blocks, (α, μ) still minimize q over the plane of the proposal and the previous update."""
    model = Net()
    c = gnfx.compile(model, optimizer="kfac", loss="cross_entropy", capture="fx", stat_every=1, inv_every=1)
    params = list(model.parameters())
    previous, solved = None, 0
    for seed in (0, 2, 0, 2):
        x, y = batch(seed)
        cross_entropy(c(x), y).backward()
        theta0 = flat(p.detach() for p in params).clone()
        g = flat(p.grad for p in params)
        G = dense_ggn(model, x, y)
        c.step()
        c.zero_grad()
        last, s = c.optimizer.last_step, flat(p.detach() for p in params) - theta0
        if last["rejected"]:
            previous = None
            continue
        _, q, _ = assert_minimizer(g, G, last, s, previous)
        assert last["predicted"] == pytest.approx(-q, rel=1e-9)
        solved += previous is not None  # a 2x2 solve for (α, μ)
        previous = s
    assert solved >= 2


def test_torch_compile_trains_as_without_it():
    """Statistic steps run the opened layers' graphs eagerly; the other steps, compiled, the model."""
    torch._dynamo.reset()
    runs = []
    for wrap in (lambda m: m, lambda m: torch.compile(m, backend="eager")):
        model = Net()
        c = gnfx.compile(model, optimizer="kfac", capture="fx", lr=0.1, stat_every=2, inv_every=2)
        runner = wrap(c)
        for seed in (0, 2, 0, 2, 0):
            x, y = batch(seed)
            cross_entropy(runner(x), y).backward()
            c.step()
            c.zero_grad()
        runs.append((dict(model.named_parameters()), c.statistics("b1.fc1")))
    torch._dynamo.reset()
    for name, p in runs[0][0].items():
        torch.testing.assert_close(runs[1][0][name], p, rtol=1e-10, atol=1e-12)
    for k, v in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][k], v, rtol=1e-10, atol=1e-12)


class Hidden(collections.OrderedDict):
    """A dict subclass returned by a forward, read by attribute: Hugging Face's ModelOutput (a dataclass
    and an OrderedDict at once) stands for it as a subclass without dataclass fields does."""

    def __getattr__(self, name):
        return self[name]


@dataclasses.dataclass
class HiddenFields(collections.OrderedDict):
    """ModelOutput's own form: a dataclass over an OrderedDict, built by keyword."""

    hidden: torch.Tensor = None

    def __post_init__(self):
        self["hidden"] = self.hidden


class Encoder(nn.Module):
    """A traceable child (not a torch layer) returning a mapping of its hidden states."""

    def __init__(self, output_type, d=6):
        super().__init__()
        self.output_type, self.fc = output_type, nn.Linear(d, d)

    def forward(self, x):
        return self.output_type(hidden=torch.tanh(self.fc(x)))


class ReadsHidden(nn.Module):
    """YOLOS' pattern: its opaque code reads the `.hidden` of its opened encoder's output."""

    def __init__(self, output_type):
        super().__init__()
        self.encoder = Encoder(output_type)

    def forward(self, x):
        h = self.encoder(x).hidden
        return h if h.mean() > 0 else -h


@pytest.mark.parametrize("output_type", [Hidden, HiddenFields])
def test_an_opened_child_returning_a_dict_subclass_returns_that_type_to_the_opaque_code(output_type):
    """Before: torch.fx's graph of the encoder returned a plain dict and `.hidden` raised an AttributeError
    (YOLOS: 'dict' object has no attribute 'last_hidden_state'). The statistics are the hooks'."""
    model = Around(ReadsHidden(output_type))
    c = compile_for_statistics(model, capture="fx", optimizer="kfac")
    assert c.layers["body.encoder.fc"].called_by == "body"
    for sign in (1, -1):
        x, y = signed_batch(model, sign)
        assert_statistics_match(c, model, ["inp", "body.encoder.fc", "out"], x, y)


# ----------------------------------------------------------------------------- what is not opened


class ReadsBias(Skip):
    """Adds its layer's bias by hand besides calling the layer: a use the layer's statistics do not see, read
    in a method other than forward, whose source the capture does not read (a read in forward's own source
    closes the layer at capture: test_an_embedding_whose_weight_the_opaque_code_reads_as_a_table_is_not_opened)."""

    def forward(self, x):
        return super().forward(x) + self.extra()

    def extra(self):
        return self.fc.bias


def test_a_parameter_the_opaque_code_uses_besides_its_layer_raises_with_the_fix():
    model = Around(ReadsBias())
    c = gnfx.compile(model, optimizer="kfac", capture="fx", lr=0.1)
    assert c.layers["body.fc"].called_by == "body"
    out = c(signed_batch(model, 1)[0])
    with pytest.raises(gnfx.GnfxError, match=r"'body' uses the parameter 'body.fc.bias' other than by calling "
                                             r"'body.fc'.*leaf_modules=\['body'\]"):
        out.sum().backward()
    kept = gnfx.compile(Around(ReadsBias()), optimizer="kfac", capture="fx", lr=0.1, leaf_modules=["body"])
    kept(signed_batch(model, 1)[0]).sum().backward()  # the fix: kept whole, it falls back
    assert "body.fc" not in kept.layers


class EulerStepAdjoint(torch.autograd.Function):
    """torchdiffeq's odeint_adjoint reduced to one Euler step y + f(y): it takes f's parameters as inputs, runs
    f without a graph in its forward and computes their gradient in its own backward, calling f again."""

    @staticmethod
    def forward(ctx, f, y, *params):
        ctx.f = f
        ctx.save_for_backward(y)
        with torch.no_grad():
            return y + f(y)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        with torch.enable_grad():
            y = y.detach().requires_grad_()
            inputs = (y, *ctx.f.parameters())
            grads = torch.autograd.grad(ctx.f(y), inputs, g, allow_unused=True)
        grads = [torch.zeros_like(i) if d is None else d for d, i in zip(grads, inputs)]  # as torchdiffeq does
        return (None, g + grads[0], *grads[1:])


class AdjointStep(Skip):
    """Skip's branch, its layer stepped by EulerStepAdjoint (an ODE block under odeint_adjoint)."""

    def forward(self, x):
        return EulerStepAdjoint.apply(self.fc, x, *self.fc.parameters()) if x.mean() > 0 else x


def test_parameters_a_custom_autograd_function_takes_raise_naming_it_and_the_fix():
    """torchdiffeq's odeint_adjoint(func, y0, t) passes func.parameters() to its autograd.Function: the error
    named code reading the parameter only, which the user's code does not do. It names the Function, the
    adjoint and both fixes (odeint; the block kept whole)."""
    model = Around(AdjointStep())
    c = gnfx.compile(model, optimizer="kfac", capture="fx", lr=0.1)
    out = c(signed_batch(model, 1)[0])
    with pytest.raises(gnfx.GnfxError, match=r"(?s)'body.fc.\w+' other than by calling 'body.fc'.*"
                                             r"torch.autograd.Function.*odeint_adjoint.*odeint,.*leaf_modules=\['body'\]"):
        out.sum().backward()
    kept = gnfx.compile(Around(AdjointStep()), optimizer="kfac", capture="fx", lr=0.1, leaf_modules=["body"])
    kept(signed_batch(model, 1)[0]).sum().backward()
    kept.step()


class QueryTable(nn.Module):
    """DETR's object queries: an nn.Embedding never called, its weight read as a table by the opaque code
    (`self.queries.weight.unsqueeze(0).repeat(N, 1, 1)`), beside a layer it calls (whose dtype it reads)."""

    def __init__(self, d=6, queries=2):
        super().__init__()
        self.queries, self.fc = nn.Embedding(queries, d), nn.Linear(d, d)

    def forward(self, x):
        h = self.fc(x.to(self.fc.weight.dtype))
        h = (h[:, None] + self.queries.weight.unsqueeze(0).repeat(x.shape[0], 1, 1)).mean(1)
        return h if h.mean() > 0 else -h


def test_an_embedding_whose_weight_the_opaque_code_reads_as_a_table_is_not_opened():
    """Before: `queries` was opened into an embedding block that no call reaches, and the first backward
    raised a GnfxError ('uses the parameter body.queries.weight other than by calling body.queries'): DETR,
    Conditional and Deformable DETR, Mask2Former, MaskFormer. Now it falls back with the reason, `fc` (whose
    dtype only is read) is opened, and the statistics are the hooks'."""
    model = Around(QueryTable())
    c = compile_for_statistics(model, capture="fx", optimizer="kfac")
    assert c.layers.opened["body.queries"] == (
        "not opened: the Python code of QueryTable.forward reads its parameter 'self.queries.weight' by attribute, "
        "besides any call of the layer, which the block's statistics would not see")
    assert [f.param for f in c.layers.fallbacks] == ["body.queries.weight"]
    assert c.layers["body.fc"].called_by == "body"
    for sign in (1, -1):
        x, y = signed_batch(model, sign)
        assert_statistics_match(c, model, ["inp", "body.fc", "out"], x, y)


class Coupling(nn.Module):
    """A child with a public method other than forward (normflows' flows: `inverse`)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return torch.tanh(self.fc(x))

    def inverse(self, z):
        return self.fc(torch.atanh(z))


class Documented(nn.Module):
    """Opaque code that names its children's method, layer and weight in docstrings and comments only:
    `self.block.inverse(z)` would undo `self.block(x)`, whose layer is `self.block.fc(x)`."""

    def __init__(self):
        super().__init__()
        self.block, self.norm = Coupling(), nn.LayerNorm(6)

    def forward(self, x):
        """self.block(x) applies the coupling, self.block.inverse(z) would undo it, self.block.fc(x) is its
        layer, and self.norm.weight.sum() the norm's total scale."""
        h = self.norm(self.block(x))  # not self.block.fc(h), nor self.norm.weight * h
        return h if h.mean() < 1e6 else -h  # data-dependent: opaque


def test_children_named_in_docstrings_and_comments_only_are_opened():
    """Before: the text search of the code took the docstrings' and comments' `self.block.inverse(z)`, `self.block.fc(x)`
    and `self.norm.weight.sum()` for calls and a read, and kept both children closed, their parameters falling back;
    the code's calls are now read from its syntax tree (passes/opaque_children.py)."""
    model = Around(Documented())
    c = compile_for_statistics(model, capture="fx", optimizer="kfac")
    assert c.layers.opened["body.block"] == c.layers.opened["body.norm"] == OPENED
    assert not c.layers.fallbacks
    for sign in (1, -1):
        x, y = signed_batch(model, sign)
        assert_statistics_match(c, model, ["inp", "body.block.fc", "out"], x, y)


class Mixed(nn.Module):
    """An opaque block with layers that cannot be opened, and one that can."""

    def __init__(self, shared: nn.Parameter):
        super().__init__()
        self.up = nn.ConvTranspose1d(2, 2, 3)  # forward(input, output_size=None): two inputs
        self.shared = nn.Linear(6, 6)
        self.shared.weight = shared  # also the model's `head.weight`
        self.lin, self.peek = nn.Linear(6, 6), nn.Linear(6, 6)  # peek's bias is also read by the model
        self.pruned = nn.Linear(6, 6)
        self.pruned.register_forward_pre_hook(lambda m, args: None)  # a pre-hook: the call is not lowered

    def forward(self, x):
        h = self.lin(x) + self.pruned(x) + self.peek(x)
        if h.mean() > 0:
            h = -h
        return h + self.up(h.unflatten(-1, (2, 3))).flatten(-2)[..., :6] + self.shared(h)


class WithMixed(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(6, 6)
        self.inp, self.mixed, self.out = nn.Linear(5, 6), Mixed(self.head.weight), nn.Linear(6, 3)
        self.to(DTYPE)

    def forward(self, x):
        return self.out(self.head(self.mixed(self.inp(x))) + self.mixed.peek.bias)


def test_layers_that_cannot_be_opened_fall_back_with_the_reason():
    c = compile_for_statistics(WithMixed(), capture="fx", optimizer="kfac")
    opened = c.layers.opened
    assert opened["mixed.lin"].startswith("opened")
    assert opened["mixed.up"] == ("not opened: its forward takes optional or variadic inputs, which an opened "
                                  "child's graph would fix")
    assert opened["mixed.shared"] == ("not opened: its parameter 'mixed.shared.weight' is also registered as "
                                      "'head.weight' (shared)")
    assert opened["mixed.peek"] == ("not opened: its parameter 'mixed.peek.bias' is also read by the captured graph "
                                    "outside the submodule")
    assert opened["mixed.pruned"].startswith("not opened: its graph has no curvature block ('mixed.pruned.weight': "
                                             "inside module 'mixed.pruned'")
    assert [b.name for b in c.layers] == ["inp", "mixed.lin", "out"]
    reasons = {f.param: f.reason for f in c.layers.fallbacks}
    assert "mixed.up not opened: its forward takes optional or variadic inputs" in reasons["mixed.up.weight"]
    assert reasons["head.weight"].startswith("inside leaf module 'mixed'")
    assert "    mixed.up: not opened: its forward takes optional or variadic inputs" in c.report()
    x, y = batch(0)
    statistic_step(c, x, y)  # runs, and the opened layer collects
    assert set(c.statistics("mixed.lin")) == set(ALL)


def test_a_submodule_kept_opaque_on_request_stays_whole():
    c = gnfx.compile(Net(), optimizer="kfac", capture="fx", lr=0.1, leaf_modules=["b1"])
    assert "b1.fc1" not in c.layers and "b2.fc1" in c.layers
    assert not any(path.startswith("b1.") for path in c.layers.opened)


# ----------------------------------------------------------------------------- other layer kinds


class Gated(nn.Module):
    """`layer`, then a branch on the value of its output unless `traceable` (the same computation:
    the branch is never taken on these inputs)."""

    def __init__(self, layer: nn.Module, traceable: bool):
        super().__init__()
        self.layer, self.traceable = layer, traceable

    def forward(self, x):
        h = self.layer(x)
        if not self.traceable and h.abs().max() > 1e6:
            h = h / h.abs().max()
        return h


class KindNet(nn.Module):
    """x -> Gated(layer) -> mean over everything but the batch and the channels -> Linear head."""

    LAYERS = {"conv1d": lambda: nn.Conv1d(2, 3, 3, padding=1), "conv2d": lambda: nn.Conv2d(2, 3, 3, stride=2),
              "conv3d": lambda: nn.Conv3d(2, 3, 2), "embedding": lambda: nn.Embedding(7, 3),
              "layer_norm": lambda: nn.LayerNorm(3)}
    INPUTS = {"conv1d": (2, 5), "conv2d": (2, 5, 5), "conv3d": (2, 3, 3, 3), "embedding": (4,), "layer_norm": (4, 3)}

    def __init__(self, kind: str, traceable: bool):
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.body, self.head = Gated(self.LAYERS[kind](), traceable), nn.Linear(3, 3)
        if kind == "layer_norm":  # not the identity affine map
            nn.init.normal_(self.body.layer.weight)
            nn.init.normal_(self.body.layer.bias)
        self.to(DTYPE)

    def forward(self, x):
        h = self.body(x)
        h = h.flatten(2).mean(-1) if self.kind.startswith("conv") else h.mean(1)
        return self.head(h)


def kind_batch(kind: str, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (n, *KindNet.INPUTS[kind])
    x = torch.randint(0, 7, shape, generator=g) if kind == "embedding" else torch.randn(shape, generator=g, dtype=DTYPE)
    return x, torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("kind", list(KindNet.LAYERS))
def test_opened_conv_embedding_and_norm_layers_collect_what_the_traced_layer_does(kind):
    """The layer opened inside the opaque Gated and the same layer traced in the graph (the model
    without the branch, the same weights) collect the same statistics on the same batch (the graph's
    are checked against hooks and per-example gradients in the tests of each kind)."""
    opened = compile_for_statistics(KindNet(kind, traceable=False), capture="fx", optimizer="kfac")
    traced = compile_for_statistics(KindNet(kind, traceable=True), capture="fx", optimizer="kfac")
    assert list(opened.layers.leaves) == ["body"] and not traced.layers.leaves
    assert opened.layers["body.layer"].called_by == "body" and not opened.layers.fallbacks
    assert opened.layers["body.layer"].kind == traced.layers["body.layer"].kind
    x, y = kind_batch(kind)
    for c in (opened, traced):
        statistic_step(c, x, y)
    for name in ("body.layer", "head"):
        got, ref = opened.statistics(name), traced.statistics(name)
        assert set(got) == set(ref)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], **TOL)


# ----------------------------------------------------------------------------- traceable subtrees


class Inner(nn.Module):
    """A traceable submodule: an nn.Linear, a hand-written linear map x Wᵀ of a parameter of its own,
    and a Gated layer (untraceable unless `traceable`)."""

    def __init__(self, traceable: bool):
        super().__init__()
        self.fc, self.w = nn.Linear(6, 6), nn.Parameter(torch.randn(6, 6) / 3)
        self.gate = Gated(nn.Linear(6, 6), traceable)

    def forward(self, x):
        return self.gate(torch.tanh(self.fc(x)) @ self.w.T)


class Outer(nn.Module):
    """Calls `inner` twice, around a branch on a value (unless `traceable`)."""

    def __init__(self, traceable: bool):
        super().__init__()
        self.inner, self.traceable = Inner(traceable), traceable

    def forward(self, x):
        h = self.inner(x)
        if not self.traceable and h.abs().max() > 1e6:
            h = h / h.abs().max()
        return self.inner(torch.tanh(h))


class Bypass(Outer):
    """Calls the opened `inner`'s layer past it, through a local name that no reading of the code connects to
    `inner` (called by its path, as `DirectBypass` calls it, the code is seen to call into `inner`, which is then
    walked into)."""

    def forward(self, x):
        layer = self.inner.fc
        return super().forward(x) + layer(x)


class DirectBypass(Outer):
    """Calls `inner`'s layer past it by its path."""

    def forward(self, x):
        return super().forward(x) + self.inner.fc(x)


def around_outer(traceable: bool, cls=Outer) -> Around:
    torch.manual_seed(1)  # Outer's parameters, then Around's
    return Around(cls(traceable))


def test_a_traceable_submodule_is_opened_whole_with_its_own_leaves_opened_in_turn():
    """Outer is opaque; Inner, which it calls twice, traces on its own (its hand-written x Wᵀ a block
    that no layer-by-layer opening would find), except its Gated, a leaf of Inner's graph whose
    layer is opened in turn. The statistics equal those of the same model without the branches."""
    opened = compile_for_statistics(around_outer(traceable=False), capture="fx", optimizer="kfac")
    traced = compile_for_statistics(around_outer(traceable=True), capture="fx", optimizer="kfac")
    names = ["inp", "body.inner.fc", "body.inner.w", "body.inner.gate.layer", "out"]
    assert [b.name for b in opened.layers] == [b.name for b in traced.layers] == names
    assert not opened.layers.fallbacks and not traced.layers.leaves
    assert sorted(opened.layers.leaves) == ["body", "body.inner.gate"]
    assert opened.layers.opened["body.inner"].startswith("opened")
    assert opened.layers.opened["body.inner.gate.layer"].startswith("opened")
    assert [b.called_by for b in opened.layers] == [None, "body", "body", "body.inner.gate", None]
    x, y = batch(0)
    torch.testing.assert_close(opened(x), traced(x), rtol=0, atol=0)
    for c in (opened, traced):
        c.zero_grad()
        statistic_step(c, x, y)
    for name in names:
        got, ref = opened.statistics(name), traced.statistics(name)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], **TOL)


def test_a_layer_of_an_opened_submodule_called_past_it_raises():
    model = around_outer(False, Bypass)
    c = gnfx.compile(model, optimizer="kfac", capture="fx", lr=0.1)
    assert c.layers["body.inner.fc"].called_by == "body"
    with pytest.raises(gnfx.GnfxError, match=r"uses the parameter 'body.inner.fc.(weight|bias)' other than by "
                                             r"calling 'body.inner'"):
        c(batch(0)[0]).sum().backward()


def test_a_submodule_whose_layer_the_code_calls_by_its_path_is_walked_into_not_opened():
    """Before: `inner` was opened and the first backward raised as for `Bypass` (torchaudio's HuBERTPretrainModel
    calls `self.wav2vec2.encoder.transformer(...)`, never `self.wav2vec2(...)`). Now `inner` is walked into, its
    layers blocks of the calls the code makes, and the gradients are the module's."""
    model = around_outer(False, DirectBypass)
    reference = copy.deepcopy(model)
    c = gnfx.compile(model, optimizer="kfac", capture="fx", lr=0.1)
    assert c.layers.opened["body.inner"].startswith("not opened: the Python code calling it calls its submodule 'fc'")
    x = batch(0)[0]
    c(x).sum().backward()
    reference(x).sum().backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-13)


class Scaled(nn.Module):
    """A traceable submodule whose forward reads a buffer of its own."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.register_buffer("scale", torch.full((6,), 2.0))

    def forward(self, x):
        return self.fc(x) * self.scale


class CallsScaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Scaled()

    def forward(self, x):
        h = self.inner(x)
        return h if h.mean() < 1e6 else -h  # data-dependent


def test_an_opened_submodule_reads_the_buffers_the_model_has_now():
    """`.double()` replaces the model's buffers; the opened submodule's graph, which holds the one it
    was captured with, is bound to the new one on the next statistic step (as the captured graph is)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), CallsScaled(), nn.Linear(6, 3))
    c = gnfx.compile(model, optimizer="kfac", capture="fx", lr=0.1)
    assert c.layers.opened["1.inner"].startswith("opened")
    c.double()
    with torch.no_grad():
        model[1].inner.scale.fill_(3.0)
    x = torch.randn(4, 5, dtype=DTYPE)
    torch.testing.assert_close(c(x), model(x), rtol=0, atol=0)


def qat_convolutions() -> nn.Module:
    """A convolution, BatchNorm and ReLU fused and prepared for quantization-aware training, as
    torch.ao.quantization (and torchvision.models.quantization's fuse_model(is_qat=True)) makes them: the
    ConvBnReLU2d's forward folds bn.weight / sqrt(bn.running_var + eps) into its convolution's weight and
    then calls bn; its FakeQuantize modules branch on their buffers' values, so torch.fx keeps it opaque."""
    import torch.ao.quantization as quantization  # noqa: PLC0415 - only this test uses it
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).train()
    quantization.fuse_modules_qat(model, [["0", "1", "2"]], inplace=True)
    model.qconfig = quantization.get_default_qat_qconfig("fbgemm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao.quantization's own
        return quantization.prepare_qat(model, inplace=True)


def test_the_fused_convolution_and_batchnorm_of_quantization_aware_training_stays_whole():
    """Before: its bn was opened into a norm block and the first backward raised a GnfxError, as the
    forward reads bn.weight to fold it into the convolution's weight (found on torchvision's quantizable
    resnet18 after fuse_model(is_qat=True) and prepare_qat). Now it falls back with the reason, and the
    compiled model's loss and gradients are the model's own."""
    model = qat_convolutions()
    reference = copy.deepcopy(model)
    c = gnfx.compile(model, optimizer="kfac", loss="cross_entropy", lr=0.1)
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 3, (8,))
    loss = F.cross_entropy(c(x), y)
    loss.backward()
    expected = F.cross_entropy(reference(x), y)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)
    assert "0" in c.layers.leaves and "0.bn" not in c.layers
    assert c.layers.opened["0.bn"] == ("not opened: inside 0, a fused convolution and BatchNorm of quantization-aware "
                                       "training (torch.ao.nn.intrinsic.qat), whose forward folds its bn's weight and "
                                       "running variance into the convolution's weight")
    reasons = {f.param: f.reason for f in c.layers.fallbacks}
    assert "0.bn not opened: inside 0, a fused convolution" in reasons["0.bn.weight"]
    c.step()  # the step runs


class CountedField(nn.Module):
    """torchdiffeq's ODE functions count their evaluations in their forward (odenet_mnist's `self.nfe += 1`)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.nfe = 0

    def forward(self, x):
        self.nfe += 1
        return torch.tanh(self.fc(x))


@pytest.mark.parametrize("capture", ["auto", "fx"])
def test_a_forward_that_counts_its_calls_stays_opaque_with_its_layer_a_block(capture):
    """The captured graphs dropped `self.nfe += 1`: the counter stopped on every statistic step (odenet_mnist's NFE
    read 0 there), silently, in both captures. The counting module now runs as its own code, its layer opened
    (statistics against hooks), the count the plain module's; torch.export asked for alone names the attribute."""
    model = Around(CountedField())
    reference = Around(CountedField())
    c = gnfx.compile(model, optimizer="kfac", capture=capture, lr=0.1, stat_decay=0.0, stat_every=1)
    for _ in range(3):
        x, y = signed_batch(model, 1)
        cross_entropy(c(x), y).backward()
        c.step()
        c.zero_grad()
    assert model.body.nfe == 3
    assert c.layers["body.fc"].called_by == "body"
    reference.load_state_dict(model.state_dict())
    x, y = signed_batch(model, 1)
    want = hook_statistics(reference, ["body.fc"], x, y)["body.fc"]
    cross_entropy(c(x), y).backward()
    c.step()
    for key in ("A", "S"):
        torch.testing.assert_close(c.statistics("body.fc")[key], want[key], rtol=1e-10, atol=1e-12)
    with pytest.raises(gnfx.CaptureError, match=r"(?s)torch.export could not capture.*CountedField 'body' changes its "
                                                r"attribute nfe \(0 -> 1\)"):
        gnfx.compile(Around(CountedField()), optimizer="kfac", capture="export", lr=0.1,
                     example_inputs=(signed_batch(model, 1)[0],))
