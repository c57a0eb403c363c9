"""Molecular and atomistic training patterns in plain torch (benchmarks/molecular_probe.py runs e3nn and MACE
themselves): an interatomic potential whose energy E is pooled per molecule from per-atom terms
(`index_add` over the atoms' molecule ids), its messages weighted by a radial-basis MLP of the distances
(weights as activations), trained on its forces F = -∂E/∂x from `torch.autograd.grad(E.sum(), x,
create_graph=True)` and a loss of E and F, whose backward is a double backward.

The reference is plain autograd on a copy of the model: forward hooks keep each linear layer's input a and
output z, and torch.autograd.grad of the loss with respect to those z gives g, so that A = mean [a 1][a 1]ᵀ over
the rows (edges, atoms) and S = M Σ g gᵀ with M the molecules, the first dimension of E (docs/design.md §1).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx

TOL = dict(rtol=1e-10, atol=1e-12)
SIZES = (3, 5, 4)  # atoms per molecule
LINEAR = ("radial.0", "radial.2", "out.0", "out.2")


class Potential(nn.Module):
    """E per molecule: atom embeddings, messages along the edges weighted by an MLP of a Gaussian basis of
    the distances, summed into the atoms (index_add), an atom-wise MLP's energies summed per molecule."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(3, 8)
        self.radial = nn.Sequential(nn.Linear(6, 16), nn.SiLU(), nn.Linear(16, 8))
        self.out = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 1))
        self.register_buffer("centers", torch.linspace(0, 3, 6))

    def forward(self, species, pos, edges, molecule, molecules: int):
        src, dst = edges
        distance = (pos[src] - pos[dst]).norm(dim=-1, keepdim=True)
        weights = self.radial(torch.exp(-(distance - self.centers) ** 2))
        h = self.embed(species)
        h = h + torch.zeros_like(h).index_add(0, dst, weights * h[src])
        energies = self.out(h).squeeze(-1)
        return torch.zeros(molecules, dtype=energies.dtype).index_add(0, molecule, energies)


def molecules():
    """(species, positions, edges (every ordered pair within a molecule), molecule id per atom, E, F targets)."""
    g = torch.Generator().manual_seed(1)
    atoms = sum(SIZES)
    molecule = torch.arange(len(SIZES)).repeat_interleave(torch.tensor(SIZES))
    pairs = [(i, j) for i in range(atoms) for j in range(atoms) if i != j and molecule[i] == molecule[j]]
    return (torch.randint(0, 3, (atoms,), generator=g), torch.randn(atoms, 3, generator=g, dtype=torch.float64),
            torch.tensor(pairs).T, molecule, torch.randn(len(SIZES), generator=g, dtype=torch.float64),
            torch.randn(atoms, 3, generator=g, dtype=torch.float64))


def energy_forces_loss(model, force_weight=10.0, energy_weight=1.0):
    """MACE's weighted loss: the per-atom energy error squared and the forces' squared error."""
    species, pos, edges, molecule, energy, forces = molecules()
    pos = pos.clone().requires_grad_(True)
    E = model(species, pos, edges, molecule, len(SIZES))
    (grad,) = torch.autograd.grad(E.sum(), pos, create_graph=True)
    per_atom = torch.tensor(SIZES, dtype=E.dtype)
    return energy_weight * F.mse_loss(E / per_atom, energy / per_atom) + force_weight * F.mse_loss(-grad, forces)


def potential():
    torch.manual_seed(0)
    return Potential().double()


@pytest.mark.parametrize("energy_weight", [1.0, 0.0])
def test_a_force_loss_under_the_quadratic_step_is_refused(energy_weight):
    """loss="mse" without lr: the quadratic model is of the mse of the model output E. The force term's
    backward runs through autograd.grad's graph, not through E's gradient, so the step was sized and judged
    (ρ) on the energy term alone, silently (energy and forces), or on the gradient of ones the inner
    autograd.grad sent to E, taken for the loss's (forces only). Now the step raises a GnfxError naming
    create_graph and the fixed-lr step."""
    c = gnfx.compile(potential(), "kfac", loss="mse")
    energy_forces_loss(c, energy_weight=energy_weight).backward()
    with pytest.raises(gnfx.GnfxError, match="create_graph=True.*compile without loss= and with an lr"):
        c.step()


