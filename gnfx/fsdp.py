"""FSDP2 (`torch.distributed.fsdp.fully_shard`): the optimizer step on sharded parameters.

Order: `compiled = gnfx.compile(model, ...)` on the unsharded model, then `fully_shard` on blocks
of the compiled model (optional) and on `compiled` itself (the root, as FSDP2 asks), before the
first step. Every parameter is then a DTensor sharded along dimension 0 over a 1-D mesh of W
ranks: rank r holds rows [o_r, o_r + n_r) (torch.chunk's split, n = ceil(d_0 / W)), and FSDP
leaves each gradient, averaged over the ranks, sharded the same way.

What each rank r keeps and computes:

* Statistics: the taps record a, δ of the local batch; the statistics of all blocks are averaged
  over ranks in one all-reduce per statistic step (gnfx.distributed), and each rank keeps the
  averages only of the blocks it owns (and the Fisher diagonals its elementwise step reads).
* Curvature targets (a block's [W b], or a loose tensor Shampoo claims) are owned by one rank
  each, assigned greedily by the size of their state (Σ_j d_j² + Π_j d_j: factors or roots per
  mode, and the momentum), largest first to the least-loaded rank. The owner keeps the target's
  statistics, factors, roots, momentum and grafting state, and no other rank does. Per step:
    1. gradients in: one all-to-all brings each owner the rows of its targets' gradients, from
       which it assembles the full gradient G of each;
    2. the owner runs its preconditioners as one process would (collect, refresh, direction,
       momentum m) on a zero stand-in for each parameter, which leaves Δ = -η m in it;
    3. updates out: one all-to-all sends every rank its rows of Δ, and each rank applies
       θ_r ← θ_r (1 - ηλ) + Δ_r to its own shard, the arithmetic of one process, row by row.
  A refresh needs no communication: its owner is the only rank that holds the target's roots, so
  a failed decomposition keeps the last good root there, which is everywhere it is used.
* Parameters no target claims (the diagonal preconditioner, AdamW or the Fisher diagonal) are
  elementwise: each rank updates its own rows, with moments the size of its shard.
* A safeguard that sums over all blocks (K-FAC's KL clipping) adds the owners' partial sums in
  one scalar all-reduce, and the non-finite check (nan_policy) agrees in one scalar all-reduce,
  so that every rank skips the same steps.

Memory per rank: the owned targets' state and statistics, the statistic accumulators of all blocks
(the taps fill them from the local batch before the all-reduce), the diagonal preconditioner's
moments of the local rows, and during the step the full gradient and stand-in of each owned
target (gnfx.plan_cost's `plan_cost(world_size=W)` states it per preconditioner). Not supported: a
preconditioner whose taps need the refreshed state of every block on every rank (ekfac, see
`CurvaturePreconditioner.unshardable`), meshes other than one dimension, shards other than
dimension 0, and more than one preconditioner with a cross-block safeguard on ranks that own
blocks of only some of them (their scalar all-reduces would be issued in different orders).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard

from gnfx.codegen import UpdateFunction
from gnfx.errors import ConfigError, GnfxError
from gnfx.plan import _constructor
from gnfx.preconditioners.curvature import CurvaturePreconditioner

ORDER = ("call gnfx.compile on the unsharded model first, then fully_shard the compiled model's blocks "
         "(optional) and the compiled model itself, before the first step")


def local(t):
    """The local shard of a DTensor (a view: in-place updates reach the DTensor), else `t`."""
    return t.to_local() if isinstance(t, DTensor) else t


def check_unsharded(model) -> None:
    """Raise a ConfigError if `model` is already sharded by fully_shard (gnfx captures the model
    before sharding)."""
    if isinstance(model, FSDPModule) or any(isinstance(p, DTensor) for p in model.parameters()):
        raise ConfigError(f"this model is already sharded by fully_shard (its parameters are DTensors): {ORDER}")


def fsdp_modules(module) -> list:
    """`module` and its submodules that fully_shard was applied to."""
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def unshard_for_graph(compiled) -> None:
    """Before an instrumented forward under FSDP2: the instrumented graph reads the parameters of
    blocks it traces through without calling those blocks' forward, so their FSDP hooks do not run.
    Unshard them here (FSDP's root reduce-scatters their gradients and reshards them at the end of
    the backward); the root's own hook has unsharded the rest."""
    children = [m for m in fsdp_modules(compiled) if m is not compiled]
    if children and not isinstance(compiled, FSDPModule):
        raise GnfxError(f"fully_shard was applied to submodules of the compiled model but not to the compiled "
                        f"model itself: {ORDER}")
    for m in children:
        m.unshard()
    still = [n for n, p in compiled.named_parameters() if p.requires_grad and isinstance(p, DTensor)]
    if still:
        raise GnfxError(f"parameters {still[:5]} are still sharded in the forward; {ORDER}")


