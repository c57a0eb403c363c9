"""gnfx on an accelerator (CUDA by default): the same training as on the CPU, the compiled update and torch.compile's
wrapper on the GPU's own backend (inductor with Triton), the model moved to the device after steps,
and bfloat16 autocast. Skipped without a CUDA device (CI has none); run on a GPU machine with
`python -m pytest tests/test_cuda.py`; `GNFX_TEST_DEVICE=xpu` (or any torch device) runs the same
checks on another accelerator, and `GNFX_TEST_DEVICE=cpu` runs them against the CPU itself (which checks
the tests, not a device).

The reference of every comparison is a run gnfx did not make on the device: the same float64
training on the CPU. Float64 on both sides leaves summation order and the eigensolvers' round-off
(cuSOLVER against LAPACK), grown by a few preconditioned steps: hence rtol 1e-7, not 1e-12. The
batches have more rows than any K-FAC factor has dimensions (16 images: the head's A is 9x9; 16 x 8
tokens: fc_out's A is 65x65): a singular factor's eigenbasis within its null space is whatever the
eigensolver returns, and EKFAC's per-coordinate scaling there then differs between the devices
without either being wrong.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch._dynamo.utils import counters

import gnfx
from models import CNN, GPT
from steps import train_on_batches

DEVICE = torch.device(os.environ.get("GNFX_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")
TOL = dict(rtol=1e-7, atol=1e-9)
STEPS = 6  # with stat_every=2: statistic steps 0, 2, 4; refreshes (inv_every, precondition_frequency) at 2 and 4
HPARAMS = {  # every preconditioner, with statistic and refresh steps inside STEPS
    "diag": dict(lr=0.05),
    "rank1": dict(lr=0.05, stat_every=2),
    # the defaults' quadratic step (α, μ, λ from jvps) with fisher="type2" for "mc", the default: the labels
    # it samples come from each device's own generator, so the two devices' S differ (as any random op's)
    "kfac": dict(loss="cross_entropy", stat_every=2, fisher="type2"),
    "ekfac": dict(loss="cross_entropy", stat_every=2, fisher="type2", refresh_warmup=0),
    "shampoo": dict(lr=0.05, stat_every=2, precondition_frequency=2, start_preconditioning_step=2),
    "muon": dict(lr=0.02),
}


def image_batches(steps=STEPS, device="cpu", rows=16):
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(rows, 3, 8, 8, dtype=torch.float64, generator=g), torch.randint(0, 5, (rows,), generator=g))
            for _ in range(steps)]
    return [(x.to(device), y.to(device)) for x, y in data]


def token_batches(steps=STEPS, device="cpu"):
    g = torch.Generator().manual_seed(2)
    data = [torch.randint(0, 48, (16, 9), generator=g) for _ in range(steps)]
    return [(t[:, :-1].to(device), t[:, 1:].to(device)) for t in data]


def loss_of(output, y):
    return F.cross_entropy(output.flatten(0, -2), y.flatten())


def train(c, data, forward=None):
    return train_on_batches(c, data, loss_of, forward)


def assert_same_parameters(got, expected, tol=TOL):
    for (name, p), q in zip(expected.named_parameters(), got.parameters()):
        torch.testing.assert_close(q.cpu(), p.detach().cpu(), **tol, msg=lambda m: f"parameter {name}: {m}")


MODELS = {"cnn": (lambda: CNN(width=4), image_batches), "gpt": (GPT, token_batches)}


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("name", sorted(HPARAMS))
def test_training_on_cuda_equals_training_on_cpu(name, model):
    """Float64, conv/linear blocks (CNN) and embedding, position table, attention and LayerNorm
    blocks (GPT): every preconditioner's parameters after STEPS steps on the device equal the CPU's."""
    assert_device_trains_as_the_cpu(model, name, HPARAMS[name])


@pytest.mark.parametrize("model", sorted(MODELS))
def test_kfac_with_blocked_factors_on_cuda_equals_the_cpu(model):
    """max_factor=8: every factor of more entries kept as its diagonal blocks, whose products write
    into column ranges of one result (gnfx.layouts.base), on the device as on the CPU."""
    c = assert_device_trains_as_the_cpu(model, "kfac", HPARAMS["kfac"] | dict(max_factor=8))
    assert "blocks of" in repr(c.layers)


def assert_device_trains_as_the_cpu(model: str, name: str, hparams: dict):
    """Train MODELS[model] STEPS steps with gnfx (`name`, `hparams`) on the CPU and on the device from the
    same weights on the same batches: the same parameters. Returns the device's compiled model."""
    make, batches = MODELS[model]
    reference = gnfx.compile(make(), name, **hparams)
    train(reference, batches())
    c = gnfx.compile(make().to(DEVICE), name, **hparams)
    train(c, batches(device=DEVICE))
    assert next(c.parameters()).device.type == DEVICE.type
    assert not torch.equal(reference.head.weight, make().head.weight)  # it trained
    assert_same_parameters(c, reference)
    return c


def test_soap_on_cuda_steps_as_on_the_cpu_until_its_bases_depend_on_round_off():
    """SOAP's factors are Gram matrices of gradients, singular here (rank at most d_out = 4 a statistic
    step against the first conv's 28 input dimensions), so from its first refresh on its bases within
    their null spaces are the eigensolver's round-off, on which Adam's per-coordinate normalization
    acts. Its first step (identity bases) equals the CPU's; six steps on the device train the CNN."""
    hp = dict(lr=0.05, stat_every=2, precondition_frequency=2)
    data = image_batches()
    reference = gnfx.compile(CNN(width=4), "soap", **hp)
    train(reference, data[:1])
    c = gnfx.compile(CNN(width=4).to(DEVICE), "soap", **hp)
    losses = train(c, [(x.to(DEVICE), y.to(DEVICE)) for x, y in data[:1]])
    assert_same_parameters(c, reference)
    x, y = data[0]
    losses += train(c, [(x.to(DEVICE), y.to(DEVICE))] * (STEPS - 1))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses


