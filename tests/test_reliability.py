"""Bad models, bad numbers and interrupted runs: every one gets a clear error that names the module,
parameter or operation and the fix (or a fallback that the report shows), and none corrupts
training silently.

Models: untraceable code (top level: a warning with the line, the forward run as written and its
layers opened, and under capture='fx' a CaptureError with the line and the fix; a submodule: a leaf
the report names); in-place ops on tapped tensors (statistics equal the hook reference); one module
called with differently shaped inputs; parameters replaced, created or unfrozen after compile
(GnfxError naming them at the next statistic step); models wrapped by torch.compile or DDP
(ConfigError); buffers reassigned, with new shapes too (re-bound: the instrumented graph computes
what the original does); dict, tuple, namedtuple and dataclass outputs.
Numbers: half-precision models and autocast train with float32 statistics and factors; the loss
scale (1e-8 and 1e8 times the loss) and which preconditioners are invariant to it.
Checkpoints: bit-for-bit resume through torch.save / torch.load(weights_only=True) for every
preconditioner; a checkpoint of another architecture or plan is refused, naming what differs,
and loads nothing. Hyperparameters: every one of every preconditioner is validated at compile
time, naming it, its value and its valid range.
(The fault-injection suite, NaN gradients, failed decompositions and truncated checkpoints, is
tests/test_faults.py.)
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from gnfx.plan import BUDGETS
from references import (TOL, augment, cross_entropy, hook_statistics, layer_diag, per_example_fisher_diag,
                        record_linear_calls)

DTYPE = torch.float64
PRECONDITIONERS = ("diag", "rank1", "kfac", "shampoo", "soap", "ekfac")
EVERY_STEP = {  # statistics and refreshes on every step, so that the first step is preconditioned
    "diag": dict(),
    "rank1": dict(),
    "kfac": dict(inv_every=1),
    "shampoo": dict(start_preconditioning_step=0, precondition_frequency=1),
    "soap": dict(precondition_frequency=1),
    "ekfac": dict(inv_every=1),
}


class MLP(nn.Module):
    def __init__(self, d=5, hidden=6, classes=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(d, hidden)
        self.head = nn.Linear(hidden, classes)
        self.to(DTYPE)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x)))


def batch(shape=(8, 5), classes=3, seed=1, labels=None):
    g = torch.Generator().manual_seed(seed)
    labels = shape[:-1] if labels is None else labels
    return torch.randn(*shape, generator=g, dtype=DTYPE), torch.randint(0, classes, labels, generator=g)


def train_step(c, x, y, loss=cross_entropy):
    c.zero_grad()
    loss(c(x), y).backward()
    c.step()


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, **TOL)


def assert_statistics_equal_hooks(c, model, names, x, y, approx="expand", diag=True):
    """One statistic step of c on (x, y): A, S equal the hook reference on `model` (a copy of c's
    model before the step), diag the per-example gradients' (torch.func)."""
    ref = hook_statistics(model, names, x, y, approx)
    diags = per_example_fisher_diag(model, x, y, vectorized=False) if diag else None
    c.zero_grad()
    cross_entropy(c(x), y).backward()
    c.step()
    for name in names:
        got = c.statistics(name)
        assert_close(got["A"], ref[name]["A"])
        assert_close(got["S"], ref[name]["S"])
        if diag:
            assert_close(got["diag"], layer_diag(diags, name))


def statistics_compile(model, **hp):
    return gnfx.compile(model, **{"stat_every": 1, "stat_decay": 0.0, "statistics": ("A", "S", "diag"), **hp})


# ============================================================================= bad models
# ----------------------------------------------------------------------------- untraceable code


class DataDependent(MLP):
    def forward(self, x):
        if x.sum() > 0:  # a branch on a tensor's value: symbolic tracing cannot follow it
            return self.head(self.fc(x))
        return self.head(torch.tanh(self.fc(x)))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6).to(DTYPE)

    def forward(self, h):
        return self.lin(h) if h.mean() > 0 else -self.lin(h)


class WithBranchySubmodule(MLP):
    def __init__(self):
        super().__init__()
        self.sub = Branchy()

    def forward(self, x):
        return self.head(self.sub(torch.tanh(self.fc(x))))


