"""leaf_outputs: the tuple or list an opaque submodule returns, in torch.fx's trace as the module returns it.

torch.fx records the call of a submodule it keeps opaque (one it could not trace, or one leaf_modules names) as
one node whose value while tracing is a Proxy, whatever the module returns. Python code after the call that
tests that value's type takes the branch for a non-container, silently: speechbrain's Sequential runs
`x = layer(x); if isinstance(x, tuple): x = x[0]` after each layer, and after its RNN wrappers (untraceable:
they branch on `x.ndim`), which return (output, hidden), the traced graph passed the whole tuple to the next
layer and failed at its first run ("'tuple' object has no attribute 'ndim'"); code that reads the tuple
otherwise would compute something else without failing.

torch.nn's own leaves return containers too, known from their type without a call: (output, h_n) of nn.RNN and
nn.GRU, (output, (h_n, c_n)) of nn.LSTM, (h, c) of nn.LSTMCell, (output, weights or None) of
nn.MultiheadAttention, (values, indices) of a pooling with `return_indices=True`. The same branch
`if isinstance(out, tuple): out = out[0]` after an nn.GRU traced the branch for a tensor, whose graph failed
("tuple indices must be integers") at its first call; `torch_nn_structure` gives those outputs their structure in
every trace.

`output_structures` reads the structure of what each submodule returns from one run of the example call that
leaves no trace: for a tuple or a list (exactly those types, nested), its type and each element's structure,
None for an element that is None, VALUE for any other; `unpacked` gives the trace a leaf's output in that
structure, each element an indexing node of the call (`out[0]`, `out[1][0]`), so that the code after it
takes the branch the module's real output takes.
"""
from __future__ import annotations

import inspect

from torch import fx, nn

from .python_random import kept_state
from .validation_checks import without_trace

VALUE = "value"  # an element that is neither a tuple, a list nor None: a Proxy in the trace
CONFLICTING = "conflicting"  # a module whose calls returned differently structured values: left a Proxy


def _structure(value):
    """The structure of `value` (module doc): (tuple or list, the elements' structures), None or VALUE."""
    if type(value) in (tuple, list):
        return type(value), tuple(_structure(x) for x in value)
    return None if value is None else VALUE


PAIR = (tuple, (VALUE, VALUE))
LSTM_OUTPUT = (tuple, (VALUE, PAIR))


def torch_nn_structure(module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
    """The structure (`_structure`'s form) of what a torch.nn leaf `module` returns on the call (args, kwargs), known
    from its type (module doc); None for a module that returns one value, or whose structure depends on a traced
    value."""
    if isinstance(module, nn.LSTM):
        return LSTM_OUTPUT
    if isinstance(module, (nn.RNN, nn.GRU, nn.LSTMCell)):
        return PAIR
    if isinstance(module, nn.MultiheadAttention):
        need_weights = inspect.signature(module.forward).bind(*args, **kwargs).arguments.get("need_weights", True)
        return None if isinstance(need_weights, fx.Proxy) else (tuple, (VALUE, VALUE if need_weights else None))
    return PAIR if getattr(module, "return_indices", False) is True else None


def output_structures(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, tuple]:
    """{submodule path: the structure of its output} for each submodule of `model` that returns a tuple or a
    list on the call model(*args, **kwargs), run once leaving no trace; a submodule called several times with
    outputs of different structures is left out, and so is every one if the forward raises (its own error is
    what capture reports)."""
    seen: dict[str, object] = {}
    handles = []
    for path, module in model.named_modules():
        if path:
            def hook(_, __, output, path=path):
                structure = _structure(output)
                if seen.setdefault(path, structure) != structure:
                    seen[path] = CONFLICTING
            handles.append(module.register_forward_hook(hook))
    try:
        with kept_state(), without_trace(model, args, kwargs):
            model(*args, **kwargs)
    except Exception:  # noqa: BLE001 - the model's own error is raised by capture where it matters
        return {}
    finally:
        for handle in handles:
            handle.remove()
    return {path: s for path, s in seen.items() if isinstance(s, tuple)}


def unpacked(proxy: fx.Proxy, structure: tuple, made: list[fx.Node]):
    """`proxy`, the value of a leaf's call, as the container `structure` of indexing proxies; the nodes made
    are appended to `made` (those no code reads are erased after the trace: `erase_unread`)."""
    kind, items = structure
    elements = []
    for i, item in enumerate(items):
        if item is None:
            elements.append(None)
            continue
        element = proxy[i]
        made.append(element.node)
        elements.append(element if item == VALUE else unpacked(element, item, made))
    return kind(elements)


def erase_unread(graph: fx.Graph, made: list[fx.Node]) -> None:
    """Erase the indexing nodes of `made` (`unpacked`) that nothing reads, the innermost first."""
    for node in reversed(made):
        if node.graph is graph and not node.users:
            graph.erase_node(node)
