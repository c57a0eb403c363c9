"""First contact with forecasting libraries: neuralforecast and gluonts' torch DeepAR, called as their users call them.

    PYTHONPATH=<neuralforecast, gluonts, utilsforecast, coreforecast>:<toolz>:<pandas>:. OMP_NUM_THREADS=1 \
        python -m benchmarks.fcast_probe [--models nhits deepar] [--optimizers kfac kfac_lr] [--steps 4] \
        [--timeout 300] [--out probe.md]

benchmarks.family_probe's first contact (one model and optimizer per process, random weights, train mode,
`--steps` steps on one batch of 16 random-walk windows) for:

- neuralforecast (Nixtla; each model a LightningModule whose `training_step` calls `self(windows_batch)`,
  `self.loss.domain_map(output)` and `self.loss(y=, y_hat=, y_insample=, mask=)`, or for a DistributionLoss
  `self.loss(y=, distr_args=self.loss.scale_decouple(output, loc, scale), mask=)`; the probe does the same
  with the compiled model in `self`'s place, without Lightning's Trainer): `nhits` (NHITS, 3 stacks of one
  block, MLP [16, 16], MaxPool and interpolation, MAE), `nbeats` (NBEATS, identity/trend/seasonality stacks,
  MAE), `mlp_mq` (MLP, 2 layers of 16, MQLoss at levels 80 and 90: five quantiles' pinball loss), `tft` (TFT,
  hidden 8, 2 heads, MAE), `patchtst` (PatchTST, input 16, patches of 4, one encoder layer of width 16, MAE),
  `nhits_t` (NHITS with DistributionLoss("StudentT"): the negative log-likelihood of a Student t whose
  parameters the model outputs); horizon 4, input 8 (16 for PatchTST);
- gluonts (`deepar`: torch DeepARModel, a 2-layer LSTM of 16 over lagged, mean-scaled targets with a
  StudentT output head; `deepar_nb`: the same with a NegativeBinomialOutput on count targets). Its
  DeepARLightningModule's `training_step` is `self.model.loss(**batch).mean()`, another method than
  `forward` (the sampler): compiled with `methods=["loss"]`, the fix gnfx's error names, and called as
  `compiled.loss(**batch).mean()` (the Lightning module would take `lm.model.loss = compiled.loss` and
  return `compiled.optimizer` from `configure_optimizers`);
- pyro (`pyro_vae`: pyro's VAE tutorial shrunk, an nn.Module with an encoder (Linear 6-16, Softplus, two
  heads of 2: loc and log-scale) and a decoder (Linear 2-16, Softplus, Linear 16-6, sigmoid) and its `model`
  and `guide` methods, which register them with `pyro.module` and sample the latent and the Bernoulli
  observations of 32 binary rows under `pyro.plate`). pyro's SVI steps a `pyro.optim.PyroOptim`, which builds
  one torch optimizer per parameter: gnfx's one optimizer cannot be that (refused, naming the loop below), so
  the probe writes the step as pyro's docs write a custom one, `Trace_ELBO().differentiable_loss(c.model,
  c.guide, x)`, then backward and `c.step()`, compiled with `methods=["model", "guide"]` (the param store
  cleared before each loss and torch's seed set, so that two copies draw the same latents).

Optimizers: "kfac" at its defaults (no `loss=`: none of these losses is a cross-entropy or a mean squared
error: MAE and the pinball loss are piecewise linear, the likelihoods are a Student t's and a negative
binomial's), "kfac_mse" (`loss="mse"` and no lr: the quadratic-model step with a
squared error's GGN, what a user who takes a forecast's loss for a regression one would pass), "kfac_lr" (lr 1e-3), "shampoo", "diag" and "auto" at lr 1e-3, and torch.optim.AdamW at lr
1e-3 ("adamw"). Per run: the capture's form, the share of the trainable parameters in curvature blocks,
exactness (kfac_lr, float64: the compiled model beside a second copy over 3 steps, the largest |difference|
of the loss and of any gradient, benchmarks.lockstep; and the first statistic step's A and S of every Linear
block against plain hooks on every call, benchmarks.hooked_calls: A = mean of [a 1][a 1]ᵀ over the calls'
rows, S = M Σ g gᵀ, M read off gnfx's S), the losses, gnfx's warnings and the parameters outside the
blocks, the seconds; or the error. None of these libraries is a dependency of gnfx. The results:
benchmarks/results/first_contact_11_fcast.md.
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
import sys
import types

import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from benchmarks.child_rows import library, one_batch_row, probe_main
from benchmarks.hooked_calls import hooked_calls, linear_factors
from benchmarks.lockstep import lockstep_gaps

WINDOWS, HORIZON, INPUT = 16, 4, 8
MODELS = ("nhits", "nbeats", "mlp_mq", "tft", "patchtst", "nhits_t", "deepar", "deepar_nb", "pyro_vae")
METHODS = {"deepar": ["loss"], "deepar_nb": ["loss"], "pyro_vae": ["model", "guide"]}  # the training step's
OPTIMIZERS = {"kfac": ("kfac", {}), "kfac_mse": ("kfac", {"loss": "mse"}),
              "kfac_lr": ("kfac", {"lr": 1e-3}), "shampoo": ("shampoo", {"lr": 1e-3}),
              "diag": ("diag", {"lr": 1e-3}), "auto": ("auto", {"lr": 1e-3}),
              "adamw": ("adamw", {"lr": 1e-3})}  # adamw: torch.optim's, the reference


def _import(name: str):
    return library("benchmarks.fcast_probe", name)


def _neuralforecast(module: str):
    """neuralforecast's `module`, its package __init__s skipped (neuralforecast/__init__ imports its AutoModels,
    which need ray and optuna; neuralforecast.models/__init__ imports every model)."""
    for package in ("neuralforecast", "neuralforecast.models"):
        if package not in sys.modules:
            spec = importlib.util.find_spec(package)
            if spec is None:
                _import(package)
            bare = types.ModuleType(package)
            bare.__path__ = list(spec.submodule_search_locations)
            sys.modules[package] = bare
    return _import(module)


class PyroVAE(nn.Module):
    """pyro's VAE tutorial (examples/vae), shrunk: module doc."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.ModuleDict(dict(fc1=nn.Linear(6, 16), fc21=nn.Linear(16, 2), fc22=nn.Linear(16, 2)))
        self.decoder = nn.ModuleDict(dict(fc1=nn.Linear(2, 16), fc21=nn.Linear(16, 6)))

    def encode(self, x):
        hidden = F.softplus(self.encoder["fc1"](x))
        return self.encoder["fc21"](hidden), torch.exp(self.encoder["fc22"](hidden))

    def model(self, x):
        pyro, dist = _import("pyro"), _import("pyro.distributions")
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("latent", dist.Normal(x.new_zeros(x.shape[0], 2), x.new_ones(x.shape[0], 2)).to_event(1))
            probs = torch.sigmoid(self.decoder["fc21"](F.softplus(self.decoder["fc1"](z))))
            pyro.sample("obs", dist.Bernoulli(probs, validate_args=False).to_event(1), obs=x)

    def guide(self, x):
        pyro, dist = _import("pyro"), _import("pyro.distributions")
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, scale = self.encode(x)
            pyro.sample("latent", dist.Normal(loc, scale).to_event(1))


