"""First contact with lucidrains' single-author model libraries, called as their users call them.

    PYTHONPATH=<torchvision shim>:<torchvision>:<einops>:<einx, loguru, frozendict, torch-einops-utils>:<the libraries>:\
        <accelerate, ema-pytorch, local-attention, axial-positional-embedding>:. OMP_NUM_THREADS=1 \
        python -m benchmarks.lucid_probe [--models vq performer] [--optimizers kfac kfac_lr] [--steps 4] [--out probe.md]

benchmarks.family_probe's first contact (one model and optimizer per process, random weights, train mode,
`--steps` steps on one random batch) for:

- vector-quantize-pytorch 1.32.0, each quantizer between a small convolutional encoder and decoder (a VQ-VAE on
  8 random 3x16x16 images, the codes a (b, 64, 16) sequence), loss `mse(recon, x) + aux` with the quantizer's
  returned auxiliary loss: `vq` (VectorQuantize, codebook 32, EMA decay 0.8: the codebook and its EMA
  statistics are buffers written inside the forward in training mode, the straight-through
  `x + (q - x).detach()`, the commitment loss returned beside the output), `rvq` (ResidualVQ, 3 quantizers),
  `fsq` (FSQ levels [8, 5, 5, 5], its projections in and out), `lfq` (LFQ, 256 codes, entropy loss 0.1);
- denoising-diffusion-pytorch 2.3.4: `ddpm`, GaussianDiffusion(Unet(dim 8, dim_mults (1, 2))) on 4 random 3x16x16
  images, 50 steps: the forward draws the time steps and the noise and returns the loss itself;
- perceiver-pytorch 0.11.0: `perceiver`, a Perceiver classifier on 8x8x3 inputs (16 latents of 32, depth 2),
  cross-entropy;
- nGPT-pytorch 0.2.16: `ngpt`, nGPT (256 tokens, dim 64, depth 2), `model(x, return_loss=True)`: every weight
  l2-normalised by a torch parametrization. (Its modules define `__eq__` without `__hash__`, which torch 2.13's
  `named_children` refuses with "unhashable type: 'NormLinear'" without gnfx; the probe gives them
  nn.Module's hash);
- performer-pytorch 1.1.4: `performer`, PerformerLM (256 tokens, dim 64, depth 2, causal, 16 random features),
  next-token cross-entropy: its ProjectionUpdater holds the layer stack a second time and counts the calls in a
  buffer it branches on;
- hyper-connections 0.4.11: `hyper`, an MLP classifier whose 2 residual branches are wrapped by
  `get_init_and_expand_reduce_stream_functions(4)`;
- rotary-embedding-torch 0.9.1: `rotary`, a one-block causal attention language model whose queries and keys
  `RotaryEmbedding(16).rotate_queries_or_keys` (its frequency cache a buffer written in the forward).

Optimizers: "kfac" (lr 1e-3: no model here has a loss gnfx's loss= models beside its auxiliary terms), "kfac_lr"
(the same, with the exactness cells), "shampoo" and "diag" at lr 1e-3, and torch.optim.AdamW at lr 1e-3
("adamw"). Exactness (kfac_lr): float64, the compiled model beside a second build from the same seed, the random
draws reseeded alike, 3 steps: the largest |difference| of the loss and of any gradient (benchmarks.lockstep);
and the first step's K-FAC A and S of every linear block against plain hooks on every call
(benchmarks.hooked_calls; S = M Σ g gᵀ, M read off as gnfx's S over the hooks' Σ g gᵀ at its largest entry in the
first block, printed, and held for every block: the factors exact up to the one scalar M gnfx takes for the loss).
None of these libraries is a dependency of gnfx. The results:
benchmarks/results/first_contact_12_lucid.md.
"""
from __future__ import annotations

import copy
import sys

import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from benchmarks.child_rows import library, probe_main, problem_row
from benchmarks.hooked_calls import hooked_calls, linear_factor_gap, linear_factors
from benchmarks.lockstep import float64_gaps

QUANTIZERS = ("vq", "rvq", "fsq", "lfq")
MODELS = (*QUANTIZERS, "ddpm", "perceiver", "ngpt", "performer", "hyper", "rotary")
OPTIMIZERS = {"kfac": ("kfac", {"lr": 1e-3}), "kfac_lr": ("kfac", {"lr": 1e-3}), "shampoo": ("shampoo", {"lr": 1e-3}),
              "diag": ("diag", {"lr": 1e-3}), "adamw": ("adamw", {"lr": 1e-3})}


