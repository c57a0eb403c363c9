"""The training recipes a user wraps around a compiled model (benchmarks/results/first_contact_14_recipes.md),
written as their own documentation shows them, against the same recipe on plain torch (float64):

- a number a traced forward reads, changed after gnfx.compile (a dropout or drop-path schedule, a batch norm's
  momentum, an annealed temperature): the statistic steps run the graph, which held the old value as a
  constant, so their forward computed another model than the user's, silently; now captured again;
- a layer frozen at compile and unfrozen later: the error says how to freeze for a while;
- stochastic weight averaging (torch.optim.swa_utils: AveragedModel, SWALR, update_bn) and timm's state_dict
  EMA (ModelEmaV2, written as timm writes it), gradient clipping by value, a backbone frozen after compile
  and unfrozen, Hugging Face's "no_decay" param groups: each as the recipe does it with torch.optim.AdamW.
"""
from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx


def drop_path(x, drop_prob: float, training: bool):
    """timm's drop_path: each example's residual branch dropped with probability drop_prob, rescaled."""
    if drop_prob == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - drop_prob)
    return x * keep / (1 - drop_prob)


class DropPath(nn.Module):
    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training)


class Scheduled(nn.Module):
    """A residual MLP with the numbers recipes schedule: dropout p, drop-path rate, batch-norm momentum and
    eps, a temperature dividing the logits."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 8)
        self.drop, self.drop_path, self.head = nn.Dropout(0.5), DropPath(0.5), nn.Linear(8, 3)
        self.tau = 1.0

    def forward(self, x):
        h = torch.tanh(self.bn(self.a(x)))
        h = h + self.drop_path(torch.tanh(self.b(h)))
        return self.head(self.drop(h)) / self.tau


def examples(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def batches(count, n=16):
    return [examples(n, seed) for seed in range(1, count + 1)]


def step(model, optimizer, x, y, clip=None):
    F.cross_entropy(model(x), y).backward()
    if clip is not None:
        clip(model.parameters())
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_numbers_changed_after_capture_are_the_ones_statistic_steps_compute_with(capture):
    """After a step, the recipe sets dropout p and the drop-path rate to 0 (ConvNeXt's early-dropout
    schedule writes them at every step), the batch norm's momentum and eps, and the temperature: the forward
    of the next statistic step (its graph) gives the output and running statistics of the model's own forward
    with these values, said once; a schedule keeps one graph, and unchanged numbers capture nothing again."""
    torch.manual_seed(0)
    model = Scheduled().double()
    x, y = examples()
    c = gnfx.compile(model, "kfac", lr=1e-2, stat_every=1, capture=capture, example_inputs=(x,))
    step(c, c.optimizer, x, y)
    step(c, c.optimizer, x, y)
    assert len(c._variants.graphs()) == 1
    model.drop.p, model.drop_path.drop_prob, model.tau = 0.0, 0.0, 2.0
    model.bn.momentum, model.bn.eps = 0.5, 0.1
    reference = copy.deepcopy(model)
    with pytest.warns(RuntimeWarning, match=r"drop_path.drop_prob 0.5 -> 0.0.*captured again at every statistic step"):
        out = c(x)
    torch.testing.assert_close(out, reference(x), rtol=1e-12, atol=1e-12)
    for (name, buffer), kept in zip(model.named_buffers(), reference.buffers()):
        torch.testing.assert_close(buffer, kept, rtol=1e-12, atol=1e-12, msg=name)
    F.cross_entropy(out, y).backward()
    c.step()
    c.zero_grad()
    for momentum in (0.3, 0.2):  # a schedule: one graph, the latest values'
        model.bn.momentum = momentum
        step(c, c.optimizer, x, y)
    assert len(c._variants.graphs()) == 1


class CountingFunction(nn.Module):
    """An ODE function counting its evaluations, as torchdiffeq's examples do (`self.nfe += 1`)."""

    def __init__(self):
        super().__init__()
        self.layer, self.nfe = nn.Linear(4, 4), 0

    def forward(self, x):
        self.nfe += 1
        return torch.tanh(self.layer(x))


