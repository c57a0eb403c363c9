"""First contact with model families no earlier round tried, each written in plain torch as its users write it.

    OMP_NUM_THREADS=1 PYTHONPATH=. python -m benchmarks.families_probe [--models film retnet] [--steps 40]

- `complex_linear`: nn.Linear(..., dtype=torch.cfloat) twice, a modReLU-like z·σ(|z|) between, the class scores
  |z| of the last (cross-entropy); `complex_matmul`: a complex nn.Parameter used by torch.matmul, its output read
  by torch.view_as_real into a real nn.Linear head; `complex_held_real`: complex_linear with each complex weight
  held as real numbers, nn.Parameter(torch.view_as_real(w)), read by torch.view_as_complex (the fix the
  refusal of complex parameters names); `complex_activations`: real nn.Linear layers around complex activations
  (features paired by view_as_complex, rotated by a fixed phase buffer, read back as .real and .imag);
- `fno_complex`, `fno_held_real`: a 1-d Fourier neural operator (Li et al. 2021; rfft, the lowest 8 modes mixed
  by a complex (in, out, modes) weight in an einsum written into a zero spectrum, irfft) learning the heat
  equation's solution operator (mse), its spectral weights complex as users write them or held real;
- `film`: FiLM conditioning (Perez et al. 2018): a question embedding through an MLP gives each residual conv
  block per-channel γ, β applied to its BatchNorm'd feature maps, γ·h + β (cross-entropy);
- `capsule`, `capsule_mse`: a capsule network (Sabour et al. 2017): conv, primary capsules, squash, prediction
  vectors û = W u by torch.matmul of a (1, 72, 10, 16, 8) weight, three iterations of dynamic routing (softmax
  over the classes, û detached in the first two), class scores the capsules' lengths (cross-entropy; mse
  against one-hot targets);
- `retnet`: RetNet's multi-scale retention (Sun et al. 2023) in its parallel form, (Q Kᵀ ⊙ D) V with the decay
  mask D[n, m] = γ^(n-m) (n ≥ m) built from torch.arange, xPos-style rotation, GroupNorm over heads and the
  swish gate, in a 2-layer language model on a noisy copy task (token t+1 = token t-3 with probability 0.9).

`mlp`: a plain ReLU MLP 16-64-10 on complex_linear's task, for the "diag_quadratic" rows (below).

Per model and optimizer: "kfac" (no lr: the quadratic-model step), "shampoo" and "auto" at lr=1e-3, "diag_quadratic"
(only with --optimizers: diag with step="quadratic" and no lr, Adam's direction at the quadratic model's α, μ, λ:
what kfac without an lr gives a model none of whose parameters is in a curvature block), compiled
with loss= as `gnfx.compile(model, name, loss=...)`, and torch.optim.AdamW at lr=1e-3 ("adamw"), the reference;
`--steps` steps of `loss.backward(); model.step(); model.zero_grad()` on batches drawn from a fixed set of 512
examples (batch 64; 32 sequences for retnet), the same batches for every optimizer. Reported: the loss on the
whole set before and after (train mode), the share of the trainable parameters in curvature blocks and the
capture, or the error. Results: benchmarks/results/first_contact_21_families.md.
"""
from __future__ import annotations

import argparse
import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from benchmarks.models import mlp

OPTIMIZERS = {"kfac": ("kfac", {}), "shampoo": ("shampoo", {"lr": 1e-3}), "auto": ("auto", {"lr": 1e-3}),
              "diag_quadratic": ("diag", {"step": "quadratic"})}


class ComplexNet(nn.Module):
    def __init__(self, held_real: bool):
        super().__init__()
        self.a, self.b = ComplexLinear(16, 32, held_real), ComplexLinear(32, 10, held_real)

    def forward(self, x):
        h = self.a(x.to(torch.cfloat))
        return self.b(h * torch.sigmoid(h.abs())).abs()


