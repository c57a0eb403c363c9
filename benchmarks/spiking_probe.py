"""First contact with spiking-network libraries: spikingjelly and norse, called as their users call them.

    PYTHONPATH=<spikingjelly, norse>:<loguru, nir, nirtorch, h5py>:. OMP_NUM_THREADS=1 python -m benchmarks.spiking_probe \
        [--models sj_csnn norse_tutorial] [--optimizers kfac kfac_lr] [--steps 6] [--timeout 300] [--out probe.md]

benchmarks.family_probe's first contact (one model and optimizer per process, random weights, train mode,
`--steps` steps on one random batch of 16 8x8 images, 10 classes, T = 4 time steps) for:

- spikingjelly (activation_based; stateful neurons keep their membrane potential v in `self._memories` between
  calls, `functional.reset_net(net)` after every batch sets it back; the ATan surrogate gradient is a custom
  autograd.Function: heaviside forward, atan derivative backward; backend 'torch', the CPU one):
  `sj_fc`: examples/lif_fc_mnist.py: `Flatten, layer.Linear(64, 10, bias=False), neuron.LIFNode(tau=2,
  surrogate.ATan())` in single-step mode, the training loop calling the compiled network once per time step on
  `encoding.PoissonEncoder()(img)` and averaging the spikes, `F.mse_loss(out_fr, one_hot)`, reset_net after;
  `sj_csnn`: examples/conv_fashion_mnist.py's CSNN shrunk (4 channels): layer.Conv2d-BatchNorm2d-IFNode twice
  with max pooling, layer.Linear-IFNode twice, `functional.set_step_mode(net, "m")` (multi-step: each layer runs
  over the T·N rows of the [T, N, ...] sequence), the image repeated over T in the forward, the firing rate
  `mean(0)`, the same loss;
  `sj_seq`: the same network written with `layer.SeqToANNContainer(nn.Conv2d, nn.BatchNorm2d)` and multi-step
  LIFNodes, the Poisson-encoded sequence [T, N, 1, 8, 8] stacked by the training loop;
- norse (norse.torch; neuron cells take and return their state, a tuple of tensors, carried by the caller over
  the time steps; the SuperSpike surrogate is a custom autograd.Function):
  `norse_tutorial`: norse's MNIST tutorial model: `ConstantCurrentLIFEncoder(seq_length=T)`, an SNN stepping
  `LIFRecurrentCell(64, 32, LIFParameters(alpha=100, v_th=0.3))` (its input and recurrent weights are
  parameters of the cell, applied by F.linear in norse's lif_step) then `Linear(32, 10, bias=False)` and
  `LICell` over the T steps in its forward, decoded by max over time and log_softmax, `F.nll_loss`;
  `norse_conv`: norse's ConvNet task shrunk: Conv2d-LIFCell-maxpool twice, Linear-LIFCell, Linear-LICell, stepped
  over T in the forward on constant-current encoded images, the same decoding and loss;
  `norse_seqstate`: `SequentialState(Conv2d, LIFCell(), MaxPool2d, Flatten, Linear, LICell())` called by the
  training loop once per time step, `out, state = model(x[t], state)` (the state list carried by the loop),
  the same decoding and loss;
  `norse_lif`: `SequentialState(Linear(64, 32), LIF(), Linear(32, 10), LI())` on the whole [T, N, 64]
  sequence (LIF and LI loop over T inside), the same decoding and loss.

Optimizers: "kfac" at its defaults with the users' loss where gnfx models it (loss="mse" for spikingjelly's
mean squared error of the rates to the one-hot labels, "cross_entropy" for norse's nll_loss of log_softmax),
"kfac_lr" (lr 1e-2), "shampoo", "diag" and "auto" at lr 1e-2, and torch.optim.AdamW at lr 1e-2 ("adamw").
Per run: the capture's form, the share of the trainable parameters in curvature blocks, exactness (the kfac_lr
runs, float64: the compiled model beside a second build from the same seed over 3 steps, the largest |difference|
of the loss and of any gradient, the neurons reset by each forward's loss as the users' loops do; and the first
step's K-FAC A and S of every nn.Linear block against forward and gradient hooks on every call,
benchmarks.hooked_calls, with M = N the loss's examples), the losses, gnfx's warnings (once each) and the
parameters outside the blocks, the seconds; or the error. Neither library is a dependency of gnfx. The results:
benchmarks/results/first_contact_13_spiking.md.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from benchmarks.child_rows import library, one_batch_row, probe_main
from benchmarks.hooked_calls import hooked_calls, linear_factor_gap
from benchmarks.lockstep import float64_gaps

BATCH, STEPS_T, CLASSES = 16, 4, 10
MODELS = ("sj_fc", "sj_csnn", "sj_seq", "norse_tutorial", "norse_conv", "norse_seqstate", "norse_lif")
OPTIMIZERS = {"kfac": ("kfac", None), "kfac_lr": ("kfac", {"lr": 1e-2}), "shampoo": ("shampoo", {"lr": 1e-2}),
              "diag": ("diag", {"lr": 1e-2}), "auto": ("auto", {"lr": 1e-2}), "adamw": ("adamw", {"lr": 1e-2})}


def _import(name: str):
    return library("benchmarks.spiking_probe", name)


def _sj():
    """spikingjelly.activation_based's neuron, layer, functional, surrogate and encoding modules."""
    return tuple(_import(f"spikingjelly.activation_based.{name}")
                 for name in ("neuron", "layer", "functional", "surrogate", "encoding"))