def test_an_energy_loss_under_the_quadratic_step_still_steps():
    """The refusal is of a loss through autograd.grad's graph only: the energy loss alone steps as before."""
    c = gnfx.compile(potential(), "kfac", loss="mse")
    species, pos, edges, molecule, energy, _ = molecules()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F.mse_loss(c(species, pos, edges, molecule, len(SIZES)), energy).backward()
        c.step()
    assert c.optimizer.last_step["alpha"] > 0


def reference_statistics(model) -> tuple[dict, dict]:
    """({layer: A, S} of the force loss from plain hooks on a copy of `model`, {layer: relative norm of
    ∇W - Σ g aᵀ})."""
    plain = copy.deepcopy(model)
    calls = {}
    for name in LINEAR:
        plain.get_submodule(name).register_forward_hook(lambda _, inputs, z, name=name: calls.__setitem__(
            name, (inputs[0].detach(), z)))
    loss = energy_forces_loss(plain)
    grads = dict(zip(LINEAR, torch.autograd.grad(loss, [calls[n][1] for n in LINEAR], retain_graph=True)))
    loss.backward()
    expected, missing = {}, {}
    for name in LINEAR:
        a, g = calls[name][0], grads[name]
        weight = plain.get_submodule(name).weight.grad
        missing[name] = ((weight - g.T @ a).norm() / weight.norm()).item()
        a = torch.cat([a, torch.ones_like(a[:, :1])], 1)
        expected[name] = {"A": a.T @ a / len(a), "S": len(SIZES) * g.T @ g}
    return expected, missing


def test_kfac_on_a_force_loss_warns_and_counts_molecules():
    """K-FAC (fisher="empirical", an lr) through the force loss's double backward: the taps record the
    gradients g at the layer outputs of the loss's backward (the inner autograd.grad fills no gradient and
    records nothing), A over the edge and atom rows and S = M Σ g gᵀ with M the molecules. Those statistics
    leave out the part of ∇W that the force term sends through the weights' use in the inner backward
    (48-98% of ∇W by norm): gnfx said nothing; now a RuntimeWarning names create_graph, once."""
    model = potential()
    c = gnfx.compile(model, "kfac", lr=1e-2, stat_every=1, stat_decay=0.0)
    expected, missing = reference_statistics(model)
    with pytest.warns(RuntimeWarning, match="create_graph=True") as caught:
        energy_forces_loss(c).backward()
        c.step()
    assert sum("create_graph" in str(w.message) for w in caught) == 1
    for name, values in expected.items():
        for key, value in values.items():
            torch.testing.assert_close(c.statistics(name)[key], value, **TOL, msg=f"{name} {key}")
    assert max(missing.values()) > 0.1  # what the warning says: Σ g aᵀ is not ∇W


