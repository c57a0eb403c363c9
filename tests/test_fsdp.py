"""FSDP2 (`fully_shard`, gnfx.fsdp) with 2 processes on gloo, loopback only, one process group for
every preconditioner.

W = 2 ranks on batches of B must give the parameters of one process on the concatenated batch of
2B (float64, to round-off) for diag, kfac, shampoo, soap, rank1 and ekfac (whose owners send the
refreshed eigenbases to every rank with the updates); the curvature state is not
replicated (the ranks' states add up to the single process's); a checkpoint taken mid-run (each
rank's optimizer state_dict and parameter shards) resumes bit for bit; a decomposition that fails
on its owner keeps the last good root; a non-finite gradient in one rank's shard skips the step on
every rank; each rank keeps the bytes the cost model says; the later layer kinds (a position table,
layers opened inside an opaque submodule, a layer scale) train as one process does; and the
unsupported (compiling a sharded model, sharding blocks but not the compiled model, distributed='off',
weight-normed and spectrally normed blocks, of either weight-norm API) is refused with the reason and
the fix.
"""
from __future__ import annotations

import io

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard

import gnfx
import gnfx.preconditioners.shampoo as shampoo_module
from test_distributed import KINDS_OPTIMIZERS, Kinds, kinds_data, leave, on_two_ranks, train_kinds

pytestmark = pytest.mark.thread_independent  # its worker processes set their own intra-op threads (tests/conftest.py)

STEPS, CUT = 7, 4
HPARAMS = {"lr": 1e-2, "stat_every": 2, "weight_decay": 0.1}
# SOAP runs Adam in the eigenbasis of its factors, which is arbitrary inside a factor's null space
# (and moves with round-off there): its model has factors of full rank from the first refresh on
EXTRA = {"kfac": {"inv_every": 3}, "shampoo": {"precondition_frequency": 3, "start_preconditioning_step": 2},
         "rank1": {}, "diag": {"source": "fisher"}, "soap": {"stat_every": 1}, "ekfac": {"inv_every": 3}}
OPTIMIZERS = list(EXTRA)
# K-FAC's default step with a loss and no lr: α, μ and λ from the exact GGN model (gnfx.quadratic_step)
# fisher="empirical": the quadratic step's default "mc" does not run under FSDP2 (refused, below)
# forward-mode products: the two ranks' step and one process's agree to rounding, which finite differences (the
# default's on this smooth model) would amplify to ~1e-8
QUADRATIC = {"loss": "cross_entropy", "fisher": "empirical", "stat_every": 2, "inv_every": 3, "weight_decay": 0.1,
             "quadratic_products": "forward"}


def make_model(optimizer):
    """float64, so that the runs differ only by the order of sums, at round-off."""
    torch.manual_seed(0)
    if optimizer == "soap":
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Sequential(nn.Linear(4, 4, bias=False)))
    else:
        model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Sequential(nn.Linear(16, 16), nn.Tanh()),
                              nn.Linear(16, 4), nn.LayerNorm(4))
    return model.double()


def compile_model(optimizer, hparams=None):
    return gnfx.compile(make_model(optimizer), optimizer, **(hparams or {**HPARAMS, **EXTRA[optimizer]}))


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, 16, 3, generator=g, dtype=torch.float64), torch.randint(0, 4, (STEPS, 16), generator=g)


def train(compiled, xs, ys):
    for x, y in zip(xs, ys):
        F.cross_entropy(compiled(x), y).backward()
        compiled.step()
        compiled.zero_grad()


