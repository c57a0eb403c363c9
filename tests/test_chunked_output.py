"""A forward that returns its logits as a list of chunks along the positions (litgpt's fine-tuning call,
`model(idx, lm_head_chunk_size=...)`, and its `chunked_cross_entropy`): one output, the chunks' concatenation
(gnfx.chunked_output). The reference is the same model returning its whole logits, the same loss on them."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from gnfx.chunked_output import as_one_output, chunk_dimension
from gnfx.errors import GnfxError


class ChunkedHeadLM(nn.Module):
    """A litgpt-style LM: with `lm_head_chunk_size` its lm_head runs on that many positions at a time and the
    forward returns the list of chunks."""

    def __init__(self, vocab=11, d=8):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.fc = nn.Linear(d, d)
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, idx, lm_head_chunk_size=0):
        x = torch.tanh(self.fc(self.wte(idx)))
        if lm_head_chunk_size > 0:
            return [self.lm_head(x_i) for x_i in x.split(lm_head_chunk_size, dim=1)]
        return self.lm_head(x)


def chunked_cross_entropy(logits, targets):
    """litgpt's loss: one mean over the unmasked targets (-100) of all the chunks."""
    if isinstance(logits, list):
        targets = targets.split([t.shape[1] for t in logits], dim=1)
        losses = [F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), ignore_index=-100, reduction="none")
                  for z, y in zip(logits, targets)]
        kept = torch.cat([y.reshape(-1) for y in targets]).ne(-100).sum()
        return torch.cat(losses).sum() / kept
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def batches(steps, n=4, t=9, vocab=11):
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(vocab, (n, t), generator=g)
        targets = torch.randint(vocab, (n, t), generator=g)
        prompt = torch.randint(1, t - 2, (n, 1), generator=g)  # a prompt of its own length per row: masked
        targets[torch.arange(t) < prompt] = -100
        yield idx, targets


def train(c, chunk, steps=3):
    for idx, targets in batches(steps):
        if chunk:
            logits = c(idx, lm_head_chunk_size=chunk)
            logits[-1] = logits[-1][..., :-1, :]  # litgpt's fine-tuning loop: the last position predicts nothing
        else:
            logits = c(idx)[..., :-1, :]
        chunked_cross_entropy(logits, targets[..., 1:]).backward()
        c.step()
        c.zero_grad()


@pytest.mark.parametrize("settings", [dict(quadratic_products="forward"), dict(lr=0.1, fisher="empirical"),
                                      dict(lr=0.1, fisher="mc")], ids=["quadratic_step", "lr_empirical", "lr_mc"])
@pytest.mark.parametrize("chunk", [4, 3], ids=["unequal_chunks", "equal_chunks"])
def test_chunked_logits_train_as_the_whole_logits(settings, chunk):
    """kfac with loss="cross_entropy" (the quadratic step, with forward-mode products, whose rounding finite
    differences would amplify to ~1e-8, and with an lr) on the list of chunks takes the parameters where the same
    loss on the whole logits takes them (float64; the same Monte Carlo targets). Before, the loss reaching a second
    chunk was refused as a second output."""
    torch.manual_seed(0)
    whole = ChunkedHeadLM().double()
    chunked = copy.deepcopy(whole)
    for model, size in ((chunked, chunk), (whole, 0)):
        c = gnfx.compile(model, "kfac", loss="cross_entropy", **settings)
        torch.manual_seed(1)  # the same Monte Carlo targets for both
        train(c, size)
    for p, q in zip(chunked.parameters(), whole.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert not torch.equal(chunked.lm_head.weight, ChunkedHeadLM().double().lm_head.weight)


def test_chunked_logits_without_loss_count_every_chunk_rows():
    """Without loss= (kfac with an lr, the empirical Fisher), M is counted from the rows of all the chunks, not
    the first chunk's alone: the same steps as on the whole logits."""
    torch.manual_seed(0)
    whole = ChunkedHeadLM().double()
    chunked = copy.deepcopy(whole)
    for model, size in ((chunked, 4), (whole, 0)):
        train(gnfx.compile(model, "kfac", lr=0.1), size)
    for p, q in zip(chunked.parameters(), whole.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_chunks_weighted_unequally_are_refused():
    """A list of per-stage outputs whose loss weights them differently (deep supervision with an auxiliary
    weight) is not one mean over their rows: the check of loss= at the joined output refuses it."""
    torch.manual_seed(0)
    c = gnfx.compile(ChunkedHeadLM().double(), "kfac", loss="cross_entropy", lr=0.1)
    idx, targets = next(batches(1))
    first, second = c(idx, lm_head_chunk_size=5)
    loss = F.cross_entropy(first.reshape(-1, 11), targets[:, :5].reshape(-1).clamp(min=0)) + 0.4 * F.cross_entropy(
        second.reshape(-1, 11), targets[:, 5:].reshape(-1).clamp(min=0))
    with pytest.raises(GnfxError, match="loss='cross_entropy' is the mean cross-entropy of the model output's logits"):
        loss.backward()
        c.step()


@pytest.mark.parametrize("shapes, expected", [
    ([(2, 4, 5), (2, 3, 5)], 1),  # (N, t_i, C) chunks along the positions
    ([(2, 4, 5), (2, 4, 5)], 1),  # equal chunks: along the positions
    ([(2, 3, 4, 4), (2, 3, 4, 4)], 2),  # (N, C, H, W) stages: along H, the classes stay where they are
    ([(2, 3, 4, 4), (2, 3, 2, 4)], 2),
    ([(2, 3, 5), (2, 3, 6)], None),  # the last dimension differs: two heads, not chunks
    ([(2, 3, 4, 4), (2, 5, 4, 4)], None),  # dimension 1 of a 4-d output may be the classes
    ([(2, 5), (2, 5)], None),  # (N, C) heads have no positions
    ([(2, 4, 5)], None),  # one tensor is the output as it is
])
def test_chunk_dimension(shapes, expected):
    assert chunk_dimension([torch.zeros(s) for s in shapes]) == expected


def test_a_tuple_and_mixed_dtypes_are_not_chunks():
    assert chunk_dimension((torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))) is None
    assert chunk_dimension([torch.zeros(2, 3, 4), torch.zeros(2, 3, 4, dtype=torch.float64)]) is None
    out = (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))
    assert as_one_output(out) is out


def test_the_chunks_are_views_of_the_joined_output():
    a, b = torch.randn(2, 4, 5, requires_grad=True), torch.randn(2, 3, 5, requires_grad=True)
    out = as_one_output([a, b])
    assert out.whole.shape == (2, 7, 5)
    torch.testing.assert_close(out[0], a)
    torch.testing.assert_close(out[1], b)
    out[1] = out[1][:, :-1]
    grads = []
    out.whole.register_hook(grads.append)
    sum(t.sum() for t in out).backward()
    assert grads[0][:, -1].abs().sum() == 0 and grads[0][:, :-1].eq(1).all()
    assert a.grad.eq(1).all() and b.grad[:, :-1].eq(1).all() and b.grad[:, -1].eq(0).all()
