"""The output layer: the blocks whose output the model returns.

A block is an output block when one of the tensors the graph returns is its output, directly or
through shape ops (view, reshape, transpose, ...; followed back as attention.py's `_producer`
follows q, k and v): the classifier head of an MLP or CNN, the unembedding of a language model,
the last layer of an autoencoder. Preconditioners that treat the last layer differently from the
hidden ones (Muon, gnfx/preconditioners/muon.py) read `block.model_output`.
"""
from __future__ import annotations

from torch import fx
from torch.utils import _pytree

from .attention import _producer


def mark_output(gm: fx.GraphModule, blocks, block_sites) -> int:
    """Set `block.model_output` of the blocks whose output the graph returns; returns their number."""
    site_of = {s.node: s for sites in block_sites.values() for s in sites}
    block_of = {s.node: b for b in blocks for s in block_sites.get(b.name, [])}
    marked = 0
    for node in gm.graph.nodes:
        if node.op != "output":
            continue
        for leaf in _pytree.tree_leaves(node.args):
            site = _producer(leaf, site_of) if isinstance(leaf, fx.Node) else None
            if site is not None and not block_of[site].model_output:
                block_of[site].model_output = True
                marked += 1
    return marked
