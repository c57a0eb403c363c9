"""`W[x]` of a trainable table under torch.fx (capture="auto", the default): an integer x is the embedding lookup
E[x], as torch.export's graph already made it (passes/index_lookup.py, benchmarks/results/first_contact_15_getitem.md).

torch.fx records no dtypes, so the graph is captured from the first call, whose check against the forward
records what each traced index is (passes/index_lookup.py `IndexKinds`); a bool mask, a Python int and a slice
keep their indexing. References: nn.Embedding with the same values (two kfac / ekfac steps, float64, 1e-9;
tests/test_embedding.py checks nn.Embedding's block against bincount, hooks and vmap), autograd.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import gnfx
from references import cross_entropy

DTYPE = torch.float64
V, D, N, R, C = 7, 4, 3, 5, 3


def token_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (N, R), generator=g)
    ids.view(-1)[:V] = torch.randperm(V, generator=g)
    return ids, torch.randint(0, C, (N, R), generator=g)


class Tagger(nn.Module):
    """`head(tanh(rows(ids) + pos(positions)))`: the rows of a (V, d) table and of an (R, d) position table
    looked up by a long buffer, each as `W[x]` (`indexed`) or with nn.Embedding."""

    def __init__(self, indexed: bool):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.pos = nn.Embedding(V, D).to(DTYPE), nn.Embedding(R, D).to(DTYPE)
        self.register_buffer("positions", torch.arange(R))
        self.head = nn.Linear(D, C).to(DTYPE)
        self.indexed = indexed

    def forward(self, ids):
        if self.indexed:
            rows = self.emb.weight[ids] + self.pos.weight[self.positions]
        else:
            rows = self.emb(ids) + self.pos(self.positions)
        return self.head(torch.tanh(rows))


def trained(model, optimizer: str, steps: int = 2):
    """`model` compiled at gnfx.compile's defaults but for stat_every / inv_every 1, after `steps` steps."""
    ids, y = token_batch()
    c = gnfx.compile(model, optimizer=optimizer, lr=1e-2, stat_every=1, inv_every=1)
    for _ in range(steps):
        cross_entropy(c(ids), y).backward()
        c.step()
        c.zero_grad()
    return c


def blocks(c) -> list[tuple]:
    return [(b.kind, b.params, dict(b.shapes)) for b in c.layers.blocks]


@pytest.mark.parametrize("optimizer", ["kfac", "ekfac"])
def test_an_integer_index_of_a_table_is_the_embedding_lookup_with_nn_embeddings_steps(optimizer):
    """W[ids] (ids from the input) and P[positions] (a long buffer): the blocks and two steps of nn.Embedding's."""
    indexed, plain = Tagger(indexed=True), Tagger(indexed=False)
    c, reference = trained(indexed, optimizer), trained(plain, optimizer)
    assert not c.layers.fallbacks
    assert blocks(c) == blocks(reference)
    for (name, p), q in zip(indexed.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-9, msg=name)


class Indexings(nn.Module):
    """A lookup `table[ids]` beside the other indexings of a second table: a bool mask, a Python int from a size,
    a slice; `mask` (V,) an input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Parameter(torch.randn(V, D, dtype=DTYPE))
        self.other = nn.Parameter(torch.randn(V, D, dtype=DTYPE))
        self.head = nn.Linear(D, C).to(DTYPE)

    def forward(self, ids, mask):
        others = self.other[mask].sum(0) + self.other[ids.shape[1] - 1] + self.other[:2].sum(0)
        return self.head(torch.tanh(self.table[ids] + others))


def mask_batch():
    return torch.arange(V) % 2 == 0


def test_a_mask_an_int_and_a_slice_keep_their_indexing_beside_a_lookup():
    """The table read by integer ids is an embedding block; the table indexed by a mask, an int and a slice falls
    back as before, and the gradients are autograd's."""
    model, (ids, y), mask = Indexings(), token_batch(), mask_batch()
    reference = Indexings()
    cross_entropy(reference(ids, mask), y).backward()
    c = gnfx.compile(model, optimizer="kfac", lr=1e-2)
    cross_entropy(c(ids, mask), y).backward()
    assert c.layers.block_of("table").kind == "embedding"
    assert [(f.param, f.reason) for f in c.layers.fallbacks] == [
        ("other", "used by call_function 'getitem' (node getitem), not a layer gnfx models")]
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)
    c.step()


class MaskedOrIndexed(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(V, D, dtype=DTYPE))

    def forward(self, index):
        return self.table[index].sum()


def test_a_later_call_indexing_with_a_mask_where_the_graph_holds_a_lookup_raises_saying_so():
    """The graph captured from integer ids holds the lookup: a bool mask later would be read as ids 0 and 1."""
    c = gnfx.compile(MaskedOrIndexed(), optimizer="kfac", lr=1e-2)
    c(token_batch()[0]).backward()
    assert c.layers.block_of("table").kind == "embedding"
    with pytest.raises(gnfx.GnfxError, match="indexes with a torch.bool tensor"):
        c(mask_batch())
