"""Independent references for the statistics gnfx collects (see gnfx/statistics.py).

Nothing here imports gnfx. The references are built from plain PyTorch:

* `record_linear_calls` — forward hooks on each `nn.Linear` record its input `a`, and a tensor hook
  on its output records `g = ∂L/∂z`, once per call (a tied layer called twice gives two records).
* `kfac_factors` — the K-FAC factors of docs/design.md §1 from those records, written as the math reads:
      expand:  A = 1/(N R) Σ_{n,r} ā ā ᵀ            S = M Σ_{n,r} g gᵀ
      reduce:  A = 1/N Σ_n ā_n ā_nᵀ, ā_n = mean_r ā   S = M Σ_n (Σ_r g)(Σ_r g)ᵀ
  with ā = [a, 1] when the layer has a bias, and the positions r of all call sites pooled.
* `per_example_fisher_diag` — 1/N Σ_n (∇ℓ̃_n)², with ∇ℓ̃_n from torch.func.vmap(grad(...)).
* `curvlinops_factors` — curvlinops' KFACLinearOperator with the empirical Fisher.

Everything is meant to run in float64 and compared at 1e-10.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

TOL = dict(rtol=1e-10, atol=1e-10)


def cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy over all M loss terms of an (N, C) or (N, T, C) output."""
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def loss_terms(out: torch.Tensor) -> int:
    """M: the number of loss terms the mean of `cross_entropy` runs over (N, or N·T)."""
    return out.shape[:-1].numel()


def augment(a: torch.Tensor, bias: bool) -> torch.Tensor:
    """ā = [a, 1] (the bias folded into the input), or a itself."""
    return torch.cat([a, torch.ones_like(a[..., :1])], dim=-1) if bias else a


# ----------------------------------------------------------------------------- hooks


def record_linear_calls(model: nn.Module, names, x, y, loss_fn: Callable = cross_entropy, **kwargs):
    """Run loss_fn(model(x, **kwargs), y) forward and backward with hooks on the modules `names`.

    Returns ({name: [(a, g), ...] one pair per call}, M). `model` is deep-copied first, so the
    gradients of the caller's parameters are untouched.
    """
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    calls = {name: [] for name in names}
    handles = []
    for name in names:
        def hook(module, inputs, output, name=name):
            record = [inputs[0].detach(), None]
            calls[name].append(record)
            if output.requires_grad:  # (a call under torch.no_grad has no output gradient: g stays None)
                output.register_hook(lambda g: record.__setitem__(1, g.detach()))
                # the layer's output as a new tensor of the same values: an in-place activation after the
                # layer (nn.ReLU(inplace=True)) then modifies that one, and the hook above, which an in-place
                # change of its own tensor would never call, sees the output's gradient
                return output * 1
        handles.append(modules[name].register_forward_hook(hook))
    out = model(x, **kwargs)
    loss_fn(out, y).backward()
    for h in handles:
        h.remove()
    return {name: [tuple(r) for r in rs] for name, rs in calls.items()}, loss_terms(out)


def kfac_factors(calls, bias: bool, approx: str, M: int) -> dict[str, torch.Tensor]:
    """A and S of one layer from its recorded calls [(a, g), ...] (positions of all calls pooled)."""
    N = calls[0][0].shape[0]
    # (N, R, d): every call's positions side by side, per example
    a = torch.cat([augment(a, bias).reshape(N, -1, a.shape[-1] + bias) for a, _ in calls], dim=1)
    g = torch.cat([g.reshape(N, -1, g.shape[-1]) for _, g in calls], dim=1)
    if approx == "expand":
        rows_a, rows_g = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
        return {"A": rows_a.T @ rows_a / rows_a.shape[0], "S": M * rows_g.T @ rows_g}
    a_n, g_n = a.mean(1), g.sum(1)
    return {"A": a_n.T @ a_n / N, "S": M * g_n.T @ g_n}


