"""A preconditioner defined outside gnfx: a factored second moment (Adafactor's, Shazeer & Stern 2018).

    python examples/custom_preconditioner.py [--steps 30]      # also runs the DDP part, two processes

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
the bytes the optimizer really holds), gnfx.diagnose, a checkpoint round trip (a resumed run
continues exactly like the uninterrupted one) and data-parallel training: `ddp_parameters` spawns
two processes (torch.multiprocessing, gloo on the loopback, CPU), each training the model wrapped
in DistributedDataParallel on its half of every batch (DDP averages the gradients, so each rank's
G is the gradient of the whole batch); the two ranks end with bit-identical parameters, equal (to
float64 round-off) to those of one process trained on the whole batches. Each process imports this
file, so the registration above runs in each of them: a registered preconditioner must be
registered at import time in every rank.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
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
        """r (d_out), c (d_a), t; per step G ⊙ G (n), the two sums (2n), their moving averages (cost.EMA
        per entry), V̂ (2n), the division by √V̂ + ε (3n). gnfx adds its update chain's state and FLOPs."""
        d_out, d_a = g.dims
        n = g.numel
        state = {"r": (d_out, cost.FACTOR), "c": (d_a, cost.FACTOR), "t": (1, cost.FACTOR)}
        return cost.Parts(state, update=8 * n + cost.EMA * (d_out + d_a))


gnfx.register_preconditioner(FactoredAdam)


def make(seed: int = 0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)
    return gnfx.compile(net, optimizer="factored_adam", lr=1e-2, example_inputs=(torch.randn(2, 10, dtype=dtype),))


def make_batches(steps: int, dtype: torch.dtype = torch.float32) -> list:
    """`steps` batches (x, y) of 64 examples of a synthetic 4-class problem (a random linear teacher)."""
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(10, 4, generator=g, dtype=dtype)
    xs = torch.randn(steps, 64, 10, generator=g, dtype=dtype)
    return [(x, (x @ teacher).argmax(1)) for x in xs]


def ddp_worker(rank: int, world: int, batches: list, out: str) -> None:
    """One rank: the float64 model of `make` in DistributedDataParallel, trained on its contiguous
    1/world of every batch; checks that every rank holds the same parameters and saves its own to
    `out`/rank<r>.pt. The ranks meet in the file `out`/rendezvous (no TCP port to choose, so none that
    another process can take between choosing and binding it)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out, 'rendezvous')}", rank=rank,
                            world_size=world)
    try:
        model = make(dtype=torch.float64)
        shard = [(x.chunk(world)[rank], y.chunk(world)[rank]) for x, y in batches]
        train(model, shard, forward=nn.parallel.DistributedDataParallel(model))
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        assert all(torch.equal(g, flat) for g in gathered), "the ranks' parameters differ"
        torch.save({n: p.detach() for n, p in model.named_parameters()}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def ddp_parameters(batches: list, world: int = 2) -> list[dict]:
    """The parameters each of `world` DDP processes (gloo, loopback) ends with after training on its
    share of `batches` (float64; `ddp_worker`), one dict of named tensors per rank."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(ddp_worker, args=(world, batches, out), nprocs=world, join=True)
        return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=True) for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny tensors: more threads only wait on each other

    batches = make_batches(args.steps + 2)

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

    # DDP: two processes on halves of each batch against one process on the whole batches (float64)
    batches = make_batches(args.steps, torch.float64)
    ranks = ddp_parameters(batches)
    single = make(dtype=torch.float64)
    train(single, batches)
    for name, p in single.named_parameters():
        torch.testing.assert_close(ranks[0][name], p.detach(), rtol=1e-10, atol=1e-12)
    print(f"DDP: {len(ranks)} processes end with identical parameters, equal to one process on the whole batches")


if __name__ == "__main__":
    main()
