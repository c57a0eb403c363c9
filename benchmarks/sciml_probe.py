"""First contact with scientific-ML libraries: torchdiffeq, zuko and snntorch, called as their users call them.

    PYTHONPATH=<torchdiffeq, zuko, snntorch>:<gpytorch, linear_operator, jaxtyping, wadler_lindig>:. OMP_NUM_THREADS=1 python -m benchmarks.sciml_probe \
        [--models node_rk4 maf] [--optimizers kfac kfac_lr] [--steps 4] [--timeout 300] [--out probe.md]

benchmarks.family_probe's first contact (one model and optimizer per process, random weights, train mode,
`--steps` steps on one random batch) for:

- torchdiffeq (neural ODEs, the function called many times per forward by the solver):
  `node_rk4`, `node_dopri5`: a classifier `head(odeint(func, enc(x), t)[-1])` (func an ODEFunc module of
  Linear-tanh-Linear, t = [0, 1], rk4 at step 0.25 or dopri5 at rtol 1e-3), cross-entropy;
  `node_adjoint`: the same with `odeint_adjoint(func, y0, t, method="dopri5")`, whose autograd.Function takes
  func.parameters() and computes their gradient in its own backward, calling func again (the adjoint ODE);
  `ode_demo`: torchdiffeq's examples/ode_demo.py: the ODEFunc itself is the model and the training loop calls
  `odeint(func, batch_y0, batch_t)` (the compiled model called at every solver stage), loss
  mean |pred_y - batch_y| over 8 trajectories of 10 points;
  `odenet`: examples/odenet_mnist.py shrunk (8x8 images, 8 channels): convolutions with GroupNorm before an
  ODEBlock (`odeint(self.odefunc, x, self.integration_time, rtol=1e-3, atol=1e-3)`, the ODEfunc's ConcatConv2d
  layers concatenating t as a channel, its `nfe` counter incremented in its forward), a pooled linear head,
  cross-entropy;
- zuko (normalizing flows, masked autoregressive hyper-networks: MaskedLinear is `F.linear(x, mask * W, b)`):
  `maf`, `nsf`: `zuko.flows.MAF` / `NSF` (4 features, 2 transforms, hidden [16, 16]) trained as zuko's
  tutorial does, `loss = -flow().log_prob(x).mean()` (flow() returns a distribution: the hyper-networks run in
  log_prob, after the forward); `maf_logprob`, `nsf_logprob`: the same flows in a module whose forward returns
  `flow().log_prob(x)` (the fix gnfx's warning names), loss its negative mean;
- gpytorch (deep kernel learning, its tutorial's model): `dkl`: an ExactGP whose forward maps 32 training points
  of 6 features by an MLP feature extractor (Linear 6-32, ReLU, Linear 32-2) and ScaleToBounds into a
  ConstantMean and ScaleKernel(RBFKernel(ard_num_dims=2)), returning a MultivariateNormal; loss
  `-ExactMarginalLogLikelihood(likelihood, model)(model(train_x), train_y)` (the kernel matrix evaluated lazily
  in the loss);
- snntorch (spiking networks): `snn`: snntorch's tutorial network, Linear → snn.Leaky(β 0.9, fast-sigmoid
  surrogate gradient, a custom autograd.Function) → Linear → snn.Leaky, stepped over 5 time steps in a loop in
  its forward, returning the stacked output spikes and membranes (T, N, C), loss `SF.ce_rate_loss()`.

Optimizers: "kfac" at its defaults (with loss="cross_entropy" where the users' loss is one: the classifiers and
snntorch's rate loss, a cross-entropy of each time step's spikes; else without, at its default lr), "kfac_lr"
(lr 1e-3), "shampoo", "diag" and "auto" at lr 1e-3, "kfac_leaf" (node_adjoint only: lr 1e-3 and
leaf_modules=["func"], the fix the adjoint's error names), and for reference torch.optim.AdamW at lr 1e-3
("adamw"). Per run: the capture's form, the share of the trainable parameters in curvature blocks, exactness
(the kfac_lr runs, float64, snntorch's in float32: the compiled model beside a second build from the same seed over 3 steps, the
largest |difference| of the loss and of any gradient; and the first step's K-FAC A and S of every linear block
against forward and gradient hooks on every call, benchmarks.hooked_calls, A = mean over the calls' rows of
ā āᵀ, S = M Σ g gᵀ with M the loss's examples: N, or T·N for snn's (T, N, C) spikes; largest gap relative to the
largest entry), the losses, gnfx's warnings (once each) and the parameters outside the blocks, the seconds; or
the error. None of these libraries is a dependency of gnfx. The results: benchmarks/results/first_contact_11_sciml.md.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from benchmarks.child_rows import library, one_batch_row, probe_main
from benchmarks.hooked_calls import hooked_calls, linear_factor_gap
from benchmarks.lockstep import lockstep_gaps

BATCH, STEPS_T = 16, 5  # examples; snntorch's time steps
MODELS = ("node_rk4", "node_dopri5", "node_adjoint", "ode_demo", "odenet", "maf", "nsf", "maf_logprob",
          "nsf_logprob", "dkl", "snn")
LOSS = {"node_rk4": "cross_entropy", "node_dopri5": "cross_entropy", "node_adjoint": "cross_entropy",
        "odenet": "cross_entropy", "snn": "cross_entropy"}  # kfac's loss= at its defaults
OPTIMIZERS = {"kfac": ("kfac", None), "kfac_lr": ("kfac", {"lr": 1e-3}), "shampoo": ("shampoo", {"lr": 1e-3}),
              "diag": ("diag", {"lr": 1e-3}), "auto": ("auto", {"lr": 1e-3}),
              "kfac_leaf": ("kfac", {"lr": 1e-3, "leaf_modules": ["func"]}),
              "adamw": ("adamw", {"lr": 1e-3})}  # adamw: torch.optim's, the reference


def _import(name: str):
    return library("benchmarks.sciml_probe", name)


class ODEFunc(nn.Module):
    """dy/dt = f(t, y), Linear-tanh-Linear (torchdiffeq's examples)."""

    def __init__(self, width: int = 8, hidden: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, width))

    def forward(self, t, y):
        return self.net(y)


