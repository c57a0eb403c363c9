"""The shared machinery of the batched curvature preconditioners (kfac, shampoo, rank1).

Each owns targets (gradient matrices `[∇W ∇b]` of blocks, or loose tensors), cut into pieces and
grouped by shape (gnfx.targets). A subclass supplies the batched math on a stacked gradient
`G` of shape (k, *shape):

    init_group(group)            -> dict of state tensors, each stacked over the k pieces
    direction(G, state, collect) -> U, the preconditioned gradient (and updates the curvature
                                    estimate in `state` when `collect` is True)
    collect()                    -> optionally, gradient statistics gathered before the refresh
    refresh(statistics, comm)    -> the amortized decompositions from the averaged statistics
                                    (gnfx.statistics), run when `refresh_due(step)`; under
                                    torch.distributed split across ranks by `comm`

The directions of all groups then go through the preconditioner's update chain (gnfx.transforms:
`chain`, its hyperparameter, or `default_chain(hp)`), whose last stage writes the parameters with
`step_parameters`. The default here is heavy-ball momentum and decoupled weight decay,

    m ← μ m + U,    θ ← θ (1 - η λ) - η m,

as foreach kernels over all pieces; subclasses put their grafting or KL clipping in front.
"""
from __future__ import annotations

import torch

from gnfx.errors import ConfigError
from gnfx.hparams import choice, unit_interval
from gnfx.linalg import METHODS
from gnfx.preconditioners.base import Preconditioner, collects_statistics
from gnfx.layouts import layout_of
from gnfx.targets import (COPYING_VIEWS, as_matrix, block_target, diagonal_modes, from_matrix, make_groups,
                          param_regions, param_target, stacked_piece_gradients)
from gnfx.transforms import HeavyBall, Step
from gnfx.transforms.chain import chain_hparam

FACTOR_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def root_method_hparam(default: str, methods=METHODS):
    return choice("how the refresh computes damped inverse roots: 'eigh' (eigendecomposition), 'cholesky' "
                  "(K-FAC's inverses only) or 'newton' (coupled Newton iteration, matrix products only; pays "
                  "on GPUs); see gnfx.linalg", default, methods)


def common_hparams() -> dict:
    return {
        "momentum": unit_interval("heavy-ball momentum μ on the preconditioned step", 0.9),
        "chain": chain_hparam(),
        # "auto": the factors' own dtype (float64 for a float64 model, else float32). Measured here:
        # float32 decompositions run ~2x faster (eigh of 1025: 0.08 s against 0.16 s) and gave the
        # same validation losses as float64 on the digits MLP (300 steps: kfac 0.0776 both,
        # shampoo 0.0668 vs 0.0672, ekfac 0.090 vs 0.091, soap 0.099 vs 0.085) and the char GPT
        # (150 steps: kfac 2.522 both, shampoo 2.089 vs 2.088, ekfac 2.416 vs 2.433, soap 2.048 both)
        "decomposition_dtype": choice("dtype of the refresh's decompositions ('auto': the factors' dtype)", "auto",
                                      ("auto", *FACTOR_DTYPES)),
    }


