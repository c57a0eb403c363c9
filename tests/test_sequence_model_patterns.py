"""Patterns of the state-space, recurrent and mixture-of-experts language models of Hugging Face
transformers 5 (benchmarks/hfseq_probe.py, benchmarks/results/first_contact_12_hfseq.md), each in a small
plain-torch stand-in."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from references import cross_entropy
from steps import compile_for_statistics, statistic_step, train

E, TOP, D, H, CLASSES = 4, 2, 6, 5, 3


class GatheredExperts(nn.Module):
    """A residual top-2 mixture of E experts as transformers' `experts_implementation="batched_mm"` computes
    it (integrations/moe.py, `batched_mm_experts_forward`): each (token, choice) pair takes its expert's
    matrix by indexing the stacked weights with the expert ids, `W[ids]` (S, d_out, d_in), and multiplies it
    by the token's column, `torch.bmm(W[ids], x.unsqueeze(-1)).squeeze(-1)`; stored (E, d_in, d_out)
    (`in_out`, gpt-oss's `is_transposed`): `torch.bmm(x.unsqueeze(1), W[ids]).squeeze(1)`. The last expert
    is never chosen (its logit lowered by 1e4). `records`: each product's input, ids and output (its
    gradient retained), in float64 for the reference."""

    def __init__(self, in_out=False):
        super().__init__()
        self.embed, self.router, self.head = nn.Linear(D, D), nn.Linear(D, E, bias=False), nn.Linear(D, CLASSES)
        self.up = nn.Parameter(0.5 * torch.randn(E, D, H) if in_out else 0.5 * torch.randn(E, H, D))
        self.down = nn.Parameter(0.5 * torch.randn(E, H, D) if in_out else 0.5 * torch.randn(E, D, H))
        self.in_out, self.records = in_out, None
        self.register_buffer("unused", torch.tensor([0.0] * (E - 1) + [1e4]))

    def product(self, x, w, ids):
        z = torch.bmm(x.unsqueeze(1), w[ids]).squeeze(1) if self.in_out else torch.bmm(w[ids], x.unsqueeze(-1)).squeeze(-1)
        if self.records is not None:
            z.retain_grad()
            self.records.append((x.detach(), ids, z))
        return z

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        tokens = h.reshape(-1, D)
        probability, chosen = torch.topk(F.softmax(self.router(tokens) - self.unused, -1), TOP)
        ids = chosen.reshape(-1)
        u = torch.tanh(self.product(tokens.repeat_interleave(TOP, 0), self.up, ids))
        y = self.product(u, self.down, ids) * probability.reshape(-1, 1)
        return self.head(h + y.reshape(-1, TOP, D).sum(1).reshape(h.shape))


def batch(n=4, t=3):
    torch.manual_seed(1)
    return torch.randn(n, t, D), torch.randint(0, CLASSES, (n, t))


def per_expert_factors(model, x, y):
    """{"up"/"down": (A, S)} in float64 from the products' recorded rows: A_e the mean of a aᵀ over the
    rows whose id is e (0 for none), S_e = M Σ g gᵀ over them, M = N·T the loss terms."""
    ref = type(model)(model.in_out).double()
    ref.load_state_dict(model.state_dict())
    ref.records = []
    cross_entropy(ref(x.double()), y).backward()
    out = {}
    for name, (a, ids, z) in zip(("up", "down"), ref.records):
        A, S = [], []
        for e in range(E):
            rows, g = a[ids == e], z.grad[ids == e]
            A.append(rows.T @ rows / max(len(rows), 1))
            S.append(y.numel() * g.T @ g)
        out[name] = torch.stack(A), torch.stack(S)
    return out


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("in_out", [False, True])
def test_experts_gathered_by_their_ids_are_one_block_with_per_expert_factors(in_out, capture):
    """`W[ids]` in a batched product (transformers' batched_mm experts) is a block of kind "experts": E groups
    whose A_e and S_e are those of the rows each id routes to (float64, against the recorded products), the
    unused expert's zero, and nothing falls back. Before: both stacked weights fell back ("used by
    call_function 'index.Tensor'"), 76% of this model's parameters on the diagonal preconditioner."""
    torch.manual_seed(0)
    model = GatheredExperts(in_out).double()
    x, y = batch()
    x = x.double()
    expected = per_expert_factors(model, x, y)
    c = compile_for_statistics(model, optimizer="kfac", capture=capture, statistics=("A", "S"), fisher="empirical")
    statistic_step(c, x, y)
    assert not c.layers.fallbacks, c.layers.fallbacks
    for name, (A, S) in expected.items():
        block = c.layers[name]
        assert block.kind == "experts" and block.shapes["A"] == A.shape and block.shapes["S"] == S.shape
        got = c.statistics(name)
        torch.testing.assert_close(got["A"], A, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got["S"], S, rtol=1e-10, atol=1e-12)
        assert not got["A"][-1].any() and not got["S"][-1].any()


def test_kfac_at_defaults_trains_experts_gathered_by_their_ids():
    """kfac with loss= and no lr (the quadratic step, the sampled Fisher's backward recording the ids with
    the experts' output gradients): 6 steps with the gathered experts as blocks take the loss down."""
    torch.manual_seed(0)
    model = GatheredExperts()
    x, y = batch()
    c = gnfx.compile(model, "kfac", loss="cross_entropy", capture="export")
    up = model.up.detach().clone()
    losses = train(c, x, y, cross_entropy, 6)
    assert c.layers["up"].kind == "experts" and not c.layers.fallbacks
    assert losses[-1] < 0.5 * losses[0] and not torch.equal(model.up, up), losses


class KeyCache:
    """A cache the model creates at each call and its layers append to (Reformer's `past_buckets_states` with
    use_cache=True, its default): no pytree, so a second run of a layer's forward on it sees the first's keys."""

    def __init__(self):
        self.keys = []


class Recomputed(torch.autograd.Function):
    """A residual layer whose backward recomputes its forward, as Reformer's `_ReversibleFunction`:
    y = x + tanh(layer(keys)) viewed as x, the keys the cached ones and x (the cache appended to: a cache
    met again holds more keys than x has positions, and the view fails, as Reformer's query-key product); its
    backward recomputes that and backpropagates through the recomputation with `torch.autograd.backward`, which
    accumulates the layer's parameter gradients itself (it returns None for them)."""

    @staticmethod
    def forward(ctx, x, layer, cache):
        keys = torch.cat(cache.keys + [x], 1)
        cache.keys.append(x.detach())
        ctx.layer = layer
        ctx.save_for_backward(x.detach(), keys.detach())
        return Recomputed.residual(x, keys, layer)

    @staticmethod
    def residual(x, keys, layer):
        return x + torch.tanh(layer(keys)).view(x.shape)

    @staticmethod
    def backward(ctx, grad):
        x, keys = ctx.saved_tensors
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            torch.autograd.backward(Recomputed.residual(x, x, ctx.layer), grad)
        return x.grad, None, None


class RecomputedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.layer, self.head = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, CLASSES)

    def forward(self, x):
        return self.head(torch.tanh(Recomputed.apply(torch.tanh(self.embed(x)), self.layer, KeyCache())))