def build(name: str) -> nn.Module:
    """The model `name` (module doc), with random weights from the current seed."""
    if name == "pyro_vae":
        return PyroVAE()
    if name.startswith("deepar"):
        deepar = _import("gluonts.torch.model.deepar.module")
        distributions = _import("gluonts.torch.distributions")
        head = distributions.NegativeBinomialOutput() if name == "deepar_nb" else distributions.StudentTOutput()
        return deepar.DeepARModel(freq="H", context_length=INPUT, prediction_length=HORIZON, num_layers=2,
                                  hidden_size=16, lags_seq=[1, 2, 4], distr_output=head, dropout_rate=0.0)
    losses = _neuralforecast("neuralforecast.losses.pytorch")
    stacks = dict(n_blocks=[1, 1, 1], mlp_units=[[16, 16]] * 3)
    if name == "nhits":
        return _neuralforecast("neuralforecast.models.nhits").NHITS(h=HORIZON, input_size=INPUT, random_seed=0, **stacks)
    if name == "nhits_t":
        return _neuralforecast("neuralforecast.models.nhits").NHITS(
            h=HORIZON, input_size=INPUT, random_seed=0, loss=losses.DistributionLoss("StudentT", level=[80]), **stacks)
    if name == "nbeats":
        return _neuralforecast("neuralforecast.models.nbeats").NBEATS(h=HORIZON, input_size=INPUT, random_seed=0,
                                                                      **stacks)
    if name == "mlp_mq":
        return _neuralforecast("neuralforecast.models.mlp").MLP(h=HORIZON, input_size=INPUT, num_layers=2,
                                                                hidden_size=16, random_seed=0,
                                                                loss=losses.MQLoss(level=[80, 90]))
    if name == "tft":
        return _neuralforecast("neuralforecast.models.tft").TFT(h=HORIZON, input_size=INPUT, hidden_size=8, n_head=2,
                                                                random_seed=0)
    return _neuralforecast("neuralforecast.models.patchtst").PatchTST(
        h=HORIZON, input_size=2 * INPUT, patch_len=4, stride=4, encoder_layers=1, hidden_size=16, n_heads=2,
        linear_hidden_size=16, random_seed=0)


