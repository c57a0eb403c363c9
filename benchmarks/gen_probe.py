"""First contact with generative-model training libraries: k-diffusion, torchcfm and normflows, called as their users
call them.

    PYTHONPATH=<k_diffusion, torchcfm, normflows>:<dctorch, POT>:<stubs>:/tmp/tvshim:/tmp/tv:<torchdiffeq>:. \
        OMP_NUM_THREADS=1 python -m benchmarks.gen_probe [--models kd_inner nf_maf] [--optimizers kfac kfac_lr] \
        [--steps 4] [--timeout 300] [--out probe.md]

benchmarks.child_rows' first contact (one model and optimizer per process, random weights, train mode, `--steps`
steps on one random batch) for:

- k-diffusion (Karras et al.'s preconditioned denoiser; its training script `train.py`: sigma from
  `K.utils.rand_log_normal(mean -1.2, std 1.2)`, `losses = model.loss(reals, noise, sigma)`, `loss = losses.mean()`,
  the optimizer over the inner model's parameters): the inner model `K.models.ImageDenoiserModelV1(c_in=3,
  feats_in=16, depths=[1, 1], channels=[16, 32], self_attn_depths=[False, True])` on 3x8x8 images, sigma_data 0.5.
  `kd_inner`: `K.Denoiser(gnfx.compile(inner), 0.5).loss(...)`: the wrapper scales the compiled model's input by
  c_in and computes the per-example losses mean((F - (x - c_skip x̃)/c_out)²) itself (Karras weighting: ones), so
  z, the compiled model's output, meets a mean squared error; `kd_softmin`: the same with
  `weighting="soft-min-snr"`, each example's loss weighted by (σ σ_d)²/(σ² + σ_d²)²; `kd_method`: the Denoiser
  compiled with `methods=["loss"]` and `compiled.loss(...)` called; `kd_forward`: the Denoiser compiled and called
  through its forward, D = c_skip x̃ + c_out F(c_in x̃), with Karras et al.'s loss λ(σ)·mean((D - x)²), λ = 1/c_out²
  (the same loss as model.loss's, of the c_out-scaled output);
- torchcfm (conditional flow matching; its README's loop, `t, xt, ut = FM.sample_location_and_conditional_flow(x0,
  x1)`, `loss = torch.mean((vt - ut) ** 2)`): `cfm_mlp`: `torchcfm.models.MLP(dim=2, time_varying=True, w=32)`
  called on `torch.cat([xt, t[:, None]], -1)`, ConditionalFlowMatcher(sigma=0); `cfm_ot`: the same with
  ExactOptimalTransportConditionalFlowMatcher (POT's exact OT plan re-pairs x0 and x1 each step); `cfm_unet`:
  `torchcfm.models.unet.UNetModel(dim=(1, 8, 8), num_channels=32, num_res_blocks=1)` called as `model(t, xt)`;
- normflows (`loss = model.forward_kld(x)`: the model returns its loss, a scalar, the log-dets summed in it):
  `nf_realnvp`: `nf.NormalizingFlow(DiagGaussian(2), [AffineCouplingBlock(MLP([1, 16, 16, 2])), Permute] x 4)` in a
  module whose forward returns `flow.forward_kld(x)`; `nf_realnvp_method`: the flow compiled with
  `methods=["forward_kld"]`; `nf_maf`: `[MaskedAffineAutoregressive(2, 16, num_blocks=2), LULinearPermute(2)] x 4`,
  forward_kld in a module (the MADE runs once per feature in the inverse direction forward_kld takes);
  `nf_actnorm`: nf_realnvp with an ActNorm after each block (Glow's data-dependent initialization: the first forward
  assigns its parameters' .data).

Optimizers: "kfac" at its defaults (with loss="mse" where the users' loss is a mean squared error of the compiled
model's output: kd_inner, kd_softmin, kd_forward and the torchcfm models; else without, at its default lr),
"kfac_lr" (lr 1e-3), "shampoo" and "auto" at lr 1e-3, and torch.optim.AdamW at lr 1e-3 ("adamw"). Per run: the
capture's form, the share of the trainable parameters in curvature blocks, exactness (the kfac_lr runs, float64,
cfm_unet's in float32 as torchcfm's timestep embedding computes:
the compiled model beside a second build from the same seed over 3 steps, the largest |difference| of the loss and
of any gradient; and the first step's K-FAC A and S of every nn.Linear block against forward and gradient hooks
on every call, benchmarks.hooked_calls, S = M Σ g gᵀ with M the examples N for a scalar output (forward_kld) or
per-example losses (Denoiser.loss under methods=), else the rows of z the mean runs over; largest gap relative to the
largest entry; the weights the libraries initialize to zero, k-diffusion's proj_out and normflows' last MLP layers, drawn
anew for this check, as every gradient before them would be zero), the losses,
gnfx's warnings and the parameters outside the blocks, the seconds; or the error. None of these libraries is a
dependency of gnfx. The results: benchmarks/results/first_contact_13_gen.md.
"""
from __future__ import annotations

