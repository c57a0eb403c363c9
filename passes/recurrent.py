"""Lowering of nn.LSTM, nn.GRU and nn.RNN and of their cells nn.LSTMCell, nn.GRUCell and nn.RNNCell
into explicit ops over the same parameters.

A `call_module` of a stock recurrent module becomes the graph of `_LoweredRecurrent.forward`,
inlined (gnfx.recurrent has the math): per layer and direction, the input products of the whole
sequence `F.linear(x, W_ih, b_ih)` (an ordinary linear site, rows (example, time)), then
`scan_rows` over time (`recurrent_scan`, or `packed_scan` on a PackedSequence), a leaf of the graph
(torch.fx.wrap) that computes the hidden products
`h_{t-1} W_hhᵀ + b_hh` and PyTorch's cell, and `hidden_product_site`, the site of W_hh's block
(gnfx.passes.hidden_product finds it); an LSTM with projections (proj_size > 0) passes W_hr to the scan,
which projects each step's output, and `projection_site` is the site of W_hr's block. Between layers,
dropout as the module draws it; the result is what the module returns, (output, h_n) or (output, (h_n, c_n)), in its layout (batch_first or not,
unbatched). A cell call (a `call_module`, or the aten.lstm_cell / gru_cell / rnn_tanh_cell /
rnn_relu_cell call torch.export records) becomes the graph of `_LoweredCell.forward`: its two products
`F.linear(x, W_ih, b_ih)` and `F.linear(h, W_hh, b_hh)`, ordinary linear sites, and PyTorch's cell
(`cell_step`); a cell called at every step of the model's loop is one weight at many sites. The
lowered graph only runs on statistic steps, in training mode (gnfx.compiled).

A call on a PackedSequence (packed by torch.nn.utils.rnn's packing in the graph, gnfx.passes.capture.PACKING,
or reaching an opened child, passes/opaque_children.py) runs the same graph on the packed rows: the leaves
`input_rows`, `first_state`, `scan_rows`, `between_layers_dropout` and `recurrent_output` tell the two
inputs apart at run time. Kept opaque, their parameters falling back with the reason: a subclass of a
recurrent module or cell with its own forward, a call with other arguments than (input, hx), and the
paths in `keep`.
A PackedSequence that reaches the module otherwise (fx cannot tell it from a tensor) raises a
GnfxError at run time that names the fix, leaf_modules.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from gnfx.recurrent import (cell_inputs, cell_result, cell_step, first_state, hidden_offset, hidden_product_site,
                            input_rows, projection_site, recurrent_output, scan_rows, between_layers_dropout,
                            site_rows)

from .rewrite import recompiled, replace


for _name in ("cell_inputs", "cell_result", "cell_step", "first_state", "hidden_offset", "hidden_product_site",
              "input_rows", "projection_site", "recurrent_output", "scan_rows", "between_layers_dropout", "site_rows"):
    torch.fx.wrap(_name)

RECURRENT = (nn.LSTM, nn.GRU, nn.RNN)
CELLS = (nn.LSTMCell, nn.GRUCell, nn.RNNCell)
aten = torch.ops.aten
# the op torch.export records for each cell, and the module of that cell
_ATEN = {aten.lstm.input: "LSTM", aten.gru.input: "GRU", aten.rnn_tanh.input: "RNN_TANH",
         aten.rnn_relu.input: "RNN_RELU"}
_MODULES = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN_TANH": nn.RNN, "RNN_RELU": nn.RNN}
# the op torch.export records for one step of a cell module, and the module
_ATEN_CELLS = {aten.lstm_cell.default: "LSTM", aten.gru_cell.default: "GRU", aten.rnn_tanh_cell.default: "RNN_TANH",
               aten.rnn_relu_cell.default: "RNN_RELU"}
_CELL_MODULES = {"LSTM": nn.LSTMCell, "GRU": nn.GRUCell, "RNN_TANH": nn.RNNCell, "RNN_RELU": nn.RNNCell}
_CELL_WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


class _LoweredRecurrent(nn.Module):
    """The computation of one recurrent module call as explicit ops (module docstring); it reads the
    module's parameters as `rnn.<name>`. `flat`: the result as the aten op's, (output, h_n[, c_n])."""

    def __init__(self, module: nn.RNNBase, path: str, flat: bool):
        super().__init__()
        self.rnn, self.path, self.flat = module, path, flat

    def forward(self, input, hx=None):
        m = self.rnn
        lstm, directions, projected = m.mode == "LSTM", 2 if m.bidirectional else 1, m.proj_size > 0
        count = m.num_layers * directions
        x = input_rows(input, m.batch_first, self.path)
        h0 = first_state(input, x, hx, 0, count, m.proj_size if projected else m.hidden_size)
        c0 = first_state(input, x, hx, 1, count, m.hidden_size) if lstm else None
        last_h, last_c = [], []
        for layer in range(m.num_layers):
            outputs = []
            for direction in range(directions):
                suffix, k = f"_l{layer}" + ("_reverse" if direction else ""), layer * directions + direction
                bias = (lambda name: getattr(m, name + suffix)) if m.bias else (lambda name: None)
                gx = F.linear(site_rows(x, input), getattr(m, "weight_ih" + suffix), bias("bias_ih"))
                offset = hidden_offset(gx)
                w_hr, projection_offset = ((getattr(m, "weight_hr" + suffix), hidden_offset(gx, m.proj_size))
                                           if projected else (None, None))
                scan = scan_rows(gx, offset, getattr(m, "weight_hh" + suffix), bias("bias_hh"), h0[k],
                                 c0[k] if lstm else None, m.mode, bool(direction), input, w_hr, projection_offset)
                hidden_product_site(scan[1], offset)
                if projected:
                    projection_site(scan[4], projection_offset)
                outputs.append(scan[0])
                last_h.append(scan[2])
                last_c.append(scan[3])
            x = torch.cat(outputs, -1) if directions == 2 else outputs[0]
            if m.dropout and layer < m.num_layers - 1:
                x = between_layers_dropout(x, m.dropout, input)
        return recurrent_output(input, m.batch_first, x, torch.stack(last_h), torch.stack(last_c) if lstm else None,
                                self.flat)


class _LoweredCell(nn.Module):
    """One call of a cell module as explicit ops (module docstring); it reads the cell's parameters as
    `cell.<name>`. `kind`: the cell's mode (LSTM, GRU, RNN_TANH or RNN_RELU, gnfx.recurrent.cell_step)."""

    def __init__(self, cell: nn.RNNCellBase, path: str):
        super().__init__()
        self.cell, self.path = cell, path
        self.kind = (f"RNN_{cell.nonlinearity.upper()}" if isinstance(cell, nn.RNNCell)
                     else "LSTM" if isinstance(cell, nn.LSTMCell) else "GRU")

    def forward(self, input, hx=None):
        m = self.cell
        x, h, c = cell_inputs(self.path, input, hx, m.hidden_size, self.kind == "LSTM")
        gx = F.linear(x, m.weight_ih, m.bias_ih)
        hp = F.linear(h, m.weight_hh, m.bias_hh)
        return cell_result(input, cell_step(self.kind, gx, hp, h, c))


