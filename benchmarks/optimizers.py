"""The optimizers under test: a registry of factories with their learning-rate grids.

Each `OptimizerSpec.make(model, lr)` returns a `Trainer`: the module to call, the optimizer step
and the gradient reset. An optimizer that cannot run here raises `Unavailable` with the reason
(a package is not installed, or gnfx does not offer that preconditioner yet), and the benchmark
skips it. Errors in `spec.unsupported`, raised by the first training step, mean the same thing:
gnfx may capture a model lazily, on its first forward.

Entries:
- torch: AdamW (foreach) and SGD with momentum 0.9, the first-order baselines.
- gnfx: `gnfx.compile(model, optimizer=NAME, lr=LR)` for each preconditioner name, and with no
  lr (the grid is the single entry None) the quadratic-model step (gnfx.quadratic_step):
  `gnfx_kfac_defaults` is `gnfx.compile(model, optimizer="kfac", loss=LOSS)`, kfac's defaults;
  `gnfx_kfac_every1` the same with damping_every=1 (ρ and the damping rule on every step, the default
  before 2026-11-29), `gnfx_kfac_every1_rows32` and `gnfx_kfac_every5_rows32` with quadratic_rows=32;
  `gnfx_ekfac_defaults` and `gnfx_rank1_defaults` are ekfac's and rank1's defaults with loss= (ekfac: the
  quadratic-model step; rank1: its fixed-lr step at lr 1e-3 on the true Fisher's sketch), and
  `gnfx_rank1_quadratic` asks rank1 for the quadratic-model step (step="quadratic").
- Muon: `torch_muon` is torch.optim.Muon with the split its users write by hand: the weights of
  the hidden nn.Linear layers (all but the first, which reads the input, and the last, the
  output layer) to Muon, everything else (those two, biases, norms, embeddings, and conv kernels,
  which torch.optim.Muon refuses: it takes matrices only) to torch.optim.AdamW at MUON_ADAMW_LR
  times Muon's lr; `gnfx_muon` is `gnfx.compile(model, optimizer="muon", lr=LR)`, which finds the
  same hidden layers (and hidden conv kernels) itself, everything else on AdamW (the diagonal
  preconditioner, and Muon's AdamW for the hidden biases) at Muon's lr, the same multiple.
  Both without weight decay.
- heavyball: SOAP and KL-Shampoo, run eagerly (heavyball's torch.compile turned off, as for
  every other entry, so that step times compare the algorithms and not the compilers).
- pytorch_optimizer: SOAP, Shampoo and ScalableShampoo (Distributed-Shampoo-style, grafted onto
  SGD), the latter recomputing its preconditioners every 10 steps instead of its default 1,000,
  which these runs of at most 1,500 steps would barely reach.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn


class Unavailable(Exception):
    """The optimizer cannot run here; the message says why."""


@dataclasses.dataclass
class Trainer:
    """What a training loop drives: `module(x)`, then `step()` and `zero_grad()` after backward."""

    module: nn.Module
    step: Callable[[], object]
    zero_grad: Callable[[], object]


def torch_trainer(model: nn.Module, optimizer: torch.optim.Optimizer) -> Trainer:
    """A Trainer for a plain module and a torch optimizer over its parameters."""
    return Trainer(model, optimizer.step, lambda: optimizer.zero_grad(set_to_none=True))


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer under test: how to build it, its LR grid, and the LR of the quick mode."""

    name: str
    source: str  # the package that implements it
    lrs: tuple[float | None, ...]  # None: no lr given (the optimizer's defaults)
    quick_lr: float | None
    factory: Callable[..., Trainer]
    unsupported: tuple[type[BaseException], ...] = ()  # first-step errors that mean "skip"
    needs_loss: bool = False  # the factory takes the task's loss name (gnfx's loss=)

    def make(self, model: nn.Module, lr: float | None, loss: str | None = None) -> Trainer:
        """A Trainer for `model` at learning rate `lr`; raises Unavailable when it cannot run here."""
        return self.factory(model, lr, loss=loss) if self.needs_loss else self.factory(model, lr)


def _adamw(model: nn.Module, lr: float) -> Trainer:
    return torch_trainer(model, torch.optim.AdamW(model.parameters(), lr=lr, foreach=True))


def _sgd(model: nn.Module, lr: float) -> Trainer:
    return torch_trainer(model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, foreach=True))


def _gnfx_unsupported() -> tuple[type[BaseException], ...]:
    """The errors by which gnfx declines a model or an optimizer name."""
    try:
        from gnfx.errors import GnfxError
    except ImportError:
        return NotImplementedError, ValueError
    return NotImplementedError, ValueError, GnfxError


