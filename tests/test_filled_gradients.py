"""The statistics count the backwards whose gradients the step applies (gnfx.filled_gradients, and
`zero_grad` in gnfx.optimizer), in the training tasks whose loops run other backwards through the model:
a GAN's generator loss through the compiled discriminator, a gradient penalty's input gradient
(WGAN-GP, R1), an adversarial example's input gradient.

The reference is plain autograd on a copy of the model: forward hooks keep each linear layer's input a
and output z per call, and torch.autograd.grad of the user's loss with respect to those z gives the
gradient g each block's statistics must be built from (through a penalty's double backward too), so
that A = mean [a 1][a 1]ᵀ and S = M Σ g gᵀ over the rows of the forwards the loss's backward reaches at
the block (M: those rows, docs/design.md §1: a forward counts once its backward reaches the block).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx

TOL = dict(rtol=1e-10, atol=1e-12)
LAYERS = ("0", "2")


def mlp(d_in: int, d_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, 7), nn.Tanh(), nn.Linear(7, d_out)).double()


class Recorded:
    """A plain copy of `model` whose linear layers keep (a, z) of every call."""

    def __init__(self, model: nn.Module):
        self.model = copy.deepcopy(model)
        self.calls = {name: [] for name in LAYERS}
        for name in LAYERS:
            self.model.get_submodule(name).register_forward_hook(
                lambda module, inputs, z, name=name: self.calls[name].append((inputs[0].detach(), z)))

    def __call__(self, x):
        return self.model(x)

    def statistics(self, loss: torch.Tensor) -> dict:
        """A and S of every layer from the calls that loss reaches, g = ∂loss/∂z."""
        expected = {}
        for name, calls in self.calls.items():
            grads = torch.autograd.grad(loss, [z for _, z in calls], retain_graph=True, allow_unused=True)
            a = torch.cat([a for (a, _), g in zip(calls, grads) if g is not None])
            g = torch.cat([g for g in grads if g is not None])
            a = torch.cat([a, torch.ones_like(a[:, :1])], 1)
            expected[name] = {"A": a.T @ a / len(a), "S": len(a) * g.T @ g}
        return expected


def assert_step_as_reference(c, model, reference, loss, loss_ref, expected: dict) -> None:
    """The compiled model's loss and, after its backward, gradients equal the plain `reference`'s, and the
    statistics of its step those the reference's hooks recorded (`expected`)."""
    torch.testing.assert_close(loss, loss_ref, **TOL)
    loss.backward()
    for (name, p), p_ref in zip(model.named_parameters(), reference.model.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, **TOL, msg=name)
    c.step()
    assert_statistics(c, expected)


def assert_statistics(c, expected: dict) -> None:
    for name, values in expected.items():
        got = c.statistics(name)
        for key, value in values.items():
            torch.testing.assert_close(got[key], value, **TOL, msg=f"{name} {key}")


@pytest.mark.parametrize("how", ["zero_grad", "frozen"])
def test_a_generator_loss_through_the_discriminator_leaves_its_statistics(how):
    """Both compiled; the generator's loss bce(D(G(z)), 1) runs through D, whose forward there is a
    statistic forward. `zero_grad`: D.zero_grad() before D's own backward clears the gradients that loss
    left in D, and now its statistics too (they were folded into D's next step: S off by more than its
    size). `frozen`: D's parameters are frozen for the generator's step (requires_grad_(False)) and D's
    zero_grad comes after its step: the backward fills no gradient of D, and now records no statistic."""
    torch.manual_seed(0)
    G, D = mlp(3, 6), mlp(6, 1)
    g = gnfx.compile(G, "kfac", lr=1e-2, stat_every=1)
    d = gnfx.compile(D, "kfac", lr=1e-2, stat_every=1, stat_decay=0.0)
    real = torch.randn(5, 6, dtype=torch.float64)
    targets = torch.cat([torch.ones(5, 1), torch.zeros(5, 1)]).double()
    for _ in range(3):
        fake = g(torch.randn(5, 3, dtype=torch.float64))
        if how == "zero_grad":
            d.zero_grad()
        reference = Recorded(D)
        x = torch.cat([real, fake.detach()])
        expected = reference.statistics(F.binary_cross_entropy_with_logits(reference(x), targets))
        F.binary_cross_entropy_with_logits(d(x), targets).backward()
        d.step()
        assert_statistics(d, expected)
        if how == "frozen":
            d.zero_grad()
            D.requires_grad_(False)
        g.zero_grad()
        out = d(fake)
        F.binary_cross_entropy_with_logits(out, torch.ones_like(out)).backward()
        g.step()
        D.requires_grad_(True)


def test_an_input_gradient_records_nothing():
    """Adversarial training (FGSM): autograd.grad(loss, x) at the clean batch, then the loss at
    x + ε sign(∇x) backpropagated and stepped. The input gradient fills no parameter's gradient: the
    statistics are those of the adversarial forward alone (the clean forward's were added before)."""
    torch.manual_seed(0)
    model = mlp(4, 3)
    c = gnfx.compile(model, "kfac", lr=1e-2, stat_every=1, stat_decay=0.0)
    x, y = torch.randn(6, 4, dtype=torch.float64, requires_grad=True), torch.randint(0, 3, (6,))
    (grad_x,) = torch.autograd.grad(F.cross_entropy(c(x), y), x)
    x_adv = (x + 0.1 * grad_x.sign()).detach()
    reference = Recorded(model)
    expected = reference.statistics(F.cross_entropy(reference(x_adv), y))
    F.cross_entropy(c(x_adv), y).backward()
    c.step()
    assert_statistics(c, expected)