def test_untraceable_top_level_forward_names_the_line_and_the_fixes():
    """capture='auto' used to raise the CaptureError below: it now warns naming the line, runs the forward
    as written (its output the model's own, on either side) and opens its layers into blocks."""
    c = gnfx.compile(DataDependent(), capture="fx")  # captured at the first call
    with pytest.raises(gnfx.CaptureError) as err:
        c(batch()[0])
    message = str(err.value)
    assert "DataDependent" in message and "if x.sum() > 0" in message
    assert "leaf_modules" in message and "torch.cond" in message and "capture='export'" in message
    model = DataDependent()
    c = gnfx.compile(model, optimizer="kfac", lr=0.1, stat_every=1)
    x, y = batch()
    with pytest.warns(RuntimeWarning, match="DataDependent") as caught:
        train_step(c, x, y)
    assert "if x.sum() > 0" in str(caught[0].message) and "torch.cond" in str(caught[0].message)
    assert [b.name for b in c.layers] == ["fc", "head"] and not c.layers.fallbacks
    for x in (x, -x):  # either side, through the opened graph (every step a statistic step)
        out = c(x)
        assert torch.equal(out, model(x))
        cross_entropy(out, y).backward()
        c.step()
        c.zero_grad()


def test_untraceable_submodule_becomes_a_leaf_that_the_report_names_and_that_still_trains():
    model = WithBranchySubmodule()
    c = gnfx.compile(model, optimizer="kfac", stat_every=1)
    before = model.sub.lin.weight.detach().clone()
    train_step(c, *batch())  # the first call captures: torch.export cannot either, so fx with a leaf
    report = c.report()
    assert "sub: could not be traced (TraceError" in report and "sub.lin: opened" in report
    assert not c.layers.fallbacks  # the leaf's nn.Linear is opened (passes/opaque_children.py)
    assert c.layers["sub.lin"].preconditioner == "kfac" and c.layers["sub.lin"].called_by == "sub"
    assert not torch.equal(before, model.sub.lin.weight) and torch.isfinite(model.sub.lin.weight).all()


# ----------------------------------------------------------------------------- in-place operations


class InplaceReLU(MLP):
    """nn.ReLU(inplace=True) overwrites the tapped output of fc."""

    def __init__(self):
        super().__init__()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.head(self.act(self.fc(x)))


class AugmentedAssignment(MLP):
    """`h += ...` and `h.mul_(...)` on a layer output, then F.relu(..., inplace=True)."""

    def __init__(self):
        super().__init__()
        self.skip = nn.Linear(5, 6).to(DTYPE)

    def forward(self, x):
        h = self.fc(x)
        h += self.skip(x)
        h.mul_(0.5)
        return self.head(F.relu(h, inplace=True))


class InplaceOnHeadInput(MLP):
    """torch.tanh_ on the input of head, after fc's output tap (the staged `a` of head is the
    overwritten tensor itself)."""

    def forward(self, x):
        h = self.fc(x)
        return self.head(torch.tanh_(h))