class CurvaturePreconditioner(Preconditioner):
    max_block_hparam: str | None = None  # name of the blocking hyperparameter, if any
    # name of the hyperparameter above which a dimension is kept whole, preconditioned diagonally
    # (gnfx.targets.diagonal_modes), if any
    diagonal_hparam: str | None = None
    # a 0-d bool tensor: whether the direction is preconditioned yet (grafting takes the grafted
    # direction alone before, gnfx.transforms.graft); None: from the first step
    active = None
    # `active` as a Python bool, set with it: the eager update reads this one (no tensor select per step)
    started = True
    # the parameters the parameter write leaves as they are this step (no gradient: frozen since
    # compile, or unused by this forward), set by gnfx.codegen.UpdateFunction before each step
    without_gradient: frozenset = frozenset()

    def __init__(self, hp, blocks, params, parameters):
        super().__init__(hp, blocks, params, parameters)
        self.groups = self.piece_groups(blocks, params)
        # the parameter that holds each group's state in optimizer.state
        self.state_holder = {g.key: g.pieces[0].target.params[0] for g in self.groups}
        self.writes = parameter_writes(self.groups)
        given = hp.get("chain")
        # a given chain was checked with the hyperparameters (gnfx.transforms.chain.check_chain)
        self.chain = list(given) if given is not None else self.default_chain(hp)
        if given is not None and self.groups:
            own = set(self.init_group(self.groups[0]))
            taken = sorted(own & {k for t in self.chain for k in t.state_shapes(self.groups[0].shape)})
            if taken:
                raise ConfigError(f"{self.name} keeps state {taken} itself (e.g. Muon's momentum precedes its "
                                  f"direction): leave the transforms that keep it out of its chain")

    @classmethod
    def default_chain(cls, hp: dict) -> list:
        """The update chain (gnfx.transforms) after the direction, from the hyperparameters `hp`:
        heavy-ball momentum μ = hp["momentum"] (for a class that declares it), then θ ← θ(1 - ηλ) - η m."""
        return ([HeavyBall(hp["momentum"])] if "momentum" in hp else []) + [Step()]

    def chain_state(self, group, device=None) -> dict:
        """Zeros for the state of the chain's stages for `group`, stacked over its pieces (on the
        meta device with `device="meta"`)."""
        shapes = {k: shape for t in self.chain for k, shape in t.state_shapes(group.shape).items()}
        if device == "meta":
            dtype = self.factor_dtype(group.pieces[0])
            return {k: torch.empty((len(group.pieces),) + shape, dtype=dtype, device="meta") for k, shape in shapes.items()}
        return {k: self.stacked_zeros(group, *shape) for k, shape in shapes.items()}

    def piece_groups(self, blocks, params) -> list:
        """The groups of pieces this preconditioner steps: the [W b] targets of its blocks and its
        loose parameters, cut at the blocking hyperparameter, grouped by shape (gnfx.targets)."""
        targets = [block_target(b, layout_of(b)) for b in blocks]
        targets += [param_target(n, self.parameters.param(n).shape) for n in params]
        max_block = self.hp[self.max_block_hparam] if self.max_block_hparam else None
        return make_groups(self.name, targets, max_block, self.diagonal_above)

    @property
    def diagonal_above(self) -> int | None:
        """Dimensions above this are kept whole and preconditioned diagonally (None: no such rule)."""
        return self.hp[self.diagonal_hparam] if self.diagonal_hparam else None

    def diagonal_modes(self, group) -> list[bool]:
        """Which modes of the group's pieces are above diagonal_above (kept whole: gnfx.targets.diagonal_modes)."""
        return diagonal_modes(group.shape, self.diagonal_above)

    # --- state -----------------------------------------------------------------------------
    def factor_dtype(self, piece) -> torch.dtype:
        p = self.parameters.param(piece.target.params[0])
        return torch.float64 if p.dtype == torch.float64 else torch.float32

    def decomposition_dtype(self, factor: torch.Tensor) -> torch.dtype:
        """The dtype in which the refresh decomposes `factor` (the hyperparameter; "auto": its own)."""
        name = self.hp["decomposition_dtype"]
        return factor.dtype if name == "auto" else FACTOR_DTYPES[name]

    def stacked_zeros(self, group, *shape, dtype=None):
        p = self.parameters.param(group.pieces[0].target.params[0])
        return torch.zeros((len(group.pieces),) + shape, dtype=dtype or self.factor_dtype(group.pieces[0]),
                           device=p.device)

    def stacked_eye(self, group, n):
        return self.stacked_identity(group, (n, n))

    def stacked_identity(self, group, shape):
        """Identity factors of `shape` stacked over the group's pieces: ones for a diagonal factor
        (d,), identity matrices for (d, d) or per row group (groups, d, d) (gnfx.layouts.base)."""
        if len(shape) == 1:
            return self.stacked_zeros(group, *shape) + 1
        device = self.parameters.param(group.pieces[0].target.params[0]).device
        return self.stacked_zeros(group, *shape) + torch.eye(shape[-1], dtype=self.factor_dtype(group.pieces[0]),
                                                             device=device)

    @staticmethod
    def layout(group):
        """The layout of the group's blocks (all alike: gnfx.targets groups by kind and row groups)."""
        return layout_of(group.pieces[0].target.block)

    def group_state(self, group) -> dict:
        """The group's state tensors, created on first use (keys without the group prefix)."""
        holder = self.parameters.state_of(self.state_holder[group.key])
        prefix = group.key + "."
        state = {k[len(prefix):]: v for k, v in holder.items() if k.startswith(prefix)}
        if not state:
            state = {**self.init_group(group), **self.chain_state(group)}
            for k, v in state.items():
                holder[prefix + k] = v
        return state

    def states(self) -> dict:
        return {g.key: self.group_state(g) for g in self.groups}

    def follow_parameters(self):
        """Each group's state to the device of the parameter that holds it, its floating tensors in
        `factor_dtype` of the parameters as they are now (float64 for a model moved to float64, else
        float32), as `group_state` creates them."""
        for group in self.groups:
            holder = self.state_holder[group.key]
            device, dtype = self.parameters.param(holder).device, self.factor_dtype(group.pieces[0])
            state = self.parameters.state_of(holder)
            for k, v in state.items():
                if k.startswith(group.key + ".") and isinstance(v, torch.Tensor):
                    state[k] = v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)

    def expected_state(self):
        """Each group's state under "<group key>.<name>" in the state of the parameter that holds
        it: the current tensors, or those `group_state` would create (on the meta device)."""
        expected: dict[str, dict] = {}
        for group in self.groups:
            holder = self.state_holder[group.key]
            prefix = group.key + "."
            current = {k[len(prefix):]: v for k, v in self.parameters.state_of(holder).items() if k.startswith(prefix)}
            if not current:
                current = {**self.init_group(group), **self.chain_state(group, device="meta")}
            expected.setdefault(holder, {}).update({prefix + k: (v.shape, v.dtype) for k, v in current.items()})
        return expected

    # --- the batched math, supplied by subclasses ------------------------------------------
    def init_group(self, group) -> dict:
        raise NotImplementedError

    def direction(self, G, state, collect: bool):
        raise NotImplementedError

    def refresh_due(self, step: int) -> bool:
        return False

    def statistic_step(self, step: int) -> bool:
        """Whether step `step` collects statistics (gnfx.preconditioners.base.collects_statistics)."""
        return collects_statistics(step, self.hp["stat_every"], self.hp["refresh_warmup"])

    def tap_bases_due(self) -> bool:
        """Whether this step's refresh may change the bases the taps measure statistics in
        (`BlockStatistics.basis`, gnfx.statistics); under FSDP2 their owners then send them to every
        rank (gnfx.fsdp). None by default."""
        return False

    def curvature_product(self, group, i: int, V: torch.Tensor, statistics) -> torch.Tensor | None:
        """Ĝ vec(V) for piece i of `group` (V shaped like the piece): the curvature this
        preconditioner models, undamped, from its current state and the averaged `statistics` (a
        gnfx.statistics.StatisticsStore), which it leaves unchanged (read by gnfx.diagnose); None
        where it models no GGN (the default: Shampoo's and SOAP's factors are Gram matrices of
        gradients under a root, with no GGN scale)."""
        return None

    def collect(self) -> None:
        """Curvature statistics taken from the gradients themselves, run on statistic steps before
        the refresh (so a refresh sees this step's gradient); none by default."""

    def stacked_gradients(self):
        """The gradients of each group's pieces, stacked (k, *shape), one group at a time in group order
        (a generator: one group's stack alive at once); zeros for a missing gradient. Each target's
        gradient matrix is formed once for all its pieces (gnfx.targets `stacked_piece_gradients`)."""
        def grad_of(name):
            p = self.parameters.param(name)
            return p.grad if p.grad is not None else torch.zeros_like(p)
        matrices = {}
        for group in self.groups:
            yield stacked_piece_gradients(group.pieces, grad_of, matrices)

    def refresh(self, statistics, comm) -> None:
        """The amortized decompositions from the averaged `statistics` (a gnfx.statistics.StatisticsStore),
        split across ranks by `comm` (a gnfx.distributed.Communicator; None on one process: `owned`,
        `share`); none by default."""

    # --- the refresh under torch.distributed (gnfx.distributed) -------------------------------
    def owned(self, group, comm) -> torch.Tensor:
        """Indices of the group's pieces whose refresh this rank computes (all of them alone, or
        when `comm` is None), on the group's device: a refresh indexes them with masks computed there."""
        device = self.parameters.param(group.pieces[0].target.params[0]).device
        if comm is None:
            return torch.arange(len(group.pieces), device=device)
        return comm.owned(group.key, [sum(d ** 3 for d in group.shape)] * len(group.pieces)).to(device)

    def share(self, group, tensors, comm) -> None:
        """Give every rank the refreshed state of the pieces other ranks computed (`comm`: the
        gnfx.distributed.Communicator, None on one process)."""
        if comm is not None:
            comm.share(group.key, tensors)

    def sum_over_owners(self, x):
        """Under FSDP2 (gnfx.fsdp) each rank holds some of the blocks: a sum over all blocks is the
        sum of the ranks' partial sums `x` (one scalar all-reduce). Otherwise `x` itself."""
        sharded = self.parameters.sharded
        return x if sharded is None else sharded.all_sum(x)

    # --- the parameter write of the chain (gnfx.transforms.Step) ------------------------------
    def step_parameters(self, steps, lr, wd) -> None:
        """θ ← θ(1 - ηλ) - η D for every piece of every group at once (foreach kernels): `steps`
        are the stacked steps D of self.groups; lr and wd are tensors with one entry per write of
        `self.writes` (each parameter's own param group: gnfx.codegen; wd None: no decay, and no pass
        multiplying every parameter by 1). The parameters in `self.without_gradient` are not written
        (a piece's other parameters are); none of them with a gradient (a preconditioner whose blocks this
        forward did not use, as SAM's unused multimask heads under "auto"), nothing is written."""
        decay, neg_lr = None if wd is None else (1 - lr * wd).unbind(), lr.neg().unbind()
        rows = [row for m in steps for row in m.unbind()]  # the step of each piece
        params, updates, decays, lrs = [], [], [], []
        # name -> (view, groups, matrix) of a weight whose view is a copy (gnfx.targets.COPYING_VIEWS),
        # written back below; cloned, as the reshape is a true view for some shapes (C_out = 1, 1x1 kernels)
        copies = {}
        matrices = {}  # name -> the parameter as its matrix, once per parameter (not per piece of it)
        for j, (i, name, view, groups, region, src) in enumerate(self.writes):
            if name in self.without_gradient:
                continue
            if name not in matrices:
                matrices[name] = as_matrix(self.parameters.param(name), view, groups)
                if view in COPYING_VIEWS:
                    matrices[name] = matrices[name].clone()
                    copies[name] = (view, groups, matrices[name])
            p = matrices[name]
            params.append(p if region is None else p[region])
            updates.append(rows[i] if src is None else rows[i][src])
            decays.append(None if decay is None else decay[j])
            lrs.append(neg_lr[j])
        if not params:  # the foreach kernels refuse empty lists
            return
        if decay is not None:
            torch._foreach_mul_(params, decays)
        torch._foreach_addcmul_(params, updates, lrs)
        for name, (view, groups, M) in copies.items():
            p = self.parameters.param(name)
            p.copy_(from_matrix(M, view, p.shape, groups))


def _covers(region, shape) -> bool:
    """Whether indexing with `region` (slices) selects the whole of a tensor of `shape`."""
    return len(region) == len(shape) and all(
        isinstance(s, slice) and s.step in (None, 1) and (s.start or 0) == 0 and (s.stop is None or s.stop >= d)
        for s, d in zip(region, shape))


def parameter_writes(groups) -> list[tuple]:
    """(piece number in group order, parameter name, matrix view, the target's row groups (which the
    view may read), region of the parameter or None for all of it, region of the piece or None for
    all of it) of every region of every piece: where the tail writes each piece's step."""
    writes = []
    number = 0
    for group in groups:
        for piece in group.pieces:
            t = piece.target
            for pos, region, src in param_regions(piece):
                view = t.view if pos == 0 else ""
                shape = (t.shape[0], t.shape[1] - 1) if t.folded_bias and pos == 0 else t.shape[:1] if pos else t.shape
                writes.append((number, t.params[pos], view, t.groups, None if _covers(region, shape) else region,
                               None if _covers(src, group.shape) else src))
            number += 1
    return writes
