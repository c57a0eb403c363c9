"""Operations computed through plain differentiable ops where torch's own form cannot be captured or
differentiated in forward mode, with the same values, and the form a replay of the training forward
computes where that forward updated state in place (spectral norm).

- Reentrant activation checkpointing, `torch.utils.checkpoint.checkpoint(fn, *args,
  use_reentrant=True)` (Hugging Face's `gradient_checkpointing_enable` passes use_reentrant through):
  its `CheckpointFunction` runs `fn` under torch.no_grad() and recomputes it in backward.
  torch.export records that forward as a no-grad region, so the captured graph computed the
  checkpointed blocks without gradients (their parameters untrained, a loss that does not require
  grad); forward mode has no derivative of it (an autograd.Function without jvp). Inside
  `inlined_checkpoints()` the checkpoint calls `fn(*args)` itself: y = fn(x) exactly, the values
  and derivatives of the model without checkpointing, which is what the checkpointed model computes
  (it trades memory for a second forward, not values). The non-reentrant form needs nothing:
  torch.export and forward mode go through it.
- Weight normalization, `nn.utils.parametrizations.weight_norm` and the older `nn.utils.weight_norm`:
  both compute w = g · v / ‖v‖ (the norm over every dimension but `dim`) by torch._weight_norm,
  whose fused kernel `_weight_norm_interface` has no forward-mode derivative. Inside
  `composite_weight_norm()` torch._weight_norm is that formula written out, v * (g /
  torch.norm_except_dim(v, 2, dim)), as ATen itself computes it where the fused kernel does not
  apply: the same w, differentiable in both modes.
- Spectral normalization, `nn.utils.parametrizations.spectral_norm` and the older
  `nn.utils.spectral_norm`: W_sn = W / σ, σ = uᵀ W v. In training mode each forward first runs the
  power iteration, u ← normalize(W v), v ← normalize(Wᵀu) (the old API v first), under no_grad and
  written in place into the u, v buffers (`out=`, which forward mode does not support), then σ from
  the updated u, v; in eval mode it takes σ from u, v as stored. A replay of the training forward (the
  quadratic step's forward-mode passes and its forward at θ + s) runs after that forward, whose u, v
  are the stored ones: inside `stored_singular_vectors()` the power iteration is off (the
  parametrization's module in eval mode, the old API's pre-hook called with do_power_iteration=False),
  so a replay computes W / (uᵀ W v) with the u, v the training forward used, the same function of W
  whose derivative (u, v constants, as under no_grad) the training forward's backward took, and
  leaves u, v where that forward put them. gnfx.ggn's products take the same function: the model
  with its stored u, v (as in eval mode; a next training forward would first advance them). The
  closure of `step(closure)`, called again for L(θ + s), is the user's forward, not a replay: it runs
  the power iteration as every training forward does.
- The renormalization of an embedding with `max_norm` (nn.Embedding's, nn.EmbeddingBag's,
  F.embedding's): each forward first scales, in place and under no_grad, the rows of W that its ids read
  to p-norm at most max_norm (`torch.embedding_renorm_`, passes/embedding_renorm.py), then looks them up.
  Eager training renormalizes in the user's forward calls only; a replay of the training forward (the
  quadratic step's forward-mode passes at θ and its forward at θ + s, gnfx.ggn's products) is no such
  call. Inside `rows_as_stored()` the renormalization leaves W as it is: at θ the rows the ids read are
  those the training forward renormalized (a second renormalization would not move them), so a replay
  computes the same function of W whose derivative that forward's backward took; at θ + s it computes
  the loss of the lookup of θ + s as the step left it, and writes nothing into the parameter (the next
  training forward renormalizes it, as eager training's does). The closure of `step(closure)` is the
  user's forward and renormalizes.
- Packing a padded batch, `nn.utils.rnn.pack_padded_sequence` (and `pack_sequence`, which calls it):
  its kernel `torch._VF._pack_padded_sequence(x, lengths, batch_first)` has no forward-mode
  derivative. It is a gather: with the lengths sorted decreasing (the caller sorts), the batch sizes
  b_t = #{n : lengths_n > t} and the packed rows the first b_t examples of each time step t, in order
  of t. Inside `composite_packing()` it is that gather written out with indexing and torch.cat (the same
  values, differentiable in both modes); the recurrent kernels on packed rows and
  `pad_packed_sequence` have their derivatives.
- Grouped matrix products, `torch._grouped_mm(A, B, offs=...)` (torch.nn.functional.grouped_mm calls it;
  Hugging Face's mixture-of-experts layers, Mixtral's, multiply each expert's tokens by its weights
  with it): the kernel has no forward-mode derivative. For a 2-D A of rows sorted by group, a 3-D B
  (G, K, N) and the groups' cumulative row ends `offs`, it is rows [offs_{g-1}, offs_g) of A times
  B_g; inside `composite_grouped_mm()` that is written out with indexing and torch.cat (rows after
  offs_{G-1}, which the kernel leaves unwritten, are 0); a 3-D A (G, M, K) without offsets is A @ B.
  Other forms (offsets over K, a bias) call the kernel.
- Group normalization of a non-contiguous input, `F.group_norm` (nn.GroupNorm): torch's forward-mode
  formula of its kernel raises a view error ("view size is not compatible with input tensor's size and
  stride") on the strides of a permuted tensor: a channels_last image, or the (N, C, H, W) view
  `tokens.transpose(1, 2).reshape(...)` by which diffusers' attention blocks hand their output back to a
  ResNet block's GroupNorm (UNet2DModel's attention blocks, AutoencoderKL's mid block). Inside `composite_group_norm()` torch.group_norm takes such an input as a
  contiguous copy: the same values (x.contiguous() = x), and its derivatives in both modes.
- The LSTM and GRU cells, nn.LSTMCell and nn.GRUCell: their kernels `torch._VF.lstm_cell` and
  `gru_cell` run on a GPU the fused `_thnn_fused_lstm_cell` / `_thnn_fused_gru_cell`, which have no
  forward-mode derivative (on a CPU they are plain ops). Inside `composite_cells()` they are their
  products and PyTorch's cell written out (gnfx.recurrent.cell_step, as the lowered graph computes
  them): the same values, differentiable in both modes on every device.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as checkpoint_module
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm, _WeightNorm
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm
from torch.overrides import TorchFunctionMode

from gnfx.passes.custom_functions import jvps_of_forwards
from gnfx.recurrent import cell_step


class _InlineCheckpoint:
    """Stands for torch.utils.checkpoint.CheckpointFunction: `apply(fn, preserve_rng_state, *args)`
    is fn(*args) (module docstring)."""

    @staticmethod
    def apply(function, preserve_rng_state, *args):
        return function(*args)


@contextlib.contextmanager
def inlined_checkpoints():
    """Reentrant checkpoints call their function directly while inside (module docstring)."""
    saved = checkpoint_module.CheckpointFunction
    checkpoint_module.CheckpointFunction = _InlineCheckpoint
    try:
        yield
    finally:
        checkpoint_module.CheckpointFunction = saved


def _packed_rows(input: torch.Tensor, lengths: torch.Tensor, batch_first: bool):
    """torch._VF._pack_padded_sequence written out (module docstring): (packed rows, batch sizes)."""
    steps = input.transpose(0, 1) if batch_first else input
    batch_sizes = (lengths.unsqueeze(0) > torch.arange(int(lengths[0])).unsqueeze(1)).sum(1)
    return torch.cat([steps[t, :size] for t, size in enumerate(batch_sizes.tolist())]), batch_sizes


@contextlib.contextmanager
def _kernels_written_out(forms: dict, namespace=torch._VF):
    """The kernels `forms` (name: function) of `namespace` (torch._VF, or torch), which torch.nn calls
    them through, by those functions while inside: each an attribute of the namespace's own until the
    context exits (nested contexts too: the outer one's is put back; torch._VF's kernels are found
    through its lookup, which a deleted attribute falls back to)."""
    outer = {name: vars(namespace).get(name) for name in forms}
    for name, form in forms.items():
        setattr(namespace, name, form)
    try:
        yield
    finally:
        for name, form in outer.items():
            if form is None:
                delattr(namespace, name)
            else:
                setattr(namespace, name, form)


def composite_packing():
    """Packing by `_packed_rows` while inside (module docstring)."""
    return _kernels_written_out({"_pack_padded_sequence": _packed_rows})


def _lstm_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """torch._VF.lstm_cell written out (module docstring): (h', c') from hx = (h, c)."""
    h, c = hx
    return cell_step("LSTM", F.linear(input, w_ih, b_ih), F.linear(h, w_hh, b_hh), h, c)


def _gru_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """torch._VF.gru_cell written out (module docstring): h' from hx = h."""
    return cell_step("GRU", F.linear(input, w_ih, b_ih), F.linear(hx, w_hh, b_hh), hx, None)[0]


