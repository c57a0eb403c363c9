"""The embedding family beyond `nn.Embedding(V, d)` (benchmarks/results/first_contact_14_embednorm.md).

- max_norm: the forward renormalizes, in place and without gradient, the rows W_i the ids read to p-norm at
  most m (W_i · m / (‖W_i‖ + 1e-7) where ‖W_i‖ > m), then looks them up: an embedding block of the
  renormalized W (passes/embedding_renorm.py), under torch.fx and torch.export. Its statistics are those of
  that lookup, A = diag(token counts)/(N R), S = M Σ g gᵀ (hooks), diag by vmap at the renormalized table;
  K-FAC's step is the dense Kronecker solve at the renormalized table. The renormalization happens once per
  forward of the user's and never in the quadratic step's replays (gnfx.composite_forms): three quadratic steps
  equal those of the same model without max_norm whose loop renormalizes the table before each forward.
- `torch.index_select(W, 0, ids)` (function or method), `one_hot(ids, V).to(dtype) @ W` and `W[ids]` are the
  embedding lookup of `ids` (passes/index_lookup.py).
- `scale_grad_by_freq` falls back, saying why (passes/embedding.py).
- A forward's renormalization is its own write, no other optimizer's between forwards (gradient accumulation).
- A sparse gradient (F.embedding(..., sparse=True), which gnfx.compile cannot refuse as it refuses an
  nn.Embedding(sparse=True)) is refused at the step, naming the parameter.

References: bincount, forward + tensor hooks, torch.func.vmap per-example gradients; float64, 1e-10.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from references import cross_entropy, per_example_grads
from steps import ALL, compile_for_statistics

DTYPE = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)
V, D, N, R, C = 7, 4, 3, 5, 3
MAX_NORM = 1.0


def token_batch(seed=0):
    """Token ids (N, R), every id of the vocabulary present, and labels per token."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (N, R), generator=g)
    ids.view(-1)[:V] = torch.randperm(V, generator=g)
    return ids, torch.randint(0, C, (N, R), generator=g)


class Tagger(nn.Module):
    """`head(tanh(seen(emb(ids))))`, emb an nn.Embedding (randn rows: norms ~2, above max_norm); `seen`, an
    identity, lets hooks see the lookup's output."""

    def __init__(self, **embedding):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, D, **embedding)
        self.seen = nn.Identity()
        self.head = nn.Linear(D, C)
        self.to(DTYPE)

    def forward(self, ids):
        return self.head(torch.tanh(self.seen(self.emb(ids))))


class BagClassifier(nn.Module):
    """`head(tanh(bag(ids)))`, one mean bag per row of ids: (N, C) logits."""

    def __init__(self, **bag):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.EmbeddingBag(V, D, mode="mean", **bag)
        self.head = nn.Linear(D, C)
        self.to(DTYPE)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


def output_gradient_of(module) -> dict:
    """{"g": the gradient at `module`'s output}, filled by the next backward (a forward hook)."""
    seen = {}

    def hook(m, inputs, z):
        z.register_hook(lambda g: seen.__setitem__("g", g))
    module.register_forward_hook(hook)
    return seen


def renormalized(weight, ids):
    """The table as a forward with max_norm leaves it: torch.embedding_renorm_ of a copy."""
    with torch.no_grad():
        return torch.embedding_renorm_(weight.detach().clone(), ids, MAX_NORM, 2.0)


