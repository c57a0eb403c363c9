"""Lowering of nn.MultiheadAttention into explicit ops over the same parameters.

A `call_module` of an nn.MultiheadAttention becomes the graph of `_LoweredMHA.forward`, inlined:
the in-projection `F.linear(x, in_proj_weight, in_proj_bias)` (one packed linear map when query,
key and value are the same tensor, so that it becomes a curvature block; three sliced ones
otherwise), the per-head `softmax(q kᵀ / √d + mask) v`, and the output projection `out_proj`.
The lowered graph computes what the module computes (outputs and gradients; the instrumented
graph only runs in training mode, so dropout is traced as in training). Configurations the
lowering does not cover (bias_k/bias_v, add_zero_attn, separate k/v projection weights) keep the
module opaque, and its parameters fall back with that reason.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import fx, nn


def mask_scores(scores, attn_mask, key_padding_mask, is_causal: bool):
    """Attention scores (N, H, T, S) with nn.MultiheadAttention's masks applied: boolean masks
    set -inf where True, float masks are added; `is_causal` without a mask masks the future.
    A leaf of the traced graph (torch.fx.wrap): it branches on the masks' presence and dtype."""
    n, h, t, s = scores.shape
    if is_causal and attn_mask is None:
        attn_mask = torch.ones(t, s, dtype=torch.bool, device=scores.device).triu(1)
    for mask in (attn_mask, None if key_padding_mask is None else key_padding_mask.reshape(n, 1, 1, s)):
        if mask is None:
            continue
        if mask.dim() == 3:
            mask = mask.reshape(n, h, t, s)
        scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return scores


torch.fx.wrap("mask_scores")


class _LoweredMHA(nn.Module):
    """The computation of one nn.MultiheadAttention call as explicit functional ops."""

    def __init__(self, mha: nn.MultiheadAttention, self_attention: bool, need_weights: bool,
                 average_attn_weights: bool, is_causal: bool):
        super().__init__()
        self.in_proj_weight, self.in_proj_bias = mha.in_proj_weight, mha.in_proj_bias
        self.out_proj = mha.out_proj
        self.heads, self.head_dim, self.p = mha.num_heads, mha.head_dim, mha.dropout
        self.batch_first, self.self_attention = mha.batch_first, self_attention
        self.need_weights, self.average, self.is_causal = need_weights, average_attn_weights, is_causal

    def forward(self, query, key, value, key_padding_mask=None, attn_mask=None):
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if self.self_attention:
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            w = self.in_proj_weight.chunk(3)
            b = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
            q, k, v = F.linear(query, w[0], b[0]), F.linear(key, w[1], b[1]), F.linear(value, w[2], b[2])
        heads = (self.heads, self.head_dim)
        q, k, v = (x.unflatten(-1, heads).transpose(1, 2) for x in (q, k, v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        weights = F.softmax(mask_scores(scores, attn_mask, key_padding_mask, self.is_causal), dim=-1)
        out = self.out_proj((F.dropout(weights, self.p, training=True) @ v).transpose(1, 2).flatten(2))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not self.need_weights:
            return out, None
        return out, weights.mean(1) if self.average else weights


_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
         "is_causal")


@contextlib.contextmanager
def lowered_for_export():
    """While torch.export captures: nn.MultiheadAttention computes as `_LoweredMHA`, the ops its fx
    lowering inlines, instead of torch's functional path, which runs a batch-first module
    sequence-first (its projections would read (T, N, d) and (T·N, d) inputs, from which the
    per-example statistics cannot take the examples). Modules the lowering does not cover
    (`_not_lowerable`) keep torch's forward."""
    torch_forward = nn.MultiheadAttention.forward

    def forward(mha, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if _not_lowerable(mha, {}, need_weights):
            return torch_forward(mha, query, key, value, key_padding_mask, need_weights, attn_mask,
                                 average_attn_weights, is_causal)
        lowered = _LoweredMHA(mha, query is key is value, need_weights, average_attn_weights, is_causal)
        return _LoweredMHA.forward(lowered, query, key, value, key_padding_mask, attn_mask)

    nn.MultiheadAttention.forward = forward
    try:
        yield
    finally:
        nn.MultiheadAttention.forward = torch_forward


def _call_args(node: fx.Node) -> dict:
    values = dict(zip(_ARGS, node.args))
    values.update(node.kwargs)
    return values


def _not_lowerable(mha: nn.MultiheadAttention, uses, need_weights: bool) -> str:
    """Why this call cannot be lowered ('' if it can)."""
    if type(mha) is not nn.MultiheadAttention:
        return "a subclass of nn.MultiheadAttention"
    if not mha._qkv_same_embed_dim:
        return "separate key/value projection weights (kdim/vdim)"
    if mha.bias_k is not None or mha.add_zero_attn:
        return "bias_k/bias_v or add_zero_attn"
    if uses is None:
        return "its result is used whole rather than as (output, weights)"
    if not need_weights and any(u.users for u in uses.get(1, [])):
        return "the attention weights are used although need_weights=False"
    return ""


def _result_uses(node: fx.Node):
    """{index: getitem node} if every use of the module's result is `result[i]`, else None."""
    uses = {}
    for user in node.users:
        if not (user.op == "call_function" and user.target.__name__ == "getitem" and isinstance(user.args[1], int)):
            return None
        uses.setdefault(user.args[1], []).append(user)
    return uses


def lower_multihead_attention(gm: fx.GraphModule, keep=()) -> fx.GraphModule:
    """Inline every lowerable nn.MultiheadAttention call of `gm` as explicit ops, except the module
    paths in `keep`."""
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if (node.op != "call_module" or node.target in keep
                or not isinstance(modules[node.target], nn.MultiheadAttention)):
            continue
        mha, call, uses = modules[node.target], _call_args(node), _result_uses(node)
        need_weights = call.get("need_weights", True)
        why = _not_lowerable(mha, uses, need_weights)
        if why:
            node.meta["gnfx_fallback_reason"] = f"inside nn.MultiheadAttention {node.target!r}, not lowered: {why}"
            continue
        lowered = _LoweredMHA(mha, call["query"] is call["key"] is call["value"], need_weights,
                              call.get("average_attn_weights", True), call.get("is_causal", False))
        sub = fx.symbolic_trace(lowered)
        inputs = {k: call.get(k) for k in ("query", "key", "value", "key_padding_mask", "attn_mask")}
        env = {}
        with gm.graph.inserting_before(node):
            for n in sub.graph.nodes:
                if n.op == "placeholder":
                    env[n] = inputs[n.target]
                elif n.op == "get_attr":
                    env[n] = gm.graph.get_attr(f"{node.target}.{n.target}")
                elif n.op == "call_module":
                    env[n] = gm.graph.call_module(f"{node.target}.{n.target}", *fx.map_arg((n.args, n.kwargs), env.get))
                elif n.op == "output":
                    result = fx.map_arg(n.args[0], env.get)
                else:
                    env[n] = gm.graph.node_copy(n, env.get)
                    env[n].meta["gnfx_module"] = node.target
        for index, getitems in uses.items():
            for user in getitems:
                if result[index] is not None:
                    user.replace_all_uses_with(result[index])
                gm.graph.erase_node(user)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm
