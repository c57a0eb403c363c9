"""opaque_root: the model's own forward as one opaque call, when neither torch.fx nor torch.export captures it.

A top-level forward that iterates over a list of targets (torchvision's detection models: `for target
in targets`), draws Python random numbers that pick its shapes (their training transform's image
size), or branches on floating-point data (`if h.sum() > 0`) is neither traced by torch.fx nor
exported by torch.export. Its code then runs as written at every call, as an opaque submodule's does
(passes/opaque_children.py), and so do the modules it calls: the graph is

    (*args, **kwargs) ─▶ OpenedLeaf(model) ─▶ output

whose one call is the opaque "submodule" at the path "" (the model itself, `leaves[""]`), and whose
children are opened by passes/opaque_children.py as any opaque submodule's are: the largest
traceable submodules whole (a ResNet backbone, an FPN), else the torch.nn layers, each a graph of its
own whose blocks collect their statistics at each of their calls. A trainable parameter that the
forward's own code uses directly (`x @ self.weight`), or that sits in a child that cannot be opened,
falls back to the diagonal preconditioner, with the reason. Its parameters keep the model's names.

A method of the model other than forward that gnfx.compile(methods=[...]) names (a reinforcement-learning
agent's `get_action_and_value`, stable-baselines3's `evaluate_actions`, which call the actor and critic
submodules themselves) is captured the same way, with the method in the forward's place:

    (*args, **kwargs) ─▶ OpenedLeaf(model).call(type(model).method) ─▶ output

its Python code runs at every call (distributions, sampling and all), the layers it calls are the
opened children's blocks.
"""
from __future__ import annotations

from torch import fx, nn

from gnfx import layer_table  # the module, not its names: gnfx.layer_table imports gnfx.variants, which imports this
from gnfx.opened_leaf import OpenedLeaf
from gnfx.passes.capture import REQUESTED, Captured
from gnfx.passes.opaque_children import OPENED_ROOT, ROOT_CALLER, open_opaque_children

USED_BY_ROOT = ("used by the Python code of the model's own forward, which runs at every call (neither torch.fx nor "
                "torch.export captured it)")
ROOT_OPAQUE = "neither torch.fx nor torch.export captured it: its Python code runs at every call"
USED_BY_METHOD = "used by the Python code of the model's method {method}, which runs at every call (methods=)"
METHOD_OPAQUE = "its method {method} (gnfx.compile(methods=...)): its Python code runs at every call"


def call_unpacked(module: nn.Module, args: tuple, kwargs: dict):
    """`module(*args, **kwargs)`: the graph's call of the model's forward with the call's own inputs."""
    return module(*args, **kwargs)


def call_method(opened: OpenedLeaf, method: str, args: tuple, kwargs: dict):
    """The graph's call of the model's method `method` (its class's: an instance attribute of that name
    may be the compiled model's own, put there for a library to call) with the children opened."""
    return opened.call(getattr(type(opened.module), method).__get__(opened.module), *args, **kwargs)


def opaque_root(model: nn.Module, leaf_modules, build, method: str | None = None) -> tuple[Captured, tuple]:
    """The model's forward, or its method `method`, as one opaque call with its children opened (module
    doc): (the Captured graph, of form "eager", and its (graph module, LayerTable, block sites)).
    `build(captured)` lowers and analyzes a child's capture (passes/opaque_children.py); `leaf_modules`
    stay whole."""
    graph = fx.Graph()
    args, kwargs = graph.placeholder("*args"), graph.placeholder("**kwargs")
    root = graph.get_attr(OPENED_ROOT)
    graph.output(graph.call_function(call_unpacked, (root, args, kwargs)) if method is None
                 else graph.call_function(call_method, (root, method, args, kwargs)))
    holder = nn.Module()
    holder.add_module("gnfx_opened", nn.Module())
    holder.gnfx_opened.add_module(OPENED_ROOT.rpartition(".")[2], OpenedLeaf(model, "", {}))
    gm = fx.GraphModule(holder, graph, f"Opaque_{type(model).__name__}")
    leaves = {"": ROOT_OPAQUE if method is None else METHOD_OPAQUE.format(method=method),
              **{name: REQUESTED for name in leaf_modules}}

    def reason(name: str) -> str:
        kept = [leaf for leaf in leaf_modules if name.startswith(leaf + ".")]
        return (f"inside leaf module {kept[0]!r} ({REQUESTED})" if kept else USED_BY_ROOT if method is None
                else USED_BY_METHOD.format(method=method))

    fallbacks = [layer_table.Fallback(param=name, shape=tuple(p.shape), reason=reason(name))
                 for name, p in model.named_parameters() if p.requires_grad]
    root = ROOT_CALLER if method is None else f"the model's method {method} (methods=)"
    built = open_opaque_children(model, gm, layer_table.LayerTable([], fallbacks, leaves, "eager"), {}, build, root)
    return Captured(gm, "eager", leaves, draws=True), built
