"""The statistics A, S and diag that the taps collect, against independent references.

For a block z = W a (+ b) on N examples with R positions, a loss L = 1/M Σ_m ℓ_m over M loss
terms (M = N for an (N, C) output, M = N·T for (N, T, C)), and g = ∂L/∂z:

    expand:  A = 1/(N R) Σ ā āᵀ                     S = M Σ g gᵀ
    reduce:  A = 1/N Σ_n ā_n ā_nᵀ, ā_n = mean_r ā    S = M Σ_n (Σ_r g)(Σ_r g)ᵀ
    diag  = N Σ_n (Σ_r g_{n,r} ā_{n,r}ᵀ)² = 1/N Σ_n (∇ℓ̃_n)²           ([W b] layout)

The references (tests/references.py) are forward hooks plus output-tensor hooks, per-example
gradients from torch.func.vmap, and curvlinops' KFACLinearOperator. Everything is float64 and
compared at 1e-10. `stat_decay=0` makes the statistics exactly those of the last statistic step.
"""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn.functional as F
from torch import nn

import gnfx

from steps import ALL, compile_for_statistics, statistic_step
from references import (TOL, cross_entropy, curvlinops_factors, hook_statistics, layer_diag,
                        per_example_fisher_diag, per_example_grads)

DTYPE = torch.float64


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, **TOL)


def batch(shape, classes, seed=0, labels=None):
    """Inputs of `shape` and class labels of shape `labels` (default: one per position)."""
    g = torch.Generator().manual_seed(seed)
    labels = shape[:-1] if labels is None else labels
    return torch.randn(*shape, generator=g, dtype=DTYPE), torch.randint(0, classes, labels, generator=g)


def assert_statistics_match(c, model, names, x, y, approx="expand"):
    """c's statistics (after one statistic step on (x, y)) equal hooks (A, S) and vmap (diag).

    The references are computed on `model` *before* the step, which changes the parameters.
    """
    ref = hook_statistics(model, names, x, y, approx)
    diags = per_example_fisher_diag(model, x, y)
    statistic_step(c, x, y)
    for name in names:
        got = c.statistics(name)
        assert_close(got["A"], ref[name]["A"])
        assert_close(got["S"], ref[name]["S"])
        assert_close(got["diag"], layer_diag(diags, name))


# ----------------------------------------------------------------------------- models


def mlp(bias=True, sizes=(5, 7, 6, 4), act=nn.Tanh):
    torch.manual_seed(0)
    layers = []
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(d_in, d_out, bias=bias)] + ([act()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers).to(DTYPE)


class Pooled(nn.Module):
    """(N, T, d) tokens → (N, C): a token-wise layer, then a mean over tokens and a head."""

    def __init__(self, d=5, hidden=6, classes=4):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(d, hidden)
        self.head = nn.Linear(hidden, classes)
        self.to(DTYPE)

    def forward(self, x):
        return self.head(torch.tanh(self.embed(x)).mean(1))


class Tied(nn.Module):
    """`fc` is applied twice: one block, two call sites."""

    def __init__(self, d=3, hidden=5, classes=4):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(d, hidden)
        self.fc = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, classes)
        self.to(DTYPE)

    def forward(self, x):
        h = torch.tanh(self.fc(torch.tanh(self.inp(x))))
        return self.out(torch.tanh(self.fc(h)))


# ----------------------------------------------------------------------------- (N, d) inputs


@pytest.mark.parametrize("bias", [True, False])
def test_mlp_statistics_equal_hooks_and_per_example_gradients(bias):
    model = mlp(bias)
    c = compile_for_statistics(model)
    assert [b.name for b in c.layers] == ["0", "2", "4"]
    assert all((b.bias is not None) == bias for b in c.layers)
    x, y = batch((8, 5), 4)
    assert_statistics_match(c, model, ["0", "2", "4"], x, y)
    # the shapes of the [W b] layout: A over d_in (+1), S over d_out, diag like [W b]
    got = c.statistics("2")
    assert got["A"].shape == (7 + bias, 7 + bias) and got["S"].shape == (6, 6) and got["diag"].shape == (6, 7 + bias)
    assert got["A"].dtype == got["S"].dtype == got["diag"].dtype == DTYPE


