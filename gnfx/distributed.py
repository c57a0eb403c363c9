"""Data-parallel training on torch.distributed: what gnfx communicates, and how the refresh is split.

Under DistributedDataParallel each rank sees its own batch; DDP already averages the gradients.
gnfx adds two things, both with torch.distributed collectives (no communication layer of its own):

* Statistics. On a statistic step each rank's batch statistics (A, S, diag, ...) are those of its
  N_r examples. Since every statistic is an average over examples (gnfx.statistics), the global
  statistic of the concatenated batch is `Σ_r N_r F_r / Σ_r N_r`: one all-reduce (SUM) of all
  blocks' statistics, flattened into one buffer with N_r appended, per statistic step.
* Refresh. The decompositions of the refresh (eigendecompositions, inverse roots) are split:
  each piece of each group is owned by one rank, assigned greedily by its cost (the cube of its
  factor sizes, the FLOPs of its eigendecompositions), largest first to the least-loaded rank.
  Each rank computes the pieces it owns; the results are shared with one all-reduce (SUM) per
  state tensor, every rank contributing zeros where it is not the owner. With
  `partition_refresh=False` every rank computes everything and nothing is communicated.

Every rank then applies the same update. Under FSDP2 (sharded parameters) each block's statistics,
refresh and update belong to one owner, and the statistics are reduced to it in one all-to-all
(gnfx.fsdp); multi-node only changes the process group.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class Communicator:
    """The collectives gnfx needs, on a process group (None: the default group)."""

    def __init__(self, group=None, partition_refresh: bool = True):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.partition_refresh = partition_refresh
        self._owners: dict[str, torch.Tensor] = {}
        self._load = [0.0] * self.world  # refresh cost assigned to each rank so far
        self.bytes_communicated = 0  # since creation: statistics and refresh results

    @staticmethod
    def active(group=None) -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1

    def _all_reduce(self, buffer: torch.Tensor) -> None:
        self.bytes_communicated += buffer.numel() * buffer.element_size()
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.group)

    def mean(self, values: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The mean of a small tensor over the ranks, computed on `device` (the quadratic step's
        coefficients, gnfx.quadratic_step), returned where `values` was."""
        buffer = values.to(device).clone()
        self._all_reduce(buffer)
        return (buffer / self.world).to(values.device)

    def average_statistics(self, batches: dict, examples: dict) -> dict:
        """The statistics of the concatenated batch: Σ_r N_r F_r / Σ_r N_r, per block, in one all-reduce.

        `batches` maps block -> {name: tensor} (possibly empty on a rank that saw no data),
        `examples` block -> N_r. Every rank must hold the same blocks and names.
        """
        names = [(b, k) for b in sorted(batches) for k in sorted(batches[b])]
        if not names:
            return batches
        tensors = [batches[b][k] * examples[b] for b, k in names]
        counts = torch.tensor([float(examples[b]) for b in sorted(batches)], dtype=tensors[0].dtype,
                              device=tensors[0].device)
        buffer = torch.cat([t.reshape(-1) for t in tensors] + [counts])
        self._all_reduce(buffer)
        total = dict(zip(sorted(batches), buffer[-len(counts):].tolist()))
        out, offset = {b: {} for b in batches}, 0
        for (b, k), t in zip(names, tensors):
            out[b][k] = buffer[offset:offset + t.numel()].reshape(t.shape) / total[b]
            offset += t.numel()
        return out

    def owners(self, key: str, costs: list[float]) -> torch.Tensor:
        """The owning rank of each item of a group (cached by key): greedy by cost over all groups
        in the order they are first refreshed (the same on every rank), so deterministic."""
        if key not in self._owners:
            owner = [0] * len(costs)
            for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
                r = min(range(self.world), key=lambda r: self._load[r])
                owner[i] = r
                self._load[r] += costs[i]
            self._owners[key] = torch.tensor(owner)
        return self._owners[key]

    def owned(self, key: str, costs: list[float]) -> torch.Tensor:
        """The indices of the items this rank computes in the refresh."""
        if not self.partition_refresh:
            return torch.arange(len(costs))
        return (self.owners(key, costs) == self.rank).nonzero().flatten()

    def share(self, key: str, tensors: list[torch.Tensor]) -> None:
        """Give every rank the owners' rows of these stacked (k, ...) tensors, in place (the other
        ranks' rows zeroed, then summed: zeroed by a fill, not a product, which leaves inf or NaN
        rows as NaN, e.g. Shampoo's drift bounds, +inf until a root's first refresh)."""
        if not self.partition_refresh:
            return
        others = (self._owners[key] != self.rank).to(tensors[0].device)
        for t in tensors:
            t.masked_fill_(others.view((-1,) + (1,) * (t.dim() - 1)), 0)
            self._all_reduce(t)
