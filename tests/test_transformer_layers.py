"""torch.nn's Transformer family as a user calls it: nn.TransformerDecoderLayer, nn.TransformerDecoder,
nn.Transformer, and nn.MultiheadAttention as cross-attention (keys and values from a memory).

* The compiled graph computes the module's outputs and gradients (float64, 1e-10) with the masks
  and hints a decoder takes: tgt_mask from nn.Transformer.generate_square_subsequent_mask,
  tgt_is_causal, tgt/memory_key_padding_mask; batch_first and norm_first either way. The hint
  `is_causal` is a forward argument, read at run time with torch's semantics (it replaces the
  mask where torch hands it to scaled_dot_product_attention).
* Every parameter is in a curvature block (nn.Transformer is captured with torch.fx): the packed
  in-projection of a cross-attention is one block at two sites (the queries and the memory, each
  mapped by the whole weight); separate kdim/vdim weights are three blocks, and the one bias
  parameter they share falls back with that reason.
* Those blocks' statistics equal the K-FAC factors of an explicit twin made of nn.Linear modules,
  recorded with plain hooks (tests/references.py): A of the key/value projections is the mean of
  a aᵀ over the memory rows.
* K-FAC at its defaults (the quadratic-model step, no lr) trains a small copy task without warnings.
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

import gnfx
from references import TOL, hook_statistics

DTYPE = torch.float64
D, HEADS, FF, N, S, T = 8, 2, 16, 3, 5, 4


def build(cls, *args, **kwargs):
    torch.manual_seed(0)
    return cls(*args, **kwargs).to(DTYPE)


def sequences(batch_first: bool, n=N, s=S, t=T, seed=1):
    """(src, tgt) of shape (N, S, D), (N, T, D), or sequence-first."""
    g = torch.Generator().manual_seed(seed)
    src, tgt = (torch.randn(n, length, D, generator=g, dtype=DTYPE) for length in (s, t))
    return (src, tgt) if batch_first else (src.transpose(0, 1), tgt.transpose(0, 1))


def padding(n, length, row):
    """A key padding mask (N, length) that pads the last position of example `row`."""
    mask = torch.zeros(n, length, dtype=torch.bool)
    mask[row, -1] = True
    return mask


def decoder_kwargs(causal_hint: bool, key_padding: bool) -> dict:
    kwargs = {"tgt_mask": nn.Transformer.generate_square_subsequent_mask(T, dtype=DTYPE)}
    if causal_hint:
        kwargs["tgt_is_causal"] = True
    if key_padding:
        kwargs.update(tgt_key_padding_mask=padding(N, T, 1), memory_key_padding_mask=padding(N, S, 0))
    return kwargs


def make(kind: str, batch_first: bool, norm_first: bool) -> nn.Module:
    options = dict(dim_feedforward=FF, dropout=0.0, batch_first=batch_first, norm_first=norm_first, dtype=DTYPE)
    torch.manual_seed(0)
    if kind == "layer":
        return nn.TransformerDecoderLayer(D, HEADS, **options)
    if kind == "stack":
        return nn.TransformerDecoder(nn.TransformerDecoderLayer(D, HEADS, **options), 2,
                                     norm=nn.LayerNorm(D, dtype=DTYPE))
    return nn.Transformer(D, HEADS, 1, 1, **options)


def outputs_and_gradients(fn, params, *args, **kwargs):
    out = fn(*args, **kwargs)
    return out, torch.autograd.grad(out.square().sum(), params)


def check_same_function(model, c, args, kwargs):
    """The compiled model's instrumented graph computes the module's output and gradients."""
    c(*args, **kwargs)  # the first call captures
    params = list(model.parameters())
    ref_out, ref_grads = outputs_and_gradients(model, params, *args, **kwargs)
    got_out, got_grads = outputs_and_gradients(c.graph_module, params, *args, **kwargs)
    for got, ref in zip((got_out, *got_grads), (ref_out, *ref_grads)):
        torch.testing.assert_close(got, ref, **TOL)


def coverage(c, model) -> float:
    covered, total = c.layers.coverage(dict(model.named_parameters()))
    return covered / total


# ----------------------------------------------------------------------------- outputs and gradients


@settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(["layer", "stack", "transformer"]), batch_first=st.booleans(),
       norm_first=st.booleans(), causal_hint=st.booleans(), key_padding=st.booleans(),
       capture=st.sampled_from(["auto", "export"]))
@example(kind="stack", batch_first=True, norm_first=True, causal_hint=True, key_padding=False, capture="auto")
@example(kind="transformer", batch_first=False, norm_first=False, causal_hint=False, key_padding=True,
         capture="export")
def test_decoders_compute_the_modules_outputs_and_gradients_with_all_parameters_in_blocks(
        kind, batch_first, norm_first, causal_hint, key_padding, capture):
    """Captured with fx when left to gnfx (capture='auto'), or with torch.export, which used to fail
    on the decoders' check of whether tgt_mask is the causal mask (a branch on its values)."""
    model = make(kind, batch_first, norm_first)
    src, tgt = sequences(batch_first)
    args = (src, tgt) if kind == "transformer" else (tgt, src)
    c = gnfx.compile(model, optimizer="kfac", loss="mse", capture=capture)
    check_same_function(model, c, args, decoder_kwargs(causal_hint, key_padding))
    assert c.layers.form == ("fx" if capture == "auto" else "export")
    assert c.layers.fallbacks == [] and coverage(c, model) == 1.0