def test_a_counter_an_opaque_submodule_increments_captures_nothing_again():
    """torch.fx keeps the counting submodule opaque (its layer opened) and the module runs its own code at each call,
    reading its counter there: the counter is no number the graph holds. It was keyed (the opened submodule was not
    taken for a called one), so every statistic step traced the forward again and warned of a changed number."""
    torch.manual_seed(0)
    model = nn.Sequential(CountingFunction(), nn.Linear(4, 3)).double()
    x, y = examples()[0][:, :4], examples()[1]
    c = gnfx.compile(model, "kfac", lr=1e-2, stat_every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(3):
            step(c, c.optimizer, x, y)
    assert model[0].nfe == 3  # one evaluation a call (the first call's check of its graph leaves no trace)
    assert c.layers.leaves.keys() == {"0"} and len(c._variants._graphs) == 1


def test_a_layer_unfrozen_after_compile_is_named_with_the_recipe_that_freezes_for_a_while():
    torch.manual_seed(0)
    model = Scheduled().double()
    model.a.requires_grad_(False)
    c = gnfx.compile(model, "kfac", lr=1e-2, stat_every=1)
    x, y = examples()
    step(c, c.optimizer, x, y)
    model.a.requires_grad_(True)
    with pytest.raises(gnfx.GnfxError, match=r"'a.weight' was created, replaced or unfrozen.*freeze them after "
                                             r"gnfx.compile \(module.requires_grad_\(False\)\)"):
        step(c, c.optimizer, x, y)
    with pytest.raises(gnfx.ConfigError, match=r"freeze them after gnfx.compile"):
        c.optimizer.add_param_group({"params": list(model.a.parameters())})


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()


def adamw(model, weight_decay=0.01):
    """gnfx's "diag" (AdamW) beside torch.optim.AdamW at the same settings."""
    return gnfx.compile(model, "diag", lr=1e-2, weight_decay=weight_decay)


@pytest.mark.parametrize("name", ["kfac", "diag"])
def test_stochastic_weight_averaging_with_swalr_and_update_bn_averages_the_compiled_models_steps(name):
    """torch's SWA recipe on the compiled model: AveragedModel(model) (a copy of the module compiled, its
    own tensors), SWALR(model.optimizer) annealing the groups' lr to swa_lr, update_parameters after each
    epoch, update_bn over the loader: the average of the epochs' parameters, with the running statistics
    of a batch norm recomputed at it, as on a plain copy; the compiled model's own buffers untouched."""
    from torch.optim.swa_utils import SWALR, AveragedModel, update_bn
    model = small_net()
    c = gnfx.compile(model, name, lr=1e-2)
    with pytest.warns(RuntimeWarning, match="copy.deepcopy of a compiled model"):
        swa_model = AveragedModel(c)
    scheduler = SWALR(c.optimizer, swa_lr=0.05, anneal_epochs=2)
    loader = batches(3)
    snapshots = []
    for _ in range(3):
        for x, y in loader:
            step(c, c.optimizer, x, y)
        swa_model.update_parameters(c)
        scheduler.step()
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert [g["lr"] for g in c.optimizer.param_groups] == [0.05]
    running = model[1].running_mean.clone()
    update_bn([(x,) for x, _ in loader], swa_model)
    reference = copy.deepcopy(model)
    reference.load_state_dict({n: sum(s[n] for s in snapshots) / 3 for n in snapshots[0]}, strict=False)
    update_bn([(x,) for x, _ in loader], reference)
    for (n, t), r in zip(swa_model.module.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(t, r, rtol=1e-12, atol=1e-14, msg=n)
    assert torch.equal(model[1].running_mean, running)
    x, _ = examples()
    torch.testing.assert_close(swa_model.eval()(x), reference.eval()(x), rtol=1e-12, atol=1e-14)


class ModelEmaV2(nn.Module):
    """timm's ModelEmaV2 as timm writes it: a deep copy, and `ema_v.copy_(...)` over the state_dict values."""

    def __init__(self, model, decay=0.9):
        super().__init__()
        self.module = copy.deepcopy(model)
        self.module.eval()
        self.decay = decay

    @torch.no_grad()
    def update(self, model):
        for ema_v, model_v in zip(self.module.state_dict().values(), model.state_dict().values()):
            ema_v.copy_(self.decay * ema_v + (1.0 - self.decay) * model_v)


def test_timms_state_dict_ema_follows_the_compiled_model():
    model = small_net()
    c = gnfx.compile(model, "kfac", lr=1e-2)
    with pytest.warns(RuntimeWarning, match="copy.deepcopy of a compiled model"):
        ema = ModelEmaV2(c)
    expected = {n: t.clone() for n, t in model.state_dict().items()}
    for x, y in batches(3):
        step(c, c.optimizer, x, y)
        ema.update(c)
        expected = {n: (0.9 * expected[n] + 0.1 * t).to(t.dtype) for n, t in model.state_dict().items()}
    for n, t in ema.module.state_dict().items():
        torch.testing.assert_close(t, expected[n], rtol=1e-12, atol=1e-14, msg=n)


def recipe_pair(weight_decay=0.01):
    """The compiled "diag" model and a plain copy with torch.optim.AdamW (lr 1e-2)."""
    model, reference = small_net(), small_net()
    c = adamw(model, weight_decay)
    return model, c, reference, torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=weight_decay)


def assert_same_parameters(model, reference):
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


@pytest.mark.parametrize("clip", [lambda ps: nn.utils.clip_grad_value_(ps, 0.01),
                                  lambda ps: nn.utils.clip_grad_norm_(ps, 0.05)], ids=["value", "norm"])
def test_clipped_gradients_step_as_torch_adamw_steps_them(clip):
    model, c, reference, optimizer = recipe_pair()
    for x, y in batches(4):
        step(c, c.optimizer, x, y, clip)
        step(reference, optimizer, x, y, clip)
    assert_same_parameters(model, reference)


def test_a_backbone_frozen_after_compile_and_unfrozen_steps_as_torch_adamw():
    """The fine-tuning recipe: the first layer frozen (requires_grad_(False)) for some steps, then trained:
    AdamW skips a parameter without a gradient (no moment, no step count, no decay), and so does gnfx."""
    model, c, reference, optimizer = recipe_pair()
    for frozen in (True, False):
        model[0].requires_grad_(not frozen)
        reference[0].requires_grad_(not frozen)
        for x, y in batches(3):
            step(c, c.optimizer, x, y)
            step(reference, optimizer, x, y)
    assert_same_parameters(model, reference)


def test_hugging_faces_no_decay_param_groups_step_as_torch_adamw():
    """Hugging Face's grouping (no weight decay on biases and norm weights, here a group of its own lr too),
    handed to the compiled model's optimizer with `optimizer_for`, as to torch.optim.AdamW."""
    no_decay = ("bias", "1.weight")

    def grouped(m):
        named = list(m.named_parameters())
        return [{"params": [p for n, p in named if not any(k in n for k in no_decay)], "weight_decay": 0.1},
                {"params": [p for n, p in named if any(k in n for k in no_decay)], "weight_decay": 0.0, "lr": 3e-3}]

    model, reference = small_net(), small_net()
    c = adamw(model)
    optimizer = c.optimizer_for(grouped(model), lr=1e-2)
    torch_optimizer = torch.optim.AdamW(grouped(reference), lr=1e-2)
    for x, y in batches(4):
        step(c, optimizer, x, y)
        step(reference, torch_optimizer, x, y)
    assert_same_parameters(model, reference)
