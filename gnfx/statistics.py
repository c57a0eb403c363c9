"""The statistics runtime: per-block accumulators filled by the taps, and their moving averages.

For a block `z = W a (+ b)` applied to N examples with R positions each (R = 1 for a plain
(N, d) input; tokens or several call sites of a tied weight count as positions; N is the first
dimension of the model's output, so a layer may see its rows in any order, e.g. (T·N, d) inside
torch's attention), the taps see `a`
and the gradient `g = ∂L/∂z` of the loss `L = 1/M Σ_m ℓ_m`, a mean over the M loss terms of the
accumulation window: M = N T, with T the loss terms per example (T = 1 for an (N, C) model
output; T = prod(shape[1:-1]) for an (N, ..., C) output such as a language model's (N, T, V), as
in curvlinops; `loss_average="batch"` forces T = 1). The output gradient of each term is
`δ = M g` (docs/design.md §1: the 1/M of the mean undone). The taps accumulate, with
`kfac_approx="expand"` (positions are extra examples):

    A = 1/(N R) Σ_{n,r} a_{n,r} a_{n,r}ᵀ          (bias folded into a as a trailing 1)
    S = 1/M     Σ_{n,r} δ_{n,r} δ_{n,r}ᵀ = M Σ g gᵀ

and with `"reduce"` (positions summed first): `a_n = 1/R Σ_r a_{n,r}`, `δ_n = Σ_r δ_{n,r}`,
`A = 1/N Σ_n a_n a_nᵀ`, `S = 1/M Σ_n δ_n δ_nᵀ` (for a tied weight, over the positions of all
its sites). A call counts once its backward reaches the block: the forward tap stages `a`,
the backward tap of the same call commits it, so a forward that is never backpropagated adds nothing,
nor does a call whose output no backward reaches (DoRA's `lora_A(eye)`, used without its gradient). A layer whose
input is not batch-first (a positional embedding indexed by positions alone, the (T·N, d) rows
inside torch's attention) has no per-example statistics: it warns once, uses "expand", and takes
its per-example diagonal from the whole batch's gradient, as if the batch were one example.
Where the model output gives no N (a 0-dimensional loss returned by the model or by a method of
gnfx.compile(methods=...)), a block counts N by its inputs, except one whose inputs cannot tell
(`BlockStatistics.told_examples`): a column of ids (T,), N examples of one id or the T ids of fewer
examples looked up flat (flair's OneHotEmbeddings; `Layout.tells_examples`), a routed layout's sorted
tokens, the Σ_t b_t rows of a recurrent module called on a PackedSequence (each example's steps;
gnfx.recurrent.is_packed_rows), and calls of different first dimensions (flair's character embeddings, called on each sentence's
words). It takes the N of the first block the backward reached whose inputs tell one: the head, whose
output stands for the missing model output (flair's TextClassifier: its decoder's 8 sentences, where the
column holds their 47 tokens), so that its S = M Σ g gᵀ, M = N T, is on the head's scale; inputs whose
first dimension is not N are then not batch-first (above). Reached before any such block, it takes the N
that most of them count, or with none or a tie (warned) its own. Inputs of one example (BERT's position
ids (1, T), an unbatched input) are read by every example: they take the head's N too, as they would the
output's. The other blocks keep their own count where they disagree with the head (a graph network's nodes
beside its graphs): nothing without the output tells which is the loss's N. The per-example diagonal of the empirical
Fisher, for the per-example loss `ℓ̃_n = N ∂L/∂(example n)` (so that `L = 1/N Σ_n ℓ̃_n`), is
`diag = 1/N Σ_n (∇ℓ̃_n)² = N Σ_n (Σ_r g_{n,r} a_{n,r}ᵀ)²` (squared elementwise), laid out like `[W b]`.
`eigen_diag` is the same diagonal in the eigenbases (Q_S, Q_A) of a preconditioner (EKFAC):
`N Σ_n (Q_Sᵀ (Σ_r g_{n,r} a_{n,r}ᵀ) Q_A)²`, computed from the rotated rows `g Q_S` and `a Q_A`. The
preconditioner publishes its bases as `BlockStatistics.basis`, a function returning (Q_S, Q_A), Q_A
None for a diagonal A (embeddings: Q_A = I), read by the taps on each statistic step; unset, the
basis is the standard one and `eigen_diag` equals `diag`. When the preconditioner changes the basis
it carries the averaged value into the new one (the average is only meaningful in one basis).
`grad` is the batch's gradient of the statistic backward, `Σ_{n,r} g_{n,r} a_{n,r}ᵀ = ∂L/∂[W b]`
(the training loss's with `fisher="empirical"`, the loss at the sampled labels with `"mc"`, whose
mean over the labels is zero: rank1 sketches its outer products), and `inverse_counts` the pair
`[1/N, 1/M]` of the batch (N examples, M loss terms, as for `diag` and `S`). These two are the
last batch's values, never averaged over steps (`LATEST`); under data parallelism the average
`Σ_r N_r F_r / N` of gnfx.distributed gives the whole batch's `grad`, and `[W/N, W/M]` from the
W ranks' `inverse_counts` when every rank has the same T = M/N (the model output's shape).

The weight's part of `grad`, `Σ_{n,r} g_{n,r} a_{n,r}ᵀ` in W's columns, is the product the backward forms for
W's own gradient through the site. Where a block of one site has its weight read through an alias W'
(gnfx.taps.WeightTap, `fisher="empirical"`), autograd's ∂L/∂W' is exactly that site's term, whatever other
terms of the loss (a penalty, another use of W) add to W's `.grad` beside it, and before any change of `.grad`
after the backward (clipping): the backward's hook on the output leaves that part to W''s hook
(`record_weight_gradient`), read into the [W b] layout by the block's weight view (gnfx.targets.as_matrix), and
adds only the bias column Σ g itself. It does so for a backward that runs W''s node (not for
`backward(inputs=[b])`) and while no backward has kept its graph through a block (after one, ∂L/∂W' would hold
the term δ ūᵀ of gnfx.filled_gradients beside Σ g aᵀ): the two sums agree to float rounding (autograd's
product and the taps' einsum may order their sums differently).

A block whose diagonal A is weighted by energy (a position table, gnfx.layouts.position) gives with
its A (the ids' frequencies) the energies `energy`, `ε_t = 1/M Σ_n |δ_{n,t}|² = M Σ_n |g_{n,t}|²`
(S's normalization, so Σ_t ε_t = tr S), which `fold` turns into A = ε / Σ_t ε_t: after the average
over ranks (gnfx.distributed), so that the ranks' energies are added before the shares are taken.

Under torch.amp.GradScaler the user's backward is that of s·L, s the loss scale, so every g the taps
read from it is s·g: a statistic of the batch carries s to the power of g in it (`OUTPUT_GRADIENT_POWER`:
S, the diagonals and ε two, grad one, A and the counts none), which `StatisticsStore.unscaled` divides
out at the step (gnfx.optimizer), before the average over ranks and the fold. One step's backwards
(micro-batches) share one s: the scaler moves it in `scaler.update()`, after the step. With
`fisher="mc"` or `"type2"` the g are those of gnfx's own backward from z (gnfx.fisher), unscaled.

After a statistic step, `F ← β F + (1-β) F_batch` with β = `stat_decay` (the first batch sets F).
Statistics are float64 for a float64 layer and float32 otherwise.

A block of independent row groups (gnfx.layouts.base: grouped convolutions, norm affine
parameters) gets every statistic above per group j from its own rows a_j and δ_j: A and S are
stacked (groups, ., .), the diagonals keep the [W b] layout. A factor above the block's max_factor
(gnfx.layouts.base) is accumulated as its diagonal blocks only, (groups, m, b, b), from the rows
zero-padded to m·b entries: the cost of Σ a aᵀ falls from d² to m·b² per row.

A block whose rows are routed to its groups at run time (`Layout.routed`: stacked experts,
gnfx.layouts.experts) stages each input with its routing (the offsets the taps record) and takes the
groups' rows from the layout (`routed_rows`): A_e is the mean of a aᵀ over group e's own T_e rows (0 when
none reached it; the moving average then shrinks the group's A), S_e = M Σ g gᵀ over them.
Its tokens are sorted across the examples: it refuses the per-example statistics (diag, eigen_diag,
grad: a ConfigError at compile naming the block) and takes kfac_approx="reduce" as "expand", with a
warning.
"""
from __future__ import annotations