import copy

import numpy
import torch
from torch import nn

import gnfx
from benchmarks.child_rows import library, one_batch_row, probe_main
from benchmarks.hooked_calls import hooked_calls, linear_factor_gap
from benchmarks.lockstep import float64_gaps, lockstep_gaps

BATCH, SIGMA_DATA = 8, 0.5
MODELS = ("kd_inner", "kd_softmin", "kd_method", "kd_forward", "cfm_mlp", "cfm_ot", "cfm_unet", "nf_realnvp",
          "nf_realnvp_method", "nf_maf", "nf_actnorm")
MSE = ("kd_inner", "kd_softmin", "kd_forward", "cfm_mlp", "cfm_ot", "cfm_unet")  # kfac's loss="mse" at its defaults
METHODS = {"kd_method": ["loss"], "nf_realnvp_method": ["forward_kld"]}
OPTIMIZERS = {"kfac": ("kfac", None), "kfac_lr": ("kfac", {"lr": 1e-3}), "shampoo": ("shampoo", {"lr": 1e-3}),
              "auto": ("auto", {"lr": 1e-3}), "adamw": ("adamw", {"lr": 1e-3})}  # adamw: torch.optim's


def _import(name: str):
    return library("benchmarks.gen_probe", name)


class ForwardKLD(nn.Module):
    """A normflows flow whose forward returns its loss, `flow.forward_kld(x)` (a scalar)."""

    def __init__(self, flow: nn.Module):
        super().__init__()
        self.flow = flow

    def forward(self, x):
        return self.flow.forward_kld(x)


def _flow(name: str) -> nn.Module:
    nf = _import("normflows")
    layers = []
    for _ in range(4):
        if name == "nf_maf":
            layers += [nf.flows.MaskedAffineAutoregressive(2, 16, num_blocks=2), nf.flows.LULinearPermute(2)]
        else:
            layers += [nf.flows.AffineCouplingBlock(nf.nets.MLP([1, 16, 16, 2], init_zeros=True)),
                       nf.flows.Permute(2, mode="swap")] + ([nf.flows.ActNorm(2)] if name == "nf_actnorm" else [])
    return nf.NormalizingFlow(nf.distributions.base.DiagGaussian(2), layers)


def build(name: str) -> nn.Module:
    """The module `name` compiles (module doc), with random weights from the current seed."""
    if name.startswith("kd_"):
        K = _import("k_diffusion")
        inner = K.models.ImageDenoiserModelV1(c_in=3, feats_in=16, depths=[1, 1], channels=[16, 32],
                                              self_attn_depths=[False, True])
        return inner if name in ("kd_inner", "kd_softmin") else K.Denoiser(inner, SIGMA_DATA)
    if name == "cfm_unet":
        unet = _import("torchcfm.models.unet")
        return unet.UNetModel(dim=(1, 8, 8), num_channels=32, num_res_blocks=1, channel_mult=(1, 2),
                              attention_resolutions="4", num_heads=2)
    if name.startswith("cfm_"):
        return _import("torchcfm.models").MLP(dim=2, time_varying=True, w=32)
    flow = _flow(name)
    return flow if name == "nf_realnvp_method" else ForwardKLD(flow)


def problem(name: str):
    """(batch, loss(compiled or plain module, batch), M: the hooks' reference S's scale, None for the rows of z)."""
    g = torch.Generator().manual_seed(1)
    dtype = torch.get_default_dtype()
    if name.startswith("kd_"):
        K = _import("k_diffusion")
        reals = torch.randn(BATCH, 3, 8, 8, generator=g, dtype=dtype)

        def kd_loss(m, x):  # noise and sigma drawn from the global random state, as train.py does
            noise, sigma = torch.randn_like(x), K.utils.rand_log_normal([len(x)], -1.2, 1.2, dtype=x.dtype)
            if name == "kd_method":
                return m.loss(x, noise, sigma).mean()
            if name == "kd_forward":
                c_skip, c_out, c_in = [K.utils.append_dims(s, x.ndim) for s in K.Denoiser(None, SIGMA_DATA)
                                       .get_scalings(sigma)]
                denoised = m(x + noise * K.utils.append_dims(sigma, x.ndim), sigma)
                return (((denoised - x) ** 2).flatten(1).mean(1) / c_out.flatten() ** 2).mean()
            weighting = "soft-min-snr" if name == "kd_softmin" else "karras"
            return K.Denoiser(m, SIGMA_DATA, weighting=weighting).loss(x, noise, sigma).mean()
        return reals, kd_loss, BATCH if name == "kd_method" else None  # the method's output: per-example losses
    if name.startswith("cfm_"):
        torchcfm = _import("torchcfm")
        shape = (BATCH, 1, 8, 8) if name == "cfm_unet" else (64, 2)
        x1 = 0.3 * torch.randn(*shape, generator=g, dtype=dtype) + 1
        matcher = (torchcfm.ExactOptimalTransportConditionalFlowMatcher if name == "cfm_ot"
                   else torchcfm.ConditionalFlowMatcher)(sigma=0.0)

        def cfm_loss(m, x1):  # numpy seeded from torch's generator: the OT plan's pairs are np.random.choice's draws
            numpy.random.seed(int(torch.randint(2 ** 31, ())))
            t, xt, ut = matcher.sample_location_and_conditional_flow(torch.randn_like(x1), x1)
            vt = m(t, xt) if name == "cfm_unet" else m(torch.cat([xt, t[:, None]], dim=-1))
            return torch.mean((vt - ut) ** 2)
        return x1, cfm_loss, None
    x = torch.randn(64, 2, generator=g, dtype=dtype) @ torch.tensor([[1.0, 0.5], [0.0, 0.3]], dtype=dtype)
    if name == "nf_realnvp_method":
        return x, lambda m, b: m.forward_kld(b), len(x)
    return x, lambda m, b: m(b), len(x)


