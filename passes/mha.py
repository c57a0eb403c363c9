"""Lowering of nn.MultiheadAttention into explicit ops over the same parameters.

A `call_module` of an nn.MultiheadAttention becomes the graph of `_LoweredMHA.forward`, inlined:
the in-projection, the per-head `softmax(q kᵀ / √d + mask) v`, and the output projection
`out_proj`. The in-projection reads as linear blocks `z = W a + b` (docs/design.md §1):
  * packed weights (`in_proj_weight` W = [W_q; W_k; W_v], kdim = vdim = embed_dim): each distinct
    input x of query, key, value is mapped by the whole W, `F.linear(x, W, b)`, and q, k, v are
    the chunks of the map of their own input. For self-attention that is the one packed linear
    map; for cross-attention (queries x, keys and values from a memory m) W is used at two sites,
    [q | · | ·] = W x + b and [· | k | v] = W m + b, as a tied weight is: the rows no attention
    reads get a zero output gradient, so Σ_sites δ aᵀ is W's gradient, and the block's statistics
    count the query and memory rows as positions of one block (gnfx.statistics);
  * separate weights (kdim or vdim ≠ embed_dim: q_proj_weight, k_proj_weight, v_proj_weight):
    three linear maps, one block each. Their biases are the chunks of one parameter, in_proj_bias,
    which no block holds: it falls back, with that reason.
The lowered graph computes what the module computes (outputs and gradients; the instrumented
graph only runs in training mode, so dropout is traced as in training). `is_causal` is an input of
the lowered graph (a forward argument of nn.TransformerDecoderLayer, say), read at run time by
`mask_scores`; `need_weights` and `average_attn_weights` decide the result's structure and must
be constants. With `add_bias_kv` the learned key and value bias_k, bias_v (1, 1, E) are appended to
every example's keys and values after the projections (one more key position), with
`add_zero_attn` a zero key and value after that, as in F.multi_head_attention_forward; the masks
get a column per appended key that hides nothing. bias_k and bias_v are read by no linear map:
they fall back, while the projections stay blocks. Configurations the lowering does not cover (a
subclass, those two flags given as traced values) keep the module opaque, and its parameters fall
back with that reason.
"""
from __future__ import annotations

import contextlib
import inspect
import math

import torch
import torch.nn.functional as F
from torch import fx, nn

from .rewrite import recompiled


def mask_scores(scores, attn_mask, key_padding_mask, is_causal: bool, need_weights: bool, appended: int = 0):
    """Attention scores (N, H, T, S) with nn.MultiheadAttention's masks applied: boolean masks
    set -inf where True, float masks are added. The last `appended` of the S keys (bias_k, the zero
    attention) are not in the masks given: their columns are padded with 0 / False, masking nothing. `is_causal` is torch's hint that `attn_mask` is the
    causal mask: as in F.multi_head_attention_forward, it needs the mask, and where torch hands the
    hint to scaled_dot_product_attention instead (no key_padding_mask, need_weights=False) the
    future (key j > query i) is masked in place of `attn_mask`. A leaf of the traced graph
    (torch.fx.wrap): it branches on the masks' presence and dtype and on `is_causal` at run time."""
    n, h, t, s = scores.shape
    attn_mask, key_padding_mask = (None if mask is None else F.pad(mask, (0, appended))
                                   for mask in (attn_mask, key_padding_mask))
    if is_causal and attn_mask is None:
        raise RuntimeError("nn.MultiheadAttention was called with is_causal=True and no attn_mask, which torch "
                           "rejects too: pass the causal mask as attn_mask (nn.Transformer."
                           "generate_square_subsequent_mask) together with the is_causal hint")
    if is_causal and key_padding_mask is None and not need_weights:
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
    """The computation of one nn.MultiheadAttention call as explicit functional ops. `sources[i]`
    is the position in (query, key, value) of the first of them that is the same tensor as the
    i-th: (0, 0, 0) for self-attention, (0, 1, 1) for keys and values read from one memory."""

    def __init__(self, mha: nn.MultiheadAttention, sources: tuple[int, int, int], need_weights: bool,
                 average_attn_weights: bool):
        super().__init__()
        self.packed = mha._qkv_same_embed_dim
        if self.packed:
            self.in_proj_weight = mha.in_proj_weight
        else:
            self.q_proj_weight, self.k_proj_weight, self.v_proj_weight = (
                mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        self.in_proj_bias, self.out_proj = mha.in_proj_bias, mha.out_proj
        self.bias_k, self.bias_v, self.add_zero_attn = mha.bias_k, mha.bias_v, mha.add_zero_attn
        self.heads, self.head_dim, self.p = mha.num_heads, mha.head_dim, mha.dropout
        self.batch_first, self.sources = mha.batch_first, sources
        self.need_weights, self.average = need_weights, average_attn_weights

    def _projections(self, query, key, value):
        """q, k, v (N, T or S, embed_dim): the packed map of each distinct input, chunked, or the
        three separate maps."""
        inputs = tuple(x if self.batch_first else x.transpose(0, 1) for x in (query, key, value))
        if not self.packed:
            biases = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
            return tuple(F.linear(inputs[i], weights[i], biases[i]) for i in range(3))  # biases: traced, not iterable
        maps = {}
        for source in self.sources:
            if source not in maps:
                maps[source] = F.linear(inputs[source], self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return tuple(maps[source][i] for i, source in enumerate(self.sources))

    def _appended_keys(self, k, v):
        """k, v (N, S, embed_dim) with bias_k, bias_v appended to every example's keys and values,
        then a zero key and value (add_zero_attn), where the module has them."""
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(k.shape[0], -1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(v.shape[0], -1, -1)], dim=1)
        if self.add_zero_attn:
            k, v = F.pad(k, (0, 0, 0, 1)), F.pad(v, (0, 0, 0, 1))
        return k, v

    def forward(self, query, key, value, key_padding_mask=None, attn_mask=None, is_causal=False):
        q, k, v = self._projections(query, key, value)
        q, k, v = (x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2) for x in (q, *self._appended_keys(k, v)))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        appended = int(self.bias_k is not None) + int(self.add_zero_attn)
        masked = mask_scores(scores, attn_mask, key_padding_mask, is_causal, self.need_weights, appended)
        weights = F.softmax(masked, dim=-1)
        out = self.out_proj((F.dropout(weights, self.p, training=True) @ v).transpose(1, 2).flatten(2))  # (N, T, E)
        # in torch's layout, (T, N, E) contiguous, viewed as (N, T, E) under batch_first: a dropout after the
        # attention fills its mask in memory order, so only this layout draws the module's masks from its seed
        out = out.transpose(0, 1).contiguous()
        if self.batch_first:
            out = out.transpose(0, 1)
        if not self.need_weights:
            return out, None
        return out, weights.mean(1) if self.average else weights


