"""First contact with Bayesian-neural-network libraries (blitz-bayesian-pytorch, torchbnn, bayesian-torch) and
MC dropout, called as their users call them.

    PYTHONPATH=<blitz, torchbnn, bayesian_torch>:. OMP_NUM_THREADS=1 python -m benchmarks.bayes_probe \
        [--models tbnn_cnn bt_dnn] [--optimizers kfac kfac_lr] [--steps 10] [--timeout 240] [--out probe.md]

Bayes by Backprop samples each weight on every forward, W = μ + σ(ρ) ⊙ ε (or perturbs it by Flipout's signs),
and adds a KL term on (μ, ρ) to the loss. The models (random weights, a batch of 32 random 1x8x8 images and
10 classes, trained on that batch):

- `tbnn_cnn`: torchbnn's BayesConv2d and BayesLinear (prior N(0, 0.1²)) in an nn.Sequential, trained as its
  demo trains it, `cross_entropy + 0.01 · BKLLoss(reduction="mean")(model)`;
- `tbnn_elbo3`: the same model, the loss the mean of that loss over 3 forwards (3 weight samples) before one
  backward, as blitz's `sample_elbo` computes its ELBO;
- `bt_dnn`, `bt_flipout`: a plain CNN made Bayesian by bayesian-torch's `dnn_to_bnn` (Reparameterization or
  Flipout layers), `cross_entropy + get_kl_loss(model) / batch`, its README's loop;
- `bt_layers`: a module of bayesian-torch's LinearReparameterization layers called as its own models call them,
  each returning (out, kl), the forward returning (logits, Σ kl); the same loss;
- `blitz_mlp`: blitz's BayesianLinear layers in a `@variational_estimator` module, trained by
  `model.sample_elbo(x, y, CrossEntropyLoss(), sample_nbr=3, complexity_cost_weight=1/32)` (compiled with
  `methods=["sample_elbo"]`, which calls the module's forward 3 times and its `nn_kl_divergence`);
- `blitz_loop`: the same model, sample_elbo's loop written out around the compiled forward,
  `Σ_3 (CrossEntropyLoss()(compiled(x), y) + kl_divergence_from_nn(compiled) / 32) / 3` (what
  nn_kl_divergence computes: the KL read from the layers, which keep it as attributes their forward sets);
- `mc_dropout`: an MLP with nn.Dropout(0.2) between its layers (MC dropout's training is plain training);
- `ensemble`: a deep ensemble of 3 MLPs in one module, its forward the members' logits stacked (3, N, C),
  trained on the members' mean cross-entropy, `cross_entropy(out.flatten(0, 1), y.repeat(3))`.

Optimizers: "kfac" at its defaults with loss="cross_entropy" (the quadratic step, no lr), "kfac_lr" (lr 1e-3;
its row also gives the exactness: float64, the compiled model beside a second build from the same seed over 3
steps, the global generator seeded alike before each forward (the same ε): the largest |difference| of the loss
and of any gradient; then K-FAC's A and S of the linear blocks after one statistic step against plain hooks on
the same forward, relative to their largest entry), and torch.optim.AdamW at lr 1e-3 ("adamw") and 1e-2 ("adamw_1e-2"). None of these
libraries is a dependency of gnfx. The results: benchmarks/results/first_contact_13_bayes.md.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from benchmarks.child_rows import library, probe_main, problem_row
from benchmarks.hooked_calls import hooked_calls, linear_factors
from benchmarks.lockstep import float64_gaps

BATCH, CLASSES = 32, 10
MODELS = ("tbnn_cnn", "tbnn_elbo3", "bt_dnn", "bt_flipout", "bt_layers", "blitz_mlp", "blitz_loop", "mc_dropout",
          "ensemble")
# the loss's terms per example where it averages over more than the batch: its weight samples, or members
TERMS = {"tbnn_elbo3": 3, "blitz_mlp": 3, "blitz_loop": 3, "ensemble": 3}
OPTIMIZERS = {"kfac": ("kfac", {"loss": "cross_entropy"}), "kfac_lr": ("kfac", {"lr": 1e-3}),
              "adamw": ("adamw", {"lr": 1e-3}), "adamw_1e-2": ("adamw", {"lr": 1e-2})}


def _import(name: str):
    return library("benchmarks.bayes_probe", name)


def _cnn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 16), nn.ReLU(),
                         nn.Linear(16, CLASSES))


class _Ensemble(nn.Module):
    """3 MLPs whose logits the forward stacks, (members, N, C)."""

    def __init__(self, members: int = 3):
        super().__init__()
        self.members = nn.ModuleList(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, CLASSES))
                                     for _ in range(members))

    def forward(self, x):
        return torch.stack([member(x) for member in self.members])


class _LayersNet(nn.Module):
    """bayesian-torch's layers as its own models call them: each returns (out, kl), the forward (logits, Σ kl)."""

    def __init__(self):
        super().__init__()
        layers = _import("bayesian_torch.layers")
        self.fc1 = layers.LinearReparameterization(64, 32)
        self.fc2 = layers.LinearReparameterization(32, CLASSES)

    def forward(self, x):
        x, kl1 = self.fc1(x.flatten(1))
        logits, kl2 = self.fc2(F.relu(x))
        return logits, kl1 + kl2