def composite_cells():
    """The LSTM and GRU cells by `_lstm_cell` and `_gru_cell` while inside (module docstring)."""
    return _kernels_written_out({"lstm_cell": _lstm_cell, "gru_cell": _gru_cell})


def _bag_reduction(weight: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor, scale_grad_by_freq: bool,
                   mode: int, sparse: bool, per_sample_weights: torch.Tensor | None = None,
                   include_last_offset: bool = False, padding_idx: int | None = None):
    """torch.embedding_bag written out (module docstring): (output, None, None, None); `mode` 0 sum,
    1 mean, 2 max, as F.embedding_bag passes it."""
    bags = offsets.numel() - 1 if include_last_offset else offsets.numel()
    starts = offsets[:bags]
    if bags and starts[0] != 0:
        raise RuntimeError(f"embedding_bag: offsets[0] has to be 0 (the first bag starts at the first index), "
                           f"got {int(starts[0])}")
    bag = torch.searchsorted(starts, torch.arange(indices.numel(), dtype=starts.dtype, device=starts.device),
                             right=True) - 1
    kept = bag >= 0  # every entry once there is a bag (offsets[0] = 0)
    if padding_idx is not None:
        kept &= indices != padding_idx % weight.size(0)
    kept = kept.nonzero().squeeze(1)
    bag = bag[kept]
    rows = weight.index_select(0, indices[kept])
    if per_sample_weights is not None:
        rows = rows * per_sample_weights.index_select(0, kept).unsqueeze(1)
    output = weight.new_zeros((bags, weight.size(1)))
    if mode == 2:
        output = output.scatter_reduce(0, bag.unsqueeze(1).expand_as(rows), rows, "amax", include_self=False)
    else:
        output = output.index_add(0, bag, rows)
    if mode == 1:
        output = output / torch.bincount(bag, minlength=bags).clamp(min=1).unsqueeze(1).to(output.dtype)
    return output, None, None, None