def _not_lowerable(module: nn.Module, node: fx.Node) -> str:
    """Why this module call cannot be lowered ('' if it can)."""
    stock = next(k for k in RECURRENT + CELLS if isinstance(module, k))
    if type(module).forward is not stock.forward:
        return f"a subclass of nn.{stock.__name__} with its own forward"
    if len(node.args) + len(node.kwargs) > 2 or set(node.kwargs) - {"input", "hx"}:
        return "called with arguments other than (input, hx)"
    return ""


def _exported(gm: fx.GraphModule, node: fx.Node):
    """(a stock module of the configuration of an aten recurrent call, on the meta device; its
    parameters' nodes by name)."""
    x, hx, params, bias, layers, dropout, train, bidirectional, batch_first = node.args
    per_direction = 4 if bias else 2
    # an LSTM with projections: each direction's weights end with W_hr (P, H)
    projected = len(params) == layers * (1 + bidirectional) * (per_direction + 1)
    proj_size = operator.attrgetter(params[per_direction].target)(gm).shape[0] if projected else 0
    module = _on_meta(_MODULES, _ATEN[node.target], gm, params, layers, bias=bias, batch_first=batch_first,
                      dropout=dropout if train and layers > 1 else 0.0, bidirectional=bidirectional,
                      proj_size=proj_size)
    return module, dict(zip(module._flat_weights_names, params))


def _exported_cell(gm: fx.GraphModule, node: fx.Node):
    """(a stock cell module of the configuration of an aten cell call, on the meta device; its
    parameters' nodes by name)."""
    params = [p for p in node.args[2:] if p is not None]
    module = _on_meta(_CELL_MODULES, _ATEN_CELLS[node.target], gm, params, bias=len(params) == 4)
    return module, dict(zip(_CELL_WEIGHTS, params))