def lookup_reference(model, ids, y):
    """A (V,), S (d x d) and diag ([d x V]) of the lookup `seen(emb(ids))` of the table the forward renormalizes,
    and the gradient of W there: on a plain copy (no max_norm) holding the renormalized table."""
    plain = Tagger()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        plain.emb.weight.copy_(renormalized(model.emb.weight, ids))
    seen = output_gradient_of(plain.seen)
    out = plain(ids)
    cross_entropy(out, y).backward()
    g = seen["g"].reshape(-1, D)
    diag = per_example_grads(plain, ids, y)["emb.weight"].square().mean(0).T
    return {"A": torch.bincount(ids.flatten(), minlength=V).to(DTYPE) / ids.numel(),
            "S": out.shape[:-1].numel() * g.T @ g, "diag": diag, "grad": plain.emb.weight.grad}


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_max_norm_embedding_is_a_block_of_the_renormalized_lookup(capture):
    model, (ids, y) = Tagger(max_norm=MAX_NORM), token_batch()
    ref = lookup_reference(model, ids, y)
    W_renormalized = renormalized(model.emb.weight, ids)
    c = compile_for_statistics(model, optimizer="kfac", capture=capture, example_inputs=(ids,))
    assert not c.layers.fallbacks
    block = c.layers["emb"]
    assert (block.kind, block.params) == ("embedding", ("emb.weight",))
    loss = cross_entropy(c(ids), y)
    assert torch.equal(model.emb.weight.detach(), W_renormalized)  # by the forward, as eager's
    loss.backward()
    c.step()
    got = c.statistics("emb")
    for name in ALL:
        torch.testing.assert_close(got[name], ref[name], **TOL)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_kfac_step_of_a_max_norm_embedding_is_the_dense_solve_at_the_renormalized_table(capture):
    """W ← renorm(W) - η U, vec(U) = ((diag A + λ_A I) ⊗ (S + λ_S I))⁻¹ vec(∇Wᵀ), π-corrected λ_A, λ_S."""
    model, (ids, y) = Tagger(max_norm=MAX_NORM), token_batch()
    ref = lookup_reference(model, ids, y)
    W_renormalized = renormalized(model.emb.weight, ids)
    damping, lr = 1e-2, 0.5
    c = gnfx.compile(model, optimizer="kfac", capture=capture, example_inputs=(ids,), lr=lr, momentum=0.0,
                     weight_decay=0.0, kl_clip=0.0, damping=damping, stat_every=1, inv_every=1, stat_decay=0.0)
    cross_entropy(c(ids), y).backward()
    torch.testing.assert_close(model.emb.weight.grad, ref["grad"], **TOL)
    c.step()
    pi = (ref["A"].mean() / ref["S"].diagonal().mean()).sqrt()
    lam_a, lam_s = pi * damping ** 0.5, damping ** 0.5 / pi
    K = torch.kron(torch.diag(ref["A"] + lam_a), ref["S"] + lam_s * torch.eye(D, dtype=DTYPE))
    U = torch.linalg.solve(K, ref["grad"].reshape(-1)).reshape(V, D)
    torch.testing.assert_close(model.emb.weight.detach(), W_renormalized - lr * U, **TOL)


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("model_cls", [Tagger, BagClassifier])
def test_quadratic_step_renormalizes_in_the_users_forwards_only(model_cls, capture):
    """Three quadratic steps of the max_norm model equal those of the same model without max_norm whose loop
    renormalizes the table before each forward, and nowhere else (eager training). The steps move rows
    above max_norm again, so a replay at θ + s that renormalized would write into the table (the bag, a
    fallback, replays it in its Python code under torch.fx, as an op of the graph under torch.export)."""
    ids, y = token_batch()
    y = y if model_cls is Tagger else y[:, 0]
    tables = []
    for max_norm in (MAX_NORM, None):
        model = model_cls(max_norm=max_norm)
        torch.manual_seed(1)  # the sampled Fisher's labels
        # forward-mode products: finite differences would amplify the two models' rounding to ~1e-8
        c = gnfx.compile(model, optimizer="kfac", loss="cross_entropy", capture=capture, example_inputs=(ids,),
                         stat_every=1, inv_every=1, quadratic_products="forward")
        for _ in range(3):
            if max_norm is None:
                with torch.no_grad():
                    torch.embedding_renorm_(model.emb.weight, ids, MAX_NORM, 2.0)
            cross_entropy(c(ids), y).backward()
            c.step()
            c.zero_grad()
        assert c.optimizer.last_step["rho"] is not None
        tables.append([p.detach() for p in model.parameters()])
    assert (tables[0][0].norm(dim=1) > MAX_NORM).any()  # the last step moved rows above max_norm
    for got, expected in zip(*tables):
        torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("max_norm, said", [(MAX_NORM, "max_norm"), (None, "bag of embeddings")])
def test_an_embedding_bags_fallback_says_why_under_export(max_norm, said):
    """Its reason was "used by call_function 'detach.default'" (max_norm) or "'embedding_bag.padding_idx'"."""
    ids = token_batch()[0]
    c = gnfx.compile(BagClassifier(max_norm=max_norm), optimizer="kfac", lr=1e-2, capture="export",
                     example_inputs=(ids,))
    (fallback,) = c.layers.fallbacks
    assert fallback.param == "emb.weight" and said in fallback.reason, fallback.reason


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_scale_grad_by_freq_falls_back_saying_why(capture):
    """Its gradient, Σ_{t: i_t = i} δ_t / c_i with c_i the row's count in the batch, is not the gradient the
    embedding block's statistics describe (their `grad` is Σ δ_t onehot(i_t)ᵀ, c_i times it)."""
    model, (ids, _) = Tagger(scale_grad_by_freq=True), token_batch()
    c = gnfx.compile(model, optimizer="kfac", lr=1e-2, capture=capture, example_inputs=(ids,))
    (fallback,) = c.layers.fallbacks
    assert fallback.param == "emb.weight" and "scale_grad_by_freq" in fallback.reason, fallback.reason