@pytest.mark.parametrize("optimizer", ["shampoo", "diag"])
def test_gradient_statistics_on_a_force_loss_say_nothing(optimizer):
    """Shampoo and the diagonal precondition from the gradient itself, which the double backward fills
    exactly: no warning, and the step moves every parameter."""
    model = potential()
    before = [p.detach().clone() for p in model.parameters()]
    c = gnfx.compile(model, optimizer, lr=1e-2, stat_every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        energy_forces_loss(c).backward()
        c.step()
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_a_torchscript_submodule_is_an_opaque_leaf():
    """e3nn 0.4 (MACE's pin) compiles its tensor products and linear maps with torch.jit.script. gnfx.compile of
    a model holding a TorchScript module raised AttributeError ('OrderedDictWrapper' object has no attribute
    'clear': putting back the attributes the trace set, passes/module_attributes.py), and torch.fx traced the
    call as a method of its C++ object, so its parameters were "not used by the captured forward" and warned
    again at the backward. Now it is a leaf the graph calls: its parameters get the diagonal preconditioner,
    named as inside that module, the other layers their blocks, and the training matches plain autograd."""
    def scripted():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), torch.jit.script(nn.Linear(8, 2))).double()
    net, reference = scripted(), scripted()
    c = gnfx.compile(net, "kfac", lr=1e-2)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script's own
        warnings.simplefilter("ignore", UserWarning)  # the share in blocks, which names the leaf
        warnings.simplefilter("error", RuntimeWarning)
        loss = F.mse_loss(c(x), y)
        loss.backward()
    F.mse_loss(reference(x), y).backward()
    torch.testing.assert_close(loss, F.mse_loss(reference(x), y), **TOL)
    for p, q in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL)
    c.step()
    reasons = {f.param: f.reason for f in c.layers.fallbacks}
    assert [b.name for b in c.layers] == ["0"]
    assert set(reasons) == {"2.weight", "2.bias"} and all("inside module '2'" in r for r in reasons.values())


