"""A loss over several outputs, L = Σ_k w_k L_k(z_k) (gnfx.output_losses), against dense float64 references.

The reference GGN is built here, independently of gnfx.ggn: J_k = ∂z_k/∂θ from torch.func.jacrev of the
model as a function of its flat parameters, H_k = ∇²_{z_k} (w_k L_k) from torch.func.hessian, and

    G = Σ_k J_kᵀ H_k J_k,

block-diagonal over the outputs. The quadratic step's (α, μ) must minimize q(d) = gᵀd + ½ dᵀ(G + λI)d over
its plane (tests/test_quadratic_step.assert_minimizer), the true Fisher's type-2 per-example diagonal must
be diag(G) exactly (the identity of tests/test_fisher.py, summed over the outputs), and a GoogLeNet-like
network with two auxiliary heads, compiled at defaults, must train with its loss of three terms. Before
gnfx.output_losses, loss= took one name only, and a loss reaching a second output raised a GnfxError.
"""
from __future__ import annotations

import collections
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

import gnfx
from gnfx.errors import ConfigError, GnfxError
from gnfx.targets import fold
from references import TOL
from steps import backward_and_step
from test_quadratic_step import assert_minimizer

DTYPE = torch.float64
Outputs = collections.namedtuple("Outputs", "logits aux_logits")
CE_AUX = ("cross_entropy", ("cross_entropy", 0.4))  # Inception v3's ce(logits) + 0.4·ce(aux_logits)
CE_MSE = ("cross_entropy", ("mse", 0.5))  # a classifier with a regression head
CE_BCE = ("cross_entropy", ("binary_cross_entropy", 0.5))  # a classifier with a multi-label head (soft labels)
DEEP_SUPERVISION = (("cross_entropy", 0.6), ("cross_entropy", 0.4))  # a segmenter's full and half resolution
PRETRAINING = ("cross_entropy", "cross_entropy")  # BertForPreTraining's masked tokens + next sentence
CASCADE = (("cross_entropy", 0.5), ("cross_entropy", 1.0))  # a loss on each stage, the second computed from the first


class TwoHeads(nn.Module):
    """A shared trunk and two linear heads, returned as a named tuple (Inception v3's training output)."""

    def __init__(self, aux_out=3):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.head = nn.Linear(6, 3)
        self.aux = nn.Linear(6, aux_out)

    def forward(self, x):
        h = self.trunk(x)
        return Outputs(self.head(h), self.aux(h))


class DeepSupervision(nn.Module):
    """A segmenter of 3 classes on 4x4 images with a side output at half resolution (a UNet's deep
    supervision): (N, 3, 4, 4) and (N, 3, 2, 2) logits, the classes on dimension 1."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh())
        self.head = nn.Conv2d(4, 3, 1)
        self.side = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(4, 3, 1))

    def forward(self, x):
        h = self.trunk(x)
        return self.head(h), self.side(h)


class Pretraining(nn.Module):
    """BertForPreTraining's pattern: token logits (N, T, V) for the masked-token loss (its targets -100 off
    the masked positions) and, computed after them, a pooled (N, 2) next-sentence logit, returned as a dict."""

    def __init__(self, vocabulary=5):
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, 4)
        self.trunk = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
        self.tokens = nn.Linear(4, vocabulary)
        self.pair = nn.Linear(4, 2)

    def forward(self, ids):
        h = self.trunk(self.embedding(ids))
        return {"prediction_logits": self.tokens(h), "seq_relationship_logits": self.pair(h.mean(1))}


class Cascade(TwoHeads):
    """Two stages, each with a loss: the second refines the first's logits (a stacked hourglass's intermediate
    supervision, RAFT's sequence loss), so the second output is computed from the first."""

    def __init__(self):
        super().__init__()
        self.aux = nn.Linear(9, 3)

    def forward(self, x):
        h = self.trunk(x)
        first = self.head(h)
        return first, self.aux(torch.cat([h, torch.tanh(first)], -1))


def model_of(losses):
    torch.manual_seed(0)
    if losses == DEEP_SUPERVISION:
        return DeepSupervision().to(DTYPE)
    if losses == PRETRAINING:
        return Pretraining().to(DTYPE)
    return TwoHeads(aux_out=1 if losses[1][0] == "mse" else 3).to(DTYPE)