class InplaceAfterDropout(MLP):
    """An in-place op on the output of a dropout at p = 0, which returns fc's output itself (Wav2Vec2's feature
    projection: `hidden_states[~mask] = 0` after a dropout of p = 0)."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.0)

    def forward(self, x):
        h = self.drop(self.fc(x))
        h.masked_fill_(h < 0, 0.0)
        return self.head(h)


class InplaceAfterCast(MLP):
    """The same after F.dropout at p = 0 and a cast to the dtype h has, each of which returns its input."""

    def forward(self, x):
        h = F.dropout(self.fc(x), 0.0, self.training).to(x.dtype)
        h.mul_(0.5)
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("shape", [(8, 5), (4, 3, 5)])
@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("cls", [InplaceReLU, AugmentedAssignment, InplaceOnHeadInput, InplaceAfterDropout,
                                 InplaceAfterCast])
def test_in_place_ops_on_tapped_tensors_keep_outputs_gradients_and_statistics_exact(cls, capture, shape):
    """Also in torch.export's graphs, which keep the in-place ops as aten ops (`aten.add_.Tensor` of
    `h += ...`): there, with tokens (N, T, d), the tapped output was overwritten and fc's statistics never
    recorded (as for `x += self.pos_embedding[...]` right after a linear patch embedding)."""
    model = cls()
    x, y = batch(shape)
    c = statistics_compile(copy.deepcopy(model), optimizer="kfac", capture=capture)
    out, ref_out = c(x), model(x)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    cross_entropy(out, y).backward()
    cross_entropy(ref_out, y).backward()
    for (n, p), q in zip(c.named_parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-14, atol=1e-15, msg=n)
    c.zero_grad()
    model.zero_grad()
    names = [b.name for b in c.layers]
    assert_statistics_equal_hooks(statistics_compile(copy.deepcopy(model), optimizer="kfac", capture=capture), model,
                                  names, x, y)


# ----------------------------------------------------------------------------- one module, several shapes


class SharedAtTwoShapes(nn.Module):
    """fc is applied to x (N, d) and to t (N, T, d), the first and the other rows of the input
    (N, 1 + T, d): one block, two sites of different shapes. With `fold`, the tokens reach fc as
    (N·T, d), at the first or the second call: the batch is no longer the first dimension there."""

    def __init__(self, fold=None):
        super().__init__()
        torch.manual_seed(0)
        self.fold = fold
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)
        self.to(DTYPE)

    def tokens(self, t):
        if self.fold:
            return torch.tanh(self.fc(t.reshape(-1, t.shape[-1]))).reshape(t.shape).mean(1)
        return torch.tanh(self.fc(t)).mean(1)

    def forward(self, z):
        x, t = z[:, 0], z[:, 1:]
        if self.fold == "first":
            tokens = self.tokens(t)
            return self.head(torch.tanh(self.fc(x)) + tokens)
        h = torch.tanh(self.fc(x))
        return self.head(h + self.tokens(t))


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_a_module_called_with_two_shapes_pools_its_sites_like_the_hook_reference(approx):
    model = SharedAtTwoShapes()
    x, y = batch((8, 7, 4), labels=(8,))
    c = statistics_compile(copy.deepcopy(model), optimizer="kfac", kfac_approx=approx)
    assert [len(b.sites) for b in c.layers] == [2, 1]
    assert_statistics_equal_hooks(c, model, ["fc", "head"], x, y, approx)


PER_EXAMPLE = [dict(optimizer="kfac", kfac_approx="reduce"), dict(optimizer="diag", source="fisher"),
               dict(optimizer="ekfac")]
FOLDED = r"block 'fc': its input's first dimension \(48\) is not the batch \(8 examples.*as if the batch were one example"


def test_a_site_that_folds_the_batch_into_positions_works_with_expand():
    """expand needs no batch dimension: A and S equal the hook reference."""
    model = SharedAtTwoShapes(fold="second")
    x, y = batch((8, 7, 4), labels=(8,))
    c = gnfx.compile(copy.deepcopy(model), optimizer="kfac", stat_every=1, stat_decay=0.0)
    assert_statistics_equal_hooks(c, model, ["fc", "head"], x, y, "expand", diag=False)


@pytest.mark.parametrize("fold", ["first", "second"])
@pytest.mark.parametrize("hp", PER_EXAMPLE, ids=lambda hp: "-".join(map(str, hp.values())))
def test_a_site_that_folds_the_batch_warns_and_falls_back(hp, fold):
    """reduce, diag and eigen_diag need the batch first at every site; a site that folds it in
    (at the first or a later call) gets a warning naming the block and the fallback (expand, and
    the whole batch as one example), and A and S are then the expand ones."""
    model = SharedAtTwoShapes(fold=fold)
    c = gnfx.compile(copy.deepcopy(model), stat_every=1, stat_decay=0.0, statistics=("A", "S"), **hp)
    x, y = batch((8, 7, 4), labels=(8,))
    with pytest.warns(RuntimeWarning, match=FOLDED):
        cross_entropy(c(x), y).backward()
    c.step()
    calls, M = record_linear_calls(model, ["fc"], x, y, cross_entropy)
    rows_a = torch.cat([augment(a, True).reshape(-1, a.shape[-1] + 1) for a, _ in calls["fc"]])
    rows_g = torch.cat([g.reshape(-1, g.shape[-1]) for _, g in calls["fc"]])
    torch.testing.assert_close(c.statistics("fc")["A"], rows_a.T @ rows_a / len(rows_a), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(c.statistics("fc")["S"], M * rows_g.T @ rows_g, rtol=1e-10, atol=1e-12)
    assert all(torch.isfinite(v).all() for v in c.statistics("fc").values())


# ----------------------------------------------------------------------------- parameters changed after compile


def test_a_parameter_replaced_after_compile_is_named_at_the_next_statistic_step():
    model = MLP()
    c = gnfx.compile(model, optimizer="kfac", stat_every=2)
    x, y = batch()
    train_step(c, x, y)
    model.fc.weight = nn.Parameter(torch.randn(6, 5, dtype=DTYPE))
    train_step(c, x, y)  # step 1 collects nothing and is not checked
    with pytest.raises(gnfx.GnfxError, match=r"'fc\.weight' was replaced.*would not be trained.*copy_"):
        c(x)


@pytest.mark.parametrize("optimizer", ["diag", "shampoo"])
def test_parameters_created_or_unfrozen_after_compile_are_named(optimizer):
    """Also for a plan without statistics ("diag"): the check runs on every stat_every-th step."""
    model = MLP()
    model.head.bias.requires_grad_(False)
    c = gnfx.compile(model, optimizer=optimizer, stat_every=1)
    x, y = batch()
    train_step(c, x, y)
    model.head.bias.requires_grad_(True)
    model.extra = nn.Linear(2, 2)
    with pytest.raises(gnfx.GnfxError) as err:
        c(x)
    assert "'head.bias' was created, replaced or unfrozen" in str(err.value)
    assert "'extra.weight' was created, replaced or unfrozen" in str(err.value)


class BareParameter(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(6, 5, dtype=DTYPE))
        self.head = nn.Linear(6, 3).to(DTYPE)

    def forward(self, x):
        return self.head(torch.tanh(F.linear(x, self.w)))


def test_a_replaced_bare_parameter_is_named_and_in_place_changes_are_fine():
    model = BareParameter()
    c = gnfx.compile(model, optimizer="kfac", stat_every=1)
    x, y = batch()
    with torch.no_grad():
        model.w.copy_(torch.zeros(6, 5))  # in place: the same Parameter object, trained as before
    train_step(c, x, y)
    assert model.w.abs().sum() > 0
    model.w = nn.Parameter(model.w.detach().clone())
    with pytest.raises(gnfx.GnfxError, match="'w' was replaced"):
        c(x)


# ----------------------------------------------------------------------------- wrapped models


def test_models_wrapped_by_torch_compile_or_ddp_are_refused_with_the_fix(tmp_path):
    import torch.distributed as dist

    with pytest.raises(gnfx.ConfigError, match=r"torch.compile.*model._orig_mod"):
        gnfx.compile(torch.compile(MLP()))
    started = not dist.is_initialized()
    if started:  # DDP needs a process group: one of one process
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(gnfx.ConfigError, match=r"DistributedDataParallel.*model.module"):
            gnfx.compile(nn.parallel.DistributedDataParallel(MLP()))
    finally:
        if started:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- buffers reassigned


class WithBuffer(MLP):
    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.linspace(-1, 1, 5, dtype=DTYPE))

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x + self.shift)))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_reassigned_buffer_is_what_the_instrumented_graph_reads_whatever_its_shape(capture):
    """`model.shift = new` (a new tensor, also of a new shape): statistic steps (the instrumented
    graph) compute what the original forward does; a shape that does not fit fails as it does in
    the original."""
    model = WithBuffer()
    x, y = batch()
    c = gnfx.compile(model, optimizer="kfac", stat_every=1, capture=capture, example_inputs=(x,))
    for new in (torch.full((5,), 2.0, dtype=DTYPE), torch.ones(1, 5, dtype=DTYPE),
                torch.randn(3, 8, 5, dtype=DTYPE, generator=torch.Generator().manual_seed(0))):
        model.shift = new
        out = c(x)
        torch.testing.assert_close(out, model(x), rtol=0, atol=0)
        cross_entropy(out.reshape(-1, 3), y.repeat(out.numel() // 24)).backward()
        c.step()
        c.zero_grad()
        assert torch.isfinite(c.statistics("fc")["A"]).all()
    model.shift = torch.zeros(4, dtype=DTYPE)
    with pytest.raises(RuntimeError, match="size of tensor"):
        model(x)
    with pytest.raises(RuntimeError, match="size of tensor"):
        c(x)


# ----------------------------------------------------------------------------- structured outputs


@dataclasses.dataclass
class Output:
    logits: torch.Tensor
    hidden: torch.Tensor


Pair = collections.namedtuple("Pair", ["logits", "hidden"])


class Structured(MLP):
    """The MLP on tokens (N, T, d), returning its logits inside a dict/tuple/namedtuple/dataclass."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        logits = self.head(h)
        if self.kind == "dict":
            return {"logits": logits, "hidden": h}
        if self.kind == "tuple":
            return logits, h
        if self.kind == "namedtuple":
            return Pair(logits, h)
        return Output(logits, h)