import warnings
from collections import Counter

import torch
from torch.autograd.graph import get_gradient_edge

from gnfx.errors import ConfigError
from gnfx.layouts import layout_of
from gnfx.layouts.base import padded_blocks
from gnfx.targets import as_matrix

STATISTICS = ("A", "S", "diag", "eigen_diag", "grad", "inverse_counts")
# statistics kept as the last batch's value instead of a moving average over steps
LATEST = frozenset({"grad", "inverse_counts"})
KFAC_APPROX = ("expand", "reduce")
# the power of the output gradients g in each statistic of a batch (module doc; "energy": ε, the Σ |δ|² of a
# diagonal A weighted by energy), which a backward of the loss scaled by s multiplies by s to that power
OUTPUT_GRADIENT_POWER = {"A": 0, "S": 2, "diag": 2, "eigen_diag": 2, "grad": 1, "inverse_counts": 0, "energy": 2}


def _rotate_rows(rows: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """rows @ Q: rows (..., d) by a basis (d, d), or rows (..., groups, d) by one basis per group."""
    return rows @ Q if Q.dim() == 2 else torch.einsum("...gi,gij->...gj", rows, Q)


class BlockStatistics:
    """Accumulators and averaged statistics of one block."""

    def __init__(self, block, store, needs, kfac_approx: str, dtype: torch.dtype, device: torch.device):
        self.store = store
        self.needs = frozenset(needs)
        self.dtype, self.device = dtype, device
        self.lay_out(block)
        self.routed = self.layout.routed
        if self.routed and self.wants_activation_in_backward:
            raise ConfigError(
                f"block {block.name!r} ({self.groups} stacked experts, gnfx.layouts.experts) has no per-example "
                f"statistics: its rows are the tokens sorted by expert across the examples, so the statistics "
                f"{sorted(self.needs & {'diag', 'eigen_diag', 'grad'})} (diag's, rank1's and EKFAC's) cannot be "
                f"formed. Fix: give it kfac, shampoo, soap, muon or diag with a policy, e.g. gnfx.compile(model, "
                f"{{'*experts*': 'kfac', '*': 'ekfac'}}) (gnfx.plan)")
        if self.routed and kfac_approx == "reduce":
            warnings.warn(f"block {block.name!r}: stacked experts have no per-example rows (the tokens are sorted "
                          f"by expert across the examples): this block uses kfac_approx='expand'",
                          RuntimeWarning, stacklevel=2)
        self.reduce = kfac_approx == "reduce" and not self.layout.diagonal_A and not self.routed
        self._per_example: dict[int, torch.Tensor] = {}
        self._eigen_per_example: dict[int, torch.Tensor] = {}
        self.basis = None  # () -> (Q_S, Q_A or None), set by the preconditioner that needs "eigen_diag"
        self._a_rows = 0
        self._examples: dict[int, int] = {}  # forward id -> examples N of that forward
        self._staged: dict[int, list] = {}  # forward id -> layer inputs awaiting that forward's backward
        self._whole_batch: set[int] = set()  # forwards whose input is not batch-first (see _commit)
        self._warned = False
        # forward id -> the autograd node of its alias W' of the weight (gnfx.taps.WeightTap), and the backwards
        # that left the weight's part of `grad` to that alias's hook and whose hook has not run yet
        self._aliases: dict[int, object] = {}
        self._left_to_alias: Counter = Counter()
        # several sites (tied weights, or a layer an opaque submodule's code calls, any number of times:
        # Block.called_by): the sites' terms summed per example (reduce: over the positions of all sites;
        # per-example diagonals: before squaring)
        self.several_sites = len(block.sites) > 1 or block.called_by is not None
        self.pool_sites = self.reduce and self.several_sites
        self._pooled: dict[int, dict] = {}
        self.values: dict[str, torch.Tensor] = {}  # the averaged statistics, by name
        self.updates = 0

    def lay_out(self, block) -> None:
        """Take `block` (the same layer; its factor bound `max_factor` planned anew, gnfx.plan) and its
        layout, with empty accumulators shaped for it: called before any backward of the step reached
        the block. The staged layer inputs and the averaged statistics stay (a checkpoint's, of this
        blocking, replace them)."""
        self.block = block
        self.layout = layout_of(block)
        self.groups = self.layout.groups
        dtype, device, needs = self.dtype, self.device, self.needs
        self.bias = block.bias is not None
        d_a, d_out = block.d_in + self.bias, block.d_out
        zeros = lambda *shape: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
        # A is accumulated as its weight part Σ a aᵀ (contiguous, so the product writes in place)
        # and, with a bias, the row sums Σ a; the bordered (d+1)² matrix is assembled in batch()
        # (a blocked factor is accumulated as its diagonal blocks from zero-padded rows [a 1 0 ...])
        shapes = self.layout.factor_shapes()
        self.blocking = self.layout.factor_blocking()
        whole_A = not (self.layout.diagonal_A or self.blocking["A"])
        a_shape = shapes["A"][:-2] + (block.d_in, block.d_in) if whole_A else shapes["A"]
        self._A = zeros(*a_shape) if "A" in needs else None
        self._A_sum = zeros(*a_shape[:-1]) if "A" in needs and self.bias and whole_A else None
        # Σ |δ|² per id of a diagonal A weighted by energy (gnfx.layouts.position), accumulated with S
        self._A_energy = zeros(*a_shape) if "A" in needs and self.layout.energy_weighted_A else None
        self._S = zeros(*shapes["S"]) if "S" in needs else None
        self._diag = zeros(d_out, d_a) if "diag" in needs else None
        self._eigen_diag = zeros(d_out, d_a) if "eigen_diag" in needs else None
        self._grad = zeros(d_out, d_a) if "grad" in needs else None
        # the rows T_e routed to each group (a routed layout: A_e is the mean over its own rows)
        self._group_rows = zeros(self.groups) if self.layout.routed and "A" in needs else None
        self._stale = {"_A", "_S"}  # Gram buffers whose content is from before the last reset
        self._dirty = False  # whether a tap added to the other accumulators since the last reset

    def staged_rows(self) -> int:
        """The rows (examples x positions, over all call sites) of the layer inputs staged by the forwards
        whose backward has not reached the block yet (gnfx.layouts.base `Layout.rows`)."""
        return sum((layout or self.layout).rows(a) for staged in self._staged.values() for a, _, layout in staged)

    @property
    def takes_grad(self) -> bool:
        """Whether the block's statistics take the batch gradient `grad`."""
        return self._grad is not None

    def record_weight_alias(self, alias: torch.Tensor, forward_id: int) -> None:
        """Forward: the weight's alias W' of forward `forward_id` (gnfx.taps.WeightTap), whose gradient may
        give the weight's part of `grad` (module docstring)."""
        self._aliases[forward_id] = get_gradient_edge(alias).node

    def _left_to_weight(self, forward_id: int) -> bool:
        """Called from the output's hook in a backward that fills the block's gradient: whether the weight's
        part of `grad` is left to the hook of W' (module docstring), counted so that W''s hook adds it once."""
        node = self._aliases.get(forward_id)
        if node is None or self.store.graph_backward_told or not torch._C._will_engine_execute_node(node):
            return False
        self._left_to_alias[forward_id] += 1
        return True

    @torch.no_grad()
    def record_weight_gradient(self, g: torch.Tensor, forward_id: int) -> None:
        """W''s gradient hook: ∂L/∂W', the site's Σ g aᵀ in W's shape, into `grad`'s weight columns, for a
        backward whose output hook left it here (any other backward through W' adds nothing)."""
        if not self._left_to_alias[forward_id]:
            return
        self._left_to_alias[forward_id] -= 1
        W = as_matrix(g, self.layout.view, self.groups)
        self._grad[:, :W.shape[1]] += W.reshape(self._grad.shape[0], -1)

    @property
    def wants_activation_in_backward(self) -> bool:
        return bool(self.needs & {"diag", "eigen_diag", "grad"})

    @property
    def per_example(self) -> bool:
        """Whether the statistics need each example's rows apart (per-example diagonals, the
        batch gradient, kfac_approx="reduce"), i.e. which axis of the input is the batch's."""
        return self.reduce or self.wants_activation_in_backward

    def _augmented(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.cat([rows, rows.new_ones(rows.shape[:-1] + (1,))], dim=-1) if self.bias else rows

    @torch.no_grad()
    def record_activation(self, a: torch.Tensor, forward_id: int, routing: torch.Tensor | None = None,
                          layout=None) -> None:
        """Forward tap: stage the layer input (with its routing, for a routed layout, and its call site's layout,
        for a site that reads a window of the parameter: gnfx.layouts.registration.site_layout; None: the
        block's); it counts once the backward of this forward reaches the block (a forward that is never
        backpropagated adds nothing)."""
        self._staged.setdefault(forward_id, []).append((a, routing, layout))

    def _commit(self, forward_id: int, a: torch.Tensor | None) -> None:
        """Accumulate A from the staged input of the call whose output gradient arrived (`a`, the input the
        backward tap was given: the tensor the forward tap staged; None: every staged input), counting the
        forward's examples at its first. A call whose output no backward reaches (peft's and torchtune's
        DoRA run `lora_A(eye)` and use the product without its gradient) adds no rows: its input stays
        staged until the step's reset. The backward meets the calls last first, so the search runs from
        the end (one comparison a call, for a layer called at every step of a sequence)."""
        staged = self._staged[forward_id]
        self._dirty = True
        if forward_id not in self._examples:  # the forward's examples, from every call's input
            self._count_examples(forward_id, staged)
        if a is None:
            called = self._staged.pop(forward_id)
        else:
            index = next((i for i in range(len(staged) - 1, -1, -1) if staged[i][0] is a), None)
            if index is None:  # this call's input was committed by an earlier backward (another sampled vector)
                return
            called = [staged.pop(index)]
            if not staged:
                del self._staged[forward_id]
        if self.routed:  # (a, routing) pairs: each group's rows by the routing (no per-example statistics)
            for a, routing, _ in called if self._A is not None else ():
                for group, rows in self.layout.routed_rows(a, routing):
                    self._add_A(rows.to(self.dtype), group)
            return
        pool = self.pool_sites and forward_id not in self._whole_batch
        reduce = self.reduce and forward_id not in self._whole_batch
        if self._A is None and not pool:
            return
        for a, _, layout in called:
            for chunk in (layout or self.layout).input_chunks(a):
                if self.layout.diagonal_A:  # token ids: A is the diagonal of token counts
                    self._A += torch.bincount(chunk.flatten(), minlength=self._A.shape[0]).to(self.dtype)
                    self._a_rows += chunk.numel()
                elif pool:  # reduce over the positions of every site: finished in finalize
                    pooled = self._pooled.setdefault(forward_id, {"a": 0, "positions": 0, "g": 0})
                    pooled["a"] = pooled["a"] + chunk.to(self.dtype).sum(1)
                    pooled["positions"] += chunk.shape[1]
                else:
                    chunk = chunk.to(self.dtype)
                    self._add_A(chunk.mean(1) if reduce else chunk.flatten(0, 1))

    def _count_examples(self, forward_id: int, staged: list) -> None:
        """N of a forward (the model output's first dimension; where the output has none, module doc), and
        whether its inputs are batch-first: an input whose first dimension is not N has no per-example rows."""
        n = self.store.batch_size.get(forward_id)
        if n is None:
            own = 1 if self.routed else self.layout.examples(staged[0][0])
            n = self.store.examples_without_output(forward_id, self, own)
        if self.routed:
            self._examples[forward_id] = n
            return
        folded = [self.layout.examples(a) for a, _, _ in staged if self.layout.examples(a) != n]
        if folded and self.per_example:
            self._whole_batch.add(forward_id)
            if not self._warned and n > 1:  # (one example: the whole batch's gradient is its own)
                self._warned = True
                warnings.warn(
                    f"block {self.block.name!r}: its input's first dimension ({folded[0]}) is not the batch "
                    f"({n} examples, the first dimension of the model output, or of the head's input where "
                    f"the output has none), so per-example statistics cannot be formed: this block uses "
                    f"kfac_approx='expand' and takes its per-example "
                    f"diagonal from the whole batch's gradient, as if the batch were one example",
                    RuntimeWarning, stacklevel=3)
        self._examples[forward_id] = n

    def told_examples(self, forward_id: int) -> int | None:
        """N that the layer inputs staged by forward `forward_id` tell (`Layout.tells_examples`), every call's
        alike; None where one cannot tell or two calls differ (a layer called on each sentence's words:
        flair's character embeddings)."""
        staged = self._staged.get(forward_id, ())
        told = {self.layout.examples(a) if self.layout.tells_examples(a) else None for a, _, _ in staged}
        return told.pop() if len(told) == 1 else None

    def _add_A(self, rows: torch.Tensor, group: int | None = None) -> None:
        """Σ a aᵀ (and Σ a with a bias) over the rows a (P, d) or (P, groups, d), or the rows (P, d) of
        one `group` (a routed layout), without materializing [a 1]; for a blocked A the diagonal blocks
        of Σ [a 1][a 1]ᵀ."""
        self._gram_into("_A", self._augmented(rows) if self.blocking["A"] else rows, group)
        if self._A_sum is not None:
            (self._A_sum if group is None else self._A_sum[group]).add_(rows.sum(0))
        if group is not None:
            self._group_rows[group] += rows.shape[0]
        self._a_rows += rows.shape[0]

    def _gram_into(self, name: str, rows: torch.Tensor, group: int | None = None) -> None:
        """buffer += rowsᵀ rows (per group for rows (P, groups, d), into that group's part of the buffer for
        the rows (P, d) of one `group`; per diagonal block, the rows zero-padded and cut into its blocks,
        for a blocked factor); the first product after a reset overwrites (beta=0) instead of adding to
        zeros, so the large Gram buffers are never cleared (except before a first product into one group,
        which leaves the others' old content)."""
        beta = 0.0 if name in self._stale else 1.0
        buffer = getattr(self, name)
        if group is not None:
            if beta == 0.0:
                buffer.zero_()
                beta = 1.0
            buffer = buffer[group]
        blocks = self.blocking[name[1:]]
        if blocks is not None:  # (P, [groups,] m, b) -> (P, groups·m, b)
            rows = padded_blocks(rows, *blocks).flatten(1, -2)
        if rows.dim() == 2:
            buffer.addmm_(rows.T, rows, beta=beta)
        else:
            per_group = rows.transpose(0, 1)
            buffer.flatten(0, -3).baddbmm_(per_group.transpose(1, 2), per_group, beta=beta)
        self._stale.discard(name)

    def _bordered_A(self) -> torch.Tensor:
        """Σ [a 1]ᵀ [a 1] = [[Σ a aᵀ, Σ a], [Σ aᵀ, rows]] from the accumulators (per group)."""
        if self._A_sum is None:
            return self._A
        d = self._A.shape[-1]
        out = self._A.new_empty(self._A.shape[:-2] + (d + 1, d + 1))
        out[..., :d, :d] = self._A
        out[..., :d, d] = out[..., d, :d] = self._A_sum
        out[..., d, d] = self._a_rows if self._group_rows is None else self._group_rows
        return out

    @torch.no_grad()
    def record_error(self, g: torch.Tensor, a: torch.Tensor | None, forward_id: int,
                     routing: torch.Tensor | None = None, layout=None) -> None:
        """Backward tap: accumulate Σ g gᵀ and, if needed, the per-example squared gradients (a routed
        layout: Σ g gᵀ over each group's rows by the `routing` recorded with g; `layout`: the call site's, for a
        site that reads a window of the parameter, None for the block's)."""
        if forward_id in self._staged:
            self._commit(forward_id, a)
        self._dirty = True
        if self.routed:
            for group, rows in self.layout.routed_rows(g, routing) if self._S is not None else ():
                self._gram_into("_S", rows.to(self.dtype), group)
            return
        layout = layout or self.layout
        g3 = layout.error_rows(g).to(self.dtype)
        if self.groups > 1:  # (N, R, groups, s)
            g3 = g3.unflatten(-1, (self.groups, -1))
        whole = forward_id in self._whole_batch
        if self.pool_sites and not whole:
            pooled = self._pooled[forward_id]
            pooled["g"] = pooled["g"] + g3.sum(1)
        elif self._S is not None:
            rows = g3.sum(1) if self.reduce and not whole else g3.flatten(0, 1)
            self._gram_into("_S", rows)
        if self._A_energy is not None:
            self._A_energy.index_add_(0, self.layout.error_ids(g).flatten(), g3.square().sum(-1).flatten())
        grad = self._grad
        if grad is not None and self._left_to_weight(forward_id):  # W''s hook adds Σ g aᵀ; here the bias's Σ g
            if self.bias:
                grad[:, -1] += g3.sum((0, 1)).reshape(-1)
            grad = None
        if self._diag is None and grad is None and self._eigen_diag is None:
            return
        Q_S, Q_A = self.basis() if self._eigen_diag is not None and self.basis is not None else (None, None)
        g3s = [g3] if self._eigen_diag is None else [g3, g3 if Q_S is None else _rotate_rows(g3, Q_S)]
        # one pass over the input's chunks for every statistic: a conv's patches unfolded, and the rows
        # cast and augmented with their 1, once
        for (g, *rotated), chunk in self._example_chunks(g3s, a, forward_id, layout):
            rows = chunk if self.layout.diagonal_A else self._augmented(chunk.to(self.dtype))
            if self._diag is not None:
                self._record_per_example(g, rows, forward_id, self._diag, self._per_example)
            if grad is not None:
                self._record_gradient(g, rows)
            if self._eigen_diag is not None:
                self._record_per_example(rotated[0], rows, forward_id, self._eigen_diag, self._eigen_per_example, Q_A)

    def _example_chunks(self, g3s: list[torch.Tensor], a: torch.Tensor, forward_id: int, layout):
        """(output gradients, input) of the same examples, per chunk of the layer input: each of the
        (N, R, ...) gradients `g3s` cut to the chunk's examples (the whole batch as one example for a
        forward whose input is not batch-first, see _commit). The chunks are formed one at a time (a conv's
        patches, a bilinear map's outer products), except for such a forward, whose one chunk is all of them."""
        chunks = layout.input_chunks(a)
        if forward_id in self._whole_batch:
            chunks = [torch.cat([c.reshape((1, -1) + tuple(c.shape[2:])) for c in chunks], dim=1)]
            g3s = [g3.reshape((1, -1) + tuple(g3.shape[2:])) for g3 in g3s]
        start = 0
        for chunk in chunks:
            yield [g3[start:start + chunk.shape[0]] for g3 in g3s], chunk
            start += chunk.shape[0]

    def _record_gradient(self, g: torch.Tensor, rows: torch.Tensor) -> None:
        """Σ_{n,r} g_{n,r} a_{n,r}ᵀ into `grad`, laid out like [W b], from a chunk's output gradients
        and its rows [a 1] (token ids for a diagonal A)."""
        if self.layout.diagonal_A:  # token ids: the layout adds δ into their rows
            self._grad += self.layout.gradient(g, rows)
        else:
            self._grad += torch.einsum("nr...o,nr...i->...oi", g, rows).reshape(self._grad.shape)

    def _record_per_example(self, g: torch.Tensor, rows: torch.Tensor, forward_id: int, out: torch.Tensor,
                            pending: dict, Q_A: torch.Tensor | None = None) -> None:
        """Per-example gradients Σ_r g_r a_rᵀ of a chunk (its rows [a 1] rotated by Q_A if given; token
        ids for a diagonal A) into `out`, squared now (one site) or once all sites of this forward are
        summed in `pending` (tied weights)."""
        single_site = not self.several_sites
        if self.layout.diagonal_A and single_site:  # token ids: squares of each (example, id) pair's sum
            out += self.layout.per_example_squares(g, rows)
            return
        if self.layout.diagonal_A:  # token ids: the layout scatters δ into their rows
            per_example = self.layout.per_example_gradient(g, rows)
        else:
            rows = rows if Q_A is None else _rotate_rows(rows, Q_A)
            if single_site and g.shape[1] == 1 and self.groups == 1:
                out.addmm_(g[:, 0].square().T, rows[:, 0].square())
                return
            # Σ_r g_r a_rᵀ per example (and group), laid out like [W b]
            per_example = torch.einsum("nr...o,nr...i->n...oi", g, rows).reshape(g.shape[0], *out.shape)
        if single_site:
            out += per_example.square().sum(0)
        elif forward_id in pending:
            pending[forward_id] += per_example
        else:
            pending[forward_id] = per_example

    @torch.no_grad()
    def batch(self) -> dict[str, torch.Tensor]:
        """This step's statistics from the accumulated sums (empty if no forward was backpropagated)."""
        if not self._examples:
            return {}
        kept = self.store.kept_fraction  # rows of the output the loss counts (ignored targets drop out)
        n = sum(k * kept.get(f, 1.0) for f, k in self._examples.items())
        m = sum(k * self.store.terms_per_example.get(f, 1) * kept.get(f, 1.0) for f, k in self._examples.items())
        for pooled in self._pooled.values():
            if self._A is not None:
                self._add_A(pooled["a"] / pooled["positions"])
            if self._S is not None and torch.is_tensor(pooled["g"]):
                self._gram_into("_S", pooled["g"])
        batch = {}
        if self._A is not None and self._a_rows:
            # the ids' frequencies; a routed layout's A_e is the mean over its group's own rows (0 for none)
            A = self._bordered_A()
            rows = self._a_rows if self._group_rows is None else \
                self._group_rows.clamp_min(1).reshape((-1,) + (1,) * (A.dim() - 1))  # whole or blocked A_e
            batch["A"] = A / rows
            if self._A_energy is not None:  # ε_t, normalized into A by fold (gnfx.layouts.position)
                batch["energy"] = self._A_energy * m
        if self._S is not None and "_S" not in self._stale:  # (stale: no gradient reached the block)
            batch["S"] = self._S * m
        for name, out, pending in (("diag", self._diag, self._per_example),
                                   ("eigen_diag", self._eigen_diag, self._eigen_per_example)):
            if out is not None:
                for per_example in pending.values():
                    out += per_example.square().sum(0)
                batch[name] = out * n
        if self._grad is not None:
            batch["grad"] = self._grad.clone()
        if "inverse_counts" in self.needs and n > 0 and m > 0:  # (none when the loss ignored every row)
            batch["inverse_counts"] = torch.tensor([1 / n, 1 / m], dtype=self.dtype, device=self.device)
        return batch

    def batch_shapes(self) -> dict[str, tuple]:
        """The shape of every statistic batch() may give for this block, whatever the batch: the same on
        every rank (under torch.distributed a rank whose batch lacks one adds zeros of this shape to
        the average over ranks, gnfx.distributed)."""
        shapes = {}
        if self._A is not None:
            d = self._A.shape[-1]
            bordered = self._A_sum is not None  # the bias's row and column added in _bordered_A
            shapes["A"] = tuple(self._A.shape[:-2]) + (d + 1, d + 1) if bordered else tuple(self._A.shape)
        if self._A_energy is not None:
            shapes["energy"] = tuple(self._A_energy.shape)
        for name in ("S", "diag", "eigen_diag", "grad"):
            buffer = getattr(self, "_" + name)
            if buffer is not None:
                shapes[name] = tuple(buffer.shape)
        if "inverse_counts" in self.needs:
            shapes["inverse_counts"] = (2,)
        return shapes

    @torch.no_grad()
    def fold(self, batch: dict[str, torch.Tensor], decay: float) -> None:
        """F ← β F + (1-β) F_batch for each statistic of the batch (the first batch sets F), A
        weighted by the energies first (`_energy_weighted`)."""
        for name, value in self._energy_weighted(batch).items():
            if name in self.values and decay > 0 and name not in LATEST:
                self.values[name].mul_(decay).add_(value, alpha=1 - decay)
            else:
                self.values[name] = value.clone()
        if batch:
            self.updates += 1
        self._reset()

    @staticmethod
    def _energy_weighted(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch with A = ε / Σ_t ε_t in place of the ids' frequencies and without ε, for a block whose
        A is weighted by energy (module doc; the frequencies stay where no gradient reached the block:
        Σ ε = 0). Normalized here, after the average over ranks, so that the ranks' energies are added
        before the shares are taken (gnfx.distributed)."""
        if "energy" not in batch:
            return batch
        batch = dict(batch)
        energy = batch.pop("energy")
        total = energy.sum()
        batch["A"] = torch.where(total > 0, energy / total.clamp_min(torch.finfo(total.dtype).tiny), batch["A"])
        return batch

    def _reset(self) -> None:
        self._stale = {"_A", "_S"}
        if self._dirty:  # (a step without statistics leaves them zero: nothing to clear)
            if self.layout.diagonal_A and self._A is not None:
                self._A.zero_()  # token counts are added, not multiplied
            if self._A_energy is not None:
                self._A_energy.zero_()
            for buf in (self._A_sum, self._group_rows, self._diag, self._eigen_diag, self._grad):
                if buf is not None:
                    buf.zero_()
            self._dirty = False
        self._per_example.clear()
        self._eigen_per_example.clear()
        self._a_rows = 0
        self._examples.clear()
        self._staged.clear()
        self._pooled.clear()
        self._whole_batch.clear()
        self._aliases.clear()
        self._left_to_alias.clear()

    @property
    def recorded(self) -> bool:
        """Whether a backward reached the block's taps since the last reset: its statistics hold this step's rows."""
        return self._dirty

    def discard_backwards(self) -> None:
        """Drop what the backwards since the last fold accumulated, whose gradients `zero_grad()` cleared
        (gnfx.optimizer); the layer inputs staged by forwards that no backward has reached yet stay. Nothing
        to drop (no backward reached the block since: `_dirty` unset), as after a step, costs nothing."""
        if not self._dirty:
            return
        staged = dict(self._staged)
        self._reset()
        self._staged.update(staged)

    def to(self, dtype: torch.dtype, device: torch.device) -> None:
        """Move the accumulators and the averaged statistics (floating ones in `dtype`)."""
        move = lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)  # noqa: E731
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, move(value))
            elif isinstance(value, dict):
                value.update({k: move(v) for k, v in value.items() if isinstance(v, torch.Tensor)})
        self.dtype, self.device = dtype, device

    def state_dict(self) -> dict:
        return {"values": dict(self.values), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint's statistics, in this block's dtype and on its device (those of a model that
        was saved in float32 or on another device included)."""
        self.values = {k: v.to(device=self.device, dtype=self.dtype, copy=True) for k, v in state["values"].items()}
        self.updates = int(state["updates"])


class StatisticsStore:
    """The statistics of every block, by block name; `forward_id` numbers instrumented forwards."""

    def __init__(self, blocks, needs_of, kfac_approx: str, param_of, fisher: str = "empirical", live_param=None):
        if fisher == "type2" and any("grad" in needs_of(b) for b in blocks):
            raise ConfigError("the statistic 'grad' (rank1's sketch vector) is one sample of the Fisher's square "
                              "root per statistic step, and fisher='type2' backpropagates one vector per output "
                              "instead: pass fisher='mc' (or 'empirical')")
        self.fisher = fisher
        self.pending: list = []  # block outputs awaiting the true-Fisher backward (gnfx.fisher)
        # the trained parameters of the blocks the current forward tapped (gnfx.taps), by which its output's
        # hook tells a backward that fills their gradients from one that does not (gnfx.filled_gradients)
        self.trained: list = []
        # a parameter's name -> the tensor the model's forward uses now (FSDP2's unsharded copy in a forward)
        self._live_param = live_param or param_of
        self.blocks = {}
        self._param_of = param_of
        for b in blocks:
            needs = needs_of(b)
            if needs:
                self.blocks[b.name] = BlockStatistics(b, self, needs, kfac_approx, *self._placement(b))
        self.forward_id = 0
        self.terms_per_example: dict[int, int] = {}  # forward id -> loss terms T per example
        self.batch_size: dict[int, int] = {}  # forward id -> examples N (the model output's first dim)
        # forward id -> N of the first block the backward reached whose input tells it, where the forward's
        # output gives none (examples_without_output)
        self.head_examples: dict[int, int] = {}
        self.kept_fraction: dict[int, float] = {}  # forward id -> share of output rows the loss counts
        # (loss, z, gradient at z, dense) of the checks the backward left to the step (gnfx.output_watch)
        self.output_checks: list[tuple] = []
        # (autograd's id of the last backward that reached a forward's output, that forward's id), and whether one
        # backward reaching two forwards was told (gnfx.output_watch.note_backward)
        self.last_reached: tuple[int, int] = (-1, -1)
        self.shared_backward_told = False
        self.graph_backward_told = False  # gnfx.filled_gradients.tell_a_graph_backward, once

    def _placement(self, block) -> tuple[torch.dtype, torch.device]:
        """The dtype (float64 for a float64 weight, else float32) and device of a block's statistics."""
        w = self._param_of(block.weight)
        return torch.float64 if w.dtype == torch.float64 else torch.float32, w.device

    def follow_parameters(self) -> None:
        """Move each block's statistics to its weight's device and dtype rule (the model was moved
        with .to(), .cuda() or .double() after gnfx.compile)."""
        for stats in self.blocks.values():
            dtype, device = self._placement(stats.block)
            if (dtype, device) != (stats.dtype, stats.device):
                stats.to(dtype, device)

    def trained_leaves(self, block) -> list[torch.Tensor]:
        """The parameters of `block` (its weight, or the parameter its weight is computed from, and its
        bias) that require gradients now, as the model's forward uses them: FSDP2's unsharded copies, the
        leaf tensors torch.func.functional_call put in their place; of a view (an opened layer's twin holds
        views of its parameters, gnfx.opened_leaf, and the graph reads the parameters), the tensor viewed.
        In place of a computed tensor (functional_call's or learn2learn's fast weights θ - α∇θ, a clone of
        θ), the model's parameter θ: a backward fills the block's gradient when it accumulates into θ.grad,
        which `torch.autograd.grad(loss, fast_weights)` (MAML's inner gradient) does not, though it runs
        through the fast weights' own nodes (gnfx.filled_gradients)."""
        names = (block.weight, block.bias) if block.bias is not None else (block.weight,)
        live = [(name, p._base if p._is_view() and p._base.requires_grad else p)
                for name, p in zip(names, map(self._live_param, names))]
        return [p if p.is_leaf else self._param_of(name) for name, p in live if p.requires_grad]

    def discard_backwards(self) -> None:
        """Drop the statistics the backwards since the last step accumulated (see
        BlockStatistics.discard_backwards)."""
        for stats in self.blocks.values():
            stats.discard_backwards()

    def examples_without_output(self, forward_id: int, stats: BlockStatistics, own: int) -> int:
        """N of forward `forward_id`, whose model output gives none, for the block `stats` at its first commit
        (module doc), `own` the N of its first call's input: the N its inputs tell (`told_examples`; the
        first such block the backward reaches sets the forward's `head_examples`) if not one example, else
        the head's; before any, one example, or for inputs that cannot tell the N that most blocks' staged
        inputs tell (none has committed: each still holds its inputs), with none or a tie (warned) `own`."""
        n = stats.told_examples(forward_id)
        if n is not None and n != 1:
            self.head_examples.setdefault(forward_id, n)
            return n
        if forward_id in self.head_examples or n == 1:  # (one example: read by every example of the head's)
            return self.head_examples.get(forward_id, 1)
        counted = Counter(n for n in (other.told_examples(forward_id) for other in self.blocks.values())
                          if n is not None).most_common(2)
        if counted and (len(counted) == 1 or counted[0][1] > counted[1][1]):
            return counted[0][0]
        if counted and not stats._warned:
            stats._warned = True
            tied = " and ".join(str(n) for n in sorted(dict(counted)))
            warnings.warn(
                f"block {stats.block.name!r}: its inputs do not tell the batch (a column of ids, a routed layer's "
                f"sorted tokens, or calls of different first dimensions), the model output gives none (a loss "
                f"returned by the model or a method), the backward reached it before any block whose inputs do, "
                f"and these count {tied} examples as often: it counts its own {own}, so its S = M Σ g gᵀ may be "
                f"on another scale than theirs. Fix: return the logits (the loss computed outside), or pass the "
                f"ids batch-first, (N, R)", RuntimeWarning, stacklevel=5)
        return own

    def warn_sequence_first(self, model: torch.nn.Module) -> None:
        """Warn when `model` has sequence-first submodules (batch_first=False: nn.MultiheadAttention,
        the nn.Transformer layers, recurrent layers) and some block needs per-example statistics: the
        examples are read from a layer input's first dimension (N, that of the model output), so a
        (T, N, d) input is taken whole-batch with a warning when T ≠ N, and cannot be told from a
        batch-first one when T = N (its per-example statistics would then mix the examples)."""
        sequence_first = [name for name, m in model.named_modules() if getattr(m, "batch_first", None) is False]
        per_example = [name for name, stats in self.blocks.items() if stats.per_example]
        if sequence_first and per_example:
            warnings.warn(
                f"gnfx reads each layer input's batch from its first dimension, and {sequence_first[0]!r} "
                f"({type(model.get_submodule(sequence_first[0])).__name__}) is sequence-first (batch_first=False"
                f"{f', as are {len(sequence_first) - 1} more' if len(sequence_first) > 1 else ''}): the "
                f"per-example statistics of blocks such as {per_example[0]!r} (diag, rank1, ekfac, "
                f"kfac_approx='reduce') are exact only for batch-first inputs; a sequence-first input is "
                f"taken as one example with a warning when its length differs from the batch size and "
                f"cannot be told apart when they are equal. Fix: construct these modules with "
                f"batch_first=True (and feed (N, T, d) inputs)", RuntimeWarning, stacklevel=3)

    def discard_forward(self) -> None:
        """Forget what the taps recorded in the current forward, which stopped before it returned (a graph
        specialized to the other side of a branch, gnfx.variants): its staged layer inputs and the block
        outputs it left for the true-Fisher backward."""
        for stats in self.blocks.values():
            stats._staged.pop(self.forward_id, None)
        self.pending = [entry for entry in self.pending if entry[3] != self.forward_id]
        self.trained = []

    def __bool__(self) -> bool:
        return bool(self.blocks)

    def __getitem__(self, name: str) -> BlockStatistics:
        return self.blocks[name]

    def examples(self) -> dict[str, int]:
        """The examples N each block saw on this step."""
        return {name: sum(stats._examples.values()) for name, stats in self.blocks.items()}

    def batches(self) -> dict[str, dict[str, torch.Tensor]]:
        """This step's statistics of every block, by block name."""
        return {name: stats.batch() for name, stats in self.blocks.items()}

    def unscaled(self, batches: dict, scale: torch.Tensor) -> dict:
        """`batches` (of `batches()`, divided in place) of a backward of the loss scaled by `scale`, s (a tensor
        of one entry, torch.amp.GradScaler's): each statistic divided by s to its `OUTPUT_GRADIENT_POWER`; with
        a true Fisher none (module doc)."""
        if self.fisher != "empirical":
            return batches
        inverse = scale.reshape(()).double().reciprocal()
        for batch in batches.values():
            for name, value in batch.items():
                if OUTPUT_GRADIENT_POWER[name]:
                    value.mul_((inverse ** OUTPUT_GRADIENT_POWER[name]).to(value))
        return batches

    def fold(self, batches: dict, decay: float) -> None:
        """Fold this step's statistics into the averages (see BlockStatistics.fold)."""
        for name, stats in self.blocks.items():
            stats.fold(batches.get(name, {}), decay)
        self.terms_per_example.clear()
        self.batch_size.clear()
        self.head_examples.clear()
        self.kept_fraction.clear()
        self.output_checks.clear()

    def discard(self) -> None:
        """Drop this step's accumulated statistics (a skipped step)."""
        self.fold({}, 0.0)

    def state_dict(self) -> dict:
        return {name: s.state_dict() for name, s in self.blocks.items()}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.blocks) ^ set(state)
        if missing:
            raise ValueError(f"the checkpoint's statistics do not match this model's blocks: "
                             f"{sorted(missing)} appear on one side only")
        for name, s in state.items():
            self.blocks[name].load_state_dict(s)