def settings(name: str, optimizer: str) -> tuple[str, dict]:
    kind, hparams = OPTIMIZERS[optimizer]
    if hparams is None:  # kfac at its defaults: with the users' loss where gnfx models it
        hparams = {"loss": "mse"} if name in MSE else {}
    if kind != "adamw" and name in METHODS:
        hparams = {**hparams, "methods": METHODS[name]}
    return kind, hparams


def factor_gaps(name: str, hparams: dict) -> str:
    """The largest gap of the first step's A and S of the nn.Linear blocks against hooks, relative to the largest
    entry (module doc), in the default dtype (float64 under float64_gaps)."""
    torch.manual_seed(0)
    model = build(name)
    with torch.no_grad():  # k-diffusion's proj_out and normflows' last MLP layers start at zero, and so would every
        for p in model.parameters():  # gradient before them: S compared as 0 = 0; drawn anew for this check
            if p.dim() >= 2 and not p.any():
                p.normal_(0.0, 0.1)
    reference = copy.deepcopy(model)
    batch, loss_of, m = problem(name)
    c = gnfx.compile(model, "kfac", stat_decay=0.0, stat_every=1, **hparams)
    linears = [n for n, mod in reference.named_modules() if isinstance(mod, nn.Linear)]  # MADE's MaskedLinear too
    at_z = {}
    torch.manual_seed(7)
    with hooked_calls(reference, linears) as calls:
        handle = getattr(reference, "inner_model", reference).register_forward_hook(  # z: F's output under .loss
            lambda _, i, out: out.register_hook(lambda g: at_z.update(z=g)) and None if out.dim() else None)
        loss_of(reference, batch).backward()
        handle.remove()
    torch.manual_seed(7)
    loss_of(c, batch).backward()
    c.step()
    if m is None:  # the rows of z the mean runs over
        z_grad = at_z["z"]
        m = int(z_grad.reshape(-1, z_grad.shape[-1]).ne(0).any(1).sum())
    return linear_factor_gap(c, calls, m)


def exactness(name: str, kind: str, hparams: dict) -> str:
    """'loss Δ, grad Δ; A, S Δ' (module doc)."""
    def loss_for(_):
        batch, loss_of, _ = problem(name)
        return lambda m: loss_of(m, batch)
    if name == "cfm_unet":  # torchcfm's timestep_embedding computes in float32 whatever the model's dtype: float32
        torch.manual_seed(0)
        model = build(name)
        torch.manual_seed(0)
        reference, loss_of = build(name), loss_for(None)
        gaps = lockstep_gaps(gnfx.compile(model, kind, **hparams), model, reference, lambda m, _: loss_of(m), 3, 100)
        return f"{gaps[0]:.0e}, {gaps[1]:.0e} (float32); {factor_gaps(name, hparams)}"
    return float64_gaps(lambda: build(name), loss_for, kind, hparams, also=lambda: factor_gaps(name, hparams))


def probe(name: str, optimizer: str, steps: int) -> str:
    kind, hparams = settings(name, optimizer)

    def made():
        model = build(name)
        batch, loss_of, _ = problem(name)
        return model, lambda c: loss_of(c, batch)
    return one_batch_row(name, optimizer, kind, hparams, steps, lambda: exactness(name, kind, hparams), made)


def main() -> None:
    probe_main(__doc__, "benchmarks.gen_probe", probe, {"models": list(MODELS), "optimizers": list(OPTIMIZERS)},
               ["| model | optimizer | capture | in blocks | exact: loss, grad (float64); A, S | losses | "
                "outside the blocks | gnfx's warnings | error | s |", "|---|---|---|---|---|---|---|---|---|---|"],
               steps=4, timeout=300)


if __name__ == "__main__":
    main()