def batch(losses, n=8, seed=1, ignored=0):
    """x and each output's targets, the first output's first `ignored` examples' targets -100 (the
    pre-training batch: every token's but one per sequence, the masked one)."""
    g = torch.Generator().manual_seed(seed)
    if losses == DEEP_SUPERVISION:
        x = torch.randn(n, 1, 4, 4, generator=g, dtype=DTYPE)
        masks = torch.randint(3, (n, 4, 4), generator=g)
        masks[:ignored] = -100
        return x, (masks, torch.randint(3, (n, 2, 2), generator=g))
    if losses == PRETRAINING:
        ids = torch.randint(5, (n, 3), generator=g)
        tokens = torch.full((n, 3), -100)
        masked = torch.randint(3, (n,), generator=g)
        tokens[torch.arange(n), masked] = torch.randint(5, (n,), generator=g)
        tokens[:ignored] = -100
        return ids, (tokens, torch.randint(2, (n,), generator=g))
    x = torch.randn(n, 4, generator=g, dtype=DTYPE)
    y = torch.randint(3, (n,), generator=g)
    y[:ignored] = -100
    aux = {"mse": lambda: torch.randn(n, 1, generator=g, dtype=DTYPE),
           "binary_cross_entropy": lambda: torch.rand(n, 3, generator=g, dtype=DTYPE)}.get(
        losses[1][0], lambda: torch.randint(3, (n,), generator=g))()
    return x, (y, aux)


def cross_entropy(z, y):
    """F.cross_entropy as its users call it: (N, C, H, W) logits with (N, H, W) masks as they are, (N, T, V)
    token logits flattened."""
    return F.cross_entropy(z, y) if y.shape == z.shape[:1] + z.shape[2:] else F.cross_entropy(z.flatten(0, -2),
                                                                                               y.flatten())


def terms(losses):
    """The user's loss terms, w_k L_k for each output."""
    functions = {"cross_entropy": cross_entropy, "mse": F.mse_loss,
                 "binary_cross_entropy": F.binary_cross_entropy_with_logits}
    pairs = [(entry, 1.0) if isinstance(entry, str) else entry for entry in losses]
    return [lambda z, y, f=functions[name], w=weight: w * f(z, y) for name, weight in pairs]


def as_tuple(out):
    return tuple(out.values()) if isinstance(out, dict) else tuple(out)


def summed_loss(losses, out, targets):
    return sum(term(z, y) for term, z, y in zip(terms(losses), as_tuple(out), targets))