def rows(d0: int, world: int, rank: int) -> slice:
    """The rows of dimension 0 that rank `rank` holds under FSDP2's even sharding (torch.chunk)."""
    size = -(-d0 // world)
    start = min(rank * size, d0)
    return slice(start, min(start + size, d0))


def _has_safeguard(pre) -> bool:
    """Whether a curvature preconditioner scales its steps by a sum over all its blocks."""
    return type(pre).safeguard is not CurvaturePreconditioner.safeguard


def target_cost(shape) -> int:
    """The size by which targets are balanced: Σ_j d_j² + Π_j d_j entries (a factor or root per
    mode and the momentum), the state of a target under the factored preconditioners."""
    return sum(d * d for d in shape) + math.prod(shape)


def curvature_owners(preconditioners, world: int) -> dict[str, int]:
    """The owning rank of every target of these curvature preconditioners (a block's name, or a
    loose parameter's): greedily by `target_cost`, largest first, to the least-loaded rank (ties:
    the lowest rank, then the plan's order), so the same on every rank."""
    shapes = {p.target.name: p.target.shape for pre in preconditioners for g in pre.groups for p in g.pieces}
    load, owner = [0] * world, {}
    for name in sorted(shapes, key=lambda n: -target_cost(shapes[n])):
        r = min(range(world), key=load.__getitem__)
        owner[name] = r
        load[r] += target_cost(shapes[name])
    return owner


class ShardedStep:
    """The parts of GnfxOptimizer.step that differ under FSDP2 (see the module docstring).

    Created by the optimizer on its first step after `fully_shard`: it rebinds the optimizer to the
    sharded Parameter objects, assigns the curvature targets to ranks and rebuilds the curvature
    preconditioners with the targets this rank owns."""

    def __init__(self, opt, live: dict):
        if opt.steps:
            raise ConfigError(f"fully_shard was applied after the optimizer's first step: {ORDER}")
        for pre in opt.curvature:
            if pre.unshardable:
                raise ConfigError(f"{pre.name} does not run under FSDP2 yet: {pre.unshardable}; use kfac, "
                                  f"shampoo, soap, rank1 or diag for these blocks")
        guarded = [pre.name for pre in opt.curvature if _has_safeguard(pre)]
        if len(guarded) > 1:
            raise ConfigError(f"under FSDP2 one preconditioner at most may scale its step by a sum over all its "
                              f"blocks (its ranks add their parts in one all-reduce); {guarded} all do: give them "
                              f"the same hyperparameters, or turn the safeguard off (kl_clip=0)")
        params = {n: live.get(n) for n in opt._named}
        missing = [n for n, p in params.items() if not isinstance(p, DTensor)]
        if missing:
            raise ConfigError(f"parameters {missing[:5]} are not sharded by fully_shard (or were removed): "
                              f"fully_shard the compiled model itself, the root, after its blocks")
        mesh = next(iter(params.values())).device_mesh
        odd = [n for n, p in params.items()
               if p.device_mesh != mesh or mesh.ndim != 1 or tuple(p.placements) != (Shard(0),)]
        if odd:
            raise ConfigError(f"gnfx supports FSDP2 on one 1-D device mesh with parameters sharded on dimension 0 "
                              f"(fully_shard's default); {odd[:5]} are not")
        self.group = mesh.get_group()
        self.rank, self.world = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.device = local(next(iter(params.values()))).device  # where the collectives' buffers live
        self.opt = opt
        self.bytes_communicated = 0  # sent to other ranks since creation: gradients in, updates out
        renamed = {id(opt._named[n]): p for n, p in params.items()}
        for g in opt.param_groups:
            g["params"] = [renamed[id(p)] for p in g["params"]]
        opt._named = params
        opt._groups_seen = None
        if opt.comm is not None:
            opt.comm.partition_refresh = False  # each owner refreshes its own targets
        self._assign(opt)

    def _assign(self, opt) -> None:
        """Owners of the curvature targets; this rank's preconditioners keep only its own."""
        targets = [(pre, t) for pre in opt.curvature
                   for t in dict.fromkeys(p.target.name for g in pre.groups for p in g.pieces)]
        by_name = {p.target.name: p.target for pre in opt.curvature for g in pre.groups for p in g.pieces}
        owner = curvature_owners(opt.curvature, self.world)
        # per rank, the parameters of the targets it owns (in a fixed order), and the target's first
        # parameter, whose param group sets the step's lr and weight decay for all of them
        self.owned_params = [[n for _, t in targets if owner[t] == r for n in by_name[t].params]
                             for r in range(self.world)]
        self.group_param = {n: by_name[t].params[0] for _, t in targets for n in by_name[t].params}
        rebuilt = []
        for pre in opt.curvature:
            mine = [by_name[t] for p, t in targets if p is pre and owner[t] == self.rank]
            rebuilt.append(_constructor(type(pre), pre.name)(pre.hp, [t.block for t in mine if t.block is not None],
                                                             [t.name for t in mine if t.block is None], opt))
        opt.curvature = rebuilt  # opt.preconditioners stays the whole plan (model.cost, the report)
        opt.update_function = UpdateFunction(rebuilt, opt, opt.update_function.setting)
        self.elementwise = [n for n in opt._named if n not in self.group_param]
        kept = {t.block.name for pre in rebuilt for g in pre.groups for p in g.pieces for t in [p.target] if t.block}
        kept |= {b.name for pre in opt.elementwise for b in pre.blocks}
        self.kept_blocks = kept
        # gradients and updates travel, and learning rates and weight decays are applied, in float64
        # when a curvature parameter is float64, else float32 (as the update function's lr tensors)
        wide = any(opt._named[n].dtype == torch.float64 for n in self.group_param)
        self.dtype = torch.float64 if wide else torch.float32
        with torch.no_grad():
            opt._views.update({n: local(opt._named[n]) for n in self.elementwise})

    # --- what the optimizer asks -------------------------------------------------------------
    def local_rows(self, name: str) -> slice:
        return rows(self.opt._named[name].shape[0], self.world, self.rank)

    def all_sum(self, x) -> torch.Tensor:
        """Σ over ranks of a scalar (as a float64 tensor on the wire; a number counts as 0-d)."""
        dtype = x.dtype if isinstance(x, torch.Tensor) else torch.float64
        buffer = torch.as_tensor(x, dtype=torch.float64, device=self.device).reshape(1).clone()
        dist.all_reduce(buffer, group=self.group)
        return buffer[0].to(dtype)

    def agree(self, problem: str) -> str:
        """The non-finite check of all ranks: skip everywhere when one rank found a problem."""
        anywhere = self.all_sum(1.0 if problem else 0.0)
        return problem or ("a non-finite gradient or statistic on another rank" if anywhere > 0 else "")

    def own_statistics(self, batches: dict) -> dict:
        """The averaged statistics of the blocks this rank uses; the others are not kept."""
        return {b: v for b, v in batches.items() if b in self.kept_blocks}

    # --- the step ----------------------------------------------------------------------------
    def _entries(self, name: str, rank: int) -> int:
        """How many entries of parameter `name` rank `rank` holds."""
        shape = self.opt._named[name].shape
        held = rows(shape[0], self.world, rank)
        return (held.stop - held.start) * math.prod(shape[1:])

    @torch.no_grad()
    def begin(self) -> None:
        """Elementwise parameters: their local shards, with their local gradients, stand for them.
        Curvature parameters this rank owns: zero stand-ins of full size whose gradient is the
        full gradient, assembled from all ranks' rows in one all-to-all."""
        opt, views, me = self.opt, self.opt._views, self.rank
        for n in self.elementwise:
            p = opt._named[n]
            views[n] = local(p)
            views[n].grad = None if p.grad is None else local(p.grad)
        mine = self.owned_params[me]

        def local_grad(n):
            p = opt._named[n]
            return (local(p.grad) if p.grad is not None else torch.zeros_like(local(p))).reshape(-1).to(self.dtype)

        received = self._all_to_all(
            [local_grad(n) for r in range(self.world) for n in self.owned_params[r]],
            [sum(self._entries(n, me) for n in self.owned_params[r]) for r in range(self.world)],
            [sum(self._entries(n, s) for n in mine) for s in range(self.world)])
        offset = 0
        full = {n: torch.empty(opt._named[n].shape, dtype=opt._named[n].dtype, device=self.device) for n in mine}
        for s in range(self.world):
            for n in mine:
                region = full[n][rows(full[n].shape[0], self.world, s)]
                region.copy_(received[offset:offset + region.numel()].view(region.shape))
                offset += region.numel()
        for n in mine:
            views[n] = torch.zeros_like(full[n])
            views[n].grad = full[n]

    @torch.no_grad()
    def end(self) -> None:
        """Join the safeguards this rank has no blocks of, then send every rank its rows of the
        owners' Δ in one all-to-all and apply θ_r ← θ_r (1 - ηλ) + Δ_r."""
        opt, views, me = self.opt, self.opt._views, self.rank
        for pre in opt.curvature:
            if not pre.groups and _has_safeguard(pre):
                pre.safeguard([], [], [])
        mine = self.owned_params[me]
        received = self._all_to_all(
            [views[n][rows(views[n].shape[0], self.world, s)].reshape(-1).to(self.dtype)
             for s in range(self.world) for n in mine],
            [sum(self._entries(n, s) for n in mine) for s in range(self.world)],
            [sum(self._entries(n, me) for n in self.owned_params[r]) for r in range(self.world)])
        offset = 0
        for r in range(self.world):
            for n in self.owned_params[r]:
                shard = local(opt._named[n])
                delta = received[offset:offset + shard.numel()].view(shard.shape).to(shard.dtype)
                offset += shard.numel()
                group = opt.group_of(self.group_param[n])
                if group["weight_decay"] != 0:
                    lr, wd = (torch.tensor(group[k], dtype=self.dtype, device=self.device)
                              for k in ("lr", "weight_decay"))
                    shard.mul_(1 - lr * wd)
                shard.add_(delta)
        for n in mine:
            del views[n]
        for n in self.elementwise:  # the views stay (their state is shaped like them), not the gradients
            views[n].grad = None

    def _all_to_all(self, send: list, send_sizes: list, recv_sizes: list) -> torch.Tensor:
        """One all_to_all_single of the concatenated `send` (no collective when no rank owns any
        curvature target: a plan of elementwise preconditioners only)."""
        out = torch.empty(sum(recv_sizes), dtype=self.dtype, device=self.device)
        if not any(self.owned_params):
            return out
        inp = torch.cat(send) if send else torch.empty(0, dtype=self.dtype, device=self.device)
        self.bytes_communicated += (inp.numel() - send_sizes[self.rank]) * inp.element_size()
        dist.all_to_all_single(out, inp, recv_sizes, send_sizes, group=self.group)
        return out
