"""First contact with non-standard layer families: Kolmogorov–Arnold networks, deep equilibrium models (torchdeq),
implicit neural representations (siren-pytorch, NeRF's positional encoding) and hypernetworks (hypnettorch).

    PYTHONPATH=<torchdeq, siren_pytorch, hypnettorch>:<einops>:. OMP_NUM_THREADS=1 python -m benchmarks.implicit_probe \
        [--models kan deq_ift] [--optimizers kfac kfac_lr] [--steps 6] [--timeout 300] [--out probe.md]

benchmarks.family_probe's first contact (one model and optimizer per process, random weights, train mode,
`--steps` steps on one random batch) for:

- Kolmogorov–Arnold networks. `kan`: efficient-kan's KAN (not on PyPI: its KANLinear written out here from its
  forward, Cox–de Boor B-spline bases of order 3 on a grid of 5 over [-1, 1]):
  `F.linear(silu(x), base_weight) + F.linear(b_splines(x).view(N, -1), (spline_weight *
  spline_scaler[..., None]).view(out, -1))`, layers 8-16-3, cross-entropy plus
  `1e-4 * model.regularization_loss()` (the mean |spline_weight| and its entropy) as its users add it;
  `kan_plain`: the same with `enable_standalone_scale_spline=False` (no spline_scaler: efficient-kan's
  scaled_spline_weight is then `spline_weight * 1.0`);
  `fastkan`: FastKAN (fast-kan, not on PyPI either: LayerNorm, Gaussian radial basis functions on 8 centres,
  `SplineLinear` an nn.Linear of the flattened basis, plus `nn.Linear(silu(x))`), same task.
  pykan (PyPI) was not probed: it imports matplotlib, pandas, scikit-learn, sympy, pyyaml and tqdm.
- torchdeq (deep equilibrium models, as its README builds them): a classifier `head(z*)` with
  `z* = f(z*, x)`, f = `tanh(W z + U x)` written with two nn.Linear, solved by `get_deq(f_solver="anderson",
  f_max_iter=20, ...)` under torch.no_grad, then differentiated by: `deq_ift` (ift=True: an autograd.Function
  whose backward calls f again and solves the adjoint fixed point with autograd.grad, 20 solver iterations),
  `deq_hook` (hook_ift=True: a tensor hook on f(z*) that solves it with autograd.grad), `deq_phantom`
  (grad=3, the default 1-step/phantom gradient: f unrolled 3 times with gradients), `deq_wnorm`
  (deq_ift with torchdeq's own weight norm, `apply_norm(f, "weight_norm")` at build and `reset_norm(f)` before
  each forward, as its examples do).
- siren-pytorch: `siren`: SirenNet(2, 32, 1, 3 layers, w0_initial 30) fitted to an 8x8 image by MSE on its
  coordinates; `siren_wrapper`: SirenWrapper(SirenNet, 8, 8) whose forward returns the MSE loss itself
  (`loss = wrapper(img)`, its README); `nerf`: NeRF's positional encoding (sin and cos of 2^k π x, k < 6)
  feeding an MLP of nn.Linear and ReLU, MSE.
- hypnettorch: `hyper`: an HMLP hypernetwork (condition embeddings of 4, hidden 16) outputs the weights of a
  `MLP(no_weights=True)` main network (4-8-3), called `mnet(x, weights=hnet(cond_id=0))`, in a module whose
  parameters are the hypernetwork's, cross-entropy.

Optimizers: "kfac" at its defaults (loss="cross_entropy" or "mse" where the users' loss is one; siren_wrapper's
returns its loss, no loss= there), "kfac_lr" (lr 1e-3; on the DEQs with loss="cross_entropy" and fisher="mc",
whose extra backward runs through the implicit differentiation), "shampoo" and "auto" at lr 1e-3, and for reference
torch.optim.AdamW at lr 1e-3 ("adamw"). Per run: the capture's form, the share of the trainable parameters in
curvature blocks, exactness (the kfac_lr runs, float64: the compiled model beside a second build from the same
seed over 3 steps, the largest |difference| of the loss and of any gradient; then K-FAC's A and S of each block
whose layer is an nn.Linear module, and of KANLinear's base blocks (rows silu(x)) and spline blocks (rows B(x)
flattened; kan_plain's), after one step, stat_decay 0,
fisher="empirical", against plain forward and gradient hooks on every call of that module in the forward,
benchmarks.hooked_calls: calls without a gradient (the solver's, under torch.no_grad) and calls made by the
backward (IFT's re-evaluation of f for its autograd.grad solve) counted nowhere, S = N Σ g gᵀ over the gradients
the training backward sends to the calls' outputs, relative max gap), the losses, gnfx's warnings (once each) and
the parameters outside the blocks, the seconds; or the error. None of these libraries is a
dependency of gnfx. The results: benchmarks/results/first_contact_13_implicit.md.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from benchmarks.child_rows import library, one_batch_row, probe_main
from benchmarks.hooked_calls import hooked_calls, linear_factor_gap
from benchmarks.lockstep import float64_gaps

BATCH, FEATURES, CLASSES, SIDE = 16, 8, 3, 8
KAN_MODELS = ("kan", "kan_plain", "fastkan")
DEQ_MODELS = ("deq_ift", "deq_hook", "deq_phantom", "deq_wnorm")
INR_MODELS = ("siren", "siren_wrapper", "nerf")
MODELS = (*KAN_MODELS, *DEQ_MODELS, *INR_MODELS, "hyper")
LOSS = {**{name: "cross_entropy" for name in (*KAN_MODELS, *DEQ_MODELS, "hyper")},
        "siren": "mse", "nerf": "mse"}  # kfac's loss= at its defaults
OPTIMIZERS = {"kfac": ("kfac", None), "kfac_lr": ("kfac", {"lr": 1e-3}), "shampoo": ("shampoo", {"lr": 1e-3}),
              "auto": ("auto", {"lr": 1e-3}), "adamw": ("adamw", {"lr": 1e-3})}  # adamw: torch.optim's


def _import(name: str):
    return library("benchmarks.implicit_probe", name)


class KANLinear(nn.Module):
    """efficient-kan's layer: y = W_b silu(x) + (W_s ⊙ s) B(x), B(x) the order-k B-spline bases of each input
    on a uniform grid extended by k knots each side, W_s read through a product with its scaler and a view."""

    def __init__(self, n_in: int, n_out: int, grid: int = 5, order: int = 3, standalone_scale_spline: bool = True):
        super().__init__()
        self.standalone_scale_spline = standalone_scale_spline
        h = 2.0 / grid
        knots = torch.arange(-order, grid + order + 1) * h - 1.0
        self.register_buffer("grid", knots.expand(n_in, -1).contiguous())
        self.n_out, self.order = n_out, order
        self.base_weight = nn.Parameter(torch.empty(n_out, n_in))
        self.spline_weight = nn.Parameter(0.1 / grid * (torch.rand(n_out, n_in, grid + order) - 0.5))
        nn.init.kaiming_uniform_(self.base_weight, a=math.sqrt(5))
        if standalone_scale_spline:
            self.spline_scaler = nn.Parameter(torch.empty(n_out, n_in))
            nn.init.kaiming_uniform_(self.spline_scaler, a=math.sqrt(5))

    def b_splines(self, x):
        """Cox–de Boor: the order-0 indicators of the knot intervals, raised one order at a time."""
        g, x = self.grid, x.unsqueeze(-1)
        bases = ((x >= g[:, :-1]) & (x < g[:, 1:])).to(x.dtype)
        for k in range(1, self.order + 1):
            bases = ((x - g[:, :-(k + 1)]) / (g[:, k:-1] - g[:, :-(k + 1)]) * bases[:, :, :-1]
                     + (g[:, k + 1:] - x) / (g[:, k + 1:] - g[:, 1:-k]) * bases[:, :, 1:])
        return bases.contiguous()

    @property
    def scaled_spline_weight(self):
        return self.spline_weight * (self.spline_scaler.unsqueeze(-1) if self.standalone_scale_spline else 1.0)

    def forward(self, x):
        base = F.linear(F.silu(x), self.base_weight)
        spline = F.linear(self.b_splines(x).view(x.size(0), -1), self.scaled_spline_weight.view(self.n_out, -1))
        return base + spline

    def regularization_loss(self):
        l1 = self.spline_weight.abs().mean(-1)
        p = l1 / l1.sum()
        return l1.sum() - (p * p.log()).sum()


class KAN(nn.Module):
    def __init__(self, widths, standalone_scale_spline: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(KANLinear(i, o, standalone_scale_spline=standalone_scale_spline)
                                    for i, o in zip(widths, widths[1:]))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

    def regularization_loss(self):
        return sum(layer.regularization_loss() for layer in self.layers)


class FastKANLayer(nn.Module):
    """FastKAN's layer: y = SplineLinear(φ(LayerNorm(x)).view(N, -1)) + Linear(silu(x)), φ Gaussian radial
    basis functions exp(-((x - c_j)/h)²) on fixed centres c_j."""

    def __init__(self, n_in: int, n_out: int, centres: int = 8):
        super().__init__()
        self.norm = nn.LayerNorm(n_in)
        self.register_buffer("centres", torch.linspace(-2.0, 2.0, centres))
        self.denominator = 4.0 / (centres - 1)
        self.spline_linear = nn.Linear(n_in * centres, n_out, bias=False)
        nn.init.trunc_normal_(self.spline_linear.weight, std=0.1)
        self.base_linear = nn.Linear(n_in, n_out)

    def forward(self, x):
        basis = torch.exp(-((self.norm(x)[..., None] - self.centres) / self.denominator) ** 2)
        return self.spline_linear(basis.view(*basis.shape[:-2], -1)) + self.base_linear(F.silu(x))


class DEQClassifier(nn.Module):
    """torchdeq's README pattern: z* = f(z*, x) solved by a torchdeq DEQ module, f = tanh(W z + U x)."""

    def __init__(self, differentiation: dict, weight_norm: bool):
        super().__init__()
        torchdeq = _import("torchdeq")
        self.encoder = nn.Linear(FEATURES, 16)
        self.f = nn.ModuleDict({"W": nn.Linear(16, 16, bias=False), "U": nn.Linear(16, 16)})
        with torch.no_grad():
            self.f["W"].weight.mul_(0.5)  # a contraction: the solve converges
        self.head = nn.Linear(16, CLASSES)
        self.weight_norm = weight_norm
        if weight_norm:
            _import("torchdeq.norm").apply_norm(self.f, "weight_norm")
        self.deq = torchdeq.get_deq(f_solver="anderson", f_max_iter=20, b_max_iter=20, **differentiation)

    def forward(self, x):
        if self.weight_norm:
            _import("torchdeq.norm").reset_norm(self.f)
        u = self.encoder(x)
        z_out, _ = self.deq(lambda z: torch.tanh(self.f["W"](z) + self.f["U"](u)), torch.zeros_like(u))
        return self.head(z_out[-1])


