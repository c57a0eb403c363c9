"""discontinuities: where a captured forward may not be differentiable at the scale of a finite difference.

The quadratic step's products J v by finite differences (gnfx.finite_differences) take
(f(θ + h v) − f(θ)) / h for the outputs z = f(θ). That is J v, the Jacobian the gradient g = Jᵀ ∂L/∂z was
taken through, up to O(h), wherever f is smooth in θ and its backward is its forward's derivative. It is not
where the forward jumps as θ moves, or where its gradient is not its derivative. `discontinuities(gm,
trainable)` walks a captured graph and names every node that may be such a place, among those that depend on
the trainable parameters θ and whose values reach the graph's outputs (or a tensor an in-place op writes):

- a jump: a comparison (`logits > 0`, a mask from the parameters), the indices of a top-k, sort, argmax or a
  max along a dimension (a router's choice; their values are continuous and pass), rounding, `floor`,
  `remainder`, a cast to an integer, a bool or a 16-bit dtype, a draw whose probabilities depend on θ
  (`bernoulli(p)`), `hardshrink` and `threshold`;
- a gradient that is not the derivative: `detach` (a straight-through estimator's `x + (q − x).detach()`,
  VQ-VAE's codebook), a region under `torch.no_grad()`, a torch.autograd.Function (its backward is its own);
- code the graph does not hold: a submodule kept opaque that is not one of torch.nn's own layers, a
  function that is not torch's, Python's operator or math, or gnfx's, a higher-order operator (torch.cond),
  a module's forward hooks;
- a kink applied entrywise: relu and its kin (relu6, leaky_relu, hardtanh, hardsigmoid, hardswish, prelu, rrelu,
  selu, softshrink), abs, clamp, an entrywise maximum or minimum. Continuous, but each entry's derivative jumps at
  its kink, and after a batch norm many entries sit near it: the one-sided difference of a float32 U-Net of
  convolutions, batch norms and ReLUs was 85% off forward mode's J v (13% at h/100), and of a plain stack of 8 such
  layers 7-12% (benchmarks/results/first_contact_17_rerunleft.md), where a smooth forward's is ~√ε.

Values that depend on θ only through a shape (`x.size(0)`, `torch.zeros_like(x)`) do not. An in-place op
that writes a value depending on θ into another tensor (`out[:, t] = layer(x)`) makes that tensor, and
what it is a view of, depend on θ. What the analysis cannot see it reports (an opaque submodule), so an
empty list means every operation on the way from θ to the outputs is one whose derivative autograd takes
and that is continuous, with no entrywise kink. The values of a max, top-k or sort along a dimension pass:
their kinks are where two entries of a row tie, which a step of h crosses in few rows (`x - x.max(-1)` before
a softmax, a max-pool's window).
"""
from __future__ import annotations

import operator

import torch
from torch import fx, nn

from .grad_modes import SET_GRAD_ENABLED
from .graph_view import ancestors
from .lower import run_forward_hooks
from .opaque_root import call_method, call_unpacked
from .taps import aliases_first_input, writes_in_place

# ops (their names without leading and trailing underscores: `gt`, `__gt__`, `gt_` and aten.gt.Tensor are
# all "gt") whose value jumps as an input moves, or that turn a float into an integer, a bool or a Python number
_JUMPS = frozenset({
    "eq", "ne", "gt", "ge", "lt", "le", "greater", "greater_equal", "less", "less_equal", "not_equal", "isclose",
    "equal", "allclose", "isnan", "isinf", "isfinite", "isposinf", "isneginf", "signbit", "not", "truth",
    "argmax", "argmin", "argsort", "msort", "unique", "unique_consecutive", "nonzero", "nonzero_static",
    "argwhere", "bucketize", "searchsorted", "histc", "histogram", "bincount", "count_nonzero",
    "round", "floor", "ceil", "trunc", "fix", "frac", "sign", "sgn", "heaviside", "remainder", "fmod",
    "floor_divide", "floordiv", "mod", "hardshrink", "threshold", "bernoulli", "multinomial", "poisson",
    "binomial", "long", "int", "short", "char", "byte", "bool", "half", "bfloat16", "item", "tolist",
    "float8_e4m3fn", "float8_e5m2"})
# ops returning (values, indices): the values are continuous, the indices jump
_WITH_INDICES = frozenset({"topk", "sort", "kthvalue", "mode", "median", "nanmedian", "cummax", "cummin", "max",
                           "min", "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices"})
# ops continuous in their input whose derivative jumps at a kink, entrywise (module docstring)
_KINKS = frozenset({"relu", "relu6", "leaky_relu", "hardtanh", "hardsigmoid", "hardswish", "prelu", "rrelu",
                    "rrelu_with_noise", "selu", "softshrink", "abs", "absolute", "clamp", "clip", "clamp_min",
                    "clamp_max", "maximum", "minimum", "fmax", "fmin"})