class ScaledLayer(nn.Module):
    """e3nn's FullyConnectedNet layer: its normalized initialization written into the forward, x @ (V / √h_in)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out))
        self.h_in = d_in

    def forward(self, x):
        return x @ (self.weight / self.h_in ** 0.5)


class PreScaled(nn.Module):
    """The reference: the same map with the scale on the input of a plain nn.Linear, (x / √h_in) Vᵀ."""

    def __init__(self, layer: ScaledLayer):
        super().__init__()
        self.linear = nn.Linear(layer.h_in, layer.weight.shape[1], bias=False).double()
        self.h_in = layer.h_in
        with torch.no_grad():
            self.linear.weight.copy_(layer.weight.T)

    def forward(self, x):
        return self.linear(x / self.h_in ** 0.5)


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("optimizer", ["kfac", "diag", "shampoo"])
def test_a_weight_scaled_by_a_number_is_a_block_of_the_parameter(capture, optimizer):
    """The radial MLPs of e3nn, NequIP and MACE (e3nn.nn.FullyConnectedNet) scale their weight by a number in
    the forward, x @ (V / √h_in): it fell back to the diagonal ("used by call_function 'truediv'"), 0% of e3nn's
    convolution in blocks. Now it is a block over V on the input rows x / √h_in: every preconditioner steps V
    as it steps the weight of the plain nn.Linear whose input is scaled instead (its K-FAC factors of V, the
    diagonal AdamW on V, as before), to rounding."""
    torch.manual_seed(0)
    scaled = nn.Sequential(ScaledLayer(5, 7), nn.Tanh(), ScaledLayer(7, 2)).double()
    plain = nn.Sequential(PreScaled(scaled[0]), nn.Tanh(), PreScaled(scaled[2]))
    x, y = torch.randn(9, 5, dtype=torch.float64), torch.randn(9, 2, dtype=torch.float64)
    compiled = [gnfx.compile(m, optimizer, lr=0.1, stat_every=1, capture=capture, example_inputs=(x,))
                for m in (scaled, plain)]
    for _ in range(3):
        for c in compiled:
            F.mse_loss(c(x), y).backward()
            c.step()
            c.zero_grad()
    assert [b.name for b in compiled[0].layers] == ["0", "2"]
    for i in (0, 2):
        torch.testing.assert_close(scaled[i].weight.T, plain[i].linear.weight, rtol=1e-9, atol=1e-12)


class InForwardForces(nn.Module):
    """MACE's call: a dict of the batch in, the forces computed inside the forward by autograd.grad of the
    energy (create_graph while training), a dict out; `if "head" in data` is what torch.fx cannot trace."""

    def __init__(self):
        super().__init__()
        self.radial = nn.Sequential(nn.Linear(1, 8), nn.SiLU(), nn.Linear(8, 1))

    def forward(self, data: dict) -> dict:
        pos = data["positions"].requires_grad_(True)
        scale = data["head"] if "head" in data else 1.0
        src, dst = data["edge_index"]
        pair = self.radial((pos[src] - pos[dst]).norm(dim=-1, keepdim=True)).squeeze(-1)
        energy = torch.zeros(int(data["ptr"].numel() - 1), dtype=pos.dtype).index_add(
            0, data["batch"][src], scale * pair)
        (grad,) = torch.autograd.grad([energy.sum()], [pos], create_graph=self.training)
        return {"energy": energy, "forces": -grad}


def test_a_forward_that_computes_forces_trains():
    """Neither capture takes the MACE-like forward, so gnfx first runs the model's own forward once to tell
    its errors from the capture's: it ran it under torch.no_grad, where the forward's autograd.grad raised
    "element 0 of tensors does not require grad", and gnfx re-raised that as the model's own error. Now that
    run keeps the caller's grad mode: the model runs eagerly with its layers opened, and trains as plain
    autograd does (same loss and gradients)."""
    species, pos, edges, molecule, energy, forces = molecules()
    ptr = torch.tensor([0, *torch.tensor(SIZES).cumsum(0).tolist()])

    def loss_of(m):
        out = m({"positions": pos.clone(), "edge_index": edges, "batch": molecule, "ptr": ptr})
        return F.mse_loss(out["energy"], energy) + 10 * F.mse_loss(out["forces"], forces)

    torch.manual_seed(0)
    model = InForwardForces().double()
    reference = copy.deepcopy(model)
    c = gnfx.compile(model, "kfac", lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # not captured, its layers opened; create_graph's
        loss = loss_of(c)
        loss.backward()
    loss_ref = loss_of(reference)
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref, **TOL)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL)
    c.step()
    assert [b.name for b in c.layers] == ["radial.0", "radial.2"]


def test_loss_mse_on_a_forward_that_returns_forces_names_them():
    """MACE returns {"energy", "forces", ...}, the forces from autograd.grad inside its forward: with loss="mse"
    the backward reaches the forces output too, and the GnfxError named second heads, VAEs and contrastive
    losses, and offered a loss= tuple over the outputs (whose quadratic step then fails in forward mode
    through the inner autograd.grad). It names the forces and the fixed-lr step now."""
    species, pos, edges, molecule, energy, forces = molecules()
    ptr = torch.tensor([0, *torch.tensor(SIZES).cumsum(0).tolist()])
    torch.manual_seed(0)
    c = gnfx.compile(InForwardForces().double(), "kfac", loss="mse", lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # not captured, its layers opened; create_graph's
        out = c({"positions": pos.clone(), "edge_index": edges, "batch": molecule, "ptr": ptr})
        with pytest.raises(gnfx.GnfxError, match="forces -∂E/∂x computed inside its forward.*with an lr"):
            (F.mse_loss(out["energy"], energy) + 10 * F.mse_loss(out["forces"], forces)).backward()


class EqualizedConv(nn.Module):
    """StyleGAN's equalized learning rate: `F.conv2d(x, V * c)`, c = 1/√fan_in, so that Adam steps V."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.scale = 1 / 27 ** 0.5

    def forward(self, x):
        return F.conv2d(x, self.weight * self.scale).mean((2, 3))


def test_a_scaled_weight_that_a_convolution_reads_keeps_the_diagonal():
    """Only a scaled weight that linear maps read is a block over V; a scaled convolution weight (equalized lr)
    falls back as before, so that the diagonal steps V, as the equalized lr intends: torch's AdamW, exactly."""
    torch.manual_seed(0)
    model = EqualizedConv().double()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    c = gnfx.compile(model, "kfac", lr=1e-2, example_inputs=(x,))
    adamw = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0)  # gnfx.compile's default
    for _ in range(2):
        c(x).square().mean().backward()
        c.step()
        c.zero_grad()
        reference(x).square().mean().backward()
        adamw.step()
        adamw.zero_grad()
    assert len(c.layers) == 0 and [f.param for f in c.layers.fallbacks] == ["weight"]
    torch.testing.assert_close(model.weight, reference.weight, **TOL)