def test_diag_is_the_mean_of_squared_per_example_gradients_of_each_parameter():
    """diag, read per parameter: the W columns and the bias column separately."""
    model = mlp()
    c = compile_for_statistics(model)
    x, y = batch((8, 5), 4)
    grads = per_example_grads(model, x, y)
    statistic_step(c, x, y)
    diag = c.statistics("4")["diag"]
    assert_close(diag[:, :6], (grads["4.weight"] ** 2).mean(0))
    assert_close(diag[:, 6], (grads["4.bias"] ** 2).mean(0))


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_mlp_statistics_equal_curvlinops_kfac(approx):
    model = mlp()
    c = compile_for_statistics(model, kfac_approx=approx)
    x, y = batch((8, 5), 4)
    ref = curvlinops_factors(model, ["0", "2", "4"], x, y, approx)
    statistic_step(c, x, y)
    for name in ["0", "2", "4"]:
        assert_close(c.statistics(name)["A"], ref[name]["A"])
        assert_close(c.statistics(name)["S"], ref[name]["S"])


# ----------------------------------------------------------------------------- (N, T, d) inputs


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_token_statistics_with_a_loss_over_every_token(approx):
    """(N, T, d) → (N, T, C), loss over all M = N·T tokens; every layer has R = T positions."""
    model = mlp(sizes=(5, 6, 4))
    c = compile_for_statistics(model, kfac_approx=approx)
    x, y = batch((6, 3, 5), 4)
    assert_statistics_match(c, model, ["0", "2"], x, y, approx)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_token_statistics_with_a_pooled_output(approx):
    """(N, T, d) → (N, C): M = N; the token-wise layer has R = T positions, the head R = 1."""
    model = Pooled()
    c = compile_for_statistics(model, kfac_approx=approx)
    x, y = batch((6, 3, 5), 4, labels=(6,))
    assert_statistics_match(c, model, ["embed", "head"], x, y, approx)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_token_statistics_equal_curvlinops_kfac(approx):
    model = mlp(sizes=(5, 6, 4))
    c = compile_for_statistics(model, kfac_approx=approx)
    x, y = batch((6, 3, 5), 4)
    ref = curvlinops_factors(model, ["0", "2"], x, y, approx)
    statistic_step(c, x, y)
    for name in ["0", "2"]:
        assert_close(c.statistics(name)["A"], ref[name]["A"])
        assert_close(c.statistics(name)["S"], ref[name]["S"])


def test_loss_average_batch_counts_one_loss_term_per_example():
    """loss_average="batch" forces T = 1: S = N Σ g gᵀ, a factor T below "auto"; A, diag unchanged."""
    model = mlp(sizes=(5, 6, 4))
    auto, per_batch = compile_for_statistics(model), compile_for_statistics(copy.deepcopy(model), loss_average="batch")
    x, y = batch((6, 3, 5), 4)
    statistic_step(auto, x, y)
    statistic_step(per_batch, x, y)
    T = 3
    for name in ["0", "2"]:
        assert_close(per_batch.statistics(name)["S"], auto.statistics(name)["S"] / T)
        assert_close(per_batch.statistics(name)["A"], auto.statistics(name)["A"])
        assert_close(per_batch.statistics(name)["diag"], auto.statistics(name)["diag"])


def test_in_place_activations_do_not_change_the_statistics():
    """g is ∂L/∂z before an in-place ReLU overwrites z: the same as with out-of-place ReLUs."""
    model = mlp(act=lambda: nn.ReLU(inplace=True))
    out_of_place = copy.deepcopy(model)
    for m in out_of_place.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    c = compile_for_statistics(model)
    x, y = batch((8, 5), 4)
    assert_statistics_match(c, out_of_place, ["0", "2", "4"], x, y)