class PositionalMLP(nn.Module):
    """NeRF: γ(x) = (x, sin(2^k π x), cos(2^k π x) for k < K) into an MLP."""

    def __init__(self, frequencies: int = 6, hidden: int = 32):
        super().__init__()
        self.register_buffer("scales", 2.0 ** torch.arange(frequencies) * math.pi)
        width = 2 * (1 + 2 * frequencies)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))

    def forward(self, x):
        angles = (x[..., None] * self.scales).flatten(-2)
        return self.mlp(torch.cat([x, angles.sin(), angles.cos()], -1))


class HyperClassifier(nn.Module):
    """hypnettorch: the main network's weights are the hypernetwork's output, mnet(x, weights=hnet(cond_id))."""

    def __init__(self):
        super().__init__()
        hypnettorch = _import("hypnettorch.mnets"), _import("hypnettorch.hnets")
        self.mnet = hypnettorch[0].MLP(n_in=FEATURES, n_out=CLASSES, hidden_layers=[8], no_weights=True, verbose=False)
        self.hnet = hypnettorch[1].HMLP(self.mnet.param_shapes, uncond_in_size=0, cond_in_size=4, layers=[16],
                                         num_cond_embs=1, verbose=False)

    def forward(self, x):
        return self.mnet(x, weights=self.hnet(cond_id=0))


