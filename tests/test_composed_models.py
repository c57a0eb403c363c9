"""Properties of composed models (hypothesis): networks nobody wrote by hand, made of several blocks in sequence.

A recipe (printed on failure; `Composed` builds its nn.Module) starts from an input of layout (B, D), (B, T, D),
(B, C, H, W), token ids (B, T) looked up by an nn.Embedding (padding_idx None, 0 or the last id) or token ids
(B, L) summed or averaged by an nn.EmbeddingBag (`Bag`: offsets, per-sample weights), chains 1-6 blocks, each valid for
the layout the previous one left (`draw_block`, `make`), and ends in a linear head on (B, D) or (B, T, D) (logits
(B, K) or (B, T, K)). The vocabulary: nn.Linear with or without bias, x Wᵀ + b from raw parameters (F.linear,
einsum, matmul), a layer called twice (tied), activations (relu, in-place relu, gelu, gelu-tanh, tanh, silu,
leaky relu), LayerNorm (with or without affine) / RMSNorm / GroupNorm / BatchNorm (with or without affine) /
InstanceNorm, dropout (nn.Dropout or F.dropout, p > 0, training mode), a residual x + s·f(x) whose scale s is a
keyword argument of the model's forward and of the block's, two branches concatenated or added, chunk / split of
the features then recombined or gated, slices of the tokens, a stop-gradient branch x + f(x).detach(),
Conv1d / Conv2d (kernel, stride, padding incl. "same", dilation, groups, bias), ConvTranspose1d / 2d (stride,
padding, output_padding, dilation, groups, bias), a Linear or Conv2d under a weight_norm, orthogonal or
spectral_norm parametrization, pooling (avg, max, adaptive avg and max), nn.MultiheadAttention (batch_first or
time-major, causal or additive float mask or none, key padding mask), nn.TransformerEncoderLayer (norm_first,
batch_first, masks), F.scaled_dot_product_attention on q, k, v projections or a hand-written softmax attention,
nn.GRU / nn.LSTM (batch_first or time-major, 1-2 layers, bidirectional or not, LSTM projections, on packed
sequences of drawn lengths), a class token and position table, and the layout changes between them (flatten, mean /
max / first token, tokens ↔ channels by transpose and permute, view, unsqueeze). The blocks sit in an
nn.Sequential, an nn.ModuleList or an nn.ModuleDict (branches in a ModuleDict, inner layers in a Sequential);
one block may be frozen (requires_grad False), a head on token ids may share the embedding's weight, and the
model returns the logits, a tuple (logits, features) or a dict.

Each recipe is compiled with a capture ("fx", "export", "auto") and an optimizer (kfac, ekfac, shampoo, rank1 or
"auto") with an lr, or with loss="cross_entropy" or "mse" (step "auto": kfac's quadratic step, the others' lr
step; or step="quadratic" for any), and checked, float64:

a. on a statistic step and on a plain step, the compiled model's outputs, parameter gradients and buffers
   (batch-norm running statistics) equal those of an eager copy of the same weights, dropout drawing the same
   numbers (torch.manual_seed before each forward), and so do the outputs in eval mode after the steps;
b. after those two steps every parameter is finite and every parameter that had a gradient moved (one above
   1e-8: a group norm of one channel averaged over its pixels has a γ gradient of rounding noise alone);
c. with an lr and the empirical Fisher, the factors A and S (kfac_approx "expand" or "reduce") of every
   nn.Linear block after the first statistic step (whose batch sets them, whatever stat_decay) equal the hook
   references of tests/references.py;
d. torch.compile(gnfx model) trains as the gnfx model does
   (`test_torch_compile_of_a_composed_model_trains_as_the_model_does`, a few examples: compiling costs seconds);
e. cast to float32 and compiled at the defaults (loss= and no lr: kfac's quadratic-model step), a model trained on
   one batch of its recipe lowers that batch's loss (`trained_at_defaults`; benchmarks/defaults_fuzz.py runs it
   for every optimizer over hundreds of recipes, and with --wide on recipes of `WIDE` sizes trained on fresh
   batches of a teacher's data, `teacher_data`, judged on a held-out set).

For a local search, `GNFX_FUZZ_EXAMPLES=300` runs more examples than CI's 25, and `GNFX_FUZZ_RANDOM=1` draws
new ones on each run instead of the derandomized sequence (a failure prints its @reproduce_failure blob).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import warnings

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrizations
from torch.nn.utils import rnn as rnn_utils

import gnfx
from models import causal_mask
from references import TOL, cross_entropy, hook_statistics
from steps import step_and_follow
import test_properties as properties

DTYPE = torch.float64
EXACT = dict(rtol=1e-10, atol=1e-12)
EXAMPLES = int(os.environ.get("GNFX_FUZZ_EXAMPLES", "25"))
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("GNFX_FUZZ_RANDOM"),
                    database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ACTIVATIONS = {"relu": nn.ReLU, "relu_": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU, "tanh": nn.Tanh,
               "silu": nn.SiLU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "leaky": lambda: nn.LeakyReLU(0.1)}

# ----------------------------------------------------------------------------- blocks


class Reshape(nn.Module):
    """A layout change, batch kept: `how` names it, `size` its target sizes where it needs them."""

    def __init__(self, how: str, size=()):
        super().__init__()
        self.how, self.size = how, tuple(size)

    def forward(self, x):
        return {
            "flatten": lambda: x.flatten(1),
            "mean_tokens": lambda: x.mean(1),
            "max_tokens": lambda: x.amax(1),
            "first_token": lambda: x[:, 0],
            "mean_pixels": lambda: x.mean((2, 3)),
            "view": lambda: x.view(x.shape[0], *self.size),
            "unsqueeze": lambda: x.unsqueeze(1),
            "pixels_as_tokens": lambda: x.flatten(2).transpose(1, 2),
            "permute_tokens": lambda: x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1]),
            "tokens_as_channels": lambda: x.transpose(1, 2).unsqueeze(-1),
        }[self.how]()


class Functional(nn.Module):
    """A torch.nn.functional call with keyword arguments (F.dropout's `training` from the module's mode)."""

    def __init__(self, f, **kwargs):
        super().__init__()
        self.f, self.kwargs = f, kwargs

    def forward(self, x):
        return self.f(x, training=self.training, **self.kwargs)


class ChannelsFirst(nn.Module):
    """f on (B, D, T) of tokens (B, T, D): a Conv1d, a channel norm or a pooling over the tokens."""

    def __init__(self, f: nn.Module):
        super().__init__()
        self.f = f

    def forward(self, x):
        return self.f(x.transpose(1, 2)).transpose(1, 2)


class ChannelsLast(nn.Module):
    """f on (B, H, W, C) of an image (B, C, H, W): a LayerNorm over the channels."""

    def __init__(self, f: nn.Module):
        super().__init__()
        self.f = f

    def forward(self, x):
        return self.f(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Residual(nn.Module):
    """x + scale·f(x); scale a keyword argument."""

    def __init__(self, f: nn.Module):
        super().__init__()
        self.f = f

    def forward(self, x, scale: float = 1.0):
        return x + scale * self.f(x)


class Branches(nn.Module):
    """Two branches of x in a ModuleDict, concatenated along the features (dim) or added."""

    def __init__(self, left: nn.Module, right: nn.Module, combine: str, dim: int):
        super().__init__()
        self.branches = nn.ModuleDict({"left": left, "right": right})
        self.combine, self.dim = combine, dim

    def forward(self, x):
        a, b = self.branches["left"](x), self.branches["right"](x)
        return torch.cat([a, b], self.dim) if self.combine == "cat" else a + b


class Parts(nn.Module):
    """x split along the features (dim) into two parts, chunk(2) or split(sizes); f maps the first, and the
    parts are concatenated again (cat) or f(first) is gated by the second (gate, equal sizes)."""

    def __init__(self, f: nn.Module, sizes, dim: int, how: str):
        super().__init__()
        self.f, self.sizes, self.dim, self.how = f, list(sizes), dim, how

    def forward(self, x):
        a, b = x.chunk(2, self.dim) if self.how == "chunk" else torch.split(x, self.sizes, self.dim)
        return torch.cat([self.f(a), b], self.dim) if self.how != "gate" else self.f(a) * torch.sigmoid(b)


class Attention(nn.Module):
    """Self-attention of tokens (B, T, D): nn.MultiheadAttention, or q, k, v, out projections around
    F.scaled_dot_product_attention. nn.MultiheadAttention may take a key padding mask (example b's keys from
    lengths[b] on masked, 1 ≤ lengths[b] ≤ T, one length per example) and an additive float mask −|i − j|/2
    instead of the causal one, and run time-major (batch_first False: tokens transposed to (T, B, D) and back)."""

    def __init__(self, d: int, heads: int, form: str, causal: bool, bias: bool, batch_first: bool = True,
                 lengths: tuple = (), float_mask: bool = False):
        super().__init__()
        self.heads, self.form, self.causal, self.lengths, self.float_mask = heads, form, causal, lengths, float_mask
        if form == "mha":
            self.mha = nn.MultiheadAttention(d, heads, bias=bias, batch_first=batch_first)
        else:
            self.q, self.k, self.v, self.out = (nn.Linear(d, d, bias=bias) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape
        if self.form == "mha":
            mask = distance_mask(x) if self.float_mask else causal_mask(x) if self.causal else None
            first = self.mha.batch_first
            z = x if first else x.transpose(0, 1)
            return self.mha(z, z, z, attn_mask=mask, key_padding_mask=padding_mask(x, self.lengths),
                            need_weights=False)[0].transpose(0, int(not first))
        split = lambda z: z.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        mixed = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)),
                                               is_causal=self.causal)
        return self.out(mixed.transpose(1, 2).reshape(b, t, d))


def padding_mask(x, lengths: tuple):
    """(B, T) bool, True at the padded keys of tokens x (B, T, D): example b's tokens from lengths[b] on (None
    without lengths, one an example)."""
    if not lengths:
        return None
    positions = torch.arange(x.shape[1], device=x.device)
    return positions >= torch.tensor(lengths, device=x.device)[:, None]


def distance_mask(x):
    """(T, T) float, −|i − j|/2: an additive attention bias favoring near tokens (an ALiBi-like mask)."""
    positions = torch.arange(x.shape[1], device=x.device, dtype=x.dtype)
    return -(positions[:, None] - positions[None, :]).abs() / 2


class EncoderLayer(nn.Module):
    """nn.TransformerEncoderLayer on tokens (B, T, D) (norm_first or not, batch_first or time-major by
    transpose), with a key padding mask from lengths and a causal mask where drawn."""

    def __init__(self, d: int, heads: int, ff: int, dropout: float, activation: str, norm_first: bool,
                 batch_first: bool, lengths: tuple, causal: bool):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(d, heads, ff, dropout, activation, batch_first=batch_first,
                                                norm_first=norm_first)
        self.lengths, self.causal = lengths, causal

    def forward(self, x):
        first = self.layer.self_attn.batch_first
        z = x if first else x.transpose(0, 1)
        out = self.layer(z, src_mask=causal_mask(x) if self.causal else None,
                         src_key_padding_mask=padding_mask(x, self.lengths), is_causal=self.causal)
        return out if first else out.transpose(0, 1)


class Recurrent(nn.Module):
    """The output sequence of an nn.GRU or nn.LSTM (batch_first, or time-major by transpose); with lengths, on
    the tokens packed by torch.nn.utils.rnn.pack_padded_sequence (example b's first lengths[b] tokens, not
    sorted) and padded back to T by pad_packed_sequence (zeros past the lengths)."""

    def __init__(self, kind: str, d: int, hidden: int, layers: int, bidirectional: bool, bias: bool, proj: int,
                 batch_first: bool = True, lengths: tuple = ()):
        super().__init__()
        projection = dict(proj_size=proj) if proj else {}
        self.rnn = {"gru": nn.GRU, "lstm": nn.LSTM}[kind](d, hidden, layers, bias=bias, batch_first=batch_first,
                                                          bidirectional=bidirectional, **projection)
        self.lengths = lengths

    def forward(self, x):
        first = self.rnn.batch_first
        z = x if first else x.transpose(0, 1)
        if not self.lengths:
            out = self.rnn(z)[0]
        else:
            packed = rnn_utils.pack_padded_sequence(z, torch.tensor(self.lengths), first,
                                                    enforce_sorted=False)
            out = rnn_utils.pad_packed_sequence(self.rnn(packed)[0], first, total_length=x.shape[1])[0]
        return out if first else out.transpose(0, 1)


class Reparametrized(nn.Module):
    """An nn.Linear or nn.Conv2d whose weight a torch.nn.utils.parametrizations function makes: weight_norm
    (W = g·v/‖v‖), orthogonal or spectral_norm (W/σ, σ by a power iteration in training mode)."""

    def __init__(self, layer: nn.Module, how: str):
        super().__init__()
        self.layer = getattr(parametrizations, how)(layer)

    def forward(self, x):
        return self.layer(x)


class Bag(nn.Module):
    """nn.EmbeddingBag of token ids (B, L) → (B, D), mode sum or mean, padding_idx or none: on the ids as they
    are (B bags of L), or on the flattened ids with `offsets` (bags of drawn sizes, empty ones too); in sum
    mode with per-sample weights (1 + id mod 3)/2 where drawn."""

    def __init__(self, n: int, d: int, mode: str, padding_idx, offsets: tuple, weighted: bool):
        super().__init__()
        self.bag = nn.EmbeddingBag(n, d, mode=mode, padding_idx=padding_idx)
        self.weighted = weighted
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.long) if offsets else None)

    def forward(self, x):
        ids = x if self.offsets is None else x.flatten()
        weights = (1 + ids % 3).to(self.bag.weight.dtype) / 2 if self.weighted else None
        return self.bag(ids, self.offsets, per_sample_weights=weights)


class ClassToken(nn.Module):
    """A learned token (1, 1, D) put before the tokens (B, T, D), and a learned position table (1, T + 1, D)
    added (a ViT's stem)."""

    def __init__(self, tokens: int, d: int):
        super().__init__()
        self.token = nn.Parameter(torch.randn(1, 1, d))
        self.position = nn.Parameter(torch.randn(1, tokens + 1, d))

    def forward(self, x):
        return torch.cat([self.token.expand(x.shape[0], -1, -1), x], 1) + self.position


class Detached(nn.Module):
    """x + f(x).detach(): f's output passes no gradient (a stop-gradient target), its parameters get none."""

    def __init__(self, f: nn.Module):
        super().__init__()
        self.f = f

    def forward(self, x):
        return x + self.f(x).detach()


class Tied(nn.Module):
    """One layer called twice: f(tanh(f(x)))."""

    def __init__(self, f: nn.Module):
        super().__init__()
        self.f = f

    def forward(self, x):
        return self.f(torch.tanh(self.f(x)))


class RawLinear(nn.Module):
    """x Wᵀ + b from parameters of the block's own, by F.linear, einsum or matmul."""

    def __init__(self, d_in: int, d_out: int, bias: bool, form: str):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in ** 0.5)
        self.bias = nn.Parameter(torch.randn(d_out)) if bias else None
        self.form = form

    def forward(self, x):
        if self.form == "functional":
            return F.linear(x, self.weight, self.bias)
        z = torch.einsum("...i,oi->...o", x, self.weight) if self.form == "einsum" else x @ self.weight.t()
        return z if self.bias is None else z + self.bias


