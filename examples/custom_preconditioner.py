"""A preconditioner defined outside gnfx: a factored second moment (Adafactor's, Shazeer & Stern 2018).

    python examples/custom_preconditioner.py [--steps 30]

The class below is all it takes (docs/design.md, "Adding a preconditioner"): the batched math on a
stacked gradient G (k pieces, each a block's d_out x d_a matrix [∇W ∇b]), its state, its cost
formulas and the curvature it models; one call of gnfx.register_preconditioner makes its name an
`optimizer=` of gnfx.compile. Per piece, with β = `beta`, ε = `epsilon`, t the steps so far:

    r ← β r + (1-β) (G ⊙ G) 1,        c ← β c + (1-β) 1ᵀ(G ⊙ G)        (row and column sums)
    V̂ = r cᵀ / (1ᵀ r) / (1 - βᵗ),     U = G / (√V̂ + ε)

V̂ is the rank-1 fit of Adam's second moment that keeps d_out + d_a numbers instead of d_out·d_a.
gnfx adds the default update chain (gnfx.transforms: heavy-ball momentum, decoupled weight decay,
the step). The script
trains an MLP on synthetic data with it, then shows print(model), model.cost() (checked against
the bytes the optimizer really holds), gnfx.diagnose and a checkpoint round trip (a resumed run
continues exactly like the uninterrupted one).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import gnfx  # noqa: E402
from gnfx import cost  # noqa: E402
from gnfx.hparams import positive, unit_interval  # noqa: E402
from gnfx.preconditioners.curvature import CurvaturePreconditioner, common_hparams  # noqa: E402
from custom_layer_kind import check_resume, train  # noqa: E402  (examples/custom_layer_kind.py, this script's folder)


class FactoredAdam(CurvaturePreconditioner):
    name = "factored_adam"
    HPARAMS = {
        **common_hparams(),  # momentum μ of the update chain, decomposition_dtype
        "beta": unit_interval("decay β of the row and column sums of G ⊙ G", 0.999),
        "epsilon": positive("ε added to √V̂", 1e-8),
    }

    def init_group(self, group):
        d_out, d_a = group.shape
        return {"r": self.stacked_zeros(group, d_out), "c": self.stacked_zeros(group, d_a), "t": self.stacked_zeros(group)}

    def second_moment(self, state) -> torch.Tensor:
        """V̂ = r cᵀ / (1ᵀ r) / (1 - βᵗ), stacked over the pieces."""
        r, c, t = state["r"], state["c"], state["t"]
        total = r.sum(1).clamp_min(torch.finfo(r.dtype).tiny)
        return r.unsqueeze(2) * c.unsqueeze(1) / (total * (1 - self.hp["beta"] ** t)).view(-1, 1, 1)

    def direction(self, G, state, collect):
        G2 = G * G
        state["t"] += 1
        state["r"].lerp_(G2.sum(2), 1 - self.hp["beta"])
        state["c"].lerp_(G2.sum(1), 1 - self.hp["beta"])
        return G / (self.second_moment(state).sqrt() + self.hp["epsilon"])

    def curvature_product(self, group, i, V, statistics):
        """diag(V̂) vec(V): the curvature it models, as "diag" models diag(v̂) (read by gnfx.diagnose)."""
        state = self.group_state(group)
        return self.second_moment({k: v[i:i + 1] for k, v in state.items()})[0] * V

    @classmethod
    def cost_parts(cls, g, hp, at):
        """r (d_out), c (d_a), t and the tail's momentum (n); per step G ⊙ G (n), the two sums (2n),
        their moving averages (cost.EMA per entry), V̂ (2n), the division by √V̂ + ε (3n), the tail."""
        d_out, d_a = g.dims
        n = g.numel
        state = {"r": (d_out, cost.FACTOR), "c": (d_a, cost.FACTOR), "t": (1, cost.FACTOR), "momentum": (n, cost.FACTOR)}
        return cost.Parts(state, update=8 * n + cost.EMA * (d_out + d_a) + cost.TAIL * n)


gnfx.register_preconditioner(FactoredAdam)


def make(seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 4))
    return gnfx.compile(net, optimizer="factored_adam", lr=1e-2, example_inputs=(torch.randn(2, 10),))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny tensors: more threads only wait on each other

    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(10, 4, generator=g)
    xs = torch.randn(args.steps + 2, 64, 10, generator=g)
    batches = [(x, (x @ teacher).argmax(1)) for x in xs]

    model = make()
    with torch.no_grad():
        first = float(F.cross_entropy(model(batches[0][0]), batches[0][1]))
    last = train(model, batches[:args.steps])
    print(f"factored_adam: cross-entropy {first:.3f} -> {last:.3f} after {args.steps} steps")
    assert last < first, "training with the registered preconditioner did not reduce the loss"

    print(model)  # the block table: every block served by factored_adam, with its state memory
    report = model.cost()
    print(report)
    held = sum(v.numel() * v.element_size() for s in model.optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))
    assert report.total_memory_bytes == held, (report.total_memory_bytes, held)  # the formulas are exact
    print(f"cost model: {report.total_memory_bytes} bytes of optimizer state, as allocated")

    gnfx.diagnose(model, batches[-1], loss="cross_entropy")

    check_resume(model, make, batches[args.steps:])  # resume from the state of step `args.steps`


if __name__ == "__main__":
    main()
