"""Models nobody here wrote, called as their users call them, compiled with no example inputs.

Hugging Face transformers' GPT-2, Llama, BERT and ViT built from tiny configs (config objects only,
no downloads), torch.nn's TransformerEncoder (batch first or not) and a hand-written causal
attention whose mask is built from the input's shape: each is captured at its first call (torch.fx,
or torch.export where fx fails anywhere), trains with kfac and shampoo through keyword arguments,
attention masks and a shorter last batch with a falling loss, and has every parameter in a
curvature block except the kinds gnfx has no block for yet (norm scales, position embeddings).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx

transformers = pytest.importorskip("transformers")

VOCAB, CLASSES, BATCH, T = 40, 3, 4, 8


def coverage(c) -> float:
    covered, total = c.layers.coverage(dict(c.named_parameters()))
    return covered / total


def not_modelled(c) -> set[str]:
    """The fallback parameters that are not layers gnfx models (norm scales, position embeddings,
    a class token), as opposed to parameters a failed capture left opaque."""
    return {f.param for f in c.layers.fallbacks
            if "not a layer gnfx models" in f.reason or "a layer kind gnfx has no curvature block for" in f.reason}


# ----------------------------------------------------------------------------- the models


def gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def llama():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                      bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(config)


def bert(**overrides):
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=CLASSES, **overrides)
    return transformers.BertForSequenceClassification(config)


def vit():
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=32, num_labels=CLASSES)
    return transformers.ViTForImageClassification(config)


class Encoder(nn.Module):
    """A classifier over token ids with torch.nn's own TransformerEncoder."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(VOCAB, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, CLASSES)

    def forward(self, ids):
        h = self.embed(ids)
        h = self.encoder(h if self.batch_first else h.transpose(0, 1))
        return self.head((h if self.batch_first else h.transpose(0, 1)).mean(1))


