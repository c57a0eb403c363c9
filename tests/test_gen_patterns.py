"""Patterns of generative-model training libraries (k-diffusion, torchcfm, normflows; benchmarks/gen_probe.py,
benchmarks/results/first_contact_13_gen.md), each with a plain-torch stand-in, float64, against plain hooks."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from references import TOL, hook_statistics
from steps import compile_for_statistics, statistic_step


class MaskedLinear(nn.Linear):
    """normflows' (and nflows') MADE layer: `F.linear(x, self.weight * self.mask, self.bias)`, a 0/1 float mask."""

    def __init__(self, mask: torch.Tensor):
        super().__init__(mask.shape[1], mask.shape[0])
        self.register_buffer("mask", mask.double())

    def forward(self, x):
        return F.linear(x, self.weight * self.mask, self.bias)


class AutoregressiveInverse(nn.Module):
    """normflows' Autoregressive.inverse (the direction its log_prob and forward_kld run for a masked
    autoregressive flow): the MADE called once per feature in a loop, each call on the previous call's output,
    so each masked weight is multiplied by its mask once per call."""

    def __init__(self, features: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.made = nn.Sequential(MaskedLinear((torch.rand(8, features) < 0.6).double()), nn.Tanh(),
                                  MaskedLinear((torch.rand(features, 8) < 0.6).double()))
        self.features = features

    def forward(self, x):
        h = torch.zeros_like(x)
        for _ in range(self.features):
            h = x - self.made(h)
        return h


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_masked_weight_multiplied_by_its_mask_at_every_call_is_one_block_over_the_calls(capture):
    """Each call's product M ⊙ V stands for V: one block whose sites are the calls, its A and S those of hooks
    on every call (positions of the calls pooled); before, V fell back (used by 4 products, 'mul.Tensor')."""
    model = AutoregressiveInverse().double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 4, (16,))
    want = hook_statistics(model, ["made.0", "made.2"], x, y)
    c = compile_for_statistics(model, optimizer="kfac", capture=capture)
    statistic_step(c, x, y)
    covered, total = c.layers.coverage(dict(model.named_parameters()))
    assert covered == total, c.layers.fallbacks
    for name in ("made.0", "made.2"):
        assert len(c.layers[name].sites) == 4
        for factor in ("A", "S"):
            torch.testing.assert_close(c.statistics(name)[factor], want[name][factor], **TOL)