class TokenParts(nn.Module):
    """f on the first k tokens of (B, T, D), the rest kept: slices concatenated along the tokens."""

    def __init__(self, f: nn.Module, k: int):
        super().__init__()
        self.f, self.k = f, k

    def forward(self, x):
        return torch.cat([self.f(x[:, :self.k]), x[:, self.k:]], 1)


class Softmax(nn.Module):
    """softmax(q kᵀ/√d (future masked)) v written out, one head, from an nn.Linear of q, k, v together; the mask
    from torch.ones(T, T), which torch.fx cannot trace (a traced size), as many models write it."""

    def __init__(self, d: int, causal: bool):
        super().__init__()
        self.qkv, self.causal = nn.Linear(d, 3 * d), causal

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        scores = q @ k.transpose(-2, -1) / x.shape[-1] ** 0.5
        if self.causal:
            t = x.shape[1]
            scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        return F.dropout(torch.softmax(scores, -1), 0.1, self.training) @ v


# ----------------------------------------------------------------------------- recipes


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A composed model and how it is compiled; `shape` is the input's per-example shape (the token count
    for "ids"), `blocks` the block specs in order (`make`), `head` the logit classes K."""
    input: str  # "flat", "seq", "img" or "ids"
    shape: tuple
    blocks: tuple
    head: int
    output: str  # "tensor", "tuple" or "dict"
    container: str  # "sequential", "list" or "dict"
    batch: int
    optimizer: str
    capture: str
    loss: str | None  # loss=, no lr: kfac's quadratic step, the others' lr step (rank1: the sampled Fisher)
    step: str  # "auto" or "quadratic" (with loss=)
    taps: bool  # statistics=("A", "S") asked for beside the optimizer's own
    approx: str  # kfac_approx
    tied_head: bool  # token ids in and out: the head's weight is the embedding's (a language model's tied weights)
    frozen: int | None  # the block whose parameters are frozen (requires_grad False; fine-tuning)
    seed: int
    embedding: tuple = ()  # ids: (padding_idx,); bag: Bag's (mode, padding_idx, offsets, weighted)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The ranges (lowest, highest) a recipe's sizes are drawn from. TINY, the default: models of a few features
    on batches of 2-3 examples, cheap enough for hundreds of float64 checks. WIDE: the widths (16-64), batches
    (16-64), vocabularies and classes of small realistic models (benchmarks/defaults_fuzz.py --wide)."""
    features: tuple = (2, 6)  # the input's features, and the widths of linear, branch and reparametrized blocks
    channels: tuple = (1, 6)  # a convolution's output channels (a multiple of its groups)
    hidden: tuple = (2, 4)  # a GRU's or LSTM's hidden size
    feedforward: tuple = (2, 8)  # an nn.TransformerEncoderLayer's dim_feedforward
    batch: tuple = (2, 3)
    tokens: tuple = (1, 3)
    image_channels: tuple = (1, 3)
    image_sides: tuple = (2, 5)
    vocabulary: tuple = (3, 6)  # the token ids of an embedding or a bag
    classes: tuple = (2, 4)  # the head's logits K (unless tied to the embedding)


