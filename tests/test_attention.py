"""Attention: detection in both graph forms, roles of the projections, nn.MultiheadAttention lowering.

Attention is `softmax(q kᵀ · c (+ mask)) v` with q, k, v linear projections of the tokens and a
linear output projection of the mixed values. gnfx finds it in three forms (the hand-written
pattern, F.scaled_dot_product_attention, nn.MultiheadAttention lowered into the hand-written
form) and marks the projections: role "attention.q", ".k", ".v", ".qkv" (one fused projection
feeding all three) and ".out".

The lowering of nn.MultiheadAttention must compute exactly what the module computes: outputs and
gradients (float64, ≤ 1e-12) for every combination of batch_first, need_weights, attn_mask (bool,
float) and key_padding_mask; and its two blocks must collect the statistics of an explicit
reimplementation made of nn.Linear modules (hooks, vmap), at 1e-10. The same holds with the
appended keys of add_bias_kv (bias_k, bias_v: position blocks) and add_zero_attn.
"""
from __future__ import annotations

import copy
import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from references import cross_entropy, hook_statistics, layer_diag, per_example_fisher_diag

DTYPE = torch.float64
D, HEADS, N, T = 8, 2, 3, 5
FORMS = ["fx", "export"]


def tokens(n=N, t=T, d=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, t, d, generator=g, dtype=DTYPE)


def roles(c) -> dict[str, str | None]:
    return {b.name: b.role for b in c.layers}


def build(cls, *args, **kwargs):
    torch.manual_seed(0)
    return cls(*args, **kwargs).to(DTYPE)


def causal(x):
    """(T, T) bool mask of the future for x (N, T, d), from tensor ops (fx-traceable)."""
    return torch.ones_like(x[0, :, :1], dtype=torch.bool).expand(-1, x.shape[1]).triu(1)