def test_nn_transformer_is_traced_with_fx_and_its_cross_attention_is_a_block_at_two_sites():
    """nn.Transformer(src, tgt): fx traces it (its checks of the inputs' sizes used to branch on
    traced sizes, so export was used), and every parameter is in a block: the decoder's
    cross-attention projects the queries and the memory with the whole packed weight."""
    model = make("transformer", True, False)
    src, tgt = sequences(True)
    c = gnfx.compile(model, optimizer="kfac", loss="mse", example_inputs=(src, tgt))
    assert c.layers.form == "fx" and coverage(c, model) == 1.0
    cross = c.layers["decoder.layers.0.multihead_attn.in_proj"]
    assert cross.role == "attention.qkv" and len(cross.sites) == 2
    assert c.layers["decoder.layers.0.multihead_attn.out_proj"].role == "attention.out"


def test_the_is_causal_hint_is_read_at_run_time_with_torchs_semantics():
    """One graph of nn.TransformerDecoderLayer, called with tgt_is_causal False and True and a mask
    that is not causal: torch uses the mask, resp. the causal mask in its place (need_weights=False,
    no key padding), and so does the graph; with key padding torch keeps the mask despite the hint."""
    model = make("layer", True, False)
    src, tgt = sequences(True)
    mask = torch.ones(T, T, dtype=torch.bool).triu(2)  # each query also sees the next key: not causal
    c = gnfx.compile(model, optimizer="kfac", loss="mse")
    outs = {}
    for hint, key_padding in ((False, False), (True, False), (True, True)):
        kwargs = {"tgt_mask": mask, "tgt_is_causal": hint}
        if key_padding:
            kwargs["tgt_key_padding_mask"] = padding(N, T, 1)
        check_same_function(model, c, (tgt, src), kwargs)
        outs[hint, key_padding] = model(tgt, src, **kwargs)
    assert not torch.allclose(outs[False, False], outs[True, False])
    with pytest.raises(RuntimeError, match="is_causal"):  # as torch: the hint needs its mask
        c.graph_module(tgt, src, tgt_is_causal=True)
    with pytest.raises(RuntimeError, match="is_causal"):
        model(tgt, src, tgt_is_causal=True)


class WeightsOnRequest(nn.Module):
    """Self-attention whose need_weights, or average_attn_weights, is a forward argument (a traced
    value): `flag`."""

    def __init__(self, traced: str):
        super().__init__()
        self.mha = nn.MultiheadAttention(D, HEADS, batch_first=True)
        self.traced = traced

    def forward(self, x, flag=False):
        if self.traced == "need_weights":
            return self.mha(x, x, x, need_weights=flag)[0]
        out, weights = self.mha(x, x, x, average_attn_weights=flag)
        return out * weights.square().mean()


