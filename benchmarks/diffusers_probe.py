"""First contact with Hugging Face diffusers' models: tiny random-weight configs, trained as diffusers' users train them.

    PYTHONPATH=<diffusers>:<its deps>:. OMP_NUM_THREADS=1 python -m benchmarks.diffusers_probe \
        [--models unet2d dit] [--runs kfac shampoo] [--steps 3] [--timeout 600] [--out table.md]

Each model is built from a small config (no download: two resolutions, 16-64 channels, one layer per
block) and trained as diffusers' training scripts train it, on one random batch of 4 (the noise, the
timesteps and the conditioning drawn once): a UNet or a DiT predicts the noise that
`DDPMScheduler.add_noise` mixed into the sample, `F.mse_loss(model(noisy, t, ...).sample, noise)` (the
timesteps a tensor of ints, or one Python int; `return_dict=False` and its tuple; the DiT's learned
variance split off its output as DiT's script does); the VAE reconstructs its input, `vae(x).sample`,
or with its KL term through `vae.encode(x).latent_dist` and `vae.decode(z).sample`. Per run
(`--runs`), each model in a process of its own under `--timeout` seconds:

- exact: in float64, 2 kfac steps at lr 1e-3, each forward and backward of the compiled model against
  the original module at the same parameters and random state: the largest |difference| of the loss and
  of any gradient, and of the first step's K-FAC factors A and S of every nn.Linear block against hooks
  on the original module (relative to their largest entry);
- kfac at lr 1e-3 (the empirical Fisher), kfac with `loss="mse"` (the quadratic-model step at its
  defaults, `fisher="mc"`), shampoo and auto at lr 1e-3 with `loss="mse"`: `--steps` steps.

Per run: the capture's form (`print(model)` says why), the share of the trainable parameters in
curvature blocks, the losses, gnfx's warnings (once each), the seconds; or the error.

diffusers is no dependency of gnfx: unpack its wheel (and requests, importlib_metadata) on PYTHONPATH.
Results: benchmarks/results/first_contact_9_diffusers.md.
"""
from __future__ import annotations

import contextlib
import copy
import time
import warnings

import torch
import torch.nn.functional as F

import gnfx
from benchmarks.child_rows import probe_main
from benchmarks.hooked_calls import hooked_calls, linear_factors as hooked_linear_factors

BATCH = 4
RUNS = {"exact": dict(lr=1e-3), "kfac": dict(lr=1e-3), "kfac_mse": dict(loss="mse"),
        "shampoo": dict(lr=1e-3, loss="mse"), "auto": dict(lr=1e-3, loss="mse")}


def _unet2d():
    import diffusers
    return diffusers.UNet2DModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)


def _unet2d_condition():
    import diffusers
    return diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                          layers_per_block=1, norm_num_groups=8, cross_attention_dim=16,
                                          attention_head_dim=8,
                                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def _vae():
    import diffusers
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                                   down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                                   sample_size=16)


def _dit():
    import diffusers
    return diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                           num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
                                           norm_num_groups=8)


def _transformer2d():
    import diffusers
    return diffusers.Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=16, num_layers=1,
                                        norm_num_groups=8, cross_attention_dim=16)


def _unet1d():
    import diffusers
    return diffusers.UNet1DModel(sample_size=64, in_channels=2, out_channels=2, extra_in_channels=64,
                                 block_out_channels=(32, 32, 64), time_embedding_type="fourier",
                                 flip_sin_to_cos=True, use_timestep_embedding=False)


def _sd3():
    import diffusers
    return diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1,
                                           attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                           caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
                                           pos_embed_max_size=8)


def _pixart():
    import diffusers
    return diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                              out_channels=8, num_layers=1, cross_attention_dim=16, caption_channels=16,
                                              sample_size=8, patch_size=2)


