"""sampled_weights: the sampled weights W = μ + P of a graph (gnfx.reparametrization.SampledWeight).

Bayes by Backprop's layers sample their weight on every call: torchbnn's BayesLinear and BayesConv2d compute
`F.linear(x, μ + exp(log σ) ⊙ randn_like(log σ), b_μ + ...)`, bayesian-torch's LinearReparameterization and
Conv2dReparameterization `μ + softplus(ρ) ⊙ ε`, ε drawn into a buffer (passes/buffer_draws.py). Both captures
record the weight as one `add` of the parameter μ and the perturbation P. Read as `x + P` with P a table, the
sum used to be taken for a position embedding added to an activation (passes/position.py), whose statistics
are no linear layer's: torchbnn's μ got a "position" block with the wrong factors.

`find_sampled_weights` gives each such sum (operator.add, torch.add, Tensor.add or aten.add.Tensor, without
alpha, in either order) of a trainable parameter μ and a node P computed neither from an input of the graph
nor from μ (from other parameters, buffers and draws), whose every user is a linear map or a convolution
(reading it as a weight or a bias), and, where the graph records values (torch.export), of μ's shape:
passes/analyze.py makes the sum stand for μ, so that the linear and convolution detectors see μ as the
layer's weight (or bias), and the block holds μ itself. μ's only use is the sum but for the KL a forward
returns beside its output (bayesian-torch's layers called with return_kl=True: a term of its own,
passes/own_terms.py, which no block claims), so P is computed without μ. Not recognized, so falling back with
the reason of its use: a sample that other operations read (blitz's log prior and log posterior of W), a μ
read in the data path elsewhere.
"""
from __future__ import annotations

from torch import fx

from gnfx.reparametrization import SampledWeight

from .conv import CONV_OPS
from .graph_view import ancestors
from .linear import ADD_OPS, LINEAR_OPS
from .shapes import value_of

SUMS = (*ADD_OPS, "add")  # the sum W = μ + P (module docstring)
LAYER_READS = (*LINEAR_OPS, *CONV_OPS)  # the users of a sampled weight


def find_sampled_weights(gm: fx.GraphModule, param_of, shape_of, uses: dict) -> dict[fx.Node, SampledWeight]:
    """Each sum μ + P (module docstring) that is μ's only use, with its gnfx.reparametrization.SampledWeight
    (`param_of(node)` gives a parameter's name, `shape_of(name)` its shape; `uses`: each parameter's (consumer,
    get_attr) pairs, its terms of their own dropped, passes/own_terms.py)."""
    found = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method") or node.target not in SUMS or node.kwargs \
                or len(node.args) != 2 or not node.users:
            continue
        for weight, perturbation in (node.args, reversed(node.args)):
            original = param_of(weight)
            if original is None or not isinstance(perturbation, fx.Node) or param_of(perturbation) is not None:
                continue
            value = value_of(node)
            shaped = value is None or tuple(value.shape) == shape_of(original)
            if shaped and all(consumer is node for consumer, _ in uses[original]) \
                    and all(user.op == "call_function" and user.target in LAYER_READS for user in node.users) \
                    and not any(n.op == "placeholder" for n in ancestors([perturbation])):
                found[node] = SampledWeight(original, original)
                break
    return found