def kept_bytes(optimizer) -> int:
    """Every tensor this rank keeps for the optimizer: its state_dict's (moments, factors, roots,
    averaged statistics) and the statistic accumulators the taps fill."""
    sd = optimizer.state_dict()
    tensors = [v for s in sd["state"].values() for v in s.values() if isinstance(v, torch.Tensor)]
    tensors += [v for s in sd["gnfx"]["statistics"].values() for v in s["values"].values()]
    tensors += [getattr(s, k) for s in optimizer.statistics.blocks.values()
                for k in ("_A", "_A_sum", "_S", "_diag", "_eigen_diag", "_grad") if getattr(s, k) is not None]
    if optimizer.sharded is not None:  # the copies of the bases other ranks own (ekfac)
        tensors += [t for bases in optimizer.sharded.replicas.values() for t in bases if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def state_bytes(optimizer) -> int:
    """Bytes of the curvature preconditioners' state and of the statistics this rank keeps."""
    sd = optimizer.state_dict()
    tensors = [v for s in sd["state"].values() for k, v in s.items() if "." in k and isinstance(v, torch.Tensor)]
    tensors += [v for s in sd["gnfx"]["statistics"].values() for v in s["values"].values()]
    return sum(t.numel() * t.element_size() for t in tensors)


def statistics_sent(optimizer, world: int) -> int:
    """Bytes all W ranks send in all to bring each block's N_r-weighted statistics and each one's N_r (float64)
    to the ranks that keep it, counted from the single process's statistics: from the W - 1 other
    ranks to the owner of a curvature block, from every rank to every other for a block of the
    elementwise preconditioner (every rank keeps its statistics)."""
    everywhere = {b.name for pre in optimizer.elementwise for b in pre.blocks}
    total = 0
    for name, stats in optimizer.statistics.blocks.items():
        copies = world * (world - 1) if name in everywhere else world - 1
        total += stats.updates * (sum(v.numel() + 1 for v in stats.values.values())) * copies * 8
    return total


def sharded(optimizer, hparams=None):
    compiled = compile_model(optimizer, hparams)
    fully_shard(compiled.get_submodule("0"))  # a layer and a block the instrumented graph traces through
    fully_shard(compiled.get_submodule("2"))
    fully_shard(compiled)
    return compiled


def worker(rank, world, init_method, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        xs, ys = data()
        xs, ys = xs[:, rank * 8:(rank + 1) * 8], ys[:, rank * 8:(rank + 1) * 8]
        results = {}
        for optimizer in OPTIMIZERS:
            compiled = sharded(optimizer)
            train(compiled, xs[:CUT], ys[:CUT])
            checkpoint = io.BytesIO()  # a copy: state_dict() holds the live state tensors
            torch.save({"optimizer": compiled.optimizer.state_dict(),
                        "shards": {n: p.to_local() for n, p in compiled.named_parameters()}}, checkpoint)
            checkpoint.seek(0)
            checkpoint = torch.load(checkpoint, weights_only=True)
            train(compiled, xs[CUT:], ys[CUT:])
            resumed = sharded(optimizer)
            with torch.no_grad():
                for n, p in resumed.named_parameters():
                    p.to_local().copy_(checkpoint["shards"][n])
            resumed.optimizer.load_state_dict(checkpoint["optimizer"])
            train(resumed, xs[CUT:], ys[CUT:])
            bit_for_bit = all(torch.equal(p.to_local(), q.to_local()) for p, q in
                              zip(compiled.parameters(), resumed.parameters()))
            sizes, kept = [None] * world, [None] * world
            dist.all_gather_object(sizes, state_bytes(compiled.optimizer))
            dist.all_gather_object(kept, kept_bytes(compiled.optimizer))
            sent = [None] * world
            dist.all_gather_object(sent, compiled.optimizer.sharded.statistics_bytes)
            results[optimizer] = {"params": {n: p.full_tensor() for n, p in compiled.named_parameters()},
                                  "resumed_bit_for_bit": bit_for_bit, "state_bytes": sizes, "kept_bytes": kept,
                                  "cost_per_rank": compiled.cost(world_size=world).rank_memory_bytes,
                                  "bytes": compiled.optimizer.sharded.bytes_communicated,
                                  "statistics_bytes": sum(sent)}
        quadratic = sharded("kfac", QUADRATIC)
        train(quadratic, xs, ys)
        results["quadratic"] = {n: p.full_tensor() for n, p in quadratic.named_parameters()}
        results["failure"] = failed_refresh_keeps_root(xs, ys)
        results["non_finite"] = non_finite_on_one_rank_skips_everywhere(rank, xs, ys)
        try:
            gnfx.compile(fully_shard(make_model("kfac")), "kfac")
        except gnfx.ConfigError as error:
            results["reverse_order"] = str(error)
        silent = sharded("kfac", {**HPARAMS, "distributed": "off"})
        try:
            train(silent, xs[:1], ys[:1])
        except gnfx.ConfigError as error:
            results["off"] = str(error)
        sampled = sharded("kfac", {"loss": "cross_entropy", "stat_every": 2})  # defaults: fisher="mc"
        try:
            train(sampled, xs[:1], ys[:1])
        except gnfx.ConfigError as error:
            results["mc"] = str(error)
        torch.manual_seed(0)
        normed = gnfx.compile(nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(3, 4)), nn.Tanh(),
                                            nn.Linear(4, 4)).double(), "kfac", **HPARAMS)
        fully_shard(normed)
        try:
            train(normed, xs[:1], ys[:1])
        except gnfx.ConfigError as error:
            results["weight_norm"] = str(error)
        results["reparametrized"] = refused_reparametrizations(xs, ys)
        results["kinds"] = later_kinds(rank)
        blocks_only = compile_model("kfac")
        fully_shard(blocks_only.get_submodule("2"))
        try:
            blocks_only(xs[0])
        except gnfx.GnfxError as error:
            results["no_root"] = str(error)
        if rank == 0:
            torch.save(results, out)
    except BaseException:
        dist.destroy_process_group()
        raise
    leave()


