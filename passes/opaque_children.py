"""opaque_children: curvature blocks for the layers inside submodules that torch.fx keeps opaque.

A submodule whose forward torch.fx cannot trace (a branch on a tensor's value) or whose Python-level
random draws decide the graph (passes/python_random.py) is one opaque call in the captured graph
(passes/capture.py), and its parameters would all fall back to the diagonal preconditioner. Its
Python code runs eagerly at every call, but the torch.nn layers it calls (`self.fc1(x)`) are
modules with a known forward. For each such child (a torch.nn module without submodules, of one
input, whose trainable parameters belong to it alone) this pass builds its own small graph

    input ─▶ call_module(child) ─▶ output

(rooted at the model, so its parameters keep their names) and runs it through the same lowering and
analysis as the captured graph (`build`). A child whose graph is all curvature blocks is *opened*:
its blocks join the LayerTable, their sites in the child's graph, where the tap pass puts their taps
(passes/taps.py), and each call node of the opaque submodule in the captured graph calls an
`OpenedLeaf` (gnfx/opened_leaf.py) instead, which runs the submodule's own forward with the child's
graph in the child's place. The submodule's code still takes its branches anew at every call; each
call of an opened child is one site of its block (`Block.called_by`): called twice, its statistics
pool the two calls' rows as a tied weight's two sites do; not called by a forward, that forward adds
none (as a block its backward does not reach), and the weight has no gradient from it either.

Not opened, with the reason in the report: a child whose forward takes more than one input (an
nn.LSTM's `hx`, an nn.ConvTranspose's `output_size`), or has an instance-level `forward`; a child
whose parameter is registered under another name too (shared with a layer outside it); a child
inside an nn.MultiheadAttention (whose forward reads `out_proj.weight` without calling out_proj, so
its calls would not be all of the weight's uses); a child whose graph is not all blocks (a
pre-hook that computes the weight, a layer kind gnfx has no block for); anything inside a submodule
the user asked to keep opaque (`leaf_modules`), which stays whole. Only the captured graph's
blocks know their place in the model: an opened block's `model_input` and `model_output` are False.
"""
from __future__ import annotations

import dataclasses
import inspect

from torch import fx, nn

from gnfx.opened_leaf import OpenedLeaf
from gnfx.passes.capture import REQUESTED, Captured, _describe

OPENED = "opened: its layers are curvature blocks, called by the submodule's Python code"


