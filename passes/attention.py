"""Attention detection: find attention in the graph and mark the projections that feed it.

Three forms are recognized, in both graph forms:
  * `F.scaled_dot_product_attention` / `aten.scaled_dot_product_attention` (q, k, v are its inputs);
  * the hand-written `softmax(q kᵀ / √d (+ mask)) v`, masks and dropout included, found by
    subgraph matching with networkx: the graph is contracted over the ops that may sit between
    the two products (scaling, masking, dropout, casts), and the pattern
    `matmul -> softmax -> matmul` is matched with `DiGraphMatcher`;
  * nn.MultiheadAttention, lowered beforehand into the hand-written form (passes/mha.py).
The q, k and v operands (and the attention output) are followed through shape ops (view,
reshape, transpose, split, chunk, getitem, ...) to the linear blocks that produce (consume) them,
which get the role "attention.q", ".k", ".v" (".qkv" for a fused projection: one block that
computes several of them, at one site or, as nn.MultiheadAttention's cross-attention, at several)
or ".out". Between a projection and the attention there may be a rotary position embedding
(RoPE: `q·cos + rotate_half(q)·sin`, or the complex form `view_as_real(view_as_complex(q) ·
freqs)`): an operand that is no shape view of a block is followed back through elementwise
products, sums, negations, concatenations and casts, and is the rotated output of the one block
found that way (none, or several, and it has no producer). Keys and values may have positions
appended after the projection (nn.MultiheadAttention's bias_k, bias_v and zero attention: a `cat`
with a "position" block, a zero `pad`): position blocks are no projection, and a pad is followed as
a shape op.
"""
from __future__ import annotations

import operator

import networkx as nx
import torch
import torch.nn.functional as F
from networkx.algorithms.isomorphism import DiGraphMatcher
from torch import fx

from .mha import mask_scores

aten = torch.ops.aten

SDPA = (F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default)
SOFTMAX = (F.softmax, torch.softmax, aten.softmax.int, aten._softmax.default, "softmax")
MATMUL = (operator.matmul, torch.matmul, torch.bmm, torch.baddbmm, aten.matmul.default, aten.bmm.default,
          aten.baddbmm.default, "matmul", "bmm", "baddbmm")
# ops that may stand between q kᵀ and softmax, or between softmax and the product with v
BETWEEN = (operator.mul, operator.truediv, operator.add, torch.mul, torch.div, torch.add, F.dropout,
           torch.dropout, torch.where, aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten.dropout.default,
           aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self, aten._to_copy.default,
           "masked_fill", "masked_fill_", "div", "mul", "add", "to", "float", "type_as", mask_scores)
SHAPE = (operator.getitem, torch.reshape, torch.transpose, torch.permute, torch.split, torch.chunk, torch.flatten,
         aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.transpose.int,
         aten.permute.default, aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default,
         aten.unflatten.int, aten.expand.default, aten.clone.default, aten.contiguous.default,
         aten.t.default, aten.unsqueeze.default, aten.squeeze.dim, aten.select.int, aten.slice.Tensor,
         aten.unbind.int, "view", "reshape", "transpose", "permute", "split", "chunk", "contiguous", "flatten",
         aten.mT.default, aten.numpy_T.default, aten.flatten.using_ints,
         "unflatten", "unbind", "expand", "t", "mT", F.pad, aten.constant_pad_nd.default, aten.pad.default)


def _is(node: fx.Node, ops) -> bool:
    if node.op == "call_method":
        return node.target in ops
    if node.op == "call_function":
        if node.target is getattr:  # x.T, x.mT
            return node.args[1] in ops
        return node.target in ops
    return False


def _category(node: fx.Node) -> str | None:
    for name, ops in (("matmul", MATMUL), ("softmax", SOFTMAX), ("between", BETWEEN)):
        if _is(node, ops):
            return name
    return None


def find_handwritten(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node, fx.Node]]:
    """(q kᵀ product, softmax, product with v) of every hand-written attention in the graph."""
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        g.add_node(node, category=_category(node))
        for src in node.all_input_nodes:
            g.add_edge(src, node)
    # contract the 'between' nodes: an edge u -> v for every path u -> between* -> v
    contracted = nx.DiGraph()
    for node, cat in g.nodes(data="category"):
        if cat in ("matmul", "softmax"):
            contracted.add_node(node, category=cat)
    for node in contracted.nodes:
        stack, seen = list(g.successors(node)), set()
        while stack:
            nxt = stack.pop()
            if nxt in seen:
                continue
            seen.add(nxt)
            if nxt in contracted:
                contracted.add_edge(node, nxt)
            elif g.nodes[nxt]["category"] == "between":
                stack.extend(g.successors(nxt))
    pattern = nx.DiGraph([("scores", "softmax"), ("softmax", "mix")])
    nx.set_node_attributes(pattern, {"scores": "matmul", "softmax": "softmax", "mix": "matmul"}, "category")
    matcher = DiGraphMatcher(contracted, pattern, node_match=lambda a, b: a["category"] == b["category"])
    found = []
    for mapping in matcher.subgraph_monomorphisms_iter():
        inverse = {v: k for k, v in mapping.items()}
        mix = inverse["mix"]
        # the softmax output must be the left operand of the product with v
        scores = inverse["scores"]
        # the softmax output must be the left operand of the product with v, and neither product
        # may involve a weight (softmax between two linear maps is not attention)
        if (_reaches(_operands(mix)[0], inverse["softmax"])
                and not any(_is_weight(x) for x in _operands(scores) + _operands(mix))):
            found.append((scores, inverse["softmax"], mix))
    return found