class CSNN(nn.Module):
    """spikingjelly's examples/conv_fashion_mnist.py CSNN (module doc), on 8x8 images."""

    def __init__(self, channels: int = 4):
        super().__init__()
        neuron, layer, functional, surrogate, _ = _sj()
        self.conv_fc = nn.Sequential(
            layer.Conv2d(1, channels, kernel_size=3, padding=1, bias=False), layer.BatchNorm2d(channels),
            neuron.IFNode(surrogate_function=surrogate.ATan()), layer.MaxPool2d(2, 2),
            layer.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False), layer.BatchNorm2d(channels),
            neuron.IFNode(surrogate_function=surrogate.ATan()), layer.MaxPool2d(2, 2), layer.Flatten(),
            layer.Linear(channels * 2 * 2, channels * 4, bias=False), neuron.IFNode(surrogate_function=surrogate.ATan()),
            layer.Linear(channels * 4, CLASSES, bias=False), neuron.IFNode(surrogate_function=surrogate.ATan()))
        functional.set_step_mode(self, step_mode="m")

    def forward(self, x):
        x_seq = x.unsqueeze(0).expand(STEPS_T, -1, -1, -1, -1)  # [N, C, H, W] -> [T, N, C, H, W]
        return self.conv_fc(x_seq).mean(0)


def _sj_seq() -> nn.Module:
    neuron, layer, _, surrogate, _ = _sj()
    return nn.Sequential(
        layer.SeqToANNContainer(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)),
        neuron.LIFNode(surrogate_function=surrogate.ATan(), step_mode="m"),
        layer.SeqToANNContainer(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 16)),
        neuron.LIFNode(surrogate_function=surrogate.ATan(), step_mode="m"),
        layer.SeqToANNContainer(nn.Linear(16, CLASSES)),
        neuron.LIFNode(surrogate_function=surrogate.ATan(), step_mode="m"))


def _norse_parameters(alpha: float = 100.0):
    norse = _import("norse.torch")
    return norse.LIFParameters(alpha=torch.as_tensor(alpha), v_th=torch.as_tensor(0.3))