def _on_meta(modules: dict, mode: str, gm: fx.GraphModule, params: list, *args, proj_size: int = 0,
             **kwargs) -> nn.Module:
    """The module of `mode` (LSTM, GRU, RNN_TANH or RNN_RELU) in `modules`, on the meta device, of the
    sizes of the weights W_ih, W_hh that the nodes `params` begin with (W_hh (4H, P) for an LSTM with
    proj_size P > 0, else (G, H)), and the other arguments given."""
    w_ih, w_hh = (operator.attrgetter(p.target)(gm) for p in params[:2])
    options = ({"nonlinearity": mode[4:].lower()} if mode.startswith("RNN")
               else {"proj_size": proj_size} if proj_size else {})
    hidden = w_hh.shape[0] // 4 if proj_size else w_hh.shape[1]
    return modules[mode](w_ih.shape[1], hidden, *args, device="meta", **kwargs, **options)


def _lowerable(gm: fx.GraphModule, modules: dict, node: fx.Node, path: str):
    """(the lowered module of a recurrent or cell call, its arguments {input, hx}, its parameters' nodes
    by name), or the reason why the call cannot be lowered."""
    if node.op == "call_module":
        module = modules[path]
        why = _not_lowerable(module, node)
        if why:
            return why
        cell = isinstance(module, CELLS)
        names = [n for n in _CELL_WEIGHTS if getattr(module, n) is not None] if cell else module._flat_weights_names
        with gm.graph.inserting_before(node):
            params = {name: gm.graph.get_attr(f"{path}.{name}") for name in names}
        lowered = _LoweredCell(module, path) if cell else _LoweredRecurrent(module, path, flat=False)
        return lowered, dict(zip(("input", "hx"), node.args), **node.kwargs), params
    call = {"input": node.args[0], "hx": node.args[1]}
    if node.target in _ATEN_CELLS:
        module, params = _exported_cell(gm, node)
        return _LoweredCell(module, path), call, params
    module, params = _exported(gm, node)
    return _LoweredRecurrent(module, path, flat=True), call, params


def _inline(gm: fx.GraphModule, node: fx.Node, lowered: nn.Module, call: dict, params: dict) -> fx.Node:
    """Insert before `node` the graph of `lowered` (a `_LoweredRecurrent` or `_LoweredCell`) on the
    `call` arguments (input, hx), reading the parameters from the nodes `params` (by name); the node
    of its result."""
    sub = fx.symbolic_trace(lowered)
    values = {n: call.get(n.target) if n.op == "placeholder" else params[n.target.partition(".")[2]]
              for n in sub.graph.nodes if n.op in ("placeholder", "get_attr")}
    given = set(values)
    with gm.graph.inserting_before(node):
        result = gm.graph.graph_copy(sub.graph, values)
    for traced, copied in values.items():
        if traced not in given:
            copied.meta.update({k: v for k, v in node.meta.items() if k == "nn_module_stack"},
                               gnfx_module=lowered.path)
    return result


def _call(gm: fx.GraphModule, modules: dict, node: fx.Node):
    """(module path, module class name) of a recurrent call: a `call_module` of nn.LSTM / nn.GRU / nn.RNN
    or of their cells, or an aten.lstm / gru / rnn_tanh / rnn_relu call or one of their cells' ops
    (its path from `nn_module_stack`); None for any other node."""
    if node.op == "call_module" and isinstance(modules[node.target], RECURRENT + CELLS):
        return node.target, type(modules[node.target]).__name__
    if node.op == "call_function" and (node.target in _ATEN or node.target in _ATEN_CELLS):
        stack = list(node.meta.get("nn_module_stack", {}).values())
        return (stack[-1][0], stack[-1][1].rpartition(".")[2]) if stack else ("", str(node.target))
    return None


def lower_recurrent(gm: fx.GraphModule, keep=()) -> fx.GraphModule:
    """Inline every lowerable nn.LSTM / nn.GRU / nn.RNN call and cell call (nn.LSTMCell / nn.GRUCell /
    nn.RNNCell) of `gm` (a `call_module` of an fx graph, the aten op of an exported one) as explicit
    ops, except the module paths in `keep`."""
    modules = dict(gm.named_modules(remove_duplicate=False))
    for node in list(gm.graph.nodes):
        found = _call(gm, modules, node)
        if found is None or found[0] in keep:
            continue
        path, kind = found
        lowerable = _lowerable(gm, modules, node, path)
        if isinstance(lowerable, str):
            node.meta["gnfx_fallback_reason"] = f"inside {kind} {path!r}, not lowered: {lowerable}"
            continue
        result = _inline(gm, node, *lowerable)
        replace(gm, node, result)
    return recompiled(gm)