def heads(z, n, t):
    """(N, T, d) -> (N, H, T, d/H)."""
    return z.view(n, t, HEADS, D // HEADS).transpose(1, 2)


# ----------------------------------------------------------------------------- hand-written attention


class SeparateMultiply(nn.Module):
    """Separate q, k, v Linear; scale as a multiplication; no mask."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x):
        n, t, _ = x.shape
        q, k, v = heads(self.q(x), n, t), heads(self.k(x), n, t), heads(self.v(x), n, t)
        weights = torch.softmax((q @ k.transpose(-2, -1)) * (D // HEADS) ** -0.5, dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(n, t, D))


class FusedSplitMaskedDropout(nn.Module):
    """Fused qkv split with .split; scale as a division; causal mask via masked_fill; dropout
    between softmax and the product with v."""

    def __init__(self, p=0.0):
        super().__init__()
        self.qkv, self.proj, self.p = nn.Linear(D, 3 * D), nn.Linear(D, D), p

    def forward(self, x):
        n, t, _ = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)
        q, k, v = heads(q, n, t), heads(k, n, t), heads(v, n, t)
        scores = q @ k.transpose(-2, -1) / math.sqrt(D // HEADS)
        scores = scores.masked_fill(causal(x), float("-inf"))
        weights = F.dropout(F.softmax(scores, dim=-1), self.p, training=self.training)
        return self.proj((weights @ v).transpose(1, 2).reshape(n, t, D))


class FusedChunkAdditiveMask(nn.Module):
    """Fused qkv split with .chunk; torch.matmul; an additive float mask (a buffer)."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.register_buffer("bias", torch.randn(T, T))

    def forward(self, x):
        n, t, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (z.reshape(n, t, HEADS, D // HEADS).permute(0, 2, 1, 3) for z in (q, k, v))
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(D // HEADS) + self.bias
        weights = scores.softmax(-1)
        return self.proj(torch.matmul(weights, v).permute(0, 2, 1, 3).reshape(n, t, D))


class SingleHeadBmm(nn.Module):
    """One head, no reshapes: softmax(bmm(q, kᵀ)) bmm v, k transposed with .transpose(1, 2)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x):
        weights = torch.softmax(torch.bmm(self.q(x), self.k(x).transpose(1, 2)), dim=-1)
        return self.out(torch.bmm(weights, self.v(x)))


class SeparateMTFlatten(nn.Module):
    """Separate projections; k transposed with .mT; heads merged with .flatten(2)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x):
        q, k, v = (p(x).unflatten(-1, (HEADS, D // HEADS)).transpose(1, 2) for p in (self.q, self.k, self.v))
        weights = torch.softmax(q @ k.mT * (D // HEADS) ** -0.5, dim=-1)
        return self.out((weights @ v).transpose(1, 2).flatten(2))


SEPARATE = {"q": "attention.q", "k": "attention.k", "v": "attention.v", "out": "attention.out"}
FUSED = {"qkv": "attention.qkv", "proj": "attention.out"}
HANDWRITTEN = {
    "separate-multiply": (SeparateMultiply, SEPARATE),
    "fused-split-masked-dropout": (FusedSplitMaskedDropout, FUSED),
    "fused-chunk-additive-mask": (FusedChunkAdditiveMask, FUSED),
    "single-head-bmm": (SingleHeadBmm, SEPARATE),
}


@pytest.mark.parametrize("capture", FORMS)
@pytest.mark.parametrize("variant", list(HANDWRITTEN))
def test_handwritten_attention_marks_the_projections(variant, capture):
    cls, expected = HANDWRITTEN[variant]
    model, x = build(cls), tokens()
    c = gnfx.compile(model, optimizer="kfac", capture=capture, example_inputs=(x,))
    assert c.layers.form == capture
    assert roles(c) == expected
    assert not c.layers.fallbacks
    torch.testing.assert_close(c.graph_module(x), model(x), rtol=1e-12, atol=1e-12)


def test_handwritten_attention_with_dropout_is_still_found():
    model = build(FusedSplitMaskedDropout, p=0.5)
    c = gnfx.compile(model, optimizer="kfac", capture="fx")
    assert roles(c) == FUSED


def test_handwritten_attention_with_mT_and_flatten_in_the_fx_form():
    c = gnfx.compile(build(SeparateMTFlatten), optimizer="kfac", capture="fx")
    assert roles(c) == SEPARATE


def test_handwritten_attention_with_mT_and_flatten_in_the_export_form():
    x = tokens()
    c = gnfx.compile(build(SeparateMTFlatten), optimizer="kfac", capture="export", example_inputs=(x,))
    assert roles(c) == SEPARATE


class SoftmaxMLP(nn.Module):
    """Not attention: a softmax activation between two hand-written linear maps `x @ W`."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.w1 = nn.Parameter(torch.randn(D, 6))
        self.w2 = nn.Parameter(torch.randn(6, D))
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        return self.head(torch.softmax(self.inp(x) @ self.w1, dim=-1) @ self.w2)


@pytest.mark.parametrize("capture", FORMS)
def test_a_softmax_between_two_linear_maps_is_not_attention(capture):
    x = tokens()
    c = gnfx.compile(build(SoftmaxMLP), optimizer="kfac", capture=capture, example_inputs=(x,))
    assert {b.name for b in c.layers} == {"inp", "w1", "w2", "head"}
    assert all(role is None for role in roles(c).values()), roles(c)


# ----------------------------------------------------------------------------- scaled_dot_product_attention


class SDPAFusedSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x):
        n, t, _ = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)
        q, k, v = heads(q, n, t), heads(k, n, t), heads(v, n, t)
        return self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(n, t, D))


class SDPAFusedChunkMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x, mask):
        n, t, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = heads(q, n, t), heads(k, n, t), heads(v, n, t)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(n, t, D))


class SDPASeparate(nn.Module):
    """Separate projections, one head, (N, T, d) operands."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x):
        return self.out(F.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x)))


SDPA = {
    "fused-split-causal": (SDPAFusedSplit, FUSED, False),
    "fused-chunk-float-mask": (SDPAFusedChunkMask, FUSED, True),
    "separate-one-head": (SDPASeparate, SEPARATE, False),
}


@pytest.mark.parametrize("capture", FORMS)
@pytest.mark.parametrize("variant", list(SDPA))
def test_scaled_dot_product_attention_marks_the_projections(variant, capture):
    cls, expected, masked = SDPA[variant]
    model, x = build(cls), tokens()
    inputs = (x, torch.randn(T, T, dtype=DTYPE)) if masked else (x,)
    c = gnfx.compile(model, optimizer="kfac", capture=capture, example_inputs=inputs)
    assert c.layers.form == capture
    assert roles(c) == expected
    torch.testing.assert_close(c.graph_module(*inputs), model(*inputs), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- nn.MultiheadAttention


class SelfAttention(nn.Module):
    """nn.MultiheadAttention as self-attention; returns (out, weights) when need_weights, else out.
    `options` go to nn.MultiheadAttention (add_bias_kv, add_zero_attn)."""

    def __init__(self, batch_first=True, need_weights=True, attn_mask=None, key_padding_mask=False, **options):
        super().__init__()
        self.mha = nn.MultiheadAttention(D, HEADS, batch_first=batch_first, **options)
        self.need_weights, self.use_mask, self.use_kpm = need_weights, attn_mask is not None, key_padding_mask

    def forward(self, x, attn_mask, key_padding_mask):
        out, weights = self.mha(x, x, x, attn_mask=attn_mask if self.use_mask else None,
                                key_padding_mask=key_padding_mask if self.use_kpm else None,
                                need_weights=self.need_weights)
        return (out, weights) if self.need_weights else out


def masks(kind):
    """An attention mask of `kind` ("bool", "float" or None: a dummy that is not used) and a
    boolean key padding mask that hides the last keys of some examples (never a whole row)."""
    g = torch.Generator().manual_seed(3)
    if kind == "bool":
        attn = torch.rand(T, T, generator=g) < 0.3
        attn.fill_diagonal_(False)
    else:
        attn = torch.randn(T, T, generator=g, dtype=DTYPE)
    kpm = torch.zeros(N, T, dtype=torch.bool)
    kpm[0, -1] = kpm[1, -2:] = True
    return attn, kpm


def outputs_and_gradients(fn, params, x, attn, kpm):
    """The outputs of fn(x, attn, kpm) and the gradients of a fixed random functional of them
    with respect to the input and the parameters."""
    x = x.clone().requires_grad_()
    out = fn(x, attn, kpm)
    out = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(7)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in out)
    return [o.detach() for o in out], torch.autograd.grad(loss, [x, *params])


MHA_CASES = list(itertools.product([True, False], [True, False], [None, "bool", "float"], [False, True]))
# the export form is slower to capture: a covering subset of the combinations
MHA_EXPORT_CASES = [(True, True, None, False), (False, False, "bool", True), (True, False, "float", False),
                    (False, True, "float", True), (True, True, "bool", False), (False, False, None, True)]


def mha_id(case):
    bf, nw, mask, kpm = case
    return f"{'batch_first' if bf else 'seq_first'}-{'weights' if nw else 'noweights'}-mask_{mask}-{'kpm' if kpm else 'nokpm'}"


def mha_blocks(add_bias_kv=False, **options) -> list[str]:
    """The blocks of SelfAttention's module: bias_k and bias_v, appended keys and values, are position blocks."""
    return ["mha.in_proj", *(["mha.bias_k", "mha.bias_v"] if add_bias_kv else []), "mha.out_proj"]


def check_lowered_mha(case, capture, **options):
    batch_first, need_weights, mask, use_kpm = case
    model = build(SelfAttention, batch_first, need_weights, mask, use_kpm, **options)
    attn, kpm = masks(mask)
    x = tokens() if batch_first else tokens().transpose(0, 1).contiguous()
    c = gnfx.compile(model, optimizer="kfac", capture=capture, example_inputs=(x, attn, kpm))
    assert c.layers.form == capture
    assert [b.name for b in c.layers] == mha_blocks(**options)
    assert not c.layers.fallbacks
    if capture == "fx":  # the module is gone: its computation is inlined over the same parameters
        assert not any(n.op == "call_module" and n.target == "mha" for n in c.graph_module.graph.nodes)
    params = list(model.parameters())
    ref_out, ref_grads = outputs_and_gradients(model, params, x, attn, kpm)
    got_out, got_grads = outputs_and_gradients(c.graph_module, params, x, attn, kpm)
    assert len(got_out) == len(ref_out)
    for got, ref in zip(got_out + list(got_grads), ref_out + list(ref_grads)):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    return c


@pytest.mark.parametrize("case", MHA_CASES, ids=mha_id)
def test_lowered_multihead_attention_computes_the_modules_outputs_and_gradients(case):
    c = check_lowered_mha(case, "fx")
    assert roles(c) == {"mha.in_proj": "attention.qkv", "mha.out_proj": "attention.out"}


APPENDED_KEYS = [dict(add_bias_kv=True), dict(add_zero_attn=True), dict(add_bias_kv=True, add_zero_attn=True)]


def appended_id(options):
    return "+".join(options)


@pytest.mark.parametrize("options", APPENDED_KEYS, ids=appended_id)
@pytest.mark.parametrize("case", MHA_CASES, ids=mha_id)
def test_lowered_multihead_attention_with_appended_keys_computes_the_modules_outputs_and_gradients(case, options):
    """add_bias_kv appends bias_k, bias_v to every example's keys and values after the projections,
    add_zero_attn a zero key and value after that; the masks get a column each that hides nothing.
    Before: the module was not lowered ("bias_k/bias_v or add_zero_attn") and all its parameters fell back."""
    c = check_lowered_mha(case, "fx", **options)
    assert roles(c)["mha.in_proj"] == "attention.qkv" and roles(c)["mha.out_proj"] == "attention.out"


@pytest.mark.parametrize("options", APPENDED_KEYS, ids=appended_id)
@pytest.mark.parametrize("case", MHA_EXPORT_CASES[:4], ids=mha_id)
def test_exported_multihead_attention_with_appended_keys_computes_the_modules_outputs_and_gradients(case, options):
    c = check_lowered_mha(case, "export", **options)
    assert roles(c)["mha.in_proj"] == "attention.qkv" and roles(c)["mha.out_proj"] == "attention.out"


class AttentionThenDropout(nn.Module):
    """nn.MultiheadAttention with attention dropout, then a dropout of its output (Conformer's
    self_attn_dropout), then a linear head."""

    def __init__(self, batch_first, need_weights):
        super().__init__()
        self.mha = nn.MultiheadAttention(D, HEADS, dropout=0.1, batch_first=batch_first)
        self.drop, self.head, self.need_weights = nn.Dropout(0.3), nn.Linear(D, 3), need_weights

    def forward(self, x):
        return self.head(self.drop(self.mha(x, x, x, need_weights=self.need_weights)[0]))


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
def test_a_dropout_after_lowered_attention_draws_the_modules_masks(batch_first, need_weights):
    """The lowered output has the module's layout, (T, N, E) contiguous (viewed batch-first), so that a
    dropout after it draws the module's masks from the same seed. Before: it was (N, T, E) contiguous, the
    masks fell on other entries, and torchaudio's Conformer trained with dropout differed from the module by
    1e-2 in its loss from the same seed."""
    model = build(AttentionThenDropout, batch_first, need_weights).train()
    x = tokens() if batch_first else tokens().transpose(0, 1).contiguous()
    c = gnfx.compile(model, optimizer="kfac", lr=1e-3, capture="fx", example_inputs=(x,))
    for seed in range(3):
        torch.manual_seed(seed)
        want = model(x)
        torch.manual_seed(seed)
        got = c(x)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


class CausalOrPerHeadMHA(nn.Module):
    """MHA with is_causal=True and its causal mask, or with a 3-D (N·H, T, S) float mask and
    per-head weights (average_attn_weights=False)."""

    def __init__(self, kind, need_weights, **options):
        super().__init__()
        self.mha = nn.MultiheadAttention(D, HEADS, batch_first=True, **options)
        self.kind, self.need_weights = kind, need_weights

    def forward(self, x, attn_mask, unused):
        if self.kind == "is_causal":
            out, weights = self.mha(x, x, x, attn_mask=attn_mask, is_causal=True, need_weights=self.need_weights)
        else:
            out, weights = self.mha(x, x, x, attn_mask=attn_mask, need_weights=self.need_weights,
                                    average_attn_weights=False)
        return (out, weights) if self.need_weights else out


@pytest.mark.parametrize("options", [{}, *APPENDED_KEYS], ids=appended_id)
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("kind", ["is_causal", "per-head-3d-mask"])
def test_lowered_multihead_attention_with_is_causal_or_a_per_head_mask(kind, need_weights, options):
    """With appended keys torch pads a given causal mask by columns that hide nothing, but where it hands
    the hint to scaled_dot_product_attention (need_weights=False) the causal mask of T queries and the
    T + 1 or 2 keys hides the appended ones: the lowering does both."""
    model, x = build(CausalOrPerHeadMHA, kind, need_weights, **options), tokens()
    g = torch.Generator().manual_seed(4)
    mask = (torch.ones(T, T, dtype=torch.bool).triu(1) if kind == "is_causal"
            else torch.randn(N * HEADS, T, T, generator=g, dtype=DTYPE))
    c = gnfx.compile(model, optimizer="kfac", capture="fx")
    assert {k: v for k, v in roles(c).items() if v} == {"mha.in_proj": "attention.qkv", "mha.out_proj": "attention.out"}
    params = list(model.parameters())
    ref_out, ref_grads = outputs_and_gradients(model, params, x, mask, None)
    got_out, got_grads = outputs_and_gradients(c.graph_module, params, x, mask, None)
    assert len(got_out) == len(ref_out)
    for got, ref in zip(got_out + list(got_grads), ref_out + list(ref_grads)):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", MHA_EXPORT_CASES, ids=mha_id)
def test_exported_multihead_attention_blocks_and_outputs(case):
    c = check_lowered_mha(case, "export")
    _, need_weights, mask, kpm = case
    assert roles(c) == {"mha.in_proj": "attention.qkv", "mha.out_proj": "attention.out"}


@pytest.mark.parametrize("mask, kpm", [("bool", False), (None, True)])
def test_exported_multihead_attention_with_weights_and_a_mask_marks_the_projections(mask, kpm):
    c = check_lowered_mha((True, True, mask, kpm), "export")
    assert roles(c) == {"mha.in_proj": "attention.qkv", "mha.out_proj": "attention.out"}


# ----------------------------------------------------------------------------- MHA statistics


class MHATagger(nn.Module):
    """nn.MultiheadAttention (batch_first; `options` to it) on the tokens, then a token-wise linear head: (N, T, C)."""

    def __init__(self, classes=4, **options):
        super().__init__()
        self.mha = nn.MultiheadAttention(D, HEADS, batch_first=True, **options)
        self.head = nn.Linear(D, classes)

    def forward(self, x):
        out, _ = self.mha(x, x, x, need_weights=False)
        return self.head(torch.tanh(out))


class ExplicitTagger(nn.Module):
    """The same function written with nn.Linear modules (`qkv` holds in_proj, `out` out_proj):
    softmax(q kᵀ / √d_h) v per head, with the keys and values of every example followed by bias_k,
    bias_v (add_bias_kv) and by a zero key and value (add_zero_attn) where the module has them."""

    def __init__(self, tagger: MHATagger):
        super().__init__()
        mha = tagger.mha
        self.bias_k = None if mha.bias_k is None else nn.Parameter(mha.bias_k.detach().clone())
        self.bias_v = None if mha.bias_v is None else nn.Parameter(mha.bias_v.detach().clone())
        self.zero_attn = mha.add_zero_attn
        self.qkv, self.out = nn.Linear(D, 3 * D).to(DTYPE), nn.Linear(D, D).to(DTYPE)
        with torch.no_grad():
            self.qkv.weight.copy_(mha.in_proj_weight)
            self.qkv.bias.copy_(mha.in_proj_bias)
            self.out.weight.copy_(mha.out_proj.weight)
            self.out.bias.copy_(mha.out_proj.bias)
        self.head = copy.deepcopy(tagger.head)

    def forward(self, x):
        n, t, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.bias_k is not None:
            k, v = torch.cat([k, self.bias_k.expand(n, 1, D)], 1), torch.cat([v, self.bias_v.expand(n, 1, D)], 1)
        if self.zero_attn:
            k, v = torch.cat([k, torch.zeros_like(k[:, :1])], 1), torch.cat([v, torch.zeros_like(v[:, :1])], 1)
        q, k, v = heads(q, n, t), heads(k, n, k.shape[1]), heads(v, n, v.shape[1])
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D // HEADS), dim=-1)
        return self.head(torch.tanh(self.out((weights @ v).transpose(1, 2).reshape(n, t, D))))


def check_mha_statistics(capture, approx, **options):
    """A, S (hooks on the explicit twin) and diag (vmap per-example gradients) of the two MHA blocks,
    and diag of bias_k, bias_v where the module has them."""
    model, x = build(MHATagger, **options), tokens()
    y = torch.randint(0, 4, (N, T), generator=torch.Generator().manual_seed(5))
    twin = ExplicitTagger(model)
    torch.testing.assert_close(twin(x), model(x), rtol=1e-12, atol=1e-12)
    ref = hook_statistics(twin, ["qkv", "out"], x, y, approx)
    diags = per_example_fisher_diag(twin, x, y)
    c = gnfx.compile(model, optimizer="kfac", capture=capture, example_inputs=(x,), stat_every=1, stat_decay=0.0,
                     statistics=("A", "S", "diag"), kfac_approx=approx)
    cross_entropy(c(x), y).backward()
    c.step()
    for block, name in (("mha.in_proj", "qkv"), ("mha.out_proj", "out")):
        got = c.statistics(block)
        torch.testing.assert_close(got["A"], ref[name]["A"], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got["S"], ref[name]["S"], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got["diag"], layer_diag(diags, name), rtol=1e-10, atol=1e-10)
    for name in ("bias_k", "bias_v") if model.mha.bias_k is not None else ():  # position blocks: (E, 1) diag
        got = c.statistics(f"mha.{name}")["diag"]
        torch.testing.assert_close(got.flatten(), diags[name].flatten(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_multihead_attention_blocks_collect_the_statistics_of_an_explicit_twin(approx):
    check_mha_statistics("fx", approx)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_exported_multihead_attention_blocks_collect_the_statistics_of_an_explicit_twin(approx):
    """torch.export captures the module as gnfx's lowering computes it (gnfx.passes.mha.lowered_for_export),
    batch-first, not torch's path, which runs in_proj on a (T, N, d) transpose and out_proj on a (T·N, d)
    reshape, from which per-example statistics (diag, reduce) cannot take the examples."""
    check_mha_statistics("export", approx)


@pytest.mark.parametrize("capture", FORMS)
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_projections_of_attention_with_appended_keys_collect_the_statistics_of_an_explicit_twin(approx, capture):
    """bias_k, bias_v and the zero attention are keys and values of no projection's rows: the projections'
    factors are those of the twin's nn.Linear modules, hooked, whose keys are appended the same way."""
    check_mha_statistics(capture, approx, add_bias_kv=True, add_zero_attn=True)


# ----------------------------------------------------------------------------- fallbacks


class CrossAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(D, HEADS, batch_first=True)

    def forward(self, x, memory):
        return self.mha(x, memory, memory)[0]


@pytest.mark.parametrize("capture", FORMS)
def test_cross_attention_in_projection_is_one_block_at_two_sites(capture):
    """Query and key/value differ: the packed in-projection maps the queries and the memory each
    by the whole weight (two sites of one block, fused q/k/v), and the lowered graph computes the
    module's output (tests/test_transformer_layers.py checks its statistics)."""
    model, x, memory = build(CrossAttention), tokens(), tokens(t=4, seed=1)
    c = gnfx.compile(model, optimizer="kfac", capture=capture, example_inputs=(x, memory))
    assert roles(c) == {"mha.in_proj": "attention.qkv", "mha.out_proj": "attention.out"}
    assert len(c.layers["mha.in_proj"].sites) == 2
    assert c.layers.fallbacks == []
    torch.testing.assert_close(c.graph_module(x, memory), model(x, memory), rtol=1e-12, atol=1e-12)


KDIM = 6


class CrossAttentionAppendedKeys(nn.Module):
    """Cross-attention with separate projection weights (keys and values of width KDIM) and appended keys."""

    def __init__(self, **options):
        super().__init__()
        self.mha = nn.MultiheadAttention(D, HEADS, batch_first=True, kdim=KDIM, vdim=KDIM, **options)

    def forward(self, x, memory, key_padding_mask):
        return self.mha(x, memory, memory, key_padding_mask=key_padding_mask)


@pytest.mark.parametrize("capture", FORMS)
@pytest.mark.parametrize("options", APPENDED_KEYS, ids=appended_id)
def test_attention_with_separate_weights_and_appended_keys_is_three_blocks_and_the_modules_function(options,
                                                                                                     capture):
    model, x, memory = build(CrossAttentionAppendedKeys, **options), tokens(), tokens(t=4, d=KDIM, seed=1)
    kpm = torch.zeros(N, 4, dtype=torch.bool)
    kpm[1, -1] = True
    c = gnfx.compile(model, optimizer="kfac", capture=capture, example_inputs=(x, memory, kpm))
    projections = {"mha.q_proj": "attention.q", "mha.k_proj": "attention.k",
                   "mha.v_proj": "attention.v", "mha.out_proj": "attention.out"}
    assert {name: role for name, role in roles(c).items() if role} == projections
    assert {b.name for b in c.layers} - set(projections) == ({"mha.bias_k", "mha.bias_v"} if "add_bias_kv" in options
                                                             else set())
    assert [f.param for f in c.layers.fallbacks] == ["mha.in_proj_bias"]
    params = list(model.parameters())
    ref_out, ref_grads = outputs_and_gradients(model, params, x, memory, kpm)
    got_out, got_grads = outputs_and_gradients(c.graph_module, params, x, memory, kpm)
    for got, ref in zip(got_out + list(got_grads), ref_out + list(ref_grads)):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("step, fall", [({"lr": 1e-2}, 0.8), ({}, 0.995)], ids=["lr", "quadratic-step"])
def test_kfac_trains_a_tagger_whose_attention_has_appended_keys_with_every_parameter_in_a_block(step, fall):
    """K-FAC with an lr and with its quadratic-model step (no lr) on MHATagger(add_bias_kv, add_zero_attn):
    no fallback, the loss falls (the quadratic-model step starts as slowly without the appended keys:
    1.437 -> 1.409 in 8 steps)."""
    model, x = build(MHATagger, add_bias_kv=True, add_zero_attn=True), tokens(n=8)
    y = torch.randint(0, 4, (8, T), generator=torch.Generator().manual_seed(5))
    c = gnfx.compile(model, optimizer="kfac", capture="fx", **step)
    assert not c.layers.fallbacks
    losses = []
    for _ in range(8):
        loss = cross_entropy(c(x), y)
        loss.backward()
        c.step()
        c.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < fall * losses[0], losses


class OnesMaskAttention(nn.Module):
    """Hand-written attention whose causal mask is `torch.ones(t, t)` from a traced size: symbolic
    tracing fails inside this module."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x):
        n, t, _ = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)
        scores = (q @ k.transpose(-2, -1)).masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        return self.proj(scores.softmax(-1) @ v)


class WithOnesMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = OnesMaskAttention()
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        return self.head(self.attn(x).mean(1))


def test_attention_that_fx_cannot_trace_is_a_leaf_in_fx_and_found_by_export_in_auto():
    model, x = build(WithOnesMask), tokens()
    fx_only = gnfx.compile(model, optimizer="kfac", capture="fx")
    assert fx_only.layers.form == "fx" and set(fx_only.layers.leaves) == {"attn"}
    # the leaf's projections are opened (passes/opaque_children.py), without the roles its graph would show
    assert [b.name for b in fx_only.layers] == ["attn.qkv", "attn.proj", "head"] and not fx_only.layers.fallbacks
    assert [b.called_by for b in fx_only.layers] == ["attn", "attn", None]
    assert roles(fx_only) == {"attn.qkv": None, "attn.proj": None, "head": None}

    # torch.export sees the attention itself: kept where it covers as much as fx with the opened layers
    auto = gnfx.compile(model, optimizer="kfac", capture="auto", example_inputs=(x,))
    assert auto.layers.form == "export" and not auto.layers.fallbacks
    assert roles(auto) == {"attn.qkv": "attention.qkv", "attn.proj": "attention.out", "head": None}
    torch.testing.assert_close(auto.graph_module(x), model(x), rtol=1e-12, atol=1e-12)


class _SequenceFirstClassifier(nn.Module):
    """nn.MultiheadAttention (batch_first as given) and a linear head on its outputs."""

    def __init__(self, batch_first):
        super().__init__()
        self.mha = nn.MultiheadAttention(D, HEADS, batch_first=batch_first)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        return self.head(self.mha(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize("batch_first,optimizer,warned", [
    (False, "ekfac", True), (False, "rank1", True), (True, "ekfac", False), (False, "kfac", False)])
def test_sequence_first_modules_warn_when_a_block_needs_per_example_statistics(batch_first, optimizer, warned):
    """The batch of a layer input is read from its first dimension: with a batch_first=False module and
    a preconditioner that needs per-example statistics (ekfac's eigenbasis diagonal, rank1's), gnfx says
    so and names the fix; K-FAC's expand factors sum over all rows and need no batch axis."""
    model = build(_SequenceFirstClassifier, batch_first)
    x = tokens() if batch_first else tokens().transpose(0, 1).contiguous()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = gnfx.compile(model, optimizer, lr=1e-3)
        compiled(x)
    messages = [str(w.message) for w in caught if "sequence-first" in str(w.message)]
    assert bool(messages) == warned
    if warned:
        assert "'mha'" in messages[0] and "batch_first=True" in messages[0]
