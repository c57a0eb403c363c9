"""First contact with equivariant and atomistic ML libraries: e3nn, MACE and PyTorch Geometric's SchNet,
called as their users call them.

    PYTHONPATH=<e3nn 0.6, opt_einsum(_fx), ase, torch_ema>:. OMP_NUM_THREADS=1 python -m benchmarks.molecular_probe \
        --models e3nn_conv schnet [--optimizers kfac shampoo] [--steps 4] [--timeout 300] [--out probe.md]
    PYTHONPATH=<mace-torch with its pinned e3nn 0.4.4>:<opt_einsum(_fx), ase, torch_ema>:. ... --models mace

benchmarks.family_probe's first contact (one model and optimizer per process, random weights, train mode,
`--steps` steps on one batch of 3 random molecules of 3, 5 and 4 atoms of 3 species, every pair within a
molecule an edge, random reference energies and forces) for interatomic potentials trained as their
libraries train them, on energies and forces, F = -∂E/∂x from `torch.autograd.grad(E, x, create_graph=True)`,
so that the loss's backward is a double backward:

- e3nn (`e3nn_conv`): the equivariant convolution of e3nn's documentation, two of them: the species' one-hot
  through `o3.Linear`, messages `o3.FullyConnectedTensorProduct(h[src], Y(r̂), w(|r|))` of the neighbours'
  features and the spherical harmonics (l ≤ 2) of the edge, its weights per edge from an
  `nn.FullyConnectedNet` of a `soft_one_hot_linspace` radial basis (weights as activations,
  `shared_weights=False`), summed into the atoms with `index_add`, `nn.Gate` between them (scalars by SiLU,
  l = 1 features gated by sigmoids of scalars), an `o3.Linear` readout of atomic energies summed per molecule;
  forces by autograd.grad in the training loop, loss mse(E/n_atoms) + 10 mse(F);
- MACE (`mace`): `mace.modules.MACE` (2 interactions of RealAgnosticResidualInteractionBlock, hidden
  8x0e+8x1o, max_ell 2, correlation 2, Bessel radial basis), called as mace.tools.train does,
  `model(batch.to_dict(), training=True, compute_force=True)`, which computes the forces inside its forward
  (mace.modules.utils.compute_forces: autograd.grad with create_graph=training), loss
  `WeightedEnergyForcesLoss(energy_weight=1, forces_weight=100)` (MACE's defaults) of the batch;
  mace-torch pins e3nn 0.4.4 and its `mace.tools` package imports its training stack (pandas, torchmetrics,
  matplotlib): the probe imports `mace.modules` without running `mace/tools/__init__.py`;
- PyTorch Geometric (`schnet`): `torch_geometric.nn.models.SchNet` (hidden 16, 8 filters, 2 interactions,
  8 Gaussians) with `interaction_graph` given (every pair within a molecule: its default radius_graph needs
  torch_cluster), `model(z, pos, batch)` returning E per molecule, forces by autograd.grad in the loop, loss
  mse(E) + 10 mse(F).

Optimizers: "kfac_lr" (lr 1e-3, the empirical Fisher: the force loss's gradients at the layer outputs),
"kfac_q" (loss="mse" without lr: the quadratic-model step of the energy output, what a user may try first),
"shampoo" and "diag" at lr 1e-3, and torch.optim.AdamW at lr 1e-3 ("adamw"). Per run: the capture's form, the
share of the trainable parameters in curvature blocks, exactness (the kfac_lr runs, float64: the compiled model
beside a second build from the same seed over 3 steps, the largest |difference| of the loss and of any
gradient; the first step's K-FAC A and S of the nn.Linear blocks against hooks on every call,
benchmarks.hooked_calls, A = mean over the rows ā āᵀ, S = M Σ g gᵀ with M the molecules; and "∇W off" the
largest relative norm ‖∇W − Σ g aᵀ‖/‖∇W‖ over those layers: the part of the gradient the force term sends
through the weights' use in the inner backward, which the statistics do not hold, gnfx/filled_gradients.py),
the losses, gnfx's warnings (once each) and the parameters outside the blocks, the seconds; or the error. None
of these libraries is a dependency of gnfx. The results: benchmarks/results/first_contact_12_molecular.md.
"""
from __future__ import annotations

