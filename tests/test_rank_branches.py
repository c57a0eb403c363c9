"""Layers that branch on the rank of their input in Python (spikingjelly's `layer.Conv2d`: `if x.dim() == 3: ...
elif x.dim() == 4: ...`; `x.ndim`, `len(x.shape)`), traced with the example call's ranks (passes/ranks.py): their
convolutions are curvature blocks whose A and S equal those of hooks on the plain model (test_conv.py's
references, float64, 1e-10), and a call with another rank gets a graph of its own. capture='fx' with the example
call, as for spikingjelly, whose surrogate-gradient Functions torch.export is refused for (torch.export alone
would capture these models)."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from references import cross_entropy
from steps import ALL, compile_for_statistics
from test_conv import conv_factors, patches_by_unfold, record_conv

DTYPE = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)
RANK_READS = {"dim": lambda x: x.dim(), "ndim": lambda x: x.ndim, "len": lambda x: len(x.shape)}


class RankBranchingConv2d(nn.Conv2d):
    """spikingjelly's layer.Conv2d in plain torch: one unbatched image (C, H, W) is convolved as a batch of
    one, a batch (N, C, H, W) as it is, anything else refused; the rank read as `read` says."""

    def __init__(self, *args, read: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.read = read

    def forward(self, x):
        rank = RANK_READS[self.read](x)
        if rank == 3:
            return super().forward(x.unsqueeze(0)).squeeze(0)
        elif rank == 4:
            return super().forward(x)
        raise ValueError(f"expected a 3-D or 4-D input, got {rank}-D")


class CNN(nn.Module):
    """conv → batch norm → tanh → conv → tanh → mean over positions → linear head; an unbatched image is a batch of
    one. (The batch norm, a leaf the tracer evaluates on fake tensors, must count its calls once per forward.)
    `conv`: the convolution class (nn.Conv2d, or RankBranchingConv2d and how it reads the rank)."""

    def __init__(self, branching: bool, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        conv1 = dict(read="dim") if branching else {}
        conv2 = dict(read="ndim") if branching else {}
        Conv = RankBranchingConv2d if branching else nn.Conv2d
        self.conv1 = Conv(2, 3, 3, padding=1, **conv1)
        self.conv2 = Conv(3, 4, 3, stride=2, **conv2)
        self.norm = nn.BatchNorm2d(3)
        self.head = nn.Linear(4, 5)
        self.to(DTYPE)

    def forward(self, x):
        if len(x.shape) == 3:
            x = x.unsqueeze(0)
        h = torch.tanh(self.conv2(torch.tanh(self.norm(self.conv1(x)))))
        return self.head(h.flatten(2).mean(2))


def batches(count, n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 2, 7, 7, generator=g, dtype=DTYPE), torch.randint(0, 5, (n,), generator=g))
            for _ in range(count)]


def test_convolutions_that_branch_on_their_inputs_rank_are_blocks_with_the_hooks_statistics():
    model = CNN(branching=True)
    (x, y), = batches(1)
    refs = {}
    for name in ("conv1", "conv2"):
        a, g, M = record_conv(model, name, x, y, patches_by_unfold)
        refs[name] = conv_factors(a, g, True, "expand", M)
    c = compile_for_statistics(model, optimizer="kfac", statistics=ALL, capture="fx", example_inputs=(x,))
    cross_entropy(c(x), y).backward()
    assert [b.name for b in c.layers] == ["conv1", "norm", "conv2", "head"]
    assert not c.layers.fallbacks
    c.step()
    for name in ("conv1", "conv2"):
        got = c.statistics(name)
        torch.testing.assert_close(got["A"], refs[name]["A"], **TOL)
        torch.testing.assert_close(got["S"], refs[name]["S"], **TOL)


def test_kfac_steps_with_rank_branching_convolutions_equal_those_with_plain_ones():
    plain, branching = CNN(branching=False), CNN(branching=True)
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), branching.parameters()))
    data = batches(3)
    compiled = [gnfx.compile(m, optimizer="kfac", lr=1e-2, stat_every=1, capture="fx", example_inputs=(data[0][0],))
                for m in (plain, branching)]
    assert not compiled[1].layers.fallbacks
    for x, y in data:
        for c in compiled:
            cross_entropy(c(x), y).backward()
            c.step()
            c.zero_grad()
    for p, q in zip(plain.state_dict().values(), branching.state_dict().values()):  # num_batches_tracked too
        torch.testing.assert_close(q, p, **TOL)


def test_a_call_with_another_rank_gets_its_own_graph():
    """The graph fixes the ranks it read: an unbatched image (C, H, W), the other side of every branch, runs a
    graph captured for it, which returns what the model does (a batch of one), never the 4-D call's graph."""
    model = CNN(branching=True)
    reference = copy.deepcopy(model)
    (x, y), = batches(1)
    c = gnfx.compile(model, optimizer="kfac", lr=1e-2, capture="fx", example_inputs=(x,))
    cross_entropy(c(x), y).backward()
    image = x[0]
    out = c(image)
    assert out.shape == (1, 5)
    torch.testing.assert_close(out, reference(image), **TOL)
    torch.testing.assert_close(c(x), reference(x), **TOL)
    F.mse_loss(c(image), torch.zeros(1, 5, dtype=DTYPE)).backward()  # its statistics too, without error