def _import(name: str):
    return library("benchmarks.lucid_probe", name)


class VQVAE(nn.Module):
    """A convolutional encoder, the quantizer on the (b, h·w, d) codes, a decoder; returns (recon, aux loss)."""

    def __init__(self, quantizer: nn.Module, dim: int = 16):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, dim, 3, 1, 1))
        self.quantizer = quantizer
        self.dec = nn.Sequential(nn.ConvTranspose2d(dim, 16, 4, 2, 1), nn.ReLU(), nn.Conv2d(16, 3, 3, 1, 1))

    def forward(self, x):
        h = self.enc(x)
        b, d, side, _ = h.shape
        out = self.quantizer(h.flatten(2).transpose(1, 2))
        aux = out[2].sum() if len(out) > 2 else h.new_zeros(())
        return self.dec(out[0].transpose(1, 2).reshape(b, d, side, side)), aux


class HyperMLP(nn.Module):
    def __init__(self):
        super().__init__()
        init, self.expand, self.reduce = _import("hyper_connections").get_init_and_expand_reduce_stream_functions(4)
        self.emb = nn.Linear(8, 32)
        self.blocks = nn.ModuleList([init(dim=32, branch=nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 64), nn.GELU(),
                                                                      nn.Linear(64, 32))) for _ in range(2)])
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        h = self.expand(self.emb(x))
        for block in self.blocks:
            h = block(h)
        return self.head(self.reduce(h))


class RotaryLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.qkv = nn.Embedding(256, 64), nn.Linear(64, 192)
        self.out, self.head = nn.Linear(64, 64), nn.Linear(64, 256)
        self.rotary = _import("rotary_embedding_torch").RotaryEmbedding(dim=16)

    def forward(self, x):
        h = self.emb(x)
        q, k, v = self.qkv(h).unflatten(-1, (3, 4, 16)).permute(2, 0, 3, 1, 4)
        q, k = self.rotary.rotate_queries_or_keys(q), self.rotary.rotate_queries_or_keys(k)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(h + self.out(o.transpose(1, 2).flatten(2)))


def build(name: str) -> nn.Module:
    """The model `name` (module doc), with random weights from the current seed."""
    if name in QUANTIZERS:
        vqp = _import("vector_quantize_pytorch")
        return VQVAE({"vq": lambda: vqp.VectorQuantize(dim=16, codebook_size=32, decay=0.8, commitment_weight=1.0),
                      "rvq": lambda: vqp.ResidualVQ(dim=16, num_quantizers=3, codebook_size=32),
                      "fsq": lambda: vqp.FSQ(levels=[8, 5, 5, 5], dim=16),
                      "lfq": lambda: vqp.LFQ(codebook_size=256, dim=16, entropy_loss_weight=0.1, diversity_gamma=1.0),
                      }[name]())
    if name == "ddpm":
        ddp = _import("denoising_diffusion_pytorch")
        unet = ddp.Unet(dim=8, dim_mults=(1, 2), flash_attn=False, attn_dim_head=8, attn_heads=2)
        return ddp.GaussianDiffusion(unet, image_size=16, timesteps=50)
    if name == "perceiver":
        return _import("perceiver_pytorch").Perceiver(
            input_channels=3, input_axis=2, num_freq_bands=4, max_freq=8.0, depth=2, num_latents=16, latent_dim=32,
            cross_heads=1, latent_heads=4, cross_dim_head=16, latent_dim_head=16, num_classes=10, self_per_cross_attn=1)
    if name == "ngpt":
        _import("nGPT_pytorch")
        for v in vars(sys.modules["nGPT_pytorch.nGPT"]).values():  # nGPT's own bug on torch 2.13 (module doc)
            if isinstance(v, type) and issubclass(v, nn.Module) and "__eq__" in vars(v):
                v.__hash__ = nn.Module.__hash__
        return sys.modules["nGPT_pytorch.nGPT"].nGPT(num_tokens=256, dim=64, depth=2, dim_head=16, heads=4)
    if name == "performer":
        return _import("performer_pytorch").PerformerLM(num_tokens=256, max_seq_len=32, dim=64, depth=2, heads=4,
                                                         dim_head=16, causal=True, nb_features=16)
    return HyperMLP() if name == "hyper" else RotaryLM()


