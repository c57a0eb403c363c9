"""Stacked experts in a grouped matrix product (transformers 5's MoE layers): the layer kind "experts"
(passes/grouped_products.py, gnfx.layouts.experts), one K-FAC block of E per-expert factors whose rows
are the tokens the offsets route to each expert."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from references import cross_entropy
from steps import compile_for_statistics, statistic_step, step_beside

E, TOP, D, H, CLASSES = 5, 2, 8, 4, 3  # (the grouped product wants 16-byte strides: D, H multiples of 4)


class MoE(nn.Module):
    """A residual top-2 mixture of E experts as transformers 5 computes it: the (token, choice) pairs sorted
    by expert, `F.grouped_mm(x_sorted, W.transpose(-2, -1), offs=offsets)` with the stacked weights
    `up` (E, H, D) and `down` (E, D, H), weighted by the router's probabilities and summed back per token.
    The last expert is never chosen (its logit lowered by 1e4): an expert without rows. `in_out`: the
    weights stored (E, d_in, d_out) and used as stored, `F.grouped_mm(x_sorted, W, offs=offsets)`, as
    gpt-oss's. `written_out`: the same products as a loop over the experts' rows (float64), recording each
    product's input, offsets and output (its gradient retained) in `records`."""

    def __init__(self, written_out=False, in_out=False):
        super().__init__()
        self.embed, self.router, self.head = nn.Linear(D, D), nn.Linear(D, E, bias=False), nn.Linear(D, CLASSES)
        self.up = nn.Parameter(0.5 * torch.randn(E, D, H) if in_out else 0.5 * torch.randn(E, H, D))
        self.down = nn.Parameter(0.5 * torch.randn(E, H, D) if in_out else 0.5 * torch.randn(E, D, H))
        self.in_out = in_out
        self.register_buffer("unused", torch.tensor([0.0] * (E - 1) + [1e4]))
        self.written_out, self.records = written_out, []

    def product(self, x, w, offsets):
        if not self.written_out:
            return F.grouped_mm(x, w, offs=offsets)
        ends = offsets.tolist()
        z = torch.cat([x[start:end] @ w[e] for e, (start, end) in enumerate(zip([0] + ends[:-1], ends))])
        z.retain_grad()
        self.records.append((x.detach(), offsets, z))
        return z

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        tokens = h.reshape(-1, D)
        probability, chosen = torch.topk(F.softmax(self.router(tokens) - self.unused, -1), TOP)
        order = torch.argsort(chosen.reshape(-1), stable=True)
        token = order // TOP
        offsets = torch.cumsum(torch.bincount(chosen.reshape(-1), minlength=E), 0).to(torch.int32)
        up, down = (self.up, self.down) if self.in_out else (self.up.transpose(-2, -1), self.down.transpose(-2, -1))
        u = torch.tanh(self.product(tokens[token], up, offsets))
        y = self.product(u, down, offsets) * probability.reshape(-1)[order, None]
        return self.head(h + torch.zeros_like(tokens).index_add(0, token, y).reshape(h.shape))


def batch(n=4, t=3):
    torch.manual_seed(1)
    return torch.randn(n, t, D), torch.randint(0, CLASSES, (n, t))


def reference_factors(model, x, y):
    """{"up"/"down": (A, S)} in float64 from the written-out products: A_e the mean of a aᵀ over expert
    e's rows (0 for none), S_e = M Σ g gᵀ over them, M = N·T the loss terms."""
    ref = copy.deepcopy(model).double()
    ref.written_out = True
    cross_entropy(ref(x.double()), y).backward()
    out = {}
    for name, (a, offsets, z) in zip(("up", "down"), ref.records):
        ends = offsets.tolist()
        A, S = [], []
        for start, end in zip([0] + ends[:-1], ends):
            rows, g = a[start:end], z.grad[start:end]
            A.append(rows.T @ rows / max(end - start, 1))
            S.append(y.numel() * g.T @ g)
        out[name] = torch.stack(A), torch.stack(S)
    return out