class StandardizedLinear(nn.Linear):
    """A linear layer standardizing its weight's rows in its forward, as BiT's convolutions do."""

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_features, -1), None, None, training=True,
                              momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.linear(x, weight, self.bias)


def refused_reparametrizations(xs, ys):
    """The refusal of a spectrally normed layer, of the older weight-norm API's (a pre-hook) and of a
    weight-standardized one, by name."""
    refusals = {}
    for name, reparametrize in (("spectral_norm", nn.utils.parametrizations.spectral_norm),
                                ("weight_norm_hook", nn.utils.weight_norm),
                                ("weight_standardization", lambda layer: StandardizedLinear(4, 4))):
        torch.manual_seed(0)
        compiled = gnfx.compile(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), reparametrize(nn.Linear(4, 4))).double(),
                                "kfac", **HPARAMS)
        fully_shard(compiled)
        try:
            train(compiled, xs[:1], ys[:1])
        except gnfx.ConfigError as error:
            refusals[name] = str(error)
    return refusals


def later_kinds(rank):
    """test_distributed's Kinds without its weight norm (a position table, layers opened inside an
    opaque submodule, itself sharded, and a layer scale) on this rank's half of its batches: the
    parameters after 7 steps, for each of KINDS_OPTIMIZERS."""
    xs, ys = kinds_data()
    shard = slice(rank * 8, (rank + 1) * 8)
    params = {}
    for optimizer, extra in KINDS_OPTIMIZERS.items():
        compiled = gnfx.compile(Kinds(normed=False), optimizer, capture="fx", **HPARAMS, **extra)
        fully_shard(compiled.get_submodule("block"))
        fully_shard(compiled)
        train_kinds(compiled, compiled, xs[:, shard], ys[:, shard])
        params[optimizer] = {n: p.full_tensor() for n, p in compiled.named_parameters()}
    return params


def failed_refresh_keeps_root(xs, ys):
    """Shampoo whose second refresh fails on every rank's owned pieces: the roots stay those of the
    first refresh, the failures are counted, and both ranks keep training (no collective hangs)."""
    compiled = sharded("shampoo")
    train(compiled, xs[:3], ys[:3])  # refreshes at step 2
    pre = compiled.optimizer.curvature[0]
    before = {k: s["root0"].clone() for k, s in pre.states().items()}
    original = shampoo_module.damped_inverse_power

    def failing(F, *args, **kwargs):
        root, ok = original(F, *args, **kwargs)
        return root, torch.zeros_like(ok)

    shampoo_module.damped_inverse_power = failing
    try:
        train(compiled, xs[3:6], ys[3:6])  # refreshes at step 5, which fails
    finally:
        shampoo_module.damped_inverse_power = original
    kept = all(torch.equal(before[k], s["root0"]) for k, s in pre.states().items())
    failures = sum(int(s["failures"].sum()) for s in pre.states().values())
    return {"kept": kept, "failures": failures, "pieces": sum(len(g.pieces) for g in pre.groups)}


def non_finite_on_one_rank_skips_everywhere(rank, xs, ys):
    """A NaN in one entry of rank 1's gradient shard: every rank skips the step (nothing changes)."""
    compiled = sharded("kfac")
    train(compiled, xs[:2], ys[:2])
    before = [p.to_local().clone() for p in compiled.parameters()]
    F.cross_entropy(compiled(xs[2]), ys[2]).backward()
    if rank == 1:
        next(compiled.parameters()).grad.to_local()[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="skipped step 2"):
        compiled.step()
    compiled.zero_grad()
    unchanged = all(torch.equal(b, p.to_local()) for b, p in zip(before, compiled.parameters()))
    return {"skipped": compiled.optimizer.skipped_steps, "unchanged": unchanged}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return on_two_ranks(worker, tmp_path_factory.mktemp("fsdp"))


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_two_sharded_ranks_equal_one_process_on_the_concatenated_batch(two_ranks, optimizer):
    single = compile_model(optimizer)
    xs, ys = data()
    train(single, xs, ys)
    result = two_ranks[optimizer]
    for name, p in single.named_parameters():
        torch.testing.assert_close(result["params"][name], p.detach(), rtol=1e-9, atol=1e-10,
                                   msg=lambda m: f"{name}: {m}")
    assert result["resumed_bit_for_bit"]
    # the curvature state is split, not replicated: the ranks' states add up to one process's
    # (diag keeps no curvature state; its moments are the size of each rank's shard)
    if optimizer != "diag":
        assert sum(result["state_bytes"]) == state_bytes(single.optimizer)
        assert max(result["state_bytes"]) < state_bytes(single.optimizer)
    # the cost model's memory per rank is what each rank keeps
    assert result["kept_bytes"] == result["cost_per_rank"]
    # gradients in and updates out for the curvature targets; diag's step is local to the shards
    assert (result["bytes"] > 0) == (optimizer != "diag")
    # the statistics reach only the ranks that keep them
    assert result["statistics_bytes"] == statistics_sent(single.optimizer, 2)