@pytest.mark.parametrize("traced", ["need_weights", "average_attn_weights"])
def test_weights_flags_given_as_traced_values_keep_the_module_opaque_with_the_reason(traced):
    model, (x, _) = build(WeightsOnRequest, traced), sequences(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the low coverage that this test is about
        c = gnfx.compile(model, optimizer="kfac", lr=0.1, capture="fx")
    reasons = {f.param: f.reason for f in c.layers.fallbacks}
    assert set(reasons) == {name for name, _ in model.named_parameters()}
    assert all(f"{traced} is a value computed in the forward" in r for r in reasons.values()), reasons
    for flag in (True, False):
        check_same_function(model, c, (x,), {"flag": flag})


# ----------------------------------------------------------------------------- cross-attention statistics


class CrossTagger(nn.Module):
    """Cross-attention of x (N, T, D) over a memory (N, S, kdim) (keys and values), then a token-wise
    head: (N, T, C). `kdim` ≠ D gives the module separate q/k/v projection weights."""

    def __init__(self, kdim=None, classes=3):
        super().__init__()
        self.mha = nn.MultiheadAttention(D, HEADS, batch_first=True, kdim=kdim, vdim=kdim)
        self.head = nn.Linear(D, classes)

    def forward(self, x, memory):
        return self.head(torch.tanh(self.mha(x, memory, memory, need_weights=False)[0]))


class ExplicitCrossTagger(nn.Module):
    """The same function with nn.Linear modules: the packed `in_proj` applied whole to x and to the
    memory (q from the first, k and v from the second), or separate bias-free `q`, `k`, `v` maps
    plus the chunks of in_proj_bias."""

    def __init__(self, tagger: CrossTagger):
        super().__init__()
        mha = tagger.mha
        self.packed = mha._qkv_same_embed_dim
        if self.packed:
            self.in_proj = nn.Linear(D, 3 * D).to(DTYPE)
            self.in_proj.weight, self.in_proj.bias = copy.deepcopy(mha.in_proj_weight), copy.deepcopy(mha.in_proj_bias)
        else:
            self.q, self.k, self.v = (nn.Linear(w.shape[1], D, bias=False).to(DTYPE) for w in
                                      (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight))
            for lin, w in zip((self.q, self.k, self.v), (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)):
                lin.weight = copy.deepcopy(w)
            self.bias = copy.deepcopy(mha.in_proj_bias)
        self.out, self.head = copy.deepcopy(mha.out_proj), copy.deepcopy(tagger.head)

    def forward(self, x, memory):
        if self.packed:
            q, (_, k, v) = self.in_proj(x).chunk(3, -1)[0], self.in_proj(memory).chunk(3, -1)
        else:
            b = self.bias.chunk(3)
            q, k, v = self.q(x) + b[0], self.k(memory) + b[1], self.v(memory) + b[2]
        q, k, v = (z.unflatten(-1, (HEADS, D // HEADS)).transpose(1, 2) for z in (q, k, v))
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D // HEADS), dim=-1)
        return self.head(torch.tanh(self.out((weights @ v).transpose(1, 2).flatten(2))))


def cross_entropy(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


@pytest.mark.parametrize("kdim,capture,approx", [(None, "fx", "expand"), (None, "export", "reduce"),
                                                 (6, "fx", "expand"), (6, "export", "reduce")])
def test_cross_attention_projection_blocks_collect_the_factors_of_an_explicit_twin(kdim, capture, approx):
    """A and S of the in-projection blocks equal the twin's, from forward hooks: packed, the block
    pools the query rows and the memory rows as positions of one weight (bias folded in); separate,
    A of the key and value blocks is the mean of a aᵀ over the memory rows (no bias: in_proj_bias
    falls back)."""
    model = build(CrossTagger, kdim)
    x = sequences(True)[1]
    memory = torch.randn(N, S, kdim or D, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    y = torch.randint(0, 3, (N, T), generator=torch.Generator().manual_seed(5))
    twin = ExplicitCrossTagger(model)
    torch.testing.assert_close(twin(x, memory), model(x, memory), rtol=1e-12, atol=1e-12)
    names = {"mha.in_proj": "in_proj"} if kdim is None else {
        "mha.q_proj": "q", "mha.k_proj": "k", "mha.v_proj": "v"}
    ref = hook_statistics(twin, list(names.values()), x, y, approx, memory=memory)
    c = gnfx.compile(model, optimizer="kfac", lr=0.1, capture=capture, example_inputs=(x, memory), stat_every=1,
                     stat_decay=0.0, statistics=("A", "S"), kfac_approx=approx)
    cross_entropy(c(x, memory), y).backward()
    c.step()
    for block, twin_name in names.items():
        got = c.statistics(block)
        torch.testing.assert_close(got["A"], ref[twin_name]["A"], **TOL)
        torch.testing.assert_close(got["S"], ref[twin_name]["S"], **TOL)
    if kdim is None:
        return
    memory_rows = memory.reshape(-1, kdim)
    if approx == "expand":  # the hand-computed A of the key projection: the memory rows' mean of a aᵀ
        torch.testing.assert_close(c.statistics("mha.k_proj")["A"], memory_rows.T @ memory_rows / (N * S), **TOL)
    assert [f.param for f in c.layers.fallbacks] == ["mha.in_proj_bias"]
    if capture == "fx":
        assert "in_proj_bias holds the biases of three linear maps" in c.layers.fallbacks[0].reason


# ----------------------------------------------------------------------------- training at the defaults


def test_kfac_at_its_defaults_trains_a_copy_task_without_warnings():
    """nn.Transformer learns to copy its source (teacher forcing: the target shifted right by a
    zero start token) with optimizer='kfac', loss='mse' and nothing else: the loss falls."""
    model = make("transformer", True, False)
    src = sequences(True, n=8, s=T)[0]
    tgt = torch.cat([torch.zeros_like(src[:, :1]), src[:, :-1]], dim=1)
    mask = nn.Transformer.generate_square_subsequent_mask(T, dtype=DTYPE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = gnfx.compile(model, optimizer="kfac", loss="mse")
        losses = []
        for _ in range(10):
            loss = F.mse_loss(c(src, tgt, tgt_mask=mask, tgt_is_causal=True), src)
            loss.backward()
            c.step()
            c.zero_grad()
            losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