@pytest.mark.parametrize("in_out", [False, True])
def test_stacked_experts_are_one_block_with_per_expert_factors_of_their_routed_rows(in_out):
    """`up` and `down` are blocks of kind "experts" (E groups, factors (E, ., .)), nothing falls back,
    and A_e, S_e equal the written-out float64 reference's (float32: torch's grouped product has no
    float64; torch.fx: torch.export's fake kernel of it takes bfloat16 only), the unused expert's A and
    S zero; with the weights stored (E, d_out, d_in) and read transposed, or stored (E, d_in, d_out)."""
    torch.manual_seed(0)
    model = MoE(in_out=in_out)
    x, y = batch()
    expected = reference_factors(model, x, y)
    c = compile_for_statistics(model, optimizer="kfac", capture="fx", statistics=("A", "S"))
    assert not c.layers.fallbacks, c.layers.fallbacks
    statistic_step(c, x, y)
    for name, (A, S) in expected.items():
        block = c.layers[name]
        assert block.kind == "experts" and block.shapes["A"] == A.shape and block.shapes["S"] == S.shape
        got = c.statistics(name)
        torch.testing.assert_close(got["A"].double(), A, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got["S"].double(), S, rtol=1e-4, atol=1e-6)
        assert not got["A"][-1].any() and not got["S"][-1].any()


@pytest.mark.parametrize("in_out", [False, True])
@pytest.mark.parametrize("optimizer", ["kfac", "shampoo"])
def test_kfac_and_shampoo_train_stacked_experts_with_the_modules_loss_and_gradients(optimizer, in_out):
    """With the experts as blocks (`up` and `down` of kind "experts", stored either way), 6 steps of kfac
    and shampoo: the compiled model's loss and parameter gradients equal, bit for bit, those of a plain
    copy of the module that takes the compiled model's parameters after each step, and the loss falls."""
    torch.manual_seed(0)
    model = MoE(in_out=in_out)
    reference = copy.deepcopy(model)
    x, y = batch()
    c = gnfx.compile(model, optimizer, lr=0.05, capture="fx", stat_every=1)
    assert [c.layers[name].kind for name in ("up", "down")] == ["experts", "experts"]
    losses = []
    for _ in range(6):
        loss, loss_ref = cross_entropy(c(x), y), cross_entropy(reference(x), y)
        assert torch.equal(loss, loss_ref)
        losses.append(loss.item())
        step_beside(c, model, reference, loss, loss_ref)
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("optimizer", ["ekfac", "rank1"])
def test_per_example_preconditioners_refuse_stacked_experts_with_the_reason(optimizer):
    """EKFAC's and rank1's statistics need each example's rows, which the tokens sorted by expert across
    the examples do not give: a ConfigError naming the block and the fix, not wrong statistics."""
    with pytest.raises(gnfx.ConfigError, match="'up' .*stacked experts.*per-example"):
        gnfx.compile(MoE(), optimizer, lr=1e-2, capture="fx")


