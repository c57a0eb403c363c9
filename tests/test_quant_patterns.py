"""Compression-aware training as its users write it, in plain torch stand-ins (benchmarks/quant_probe.py probes the
libraries: benchmarks/results/first_contact_13_quant.md): magnitude pruning with
torch.nn.utils.prune (the parameter moves to `weight_orig`, a `weight_mask` buffer, a forward pre-hook sets
`weight = weight_mask * weight_orig`; passes/pruning.py), float64, against plain-torch references: hooks
on the layer calls for A and S, and a plain nn.Linear holding W whose gradient a tensor hook masks, stepped
by the same optimizer, for the step (gnfx.reparametrization.MaskedWeight)."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from references import TOL, hook_statistics
from steps import compile_for_statistics, statistic_step


def pruned_mlp() -> nn.Sequential:
    """A float64 MLP pruned as the pruning tutorial does: L1-unstructured on the first layer, L2-structured
    (whole input columns) on the second, then 30% more of both at once by global magnitude."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4)).double()
    prune.l1_unstructured(model[0], "weight", amount=0.4)
    prune.ln_structured(model[2], "weight", amount=0.25, n=2, dim=1)
    prune.global_unstructured([(model[0], "weight"), (model[2], "weight")], prune.L1Unstructured, amount=0.3)
    return model


def masked_reference(model: nn.Sequential) -> nn.Sequential:
    """Plain nn.Linear layers holding W = M ⊙ V, their weight gradients masked by M."""
    reference = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4)).double()
    for layer, plain in zip(model[::2], reference[::2]):
        with torch.no_grad():
            plain.weight.copy_(layer.weight_mask * layer.weight_orig)
            plain.bias.copy_(layer.bias)
        plain.weight.register_hook(lambda g, mask=layer.weight_mask: g * mask)
    return reference


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (16,), generator=g)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_pruned_layers_are_blocks_with_the_statistics_of_their_masked_weights(capture):
    """Under torch.fx the pruned layer stayed a module call (its hook computes the weight), so every
    parameter fell back to the diagonal preconditioner; its weight is now mask * weight_orig in the graph."""
    model, (x, y) = pruned_mlp(), batch()
    want = hook_statistics(masked_reference(pruned_mlp()), ["0", "2"], x, y)  # (a pruned module cannot be copied)
    c = compile_for_statistics(model, optimizer="kfac", capture=capture)
    statistic_step(c, x, y)
    covered, total = c.layers.coverage(dict(model.named_parameters()))
    assert covered == total, c.layers.fallbacks
    for name in ("0", "2"):
        for factor in ("A", "S"):
            torch.testing.assert_close(c.statistics(name)[factor], want[name][factor], **TOL)


@pytest.mark.parametrize("optimizer", ["kfac", "shampoo"])
def test_a_pruned_weight_steps_as_a_plain_layer_with_its_gradient_masked(optimizer):
    """One step moves weight_orig by M ⊙ (the step of a plain layer holding W with gradient M ⊙ ∇W): no pruned
    entry moves, decoupled weight decay included."""
    model, (x, y) = pruned_mlp(), batch()
    reference = masked_reference(model)
    settings = dict(optimizer=optimizer, lr=1e-2, weight_decay=0.1)
    c, c_ref = compile_for_statistics(model, **settings), compile_for_statistics(reference, **settings)
    before = [layer.weight_orig.detach().clone() for layer in model[::2]]
    statistic_step(c, x, y)
    statistic_step(c_ref, x, y)
    for layer, plain, v0 in zip(model[::2], reference[::2], before):
        mask = layer.weight_mask
        torch.testing.assert_close(mask * layer.weight_orig, mask * plain.weight, **TOL)
        assert torch.equal(layer.weight_orig[mask == 0], v0[mask == 0])
        assert not torch.allclose(layer.weight_orig[mask != 0], v0[mask != 0])


def test_a_pruned_block_names_prune_remove_as_its_removal():
    """Where gnfx refuses a reparametrized block (under FSDP2) it names the call that removes it: for a pruned
    layer that is prune.remove, not the masked layer's 'no torch call removes it'."""
    model, (x, y) = pruned_mlp(), batch()
    c = compile_for_statistics(model, optimizer="kfac")
    statistic_step(c, x, y)
    assert [b.reparametrization.removal for b in c.layers.blocks] == [
        "torch.nn.utils.prune.remove(model.get_submodule('0'), 'weight')",
        "torch.nn.utils.prune.remove(model.get_submodule('2'), 'weight')"]


def test_pruning_again_while_training_masks_the_steps_with_the_new_mask():
    """Iterative pruning calls prune.l1_unstructured again between steps, which registers a new `weight_mask`
    tensor: the block's pull-back read the mask of the capture, so the entries pruned since moved."""
    model, (x, y) = pruned_mlp(), batch()
    c = compile_for_statistics(model, optimizer="kfac", lr=1e-2)
    statistic_step(c, x, y)
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    mask, v0 = model[0].weight_mask, model[0].weight_orig.detach().clone()
    for _ in range(2):
        statistic_step(c, x, y)
    assert torch.equal(model[0].weight_orig[mask == 0], v0[mask == 0])
    # the model still computes mask * weight_orig, as the same pruned model stepped eagerly does
    with torch.no_grad():
        torch.testing.assert_close(c(x), F.linear(torch.tanh(F.linear(x, mask * model[0].weight_orig, model[0].bias)),
                                                   model[2].weight_mask * model[2].weight_orig, model[2].bias), **TOL)


