"""rewrite: insert tap nodes around every call site of every block that collects statistics.

For a site `z = linear(a, W, b)` the graph becomes

    a_tap = self.gnfx_taps.<block>_a(a)
    z = linear(a_tap, W, b)
    z_tap = self.gnfx_taps.<block>_z(z, a_tap)

and every former user of `z` reads `z_tap`. The taps are submodules under `gnfx_taps`, so they are
visible in `graph_module.code` and in `print(graph_module)`. A site in the graph of a layer opened
inside an opaque submodule (passes/opaque_children.py) gets its taps in that graph, under its own
`gnfx_taps`.
"""
from __future__ import annotations

from torch import fx, nn

from gnfx.taps import ActivationTap, ErrorTap


def insert_taps(gm: fx.GraphModule, block_sites: dict, store) -> fx.GraphModule:
    """Wrap each site's input and output in taps bound to the block's statistics in `store`, in the
    graph of the site (`gm`, or an opened child's graph)."""
    owners = {id(gm): gm}
    gm.add_module("gnfx_taps", nn.Module())
    for block_name, sites in block_sites.items():
        if block_name not in store.blocks:
            continue
        stats = store[block_name]
        for k, site in enumerate(sites):
            stem = block_name.replace(".", "_") + (f"_{k}" if len(sites) > 1 else "")
            node = site.node
            owner = node.graph.owning_module
            if id(owner) not in owners:
                owners[id(owner)] = owner
                owner.add_module("gnfx_taps", nn.Module())
            owner.gnfx_taps.add_module(f"{stem}_a", ActivationTap(stats, store))
            owner.gnfx_taps.add_module(f"{stem}_z", ErrorTap(stats, store))
            graph = node.graph
            with graph.inserting_before(node):
                a_tap = graph.call_module(f"gnfx_taps.{stem}_a", (site.input,))
            node.replace_input_with(site.input, a_tap)
            with graph.inserting_after(node):
                z_tap = graph.call_module(f"gnfx_taps.{stem}_z", (node, a_tap))
            node.replace_all_uses_with(z_tap, delete_user_cb=lambda user: user is not z_tap)
            for n in (a_tap, z_tap):
                n.meta["gnfx_role"] = "tap"
            node.meta["gnfx_role"] = site.kind
            node.meta["gnfx_block"] = block_name
    for owner in owners.values():
        owner.graph.lint()
        owner.recompile()
    return gm
