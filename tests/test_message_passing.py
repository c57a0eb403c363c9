"""Graph neural networks as PyTorch Geometric writes them, without PyTorch Geometric (benchmarks/results/
first_contact_9_pyg.md): each test is a stand-in for the pattern of torch_geometric's models that broke,
and failed before its fix.

- one activation module registered under two names (torch_geometric.nn.models.GIN passes its `self.act`
  to the MLP inside each GINConv), the outer name called by the captured graph and the inner one inside a
  submodule torch.fx keeps opaque: the lowering's module lookup missed the outer name (KeyError 'act');
- GATConv's attention scores `(x_h * att).sum(-1)` of each head's features: the product was a layer scale
  (per feature, one head) or fell back (several heads); now a weighted-sum block, per head the linear map
  of the head's features to its score (gnfx.layouts.weighted_sum);
- GCNConv's and GATConv's bias, added after the aggregation (`propagate(...) + self.bias`), fell back: now a
  shift block, a position table of one row (gnfx.layouts.shift).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from references import TOL
from steps import compile_for_statistics


class SharedActivation(nn.Module):
    """GIN's layout: `self.act` registered first, then passed to a submodule that registers it again; the
    submodule's forward branches on a shape (torch.fx keeps it opaque, as PyG's message passing)."""

    def __init__(self):
        super().__init__()
        self.act = nn.ReLU()
        self.inner = Inner(self.act)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.act(self.inner(x)))


class Inner(nn.Module):
    def __init__(self, act: nn.Module):
        super().__init__()
        self.fc, self.act = nn.Linear(4, 6), act

    def forward(self, x):
        if x.shape[0] > 0:  # a branch torch.fx cannot trace
            x = self.act(self.fc(x))
        return x


def test_a_module_registered_under_two_names_is_found_under_the_name_the_graph_calls():
    """The graph calls the activation as `act` (the model's first name for it); the graph module, built
    from the graph's targets, also holds it as `inner.act` inside the opaque `inner`, and
    `dict(gm.named_modules())` lists a module once, under its first name there: the lowering raised
    KeyError 'act'. Every pass now looks modules up by any of their names: the model trains, its two
    linear layers in blocks (the opaque submodule's opened)."""
    torch.manual_seed(0)
    model = SharedActivation()
    c = gnfx.compile(model, "kfac", lr=1e-2, capture="fx")
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    F.cross_entropy(c(x), y).backward()
    c.step()
    assert sorted(b.name for b in c.layers.blocks) == ["head", "inner.fc"] and not c.layers.fallbacks


class AttentionMessagePassing(nn.Module):
    """GATConv's pattern: each node's features per head, h (N, heads, C), scored by `(h * att).sum(-1)` for
    the source and the destination of each edge of `edge_index` (2, E); messages h[src] weighted by
    exp(leaky_relu(score)) summed into their destinations by index_add_."""

    def __init__(self, heads: int, channels: int = 3):
        super().__init__()
        self.heads, self.channels = heads, channels
        self.lin = nn.Linear(4, heads * channels, bias=False)
        self.att_src = nn.Parameter(torch.randn(1, heads, channels))
        self.att_dst = nn.Parameter(torch.randn(1, heads, channels))
        self.head = nn.Linear(heads * channels, 3)

    def scores(self, x, edge_index):
        """(the output, h, the source scores, the destination scores)."""
        h = self.lin(x).view(-1, self.heads, self.channels)
        source, destination = (h * self.att_src).sum(-1), (h * self.att_dst).sum(dim=-1)
        src, dst = edge_index
        weight = torch.exp(F.leaky_relu(source[src] + destination[dst], 0.2))
        messages = torch.zeros_like(h).index_add_(0, dst, h[src] * weight.unsqueeze(-1))
        return self.head(messages.flatten(1)), h, source, destination

    def forward(self, x, edge_index):
        return self.scores(x, edge_index)[0]


@pytest.mark.parametrize("heads", [1, 2])
def test_attention_scores_of_each_head_are_a_block_of_linear_maps_with_exact_factors(heads):
    """The scores `(h * att).sum(-1)` are per head g the linear map z_g = att_gᵀ h_g: a weighted-sum block of
    `heads` groups whose K-FAC factors are A_g = mean_n h_{n,g} h_{n,g}ᵀ and S_g = M Σ_n (∂L/∂z_{n,g})², M the
    rows the masked loss counts (autograd on the module's own forward, float64), for two graphs of different
    node and edge counts (one capture). One head was a scale block (per feature), two fell back."""
    torch.manual_seed(0)
    model = AttentionMessagePassing(heads).double()
    c = compile_for_statistics(model, optimizer="kfac", capture="export")
    for nodes, edges in ((12, 30), (9, 20)):
        x, edge_index = torch.randn(nodes, 4, dtype=torch.float64), torch.randint(0, nodes, (2, edges))
        y, mask = torch.randint(0, 3, (nodes,)), torch.arange(nodes) % 3 != 0
        out, h, source, destination = model.scores(x, edge_index)
        for score in (source, destination):
            score.retain_grad()
        F.cross_entropy(out[mask], y[mask]).backward()
        expected = {}
        for name, score in (("att_src", source), ("att_dst", destination)):
            g = score.grad
            expected[name] = (torch.einsum("ngc,ngd->gcd", h, h) / nodes, mask.sum() * torch.einsum("ng,ng->g", g, g))
        model.zero_grad()
        F.cross_entropy(c(x, edge_index)[mask], y[mask]).backward()
        c.step()
        c.zero_grad()
        for name, (A, S) in expected.items():
            assert c.layers[name].kind == "weighted_sum"
            statistics = c.statistics(name)
            torch.testing.assert_close(statistics["A"].reshape(heads, 3, 3), A.detach(), **TOL)
            torch.testing.assert_close(statistics["S"].reshape(heads), S, **TOL)
    assert [f.param for f in c.layers.fallbacks] == []


class GraphConvolution(nn.Module):
    """GCNConv's pattern: a bias-free linear map of the node features, its rows summed into each edge's
    destination by index_add_, then the layer's bias added; two layers and a bias-free head."""

    def __init__(self):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(4, 5, bias=False), nn.Linear(5, 3, bias=False)
        self.bias1, self.bias2 = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(3))

    def aggregate(self, h, edge_index):
        src, dst = edge_index
        return torch.zeros_like(h).index_add_(0, dst, h[src])

    def layers(self, x, edge_index):
        """The first layer's output and the model's."""
        z1 = self.aggregate(self.lin1(x), edge_index) + self.bias1
        return z1, self.bias2 + self.aggregate(self.lin2(torch.tanh(z1)), edge_index)

    def forward(self, x, edge_index):
        return self.layers(x, edge_index)[1]


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_bias_added_after_the_aggregation_is_a_shift_block_with_exact_factors(capture):
    """Each bias is a block of kind shift: A = [1] and S = M Σ_n g_n g_nᵀ, g_n = ∂L/∂z_n of the sum's rows and
    M the rows the masked loss counts (autograd on the module's own forward, float64), for two graphs of
    different node and edge counts; nothing falls back. It fell back before (an add gnfx had no layer for)."""
    torch.manual_seed(0)
    model = GraphConvolution().double()
    c = compile_for_statistics(model, optimizer="kfac", capture=capture)
    for nodes, edges in ((12, 30), (9, 20)):
        x, edge_index = torch.randn(nodes, 4, dtype=torch.float64), torch.randint(0, nodes, (2, edges))
        y, mask = torch.randint(0, 3, (nodes,)), torch.arange(nodes) % 3 != 0
        sums = model.layers(x, edge_index)
        for z in sums:
            z.retain_grad()
        F.cross_entropy(sums[1][mask], y[mask]).backward()
        model.zero_grad()
        F.cross_entropy(c(x, edge_index)[mask], y[mask]).backward()
        c.step()
        c.zero_grad()
        for name, z in zip(("bias1", "bias2"), sums):
            assert c.layers[name].kind == "shift"
            statistics = c.statistics(name)
            torch.testing.assert_close(statistics["A"].reshape(-1), torch.ones(1, dtype=torch.float64), **TOL)
            torch.testing.assert_close(statistics["S"], mask.sum() * z.grad.T @ z.grad, **TOL)
    assert not c.layers.fallbacks
