"""Optimizer state per rank under FSDP2 (gnfx.fsdp) against one process, on the char GPT.

    torchrun --nproc_per_node=2 -m benchmarks.fsdp_memory [--optimizers kfac shampoo ekfac] [--steps 4]

Each optimizer trains the char GPT of benchmarks/tasks.py (2 layers, d_model 64, context 64,
65 characters) for a few steps twice: sharded with `fully_shard` on its blocks and the root
(each rank on its half of the batch), and in one process on rank 0 (`distributed="off"`). It
prints the bytes of optimizer state each rank holds (every tensor of `optimizer.state_dict()`:
factors, roots, momenta, grafting and Adam moments, statistics), their ratio to the single
process's, the cost model's figures per rank (`model.cost(world_size=W).rank_memory_bytes`, which
also count the statistic accumulators every rank keeps for its local batch, and ekfac's copies of
the bases of the blocks other ranks own), and the bytes of one
step's all-to-alls (gradients in, updates out, and the statistics to the ranks that keep them).
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard

import gnfx
from benchmarks.models import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=65)


def state_bytes(optimizer) -> int:
    sd = optimizer.state_dict()
    tensors = [v for s in sd["state"].values() for v in s.values() if isinstance(v, torch.Tensor)]
    tensors += [v for s in sd["gnfx"]["statistics"].values() for v in s["values"].values()]
    return sum(t.numel() * t.element_size() for t in tensors)


def train(compiled, tokens, steps):
    for _ in range(steps):
        logits = compiled(tokens[:, :-1])
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)).backward()
        compiled.step()
        compiled.zero_grad()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--optimizers", nargs="+", default=["kfac", "shampoo", "ekfac"])
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    tokens = torch.randint(0, CONFIG.vocab_size, (8 * world, CONFIG.context + 1))
    mine = tokens[rank * 8:(rank + 1) * 8]
    hp = {"stat_every": 1, "lr": 1e-3}
    for name in args.optimizers:
        torch.manual_seed(0)
        compiled = gnfx.compile(GPT(CONFIG), name, **hp)
        for block in compiled.get_submodule("blocks"):
            fully_shard(block)
        fully_shard(compiled)
        train(compiled, mine, args.steps)
        sharded = compiled.optimizer.sharded
        before = (sharded.bytes_communicated, sharded.statistics_bytes)
        train(compiled, mine, 1)
        step_bytes = (sharded.bytes_communicated - before[0], sharded.statistics_bytes - before[1])
        measured = [None] * world
        dist.all_gather_object(measured, state_bytes(compiled.optimizer))
        if rank == 0:
            torch.manual_seed(0)
            single = gnfx.compile(GPT(CONFIG), name, distributed="off", **hp)
            train(single, tokens, args.steps + 1)
            one = state_bytes(single.optimizer)
            model, whole = single.cost(world_size=world), single.cost().total_memory_bytes
            print(f"{name}: one process {one / 2**20:.2f} MiB of optimizer state (cost model, with the "
                  f"statistic accumulators: {whole / 2**20:.2f} MiB); per rank under FSDP2 with W={world}: "
                  + ", ".join(f"{m / 2**20:.2f} MiB ({m / one:.2f}x)" for m in measured)
                  + "; cost model per rank: " + ", ".join(f"{m / 2**20:.2f} MiB ({m / whole:.2f}x)"
                                                          for m in model.rank_memory_bytes)
                  + f"; one step sends {step_bytes[0] / 2**10:.0f} KiB in the all-to-alls and "
                  f"{step_bytes[1] / 2**10:.0f} KiB of statistics (rank 0)", flush=True)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