class VAEWithPosterior(torch.nn.Module):
    """What a VAE's training script compiles to train through encode and decode: a forward that samples the
    posterior and decodes it, returning the reconstruction with the posterior's mean and log-variance."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x):
        posterior = self.vae.encode(x).latent_dist
        return self.vae.decode(posterior.sample()).sample, posterior.mean, posterior.logvar


def _vae_with_posterior():
    return VAEWithPosterior(_vae())


def _noised(g, shape, dtype):
    """(noisy sample, noise, timesteps): DDPM's forward process at random timesteps of 1000."""
    import diffusers
    sample, noise = torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype)
    t = torch.randint(0, 1000, (shape[0],), generator=g)
    return diffusers.DDPMScheduler(num_train_timesteps=1000).add_noise(sample, noise, t), noise, t


def ddpm_batch(shape):
    def batch(g, dtype):
        noisy, noise, t = _noised(g, shape, dtype)
        return dict(noisy=noisy, noise=noise, t=t)
    return batch


def conditioned_batch(shape):
    """ddpm_batch with text-encoder states (BATCH, 5 tokens, 16) to cross-attend to."""
    def batch(g, dtype):
        return dict(ddpm_batch(shape)(g, dtype), text=torch.randn(BATCH, 5, 16, generator=g, dtype=dtype))
    return batch


def class_batch(g, dtype):
    """DiT's latents (BATCH, 4, 8, 8) with a class label of 1000 each."""
    return dict(ddpm_batch((BATCH, 4, 8, 8))(g, dtype), y=torch.randint(0, 1000, (BATCH,), generator=g))