import copy
import importlib
import sys
import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import gnfx
from benchmarks.child_rows import library, one_batch_row, probe_main
from benchmarks.hooked_calls import hooked_calls, linear_factor_gap
from benchmarks.lockstep import float64_gaps

SIZES, SPECIES = (3, 5, 4), 3  # atoms per molecule; atom species
FORCE_WEIGHT = {"e3nn_conv": 10.0, "schnet": 10.0, "mace": 100.0}
MODELS = tuple(FORCE_WEIGHT)
OPTIMIZERS = {"kfac_lr": ("kfac", {"lr": 1e-3}), "kfac_q": ("kfac", {"loss": "mse"}),
              "shampoo": ("shampoo", {"lr": 1e-3}), "diag": ("diag", {"lr": 1e-3}),
              "adamw": ("adamw", {"lr": 1e-3})}  # adamw: torch.optim's, the reference


def _import(name: str):
    return library("benchmarks.molecular_probe", name)


def _mace_modules():
    """mace.modules, imported without mace/tools/__init__.py (its training stack): `mace.tools` is a bare
    package of that directory that holds the three names mace.modules imports from it."""
    if "mace.tools" not in sys.modules:
        mace = _import("mace")
        tools = types.ModuleType("mace.tools")
        tools.__path__ = [f"{mace.__path__[0]}/tools"]
        sys.modules["mace.tools"] = tools
        torch_tools = importlib.import_module("mace.tools.torch_tools")
        tools.to_numpy, tools.TensorDict, tools.to_one_hot = (torch_tools.to_numpy, torch_tools.TensorDict,
                                                              torch_tools.to_one_hot)
    return importlib.import_module("mace.modules")


class E3nnPotential(nn.Module):
    """e3nn's equivariant convolution, twice, with a gate between (module docstring)."""

    def __init__(self):
        super().__init__()
        o3, e3nn_nn, math = (_import(f"e3nn.{m}") for m in ("o3", "nn", "math"))
        self.soft_one_hot_linspace, self.spherical_harmonics = math.soft_one_hot_linspace, o3.spherical_harmonics
        self.sh = o3.Irreps.spherical_harmonics(2)
        self.embed = o3.Linear(f"{SPECIES}x0e", "8x0e")
        self.gate = e3nn_nn.Gate("8x0e", [F.silu], "4x0e", [torch.sigmoid], "4x1o")
        self.tp1 = o3.FullyConnectedTensorProduct("8x0e", self.sh, self.gate.irreps_in, shared_weights=False)
        self.radial1 = e3nn_nn.FullyConnectedNet([8, 16, self.tp1.weight_numel], F.silu)
        self.tp2 = o3.FullyConnectedTensorProduct(self.gate.irreps_out, self.sh, "8x0e", shared_weights=False)
        self.radial2 = e3nn_nn.FullyConnectedNet([8, 16, self.tp2.weight_numel], F.silu)
        self.readout = o3.Linear("8x0e", "1x0e")

    def forward(self, species, pos, edges, molecule, molecules: int):
        src, dst = edges
        vectors = pos[src] - pos[dst]
        y = self.spherical_harmonics(self.sh, vectors, normalize=True, normalization="component")
        basis = self.soft_one_hot_linspace(vectors.norm(dim=1), 0.0, 3.0, 8, basis="smooth_finite", cutoff=True)
        basis = basis * 8 ** 0.5
        h = self.embed(F.one_hot(species, SPECIES).to(pos.dtype))
        h = torch.zeros(len(pos), self.tp1.irreps_out.dim, dtype=pos.dtype).index_add(
            0, dst, self.tp1(h[src], y, self.radial1(basis))) / 2.0
        h = self.gate(h)
        h = torch.zeros(len(pos), self.tp2.irreps_out.dim, dtype=pos.dtype).index_add(
            0, dst, self.tp2(h[src], y, self.radial2(basis))) / 2.0
        energies = self.readout(h).squeeze(-1)
        return torch.zeros(molecules, dtype=energies.dtype).index_add(0, molecule, energies)


