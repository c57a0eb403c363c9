"""Data-parallel training (gnfx.distributed) with 2 processes on gloo, loopback only.

World size W = 2 on batches of B per rank must give the parameters of one process on the
concatenated batch of 2B (to float32 round-off), for every preconditioner, with the refresh
partitioned across ranks and replicated; and a checkpoint saved by rank 0 loads on every rank. So
must the statistics and parameters of the later layer kinds (weight-normed layers, position tables,
layers opened inside an opaque submodule, layer scales); ranks whose opaque code calls different
layers average each layer's statistics over the ranks that called it.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import gnfx

pytestmark = pytest.mark.thread_independent  # its worker processes set their own intra-op threads (tests/conftest.py)

STEPS = 7
HPARAMS = {"lr": 1e-2, "stat_every": 2}
EXTRA = {"kfac": {"inv_every": 3}, "shampoo": {"precondition_frequency": 3, "start_preconditioning_step": 2},
         "rank1": {}, "diag": {"source": "fisher"}}
# Shampoo's drift-triggered refresh: τ = 0.3 keeps some roots and recomputes others on these 7 steps
EXTRA["shampoo_drift"] = {**EXTRA["shampoo"], "refresh_tolerance": 0.3}


def optimizer_name(variant: str) -> str:
    return variant.removesuffix("_drift")


def make_model():
    """float64, so that the only differences between the runs (the order of the sums) stay at
    round-off after the eigendecompositions of several refreshes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4), nn.LayerNorm(4))
    return model.double()


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, 16, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (STEPS, 16), generator=g)
    return x, y


def train(compiled, module, xs, ys):
    for x, y in zip(xs, ys):
        F.cross_entropy(module(x), y).backward()
        compiled.step()
        compiled.zero_grad()