def flow_batch(g, dtype):
    """SD3's rectified flow: latents (BATCH, 4, 8, 8) at σ in (0, 1), x_σ = (1 - σ) x0 + σ noise, the
    timesteps 1000 σ (floats), the target noise - x0; text states (BATCH, 5, 16) and pooled (BATCH, 8)."""
    x0, noise = torch.randn(BATCH, 4, 8, 8, generator=g, dtype=dtype), torch.randn(BATCH, 4, 8, 8, generator=g, dtype=dtype)
    sigma = torch.rand(BATCH, generator=g, dtype=dtype)
    return dict(noisy=(1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise, t=1000 * sigma,
                target=noise - x0, text=torch.randn(BATCH, 5, 16, generator=g, dtype=dtype),
                pooled=torch.randn(BATCH, 8, generator=g, dtype=dtype))


def image_batch(g, dtype):
    return dict(x=torch.randn(BATCH, 3, 16, 16, generator=g, dtype=dtype))


def diffusion_loss(model, b):
    return F.mse_loss(model(b["noisy"], b["t"]).sample, b["noise"])


def diffusion_loss_int_timestep(model, b):
    """One timestep for the whole batch, a Python int (as a sampler's loop passes it)."""
    return F.mse_loss(model(b["noisy"], 500).sample, b["noise"])


def diffusion_loss_tuple(model, b):
    return F.mse_loss(model(b["noisy"], b["t"], return_dict=False)[0], b["noise"])


def conditioned_loss(model, b):
    return F.mse_loss(model(b["noisy"], b["t"], encoder_hidden_states=b["text"]).sample, b["noise"])


def transformer2d_loss(model, b):
    return F.mse_loss(model(b["noisy"], encoder_hidden_states=b["text"], timestep=b["t"]).sample, b["noise"])


def dit_loss(model, b):
    """DiT's script: the output's first C channels predict the noise, the others the variance (its own loss)."""
    out = model(b["noisy"], timestep=b["t"], class_labels=b["y"]).sample
    noise_pred, _variance = out.split(b["noise"].shape[1], dim=1)
    return F.mse_loss(noise_pred, b["noise"])


def flow_loss(model, b):
    out = model(b["noisy"], encoder_hidden_states=b["text"], pooled_projections=b["pooled"], timestep=b["t"]).sample
    return F.mse_loss(out, b["target"])


def pixart_loss(model, b):
    """PixArt's script: the learned variance split off as DiT's; no resolution conditioning (sample size 8)."""
    out = model(b["noisy"], encoder_hidden_states=b["text"], timestep=b["t"],
                added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    return F.mse_loss(out.split(b["noise"].shape[1], dim=1)[0], b["noise"])


def posterior_loss(model, b):
    """The reconstruction of a sampled latent plus 1e-6 of the posterior's KL to N(0, I), taken outside."""
    reconstruction, mean, logvar = model(b["x"])
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
    return F.mse_loss(reconstruction, b["x"]) + 1e-6 * kl


def reconstruction_loss(model, b):
    return F.mse_loss(model(b["x"]).sample, b["x"])


def vae_kl_loss(model, b):
    """diffusers' VAE fine-tuning: reconstruction of a sampled latent plus 1e-6 of the posterior's KL."""
    posterior = model.encode(b["x"]).latent_dist
    reconstruction = model.decode(posterior.sample(generator=torch.Generator().manual_seed(2))).sample
    return F.mse_loss(reconstruction, b["x"]) + 1e-6 * posterior.kl().mean()


# name: (builder, batch, loss, the call as its users write it)
MODELS = {
    "unet2d": (_unet2d, ddpm_batch((BATCH, 3, 16, 16)), diffusion_loss, "unet(noisy, t).sample, t (N,) ints"),
    "unet2d_int_t": (_unet2d, ddpm_batch((BATCH, 3, 16, 16)), diffusion_loss_int_timestep, "unet(noisy, 500).sample"),
    "unet2d_tuple": (_unet2d, ddpm_batch((BATCH, 3, 16, 16)), diffusion_loss_tuple,
                     "unet(noisy, t, return_dict=False)[0]"),
    "unet2d_condition": (_unet2d_condition, conditioned_batch((BATCH, 4, 8, 8)), conditioned_loss,
                         "unet(noisy, t, encoder_hidden_states=text).sample"),
    "transformer2d": (_transformer2d, conditioned_batch((BATCH, 16, 4, 4)), transformer2d_loss,
                      "model(noisy, encoder_hidden_states=text, timestep=t).sample"),
    "dit": (_dit, class_batch, dit_loss, "model(noisy, timestep=t, class_labels=y).sample, split"),
    "unet1d": (_unet1d, ddpm_batch((BATCH, 2, 64)), diffusion_loss, "unet(noisy, t).sample, (N, 2, 64)"),
    "sd3": (_sd3, flow_batch, flow_loss, "model(noisy, encoder_hidden_states, pooled_projections, timestep=1000σ)"
                                         ".sample, flow target"),
    "pixart": (_pixart, conditioned_batch((BATCH, 4, 8, 8)), pixart_loss,
               "model(noisy, encoder_hidden_states=text, timestep=t, added_cond_kwargs).sample, split"),
    "vae": (_vae, image_batch, reconstruction_loss, "vae(x).sample"),
    "vae_kl": (_vae, image_batch, vae_kl_loss, "vae.encode(x).latent_dist, vae.decode(z).sample, + KL"),
    "vae_kl_module": (_vae_with_posterior, image_batch, posterior_loss,
                      "a module whose forward encodes, samples, decodes: (reconstruction, mean, logvar), + KL"),
}


@contextlib.contextmanager
def recorded_linears(model: torch.nn.Module):
    """While inside: each nn.Linear call of `model` records its input a and its output's gradient g, and
    the gradient at the model's output z (its first tensor, `.sample`); yields ({name: [(a, g), ...]}, {"z": ∂L/∂z})."""
    at_z = {}
    handle = model.register_forward_hook(lambda m, i, out: out[0].register_hook(lambda g: at_z.update(z=g)) and None)
    try:
        with hooked_calls(model, [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]) as calls:
            yield calls, at_z
    finally:
        handle.remove()


def linear_factors(records, bias: bool, z_grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K-FAC's A = mean over positions of ā āᵀ (ā = [a, 1] with a bias) and S = M Σ g gᵀ of a linear layer's
    records, M the rows of z (N, ..., C) the loss's mean runs over: those with a nonzero gradient (docs/design.md §1)."""
    A, gg = hooked_linear_factors(records, bias)
    rows = int(z_grad.reshape(-1, z_grad.shape[-1]).ne(0).any(1).sum())
    return A, rows * gg


def exactness(name: str, steps: int = 2):
    """(the compiled model, the largest |difference| over `steps` kfac steps (float64) of the loss and of any
    gradient between the compiled model and the original module at the same parameters and the same
    random state, and of the first step's K-FAC factors A and S of the linear layers, relative to their
    largest entry, against forward and gradient hooks on the original module)."""
    build, make_batch, loss_of, _ = MODELS[name]
    torch.manual_seed(0)
    model = build().double()
    reference, b = copy.deepcopy(model), make_batch(torch.Generator().manual_seed(1), torch.float64)
    c = gnfx.compile(model, "kfac", stat_decay=0.0, **RUNS["exact"])  # statistics: the last batch's
    loss_gap = grad_gap = factor_gap = 0.0
    linears = {n: m for n, m in reference.named_modules() if isinstance(m, torch.nn.Linear)}
    for step in range(steps):
        torch.manual_seed(step)  # the same random draws (DiT's class-label dropout) in both forwards
        loss = loss_of(c, b)
        torch.manual_seed(step)
        with recorded_linears(reference) as (calls, at_z):
            loss_ref = loss_of(reference, b)
            loss.backward()
            loss_ref.backward()
        loss_gap = max(loss_gap, (loss - loss_ref).abs().item())
        for p, q in zip(model.parameters(), reference.parameters()):
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            h = q.grad if q.grad is not None else torch.zeros_like(q)
            grad_gap = max(grad_gap, (g - h).abs().max().item())
        c.step()
        blocks = [block.name for block in c.layers if block.name in linears] if step == 0 else []
        for block in blocks:
            for got, want in zip((c.statistics(block)["A"], c.statistics(block)["S"]),
                                 linear_factors(calls[block], linears[block].bias is not None, at_z["z"])):
                factor_gap = max(factor_gap, ((got - want).abs().max() / want.abs().max()).item())
        c.zero_grad()
        reference.zero_grad()
        reference.load_state_dict(model.state_dict())
    linear_blocks = len([block for block in c.layers if block.name in linears])
    return c, (f"loss {loss_gap:.1e}, gradients {grad_gap:.1e}, A and S of {linear_blocks} linear blocks "
               f"{factor_gap:.1e}")


def probe(name: str, run: str, steps: int) -> str:
    """One table row: `run` (RUNS) for `steps` steps on one batch of `name`, or its exactness."""
    start = time.time()
    build, make_batch, loss_of, _ = MODELS[name]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if run == "exact":
            c, losses = exactness(name)
        else:
            torch.manual_seed(0)
            model = build()
            b = make_batch(torch.Generator().manual_seed(1), torch.float32)
            c = gnfx.compile(model, run.removesuffix("_mse"), **RUNS[run])
            values = []
            for _ in range(steps):
                loss = loss_of(c, b)
                loss.backward()
                c.step()
                c.zero_grad()
                values.append(f"{loss.item():.3g}")
            losses = ", ".join(values)
    covered, total = c.layers.coverage(dict(c.named_parameters()))
    said = sorted({str(w.message)[:120].replace("|", "/") + "..." for w in caught if str(w.message).startswith("gnfx")})
    return f"| {name} | {run} | {c.layers.form} | {100 * covered / total:.1f}% | {losses} | {'; '.join(said) or '–'} | {time.time() - start:.0f} |"


def main() -> None:
    probe_main(__doc__, "benchmarks.diffusers_probe", probe, {"models": list(MODELS), "runs": list(RUNS)},
               ["| model | run | capture | in blocks | losses (exact: largest differences) | gnfx's warnings | s |",
                "|---|---|---|---|---|---|---|"], steps=3, timeout=600)


if __name__ == "__main__":
    main()