class InPlaceAfterBlocks(nn.Module):
    """Outputs of blocks that the next op modifies in place, as torch.fx keeps them: an nn.ReLU(inplace=True)
    after a linear layer and after a BatchNorm (a norm block), and `relu_` on a view of a linear output."""

    def __init__(self, in_place: bool, tokens: bool):
        super().__init__()
        torch.manual_seed(0)
        self.in_place, self.tokens = in_place, tokens
        self.a, self.norm, self.b, self.c = nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Linear(6, 6), nn.Linear(6, 4)
        self.act = nn.ReLU(inplace=in_place)

    def forward(self, x):  # x: (N, 5), or (N, T, 5) with tokens
        h = self.act(self.a(x))
        h = self.act(self.norm(h.transpose(1, 2)).transpose(1, 2)) if self.tokens else self.act(self.norm(h))
        h = self.b(h)
        flat = h.view(-1, 6)
        return self.c((flat.relu_() if self.in_place else flat.relu()).view(h.shape))


@pytest.mark.parametrize("fisher", ["empirical", "type2"])
@pytest.mark.parametrize("shape", [(8, 5), (4, 3, 5)])
def test_blocks_whose_output_is_modified_in_place_get_the_statistics_of_their_own_output(fisher, shape):
    """An in-place activation after a block (VGG's and AlexNet's convolutions, ResNet's BatchNorms) overwrote
    the output whose gradient the block's tap reads: with a (N, T, d) input (a view) the empirical statistics
    of that block were never recorded, and the true Fisher's backward differentiated with respect to the
    activation written over it (S off by up to 0.05 here). Every block's A and S now equal those of the same
    model with out-of-place activations, on each of two statistic steps."""
    options = dict(statistics=("A", "S"), fisher=fisher) | ({"loss": "cross_entropy"} if fisher != "empirical" else {})
    in_place, out_of_place = (compile_for_statistics(InPlaceAfterBlocks(flag, len(shape) == 3).to(DTYPE), **options)
                              for flag in (True, False))
    names = ["a", "norm", "b", "c"]
    for seed in range(2):
        x, y = batch(shape, 4, seed)
        for c in (in_place, out_of_place):
            statistic_step(c, x, y)
        assert in_place.layers.form == "fx" and [block.name for block in in_place.layers] == names
        for name in names:
            for factor in ("A", "S"):
                torch.testing.assert_close(in_place.statistics(name)[factor], out_of_place.statistics(name)[factor],
                                           rtol=1e-12, atol=1e-14, msg=f"{name} {factor}")


class TokenClassifier(nn.Module):
    """A block's (N, T, C) output returned as the model's output: a view of the (N·T, C) product."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head = nn.Linear(5, 6), nn.Linear(6, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


@pytest.mark.parametrize("shape", [(8, 5), (4, 3, 5)])
def test_a_model_output_the_training_loop_writes_in_place_keeps_its_blocks_statistics(shape):
    """A distillation loop's `logits /= T` writes the model's output in place: with an (N, T, C) output (a view)
    the head's gradient hook was dropped and the block got no statistics at all. Every block's A and S now equal
    those of the same loop written out of place, on each of two statistic steps."""
    in_place, out_of_place = (compile_for_statistics(TokenClassifier().to(DTYPE), statistics=("A", "S"))
                              for _ in range(2))
    for seed in range(2):
        x, y = batch(shape, 4, seed)
        for c in (in_place, out_of_place):
            logits = c(x)
            if c is in_place:
                logits /= 2.0
            else:
                logits = logits / 2.0
            cross_entropy(logits, y).backward()
            c.step()
            c.zero_grad()
        for name in ("body", "head"):
            for factor in ("A", "S"):
                torch.testing.assert_close(in_place.statistics(name)[factor], out_of_place.statistics(name)[factor],
                                           rtol=1e-12, atol=1e-14, msg=f"{name} {factor}")


@pytest.mark.parametrize("fisher", ["mc", "type2"])
def test_the_true_fisher_of_an_output_written_in_place_names_the_fix(fisher):
    """The true Fisher's vectors start at the logits when their gradient arrives, which is after the backward went
    through the loop's `logits /= T` (and freed it): the backward raised autograd's "Trying to backward through
    the graph a second time". It now names the in-place write and the fix, and the loop written out of place
    trains."""
    x, y = batch((8, 5), 4, 0)
    for in_place in (True, False):
        c = gnfx.compile(TokenClassifier().to(DTYPE), optimizer="kfac", loss="cross_entropy", fisher=fisher,
                         stat_every=1)
        logits = c(x)
        if in_place:
            logits /= 2.0
            with pytest.raises(gnfx.GnfxError, match=r"(?s)modified in place.*Fix: write it out of place"):
                cross_entropy(logits, y).backward()
        else:
            cross_entropy(logits / 2.0, y).backward()
            c.step()
            assert c.statistics("head")["S"].abs().sum() > 0


class Functional(nn.Module):
    """A linear map written with F.linear on bare parameters: the block is named after W."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(6, 5, dtype=DTYPE) / 3)
        self.b = nn.Parameter(torch.randn(6, dtype=DTYPE))
        self.head = nn.Linear(6, 4).to(DTYPE)

    def forward(self, x):
        return self.head(torch.tanh(torch.nn.functional.linear(x, self.w, self.b)))


