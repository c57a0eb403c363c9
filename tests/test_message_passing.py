"""Graph neural networks as PyTorch Geometric writes them, without PyTorch Geometric (benchmarks/results/
first_contact_9_pyg.md): each test is a stand-in for the pattern of torch_geometric's models that broke,
and failed before its fix.

- one activation module registered under two names (torch_geometric.nn.models.GIN passes its `self.act`
  to the MLP inside each GINConv), the outer name called by the captured graph and the inner one inside a
  submodule torch.fx keeps opaque: the lowering's module lookup missed the outer name (KeyError 'act').
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import gnfx


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