def problem(name: str, model: nn.Module, dtype=torch.float32):
    """(loss(compiled model or `model` itself), M the loss's examples) for one batch of windows of a random walk."""
    g = torch.Generator().manual_seed(1)
    if name == "pyro_vae":
        pyro, elbo = _import("pyro"), _import("pyro.infer").Trace_ELBO()
        x = (torch.rand(32, 6, generator=g) > 0.5).to(dtype)

        def negative_elbo(m):
            pyro.clear_param_store()
            return elbo.differentiable_loss(m.model, m.guide, x)
        return negative_elbo, 32
    if name.startswith("deepar"):
        past = model._past_length
        level = (torch.randn(WINDOWS, past + HORIZON, generator=g, dtype=dtype).cumsum(1) * 0.3).exp() * 3
        target = level.round() if name == "deepar_nb" else level
        batch = dict(feat_static_cat=torch.zeros(WINDOWS, 1, dtype=torch.long),
                     feat_static_real=torch.ones(WINDOWS, 1, dtype=dtype),
                     past_time_feat=torch.randn(WINDOWS, past, 1, generator=g, dtype=dtype),
                     past_target=target[:, :past], past_observed_values=torch.ones(WINDOWS, past, dtype=dtype),
                     future_time_feat=torch.randn(WINDOWS, HORIZON, 1, generator=g, dtype=dtype),
                     future_target=target[:, past:], future_observed_values=torch.ones(WINDOWS, HORIZON, dtype=dtype))
        return (lambda m: m.loss(**batch).mean()), WINDOWS
    length = 2 * INPUT if name == "patchtst" else INPUT
    y = (torch.randn(WINDOWS, length + HORIZON, generator=g, dtype=dtype).cumsum(1) * 0.3).unsqueeze(-1)
    insample, outsample = y[:, :length], y[:, length:]
    windows_batch = dict(insample_y=insample, insample_mask=torch.ones_like(insample), futr_exog=None,
                         hist_exog=None, stat_exog=None)
    mask, loss = torch.ones_like(outsample), model.loss

    def training_step_loss(m):  # neuralforecast's BaseModel.training_step, from the model's call on
        output = loss.domain_map(m(windows_batch))
        if loss.is_distribution_output:
            return loss(y=outsample, distr_args=loss.scale_decouple(output=output, loc=None, scale=None), mask=mask)
        return loss(y=outsample, y_hat=output, y_insample=insample, mask=mask)

    return training_step_loss, WINDOWS


