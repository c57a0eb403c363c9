"""Small model definitions shared by the tests: a CNN, a ViT-style and a GPT-style model.

Nothing here imports gnfx. Every model is deterministic given its seed and small enough that a
few dozen float64 steps on two CPU cores take a second or two.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

DTYPE = torch.float64


# ----------------------------------------------------------------------------- CNN


class CNN(nn.Module):
    """conv → relu → max-pool → conv (stride 2) → relu → global average pool → linear."""

    def __init__(self, channels=3, width=8, classes=5, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.head = nn.Linear(2 * width, classes)
        self.to(DTYPE)

    def forward(self, x):
        h = F.max_pool2d(torch.relu(self.conv1(x)), 2)
        h = torch.relu(self.conv2(h))
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


# ----------------------------------------------------------------------------- attention forms


class SDPAttention(nn.Module):
    """Fused qkv projection, heads, F.scaled_dot_product_attention, output projection."""

    def __init__(self, d, heads, causal=False):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.view(n, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


def causal_mask(x):
    """The (T, T) boolean mask of the future (True above the diagonal) for x (N, T, ...), built
    from x with tensor ops only (`torch.ones(T, T)` from a traced size is not fx-traceable)."""
    return torch.ones_like(x[0, :, :1], dtype=torch.bool).expand(-1, x.shape[1]).triu(1)


class HandwrittenCausalAttention(nn.Module):
    """Separate q, k, v projections; softmax(q kᵀ / √d_h, future masked with masked_fill) v."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        n, t, d = x.shape
        h = self.heads
        q = self.q(x).view(n, t, h, d // h).transpose(1, 2)
        k = self.k(x).view(n, t, h, d // h).transpose(1, 2)
        v = self.v(x).view(n, t, h, d // h).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // h)
        scores = scores.masked_fill(causal_mask(x), float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(n, t, d))


class MHAttention(nn.Module):
    """nn.MultiheadAttention (self-attention, batch_first) with a boolean causal mask."""

    def __init__(self, d, heads, causal=True):
        super().__init__()
        self.causal = causal
        self.mha = nn.MultiheadAttention(d, heads, batch_first=True)

    def forward(self, x):
        mask = causal_mask(x) if self.causal else None
        return self.mha(x, x, x, attn_mask=mask, need_weights=False)[0]


def make_attention(kind, d, heads, causal=True):
    if kind == "sdpa":
        return SDPAttention(d, heads, causal)
    if kind == "handwritten":
        return HandwrittenCausalAttention(d, heads)
    if kind == "mha":
        return MHAttention(d, heads, causal)
    raise ValueError(kind)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d, heads, attention, causal=True):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = make_attention(attention, d, heads, causal)
        self.fc = nn.Linear(d, 4 * d)
        self.fc_out = nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


# ----------------------------------------------------------------------------- GPT


class GPT(nn.Module):
    """Token embedding + positional Parameter, one block per attention form (SDPA, hand-written
    with a causal mask, nn.MultiheadAttention), final LayerNorm, and an unembedding tied to the
    token embedding (`head.weight is emb.weight`). Output (N, T, V)."""

    def __init__(self, vocab=48, d=16, heads=2, max_len=8, attentions=("sdpa", "handwritten", "mha"), seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, d)
        nn.init.normal_(self.emb.weight, std=0.1)
        self.pos = nn.Parameter(0.02 * torch.randn(max_len, d))
        self.blocks = nn.ModuleList(Block(d, heads, a) for a in attentions)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight
        self.to(DTYPE)

    def forward(self, idx):
        t = idx.shape[1]
        x = self.emb(idx) + self.pos[:t]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


# ----------------------------------------------------------------------------- ViT


class ViT(nn.Module):
    """Patch embedding as a Conv2d with stride = patch size, a class token and positional
    Parameters, transformer blocks (non-causal), LayerNorm and a linear head on the class token."""

    def __init__(self, channels=3, image=8, patch=4, d=16, heads=2, depth=1, classes=5,
                 attention="mha", seed=0):
        super().__init__()
        torch.manual_seed(seed)
        tokens = (image // patch) ** 2 + 1
        self.patch = nn.Conv2d(channels, d, patch, stride=patch)
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, d))
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens, d))
        self.blocks = nn.ModuleList(Block(d, heads, attention, causal=False) for _ in range(depth))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)
        self.to(DTYPE)

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2)  # (N, patches, d)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], dim=1) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h)[:, 0])


# ----------------------------------------------------------------------------- helpers


class SquashedAffine(nn.Module):
    """z = x ⊙ sigmoid(w) + tanh(b): parameters that enter through nonlinearities, a use that is no
    layer gnfx models (both fall back to the diagonal preconditioner)."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))
        self.bias = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        return x * torch.sigmoid(self.weight) + torch.tanh(self.bias)


def coverage(c, model) -> float:
    """The fraction of trainable parameter entries that are in curvature blocks (tied
    parameters counted once, as named_parameters lists them)."""
    numel = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    covered = {n for b in c.layers for n in b.params}
    return sum(numel[n] for n in covered) / sum(numel.values())


class TanhMLP(nn.Module):
    """Linear layers of the given widths with tanh between them (the preconditioner tests' model)."""

    def __init__(self, widths=(5, 4, 3), bias=True):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(i, o, bias=bias) for i, o in zip(widths, widths[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return x



class GridSampled(nn.Module):
    """(N, 4) features as 2x2 images, resampled by F.grid_sample at four fixed points: an ATen
    operation (grid_sampler_2d) that reverse mode differentiates and forward mode cannot (torch 2.13)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("grid", torch.tensor([[[[-0.5, -0.5], [0.5, -0.3]], [[0.2, 0.6], [-0.4, 0.1]]]]))

    def forward(self, x):
        grid = self.grid.to(x.dtype).expand(len(x), -1, -1, -1)
        return F.grid_sample(x.reshape(-1, 1, 2, 2), grid, align_corners=False).flatten(1)