_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
         "is_causal")
_INPUTS = tuple(inspect.signature(_LoweredMHA.forward).parameters.values())[1:]  # its placeholders


def _sources(query, key, value) -> tuple[int, int, int]:
    """`_LoweredMHA.sources` of a call (tensors, or the graph nodes that compute them)."""
    inputs = (query, key, value)
    return tuple(next(j for j, y in enumerate(inputs) if y is x) for x in inputs)


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
        if _not_lowerable(mha, {}, need_weights, average_attn_weights):
            return torch_forward(mha, query, key, value, key_padding_mask, need_weights, attn_mask,
                                 average_attn_weights, is_causal)
        lowered = _LoweredMHA(mha, _sources(query, key, value), need_weights, average_attn_weights)
        return _LoweredMHA.forward(lowered, query, key, value, key_padding_mask, attn_mask, is_causal)

    nn.MultiheadAttention.forward = forward
    try:
        yield
    finally:
        nn.MultiheadAttention.forward = torch_forward


def _call_args(node: fx.Node) -> dict:
    values = dict(zip(_ARGS, node.args))
    values.update(node.kwargs)
    return values


def _not_lowerable(mha: nn.MultiheadAttention, uses, need_weights, average_attn_weights) -> str:
    """Why this call cannot be lowered ('' if it can)."""
    if type(mha) is not nn.MultiheadAttention:
        return "a subclass of nn.MultiheadAttention"
    for name, flag in (("need_weights", need_weights), ("average_attn_weights", average_attn_weights)):
        if isinstance(flag, fx.Node) and need_weights:  # without weights, their average is moot
            return (f"{name} is a value computed in the forward (node {flag.name}), not a constant: it decides "
                    f"the structure of the result")
    if uses is None:
        return "its result is used whole rather than as (output, weights)"
    if not need_weights and any(u.users for u in uses.get(1, [])):
        return "the attention weights are used although need_weights=False"
    return ""


# why in_proj_bias falls back with separate projection weights (kdim/vdim)
SEPARATE_BIAS = ("inside nn.MultiheadAttention {path!r}: with separate q/k/v projection weights (kdim/vdim) "
                 "in_proj_bias holds the biases of three linear maps, so no one block holds it")


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
    modules = dict(gm.named_modules(remove_duplicate=False))
    for node in list(gm.graph.nodes):
        if (node.op != "call_module" or node.target in keep
                or not isinstance(modules[node.target], nn.MultiheadAttention)):
            continue
        mha, call, uses = modules[node.target], _call_args(node), _result_uses(node)
        need_weights, average = call.get("need_weights", True), call.get("average_attn_weights", True)
        why = _not_lowerable(mha, uses, need_weights, average)
        if why:
            node.meta["gnfx_fallback_reason"] = f"inside nn.MultiheadAttention {node.target!r}, not lowered: {why}"
            continue
        lowered = _LoweredMHA(mha, _sources(call["query"], call["key"], call["value"]), need_weights, average)
        sub = fx.symbolic_trace(lowered)
        inputs = {p.name: call.get(p.name, p.default) for p in _INPUTS}
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
                    if not lowered.packed and any(a.op == "get_attr" and a.target == "in_proj_bias"
                                                  for a in n.all_input_nodes):
                        env[n].meta["gnfx_fallback_reason"] = SEPARATE_BIAS.format(path=node.target)
        for index, getitems in uses.items():
            for user in getitems:
                if result[index] is not None:
                    user.replace_all_uses_with(result[index])
                gm.graph.erase_node(user)
        gm.graph.erase_node(node)
    return recompiled(gm)