def build(name: str) -> nn.Module:
    """The model `name` (module doc), with random weights from the current seed."""
    if name.startswith("tbnn"):
        bnn = _import("torchbnn")
        return nn.Sequential(bnn.BayesConv2d(0.0, 0.1, 1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             bnn.BayesLinear(0.0, 0.1, 36, 16), nn.ReLU(), bnn.BayesLinear(0.0, 0.1, 16, CLASSES))
    if name in ("bt_dnn", "bt_flipout"):
        net = _cnn()
        _import("bayesian_torch.models.dnn_to_bnn").dnn_to_bnn(net, {
            "prior_mu": 0.0, "prior_sigma": 1.0, "posterior_mu_init": 0.0, "posterior_rho_init": -3.0,
            "type": "Flipout" if name == "bt_flipout" else "Reparameterization", "moped_enable": False})
        return net
    if name == "bt_layers":
        return _LayersNet()
    if name.startswith("blitz"):
        blitz_modules, blitz_utils = _import("blitz.modules"), _import("blitz.utils")

        @blitz_utils.variational_estimator
        class BlitzMLP(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc1 = blitz_modules.BayesianLinear(64, 32)
                self.fc2 = blitz_modules.BayesianLinear(32, CLASSES)

            def forward(self, x):
                return self.fc2(F.relu(self.fc1(x.flatten(1))))
        return BlitzMLP()
    if name == "ensemble":
        return _Ensemble()
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 32), nn.ReLU(),
                         nn.Dropout(0.2), nn.Linear(32, CLASSES))


def problem(name: str, dtype=torch.float32):
    """(batch, loss(compiled or plain model, batch)) of `name` as its users train it (module doc); the KL terms
    read the layers of the model they are given (a compiled model's modules are those of the module it holds)."""
    g = torch.Generator().manual_seed(1)
    batch = torch.randn(BATCH, 1, 8, 8, generator=g, dtype=dtype), torch.randint(0, CLASSES, (BATCH,), generator=g)
    if name.startswith("tbnn"):
        kl = _import("torchbnn").BKLLoss(reduction="mean", last_layer_only=False)
        samples = 3 if name == "tbnn_elbo3" else 1
        return batch, lambda m, b: sum(F.cross_entropy(m(b[0]), b[1]) + 0.01 * kl(m) for _ in range(samples)) / samples
    if name in ("bt_dnn", "bt_flipout"):
        get_kl_loss = _import("bayesian_torch.models.dnn_to_bnn").get_kl_loss
        return batch, lambda m, b: F.cross_entropy(m(b[0]), b[1]) + get_kl_loss(m) / BATCH
    if name == "bt_layers":
        def elbo(m, b):
            logits, kl = m(b[0])
            return F.cross_entropy(logits, b[1]) + kl / BATCH
        return batch, elbo
    if name == "blitz_mlp":
        return batch, lambda m, b: m.sample_elbo(b[0], b[1], nn.CrossEntropyLoss(), 3, 1 / BATCH)
    if name == "blitz_loop":
        kl_divergence_from_nn = _import("blitz.losses").kl_divergence_from_nn  # what nn_kl_divergence calls

        def elbo_written_out(m, b):
            return sum(nn.CrossEntropyLoss()(m(b[0]), b[1]) + kl_divergence_from_nn(m) / BATCH for _ in range(3)) / 3
        return batch, elbo_written_out
    if name == "ensemble":
        return batch, lambda m, b: F.cross_entropy(m(b[0]).flatten(0, 1), b[1].repeat(3))
    return batch, lambda m, b: F.cross_entropy(m(b[0]), b[1])