def settings(name: str, optimizer: str) -> tuple[str, dict]:
    """(kind, gnfx.compile's settings) of `optimizer` for `name`: DeepAR's training step is its `loss` method,
    the VAE's its `model` and `guide`."""
    kind, hparams = OPTIMIZERS[optimizer]
    return kind, ({**hparams, "methods": METHODS[name]} if name in METHODS and kind != "adamw" else hparams)


def factor_gaps(name: str, dtype: torch.dtype) -> str:
    """'A Δ, S Δ (M m, n Linear)': the first statistic step's K-FAC factors of every Linear block against hooks."""
    torch.manual_seed(0)
    model = build(name).to(dtype)
    reference = copy.deepcopy(model)
    loss_of, _ = problem(name, model, dtype)
    kind, hparams = settings(name, "kfac_lr")
    c = gnfx.compile(model, kind, **hparams, stat_every=1, stat_decay=0.0)
    modules = dict(reference.named_modules())
    torch.manual_seed(7)
    loss_of(c).backward()
    linear = [b.name for b in c.layers.blocks if isinstance(modules.get(b.name), nn.Linear)]
    torch.manual_seed(7)
    with hooked_calls(reference, linear) as records:
        problem(name, reference, dtype)[0](reference).backward()
    c.step()
    a_gap = s_gap = 0.0
    rows = set()
    for n, calls in records.items():
        A, s_sum = linear_factors(calls, modules[n].bias is not None)
        stats = c.statistics(n)
        a_gap = max(a_gap, ((stats["A"] - A).abs().max() / stats["A"].abs().max()).item())
        m = (stats["S"].trace() / s_sum.trace()).item()  # gnfx's S = M Σ g gᵀ: its M
        rows.add(f"{m:.4g}")
        s_gap = max(s_gap, ((stats["S"] - m * s_sum).abs().max() / stats["S"].abs().max()).item())
    return f"A {a_gap:.0e}, S {s_gap:.0e} (M {'/'.join(sorted(rows))}, {len(records)} Linear)"


def exactness(name: str, kind: str, hparams: dict) -> str:
    """'loss Δ, grad Δ; A Δ, S Δ (M, Linear blocks)' in float64 (module doc)."""
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model = build(name).double()
        reference = copy.deepcopy(model)
        loss_of, _ = problem(name, model, torch.float64)
        c = gnfx.compile(model, kind, **hparams)
        loss_gap, grad_gap = lockstep_gaps(c, model, reference, lambda m, _: loss_of(m), 3, seed=100)
        return f"{loss_gap:.0e}, {grad_gap:.0e}; {factor_gaps(name, torch.float64)}"
    finally:
        torch.set_default_dtype(torch.float32)


def probe(name: str, optimizer: str, steps: int) -> str:
    """One table row: `optimizer` (OPTIMIZERS) for `steps` steps of `name` on one batch."""
    kind, hparams = settings(name, optimizer)

    def made():
        model = build(name).train()
        return model, problem(name, model)[0]

    return one_batch_row(name, optimizer, kind, hparams, steps, lambda: exactness(name, kind, hparams), made,
                         widths=(160, 300, 500), digits=4)


def main() -> None:
    probe_main(__doc__, "benchmarks.fcast_probe", probe, {"models": list(MODELS), "optimizers": list(OPTIMIZERS)},
               ["| model | optimizer | capture | in blocks | exact: loss, grad (float64); A, S vs hooks | losses | "
                "outside the blocks | gnfx's warnings | error | s |", "|---|---|---|---|---|---|---|---|---|---|"],
               steps=4, timeout=300)


if __name__ == "__main__":
    main()
