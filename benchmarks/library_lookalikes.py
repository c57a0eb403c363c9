"""Small look-alikes of model-library models, written from their code patterns (torchvision, timm,
transformers and peft are not installed here), for benchmarks/library_models.py.

Vision models take 1x8x8 images (the digits); the sequence models take token ids or, for the
Hugging Face ones, keyword arguments with the loss computed inside from `labels`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------- vision models (1x8x8 digits)

class ResNetGN(nn.Module):
    """timm's GroupNorm ResNet pattern: a stem, two basic blocks with GroupNorm (the second strided,
    with a 1x1 projection shortcut), average pooling and a linear head."""

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.GroupNorm(4, width), nn.ReLU())
        self.blocks = nn.ModuleList([self._block(width, width, 1), self._block(width, 2 * width, 2)])
        self.shortcuts = nn.ModuleList([nn.Identity(), nn.Sequential(nn.Conv2d(width, 2 * width, 1, 2, bias=False),
                                                                     nn.GroupNorm(4, 2 * width))])
        self.head = nn.Linear(2 * width, classes)

    @staticmethod
    def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.GroupNorm(4, c_out), nn.ReLU(),
                             nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.GroupNorm(4, c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block, shortcut in zip(self.blocks, self.shortcuts):
            x = F.relu(block(x) + shortcut(x))
        return self.head(x.mean((2, 3)))


class SqueezeExcite(nn.Module):
    """Squeeze-excitation: average pool, a 1x1 reduction, an activation, a 1x1 expansion, a gate."""

    def __init__(self, channels: int, gate: Callable[[torch.Tensor], torch.Tensor] = torch.sigmoid):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, channels // 4, 1)
        self.conv_expand = nn.Conv2d(channels // 4, channels, 1)
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.conv_expand(F.silu(self.conv_reduce(x.mean((2, 3), keepdim=True)))))


class MobileNet(nn.Module):
    """torchvision MobileNetV3's inverted residual: a strided stem with BatchNorm and hardswish, 1x1
    expansion, a depthwise 3x3, squeeze-excitation with a hard sigmoid, a 1x1 projection."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.expand = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.Hardswish())
        self.depthwise = nn.Sequential(nn.Conv2d(32, 32, 3, 2, 1, groups=32, bias=False), nn.BatchNorm2d(32),
                                       nn.Hardswish())
        self.se = SqueezeExcite(32, F.hardsigmoid)
        self.project = nn.Sequential(nn.Conv2d(32, 24, 1, bias=False), nn.BatchNorm2d(24))
        self.head = nn.Sequential(nn.Linear(24, 32), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(32, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project(self.se(self.depthwise(self.expand(self.stem(x)))))
        return self.head(x.mean((2, 3)))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """timm's DropPath: zero whole examples of a residual branch with probability p, scale the rest."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class MBConvConvNeXt(nn.Module):
    """timm's EfficientNet MBConv (BatchNorm, depthwise conv, squeeze-excitation, DropPath) then a
    ConvNeXt block (depthwise 7x7, channels-last LayerNorm, Linear MLP, layer scale γ, DropPath)."""

    def __init__(self, classes: int = 10, drop: float = 0.1):
        super().__init__()
        self.drop = drop
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.SiLU())
        self.pw = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.SiLU())
        self.dw = nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1, groups=32, bias=False), nn.BatchNorm2d(32), nn.SiLU())
        self.se = SqueezeExcite(32)
        self.pwl = nn.Sequential(nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.down = nn.Conv2d(16, 32, 2, 2)
        self.conv_dw = nn.Conv2d(32, 32, 7, padding=3, groups=32)
        self.norm = nn.LayerNorm(32, eps=1e-6)
        self.fc1 = nn.Linear(32, 128)
        self.fc2 = nn.Linear(128, 32)
        self.gamma = nn.Parameter(1e-1 * torch.ones(32))
        self.head_norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + drop_path(self.pwl(self.se(self.dw(self.pw(x)))), self.drop, self.training)
        x = self.down(x)
        h = self.conv_dw(x).permute(0, 2, 3, 1)
        h = self.fc2(F.gelu(self.fc1(self.norm(h)))).mul(self.gamma)
        x = x + drop_path(h.permute(0, 3, 1, 2), self.drop, self.training)
        return self.head(self.head_norm(x.mean((2, 3))))


class ViTBlock(nn.Module):
    """timm's pre-norm ViT block: fused qkv, scaled_dot_product_attention, a GELU MLP."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """timm's ViT: a 2x2 patch conv (16 patches of a digit), a class token concatenated, learned
    position embeddings added, two blocks, the head on the class token."""

    def __init__(self, d: int = 32, classes: int = 10):
        super().__init__()
        self.patch = nn.Conv2d(1, d, 2, 2)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, 17, d) * 0.02)
        self.blocks = nn.Sequential(ViTBlock(d, 4), ViTBlock(d, 4))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def window_partition(x: torch.Tensor, w: int) -> torch.Tensor:
    """(B, H, W, C) → (B·H/w·W/w, w², C) windows, as Swin's view/permute."""
    b, h, wd, c = x.shape
    return x.view(b, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, c)


def window_reverse(windows_: torch.Tensor, w: int, h: int, wd: int) -> torch.Tensor:
    """The inverse of window_partition."""
    c = windows_.shape[-1]
    x = windows_.view(-1, h // w, wd // w, w, w, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, wd, c)


class SwinBlock(nn.Module):
    """Swin's block: window attention with a relative position bias table indexed by a buffer, the
    windows shifted by torch.roll with an attention mask buffer when `shift` > 0, then an MLP."""

    def __init__(self, d: int, size: int, w: int, shift: int, heads: int = 2):
        super().__init__()
        self.size, self.w, self.shift, self.heads = size, w, shift, heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * w - 1) ** 2, heads) * 0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (w - 1)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * w - 1) + rel[..., 1], persistent=False)
        mask = None
        if shift:
            img = torch.zeros(1, size, size, 1)
            regions = (slice(0, -w), slice(-w, -shift), slice(-shift, None))
            for i, (hs, ws) in enumerate((hs, ws) for hs in regions for ws in regions):
                img[:, hs, ws, :] = i
            ids = window_partition(img, w).squeeze(-1)
            mask = (ids[:, None, :] != ids[:, :, None]).float() * -100.0
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.norm1(x).view(b, self.size, self.size, c)
        if self.shift:
            h = torch.roll(h, (-self.shift, -self.shift), (1, 2))
        win = window_partition(h, self.w)
        q, k, v = self.qkv(win).reshape(win.shape[0], -1, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(self.w ** 2, self.w ** 2, -1).permute(2, 0, 1).unsqueeze(0)
        if self.attn_mask is not None:
            nw = self.attn_mask.shape[0]
            attn = (attn.view(-1, nw, self.heads, self.w ** 2, self.w ** 2) + self.attn_mask[None, :, None]).flatten(0, 1)
        out = self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(win.shape[0], -1, c))
        h = window_reverse(out, self.w, self.size, self.size)
        if self.shift:
            h = torch.roll(h, (self.shift, self.shift), (1, 2))
        x = x + h.reshape(b, n, c)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Swin(nn.Module):
    """Swin: a patch conv of stride 1 (8x8 tokens of a digit), a window-4 block and a shifted one."""

    def __init__(self, d: int = 16, classes: int = 10):
        super().__init__()
        self.patch = nn.Conv2d(1, d, 1)
        self.norm0 = nn.LayerNorm(d)
        self.blocks = nn.Sequential(SwinBlock(d, 8, 4, 0), SwinBlock(d, 8, 4, 2))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm0(self.patch(x).flatten(2).transpose(1, 2))
        return self.head(self.norm(self.blocks(x)).mean(1))