class NeuralODEClassifier(nn.Module):
    """head(y(1)), y(0) = enc(x), solved by odeint or odeint_adjoint inside the forward."""

    def __init__(self, method: str, adjoint: bool):
        super().__init__()
        self.enc, self.func, self.head = nn.Linear(4, 8), ODEFunc(), nn.Linear(8, 3)
        self.method, self.adjoint = method, adjoint
        self.register_buffer("t", torch.tensor([0.0, 1.0]))

    def forward(self, x):
        torchdiffeq = _import("torchdiffeq")
        solve = torchdiffeq.odeint_adjoint if self.adjoint else torchdiffeq.odeint
        options = {"options": {"step_size": 0.25}} if self.method == "rk4" else {"rtol": 1e-3, "atol": 1e-4}
        return self.head(solve(self.func, self.enc(x), self.t, method=self.method, **options)[-1])


class DemoODEFunc(nn.Module):
    """torchdiffeq's examples/ode_demo.py ODEFunc: net(y³)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 50), nn.Tanh(), nn.Linear(50, 2))

    def forward(self, t, y):
        return self.net(y ** 3)


class ConcatConv2d(nn.Module):
    """torchdiffeq's examples/odenet_mnist.py: a convolution of [t, x] (t as a constant channel)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self._layer = nn.Conv2d(dim_in + 1, dim_out, 3, padding=1)

    def forward(self, t, x):
        tt = torch.ones_like(x[:, :1, :, :]) * t
        return self._layer(torch.cat([tt, x], 1))


class ConvODEfunc(nn.Module):
    """odenet_mnist.py's ODEfunc, its function-evaluation counter included."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm1, self.relu = nn.GroupNorm(4, dim), nn.ReLU(inplace=True)
        self.conv1, self.norm2 = ConcatConv2d(dim, dim), nn.GroupNorm(4, dim)
        self.conv2, self.norm3 = ConcatConv2d(dim, dim), nn.GroupNorm(4, dim)
        self.nfe = 0

    def forward(self, t, x):
        self.nfe += 1
        out = self.relu(self.norm1(x))
        out = self.relu(self.norm2(self.conv1(t, out)))
        return self.norm3(self.conv2(t, out))


class ODEBlock(nn.Module):
    def __init__(self, odefunc: nn.Module):
        super().__init__()
        self.odefunc = odefunc
        self.integration_time = torch.tensor([0, 1]).float()

    def forward(self, x):
        self.integration_time = self.integration_time.type_as(x)
        out = _import("torchdiffeq").odeint(self.odefunc, x, self.integration_time, rtol=1e-3, atol=1e-3)
        return out[1]


class LogProb(nn.Module):
    """A flow whose forward computes the log-density: the hyper-networks run inside the compiled forward."""

    def __init__(self, flow: nn.Module):
        super().__init__()
        self.flow = flow

    def forward(self, x):
        return self.flow().log_prob(x)


def _dkl_data() -> tuple[torch.Tensor, torch.Tensor]:
    """gpytorch's training points (x, y = sin(3 Σx) + noise), in the default dtype (an ExactGP keeps them and
    refuses other inputs in training mode)."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(32, 6, generator=g)
    y = torch.sin(3 * x.sum(1)) + 0.1 * torch.randn(32, generator=g)
    return x.to(torch.get_default_dtype()), y.to(torch.get_default_dtype())


