"""The optimizer's parameters as one flat vector: the layout of the quadratic step's vectors.

The quadratic-model step (gnfx.quadratic_step) works on flat vectors of all the optimizer's
parameters at once: θ, the proposal Δ, the gradient g, the rows v_i of V = (Δ_1, ..., Δ_P, δ) and the
update s = cᵀV. `FlatLayout` says where each parameter lies in them and which preconditioner owns it,
keeps their buffers, and `double_products` forms VVᵀ and Vg in float64 for M and b.
"""
from __future__ import annotations

import functools

import torch

# the step's flat vectors stay allocated between steps up to this many parameters (FlatLayout); 2^22 float32
# are 16 MB a vector; the models of benchmarks/ have 10k-110k
BUFFERED_NUMEL = 2 ** 22
# the float64 products of the step's vectors (M's λVVᵀ, b = Vg) take at most this many entries of each vector at a
# time (`double_products`): a float64 copy of a 100M-parameter model's vectors would be 2.4 GB
DOUBLE_CHUNK = 2 ** 20


class FlatLayout:
    """The optimizer's parameters as one flat vector, concatenated in their order (one kernel for
    the step's dot products and its update, instead of one per parameter): where each lies, and
    which preconditioner owns each parameter and each element (-1: none, such a parameter does
    not move).

    When the parameters share one dtype and device (`buffered`), the step's flat vectors (θ, Δ, g,
    the rows of V, the update s) live in buffers whose per-parameter views are made once per buffer:
    on the deep autoencoder of benchmarks/ making the views of a flat vector (a split and a view per
    parameter) cost as much as a kernel over it, ~75 µs a time, several times a step. The views of
    θ's buffer and of the rows' are laid out alike (the same offsets in buffers of one size), so that
    make_dual takes the rows' as tangents as they are instead of copying each (a tangent laid out
    unlike its primal is copied), and Δ and δ are their buffers, not concatenations of their
    parameters' tensors. Up to BUFFERED_NUMEL elements the buffers are `kept` from step to step;
    a larger model's are the step's own (`release` at its end drops all but the update's, which is
    δ, the next step's previous update): three vectors of θ's size kept between steps would be memory
    the forward could not use. On a 129M-parameter VGG-11 the step's own buffers and the chunked
    float64 products (`double_products`) took kfac's step from 10.4 to 7.2 CPU seconds
    (benchmarks/results/performance.md, "The quadratic step of a large model")."""

    def __init__(self, names: list[str], params: list[torch.Tensor], preconditioners: list):
        self.names = names
        self.shapes = [p.shape for p in params]
        self.sizes = [p.numel() for p in params]
        self.dtypes = [p.dtype for p in params]
        self.device = params[0].device
        self.buffered = len({(p.dtype, p.device) for p in params}) == 1
        self.kept = self.buffered and sum(self.sizes) <= BUFFERED_NUMEL
        self.preconditioners = list(preconditioners)
        position = {n: i for i, n in enumerate(names)}
        owner = [-1] * len(names)
        for k, pre in enumerate(self.preconditioners):
            for n in [n for blk in pre.blocks for n in blk.held_params] + list(pre.param_names):
                if n in position:
                    owner[position[n]] = k
        self.parameter_owner = owner
        # whether preconditioner k owns every element (its row of V is the proposal as it is)
        self.owns_all = [all(o == k for o in owner) for k in range(len(self.preconditioners))]
        self._buffers: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] = {}  # key -> (flat, its views)

    @functools.cached_property
    def owner(self) -> torch.Tensor:
        """The owning preconditioner of each element (int64, as many as the parameters' elements: 1 GB for
        a 129M-parameter model), made where a row of V is split by owner (several parts, a fixed μ̂)."""
        return torch.repeat_interleave(torch.tensor(self.parameter_owner, device=self.device),
                                       torch.tensor(self.sizes, device=self.device))

    def buffer(self, key: str) -> torch.Tensor:
        """The flat buffer `key` (of a `buffered` layout), made at its first use and kept (until `release`)."""
        if key not in self._buffers:
            flat = torch.empty(sum(self.sizes), dtype=self.dtypes[0], device=self.device)
            self._buffers[key] = (flat, [t.view(shape) for t, shape in zip(flat.split(self.sizes), self.shapes)])
        return self._buffers[key][0]

    def release(self) -> None:
        """At a step's end, for a layout whose buffers are not `kept`: drop them, but the update's (δ's)."""
        if not self.kept:
            self._buffers = {key: value for key, value in self._buffers.items() if key == "update"}

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The per-parameter views of a flat vector (of a buffer: those made with it)."""
        for buffer, views in self._buffers.values():
            if flat is buffer:
                return views
        return [t.view(shape) for t, shape in zip(flat.split(self.sizes), self.shapes)]

    def flat(self, tensors: list[torch.Tensor], key: str | None = None) -> torch.Tensor:
        """The per-parameter tensors concatenated into one vector: the buffer whose views they are (no
        copy); else, given a `key` and `buffered`, buffer `key` written in one kernel; else a new vector."""
        for buffer, views in self._buffers.values():
            if tensors is views:
                return buffer
        if key is not None and self.buffered:
            return self.flat(self.copy(key, tensors))
        return flat_vector(tensors)

    def copy(self, key: str, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Copies of the per-parameter tensors: the views of buffer `key` written in one kernel, or a
        clone each where the layout is not `buffered`."""
        if not self.buffered:
            return [t.detach().clone() for t in tensors]
        views = self.split(self.buffer(key))
        torch._foreach_copy_(views, tensors)
        return views

    def rows(self, parts: list, proposal: torch.Tensor, previous: torch.Tensor | None) -> list[torch.Tensor]:
        """The rows of V: one per preconditioner in `parts`, the proposal on its parameters (zero
        elsewhere, each its own buffer), and the previous update last if there is one."""
        rows = []
        for k in [self.preconditioners.index(pre) for pre in parts]:
            if self.owns_all[k]:
                rows.append(proposal)
            elif self.buffered:
                rows.append(torch.where(self.owner == k, proposal, proposal.new_zeros(()), out=self.buffer(f"row {k}")))
            else:
                rows.append(torch.where(self.owner == k, proposal, 0))
        return rows + ([previous] if previous is not None else [])

    def vectors(self, parts: list, proposal: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        """V: the `rows` stacked."""
        return torch.stack(self.rows(parts, proposal, previous))

    def tangents(self, rows: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """The rows of V as tangents of the parameters: per row, one tensor per parameter, views where
        the parameter has the row's dtype."""
        return [[t if t.dtype == dtype else t.to(dtype) for t, dtype in zip(self.split(row), self.dtypes)]
                for row in rows]

    def combine(self, c: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """s = cᵀV, the step from the coefficients c and the rows of V: into buffer "update" (V is a
        copy of the rows, so the previous update there is no longer read)."""
        c = c.to(device=V.device, dtype=V.dtype)
        if not self.buffered:
            return c @ V
        update = self.buffer("update")
        torch.mm(c[None], V, out=update[None])  # what c @ V computes, written in place
        return update


def flat_vector(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors concatenated into one vector (FlatLayout's order)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def double_products(V: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(V Vᵀ, V g) in float64 for the rows of V (k, n) and a vector g (n,), over at most DOUBLE_CHUNK
    entries of each at a time (float64 copies of that many only; one chunk, the whole products, for
    n ≤ DOUBLE_CHUNK)."""
    gram = product = None
    for start in range(0, max(V.shape[1], 1), DOUBLE_CHUNK):
        V_c, g_c = V[:, start:start + DOUBLE_CHUNK].double(), g[start:start + DOUBLE_CHUNK].double()
        gram = V_c @ V_c.T if gram is None else gram + V_c @ V_c.T
        product = V_c @ g_c if product is None else product + V_c @ g_c
    return gram, product