def _compile_options(name: str) -> dict:
    return {"methods": ["sample_elbo"]} if name == "blitz_mlp" else {}


def factor_gaps(name: str) -> str:
    """'A Δ, S Δ' of the linear blocks after one statistic step of the user's loss against plain hooks on the
    same forward(s) (the generator seeded alike: the same ε), S against M Σ g gᵀ (M the batch), each relative to
    the factor's largest entry; '–' without a linear block."""
    torch.manual_seed(0)
    net = build(name)
    reference = copy.deepcopy(net)
    c = gnfx.compile(net, "kfac", lr=1e-3, stat_every=1, stat_decay=0.0, fisher="empirical", **_compile_options(name))
    batch, loss_of = problem(name)
    torch.manual_seed(7)
    loss_of(c, batch).backward()
    c.step()
    linear = {b.name: b.weight.rpartition(".")[0] for b in c.layers if b.kind == "linear"}
    if not linear:
        return "no linear block"
    torch.manual_seed(7)
    with hooked_calls(reference, sorted(set(linear.values()))) as records:
        loss_of(reference, batch).backward()
    a_gap, s_gap, rows = 0.0, 0.0, BATCH * TERMS.get(name, 1)
    for block, module in linear.items():
        A, gg = linear_factors(records[module], c.layers[block].bias is not None)
        stats = c.statistics(block)
        a_gap = max(a_gap, ((stats["A"] - A).abs().max() / A.abs().max()).item())
        s_gap = max(s_gap, ((stats["S"] - rows * gg).abs().max() / (rows * gg).abs().max()).item())
    return f"A {a_gap:.0e}, S {s_gap:.0e} (M {rows}, {len(linear)} linear blocks)"


def exactness(name: str, kind: str, hparams: dict) -> str:
    """'loss Δ, grad Δ; A Δ, S Δ' (module doc)."""
    def loss_for(_):
        batch, loss_of = problem(name, torch.float64)
        return lambda m: loss_of(m, batch)
    return float64_gaps(lambda: build(name), loss_for, kind, {**hparams, **_compile_options(name)},
                        also=lambda: "") + factor_gaps(name)


def probe(name: str, optimizer: str, steps: int) -> str:
    """One table row: `optimizer` (OPTIMIZERS) for `steps` steps of `name` on one batch."""
    kind, hparams = OPTIMIZERS[optimizer]
    if kind != "adamw":
        hparams = {**hparams, **_compile_options(name)}

    return problem_row(name, optimizer, kind, hparams, steps, build, problem, exactness)


def main() -> None:
    probe_main(__doc__, "benchmarks.bayes_probe", probe, {"models": list(MODELS), "optimizers": list(OPTIMIZERS)},
               ["| model | optimizer | capture | in blocks | exact: loss, grad (float64); A, S (hooks) | losses | "
                "outside the blocks | gnfx's warnings | error | s |", "|---|---|---|---|---|---|---|---|---|---|"],
               steps=10, timeout=240)


if __name__ == "__main__":
    main()
