"""Spectrally normalized layers (W = W_o / σ, σ = uᵀ W_o v) as curvature blocks, σ held fixed for the step
(gnfx.reparametrization.SpectralNorm, passes/spectral_norm.py), float64, against plain-torch references:
the same layer with W as a leaf tensor (autograd), and torch.func.jvp of W_o ↦ W_o / (uᵀ W_o v)."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

import gnfx
from steps import train, train_in_blocks

ORIGINAL = "0.parametrizations.weight.original"


def layer_model(layer: str, normed: bool = True) -> tuple[nn.Module, torch.Tensor]:
    """(a model whose first layer is spectrally normalized, or plain; an input batch), float64."""
    torch.manual_seed(0)
    if layer == "linear":
        first, x, width = nn.Linear(6, 5), torch.randn(8, 6), 5
    else:
        first, x, width = nn.Conv2d(2, 3, 3, padding=1), torch.randn(8, 2, 4, 4), 3 * 16
    first = spectral_norm(first.double()) if normed else first
    return nn.Sequential(first, nn.Tanh(), nn.Flatten(), nn.Linear(width, 3)).double(), x.double()


def parts(model):
    """(W_o, u, v, the parametrization) of the first layer."""
    sn = model[0].parametrizations.weight[0]
    return model[0].parametrizations.weight.original, sn._u, sn._v, sn


def normalized(model) -> torch.Tensor:
    """W = W_o / (uᵀ W_o v) at the stored u, v (no power iteration)."""
    w_o, u, v, sn = parts(model)
    return (w_o / torch.vdot(u, torch.mv(sn._reshape_weight_to_matrix(w_o), v))).detach()


def plain_copy(model, layer):
    """The same model with W (at the stored u, v) a plain parameter."""
    plain, _ = layer_model(layer, normed=False)
    with torch.no_grad():
        plain[0].weight.copy_(normalized(model))
        plain[0].bias.copy_(model[0].bias)
        plain[3].load_state_dict(model[3].state_dict())
    return plain


def compiled(model, x, capture="fx", **hp):
    settings = dict(lr=1e-2, momentum=0.0, weight_decay=0.0, kl_clip=0.0, damping=0.1, stat_every=1, inv_every=1)
    settings.update(hp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gnfx.compile(model, optimizer="kfac", capture=capture, example_inputs=(x,), **settings)


@pytest.mark.parametrize("layer", ["linear", "conv2d"])
def test_spectrally_normed_layer_is_a_block_under_fx(layer):
    model, x = layer_model(layer)
    cm = compiled(model, x)
    assert not cm.layers.fallbacks
    block = cm.layers["0"]
    assert block.weight == ORIGINAL and block.reparametrization.weight == "0.weight"
    covered, total = cm.layers.coverage(dict(model.named_parameters()))
    assert covered == total


@pytest.mark.parametrize("layer", ["linear", "conv2d"])
def test_gathered_gradient_is_the_weight_gradient_but_along_u_v(layer):
    """σ ∇W_o = ∇W − ⟨W, ∇W⟩ u vᵀ, ∇W from the plain layer holding W at the u, v of the forward."""
    model, x = layer_model(layer)
    cm = compiled(model, x)
    cm(x).square().sum().backward()  # a training forward: one power iteration moves u, v
    plain = plain_copy(model, layer)
    plain(x).square().sum().backward()
    store = cm.optimizer.parameter_store
    store.gather()
    gathered = store.param(ORIGINAL).grad
    w_o, u, v, sn = parts(model)
    grad_w = sn._reshape_weight_to_matrix(plain[0].weight.grad)
    w = sn._reshape_weight_to_matrix(normalized(model))
    expected = grad_w - (w * grad_w).sum() * torch.outer(u, v)
    torch.testing.assert_close(sn._reshape_weight_to_matrix(gathered), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(store.param(ORIGINAL).detach(), plain[0].weight.detach(), rtol=1e-12, atol=1e-14)
    store.release()


def test_pull_back_misses_only_the_change_of_sigma():
    """J(ΔW_o) for the pulled-back ΔW_o = σ ΔW, by torch.func.jvp of W_o ↦ W_o / (uᵀ W_o v) (u, v fixed):
    ΔW − W (uᵀ ΔW v)."""
    model, _ = layer_model("conv2d")
    w_o, u, v, sn = parts(model)
    rp = gnfx.reparametrization.SpectralNorm("0.weight", ORIGINAL, sn)
    named = {ORIGINAL: w_o.detach()}
    delta_w = torch.randn_like(w_o)
    delta = rp.pull_back(named, delta_w)[ORIGINAL]

    def f(w):
        return w / torch.vdot(u, torch.mv(w.flatten(1), v))
    w, image = torch.func.jvp(f, (w_o.detach(),), (delta,))
    expected = delta_w - w * torch.vdot(u, torch.mv(delta_w.flatten(1), v))
    torch.testing.assert_close(image, expected, rtol=1e-10, atol=1e-12)


def test_training_at_defaults():
    """kfac at its defaults (the quadratic-model step) lowers the loss; in eval mode (stored u, v, no
    power iteration) the compiled model's outputs equal the original model's."""
    torch.manual_seed(0)
    model = nn.Sequential(spectral_norm(nn.Linear(10, 16)), nn.Tanh(), spectral_norm(nn.Linear(16, 4))).double()
    x, y = torch.randn(64, 10, dtype=torch.float64), torch.randint(0, 4, (64,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = gnfx.compile(model, optimizer="kfac", loss="cross_entropy")
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(cm(x), y)
        losses.append(loss.item())
        cm.zero_grad()
        loss.backward()
        cm.step()
        cm.eval()
        torch.testing.assert_close(cm(x), model(x), rtol=0, atol=0)
        cm.train()
    assert len(cm.layers) == 2 and not cm.layers.fallbacks
    assert losses[-1] < 0.8 * losses[0], losses  # slower than unnormalized layers: |z| ≤ ‖x‖ here


@pytest.mark.parametrize("optimizer", ["ekfac", "shampoo", "diag"])
def test_other_preconditioners_step_spectrally_normed_blocks(optimizer):
    model, x = layer_model("conv2d")
    y = torch.randn(8, 3, dtype=torch.float64)
    losses = train_in_blocks(model, x, y, optimizer)
    assert losses[-1] < losses[0], losses