def build(name: str) -> nn.Module:
    """The model `name` (module doc), with random weights from the current seed."""
    if name in ("kan", "kan_plain"):
        return KAN([FEATURES, 16, CLASSES], standalone_scale_spline=name == "kan")
    if name == "fastkan":
        return nn.Sequential(FastKANLayer(FEATURES, 16), FastKANLayer(16, CLASSES))
    if name in DEQ_MODELS:
        return DEQClassifier({"deq_ift": {"ift": True}, "deq_hook": {"hook_ift": True}, "deq_phantom": {"grad": 3},
                              "deq_wnorm": {"ift": True}}[name], weight_norm=name == "deq_wnorm")
    if name in ("siren", "siren_wrapper"):
        net = _import("siren_pytorch").SirenNet(dim_in=2, dim_hidden=32, dim_out=1, num_layers=3, w0_initial=30.0)
        return _import("siren_pytorch").SirenWrapper(net, image_width=SIDE, image_height=SIDE) \
            if name == "siren_wrapper" else net
    return PositionalMLP() if name == "nerf" else HyperClassifier()


def problem(name: str, dtype=torch.float32):
    """(batch, loss(compiled or plain model, plain model, batch), M: the loss's terms, the hooks' S scale)."""
    g = torch.Generator().manual_seed(1)
    if name in INR_MODELS:
        axis = torch.linspace(-1, 1, SIDE, dtype=dtype)
        coords = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).view(-1, 2)
        image = (torch.sin(3 * coords[:, :1]) * torch.cos(2 * coords[:, 1:]))  # a smooth 8x8 image
        if name == "siren_wrapper":
            return image.view(1, 1, SIDE, SIDE), lambda m, plain, b: m(b), SIDE * SIDE
        return (coords, image), lambda m, plain, b: F.mse_loss(m(b[0]), b[1]), SIDE * SIDE
    batch = (torch.rand(BATCH, FEATURES, generator=g, dtype=dtype) * 2 - 1,
             torch.randint(0, CLASSES, (BATCH,), generator=g))
    if name in ("kan", "kan_plain"):  # efficient-kan's users add its regularization to the loss
        return batch, lambda m, plain, b: F.cross_entropy(m(b[0]), b[1]) + 1e-4 * plain.regularization_loss(), BATCH
    return batch, lambda m, plain, b: F.cross_entropy(m(b[0]), b[1]), BATCH


