"""parameter_casts: a parameter moved or cast to a floating dtype stands for the parameter.

`F.linear(x, self.weight.to(x.device))`, `self.weight.to(x.dtype)`, SigLIP's
`self.logit_scale.to(text_embeds.device)`: the layer computes with W itself (already there) or a copy of
W in another floating dtype or on another device, and its statistics and gradient are W's, through the
cast. torch.export records such a `.to` as `aten.to.dtype_layout` (or `to.dtype`, `_to_copy`) after an
`aten._assert_tensor_metadata(W, dtype=..., device=...)`, a check with no output. Both used to make W
fall back to diag ("to", "_assert_tensor_metadata.default, not a layer gnfx models").

`read_through_casts` gives the reads of a parameter's get_attr node as the detectors see them: each
cast's users in place of the cast (casts of casts followed), reads of metadata alone (METADATA_READS,
METADATA_ATTRIBUTES) left out, and records each cast in `casts` so that the parameter index names the parameter for it (passes/analyze.py). A cast to a
dtype the graph names that is not floating (no gradient flows through it) is a use of its own.
A dead read is left out too: an operation on the parameter whose result no node reads and which changes
nothing (not `is_impure()`, no in-place method: no side effect) adds nothing to the loss or its gradient.
torch.export's graph of transformers' Mamba2 mixer holds one, a `W.squeeze(1)` without users beside the
one its convolution reads (it made the conv's weight and bias fall back, "used by call_function
'squeeze.dim'").
A torch.fx graph reads metadata as `getattr(W, "dtype")` (METADATA_ATTRIBUTES): open_clip's text towers
read `resblocks[0].mlp.c_fc.weight.dtype` as their cast dtype, which made that layer fall back
("used by call_function 'getattr'").
"""
from __future__ import annotations

import builtins

import torch
from torch import fx

aten = torch.ops.aten
CASTS = (aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.type_as.default,
         "to", "type_as", "float", "double", "half", "bfloat16")
# ops that read a tensor's metadata, not its values: no gradient flows through them (torch.export's
# graph asserts the dtype and device of the input of every `.to()`, a parameter's too: Gemma's `w.float()`)
METADATA_READS = (aten._assert_tensor_metadata.default, aten.sym_size.int, aten.sym_stride.int,
                  aten.sym_numel.default, aten.sym_storage_offset.default)
# the attributes of a tensor that are its metadata, read by torch.fx's `getattr(W, name)` (`W.T`, `W.data`, `W.mT`
# read its values)
METADATA_ATTRIBUTES = ("dtype", "device", "shape", "layout", "ndim", "is_cuda", "requires_grad")


def _is(node, targets) -> bool:
    return node.op in ("call_function", "call_method") and node.target in targets


def _floating_target(node: fx.Node) -> bool:
    """Whether a cast keeps a floating dtype: no dtype named (a move, or one read at run time) or a
    floating one."""
    named = [a for a in (*node.args[1:], *node.kwargs.values()) if isinstance(a, torch.dtype)]
    return all(dtype.is_floating_point for dtype in named)


def floating_cast(node: fx.Node) -> bool:
    """Whether `node` casts or moves its first argument to a floating dtype (or another device): its
    result stands for that argument's values."""
    return _is(node, CASTS) and bool(node.args) and _floating_target(node)


def metadata_read(node: fx.Node) -> bool:
    """Whether `node` reads its input's metadata, not its values: an op of METADATA_READS or torch.fx's
    `getattr(W, name)` of a name in METADATA_ATTRIBUTES."""
    return _is(node, METADATA_READS) or (node.op == "call_function" and node.target is builtins.getattr
                                         and len(node.args) == 2 and node.args[1] in METADATA_ATTRIBUTES)


def _dead(node: fx.Node) -> bool:
    """Whether nothing reads `node`'s result and it changes nothing (module docstring): not impure, and
    no in-place method (`W.add_(...)`: torch.fx's graph names methods, whose effects is_impure does not know)."""
    in_place = node.op == "call_method" and node.target.endswith("_")
    return not node.users and not in_place and not node.is_impure()


def read_through_casts(node: fx.Node, casts: dict, name: str) -> list[tuple]:
    """The (consumer, node it reads) pairs of parameter `name`'s get_attr `node` (module docstring);
    each cast followed is recorded as `casts[cast] = name`."""
    reads = []
    for user in node.users:
        if metadata_read(user) or _dead(user):
            continue
        if floating_cast(user) and user.args[0] is node:
            casts[user] = name
            reads.extend(read_through_casts(user, casts, name))
        else:
            reads.append((user, node))
    return reads