def test_kfac_approx_reduce_uses_expand_on_stacked_experts_with_a_warning():
    """kfac_approx="reduce" sums each example's positions, which sorted tokens do not give: the experts'
    blocks warn and take "expand" (their factors those of the reference), the other blocks reduce."""
    torch.manual_seed(0)
    model = MoE()
    x, y = batch()
    expected = reference_factors(model, x, y)
    with pytest.warns(RuntimeWarning, match="stacked experts .*kfac_approx='expand'"):
        c = compile_for_statistics(model, optimizer="kfac", capture="fx", statistics=("A", "S"),
                                   kfac_approx="reduce")
    statistic_step(c, x, y)
    for name, (A, S) in expected.items():
        torch.testing.assert_close(c.statistics(name)["A"].double(), A, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(c.statistics(name)["S"].double(), S, rtol=1e-4, atol=1e-6)


def test_the_quadratic_step_of_kfac_goes_through_stacked_experts():
    """kfac with loss= and no lr (the quadratic step: its forward-mode product runs through the grouped
    product written out, gnfx.composite_forms; the true Fisher's backward records the offsets with the
    experts' output gradients): 6 steps with the experts as blocks take the loss from 1.08 to below 0.3."""
    torch.manual_seed(0)
    model = MoE()
    x, y = batch()
    c = gnfx.compile(model, "kfac", loss="cross_entropy", capture="fx")
    assert c.layers["up"].kind == "experts" and not c.layers.fallbacks
    up = model.up.detach().clone()
    losses = []
    for _ in range(6):
        loss = cross_entropy(c(x), y)
        loss.backward()
        c.step()
        c.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.3 < losses[0] and not torch.equal(model.up, up), losses


def test_experts_stored_in_out_step_as_those_stored_out_in():
    """The same MoE with its experts stored (E, d_in, d_out) (gpt-oss) and (E, d_out, d_in) (Mixtral, Qwen)
    at the same matrices: 3 kfac steps take both to the same parameters (the copying view
    "in_out_stacked" reads and writes back each expert's transpose)."""
    torch.manual_seed(0)
    out_in = MoE()
    in_out = MoE(in_out=True)
    in_out.load_state_dict({k: v.transpose(1, 2) if k in ("up", "down") else v for k, v in out_in.state_dict().items()})
    x, y = batch()
    up = out_in.up.detach().clone()
    for model in (out_in, in_out):
        c = gnfx.compile(model, "kfac", lr=0.05, capture="fx", stat_every=1)
        for _ in range(3):
            cross_entropy(c(x), y).backward()
            c.step()
            c.zero_grad()
        assert c.layers["up"].kind == "experts" and c.layers["down"].kind == "experts"
    assert (out_in.up - up).abs().max() > 1e-3
    for name in ("up", "down"):
        torch.testing.assert_close(getattr(in_out, name).transpose(1, 2), getattr(out_in, name), rtol=1e-5, atol=1e-6)


def test_blocked_expert_factors_are_the_diagonal_blocks_of_the_reference():
    """With max_factor=4 the factors of 8 entries (up's A, down's S) are kept as their two diagonal 4 x 4
    blocks per expert, (E, 2, 4, 4) (gnfx.layouts.base): those of the written-out reference's A_e and S_e
    (A_e's per-expert row count divides every block: it raised before, as (E, 1, 1) did not broadcast)."""
    torch.manual_seed(0)
    model = MoE()
    x, y = batch()
    expected = reference_factors(model, x, y)
    c = compile_for_statistics(model, optimizer="kfac", capture="fx", statistics=("A", "S"), max_factor=4)
    statistic_step(c, x, y)
    diagonal_blocks = lambda F: torch.stack([F[:, :4, :4], F[:, 4:, 4:]], 1)  # noqa: E731 - (E, 8, 8) -> (E, 2, 4, 4)
    for name, (A, S) in expected.items():
        got = c.statistics(name)
        A, S = (diagonal_blocks(F) if F.shape[-1] == 8 else F for F in (A, S))
        torch.testing.assert_close(got["A"].double(), A, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got["S"].double(), S, rtol=1e-4, atol=1e-6)
        assert got["A"].dim() + got["S"].dim() == 7  # one of the two blocked


def test_auto_does_not_offer_rank1_for_stacked_experts():
    """rank1 needs per-example gradients, which an experts block refuses (above): "auto" has no rank1
    candidate for it, so that no budget leads it to a choice that raises; a linear block keeps its."""
    from gnfx.cost import Geometry
    from gnfx.preconditioners.rank1 import RankK
    assert RankK.auto_candidates({}, Geometry((20, 8), "experts", groups=5)) == []
    assert len(RankK.auto_candidates({}, Geometry((20, 8), "linear"))) == 1


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_the_offsets_are_read_to_the_host_once_per_block_and_call(fisher, monkeypatch):
    """A statistic step reads each experts block's offsets to the host (a device synchronization on a
    GPU) once, though A's rows, S's and the sampled backward's (fisher="mc") all split by them: `up` and
    `down` take the same offsets, so two reads in all; a second statistic step, new offsets, two more."""
    torch.manual_seed(0)
    c = compile_for_statistics(MoE(), optimizer="kfac", capture="fx", statistics=("A", "S"), fisher=fisher,
                               loss="cross_entropy")
    x, y = batch()
    reads, tolist = [], torch.Tensor.tolist

    def counted(t):
        if t.dtype == torch.int32 and t.shape == (E,):
            reads.append(t)
        return tolist(t)

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    statistic_step(c, x, y)
    assert len(reads) == 2 and reads[0] is reads[1], len(reads)
    statistic_step(c, x, y)
    assert len(reads) == 4, len(reads)