class MoE(nn.Module):
    """A mixture of experts on flattened digits: a router's top-2 of 4 expert MLPs (topk, softmax of
    the chosen logits, index_select of each expert's rows, index_add of its weighted outputs)."""

    def __init__(self, d: int = 32, experts: int = 4, classes: int = 10):
        super().__init__()
        self.inp = nn.Linear(64, d)
        self.router = nn.Linear(d, experts)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
                                     for _ in range(experts))
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.inp(x.flatten(1)))
        weights, chosen = self.router(h).topk(2, dim=-1)
        weights = weights.softmax(-1)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(chosen == e)
            out = out.index_add(0, rows, expert(h.index_select(0, rows)) * weights[rows, slot, None])
        return self.head(h + out)


class LoraLinear(nn.Module):
    """PEFT's LoRA layer: a frozen base Linear plus B(A(dropout(x)))·α/r in ModuleDicts, B zero-initialized."""

    def __init__(self, base: nn.Linear, r: int = 4, alpha: float = 8.0):
        super().__init__()
        self.base_layer = base
        self.lora_dropout = nn.ModuleDict({"default": nn.Dropout(0.1)})
        self.lora_A = nn.ModuleDict({"default": nn.Linear(base.in_features, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, base.out_features, bias=False)})
        self.scaling = {"default": alpha / r}
        nn.init.kaiming_uniform_(self.lora_A["default"].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B["default"].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        for key in self.lora_A:
            out = out + self.lora_B[key](self.lora_A[key](self.lora_dropout[key](x))) * self.scaling[key]
        return out


def lora_mlp(classes: int = 10) -> nn.Sequential:
    """A random frozen MLP 64-64-64 with LoRA on its two layers and a trained head (PEFT's modules_to_save)."""
    base = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh())
    base.requires_grad_(False)
    base[1], base[3] = LoraLinear(base[1]), LoraLinear(base[3])
    return nn.Sequential(base, nn.Linear(64, classes))


