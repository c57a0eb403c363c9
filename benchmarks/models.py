"""The models the benchmark tasks train: an MLP, a deep autoencoder, a small CNN and a small GPT; and a
ResNet-18 and a VGG-11 with batch norms for 32x32 images (benchmarks/big_factors.py).

Every model is a plain `nn.Module` built from `nn.Linear`, `nn.Conv2d`, `nn.Embedding`,
`nn.LayerNorm` and `nn.BatchNorm2d`, so that gnfx can capture it. `GPT` is public for reuse by the examples.
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


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convolutions with batch norms, and the identity (or a strided 1x1
    convolution with a batch norm where the shape changes) added before the last ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


def resnet18(classes: int = 10, channels: tuple[int, ...] = (64, 128, 256, 512)) -> nn.Sequential:
    """ResNet-18 for 32x32 images (as torchvision's resnet18, with CIFAR's stem: a 3x3 convolution of
    stride 1 and no max-pool): two BasicBlocks per width, each later width starting with stride 2,
    global average pooling and a linear head. Its last 3x3 convolutions have 512 input channels: an
    A factor of 4608 entries."""
    layers: list[nn.Module] = [nn.Conv2d(3, channels[0], 3, padding=1, bias=False), nn.BatchNorm2d(channels[0]),
                               nn.ReLU()]
    c_in = channels[0]
    for i, c in enumerate(channels):
        layers += [BasicBlock(c_in, c, stride=1 if i == 0 else 2), BasicBlock(c, c)]
        c_in = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, classes)]
    return nn.Sequential(*layers)


VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")  # torchvision's configuration "A"


def vgg11_bn(classes: int = 10, channels: tuple = VGG11, hidden: int = 4096) -> nn.Sequential:
    """torchvision's vgg11_bn: 3x3 convolutions (padding 1) each with a batch norm and a ReLU, 2x2
    max-pools ("M"), an adaptive average pool to 7x7, and the classifier Linear(C·7·7, hidden), ReLU,
    Dropout, Linear(hidden, hidden), ReLU, Dropout, Linear(hidden, classes). At 32x32 the features are
    512x1x1, repeated 49 times by the pool: the first linear layer is Linear(25088, 4096), whose A has
    25089 entries, and it sees one row per example."""
    layers: list[nn.Module] = []
    c_in = 3
    for c in channels:
        if c == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
            c_in = c
    layers += [nn.AdaptiveAvgPool2d(7), nn.Flatten(),
               nn.Linear(c_in * 7 * 7, hidden), nn.ReLU(), nn.Dropout(),
               nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(), nn.Linear(hidden, classes)]
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
