"""Data-parallel training on torch.distributed: what gnfx communicates, and how the refresh is split.

Under DistributedDataParallel each rank sees its own batch; DDP already averages the gradients.
gnfx adds two things, both with torch.distributed collectives (no communication layer of its own):

* Statistics. On a statistic step each rank's batch statistics (A, S, diag, ...) are those of its
  N_r examples. Since every statistic is an average over examples (gnfx.statistics), the global
  statistic of the concatenated batch is `Σ_r N_r F_r / Σ_r N_r`: one all-reduce (SUM) of all
  blocks' statistics, flattened into one buffer with N_r appended, per statistic step. The sums run
  over the ranks whose batch has the statistic: a rank whose forwards did not reach a block (an
  opaque submodule's code that called the layer on another rank's data only, passes/opaque_children.py),
  or whose loss ignored every row, adds zeros and N_r = 0, so that every rank sends the same buffer.
  A position table's energy-weighted A (gnfx.layouts.position) travels as its energies ε_t, an average
  over examples like the others, and is normalized after the sum: A_t = Σ_r N_r ε_{r,t} / Σ_{r,t'} N_r ε_{r,t'}
  is the concatenated batch's (the average of the ranks' shares A_{r,t} was not, unless the ranks'
  total energies were equal).
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

import functools
import math

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

    def average_statistics(self, batches: dict, statistics) -> dict:
        """The statistics of the concatenated batch, Σ_r N_r F_r / Σ_r N_r per statistic over the ranks
        whose batch has it, in one all-reduce (`weighted_statistics`).

        `batches` maps block -> {name: tensor}, this rank's `statistics.batches()` (empty for a block its
        forwards did not reach), `statistics` is the gnfx.statistics.StatisticsStore.
        """
        layout = statistics_layout(statistics, statistics.blocks)
        if not layout:
            return {}
        dtype = functools.reduce(torch.promote_types, [statistics[b].dtype for b, _, _ in layout])
        buffer = torch.cat(weighted_statistics(batches, statistics.examples(), layout, dtype,
                                               statistics[layout[0][0]].device))
        self._all_reduce(buffer)
        return averaged_statistics(buffer, layout, statistics)

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


def statistics_layout(statistics, blocks) -> list[tuple[str, str, tuple]]:
    """(block, statistic, shape) of every statistic these blocks of the gnfx.statistics.StatisticsStore
    `statistics` may have (`BlockStatistics.batch_shapes`), in an order every rank shares."""
    return [(b, k, shape) for b in sorted(blocks) for k, shape in sorted(statistics[b].batch_shapes().items())]


def weighted_statistics(batches: dict, examples: dict, layout: list, dtype: torch.dtype,
                        device: torch.device) -> list[torch.Tensor]:
    """What this rank adds to the sums over ranks: N_r F_r of each statistic of `layout`, flattened, then
    the N_r of each, in `dtype`. A statistic this rank's batch lacks adds zeros and N_r = 0.
    `batches`: block -> {name: tensor}; `examples`: block -> N_r."""
    values = [batches.get(b, {}).get(k) for b, k, _ in layout]
    parts = [torch.zeros(math.prod(shape), dtype=dtype, device=device) if v is None
             else v.reshape(-1).to(dtype) * examples[b] for v, (b, _, shape) in zip(values, layout)]
    counts = [0.0 if v is None else float(examples[b]) for v, (b, _, _) in zip(values, layout)]
    return parts + [torch.tensor(counts, dtype=dtype, device=device)]


def averaged_statistics(total: torch.Tensor, layout: list, statistics) -> dict:
    """Σ_r N_r F_r / Σ_r N_r of each statistic of `layout`, from `total`, the sum over the ranks of
    their `weighted_statistics`, in its block's dtype; one that no rank's batch had is left out (as a
    block one process's forwards did not reach has no batch)."""
    counts = total[total.numel() - len(layout):].tolist()
    out, offset = {}, 0
    for (b, k, shape), n in zip(layout, counts):
        size = math.prod(shape)
        if n > 0:
            out.setdefault(b, {})[k] = (total[offset:offset + size].view(shape) / n).to(statistics[b].dtype)
        offset += size
    return out
