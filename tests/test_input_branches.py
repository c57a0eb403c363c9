"""A forward whose loss branches on its inputs' values with both sides computing, as Hugging Face's
DebertaV2ForSequenceClassification's default loss does (`label_index = (labels >= 0).nonzero(); if
label_index.size(0) > 0: <cross-entropy of the labelled rows> else: <another loss>`), is captured with
torch.export specialized to the side the example call took, the condition asserted at run time
(passes/validation_checks.py); a call that takes the other side is captured again as another graph
(gnfx.variants) and computes what the model computes. A branch on floating-point data (a parameter, an
activation, a floating-point input), which flips from batch to batch or as the model trains, is still refused."""
from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gnfx
from steps import step_beside

DTYPE = torch.float64
CLASSES = 3


class LabelledHead(nn.Module):
    """DeBERTa-v2's default classification loss around an MLP: the cross-entropy of the rows whose label
    is not negative, or, when the batch has none, the cross-entropy against uniform soft targets (DeBERTa
    returns a constant 0 there, which has no gradient to compare)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, CLASSES)
        self.to(DTYPE)

    def forward(self, x, labels):
        logits = self.b(torch.tanh(self.a(x)))
        label_index = (labels >= 0).nonzero()
        if label_index.size(0) > 0:
            labelled = torch.gather(logits, 0, label_index.expand(label_index.size(0), logits.size(1)))
            loss = F.cross_entropy(labelled, torch.gather(labels, 0, label_index.view(-1)))
        else:
            loss = F.cross_entropy(logits, torch.full_like(logits, 1 / CLASSES))
        return loss, logits


class WeightedIfUnlabelled(LabelledHead):
    """A branch written as an expression on a scalar read of the labels (`bool(t)`): the loss of the
    clamped labels, halved when some row is unlabelled."""

    def forward(self, x, labels):
        logits = self.b(torch.tanh(self.a(x)))
        weight = 0.5 if (labels < 0).any() else 1.0
        return weight * F.cross_entropy(logits, labels.clamp(min=0)), logits


class WeightBranch(LabelledHead):
    """A branch on an activation, which the weights decide: it flips as the model trains."""

    def forward(self, x, labels):
        h = torch.tanh(self.a(x))
        logits = self.b(h if h.mean() > 0 else -h)
        return F.cross_entropy(logits, labels), logits


class FloatInputBranch(LabelledHead):
    """A branch on a floating-point input's values: it flips from batch to batch."""

    def forward(self, x, labels):
        logits = self.b(torch.tanh(self.a(x if x.sum() > 0 else -x)))
        return F.cross_entropy(logits, labels), logits


