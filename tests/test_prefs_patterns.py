"""Preference fine-tuning as trl's users write it, in plain torch (benchmarks/results/first_contact_13_prefs.md):
DPO's loss, -logsigmoid(β((log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r)))), on one forward of the chosen and
rejected completions concatenated, with the reference the same model with its LoRA adapters disabled (peft's
`with model.disable_adapter():`, a flag on each adapted layer that its forward branches on); the log-probabilities
from a custom Function that writes its logits tiles with out= (trl 1.16's fused head); and DPO's loss compiled
with loss='cross_entropy'. Each test failed before its change.
"""
from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from references import kfac_factors

VOCAB, WIDTH, PAIRS, PROMPT, COMPLETION = 11, 8, 3, 3, 4


class LoraLinear(nn.Module):
    """peft's LoRA layer: a frozen base Linear plus B A x, skipped while `disable_adapters` is set."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.base = nn.Linear(d_in, d_out).requires_grad_(False)
        self.lora_A, self.lora_B = nn.Linear(d_in, 2, bias=False), nn.Linear(2, d_out, bias=False)
        self.disable_adapters = False

    def forward(self, x):
        y = self.base(x)
        if self.disable_adapters:
            return y
        return y + self.lora_B(self.lora_A(x))


class AdaptedLM(nn.Module):
    """A frozen embedding and head around two LoRA layers: (N, T) token ids -> (N, T, VOCAB) logits."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH).requires_grad_(False)
        self.hidden, self.out = LoraLinear(WIDTH, WIDTH), LoraLinear(WIDTH, VOCAB)

    def forward(self, ids):
        return self.out(torch.tanh(self.hidden(self.embed(ids))))


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """peft's `model.disable_adapter()`: every LoRA layer's flag set while inside."""
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    for m in layers:
        m.disable_adapters = True
    try:
        yield
    finally:
        for m in layers:
            m.disable_adapters = False


def preference_batch():
    """Token ids (2·PAIRS, PROMPT + COMPLETION), the chosen completions first, and their labels (-100 on the
    prompt), as trl's DPO collator concatenates them."""
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, VOCAB, (PAIRS, PROMPT), generator=g).repeat(2, 1)
    ids = torch.cat([prompt, torch.randint(0, VOCAB, (2 * PAIRS, COMPLETION), generator=g)], 1)
    return ids, ids.masked_fill(torch.arange(ids.shape[1]) < PROMPT, -100)


def completion_logps(logits, labels):
    """Σ over the completion's tokens of log softmax(logits)[next token], per sequence (trl's log-probs)."""
    targets, logits = labels[:, 1:], logits[:, :-1]
    per_token = logits.log_softmax(-1).gather(2, targets.clamp(min=0).unsqueeze(2)).squeeze(2)
    return (per_token * (targets != -100)).sum(1)


def dpo_loss(policy, reference, beta: float = 0.5):
    """DPO's sigmoid loss over the pairs, from (2·PAIRS,) log-probs of the policy and the reference."""
    (pc, pr), (rc, rr) = policy.chunk(2), reference.chunk(2)
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_the_reference_forward_with_adapters_disabled_runs_without_them(capture):
    """The reference log-probs computed on the compiled model under `adapters_disabled` with gradients enabled
    and detached (a hand-written DPO loop's; trl's runs it under torch.no_grad, which calls the module itself) are
    the base model's on every step, statistic steps included. Before: the graph, captured with the adapters on,
    ignored the flag on statistic steps, so the reference was the policy itself, the loss log 2 and its gradient
    zero, silently. The statistics, against plain hooks over the same forwards: the detached reference forward
    adds no rows."""
    torch.manual_seed(0)
    model = AdaptedLM().double()
    plain = copy.deepcopy(model)
    ids, labels = preference_batch()
    c = gnfx.compile(model, "kfac", lr=1e-2, stat_every=1, stat_decay=0.0, capture=capture,
                     example_inputs=(ids,))
    lora = [n for n, m in plain.named_modules() if n.endswith(("lora_A", "lora_B"))]
    for _ in range(3):
        records = {n: [] for n in lora}
        handles = [dict(plain.named_modules())[n].register_forward_hook(
            lambda m, i, o, n=n: records[n].append([i[0].detach(), o])) for n in lora]
        want_policy = completion_logps(plain(ids), labels)
        for h in handles:
            h.remove()
        for record in (r for n in lora for r in records[n]):
            record[1].register_hook(lambda g, record=record: record.__setitem__(1, g))
        with adapters_disabled(plain), torch.no_grad():
            want_reference = completion_logps(plain(ids), labels)
        dpo_loss(want_policy, want_reference).backward()
        policy = completion_logps(c(ids), labels)
        with adapters_disabled(model):
            reference = completion_logps(c(ids), labels).detach()
        torch.testing.assert_close(reference, want_reference, rtol=1e-12, atol=1e-12)
        loss = dpo_loss(policy, reference)
        loss.backward()
        for p, q in zip(model.parameters(), plain.parameters()):
            if p.requires_grad:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12)
        c.step()
        rows = int((labels[:, 1:] != -100).sum())  # M: the logits' rows the loss reaches
        for name in lora:
            want = kfac_factors(records[name], False, "expand", rows)
            torch.testing.assert_close(c.statistics(name)["A"], want["A"], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(c.statistics(name)["S"], want["S"], rtol=1e-10, atol=1e-12)
        c.zero_grad()
        plain.zero_grad()
        plain.load_state_dict(model.state_dict())


class PlainLM(nn.Module):
    """Token ids (N, T) -> logits (N, T, VOCAB)."""

    def __init__(self):
        super().__init__()
        self.embed, self.hidden = nn.Embedding(VOCAB, WIDTH), nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, ids):
        return self.head(torch.tanh(self.hidden(self.embed(ids))))


