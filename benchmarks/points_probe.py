"""First contact with point-cloud and voxel models: the reference code of PointNet, PointNet++ and DGCNN, 3D CNNs
(benchmarks.point_models), and two pip libraries, trained on small synthetic point tasks.

    PYTHONPATH=<pointnet, point_transformer_pytorch, einops>:. OMP_NUM_THREADS=1 python -m benchmarks.points_probe \
        [--models pointnet_cls dgcnn] [--optimizers kfac adamw] [--steps 200] [--timeout 900] [--out probe.md]

Models (random weights, train mode): `pointnet_cls`, `pointnet_seg` (fxia22's PointNetCls and PointNetDenseCls with
the feature transform, F.nll_loss of the log_softmax output plus 0.001 ‖I − AAᵀ‖ of the 64 x 64 transform, as its
train_classification.py and train_segmentation.py), `pointnet2` (yanx27's pointnet2_cls_ssg, F.nll_loss),
`dgcnn` (WangYueFt's DGCNN, its cal_loss: the cross-entropy with label smoothing 0.2 written out), `voxel_cnn`
(occupancy grids 8³), `unet3d` (per-voxel classes, F.cross_entropy), and from PyPI (wheels unpacked without
dependencies): `lib_pointnet_cls`, `lib_pointnet_seg`, `lib_pointnet2_cls`, `lib_pointnet2_seg` (the `pointnet`
package 0.1.1's PointNetCls, PointNetSeg, PointNet2ClsSSG, PointNet2SegSSG, their own shapes of 1024 channels;
F.cross_entropy), `pt_layer`, `mhpt_layer` (point-transformer-pytorch 0.1.5's PointTransformerLayer and
MultiheadPointTransformerLayer with 8 neighbours by topk, between a Linear embedding of the coordinates and a
Linear head on the mean over the points).

Tasks (`point_task`): 4 classes of shapes (sphere, cube and cylinder surfaces, a flat disc; random scales, a random
rotation about z, noise) as (B, 3, N) clouds of N = 64 points; segmentation: clouds of three parts (a sphere, a cube,
a flat disc of half size, stacked along z at random offsets of 0.3), a class per point; the voxel models take the
clouds voxelized into 8³ grids (segmentation: a class per voxel, 0 empty). 256 training examples, batches of 16 in a fixed random order.

Optimizers: "kfac" = gnfx.compile(model, "kfac", loss="cross_entropy") at its defaults; "adamw" = torch.optim.AdamW at
lr 1e-3, 3e-3 and 1e-2 (each from the same initial weights), the best of the three. Per row: the capture's form, the
share of the trainable parameters in curvature blocks, the steps until the mean of the last 10 batch losses is at most
the model's target (TARGETS: 0.5, PointNet++ 0.8 and DGCNN's smoothed loss, whose floor is 0.72, 0.9; "–" if not
within `--steps`), that mean at steps 50, 100, 150 and 200, the seconds, and for "kfac" the exactness cell: float64,
K-FAC with fisher="empirical" and lr 1e-2, one statistic step on a batch beside a copy of the model under plain hooks
(the same random state: dropout, FPS's first point): A and S of every k=1 Conv1d/Conv2d and every Linear (a k=1
convolution's rows are all (example, point[, neighbour]) positions, its input moved to the last dimension: the
equivalent Linear's rows; A = the mean of ā āᵀ, S = M Σ g gᵀ, M the loss's terms) relative to the largest entry, a
blocked factor (max_factor) as its diagonal blocks; then the compiled model's output on two further batches of other
sizes (B, N) = (4, 48) and (5, 40) (other points, so other FPS, ball-query and kNN indices) against the plain copy's.
The results: benchmarks/results/first_contact_14_points.md.
"""
from __future__ import annotations

import copy
import math
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from benchmarks import point_models as pm
from benchmarks.child_rows import capture_cells, cell, gnfx_warnings, library, probe_main
from benchmarks.hooked_calls import diagonal_blocks, hooked_calls

POINTS, EXAMPLES, BATCH, GRID = 64, 256, 16, 8
REFERENCE = ("pointnet_cls", "pointnet_seg", "pointnet2", "dgcnn", "voxel_cnn", "unet3d")
LIBRARY = ("lib_pointnet_cls", "lib_pointnet_seg", "lib_pointnet2_cls", "lib_pointnet2_seg", "pt_layer",
           "mhpt_layer")
SEGMENTATION = ("pointnet_seg", "unet3d", "lib_pointnet_seg", "lib_pointnet2_seg")
ADAMW_LRS = (1e-3, 3e-3, 1e-2)
TARGETS = {"pointnet2": 0.8, "dgcnn": 0.9}  # the mean of the last 10 batch losses to reach; 0.5 where not named
CHECKPOINTS = (50, 100, 150, 200)