def batch(seed, unlabelled=(), n=8):
    """(x, labels) with the labels of the rows `unlabelled` -100 ("all": every row)."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 4, generator=g, dtype=DTYPE), torch.randint(0, CLASSES, (n,), generator=g)
    y[slice(None) if unlabelled == "all" else list(unlabelled)] = -100
    return x, y


def step_both(c, model, reference, x, y, a_input=None):
    """One training step of the compiled model and of the plain module on (x, y): their losses, logits
    and parameter gradients must be equal, and the first layer's A factor (stat_decay=0: this batch's)
    must be [x 1]ᵀ[x 1] / N (`a_input`: that layer's input where it is not x); the reference then takes
    the compiled model's parameters."""
    (loss, z), (loss_ref, z_ref) = c(x, y), reference(x, y)
    assert torch.equal(loss, loss_ref) and torch.equal(z, z_ref)
    step_beside(c, model, reference, loss, loss_ref)
    a_input = x if a_input is None else a_input
    rows = torch.cat([a_input, torch.ones_like(x[:, :1])], 1)
    torch.testing.assert_close(c.statistics("a")["A"], rows.T @ rows / len(x), rtol=1e-12, atol=1e-12)
    return loss.item()


def test_kfac_at_defaults_captures_a_loss_branching_on_the_labels_and_computes_the_models_gradients():
    model = LabelledHead()
    reference = copy.deepcopy(model)
    c = gnfx.compile(model, optimizer="kfac", loss="cross_entropy", stat_every=1, stat_decay=0.0)
    losses = [step_both(c, model, reference, *batch(0, unlabelled=[2, 5])) for _ in range(4)]
    assert c.layers.form == "export"
    assert "data-dependent branches on its inputs" in c.layers.capture
    assert "if label_index.size(0) > 0:" in c.layers.capture
    covered, total = c.layers.coverage(dict(model.named_parameters()))
    assert covered == total
    assert losses[-1] < 0.7 * losses[0]


def test_a_call_that_takes_the_other_side_is_captured_again_and_computes_the_models_result():
    model = LabelledHead()
    reference = copy.deepcopy(model)
    c = gnfx.compile(model, optimizer="kfac", loss="cross_entropy", stat_every=1, stat_decay=0.0)
    step_both(c, model, reference, *batch(0, unlabelled=[1]))
    with pytest.warns(RuntimeWarning, match=r"other side of a data-dependent branch at .*label_index.size\(0\) > 0"):
        step_both(c, model, reference, *batch(1, unlabelled="all"))  # the first graph fails its assertion
    assert len(c._variants.graphs()) == 2
    store, (x, y) = c.optimizer.statistics, batch(2, unlabelled="all")
    loss, _ = c(x, y)  # the first graph stops at its assertion, the second returns
    assert [len(stats._staged[store.forward_id]) for stats in store.blocks.values()] == [1, 1]  # the stopped one's
    loss.backward()                                                                             # inputs dropped
    c.step()
    c.zero_grad()
    reference.load_state_dict(model.state_dict())
    # each side again, in both orders: the graphs are tried in turn, and no new one is captured; the
    # other side's true-Fisher backward (kfac at defaults: fisher="mc") takes only the graph that returned
    for seed, unlabelled in [(2, "all"), (3, [0, 4]), (4, "all"), (5, ())]:
        step_both(c, model, reference, *batch(seed, unlabelled))
    assert len(c._variants.graphs()) == 2


def test_a_branch_expression_on_a_scalar_read_of_the_labels_is_captured_for_each_side():
    model = WeightedIfUnlabelled()
    reference = copy.deepcopy(model)
    c = gnfx.compile(model, optimizer="kfac", loss="cross_entropy", stat_every=1, stat_decay=0.0)
    step_both(c, model, reference, *batch(0))
    with pytest.warns(RuntimeWarning, match=r"other side of a data-dependent branch at .*0.5 if \(labels < 0\).any\(\)"):
        step_both(c, model, reference, *batch(1, unlabelled=[3]))
    for seed, unlabelled in [(2, ()), (3, [0, 1]), (4, ())]:
        step_both(c, model, reference, *batch(seed, unlabelled))
    assert len(c._variants.graphs()) == 2 and "0.5 if (labels < 0).any() else 1.0" in c.layers.capture


@pytest.mark.parametrize("model, where, read", [
    (WeightBranch, r"h if h.mean\(\) > 0 else -h", r"the model's 'a\.(weight|bias)'"),
    (FloatInputBranch, r"x if x.sum\(\) > 0 else -x", r"the floating-point input 'x'")])
def test_a_branch_on_floating_point_data_is_refused_naming_it_and_the_forward_runs_eagerly(model, where, read):
    """torch.export still refuses the branch, naming it; where it raised a CaptureError, capture='auto' now
    warns with that reason and runs the forward's own code at each call, its layers opened into blocks
    (passes/opaque_root.py): the losses, logits and gradients are the module's own on either side, and
    the first layer's A factor this batch's. capture='export' keeps the error."""
    with pytest.raises(gnfx.CaptureError, match=rf"{where}.* \(its condition reads {read}\) depends on floating-point"):
        gnfx.compile(model(), optimizer="kfac", loss="cross_entropy", capture="export", example_inputs=batch(0))
    net = model()
    reference = copy.deepcopy(net)
    c = gnfx.compile(net, optimizer="kfac", loss="cross_entropy", stat_every=1, stat_decay=0.0)
    sides = set()
    for seed in range(5):
        x, y = batch(seed)
        x = -x if seed % 2 else x
        sides.add(bool(x.sum() > 0))
        with pytest.warns(RuntimeWarning, match=rf"{where}.* \(its condition reads {read}\) depends on floating-point") \
                if seed == 0 else contextlib.nullcontext():  # at the capture
            step_both(c, net, reference, x, y, a_input=x if model is WeightBranch or x.sum() > 0 else -x)
    assert model is WeightBranch or sides == {True, False}
    assert c.layers.form == "eager" and [b.name for b in c.layers] == ["a", "b"]


def test_deberta_v2s_default_classification_loss_is_captured_and_takes_either_side():
    """The real DebertaV2ForSequenceClassification (tiny config, problem_type unset), float64: captured by
    torch.export with its loss's branch asserted; a batch whose labels are all -100 (the zero loss) gets a
    second graph; both compute the module's loss and logits, and the labelled batch its gradients."""
    transformers = pytest.importorskip("transformers")
    config = transformers.DebertaV2Config(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, relative_attention=True, position_buckets=8, max_relative_positions=16,
        pos_att_type=["p2c", "c2p"], position_biased_input=False, num_labels=CLASSES, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, pooler_dropout=0.0, pad_token_id=1)
    torch.manual_seed(0)
    model = transformers.DebertaV2ForSequenceClassification(config).to(DTYPE)
    reference = copy.deepcopy(model)
    c = gnfx.compile(model, optimizer="kfac", loss="cross_entropy", stat_every=1)
    g = torch.Generator().manual_seed(0)
    ids, mask = torch.randint(3, 40, (4, 8), generator=g), torch.ones(4, 8, dtype=torch.long)
    mask[1, 5:] = 0
    for labels in ([0, 2, 1, -100], [-100] * 4):
        labels = torch.tensor(labels)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the second graph's capture says so
            out = c(input_ids=ids, attention_mask=mask, labels=labels)
        ref = reference(input_ids=ids, attention_mask=mask, labels=labels)
        assert torch.equal(out.loss, ref.loss) and torch.equal(out.logits, ref.logits)
        if out.loss.requires_grad:
            step_beside(c, model, reference, out.loss, ref.loss)
    assert c.layers.form == "export" and "if label_index.size(0) > 0:" in c.layers.capture
    assert len(c._variants.graphs()) == 2
