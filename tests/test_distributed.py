"""Data-parallel training (gnfx.distributed) with 2 processes on gloo, loopback only.

World size W = 2 on batches of B per rank must give the parameters of one process on the
concatenated batch of 2B (to float32 round-off), for every preconditioner, with the refresh
partitioned across ranks and replicated; and a checkpoint saved by rank 0 loads on every rank.
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
    finally:
        dist.destroy_process_group()


def rendezvous(folder) -> str:
    """The init_method of a process group whose ranks meet in a file under `folder` (a fresh tmp_path):
    no TCP port to choose, so no race with the other processes of the machine for a port that was free
    when it was chosen (the store's port was a bound-then-released ephemeral one before)."""
    return f"file://{folder / 'rendezvous'}"


# the drift rule only where ranks share refreshed rows (partitioned)
@pytest.mark.parametrize("optimizer, mode", [(o, m) for o in ["kfac", "shampoo", "rank1", "diag"]
                                             for m in ["partitioned", "replicated"]] + [("shampoo_drift", "partitioned")])
def test_two_ranks_equal_one_process_on_the_concatenated_batch(optimizer, mode, tmp_path):
    out = str(tmp_path / "rank0.pt")
    mp.spawn(worker, args=(2, rendezvous(tmp_path), optimizer, mode, out), nprocs=2, join=True)
    result = torch.load(out, weights_only=True)

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