TINY = Sizes()
WIDE = Sizes(features=(16, 64), channels=(16, 64), hidden=(16, 64), feedforward=(32, 128), batch=(16, 64),
             tokens=(1, 8), image_channels=(1, 3), image_sides=(2, 6), vocabulary=(16, 64), classes=(2, 10))


def divisors(n: int, most: int = 6) -> list[int]:
    return [k for k in range(1, min(n, most) + 1) if n % k == 0]


def conv_size(n: int, k: int, stride: int, padding, dilation: int) -> int:
    return n if padding == "same" else (n + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def draw_out_channels(draw, groups: int, sizes: Sizes) -> int:
    """A convolution's output channels: a multiple of its groups in sizes.channels (the groups where that holds
    none)."""
    low, high = sizes.channels
    return groups * draw(st.integers(max(1, low // groups), max(1, high // groups)))


def draw_conv(draw, channels: int, sizes: tuple, ranges: Sizes):
    """(c_out, kernel, stride, padding, groups, bias, dilation) of a convolution over `sizes` with an output of
    size ≥ 1 (padding "same": stride 1), c_out in ranges.channels."""
    padding, dilation = draw(st.sampled_from([0, 1, "same"])), draw(st.integers(1, 2))
    stride = 1 if padding == "same" else draw(st.integers(1, 2))
    reach = min(n + 2 * (padding if padding != "same" else 2) for n in sizes)
    kernel = draw(st.integers(1, max(1, min(3, (reach - 1) // dilation + 1))))
    groups = draw(st.sampled_from(divisors(channels, 3)))
    c_out = draw_out_channels(draw, groups, ranges)
    return c_out, kernel, stride, padding, groups, draw(st.booleans()), dilation


def conv_transpose_size(n: int, k: int, stride: int, padding: int, output_padding: int, dilation: int) -> int:
    return (n - 1) * stride - 2 * padding + dilation * (k - 1) + output_padding + 1


def draw_conv_transpose(draw, channels: int, sizes: tuple, ranges: Sizes):
    """(c_out, kernel, stride, padding, output_padding, groups, bias, dilation) of a transposed convolution over
    `sizes` with an output of size ≥ 1 (output_padding below the stride or the dilation; stride 2 only on sizes
    ≤ 6, so that a few in a row stay small), c_out in ranges.channels."""
    kernel, dilation = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    stride = draw(st.integers(1, 2 if max(sizes) <= 6 else 1))
    output_padding = draw(st.integers(0, max(stride, dilation) - 1))
    padding = draw(st.integers(0, 1))
    if min(conv_transpose_size(n, kernel, stride, padding, output_padding, dilation) for n in sizes) < 1:
        padding = 0
    groups = draw(st.sampled_from(divisors(channels, 3)))
    c_out = draw_out_channels(draw, groups, ranges)
    return c_out, kernel, stride, padding, output_padding, groups, draw(st.booleans()), dilation


def draw_lengths(draw, batch: int, tokens: int) -> tuple:
    """One sequence length in 1..T for each of `batch` examples (a key padding mask's or packing's), or ()."""
    return tuple(draw(st.integers(1, tokens)) for _ in range(batch)) if draw(st.booleans()) else ()


def draw_block(draw, layout: str, shape: tuple, after: str | None, trained: bool, batch: int,
               sizes: Sizes = TINY):
    """One block valid on `layout` (flat (D,), seq (T, D), img (C, H, W)) after a block of kind `after`, on an
    input computed from trainable parameters or not (`trained`), in a batch of `batch` (the lengths of masks and
    packed sequences), its widths in the ranges of `sizes`: (spec, its output layout and shape). An
    in-place ReLU only follows a layer or a norm, whose backward does not read the output it changes (after a
    ReLU, a tanh or an input it fails in eager PyTorch too).

    Excluded, a PyTorch bug: a group norm of an image (B, C, H, W) that no parameter computed. Its input may be
    channels-last (strides (HWC, 1, WC, C)), and F.group_norm's backward on CPU then crashes with a segmentation
    fault in torch 2.13 when the input needs no gradient (only γ, β do), in eager PyTorch as much as in gnfx:
    `F.group_norm(torch.randn(2, 5, 3, 2).permute(0, 3, 1, 2), 1, w, b).sum().backward()`, w and b
    requires_grad (benchmarks/results/first_contact_15_fuzz.md)."""
    in_place = after in ("linear", "raw_linear", "conv1d", "conv2d", "norm")
    activations = st.sampled_from([a for a in sorted(ACTIVATIONS) if in_place or a != "relu_"])
    features = shape[0] if layout == "img" else shape[-1]
    width = st.integers(*sizes.features)
    kinds = ["linear", "act", "norm", "dropout", "residual", "branches", "parts", "to_flat"]
    kinds += {"flat": ["to_seq", "to_img", "raw_linear", "tied", "detached", "reparametrized"],
              "seq": ["detached", "attention", "recurrent", "conv1d", "pool1d", "to_img", "raw_linear", "tied",
                      "class_token", "token_parts", "softmax", "conv_transpose1d", "reparametrized",
                      "encoder_layer"],
              "img": ["conv2d", "pool2d", "to_seq", "conv_transpose2d", "reparametrized"]}[layout]
    if layout == "img":
        kinds.remove("linear")
    kind = draw(st.sampled_from(kinds))
    if kind == "linear":
        d = draw(width)
        return ("linear", features, d, draw(st.booleans())), layout, shape[:-1] + (d,)
    if kind == "raw_linear":
        d = draw(width)
        form = draw(st.sampled_from(["functional", "einsum", "matmul"]))
        spec = ("raw_linear", features, d, draw(st.booleans()), form)
        return spec, layout, shape[:-1] + (d,)
    if kind == "tied":
        return ("tied", features, draw(st.booleans())), layout, shape
    if kind == "detached":
        return ("detached", features), layout, shape
    if kind == "class_token":
        return ("class_token", shape[0], features), layout, (shape[0] + 1, features)
    if kind == "token_parts" and shape[0] >= 2:
        return ("token_parts", features, draw(st.integers(1, shape[0] - 1))), layout, shape
    if kind == "softmax":
        return ("softmax", features, draw(st.booleans())), layout, shape
    if kind == "act":
        return ("act", draw(activations)), layout, shape
    if kind == "dropout":
        return ("dropout", draw(st.sampled_from([0.1, 0.5])), draw(st.sampled_from(["module", "functional"]))), \
            layout, shape
    if kind == "norm":
        norms = ["layer", "layer_plain", "rms"] + (["group"] if trained or layout != "img" else []) + \
            ["batch", "batch_plain"]
        if layout != "flat" and (layout == "seq" and shape[0] >= 2 or layout == "img" and shape[1] * shape[2] >= 2):
            norms.append("instance")
        norm = draw(st.sampled_from(norms))
        return ("norm", layout, norm, features, draw(st.sampled_from(divisors(features, 3)))), layout, shape
    if kind == "residual":
        act = draw(st.sampled_from([a for a in sorted(ACTIVATIONS) if a != "relu_"]))
        return ("residual", layout, features, act), layout, shape
    if kind == "branches":
        combine = draw(st.sampled_from(["cat", "add"]))
        left = draw(width)
        right = left if combine == "add" else draw(width)
        out = left + right if combine == "cat" else left
        spec = ("branches", layout, features, left, right, combine)
        return spec, layout, ((out,) + shape[1:]) if layout == "img" else shape[:-1] + (out,)
    if kind == "parts" and features >= 2:
        how = draw(st.sampled_from(["chunk", "split", "gate"] if features % 2 == 0 else ["split"]))
        first = features // 2 if how != "split" else draw(st.integers(1, features - 1))
        out = first if how == "gate" else features
        return ("parts", layout, first, features - first, how), layout, \
            ((out,) + shape[1:]) if layout == "img" else shape[:-1] + (out,)
    if kind == "to_flat":
        how = {"flat": ["flatten"], "seq": ["flatten", "mean_tokens", "max_tokens", "first_token"],
               "img": ["flatten", "mean_pixels"]}[layout]
        how = draw(st.sampled_from(how))
        size = features if how in ("mean_tokens", "max_tokens", "first_token", "mean_pixels") else \
            int(torch.Size(shape).numel())
        if layout == "flat":
            return ("act", "tanh"), layout, shape
        return ("reshape", how, ()), "flat", (size,)
    if kind == "to_seq":
        if layout == "img":
            how = draw(st.sampled_from(["pixels_as_tokens", "permute_tokens"]))
            return ("reshape", how, ()), "seq", (shape[1] * shape[2], shape[0])
        tokens = draw(st.sampled_from(divisors(features, 4)))
        if tokens == 1:
            return ("reshape", "unsqueeze", ()), "seq", (1, features)
        return ("reshape", "view", (tokens, features // tokens)), "seq", (tokens, features // tokens)
    if kind == "to_img":
        if layout == "seq":
            return ("reshape", "tokens_as_channels", ()), "img", (shape[1], shape[0], 1)
        c = draw(st.sampled_from(divisors(features)))
        h = draw(st.sampled_from(divisors(features // c)))
        size = (c, h, features // c // h)
        return ("reshape", "view", size), "img", size
    if kind == "attention":
        form = draw(st.sampled_from(["mha", "sdpa"]))
        spec = ("attention", features, draw(st.sampled_from(divisors(features, 3))), form, draw(st.booleans()),
                draw(st.booleans()))
        if form == "mha":  # batch_first, lengths of a key padding mask, an additive float mask
            spec += (draw(st.booleans()), draw_lengths(draw, batch, shape[0]), draw(st.booleans()))
        if draw(st.booleans()):
            return ("residual_attention",) + spec[1:], layout, shape
        return spec, layout, shape
    if kind == "recurrent":
        hidden, bidirectional = draw(st.integers(*sizes.hidden)), draw(st.booleans())
        rnn = draw(st.sampled_from(["gru", "lstm"]))
        proj = draw(st.integers(0, hidden - 1)) if rnn == "lstm" else 0
        spec = ("recurrent", rnn, features, hidden, draw(st.integers(1, 2)), bidirectional, draw(st.booleans()), proj,
                draw(st.booleans()), draw_lengths(draw, batch, shape[0]))
        return spec, layout, (shape[0], (proj or hidden) * (1 + bidirectional))
    if kind == "conv1d":
        c_out, kernel, stride, padding, groups, bias, dilation = draw_conv(draw, features, shape[:1], sizes)
        return (("conv1d", features, c_out, kernel, stride, padding, groups, bias, dilation), layout,
                (conv_size(shape[0], kernel, stride, padding, dilation), c_out))
    if kind == "conv2d":
        c_out, kernel, stride, padding, groups, bias, dilation = draw_conv(draw, features, shape[1:], sizes)
        return (("conv2d", features, c_out, kernel, stride, padding, groups, bias, dilation), layout,
                (c_out,) + tuple(conv_size(n, kernel, stride, padding, dilation) for n in shape[1:]))
    if kind == "conv_transpose1d" or kind == "conv_transpose2d":
        sizes_of = shape[:1] if kind == "conv_transpose1d" else shape[1:]
        c_out, kernel, stride, padding, output_padding, groups, bias, dilation = \
            draw_conv_transpose(draw, features, sizes_of, sizes)
        out = tuple(conv_transpose_size(n, kernel, stride, padding, output_padding, dilation) for n in sizes_of)
        spec = (kind, features, c_out, kernel, stride, padding, output_padding, groups, bias, dilation)
        return spec, layout, (out + (c_out,)) if kind == "conv_transpose1d" else (c_out,) + out
    if kind == "reparametrized":
        how = draw(st.sampled_from(["weight_norm", "orthogonal", "spectral_norm"]))
        c_out = draw(width)
        if layout == "img":
            kernel = draw(st.integers(1, min(3, *shape[1:])))
            out = tuple(n - kernel + 1 for n in shape[1:])
            return ("reparametrized", "conv2d", features, c_out, kernel, draw(st.booleans()), how), layout, \
                (c_out,) + out
        return ("reparametrized", "linear", features, c_out, 1, draw(st.booleans()), how), layout, \
            shape[:-1] + (c_out,)
    if kind == "encoder_layer":
        spec = ("encoder_layer", features, draw(st.sampled_from(divisors(features, 3))),
                draw(st.integers(*sizes.feedforward)),
                draw(st.sampled_from([0.0, 0.1])), draw(st.sampled_from(["relu", "gelu"])), draw(st.booleans()),
                draw(st.booleans()), draw_lengths(draw, batch, shape[0]), draw(st.booleans()))
        return spec, layout, shape
    if kind == "pool1d" or kind == "pool2d":
        sides = shape[:1] if kind == "pool1d" else shape[1:]
        pools = ["adaptive_avg", "adaptive_max"] + (["avg", "max"] if min(sides) >= 2 else [])
        pool = draw(st.sampled_from(pools))
        out = tuple(n // 2 for n in sides) if pool in ("avg", "max") else \
            tuple(draw(st.integers(1, n)) for n in sides)
        spec = (kind, pool, out)
        return spec, layout, (out + shape[1:]) if kind == "pool1d" else (shape[0],) + out
    return ("act", "relu"), layout, shape  # "parts" of one feature


def make(spec) -> nn.Module:
    """The module of a block spec (`draw_block`)."""
    kind, *args = spec
    if kind == "linear":
        return nn.Linear(args[0], args[1], bias=args[2])
    if kind == "act":
        return ACTIVATIONS[args[0]]()
    if kind == "dropout":
        return nn.Dropout(args[0]) if args[1] == "module" else Functional(F.dropout, p=args[0])
    if kind == "norm":
        layout, norm, d, groups = args
        if norm in ("layer", "layer_plain", "rms"):
            module = nn.RMSNorm(d) if norm == "rms" else nn.LayerNorm(d, elementwise_affine=norm == "layer")
            return ChannelsLast(module) if layout == "img" else module
        n = "2d" if layout == "img" else "1d"
        module = nn.GroupNorm(groups, d) if norm == "group" else \
            getattr(nn, f"InstanceNorm{n}")(d, affine=True) if norm == "instance" else \
            getattr(nn, f"BatchNorm{n}")(d, affine=norm == "batch")
        return ChannelsFirst(module) if layout == "seq" else module
    if kind == "raw_linear":
        return RawLinear(*args)
    if kind == "tied":
        return Tied(nn.Linear(args[0], args[0], bias=args[1]))
    if kind == "detached":
        return Detached(nn.Linear(args[0], args[0]))
    if kind == "class_token":
        return ClassToken(*args)
    if kind == "token_parts":
        return TokenParts(nn.Linear(args[0], args[0]), args[1])
    if kind == "softmax":
        return Softmax(*args)
    if kind == "residual":
        layout, d, act = args
        inner = nn.Conv2d(d, d, 3, padding=1) if layout == "img" else nn.Linear(d, d)
        return Residual(nn.Sequential(ACTIVATIONS[act](), inner))
    if kind == "branches":
        layout, d, left, right, combine = args
        branch = (lambda k: nn.Conv2d(d, k, 1)) if layout == "img" else (lambda k: nn.Linear(d, k))
        return Branches(branch(left), nn.Sequential(branch(right), nn.Tanh()), combine, 1 if layout == "img" else -1)
    if kind == "parts":
        layout, first, rest, how = args
        f = nn.Conv2d(first, first, 1) if layout == "img" else nn.Linear(first, first)
        return Parts(f, (first, rest), 1 if layout == "img" else -1, how)
    if kind == "reshape":
        return Reshape(*args)
    if kind == "attention":
        return Attention(*args)
    if kind == "residual_attention":
        return Residual(Attention(*args))
    if kind == "recurrent":
        return Recurrent(*args)
    if kind == "conv1d" or kind == "conv2d":
        c_in, c_out, kernel, stride, padding, groups, bias, dilation = args
        conv = (nn.Conv1d if kind == "conv1d" else nn.Conv2d)(c_in, c_out, kernel, stride, padding, groups=groups,
                                                              bias=bias, dilation=dilation)
        return ChannelsFirst(conv) if kind == "conv1d" else conv
    if kind in ("conv_transpose1d", "conv_transpose2d"):
        c_in, c_out, kernel, stride, padding, output_padding, groups, bias, dilation = args
        conv = (nn.ConvTranspose1d if kind == "conv_transpose1d" else nn.ConvTranspose2d)(
            c_in, c_out, kernel, stride, padding, output_padding, groups, bias, dilation)
        return ChannelsFirst(conv) if kind == "conv_transpose1d" else conv
    if kind == "reparametrized":
        layer, c_in, c_out, kernel, bias, how = args
        return Reparametrized(nn.Conv2d(c_in, c_out, kernel, bias=bias) if layer == "conv2d" else
                              nn.Linear(c_in, c_out, bias=bias), how)
    if kind == "encoder_layer":
        return EncoderLayer(*args)
    if kind in ("pool1d", "pool2d"):
        pool, out = args
        n = kind[-2:]
        module = {"avg": getattr(nn, f"AvgPool{n}")(2), "max": getattr(nn, f"MaxPool{n}")(2),
                  "adaptive_avg": getattr(nn, f"AdaptiveAvgPool{n}")(out),
                  "adaptive_max": getattr(nn, f"AdaptiveMaxPool{n}")(out)}[pool]
        return ChannelsFirst(module) if kind == "pool1d" else module
    raise ValueError(spec)


class Composed(nn.Module):
    """The model of a recipe: (embedding) → blocks → head (its weight the embedding's where the recipe ties them);
    the residual blocks take `scale` from the forward's keyword (in the list and dict containers; an
    nn.Sequential calls them with its default)."""

    def __init__(self, recipe: Recipe, features: int):
        super().__init__()
        torch.manual_seed(recipe.seed)
        self.embed = nn.Embedding(recipe.shape[1], recipe.shape[2], padding_idx=recipe.embedding[0]) \
            if recipe.input == "ids" else Bag(*recipe.shape[1:], *recipe.embedding) if recipe.input == "bag" else None
        blocks = [make(spec) for spec in recipe.blocks]
        self.container = recipe.container
        self.blocks = {"sequential": lambda: nn.Sequential(*blocks), "list": lambda: nn.ModuleList(blocks),
                       "dict": lambda: nn.ModuleDict({f"b{i}": b for i, b in enumerate(blocks)})}[recipe.container]()
        self.head = nn.Linear(features, recipe.head)
        if recipe.tied_head:
            self.head.weight = self.embed.weight
        if recipe.frozen is not None:
            blocks[recipe.frozen].requires_grad_(False)
        self.output = recipe.output
        self.to(DTYPE)

    def forward(self, x, *, scale: float = 1.0):
        h = x if self.embed is None else self.embed(x)
        if self.container == "sequential":
            h = self.blocks(h)
        else:
            for block in (self.blocks if self.container == "list" else self.blocks.values()):
                h = block(h, scale=scale) if isinstance(block, Residual) else block(h)
        logits = self.head(h)
        if self.output == "tuple":
            return logits, h
        return {"logits": logits, "features": h} if self.output == "dict" else logits


@st.composite
def recipes(draw, sizes: Sizes = TINY) -> tuple[Recipe, int]:
    """A recipe of sizes in the ranges of `sizes` and the features its head reads."""
    kind = draw(st.sampled_from(["flat", "seq", "img", "ids", "bag"]))
    d, t = draw(st.integers(*sizes.features)), draw(st.integers(*sizes.tokens))
    batch = draw(st.integers(*sizes.batch))
    embedding = ()
    if kind == "flat":
        shape, layout, inner = (d,), "flat", (d,)
    elif kind == "seq":
        shape, layout, inner = (t, d), "seq", (t, d)
    elif kind == "img":
        shape = (draw(st.integers(*sizes.image_channels)), draw(st.integers(*sizes.image_sides)),
                 draw(st.integers(*sizes.image_sides)))
        layout, inner = "img", shape
    else:
        n = draw(st.integers(*sizes.vocabulary))
        shape, padding_idx = (t, n, d), draw(st.sampled_from([None, 0, n - 1]))
        if kind == "ids":
            layout, inner, embedding = "seq", (t, d), (padding_idx,)
        else:
            mode = draw(st.sampled_from(["sum", "mean"]))
            offsets = (0,) + tuple(sorted(draw(st.integers(0, batch * t)) for _ in range(batch - 1))) \
                if draw(st.booleans()) else ()
            layout, inner = "flat", (d,)
            embedding = (mode, padding_idx, offsets, mode == "sum" and draw(st.booleans()))
    blocks, trained = [], kind in ("ids", "bag")
    for _ in range(draw(st.integers(1, 6))):
        spec, layout, inner = draw_block(draw, layout, inner, blocks[-1][0] if blocks else None, trained, batch,
                                           sizes)
        blocks.append(spec)
        trained = trained or not (spec[0] in ("act", "dropout", "reshape", "pool1d", "pool2d", "detached") or
                                  spec[0] == "norm" and spec[2].endswith("_plain"))
    if layout == "img":
        blocks.append(("reshape", "mean_pixels", ()))
        inner = (inner[0],)
    packed = any(b[0] == "recurrent" and b[-1] for b in blocks)
    tied_head = kind == "ids" and layout == "seq" and inner[-1] == d and draw(st.booleans())
    optimizer = draw(st.sampled_from(["kfac", "ekfac", "shampoo", "rank1", "auto"]))
    loss = draw(st.sampled_from([None, "cross_entropy", "mse"]))
    recipe = Recipe(kind, shape, tuple(blocks), shape[1] if tied_head else draw(st.integers(*sizes.classes)),
                    draw(st.sampled_from(["tensor", "tuple", "dict"])),
                    draw(st.sampled_from(["sequential", "list", "dict"])), batch, optimizer,
                    # torch.export cannot capture pack_padded_sequence (torch 2.13: "zeros(): argument 'size' …
                    # got FakeTensor" in pad_packed_sequence), plain torch.export as much as gnfx's
                    draw(st.sampled_from(["fx", "auto"] if packed else ["fx", "export", "auto"])), loss,
                    draw(st.sampled_from(["auto", "quadratic"])) if loss else "auto",
                    # with optimizer="auto" too: the statistics asked for no longer count against its budgets
                    # (gnfx/plan.py; benchmarks/results/first_contact_15_fuzz.md)
                    draw(st.booleans()),
                    draw(st.sampled_from(["expand", "reduce"])), tied_head,
                    None if any(b[:3] == ("norm", "img", "group") for b in blocks) else  # (draw_block: the group norm)
                    draw(st.one_of(st.none(), st.integers(0, len(blocks) - 1))), draw(st.integers(0, 999)),
                    embedding)
    return recipe, inner[-1]


# ----------------------------------------------------------------------------- running a recipe


def logits(out):
    return out[0] if isinstance(out, tuple) else out["logits"] if isinstance(out, dict) else out


def tensors(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, tuple) else list(out.values()) if isinstance(out, dict) else [out]


class Logits(nn.Module):
    """The logits of a model that returns more (for the hook references, whose loss reads one tensor)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, **kwargs):
        return logits(self.model(x, **kwargs))


def data(recipe: Recipe, step: int, out_shape: torch.Size):
    """The step's inputs and targets: class labels of the logits' leading shape, or values of their shape (mse)."""
    g = torch.Generator().manual_seed(recipe.seed + 7 * step + 1)
    shape = (recipe.batch,) + recipe.shape
    x = torch.randint(0, shape[2], shape[:2], generator=g) if recipe.input in ("ids", "bag") else \
        torch.randn(*shape, generator=g, dtype=DTYPE)
    if recipe.loss == "mse":
        return x, torch.randn(out_shape, generator=g, dtype=DTYPE)
    return x, torch.randint(0, out_shape[-1], out_shape[:-1], generator=g)


def loss_of(recipe: Recipe, out, target) -> torch.Tensor:
    return F.mse_loss(logits(out), target) if recipe.loss == "mse" else cross_entropy(logits(out), target)


def compile_recipe(recipe: Recipe, model: nn.Module):
    options = dict(loss=recipe.loss, step=recipe.step) if recipe.loss else dict(lr=1e-2)
    options["kfac_approx"] = recipe.approx
    if recipe.taps and not recipe.loss:
        options["statistics"] = ("A", "S")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gnfx.compile(model, optimizer=recipe.optimizer, capture=recipe.capture, **options)


def linear_blocks(c, model) -> list[str]:
    """The blocks of c that are nn.Linear modules called as modules (not nn.MultiheadAttention's out_proj) on
    inputs whose first dimension is the batch (not those of a time-major nn.TransformerEncoderLayer: gnfx warns
    that it cannot tell the examples apart there, and the references would take the tokens for them)."""
    modules = dict(model.named_modules())
    inside_mha = {f"{n}.out_proj" for n, m in modules.items() if isinstance(m, nn.MultiheadAttention)}
    time_major = tuple(f"{n}." for n, m in modules.items()
                       if isinstance(m, nn.TransformerEncoderLayer) and not m.self_attn.batch_first)
    return [b.name for b in c.layers if type(modules.get(b.name)) is nn.Linear and b.name not in inside_mha
            and not b.name.startswith(time_major)]


def step_beside(c, model, reference, loss_fn, x, target, seed: int, **kwargs) -> dict[str, torch.Tensor]:
    """Forward (with `kwargs`) and backward of the compiled model and of the eager `reference` on (x, target),
    dropout drawing the same numbers: outputs, gradients and buffers equal; then c.step(), and the reference
    takes the new parameters. The gradients, by parameter name."""
    torch.manual_seed(seed)
    out = c(x.clone(), **kwargs)  # (an in-place activation first changes its input)
    torch.manual_seed(seed)
    out_ref = reference(x.clone(), **kwargs)
    assert type(out) is type(out_ref)
    for got, want in zip(tensors(out), tensors(out_ref), strict=True):
        torch.testing.assert_close(got, want, **EXACT)
    loss_fn(out, target).backward()
    loss_fn(out_ref, target).backward()
    grads = {}
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, **EXACT, msg=lambda m: f"{name}: {m}")
            grads[name] = p.grad.clone()
    buffers = dict(model.named_buffers())
    for name, b_ref in reference.named_buffers():
        torch.testing.assert_close(buffers[name], b_ref, **EXACT, msg=lambda m: f"buffer {name}: {m}")
    step_and_follow(c, model, reference)
    for name, b_ref in reference.named_buffers():
        torch.testing.assert_close(buffers[name], b_ref, **EXACT, msg=lambda m: f"buffer {name} after the step: {m}")
    return grads


def check(recipe: Recipe, features: int) -> None:
    """Properties a, b and c (module docstring) of one recipe."""
    reference = Composed(recipe, features)
    model, initial = copy.deepcopy(reference), copy.deepcopy(reference)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    c = compile_recipe(recipe, model)
    loss_fn = lambda out, target: loss_of(recipe, out, target)  # noqa: E731
    with torch.no_grad():
        out_shape = logits(copy.deepcopy(reference)(data(recipe, 0, (1,))[0])).shape
    x, target = data(recipe, 0, out_shape)
    grads = step_beside(c, model, reference, loss_fn, x, target, recipe.seed, scale=0.5)
    assert c.optimizer.steps == 1 and c.optimizer.stat_every > 1  # step 0 was a statistic step, step 1 is not
    if not recipe.loss:  # c: the empirical Fisher's factors of the first statistic step (of scale 0.5)
        blocks = c.optimizer.statistics.blocks
        names = [n for n in linear_blocks(c, model) if n in blocks and "A" in blocks[n].values]
        torch.manual_seed(recipe.seed)
        ref = hook_statistics(Logits(initial), [f"model.{n}" for n in names], x, target, recipe.approx,
                              scale=0.5)
        for name in names:
            got = c.statistics(name)
            torch.testing.assert_close(got["A"], ref[f"model.{name}"]["A"], **TOL)
            torch.testing.assert_close(got["S"], ref[f"model.{name}"]["S"], **TOL)
    x, target = data(recipe, 1, out_shape)
    grads_later = step_beside(c, model, reference, loss_fn, x, target, recipe.seed + 1, scale=0.25)
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        if any(gs[name].abs().max() > 1e-8 for gs in (grads, grads_later) if name in gs):  # not rounding noise
            assert not torch.equal(p, start[name]), f"{name} had a gradient and did not move"
    c.eval()
    reference.eval()
    with torch.no_grad():
        for got, want in zip(tensors(c(x)), tensors(reference(x)), strict=True):  # the default scale
            torch.testing.assert_close(got, want, **EXACT)


@PROPERTY
@given(recipes())
def test_composed_models_compute_the_eager_function_and_every_step_moves_them(drawn):
    check(*drawn)


def drawing_random_numbers(recipe: Recipe) -> bool:
    """Whether the model draws random numbers in training mode (dropout), which inductor's kernels draw otherwise
    than torch's."""
    return any(b[0] in ("dropout", "softmax") or b[0] == "encoder_layer" and b[4] > 0 for b in recipe.blocks)


def train_under(recipe: Recipe, features: int, backend: str | None, steps: int = 3):
    """The recipe's model trained `steps` steps (a statistic step with the keyword scale 0.5, then plain ones
    with 0.25) by its gnfx compilation, called as it is or through torch.compile(backend): the outputs of each
    step and the parameters after them."""
    torch._dynamo.reset()
    model = Composed(recipe, features)
    c = compile_recipe(recipe, model)
    forward = c if backend is None else torch.compile(c, backend=backend)
    with torch.no_grad():
        out_shape = logits(copy.deepcopy(model)(data(recipe, 0, (1,))[0])).shape
    outputs = []
    for step in range(steps):
        x, target = data(recipe, step, out_shape)
        torch.manual_seed(recipe.seed + step)
        out = forward(x, scale=0.5 if step == 0 else 0.25)
        loss_of(recipe, out, target).backward()
        c.step()
        c.zero_grad()
        outputs.append([t.detach() for t in tensors(out)])
    return outputs, {n: p.detach().clone() for n, p in model.named_parameters()}


def single(t: torch.Tensor) -> torch.Tensor:
    """A tensor of the recipe's data in float32 (token ids and class labels as they are)."""
    return t.float() if t.is_floating_point() else t


MASKS = 16  # dropout masks the loss of a model that draws them is averaged over (`batch_loss`)


def batch_loss(recipe: Recipe, model: nn.Module, x, target) -> float:
    """The recipe's loss of the eager `model` on (x, target) without gradients; for a model that draws dropout
    masks, the mean over MASKS draws (torch.manual_seed(recipe.seed + k)): the loss its training lowers in
    expectation, which one mask's loss, another function of the parameters, need not follow."""
    draws = MASKS if drawing_random_numbers(recipe) else 1
    total = 0.0
    for k in range(draws):
        torch.manual_seed(recipe.seed + k)
        with torch.no_grad():
            total += float(loss_of(recipe, model(x.clone()), target))
    return total / draws


TEACHER_BATCHES = (64, 8)  # batches of recipe.batch examples a teacher labels: training set, held-out set


def teacher_data(recipe: Recipe, features: int, batches: int, seed: int):
    """`batches` batches of the recipe's inputs (recipe.batch examples each, drawn as `data` draws them, float32)
    and their targets by a teacher, the recipe's model initialized from another seed, float32, in eval mode: its
    arg-max class (cross-entropy) or its logits (mse). Something the recipe's model can learn and generalize:
    it computes the teacher's function. (x, y) with the batches concatenated."""
    teacher = Composed(dataclasses.replace(recipe, seed=recipe.seed + 1000), features).float().eval()
    g = torch.Generator().manual_seed(seed)
    shape = (batches * recipe.batch,) + recipe.shape
    x = torch.randint(0, shape[2], shape[:2], generator=g) if recipe.input in ("ids", "bag") else \
        torch.randn(*shape, generator=g)
    with torch.no_grad():
        z = torch.cat([logits(teacher(chunk)) for chunk in x.split(recipe.batch)])
    return x, z if recipe.loss == "mse" else z.argmax(-1)


def held_out_loss(recipe: Recipe, model: nn.Module, x, target) -> float:
    """The recipe's mean loss of the eager `model` in eval mode (no dropout, batch norms' running statistics) on
    (x, target), in batches of recipe.batch examples (the size its masks, lengths and offsets are drawn for)."""
    model.eval()
    with torch.no_grad():
        losses = [float(loss_of(recipe, model(xb), yb)) for xb, yb in zip(x.split(recipe.batch),
                                                                          target.split(recipe.batch), strict=True)]
    model.train()
    return sum(losses) / len(losses)


def trained_at_defaults(recipe: Recipe, features: int, options: dict | None, steps: int,
                        held_out: bool = False) -> tuple[float, float]:
    """(L before, L after) `steps` steps of the recipe's model in float32, compiled by gnfx.compile(model,
    **options, loss=<the recipe's loss, cross_entropy when it has none>, capture=<the recipe's>), no lr: a user's
    defaults (the recipe's optimizer, lr and step are not used); options None: torch.optim.AdamW at lr 1e-3
    instead, the reference. Without `held_out`, every step is on the recipe's first batch (2-3 examples, random
    targets, which the model can fit), and L is `batch_loss` of that batch, over MASKS dropout masks where the
    model draws them. With `held_out`, step t is on a batch of recipe.batch examples drawn afresh (seed
    recipe.seed + t, the same for every optimizer) from the training set of `teacher_data`, and L is
    `held_out_loss` on its held-out set. L is measured on the eager model, which the compiled one trains (the same
    Parameter objects). Raises what compiling or stepping raises, and an AssertionError naming a non-finite loss
    or parameter."""
    model = Composed(recipe, features).float()
    recipe = dataclasses.replace(recipe, loss=recipe.loss or "cross_entropy")
    if held_out:
        (x_train, y_train), (x_val, y_val) = (teacher_data(recipe, features, n, recipe.seed + k)
                                              for k, n in enumerate(TEACHER_BATCHES))

        def batch(step):
            rows = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(recipe.seed + step))
            return x_train[rows[:recipe.batch]], y_train[rows[:recipe.batch]]

        measure = lambda: held_out_loss(recipe, model, x_val, y_val)  # noqa: E731
    else:
        with torch.no_grad():
            out_shape = logits(copy.deepcopy(model)(single(data(recipe, 0, (1,))[0]))).shape
        x, target = (single(t) for t in data(recipe, 0, out_shape))
        batch = lambda step: (x, target)  # noqa: E731
        measure = lambda: batch_loss(recipe, model, x, target)  # noqa: E731
    before = measure()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if options is None:
            c, optimizer = model, torch.optim.AdamW(model.parameters(), lr=1e-3)
        else:
            c = gnfx.compile(model, capture=recipe.capture, loss=recipe.loss, **options)
            optimizer = c
        for step in range(steps):
            x_step, target_step = batch(step)
            torch.manual_seed(recipe.seed + step)
            loss = loss_of(recipe, c(x_step.clone()), target_step)
            assert torch.isfinite(loss), f"non-finite loss at step {step}"
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), f"non-finite parameter {name}"
    return before, measure()


@settings(PROPERTY, max_examples=int(os.environ.get("GNFX_FUZZ_DEFAULTS_EXAMPLES", "5")))
@given(recipes().filter(lambda d: not drawing_random_numbers(d[0])))
def test_composed_models_trained_at_the_defaults_in_float32_lower_the_loss_of_their_batch(drawn):
    """Property e: kfac at the defaults (its quadratic-model step, whose accepted steps lower the batch's loss
    and whose rejected ones are retried shorter or undone) on one fixed batch, float32, without dropout (whose
    masks make each step's batch loss another function). Steps only: 10 of them lower the loss."""
    before, after = trained_at_defaults(*drawn, {"optimizer": "kfac"}, steps=10)
    assert after < before, (before, after)


def test_a_fixed_batch_trained_past_the_held_out_steps_keeps_its_loss_down():
    """The fuzz's recipe (benchmarks/results/first_contact_19_defaultsfuzz.md) on which kfac at the defaults, on one
    batch repeated, fitted it (0.64 → 0.0016 in 20 steps), then took steps the held-out step length κ had doubled
    to 64, past the model's minimizer and unchecked: 10.7 after 30 steps. Steps its model predicts no reduction
    for are now taken only if the batch's loss falls (gnfx.quadratic_step, "The held-out step length")."""
    recipe = Recipe(input="ids", shape=(2, 5, 2), blocks=(("recurrent", "gru", 2, 3, 2, True, True, 0, False, ()),
                    ("linear", 6, 2, True), ("act", "leaky"), ("act", "gelu"), ("act", "tanh")), head=2,
                    output="dict", container="list", batch=3, optimizer="kfac", capture="auto", loss=None,
                    step="auto", taps=False, approx="expand", tied_head=False, frozen=None, seed=0, embedding=(0,))
    before, after = trained_at_defaults(recipe, 2, {"optimizer": "kfac"}, steps=30)
    assert after < 0.01 * before, (before, after)


def test_a_wide_recipe_trained_by_diag_quadratic_on_a_teacher_stays_finite():
    """The wide fuzz's recipe (benchmarks/results/first_contact_20_fuzzwide.md: a LayerNorm without affine and a
    linear head, 16 features, batches of 16 of a teacher's labels) on which diag:quadratic fitted batches almost to
    rounding (|W| ~ 280), took a step of α ~ -3e-40, and at step 136 took the finite-difference product of that
    subnormal previous update with a step h beyond float32 (gnfx.finite_differences): NaN α, NaN parameters."""
    recipe = Recipe(input="flat", shape=(16,), blocks=(("norm", "flat", "layer_plain", 16, 1),), head=2,
                    output="tuple", container="list", batch=16, optimizer="shampoo", capture="auto", loss=None,
                    step="auto", taps=False, approx="expand", tied_head=False, frozen=0, seed=1, embedding=())
    before, after = trained_at_defaults(recipe, 16, {"optimizer": "diag", "step": "quadratic"}, steps=140,
                                        held_out=True)
    assert math.isfinite(after), (before, after)


COMPILE_EXAMPLES = int(os.environ.get("GNFX_FUZZ_COMPILE_EXAMPLES", "3"))


@pytest.mark.parametrize("backend, examples", [("aot_eager", COMPILE_EXAMPLES), ("inductor", 1)])
def test_torch_compile_of_a_composed_model_trains_as_the_model_does(backend, examples):
    """torch.compile(gnfx.compile(model)) takes the steps the gnfx model takes without it, float64: equal outputs
    on a statistic step and two plain ones (which run the forward torch.compile compiled) and equal parameters
    after them. aot_eager runs torch's own kernels (to round-off); inductor its generated ones (summation order
    differs, and it draws other random numbers: models without dropout). Few examples: a compilation costs
    seconds (aot_eager) to tens of seconds (inductor); `GNFX_FUZZ_COMPILE_EXAMPLES` sets aot_eager's."""
    tolerance = EXACT if backend == "aot_eager" else dict(rtol=1e-7, atol=1e-9)
    drawn = recipes().filter(lambda d: backend == "aot_eager" or not drawing_random_numbers(d[0]))

    @settings(PROPERTY, max_examples=examples)
    @given(drawn)
    def trains_alike(drawn):
        (outputs, params), (want_outputs, want_params) = (train_under(*drawn, b) for b in (backend, None))
        for got, want in zip(outputs, want_outputs, strict=True):
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a, b, **tolerance)
        for name, p in params.items():
            torch.testing.assert_close(p, want_params[name], **tolerance, msg=lambda m: f"{name}: {m}")

    trains_alike()


# ----------------------------------------------------------------------------- what the fuzzer found


class InstanceNormCall(nn.Module):
    """F.instance_norm with γ, β of the module's own: torch.fx records a function call, not a module."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x):
        return F.instance_norm(x, weight=self.weight, bias=self.bias)


@pytest.mark.parametrize("capture, form", [("export", "module"), ("fx", "function"), ("export", "function")])
def test_an_instance_norm_as_a_function_call_is_a_norm_block(capture, form):
    """nn.InstanceNorm1d under torch.export (aten.instance_norm) and F.instance_norm under either capture: a norm
    block, a group norm of one group per channel, whose A, S and diag equal tests/test_properties.py's references.
    They fell back to diag (the fuzzer's composed models with an instance norm under capture="export")."""
    model = properties.NormNet(2, 3, 3, "instance", 1, True, "tanh", 0)
    if form == "function":
        model.norm = InstanceNormCall(model.norm)
    x, y = properties.data((2, 3, 2), 3, (2, 3), 0)
    c = gnfx.compile(copy.deepcopy(model), optimizer="kfac", stat_every=1, stat_decay=0.0, capture=capture,
                     statistics=("A", "S", "diag"), example_inputs=(x,))
    assert c.layers["norm"].kind == "norm" and not c.layers.fallbacks
    ref = properties.norm_reference(model, x, y, "expand")
    properties.statistic_step(c, model, x, y)
    got = c.statistics("norm")
    for key in ("A", "S", "diag"):
        torch.testing.assert_close(got[key], ref[key], **TOL)


@pytest.mark.parametrize("kind, bidirectional", [("gru", False), ("lstm", True)])
@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_dropout_after_a_batch_first_recurrent_module_draws_the_modules_mask(kind, bidirectional, capture):
    """nn.GRU / nn.LSTM(batch_first=True) return their output time-major in memory, a (T, N, H) tensor
    transposed, and a dropout draws its mask in memory order. The lowered module returned it contiguous (N, T, H):
    the same random state then dropped other entries than the eager model's (the fuzzer's GRU → dropout)."""
    torch.manual_seed(0)
    model = nn.Sequential(Recurrent(kind, 3, 4, 1, bidirectional, True, 0), nn.Dropout(0.5),
                          nn.Linear(8 if bidirectional else 4, 2)).to(DTYPE)
    x = torch.randn(3, 5, 3, dtype=DTYPE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = gnfx.compile(copy.deepcopy(model), optimizer="kfac", lr=1e-2, capture=capture, example_inputs=(x,))
    assert c.layers["0.rnn.weight_hh_l0"].kind == "recurrent"
    torch.manual_seed(1)
    out = c(x)
    torch.manual_seed(1)
    torch.testing.assert_close(out, model(x), **EXACT)


@pytest.mark.parametrize("layer", ["linear", "conv2d", "conv_transpose2d"])
@pytest.mark.parametrize("capture", ["fx", "export"])
def test_the_bias_of_a_layer_with_an_orthogonal_weight_falls_back_saying_why(layer, capture):
    """nn.utils.parametrizations.orthogonal makes a layer's W from its parameter by a matrix exponential or
    Householder products, which gnfx does not reparametrize: the layer is no block. Its weight falls back for that
    computation, and its bias now says that the layer's weight is computed (it said "used by call_function
    'linear', not a layer gnfx models", as if a linear map were none); both take the gradient autograd gives
    and move on a step. (On a kernel (C_out, C_in, k, k) the parametrization makes each k×k slice orthogonal: a
    1×1 kernel would be ±1 and get no gradient.)"""
    torch.manual_seed(0)
    inner, shape, called = {
        "linear": (nn.Linear(3, 4), (5, 3), "linear map"),
        "conv2d": (nn.Conv2d(3, 4, 2), (5, 3, 3, 3), "convolution"),
        "conv_transpose2d": (nn.ConvTranspose2d(3, 4, 2), (5, 3, 3, 3), "transposed convolution")}[layer]
    model = nn.Sequential(Reparametrized(inner, "orthogonal"), nn.Tanh()).to(DTYPE)
    reference = copy.deepcopy(model)
    x = torch.randn(*shape, dtype=DTYPE)
    c = gnfx.compile(model, optimizer="kfac", lr=1e-2, capture=capture, example_inputs=(x,))
    reasons = {f.param: f.reason for f in c.layers.fallbacks}
    assert set(reasons) == {"0.layer.bias", "0.layer.parametrizations.weight.original"}
    assert reasons["0.layer.bias"].startswith(f"the bias of a {called} whose weight is computed by")
    c(x).square().sum().backward()
    reference(x).square().sum().backward()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, **EXACT, msg=lambda m: f"{name}: {m}")
    c.step()
    assert [n for n, p in model.named_parameters() if torch.equal(p, start[n])] == []