def _torch_muon(model: nn.Module, lr: float) -> Trainer:
    """torch.optim.Muon on the hidden nn.Linear weights, AdamW on the rest (module doc)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)][1:-1]
    hidden = {id(m.weight) for m in linears}
    rest = [p for p in model.parameters() if id(p) not in hidden]
    optimizers = [torch.optim.AdamW(rest, lr=lr * MUON_ADAMW_LR, weight_decay=0.0, foreach=True)]
    if hidden:  # none in a CNN whose only linear layer is its head
        optimizers.append(torch.optim.Muon([m.weight for m in linears], lr=lr, weight_decay=0.0))

    def step():
        for optimizer in optimizers:
            optimizer.step()

    def zero_grad():
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)

    return Trainer(model, step, zero_grad)


def _gnfx(name: str, **fixed) -> Callable[..., Trainer]:
    """gnfx.compile(model, optimizer=name, lr=lr) or, for lr None, (model, optimizer=name, loss=loss)."""
    def make(model: nn.Module, lr: float | None, loss: str | None = None) -> Trainer:
        try:
            import gnfx
        except ImportError as error:
            raise Unavailable(f"gnfx is not importable: {error}") from error
        if not hasattr(gnfx, "compile"):
            raise Unavailable("gnfx.compile does not exist yet")
        hparams = {"lr": lr} if lr is not None else {"loss": loss, **fixed}
        try:
            compiled = gnfx.compile(model, optimizer=name, **hparams)
        except _gnfx_unsupported() as error:
            raise Unavailable(f"gnfx.compile(optimizer={name!r}): {type(error).__name__}: {error}") from error
        return Trainer(compiled, compiled.step, compiled.zero_grad)

    return make


def _heavyball(class_name: str, **hparams) -> Callable[[nn.Module, float], Trainer]:
    def make(model: nn.Module, lr: float) -> Trainer:
        try:
            import heavyball
            import heavyball.utils
        except ImportError as error:
            raise Unavailable(f"heavyball is not installed (pip install heavyball): {error}") from error
        heavyball.utils.compile_mode = None  # eager, like every other entry
        return torch_trainer(model, getattr(heavyball, class_name)(model.parameters(), lr=lr, **hparams))

    return make


def _pytorch_optimizer(class_name: str, **hparams) -> Callable[[nn.Module, float], Trainer]:
    def make(model: nn.Module, lr: float) -> Trainer:
        try:
            import pytorch_optimizer
        except ImportError as error:
            raise Unavailable(f"pytorch_optimizer is not installed (pip install pytorch_optimizer): {error}") from error
        return torch_trainer(model, getattr(pytorch_optimizer, class_name)(model.parameters(), lr=lr, **hparams))

    return make


# Grids by the scale of the update: Adam-normalized (AdamW, SOAP, gnfx, which grafts onto Adam's
# step size by default) or SGD-like (SGD, ScalableShampoo grafted onto SGD). On these tasks AdamW
# is best at 3e-3 (digits MLP, GPT) or 1e-2 (autoencoder, CNN); SGD on the digits MLP at 3e-2,
# diverging at 3e-1.
ADAM_LIKE_LRS = (1e-3, 3e-3, 1e-2)
SGD_LIKE_LRS = (1e-2, 3e-2, 1e-1)
# gnfx's Kronecker preconditioners (rank1, kfac, shampoo) diverged at 3e-3 on the digits MLP while
# diag was best there, so gnfx's grid reaches one step lower.
GNFX_LRS = (3e-4, 1e-3, 3e-3, 1e-2)
# Muon's orthogonalized step has spectral norm ~1 per matrix (RMS ~ 1/sqrt(width)): its lr is an order
# above Adam's (Jordan et al. use 0.02); the AdamW part runs at MUON_ADAMW_LR times it (gnfx: 1, one lr).
MUON_LRS = (1e-3, 3e-3, 1e-2, 3e-2)
MUON_ADAMW_LR = 1.0

OPTIMIZERS: dict[str, OptimizerSpec] = {spec.name: spec for spec in [
    OptimizerSpec("adamw", "torch", ADAM_LIKE_LRS, 3e-3, _adamw),
    OptimizerSpec("sgd", "torch", (*SGD_LIKE_LRS, 3e-1), 3e-2, _sgd),
    *(OptimizerSpec(f"gnfx_{name}", "gnfx", GNFX_LRS, 1e-3, _gnfx(name), _gnfx_unsupported())
      for name in ("diag", "rank1", "kfac", "shampoo", "soap", "ekfac")),
    *(OptimizerSpec(f"gnfx_{name}", "gnfx", (None,), None, _gnfx(optimizer, **fixed), _gnfx_unsupported(),
                    needs_loss=True)
      for name, optimizer, fixed in (("kfac_defaults", "kfac", {}),
                                     ("kfac_every1", "kfac", {"damping_every": 1}),
                                     ("kfac_every1_rows32", "kfac", {"damping_every": 1, "quadratic_rows": 32}),
                                     ("kfac_every5_rows32", "kfac", {"damping_every": 5, "quadratic_rows": 32}),
                                     ("ekfac_defaults", "ekfac", {}),
                                     ("rank1_defaults", "rank1", {}),
                                     ("rank1_quadratic", "rank1", {"step": "quadratic"}))),
    OptimizerSpec("torch_muon", "torch", MUON_LRS, 1e-2, _torch_muon),
    OptimizerSpec("gnfx_muon", "gnfx", MUON_LRS, 1e-2, _gnfx("muon"), _gnfx_unsupported()),
    OptimizerSpec("hb_soap", "heavyball", ADAM_LIKE_LRS, 3e-3, _heavyball("SOAP")),
    OptimizerSpec("hb_kl_shampoo", "heavyball", ADAM_LIKE_LRS, 3e-3, _heavyball("KLShampoo")),
    OptimizerSpec("po_soap", "pytorch_optimizer", ADAM_LIKE_LRS, 3e-3, _pytorch_optimizer("SOAP")),
    # Shampoo without grafting: its AdaGrad-style factors shrink the step; best at 0.3 on the MLP.
    OptimizerSpec("po_shampoo", "pytorch_optimizer", (3e-2, 1e-1, 3e-1), 1e-1, _pytorch_optimizer("Shampoo")),
    OptimizerSpec("po_scalable_shampoo", "pytorch_optimizer", SGD_LIKE_LRS, 3e-2,
                  _pytorch_optimizer("ScalableShampoo", preconditioning_compute_steps=10)),
]}