def gradient_penalty(critic, real, fake, eps):
    """WGAN-GP's critic loss: E D(fake) - E D(real) + 10 E (|∇x̂ D(x̂)| - 1)², x̂ between real and fake."""
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    penalty = ((grad.norm(dim=1) - 1) ** 2).mean()
    return critic(fake).mean() - critic(real).mean() + 10 * penalty


def test_a_gradient_penalty_counts_the_loss_backward_once():
    """WGAN-GP through the compiled critic: the penalty's inner autograd.grad(D(x̂).sum(), x̂) reached the
    taps of the x̂ forward and recorded ∂D(x̂).sum()/∂z as if it were the loss's gradient; the loss's own
    backward (through the double backward, tanh's second derivative included) then added the x̂ forward's
    rows again. Now the statistics are those of the loss's backward alone, over the three forwards."""
    torch.manual_seed(0)
    D = mlp(6, 1)
    d = gnfx.compile(D, "kfac", lr=1e-2, stat_every=1, stat_decay=0.0)
    real, fake = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    eps = torch.rand(5, 1, dtype=torch.float64)
    reference = Recorded(D)
    expected = reference.statistics(gradient_penalty(reference, real, fake, eps))
    gradient_penalty(d, real, fake, eps).backward()
    d.step()
    assert_statistics(d, expected)


def test_an_r1_penalty_leaves_the_true_fisher_to_the_loss_backward():
    """R1 with loss="binary_cross_entropy" and fisher="type2": the penalty's autograd.grad(D(x).sum(), x)
    reached the output first, where the loss's gradient check read its gradient of ones as a binary
    cross-entropy's (implied targets σ(z) - N, far outside [0, 1]) and raised a GnfxError. Now the
    output's hook lets that backward pass and acts on the loss's: no error or warning, and S is the
    type-2 Fisher's of the batch."""
    torch.manual_seed(0)
    D = mlp(6, 1)
    d = gnfx.compile(D, "kfac", lr=1e-2, loss="binary_cross_entropy", fisher="type2", stat_every=1,
                     stat_decay=0.0)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 2, (5, 1)).double()

    def loss_of(model):
        out = model(x)
        (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        return out, F.binary_cross_entropy_with_logits(out, y) + 5 * grad.square().sum(1).mean()

    reference = Recorded(D)
    out, _ = loss_of(reference)
    p = torch.sigmoid(out.detach())
    v = (p * (1 - p)).sqrt() / 5  # type2's vector of a (N, 1) output over its M = 5 terms
    expected = {}
    for name, [(a, z), *_] in reference.calls.items():
        (g,) = torch.autograd.grad(out, z, grad_outputs=v, retain_graph=True)
        expected[name] = {"S": 5 * g.T @ g}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, loss = loss_of(d)
        loss.backward()
        d.step()
    assert_statistics(d, expected)



def test_a_maml_step_through_functional_call():
    """MAML: torch.func.functional_call on the compiled model, with its parameters for the inner loss and
    fast weights θ - α∇θ (create_graph) for the outer one. A statistic forward under functional_call raised
    the GnfxError of a replaced Parameter; now the call's tensors are bound for that call: the output and
    θ's gradients are the module's own, the inner autograd.grad (with θ as its inputs) records nothing, and
    the statistics are those of the outer loss's backward (the fast-weight forward's rows, and the inner
    forward's, which that backward reaches through the inner gradient)."""
    torch.manual_seed(0)
    model = mlp(4, 3)
    c = gnfx.compile(model, "kfac", lr=1e-2, stat_every=1, stat_decay=0.0)
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))

    def meta_loss(module, net):
        params = dict(net.named_parameters())
        inner = F.cross_entropy(torch.func.functional_call(module, params, (x[:5],)), y[:5])
        grads = torch.autograd.grad(inner, list(params.values()), create_graph=True)
        fast = {name: p - 0.1 * g for (name, p), g in zip(params.items(), grads)}
        return F.cross_entropy(torch.func.functional_call(module, fast, (x[5:],)), y[5:])

    reference = Recorded(model)
    loss_ref = meta_loss(reference.model, reference.model)
    expected = reference.statistics(loss_ref)
    loss_ref.backward()
    loss = meta_loss(c, model)
    assert_step_as_reference(c, model, reference, loss, loss_ref, expected)
    assert all(t is p for t, p in zip(c.parameters(), model.parameters()))


def test_the_quadratic_step_names_a_forward_under_functional_call():
    """With loss= and no lr the step replays the last training forward at θ; a MAML outer forward under
    functional_call ran at the fast weights instead, so the model, α and ρ would be of another function:
    a RuntimeWarning names it (once), and a plain call gives none."""
    torch.manual_seed(0)
    model = mlp(4, 3)
    c = gnfx.compile(model, "kfac", loss="cross_entropy")
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F.cross_entropy(c(x), y).backward()
        c.step()
        c.zero_grad()
    fast = {name: p + 0.0 for name, p in model.named_parameters()}
    with pytest.warns(RuntimeWarning, match="functional_call"):
        F.cross_entropy(torch.func.functional_call(c, fast, (x,)), y).backward()
    c.step()
