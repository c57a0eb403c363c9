"""custom functions: a forward that applies a torch.autograd.Function, whose backward is its own.

A custom Function y = F(x) runs its `forward` without recording it (under no_grad) and differentiates
by its own `backward` (x̄ = backward(ȳ)), which need not be the derivative of its forward: Hugging
Face's BLOOM writes its tanh-GELU so, with the derivative as its backward; a straight-through
estimator (quantization-aware training) rounds in its forward and passes ȳ through in its backward.
Captures and forward mode see it differently:

Both captures see an application where torch's `apply` calls `F.forward`, which it looks up on F at
each call: while capturing, the forward of every Function defined outside torch is wrapped
(`_forwards_wrapped`), so that an `apply` bound before capture (`ste = STE.apply` at import) is seen too.

- torch.fx calls `F.apply` on proxies, which runs `forward` on them: the graph held forward's
  operations, whose derivative the graph's backward took instead of F's backward (a straight-through
  estimator's round: a zero gradient below it on every statistic step, silently). While tracing
  (`opaque_in_fx`) a forward of proxies returns one call_function node that calls `F.apply`: the graph's
  backward is F's. The layers inside F are not seen (its parameters fall back), as those of a leaf.
- torch.export records the operations forward runs on its fake tensors in the same way, and keeps no
  call of F. `applied_functions` records the Functions the trace applied; `check_backwards` then runs
  the forward once on the example call (no gradients outside F, buffers and random generators as they
  were) and at every application of one of them compares F's vector-Jacobian product vᵀ∂y/∂x by its
  backward with that of its forward's operations, for a random cotangent v: a relative difference
  above `TOLERANCE` (rounding differs, the derivative does not) raises a CaptureError naming F, as the
  exported graph's gradients would not be the model's.
- Forward mode takes J v through `F.jvp`, which most Functions leave out (NotImplementedError): the
  quadratic step and gnfx.ggn could not run. Inside `jvps_of_forwards` (gnfx.composite_forms.written_out,
  the replays of the forward those take) a Function without jvp has one: its forward, wrapped as above,
  keeps its inputs on the ctx (a forward without ctx: its setup_context), and the jvp takes J t of the
  forward's recorded operations there, by reverse mode twice (J t = ∂/∂u (uᵀJ) t; forward mode does not
  nest). That is the Jacobian of F's backward wherever its backward is its forward's derivative, which it
  checks at the Function's first application (a GnfxError names F otherwise).

Both checks run F's forward twice more, on copies of the inputs it may change (a tensor written in place,
an object such as a cache that it appends to), and call F's backward, which may backpropagate into the
parameters of the modules it is given (a reversible layer's recomputation: Reformer's): their gradients
are put back as they were after it. A forward that runs under torch.no_grad (a reversible layer, which
recomputes in its backward) records no operations, and one that writes its products into a buffer with
`out=` (trl's fused log-probability head, `torch.mm(h, W.t(), out=tile)`) cannot be recorded (autograd refuses
an out= operation on inputs that require gradients): the check names either, and torch.fx, which keeps F's
call, or the eager route, both of which apply F with its backward, is what captures such a model.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math
import weakref

import torch
from torch.autograd import forward_ad
from torch import fx, nn
from torch.autograd.function import Function, _is_setup_context_defined, _SingleLevelFunction
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map

from gnfx.errors import CaptureError, GnfxError

OPAQUE_FUNCTION = "gnfx_custom_function"  # meta of a torch.fx node calling F.apply: F's qualified name
TOLERANCE = 1e-3  # relative difference of the two vector-Jacobian products above which F's backward is another
# a Function's difference at its first application under forward mode (jvps_of_forwards), by class
_FORWARD_DIFFERENCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _RecordedContext:
    """The ctx a custom Function's forward gets when its operations are recorded instead of run under
    no_grad: it keeps what the forward saves and which outputs it marks non-differentiable."""

    def __init__(self, args):
        self.needs_input_grad = tuple(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        self.saved_tensors, self.non_differentiable = (), set()

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *tensors):
        self.non_differentiable |= {id(t) for t in tensors}

    def mark_dirty(self, *tensors):
        pass

    def set_materialize_grads(self, value):
        pass


def recorded_forward(cls, *args, **kwargs):
    """F's forward on (args, kwargs) with its operations recorded by autograd (its derivative, not F's
    backward); the outputs it marks non-differentiable detached, as F.apply returns them."""
    if _is_setup_context_defined(cls.setup_context):
        return cls.forward(*args, **kwargs)
    ctx = _RecordedContext(args)
    out = cls.forward(ctx, *args, **kwargs)
    return tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) and id(t) in ctx.non_differentiable else t,
                    out)


def _has_jvp(cls) -> bool:
    return cls.jvp is not _SingleLevelFunction.jvp


def _primal(x):
    return forward_ad.unpack_dual(x).primal if isinstance(x, torch.Tensor) else x


def _forward_jvp(cls, args, kwargs, tangents):
    """J t of F's forward's recorded operations at (args, kwargs), t the tangents of the positional
    arguments (None: 0), by reverse mode twice (forward mode, inside which F's jvp runs, does not nest):
    J t = ∂/∂u (uᵀ J) t at u = 0. The same structure as F's outputs, None for a non-tensor one."""
    with torch.enable_grad():
        xs = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        out = recorded_forward(cls, *_written_copies(xs), **kwargs)
        outputs = [y for y in tree_leaves(out) if isinstance(y, torch.Tensor) and y.requires_grad]
        pairs = [(x, t) for x, t in zip(xs, tangents) if isinstance(x, torch.Tensor) and x.requires_grad
                 and t is not None]
        products = [torch.zeros_like(y) for y in outputs]
        if pairs and outputs:
            us = [torch.zeros_like(y, requires_grad=True) for y in outputs]
            grads = torch.autograd.grad(outputs, [x for x, _ in pairs], us, create_graph=True, allow_unused=True)
            used = [(g, t) for g, (_, t) in zip(grads, pairs) if g is not None]
            if used:
                found = torch.autograd.grad([g for g, _ in used], us, [t for _, t in used], allow_unused=True)
                products = [p if f is None else f for p, f in zip(products, found)]
    by_output = {id(y): p.detach() for y, p in zip(outputs, products)}
    return tree_map(lambda y: by_output.get(id(y)) if isinstance(y, torch.Tensor) else None, out)


@contextlib.contextmanager
def jvps_of_forwards():
    """While inside, every custom Function without jvp (defined outside torch) has one: J t of its forward's
    operations at this application's inputs (module docstring), once its backward was found to be that
    forward's derivative at its first application (at the primal values; random generators as they were);
    a GnfxError names a Function whose backward is another."""
    lacking = [cls for cls in _defining_forward() if not _has_jvp(cls)]

    def stash(cls, ctx, forward, args, kwargs):  # the inputs of a forward with a ctx, for its jvp
        if ctx is not None:  # (objects as they are before the forward appends to them, _written_copies)
            ctx._gnfx_inputs = tree_map(_objects_copied, (args, kwargs))
        return forward(*args, **kwargs)

    def stashing_setup(original):  # the inputs of a forward without ctx, which setup_context gets
        def setup_context(ctx, inputs, output):
            ctx._gnfx_inputs = (inputs, {})
            return original(ctx, inputs, output)
        return staticmethod(setup_context)

    def jvp(ctx, *tangents):
        cls = ctx._forward_cls
        args, kwargs = tree_map(_primal, ctx._gnfx_inputs)
        if cls not in _FORWARD_DIFFERENCES:
            devices = [t.device for t in tree_leaves(args) if isinstance(t, torch.Tensor) and t.device.type != "cpu"]
            with torch.random.fork_rng(devices=devices):
                _FORWARD_DIFFERENCES[cls] = _backward_difference(cls, tuple(args), kwargs)
        if _FORWARD_DIFFERENCES[cls] > TOLERANCE:
            raise GnfxError(
                f"forward-mode derivatives (the quadratic-model step, gnfx.ggn) go through the custom "
                f"torch.autograd.Function {_name(cls, _FORWARD_DIFFERENCES[cls])}, which has no jvp, and whose "
                f"backward is not the derivative of its forward, so J v cannot be taken from its forward's "
                f"operations. Fix: give it a jvp staticmethod (and setup_context) that agrees with its backward, or "
                f"pass lr= for a fixed-learning-rate step (step='lr')")
        return _forward_jvp(cls, args, kwargs, tangents)

    setups = {cls: vars(cls)["setup_context"] for cls in lacking if "setup_context" in vars(cls)}
    try:
        for cls in lacking:
            cls.jvp = staticmethod(jvp)
        for cls, original in setups.items():
            cls.setup_context = stashing_setup(original.__func__ if isinstance(original, staticmethod) else original)
        with _forwards_wrapped(stash):
            yield
    finally:
        for cls in lacking:
            del cls.jvp
        for cls, original in setups.items():
            cls.setup_context = original


def _call_of(cls):
    """The function a graph calls for F.apply (named after F, for the graph's code)."""
    def apply(*args, **kwargs):
        return cls.apply(*args, **kwargs)
    apply.__name__ = apply.__qualname__ = f"{cls.__name__}_apply"
    apply.function = cls  # what it applies: passes/discontinuities.py tells it from torch's own functions
    return apply


def _defining_forward() -> dict:
    """{F: its `forward` as its class holds it} for every subclass F of torch.autograd.Function defined
    outside torch that defines a forward of its own (a staticmethod or a plain function)."""
    found, stack = {}, [Function]
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub not in found:
                found[sub] = vars(sub).get("forward")
                stack.append(sub)
    return {cls: f for cls, f in found.items() if not cls.__module__.startswith("torch.")
            and (isinstance(f, staticmethod) or inspect.isfunction(f))}


@contextlib.contextmanager
def _forwards_wrapped(wrap):
    """Every custom Function's forward is `wrap(F, ctx, forward, args, kwargs)` while inside, F the Function
    applied (a subclass inheriting its forward: the ctx's `_forward_cls`), ctx its context (None for a
    forward without one, which has setup_context) and `args` without the ctx.
    `forward` is found on the class at each application (torch's apply looks it up there), so this sees
    an `apply` however it was bound (`ste = STE.apply` at import too)."""
    originals = _defining_forward()

    def wrapped(cls, original):
        function = original.__func__ if isinstance(original, staticmethod) else original
        takes_ctx = not _is_setup_context_defined(cls.setup_context)

        @functools.wraps(function)
        def forward(*args, **kwargs):
            if takes_ctx:
                ctx, *rest = args
                return wrap(getattr(ctx, "_forward_cls", cls), ctx, lambda *a, **k: function(ctx, *a, **k), rest,
                            kwargs)
            return wrap(cls, None, function, args, kwargs)
        return staticmethod(forward)

    try:
        for cls, original in originals.items():
            setattr(cls, "forward", wrapped(cls, original))
        yield
    finally:
        for cls, original in originals.items():
            setattr(cls, "forward", original)


def opaque_in_fx():
    """While tracing with torch.fx, F.apply of a proxy is a call_function node calling F.apply."""
    def wrap(cls, ctx, forward, args, kwargs):
        proxy = next((a for a in tree_leaves((args, kwargs)) if isinstance(a, fx.Proxy)), None)
        if proxy is None:
            return forward(*args, **kwargs)
        call = proxy.tracer.create_proxy("call_function", _call_of(cls), tuple(args), kwargs)
        call.node.meta[OPAQUE_FUNCTION] = f"{cls.__module__}.{cls.__qualname__}"
        return call
    return _forwards_wrapped(wrap)


@contextlib.contextmanager
def applied_functions():
    """Records (in the yielded dict, as keys) every custom Function the forward applies while inside."""
    applied = {}

    def wrap(cls, ctx, forward, args, kwargs):
        applied[cls] = None
        return forward(*args, **kwargs)
    with _forwards_wrapped(wrap):
        yield applied


def _written_copies(leaves: list) -> list:
    """For one run of a Function's forward, a copy x' = x of each input x that requires grad, recorded
    (∂x'/∂x = I), and a deep copy of each input that is no tensor and no module (where it can be copied): a
    forward may write its input in place (pytorch-tabnet's sparsemax: `input -= max`), which autograd refuses
    on a leaf that requires grad, or append to an object it is given (Reformer's cache of keys,
    `past_buckets_states`, which a second run would meet with the first run's keys in it), and neither must
    reach the other run's input nor what the model holds (x, detached from it, shares its storage)."""
    return [t.clone() if isinstance(t, torch.Tensor) and t.requires_grad else _objects_copied(t) for t in leaves]


def _objects_copied(thing):
    """A deep copy of `thing` if it is no tensor and no module, and can be copied (a lock, a generator cannot);
    else `thing` itself."""
    if isinstance(thing, (torch.Tensor, nn.Module)):
        return thing
    try:
        return copy.deepcopy(thing)
    except Exception:  # noqa: BLE001 -- what deepcopy raises for an object it cannot copy is the object's own
        return thing


@contextlib.contextmanager
def _gradients_kept(leaves: list):
    """While inside, the parameters of the modules among `leaves` accumulate into gradients of their own, and
    on exit get back the ones they had: a Function's backward may backpropagate into the parameters itself
    (Reformer's reversible layers recompute their forward in their backward and call torch.autograd.backward
    on it, returning None for the parameters), and a check's backward must add nothing to the model's."""
    kept = {p: p.grad for leaf in leaves if isinstance(leaf, nn.Module) for p in leaf.parameters()}
    try:
        for p in kept:
            p.grad = None
        yield
    finally:
        for p, grad in kept.items():
            p.grad = grad


def _backward_difference(cls, args, kwargs) -> float:
    """The relative difference between vᵀ∂y/∂x by F's backward and by its forward's operations, at the
    floating-point tensors x among (args, kwargs), for one random cotangent v of F's outputs y (inf where its
    forward records no operations: it runs under torch.no_grad; nan where autograd cannot record them: an out=
    operation). Each forward runs on copies
    (`_written_copies`), and the backward leaves the parameters' gradients as they were (`_gradients_kept`)."""
    flat, spec = tree_flatten((args, kwargs))
    leaves = [t.detach().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
              for t in flat]
    inputs = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    state = torch.get_rng_state()
    with _gradients_kept(flat):
        with torch.enable_grad():
            a, k = spec.unflatten(_written_copies(leaves))
            by_backward = [y for y in tree_leaves(cls.apply(*a, **k))
                           if isinstance(y, torch.Tensor) and y.requires_grad]
            torch.set_rng_state(state)  # the same draws for both forwards
            a, k = spec.unflatten(_written_copies(leaves))
            try:
                by_forward = [y for y in tree_leaves(recorded_forward(cls, *a, **k))
                              if isinstance(y, torch.Tensor) and y.requires_grad]
            except RuntimeError as exc:  # an operation autograd cannot record: an out= product into a buffer
                if "don't support automatic differentiation" not in str(exc):
                    raise
                return math.nan
        if not inputs or not by_backward:
            return 0.0
        if not by_forward:  # its forward ran under torch.no_grad: no operations to differentiate
            return math.inf
        cotangents = [torch.randn_like(y) for y in by_backward]
        first = torch.autograd.grad(by_backward, inputs, cotangents, allow_unused=True)
        second = (torch.autograd.grad(by_forward, inputs, cotangents[:len(by_forward)], allow_unused=True)
                  if by_forward else [None] * len(inputs))
    worst = 0.0
    for g, h, x in zip(first, second, inputs):
        g = torch.zeros_like(x) if g is None else g
        h = torch.zeros_like(x) if h is None else h
        scale = max(g.norm().item(), h.norm().item())
        worst = max(worst, (g - h).norm().item() / scale if scale > 0 else 0.0)
    return worst


def _name(cls, difference: float) -> str:
    if math.isnan(difference):
        return (f"{cls.__module__}.{cls.__qualname__} (its forward writes into tensors with out=, which autograd "
                f"cannot record, as trl's fused log-probability head does with its logits tiles, so its forward "
                f"has no derivative to take)")
    if difference == math.inf:
        return (f"{cls.__module__}.{cls.__qualname__} (its forward records no operations: it computes its "
                f"outputs under torch.no_grad, as a reversible layer does that recomputes them in its backward, "
                f"so its forward has no derivative to take)")
    return f"{cls.__module__}.{cls.__qualname__} (relative difference {difference:.3g} of the two)"


def check_backwards(model: nn.Module, args: tuple, kwargs: dict, functions) -> None:
    """Raise a CaptureError naming each Function of `functions` whose backward is not its forward's
    derivative at some application in the call model(*args, **kwargs) (module docstring)."""
    functions = set(functions)
    differences: dict = {}
    checking = []  # non-empty while a difference is taken, whose own applications are not checked

    def wrap(cls, ctx, forward, args, kwargs):
        if cls in functions and not checking:
            checking.append(cls)
            try:
                difference = _backward_difference(cls, tuple(args), kwargs)
                differences[cls] = difference if math.isnan(difference) else max(differences.get(cls, 0.0), difference)
            finally:
                checking.pop()
        return forward(*args, **kwargs)

    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = [t.device for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.device.type != "cpu"]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices), _forwards_wrapped(wrap):
            model(*args, **kwargs)
    finally:
        with torch.no_grad():
            for b, kept in buffers:
                b.copy_(kept)
    wrong = {cls: d for cls, d in differences.items() if not d <= TOLERANCE}  # (nan: no derivative to take)
    if wrong:
        named = "; ".join(_name(cls, d) for cls, d in wrong.items())
        raise CaptureError(
            f"the forward applies the custom torch.autograd.Function {named}, whose backward is not the derivative "
            f"of its forward (a straight-through estimator, a clipped or rescaled gradient). torch.export records "
            f"the operations of its forward, so the captured graph's gradients would not be the model's. Fix: "
            f"capture='fx' (which keeps the Function's call, and its backward, in the graph), or write the "
            f"Function's forward so that its derivative is the gradient you want (a straight-through rounding: "
            f"x + (torch.round(x) - x).detach())")