def test_the_quadratic_model_step_of_two_sharded_ranks_is_that_of_one_process(two_ranks):
    """α, μ and λ from the GGN of the global batch: b and the damping term from the whole vectors,
    the GGN term averaged over the ranks' batches (one all-reduce), the same step on every rank."""
    single = compile_model("kfac", QUADRATIC)
    xs, ys = data()
    train(single, xs, ys)
    assert single.optimizer.last_step["alphas"]  # the quadratic step ran
    for name, p in single.named_parameters():
        torch.testing.assert_close(two_ranks["quadratic"][name], p.detach(), rtol=1e-9, atol=1e-10,
                                   msg=lambda m: f"{name}: {m}")


def test_a_failed_decomposition_keeps_the_last_good_root(two_ranks):
    failure = two_ranks["failure"]
    assert failure["kept"]
    assert failure["failures"] == 2 * failure["pieces"]  # 2 factors per piece, on rank 0


def test_a_non_finite_gradient_on_one_rank_skips_the_step_on_every_rank(two_ranks):
    assert two_ranks["non_finite"] == {"skipped": 1, "unchanged": True}  # rank 0's view: its gradients were finite


def test_compiling_a_sharded_model_names_the_supported_order(two_ranks):
    assert "call gnfx.compile on the unsharded model first, then fully_shard" in two_ranks["reverse_order"]


def test_a_true_fisher_is_refused_under_fsdp2_with_the_fix(two_ranks):
    assert "fisher='mc' does not run under FSDP2" in two_ranks["mc"] and "fisher='empirical'" in two_ranks["mc"]


def test_distributed_off_is_refused_under_fsdp2(two_ranks):
    assert "distributed='off' keeps gnfx from communicating" in two_ranks["off"]


def test_weight_normed_blocks_are_refused_under_fsdp2_with_the_fix(two_ranks):
    """The fix names each layer and the torch call that removes its reparametrization, before gnfx.compile
    (removed after it, the compiled model's parameters would have changed: a GnfxError)."""
    assert "weight-normed layers" in two_ranks["weight_norm"] and "'0.weight'" in two_ranks["weight_norm"]
    assert ("torch.nn.utils.parametrize.remove_parametrizations(model.get_submodule('0'), 'weight')), then compile "
            "and fully_shard" in two_ranks["weight_norm"])
    assert "before gnfx.compile" in two_ranks["weight_norm"]


def test_spectral_norm_and_the_older_weight_norm_api_are_refused_under_fsdp2_with_their_fix(two_ranks):
    refusals = two_ranks["reparametrized"]
    assert "spectrally normed" in refusals["spectral_norm"] and "'2.weight'" in refusals["spectral_norm"]
    removal = "torch.nn.utils.parametrize.remove_parametrizations(model.get_submodule('2'), 'weight')"
    assert removal in refusals["spectral_norm"]
    # nn.utils.weight_norm keeps weight_g and weight_v and a pre-hook: its removal is another call
    assert "torch.nn.utils.remove_weight_norm(model.get_submodule('2'), 'weight')" in refusals["weight_norm_hook"]
    # no torch call removes a standardization its module's forward computes (before: an AttributeError)
    assert "model.get_submodule('2') standardizes its weight in its own forward" in refusals["weight_standardization"]
    assert set(refusals) == {"spectral_norm", "weight_norm_hook", "weight_standardization"}
    assert all("before gnfx.compile" in message for message in refusals.values())


@pytest.mark.parametrize("optimizer", list(KINDS_OPTIMIZERS))
def test_the_later_layer_kinds_on_two_sharded_ranks_equal_one_process(two_ranks, optimizer):
    """A position table (A_t = e_t / Σ e from the ranks' energies added), the layers of an opaque
    submodule opened into blocks (the submodule itself sharded) and a layer scale."""
    xs, ys = kinds_data()
    single = gnfx.compile(Kinds(normed=False), optimizer, capture="fx", **HPARAMS, **KINDS_OPTIMIZERS[optimizer])
    train_kinds(single, single, xs, ys)
    for name, p in single.named_parameters():
        torch.testing.assert_close(two_ranks["kinds"][optimizer][name], p.detach(), rtol=1e-9, atol=1e-10,
                                   msg=lambda m: f"{name}: {m}")


def test_sharding_blocks_but_not_the_compiled_model_names_the_supported_order(two_ranks):
    assert "not to the compiled model itself" in two_ranks["no_root"]
    assert "fully_shard the compiled model's blocks (optional) and the compiled model itself" in two_ranks["no_root"]
