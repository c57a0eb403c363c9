"""nn.EmbeddingBag under forward mode: its written-out form (gnfx.composite_forms.composite_embedding_bag).

torch's `_embedding_bag` kernel has no forward-mode derivative; while the forward-mode passes run
(the quadratic-model step, gnfx.ggn) torch.embedding_bag is the gather of W's rows and the per-bag
sum, mean or max. The written-out output equals the kernel's for every mode and option
(hypothesis), its tangents J v equal J v from the kernel's reverse mode (the Jacobian of the
kernel, one vector-Jacobian product per output entry, applied to v), and so K-FAC at its defaults
(the quadratic step) trains a bag-of-words classifier and gnfx.ggn's products equal dense
references. Everything in float64: the written-out form sums in another order than the kernel,
so values agree to round-off, 1e-12 on O(1) entries.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.autograd.functional import jacobian
from torch.func import jvp

import gnfx
from gnfx.composite_forms import composite_embedding_bag
from gnfx.passes.embedding import BAG
from tests.test_ggn import flat, reference_ggn, reference_hessian

DTYPE = torch.float64
TOL = dict(rtol=1e-12, atol=1e-12)

# torch's first forward-mode call loads jvp decompositions through the deprecated torch.jit.script.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


@st.composite
def bags(draw):
    """F.embedding_bag's arguments: (input, W, keyword arguments), for a 1-D input with offsets (bags of
    0-4 entries, include_last_offset or not) or a 2-D input (bags of one length), each mode,
    per-sample weights (mode 'sum'), padding_idx (None, or a row counted from either end)."""
    rows, dim = draw(st.integers(1, 6)), draw(st.integers(1, 3))
    mode = draw(st.sampled_from(["sum", "mean", "max"]))
    two_d = draw(st.booleans())
    if two_d:
        sizes = [draw(st.integers(1, 4))] * draw(st.integers(1, 4))
    else:
        sizes = draw(st.lists(st.integers(0, 4), min_size=1, max_size=5))
    entries = sum(sizes)
    indices = torch.tensor(draw(st.lists(st.integers(0, rows - 1), min_size=entries, max_size=entries)),
                           dtype=torch.long)
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    weight = torch.randn(rows, dim, generator=generator, dtype=DTYPE)
    options = {"mode": mode, "padding_idx": draw(st.one_of(st.none(), st.integers(-rows, rows - 1))),
               "scale_grad_by_freq": mode != "max" and draw(st.booleans())}
    if mode == "sum" and draw(st.booleans()):
        options["per_sample_weights"] = torch.randn(entries, generator=generator, dtype=DTYPE)
    if two_d:
        indices = indices.reshape(len(sizes), sizes[0])
        if "per_sample_weights" in options:
            options["per_sample_weights"] = options["per_sample_weights"].reshape(indices.shape)
    else:
        starts = torch.tensor([0] + sizes, dtype=torch.long).cumsum(0)
        options["include_last_offset"] = draw(st.booleans())
        options["offsets"] = starts if options["include_last_offset"] else starts[:-1]
    return indices, weight, options


def written_out_bag(indices, weight, options):
    with composite_embedding_bag():
        return F.embedding_bag(indices, weight, **options)


@settings(max_examples=80, deadline=None, derandomize=True, database=None)
@given(bags())
def test_written_out_form_equals_the_kernel(case):
    indices, weight, options = case
    torch.testing.assert_close(written_out_bag(indices, weight, options), F.embedding_bag(indices, weight, **options),
                               **TOL)


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(bags())
def test_tangents_equal_the_kernels_reverse_mode(case):
    """J v of the written-out form (forward mode, torch.func.jvp) with respect to W and the
    per-sample weights equals J v with J built row by row from the kernel's backward. Without
    scale_grad_by_freq, which scales only the kernel's gradient (not a derivative of its output)."""
    indices, weight, options = case
    options = {**options, "scale_grad_by_freq": False}
    sample = options.pop("per_sample_weights", None)
    primals = (weight,) if sample is None else (weight, sample)
    tangents = tuple(torch.randn_like(p) for p in primals)

    def bag(weight, sample=None):
        return F.embedding_bag(indices, weight, **options, **({} if sample is None else {"per_sample_weights": sample}))

    with composite_embedding_bag():
        _, forward = jvp(bag, primals, tangents)
    jacobians = jacobian(bag, primals)  # reverse mode: one vjp of the kernel per output entry
    reverse = sum(J.reshape(forward.numel(), -1) @ v.reshape(-1) for J, v in zip(jacobians, tangents))
    torch.testing.assert_close(forward.reshape(-1), reverse, rtol=1e-10, atol=1e-10)


def test_nested_contexts_put_back_the_outer_form():
    kernel = torch.embedding_bag
    with composite_embedding_bag():
        outer = torch.embedding_bag
        with composite_embedding_bag():
            pass
        assert torch.embedding_bag is outer
    assert torch.embedding_bag is kernel


