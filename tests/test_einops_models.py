"""A model written with einops as lucidrains' vit-pytorch and x-transformers write theirs.

einops is no dependency of gnfx: this file skips without it. Each pattern it puts together has a
stand-in without einops that CI runs (the torch ops einops writes):
  * `repeat(P, '... d -> b ... d', b=N)` of a (k, d) class token, `P.unsqueeze(0).expand(N, -1, -1)`:
    tests/test_first_contact.py, test_class_tokens_expanded_to_the_batch_...;
  * `x += P[:n]` with n = every row, `aten.add_(x, aten.alias(P))` in torch.export's graph:
    tests/test_layer_kinds.py, test_position_statistics_... (every-row and in-place cases);
  * the in-place sum on a block's output: tests/test_reliability.py, test_in_place_ops_...;
  * x-transformers' norms, `F.layer_norm(x) * (γ + 0.)`: tests/test_layer_kinds.py, the offset scales;
  * talking heads, `einsum('b h i j, h g -> b g i j', attn, W)`: tests/test_models.py, the channels-first
    einsum form.
torch.fx cannot trace einops' functions (einops refuses its Proxy: "Tensor type unknown to einops"), so
gnfx captures the model with torch.export, which traces them into aten views.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx

einops = pytest.importorskip("einops")
from einops import rearrange, repeat  # noqa: E402
from einops.layers.torch import Rearrange  # noqa: E402

DTYPE = torch.float64


class TinyViT(nn.Module):
    """vit-pytorch's ViT in small: an einops patch embedding, a (1, d) class token repeated to the batch,
    a table added in place, an x-transformers norm, attention split into heads with rearrange, talking
    heads over the attention weights, the head on the class token."""

    def __init__(self, d=8, heads=2, patch=2):
        super().__init__()
        torch.manual_seed(0)
        self.heads = heads
        self.patches = nn.Sequential(Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch, p2=patch),
                                     nn.LayerNorm(3 * patch * patch), nn.Linear(3 * patch * patch, d))
        self.cls_token, self.pos_embedding = nn.Parameter(torch.randn(1, d)), nn.Parameter(torch.randn(5, d))
        self.ln, self.gamma = nn.LayerNorm(d, elementwise_affine=False), nn.Parameter(1 + 0.5 * torch.randn(d))
        self.qkv, self.out = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d)
        self.mix_heads = nn.Parameter(torch.eye(heads) + 0.3 * torch.randn(heads, heads))
        self.head = nn.Linear(d, 3)
        self.to(DTYPE)

    def forward(self, img):
        x = self.patches(img)
        b, n, _ = x.shape
        x = torch.cat((repeat(self.cls_token, "... d -> b ... d", b=b), x), dim=1)
        x += self.pos_embedding[:n + 1]
        h = self.ln(x) * (self.gamma + 0.0)
        q, k, v = map(lambda t: rearrange(t, "b n (h d) -> b h n d", h=self.heads), self.qkv(h).chunk(3, dim=-1))
        attn = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)
        attn = torch.einsum("b h i j, h g -> b g i j", attn, self.mix_heads)
        x = x + self.out(rearrange(attn @ v, "b h n d -> b n (h d)"))
        return self.head(x[:, 0])


def test_an_einops_vit_is_captured_whole_exact_and_every_parameter_in_its_block():
    model = TinyViT()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, 4, 4, generator=g, dtype=DTYPE), torch.randint(0, 3, (6,), generator=g)
    c = gnfx.compile(model, "kfac", lr=1e-3, stat_every=1)
    out = c(x)
    torch.testing.assert_close(out, reference(x), rtol=0, atol=0)
    F.cross_entropy(out, y).backward()
    F.cross_entropy(reference(x), y).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-13, atol=1e-15, msg=name)
    c.step()
    assert c.layers.form == "export" and not c.layers.fallbacks, c.layers.fallbacks
    kinds = {param: c.layers.block_of(param).kind for param in ("cls_token", "pos_embedding", "gamma", "mix_heads")}
    assert kinds == {"cls_token": "position", "pos_embedding": "position", "gamma": "scale", "mix_heads": "linear"}
    for block in c.layers:  # every block's statistics recorded, the patch linear's before the in-place sum too
        assert torch.isfinite(c.statistics(block.name)["S"]).all(), block.name
