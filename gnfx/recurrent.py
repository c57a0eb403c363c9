"""The recurrent layers (nn.LSTM, nn.GRU, nn.RNN) and their cells (nn.LSTMCell, nn.GRUCell,
nn.RNNCell) as explicit ops: the runtime of their lowering (gnfx.passes.recurrent).

One layer and direction of a recurrent module computes, for t = 1..T (docs/design.md §1 notation,
rows r = (example n, time t)),

    gx_t = W_ih x_t + b_ih          the input products, all t at once: one F.linear in the graph
    hp_t = W_hh h_{t-1} + b_hh      the hidden products, inside the scan (`recurrent_scan`)
    h_t, c_t = cell(gx_t, hp_t, h_{t-1}, c_{t-1})

with PyTorch's cells (gates of gx and hp in PyTorch's order):

    LSTM (i, f, g, o):  c_t = σ(f) ⊙ c_{t-1} + σ(i) ⊙ tanh(g),  h_t = σ(o) ⊙ tanh(c_t),
                        each gate the sum of its parts of gx_t and hp_t
    GRU (r, z, n):      r = σ(gx_r + hp_r), z = σ(gx_z + hp_z), n = tanh(gx_n + r ⊙ hp_n),
                        h_t = (1 - z) ⊙ n + z ⊙ h_{t-1}
    RNN:                h_t = tanh(gx_t + hp_t) (or relu)

Both products are linear blocks z = W a. W_ih's is an ordinary linear site over the (N, T, d_in)
inputs. W_hh's rows are a = h_{t-1} (h_0 included) and δ = ∂ℓ/∂hp_t, which for the GRU is the
gradient of the hidden product itself, not of the gate pre-activation (its n gate reads
r ⊙ hp_n). The scan makes both visible to the taps: it returns the rows h_{t-1} stacked as
(N, T, H), and it adds to each hp_t the slice t of an `offset` (N, T, G) of zeros that requires
gradients, so that ∂L/∂offset = ∂L/∂hp = g with the values unchanged (kfac-jax's auxiliary-input
trick). `hidden_product_site(h_prev, offset)` is the call site of W_hh's block in the graph: its
input is the a rows, its output is the offset, whose gradient the error tap records.

An LSTM with projections (proj_size P > 0) writes its state through one more product, of a weight
W_hr (P, H) without bias: the cell's output h̃_t = σ(o) ⊙ tanh(c_t) (H) becomes h_t = W_hr h̃_t (P),
the state W_hh reads (W_hh is (4H, P)) and the layer's output. W_hr is one more linear block over the
same rows: a = h̃_t and δ = ∂ℓ/∂h_t, by the same two means: the scan returns the rows h̃_t stacked
(N, T, H) and adds to each h_t the slice t of a second offset (N, T, P), so that ∂L/∂offset = ∂L/∂h;
`projection_site(h_tilde, offset)` is the call site of W_hr's block.

A reverse direction runs t = T..1 (its h_{t-1} is the state after step t+1); its rows stay in time
order. Every tensor of the scan is batch-major (N, T, ·), so that the rows of each example are the
first dimension's, whatever the module's batch_first.

On a PackedSequence (the forward packed it: flair's taggers, BiLSTM-CRF code) the rows are the packed
ones, r = (example n, step t) for the steps t < length_n only: gx = W_ih x over the packed data, and
`packed_scan` runs step t on the b_t examples still running (sorted longest first), so that no padded
step enters a block's statistics.

A cell module is one step, called by the model itself (typically once per time step, in a Python
loop): each call is `gx = F.linear(x, W_ih, b_ih)`, `hp = F.linear(h, W_hh, b_hh)` in the graph, two
ordinary linear sites over the rows (example n) of that call, then `cell_step`. A cell called T
times is a weight used at T sites, whose statistics pool the T calls' rows as a module called
several times does. `cell_inputs` and `cell_result` turn an unbatched call (vectors) into one
example and back, and an omitted hx into zeros, as torch's cells do.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from gnfx.errors import GnfxError


def cell_step(kind: str, gx: torch.Tensor, hp: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None):
    """(h_t, c_t) of one step of PyTorch's cell `kind`, the module's `mode` (LSTM, GRU, RNN_TANH or
    RNN_RELU; module docstring) from the input products gx and the hidden products hp; c is None but
    for an LSTM."""
    if kind == "LSTM":
        i, f, g, o = (gx + hp).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if kind == "GRU":
        x_r, x_z, x_n = gx.chunk(3, dim=-1)
        h_r, h_z, h_n = hp.chunk(3, dim=-1)
        r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return (1 - z) * n + z * h, None
    pre = gx + hp
    return (torch.tanh(pre) if kind == "RNN_TANH" else torch.relu(pre)), None


def hidden_offset(gx: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """The zeros added to the products of a scan, whose gradient is that of the products (module
    docstring): the rows of the input products gx with `size` columns, (N, T, size), gx's own G when
    None (the hidden products hp; an LSTM's projections h_t = W_hr h̃_t take P)."""
    return gx.new_zeros(*gx.shape[:-1], gx.shape[-1] if size is None else size, requires_grad=True)


def _step(kind: str, gx_t: torch.Tensor, hp_t: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None,
          w_hr: torch.Tensor | None, projection_offset_t: torch.Tensor | None):
    """(h_t, c_t, h̃_t) of one step: `cell_step`, and for an LSTM with projections (w_hr given) its output
    h̃_t projected, h_t = h̃_t W_hrᵀ + projection_offset_t (module docstring); h̃_t is h_t without."""
    h_t, c_t = cell_step(kind, gx_t, hp_t, h, c)
    if w_hr is None:
        return h_t, c_t, h_t
    return F.linear(h_t, w_hr) + projection_offset_t, c_t, h_t


def recurrent_scan(gx: torch.Tensor, offset: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor | None,
                   h0: torch.Tensor, c0: torch.Tensor | None, kind: str, reverse: bool,
                   w_hr: torch.Tensor | None = None, projection_offset: torch.Tensor | None = None):
    """One layer and direction over the whole sequence: (outputs h_t (N, T, P) in time order, the rows
    h_{t-1} (N, T, P), h_T, c_T (None but for an LSTM), the rows h̃_t (N, T, H), None without w_hr), from
    the input products gx (N, T, G) and the initial states h0 (N, P), c0 (N, H), with hp_t = h_{t-1} W_hhᵀ
    + b_hh + offset_t and, given W_hr, h_t = h̃_t W_hrᵀ + projection_offset_t (module docstring; P = H
    without projections)."""
    # the steps' slices by one unbind each: its backward stacks their gradients once, where indexing
    # gx[:, t] would write each step's into a zero tensor of the whole sequence
    inputs, offsets = gx.unbind(1), offset.unbind(1)
    steps = len(inputs)
    projection_offsets = [None] * steps if w_hr is None else projection_offset.unbind(1)
    outputs, previous, cell_outputs = [None] * steps, [None] * steps, [None] * steps
    h, c = h0, c0
    for t in (range(steps - 1, -1, -1) if reverse else range(steps)):
        previous[t] = h
        h, c, cell_outputs[t] = _step(kind, inputs[t], F.linear(h, w_hh, b_hh) + offsets[t], h, c, w_hr,
                                      projection_offsets[t])
        outputs[t] = h
    return (torch.stack(outputs, 1), torch.stack(previous, 1), h, c,
            None if w_hr is None else torch.stack(cell_outputs, 1))


# the site inputs of calls on a PackedSequence (`is_packed_rows`), by id
_PACKED_ROWS: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()


def _packed(rows: torch.Tensor) -> torch.Tensor:
    """`rows`, noted as rows of a PackedSequence's steps (`is_packed_rows`)."""
    _PACKED_ROWS[id(rows)] = rows
    return rows


def packed_scan(gx: torch.Tensor, offset: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor | None,
                batch_sizes: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor | None, kind: str, reverse: bool,
                w_hr: torch.Tensor | None = None, projection_offset: torch.Tensor | None = None):
    """`recurrent_scan` on a PackedSequence's rows: gx and offset (Σ_t b_t, G) (and projection_offset
    (Σ_t b_t, P)) hold, for each step t in time order, the rows of the b_t examples (sorted by length,
    longest first) still running at t; h0 (N, P), c0 (N, H) in that order. Step t updates the first b_t
    states and keeps the others, so that a forward direction's example keeps its state after its last step
    and a reverse direction's starts from h0 at its own last step. Returns (outputs h_t (Σ b_t, P) and the
    rows h_{t-1} (Σ b_t, P), both packed as gx, h_T, c_T (N, ·): each example's state after its last
    step, reverse: after t = 1; the rows h̃_t (Σ b_t, H) packed as gx, None without w_hr); the rows h_{t-1} and
    h̃_t, sites' inputs, noted packed (`is_packed_rows`)."""
    sizes = batch_sizes.tolist()
    inputs, offsets = gx.split(sizes), offset.split(sizes)
    projection_offsets = [None] * len(sizes) if w_hr is None else projection_offset.split(sizes)
    outputs, previous, cell_outputs = [None] * len(sizes), [None] * len(sizes), [None] * len(sizes)
    h, c = h0, c0
    for t in (range(len(sizes) - 1, -1, -1) if reverse else range(len(sizes))):
        b = sizes[t]
        previous[t] = h[:b]
        h_t, c_t, cell_outputs[t] = _step(kind, inputs[t], F.linear(h[:b], w_hh, b_hh) + offsets[t], h[:b],
                                          None if c is None else c[:b], w_hr, projection_offsets[t])
        outputs[t] = h_t
        h = torch.cat([h_t, h[b:]])
        c = None if c is None else torch.cat([c_t, c[b:]])
    return (torch.cat(outputs), _packed(torch.cat(previous)), h, c,
            None if w_hr is None else _packed(torch.cat(cell_outputs)))


def packed_initial_state(packed, hx, part: int, count: int, size: int) -> torch.Tensor:
    """`initial_state` of a module called on the PackedSequence `packed`: (count, N, size), its examples in
    the packing's sorted order (as the module permutes hx by `sorted_indices`)."""
    state = hx[part] if isinstance(hx, (tuple, list)) else hx
    if state is None:
        return packed.data.new_zeros(count, int(packed.batch_sizes[0]), size)
    return state if packed.sorted_indices is None else state.index_select(1, packed.sorted_indices)


def packed_result(packed, output: torch.Tensor, h_n: torch.Tensor, c_n: torch.Tensor | None, flat: bool = False):
    """`recurrent_result` of a call on the PackedSequence `packed`: the output rows (Σ b_t, D·H) packed as
    its input, and h_n, c_n (L·D, N, H) back in the examples' given order (`unsorted_indices`)."""
    output = nn.utils.rnn.PackedSequence(output, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
    if packed.unsorted_indices is not None:
        h_n = h_n.index_select(1, packed.unsorted_indices)
        c_n = None if c_n is None else c_n.index_select(1, packed.unsorted_indices)
    if c_n is None:
        return output, h_n
    return (output, h_n, c_n) if flat else (output, (h_n, c_n))


def input_rows(input, batch_first: bool, module: str) -> torch.Tensor:
    """The rows the input products read: a PackedSequence's packed data (Σ_t b_t, d), else the batch-major
    input (`batch_major`)."""
    if not isinstance(input, nn.utils.rnn.PackedSequence):
        return batch_major(input, batch_first, module)
    return input.data


def first_state(input, x: torch.Tensor, hx, part: int, count: int, size: int) -> torch.Tensor:
    """`initial_state`, or `packed_initial_state` when the module's input is a PackedSequence; x: `input_rows`."""
    if isinstance(input, nn.utils.rnn.PackedSequence):
        return packed_initial_state(input, hx, part, count, size)
    return initial_state(x, hx, part, count, size)


def scan_rows(gx: torch.Tensor, offset: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor | None,
              h0: torch.Tensor, c0: torch.Tensor | None, kind: str, reverse: bool, input,
              w_hr: torch.Tensor | None = None, projection_offset: torch.Tensor | None = None):
    """`recurrent_scan`, or `packed_scan` when the module's input is a PackedSequence (its batch sizes)."""
    if isinstance(input, nn.utils.rnn.PackedSequence):
        return packed_scan(gx, offset, w_hh, b_hh, input.batch_sizes, h0, c0, kind, reverse, w_hr, projection_offset)
    return recurrent_scan(gx, offset, w_hh, b_hh, h0, c0, kind, reverse, w_hr, projection_offset)


def recurrent_output(input, batch_first: bool, output: torch.Tensor, h_n: torch.Tensor, c_n: torch.Tensor | None,
                     flat: bool = False):
    """`recurrent_result`, or `packed_result` when the module's input is a PackedSequence."""
    if isinstance(input, nn.utils.rnn.PackedSequence):
        return packed_result(input, output, h_n, c_n, flat)
    return recurrent_result(input, batch_first, output, h_n, c_n, flat)


def site_rows(rows: torch.Tensor, input) -> torch.Tensor:
    """`rows`, the input x of a layer's input products, noted as packed rows where the module's `input` is a
    PackedSequence (`is_packed_rows`)."""
    return _packed(rows) if isinstance(input, nn.utils.rnn.PackedSequence) else rows


def is_packed_rows(a) -> bool:
    """Whether `a` is the input of a site of a recurrent module called on a PackedSequence: the layer's input x
    (`site_rows`) or the rows h_{t-1}, h̃_t of `packed_scan`. Their first dimension Σ_t b_t counts the examples'
    steps, not the examples: a model returning its loss (no output to give N) takes the head's N for them
    (gnfx.statistics), that of the loss's M = N terms."""
    return _PACKED_ROWS.get(id(a)) is a


def hidden_product_site(h_prev: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The call site of a W_hh block: input the rows h_{t-1} (N, T, H), output the offset whose
    gradient is δ = ∂L/∂hp (module docstring). Returns `offset` itself, on which the error tap hooks."""
    return offset


def projection_site(h_tilde: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The call site of an LSTM's W_hr block: input the rows h̃_t (N, T, H), output the offset whose
    gradient is δ = ∂L/∂h_t (module docstring). Returns `offset` itself, on which the error tap hooks."""
    return offset


def batch_major(x, batch_first: bool, module: str) -> torch.Tensor:
    """A recurrent module's input as (N, T, d): transposed when sequence-first, an unbatched (T, d)
    as one example. A PackedSequence that the graph did not pack raises (a packing in the graph is lowered
    by `packed_scan`)."""
    if not isinstance(x, torch.Tensor):
        raise GnfxError(f"the recurrent module {module!r} received a {type(x).__name__}, and gnfx lowered it for "
                        f"tensor inputs and PackedSequences packed in the forward only. Fix: pass leaf_modules=[{module!r}] to "
                        f"gnfx.compile to keep it opaque (its parameters then take the diagonal preconditioner)")
    if x.dim() == 2:
        return x.unsqueeze(0)
    return x if batch_first else x.transpose(0, 1)


def initial_state(x: torch.Tensor, hx, part: int, count: int, size: int) -> torch.Tensor:
    """The initial states (count, N, size) of every layer and direction from the module's `hx`: a
    tensor h0, or the pair (h0, c0) of an LSTM, of which `part` (0: h0, 1: c0); an unbatched
    (count, size) as one example; zeros when hx is None. x: the batch-major input (N, T, d)."""
    state = hx[part] if isinstance(hx, (tuple, list)) else hx
    if state is None:
        return x.new_zeros(count, x.shape[0], size)
    return state.unsqueeze(1) if state.dim() == 2 else state


def between_layers_dropout(x: torch.Tensor, p: float, input) -> torch.Tensor:
    """Dropout (training) between layers, drawn on the tensor on which ATen's recurrent kernels on a CPU
    (its own and oneDNN's) draw theirs, so that the same random state gives the same masks (a replay of
    the training forward through the module, gnfx.random_state): for the batch-major x (N, T, D·H) its
    time-major contiguous copy (T, N, D·H); when the module's input is a PackedSequence, x's packed rows
    (Σ_t b_t, D·H) themselves, the data ATen's packed kernels draw on. cuDNN keeps its own dropout state:
    on a GPU the masks differ from the module's."""
    if isinstance(input, nn.utils.rnn.PackedSequence):
        return F.dropout(x, p, training=True)
    return F.dropout(x.transpose(0, 1).contiguous(), p, training=True).transpose(0, 1)


def recurrent_result(input, batch_first: bool, output: torch.Tensor, h_n: torch.Tensor,
                     c_n: torch.Tensor | None, flat: bool = False):
    """What the module returns, in its layout: (output, h_n) or, for an LSTM, (output, (h_n, c_n))
    (`flat`: as the aten op, (output, h_n, c_n)); output batch-major (N, T, D·H) and h_n, c_n
    (L·D, N, H) as computed, turned back to the input's layout (sequence-first, unbatched) with torch's
    strides: output time-major in memory, (T, N, D·H) contiguous, and for batch_first that tensor
    transposed, as ATen's kernels return it. A dropout after the module draws its mask in memory order,
    so that only with these strides does the same random state give the module's mask (and code after a
    sequence-first module may `.view` its output)."""
    if input.dim() == 2:
        output, h_n = output.squeeze(0), h_n.squeeze(1)
        c_n = None if c_n is None else c_n.squeeze(1)
    else:
        output = output.transpose(0, 1).contiguous()
        output = output.transpose(0, 1) if batch_first else output
    if c_n is None:
        return output, h_n
    return (output, h_n, c_n) if flat else (output, (h_n, c_n))


def cell_inputs(name: str, input: torch.Tensor, hx, hidden: int, lstm: bool):
    """(x (N, d), h (N, H), c (N, H), None but for an LSTM) of one call of the cell module `name` on
    (input, hx), hx None, h or an LSTM's pair (h, c): an unbatched call's vectors as one example, and
    the states zeros of the input's dtype and device when hx is None, as torch's cells take them.
    Ranks the cells reject (an input not 1-D or 2-D, states of another rank) raise a ValueError."""
    h, c = (None, None) if hx is None else hx if lstm else (hx, None)
    ranks = [s.dim() for s in (h, c) if s is not None]
    if input.dim() not in (1, 2) or any(rank != input.dim() for rank in ranks):
        raise ValueError(f"{name}: expected a 1-D (unbatched) or 2-D input and states of its rank, got an input of "
                         f"{input.dim()} dimensions and states of {ranks}")
    x = input.unsqueeze(0) if input.dim() == 1 else input

    def batched(state):
        return x.new_zeros(x.shape[0], hidden) if state is None else state.unsqueeze(0) if state.dim() == 1 else state

    return x, batched(h), batched(c) if lstm else None


def cell_result(input: torch.Tensor, state: tuple):
    """What a cell module returns from the (h, c) of `cell_step`: h, or an LSTM's (h, c), as vectors
    when the call was unbatched (its input 1-D)."""
    h, c = (s.squeeze(0) if s is not None and input.dim() == 1 else s for s in state)
    return h if c is None else (h, c)