def test_functional_linear_on_bare_parameters():
    model = Functional()
    c = compile_for_statistics(model)
    assert [(b.name, b.params) for b in c.layers] == [("w", ("w", "b")), ("head", ("head.weight", "head.bias"))]
    x, y = batch((8, 5), 4)
    # the hook reference needs a module: the same map as an nn.Linear
    as_module = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), copy.deepcopy(model.head)).to(DTYPE)
    with torch.no_grad():
        as_module[0].weight.copy_(model.w)
        as_module[0].bias.copy_(model.b)
    ref = hook_statistics(as_module, ["0"], x, y)["0"]
    diags = per_example_fisher_diag(model, x, y)
    statistic_step(c, x, y)
    assert_close(c.statistics("w")["A"], ref["A"])
    assert_close(c.statistics("w")["S"], ref["S"])
    assert_close(c.statistics("w")["diag"], torch.cat([diags["w"], diags["b"][:, None]], dim=1))


# ----------------------------------------------------------------------------- tied weights


@pytest.mark.parametrize("shape", [(6, 3), (6, 4, 3)], ids=["2d", "3d"])
def test_tied_weight_is_one_block_whose_sites_are_extra_positions(shape):
    model = Tied()
    c = compile_for_statistics(model)
    assert [b.name for b in c.layers] == ["inp", "fc", "out"]
    assert len(c.layers["fc"].sites) == 2 and c.layers.fallbacks == []
    x, y = batch(shape, 4)
    # A averages the rows of both sites, S sums g gᵀ of both, diag squares the per-example
    # gradient summed over both sites (vmap differentiates through both uses).
    assert_statistics_match(c, model, ["inp", "fc", "out"], x, y)


@pytest.mark.parametrize("shape", [(6, 3), (6, 4, 3)], ids=["2d", "3d"])
def test_tied_weight_sites_are_positions_under_reduce(shape):
    """Documented: sites of a tied weight count as positions, so reduce averages ā over the
    positions of both sites (ā_n) and sums g over them (δ_n) before taking outer products."""
    model = Tied()
    c = compile_for_statistics(model, kfac_approx="reduce")
    x, y = batch(shape, 4)
    ref = hook_statistics(model, ["fc"], x, y, "reduce")
    statistic_step(c, x, y)
    assert_close(c.statistics("fc")["A"], ref["fc"]["A"])
    assert_close(c.statistics("fc")["S"], ref["fc"]["S"])


# ----------------------------------------------------------------------------- accumulation, frozen


@pytest.mark.parametrize("split", [6, 4], ids=["halves", "4+8"])
@pytest.mark.parametrize("shape", [(12, 5), (12, 3, 5)], ids=["2d", "3d"])
def test_gradient_accumulation_equals_one_full_batch(split, shape):
    """Two forward/backward calls whose losses are weighted N_i/N, then one step: the statistics
    of the full batch (the accumulated gradient is the full batch's, and so must A, S, diag be)."""
    model = mlp(sizes=(5, 6, 4))
    c = compile_for_statistics(model)
    x, y = batch(shape, 4)
    ref = hook_statistics(model, ["0", "2"], x, y)
    diags = per_example_fisher_diag(model, x, y)
    N = shape[0]
    for part in (slice(0, split), slice(split, N)):
        xs, ys = x[part], y[part]
        (cross_entropy(c(xs), ys) * xs.shape[0] / N).backward()
    c.step()
    for name in ["0", "2"]:
        assert_close(c.statistics(name)["A"], ref[name]["A"])
        assert_close(c.statistics(name)["S"], ref[name]["S"])
        assert_close(c.statistics(name)["diag"], layer_diag(diags, name))