@pytest.mark.parametrize("name", ["kfac", "shampoo", "rank1"])
def test_model_moved_to_cuda_after_steps_trains_as_on_the_cpu(name):
    """gnfx.compile on the CPU, two steps, `.to(device)`, four more: the statistics and the
    optimizer's state moved with the parameters, and the parameters equal six CPU steps'."""
    data = image_batches()
    reference = gnfx.compile(CNN(width=4), name, **HPARAMS[name])
    train(reference, data)
    c = gnfx.compile(CNN(width=4), name, **HPARAMS[name])
    train(c, data[:2])
    c.to(DEVICE)
    train(c, [(x.to(DEVICE), y.to(DEVICE)) for x, y in data[2:]])
    assert_same_parameters(c, reference)


@pytest.mark.parametrize("name", ["kfac", "ekfac", "shampoo", "rank1"])
def test_compiled_update_on_cuda_equals_eager_and_compiles_no_graph_after_warm_up(name):
    """compile=True on the device (inductor, Triton kernels): the parameters follow the eager
    update's on the same device, and dynamo compiles no graph after the first statistic, refresh and
    plain steps (steps 0-4), also while the quadratic step's λ moves (kfac, ekfac: before, ekfac's
    compiled update took λ for a constant and compiled a graph at each adaptation). Float64: in
    float32 on these small batches a perturbation of 1e-7 in the initial weights moves SOAP's
    parameters by 0.07 after one step (Adam's normalization of near-zero gradient coordinates), so
    float32 would compare round-off, not the compiled code. Not SOAP: its factors, gradient Gram
    matrices, have rank at most 4 here against 28 and 37 dimensions, and its QR refresh of F Q turns
    round-off in the null space into basis columns on which Adam's per-coordinate normalization acts
    (float64 on the CPU: compiled and eager agree to 1e-15 until the second refresh, then differ by 0.05).
    diag has no compiled update (it steps with torch's own foreach kernels)."""
    data = image_batches(10, device=DEVICE)
    torch._dynamo.reset()
    counters.clear()
    eager = gnfx.compile(CNN(width=4).to(DEVICE), name, compile=False, **HPARAMS[name])
    train(eager, data)
    assert counters["stats"]["unique_graphs"] == 0
    compiled = gnfx.compile(CNN(width=4).to(DEVICE), name, compile=True, **HPARAMS[name])
    graphs = []
    for batch in data:
        train(compiled, [batch])
        graphs.append(counters["stats"]["unique_graphs"])
    assert compiled.optimizer.update_function.compiled
    assert graphs[0] >= 1 and graphs[4:] == [graphs[4]] * (len(data) - 4), graphs
    assert_same_parameters(compiled, eager, dict(rtol=1e-9, atol=1e-11))


@pytest.mark.parametrize("name", ["kfac", "shampoo"])
def test_torch_compile_of_the_model_on_cuda_trains_as_without_it(name):
    """torch.compile(gnfx model) with inductor on the device, float64: statistic steps run the
    instrumented graph, the others the compiled forward; the same parameters as without the wrapper."""
    data = image_batches(device=DEVICE)
    torch._dynamo.reset()
    eager = gnfx.compile(CNN(width=4).to(DEVICE), name, **HPARAMS[name])
    train(eager, data)
    c = gnfx.compile(CNN(width=4).to(DEVICE), name, **HPARAMS[name])
    train(c, data, forward=torch.compile(c))
    assert_same_parameters(c, eager, dict(rtol=1e-9, atol=1e-11))


AUTOCAST_HPARAMS = {"kfac": dict(loss="cross_entropy"), "ekfac": dict(loss="cross_entropy"),  # the defaults
                    "shampoo": dict(lr=3e-3, stat_every=2), "rank1": dict(lr=1e-2, stat_every=2)}


@pytest.mark.parametrize("name", sorted(AUTOCAST_HPARAMS))
def test_bfloat16_autocast_on_cuda_fits_a_batch(name):
    """The GPT under torch.autocast(bfloat16), float32 parameters: 20 steps on one batch take its
    loss below half its start (4.0; on the CPU in float32: 0.4-1.8 at these settings), every loss finite."""
    torch.manual_seed(0)
    c = gnfx.compile(GPT().float().to(DEVICE), name, **AUTOCAST_HPARAMS[name])
    x, y = (t[:4] for t in token_batches(1, device=DEVICE)[0])  # 4 sequences of 8 tokens
    losses = []
    for _ in range(20):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            loss = loss_of(c(x), y)
        loss.backward()
        c.step()
        c.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_gradient_on_cuda_skips_the_step_and_names_it(bad):
    """The device's non-finite check (the ∞-norm of every gradient at once; on a CPU their min and max):
    a gradient with one NaN or ∞ entry leaves every parameter and state as it was and names that gradient."""
    c = gnfx.compile(CNN(width=4).to(DEVICE), "kfac", lr=0.05, stat_every=2)
    (x, y), = image_batches(1, device=DEVICE)
    train(c, [(x, y)])
    before = {n: p.detach().clone() for n, p in c.named_parameters()}
    loss_of(c(x), y).backward()
    name, p = list(c.named_parameters())[1]
    p.grad.view(-1)[3] = bad
    with pytest.warns(RuntimeWarning, match=f"non-finite gradient of {name}"):
        c.step()
    assert c.optimizer.skipped_steps == 1
    for n, q in c.named_parameters():
        assert torch.equal(q, before[n]), n
