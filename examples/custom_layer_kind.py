"""A layer kind defined outside gnfx: a linear map written with torch.einsum.

    python examples/custom_layer_kind.py [--steps 20]

`EinsumLinear` computes `z = W a + b` as `torch.einsum("...i,io->...o", a, weight) + bias`, with its
weight stored (d_in, d_out) as JAX and Flax store it. gnfx's own linear kind knows this einsum (and
the bias added after it); this example writes the kind again from outside, as a user would for a
layer gnfx does not know, and a registered kind takes the nodes it claims from the built-in kinds.
A layer kind is what gnfx needs to know to make a curvature block (docs/design.md, "Adding a layer
kind"):

  * a layout (`EinsumLayout`): how the kind reads as `z = W a` of docs/design.md §1 — the rows a of
    an input (N, R, d_in), every dimension between the examples and the features a position r;
    the rows δ of an output gradient (N, R, d_out) (the default of gnfx.layouts.base.Layout); and
    the weight as the matrix W (d_out x d_in): `view = "t"`, the stored (d_in, d_out) transposed.
    K-FAC's factors follow: A = E[ā āᵀ] over ā = [a, 1] (d_in + 1 entries), S = E[δ δᵀ] (d_out).
  * a detector (`find_einsum_sites`): the graph nodes computing it, with their input a, the
    parameters W and b and the graph uses they account for.

One call of gnfx.register_layer_kind makes every model using it see EinsumLinear as a block of the
kind. The script compiles a small token model once before registering (a block of gnfx's linear
kind) and once after (a block of the registered kind), then shows print(model), a few training steps,
model.cost(), gnfx.diagnose and a checkpoint round trip (a resumed run continues exactly like the
uninterrupted one).
"""
from __future__ import annotations

import argparse
import operator
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import gnfx  # noqa: E402
from gnfx.layouts.base import Layout  # noqa: E402
from gnfx.passes.sites import Site  # noqa: E402

EQUATION = "...i,io->...o"


class EinsumLinear(nn.Module):
    """z = W a + b on inputs (..., d_in), the weight stored as Wᵀ (d_in, d_out)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out) / d_in ** 0.5)
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x):
        return torch.einsum(EQUATION, x, self.weight) + self.bias


class EinsumLayout(Layout):
    """`z = W a + b` on inputs (N, ..., d_in), the weight stored (d_in, d_out)."""

    view = "t"  # the matrix W (d_out x d_in) is the stored weight transposed

    def input_chunks(self, a: torch.Tensor):
        """The rows a as one (N, R, d_in) chunk: every dimension between N and the features is a position."""
        yield a.reshape(a.shape[0], -1, a.shape[-1])


def find_einsum_sites(gm, param_of, shape_of):
    """Every `torch.einsum("...i,io->...o", a, W)` with a trainable 2-D W, and `+ b` after it when b
    is a trainable (d_out,) parameter that only this sum reads. The site is the einsum node (its
    output gradient is also the sum's, so δ is the same); nothing is rejected."""
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch.einsum or len(node.args) != 3:
            continue
        equation, x, w_node = node.args
        weight = param_of(w_node)
        if not isinstance(equation, str) or equation.replace(" ", "") != EQUATION or weight is None:
            continue
        d_in, d_out = shape_of(weight)
        uses, bias = [(node, w_node)], None
        (user,) = node.users if len(node.users) == 1 else (None,)
        if user is not None and user.target is operator.add and len(user.args) == 2 and user.args[0] is node:
            b_node = user.args[1]
            if param_of(b_node) is not None and shape_of(param_of(b_node)) == (d_out,) and len(b_node.users) == 1:
                bias = param_of(b_node)
                uses.append((user, b_node))
        sites.append(Site(node=node, input=x, weight=weight, bias=bias, uses=uses, d_in=d_in, d_out=d_out,
                          options={"weight_shape": (d_in, d_out)}))
    return sites, []


class TokenClassifier(nn.Module):
    """(N, T, 8) tokens -> (N, 4): EinsumLinear per token, tanh, mean over tokens, a linear head."""

    def __init__(self):
        super().__init__()
        self.mix = EinsumLinear(8, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.mix(x)).mean(1))


def make(seed: int = 0):
    torch.manual_seed(seed)
    return gnfx.compile(TokenClassifier(), optimizer="kfac", lr=0.05, example_inputs=(torch.randn(2, 5, 8),))


def train(model, batches, forward=None) -> float:
    """One step of `model` per batch, its forward through `forward` (the model itself, or a wrapper
    such as DistributedDataParallel's); returns the last batch's loss."""
    for x, y in batches:
        loss = F.cross_entropy((forward or model)(x), y)
        loss.backward()
        model.step()
        model.zero_grad()
    return float(loss.detach())


def check_resume(model, make, batches) -> None:
    """A checkpoint round trip: a model from `make(seed=2)` that loads `model`'s checkpoint takes the
    same steps on `batches` as `model` itself, bit for bit."""
    checkpoint = {"model": model.state_dict(), "optimizer": model.optimizer.state_dict()}
    resumed = make(seed=2)
    resumed.load_state_dict(checkpoint["model"])
    resumed.optimizer.load_state_dict(checkpoint["optimizer"])
    train(model, batches)
    train(resumed, batches)
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
    assert same, "the resumed run differs from the uninterrupted one"
    print("checkpoint: the resumed run continues exactly like the uninterrupted one")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny tensors: more threads only wait on each other

    unregistered = make()
    print(f"before registering, the einsum is a block of gnfx's {unregistered.layers['mix'].kind!r} kind")
    assert unregistered.layers["mix"].kind == "linear"

    gnfx.register_layer_kind("einsum_linear", EinsumLayout, find_einsum_sites)

    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(8, 4, generator=g)
    xs = torch.randn(args.steps + 2, 64, 5, 8, generator=g)
    batches = [(x, (x.mean(1) @ teacher).argmax(1)) for x in xs]

    model = make()
    assert model.layers["mix"].kind == "einsum_linear" and not model.layers.fallbacks
    print(model)  # the block table: mix is an einsum_linear block, served by K-FAC
    with torch.no_grad():
        first = float(F.cross_entropy(model(batches[0][0]), batches[0][1]))
    last = train(model, batches[:args.steps])
    print(f"kfac with the einsum as a block: cross-entropy {first:.3f} -> {last:.3f} after {args.steps} steps")
    assert last < first, "training with the registered layer kind did not reduce the loss"

    print(model.cost())  # K-FAC's formulas on the einsum block: its factors read through the layout

    gnfx.diagnose(model, batches[-1], loss="cross_entropy")

    check_resume(model, make, batches[args.steps:])  # resume from the state of step `args.steps`


if __name__ == "__main__":
    main()