def _dkl() -> nn.Module:
    """gpytorch's deep kernel learning model (module doc) on `_dkl_data`."""
    gpytorch = _import("gpytorch")

    class DeepKernelGP(gpytorch.models.ExactGP):
        def __init__(self, train_x, train_y, likelihood):
            super().__init__(train_x, train_y, likelihood)
            self.mean_module = gpytorch.means.ConstantMean()
            self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=2))
            self.feature_extractor = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 2))
            self.scale_to_bounds = gpytorch.utils.grid.ScaleToBounds(-1.0, 1.0)

        def forward(self, x):
            projected = self.scale_to_bounds(self.feature_extractor(x))
            return gpytorch.distributions.MultivariateNormal(self.mean_module(projected), self.covar_module(projected))

    return DeepKernelGP(*_dkl_data(), gpytorch.likelihoods.GaussianLikelihood())


class SpikingNet(nn.Module):
    """snntorch's tutorial network, stepped over the first dimension of its input (T, N, 10)."""

    def __init__(self):
        super().__init__()
        snn = _import("snntorch")
        spike_grad = _import("snntorch.surrogate").fast_sigmoid(slope=25)
        self.fc1, self.lif1 = nn.Linear(10, 32), snn.Leaky(beta=0.9, spike_grad=spike_grad)
        self.fc2, self.lif2 = nn.Linear(32, 4), snn.Leaky(beta=0.9, spike_grad=spike_grad)

    def forward(self, x):
        mem1, mem2 = self.lif1.init_leaky(), self.lif2.init_leaky()
        spikes, membranes = [], []
        for step in range(x.shape[0]):
            spk1, mem1 = self.lif1(self.fc1(x[step]), mem1)
            spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
            spikes.append(spk2)
            membranes.append(mem2)
        return torch.stack(spikes), torch.stack(membranes)


def build(name: str) -> nn.Module:
    """The model `name` (module doc), with random weights from the current seed."""
    if name.startswith("node_"):
        return NeuralODEClassifier("rk4" if name == "node_rk4" else "dopri5", adjoint=name == "node_adjoint")
    if name == "ode_demo":
        return DemoODEFunc()
    if name == "odenet":
        return nn.Sequential(nn.Conv2d(1, 8, 3, 1), nn.GroupNorm(4, 8), nn.ReLU(inplace=True),
                             nn.Conv2d(8, 8, 4, 2, 1), ODEBlock(ConvODEfunc(8)), nn.GroupNorm(4, 8),
                             nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(8, 10))
    if name in ("maf", "nsf", "maf_logprob", "nsf_logprob"):
        zuko = _import("zuko")
        flow = getattr(zuko.flows, name[:3].upper())(features=4, context=0, transforms=2, hidden_features=[16, 16])
        return LogProb(flow) if name.endswith("_logprob") else flow
    return _dkl() if name == "dkl" else SpikingNet()


