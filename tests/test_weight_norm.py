"""Weight-normed layers (W = g · v / ‖v‖) as curvature blocks (gnfx.reparametrization, passes/weight_norm.py),
float64, against plain-torch references: the same layer with W as a leaf tensor (autograd), and
torch.func.jvp of the weight-norm function."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm as parametrized_weight_norm

import gnfx
from gnfx.reparametrization import WeightNorm
from steps import train, train_in_blocks


def hooked_weight_norm(module, dim=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old API is deprecated, still widely used
        return torch.nn.utils.weight_norm(module, dim=dim)


APIS = {"parametrization": parametrized_weight_norm, "hook": hooked_weight_norm}
NAMES = {"parametrization": ("0.parametrizations.weight.original0", "0.parametrizations.weight.original1"),
         "hook": ("0.weight_g", "0.weight_v")}


def layer_model(layer: str, api: str | None, dim=0) -> tuple[nn.Module, torch.Tensor]:
    """(a model whose first layer is weight-normed, by `api`, or plain for None; an input batch), float64."""
    torch.manual_seed(0)
    if layer == "linear":
        first, x, width = nn.Linear(6, 5), torch.randn(8, 6), 5
    elif layer == "conv1d":
        first, x, width = nn.Conv1d(3, 4, 3, padding=1), torch.randn(8, 3, 5), 4 * 5
    elif layer == "conv2d":
        first, x, width = nn.Conv2d(2, 3, 3, padding=1), torch.randn(8, 2, 4, 4), 3 * 16
    elif layer == "pos_conv":  # wav2vec2's positional convolution: grouped, normalized over the kernel (dim=2)
        first, x, width = nn.Conv1d(4, 4, 3, padding=1, groups=2), torch.randn(8, 4, 5), 4 * 5
    else:  # HiFi-GAN's upsampling: a transposed convolution, whose dim=0 is its input channels
        first, x, width = nn.ConvTranspose1d(3, 4, 3, stride=2), torch.randn(8, 3, 5), 4 * 11
    first = first if api is None else APIS[api](first, dim=dim)
    model = nn.Sequential(first, nn.Tanh(), nn.Flatten(), nn.Linear(width, 3)).double()
    return model, x.double()


def effective_weight(model: nn.Module, api: str, dim=0) -> torch.Tensor:
    """W = g · v / ‖v‖ of the first layer, from its parameters."""
    g, v = (dict(model.named_parameters())[n] for n in NAMES[api])
    return torch._weight_norm(v, g, dim).detach()


def plain_copy(model: nn.Module, layer: str, api: str, dim=0) -> nn.Module:
    """The same model with the first layer's weight W a plain parameter (independent of gnfx and of
    torch's weight-norm machinery, whose removal on a copy would edit the class both share)."""
    plain, _ = layer_model(layer, None, dim)
    with torch.no_grad():
        plain[0].weight.copy_(effective_weight(model, api, dim))
        plain[0].bias.copy_(model[0].bias)
        plain[3].load_state_dict(model[3].state_dict())
    return plain