def build(name: str) -> nn.Module:
    """The model `name` (module doc), with random weights from the current seed."""
    if name == "e3nn_conv":
        return E3nnPotential()
    if name == "schnet":
        models = _import("torch_geometric.nn.models")

        def every_pair(pos, batch):  # the interaction graph: every ordered pair of atoms within a molecule
            src, dst = (batch[:, None] == batch[None, :]).logical_and(
                ~torch.eye(len(batch), dtype=torch.bool)).nonzero().T
            return torch.stack([src, dst]), (pos[src] - pos[dst]).norm(dim=-1)
        return models.SchNet(hidden_channels=16, num_filters=8, num_interactions=2, num_gaussians=8, cutoff=5.0,
                             interaction_graph=every_pair)
    modules = _mace_modules()
    o3 = _import("e3nn.o3")
    import numpy as np
    return modules.MACE(r_max=5.0, num_bessel=8, num_polynomial_cutoff=5, max_ell=2,
                        interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
                        interaction_cls_first=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
                        num_interactions=2, num_elements=SPECIES, hidden_irreps=o3.Irreps("8x0e + 8x1o"),
                        MLP_irreps=o3.Irreps("8x0e"), atomic_energies=np.zeros(SPECIES), avg_num_neighbors=3.0,
                        atomic_numbers=[1, 6, 8], correlation=2, gate=F.silu)


def molecules(dtype):
    """species, positions, edges (every ordered pair within a molecule), molecule id per atom, reference
    energies and forces, of 3 random molecules (SIZES)."""
    g = torch.Generator().manual_seed(1)
    atoms = sum(SIZES)
    molecule = torch.arange(len(SIZES)).repeat_interleave(torch.tensor(SIZES))
    pairs = [(i, j) for i in range(atoms) for j in range(atoms) if i != j and molecule[i] == molecule[j]]
    return (torch.randint(0, SPECIES, (atoms,), generator=g), 1.5 * torch.randn(atoms, 3, generator=g, dtype=dtype),
            torch.tensor(pairs).T, molecule, torch.randn(len(SIZES), generator=g, dtype=dtype),
            torch.randn(atoms, 3, generator=g, dtype=dtype))


def problem(name: str, dtype=torch.float32):
    """loss(compiled or plain model) of `name` on its batch, as its users train it (module doc)."""
    species, pos, edges, molecule, energy, forces = molecules(dtype)
    if name == "mace":
        modules = _mace_modules()
        Batch = importlib.import_module("mace.tools.torch_geometric").Batch
        criterion = modules.WeightedEnergyForcesLoss(energy_weight=1.0, forces_weight=FORCE_WEIGHT[name]).to(dtype)
        ptr = torch.tensor([0, *torch.tensor(SIZES).cumsum(0).tolist()])

        def mace_loss(m):  # mace.tools.train.take_step: the batch's dict, the forces inside the forward
            batch = Batch(positions=pos.clone(), node_attrs=F.one_hot(species, SPECIES).to(dtype), edge_index=edges,
                          shifts=torch.zeros(edges.shape[1], 3, dtype=dtype),
                          unit_shifts=torch.zeros(edges.shape[1], 3, dtype=dtype),
                          cell=torch.zeros(3 * len(SIZES), 3, dtype=dtype), batch=molecule, ptr=ptr,
                          energy=energy, forces=forces, weight=torch.ones(len(SIZES), dtype=dtype),
                          energy_weight=torch.ones(len(SIZES), dtype=dtype),
                          forces_weight=torch.ones(len(SIZES), dtype=dtype))
            return criterion(pred=m(batch.to_dict(), training=True, compute_force=True), ref=batch)
        return mace_loss
    per_atom = torch.tensor(SIZES, dtype=dtype)

    def energy_forces_loss(m):  # the user's loop: forces by autograd.grad of the model's energies
        x = pos.clone().requires_grad_(True)
        E = m(species, x, molecule) if name == "schnet" else m(species, x, edges, molecule, len(SIZES))
        E = E.reshape(-1)
        (grad,) = torch.autograd.grad(E.sum(), x, create_graph=True)
        return F.mse_loss(E / per_atom, energy / per_atom) + FORCE_WEIGHT[name] * F.mse_loss(-grad, forces)
    return energy_forces_loss


