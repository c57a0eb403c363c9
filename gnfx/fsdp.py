"""FSDP2 (`torch.distributed.fsdp.fully_shard`): the optimizer step on sharded parameters.

Order: `compiled = gnfx.compile(model, ...)` on the unsharded model, then `fully_shard` on blocks
of the compiled model (optional) and on `compiled` itself (the root, as FSDP2 asks), before the
first step. Every parameter is then a DTensor sharded along dimension 0 over a 1-D mesh of W
ranks: rank r holds rows [o_r, o_r + n_r) (torch.chunk's split, n = ceil(d_0 / W)), and FSDP
leaves each gradient, averaged over the ranks, sharded the same way.

What each rank r keeps and computes:

* Statistics: the taps record a, δ of the local batch; per statistic step one all-to-all reduces
  them to the ranks that keep them (`average_statistics`: Σ_r N_r F_r / Σ_r N_r, as
  gnfx.distributed): each block's owner, and every rank for the Fisher diagonals its elementwise
  step reads. Each rank keeps the averages only of those blocks.
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
* Bases the taps read (EKFAC measures s = E_n[(Q_Sᵀ g_n Q_A)²] in every block's eigenbasis on
  every rank's local batch: `CurvaturePreconditioner.tap_state`): every rank keeps a copy of the
  bases of the blocks it does not own. On a step whose refresh may change them
  (`tap_bases_due`) the owner appends its blocks' Q_S, Q_A to what it sends every other rank in
  the updates' all-to-all (step 3), so no collective is added; loading a checkpoint (which holds
  the bases on their owners only) sends them once in one all-to-all (`share_bases`).
* Parameters no target claims (the diagonal preconditioner, AdamW or the Fisher diagonal) are
  elementwise: each rank updates its own rows, with moments the size of its shard.
* The quadratic-model step (gnfx.quadratic_step) needs the exact GGN products J v through the
  whole model at the whole parameters: the local rows of θ, g, Δ and δ are gathered whole in one
  all_gather (`whole`), and torch.func's jvp runs on each rank's local batch through
  `without_fsdp_hooks(model)`, a view of the model without fully_shard's forward hooks: their
  pre-forward hook sets the module's parameters to its own all-gathered ones, over the full tensors
  functional_call puts there, so that a jvp through the hooked model would see no tangent (and
  fails on the DTensors). M and b are averaged over the ranks in one all-reduce, the actual
  reduction in one more, and each rank applies its rows of s = αΔ + μδ. During the step every rank
  holds θ, g, Δ, δ and the k tangents' outputs whole: not streamed block by block as FSDP's own
  forward is (that would need the jvp inside fully_shard's unshard/reshard hooks).
* A safeguard that sums over all blocks (K-FAC's KL clipping) adds the owners' partial sums in
  one scalar all-reduce, and the non-finite check (nan_policy) agrees in one scalar all-reduce,
  so that every rank skips the same steps.

Memory per rank: the owned targets' state and statistics, the statistic accumulators of all blocks
(the taps fill them from the local batch before they are reduced to the owners), the copies of the other blocks'
bases (ekfac), the diagonal preconditioner's moments of the local rows, and during the step the
full gradient and stand-in of each owned target (gnfx.plan_cost's `plan_cost(world_size=W)` states it
per preconditioner). Checkpoints: each rank's `optimizer.state_dict()` (the state of the targets
it owns, its rows of the elementwise moments and of δ) with its parameter shards resumes bit for
bit, on the same world size. torch.distributed.checkpoint (DCP) does not fit that state as it is:
`get_optimizer_state_dict` keeps only "state" and "param_groups" (gnfx's step counters, averaged
statistics and quadratic-step state are dropped) and makes the state to load into with a fake
`step()` on zero gradients (for gnfx a real step, counted); and DCP treats every plain tensor as
replicated, keeping one rank's copy of each key, while the elementwise moments, δ and the
statistics' update counters are per-rank tensors under the same keys.

Not supported: a preconditioner that says why it cannot run sharded yet (`unshardable`: muon),
meshes other than one dimension, shards other than dimension 0, and more than one preconditioner
with a cross-block safeguard on ranks that own blocks of only some of them (their scalar all-reduces
would be issued in different orders).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard

from gnfx.distributed import averaged_statistics, statistics_layout, weighted_statistics
from gnfx.errors import ConfigError, GnfxError
from gnfx.plan import _constructor

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


def without_fsdp_hooks(module, memo=None):
    """A view of `module` in which fully_shard's forward hooks do not run: the same parameter,
    buffer and submodule objects under registries of its own (so torch.func.functional_call swaps
    tensors in the view only), and no forward hooks on the modules fully_shard was applied to
    (their pre-forward hook would put its own all-gathered parameters in place of the full ones
    functional_call gives; gnfx.quadratic_step). Frozen parameters, which no caller gives, are
    all-gathered whole (one collective each). Shared submodules stay shared."""
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    # of the module's own class, without fully_shard's FSDP<class> (whose __new__ would call __init__)
    view = object.__new__(next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule)))
    view.__dict__.update(module.__dict__)
    memo[id(module)] = view
    view._parameters = {k: p.full_tensor() if isinstance(p, DTensor) and not p.requires_grad else p
                        for k, p in module._parameters.items()}
    view._buffers = dict(module._buffers)
    view._modules = {k: None if m is None else without_fsdp_hooks(m, memo) for k, m in module._modules.items()}
    if isinstance(module, FSDPModule):
        for hooks in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                      "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
            setattr(view, hooks, type(getattr(module, hooks))())
    return view


def rows(d0: int, world: int, rank: int) -> slice:
    """The rows of dimension 0 that rank `rank` holds under FSDP2's even sharding (torch.chunk)."""
    size = -(-d0 // world)
    start = min(rank * size, d0)
    return slice(start, min(start + size, d0))


def identity(shape, dtype, device) -> torch.Tensor:
    """Identity matrices of shape (..., d, d)."""
    return torch.eye(shape[-1], dtype=dtype, device=device).expand(shape).clone()


def _has_safeguard(pre) -> bool:
    """Whether a curvature preconditioner's chain scales its steps by a sum over all its blocks."""
    return any(t.sums_over_blocks for t in pre.chain)


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

    Created by the optimizer on its first step after `fully_shard`, from what it is given: it rebinds
    the parameter store `parameters` (gnfx.parameter_store) to the sharded Parameter objects of
    `live`, assigns the curvature targets of the preconditioners `curvature` to ranks and rebuilds
    them with the targets this rank owns (`self.curvature`, which the optimizer then steps).
    `steps`: the optimizer's steps so far; `comm`: its gnfx.distributed.Communicator; `statistics`:
    the gnfx.statistics.StatisticsStore its taps fill; `elementwise`: its other preconditioners."""

    def __init__(self, parameters, live: dict, steps: int, comm, statistics, curvature: list, elementwise: list):
        if steps:
            raise ConfigError(f"fully_shard was applied after the optimizer's first step: {ORDER}")
        if comm is None:
            raise ConfigError("distributed='off' keeps gnfx from communicating, which its step on sharded "
                              "parameters must (owners receive gradients and statistics and send updates; the "
                              "quadratic-model step averages its coefficients): leave distributed at its default")
        for pre in curvature:
            if pre.unshardable:
                raise ConfigError(f"{pre.name} does not run under FSDP2 yet: {pre.unshardable}; use kfac, ekfac, "
                                  f"shampoo, soap, rank1 or diag for these blocks")
        guarded = [pre.name for pre in curvature if _has_safeguard(pre)]
        if len(guarded) > 1:
            raise ConfigError(f"under FSDP2 one preconditioner at most may scale its step by a sum over all its "
                              f"blocks (its ranks add their parts in one all-reduce); {guarded} all do: give them "
                              f"the same hyperparameters, or turn the safeguard off (kl_clip=0)")
        params = {n: live.get(n) for n in parameters.named}
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
        self.parameters = parameters
        self.statistics = statistics
        self.bytes_communicated = 0  # sent to other ranks since creation: gradients in, updates out
        self.statistics_bytes = 0  # sent to other ranks since creation: statistics to the ranks that keep them
        # before the first step the only state is what the taps' first backward created under the
        # unsharded parameters (EKFAC's initial bases, for the whole plan): rebuilt below per owner
        parameters.replace(params)
        comm.partition_refresh = False  # each owner refreshes its own targets
        self._assign(curvature, elementwise)

    def _assign(self, curvature: list, elementwise: list) -> None:
        """Owners of the curvature targets; this rank's preconditioners keep only its own."""
        targets = [(pre, t) for pre in curvature
                   for t in dict.fromkeys(p.target.name for g in pre.groups for p in g.pieces)]
        by_name = {p.target.name: p.target for pre in curvature for g in pre.groups for p in g.pieces}
        owner = curvature_owners(curvature, self.world)
        # per rank, the parameters of the targets it owns (in a fixed order); each takes its own param
        # group's lr (in the owner's update, gnfx.codegen) and weight decay (applied on its shard below)
        self.owned_params = [[n for _, t in targets if owner[t] == r for n in by_name[t].params]
                             for r in range(self.world)]
        self.group_param = {n: by_name[t].params[0] for _, t in targets for n in by_name[t].params}
        # the optimizer steps these; its list of all preconditioners stays the whole plan (model.cost, the report)
        self.curvature = []
        for pre in curvature:
            mine = [by_name[t] for p, t in targets if p is pre and owner[t] == self.rank]
            self.curvature.append(_constructor(type(pre), pre.name)(
                pre.hp, [t.block for t in mine if t.block is not None], [t.name for t in mine if t.block is None],
                self.parameters))
            self.curvature[-1].publish_bases(self.statistics)
        self.elementwise = [n for n in self.parameters.named if n not in self.group_param]
        # the blocks whose averaged statistics each rank keeps: its targets' and the elementwise ones
        everywhere = {b.name for pre in elementwise for b in pre.blocks}
        self.kept_by = [{by_name[t].block.name for _, t in targets if owner[t] == r and by_name[t].block} | everywhere
                        for r in range(self.world)]
        self._replicate_bases([(curvature.index(pre), t) for pre, t in targets], owner)
        # gradients and updates travel, and learning rates and weight decays are applied, in float64
        # when a curvature parameter is float64, else float32 (as the update function's lr tensors)
        named = self.parameters.named
        wide = any(named[n].dtype == torch.float64 for n in self.group_param)
        self.dtype = torch.float64 if wide else torch.float32
        with torch.no_grad():
            self.parameters.views.update({n: local(named[n]) for n in self.elementwise})

    def _replicate_bases(self, targets, owner) -> None:
        """The bases the taps measure statistics in (EKFAC's Q_S, Q_A: `BlockStatistics.basis`), for
        every block on every rank: the owner's preconditioner publishes its own blocks' bases, and this
        rank keeps a copy (`replicas`) of every other block's, identity until its owner first sends it.
        `targets`: (index of the target's preconditioner in `curvature`, target name)."""
        stats = self.statistics.blocks
        self.basis_blocks = [(t, i) for i, t in targets if t in stats and "eigen_diag" in stats[t].needs]
        self.replicas = {}
        for block, _ in self.basis_blocks:
            if owner[block] == self.rank:
                continue
            s = stats[block]
            shapes = s.layout.factor_shapes()
            replica = (identity(shapes["S"], s.dtype, self.device),
                       None if s.layout.diagonal_A else identity(shapes["A"], s.dtype, self.device))
            self.replicas[block] = replica
            s.basis = lambda replica=replica: replica
        self.basis_owner = {block: owner[block] for block, _ in self.basis_blocks}

    def _bases(self, block) -> list:
        """The basis tensors of a block the taps read (its owner's state, or this rank's copy)."""
        return [t for t in self.statistics[block].basis() if t is not None]

    def _due_bases(self) -> list[str]:
        """The blocks whose bases this step's refresh may have changed (the same on every rank)."""
        return [b for b, i in self.basis_blocks if self.curvature[i].tap_bases_due()]

    @torch.no_grad()
    def share_bases(self) -> None:
        """Send every block's bases from its owner to every rank, in one all-to-all (after loading a
        checkpoint, which holds the bases only on their owners)."""
        blocks = [b for b, _ in self.basis_blocks]
        if not blocks:
            return
        received = self._all_to_all([t for s in range(self.world) for t in self._send_bases(blocks, s)],
                                    [self._bases_size(blocks, self.rank, s) for s in range(self.world)],
                                    [self._bases_size(blocks, r, self.rank) for r in range(self.world)])
        offset = 0
        for r in range(self.world):
            offset = self._receive_bases(received, offset, blocks, r)

    def _bases_size(self, blocks, sender: int, receiver: int) -> int:
        """Entries of the bases `sender` owns among `blocks` that it sends to `receiver` (none to itself)."""
        if sender == receiver:
            return 0
        return sum(t.numel() for b in blocks if self.basis_owner[b] == sender for t in self._bases(b))

    def _send_bases(self, blocks, receiver: int) -> list:
        if receiver == self.rank:
            return []
        return [t.reshape(-1).to(self.dtype)
                for b in blocks if self.basis_owner[b] == self.rank for t in self._bases(b)]

    def _receive_bases(self, received, offset: int, blocks, sender: int) -> int:
        """Copy the bases `sender` sent into this rank's copies; returns the offset past them."""
        if sender == self.rank:
            return offset
        for b in blocks:
            if self.basis_owner[b] == sender:
                for t in self._bases(b):
                    t.copy_(received[offset:offset + t.numel()].view(t.shape))
                    offset += t.numel()
        return offset

    # --- what the optimizer asks -------------------------------------------------------------
    def local_rows(self, name: str) -> slice:
        return rows(self.parameters.named[name].shape[0], self.world, self.rank)

    def all_sum(self, x) -> torch.Tensor:
        """Σ over ranks of a scalar (as a float64 tensor on the wire; a number counts as 0-d)."""
        dtype = x.dtype if isinstance(x, torch.Tensor) else torch.float64
        buffer = torch.as_tensor(x, dtype=torch.float64, device=self.device).reshape(1).clone()
        dist.all_reduce(buffer, group=self.group)
        return buffer[0].to(dtype)

    def whole(self, shards: list) -> list:
        """The full tensors of these local shards of the parameters (rows of dimension 0, one list
        per parameter in the optimizer's order, concatenated: [θ_r, g_r, ...]), in one all_gather
        (each rank's shards padded to the largest rank's total)."""
        named = self.parameters.named
        names = list(named)
        dtype = shards[0].dtype
        for t in shards:
            dtype = torch.promote_types(dtype, t.dtype)
        longest = max(sum(self._entries(names[i % len(names)], r) for i in range(len(shards)))
                      for r in range(self.world))
        buffer = torch.zeros(longest, dtype=dtype, device=self.device)
        flat = torch.cat([t.reshape(-1).to(dtype) for t in shards])
        buffer[:flat.numel()] = flat
        gathered = [torch.empty_like(buffer) for _ in range(self.world)]
        dist.all_gather(gathered, buffer, group=self.group)
        out = [torch.empty(named[names[i % len(names)]].shape, dtype=t.dtype, device=self.device)
               for i, t in enumerate(shards)]
        self._assemble(out, gathered)
        return out

    def _assemble(self, fulls: list, chunks: list) -> None:
        """Write into the rows of each tensor of `fulls` that rank r holds the entries from the start of
        `chunks[r]` (rank r's rows of each of them, flattened, one after the other)."""
        for r, chunk in enumerate(chunks):
            offset = 0
            for full in fulls:
                region = full[rows(full.shape[0], self.world, r)]
                region.copy_(chunk[offset:offset + region.numel()].view(region.shape))
                offset += region.numel()

    def agree(self, problem: str) -> str:
        """The non-finite check of all ranks: skip everywhere when one rank found a problem."""
        anywhere = self.all_sum(1.0 if problem else 0.0)
        return problem or ("a non-finite gradient or statistic on another rank" if anywhere > 0 else "")

    @torch.no_grad()
    def average_statistics(self, batches: dict) -> dict:
        """The statistics of the concatenated batch, Σ_r N_r F_r / Σ_r N_r per statistic over the ranks
        whose batch has it (gnfx.distributed), of the blocks this rank keeps (`kept_by`), reduced to the
        ranks that keep them: in one all-to-all each rank sends every other rank the N_r F_r and N_r of
        the blocks that rank keeps (`weighted_statistics`), and each adds what it receives to its own
        (each owned block's statistics cross the network once, (W-1)/W of them per rank, where an
        all-reduce would give every rank every block's). `batches` maps block -> {name: tensor}, this
        rank's `statistics.batches()` (empty for a block its forwards did not reach)."""
        if not any(self.kept_by):
            return {}
        kept = [[b for b in self.kept_by[r] if b in self.statistics.blocks] for r in range(self.world)]
        layouts = [statistics_layout(self.statistics, blocks) for blocks in kept]
        dtype = self.dtype
        for b in set().union(*kept):
            dtype = torch.promote_types(dtype, self.statistics[b].dtype)
        examples = self.statistics.examples()
        parts = [weighted_statistics(batches, examples, layout, dtype, self.device) for layout in layouts]
        sizes = [sum(t.numel() for t in part) for part in parts]
        sent = self.bytes_communicated
        received = self._all_to_all([t for part in parts for t in part], sizes, [sizes[self.rank]] * self.world,
                                    dtype=dtype, skip=False)
        self.statistics_bytes += self.bytes_communicated - sent  # counted apart from gradients and updates
        self.bytes_communicated = sent
        total = received.view(self.world, -1).sum(0)  # Σ over the ranks, in rank order
        return averaged_statistics(total, layouts[self.rank], self.statistics)

    # --- the step ----------------------------------------------------------------------------
    def _entries(self, name: str, rank: int) -> int:
        """How many entries of parameter `name` rank `rank` holds."""
        shape = self.parameters.named[name].shape
        held = rows(shape[0], self.world, rank)
        return (held.stop - held.start) * math.prod(shape[1:])

    @torch.no_grad()
    def begin(self) -> None:
        """Elementwise parameters: their local shards, with their local gradients, stand for them.
        Curvature parameters this rank owns: zero stand-ins of full size whose gradient is the
        full gradient, assembled from all ranks' rows in one all-to-all."""
        named, views, me = self.parameters.named, self.parameters.views, self.rank
        for n in self.elementwise:
            p = named[n]
            views[n] = local(p)
            views[n].grad = None if p.grad is None else local(p.grad)
        mine = self.owned_params[me]

        def local_grad(n):
            p = named[n]
            return (local(p.grad) if p.grad is not None else torch.zeros_like(local(p))).reshape(-1).to(self.dtype)

        sizes = [sum(self._entries(n, s) for n in mine) for s in range(self.world)]
        received = self._all_to_all(
            [local_grad(n) for r in range(self.world) for n in self.owned_params[r]],
            [sum(self._entries(n, me) for n in self.owned_params[r]) for r in range(self.world)], sizes)
        full = {n: torch.empty(named[n].shape, dtype=named[n].dtype, device=self.device) for n in mine}
        self._assemble(list(full.values()), received.split(sizes))
        for n in mine:
            views[n] = torch.zeros_like(full[n])
            views[n].grad = full[n]

    @torch.no_grad()
    def end(self) -> None:
        """Join the safeguards this rank has no blocks of, then send every rank its rows of the
        owners' Δ in one all-to-all and apply θ_r ← θ_r (1 - ηλ) + Δ_r."""
        views, me = self.parameters.views, self.rank
        for pre in self.curvature:
            joined = [t for t in pre.chain if t.sums_over_blocks] if not pre.groups else []
            for t in joined:  # with no pieces: its share of the sum is 0
                t(pre, [], [], [], None, None)
        mine = self.owned_params[me]
        bases = self._due_bases()  # refreshed bases travel with the updates, to every other rank
        received = self._all_to_all(
            [t for s in range(self.world)
             for t in [views[n][rows(views[n].shape[0], self.world, s)].reshape(-1).to(self.dtype) for n in mine]
             + self._send_bases(bases, s)],
            [sum(self._entries(n, s) for n in mine) + self._bases_size(bases, me, s) for s in range(self.world)],
            [sum(self._entries(n, me) for n in self.owned_params[r]) + self._bases_size(bases, r, me)
             for r in range(self.world)])
        offset = 0
        for r in range(self.world):
            for n in self.owned_params[r]:
                shard = local(self.parameters.named[n])
                delta = received[offset:offset + shard.numel()].view(shard.shape).to(shard.dtype)
                offset += shard.numel()
                group = self.parameters.group_of(n)
                if group["weight_decay"] != 0:
                    lr, wd = (torch.tensor(group[k], dtype=self.dtype, device=self.device)
                              for k in ("lr", "weight_decay"))
                    shard.mul_(1 - lr * wd)
                shard.add_(delta)
            offset = self._receive_bases(received, offset, bases, r)
        for n in mine:
            del views[n]
        for n in self.elementwise:  # the views stay (their state is shaped like them), not the gradients
            views[n].grad = None

    def _all_to_all(self, send: list, send_sizes: list, recv_sizes: list, dtype=None, skip=None) -> torch.Tensor:
        """One all_to_all_single of the concatenated `send`, in `dtype` (default: that of the updates),
        unless `skip` (default: when no rank owns any curvature target, a plan of elementwise
        preconditioners only), which must be the same on every rank."""
        dtype = dtype or self.dtype
        out = torch.empty(sum(recv_sizes), dtype=dtype, device=self.device)
        if (not any(self.owned_params)) if skip is None else skip:
            return out
        inp = torch.cat([t.to(dtype) for t in send]) if send else torch.empty(0, dtype=dtype, device=self.device)
        self.bytes_communicated += (inp.numel() - send_sizes[self.rank]) * inp.element_size()
        dist.all_to_all_single(out, inp, recv_sizes, send_sizes, group=self.group)
        return out