def logits_of(out):
    return out["logits"] if isinstance(out, dict) else out[0] if isinstance(out, tuple) else out.logits


@pytest.mark.parametrize("capture", ["fx", "auto"])
@pytest.mark.parametrize("kind", ["dict", "tuple", "namedtuple", "dataclass"])
def test_structured_outputs_train_with_the_statistics_of_their_logits(kind, capture):
    """The first tensor of the output is the logits (N, T, C): N and the loss terms per example
    T come from it, so A and S equal the hook reference of the plain model."""
    x, y = batch((4, 3, 5))
    model = Structured(kind)
    c = statistics_compile(copy.deepcopy(model), optimizer="kfac", capture=capture, example_inputs=(x,))
    for _ in range(2):
        plain = MLP()  # the same parameters, returning the logits alone
        plain.load_state_dict(c.state_dict())
        ref = hook_statistics(plain, ["fc", "head"], x, y)
        out = c(x)
        assert type(out) is type(model(x))
        c.zero_grad()
        cross_entropy(logits_of(out), y).backward()
        c.step()
        for name in ("fc", "head"):
            assert_close(c.statistics(name)["A"], ref[name]["A"])
            assert_close(c.statistics(name)["S"], ref[name]["S"])


@pytest.mark.parametrize("registered", [False, True])
def test_a_dataclass_output_passes_through_torch_export(registered):
    """capture='fx' (and 'auto', which tries fx first) handle a dataclass output; torch.export
    returns its tensors and gnfx rebuilds the dataclass around them, registered as a pytree or not."""
    x, y = batch((4, 3, 5))

    @dataclasses.dataclass
    class Local:
        logits: torch.Tensor
        hidden: torch.Tensor

    class Model(MLP):
        def forward(self, x):
            h = torch.tanh(self.fc(x))
            return Local(self.head(h), h)

    if registered:
        torch.utils._pytree.register_dataclass(Local)
    try:
        model = Model()
        c = gnfx.compile(model, optimizer="kfac", stat_every=1, capture="export", example_inputs=(x,))
        out, expected = c(x), model(x)
        assert isinstance(out, Local)
        torch.testing.assert_close(out.logits, expected.logits, rtol=0, atol=0)
        torch.testing.assert_close(out.hidden, expected.hidden, rtol=0, atol=0)
        cross_entropy(out.logits, y).backward()
        c.step()
        assert c.optimizer.statistics["fc"].updates == 1
    finally:
        if registered:
            torch.utils._pytree._deregister_pytree_node(Local)


