"""The models the benchmark tasks train: an MLP, a deep autoencoder, a small CNN and a small GPT.

Every model is a plain `nn.Module` built from `nn.Linear`, `nn.Conv2d`, `nn.Embedding` and
`nn.LayerNorm`, so that gnfx can capture it. `GPT` is public for reuse by the examples.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn


def mlp(sizes: list[int], activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Linear layers of the given sizes with `activation` between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(sizes, sizes[1:])):
        if i:
            layers.append(activation())
        layers.append(nn.Linear(d_in, d_out))
    return nn.Sequential(*layers)


def cnn(channels: tuple[int, ...] = (16, 32), classes: int = 10) -> nn.Sequential:
    """A CNN for 1x8x8 images: 3x3 convolutions with ReLU, a 2x2 max-pool, then a linear head."""
    layers: list[nn.Module] = []
    for c_in, c_out in zip((1, *channels), channels):
        layers += [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1), nn.ReLU()]
    layers += [nn.MaxPool2d(2), nn.Flatten(), nn.Linear(channels[-1] * 4 * 4, classes)]
    return nn.Sequential(*layers)


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """The sizes of a `GPT`."""

    vocab_size: int
    context: int = 64
    n_layer: int = 2
    d_model: int = 64
    n_head: int = 4


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate q, k, v projections."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        d = config.d_model
        self.n_head = config.n_head
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def heads(z: torch.Tensor) -> torch.Tensor:
            return z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2)

        y = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """A pre-LayerNorm transformer block: attention, then a GELU MLP, each with a residual."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        d = config.d_model
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A GPT-style language model with learned positions and a tied unembedding.

    Maps token ids (batch, time) to logits (batch, time, vocab); the LM head's weight is the
    token embedding's weight.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.context, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))