def compiled(model, x, capture, **hp):
    settings = dict(lr=1e-2, momentum=0.0, weight_decay=0.0, kl_clip=0.0, damping=0.1, stat_every=1, inv_every=1)
    settings.update(hp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gnfx.compile(model, optimizer=settings.pop("optimizer", "kfac"), capture=capture,
                            example_inputs=(x,), **settings)


@pytest.mark.parametrize("layer", ["linear", "conv1d", "conv2d"])
@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("api", ["parametrization", "hook"])
def test_weight_normed_layer_is_a_block(api, capture, layer):
    model, x = layer_model(layer, api)
    cm = compiled(model, x, capture)
    table = cm.layers
    g, v = NAMES[api]
    assert not table.fallbacks, table
    block = table["0"]
    assert block.kind == ("linear" if layer == "linear" else "conv")
    assert block.weight == v and block.reparametrization == WeightNorm("0.weight", g, v, 0)
    assert table.block_of(g) is block and table.block_of(v) is block
    covered, total = table.coverage(dict(model.named_parameters()))
    assert covered == total
    assert f"{g}" in repr(cm) and "block 0" in repr(cm)  # the registration table lists g under the block


@pytest.mark.parametrize("layer", ["linear", "conv2d"])
@pytest.mark.parametrize("api", ["parametrization", "hook"])
def test_gathered_gradient_is_the_weight_gradient(api, layer):
    model, x = layer_model(layer, api)
    plain = plain_copy(model, layer, api)
    cm = compiled(model, x, "fx")
    g_name, v_name = NAMES[api]
    with torch.no_grad():
        dict(model.named_parameters())[g_name][1] = 0.0  # a row at g_r = 0 (the pseudo-inverse)
        plain[0].weight[1] = 0.0
    cm(x).square().sum().backward()
    plain(x).square().sum().backward()
    store = cm.optimizer.parameter_store
    store.gather()
    gathered = store.param(v_name).grad
    reference = plain[0].weight.grad
    rows = [r for r in range(reference.shape[0]) if r != 1]
    torch.testing.assert_close(gathered[rows], reference[rows], rtol=1e-10, atol=1e-12)
    # at g_r = 0 only the component along v̂_r is recoverable (∇g_r = v̂_rᵀ ∇W_r, ∇v_r = 0)
    v = dict(model.named_parameters())[v_name][1].flatten()
    unit = v / v.norm()
    torch.testing.assert_close(gathered[1].flatten(), unit * (unit @ reference[1].flatten()), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(store.param(v_name).detach(), plain[0].weight.detach())
    store.scatter()  # no change of the stand-in: the parameters stay
    assert store.param(v_name) is dict(model.named_parameters())[v_name]


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_pull_back_is_the_jacobians_preimage(dim):
    torch.manual_seed(1)
    v = torch.randn(4, 3, 2, dtype=torch.float64)
    g = torch.randn_like(torch.norm_except_dim(v, 2, dim))
    g.reshape(-1)[0] = 0.0 if dim != -1 else g.reshape(-1)[0]  # a row at g_r = 0
    wn = WeightNorm("w", "g", "v", dim)
    delta_w = torch.randn_like(v)
    pulled = wn.pull_back({"g": g, "v": v}, delta_w)
    delta_g, delta_v = pulled["g"], pulled["v"]
    # W = g · v / ‖v‖ written out (the fused kernel, and norm_except_dim at dim=-1, have no forward-mode
    # derivative)
    def norm(v):
        return v.norm() if dim == -1 else torch.norm_except_dim(v, 2, dim)
    _, image = torch.func.jvp(lambda g, v: v * (g / norm(v)), (g, v), (delta_g, delta_v))
    expected = delta_w.clone()
    if dim != -1:  # at g_r = 0 the image is ΔW_r's component along v̂_r
        row = v.select(dim, 0)
        unit = row / row.norm()
        expected.select(dim, 0).copy_(unit * (unit * delta_w.select(dim, 0)).sum())
    torch.testing.assert_close(image, expected, rtol=1e-10, atol=1e-12)
    # Δv ⟂ v row by row (the least-norm preimage)
    torch.testing.assert_close(wn.row_sum(delta_v * v), torch.zeros_like(wn.row_sum(v)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("layer, dim", [("linear", 0), ("conv1d", 0), ("pos_conv", 2), ("conv_transpose1d", 0)])
@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("api", ["parametrization", "hook"])
def test_kfac_step_moves_w_as_for_a_plain_layer(api, capture, layer, dim):
    """One K-FAC step (with momentum and weight decay) on the weight-normed model moves W, to first order in
    lr, as the same step moves the plain layer holding W: the same factors, the same direction in W's space."""
    model, x = layer_model(layer, api, dim)
    plain = plain_copy(model, layer, api, dim)
    lr = 1e-6
    steps = []
    for m in (model, plain):
        cm = compiled(m, x, capture, lr=lr, weight_decay=0.1, momentum=0.9)
        before = plain[0].weight.detach().clone() if m is plain else effective_weight(m, api, dim)
        cm(x).square().sum().backward()
        cm.step()
        assert not cm.layers.fallbacks
        after = plain[0].weight.detach() if m is plain else effective_weight(m, api, dim)
        steps.append((after - before) / lr)
    assert steps[1].abs().max() > 1e-2
    torch.testing.assert_close(steps[0], steps[1], rtol=1e-4, atol=1e-6)
    # the bias, a plain parameter of both blocks, moves alike
    torch.testing.assert_close(model[0].bias, plain[0].bias, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("frozen_magnitude", [False, True])
@pytest.mark.parametrize("api", ["parametrization", "hook"])
@pytest.mark.parametrize("capture", ["fx", "export"])
def test_training_at_defaults(api, capture, frozen_magnitude):
    """kfac at its defaults (the quadratic-model step) lowers the loss, and the compiled model's outputs
    equal the original model's over the calls; with the last layer's magnitudes g frozen (DINO's head) too,
    g unmoved."""
    torch.manual_seed(0)
    model = nn.Sequential(APIS[api](nn.Linear(10, 16)), nn.Tanh(), APIS[api](nn.Linear(16, 4))).double()
    magnitudes = [p for n, p in model[2].named_parameters() if n.endswith(("weight_g", "original0"))]
    for g in magnitudes:
        g.requires_grad_(not frozen_magnitude)
    before = [g.detach().clone() for g in magnitudes]
    x, y = torch.randn(64, 10, dtype=torch.float64), torch.randint(0, 4, (64,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = gnfx.compile(model, optimizer="kfac", loss="cross_entropy", capture=capture)
    losses = []
    for _ in range(8):
        out = cm(x)
        torch.testing.assert_close(out, model(x), rtol=0, atol=0)
        loss = F.cross_entropy(out, y)
        losses.append(loss.item())
        cm.zero_grad()
        loss.backward()
        cm.step()
    assert len(cm.layers) == 2 and not cm.layers.fallbacks
    # frozen: the output rows' norms pinned at their initial g, a smaller model (1.387 -> 0.976 in 8 steps)
    assert losses[-1] < (0.75 if frozen_magnitude else 0.7) * losses[0], losses
    if frozen_magnitude:
        for g, g_before in zip(magnitudes, before):
            torch.testing.assert_close(g.detach(), g_before, rtol=0, atol=0)


@pytest.mark.parametrize("optimizer", ["ekfac", "shampoo", "rank1", "diag", "soap", "muon"])
def test_other_preconditioners_step_weight_normed_blocks(optimizer):
    """The other preconditioners see the W-space gradient matrix too: a few steps lower the loss."""
    model, x = layer_model("conv1d", "parametrization")
    y = torch.randn(8, 3, dtype=torch.float64)
    losses = train_in_blocks(model, x, y, optimizer)
    assert losses[-1] < losses[0], losses


def test_weight_norm_over_the_whole_tensor():
    """dim=None (torch's -1: one norm over the whole weight) is a block too, and its step moves W as the
    plain layer's does."""
    model, x = layer_model("linear", "parametrization", dim=None)
    assert model[0].parametrizations.weight[0].dim == -1
    plain = plain_copy(model, "linear", "parametrization", dim=-1)
    lr, steps = 1e-6, []
    for m in (model, plain):
        cm = compiled(m, x, "fx", lr=lr)
        assert not cm.layers.fallbacks
        before = m[0].weight.detach().clone()
        cm(x).square().sum().backward()
        cm.step()
        steps.append((m[0].weight.detach() - before) / lr)
    torch.testing.assert_close(steps[0], steps[1], rtol=1e-4, atol=1e-6)


def test_weight_norm_with_other_uses_falls_back_with_reason():
    """A g also read outside the weight norm: the layer cannot be a block over W; the report says why."""
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = parametrized_weight_norm(nn.Linear(4, 3))

        def forward(self, x):
            return self.fc(x) + self.fc.parametrizations.weight.original0.sum()

    model, x = Model().double(), torch.randn(5, 4, dtype=torch.float64)
    cm = compiled(model, x, "fx")
    reasons = {f.param: f.reason for f in cm.layers.fallbacks}
    assert "fc.parametrizations.weight.original1" in reasons
    assert "also used by another operation" in reasons["fc.parametrizations.weight.original1"]


@pytest.mark.parametrize("optimizer", ["kfac", "diag"])
def test_diagnose_measures_the_block_in_w_space(optimizer):
    """gnfx.diagnose of a weight-normed block measures its preconditioner against the GGN in W's space,
    G_W = Pᵀ G_θ P: the same curvature error and cosine as for the plain layer holding W, after the same
    step (lr 1e-10: the two models' W differ at second order only)."""
    model, x = layer_model("conv1d", "parametrization")
    plain = plain_copy(model, "conv1d", "parametrization")
    y = torch.randn(8, 3, dtype=torch.float64)
    records = []
    for m in (model, plain):
        cm = compiled(m, x, "fx", optimizer=optimizer, lr=1e-10) if optimizer == "kfac" else gnfx.compile(
            m, optimizer="diag", lr=1e-10, capture="fx", example_inputs=(x,))
        F.mse_loss(cm(x), y).backward()
        cm.step()
        records.append({r.name: r for r in gnfx.diagnose(cm, (x, y), "mse", cg_tol=1e-12, cg_max_iter=1000,
                                                         verbose=False)})
    wn, reference = records[0]["0"], records[1]["0"]
    assert wn.size == reference.size
    if optimizer == "kfac":
        assert wn.curvature_error == pytest.approx(reference.curvature_error, rel=1e-6)
    assert wn.cosine == pytest.approx(reference.cosine, rel=1e-6, abs=1e-9)


def test_tied_weight_norm_conv_transpose_and_a_checkpoint():
    """A weight-normed layer called twice (one block, two sites: fx computes the weight at each call), a
    weight-normed ConvTranspose1d (HiFi-GAN's upsampling; dim=0 normalizes over its input channels), and
    a checkpoint of their state that resumes bit for bit; `model.cost()` counts g in its block."""
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = parametrized_weight_norm(nn.Linear(5, 5))
            self.up = hooked_weight_norm(nn.ConvTranspose1d(5, 2, 3, stride=2))

        def forward(self, x):
            h = torch.tanh(self.shared(torch.tanh(self.shared(x))))
            return self.up(h.unsqueeze(-1)).flatten(1)

    def make():
        torch.manual_seed(0)
        return Model().double()

    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 6, dtype=torch.float64)

    def train(cm, steps):
        for _ in range(steps):
            F.mse_loss(cm(x), y).backward()
            cm.step()
            cm.zero_grad()

    model = make()
    cm = compiled(model, x, "fx")
    assert not cm.layers.fallbacks
    assert len(cm.layers["shared"].sites) == 2 and cm.layers["up"].kind == "conv_transpose"
    cost = {r.name: r.params for r in cm.cost().rows}
    assert cost["shared"] == 5 * 5 + 5 + 5 and cost["up"] == 5 * 2 * 3 + 5 + 2
    train(cm, 2)
    saved = copy.deepcopy((model.state_dict(), cm.optimizer.state_dict()))
    train(cm, 2)
    resumed_model = make()
    resumed = compiled(resumed_model, x, "fx")
    resumed_model.load_state_dict(saved[0])
    resumed.optimizer.load_state_dict(saved[1])
    train(resumed, 2)
    for (name, p), q in zip(model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(p, q), name


def test_a_step_at_a_zero_magnitude_row_moves_only_its_magnitude():
    """A row with g_r = 0 (W_r = 0): the step is finite, g_r moves by v̂_rᵀ ΔW_r and v_r stays (the
    pseudo-inverse, gnfx.reparametrization); the other rows move."""
    model, x = layer_model("linear", "parametrization")
    g, v = (dict(model.named_parameters())[n] for n in NAMES["parametrization"])
    with torch.no_grad():
        g[1] = 0.0
    cm = compiled(model, x, "fx")
    assert cm.layers.block_of(NAMES["parametrization"][0]) is cm.layers["0"]
    g_before, v_before = g.detach().clone(), v.detach().clone()
    cm(x).square().sum().backward()
    cm.step()
    assert torch.isfinite(g).all() and torch.isfinite(v).all()
    assert g[1].item() != 0.0 and torch.equal(v[1], v_before[1])
    assert not torch.equal(v[0], v_before[0]) and not torch.equal(g[0], g_before[0])


def test_a_step_that_raises_leaves_no_stand_in():
    """A step whose update raises (here the generated update function) leaves the parameters as they
    were and no stand-in of W behind: the store then gives v itself again."""
    model, x = layer_model("linear", "parametrization")
    cm = compiled(model, x, "fx")
    g, v = (dict(model.named_parameters())[n] for n in NAMES["parametrization"])
    before = [g.detach().clone(), v.detach().clone()]
    cm(x).square().sum().backward()

    def failing(*args):
        raise RuntimeError("update failed")

    cm.optimizer.update_function.fn = failing
    with pytest.raises(RuntimeError, match="update failed"):
        cm.step()
    store = cm.optimizer.parameter_store
    assert store.param(NAMES["parametrization"][1]) is v and not store.reparametrizations.standins
    assert torch.equal(g, before[0]) and torch.equal(v, before[1])


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("api", ["parametrization", "hook"])
def test_a_frozen_magnitude_is_a_block_that_steps_v_alone(api, capture):
    """DINO's head (lightly's DINOProjectionHead at norm_last_layer=True) weight-norms its last layer with g
    frozen at 1; the layer fell back ("used by call_function '_weight_norm', not a layer"). It is a block: one
    K-FAC step (momentum, weight decay) moves W, to first order in lr, as the same step moves the plain layer
    holding W with its gradient's component along each row's v̂_r taken out (∇v carries none of it) and that
    component taken out of the change (W_r = g_r v̂_r moves only orthogonally to v̂_r); g stays."""
    model, x = layer_model("linear", api)
    g_name, v_name = NAMES[api]
    named = dict(model.named_parameters())
    named[g_name].requires_grad_(False)
    g_before = named[g_name].detach().clone()
    plain = plain_copy(model, "linear", api)
    v = named[v_name].detach()
    unit = v / v.norm(dim=1, keepdim=True)

    def off_unit(m):
        return m - unit * (unit * m).sum(1, keepdim=True)
    lr = 1e-6
    steps = []
    for m in (model, plain):
        cm = compiled(m, x, capture, lr=lr, weight_decay=0.1, momentum=0.9)
        before = plain[0].weight.detach().clone() if m is plain else effective_weight(m, api)
        cm(x).square().sum().backward()
        if m is plain:
            plain[0].weight.grad = off_unit(plain[0].weight.grad)
        cm.step()
        assert not cm.layers.fallbacks, cm.layers.fallbacks
        covered, total = cm.layers.coverage(dict(m.named_parameters()))
        assert covered == total
        after = plain[0].weight.detach() if m is plain else effective_weight(m, api)
        steps.append((after - before) / lr)
    assert steps[1].abs().max() > 1e-2
    torch.testing.assert_close(steps[0], off_unit(steps[1]), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(named[g_name].detach(), g_before, rtol=0, atol=0)
