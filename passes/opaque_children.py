"""opaque_children: curvature blocks for the layers inside submodules that torch.fx keeps opaque.

A submodule whose forward torch.fx cannot trace (a branch on a tensor's value) or whose Python-level
random draws decide the graph (passes/python_random.py) is one opaque call in the captured graph
(passes/capture.py), and its parameters would all fall back to the diagonal preconditioner. Its
Python code runs eagerly at every call, but the modules it calls (`self.fc1(x)`, `self.mlp(h)`)
may have forwards that can be captured on their own. This pass walks the opaque submodule's
children from the top and captures each child with trainable parameters on its own, the largest
first:

* a torch.nn module without submodules (nn.Linear, nn.Conv2d, nn.Embedding, nn.LayerNorm, ...) as
  the graph `inputs ─▶ call_module(child) ─▶ output`, the form the captured graph holds it in;
* any other child by torch.fx (`trace_fx`), its own untraceable parts leaves that this pass opens in
  turn;

each graph rooted at the model (its parameters and submodules keep their names in the model) and run
through the same lowering and analysis as the captured graph (`build`). A child whose graph has
curvature blocks is *opened*: its blocks join the LayerTable, their sites in the child's graph, where
the tap pass puts their taps (passes/taps.py), and each call node of the opaque submodule in the
captured graph calls an `OpenedLeaf` (gnfx/opened_leaf.py) instead, which runs the submodule's own
forward with the child's graph in the child's place. A child that is not opened is walked into: its
children are tried in turn. The submodule's code still takes its branches anew at every call; each
call of an opened child is a site of its blocks (`Block.called_by`): called twice, its statistics
pool the two calls' rows as a tied weight's two sites do; not called by a forward, that forward adds
none (as a block its backward does not reach), and the weight has no gradient from it either. A
parameter of an opened child that the opaque code uses in another way raises at the backward
(gnfx/opened_leaf.py).

Not opened, with the reason in the report: a child whose forward takes optional or variadic inputs
(an nn.ConvTranspose's `output_size`: the graph would fix them; not a recurrent module's `hx`, which its
graph passes on as each call gives it, None, a tensor or a pair, and its lowering reads at run time with
a tensor or PackedSequence input, `OPTIONAL_INPUTS`; nor a child traced by torch.fx whose inputs default to None,
a hand-written cell's `forward(x, state=None)` that makes its state when called without one: it is captured once per
form of call, each set of those inputs a call gives, the calls running the graph of their form and the forms' sites
of a weight one block, `_forms`), or has an instance-level `forward`; an nn.Sequential (`CONTAINER`), walked into
as an nn.ModuleList is: opaque code may call it or iterate it and call its children one by one (ultralytics' YOLO
routes the outputs of `self.model`'s layers between them), and the graph of an opened child runs only where the child
itself is called, so its children are opened instead, which either call runs; a child with a parameter
registered outside it too (shared; a module registered under two paths, as performer-pytorch's
`ProjectionUpdater(self.net)` keeps its layer stack, shares nothing: its parameters are its own under both, and
it is walked once, by the first path) or read by the enclosing graph itself; a child whose class
defines a public method other than forward that the code calling it names (`self.flows[i].inverse(z)`: normflows'
forward_kld and log_prob; the opaque code and the modules walked into down to the child, all their methods,
`_method_called`), walked into, as the method runs its own code around its layers' calls; a child into which that
code calls by the child's name, one of its submodules or methods, private ones too (torchaudio's HuBERTPretrainModel
calls `self.wav2vec2.feature_extractor(...)` and `self.wav2vec2.encoder.transformer(...)`, never `self.wav2vec2(...)`;
`_called_inside`), walked into, as its graph would run at no call; anything inside a torch module whose forward reads its children's parameters
without calling them, be it the opaque submodule itself or a child (`READS_CHILDREN`:
nn.MultiheadAttention reads `out_proj.weight`; the fused convolution and BatchNorm of
quantization-aware training folds `bn.weight` and `bn.running_var` into its convolution's weight); a
child whose parameter the code of its parent's forward reads by attribute for its value
(`self.query_position_embeddings.weight.repeat(...)`: DETR's, Mask2Former's and MaskFormer's query and level
embeddings, nn.Embedding tables never called), closed whole with its children; a
child whose graph has no curvature block (a pre-hook that computes the weight, a layer kind gnfx has
no block for) or cannot be traced (then walked into); anything inside a submodule the user asked to
keep opaque (`leaf_modules`), which stays whole. Only the captured graph knows where a layer sits in
the model: an opened block's `model_input` and `model_output` are False. The leaf "" is the model itself,
whose forward neither torch.fx nor torch.export captured (passes/opaque_root.py): the graph reads its
OpenedLeaf at OPENED_ROOT. The calls and reads the code makes are those of its syntax tree (`_chains`): a docstring or
a comment naming `self.block.fc(x)` or `self.norm.weight` calls and reads nothing.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap

from torch import fx, nn
from torch.ao.nn.intrinsic.qat.modules.conv_fused import _ConvBnNd

from gnfx.opened_leaf import OpenedLeaf
from gnfx.passes.mapping_output import copy_output_type
from gnfx.passes.module_attributes import subtree_numbers
from gnfx.passes.parameter_casts import METADATA_ATTRIBUTES
from gnfx.passes.capture import REQUESTED, Captured, describe_exception, trace_fx

OPENED = "opened: its layers are curvature blocks, called by the submodule's Python code"
# where the captured graph of a model whose own forward is opaque (passes/opaque_root.py, the leaf "")
# holds that forward's call
OPENED_ROOT = "gnfx_opened.gnfx_root"
_INPUT_KINDS = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
# an nn.Sequential is a container: opaque code may call it, or iterate or index it and call its children
# (ultralytics' `for m in self.model: x = m(x)`, routing outputs between them), so its children are opened
CONTAINER = ("an nn.Sequential, whose children the opaque code may call one by one (iterating or indexing it) "
             "rather than through its forward: its children are opened")
# what reading a parameter for its metadata looks like in source: no use of its value; and `.data`, its value
# outside autograd, which gives the parameter no gradient (speechbrain's Linear renormalizes its layer's rows,
# `self.w.weight.data = torch.renorm(self.w.weight.data, ...)`, before calling it)
_METADATA_READS = (*METADATA_ATTRIBUTES, "size", "dim", "numel", "element_size", "is_floating_point", "data")
# torch's layers whose optional inputs their graph passes on as each call gives them (an nn.LSTM's hx: a tensor,
# a pair or None, which the recurrent lowering reads at the call, passes/recurrent.py), so that opaque code calling
# them with and without a state (gluonts' DeepAR: `self.rnn(x)` in its loss, `self.rnn(x, state)` in sampling)
# calls one graph
OPTIONAL_INPUTS = (nn.RNNBase, nn.RNNCellBase)
# the most inputs defaulting to None that a child traced by torch.fx may take: one graph per form of call (`_forms`)
MAX_OPTIONAL = 3
# torch's modules whose forward reads their children's parameters without calling the children, and how
READS_CHILDREN = {
    nn.MultiheadAttention: "an nn.MultiheadAttention, whose forward reads its out_proj's parameters without calling it",
    _ConvBnNd: "a fused convolution and BatchNorm of quantization-aware training (torch.ao.nn.intrinsic.qat), "
               "whose forward folds its bn's weight and running variance into the convolution's weight",
}


def _inputs(module: nn.Module) -> list[inspect.Parameter] | None:
    """The module's forward inputs when all are required (no defaults, no *args or **kwargs), or optional ones of
    a recurrent module (`OPTIONAL_INPUTS`) or, traced by torch.fx, optional ones whose default is None (captured in
    each form of call, `_forms`), else None."""
    params = list(inspect.signature(module.forward).parameters.values())
    optional_ok = isinstance(module, OPTIONAL_INPUTS)
    none_ok = not _is_torch_layer(module)
    if params and all(p.kind in _INPUT_KINDS and (optional_ok or p.default is inspect.Parameter.empty
                                                  or (none_ok and p.default is None)) for p in params):
        return params
    return None


def _defaulting_to_none(module: nn.Module) -> list[str]:
    """The forward inputs of `module`, a child traced by torch.fx (not a torch layer), that default to None."""
    return [] if _is_torch_layer(module) else [p.name for p in _inputs(module) if p.default is None]


def _forms(module: nn.Module) -> list[frozenset[str] | None]:
    """The forms of call of a child traced by torch.fx whose forward takes inputs that default to None (a cell's
    `state=None`: None at the first step, the previous state afterwards): each set of those inputs a call gives
    (not None), one graph each (`_capture`), as many as 2 ** `MAX_OPTIONAL`; [None] for a child of one form."""
    optional = _defaulting_to_none(module)
    if not optional:
        return [None]
    return [frozenset(name for bit, name in enumerate(optional) if given >> bit & 1)
            for given in range(2 ** len(optional))]


def _join(parent: str, name: str) -> str:
    """The path of child `name` of the module at `parent` ("": the model itself)."""
    return f"{parent}.{name}" if parent else name


ROOT_CALLER = "the model's own (opaque) forward"  # the code at the leaf "" (passes/opaque_root.py)


def _opaque_caller(leaf: str, root: str) -> str:
    """The opaque code at `leaf`, in words ("": `root`, the model's own forward or method, passes/opaque_root.py)."""
    return f"opaque submodule {leaf!r}" if leaf else root


def _is_torch_layer(module: nn.Module) -> bool:
    """A torch.nn module without submodules: a module call in a torch.fx graph (passes/capture.py)."""
    return next(module.children(), None) is None and module.__module__.startswith(("torch.nn", "torch.ao.nn"))


def _reads_children(module: nn.Module) -> str | None:
    """How `module`'s forward reads its children's parameters without calling them (READS_CHILDREN), or None."""
    return next((why for cls, why in READS_CHILDREN.items() if isinstance(module, cls)), None)


def _why_closed(path: str, module: nn.Module, names: dict, read: set[int], paths: list[str]) -> str | None:
    """Why the child `path` cannot be opened whatever its graph (module doc), or None; `paths`: every path of the
    child in the model (one module registered under two paths holds its parameters under both, unshared)."""
    reads = _reads_children(module)
    if reads is not None:
        return reads
    if type(module).forward is nn.Sequential.forward:
        return CONTAINER
    if "forward" in vars(module):
        return "it has an instance-level forward"
    if _inputs(module) is None:
        return "its forward takes optional or variadic inputs, which an opened child's graph would fix"
    if len(optional := _defaulting_to_none(module)) > MAX_OPTIONAL:
        return (f"its forward takes {len(optional)} inputs that default to None, {2 ** len(optional)} forms of call "
                f"to capture (at most {MAX_OPTIONAL} such inputs)")
    for name, p in module.named_parameters(prefix=path, remove_duplicate=False):
        others = [n for n in names[id(p)] if not any(n.startswith(alias + ".") for alias in paths)]
        if others:
            return f"its parameter {name!r} is also registered as {others[0]!r} (shared)"
        if id(p) in read:
            return f"its parameter {name!r} is also read by the captured graph outside the submodule"
    return None


def _parsed(obj) -> ast.Module | None:
    """The syntax tree of the source of `obj` (a class or a function), None without source (a builtin, a class
    made at run time) or where it does not parse on its own."""
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(obj)))
    except (OSError, TypeError, SyntaxError):
        return None


