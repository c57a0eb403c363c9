"""A forward that validates its inputs by value (`if labels.max() >= V: raise ValueError`), as Hugging
Face's Wav2Vec2ForCTC does, is captured with the checks as runtime assertions specialized to the
example call (passes/validation_checks.py): it computes what the model computes, trains, and a call
that fails a check raises, never returning a branch the model would not take."""
from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch import nn
from torch.nn import functional as F

import gnfx
from steps import step_beside

DTYPE = torch.float64
CLASSES = 3


class Validating(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, CLASSES)
        self.to(DTYPE)

    def forward(self, x, labels=None):
        if (x.abs() > 1e6).any():
            raise ValueError("inputs out of range")
        assert not x.isnan().any(), "NaN in the inputs"
        z = self.b(torch.tanh(self.a(x)))
        if labels is not None and labels.max() >= CLASSES:
            raise ValueError(f"labels must be < {CLASSES}")
        return z


class PartialCheck(Validating):
    """A check of two data-dependent conditions: failing one of them alone does not raise."""

    def forward(self, x, labels=None):
        if (x > 1e6).any() and (x < -1e6).any():
            raise ValueError("inputs on both sides out of range")
        return self.b(torch.tanh(self.a(x)))


def batch(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=DTYPE), torch.randint(0, CLASSES, (n,), generator=g)


def test_a_validating_forward_computes_the_models_outputs_and_gradients_exactly():
    model = Validating()
    reference = copy.deepcopy(model)
    c = gnfx.compile(model, optimizer="kfac", loss="cross_entropy", stat_every=1)
    for seed in range(3):  # each call a statistic step: the captured graph runs
        x, y = batch(seed)
        z, z_ref = c(x, labels=y), reference(x, labels=y)
        F.cross_entropy(z, y).backward()
        F.cross_entropy(z_ref, y).backward()
        assert torch.equal(z, z_ref)
        for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
            assert torch.equal(p.grad, p_ref.grad), name
        c.zero_grad()
        reference.zero_grad()
    assert c.layers.form == "export"
    assert "validation checks" in c.layers.capture and "labels.max() >= CLASSES" in c.layers.capture
    assert "(x.abs() > 1e6).any()" in repr(c) and "assert not x.isnan().any()" in repr(c)  # print(model) names each


def test_kfac_at_defaults_trains_a_validating_forward():
    model = Validating()
    c = gnfx.compile(model, optimizer="kfac", loss="cross_entropy")
    x, y = batch()
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(c(x, labels=y), y)
        loss.backward()
        c.step()
        c.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    covered, total = c.layers.coverage(dict(model.named_parameters()))
    assert covered == total


@pytest.mark.parametrize("bad", ["labels", "inputs", "nan"])
def test_a_call_that_fails_a_check_raises_the_models_error(bad):
    model = Validating()
    c = gnfx.compile(model, optimizer="kfac", loss="cross_entropy", stat_every=1)
    x, y = batch()
    F.cross_entropy(c(x, labels=y), y).backward()
    c.step()
    c.zero_grad()
    if bad == "labels":
        y = y.clone()
        y[0] = CLASSES
    else:
        x = x.clone()
        x[0, 0] = 1e7 if bad == "inputs" else float("nan")
    error, message = {"labels": (ValueError, "labels must be"), "inputs": (ValueError, "inputs out of range"),
                      "nan": (AssertionError, "NaN in the inputs")}[bad]
    with pytest.raises(error, match=message):
        c(x, labels=y)  # a statistic step: the graph runs and fails its assertion


def test_a_call_that_fails_a_check_the_model_passes_is_a_gnfx_error_naming_it():
    c = gnfx.compile(PartialCheck(), optimizer="kfac", loss="cross_entropy", stat_every=1)
    x, y = batch()
    F.cross_entropy(c(x), y).backward()
    c.step()
    c.zero_grad()
    x = x.clone()
    x[0, 0] = 1e7  # the first condition flips, the model does not raise
    with pytest.raises(gnfx.GnfxError, match=r"validation check at .*\(x > 1e6\).any\(\) and"):
        c(x)


class CTCHead(nn.Module):
    """A CTC model called with its labels (-100 on padding), as Wav2Vec2ForCTC: it checks them by value
    and computes F.ctc_loss with tensor lengths (aten._ctc_loss.Tensor, which has no fake kernel in torch)."""

    def __init__(self, vocab=5):
        super().__init__()
        torch.manual_seed(0)
        self.vocab, self.proj = vocab, nn.Linear(3, vocab)
        self.to(DTYPE)

    def forward(self, x, frames, labels):
        if labels.max() >= self.vocab:
            raise ValueError(f"Label values must be <= vocab_size: {self.vocab}")
        logits = self.proj(x)
        kept = labels >= 0
        log_probs = F.log_softmax(logits, -1).transpose(0, 1)
        return F.ctc_loss(log_probs, labels.masked_select(kept), frames, kept.sum(-1)), logits


def test_a_ctc_model_with_its_labels_computes_the_models_loss_and_gradients_exactly():
    model = CTCHead()
    reference = copy.deepcopy(model)
    c = gnfx.compile(model, optimizer="kfac", lr=0.01, stat_every=1)
    g = torch.Generator().manual_seed(0)
    x, frames = torch.randn(3, 10, 3, generator=g, dtype=DTYPE), torch.tensor([10, 9, 7])
    for labels in ([[1, 2, -100], [3, 1, 2], [4, -100, -100]], [[2, -100, -100], [1, 1, 3], [4, 2, -100]]):
        labels = torch.tensor(labels)
        (loss, z), (loss_ref, z_ref) = c(x, frames, labels), reference(x, frames, labels)
        assert torch.equal(loss, loss_ref) and torch.equal(z, z_ref)
        step_beside(c, model, reference, loss, loss_ref)
    assert c.layers.form == "export" and "labels.max() >= self.vocab" in c.layers.capture


def test_torch_compile_of_a_validating_model_trains_as_the_eager_one():
    """Statistic steps run the graph with its assertions eagerly; the others the forward dynamo compiled
    (`labels.max() >= V` a graph break there, as in the model)."""
    torch._dynamo.reset()
    losses = []
    for wrap in (lambda c: c, lambda c: torch.compile(c, backend="eager")):
        model = Validating()
        c = gnfx.compile(model, optimizer="kfac", loss="cross_entropy", stat_every=2)
        run = wrap(c)
        losses.append([])
        for seed in range(4):
            x, y = batch(seed)
            loss = F.cross_entropy(run(x, labels=y), y)
            loss.backward()
            c.step()
            c.zero_grad()
            losses[-1].append(loss.item())
    torch._dynamo.reset()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-10, atol=1e-12)