def test_a_custom_function_whose_backward_accumulates_parameter_gradients_leaves_the_first_gradient_alone():
    """gnfx's check of a custom Function's backward against its forward's derivative (at capture) calls the
    backward, whose own `torch.autograd.backward` accumulates into the layer's parameter gradients: the check
    must leave them as they were. Before, the first step's gradient of `layer` held the check's random
    cotangent's gradient too (off by 100 times its size; Reformer: 18 against gradients of 0.13), silently."""
    torch.manual_seed(0)
    model = RecomputedModel().double()
    reference = RecomputedModel().double()
    reference.load_state_dict(model.state_dict())
    x, y = batch()
    c = gnfx.compile(model, "kfac", lr=1e-2)
    cross_entropy(c(x.double()), y).backward()
    cross_entropy(reference(x.double()), y).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14, msg=name)


def test_a_custom_function_that_appends_to_a_cache_argument_is_checked_on_a_copy_of_it():
    """The check of a custom Function runs its forward twice more (by its backward, by its operations) at each
    application: on copies of its arguments that are no tensor and no module (a cache), so that neither run
    sees the other's keys and the model's own run sees the cache as it was. Before: the second run met the
    first's keys, and the capture raised a RuntimeError of shapes inside the model (Reformer with use_cache=True,
    its default, at modeling_reformer.py's query-key product). Now it is captured by torch.export (the forward's
    operations, whose derivative the check finds the backward's) and kfac at its defaults trains."""
    torch.manual_seed(0)
    model = RecomputedModel()
    x, y = batch()
    c = gnfx.compile(model, "kfac", loss="cross_entropy")
    losses = train(c, x, y, cross_entropy, 4)
    assert c.layers.form == "export" and c.layers["layer"].kind == "linear"
    assert losses[-1] < losses[0], losses


