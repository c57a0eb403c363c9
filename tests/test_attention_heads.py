"""Per-head K-FAC blocks for attention projections (attention_blocks="head")."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from gnfx.preconditioners.kfac import KFAC

torch.set_default_dtype(torch.float32)


class SelfAttention(nn.Module):
    def __init__(self, d=8, heads=2):
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))
        self.heads = heads

    def forward(self, x):
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.out(y.transpose(1, 2).flatten(2))


def trained(**hp):
    torch.manual_seed(0)
    model = SelfAttention().double()
    c = gnfx.compile(model, "kfac", stat_every=1, stat_decay=0.0, inv_every=1, kl_clip=0.0, momentum=0.0, **hp)
    x = torch.randn(4, 5, 8, dtype=torch.float64)
    (c(x) ** 2).mean().backward()
    c.step()
    return c


def test_projection_inverses_are_block_diagonal_over_heads_and_equal_per_head_inverses():
    c = trained(attention_blocks="head", heads=2, damping=1e-2)
    pre = c.optimizer.curvature[0]
    for group in pre.groups:
        state = pre.group_state(group)
        for i, piece in enumerate(group.pieces):
            block = piece.target.block
            S_inv = state["S_inv"][i]
            if block.role in ("attention.q", "attention.k", "attention.v"):
                S = c.statistics(block.name)["S"]
                A = c.statistics(block.name)["A"]
                pi = ((A.diagonal().mean()) / (torch.block_diag(S[:4, :4], S[4:, 4:]).diagonal().mean())).sqrt()
                lam_S = 1e-2 ** 0.5 / pi
                expected = torch.block_diag(*(torch.linalg.inv(S[h:h + 4, h:h + 4] + lam_S * torch.eye(4, dtype=S.dtype))
                                              for h in (0, 4)))
                torch.testing.assert_close(S_inv, expected, rtol=1e-8, atol=1e-10)
            else:  # the output projection keeps its whole S
                assert S_inv[:4, 4:].abs().max() > 0


def test_head_blocks_need_the_number_of_heads_and_a_divisible_width():
    with pytest.raises(gnfx.ConfigError, match="heads="):
        trained(attention_blocks="head")
    with pytest.raises(gnfx.ConfigError, match="not divisible"):
        trained(attention_blocks="head", heads=3)
    with pytest.raises(gnfx.ConfigError, match="max_factor"):  # S of 8 outputs already cut into blocks of 4
        trained(attention_blocks="head", heads=2, max_factor=4)
    assert "attention_blocks" in KFAC.HPARAMS and "attention_blocks" not in gnfx.REGISTRY["ekfac"].HPARAMS


def test_few_cost_rows_bound_the_factors_but_not_below_the_heads_of_a_projection():
    # at one row per call site K-FAC's factor_bound would cut every factor of 8 (9 with the bias) into
    # blocks of 4 (gnfx.preconditioners.kfac); a q/k/v projection's S, restricted to its heads, stays whole
    c = trained(attention_blocks="head", heads=2, cost_rows=1)
    bounds = {b.role: b.max_factor for b in c.layers}
    assert bounds == {"attention.q": 8, "attention.k": 8, "attention.v": 8, "attention.out": 4}