class CausalSelfAttention(nn.Module):
    """Attention as in minimal GPT implementations: the causal mask comes from x.shape, which
    symbolic tracing cannot follow (torch.ones of a traced size)."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = (z.reshape(n, t, self.heads, -1).transpose(1, 2) for z in self.qkv(x).split(d, dim=2))
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), 1)
        y = scores.masked_fill(mask, float("-inf")).softmax(-1) @ v
        return self.proj(y.transpose(1, 2).reshape(n, t, d))


class TinyGPT(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.attn = CausalSelfAttention(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, VOCAB)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.attn(torch.tanh(h))
        return self.head(h + self.mlp(torch.tanh(h)))


def next_token_loss(out, ids, mask=None):
    logits = out.logits if hasattr(out, "logits") else out
    targets = ids[:, 1:] if mask is None else ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1))


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, T), generator=g)
    mask = torch.ones(BATCH, T, dtype=torch.long)
    mask[0, -3:] = 0  # a padded sequence
    return ids, mask, torch.randn(BATCH, 3, 8, 8, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)


def language_model(c, n, ids, mask, pixels, labels):
    return next_token_loss(c(input_ids=ids[:n], attention_mask=mask[:n]), ids[:n], mask[:n])


def classifier(c, n, ids, mask, pixels, labels):
    return F.cross_entropy(c(input_ids=ids[:n], attention_mask=mask[:n]).logits, labels[:n])


def image_classifier(c, n, ids, mask, pixels, labels):
    return F.cross_entropy(c(pixel_values=pixels[:n]).logits, labels[:n])


def sequence_classifier(c, n, ids, mask, pixels, labels):
    return F.cross_entropy(c(ids[:n]), labels[:n])


def tiny_lm(c, n, ids, mask, pixels, labels):
    return next_token_loss(c(ids[:n]), ids[:n])


CASES = {  # model, how its users call it and take the loss, lr for kfac and shampoo
    "gpt2": (gpt2, language_model), "llama": (llama, language_model), "bert": (bert, classifier),
    "vit": (vit, image_classifier), "encoder_batch_first": (lambda: Encoder(True), sequence_classifier),
    "encoder_seq_first": (lambda: Encoder(False), sequence_classifier), "causal_attention": (TinyGPT, tiny_lm),
}
LR = {"kfac": 0.05, "shampoo": 0.01}
STEPS = 6
REPORTED = {}


# each exported transformers model takes seconds to capture: one optimizer each here, kfac and
# shampoo each on two of the four
RUNS = [("gpt2", "kfac"), ("llama", "shampoo"), ("bert", "kfac"), ("vit", "shampoo")]
RUNS += [(name, optimizer) for name in ("encoder_batch_first", "encoder_seq_first", "causal_attention")
         for optimizer in ("kfac", "shampoo")]


@pytest.mark.parametrize("name, optimizer", RUNS)
def test_trains_from_its_first_call_with_every_layer_in_a_block(name, optimizer):
    build, loss_of = CASES[name]
    torch.manual_seed(0)
    model = build()
    c = gnfx.compile(model, optimizer=optimizer, lr=LR[optimizer], stat_every=1)
    batch, losses = data(), []
    for step in range(STEPS):
        n = BATCH - 1 if step == STEPS - 1 else BATCH  # a shorter last batch, on a statistic step
        loss = loss_of(c, n, *batch)
        loss.backward()
        c.step()
        c.zero_grad()
        losses.append(loss.item())
    assert losses[-2] < 0.9 * losses[0] and math.isfinite(losses[-1]), losses  # [-1]: the short batch
    assert c.optimizer.steps == STEPS and all(s.updates == STEPS for s in c.optimizer.statistics.blocks.values())
    # every trainable parameter is in a block but those gnfx has no block kind for yet
    assert not c.layers.leaves
    assert {f.param for f in c.layers.fallbacks} == not_modelled(c)
    assert all(any(k in p.lower() for k in ("norm", "ln_", "position", "cls_token")) for p in not_modelled(c))
    REPORTED[name, optimizer] = (c.layers.form, coverage(c), c.layers.capture)
    print(f"\n{name:>20} {optimizer:>8}: {c.layers.form:>6} {100 * coverage(c):5.1f}% in curvature blocks "
          f"({c.layers.capture[:90]})")


def test_capture_waits_for_the_first_call_and_calls_of_another_form_get_their_own():
    """The optimizer exists before the first call (an LR scheduler is built on it). Then keyword or
    positional, with or without the attention mask, another batch size or sequence length: each a
    statistic step, each counted once in the shared statistics. A new sequence length is outside
    the first capture's range (only the batch dimension is dynamic there); its capture makes that
    dimension dynamic too (automatic dynamic shapes, as torch.compile)."""
    model = gpt2()
    c = gnfx.compile(model, optimizer="kfac", lr=0.05, stat_every=1)
    assert "first call" in repr(c) and "first call" in repr(c.layers)
    schedule = torch.optim.lr_scheduler.LambdaLR(c.optimizer, lambda step: 0.5 ** step)
    ids, mask, _, _ = data()
    calls = [((), dict(input_ids=ids, attention_mask=mask)), ((ids,), dict(attention_mask=mask)), ((ids,), {}),
             ((), dict(input_ids=ids[:1], attention_mask=mask[:1])), ((), dict(input_ids=ids[:2], attention_mask=mask[:2])),
             ((), dict(input_ids=ids[:, :5], attention_mask=mask[:, :5])),
             ((), dict(input_ids=ids[:3, :6], attention_mask=mask[:3, :6]))]
    for step, (args, kwargs) in enumerate(calls, 1):
        out = c(*args, **kwargs)
        assert isinstance(out.logits, torch.Tensor) and out.cache is not None  # the cache passes through
        next_token_loss(out, kwargs.get("input_ids", args[0] if args else None)).backward()
        c.step()
        schedule.step()
        c.zero_grad()
        assert all(s.updates == step for s in c.optimizer.statistics.blocks.values())
    assert c.layers.form == "export" and "torch.fx could not trace" in c.layers.capture
    assert c.optimizer.param_groups[0]["lr"] == 0.05 * 0.5 ** len(calls)
    # three forms of call, and the first form again for a new sequence length
    assert len(c._variants.graphs()) == 4


def test_an_exported_graph_computes_what_the_model_computes():
    model = bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # one function in train and eval
    c = gnfx.compile(model, optimizer="kfac")
    ids, mask, _, _ = data()
    c.train()(input_ids=ids, attention_mask=mask)
    c.eval()
    torch.testing.assert_close(c.graph_module(input_ids=ids, attention_mask=mask).logits,
                               model(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-6)


def test_low_coverage_warns_with_the_biggest_uncovered_parameters_and_the_fix():
    with pytest.warns(UserWarning, match=r"only .*% of the trainable parameters.*Largest uncovered: attn.*Fix: "):
        gnfx.compile(TinyGPT(), capture="fx", leaf_modules=["attn", "mlp"])


class ShallowOfDeepBackbone(nn.Module):
    """segmentation_models_pytorch's PSPNet at its encoder_depth=3: a backbone built with stages its forward
    never calls (`late`, most of the entries), its head on the early stage."""

    def __init__(self):
        super().__init__()
        self.early = nn.Linear(4, 8)
        self.late = nn.Sequential(nn.Linear(8, 64), nn.Linear(64, 64))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.early(x)))


def test_parameters_the_forward_never_uses_are_told_apart_from_uncovered_ones():
    """Before, the coverage warning said 1.4% of such a model's entries were in curvature blocks and that the
    rest got the diagonal preconditioner; they get no gradient at all (PSPNet: 7.5%, its unused stages 92%
    of the entries). Now it says they are unused and keep their values, and counts the coverage of the used
    ones apart: here every used parameter is in a block, so no coverage figure; with a used one left out (a
    requested leaf), the coverage of the used entries too."""
    with pytest.warns(UserWarning) as caught:
        gnfx.compile(ShallowOfDeepBackbone(), "kfac", lr=0.1)
    said = [str(w.message) for w in caught if str(w.message).startswith("gnfx")]
    assert len(said) == 1
    assert ("4,736 of the 4,803 entries of the trainable parameters are not used by the captured forward" in said[0]
            and "no gradient" in said[0] and "late.1.weight (4,096 entries)" in said[0])
    assert "diagonal preconditioner" not in said[0] and "only" not in said[0]
    with pytest.warns(UserWarning, match=r"not used by the captured forward.*only 59\.7% of the trainable parameters "
                                         r"the captured forward uses \(40 of 67 entries\).*Largest uncovered: head"):
        gnfx.compile(ShallowOfDeepBackbone(), "kfac", lr=0.1, capture="fx", leaf_modules=["head"])