def problem(name: str, dtype=torch.float32):
    """(batch, loss(model, batch)) of `name` as its users train it (module doc)."""
    g = torch.Generator().manual_seed(1)
    if name in QUANTIZERS:
        x = torch.rand(8, 3, 16, 16, generator=g, dtype=dtype)

        def vae_loss(m, b):
            recon, aux = m(b)
            return F.mse_loss(recon, b) + aux
        return x, vae_loss
    if name == "ddpm":
        return torch.rand(4, 3, 16, 16, generator=g, dtype=dtype), lambda m, b: m(b)
    if name == "perceiver":
        batch = torch.randn(8, 8, 8, 3, generator=g, dtype=dtype), torch.randint(0, 10, (8,), generator=g)
        return batch, lambda m, b: F.cross_entropy(m(b[0]), b[1])
    if name == "hyper":
        batch = torch.randn(16, 8, generator=g, dtype=dtype), torch.randint(0, 10, (16,), generator=g)
        return batch, lambda m, b: F.cross_entropy(m(b[0]), b[1])
    tokens = torch.randint(0, 256, (4, 33), generator=g)
    if name == "ngpt":
        return tokens, lambda m, b: m(b, return_loss=True)
    return tokens, lambda m, b: F.cross_entropy(m(b[:, :-1]).transpose(1, 2), b[:, 1:])


def factor_gaps(name: str, hparams: dict) -> str:
    """The first step's A and S of the linear blocks against hooks (module doc), float64."""
    torch.manual_seed(0)
    model = build(name).double()
    reference = copy.deepcopy(model)
    batch, loss_of = problem(name, torch.float64)
    c = gnfx.compile(model, "kfac", stat_decay=0.0, stat_every=1, **hparams)
    linears = [n for n, mod in reference.named_modules() if isinstance(mod, nn.Linear)]
    torch.manual_seed(5)
    with hooked_calls(reference, linears) as calls:
        loss_of(reference, batch).backward()
    torch.manual_seed(5)
    loss_of(c, batch).backward()
    c.step()
    # the layers the backward reached through a call (nGPT's token embedding is a NormLinear read by indexing)
    calls = {name: records for name, records in calls.items() if any(g is not None for _, g in records)}
    blocks = [b.name for b in c.layers if b.name in calls]
    if not blocks:
        return "no linear block"
    # M: gnfx's S over the hooks' Σ g gᵀ at the latter's largest entry, of the first block (module doc)
    gg = linear_factors(calls[blocks[0]], c.layers[blocks[0]].bias is not None)[1]
    at = gg.abs().argmax()
    m = (c.statistics(blocks[0])["S"].flatten()[at] / gg.flatten()[at]).item()
    return f"M = {m:.4g}; {linear_factor_gap(c, calls, m)}"


def exactness(name: str, kind: str, hparams: dict) -> str:
    """'loss Δ, grad Δ; A, S Δ' (module doc)."""
    def loss_for(_):
        batch, loss_of = problem(name, torch.float64)
        return lambda m: loss_of(m, batch)
    return float64_gaps(lambda: build(name), loss_for, kind, hparams, also=lambda: factor_gaps(name, hparams))


def probe(name: str, optimizer: str, steps: int) -> str:
    """One table row: `optimizer` (OPTIMIZERS) for `steps` steps of `name` on one batch."""
    kind, hparams = OPTIMIZERS[optimizer]
    return problem_row(name, optimizer, kind, hparams, steps, build, problem, exactness,
                       widths=(160, 300, 500), digits=4)


def main() -> None:
    probe_main(__doc__, "benchmarks.lucid_probe", probe, {"models": list(MODELS), "optimizers": list(OPTIMIZERS)},
               ["| model | optimizer | capture | in blocks | exact: loss, grad (float64); A, S vs hooks | losses | "
                "outside the blocks | gnfx's warnings | error | s |", "|---|---|---|---|---|---|---|---|---|---|"],
               steps=4, timeout=300)


if __name__ == "__main__":
    main()
