"""Point-cloud patterns (PointNet, PointNet++, DGCNN reference code) in plain torch: shared MLPs as kernel-1
convolutions over points, and indices computed from the data on every batch (farthest point sampling, ball query,
kNN by topk) that a captured graph must recompute, not keep. PointNet++'s sampling and grouping functions are
benchmarks.point_models', as yanx27's pointnet2_utils.py writes them."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from benchmarks.point_models import farthest_point_sample, index_points, query_ball_point


class SharedMLP(nn.Module):
    """PointNet's shared MLP over (B, C, N) (Conv1d, k=1) or PointNet++'s over (B, C, nsample, npoint) (Conv2d,
    k=1); a per-point head (segmentation) or a max over the points and a Linear head (classification)."""

    def __init__(self, conv: type, segmentation: bool):
        super().__init__()
        self.c1, self.c2 = conv(3, 8, 1), conv(8, 6, 1)
        self.head = conv(6, 4, 1) if segmentation else nn.Linear(6, 4)
        self.segmentation = segmentation

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.head(h) if self.segmentation else self.head(h.flatten(2).max(-1)[0])


class SharedLinear(nn.Module):
    """The same maps as nn.Linear over the channels-last rows (every example and point a row)."""

    def __init__(self, segmentation: bool):
        super().__init__()
        self.c1, self.c2, self.head = nn.Linear(3, 8), nn.Linear(8, 6), nn.Linear(6, 4)
        self.segmentation = segmentation

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x.movedim(1, -1)))))
        return self.head(h).movedim(-1, 1) if self.segmentation else self.head(h.flatten(1, -2).max(1)[0])


@pytest.mark.parametrize("conv, shape", [(nn.Conv1d, (5, 3, 11)), (nn.Conv2d, (5, 3, 4, 7))])
@pytest.mark.parametrize("segmentation", [False, True])
def test_a_kernel_one_convolution_over_points_has_the_factors_of_the_linear_over_its_rows(conv, shape, segmentation):
    """K-FAC's A and S of a k=1 Conv1d/Conv2d over points equal those of the nn.Linear applied to every (example,
    point[, neighbour]) row: A the mean of ā āᵀ over the rows, S = M Σ g gᵀ (M: the examples, or the points of a
    per-point loss)."""
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        convs, linears = SharedMLP(conv, segmentation), SharedLinear(segmentation)
        with torch.no_grad():
            for name in ("c1", "c2", "head"):
                getattr(linears, name).weight.copy_(getattr(convs, name).weight.flatten(1))
                getattr(linears, name).bias.copy_(getattr(convs, name).bias)
        x = torch.randn(shape)
        y = torch.randint(0, 4, (shape[0], *shape[2:]) if segmentation else (shape[0],))
        statistics = []
        for model in (convs, linears):
            c = gnfx.compile(model, "kfac", loss="cross_entropy", fisher="empirical", lr=1e-2, stat_every=1,
                             stat_decay=0.0)
            F.cross_entropy(c(x), y).backward()
            c.step()
            statistics.append({name: c.statistics(name) for name in ("c1", "c2", "head")})
        for name in ("c1", "c2", "head"):
            for key in ("A", "S"):
                torch.testing.assert_close(statistics[0][name][key], statistics[1][name][key], rtol=1e-12,
                                           atol=1e-14)
    finally:
        torch.set_default_dtype(torch.float32)


class SetAbstraction(nn.Module):
    """PointNet++'s set abstraction: FPS, ball query, grouping, Conv2d k=1 over (B, C, nsample, npoint), max over
    the neighbours. torch.fx cannot trace `torch.zeros(B, npoint)` of a traced B: under capture="fx" it runs as
    its Python code, its convolution opened."""

    def __init__(self, npoint: int = 4, nsample: int = 3):
        super().__init__()
        self.npoint, self.nsample = npoint, nsample
        self.mlp = nn.Conv2d(3, 8, 1)

    def forward(self, xyz):  # (B, N, 3)
        new_xyz = index_points(xyz, farthest_point_sample(xyz, self.npoint))
        grouped = index_points(xyz, query_ball_point(0.8, self.nsample, xyz, new_xyz)) - new_xyz.unsqueeze(2)
        return torch.relu(self.mlp(grouped.permute(0, 3, 2, 1))).max(2)[0]  # (B, 8, npoint)


class SampledEdgeConv(nn.Module):
    """A set abstraction, then DGCNN's EdgeConv on the sampled points (kNN by topk of the negative pairwise
    distances, traced by torch.fx; the neighbours' features gathered, (x_j − x_i, x_i), Conv2d k=1, max over k), a
    max over the points, a Linear head."""

    def __init__(self, k: int = 3):
        super().__init__()
        self.k = k
        self.sa = SetAbstraction()
        self.edge_mlp = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, cloud):  # (B, 3, N)
        x = self.sa(cloud.transpose(1, 2))
        inner = -2 * torch.matmul(x.transpose(2, 1), x)
        xx = torch.sum(x ** 2, dim=1, keepdim=True)
        idx = (-xx - inner - xx.transpose(2, 1)).topk(k=self.k, dim=-1)[1]  # (B, npoint, k)
        batch, channels, npoint = x.shape
        idx = (idx + torch.arange(batch).view(-1, 1, 1) * npoint).view(-1)  # DGCNN's flat gather
        points = x.transpose(1, 2).contiguous()
        neighbours = points.view(batch * npoint, -1)[idx, :].view(batch, npoint, self.k, channels)
        centre = points.view(batch, npoint, 1, channels).repeat(1, 1, self.k, 1)
        edges = torch.cat([neighbours - centre, centre], -1).permute(0, 3, 1, 2)
        x = torch.relu(self.edge_mlp(edges)).max(-1)[0]
        return self.head(x.max(-1)[0])


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_sampled_grouped_and_nearest_indices_are_recomputed_on_every_batch(capture):
    """The graph computes FPS's argmaxes, the ball query's sort and the kNN's topk from each call's points: on
    later batches of other sizes, other points, the compiled model's outputs and gradients are the module's, and
    every parameter is in a curvature block."""
    torch.manual_seed(0)
    model = SampledEdgeConv()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    example = torch.randn(3, 3, 10, generator=g)
    c = gnfx.compile(model, "kfac", loss="cross_entropy", lr=1e-2, capture=capture, example_inputs=(example,))
    for batch, points in ((3, 10), (4, 12), (2, 8)):
        x, y = torch.randn(batch, 3, points, generator=g), torch.randint(0, 4, (batch,), generator=g)
        torch.manual_seed(batch)  # FPS's random first point, drawn alike
        out = c(x)
        torch.manual_seed(batch)
        want = reference(x)
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        F.cross_entropy(out, y).backward()
        F.cross_entropy(want, y).backward()
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
        c.zero_grad()
        reference.zero_grad()
    assert c.layers.form == capture
    covered, total = c.layers.coverage(dict(model.named_parameters()))
    assert covered == total