class PointTransformerClassifier(nn.Module):
    """point-transformer-pytorch's README call `attn(feats, pos)` between a Linear embedding of the coordinates
    and a Linear head on the mean over the points."""

    def __init__(self, layer: nn.Module, dim: int = 16, classes: int = 4):
        super().__init__()
        self.embed, self.attn, self.head = nn.Linear(3, dim), layer, nn.Linear(dim, classes)

    def forward(self, cloud):
        pos = cloud.transpose(1, 2)
        return self.head(self.attn(self.embed(pos), pos).mean(1))


class CoordinatesAsFeatures(nn.Module):
    """The `pointnet` package's PointNet++ `forward(x, xyz)` with the coordinates as the point features."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, cloud):
        return self.net(cloud, cloud)


def build(name: str) -> nn.Module:
    """The model `name` (module doc), random weights from the current seed."""
    reference = {"pointnet_cls": lambda: pm.PointNetCls(4), "pointnet_seg": lambda: pm.PointNetDenseCls(3),
                 "pointnet2": lambda: pm.PointNet2ClsSSG(4), "dgcnn": lambda: pm.DGCNN(4),
                 "voxel_cnn": lambda: pm.VoxelCNN(4, grid=GRID), "unet3d": lambda: pm.UNet3d(4)}
    if name in reference:
        return reference[name]()
    if name.startswith("lib_"):
        pointnet = library("benchmarks.points_probe", "pointnet")
        return {"lib_pointnet_cls": lambda: pointnet.PointNetCls(3, 4, stn_3d=pointnet.STN(in_dim=3)),
                "lib_pointnet_seg": lambda: pointnet.PointNetSeg(3, 3, stn_3d=pointnet.STN(in_dim=3)),
                "lib_pointnet2_cls": lambda: CoordinatesAsFeatures(pointnet.PointNet2ClsSSG(
                    3, 4, downsample_points=(16, 8), ks=(8, 8))),
                "lib_pointnet2_seg": lambda: CoordinatesAsFeatures(pointnet.PointNet2SegSSG(
                    3, 3, k=8, downsample_points=(32, 16, 8, 4), base_radius=0.4))}[name]()
    pt = library("benchmarks.points_probe", "point_transformer_pytorch")
    if name == "pt_layer":
        return PointTransformerClassifier(pt.PointTransformerLayer(dim=16, pos_mlp_hidden_dim=16,
                                                                   attn_mlp_hidden_mult=2, num_neighbors=8))
    return PointTransformerClassifier(pt.MultiheadPointTransformerLayer(
        dim=16, heads=2, dim_head=8, pos_mlp_hidden_dim=16, attn_mlp_hidden_mult=2, num_neighbors=8))


# ----------------------------------------------------------------------------- the synthetic tasks


def _surface(kind: int, n: int, g: torch.Generator) -> torch.Tensor:
    """n points (n, 3) on a unit sphere (0), cube (1), cylinder (2) or flat disc (3)."""
    u = torch.rand(n, 3, generator=g) * 2 - 1
    if kind == 0:
        return F.normalize(torch.randn(n, 3, generator=g), dim=1)
    if kind == 1:  # one coordinate pushed to a face
        face = torch.randint(0, 3, (n,), generator=g)
        u[torch.arange(n), face] = torch.sign(u[torch.arange(n), face])
        return u
    if kind == 2:
        angle = u[:, 0] * math.pi
        return torch.stack([angle.cos(), angle.sin(), u[:, 2]], 1)
    radius, angle = u[:, 0].abs().sqrt(), u[:, 1] * math.pi
    return torch.stack([radius * angle.cos(), radius * angle.sin(), 0.05 * u[:, 2]], 1)


def _placed(points: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """`points` scaled per axis by 0.7-1.3, rotated about z, with noise 0.02."""
    angle = float(torch.rand((), generator=g)) * 2 * math.pi
    rotation = torch.tensor([[math.cos(angle), -math.sin(angle), 0.0], [math.sin(angle), math.cos(angle), 0.0],
                             [0.0, 0.0, 1.0]])
    scale = 0.7 + 0.6 * torch.rand(3, generator=g)
    return (points * scale) @ rotation.T + 0.02 * torch.randn(points.shape, generator=g)


def point_task(segmentation: bool, examples: int, points: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(clouds (examples, 3, points), labels): a shape class per cloud, or a part class per point (module doc)."""
    g = torch.Generator().manual_seed(seed)
    clouds, labels = [], []
    for _ in range(examples):
        if segmentation:
            part = torch.randint(0, 3, (points,), generator=g)
            offsets = 0.3 * torch.randn(3, 3, generator=g) + torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0],
                                                                           [0.0, 0.0, -1.0]])
            cloud = torch.zeros(points, 3)
            for k, kind in enumerate((0, 1, 3)):
                chosen = part == k
                cloud[chosen] = 0.5 * _surface(kind, int(chosen.sum()), g) + offsets[k]
            clouds.append(_placed(cloud, g))
            labels.append(part)
        else:
            kind = int(torch.randint(0, 4, (), generator=g))
            clouds.append(_placed(_surface(kind, points, g), g))
            labels.append(torch.tensor(kind))
    return torch.stack(clouds).transpose(1, 2).contiguous(), torch.stack(labels)