def composite_embedding_bag():
    """torch.embedding_bag as `_bag_reduction` while inside (module docstring)."""
    return _kernels_written_out({"embedding_bag": _bag_reduction}, torch)


def _stored_rows(weight: torch.Tensor, indices: torch.Tensor, max_norm: float, norm_type: float) -> torch.Tensor:
    """torch.embedding_renorm_ in a replay: W as it is (module docstring)."""
    return weight


def rows_as_stored():
    """torch.embedding_renorm_ as `_stored_rows` while inside (module docstring)."""
    return _kernels_written_out({"embedding_renorm_": _stored_rows}, torch)


_GROUPED_MM = torch._grouped_mm


def _grouped_products(mat_a, mat_b, offs=None, bias=None, out_dtype=None):
    """torch._grouped_mm written out (module docstring)."""
    if bias is not None or mat_b.dim() != 3 or (mat_a.dim(), offs is None) not in ((2, False), (3, True)):
        return _GROUPED_MM(mat_a, mat_b, offs=offs, bias=bias, out_dtype=out_dtype)
    if offs is None:
        out = mat_a @ mat_b
    else:
        ends = offs.tolist()
        rows = [mat_a[start:end] @ mat_b[g] for g, (start, end) in enumerate(zip([0] + ends[:-1], ends))]
        out = torch.cat(rows + [mat_a.new_zeros(mat_a.size(0) - ends[-1], mat_b.size(2))])
    return out if out_dtype is None else out.to(out_dtype)


_GROUP_NORM = torch.group_norm