class ComplexLinear(nn.Module):
    """z Wᵀ + b over complex numbers: nn.Linear(dtype=torch.cfloat), or W and b held as real (..., 2) parameters."""

    def __init__(self, d_in: int, d_out: int, held_real: bool):
        super().__init__()
        self.held_real = held_real
        if held_real:
            layer = nn.Linear(d_in, d_out, dtype=torch.cfloat)
            self.w = nn.Parameter(torch.view_as_real(layer.weight.detach()).clone())
            self.bias = nn.Parameter(torch.view_as_real(layer.bias.detach()).clone())
        else:
            self.layer = nn.Linear(d_in, d_out, dtype=torch.cfloat)

    def forward(self, z):
        if not self.held_real:
            return self.layer(z)
        return z @ torch.view_as_complex(self.w).T + torch.view_as_complex(self.bias)


class ComplexMatmul(nn.Module):
    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(16, 32, dtype=torch.cfloat) / 4)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(torch.view_as_real(torch.matmul(x.to(torch.cfloat), self.W)).flatten(1))


class ComplexActivations(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 64), nn.Linear(64, 10)
        self.register_buffer("phase", torch.polar(torch.ones(32), torch.linspace(0, 3.1, 32)))

    def forward(self, x):
        z = torch.view_as_complex(self.a(x).view(-1, 32, 2).contiguous()) * self.phase
        return self.b(torch.tanh(torch.cat((z.real, z.imag), -1)))


class SpectralConv1d(nn.Module):
    def __init__(self, channels: int, modes: int, held_real: bool):
        super().__init__()
        self.modes, self.held_real = modes, held_real
        w = torch.rand(channels, channels, modes, dtype=torch.cfloat) / channels ** 2
        self.weight = nn.Parameter(torch.view_as_real(w).clone() if held_real else w)

    def forward(self, x):
        w = torch.view_as_complex(self.weight) if self.held_real else self.weight
        x_ft = torch.fft.rfft(x)
        out_ft = torch.zeros(x.shape[0], w.shape[1], x.shape[-1] // 2 + 1, dtype=torch.cfloat, device=x.device)
        out_ft[:, :, :self.modes] = torch.einsum("bix,iox->box", x_ft[:, :, :self.modes], w)
        return torch.fft.irfft(out_ft, n=x.shape[-1])


class FNO1d(nn.Module):
    def __init__(self, held_real: bool, width: int = 16, modes: int = 8):
        super().__init__()
        self.lift = nn.Linear(2, width)
        self.spec = nn.ModuleList(SpectralConv1d(width, modes, held_real) for _ in range(2))
        self.w = nn.ModuleList(nn.Conv1d(width, width, 1) for _ in range(2))
        self.proj = nn.Sequential(nn.Linear(width, 64), nn.GELU(), nn.Linear(64, 1))

    def forward(self, a):
        grid = torch.linspace(0, 1, a.shape[1], device=a.device).expand(a.shape[0], -1)
        x = self.lift(torch.stack((a, grid), -1)).permute(0, 2, 1)
        for s, w in zip(self.spec, self.w):
            x = F.gelu(s(x) + w(x))
        return self.proj(x.permute(0, 2, 1)).squeeze(-1)


class FiLMBlock(nn.Module):
    def __init__(self, c: int, cond: int):
        super().__init__()
        self.conv, self.bn, self.film = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c, affine=False), nn.Linear(cond, 2 * c)

    def forward(self, x, e):
        gamma, beta = self.film(e).chunk(2, dim=-1)
        h = gamma[:, :, None, None] * self.bn(self.conv(x)) + beta[:, :, None, None]
        return x + F.relu(h)


class FiLMNet(nn.Module):
    def __init__(self, c: int = 16, vocab: int = 20, cond: int = 32, classes: int = 10):
        super().__init__()
        self.stem, self.q = nn.Conv2d(3, c, 3, padding=1), nn.Embedding(vocab, cond)
        self.cond = nn.Sequential(nn.Linear(cond, cond), nn.ReLU())
        self.blocks = nn.ModuleList(FiLMBlock(c, cond) for _ in range(2))
        self.head = nn.Linear(c, classes)

    def forward(self, image, question):
        e = self.cond(self.q(question).mean(1))
        x = F.relu(self.stem(image))
        for block in self.blocks:
            x = block(x, e)
        return self.head(x.mean((2, 3)))


