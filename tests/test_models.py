"""End to end on small models (tests/models.py), and the hand-written linear forms.

For a CNN, a ViT-style and a GPT-style model compiled with capture="auto" and example inputs:

  * the curvature blocks cover more than 95% of the trainable parameter entries (GPT, CNN; every
    parameter of the ViT, its class token a position table: passes/class_tokens.py), and every
    attention projection has its role;
  * the instrumented graph computes the original model's outputs (float64, 1e-12);
  * 30 steps of K-FAC and of Shampoo on one fixed small batch decrease the training loss.

Hand-written linear maps `x @ W.t()`, `x @ W.T`, `x @ W` (W stored (d_in, d_out)),
`torch.addmm(b, x, W)` and `torch.matmul` are linear blocks `z = W a (+ b)` whose statistics
equal those of an nn.Linear twin (hooks; vmap per-example gradients), in both graph forms.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import gnfx
from models import CNN, DTYPE, GPT, ViT, coverage
from references import TOL, cross_entropy, hook_statistics, layer_diag, per_example_fisher_diag

VOCAB, SEQ, BATCH = 48, 8, 6


def gpt_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


def image_batch(seed=0, classes=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, 3, 8, 8, generator=g, dtype=DTYPE), torch.randint(0, classes, (BATCH,), generator=g)


MODELS = {
    "gpt": (GPT, gpt_batch),
    "cnn": (CNN, image_batch),
    "vit-mha": (lambda: ViT(attention="mha"), image_batch),
    "vit-sdpa": (lambda: ViT(attention="sdpa"), image_batch),
}

QKV_OUT = {"attention.qkv", "attention.out"}
GPT_ROLES = {
    "blocks.0.attn.qkv": "attention.qkv", "blocks.0.attn.proj": "attention.out",  # SDPA
    "blocks.1.attn.q": "attention.q", "blocks.1.attn.k": "attention.k",  # hand-written, causal mask
    "blocks.1.attn.v": "attention.v", "blocks.1.attn.out": "attention.out",
    "blocks.2.attn.mha.in_proj": "attention.qkv", "blocks.2.attn.mha.out_proj": "attention.out",  # nn.MHA
}


def compile_auto(name, optimizer="kfac", **hparams):
    make, batch = MODELS[name]
    model, (x, y) = make(), batch()
    return model, gnfx.compile(model, optimizer=optimizer, capture="auto", example_inputs=(x,), **hparams), x, y


# ----------------------------------------------------------------------------- block tables


def test_gpt_blocks_roles_tied_unembedding_and_coverage():
    model, c, x, _ = compile_auto("gpt")
    assert c.layers.form == "fx" and not c.layers.leaves
    assert {b.name: b.role for b in c.layers if b.role} == GPT_ROLES
    emb = c.layers["emb"]
    assert (emb.kind, emb.params, emb.d_in, emb.d_out) == ("linear", ("emb.weight",), 16, VOCAB)
    assert "tied" in c.layers.notes["emb.weight"]
    assert not c.layers.fallbacks  # the position table and the LayerNorms are blocks too
    assert c.layers["pos"].kind == "position" and c.layers["ln"].kind == "norm"
    assert coverage(c, model) == 1.0
    torch.testing.assert_close(c.graph_module(x), model(x), rtol=1e-12, atol=1e-12)


def test_cnn_blocks_and_coverage():
    model, c, x, _ = compile_auto("cnn")
    assert [(b.name, b.kind) for b in c.layers] == [("conv1", "conv"), ("conv2", "conv"), ("head", "linear")]
    assert not c.layers.fallbacks
    assert coverage(c, model) > 0.95
    torch.testing.assert_close(c.graph_module(x), model(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["vit-mha", "vit-sdpa"])
def test_vit_blocks_roles_and_coverage(name):
    model, c, x, _ = compile_auto(name)
    blocks = {b.name: b for b in c.layers}
    assert blocks["patch"].kind == "conv" and blocks["patch"].options["stride"] == (4, 4)
    assert blocks["head"].kind == "linear"
    assert {b.role for b in c.layers if b.role} == QKV_OUT
    assert not c.layers.fallbacks and blocks["cls"].kind == "position"  # a table expanded to the batch
    assert blocks["pos"].kind == "position" and blocks["ln"].kind == "norm"
    assert coverage(c, model) > 0.99
    torch.testing.assert_close(c.graph_module(x), model(x), rtol=1e-12, atol=1e-12)


def test_gpt_in_both_graph_forms_has_the_same_blocks():
    model, (x, _) = GPT(), gpt_batch()
    tables = {}
    for capture in ("fx", "export"):
        c = gnfx.compile(model, optimizer="kfac", capture=capture, example_inputs=(x,))
        assert c.layers.form == capture
        tables[capture] = [(b.name, b.kind, b.params, b.d_in, b.d_out, b.role) for b in c.layers]
    assert tables["fx"] == tables["export"]


# ----------------------------------------------------------------------------- training


LRS = {"kfac": 0.1, "shampoo": 1e-2}


@pytest.mark.parametrize("optimizer", ["kfac", "shampoo"])
@pytest.mark.parametrize("name", ["gpt", "cnn", "vit-mha"])
def test_thirty_steps_decrease_the_training_loss_on_a_fixed_batch(name, optimizer):
    model, c, x, y = compile_auto(name, optimizer, lr=LRS[optimizer])
    losses = []
    for _ in range(30):
        loss = cross_entropy(c(x), y)
        loss.backward()
        c.step()
        c.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses
    assert c.optimizer.steps == 30


# ----------------------------------------------------------------------------- hand-written linear forms


D_IN, D_OUT, CLASSES = 5, 4, 3


class HandLinear(nn.Module):
    """tanh(z) → nn.Linear head, where z is a linear map of x written by hand as `form`."""

    FORMS = {  # form: (weight stored (d_in, d_out)?, bias?, 2-D input only?)
        "x @ W.t()": (False, False, False),
        "x @ W.T": (False, False, False),
        "x @ W": (True, False, False),
        "torch.matmul(x, W.t())": (False, False, False),
        "torch.matmul(x, W)": (True, False, False),
        "torch.addmm(b, x, W)": (True, True, True),
        "x @ W + b": (True, True, False),
        "b + x @ W.t()": (False, True, False),
        "torch.einsum('...i,oi->...o', x, W)": (False, False, False),
        "torch.einsum('oi,...i->...o', W, x)": (False, False, False),
        "torch.einsum('...i,io->...o', x, W) + b": (True, True, False),
        # features off the last dimension, as talking heads mix attention weights' heads ("bhij,hg->bgij")
        "torch.einsum('bit,io->bot', x.transpose(1, 2), W).transpose(1, 2)": (True, False, False),
    }

    def __init__(self, form):
        super().__init__()
        torch.manual_seed(0)
        self.form = form
        stored_in_out, bias, _ = self.FORMS[form]
        self.W = nn.Parameter(torch.randn(D_IN, D_OUT) if stored_in_out else torch.randn(D_OUT, D_IN))
        self.b = nn.Parameter(torch.randn(D_OUT)) if bias else None
        self.head = nn.Linear(D_OUT, CLASSES)
        self.to(DTYPE)

    def forward(self, x):
        form, W = self.form, self.W
        if form == "x @ W.t()":
            z = x @ W.t()
        elif form == "x @ W.T":
            z = x @ W.T
        elif form == "x @ W":
            z = x @ W
        elif form == "torch.matmul(x, W.t())":
            z = torch.matmul(x, W.t())
        elif form == "torch.matmul(x, W)":
            z = torch.matmul(x, W)
        elif form == "x @ W + b":
            z = x @ W + self.b
        elif form == "b + x @ W.t()":
            z = self.b + x @ W.t()
        elif form == "torch.einsum('...i,oi->...o', x, W)":
            z = torch.einsum("...i,oi->...o", x, W)
        elif form == "torch.einsum('oi,...i->...o', W, x)":
            z = torch.einsum("oi,...i->...o", W, x)
        elif form == "torch.einsum('...i,io->...o', x, W) + b":
            z = torch.einsum("...i,io->...o", x, W) + self.b
        elif form == "torch.einsum('bit,io->bot', x.transpose(1, 2), W).transpose(1, 2)":
            z = torch.einsum("bit,io->bot", x.transpose(1, 2), W).transpose(1, 2)
        else:
            z = torch.addmm(self.b, x, W)
        return self.head(torch.tanh(z))


class LinearTwin(nn.Module):
    """The same function with an nn.Linear `lin` whose weight is the matrix W (d_out, d_in)."""

    def __init__(self, hand: HandLinear):
        super().__init__()
        stored_in_out, bias, _ = HandLinear.FORMS[hand.form]
        self.lin = nn.Linear(D_IN, D_OUT, bias=bias).to(DTYPE)
        with torch.no_grad():
            self.lin.weight.copy_(hand.W.T if stored_in_out else hand.W)
            if bias:
                self.lin.bias.copy_(hand.b)
        self.head = nn.Linear(D_OUT, CLASSES).to(DTYPE)
        self.head.load_state_dict(hand.head.state_dict())

    def forward(self, x):
        return self.head(torch.tanh(self.lin(x)))


FORM_CASES = [(form, capture) for form in HandLinear.FORMS for capture in ("fx", "export")]


@pytest.mark.parametrize("form, capture", FORM_CASES)
def test_handwritten_linear_forms_are_blocks_in_the_right_orientation(form, capture):
    """A (d_in side), S (d_out side) and diag ([W b], W as d_out x d_in) equal the nn.Linear twin's."""
    model = HandLinear(form)
    stored_in_out, bias, two_d = HandLinear.FORMS[form]
    g = torch.Generator().manual_seed(1)
    shape = (6, D_IN) if two_d else (4, 3, D_IN)
    x, y = torch.randn(*shape, generator=g, dtype=DTYPE), torch.randint(0, CLASSES, shape[:-1], generator=g)
    twin = LinearTwin(model)
    torch.testing.assert_close(twin(x), model(x), rtol=1e-12, atol=1e-12)
    ref = hook_statistics(twin, ["lin"], x, y)["lin"]
    diag = layer_diag(per_example_fisher_diag(twin, x, y), "lin")

    c = gnfx.compile(model, optimizer="kfac", capture=capture, example_inputs=(x,), stat_every=1,
                     stat_decay=0.0, statistics=("A", "S", "diag"))
    block = c.layers.block_of("W")
    assert block is not None, c.layers.fallbacks
    assert (block.kind, block.d_in, block.d_out) == ("linear", D_IN, D_OUT)
    assert block.params == (("W", "b") if bias else ("W",))
    assert bool(block.options.get("transposed")) == stored_in_out
    assert not c.layers.fallbacks
    cross_entropy(c(x), y).backward()
    c.step()
    got = c.statistics(block.name)
    assert got["A"].shape == (D_IN + bias, D_IN + bias) and got["S"].shape == (D_OUT, D_OUT)
    torch.testing.assert_close(got["A"], ref["A"], **TOL)
    torch.testing.assert_close(got["S"], ref["S"], **TOL)
    torch.testing.assert_close(got["diag"], diag, **TOL)
