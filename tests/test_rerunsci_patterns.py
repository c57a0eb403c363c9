"""Regressions found by rerunning the first-contact probes (benchmarks/results/first_contact_15_rerunsci.md), each
with a plain-torch stand-in, float64, against plain hooks."""
import warnings

import pytest
import torch
from torch import nn

from references import TOL, kfac_factors, record_linear_calls
from steps import compile_for_statistics, statistic_step


class ResettableLinear(nn.Linear):
    """PyG's torch_geometric.nn.Linear: a linear layer of a library's own class, whose public methods (here its
    `reset_parameters`) are the class's own, not torch's."""

    def reset_parameters(self):
        super().reset_parameters()


class GraphConv(nn.Module):
    """PyG's GCNConv: a data-dependent size (`int(index.max()) + 1`) that neither torch.fx nor torch.export
    captures, its own `reset_parameters` calling its layer's, as every PyG convolution's does at construction."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.lin = ResettableLinear(d_in, d_out)
        self.reset_parameters()

    def reset_parameters(self):
        self.lin.reset_parameters()

    def forward(self, x, index):
        pooled = x.new_zeros(int(index.max()) + 1, x.shape[1]).index_add_(0, index, x)
        return self.lin(pooled[index])


class TimmConv(GraphConv):
    """timm's and Hugging Face's convention: the initializer is `init_weights` / `_init_weights`."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__(d_in, d_out)
        self.init_weights()

    def init_weights(self):
        self._init_weights()

    def _init_weights(self):
        self.lin.reset_parameters()


class VisionConv(GraphConv):
    """torchvision's convention (VGG, SqueezeNet): `_initialize_weights`."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__(d_in, d_out)
        self._initialize_weights()

    def _initialize_weights(self):
        self.lin.reset_parameters()


@pytest.mark.parametrize("conv", [GraphConv, TimmConv, VisionConv])
def test_a_layer_whose_method_only_the_parents_reset_parameters_calls_is_opened(conv):
    """PyG's GCNPool and GINPool (benchmarks/pyg_probe.py) fell from 96.4% and 100% of their entries in blocks
    to 9.3% and 24.1%: their convolutions' `lin` was refused as a layer whose class method other than forward
    the calling code names, `self.lin.reset_parameters()` in GCNConv.reset_parameters, which runs at
    construction, not at a call. Opened, it is a block whose A and S are those of hooks."""
    torch.manual_seed(0)
    model = conv(6, 4).double()
    x, index = torch.randn(12, 6, dtype=torch.float64), torch.randint(0, 5, (12,))
    y = torch.randint(0, 4, (12,))
    calls, m = record_linear_calls(model, ["lin"], x, y, index=index)
    c = compile_for_statistics(model, optimizer="kfac")
    statistic_step(c, x, y, index=index)
    covered, total = c.layers.coverage(dict(model.named_parameters()))
    assert covered == total, c.layers.fallbacks
    want = kfac_factors(calls["lin"], True, "expand", m)
    for factor in ("A", "S"):
        torch.testing.assert_close(c.statistics("lin")[factor], want[factor], **TOL)


class Filter(nn.Module):
    """PyG's CFConv: its filter network `net` is the module its parent also holds as `mlp`."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.lin = net, nn.Linear(4, 4)

    def forward(self, x, e):
        return self.lin(x) * self.net(e)


class Interaction(nn.Module):
    """SchNet's InteractionBlock: `self.mlp` registered again as `self.conv.nn` (one module, two paths)."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
        self.conv, self.out = Filter(self.mlp), nn.Linear(4, 4)

    def forward(self, x, e):
        return self.out(self.conv(x, e))


class PooledInteraction(nn.Module):
    """SchNet: an opaque forward (a data-dependent size) around the interaction block, which is opened."""

    def __init__(self):
        super().__init__()
        self.block, self.head = Interaction(), nn.Linear(4, 3)

    def forward(self, x, e, index):
        h = self.block(x, e)
        pooled = h.new_zeros(int(index.max()) + 1, h.shape[1]).index_add_(0, index, h)
        return self.head(pooled[index])


def test_an_opened_child_holding_a_module_under_two_paths_runs_its_graph():
    """PyG's SchNet (benchmarks/molecular_probe.py) once its interaction blocks were opened: the numbers the
    opened child's graph was traced with were listed by `named_modules()`, which names a module held under two
    paths once, and those of its watched copy, where each path holds a copy of its own, under both: every call
    differed ("interactions.0.conv.nn.0.in_features is 8, where the graph ... has unset"), ran the child's own
    forward, and its blocks got no statistics. Now the graph runs and A and S are those of hooks."""
    torch.manual_seed(0)
    model = PooledInteraction().double()
    x, e = torch.randn(12, 4, dtype=torch.float64), torch.randn(12, 3, dtype=torch.float64)
    index, y = torch.randint(0, 5, (12,)), torch.randint(0, 3, (12,))
    names = ["block.out", "block.conv.lin", "head"]
    calls, m = record_linear_calls(model, names, x, y, e=e, index=index)
    c = compile_for_statistics(model, optimizer="kfac")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        statistic_step(c, x, y, e=e, index=index)
    assert not [w for w in caught if "where the graph gnfx captured" in str(w.message)]
    for name in names:
        want = kfac_factors(calls[name], True, "expand", m)
        for factor in ("A", "S"):
            torch.testing.assert_close(c.statistics(name)[factor], want[factor], **TOL)