def squash(s, dim=-1):
    n2 = (s ** 2).sum(dim, keepdim=True)
    return n2 / (1 + n2) * s / torch.sqrt(n2 + 1e-8)


class CapsNet(nn.Module):
    def __init__(self, classes: int = 10, iterations: int = 3):
        super().__init__()
        self.conv1, self.primary = nn.Conv2d(1, 32, 5), nn.Conv2d(32, 64, 3, stride=2)
        self.W = nn.Parameter(0.05 * torch.randn(1, 72, classes, 16, 8))
        self.iterations = iterations

    def forward(self, x):
        u = self.primary(F.relu(self.conv1(x)))
        n = u.shape[0]
        u = squash(u.view(n, 8, 8, 3, 3).permute(0, 1, 3, 4, 2).reshape(n, -1, 8))
        u_hat = torch.matmul(self.W, u[:, :, None, :, None]).squeeze(-1)  # (N, 72, classes, 16)
        b = torch.zeros(n, u_hat.shape[1], u_hat.shape[2], device=x.device)
        for i in range(self.iterations):
            c = F.softmax(b, dim=2)
            if i < self.iterations - 1:
                v = squash((c[..., None] * u_hat.detach()).sum(1, keepdim=True))
                b = b + (u_hat.detach() * v).sum(-1)
        v = squash((c[..., None] * u_hat).sum(1, keepdim=True))
        return v.squeeze(1).norm(dim=-1)


class MultiScaleRetention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.h, self.dk = heads, d // heads
        self.q, self.k, self.v, self.g, self.o = (nn.Linear(d, d, bias=False) for _ in range(5))
        self.gn = nn.GroupNorm(heads, d)
        self.register_buffer("gamma", 1 - 2.0 ** (-5 - torch.arange(heads, dtype=torch.float)), persistent=False)
        self.register_buffer("theta", 10000 ** (-torch.arange(0, self.dk, 2, dtype=torch.float) / self.dk),
                             persistent=False)

    def decay(self, t: int, device):
        n = torch.arange(t, device=device)
        diff = (n[:, None] - n[None, :]).float()
        mask = torch.where(diff >= 0, self.gamma[:, None, None] ** diff.clamp(min=0), torch.zeros(()))
        return mask / mask.sum(-1, keepdim=True).sqrt()

    def rotate(self, x):
        angle = torch.arange(x.shape[-2], device=x.device).float()[:, None] * self.theta[None, :]
        sin, cos = angle.sin().repeat_interleave(2, -1), angle.cos().repeat_interleave(2, -1)
        return x * cos + torch.stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2) * sin

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = (f(x).view(n, t, self.h, self.dk).transpose(1, 2) for f in (self.q, self.k, self.v))
        q, k = self.rotate(q), self.rotate(k * self.dk ** -0.5)
        scores = torch.einsum("bhnd,bhmd->bhnm", q, k) * self.decay(t, x.device)
        y = torch.einsum("bhnm,bhmd->bhnd", scores, v).transpose(1, 2).reshape(n * t, d)
        return self.o(F.silu(self.g(x)) * self.gn(y).view(n, t, d))


class RetNet(nn.Module):
    def __init__(self, vocab: int = 16, d: int = 32, heads: int = 4, layers: int = 2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(nn.ModuleDict(dict(
            ln1=nn.LayerNorm(d), ret=MultiScaleRetention(d, heads), ln2=nn.LayerNorm(d),
            ffn=nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)))) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.emb(ids)
        for layer in self.layers:
            x = x + layer["ret"](layer["ln1"](x))
            x = x + layer["ffn"](layer["ln2"](x))
        return self.head(self.ln(x))


def _classes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=g)
    return (x,), (x[:, :10] ** 2).argmax(1)