# ============================================================================= bad numbers
# ----------------------------------------------------------------------------- half precision


def half(model, mode):
    return model.to({"bfloat16": torch.bfloat16, "float16": torch.float16}.get(mode, torch.float32))


def _half_cases():
    for name in PRECONDITIONERS:
        for mode in ("bfloat16", "float16", "autocast"):
            yield pytest.param(name, mode, id=f"{name}-{mode}")


@pytest.mark.parametrize("name, mode", list(_half_cases()))
def test_half_precision_trains_without_nan_with_float32_statistics_and_factors(name, mode):
    """Pure bfloat16/float16 models and float32 models under torch.autocast(bfloat16) on the CPU.
    Statistics, every floating tensor of the curvature group states and the diagonal preconditioner's
    moments are float32 (in float16, Adam's ε = 1e-8 is 0 and (1-β₂)g² underflows: moments in the
    parameter's dtype, as torch.optim.AdamW keeps them, made the first step NaN)."""
    model = half(MLP(), mode)
    dtype = next(model.parameters()).dtype
    c = gnfx.compile(model, optimizer=name, lr=1e-2, stat_every=1, statistics=("A", "S", "diag"), **EVERY_STEP[name])
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
    losses = []
    for _ in range(4):
        c.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            out = c(x.to(dtype))
        loss = F.cross_entropy(out.float(), y)
        loss.backward()
        c.step()
        losses.append(loss.item())
    assert c.optimizer.skipped_steps == 0 and all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    assert all(p.dtype == dtype and torch.isfinite(p).all() for p in model.parameters())
    for block in ("fc", "head"):
        statistics = c.statistics(block)
        assert {"A", "S", "diag"} <= set(statistics) and {v.dtype for v in statistics.values()} == {torch.float32}
    for pre in c.optimizer.curvature:
        for state in pre.states().values():
            assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}
    for pre in c.optimizer.elementwise:
        for n in pre.param_names + [p for b in pre.blocks for p in b.params]:
            state = c.optimizer.state_of(n)
            assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32


# ----------------------------------------------------------------------------- the loss scale


def parameter_change(name, scale, hp):
    """The change of all parameters in one step on `scale` times the loss."""
    model = MLP(d=6, hidden=8, classes=4)
    c = gnfx.compile(model, optimizer=name, lr=1e-3, stat_every=1, **{**EVERY_STEP[name], **hp})
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, generator=g, dtype=DTYPE), torch.randint(0, 4, (32,), generator=g)
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    (scale * cross_entropy(c(x), y)).backward()
    c.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()]) - before


def cosine(u, v) -> float:
    # normalize first: F.cosine_similarity clamps the product of the norms at 1e-8, and the
    # steps of an undamped preconditioner on a loss times 1e8 are ~1e-11 long
    return float((u / u.norm()) @ (v / v.norm()))