def voxelized(clouds: torch.Tensor, labels: torch.Tensor, segmentation: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The clouds as (examples, 1, GRID³) occupancy grids over [-2, 2]³ (segmentation: per voxel the part of the
    last point in it plus one, 0 empty)."""
    cells = ((clouds.transpose(1, 2) + 2) / 4 * GRID).long().clamp(0, GRID - 1)  # (E, N, 3)
    flat = (cells[..., 0] * GRID + cells[..., 1]) * GRID + cells[..., 2]
    grids = torch.zeros(len(clouds), GRID ** 3)
    grids.scatter_(1, flat, 1.0)
    if not segmentation:
        return grids.view(-1, 1, GRID, GRID, GRID), labels
    parts = torch.zeros(len(clouds), GRID ** 3, dtype=torch.long).scatter_(1, flat, labels + 1)
    return grids.view(-1, 1, GRID, GRID, GRID), parts.view(-1, GRID, GRID, GRID)


def task(name: str, examples: int = EXAMPLES, points: int = POINTS, seed: int = 0):
    """(inputs, labels) of the model's task."""
    segmentation = name in SEGMENTATION
    clouds, labels = point_task(segmentation, examples, points, seed)
    return voxelized(clouds, labels, segmentation) if name in ("voxel_cnn", "unet3d") else (clouds, labels)


def loss_of(name: str, out, y: torch.Tensor) -> torch.Tensor:
    """The training loss the model's own training script computes (module doc)."""
    if name in ("pointnet_cls", "pointnet_seg"):
        pred, _, trans_feat = out
        return F.nll_loss(pred.reshape(-1, pred.shape[-1]), y.reshape(-1)) + \
            0.001 * pm.feature_transform_regularizer(trans_feat)
    if name == "pointnet2":
        return F.nll_loss(out[0], y)
    if name == "dgcnn":  # its cal_loss(pred, gold, smoothing=True)
        eps, n_class = 0.2, out.size(1)
        one_hot = torch.zeros_like(out).scatter(1, y.view(-1, 1), 1)
        one_hot = one_hot * (1 - eps) + (1 - one_hot) * eps / (n_class - 1)
        return -(one_hot * F.log_softmax(out, dim=1)).sum(dim=1).mean()
    return F.cross_entropy(out, y)


# ----------------------------------------------------------------------------- exactness


def hooked_modules(model: nn.Module) -> list[str]:
    """The Linear layers and the one-group convolutions of kernel 1 (shared MLPs over points) of `model`."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or (
        isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.groups == 1 and set(m.kernel_size) == {1})]


def factor_gap(c, reference: nn.Module, calls: dict, m: int) -> tuple[float, int]:
    """The largest gap of A and S of the compiled model's blocks of the hooked layers against the plain hooks'
    (relative to the largest entry), over the layers' rows: a convolution's input and output gradient moved
    channels-last (every (example, position) a row, as the equivalent Linear's); and the number of blocks."""
    gap, blocks = 0.0, 0
    for name, records in calls.items():
        if name not in {b.name for b in c.layers}:
            continue
        module = dict(reference.named_modules())[name]
        rows = [(a if isinstance(module, nn.Linear) else a.movedim(1, -1), g if isinstance(module, nn.Linear)
                 else g.movedim(1, -1)) for a, g in records if g is not None]
        a = torch.cat([a.reshape(-1, a.shape[-1]) for a, _ in rows])
        g = torch.cat([g.reshape(-1, g.shape[-1]) for _, g in rows])
        if module.bias is not None:
            a = torch.cat([a, torch.ones_like(a[:, :1])], 1)
        for key, want in (("A", a.T @ a / len(a)), ("S", m * g.T @ g)):
            got = c.statistics(name)[key]
            want = diagonal_blocks(want, got)
            gap = max(gap, ((got - want).abs().max() / want.abs().max()).item())
        blocks += 1
    return gap, blocks


def exactness(name: str) -> str:
    """'A, S of n blocks Δ; other batches' outputs Δ' in float64 (module doc)."""
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model = build(name).double().train()
        reference = copy.deepcopy(model)
        x, y = task(name, examples=BATCH, seed=7)
        x = x.double()
        c = gnfx.compile(model, "kfac", loss="cross_entropy", fisher="empirical", lr=1e-2, stat_every=1,
                         stat_decay=0.0)
        torch.manual_seed(5)
        with hooked_calls(reference, hooked_modules(reference)) as calls:
            out = reference(x)
            loss_of(name, out, y).backward()
        torch.manual_seed(5)
        loss_of(name, c(x), y).backward()
        c.step()
        c.zero_grad()
        gap, blocks = factor_gap(c, reference, calls, y.numel())
        reference.load_state_dict(model.state_dict())
        output_gap = 0.0
        for seed, (examples, points) in ((8, (4, 48)), (9, (5, 40))):
            other, _ = task(name, examples=examples, points=points, seed=seed)
            torch.manual_seed(seed)
            got = c(other.double())
            torch.manual_seed(seed)
            want = reference(other.double())
            got, want = (o[0] if isinstance(o, tuple) else o for o in (got, want))
            output_gap = max(output_gap, (got - want).abs().max().item())
        return f"A, S of {blocks} blocks {gap:.0e}; other batches' outputs {output_gap:.0e}"
    finally:
        torch.set_default_dtype(torch.float32)


# ----------------------------------------------------------------------------- training


def running_means(losses: list[float]) -> list[float]:
    """The mean of the last 10 batch losses after each step."""
    return [sum(losses[max(0, t - 9):t + 1]) / len(losses[max(0, t - 9):t + 1]) for t in range(len(losses))]


def train(name: str, make_step, steps: int) -> list[float]:
    """The batch losses of `steps` steps of the model `make_step` returns (model, step function) on the task."""
    x, y = task(name)
    order = torch.randperm(EXAMPLES * steps // BATCH + EXAMPLES, generator=torch.Generator().manual_seed(3)) % EXAMPLES
    model, step = make_step()
    losses = []
    for t in range(steps):
        batch = order[t * BATCH:(t + 1) * BATCH]
        loss = loss_of(name, model(x[batch]), y[batch])
        loss.backward()
        step()
        losses.append(loss.item())
    return losses


def probe(name: str, optimizer: str, steps: int) -> str:
    """The row of `name` under `optimizer` (module doc)."""
    torch.set_num_threads(1)
    start, error, exact, c = time.time(), "", "–", None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if optimizer == "kfac":
                exact = exactness(name)
        except Exception as exc:  # noqa: BLE001 -- what a user would see is the result
            exact, error = "error", f"exactness: {type(exc).__name__}: {exc}"
        results = []
        for lr in (ADAMW_LRS if optimizer == "adamw" else (None,)):
            torch.manual_seed(0)
            model = build(name).train()

            def make_step(model=model, lr=lr):
                nonlocal c
                if lr is not None:
                    opt = torch.optim.AdamW(model.parameters(), lr=lr)
                    return model, lambda: (opt.step(), opt.zero_grad())
                c = gnfx.compile(model, "kfac", loss="cross_entropy")
                return c, lambda: (c.step(), c.zero_grad())
            try:
                means = running_means(train(name, make_step, steps))
                reached = next((t + 1 for t, m in enumerate(means) if t >= 9 and m <= TARGETS.get(name, 0.5)),
                               math.inf)
                results.append((reached, means[-1], lr, means))
            except Exception as exc:  # noqa: BLE001
                error = f"{type(exc).__name__}: {exc}"
    form, blocks = capture_cells(c, model, fallbacks=False)
    reached, mean, lr, means = min(results, default=(math.inf, math.nan, None, []), key=lambda r: (r[0], r[1]))
    grid = "; ".join(f"lr {r[2]:g}: {r[0] if r[0] < math.inf else '–'}" for r in results) if optimizer == "adamw" \
        else "defaults"
    said = gnfx_warnings(caught, 160)
    return (f"| {name} | {optimizer} ({grid}) | {form} | {blocks} | {exact} | "
            f"{reached if reached < math.inf else '–'} | "
            f"{', '.join(f'{means[t - 1]:.3g}' for t in CHECKPOINTS if t <= len(means)) or '–'} | "
            f"{'; '.join(said) or '–'} | "
            f"{cell(error, 400) or '–'} | {time.time() - start:.0f} |")


def main() -> None:
    probe_main(__doc__, "benchmarks.points_probe", probe,
               {"models": list(REFERENCE + LIBRARY), "optimizers": ["kfac", "adamw"]},
               ["| model | optimizer (steps to target per lr) | capture | in blocks | exact (float64): A, S vs hooks; "
                "outputs on other batches | steps to target | mean loss at " + ", ".join(map(str, CHECKPOINTS)) +
                " | gnfx's warnings | error | s |",
                "|---|---|---|---|---|---|---|---|---|---|"], steps=CHECKPOINTS[-1], timeout=900)


if __name__ == "__main__":
    main()