def test_a_forward_that_is_never_backpropagated_does_not_count():
    model = mlp()
    c = compile_for_statistics(model)
    x, y = batch((8, 5), 4)
    ref = hook_statistics(model, ["2"], x, y)["2"]
    c(batch((4, 5), 4, seed=1)[0])  # e.g. an accuracy on another batch, graph left unused
    statistic_step(c, x, y)
    assert_close(c.statistics("2")["A"], ref["A"])
    assert_close(c.statistics("2")["S"], ref["S"])


def test_frozen_parameters_get_no_block_no_fallback_and_never_change():
    model = mlp()
    for p in model[2].parameters():
        p.requires_grad_(False)
    frozen = [p.detach().clone() for p in model[2].parameters()]
    trainable = model[0].weight.detach().clone()
    c = compile_for_statistics(model)
    assert [b.name for b in c.layers] == ["0", "4"]
    assert c.layers.fallbacks == []
    optimized = {id(p) for g in c.optimizer.param_groups for p in g["params"]}
    assert all(id(p) not in optimized for p in model[2].parameters())
    x, y = batch((8, 5), 4)
    # the statistics of the trainable layers around the frozen one are still exact
    assert_statistics_match(c, model, ["0", "4"], x, y)
    for seed in range(3):
        statistic_step(c, *batch((8, 5), 4, seed))
    assert all(torch.equal(p, q) for p, q in zip(model[2].parameters(), frozen))
    assert not torch.equal(model[0].weight, trainable)  # while the others trained


def test_a_frozen_bias_leaves_a_weight_only_block():
    """W trainable, b frozen: the block is z = W a with A over a alone (b is a constant shift)."""
    model = mlp()
    model[4].bias.requires_grad_(False)
    c = compile_for_statistics(model)
    assert c.layers["4"].params == ("4.weight",) and c.layers.fallbacks == []
    x, y = batch((8, 5), 4)
    ref = hook_statistics(model, ["4"], x, y)
    diags = per_example_fisher_diag(model, x, y)
    statistic_step(c, x, y)
    assert_close(c.statistics("4")["A"], ref["4"]["A"])
    assert c.statistics("4")["A"].shape == (6, 6)
    assert_close(c.statistics("4")["S"], ref["4"]["S"])
    assert_close(c.statistics("4")["diag"], diags["4.weight"])


# ----------------------------------------------------------------------------- when and how they average


def count_calls(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_stat_every_collects_only_on_every_third_step_and_skips_the_taps_otherwise():
    model = mlp()
    c = compile_for_statistics(model, stat_every=3)
    tap_calls = count_calls(c.graph_module.gnfx_taps.get_submodule("0_a"))
    collected_on, last = [], None
    for step in range(7):
        assert c.optimizer.steps == step
        x, y = batch((8, 5), 4, seed=step)
        before = tap_calls[0]
        if step % 3 == 0:
            ref = hook_statistics(model, ["2"], x, y)["2"]
            diags = per_example_fisher_diag(model, x, y)
        statistic_step(c, x, y)
        if tap_calls[0] > before:
            collected_on.append(step)
        now = c.statistics("2")
        if step % 3 == 0:  # this step's batch, at this step's parameters
            assert_close(now["A"], ref["A"])
            assert_close(now["S"], ref["S"])
            assert_close(now["diag"], layer_diag(diags, "2"))
        else:  # untouched since the last statistic step
            assert all(torch.equal(now[k], last[k]) for k in ALL)
        last = {k: v.clone() for k, v in now.items()}
    assert collected_on == [0, 3, 6]
    assert tap_calls[0] == 3


def test_stat_decay_is_an_exponential_moving_average_of_the_statistic_steps():
    beta = 0.7
    model = mlp()
    c = compile_for_statistics(model, stat_decay=beta)
    batches = [batch((8, 5), 4, seed) for seed in range(2)]
    refs = []
    for x, y in batches:  # F_k at the parameters of step k
        refs.append({**hook_statistics(model, ["2"], x, y)["2"],
                     "diag": layer_diag(per_example_fisher_diag(model, x, y), "2")})
        statistic_step(c, x, y)
        if len(refs) == 1:  # the first statistic sets F
            assert all(torch.allclose(c.statistics("2")[k], refs[0][k], **TOL) for k in ALL)
    for k in ALL:
        assert_close(c.statistics("2")[k], beta * refs[0][k] + (1 - beta) * refs[1][k])


# ----------------------------------------------------------------------------- generated architectures

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}


