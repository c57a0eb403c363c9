"""Point-cloud and voxel models as their papers' reference PyTorch code writes them, in plain torch, shrunk for a
CPU (fewer channels, points and voxels; the layers, their order and the index computations as written):

- `PointNetCls`, `PointNetDenseCls`: fxia22/pointnet.pytorch's model.py. Shared MLPs are Conv1d(k=1) over
  (B, C, N) with BatchNorm1d, the T-Nets (`STNkd`) predict a k x k transform (plus the identity, built from numpy
  and moved to the GPU under `if x.is_cuda`) applied with torch.bmm, a global max over the points; the outputs
  are log_softmax (per example, or per point for segmentation) with the transforms, trained with F.nll_loss plus
  0.001 `feature_transform_regularizer` ‖I − AAᵀ‖ of the 64 x 64 transform.
- `PointNet2ClsSSG`: yanx27/Pointnet_Pointnet2_pytorch's pointnet2_cls_ssg.py and pointnet2_utils.py: farthest
  point sampling as a Python loop over the samples with a random first point and the argmax of the running
  distance, ball query by sorting the masked indices, grouping by an index gather (`points[batch_indices, idx,
  :]`), the shared MLPs Conv2d(k=1) over (B, C, nsample, npoint) then max over the neighbours, a group-all
  stage; log_softmax output, F.nll_loss.
- `DGCNN`: WangYueFt/dgcnn's pytorch/model.py: kNN from the pairwise distances and topk, EdgeConv on the
  gathered neighbour features (x_j − x_i, x_i) by Conv2d(k=1), BatchNorm2d, LeakyReLU, max over the k
  neighbours, a Conv1d over the concatenated features, adaptive max and average pooling, a Linear head;
  F.cross_entropy.
- `VoxelCNN`: a VoxNet-style classifier of occupancy grids, Conv3d + BatchNorm3d + ReLU + MaxPool3d.
- `UNet3d`: a 3D U-Net (Çiçek et al.): Conv3d blocks, MaxPool3d down, ConvTranspose3d up, skip concatenation,
  a per-voxel classifier; F.cross_entropy over the voxels.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------- PointNet (fxia22/pointnet.pytorch)


class STNkd(nn.Module):
    """The T-Net: a shared MLP, max over the points, an MLP to k x k, plus the identity."""

    def __init__(self, k: int = 3, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv1d(k, width, 1)
        self.conv2 = nn.Conv1d(width, 2 * width, 1)
        self.conv3 = nn.Conv1d(2 * width, 4 * width, 1)
        self.fc1 = nn.Linear(4 * width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)
        self.fc3 = nn.Linear(width, k * k)
        self.relu = nn.ReLU()
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm1d(width), nn.BatchNorm1d(2 * width), nn.BatchNorm1d(4 * width)
        self.bn4, self.bn5 = nn.BatchNorm1d(2 * width), nn.BatchNorm1d(width)
        self.k, self.width = k, width

    def forward(self, x):
        batchsize = x.size()[0]
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        x = torch.max(x, 2, keepdim=True)[0]
        x = x.view(-1, 4 * self.width)
        x = F.relu(self.bn4(self.fc1(x)))
        x = F.relu(self.bn5(self.fc2(x)))
        x = self.fc3(x)
        iden = torch.from_numpy(np.eye(self.k).flatten().astype(np.float32)).view(1, self.k * self.k).repeat(
            batchsize, 1)
        if x.is_cuda:
            iden = iden.cuda()
        x = x + iden
        x = x.view(-1, self.k, self.k)
        return x


class PointNetfeat(nn.Module):
    def __init__(self, global_feat: bool = True, feature_transform: bool = True, width: int = 16):
        super().__init__()
        self.stn = STNkd(3, width)
        self.conv1 = nn.Conv1d(3, 4 * width, 1)
        self.conv2 = nn.Conv1d(4 * width, 8 * width, 1)
        self.conv3 = nn.Conv1d(8 * width, 16 * width, 1)
        self.bn1, self.bn2, self.bn3 = (nn.BatchNorm1d(4 * width), nn.BatchNorm1d(8 * width),
                                        nn.BatchNorm1d(16 * width))
        self.global_feat, self.feature_transform, self.width = global_feat, feature_transform, width
        if self.feature_transform:
            self.fstn = STNkd(4 * width, width)

    def forward(self, x):
        n_pts = x.size()[2]
        trans = self.stn(x)
        x = x.transpose(2, 1)
        x = torch.bmm(x, trans)
        x = x.transpose(2, 1)
        x = F.relu(self.bn1(self.conv1(x)))
        if self.feature_transform:
            trans_feat = self.fstn(x)
            x = x.transpose(2, 1)
            x = torch.bmm(x, trans_feat)
            x = x.transpose(2, 1)
        else:
            trans_feat = None
        pointfeat = x
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        x = torch.max(x, 2, keepdim=True)[0]
        x = x.view(-1, 16 * self.width)
        if self.global_feat:
            return x, trans, trans_feat
        x = x.view(-1, 16 * self.width, 1).repeat(1, 1, n_pts)
        return torch.cat([x, pointfeat], 1), trans, trans_feat


class PointNetCls(nn.Module):
    def __init__(self, k: int = 4, feature_transform: bool = True, width: int = 16):
        super().__init__()
        self.feat = PointNetfeat(global_feat=True, feature_transform=feature_transform, width=width)
        self.fc1 = nn.Linear(16 * width, 8 * width)
        self.fc2 = nn.Linear(8 * width, 4 * width)
        self.fc3 = nn.Linear(4 * width, k)
        self.dropout = nn.Dropout(p=0.3)
        self.bn1, self.bn2 = nn.BatchNorm1d(8 * width), nn.BatchNorm1d(4 * width)
        self.relu = nn.ReLU()

    def forward(self, x):
        x, trans, trans_feat = self.feat(x)
        x = F.relu(self.bn1(self.fc1(x)))
        x = F.relu(self.bn2(self.dropout(self.fc2(x))))
        x = self.fc3(x)
        return F.log_softmax(x, dim=1), trans, trans_feat


class PointNetDenseCls(nn.Module):
    def __init__(self, k: int = 4, feature_transform: bool = True, width: int = 16):
        super().__init__()
        self.k = k
        self.feat = PointNetfeat(global_feat=False, feature_transform=feature_transform, width=width)
        self.conv1 = nn.Conv1d(20 * width, 8 * width, 1)
        self.conv2 = nn.Conv1d(8 * width, 4 * width, 1)
        self.conv3 = nn.Conv1d(4 * width, 2 * width, 1)
        self.conv4 = nn.Conv1d(2 * width, self.k, 1)
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm1d(8 * width), nn.BatchNorm1d(4 * width), nn.BatchNorm1d(2 * width)

    def forward(self, x):
        batchsize = x.size()[0]
        n_pts = x.size()[2]
        x, trans, trans_feat = self.feat(x)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        x = self.conv4(x)
        x = x.transpose(2, 1).contiguous()
        x = F.log_softmax(x.view(-1, self.k), dim=-1)
        x = x.view(batchsize, n_pts, self.k)
        return x, trans, trans_feat


def feature_transform_regularizer(trans):
    d = trans.size()[1]
    I = torch.eye(d)[None, :, :]
    if trans.is_cuda:
        I = I.cuda()
    loss = torch.mean(torch.norm(torch.bmm(trans, trans.transpose(2, 1)) - I, dim=(1, 2)))
    return loss


# ----------------------------------------------------------------------------- PointNet++ (yanx27)


def square_distance(src, dst):
    B, N, _ = src.shape
    _, M, _ = dst.shape
    dist = -2 * torch.matmul(src, dst.permute(0, 2, 1))
    dist += torch.sum(src ** 2, -1).view(B, N, 1)
    dist += torch.sum(dst ** 2, -1).view(B, 1, M)
    return dist


def index_points(points, idx):
    device = points.device
    B = points.shape[0]
    view_shape = list(idx.shape)
    view_shape[1:] = [1] * (len(view_shape) - 1)
    repeat_shape = list(idx.shape)
    repeat_shape[0] = 1
    batch_indices = torch.arange(B, dtype=torch.long).to(device).view(view_shape).repeat(repeat_shape)
    new_points = points[batch_indices, idx, :]
    return new_points


def farthest_point_sample(xyz, npoint):
    device = xyz.device
    B, N, C = xyz.shape
    centroids = torch.zeros(B, npoint, dtype=torch.long).to(device)
    distance = torch.ones(B, N).to(device) * 1e10
    farthest = torch.randint(0, N, (B,), dtype=torch.long).to(device)
    batch_indices = torch.arange(B, dtype=torch.long).to(device)
    for i in range(npoint):
        centroids[:, i] = farthest
        centroid = xyz[batch_indices, farthest, :].view(B, 1, 3)
        dist = torch.sum((xyz - centroid) ** 2, -1)
        mask = dist < distance
        distance[mask] = dist[mask]
        farthest = torch.max(distance, -1)[1]
    return centroids


def query_ball_point(radius, nsample, xyz, new_xyz):
    device = xyz.device
    B, N, C = xyz.shape
    _, S, _ = new_xyz.shape
    group_idx = torch.arange(N, dtype=torch.long).to(device).view(1, 1, N).repeat([B, S, 1])
    sqrdists = square_distance(new_xyz, xyz)
    group_idx[sqrdists > radius ** 2] = N
    group_idx = group_idx.sort(dim=-1)[0][:, :, :nsample]
    group_first = group_idx[:, :, 0].view(B, S, 1).repeat([1, 1, nsample])
    mask = group_idx == N
    group_idx[mask] = group_first[mask]
    return group_idx


def sample_and_group(npoint, radius, nsample, xyz, points):
    B, N, C = xyz.shape
    S = npoint
    fps_idx = farthest_point_sample(xyz, npoint)
    new_xyz = index_points(xyz, fps_idx)
    idx = query_ball_point(radius, nsample, xyz, new_xyz)
    grouped_xyz = index_points(xyz, idx)
    grouped_xyz_norm = grouped_xyz - new_xyz.view(B, S, 1, C)
    if points is not None:
        grouped_points = index_points(points, idx)
        new_points = torch.cat([grouped_xyz_norm, grouped_points], dim=-1)
    else:
        new_points = grouped_xyz_norm
    return new_xyz, new_points


def sample_and_group_all(xyz, points):
    device = xyz.device
    B, N, C = xyz.shape
    new_xyz = torch.zeros(B, 1, C).to(device)
    grouped_xyz = xyz.view(B, 1, N, C)
    if points is not None:
        new_points = torch.cat([grouped_xyz, points.view(B, 1, N, -1)], dim=-1)
    else:
        new_points = grouped_xyz
    return new_xyz, new_points


class PointNetSetAbstraction(nn.Module):
    def __init__(self, npoint, radius, nsample, in_channel, mlp, group_all):
        super().__init__()
        self.npoint, self.radius, self.nsample = npoint, radius, nsample
        self.mlp_convs = nn.ModuleList()
        self.mlp_bns = nn.ModuleList()
        last_channel = in_channel
        for out_channel in mlp:
            self.mlp_convs.append(nn.Conv2d(last_channel, out_channel, 1))
            self.mlp_bns.append(nn.BatchNorm2d(out_channel))
            last_channel = out_channel
        self.group_all = group_all

    def forward(self, xyz, points):
        xyz = xyz.permute(0, 2, 1)
        if points is not None:
            points = points.permute(0, 2, 1)
        if self.group_all:
            new_xyz, new_points = sample_and_group_all(xyz, points)
        else:
            new_xyz, new_points = sample_and_group(self.npoint, self.radius, self.nsample, xyz, points)
        new_points = new_points.permute(0, 3, 2, 1)  # [B, C+D, nsample, npoint]
        for i, conv in enumerate(self.mlp_convs):
            bn = self.mlp_bns[i]
            new_points = F.relu(bn(conv(new_points)))
        new_points = torch.max(new_points, 2)[0]
        new_xyz = new_xyz.permute(0, 2, 1)
        return new_xyz, new_points


class PointNet2ClsSSG(nn.Module):
    def __init__(self, num_class: int = 4, width: int = 8, npoints: tuple = (16, 8), nsample: tuple = (8, 8)):
        super().__init__()
        w = width
        self.sa1 = PointNetSetAbstraction(npoints[0], 0.4, nsample[0], 3, [w, w, 2 * w], False)
        self.sa2 = PointNetSetAbstraction(npoints[1], 0.8, nsample[1], 2 * w + 3, [2 * w, 2 * w, 4 * w], False)
        self.sa3 = PointNetSetAbstraction(None, None, None, 4 * w + 3, [4 * w, 8 * w, 16 * w], True)
        self.fc1 = nn.Linear(16 * w, 8 * w)
        self.bn1 = nn.BatchNorm1d(8 * w)
        self.drop1 = nn.Dropout(0.4)
        self.fc2 = nn.Linear(8 * w, 4 * w)
        self.bn2 = nn.BatchNorm1d(4 * w)
        self.drop2 = nn.Dropout(0.4)
        self.fc3 = nn.Linear(4 * w, num_class)
        self.width = width

    def forward(self, xyz):
        B, _, _ = xyz.shape
        l1_xyz, l1_points = self.sa1(xyz, None)
        l2_xyz, l2_points = self.sa2(l1_xyz, l1_points)
        l3_xyz, l3_points = self.sa3(l2_xyz, l2_points)
        x = l3_points.view(B, 16 * self.width)
        x = self.drop1(F.relu(self.bn1(self.fc1(x))))
        x = self.drop2(F.relu(self.bn2(self.fc2(x))))
        x = self.fc3(x)
        x = F.log_softmax(x, -1)
        return x, l3_points


# ----------------------------------------------------------------------------- DGCNN (WangYueFt/dgcnn)


def knn(x, k):
    inner = -2 * torch.matmul(x.transpose(2, 1), x)
    xx = torch.sum(x ** 2, dim=1, keepdim=True)
    pairwise_distance = -xx - inner - xx.transpose(2, 1)
    idx = pairwise_distance.topk(k=k, dim=-1)[1]  # (batch_size, num_points, k)
    return idx


def get_graph_feature(x, k=20, idx=None):
    batch_size = x.size(0)
    num_points = x.size(2)
    x = x.view(batch_size, -1, num_points)
    if idx is None:
        idx = knn(x, k=k)  # (batch_size, num_points, k)
    device = x.device
    idx_base = torch.arange(0, batch_size, device=device).view(-1, 1, 1) * num_points
    idx = idx + idx_base
    idx = idx.view(-1)
    _, num_dims, _ = x.size()
    x = x.transpose(2, 1).contiguous()
    feature = x.view(batch_size * num_points, -1)[idx, :]
    feature = feature.view(batch_size, num_points, k, num_dims)
    x = x.view(batch_size, num_points, 1, num_dims).repeat(1, 1, k, 1)
    feature = torch.cat((feature - x, x), dim=3).permute(0, 3, 1, 2).contiguous()
    return feature


class DGCNN(nn.Module):
    def __init__(self, output_channels: int = 4, k: int = 8, width: int = 8, emb_dims: int = 64):
        super().__init__()
        w = width
        self.k = k
        self.bn1, self.bn2 = nn.BatchNorm2d(w), nn.BatchNorm2d(w)
        self.bn3, self.bn4 = nn.BatchNorm2d(2 * w), nn.BatchNorm2d(4 * w)
        self.bn5 = nn.BatchNorm1d(emb_dims)
        self.conv1 = nn.Sequential(nn.Conv2d(6, w, kernel_size=1, bias=False), self.bn1, nn.LeakyReLU(0.2))
        self.conv2 = nn.Sequential(nn.Conv2d(2 * w, w, kernel_size=1, bias=False), self.bn2, nn.LeakyReLU(0.2))
        self.conv3 = nn.Sequential(nn.Conv2d(2 * w, 2 * w, kernel_size=1, bias=False), self.bn3, nn.LeakyReLU(0.2))
        self.conv4 = nn.Sequential(nn.Conv2d(4 * w, 4 * w, kernel_size=1, bias=False), self.bn4, nn.LeakyReLU(0.2))
        self.conv5 = nn.Sequential(nn.Conv1d(8 * w, emb_dims, kernel_size=1, bias=False), self.bn5,
                                   nn.LeakyReLU(0.2))
        self.linear1 = nn.Linear(emb_dims * 2, 8 * w, bias=False)
        self.bn6 = nn.BatchNorm1d(8 * w)
        self.dp1 = nn.Dropout(p=0.5)
        self.linear2 = nn.Linear(8 * w, 4 * w)
        self.bn7 = nn.BatchNorm1d(4 * w)
        self.dp2 = nn.Dropout(p=0.5)
        self.linear3 = nn.Linear(4 * w, output_channels)

    def forward(self, x):
        batch_size = x.size(0)
        features = []  # each edge convolution's output, max-pooled over the k neighbours, the next one's points
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = conv(get_graph_feature(x, k=self.k)).max(dim=-1, keepdim=False)[0]
            features.append(x)
        x = self.conv5(torch.cat(features, dim=1))
        x1 = F.adaptive_max_pool1d(x, 1).view(batch_size, -1)
        x2 = F.adaptive_avg_pool1d(x, 1).view(batch_size, -1)
        x = torch.cat((x1, x2), 1)
        x = F.leaky_relu(self.bn6(self.linear1(x)), negative_slope=0.2)
        x = self.dp1(x)
        x = F.leaky_relu(self.bn7(self.linear2(x)), negative_slope=0.2)
        x = self.dp2(x)
        x = self.linear3(x)
        return x


# ----------------------------------------------------------------------------- voxels


class VoxelCNN(nn.Module):
    """VoxNet-style: Conv3d-BatchNorm3d-ReLU twice, MaxPool3d, again, a Linear head."""

    def __init__(self, num_classes: int = 4, width: int = 8, grid: int = 8):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv3d(1, w, 3, padding=1), nn.BatchNorm3d(w), nn.ReLU(inplace=True),
            nn.Conv3d(w, w, 3, padding=1), nn.BatchNorm3d(w), nn.ReLU(inplace=True), nn.MaxPool3d(2),
            nn.Conv3d(w, 2 * w, 3, padding=1), nn.BatchNorm3d(2 * w), nn.ReLU(inplace=True), nn.MaxPool3d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * (grid // 4) ** 3, 4 * w), nn.ReLU(inplace=True),
                                        nn.Dropout(0.3), nn.Linear(4 * w, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def double_conv3d(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True),
                         nn.Conv3d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


class UNet3d(nn.Module):
    """A two-level 3D U-Net: encoder double convolutions and MaxPool3d, ConvTranspose3d(k=2, s=2) up, the skip
    concatenated, a 1x1x1 Conv3d to the classes."""

    def __init__(self, num_classes: int = 3, width: int = 4):
        super().__init__()
        w = width
        self.enc1, self.enc2, self.bottom = double_conv3d(1, w), double_conv3d(w, 2 * w), double_conv3d(2 * w, 4 * w)
        self.pool = nn.MaxPool3d(2)
        self.up2 = nn.ConvTranspose3d(4 * w, 2 * w, kernel_size=2, stride=2)
        self.dec2 = double_conv3d(4 * w, 2 * w)
        self.up1 = nn.ConvTranspose3d(2 * w, w, kernel_size=2, stride=2)
        self.dec1 = double_conv3d(2 * w, w)
        self.head = nn.Conv3d(w, num_classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        b = self.bottom(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.head(d1)