def _chains(trees: list[ast.AST]) -> list[tuple[ast.expr, list[str], bool]]:
    """Each chain of attributes `base.a.b.c` the code of `trees` reads, whole (not its parts `base.a.b`), in the
    order of the source: (its base, the expression before the first dot; the names [a, b, c]; whether the code calls
    it, `base.a.b.c(...)`). Code only: a docstring or a comment that names `self.block.fc(x)` is none."""
    called, inner, outer = set(), set(), []
    for index, tree in enumerate(trees):
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                called.add(id(node.func))
            elif isinstance(node, ast.Attribute):
                outer.append((index, node.lineno, node.col_offset, node))
                if isinstance(node.value, ast.Attribute):
                    inner.add(id(node.value))
    chains = []
    for *_, node in sorted(outer, key=lambda entry: entry[:3]):
        if id(node) in inner:
            continue
        names, base = [], node
        while isinstance(base, ast.Attribute):
            names.append(base.attr)
            base = base.value
        chains.append((base, names[::-1], id(node) in called))
    return chains


def _forward_chains(module: nn.Module) -> list[tuple[ast.expr, list[str], bool]]:
    """`_chains` of the code of `module`'s forward, none without its source."""
    tree = _parsed(type(module).forward)
    return _chains([tree] if tree is not None else [])