def dense_ggn(model, losses, x, targets):
    """G = Σ_k J_kᵀ ∇²_{z_k}(w_k L_k) J_k in float64 over the flat parameters (module docstring)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def outputs(flat):
        params = dict(zip(names, [t.view(s) for t, s in zip(flat.split([s.numel() for s in shapes]), shapes)]))
        return as_tuple(functional_call(model, params, (x,)))

    zs = outputs(theta)
    jacobians = jacrev(outputs)(theta)
    G = torch.zeros(len(theta), len(theta), dtype=DTYPE)
    for term, z, J, y in zip(terms(losses), zs, jacobians, targets):
        H = hessian(lambda out: term(out, y))(z.detach()).reshape(z.numel(), z.numel())
        J = J.reshape(z.numel(), -1)
        G += J.T @ H @ J
    return G


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


@pytest.mark.parametrize("losses", [CE_AUX, CE_MSE, CE_BCE, DEEP_SUPERVISION, PRETRAINING],
                         ids=["ce+0.4ce", "ce+0.5mse", "ce+0.5bce", "deep-supervision", "pretraining"])
@pytest.mark.parametrize("ignored", [0, 3])
def test_alpha_and_mu_minimize_the_dense_ggn_quadratic_of_the_summed_loss(losses, ignored):
    """Six steps of kfac's quadratic step on one batch (the first output's first `ignored` targets -100):
    each (α, μ) minimizes q over its plane with G the dense GGN of the weighted sum, and predicts -q(s) (forward-mode
    products, exact: finite differences, the default's on this smooth model, hold ~1e-8)."""
    model = model_of(losses)
    c = gnfx.compile(model, optimizer="kfac", loss=losses, stat_every=1, inv_every=1, quadratic_products="forward")
    x, targets = batch(losses, ignored=ignored)
    assert_steps_minimize_the_summed_ggn(c, model, losses, x, targets, examples=len(x))


@pytest.mark.parametrize("losses", [CE_AUX, CE_MSE, CE_BCE], ids=["ce+0.4ce", "ce+0.5mse", "ce+0.5bce"])
@pytest.mark.parametrize("ignored", [0, 3])
def test_type2_diagonal_is_the_diagonal_of_the_summed_ggn(losses, ignored):
    """fisher="type2" backpropagates the columns of each output's H_k^{1/2}, weighted w_k M_k / M: the
    per-example diagonal N Σ_n Σ_k Σ_c (δ ā_nᵀ)² is diag(Σ_k w_k J_kᵀ H_k J_k) exactly, the first output's
    ignored rows left out of its own mean only (an identity of (N, C) outputs: with several rows per example
    the per-example gradient of one column sums over them, tests/test_fisher.py)."""
    model = model_of(losses)
    x, targets = batch(losses, ignored=ignored)
    diag_G = dense_ggn(model, losses, x, targets).diagonal()
    c = gnfx.compile(copy.deepcopy(model), optimizer="diag", source="fisher", fisher="type2", loss=losses,
                     stat_every=1, stat_decay=0.0, statistics=("diag",), lr=1e-3)
    summed_loss(losses, c(x), targets).backward()
    c.step()
    offsets, start = {}, 0
    for name, p in model.named_parameters():
        offsets[name] = torch.arange(start, start + p.numel())
        start += p.numel()
    parameters = dict(model.named_parameters())
    for block in c.layers:
        weight, bias = block.params
        expected = fold(diag_G[offsets[weight]].reshape(parameters[weight].shape), diag_G[offsets[bias]])
        torch.testing.assert_close(c.statistics(block.name)["diag"], expected, **TOL)


@pytest.mark.parametrize("losses, rows, examples", [(CE_AUX, 3, 3), (PRETRAINING, 4, 2)],
                         ids=["ce+0.4ce", "pretraining"])  # R rows of the first output: 3 examples, ⌈4/3⌉ of 3 rows
def test_quadratic_rows_takes_the_summed_ggn_of_the_first_examples(losses, rows, examples):
    """quadratic_rows=R with several outputs: (α, μ) minimize q with g the whole batch's gradient and G the
    dense GGN of the weighted sum's mean losses over the first ⌈R/T⌉ examples (T: the first output's rows
    per example), every output cut to them; ρ's actual reduction is the whole batch's."""
    model = model_of(losses)
    # ω = 0.9 as in tests/test_quadratic_step.py's quadratic_rows test: no retried step (t·s is no minimizer)
    c = gnfx.compile(model, optimizer="kfac", loss=losses, quadratic_rows=rows, stat_every=1, inv_every=1,
                     damping_decay=0.9, quadratic_products="forward")  # exact products, as above
    x, targets = batch(losses)
    assert_steps_minimize_the_summed_ggn(c, model, losses, x, targets, examples)


def assert_steps_minimize_the_summed_ggn(c, model, losses, x, targets, examples: int) -> None:
    """6 quadratic steps of `c` (compiled from `model`) on (x, targets): each step's (α, μ) minimize q with g the
    whole batch's gradient and G the dense GGN of the weighted sum's mean losses over the first `examples`
    examples, its predicted reduction is -q, and ρ's actual reduction is the whole batch's summed loss's,
    recovered from the outputs' gradients."""
    params = list(model.parameters())
    previous = None
    for _ in range(6):
        loss_before = summed_loss(losses, c(x), targets)
        loss_before.backward()
        theta0 = flat(p.detach() for p in params).clone()
        g = flat(p.grad for p in params)
        G = dense_ggn(model, losses, x[:examples], [y[:examples] for y in targets])
        c.step()
        c.zero_grad()
        last = c.optimizer.last_step
        s = flat(p.detach() for p in params) - theta0
        assert not last["rejected"] and not last["backtracks"], last
        _, q, _ = assert_minimizer(g, G, last, s, previous)
        assert last["predicted"] == pytest.approx(-q, rel=1e-9)
        with torch.no_grad():
            actual = float(loss_before - summed_loss(losses, model(x), targets))
        assert last["actual"] == pytest.approx(actual, rel=1e-9, abs=1e-15)
        previous = s


def type2_factor_reference(model, losses, x, targets):
    """S of the trunk's first layer under fisher="type2", from plain torch: for each output k and class c the
    column c of H_k^{1/2} at every row the loss keeps, sqrt(p_c)(e_c - p) (classes-last rows), backpropagated
    to the layer's output o as U_{k,c} (rows: o's positions, channels last), and
    S = Σ_k (w_k / M_k) Σ_c U_{k,c}ᵀ U_{k,c}, M_k the kept rows of output k."""
    layer = model.trunk[0]
    seen = {}
    handle = layer.register_forward_hook(lambda module, inputs, output: seen.setdefault("o", output))
    outputs = as_tuple(model(x))
    handle.remove()
    o = seen["o"]
    S = 0
    for (name, weight), z, y in zip([(e, 1.0) if isinstance(e, str) else e for e in losses], outputs, targets):
        assert name == "cross_entropy"
        dense = y.shape == z.shape[:1] + z.shape[2:]
        z_c = z.movedim(1, -1) if dense else z
        rows = z_c.reshape(-1, z_c.shape[-1])
        kept = y.reshape(-1).ne(-100)
        p = torch.softmax(rows.detach(), -1)
        for c in range(rows.shape[-1]):
            v = p[:, c:c + 1].sqrt() * (torch.eye(rows.shape[-1], dtype=DTYPE)[c] - p) * kept[:, None]
            v = v.reshape(z_c.shape)
            (u,) = torch.autograd.grad(z, o, v.movedim(-1, 1) if dense else v, retain_graph=True)
            U = (u.movedim(1, -1) if o.dim() == 4 else u).reshape(-1, o.shape[1] if o.dim() == 4 else o.shape[-1])
            S = S + weight / int(kept.sum()) * U.T @ U
    return S


@pytest.mark.parametrize("losses", [CE_AUX, DEEP_SUPERVISION, PRETRAINING],
                         ids=["ce+0.4ce", "deep-supervision", "pretraining"])
@pytest.mark.parametrize("ignored", [0, 3])
def test_type2_output_factor_is_the_weighted_sum_over_the_outputs(losses, ignored):
    """K-FAC's S of the shared trunk under fisher="type2" is Σ_k (w_k/M_k) Σ_c U_{k,c}ᵀU_{k,c}
    (type2_factor_reference): each output's columns of H_k^{1/2} over its own kept rows M_k, whatever the
    first output's rows (the half-resolution side output, the next-sentence logits reached before the
    masked tokens' and most of those ignored)."""
    model = model_of(losses)
    x, targets = batch(losses, ignored=ignored)
    expected = type2_factor_reference(model, losses, x, targets)
    c = gnfx.compile(copy.deepcopy(model), optimizer="kfac", loss=losses, fisher="type2", stat_every=1,
                     stat_decay=0.0, statistics=("A", "S"), lr=1e-3)
    summed_loss(losses, c(x), targets).backward()
    c.step()
    torch.testing.assert_close(c.statistics("trunk.0")["S"], expected, **TOL)


@pytest.mark.parametrize("losses", [CE_AUX, PRETRAINING], ids=["ce+0.4ce", "pretraining"])
def test_the_empirical_factor_reads_the_summed_gradient_over_the_first_outputs_rows(losses):
    """fisher="empirical" with several outputs: S = M Σ_rows g gᵀ with g the summed loss's gradient at the
    layer output and M the first output's N·T rows, its ignored ones included (docs/design.md §1)."""
    model = model_of(losses)
    x, targets = batch(losses, ignored=3)
    layer, seen = model.trunk[0], {}
    handle = layer.register_forward_hook(lambda module, inputs, output: seen.setdefault("o", output))
    out = as_tuple(model(x))
    handle.remove()
    (g,) = torch.autograd.grad(summed_loss(losses, out, targets), seen["o"])
    rows = g.reshape(-1, g.shape[-1])
    expected = out[0][..., 0].numel() * rows.T @ rows
    c = gnfx.compile(copy.deepcopy(model), optimizer="kfac", loss=losses, fisher="empirical", stat_every=1,
                     stat_decay=0.0, statistics=("A", "S"), lr=1e-3)
    summed_loss(losses, c(x), targets).backward()
    c.step()
    torch.testing.assert_close(c.statistics("trunk.0")["S"], expected, **TOL)


def test_weighted_mc_statistics_converge_to_type2():
    """fisher="mc" samples each output's targets from its own distribution: with many samples its K-FAC
    S of the shared trunk approaches type2's."""
    model = model_of(CE_AUX)
    x, targets = batch(CE_AUX)
    got = {}
    for fisher, samples in (("type2", 1), ("mc", 1500)):
        torch.manual_seed(0)
        c = gnfx.compile(copy.deepcopy(model), optimizer="kfac", loss=CE_AUX, fisher=fisher, mc_samples=samples,
                         stat_every=1, stat_decay=0.0, statistics=("A", "S"), lr=1e-3)
        summed_loss(CE_AUX, c(x), targets).backward()
        c.step()
        got[fisher] = c.statistics("trunk.0")["S"]
    torch.testing.assert_close(got["mc"], got["type2"], rtol=0.1, atol=0.05 * float(got["type2"].abs().max()))


class LittleGoogLeNet(nn.Module):
    """GoogLeNet's pattern on 8x8 images: two auxiliary classifiers on intermediate feature maps, returned
    with the logits in training mode as (logits, aux_logits2, aux_logits1); in eval mode the logits alone."""

    def __init__(self, classes=4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.middle = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.last = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.aux1 = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, classes))
        self.aux2 = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, classes))
        self.fc = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))

    def forward(self, x):
        h = self.stem(x)
        aux1 = self.aux1(h) if self.training else None
        h = self.middle(h)
        aux2 = self.aux2(h) if self.training else None
        logits = self.fc(self.last(h))
        return (logits, aux2, aux1) if self.training else logits