def scaled_hparams(name, scale) -> dict:
    """Absolute hyperparameters in the units of the loss: damping added to a curvature of the
    empirical Fisher (which scales like loss²) times scale², Adam's ε (added to √v ∝ loss) times scale."""
    hp = {}
    if name in ("kfac", "ekfac", "rank1"):
        hp["damping"] = 1e-3 * scale ** 2
    if name in ("diag", "shampoo", "rank1", "soap"):
        hp["eps"] = 1e-8 * scale
    return hp


@pytest.mark.parametrize("scale", [1e-8, 1e8])
@pytest.mark.parametrize("name", PRECONDITIONERS)
def test_the_update_direction_is_invariant_to_the_loss_scale_with_damping_in_loss_units(name, scale):
    reference = parameter_change(name, 1.0, scaled_hparams(name, 1.0))
    assert cosine(parameter_change(name, scale, scaled_hparams(name, scale)), reference) > 0.999


def _not_invariant(reason):
    return pytest.mark.xfail(strict=True, reason=f"by design, not scale-invariant: {reason}")


ADAM_EPS = "Adam's ε=1e-8 is absolute; against √v ≈ 1e-9 of a loss times 1e-8 it dominates"
TIKHONOV = ("Tikhonov damping λ is absolute: added to A⊗S, which scales like loss², it vanishes for "
            "a loss times 1e8 (an undamped step) and dominates for 1e-8 (a gradient step)")


def _case(name, hp, scale, why=None):
    graft = "-graft=none" if hp else ""
    return pytest.param(name, hp, scale, marks=[_not_invariant(why)] if why else [], id=f"{name}{graft}-{scale:g}")


RANK1 = "λ of (Ĝ + λI)⁻¹ is absolute, Ĝ scales like loss²"
SHAMPOO = ("the direction L^-p G R^-p is invariant (ε relative to the largest eigenvalue), but the per-block "
           "step sizes grafted from Adam are not: " + ADAM_EPS)


@pytest.mark.parametrize("name, hp, scale", [
    _case("diag", {}, 1e-8, ADAM_EPS), _case("diag", {}, 1e8),
    _case("kfac", {}, 1e-8, TIKHONOV), _case("kfac", {}, 1e8, TIKHONOV),
    _case("ekfac", {}, 1e-8, TIKHONOV), _case("ekfac", {}, 1e8, TIKHONOV),
    _case("shampoo", {}, 1e-8, SHAMPOO), _case("shampoo", {}, 1e8),
    _case("shampoo", {"graft": "none"}, 1e-8), _case("shampoo", {"graft": "none"}, 1e8),
    _case("rank1", {}, 1e-8, RANK1), _case("rank1", {}, 1e8, RANK1),
    _case("soap", {}, 1e-8, ADAM_EPS), _case("soap", {}, 1e8),
])
def test_the_update_direction_with_default_hyperparameters_under_extreme_loss_scales(name, hp, scale):
    assert cosine(parameter_change(name, scale, hp), parameter_change(name, 1.0, hp)) > 0.999


# ============================================================================= checkpoints


CHECKPOINT_HP = dict(lr=2 ** -4, stat_every=2, weight_decay=2 ** -6)


def checkpoint_run(name, data, seed=0, **hp):
    c = gnfx.compile(MLP(seed=seed), optimizer=name, **{**CHECKPOINT_HP, **hp})
    for x, y in data:
        train_step(c, x, y)
    return c


def roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            assert v.dtype == b[k].dtype and torch.equal(v, b[k]), k
        elif isinstance(v, dict):
            assert_same_state(v, b[k])
        else:
            assert v == b[k], k


@pytest.mark.parametrize("name", PRECONDITIONERS)
def test_resume_through_torch_load_weights_only_is_bit_for_bit(name):
    """The compiled module's state_dict and the optimizer's, saved after 3 steps and loaded with
    weights_only=True into a fresh compile of a differently initialized model: 3 more steps equal
    the uninterrupted run's parameters, state, statistics and counters bit for bit."""
    data = [batch(seed=s) for s in range(6)]
    full = checkpoint_run(name, data)
    first = checkpoint_run(name, data[:3])
    saved = roundtrip({"model": first.state_dict(), "optimizer": first.optimizer.state_dict()})
    resumed = gnfx.compile(MLP(seed=5), optimizer=name, **CHECKPOINT_HP)
    resumed.optimizer.load_state_dict(saved["optimizer"])
    resumed.load_state_dict(saved["model"])
    for x, y in data[3:]:
        train_step(resumed, x, y)
    assert_same_state(full.state_dict(), resumed.state_dict())
    assert_same_state(full.optimizer.state_dict(), resumed.optimizer.state_dict())


def optimizer_snapshot(c):
    return copy.deepcopy({"params": dict(c.state_dict()), "optimizer": c.optimizer.state_dict()})