def settings(name: str, optimizer: str) -> tuple[str, dict]:
    kind, hparams = OPTIMIZERS[optimizer]
    if hparams is None:  # kfac at its defaults: with the users' loss where gnfx models it
        hparams = {"loss": LOSS[name]} if name in LOSS else {}
    if optimizer == "kfac_lr" and name in DEQ_MODELS:  # the true Fisher's backward through the implicit gradient
        hparams = {**hparams, "loss": LOSS[name], "fisher": "mc"}
    return kind, hparams


def factor_gaps(name: str, hparams: dict) -> str:
    """The first step's A and S of the blocks of nn.Linear modules against hooks on every call (module doc)."""
    torch.manual_seed(0)
    model = build(name)
    torch.manual_seed(0)
    reference = build(name)  # torchdeq's weight norm holds a computed weight, which deepcopy refuses
    batch, loss_of, m = problem(name, torch.get_default_dtype())
    c = gnfx.compile(model, "kfac", stat_decay=0.0, stat_every=1, **{**hparams, "fisher": "empirical"})
    kans = [n for n, mod in reference.named_modules() if isinstance(mod, KANLinear)]
    linears = [n for n, mod in reference.named_modules() if isinstance(mod, nn.Linear)] + kans
    with hooked_calls(reference, linears) as calls:
        loss = loss_of(reference, reference, batch)
        forward_calls = {n: len(records) for n, records in calls.items()}
        loss.backward()
    for n, records in calls.items():  # IFT's backward calls f again for autograd.grad: a call of no forward
        del records[forward_calls[n]:]
    modules = dict(reference.named_modules())
    for n in kans:  # a KANLinear's base block: the rows silu(x), the gradient at the layer's output (the sum's);
        records = calls.pop(n)  # its spline block (a block where it is one): the rows B(x) flattened, the same
        calls[f"{n}.base"] = [[F.silu(a), g] for a, g in records]
        calls[f"{n}.spline"] = [[modules[n].b_splines(a).flatten(1), g] for a, g in records]
    loss_of(c, model, batch).backward()
    c.step()
    return linear_factor_gap(c, calls, m)


def exactness(name: str, kind: str, hparams: dict) -> str:
    def loss_for(model):
        batch, loss_of, _ = problem(name, torch.float64)
        return lambda m: loss_of(m, model if isinstance(m, gnfx.CompiledModel) else m, batch)  # kan's penalty
    return float64_gaps(lambda: build(name), loss_for, kind, hparams, also=lambda: factor_gaps(name, hparams))


def probe(name: str, optimizer: str, steps: int) -> str:
    """One table row: `optimizer` (OPTIMIZERS) for `steps` steps of `name` on one batch."""
    kind, hparams = settings(name, optimizer)

    def made():
        model = build(name).train()
        batch, loss_of, _ = problem(name)
        return model, lambda c: loss_of(c, model, batch)

    return one_batch_row(name, optimizer, kind, hparams, steps, lambda: exactness(name, kind, hparams), made,
                         widths=(200, 300, 500), digits=4)


def main() -> None:
    probe_main(__doc__, "benchmarks.implicit_probe", probe, {"models": list(MODELS), "optimizers": list(OPTIMIZERS)},
               ["| model | optimizer | capture | in blocks | exact: loss, grad (float64); A, S vs hooks | losses | "
                "outside the blocks | gnfx's warnings | error | s |", "|---|---|---|---|---|---|---|---|---|---|"],
               steps=6, timeout=300)


if __name__ == "__main__":
    main()