def _single_input(module: nn.Module) -> bool:
    """Whether the module's forward takes exactly one input (no optional ones)."""
    params = list(inspect.signature(module.forward).parameters.values())
    return len(params) == 1 and params[0].default is inspect.Parameter.empty and params[0].kind in (
        inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _why_closed(model: nn.Module, leaf: str, path: str, module: nn.Module, names: dict) -> str | None:
    """Why the child `path` of the opaque submodule `leaf` is not opened (module doc), or None."""
    inside = path[len(leaf) + 1:].split(".")[:-1]
    for depth in range(len(inside)):
        if isinstance(model.get_submodule(".".join([leaf, *inside[:depth + 1]])), nn.MultiheadAttention):
            return "inside an nn.MultiheadAttention, whose forward reads its parameters without calling it"
    if "forward" in vars(module):
        return "it has an instance-level forward"
    if not _single_input(module):
        return "its forward takes more than one input, and an opened child's graph takes one"
    for name, p in module.named_parameters(prefix=path, recurse=False):
        others = [n for n in names[id(p)] if n != name]
        if others:
            return f"its parameter {name!r} is also registered as {others[0]!r} (shared)"
    return None


def _children(model: nn.Module, leaf: str):
    """The torch.nn modules without submodules inside `leaf` with trainable parameters of their own:
    (path, module)."""
    for name, m in model.get_submodule(leaf).named_modules(prefix=leaf):
        if (name != leaf and next(m.children(), None) is None and m.__module__.startswith(("torch.nn", "torch.ao.nn"))
                and any(p.requires_grad for p in m.parameters(recurse=False))):
            yield name, m


def _read_by_graph(gm: fx.GraphModule, leaves) -> set[int]:
    """The ids of the tensors the captured graph reads itself: by `get_attr`, and as parameters of the
    modules it calls other than its leaves."""
    read = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            obj = gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            read.add(id(obj))
        elif node.op == "call_module" and node.target not in leaves:
            read.update(id(p) for p in gm.get_submodule(node.target).parameters())
    return read


def _child_graph(model: nn.Module, path: str) -> fx.GraphModule:
    """The graph `input -> model.<path>(input) -> output` (the input named as the child's forward
    names it, for a call by keyword), rooted at the model (its parameters keep their names)."""
    graph = fx.Graph()
    name = next(iter(inspect.signature(model.get_submodule(path).forward).parameters))
    graph.output(graph.call_module(path, (graph.placeholder(name),)))
    return fx.GraphModule(model, graph, f"Opened_{path.replace('.', '_')}")


def open_opaque_children(model: nn.Module, gm: fx.GraphModule, table, block_sites: dict, build):
    """Open the children of the opaque submodules of `gm` (captured from `model`; `table` and
    `block_sites` its analysis) that can be (module doc): their blocks and sites join `table` and
    `block_sites`, and each call of an opaque submodule with opened children calls an OpenedLeaf.
    `build(captured)` lowers and analyzes a capture, returning (graph module, LayerTable, block sites).
    Returns (gm, table, block_sites)."""
    requested = [leaf for leaf, why in table.leaves.items() if why == REQUESTED]
    opaque = [leaf for leaf, why in table.leaves.items() if why != REQUESTED]
    if not opaque:
        return gm, table, block_sites
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    fallbacks = {f.param: f for f in table.fallbacks}
    read = _read_by_graph(gm, table.leaves)
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    calls = {leaf: [n for n in gm.graph.nodes if n.op == "call_module" and n.target == leaf] for leaf in opaque}
    placed = []  # (position in the graph, rank, block): the opened blocks at their submodule's first call
    for block in table.blocks:
        placed.append((order[block_sites[block.name][0].node], 0, block))
    for leaf in opaque:
        graphs = {}
        position = order[calls[leaf][0]] if calls[leaf] else len(order)
        for path, module in _children(model, leaf):
            if any(path == r or path.startswith(r + ".") for r in requested):
                continue  # kept whole, as asked
            why = _why_closed(model, leaf, path, module, names)
            params = [names[id(p)][0] for p in module.parameters(recurse=False) if p.requires_grad]
            if why is None:
                try:
                    child_gm, child_table, child_sites = build(Captured(_child_graph(model, path), "fx", {}))
                except Exception as exc:  # noqa: BLE001 - reported: the child stays closed
                    why = f"its graph could not be built ({_describe(exc)})"
            if why is None:
                left = [f for f in child_table.fallbacks if f.param in params]
                if left:
                    why = f"its graph leaves {left[0].param!r} out of the blocks: {left[0].reason}"
                elif any(id(p) in read for p in module.parameters(recurse=False)):
                    why = "its parameter is also read by the captured graph outside the submodule"
            table.opened[path] = OPENED if why is None else f"not opened: {why}"
            if why is not None:
                for param in params:
                    if param in fallbacks:
                        f = fallbacks[param]
                        fallbacks[param] = dataclasses.replace(f, reason=f"{f.reason}; {path} not opened: {why}")
                continue
            graphs[path[len(leaf) + 1:]] = child_gm
            for block in child_table.blocks:
                block.called_by, block.model_input, block.model_output = leaf, False, False
                placed.append((position, len(placed), block))
                block_sites[block.name] = child_sites[block.name]
                for param in block.params:
                    del fallbacks[param]
                    table.notes[param] = f"called by the Python code of opaque submodule {leaf!r}"
        if graphs:
            opened = OpenedLeaf(model.get_submodule(leaf), leaf, graphs)
            target = f"gnfx_opened.{leaf}"
            gm.add_submodule(target, opened)
            for node in calls[leaf]:
                node.target = target
    placed.sort(key=lambda entry: entry[:2])
    table.blocks[:] = [block for *_, block in placed]
    table.fallbacks[:] = list(fallbacks.values())
    table.reindex()
    gm.recompile()
    return gm, table, block_sites