def _read_by_forward(module: nn.Module, name: str, child: nn.Module, forward: list) -> str | None:
    """Why the child `name` of `module`, whose forward runs as Python code, cannot be opened when that
    forward's code reads one of the child's trainable parameters by attribute (`self.name.weight`) for
    its value, not its metadata: DETR's `self.query_position_embeddings.weight.unsqueeze(0).repeat(N, 1, 1)`,
    Mask2Former's `self.level_embed.weight[i]`, an nn.Embedding used as a table and never called, whose
    block's statistics would see no call (module doc); else None. `forward`: `_forward_chains(module)`. (The
    forward without source: the backward still checks, gnfx/opened_leaf.py.)"""
    params = {n for n, p in child.named_parameters() if p.requires_grad}
    for base, parts, _ in forward:
        if not (isinstance(base, ast.Name) and base.id == "self" and parts[0] == name):
            continue
        parts = parts[1:]
        param = next((".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in params), None)
        rest = parts[len(param.split(".")):] if param else []
        if param and not (rest and rest[0] in _METADATA_READS):
            return (f"the Python code of {type(module).__name__}.forward reads its parameter 'self.{name}.{param}' "
                    f"by attribute, besides any call of the layer, which the block's statistics would not see")
    return None


# methods that set a module's parameters at construction (torch.nn's convention, nn.Linear.reset_parameters and
# nn.MultiheadAttention._reset_parameters; every PyG convolution's reset_parameters calls `self.lin.reset_parameters()`;
# timm's init_weights, Hugging Face's _init_weights, torchvision's _initialize_weights), not code that runs at a call:
# the calls of its children's methods they make are left out of `_class_code`
INITIALIZERS = ("__init__", "reset_parameters", "_reset_parameters", "init_weights", "_init_weights",
                "_initialize_weights")


def _class_code(module: nn.Module) -> list[ast.AST]:
    """The syntax trees of `module`'s class and its bases below torch's, without the INITIALIZERS (the opaque code
    may be a method other than forward, passes/opaque_root.py); none for a torch module or a class without
    source."""
    trees = []
    for cls in type(module).__mro__:
        if cls.__module__.startswith("torch.") or cls is object:
            break
        tree = _parsed(cls)
        if tree is None:
            continue
        for definition in tree.body:
            if isinstance(definition, ast.ClassDef):
                definition.body = [n for n in definition.body if not (
                    isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name in INITIALIZERS)]
        trees.append(tree)
    return trees


def _method_called(child: nn.Module, chains: list) -> str | None:
    """Why `child` cannot be opened when `chains`, the `_chains` of the code of the opaque submodule and of the
    modules walked into down to the child's parent (`_class_code`), show that code calling a public method of the
    child's class other than forward by name (normflows' `self.flows[i].inverse(z)` in NormalizingFlow.forward_kld
    and log_prob, a coupling block's `self.flows[0].inverse(z)`): an opened child's graph is its forward, and the
    method's code would use its layers' parameters outside it; walked into instead, the layers the method calls are
    opened. Else None."""
    methods = sorted({name for cls in type(child).__mro__ if not cls.__module__.startswith("torch.") and cls is not object
                      for name, value in vars(cls).items()
                      if inspect.isfunction(value) and name != "forward" and not name.startswith("_")})
    called_names = {names[-1] for _, names, called in chains if called}
    called = next((m for m in methods if m in called_names), None)
    return (f"the Python code calling it calls its method {called!r}, not its forward, which an opened child's graph "
            f"stands for") if called else None


def _called_inside(name: str, child: nn.Module, chains: list) -> str | None:
    """Why the child `name` cannot be opened when `chains` (as `_method_called`'s) show the code calling into it by
    its name other than through its forward: one of its submodules that holds trainable parameters (`self.name.sub(x)`,
    `self.name.sub.method(x)`) or one of its methods, private ones too (torchaudio's HuBERTPretrainModel.forward calls
    `self.wav2vec2.feature_extractor(...)`, `self.wav2vec2.encoder._preprocess(...)` and
    `self.wav2vec2.encoder.transformer(...)`, never `self.wav2vec2(...)`): an opened child's graph runs only where
    the child itself is called, so those calls would use its parameters outside any call of its graph. Walked into
    instead, the submodules the code calls are opened. Else None."""
    inner = {path for path, m in child.named_modules() if path and any(p.requires_grad for p in m.parameters())}
    methods = {m for cls in type(child).__mro__ if not cls.__module__.startswith("torch.") and cls is not object
               for m, value in vars(cls).items() if inspect.isfunction(value) and m != "forward"}
    for _, names, called in chains:
        for i in [i for i, n in enumerate(names[:-1]) if n == name] if called else ():
            parts = names[i + 1:]
            sub = next((".".join(parts[:j]) for j in range(len(parts), 0, -1) if ".".join(parts[:j]) in inner), None)
            if sub is not None or parts[0] in methods:
                return (f"the Python code calling it calls "
                        f"{'its submodule ' + repr(sub) if sub else 'its method ' + repr(parts[0])} itself "
                        f"('.{name}.{'.'.join(parts)}('), not its forward, which an opened child's graph stands for")
    return None


def _resolve(gm: fx.GraphModule, target: str):
    """The attribute or submodule of `gm` at the dotted path `target`."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _read_by_graph(gm: fx.GraphModule, leaves) -> set[int]:
    """The ids of the tensors the captured graph reads itself: by `get_attr`, and as parameters of the
    modules it calls other than its leaves."""
    read = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            read.add(id(_resolve(gm, node.target)))
        elif node.op == "call_module" and node.target not in leaves:
            read.update(id(p) for p in gm.get_submodule(node.target).parameters())
    return read


def _capture(model: nn.Module, path: str, module: nn.Module, form: frozenset[str] | None = None) -> Captured:
    """The child `path` captured on its own (module doc), rooted at the model, in the form of call `form` (`_forms`:
    the inputs defaulting to None that the call gives; the others traced as None); raises a CaptureError
    when torch.fx cannot trace its forward."""
    if _is_torch_layer(module):
        graph = fx.Graph()
        inputs = tuple(graph.placeholder(p.name, default_value=p.default) for p in _inputs(module))
        graph.output(graph.call_module(path, inputs))
        return Captured(fx.GraphModule(model, graph, f"Opened_{path.replace('.', '_')}"), "fx", {})
    fixed = None if form is None else {name: None for name in _defaulting_to_none(module) if name not in form}
    captured = trace_fx(module, concrete_args=fixed)
    traced = captured.graph_module
    graph = fx.Graph()
    graph.output(graph.graph_copy(traced.graph, {}))
    copy_output_type(traced.graph, graph)  # a ModelOutput stays one for the submodule's code reading it
    objects = {}  # the module's attributes and submodules the graph reads, under their paths in the model
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            objects[f"{path}.{node.target}"] = _resolve(traced, node.target)
            node.target = f"{path}.{node.target}"
    gm = fx.GraphModule(objects, graph, f"Opened_{path.replace('.', '_')}")
    return Captured(gm, "fx", {f"{path}.{leaf}": why for leaf, why in captured.leaves.items()}, captured.draws)


def _form_words(form: frozenset[str] | None) -> str:
    """The form of call `form` (`_forms`) in words, '' for a child of one form."""
    given = ", ".join(sorted(form or ())) or "none"
    return "" if form is None else f" called with {given} of its inputs that default to None"


def _joined_forms(built: dict) -> tuple:
    """(graphs, LayerTable, block sites, why not opened or None) of a child from its forms' builds (`_forms`: form ->
    (graph module, LayerTable, block sites)): the one form's graph, or {form: graph}, whose blocks are one, each
    with the sites of every form (a weight called in several forms is a weight of several sites, R the calls);
    not opened when the forms' graphs have different blocks."""
    (form, (gm, table, sites)), *others = built.items()
    if form is None:
        return gm, table, sites, None
    signature = lambda t: {b.name: (b.kind, b.params, b.d_in, b.d_out) for b in t.blocks}  # noqa: E731
    for other, (_, other_table, other_sites) in others:
        if signature(other_table) != signature(table):
            return None, None, None, (f"its graph{_form_words(other)} has other curvature blocks than "
                                      f"its graph{_form_words(form)}")
        for block in table.blocks:
            block.sites = [*block.sites, *next(b for b in other_table.blocks if b.name == block.name).sites]
            sites[block.name] = [*sites[block.name], *other_sites[block.name]]
        table.fallbacks.extend(f for f in other_table.fallbacks if all(f.param != g.param for g in table.fallbacks))
        table.opened.update(other_table.opened)
        table.leaves.update(other_table.leaves)
        table.notes.update(other_table.notes)
    return {form: gm for form, (gm, *_) in built.items()}, table, sites, None


def open_opaque_children(model: nn.Module, gm: fx.GraphModule, table, block_sites: dict, build,
                         root: str = ROOT_CALLER):
    """Open the children of the opaque submodules of `gm` (captured from `model`; `table` and
    `block_sites` its analysis) that can be (module doc): their blocks and sites join `table` and
    `block_sites`, and each call of an opaque submodule with opened children calls an OpenedLeaf.
    `build(captured)` lowers and analyzes a capture, opening its own opaque submodules, and returns
    (graph module, LayerTable, block sites); `root` names the code at the leaf "" in the report (the
    model's forward, or the method passes/opaque_root.py captured). Returns (gm, table, block_sites)."""
    requested = [leaf for leaf, why in table.leaves.items() if why == REQUESTED]
    opaque = [leaf for leaf, why in table.leaves.items() if why != REQUESTED]
    if not opaque:
        return gm, table, block_sites
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    paths: dict[int, list[str]] = {}  # each module's paths: performer-pytorch registers its layer stack twice
    for name, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(name)
    walked: set[int] = set()  # a module reached again by another path is walked once
    fallbacks = {f.param: f for f in table.fallbacks}
    read = _read_by_graph(gm, table.leaves)
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    placed = [(order[block_sites[b.name][0].node], 0, b) for b in table.blocks]  # (graph position, rank, block)
    leaves = dict(table.leaves)

    def trainable(module) -> list[str]:
        """The model's names of the module's trainable parameters."""
        return [names[id(p)][0] for p in module.parameters() if p.requires_grad]

    def closed(path: str, params, why: str) -> None:
        table.opened[path] = f"not opened: {why}"
        for param in params:
            if param in fallbacks:
                f = fallbacks[param]
                fallbacks[param] = dataclasses.replace(f, reason=f"{f.reason}; {path} not opened: {why}")

    def walk(leaf: str, module_path: str, module: nn.Module, graphs: dict, position: int, code: list) -> None:
        """Open the children of `module` (at `module_path`, inside the opaque `leaf`; `code`: the syntax trees of the
        modules from the leaf down to it, `_class_code`) or walk into them."""
        reads = _reads_children(module)  # only the opaque submodule itself: a child that reads is not walked into
        chains, forward = _chains(code), _forward_chains(module)  # read once for all the children
        for name, child in module.named_children():
            path = _join(module_path, name)
            if (any(path == r or path.startswith(r + ".") for r in requested) or not trainable(child)
                    or id(child) in walked):
                continue  # kept whole, as asked; or nothing to open; or met before by another path
            walked.add(id(child))
            # closed whole: the read may be of a grandchild's
            read_by_code = _read_by_forward(module, name, child, forward)
            why = (f"inside {module_path}, {reads}" if reads is not None else
                   read_by_code or _method_called(child, chains) or _called_inside(name, child, chains)
                   or _why_closed(path, child, names, read, paths[id(child)]))
            built, traced_with = {}, subtree_numbers(child)  # the numbers its graph holds as constants
            for form in _forms(child) if why is None else ():
                try:
                    built[form] = build(_capture(model, path, child, form))
                except Exception as exc:  # noqa: BLE001 - reported: the child stays closed (and is walked into)
                    why = f"its graph{_form_words(form)} could not be built ({describe_exception(exc)})"
                    break
            if why is None:
                child_gm, child_table, child_sites, why = _joined_forms(built)
            own = set(trainable(child))
            left = [f for f in child_table.fallbacks if f.param in own] if why is None else []
            if why is None and not child_table.blocks:
                why = f"its graph has no curvature block ({left[0].param!r}: {left[0].reason})"
            if why is not None:
                if (reads is not None or read_by_code is not None or _reads_children(child) is not None
                        or next(child.children(), None) is None):
                    closed(path, trainable(child), why)
                else:  # its own parameters stay; its children are tried
                    closed(path, [names[id(p)][0] for p in child.parameters(recurse=False) if p.requires_grad], why)
                    walk(leaf, path, child, graphs, position, code + _class_code(child))
                continue
            table.opened[path] = OPENED
            table.opened.update(child_table.opened)
            leaves.update(child_table.leaves)
            graphs[path[len(leaf) + 1:] if leaf else path] = child_gm, traced_with
            for block in child_table.blocks:
                if block.called_by is None:
                    block.called_by = leaf
                block.model_input = block.model_output = False
                placed.append((position, len(placed), block))
                block_sites[block.name] = child_sites[block.name]
                for param in block.params:
                    del fallbacks[param]
                    table.notes[param] = f"called by the Python code of {_opaque_caller(block.called_by, root)}"
            table.notes.update(child_table.notes)
            for f in left:
                if f.param in fallbacks:
                    fallbacks[f.param] = dataclasses.replace(
                        f, reason=f"in the graph of {path}, opened inside {_opaque_caller(leaf, root)}: {f.reason}")

    for leaf in opaque:
        calls = [n for n in gm.graph.nodes if n.op in ("call_module", "get_attr") and n.target == (leaf or OPENED_ROOT)]
        if not calls:  # not called by the graph (a leaf inside another leaf, or unused): nothing would run
            continue
        graphs = {}
        walk(leaf, leaf, model.get_submodule(leaf), graphs, order[calls[0]], _class_code(model.get_submodule(leaf)))
        if graphs:
            opened = f"gnfx_opened.{leaf}" if leaf else OPENED_ROOT
            gm.add_submodule(opened, OpenedLeaf(model.get_submodule(leaf), leaf, graphs))
            for node in calls:
                node.target = opened
    placed.sort(key=lambda entry: entry[:2])
    table.blocks[:] = [block for *_, block in placed]
    table.fallbacks[:] = list(fallbacks.values())
    table.leaves = leaves
    table.reindex()
    gm.recompile()
    return gm, table, block_sites
