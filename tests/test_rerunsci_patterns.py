"""Regressions found by rerunning the first-contact probes (benchmarks/results/first_contact_15_rerunsci.md), each
with a plain-torch stand-in, float64, against plain hooks."""
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


def test_a_layer_whose_method_only_the_parents_reset_parameters_calls_is_opened():
    """PyG's GCNPool and GINPool (benchmarks/pyg_probe.py) fell from 96.4% and 100% of their entries in blocks
    to 9.3% and 24.1%: their convolutions' `lin` was refused as a layer whose class method other than forward
    the calling code names, `self.lin.reset_parameters()` in GCNConv.reset_parameters, which runs at
    construction, not at a call. Opened, it is a block whose A and S are those of hooks."""
    torch.manual_seed(0)
    model = GraphConv(6, 4).double()
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
