"""Masked weights W = M ⊙ V (MADE's masked linear layers: zuko's and nflows' MaskedLinear, the masked
autoregressive flows' hyper-networks) as curvature blocks (gnfx.reparametrization.MaskedWeight,
passes/masked_weights.py), float64, against plain-torch references: hooks on the layer calls for A and S,
and a plain nn.Linear holding W whose gradient a tensor hook masks (the gathered ∇W = M ⊙ ∇W), stepped by
the same optimizer, for the step."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from references import TOL, hook_statistics
from steps import compile_for_statistics, statistic_step


class MaskedLinear(nn.Linear):
    """zuko's MaskedLinear (`mask * weight`, a bool mask) or, with `weight_first`, nflows' (`weight * mask`,
    a floating mask)."""

    def __init__(self, mask: torch.Tensor, weight_first: bool = False):
        super().__init__(mask.shape[1], mask.shape[0])
        self.register_buffer("mask", mask.double() if weight_first else mask)
        self.weight_first = weight_first

    def forward(self, x):
        return F.linear(x, self.weight * self.mask if self.weight_first else self.mask * self.weight, self.bias)


def made() -> nn.Sequential:
    """A two-layer masked MLP (float64), one layer of each operand order."""
    torch.manual_seed(0)
    return nn.Sequential(MaskedLinear(torch.rand(8, 4) < 0.5), nn.Tanh(),
                         MaskedLinear(torch.rand(3, 8) < 0.6, weight_first=True)).double()


def unmasked(model: nn.Sequential) -> nn.Sequential:
    """Plain nn.Linear layers holding W = M ⊙ V, their weight gradients masked by M."""
    layers = []
    for layer in model:
        if isinstance(layer, MaskedLinear):
            plain = nn.Linear(layer.in_features, layer.out_features).double()
            with torch.no_grad():
                plain.weight.copy_(layer.mask * layer.weight)
                plain.bias.copy_(layer.bias)
            plain.weight.register_hook(lambda g, mask=layer.mask: g * mask)
            layer = plain
        layers.append(copy.deepcopy(layer) if not isinstance(layer, nn.Linear) else layer)
    return nn.Sequential(*layers)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_masked_linear_is_a_block_with_the_statistics_of_its_masked_weight(capture):
    model, x, y = made(), torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    c = compile_for_statistics(model, optimizer="kfac", capture=capture)
    statistic_step(c, x, y)
    covered, total = c.layers.coverage(dict(model.named_parameters()))
    assert covered == total, c.layers.fallbacks
    # the statistics of the step's batch, at the parameters before it: hooks on a copy taken before the step
    model_before = made()
    want = hook_statistics(model_before, ["0", "2"], x, y)
    for name in ("0", "2"):
        for factor in ("A", "S"):
            torch.testing.assert_close(c.statistics(name)[factor], want[name][factor], **TOL)


@pytest.mark.parametrize("optimizer", ["kfac", "shampoo"])
def test_a_masked_weight_steps_as_a_plain_layer_with_its_gradient_masked(optimizer):
    """One step moves V by M ⊙ (the step of a plain layer holding W with gradient M ⊙ ∇W; that layer's step
    is dense, the masked one's moves no masked-out entry of V), decoupled weight decay included."""
    model, x, y = made(), torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    reference = unmasked(model)
    settings = dict(optimizer=optimizer, lr=1e-2, weight_decay=0.1)
    c, c_ref = compile_for_statistics(model, **settings), compile_for_statistics(reference, **settings)
    before = [layer.weight.detach().clone() for layer in model if isinstance(layer, MaskedLinear)]
    statistic_step(c, x, y)
    statistic_step(c_ref, x, y)
    for layer, plain, v0 in zip(model[::2], reference[::2], before):
        mask = layer.mask.double()
        torch.testing.assert_close(mask * layer.weight, mask * plain.weight, **TOL)
        torch.testing.assert_close(layer.weight[mask == 0], v0[mask == 0], rtol=0, atol=0)
        assert not torch.allclose(layer.weight[mask != 0], v0[mask != 0])
