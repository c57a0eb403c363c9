"""spectral_norm: the spectral normalizations W = W_o / σ of a graph (gnfx.reparametrization.SpectralNorm).

Under torch.fx the parametrization `nn.utils.parametrizations.spectral_norm` is a `call_module` of its
`_SpectralNorm` on W_o, kept as it is: in training mode that call runs the power iteration, which
updates u and v in place before σ = uᵀ W_o v. `find_spectral_norms` gives such calls whose W_o (a
matrix or a kernel: a vector is normalized by its norm instead) is a trainable parameter nothing else
uses. Not recognized, so falling back with the reason of the use: the old API (`nn.utils.spectral_norm`,
a pre-hook that keeps its layer an opaque module call) and torch.export's graphs (which write the
power iteration and σ out as separate ops).
"""
from __future__ import annotations

from torch import fx
from torch.nn.utils.parametrizations import _SpectralNorm

from gnfx.reparametrization import SpectralNorm

from .weight_norm import weight_name


def find_spectral_norms(gm: fx.GraphModule, param_of, shape_of, uses: dict) -> dict[fx.Node, SpectralNorm]:
    """Each `_SpectralNorm` call on a trainable parameter W_o of 2 or more dimensions (`param_of(node)`
    gives its name, `shape_of(name)` its shape) that is W_o's only use (`uses`: each parameter's
    (consumer, get_attr) pairs), with its gnfx.reparametrization.SpectralNorm."""
    modules = dict(gm.named_modules(remove_duplicate=False))
    found = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], _SpectralNorm):
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        original = param_of(node.args[0])
        if original is None or len(shape_of(original)) < 2:
            continue
        if all(consumer is node for consumer, _ in uses[original]):
            found[node] = SpectralNorm(weight_name(original), original, modules[node.target])
    return found