class _ScaledMatmuls(TorchFunctionMode):
    """The calls of e3nn's FullyConnectedNet layers (`x @ (V / s)`, no nn.Linear): inside each call of a module
    named in `calls`, the first matmul's input a, its weight operand V / s and, once the backward reaches it, the
    gradient g at its output, appended to that module's list as [a, g, V / s]."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.calls, self.inside, self.handles = {n: [] for n in names}, [], []
        for n in names:
            module = model.get_submodule(n)
            self.handles += [module.register_forward_pre_hook(lambda *_, n=n: self.inside.append([n, False])),
                             module.register_forward_hook(lambda *_: self.inside.pop() and None)]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__) and self.inside and not self.inside[-1][1]:
            self.inside[-1][1] = True  # this call's first matmul
            record = [args[0].detach().clone(), None, args[1].detach()]
            self.calls[self.inside[-1][0]].append(record)
            out.register_hook(lambda g: record.__setitem__(1, g.detach()))
        return out


def factor_gaps(name: str, hparams: dict) -> str:
    """The first step's K-FAC A and S of the nn.Linear blocks and of e3nn's FullyConnectedNet layers against
    hooks (module doc), and how far Σ g aᵀ is from ∇W in those layers."""
    torch.manual_seed(0)
    model = build(name).double()
    reference = copy.deepcopy(model)
    loss_of = problem(name, torch.float64)
    c = gnfx.compile(model, "kfac", stat_decay=0.0, stat_every=1, **hparams)
    linears = [n for n, mod in reference.named_modules() if isinstance(mod, nn.Linear)]
    scaled = [n for n, mod in reference.named_modules() if type(mod).__name__ == "_Layer"]  # e3nn.nn._fc
    matmuls = _ScaledMatmuls(reference, scaled)
    with hooked_calls(reference, linears) as calls, matmuls:
        loss_of(reference).backward()
    for handle in matmuls.handles:
        handle.remove()
    loss_of(c).backward()
    c.step()
    off, gap = 0.0, 0.0
    for layer, records in [*calls.items(), *matmuls.calls.items()]:
        weight = reference.get_submodule(layer).weight
        reached = [(a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1]), w) for a, g, *w in records
                   if g is not None]
        if not reached or weight.grad is None:
            continue
        if layer in matmuls.calls:  # W = V / s: the block of V on the rows a / s, ∇V = Σ (a / s)ᵀ g; S = M Σ g gᵀ
            s = (weight / reached[0][2][0]).flatten()[0]
            tapped = sum(a.T @ g for a, g, _ in reached) / s
            a, g = torch.cat([a for a, _, _ in reached]) / s, torch.cat([g for _, g, _ in reached])
            for got, want in zip((c.statistics(layer)["A"], c.statistics(layer)["S"]),
                                 (a.T @ a / len(a), len(SIZES) * g.T @ g)):
                gap = max(gap, ((got - want).abs().max() / want.abs().max()).item())
        else:
            tapped = sum(g.T @ a for a, g, _ in reached)
        off = max(off, ((weight.grad - tapped).norm() / weight.grad.norm()).item())
    linear = linear_factor_gap(c, calls, len(SIZES)) if linears else "no linear block"
    return f"{linear}; A, S of {len(scaled)} e3nn layers {gap:.0e}; ∇W off {off:.2f}"


def exactness(name: str, kind: str, hparams: dict) -> str:
    """'loss Δ, grad Δ; A, S Δ; ∇W off' in float64 (module doc)."""
    def loss_for(_):
        loss_of = problem(name, torch.float64)
        return lambda m: loss_of(m)
    return float64_gaps(lambda: build(name), loss_for, kind, hparams, also=lambda: factor_gaps(name, hparams))


def probe(name: str, optimizer: str, steps: int) -> str:
    """One table row: `optimizer` (OPTIMIZERS) for `steps` steps of `name` on one batch."""
    kind, hparams = OPTIMIZERS[optimizer]

    def made():
        model = build(name).train()
        return model, problem(name)

    return one_batch_row(name, optimizer, kind, hparams, steps, lambda: exactness(name, kind, hparams), made,
                         widths=(200, 300, 500), digits=4)


def main() -> None:
    probe_main(__doc__, "benchmarks.molecular_probe", probe, {"models": list(MODELS), "optimizers": list(OPTIMIZERS)},
               ["| model | optimizer | capture | in blocks | exact: loss, grad (float64); A, S vs hooks; ∇W off | "
                "losses | outside the blocks | gnfx's warnings | error | s |", "|---|---|---|---|---|---|---|---|---|---|"],
               steps=4, timeout=300)


if __name__ == "__main__":
    main()