class SelectedRows(nn.Module):
    """`index_select(W, 0, ids)` of the flattened ids, as a function or a method, back in (N, R, d)."""

    def __init__(self, method: bool):
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Parameter(torch.randn(V, D, dtype=DTYPE))
        self.seen = nn.Identity()
        self.head = nn.Linear(D, C).to(DTYPE)
        self.method = method

    def forward(self, ids):
        flat = ids.reshape(-1)
        rows = self.table.index_select(0, flat) if self.method else torch.index_select(self.table, 0, flat)
        return self.head(torch.tanh(self.seen(rows.reshape(N, R, D))))


class OneHotRows(nn.Module):
    """`one_hot(ids, V).to(W.dtype) @ W`, the rows of the table by a one-hot product."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Parameter(torch.randn(V, D, dtype=DTYPE))
        self.seen = nn.Identity()
        self.head = nn.Linear(D, C).to(DTYPE)

    def forward(self, ids):
        return self.head(torch.tanh(self.seen(F.one_hot(ids, V).to(self.table.dtype) @ self.table)))


class IndexedRows(OneHotRows):
    """`W[ids]`, the rows of the table by indexing (under torch.fx too: tests/test_getitem_patterns.py)."""

    def forward(self, ids):
        return self.head(torch.tanh(self.seen(self.table[ids])))


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("lookup", ["index_select", "index_select method", "one_hot", "getitem"])
def test_a_row_selection_or_one_hot_product_of_a_table_is_its_embedding_lookup(lookup, capture):
    """An embedding block (A a V-vector, the token counts; S = M Σ g gᵀ by hooks), not a fallback (index_select,
    W[ids] under torch.fx) nor a linear block over V inputs with a dense V x V factor A (the one-hot product)."""
    model = (OneHotRows() if lookup == "one_hot" else IndexedRows() if lookup == "getitem"
             else SelectedRows(method=lookup.endswith("method")))
    ids, y = token_batch()
    reference = copy.deepcopy(model)
    seen = output_gradient_of(reference.seen)
    cross_entropy(reference(ids), y).backward()
    g = seen["g"].reshape(-1, D)
    c = compile_for_statistics(model, optimizer="kfac", capture=capture, example_inputs=(ids,), statistics=("A", "S"))
    assert not c.layers.fallbacks
    block = c.layers.block_of("table")
    assert (block.kind, block.d_in, block.d_out, block.shapes["A"]) == ("embedding", V, D, (V,))
    cross_entropy(c(ids), y).backward()
    torch.testing.assert_close(model.table.grad, reference.table.grad, **TOL)
    c.step()
    got = c.statistics(block.name)
    torch.testing.assert_close(got["A"], torch.bincount(ids.flatten(), minlength=V).to(DTYPE) / ids.numel(), **TOL)
    torch.testing.assert_close(got["S"], N * R * g.T @ g, **TOL)


class SparseLookup(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(V, D))
        self.head = nn.Linear(D, C)

    def forward(self, ids):
        return self.head(F.embedding(ids, self.table, sparse=True))


def test_a_sparse_gradient_is_refused_at_the_step_naming_its_parameter():
    model, (ids, y) = SparseLookup(), token_batch()
    c = gnfx.compile(model, optimizer="kfac", lr=1e-2)
    cross_entropy(c(ids), y).backward()
    assert model.table.grad.is_sparse
    with pytest.raises(gnfx.ConfigError, match="'table'.*sparse"):
        c.step()


def test_gradient_accumulation_over_a_max_norm_embedding_is_no_write_by_another_optimizer():
    """Each forward renormalizes the table in place (its version counter moves): the forward's own write, not
    another optimizer's step between forwards, which gnfx warns about (gnfx.optimizer.note_statistic_forward)."""
    model, (ids, y) = Tagger(max_norm=MAX_NORM), token_batch()
    c = gnfx.compile(model, optimizer="kfac", lr=1e-2, stat_every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            for _micro_batch in range(3):  # three forwards and backwards, one step
                cross_entropy(c(ids), y).backward()
            c.step()
            c.zero_grad()