class NorseSNN(nn.Module):
    """norse's MNIST tutorial SNN: a recurrent LIF cell, a linear readout into a leaky integrator, over T."""

    def __init__(self):
        super().__init__()
        norse = _import("norse.torch")
        self.l1 = norse.LIFRecurrentCell(64, 32, p=_norse_parameters())
        self.fc_out = nn.Linear(32, CLASSES, bias=False)
        self.out = norse.LICell()

    def forward(self, x):
        s1 = so = None
        voltages = []
        for ts in range(x.shape[0]):
            z, s1 = self.l1(x[ts].reshape(x.shape[1], -1), s1)
            vo, so = self.out(self.fc_out(z), so)
            voltages += [vo]
        return torch.stack(voltages)


class NorseConvNet(nn.Module):
    """norse's ConvNet (task/mnist.py) shrunk to 8x8 images, stepped over T in its forward."""

    def __init__(self):
        super().__init__()
        norse = _import("norse.torch")
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, 1, padding=1), nn.Conv2d(4, 8, 3, 1, padding=1)
        self.fc1, self.fc2 = nn.Linear(8 * 2 * 2, 32), nn.Linear(32, CLASSES)
        self.lif0, self.lif1, self.lif2 = (norse.LIFCell(p=_norse_parameters()) for _ in range(3))
        self.out = norse.LICell()

    def forward(self, x):
        s0 = s1 = s2 = so = None
        voltages = []
        for ts in range(x.shape[0]):
            z, s0 = self.lif0(self.conv1(x[ts]), s0)
            z = F.max_pool2d(z, 2, 2)
            z, s1 = self.lif1(10 * self.conv2(z), s1)
            z = F.max_pool2d(z, 2, 2).flatten(1)
            z, s2 = self.lif2(self.fc1(z), s2)
            v, so = self.out(self.fc2(F.relu(z)), so)
            voltages.append(v)
        return torch.stack(voltages)


class NorseModel(nn.Module):
    """norse's tutorial wrapper: encoder, SNN, decoder (max over time, log_softmax)."""

    def __init__(self, snn: nn.Module, shape: tuple[int, ...]):
        super().__init__()
        self.encoder = _import("norse.torch").ConstantCurrentLIFEncoder(seq_length=STEPS_T)
        self.snn, self.shape = snn, shape

    def forward(self, x):
        x = self.encoder(x.reshape(x.shape[0], -1)).reshape(STEPS_T, x.shape[0], *self.shape)
        return F.log_softmax(self.snn(x).max(0)[0], dim=-1)


def build(name: str) -> nn.Module:
    """The model `name` (module doc), with random weights from the current seed."""
    if name == "sj_fc":
        neuron, layer, _, surrogate, _ = _sj()
        return nn.Sequential(layer.Flatten(), layer.Linear(64, CLASSES, bias=False),
                             neuron.LIFNode(tau=2.0, surrogate_function=surrogate.ATan()))
    if name == "sj_csnn":
        return CSNN()
    if name == "sj_seq":
        return _sj_seq()
    norse = _import("norse.torch") if name.startswith("norse") else None
    if name == "norse_tutorial":
        return NorseModel(NorseSNN(), (1, 8, 8))
    if name == "norse_conv":
        return NorseModel(NorseConvNet(), (1, 8, 8))
    if name == "norse_seqstate":
        return norse.SequentialState(nn.Conv2d(1, 4, 3, padding=1), norse.LIFCell(p=_norse_parameters()),
                                     nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, CLASSES), norse.LICell())
    return norse.SequentialState(nn.Linear(64, 32), norse.LIF(p=_norse_parameters()), nn.Linear(32, CLASSES),
                                 norse.LI())