def test_a_googlenet_like_network_with_two_auxiliary_heads_trains_at_defaults():
    """torchvision's reference recipe, ce(logits) + 0.3·ce(aux2) + 0.3·ce(aux1), with kfac at its defaults
    (the quadratic step, fisher="mc"): the training loss falls to a third within 40 steps (2.27 to 0.59;
    AdamW at lr 3e-3, 1e-2 and 3e-2 ended at 2.15, 2.05 and 1.76, benchmarks/results/several_outputs.md), and
    the model evaluates with its logits alone."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    y = torch.randint(4, (64,), generator=g)
    x = torch.randn(64, 1, 8, 8, generator=g) * 0.5
    x[:, 0, y, y] += 4.0  # the class is a bright pixel on the diagonal
    model = LittleGoogLeNet()
    losses = ("cross_entropy", ("cross_entropy", 0.3), ("cross_entropy", 0.3))
    c = gnfx.compile(model, optimizer="kfac", loss=losses)

    def loss_of(out):
        return F.cross_entropy(out[0], y) + 0.3 * F.cross_entropy(out[1], y) + 0.3 * F.cross_entropy(out[2], y)

    history = []
    for _ in range(40):
        loss = loss_of(c(x))
        loss.backward()
        c.step()
        c.zero_grad()
        history.append(float(loss.detach()))
    assert history[-1] < history[0] / 3, history
    c.eval()
    with torch.no_grad():
        assert (c(x).argmax(1) == y).float().mean() > 0.9


def test_a_second_output_reached_without_a_loss_in_loss_names_it():
    """loss= names the first two of three outputs: a backward that also reaches the third raises, naming it."""
    class Three(TwoHeads):
        def __init__(self):
            super().__init__()
            self.third = nn.Linear(6, 2)

        def forward(self, x):
            h = self.trunk(x)
            return self.head(h), self.aux(h), self.third(h)

    torch.manual_seed(0)
    c = gnfx.compile(Three().to(DTYPE), optimizer="kfac", loss=CE_AUX)
    x, (y, aux) = batch(CE_AUX)
    out = c(x)
    with pytest.raises(GnfxError, match="reaches output 2 .* which it gives no loss"):
        (F.cross_entropy(out[0], y) + 0.4 * F.cross_entropy(out[1], aux) + out[2].square().mean()).backward()


def test_a_named_output_computed_from_another_is_refused_at_the_forward():
    """A cascade (the second stage refines the first's logits, a loss on each): the gradient at the first
    output is its loss's plus the second's through it, which no check or recovered loss can split: a
    GnfxError at the statistic forward, before any wrong curvature."""
    torch.manual_seed(0)
    c = gnfx.compile(Cascade().to(DTYPE), optimizer="kfac", loss=CASCADE)
    x, _ = batch(CE_AUX)
    with pytest.raises(GnfxError, match="output 1 is computed from output 0"):
        c(x)


def test_a_weight_given_smaller_than_the_losses_raises_and_a_missing_term_too():
    model = model_of(CE_AUX)
    x, (y, aux) = batch(CE_AUX)
    c = gnfx.compile(copy.deepcopy(model), optimizer="kfac", loss=("cross_entropy", ("cross_entropy", 0.2)))
    out = c(x)
    (F.cross_entropy(out[0], y) + F.cross_entropy(out[1], aux)).backward()
    with pytest.raises(GnfxError, match="loss= entry 1 .*weight 0.2"):  # told at the step (a loss scale may explain it)
        c.step()
    c = gnfx.compile(copy.deepcopy(model), optimizer="kfac", loss=CE_AUX, stat_every=1)
    F.cross_entropy(c(x)[0], y).backward()
    with pytest.raises(GnfxError, match="did not reach that output"):
        c.step()


@pytest.mark.parametrize("loss, match", [
    ((("cross_entropy", 0.0), "mse"), "weight > 0"),
    ((None, "cross_entropy"), "first entry"),
    (("cross_entropy", "hinge"), "unknown loss"),
    ((), "pass a loss name"),
])
def test_bad_loss_tuples_are_refused_at_compile(loss, match):
    from gnfx.output_losses import output_losses
    with pytest.raises(ConfigError, match=match):
        output_losses(loss)
    with pytest.raises(ConfigError):
        gnfx.compile(model_of(CE_AUX), optimizer="kfac", loss=loss)


def test_the_exact_products_and_diagnose_refuse_a_loss_tuple_by_name():
    """gnfx.ggn (and gnfx.diagnose, which takes its products) model the first output's loss alone: a loss
    tuple is refused naming that, not read as an unknown loss name."""
    from gnfx.ggn import ggn_vp
    model = model_of(CE_AUX)
    x, (y, _) = batch(CE_AUX)
    with pytest.raises(ConfigError, match="first output alone"):
        ggn_vp(model, CE_AUX, x, y, [torch.zeros_like(p) for p in model.parameters()])


def test_several_outputs_under_a_grad_scaler_train_as_without_it():
    """torch.amp.GradScaler("cpu") (its scale s doubled after every step): the weighted outputs' checks, the
    quadratic step's remembered output gradients and the statistics are divided by s at the step, so four
    quadratic steps of ce + 0.4·ce give the parameters of the same steps without the scaler (float64)."""
    x, targets = batch(CE_AUX)
    runs = []
    for scaled in (False, True):
        c = gnfx.compile(model_of(CE_AUX), optimizer="kfac", loss=CE_AUX, stat_every=1, damping_every=1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1)
        for _ in range(4):
            backward_and_step(c, summed_loss(CE_AUX, c(x), targets), scaler if scaled else None)
        runs.append([p.detach().clone() for p in c.parameters()])
    assert scaler.get_scale() == 2.0 ** 14
    for plain, scaled in zip(*runs):
        torch.testing.assert_close(scaled, plain, rtol=1e-10, atol=1e-12)
    assert not torch.equal(runs[0][0], next(model_of(CE_AUX).parameters()))