@st.composite
def mlp_stacks(draw):
    depth = draw(st.integers(1, 4))
    widths = draw(st.lists(st.integers(1, 12), min_size=depth, max_size=depth))
    classes = draw(st.integers(2, 5))
    biases = draw(st.lists(st.booleans(), min_size=depth, max_size=depth))
    acts = draw(st.lists(st.sampled_from(sorted(ACTIVATIONS)), min_size=depth - 1, max_size=depth - 1))
    tokens = draw(st.sampled_from([None, 1, 3]))
    approx = draw(st.sampled_from(["expand", "reduce"]))
    seed = draw(st.integers(0, 2 ** 16))
    return widths, classes, biases, acts, tokens, approx, seed


@settings(max_examples=25, deadline=None)
@given(mlp_stacks())
def test_generated_mlp_stacks(arch):
    widths, classes, biases, acts, tokens, approx, seed = arch
    torch.manual_seed(seed)
    sizes = widths + [classes]
    layers = []
    for i in range(len(widths)):
        layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=biases[i]))
        if i < len(acts):
            layers.append(ACTIVATIONS[acts[i]]())
    model = nn.Sequential(*layers).to(DTYPE)
    names = [str(i) for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    c = compile_for_statistics(model, kfac_approx=approx)
    assert [b.name for b in c.layers] == names
    N = 5
    x, y = batch((N, widths[0]) if tokens is None else (N, tokens, widths[0]), classes, seed)
    assert_statistics_match(c, model, names, x, y, approx)


class DoRALike(nn.Module):
    """peft's (and torchtune's) DoRA: lora_A and lora_B also run on an identity matrix, whose product ΔW is used
    without its gradient (in the weight norm that rescales the output); only the calls on x are trained."""

    def __init__(self):
        super().__init__()
        self.base, self.head = nn.Linear(6, 4), nn.Linear(4, 3)
        self.lora_A, self.lora_B = nn.Linear(6, 2, bias=False), nn.Linear(2, 4, bias=False)
        self.magnitude = nn.Parameter(torch.ones(4))

    def forward(self, x):
        delta = self.lora_B(self.lora_A(torch.eye(6, dtype=x.dtype))).T
        norm = (self.base.weight + delta.detach()).norm(dim=1).detach()
        return self.head(torch.tanh(self.magnitude / norm * (self.base(x) + self.lora_B(self.lora_A(x)))))


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_a_call_whose_output_no_backward_reaches_adds_no_rows_to_A(fisher):
    """DoRA's calls on the identity get no gradient: A of lora_A and lora_B are those of their calls on x alone,
    u uᵀ averaged over the batch's rows (forward hooks on a plain copy; before, the identity's 6 rows were
    counted: (XᵀX + I)/(N + 6) for lora_A), and with the empirical Fisher S is that of the loss's gradient at
    those calls."""
    torch.manual_seed(0)
    model = DoRALike().double()
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    reference, records = copy.deepcopy(model), {}
    def hooked(name):
        def hook(module, inputs, out):
            out.register_hook(lambda g: records.update({name: (inputs[0], g)}))
        return hook
    for name in ("lora_A", "lora_B"):
        getattr(reference, name).register_forward_hook(hooked(name))
    F.cross_entropy(reference(x), y).backward()
    loss = {"loss": "cross_entropy"} if fisher == "mc" else {}
    c = compile_for_statistics(model, optimizer="kfac", statistics=("A", "S"), fisher=fisher, **loss)
    statistic_step(c, x, y)
    for name, (u, g) in records.items():
        assert u.shape[0] == 16  # the call on x (the identity's never gets a gradient)
        torch.testing.assert_close(c.statistics(name)["A"], u.T @ u / 16, rtol=1e-12, atol=1e-14)
        if fisher == "empirical":
            torch.testing.assert_close(c.statistics(name)["S"], 16 * g.T @ g, rtol=1e-12, atol=1e-14)