class Renamed(nn.Module):
    """The MLP's shapes with its first layer under another name."""

    def __init__(self):
        super().__init__()
        self.first, self.head = nn.Linear(5, 6), nn.Linear(6, 3)
        self.to(DTYPE)

    def forward(self, x):
        return self.head(torch.tanh(self.first(x)))


def deeper():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).to(DTYPE)


@pytest.mark.parametrize("target, match", [
    pytest.param(lambda: gnfx.compile(MLP(hidden=7), optimizer="kfac", inv_every=1, **CHECKPOINT_HP),
                 r"parameter 'fc\.weight' \(7, 5\): state 'kfac_0\.S_inv' has shape \(1, 6, 6\) in the checkpoint "
                 r"and \(1, 7, 7\) here: was it saved from a model with a different architecture\?", id="wider"),
    pytest.param(lambda: gnfx.compile(deeper(), optimizer="kfac", inv_every=1, **CHECKPOINT_HP),
                 r"parameter group 0 has 4 parameters, this optimizer's 6: was it saved from a model with a "
                 r"different architecture\?", id="deeper"),
    pytest.param(lambda: gnfx.compile(Renamed(), optimizer="kfac", inv_every=1, **CHECKPOINT_HP),
                 r"its statistics are for blocks \['fc', 'head'\], this model's are \['first', 'head'\]", id="renamed"),
    pytest.param(lambda: gnfx.compile(MLP(), optimizer="shampoo", **CHECKPOINT_HP),
                 r"parameter 'fc\.weight' \(6, 5\): state 'kfac_0\.A_inv' is not kept by this optimizer's plan "
                 r"\(a different preconditioner, hyperparameters or architecture\?\); it keeps \['shampoo_0\.factor0'",
                 id="another preconditioner"),
])
def test_a_checkpoint_of_another_architecture_or_plan_is_refused_naming_what_differs(target, match):
    """A kfac checkpoint loaded into another model or plan: ConfigError naming the parameter, state
    or block that differs; the target's parameters, state and statistics stay bit for bit."""
    saved = checkpoint_run("kfac", [batch(seed=s) for s in range(2)], inv_every=1).optimizer.state_dict()
    target = target()
    train_step(target, *batch(seed=3))
    before = optimizer_snapshot(target)
    with pytest.raises(gnfx.ConfigError, match=match) as err:
        target.optimizer.load_state_dict(roundtrip(saved))
    assert "nothing was loaded" in str(err.value)
    after = optimizer_snapshot(target)
    assert_same_state(before["params"], after["params"])
    assert_same_state(before["optimizer"], after["optimizer"])


def test_the_compiled_module_loads_nothing_from_a_checkpoint_of_another_architecture():
    source, target = gnfx.compile(MLP(hidden=6)), gnfx.compile(MLP(hidden=7, seed=1))
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(gnfx.ConfigError, match=r"nothing was loaded.*fc\.weight: \(6, 5\) in the checkpoint, \(7, 5\) here"):
        target.load_state_dict(source.state_dict())
    assert_same_state(before, target.state_dict())



SCHEDULES = {"kfac": dict(inv_every=3), "shampoo": dict(start_preconditioning_step=2, precondition_frequency=3)}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_a_step_without_gradients_is_a_no_op_for_the_schedule_too(name):
    """step() when no parameter has a gradient does nothing, as in torch.optim: a run with such
    steps interleaved, bare and after a training forward that is never backpropagated (its taps
    staged statistics), equals the run without them bit for bit: parameters, optimizer state,
    statistics and counters (statistics every 2 steps, refreshes every 3)."""
    data = [batch(seed=s) for s in range(7)]
    full = checkpoint_run(name, data, **SCHEDULES[name])
    c = gnfx.compile(MLP(), optimizer=name, **CHECKPOINT_HP, **SCHEDULES[name])
    for i, (x, y) in enumerate(data):
        c.zero_grad()
        c.step()
        if i % 2:
            c(x)
            c.step()
        cross_entropy(c(x), y).backward()
        c.step()
    assert c.optimizer.steps == len(data)
    assert_same_state(full.state_dict(), c.state_dict())
    assert_same_state(full.optimizer.state_dict(), c.optimizer.state_dict())