def problem(name: str, dtype=torch.float32):
    """(batch, loss(compiled or plain model, batch, the plain model: the one whose neurons reset_net resets))."""
    g = torch.Generator().manual_seed(1)
    images = 3 * torch.rand(BATCH, 1, 8, 8, generator=g, dtype=dtype)
    labels = torch.randint(0, CLASSES, (BATCH,), generator=g)
    if name.startswith("sj"):
        _, _, functional, _, encoding = _sj()
        one_hot = F.one_hot(labels, CLASSES).to(dtype)
        encoder = encoding.PoissonEncoder()

        def rate_loss(m, b, plain):
            if name == "sj_fc":  # the training loop steps the single-step network (lif_fc_mnist.py)
                out_fr = sum(m(encoder(b[0] / 3)) for _ in range(STEPS_T)) / STEPS_T
            elif name == "sj_seq":  # the loop encodes the sequence, the network runs it in multi-step mode
                out_fr = m(torch.stack([encoder(b[0] / 3) for _ in range(STEPS_T)])).mean(0)
            else:
                out_fr = m(b[0])
            functional.reset_net(plain)  # after every batch, as the users' loops do
            return F.mse_loss(out_fr, b[1])
        return (images, one_hot), rate_loss
    if name == "norse_seqstate":
        encoder = _import("norse.torch").ConstantCurrentLIFEncoder(seq_length=STEPS_T)

        def stepped(m, b, plain):  # the training loop carries the state list over the time steps
            x, state, voltages = encoder(b[0]), None, []
            for ts in range(STEPS_T):
                v, state = m(x[ts], state)
                voltages.append(v)
            return F.nll_loss(F.log_softmax(torch.stack(voltages).max(0)[0], dim=-1), b[1])
        return (images, labels), stepped
    if name == "norse_lif":
        encoder = _import("norse.torch").ConstantCurrentLIFEncoder(seq_length=STEPS_T)
        return (images.flatten(1), labels), lambda m, b, plain: F.nll_loss(
            F.log_softmax(m(encoder(b[0]))[0].max(0)[0], dim=-1), b[1])
    return (images, labels), lambda m, b, plain: F.nll_loss(m(b[0]), b[1])


def settings(name: str, optimizer: str) -> tuple[str, dict]:
    kind, hparams = OPTIMIZERS[optimizer]
    if hparams is None:  # kfac at its defaults with the users' loss
        hparams = {"loss": "mse" if name.startswith("sj") else "cross_entropy"}
    return kind, hparams


def factor_gaps(name: str, hparams: dict) -> str:
    """The largest gap of the first step's A and S of the nn.Linear blocks against hooks, relative to the largest
    entry, S = N Σ g gᵀ (module doc)."""
    torch.manual_seed(0)
    model = build(name)
    reference = copy.deepcopy(model)
    batch, loss_of = problem(name, torch.get_default_dtype())
    c = gnfx.compile(model, "kfac", stat_decay=0.0, stat_every=1, **hparams)
    linears = [n for n, mod in reference.named_modules() if isinstance(mod, nn.Linear)]
    torch.manual_seed(5)
    with hooked_calls(reference, linears) as calls:
        loss_of(reference, batch, reference).backward()
    torch.manual_seed(5)
    loss_of(c, batch, model).backward()
    c.step()
    return linear_factor_gap(c, calls, BATCH)


def exactness(name: str, kind: str, hparams: dict) -> str:
    """'loss Δ, grad Δ; A, S Δ' in float64 (module doc)."""
    def loss_for(model):
        batch, loss_of = problem(name, torch.float64)
        return lambda m: loss_of(m, batch, model if isinstance(m, gnfx.CompiledModel) else m)
    return float64_gaps(lambda: build(name), loss_for, kind, hparams, also=lambda: factor_gaps(name, hparams))


def probe(name: str, optimizer: str, steps: int) -> str:
    kind, hparams = settings(name, optimizer)

    def made():
        model = build(name)
        batch, loss_of = problem(name)
        return model, lambda c: loss_of(c, batch, model)
    return one_batch_row(name, optimizer, kind, hparams, steps, lambda: exactness(name, kind, hparams), made)


def main() -> None:
    probe_main(__doc__, "benchmarks.spiking_probe", probe, {"models": list(MODELS), "optimizers": list(OPTIMIZERS)},
               ["| model | optimizer | capture | in blocks | exact: loss, grad (float64); A, S vs hooks | losses | "
                "outside the blocks | gnfx's warnings | error | s |", "|---|---|---|---|---|---|---|---|---|---|"],
               steps=6, timeout=300)


if __name__ == "__main__":
    main()