def hook_statistics(model, names, x, y, approx="expand", loss_fn=cross_entropy, **kwargs):
    """{layer name: {"A", "S"}} for the nn.Linear layers `names` of `model` on the batch (x, y)."""
    calls, M = record_linear_calls(model, names, x, y, loss_fn, **kwargs)
    modules = dict(model.named_modules())
    return {n: kfac_factors(calls[n], modules[n].bias is not None and modules[n].bias.requires_grad,
                            approx, M) for n in names}


# ----------------------------------------------------------------------------- per-example gradients


def per_example_grads(model: nn.Module, x, y, example_loss: Callable = cross_entropy,
                      vectorized: bool = True) -> dict[str, torch.Tensor]:
    """∇ℓ̃_n for every example n and trainable parameter, by torch.func.vmap(grad(·)).

    ℓ̃_n = example_loss(model(x_n), y_n) on the batch of one example. With `cross_entropy` that is
    the single example's loss for an (N, C) output and the mean over its T tokens for (N, T, C).
    `vectorized=False` loops over the examples with torch.autograd.grad instead (for models with
    data-dependent control flow, which vmap cannot run).
    """
    if not vectorized:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = [p for p in model.parameters() if p.requires_grad]
        grads = [torch.autograd.grad(example_loss(model(x[n:n + 1]), y[n:n + 1]), params)
                 for n in range(x.shape[0])]
        return {name: torch.stack([g[i] for g in grads]) for i, name in enumerate(names)}
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())

    def loss(params, xn, yn):
        out = functional_call(model, {**params, **frozen, **buffers}, (xn.unsqueeze(0),))
        return example_loss(out, yn.unsqueeze(0))

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


def per_example_fisher_diag(model, x, y, example_loss=cross_entropy, vectorized=True) -> dict[str, torch.Tensor]:
    """diag = 1/N Σ_n (∇ℓ̃_n)², per parameter (squared elementwise).

    Why this is gnfx's `diag = N Σ_n (Σ_r g_{n,r} a_{n,r}ᵀ)²`: with L = 1/M Σ_m ℓ_m, M = N T, the
    part of L that example n contributes is L_n = 1/(N T) Σ_t ℓ_{n,t} = ℓ̃_n / N, where
    ℓ̃_n = 1/T Σ_t ℓ_{n,t} is the example's own mean loss (what `cross_entropy` computes on a batch
    of one). The per-example gradient of L is ∇L_n = Σ_r g_{n,r} a_{n,r}ᵀ, so
    N Σ_n (∇L_n)² = N Σ_n (∇ℓ̃_n / N)² = 1/N Σ_n (∇ℓ̃_n)².
    """
    grads = per_example_grads(model, x, y, example_loss, vectorized)
    return {n: g.square().mean(0) for n, g in grads.items()}


def layer_diag(diags: dict[str, torch.Tensor], layer: str) -> torch.Tensor:
    """The [W b] layout of a layer's diagonal: the (trainable) bias as the last column."""
    w, b = diags[f"{layer}.weight"], diags.get(f"{layer}.bias")
    return w if b is None else torch.cat([w, b[:, None]], dim=1)


# ----------------------------------------------------------------------------- curvlinops


class ClassDimSecond(nn.Module):
    """(N, T, C) -> (N, C, T): the layout curvlinops' CrossEntropyLoss expects."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        return out.transpose(1, -1) if out.dim() > 2 else out


def curvlinops_factors(model: nn.Module, names, x, y, approx: str = "expand") -> dict[str, dict]:
    """{layer: {"A", "S"}} from curvlinops' KFACLinearOperator (empirical Fisher, [W b] layout)."""
    from curvlinops import KFACLinearOperator

    wrapped = ClassDimSecond(copy.deepcopy(model))
    modules = dict(wrapped.model.named_modules())
    params = [p for n in names for p in modules[n].parameters() if p.requires_grad]
    kfac = KFACLinearOperator(wrapped, nn.CrossEntropyLoss(), params, [(x, y)], fisher_type="empirical",
                              separate_weight_and_bias=False, check_deterministic=False, kfac_approx=approx)
    kfac.compute_kronecker_factors()
    return {n: {"A": kfac._input_covariances[f"model.{n}"], "S": kfac._gradient_covariances[f"model.{n}"]}
            for n in names}