def test_invalid_offsets_raise_as_the_kernel_does():
    weight, indices = torch.randn(4, 2, dtype=DTYPE), torch.tensor([0, 1, 2])
    with pytest.raises(RuntimeError, match=r"offsets\[0\] has to be 0"):
        F.embedding_bag(indices, weight, torch.tensor([1]))
    with pytest.raises(RuntimeError, match=r"offsets\[0\] has to be 0"):
        written_out_bag(indices, weight, {"offsets": torch.tensor([1])})


class BagOfWords(nn.Module):
    """Token ids and bag offsets to class logits through a mean bag of embeddings."""

    def __init__(self, vocab=10, dim=4, hidden=64, classes=4, mode="mean"):
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab, dim, mode=mode, padding_idx=0)
        self.hidden = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden, classes)

    def forward(self, ids, offsets=None):
        return self.out(torch.tanh(self.hidden(self.bag(ids, offsets))))


def bag_batch(seed=0, vocab=10, bags=16, classes=4):
    """Bags of 0-5 tokens (0 the padding) whose class is their first token's, 0 for an empty bag."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 6, (bags,), generator=g)
    ids = torch.randint(0, vocab, (int(sizes.sum()),), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)[:-1]])
    first = torch.where(sizes > 0, ids[offsets.clamp(max=len(ids) - 1)], 0)
    return ids, offsets, first % classes


@pytest.mark.parametrize("optimizer", ["kfac", "ekfac"])
def test_kfac_at_its_defaults_trains_a_bag_of_words_classifier(optimizer):
    """optimizer='kfac'/'ekfac' with loss= and no lr: the quadratic-model step, whose forward-mode
    passes go through the bag (the kernel raised there: 'an operation that has none'). No warning
    (the bag falls back to the diagonal preconditioner; the linear layers hold over 90%)."""
    torch.manual_seed(0)
    model = BagOfWords().to(DTYPE)
    ids, offsets, y = bag_batch()
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = gnfx.compile(model, optimizer=optimizer, loss="cross_entropy")
        for _ in range(6):
            loss = F.cross_entropy(c(ids, offsets), y)
            loss.backward()
            c.step()
            c.zero_grad()
            losses.append(loss.item())
    assert c.optimizer.quadratic is not None
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_ggn_products_through_a_bag_equal_dense_references(mode):
    """gnfx.ggn.ggn_vp and fisher_vp (the same for cross-entropy) equal Jᵀ H J with J from the
    kernel's reverse mode; hvp equals the Hessian of the same model written with nn.Embedding and a
    sum, mean or max over the bag (2-D input: bags of one length), which torch differentiates twice."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.EmbeddingBag(7, 3, mode=mode), nn.Tanh(), nn.Linear(3, 3)).to(DTYPE)
    ids, y = torch.randint(0, 7, (5, 4)), torch.randint(0, 3, (5,))
    v = [torch.randn_like(p) for p in model.parameters()]
    expected = reference_ggn(model, "cross_entropy", ids, y) @ flat(v)
    for product in (gnfx.ggn.ggn_vp, gnfx.ggn.fisher_vp):
        torch.testing.assert_close(flat(product(model, "cross_entropy", ids, y, v)), expected, rtol=1e-10,
                                   atol=1e-10)

    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding, self.head = nn.Embedding(7, 3), model[2]
            self.embedding.weight = model[0].weight

        def forward(self, ids):
            rows = self.embedding(ids)
            bag = rows.amax(1) if mode == "max" else rows.sum(1) if mode == "sum" else rows.mean(1)
            return self.head(torch.tanh(bag))

    twin = Twin()
    torch.testing.assert_close(twin(ids), model(ids), **TOL)
    hessian = reference_hessian(twin, "cross_entropy", ids, y)
    torch.testing.assert_close(flat(gnfx.ggn.hvp(model, "cross_entropy", ids, y, v)), hessian @ flat(v), rtol=1e-10,
                               atol=1e-10)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_bags_fallback_says_it_is_a_bag_under_either_capture(capture):
    """torch.fx keeps nn.EmbeddingBag a leaf module call, whose table fell back as "inside module 'bag', a layer
    kind gnfx has no curvature block for"; it now gives the reason torch.export's embedding_bag node gives (the
    fuzzer's bag inputs, tests/test_composed_models.py). The table takes autograd's gradient and moves on a step."""
    torch.manual_seed(0)
    model = BagOfWords(hidden=3).to(DTYPE)
    reference = copy.deepcopy(model)
    ids, offsets, y = bag_batch()
    c = gnfx.compile(model, optimizer="kfac", lr=1e-2, capture=capture, example_inputs=(ids, offsets))
    assert [(f.param, f.reason.split(" at node")[0]) for f in c.layers.fallbacks] == [("bag.weight", BAG)]
    F.cross_entropy(c(ids, offsets), y).backward()
    F.cross_entropy(reference(ids, offsets), y).backward()
    torch.testing.assert_close(model.bag.weight.grad, reference.bag.weight.grad, **TOL)
    start = model.bag.weight.detach().clone()
    c.step()
    assert not torch.equal(model.bag.weight, start)