class DCGAN(nn.Module):
    """A conv encoder to a code of 16, and DCGAN's decoder: a Linear to 32x2x2, ConvTranspose2d (4x4,
    stride 2) with BatchNorm and ReLU up to 8x8, tanh; reconstructs digits scaled to [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, 16, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(16, 32, 4, 2, 1),
                                     nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(128, 16))
        self.project = nn.Linear(16, 128)
        self.decoder = nn.Sequential(nn.ConvTranspose2d(32, 16, 4, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                     nn.ConvTranspose2d(16, 1, 4, 2, 1), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.project(self.encoder(x)).view(-1, 32, 2, 2))


# ---------------------------------------------------------------- sequence models

@dataclasses.dataclass
class ModelOutput:
    """Hugging Face's output object: the loss first, then the logits."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class Conv1D(nn.Module):
    """Hugging Face GPT-2's Conv1D: a Linear with its weight stored (in, out), applied by addmm on the
    flattened rows."""

    def __init__(self, n_out: int, n_in: int):
        super().__init__()
        self.n_out = n_out
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.02)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(x.size()[:-1] + (self.n_out,))


class GPT2Block(nn.Module):
    """GPT-2's block: fused Conv1D qkv, causal torch.where and the additive padding mask, dropout,
    a tanh-GELU Conv1D MLP."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = Conv1D(3 * d, d), Conv1D(d, d)
        self.c_fc, self.mlp_proj = Conv1D(4 * d, d), Conv1D(d, 4 * d)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, d // self.heads).permute(0, 2, 1, 3)
                   for z in self.c_attn(self.ln_1(x)).split(d, dim=2))
        w = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
        causal = torch.tril(torch.ones(t, t, dtype=torch.bool, device=x.device))
        w = torch.where(causal, w, torch.finfo(w.dtype).min) + mask
        o = (self.drop(w.softmax(-1)) @ v).permute(0, 2, 1, 3).reshape(b, t, d)
        x = x + self.c_proj(o)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT2LMHeadModel(nn.Module):
    """Hugging Face's GPT2LMHeadModel: `model(input_ids=, attention_mask=, labels=)` shifts the labels,
    ignores -100 and returns an output object with the loss; the head is tied to the token embedding."""

    def __init__(self, vocab: int, context: int, d: int = 32, heads: int = 2, layers: int = 2):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(context, d)
        nn.init.normal_(self.wte.weight, std=0.02)
        self.h = nn.ModuleList(GPT2Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> ModelOutput:
        t = input_ids.shape[1]
        x = self.wte(input_ids) + self.wpe(torch.arange(t, device=input_ids.device).unsqueeze(0))
        mask = torch.zeros((), dtype=x.dtype, device=x.device)
        if attention_mask is not None:
            mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for block in self.h:
            x = block(x, mask)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return ModelOutput(loss, logits)


class RMSNorm(nn.Module):
    """Llama's RMSNorm: x / rms(x) · weight."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Llama's rotate_half of RoPE."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LlamaBlock(nn.Module):
    """Llama's decoder layer: RMSNorm, q/k/v/o without bias, RoPE on q and k, causal SDPA, SwiGLU."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(d), RMSNorm(d)
        self.q_proj, self.k_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.v_proj, self.o_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.gate_proj, self.up_proj = nn.Linear(d, 2 * d, bias=False), nn.Linear(d, 2 * d, bias=False)
        self.down_proj = nn.Linear(2 * d, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.input_layernorm(x)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for z in (self.q_proj(h), self.k_proj(h), self.v_proj(h)))
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.o_proj(a)
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Llama(nn.Module):
    """A Llama-like causal LM mapping token ids to logits (no tied head, no positions but RoPE)."""

    def __init__(self, vocab: int, d: int = 32, heads: int = 2, layers: int = 2):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(LlamaBlock(d, heads) for _ in range(layers))
        self.norm = RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        half = d // heads // 2
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(half) / half), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        angles = torch.arange(ids.shape[1], device=ids.device)[:, None] * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


class BertLayer(nn.Module):
    """BERT's post-norm layer: q/k/v projections, the extended additive mask, dropout, a GELU MLP."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value, self.out = (nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(d, eps=1e-12), nn.LayerNorm(d, eps=1e-12)
        self.intermediate, self.output = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor, extended_mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, d // self.heads).permute(0, 2, 1, 3)
                   for z in (self.query(x), self.key(x), self.value(x)))
        p = self.drop((q @ k.transpose(-1, -2) / math.sqrt(d // self.heads) + extended_mask).softmax(-1))
        x = self.ln1(x + self.drop(self.out((p @ v).permute(0, 2, 1, 3).reshape(b, t, d))))
        return self.ln2(x + self.drop(self.output(F.gelu(self.intermediate(x)))))


class BertForSequenceClassification(nn.Module):
    """BERT: word, position (a buffer of position ids) and token-type embeddings, LayerNorm, layers,
    a tanh pooler on token 0, a classifier; `model(**batch)` with the loss inside from `labels`."""

    def __init__(self, vocab: int, context: int, classes: int, d: int = 32, heads: int = 2, layers: int = 2):
        super().__init__()
        self.word = nn.Embedding(vocab, d, padding_idx=0)
        self.position = nn.Embedding(context, d)
        self.token_type = nn.Embedding(2, d)
        self.ln = nn.LayerNorm(d, eps=1e-12)
        self.layers = nn.ModuleList(BertLayer(d, heads) for _ in range(layers))
        self.pooler, self.classifier = nn.Linear(d, d), nn.Linear(d, classes)
        self.drop = nn.Dropout(0.1)
        self.register_buffer("position_ids", torch.arange(context).expand((1, -1)), persistent=False)
        self.classes = classes

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
                labels: torch.Tensor | None = None) -> ModelOutput:
        x = self.word(input_ids) + self.token_type(token_type_ids) + self.position(self.position_ids[:, :input_ids.shape[1]])
        x = self.drop(self.ln(x))
        extended = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for layer in self.layers:
            x = layer(x, extended)
        logits = self.classifier(self.drop(torch.tanh(self.pooler(x[:, 0]))))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ModelOutput(loss, logits)


class Wav2Vec2(nn.Module):
    """wav2vec2's pattern: a strided Conv1d feature extractor, a projection, the positional grouped
    Conv1d under `parametrizations.weight_norm(dim=2)` added, LayerNorm, a head on the mean frame."""

    def __init__(self, d: int = 16, classes: int = 5):
        super().__init__()
        self.feature = nn.Conv1d(1, d, 10, 5)
        self.proj = nn.Linear(d, d)
        conv = nn.Conv1d(d, d, 5, padding=2, groups=4)
        self.pos_conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(F.gelu(self.feature(x.unsqueeze(1))).transpose(1, 2))
        h = self.ln(h + F.gelu(self.pos_conv(h.transpose(1, 2))).transpose(1, 2))
        return self.head(h.mean(1))