class Reversible(torch.autograd.Function):
    """y = x + layer(x) computed under torch.no_grad, as Reformer's reversible layers compute their forward
    (they recompute it in their backward): its backward is layer's, its forward records no operations."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        ctx.save_for_backward(x.detach())
        with torch.no_grad():
            return x + layer(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            torch.autograd.backward(x + ctx.layer(x), grad)
        return x.grad, None


class ReversibleModel(RecomputedModel):
    def forward(self, x):
        return self.head(torch.tanh(Reversible.apply(torch.tanh(self.embed(x)), self.layer)))


def test_a_custom_function_whose_forward_records_nothing_is_named_for_that():
    """kfac at its defaults takes J v through a Function from its forward's operations; a forward under
    torch.no_grad has none: the GnfxError says so (before: "relative difference 1 of the two", as if its
    backward were another function's), and with lr= it trains with its own backward (torch.fx keeps F's call
    in the graph; `layer`, inside F, gets the diagonal preconditioner)."""
    torch.manual_seed(0)
    x, y = batch()
    c = gnfx.compile(ReversibleModel(), "kfac", loss="cross_entropy")
    cross_entropy(c(x), y).backward()
    with pytest.raises(gnfx.GnfxError, match="Reversible .*records no operations: it computes its outputs under "
                                             "torch.no_grad.*Fix: .*pass lr="):
        c.step()
    c = gnfx.compile(ReversibleModel(), "kfac", lr=0.05)
    losses = train(c, x, y, cross_entropy, 4)
    assert losses[-1] < losses[0], losses


class ReversibleBlock(torch.autograd.Function):
    """Reformer's `_ReversibleFunction` in small: its forward runs `block.layer` under torch.no_grad, its backward
    recomputes it, looking the layer up on the block again (`layer.backward_pass` calls `self.attention`)."""

    @staticmethod
    def forward(ctx, x, block):
        ctx.block = block
        ctx.save_for_backward(x.detach())
        with torch.no_grad():
            return x + block.layer(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            torch.autograd.backward(x + ctx.block.layer(x), grad)
        return x.grad, None


class ReversibleStack(nn.Module):
    """The reversible layer inside an opaque forward (a data-dependent branch), its layer opened into a block."""

    def __init__(self):
        super().__init__()
        self.embed, self.block, self.head = nn.Linear(D, D), nn.Module(), nn.Linear(D, CLASSES)
        self.block.layer = nn.Linear(D, D)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        if bool(h.abs().sum() < 0):
            h = -h
        return self.head(torch.tanh(ReversibleBlock.apply(h, self.block)))


def test_a_block_whose_gradient_comes_from_calls_the_taps_did_not_see_is_named():
    """Reformer's reversible layers: the opened layer's forward call ran under torch.no_grad (no gradient to tap),
    and its backward recomputed it on the original layer, which accumulated its gradient: its K-FAC block never
    got statistics and stepped with the plain gradient, silently. The statistic step now names it."""
    torch.manual_seed(0)
    x, y = batch()
    c = gnfx.compile(ReversibleStack(), "kfac", lr=0.05)
    with pytest.warns(RuntimeWarning, match=r"gradients of curvature blocks \(block\.layer\) came from calls of "
                                            r"their layers that the statistics did not see"):
        cross_entropy(c(x), y).backward()
        c.step()
    assert c.layers.form == "eager" and "block.layer" in [b.name for b in c.layers]
