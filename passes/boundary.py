"""The model's boundary layers: the blocks that read the model's input, and those whose output the
model returns.

A block is an input block when one of its call sites reads a model input (a placeholder of the
graph; one of a bilinear map's two inputs) directly or through shape ops (view, reshape, flatten, ...): the first layer of an MLP or a
CNN, an embedding. It is an output block when one of the tensors the graph returns is its output,
directly or through shape ops, or through the sums and products by which attention.py's `_producer`
follows q and k back through a rotary embedding, where they lead to this block alone: the
classifier head, the unembedding of a language model, the last layer of an autoencoder.
Preconditioners that treat these layers apart from the hidden ones (Muon,
gnfx/preconditioners/muon.py) read `block.model_input` and `block.model_output`.
"""
from __future__ import annotations

from torch import fx
from torch.utils import _pytree

from .attention import SHAPE, _is, _producer


def _reads_input(node) -> bool:
    """Whether `node` is a graph input, or a shape view of one."""
    while isinstance(node, fx.Node) and _is(node, SHAPE) and node.args:
        node = node.args[0]
    return isinstance(node, fx.Node) and node.op == "placeholder"


def mark_boundary(gm: fx.GraphModule, blocks, block_sites) -> None:
    """Set `block.model_input` and `block.model_output` (module doc)."""
    site_of = {s.node: s for sites in block_sites.values() for s in sites}
    block_of = {s.node: b for b in blocks for s in block_sites.get(b.name, [])}
    for block in blocks:
        block.model_input = any(_reads_input(x) for s in block_sites.get(block.name, [])
                                for x in (s.input if isinstance(s.input, tuple) else (s.input,)))
    for node in gm.graph.nodes:
        if node.op != "output":
            continue
        for leaf in _pytree.tree_leaves(node.args):
            site = _producer(leaf, site_of) if isinstance(leaf, fx.Node) else None
            if site is not None:
                block_of[site].model_output = True