_KINKED_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.PReLU, nn.RReLU,
                   nn.SELU, nn.Softshrink)
# ops whose gradient is not their value's derivative
_STOPS = frozenset({"detach", "data"})
# casts, whose target dtype decides
_CASTS = frozenset({"to", "type", "type_as", "to_copy", "view"})
# ops whose result depends on their input's shape, dtype or device only
_SHAPE_ONLY = frozenset({"size", "dim", "numel", "shape", "ndim", "dtype", "device", "get_device", "is_contiguous",
                         "stride", "sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "len",
                         "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
                         "randint_like", "new_zeros", "new_ones", "new_empty", "new_full", "is_floating_point"})
# gnfx's graph functions that run the model's own Python code
_PYTHON_CODE = (run_forward_hooks, call_unpacked, call_method)
_JUMPING_MODULES = (nn.Hardshrink, nn.Threshold)
KINK = "a kink in every entry (relu, clamp, abs), which a difference crosses in many entries at once"


def discontinuities(gm: fx.GraphModule, trainable: set[str]) -> list[str]:
    """The nodes of `gm` at which its outputs may not be differentiable in the parameters named in `trainable`
    (their qualified names in `gm`) as a finite difference sees them (module docstring), each as "node: why";
    [] where every path from θ to the outputs is smooth."""
    nodes = list(gm.graph.nodes)
    depends = _dependence(gm, nodes, trainable)
    reaching = _reaching(gm, nodes)
    found = []
    grad_enabled = True
    for node in nodes:
        if node.op == "call_function" and node.target is SET_GRAD_ENABLED:
            grad_enabled = bool(node.args[0])
            continue
        if node not in reaching or not _reads_dependent(node, depends):
            continue
        why = _why(gm, node, depends, grad_enabled)
        if why:
            found.append(f"{node.name}: {why}")
    return found


def _dependence(gm: fx.GraphModule, nodes: list[fx.Node], trainable: set[str]) -> set[fx.Node]:
    """The nodes whose values depend on θ: those reading a parameter of `trainable` (get_attr, or a submodule
    holding one), their users, and a tensor an in-place op writes such a value into (with what it views)."""
    depends: set[fx.Node] = set()
    while True:
        before = len(depends)
        for node in nodes:
            if node in depends or _name(node) in _SHAPE_ONLY:
                continue
            if (node.op == "get_attr" and node.target in trainable) or _holds_parameter(gm, node, trainable) \
                    or any(i in depends for i in node.all_input_nodes):
                depends.add(node)
                if writes_in_place(node, gm) and node.args and isinstance(node.args[0], fx.Node):
                    written = node.args[0]
                    while written not in depends:
                        depends.add(written)
                        if not (aliases_first_input(written, gm) and written.args
                                and isinstance(written.args[0], fx.Node)):
                            break
                        written = written.args[0]
        if len(depends) == before:
            return depends


def _holds_parameter(gm: fx.GraphModule, node: fx.Node, trainable: set[str]) -> bool:
    """Whether `node` calls a submodule that holds a parameter of `trainable` (a leaf kept opaque, an LSTM)."""
    if node.op != "call_module":
        return False
    return any(f"{node.target}.{name}" in trainable for name, _ in gm.get_submodule(node.target).named_parameters())


def _reaching(gm: fx.GraphModule, nodes: list[fx.Node]) -> set[fx.Node]:
    """The nodes whose values reach the output, or a tensor an in-place op writes (which a later node may read)."""
    return ancestors(n for n in nodes if n.op == "output" or writes_in_place(n, gm))


def _reads_dependent(node: fx.Node, depends: set[fx.Node]) -> bool:
    return node in depends and (node.op == "call_module" or any(i in depends for i in node.all_input_nodes))


def _why(gm: fx.GraphModule, node: fx.Node, depends: set[fx.Node], grad_enabled: bool) -> str | None:
    """Why `node`, which reads a value depending on θ, is no place for a finite difference; None if it is one."""
    if node.op in ("placeholder", "get_attr", "output"):
        return None
    if not grad_enabled:
        return "computed under torch.no_grad(), which the gradient does not differentiate"
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if node.meta.get("gnfx_role") == "tap":
            return None
        if isinstance(module, _JUMPING_MODULES):
            return "jumps where its input crosses its threshold"
        if isinstance(module, _KINKED_MODULES):
            return KINK
        if not type(module).__module__.startswith("torch.nn.modules"):
            return f"a submodule kept opaque ({type(module).__name__}), whose code the graph does not hold"
        return None
    name = _name(node)
    if node.op == "call_function" and not _known_function(node.target):
        return f"code the graph does not hold ({getattr(node.target, '__qualname__', node.target)})"
    if name in _STOPS:
        return "its gradient is not its derivative (a stop-gradient)"
    if name in _JUMPS or (name in _CASTS and _narrowing_cast(node, depends)) or _hard_choice(node) \
            or (name in ("div", "divide", "true_divide") and node.kwargs.get("rounding_mode") is not None):
        return "its value jumps as its input moves (a comparison, rounding, an integer or 16-bit result)"
    if name in _WITH_INDICES and _indices_used(node):
        return "its indices jump as its input moves (a router's choice)"
    if name in _KINKS:
        return KINK
    return None