def _heat():
    g = torch.Generator().manual_seed(0)
    s = 64
    k = torch.fft.rfftfreq(s, 1 / s)
    a = torch.fft.irfft(torch.randn(512, 8, dtype=torch.cfloat, generator=g)
                        @ torch.eye(8, s // 2 + 1, dtype=torch.cfloat), n=s)
    a = a / a.std()
    return (a,), torch.fft.irfft(torch.fft.rfft(a) * torch.exp(-(2 * torch.pi * k) ** 2 * 0.002), n=s)


def _film():
    g = torch.Generator().manual_seed(0)
    image, question = torch.randn(512, 3, 8, 8, generator=g), torch.randint(0, 20, (512, 5), generator=g)
    colour = (image.mean((2, 3)) * torch.tensor([1.0, -1.0, 0.5])).sum(1).gt(0).long()
    return (image, question), colour * 5 + question[:, 0] % 5


def _digits(one_hot: bool):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (512,), generator=g)
    x = torch.randn(10, 1, 12, 12, generator=g)[y] + 0.5 * torch.randn(512, 1, 12, 12, generator=g)
    return (x,), F.one_hot(y, 10).float() if one_hot else y


def _copy_task():
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 16, (512, 17), generator=g)
    for t in range(3, 17):
        s[:, t] = torch.where(torch.rand(512, generator=g) < 0.9, s[:, t - 3], s[:, t])
    return (s[:, :-1],), s[:, 1:]


MODELS = {  # name: (model, data, loss=, batch)
    "complex_linear": (lambda: ComplexNet(False), _classes, "cross_entropy", 64),
    "complex_matmul": (ComplexMatmul, _classes, "cross_entropy", 64),
    "complex_held_real": (lambda: ComplexNet(True), _classes, "cross_entropy", 64),
    "complex_activations": (ComplexActivations, _classes, "cross_entropy", 64),
    "fno_complex": (lambda: FNO1d(False), _heat, "mse", 64),
    "fno_held_real": (lambda: FNO1d(True), _heat, "mse", 64),
    "mlp": (lambda: mlp([16, 64, 10]), _classes, "cross_entropy", 64),
    "film": (FiLMNet, _film, "cross_entropy", 64),
    "capsule": (CapsNet, lambda: _digits(False), "cross_entropy", 64),
    "capsule_mse": (CapsNet, lambda: _digits(True), "mse", 64),
    "retnet": (RetNet, _copy_task, "cross_entropy", 32),
}


def _loss(name: str, out, y):
    return F.cross_entropy(out.flatten(0, -2), y.flatten()) if name == "cross_entropy" else F.mse_loss(out, y)


def run(model_name: str, steps: int, optimizers) -> list[str]:
    make, data, loss, rows = MODELS[model_name]
    xs, y = data()
    torch.manual_seed(0)
    base = make()

    def whole(m):
        with torch.no_grad():
            return _loss(loss, m(*xs), y).item()

    def train(m, step):
        g = torch.Generator().manual_seed(1)
        for _ in range(steps):
            i = torch.randint(0, len(y), (rows,), generator=g)
            _loss(loss, m(*(x[i] for x in xs)), y[i]).backward()
            step()
            m.zero_grad()
        return whole(m)

    before = whole(base)
    reference = copy.deepcopy(base)
    adamw = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    lines = [f"| {model_name} | adamw | {before:.4f} → {train(reference, adamw.step):.4f} | – | – |"]
    for label in optimizers:
        name, hparams = OPTIMIZERS[label]
        model = copy.deepcopy(base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                compiled = gnfx.compile(model, name, loss=loss, **hparams)
                after = train(compiled, compiled.step)
            except Exception as e:  # the row says what was raised
                lines.append(f"| {model_name} | {label} | – | {type(e).__name__}: {str(e)[:160]} | – |")
                continue
        report = compiled.report().splitlines()
        coverage = next(line for line in report if line.startswith("parameters in curvature blocks"))
        lines.append(f"| {model_name} | {label} | {before:.4f} → {after:.4f} | {report[0].removeprefix('gnfx: ')} | "
                     f"{coverage.removeprefix('parameters in curvature blocks: ')} |")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--optimizers", nargs="+", default=["kfac", "shampoo", "auto"], choices=list(OPTIMIZERS))
    args = parser.parse_args(argv)
    print("| model | optimizer | loss on the 512 examples | capture, or the error | in curvature blocks |")
    print("|---|---|---|---|---|")
    for name in args.models:
        for line in run(name, args.steps, args.optimizers):
            print(line, flush=True)


if __name__ == "__main__":
    main()
