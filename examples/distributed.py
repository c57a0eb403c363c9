"""Data-parallel training with gnfx under torch.distributed (DDP), on the CPU with gloo.

    torchrun --nproc_per_node=2 examples/distributed.py [--optimizer kfac] [--steps 30]

Each rank trains on its own shard of scikit-learn-free synthetic data; DDP averages gradients,
gnfx averages the statistics and splits the refresh across ranks (gnfx.distributed). Rank 0
saves a checkpoint at the end and every rank loads it back.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import gnfx  # noqa: E402


def start() -> tuple:
    """The command line, this rank and the world size of the gloo group, and the rank's shard (x, y) of
    a synthetic 5-class problem of 512 examples (examples/fsdp.py trains on it too)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--optimizer", default="kfac", choices=sorted(gnfx.REGISTRY))
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    x = torch.randn(512, 20)
    y = (x[:, :5] * torch.arange(1, 6)).argmax(1)
    shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    return args, rank, world, x[shard], y[shard]


def train(forward, compiled, x, y, steps: int, rank: int) -> None:
    """`steps` steps of gnfx on (x, y) through `forward` (the compiled model, or its DDP wrapper)."""
    for step in range(steps):
        loss = F.cross_entropy(forward(x), y)
        loss.backward()
        compiled.step()
        compiled.zero_grad()
        if rank == 0 and step % 10 == 0:
            print(f"step {step}: loss {loss.item():.4f}")


def main() -> None:
    args, rank, world, x, y = start()
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 5))
    compiled = gnfx.compile(model, optimizer=args.optimizer, lr=1e-2, stat_every=5)
    train(nn.parallel.DistributedDataParallel(compiled), compiled, x, y, args.steps, rank)
    comm = compiled.optimizer.comm
    print(f"rank {rank}: {comm.bytes_communicated / 1024:.1f} KiB of statistics and refresh results communicated")
    path = os.path.join(tempfile.gettempdir(), "gnfx_ddp_checkpoint.pt")
    if rank == 0:
        torch.save({"model": compiled.state_dict(), "optimizer": compiled.optimizer.state_dict()}, path)
    dist.barrier()
    checkpoint = torch.load(path, weights_only=True)
    compiled.load_state_dict(checkpoint["model"])
    compiled.optimizer.load_state_dict(checkpoint["optimizer"])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