def problem(name: str, dtype=torch.float32):
    """(batch, loss(compiled or plain model, batch, the plain model: gpytorch's loss holds it), M: the loss's
    examples, the hooks' reference S's scale)."""
    g = torch.Generator().manual_seed(1)
    if name.startswith("node_"):
        batch = torch.randn(BATCH, 4, generator=g, dtype=dtype), torch.randint(0, 3, (BATCH,), generator=g)
        return batch, lambda m, b, plain: F.cross_entropy(m(b[0]), b[1]), BATCH
    if name == "ode_demo":
        odeint = _import("torchdiffeq").odeint
        true_a = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=dtype)
        t = torch.linspace(0.0, 1.0, 10, dtype=dtype)
        with torch.no_grad():
            y0 = torch.tensor([[2.0, 0.0]], dtype=dtype) + 0.1 * torch.randn(8, 2, generator=g, dtype=dtype)
            true_y = odeint(lambda _, y: (y ** 3) @ true_a, y0, t, method="dopri5")
        return (y0, t, true_y), lambda m, b, plain: (odeint(m, b[0], b[1], method="rk4") - b[2]).abs().mean(), 8
    if name == "odenet":
        batch = torch.rand(BATCH, 1, 8, 8, generator=g, dtype=dtype), torch.randint(0, 10, (BATCH,), generator=g)
        return batch, lambda m, b, plain: F.cross_entropy(m(b[0]), b[1]), BATCH
    if name in ("maf", "nsf", "maf_logprob", "nsf_logprob"):
        x = torch.randn(BATCH, 4, generator=g, dtype=dtype) @ torch.randn(4, 4, generator=g, dtype=dtype)
        if name.endswith("_logprob"):
            return x, lambda m, b, plain: -m(b).mean(), BATCH
        return x, lambda m, b, plain: -m().log_prob(b).mean(), BATCH
    if name == "dkl":
        mll = _import("gpytorch").mlls.ExactMarginalLogLikelihood
        return _dkl_data(), lambda m, b, plain: -mll(plain.likelihood, plain)(m(b[0]), b[1]), 32
    batch = (2 * torch.rand(STEPS_T, BATCH, 10, generator=g, dtype=dtype), torch.randint(0, 4, (BATCH,), generator=g))
    rate_loss = _import("snntorch.functional").ce_rate_loss()
    return batch, lambda m, b, plain: rate_loss(m(b[0])[0], b[1]), STEPS_T * BATCH


def settings(name: str, optimizer: str) -> tuple[str, dict]:
    kind, hparams = OPTIMIZERS[optimizer]
    if hparams is None:  # kfac at its defaults: with the users' loss where gnfx models it
        hparams = {"loss": LOSS[name]} if name in LOSS else {}
    return kind, hparams


def factor_gaps(name: str, hparams: dict, dtype: torch.dtype) -> str:
    """The largest gap of the first step's A and S of the linear blocks against hooks, relative to the largest
    entry (module doc), in `dtype`."""
    torch.manual_seed(0)
    model = build(name).to(dtype)
    reference = copy.deepcopy(model)
    batch, loss_of, m = problem(name, dtype)
    c = gnfx.compile(model, "kfac", stat_decay=0.0, stat_every=1, **hparams)
    linears = [n for n, mod in reference.named_modules() if isinstance(mod, nn.Linear)]
    with hooked_calls(reference, linears) as calls:
        loss_of(reference, batch, reference).backward()
    loss_of(c, batch, model).backward()
    c.step()
    return linear_factor_gap(c, calls, m)


def exactness(name: str, kind: str, hparams: dict) -> str:
    """'loss Δ, grad Δ; A, S Δ': the compiled float64 model (float32 for snntorch, whose spikes are float32
    whatever the input) beside a second build from the same seed, over 3 steps; the first step's factors
    against hooks (`factor_gaps`)."""
    dtype = torch.float32 if name == "snn" else torch.float64
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        model = build(name).to(dtype)
        torch.manual_seed(0)
        reference = build(name).to(dtype)
        batch, loss_of, _ = problem(name, dtype)
        c = gnfx.compile(model, kind, **hparams)
        loss_gap, grad_gap = lockstep_gaps(c, model, reference, lambda m, plain: loss_of(m, batch, plain), 3, seed=100)
        return f"{loss_gap:.0e}, {grad_gap:.0e}; {factor_gaps(name, hparams, dtype)}"
    finally:
        torch.set_default_dtype(torch.float32)


def probe(name: str, optimizer: str, steps: int) -> str:
    """One table row: `optimizer` (OPTIMIZERS) for `steps` steps of `name` on one batch."""
    kind, hparams = settings(name, optimizer)

    def made():
        model = build(name).train()
        batch, loss_of, _ = problem(name)
        return model, lambda c: loss_of(c, batch, model)

    return one_batch_row(name, optimizer, kind, hparams, steps, lambda: exactness(name, kind, hparams), made,
                         widths=(160, 300, 500), digits=4)


def main() -> None:
    probe_main(__doc__, "benchmarks.sciml_probe", probe, {"models": list(MODELS), "optimizers": list(OPTIMIZERS)},
               ["| model | optimizer | capture | in blocks | exact: loss, grad (float64); A, S vs hooks | losses | "
                "outside the blocks | gnfx's warnings | error | s |", "|---|---|---|---|---|---|---|---|---|---|"],
               steps=4, timeout=300,
               chosen=lambda name, optimizer, given: optimizer != "kfac_leaf" or given or name == "node_adjoint")


if __name__ == "__main__":
    main()
