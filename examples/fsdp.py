"""Sharded training with gnfx under FSDP2 (`fully_shard`), on the CPU with gloo.

    torchrun --nproc_per_node=2 examples/fsdp.py [--optimizer kfac] [--steps 30]

The order matters: gnfx.compile captures the unsharded model, then fully_shard shards the
compiled model's blocks and the compiled model itself (the root). Each rank trains on its own
shard of synthetic data; FSDP shards parameters and gradients, and gnfx gives each block's
curvature state to one rank (gnfx.fsdp): it prints the optimizer state each rank keeps and the
bytes one step communicates. Every rank saves its own part of the checkpoint (its optimizer state
and parameter shards) and loads it back.
"""
from __future__ import annotations

import os
import sys
import tempfile

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import gnfx  # noqa: E402
from distributed import start, train  # noqa: E402  (examples/distributed.py, this script's folder)


def state_bytes(optimizer) -> int:
    """Bytes of every tensor in the optimizer's state_dict (moments, factors, roots, statistics)."""
    sd = optimizer.state_dict()
    tensors = [v for s in sd["state"].values() for v in s.values() if isinstance(v, torch.Tensor)]
    tensors += [v for s in sd["gnfx"]["statistics"].values() for v in s["values"].values()]
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    args, rank, world, x, y = start()
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(),
                          nn.Sequential(nn.Linear(64, 64), nn.Tanh()), nn.Sequential(nn.Linear(64, 64), nn.Tanh()),
                          nn.Linear(64, 5))
    compiled = gnfx.compile(model, optimizer=args.optimizer, lr=1e-2, stat_every=5)
    for block in ("2", "3"):
        fully_shard(compiled.get_submodule(block))
    fully_shard(compiled)
    train(compiled, compiled, x, y, args.steps, rank)
    opt = compiled.optimizer
    print(f"rank {rank}: {state_bytes(opt) / 1024:.1f} KiB of optimizer state (one process: "
          f"{compiled.cost(world_size=1).rank_memory_bytes[0] / 1024:.1f} KiB by the cost model, this rank "
          f"{compiled.cost(world_size=world).rank_memory_bytes[rank] / 1024:.1f} KiB); "
          f"{opt.sharded.bytes_communicated / args.steps / 1024:.1f} KiB of gradients and updates per step, "
          f"{opt.sharded.statistics_bytes / 1024:.1f} KiB of statistics (to the ranks that keep them) in all",
          flush=True)
    path = os.path.join(tempfile.gettempdir(), f"gnfx_fsdp_checkpoint_rank{rank}.pt")
    torch.save({"shards": {n: p.to_local() for n, p in compiled.named_parameters()},
                "optimizer": opt.state_dict()}, path)
    checkpoint = torch.load(path, weights_only=True)
    with torch.no_grad():
        for n, p in compiled.named_parameters():
            p.to_local().copy_(checkpoint["shards"][n])
    opt.load_state_dict(checkpoint["optimizer"])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