def test_a_pruned_bias_falls_back_and_trains_masked():
    """Pruning the bias too (`prune.l1_unstructured(layer, "bias", ...)`): the weight stays a block, the
    masked bias of one dimension falls back to the diagonal preconditioner, its pruned entries unmoved."""
    model, (x, y) = pruned_mlp(), batch()
    prune.l1_unstructured(model[0], "bias", amount=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = compile_for_statistics(model, optimizer="kfac", lr=1e-2)
        statistic_step(c, x, y)
    fallbacks = [f.param for f in c.layers.fallbacks]
    assert fallbacks == ["0.bias_orig"], c.layers.fallbacks
    mask, b0 = model[0].bias_mask, model[0].bias_orig.detach().clone()
    statistic_step(c, x, y)
    assert torch.equal(model[0].bias_orig[mask == 0], b0[mask == 0])


class ReadsItsWeight(nn.Module):
    """A layer with a forward of its own (torch.fx traces through it, running its pre-hooks while tracing)."""

    def __init__(self):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(5, 6) / 3), nn.Parameter(torch.zeros(5))

    def forward(self, x):
        return x @ self.weight.T + self.bias


class PrunedAttention(nn.Module):
    """nn.MultiheadAttention with its `in_proj_weight` pruned, and a traced-through layer with its weight pruned."""

    def __init__(self):
        super().__init__()
        self.mha, self.mix, self.head = nn.MultiheadAttention(6, 2, batch_first=True), ReadsItsWeight(), nn.Linear(5, 3)
        prune.l1_unstructured(self.mha, "in_proj_weight", amount=0.5)
        prune.l1_unstructured(self.mix, "weight", amount=0.5)

    def forward(self, x):
        h, _ = self.mha(x, x, x)
        return self.head(torch.tanh(self.mix(h)).mean(1))


def test_a_pruned_tensor_read_inside_a_traced_module_is_computed_on_every_call():
    """The graph read the `in_proj_weight` and `weight` the hooks had set (nn.MultiheadAttention's lowering reads
    the attribute; torch.fx, tracing through the custom layer, kept the tensor its hook computed as a constant,
    with that call's autograd graph): stale values (here float32, from before `.double()`: the forward raised a
    dtype mismatch; in float32 the second statistic step's backward raised 'Trying to backward through the graph
    a second time'). Each is now mask * orig in the graph: over 3 statistic steps the compiled model's loss and
    gradients equal the eager module's (its hooks run), and both weights are blocks."""
    torch.manual_seed(0)
    model = PrunedAttention().double()
    torch.manual_seed(0)
    reference = PrunedAttention().double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 4, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
    c = compile_for_statistics(model, optimizer="kfac", lr=1e-2)
    for _ in range(3):
        loss, loss_ref = F.cross_entropy(c(x), y), F.cross_entropy(reference(x), y)
        loss.backward()
        loss_ref.backward()
        torch.testing.assert_close(loss, loss_ref, **TOL)
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, **TOL, msg=name)
        c.step()
        c.zero_grad()
        reference.zero_grad()
        reference.load_state_dict(model.state_dict())
    covered, total = c.layers.coverage(dict(model.named_parameters()))
    assert covered == total, c.layers.fallbacks


def test_quant_probe_reports_its_pruned_models_in_blocks_and_exact():
    """benchmarks.quant_probe's pruned models need torch alone: one row with the capture, 100% in blocks, the float64
    lockstep gaps 0 and the factors against hooks."""
    from benchmarks import quant_probe
    row = quant_probe.probe("prune_mlp", "kfac_lr", steps=2).split(" | ")
    assert row[2:4] == ["fx", "100.0%"], row
    gaps, factors = row[4].split("; ")
    assert gaps == "0e+00, 0e+00" and factors.endswith("(3 linear)"), row
    assert all(float(gap.split()[1].strip(",")) < 1e-12 for gap in factors.split(" (")[0].split(", ")), row


def test_a_pruned_model_that_is_itself_the_layer_is_a_block():
    """The compiled model itself pruned (`prune.l1_unstructured(linear, "weight", ...)` on the module handed to
    gnfx.compile): torch.fx traces its forward without its hook, reading the tensor pruning set as a constant; it
    is mask * orig of the model's own tensors, so the layer is a block and its gradients are the eager module's."""
    torch.manual_seed(0)
    model = nn.Linear(6, 4).double()
    prune.l1_unstructured(model, "weight", amount=0.5)
    torch.manual_seed(0)
    reference = nn.Linear(6, 4).double()
    prune.l1_unstructured(reference, "weight", amount=0.5)
    x, y = batch()
    c = compile_for_statistics(model, optimizer="kfac", lr=1e-2)
    for _ in range(2):
        F.cross_entropy(c(x), y).backward()
        F.cross_entropy(reference(x), y).backward()
        torch.testing.assert_close(model.weight_orig.grad, reference.weight_orig.grad, **TOL)
        c.step()
        c.zero_grad()
        reference.zero_grad()
        reference.load_state_dict(model.state_dict())
    covered, total = c.layers.coverage(dict(model.named_parameters()))
    assert covered == total, c.layers.fallbacks