def worker(rank, world, init_method, optimizer, mode, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        compiled = gnfx.compile(make_model(), optimizer_name(optimizer), distributed=mode, **HPARAMS, **EXTRA[optimizer])
        ddp = nn.parallel.DistributedDataParallel(compiled)
        xs, ys = data()
        shard = slice(rank * 8, (rank + 1) * 8)
        train(compiled, ddp, xs[:, shard], ys[:, shard])
        if rank == 0:
            torch.save({"params": {n: p.detach() for n, p in compiled.named_parameters()},
                        "bytes": compiled.optimizer.comm.bytes_communicated,
                        "optimizer": compiled.optimizer.state_dict()}, out)
        dist.barrier()
        # every rank loads rank 0's checkpoint and continues identically
        checkpoint = torch.load(out, weights_only=True)
        compiled.optimizer.load_state_dict(checkpoint["optimizer"])
        assert compiled.optimizer.steps == STEPS
    except BaseException:
        dist.destroy_process_group()
        raise
    leave()


def rendezvous(folder) -> str:
    """The init_method of a process group whose ranks meet in a file under `folder` (a fresh tmp_path):
    no TCP port to choose, so no race with the other processes of the machine for a port that was free
    when it was chosen (the store's port was a bound-then-released ephemeral one before)."""
    return f"file://{folder / 'rendezvous'}"


def leave() -> None:
    """The end of a spawned rank that finished: its process group destroyed, then the process ended at
    once (os._exit) rather than by Python's teardown, where torch 2.13's gloo can deadlock: the DDP
    Reducer, freed last, destroys the process group and joins gloo's worker thread with the GIL held,
    while that thread frees its last work's tensor and waits for the GIL (a rank hung so in
    ~ProcessGroupGloo after its last barrier, once in CI). A rank that raises destroys its group and
    raises (`except BaseException` in each worker), which mp.spawn reports."""
    dist.destroy_process_group()
    os._exit(0)


def on_two_ranks(worker, folder, *args):
    """What rank 0 of `worker(rank, 2, init_method, *args, out)`, spawned on two processes that meet
    under `folder` (a fresh tmp_path), saved to `out`."""
    out = str(folder / "rank0.pt")
    mp.spawn(worker, args=(2, rendezvous(folder), *args, out), nprocs=2, join=True)
    return torch.load(out, weights_only=True)


# the drift rule only where ranks share refreshed rows (partitioned)
@pytest.mark.parametrize("optimizer, mode", [(o, m) for o in ["kfac", "shampoo", "rank1", "diag"]
                                             for m in ["partitioned", "replicated"]] + [("shampoo_drift", "partitioned")])
def test_two_ranks_equal_one_process_on_the_concatenated_batch(optimizer, mode, tmp_path):
    result = on_two_ranks(worker, tmp_path, optimizer, mode)

    single = gnfx.compile(make_model(), optimizer_name(optimizer), **HPARAMS, **EXTRA[optimizer])
    xs, ys = data()
    train(single, single, xs, ys)
    for name, p in single.named_parameters():
        torch.testing.assert_close(result["params"][name], p.detach(), rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")
    # statistics from the taps (kfac, rank1, diag with the Fisher source) are averaged on every
    # statistic step; a partitioned refresh shares its results
    communicates = optimizer in ("kfac", "rank1", "diag") or (optimizer_name(optimizer) == "shampoo" and mode == "partitioned")
    assert (result["bytes"] > 0) == communicates


def test_a_preconditioner_registered_outside_gnfx_under_ddp_equals_one_process(monkeypatch):
    """examples/custom_preconditioner.py's FactoredAdam (registered by the example, not by gnfx) in
    two DDP processes: the ranks end bit-identical and equal to one process on the whole batches."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
    before = dict(gnfx.REGISTRY)
    try:
        import custom_preconditioner as example

        batches = example.make_batches(4, torch.float64)
        ranks = example.ddp_parameters(batches)
        initial = dict(example.make(dtype=torch.float64).named_parameters())
        single = example.make(dtype=torch.float64)
        example.train(single, batches)
    finally:
        gnfx.REGISTRY.clear()
        gnfx.REGISTRY.update(before)
    assert all(torch.equal(ranks[1][name], ranks[0][name]) for name in ranks[0])
    for name, p in single.named_parameters():
        torch.testing.assert_close(ranks[0][name], p.detach(), rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
        assert not torch.equal(p, initial[name])  # it trained


# ----------------------------------------------------------------------------- the later layer kinds
class Branching(nn.Module):
    """A residual block torch.fx cannot trace (a branch on a value), whose layers gnfx opens
    (passes/opaque_children.py): fc2 is called when `h`'s largest entry is below `bound`."""

    def __init__(self, d: int, bound: float):
        super().__init__()
        self.fc1, self.fc2, self.bound = nn.Linear(d, d), nn.Linear(d, d), bound

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        if h.amax() < self.bound:
            h = self.fc2(h)
        return x + h


class Kinds(nn.Module):
    """A weight-normed input layer, a position table (1, T, d) added to its output, an opaque block
    whose layers are opened, a layer scale γ on its branch, a linear head after a tanh (so that every
    factor has full rank, and EKFAC's eigenbases are unique): (N, T, 6) -> (N, T, 4).
    `bound`: Branching's (2: fc2 always called, tanh < 1; 0.9: called when no entry of the block's
    batch reaches 0.9); `normed`: whether the input layer is weight-normed."""

    def __init__(self, bound: float = 2.0, normed: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(6, 8)
        if normed:
            nn.utils.parametrizations.weight_norm(self.inp)
        self.pos = nn.Parameter(0.5 * torch.randn(1, 5, 8))
        self.block = Branching(8, bound)
        self.gamma = nn.Parameter(0.5 + 0.1 * torch.randn(8))
        self.out = nn.Linear(8, 4)
        self.double()

    def forward(self, x):
        h = self.inp(x) + self.pos
        return self.out(torch.tanh(h + self.block(h) * self.gamma))


KINDS = {"inp": "linear", "pos": "position", "block.fc1": "linear", "block.fc2": "linear", "gamma": "scale",
         "out": "linear"}


def kinds_data():
    """Per step 16 sequences of 5 positions; rank r takes rows [8 r, 8 r + 8). Rank 1's inputs are
    3 times rank 0's, so that the ranks' output-gradient energies differ."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(STEPS, 16, 5, 6, generator=g, dtype=torch.float64)
    x[:, 8:] *= 3
    return x, torch.randint(0, 4, (STEPS, 16, 5), generator=g)


def kinds_loss(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def train_kinds(compiled, module, xs, ys):
    for x, y in zip(xs, ys):
        kinds_loss(module(x), y).backward()
        compiled.step()
        compiled.zero_grad()


KINDS_OPTIMIZERS = {"kfac": {"inv_every": 3}, "ekfac": {"inv_every": 3}, "diag": {"source": "fisher"}}


def kinds_worker(rank, world, init_method, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        xs, ys = kinds_data()
        shard = slice(rank * 8, (rank + 1) * 8)
        results = {}
        for optimizer, extra in KINDS_OPTIMIZERS.items():
            compiled = gnfx.compile(Kinds(), optimizer, capture="fx", **HPARAMS, **extra)
            train_kinds(compiled, nn.parallel.DistributedDataParallel(compiled), xs[:, shard], ys[:, shard])
            results[optimizer] = {"params": {n: p.detach() for n, p in compiled.named_parameters()},
                                  "statistics": compiled.optimizer.statistics.state_dict(),
                                  "kinds": {b.name: b.kind for b in compiled.layers.blocks},
                                  "reparametrized": [b.name for b in compiled.layers.blocks
                                                     if b.reparametrization is not None]}
        # ranks that take different branches (kinds_data: rank 1's activations reach 0.9, rank 0's do not):
        # fc2 is called on rank 0 only, and rank 1 does not hang on statistics it does not have
        compiled = gnfx.compile(Kinds(bound=0.9), "kfac", capture="fx", **HPARAMS, **KINDS_OPTIMIZERS["kfac"])
        ddp = nn.parallel.DistributedDataParallel(compiled, find_unused_parameters=True)
        train_kinds(compiled, ddp, xs[:1, shard], ys[:1, shard])
        results["branches"] = compiled.optimizer.statistics.state_dict()
        gathered = [None] * world
        dist.all_gather_object(gathered, results)
        if rank == 0:
            torch.save(gathered, out)
    except BaseException:
        dist.destroy_process_group()
        raise
    leave()


@pytest.fixture(scope="module")
def kinds_ranks(tmp_path_factory):
    """What kinds_worker's two ranks return, by rank (one spawn for the tests below)."""
    return on_two_ranks(kinds_worker, tmp_path_factory.mktemp("kinds"))


def test_the_later_layer_kinds_on_two_ranks_equal_one_process_on_the_concatenated_batch(kinds_ranks):
    """Weight-normed layers, position tables (A_t = e_t / Σ e), layers opened inside an opaque
    submodule and layer scales, under DDP: kfac, ekfac and diag's Fisher statistics and the parameters
    after 7 steps equal one process's on the concatenated batch, on both ranks."""
    xs, ys = kinds_data()
    for optimizer, extra in KINDS_OPTIMIZERS.items():
        single = gnfx.compile(Kinds(), optimizer, capture="fx", **HPARAMS, **extra)
        train_kinds(single, single, xs, ys)
        for result in (r[optimizer] for r in kinds_ranks):
            assert result["kinds"] == KINDS and result["reparametrized"] == ["inp"]
            for block, stats in single.optimizer.statistics.state_dict().items():
                assert result["statistics"][block]["updates"] == stats["updates"]
                for k, v in stats["values"].items():
                    torch.testing.assert_close(result["statistics"][block]["values"][k], v, rtol=1e-10, atol=1e-12,
                                               msg=lambda m: f"{optimizer} {block} {k}: {m}")
            for name, p in single.named_parameters():
                torch.testing.assert_close(result["params"][name], p.detach(), rtol=1e-9, atol=1e-10,
                                           msg=lambda m: f"{optimizer} {name}: {m}")


def test_ranks_whose_opaque_code_calls_different_layers_average_what_each_called(kinds_ranks):
    """Kinds(bound=0.9) on kinds_data's first step: fc2 is called by rank 0 only (Σ_r N_r F_r / Σ_r N_r
    over the ranks whose forwards reached it: rank 0's statistics, on both ranks), fc1 by both (the
    mean of the two ranks'), each rank's as one process on its half computes them."""
    xs, ys = kinds_data()
    halves = []
    for shard in (slice(0, 8), slice(8, 16)):
        single = gnfx.compile(Kinds(bound=0.9), "kfac", capture="fx", **HPARAMS, **KINDS_OPTIMIZERS["kfac"])
        train_kinds(single, single, xs[:1, shard], ys[:1, shard])
        halves.append(single.optimizer.statistics.state_dict())
    assert halves[0]["block.fc2"]["updates"] == 1 and halves[1]["block.fc2"]["updates"] == 0
    for result in (r["branches"] for r in kinds_ranks):
        for k, v in halves[0]["block.fc2"]["values"].items():
            torch.testing.assert_close(result["block.fc2"]["values"][k], v, rtol=1e-10, atol=1e-12)
        for k, v in halves[0]["block.fc1"]["values"].items():
            torch.testing.assert_close(result["block.fc1"]["values"][k], (v + halves[1]["block.fc1"]["values"][k]) / 2,
                                       rtol=1e-10, atol=1e-12)
