"""constant_parameters: the trainable parameters a captured graph reads as constants, refused.

Both graph forms read a parameter as the model's own only when the forward reaches it as an attribute of a
module (`self.weight`, a ParameterDict's entry): torch.fx then makes it a proxy, torch.export a parameter
input. A forward that reaches the same Parameter through a plain Python object (keras 3's Variables under
KERAS_BACKEND=torch: a keras layer reads `self.kernel.value`, the torch Parameter its model also registers in a
ParameterDict; a parameter kept in a list of holder objects) hands the tracer a real tensor, which becomes a
constant of the graph: torch.export lifts it as a tensor constant (`lifted_tensor_k`, sharing its storage),
torch.fx keeps what the forward computed from it at trace time (`_tensor_constant_k`, `w.T`: a view of its
storage). Either way the layer has no weight node, so no curvature block: every parameter of a keras model fell
to the diagonal preconditioner (Adam), under "kfac" or "shampoo", with a warning that the captured forward does
not use them whose advice (a forward that returns an object running the layers later) does not apply. Such a
constant is told by its storage, which it shares with a trainable parameter while being no parameter of the
model itself: the capture is refused, naming the parameters and the fix.
"""
from __future__ import annotations

import torch
from torch import fx, nn


def parameters_read_as_constants(gm: fx.GraphModule, model: nn.Module) -> dict[str, str]:
    """{constant attribute of `gm`: the name of the trainable parameter of `model` whose storage it shares},
    for each tensor a get_attr node of `gm` reads under another name than a parameter's of `model` (torch.fx
    registers a Parameter it met as a constant under a name of its own, `_tensor_constant0`; module doc)."""
    trainable = {p.untyped_storage().data_ptr(): n for n, p in model.named_parameters() if p.requires_grad}
    registered = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    found = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target in registered:
            continue
        value = gm
        for part in node.target.split("."):
            value = getattr(value, part, None)
        if isinstance(value, torch.Tensor) and value.numel():
            name = trainable.get(value.untyped_storage().data_ptr())
            if name is not None:
                found[node.target] = name
    return found


def constant_parameters_message(found: dict[str, str], model: nn.Module) -> str:
    """The error for a graph that reads the trainable parameters of `found` (parameters_read_as_constants) as
    constants: what happened, and the fix (keras 3's models train with keras's optimizers)."""
    names = sorted(set(found.values()))
    keras = any(cls.__module__.split(".")[0] == "keras" for cls in type(model).__mro__)
    listed = ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    why = ("a keras 3 model (KERAS_BACKEND=torch) is a torch nn.Module whose layers read their weights as "
           "`variable.value`, the torch Parameter a keras Variable holds, " if keras else
           "the forward reaches them through an object that is not a module attribute (a keras 3 Variable's "
           "`.value`, a parameter kept in a list or a plain Python object), ")
    fix = ("gnfx cannot precondition a keras model, and keras's model.compile(optimizer=...) takes keras "
           "optimizers only (a torch optimizer is refused there): train it with keras's own optimizers (or "
           "torch.optim.AdamW in a torch loop, which is what gnfx would do), or build the network as a torch "
           "nn.Module and compile that" if keras else
           "read each parameter as an attribute of a module in the forward (self.weight, a ParameterDict's "
           "entry), then compile again")
    return (f"the captured graph of {type(model).__name__} reads the trainable parameter(s) {listed} as constants, "
            f"not as the model's parameters: {why}which the graph capture cannot see as a parameter and keeps "
            f"as a constant tensor, so no layer that uses them can be a curvature block (gnfx would be Adam on "
            f"them). Fix: {fix}")