def _group_norm_of_contiguous(input, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
    """torch.group_norm of `input` as a contiguous copy (module docstring)."""
    return _GROUP_NORM(input.contiguous(), num_groups, weight, bias, eps, cudnn_enabled)


def composite_group_norm():
    """torch.group_norm as `_group_norm_of_contiguous` while inside (module docstring)."""
    return _kernels_written_out({"group_norm": _group_norm_of_contiguous}, torch)


def composite_grouped_mm():
    """torch._grouped_mm as `_grouped_products` while inside (module docstring)."""
    return _kernels_written_out({"_grouped_mm": _grouped_products}, torch)


# the written-out forms of torch._VF's and torch's kernels (module docstring), by the kernel's name
VF_FORMS = {"_pack_padded_sequence": _packed_rows, "lstm_cell": _lstm_cell, "gru_cell": _gru_cell}
TORCH_FORMS = {"embedding_bag": _bag_reduction, "embedding_renorm_": _stored_rows, "_grouped_mm": _grouped_products,
               "group_norm": _group_norm_of_contiguous}


class _CompositeWeightNorm(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch._weight_norm:
            v, g, *rest = args
            dim = rest[0] if rest else kwargs.get("dim", 0)
            return v * (g / torch.norm_except_dim(v, 2, dim))
        return func(*args, **kwargs)


@contextlib.contextmanager
def composite_weight_norm():
    """torch._weight_norm computed as v * (g / ‖v‖) while inside (module docstring)."""
    with _CompositeWeightNorm():
        yield


def uses_weight_norm(module: torch.nn.Module) -> bool:
    """Whether a submodule of `module` is weight-normalized, by either API."""
    return any(isinstance(p, _WeightNorm) for m in module.modules() if parametrize.is_parametrized(m)
               for plist in m.parametrizations.values() for p in plist) or any(
        isinstance(hook, WeightNorm) for m in module.modules() for hook in m._forward_pre_hooks.values())


class _StoredVectorsHook:
    """The old API's SpectralNorm pre-hook as in eval mode: W / (uᵀ W v) with u, v as stored."""

    def __init__(self, hook: SpectralNorm):
        self.hook = hook

    def __call__(self, module, inputs):
        setattr(module, self.hook.name, self.hook.compute_weight(module, do_power_iteration=False))


def spectral_norms(module: torch.nn.Module) -> tuple:
    """The spectral normalizations of the submodules of `module`: each parametrization module
    (_SpectralNorm) and, of the old API, (submodule, key of its SpectralNorm pre-hook)."""
    parametrizations = [p for m in module.modules() if parametrize.is_parametrized(m)
                        for plist in m.parametrizations.values() for p in plist if isinstance(p, _SpectralNorm)]
    hooks = [(m, key) for m in module.modules() for key, hook in m._forward_pre_hooks.items()
             if isinstance(hook, SpectralNorm)]
    return tuple(parametrizations + hooks)


@contextlib.contextmanager
def stored_singular_vectors(norms: tuple):
    """Spectral norms (`spectral_norms` of the model) without their power iteration while inside
    (module docstring); the old API's normalized weight attribute is put back after."""
    parametrizations = [n for n in norms if isinstance(n, _SpectralNorm)]
    hooks = [n for n in norms if not isinstance(n, _SpectralNorm)]
    modes = [p.training for p in parametrizations]
    saved = [(m._forward_pre_hooks[key], getattr(m, m._forward_pre_hooks[key].name)) for m, key in hooks]
    try:
        for p in parametrizations:
            p.training = False
        for (m, key), (hook, _) in zip(hooks, saved):
            m._forward_pre_hooks[key] = _StoredVectorsHook(hook)
        yield
    finally:
        for p, mode in zip(parametrizations, modes):
            p.training = mode
        for (m, key), (hook, weight) in zip(hooks, saved):
            m._forward_pre_hooks[key] = hook
            setattr(m, hook.name, weight)


def written_out(weight_norm: bool, spectral: tuple = (), forward_mode: bool = True):
    """A context in which a module runs with the forms of this file: reentrant checkpoints inline, packing
    bags of embeddings, the LSTM and GRU cells and grouped matrix products written out, group norm of a
    contiguous input, embeddings' max_norm without renormalizing, custom autograd.Functions without jvp
    given the jvp of their forward's operations (gnfx.passes.custom_functions), with
    `weight_norm` (`uses_weight_norm` of the module, found once by the caller) weight normalization as
    its composite (only there: a TorchFunctionMode sees every torch call, which made a small GPT's
    forward 40% longer), and the spectral norms `spectral` (`spectral_norms` of the module, found once)
    without their power iteration. Without `forward_mode` (a replay no forward-mode pass differentiates: a
    finite difference, a loss) custom Functions keep what they have, which saves finding them at each call."""
    stack = contextlib.ExitStack()
    stack.enter_context(inlined_checkpoints())
    # the kernels of composite_packing and composite_cells (torch._VF), and of composite_embedding_bag,
    # rows_as_stored, composite_grouped_mm and composite_group_norm (torch), each namespace's in one context:
    # a replay runs this once per forward (1 + P of them per quadratic step)
    stack.enter_context(_kernels_written_out(VF_FORMS))
    stack.enter_context(_kernels_written_out(TORCH_FORMS, torch))
    if forward_mode:
        stack.enter_context(jvps_of_forwards())
    if weight_norm:
        stack.enter_context(composite_weight_norm())
    if spectral:
        stack.enter_context(stored_singular_vectors(spectral))
    return stack