class TiledLogProbs(torch.autograd.Function):
    """trl's fused log-probability head (`_ChunkedLogProbFunction`): log softmax(h Wᵀ)[y] per row, its logits
    written into a preallocated tile with torch.mm(..., out=tile), its backward the derivative written out."""

    @staticmethod
    def forward(ctx, hidden, weight, targets):
        tile = torch.empty(hidden.shape[0], weight.shape[0], dtype=hidden.dtype)
        torch.mm(hidden, weight.t(), out=tile)
        probs = tile.softmax(-1)
        ctx.save_for_backward(hidden, weight, probs, targets)
        return probs.gather(1, targets.unsqueeze(1)).squeeze(1).log()

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, probs, targets = ctx.saved_tensors
        dlogits = grad.unsqueeze(1) * (F.one_hot(targets, weight.shape[0]).to(probs) - probs)
        return dlogits @ weight, dlogits.T @ hidden, None


class FusedHeadLM(PlainLM):
    """PlainLM whose forward returns the completion tokens' log-probabilities through TiledLogProbs."""

    def forward(self, ids, labels):
        h = torch.tanh(self.hidden(self.embed(ids)))[:, :-1].reshape(-1, WIDTH)
        targets = labels[:, 1:].reshape(-1)
        per_token = TiledLogProbs.apply(h, self.head.weight, targets.clamp(min=0))
        return (per_token * (targets != -100)).reshape(ids.shape[0], -1)


def test_a_custom_function_that_writes_its_products_out_trains_as_the_model():
    """trl 1.16's DPO forward (`add_fused_lm_head`: the log-probabilities from a Function whose forward runs
    torch.mm(..., out=tile)). gnfx's check of a Function's backward against its forward's derivative records the
    forward's operations with gradients, where an out= product raises; before, that RuntimeError ended the first
    call ("mm(): functions with out=... arguments don't support automatic differentiation"). Now the Function has
    no derivative to compare, torch.export's capture is refused for it and torch.fx's, which keeps the Function's
    call and its backward, trains the model: DPO's loss and gradients equal a plain copy's, in float64."""
    torch.manual_seed(0)
    model = FusedHeadLM().double()
    plain, reference = copy.deepcopy(model), copy.deepcopy(model).requires_grad_(False)
    ids, labels = preference_batch()
    c = gnfx.compile(model, "kfac", lr=1e-2, stat_every=1)
    for _ in range(3):
        with torch.no_grad():
            ref = reference(ids, labels).sum(1)
        loss, want = (dpo_loss(m(ids, labels).sum(1), ref) for m in (c, plain))
        torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
        loss.backward()
        want.backward()
        for p, q in zip(model.parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12)
        c.step()
        c.zero_grad()
        plain.zero_grad()
        plain.load_state_dict(model.state_dict())
    assert c.layers.form == "fx"


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_a_preference_loss_compiled_with_cross_entropy_is_refused(beta):
    """DPO's loss with loss='cross_entropy' and no lr (the quadratic step): its gradient at the logits has rows of
    the cross-entropy form, those of the rejected completions with the opposite sign (k(e_y - p), lowering
    log p_y). Before: a warning that named class weights and distillation, and the quadratic step modelled the
    loss as a cross-entropy of the targets it implies (its GGN, and its ρ without a closure), silently wrong for
    DPO (β 0.1); or (β 0.5, whose gradient's absolute values sum to more than 2) an error that named a summed or
    scaled loss. Now a GnfxError that names preference losses and the fix. SFT's cross-entropy (labels -100 on the
    prompt) on the same model still steps without a word."""
    torch.manual_seed(0)
    model = PlainLM()
    reference = copy.deepcopy(model).requires_grad_(False)
    ids, labels = preference_batch()
    c = gnfx.compile(model, "kfac", loss="cross_entropy")
    with torch.no_grad():
        ref = completion_logps(reference(ids), labels)
    with pytest.raises(gnfx.GnfxError, match=r"(?s)lowers the log-probability.*DPO.*without loss= and with an lr"):
        dpo_loss(completion_logps(c(ids), labels), ref, beta).backward()
        c.step()
    torch.manual_seed(0)
    c = gnfx.compile(PlainLM(), "kfac", loss="cross_entropy")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            F.cross_entropy(c(ids)[:, :-1].flatten(0, 1), labels[:, 1:].flatten()).backward()
            c.step()
            c.zero_grad()