def _name(node: fx.Node) -> str:
    """The op's name without leading and trailing underscores: `__gt__`, `gt_`, torch.gt, aten.gt.Tensor: "gt"."""
    target = node.target
    if node.op == "call_method" or (node.op == "call_function" and target is getattr and len(node.args) > 1):
        name = target if node.op == "call_method" else node.args[1]
    elif node.op != "call_function":
        return ""
    elif isinstance(target, torch._ops.OpOverload):
        name = target._schema.name.split("::")[-1]
    elif isinstance(target, torch._ops.OpOverloadPacket):
        name = target._qualified_op_name.split("::")[-1]
    else:
        name = getattr(target, "__name__", "")
    return name.strip("_") if isinstance(name, str) else ""


def _known_function(target) -> bool:
    """Whether a call_function's target is torch's (aten's and prims' ops among torch.ops), Python's operator,
    math or builtins, or gnfx's own, and does not run other Python code (a torch.autograd.Function's apply, a
    higher-order operator, the module's hooks)."""
    if isinstance(target, torch._ops.HigherOrderOperator) or target in _PYTHON_CODE:
        return False
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        packet = isinstance(target, torch._ops.OpOverloadPacket)
        return (target._qualified_op_name if packet else target._schema.name).split("::")[0] in ("aten", "prims")
    for owner in (getattr(target, "__self__", None), getattr(target, "function", None)):  # F.apply, or fx's call of it
        if isinstance(owner, type) and issubclass(owner, torch.autograd.Function):
            return False
    if isinstance(getattr(target, "__objclass__", None), type) and issubclass(target.__objclass__, torch._C.TensorBase):
        return True
    module = getattr(target, "__module__", None) or ""
    return module.split(".")[0] in ("torch", "_operator", "operator", "math", "builtins", "gnfx") \
        and not module.startswith("torch.utils.checkpoint")


def _narrowing_cast(node: fx.Node, depends: set[fx.Node]) -> bool:
    """Whether a cast (`.to`, `.type`, `.type_as`, aten._to_copy, a `.view` to a dtype) may give an integer, a bool or
    a float of fewer than 32 bits: a cast to such a dtype, or to the dtype of a tensor that does not depend on θ
    (an integer input's, `x.to(ids.dtype)`; a tensor that depends on θ has θ's dtype, or a narrowing cast made
    it); a cast to a type named by a string counts as one."""
    for a in (*node.args[1:], *node.kwargs.values()):
        if isinstance(a, torch.dtype) and (not (a.is_floating_point or a.is_complex) or a.itemsize < 4):
            return True
        if isinstance(a, str) and "Tensor" in a:
            return True
        if isinstance(a, fx.Node) and _name(node) != "view" and _name(a) != "device":
            source = a.args[0] if _name(a) == "dtype" and a.args and isinstance(a.args[0], fx.Node) else a
            if source not in depends:
                return True
    return False


def _hard_choice(node: fx.Node) -> bool:
    """F.gumbel_softmax with hard=True (a one-hot of its argmax), F.grid_sample with mode="nearest"."""
    name = _name(node)
    if name == "gumbel_softmax":
        return bool(node.kwargs.get("hard", node.args[2] if len(node.args) > 2 else False))
    if name == "grid_sampler" or name == "grid_sample":
        mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "bilinear")
        return mode in ("nearest", 1)
    return False


def _indices_used(node: fx.Node) -> bool:
    """Whether a (values, indices) op's indices are read: any user but `[0]` or `.values` that is read itself
    (`v, _ = x.max(-1)` makes an unread `[1]`); torch.max and min of one tensor or of two are no such op."""
    name = _name(node)
    if name in ("max", "min"):
        if isinstance(node.target, torch._ops.OpOverload):
            if node.target._overloadname != "dim":
                return False
        elif not (len(node.args) > 1 and isinstance(node.args[1], int) or "dim" in node.kwargs):
            return False
    return any(user.users and not (user.op == "call_function" and user.target in (operator.getitem, getattr)
                                   and user.args[1] in (0, "values")) for user in node.users)