def _operands(product: fx.Node) -> list:
    """The two factors of a matrix product (baddbmm's are its 2nd and 3rd arguments)."""
    args = list(product.args)
    return args[1:3] if _is(product, (torch.baddbmm, aten.baddbmm.default, "baddbmm")) else args[:2]


def _is_weight(node) -> bool:
    """A parameter, or a transpose or view of one."""
    while isinstance(node, fx.Node):
        if node.op == "get_attr":
            return True
        if not _is(node, SHAPE) or not node.args:
            return False
        node = node.args[0]
    return False


def _reaches(node, target) -> bool:
    """Whether `node` is `target` or derives from it through 'between' ops only."""
    while isinstance(node, fx.Node):
        if node is target:
            return True
        if _category(node) != "between" or not node.args:
            return False
        node = next((a for a in node.args if isinstance(a, fx.Node) and _depends(a, target)), None)
    return False


def _depends(node, target) -> bool:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n is target:
            return True
        if n in seen or _category(n) not in ("between", None) or n.op == "placeholder":
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


# the ops of a rotary position embedding, besides shape ops (the rotation of q or k by cos, sin)
ROTATION = (operator.mul, operator.add, operator.sub, operator.neg, torch.mul, torch.add, torch.sub, torch.neg,
            torch.cat, torch.stack, torch.view_as_complex, torch.view_as_real, aten.mul.Tensor, aten.add.Tensor,
            aten.sub.Tensor, aten.neg.default, aten.cat.default, aten.stack.default, aten.view_as_complex.default,
            aten.view_as_real.default, aten._to_copy.default, aten.to.dtype, aten.type_as.default,
            "mul", "add", "sub", "neg", "float", "to", "type_as")
MAX_ROTATION_NODES = 256  # how far back the search for a rotated projection looks


def _producer(node, site_of) -> fx.Node | None:
    """The block site whose output `node` is, through shape ops, or through a rotary embedding."""
    start = node
    while isinstance(node, fx.Node):
        if node in site_of:
            return node
        if not _is(node, SHAPE) or not node.args:
            return _rotated(start, site_of)
        node = node.args[0]
    return None


def _rotated(node, site_of) -> fx.Node | None:
    """The one block site reached from `node` backwards through shape and rotation ops, else None."""
    found, seen, stack = set(), set(), [node]
    while stack and len(seen) < MAX_ROTATION_NODES:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in site_of:
            found.add(n)
        elif _is(n, SHAPE) or _is(n, ROTATION):
            stack.extend(n.all_input_nodes)
    return found.pop() if len(found) == 1 and not stack else None


def _consumers(node, site_of) -> list:
    """The block sites that read `node` as their input, through shape ops."""
    out, stack = [], [node]
    while stack:
        n = stack.pop()
        for user in n.users:
            if user in site_of and site_of[user].input is n:
                out.append(user)
            elif _is(user, SHAPE):
                stack.append(user)
    return out


def mark_attention(gm: fx.GraphModule, blocks, block_sites) -> int:
    """Set `block.role` of the projections around each attention; returns the number found."""
    site_of = {s.node: s for b in blocks if b.kind != "position" for s in block_sites.get(b.name, [])}
    block_of = {s.node: b for b in blocks for s in block_sites.get(b.name, [])}
    attentions = []
    for node in gm.graph.nodes:
        if _is(node, SDPA):
            attentions.append((node.args[0], node.args[1], node.args[2], node))
    for scores, _, mix in find_handwritten(gm):
        (q, k), v = _operands(scores), _operands(mix)[1]
        attentions.append((q, k, v, mix))
    for q, k, v, out in attentions:
        sources = {role: _producer(x, site_of) for role, x in (("q", q), ("k", k), ("v", v))}
        for role, site in sources.items():
            if site is not None:  # one block computing several of q, k, v (at one site or more) is fused
                fused = sum(s is not None and block_of[s] is block_of[site] for s in sources.values()) > 1
                block_of[site].role = "attention.qkv" if fused else f"attention.{role}"
        for site in _consumers(out, site_of):
            block_of[site].role = "attention.out"
    return len(attentions)