class TwoHeads(nn.Module):
    """Two heads on one input: a loss of the first only leaves the second without gradients (SAM's multimask
    heads under multimask_output=False)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(5, 3, dtype=DTYPE), nn.Linear(5, 3, dtype=DTYPE)

    def forward(self, x):
        return self.a(x), self.b(x)


def test_a_preconditioner_whose_blocks_got_no_gradient_leaves_them_and_steps_the_others():
    """Before: the parameter write of the preconditioner holding only `b` raised in its foreach kernel ("Tensor
    list must have at least one tensor"; SAM under "auto"). `b` keeps its value, and `a` steps as in the run
    whose loss reaches `b` with a zero gradient (0 · its output)."""
    x, y = batch(seed=0)
    runs = []
    for reaches_b in (False, True):
        model = TwoHeads()
        before = copy.deepcopy(model.b.state_dict())
        c = gnfx.compile(model, optimizer={"a": "kfac", "b": "shampoo"}, lr=0.1)
        for _ in range(2):
            a, b = c(x)
            (cross_entropy(a, y) + (0 * b.sum() if reaches_b else 0)).backward()
            c.step()
            c.zero_grad()
        assert_same_state(before, model.b.state_dict())
        runs.append(model.a.state_dict())
    assert_same_state(runs[1], runs[0])


# ============================================================================= hyperparameters


def invalid_values(spec) -> list:
    """Values outside `spec.valid` (gnfx.hparams), for each kind of range gnfx declares."""
    nan, inf = math.nan, math.inf
    known = {
        "a finite number > 0": [0, -1.0, nan, inf],
        "a finite number >= 0": [-1e-3, nan, inf],
        "a number in [0, 1)": [1.0, -0.1, nan],
        "'adaptive' or a number in [0, 1)": [1.0, -0.1, nan, "fixed", True],
        "a number in (0, 1)": [0, 1.0, nan],
        "an integer >= 1": [0, 2.5, True],
        "None or an integer >= 1": [0, 2.5, True],
        "an integer >= 0": [-1, 0.5],
        "True or False": [1, "yes"],
        "True, False or 'auto'": [1, "yes", None],
        "a pair (beta1, beta2) of numbers in [0, 1)": [(0.9, 1.0), (0.9,), (-0.1, 0.9)],
        "'paper' (1/(2k) for an order-k tensor) or a number in (0, 1]": [0, 1.5, "half"],
        "None, one of ('cross_entropy', 'mse', 'binary_cross_entropy'), or a tuple over the outputs of those, "
        "(name, weight) or None": ["not-an-option", 3, (), (None, "mse"), ("mse", ("mse", 0)), ("mse", ("mse",))],
        "None or a list of gnfx.transforms ending in gnfx.transforms.Step()":
            ["momentum", [], [gnfx.transforms.HeavyBall(0.9)], [gnfx.transforms.Step(), gnfx.transforms.Step()]],
    }
    if spec.valid in known:
        return known[spec.valid]
    if spec.valid.startswith("one of ") or spec.valid.startswith("None or one of "):
        return ["not-an-option", 3]
    if spec.valid.startswith("a tuple of names from "):
        return [("A", "not-a-statistic"), "A"]
    raise AssertionError(f"no invalid values known for the range {spec.valid!r}: add them here")


def _hparam_cases():
    for name, cls in gnfx.REGISTRY.items():
        for hparam, spec in cls.HPARAMS.items():
            for value in invalid_values(spec):
                yield pytest.param(name, hparam, value, spec.valid, id=f"{name}-{hparam}-{value!r}")
    for hparam, spec in gnfx.COMMON.items():
        optimizer = "auto" if hparam in BUDGETS else "diag"
        for value in invalid_values(spec):
            yield pytest.param(optimizer, hparam, value, spec.valid, id=f"common-{hparam}-{value!r}")


@pytest.mark.parametrize("optimizer, hparam, value, valid", list(_hparam_cases()))
def test_every_hyperparameter_is_validated_at_compile_time_naming_it_its_value_and_range(optimizer, hparam,
                                                                                        value, valid):
    with pytest.raises(gnfx.ConfigError) as err:
        gnfx.compile(MLP(), optimizer=optimizer, **{hparam: value})
    message = str(err.value)
    assert f"{hparam}={value!r}" in message and valid in message, message


@pytest.mark.parametrize("name", sorted(set(gnfx.REGISTRY) - {"diag"}))  # diag's numbers are per param group
def test_hyperparameters_of_a_policy_pattern_are_validated_too(name):
    hparam, spec = next((h, s) for h, s in gnfx.REGISTRY[name].HPARAMS.items()
                        if s.valid.startswith("a finite number") or s.valid.startswith("an integer"))
    value = invalid_values(spec)[0]
    with pytest.raises(gnfx.ConfigError) as err:
        gnfx.compile(MLP(), optimizer={"fc": (name, {hparam: value}), "*": "diag"})
    assert f"{hparam}={value!r}" in str(err.value) and "pattern 'fc'" in str(err.value)
