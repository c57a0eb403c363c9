"""Exact Generalized Gauss-Newton (GGN), Fisher and Hessian products with torch.func.

Notation. A batch of N examples has the loss

    L(θ) = (1/N) Σ_n ℓ(z_n, y_n),    z = f(x; θ),

where f is the model, θ its trainable parameters and z its output. With J = ∂z/∂θ (the
Jacobian of the whole batch output) and H_ℓ = ∇²_z L (the Hessian of the loss with respect to
the output, mean-reduction factor included), the GGN is

    G = Jᵀ H_ℓ J.

Every product here is computed matrix-free: one forward-mode pass gives J v, a product with
H_ℓ (or with the Fisher's output matrix) follows, and one reverse-mode pass gives Jᵀ(·). Only
`ggn_matrix` builds G, one column per unit vector.

Losses are named "cross_entropy", "mse" or "binary_cross_entropy" (torch's functional losses with
the default mean reduction), or given as a callable ``loss(z, y) -> scalar``:

* "cross_entropy": ``F.cross_entropy(z, y)`` with the classes on the last axis of z. Logits of
  shape (N, C) take targets (N,); language-model logits (B, T, V) take targets (B, T) and are
  flattened to (B*T, V), so the loss is the mean over all tokens. Targets equal to -100 (the
  default ``ignore_index``) are left out of the mean. Class-probability targets (shaped like z)
  are accepted too. Class-index targets shaped like z without its dimension 1, (N, d1, ..., dk) for
  logits (N, C, d1, ..., dk), and not like z without its last one, put the classes on dimension 1 as
  F.cross_entropy does (a segmentation model's (N, C, H, W) logits with (N, H, W) masks).
* "mse": ``F.mse_loss(z, y)``, the mean over all elements of (z - y)², written out explicitly
  because torch.func cannot differentiate ``F.mse_loss`` twice in forward-over-reverse mode.
* "binary_cross_entropy": ``F.binary_cross_entropy_with_logits(z, y)``, multi-label
  classification: the mean over all numel(z) entries of -[y log p + (1-y) log(1-p)], p = σ(z)
  entrywise, with targets y in [0, 1] shaped like z. H_ℓ = diag(p(1-p))/numel(z), whatever y.

The output z is the model's logits: the model output itself, or the first floating tensor of a
tuple, dict or dataclass output (gnfx.outputs), so Hugging Face-style output objects work as is.

Parameter vectors are lists of tensors shaped like
``[p for p in model.parameters() if p.requires_grad]``, in that order. Frozen parameters
(``requires_grad=False``) and buffers are used unchanged and take no part in θ. The model's
forward must be deterministic (put dropout in eval mode): it is evaluated more than once. A model
returned by gnfx.compile is accepted at any step: the products are those of the module it was
compiled from, and computing them records no statistics.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from gnfx.compiled import CompiledModel
from gnfx.composite_forms import spectral_norms, uses_weight_norm, written_out
from gnfx.errors import ConfigError, GnfxError
from gnfx.forward_mode import load_decompositions
from gnfx.outputs import logits_of

LossFn = Callable[[Tensor, Tensor], Tensor]
Loss = Union[str, LossFn]
Inputs = Union[Tensor, tuple]
OutputProduct = Callable[[Tensor, Tensor, Tensor], Tensor]  # (z, y, u) -> M u

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index


def _jvp(f, primals: tuple, tangents: tuple):
    """torch.func.jvp, with PyTorch's forward-mode decompositions loaded first by
    gnfx.forward_mode.load_decompositions, which silences TorchScript's deprecation warning (jvp's
    make_dual would load them with it)."""
    load_decompositions()
    return jvp(f, primals, tangents)


@contextlib.contextmanager
def forward_mode_kernels(native_recurrent: bool = True):
    """Kernels that torch.func.jvp can differentiate: the math attention kernel (the fused ones have
    no forward-mode derivative) and, with `native_recurrent`, ATen's own recurrent kernels in place of
    oneDNN's (nn.LSTM on a CPU) and cuDNN's (nn.LSTM and nn.GRU on a GPU), which have none either.
    The model's weight and spectral normalization and reentrant checkpoints are written out by its own context,
    gnfx.composite_forms.written_out."""
    saved = torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled
    if native_recurrent:
        torch.backends.mkldnn.enabled = torch.backends.cudnn.enabled = False
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled = saved


def _lacks_forward_mode(error: BaseException) -> bool:
    """Whether `error`, raised by a forward-mode pass, says that an operation has no forward-mode
    derivative: ATen's NotImplementedError ("Trying to use forward AD with ..."), a
    torch.autograd.Function without jvp (NotImplementedError) or without setup_context (RuntimeError)."""
    return isinstance(error, NotImplementedError) or (
        isinstance(error, RuntimeError) and "autograd.Function" in str(error))


def forward_mode_error(error: BaseException, user: str, fix: str) -> GnfxError:
    """The GnfxError for `error`, raised in the forward-mode pass of `user` (what took the
    derivatives): an operation without a forward-mode derivative, named by torch's message, or a
    forward that failed under dual tensors only; with `fix`."""
    what = ("this model has an operation that has none, or a torch.autograd.Function without setup_context and jvp"
            if _lacks_forward_mode(error) else
            "the model's forward failed under them (a forward-mode formula of torch's that fails on these inputs, "
            "or an error of the forward itself)")
    return GnfxError(f"{user} takes forward-mode derivatives (dual tensors, torch.autograd.forward_ad) through the "
                     f"model, and {what}: {type(error).__name__}: {error}. Fix: {fix}")


@contextlib.contextmanager
def _named_forward_mode_errors():
    """gnfx.ggn's products (and gnfx.diagnose, which takes them) raise forward_mode_error instead of
    torch's error when their forward-mode pass fails."""
    try:
        yield
    except (NotImplementedError, RuntimeError) as error:
        raise forward_mode_error(error, "gnfx.ggn (whose products gnfx.diagnose takes)",
                                 "measure a model without that operation (a custom autograd.Function: give it "
                                 "setup_context and jvp)") from error


@contextlib.contextmanager
def _named_functional_errors():
    """gnfx.ggn's reverse pass (torch.func.vjp through functional_call) raises a GnfxError naming
    torch.func when the model's forward fails under it: some kernels run in a plain forward but
    not on torch.func's wrapped tensors (the recurrent kernels on a PackedSequence)."""
    try:
        yield
    except RuntimeError as error:
        raise GnfxError(
            "gnfx.ggn (whose products gnfx.diagnose takes) runs the model as a function of its parameters under "
            f"torch.func (functional_call, vjp, jvp), and its forward failed there: {type(error).__name__}: {error}. "
            "Either an operation that torch.func cannot run (nn.LSTM, nn.GRU or nn.RNN on a PackedSequence is one: "
            "measure the model on the padded batch instead) or an error of the forward on these inputs") from error


def _classes_first(z: Tensor, y: Tensor) -> bool:
    """Whether class-index targets y put the classes of the logits z on dimension 1 (module doc)."""
    return (not y.is_floating_point() and z.dim() > 2 and y.shape == z.shape[:1] + z.shape[2:]
            and y.shape != z.shape[:-1])


def _cross_entropy(z: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy with the classes on the last axis of z (or on dimension 1: _classes_first)."""
    if _classes_first(z, y):
        return F.cross_entropy(z, y)
    if z.dim() > 2:
        y = y.flatten(0, z.dim() - 2)
        z = z.flatten(0, -2)
    return F.cross_entropy(z, y)


def _mse(z: Tensor, y: Tensor) -> Tensor:
    """Mean squared error over all elements, as F.mse_loss."""
    return ((z - y) ** 2).mean()


_LOSSES = {"cross_entropy": _cross_entropy, "mse": _mse, "binary_cross_entropy": F.binary_cross_entropy_with_logits}


def _loss_fn(loss: Loss) -> LossFn:
    """The loss callable for a loss name or callable."""
    if callable(loss):
        return loss
    if isinstance(loss, (tuple, list)):
        raise ConfigError(f"loss={loss!r}: gnfx.ggn's products (and gnfx.diagnose) take the loss of the first output "
                          f"alone; a weighted sum over several outputs (gnfx.compile's loss= tuple, "
                          f"gnfx.output_losses) is not implemented here. Pass a callable loss(z, y) of the first "
                          f"output, or measure one output's loss at a time")
    if loss not in _LOSSES:
        valid = ", ".join(repr(name) for name in _LOSSES)
        raise ConfigError(
            f"unknown loss {loss!r}; valid names are {valid} (case-sensitive), "
            "or pass a callable loss(z, y) -> scalar"
        )
    return _LOSSES[loss]


def _loss_hessian_product(loss: Loss) -> OutputProduct:
    """(z, y, u) -> H_ℓ u with H_ℓ = ∇²_z loss(z, y), by forward-over-reverse autodiff."""
    loss_fn = _loss_fn(loss)

    def product(z: Tensor, y: Tensor, u: Tensor) -> Tensor:
        return _jvp(grad(lambda out: loss_fn(out, y)), (z,), (u,))[1]

    return product


def _cross_entropy_fisher_product(z: Tensor, y: Tensor, u: Tensor) -> Tensor:
    """(z, y, u) -> F_z u for the categorical likelihood p = softmax(z) of each row.

    Each row (example or token) contributes w_n (diag(p_n) - p_n p_nᵀ), where w_n is the row's
    weight in the mean: 1/N, or 0 for an ignored target and 1/(number kept) otherwise; with no row kept
    (every target ignored, or for the quadratic step a batch whose output gradient is 0 to the last bit)
    the product is 0, not 0/0. u is shaped like z, or K such vectors stacked on a leading axis.
    """
    if _classes_first(z, y):  # the same product of the classes-last z and u, moved back
        axis = u.dim() - z.dim() + 1
        return _cross_entropy_fisher_product(z.movedim(1, -1), y, u.movedim(axis, -1)).movedim(-1, axis)
    classes = z.shape[-1]
    p = torch.softmax(z.reshape(-1, classes), dim=-1)
    u_rows = u.reshape(-1, *p.shape)
    if y.is_floating_point():  # class probabilities: every row counts
        weight = torch.full_like(p[:, 0], 1 / p.shape[0])
    else:
        kept = (y.reshape(-1) != IGNORE_INDEX).to(p.dtype)
        weight = kept / kept.sum().clamp(min=1)
    fisher_u = p * u_rows - p * (p * u_rows).sum(-1, keepdim=True)
    return (weight[:, None] * fisher_u).reshape(u.shape)


def _mse_fisher_product(z: Tensor, y: Tensor, u: Tensor) -> Tensor:
    """(z, y, u) -> F_z u for a unit-variance Gaussian, scaled as the mean MSE: 2 u / numel(z)."""
    return 2 * u / z.numel()


def _binary_cross_entropy_fisher_product(z: Tensor, y: Tensor, u: Tensor) -> Tensor:
    """(z, y, u) -> F_z u for independent Bernoulli entries of mean p = σ(z), scaled as the mean binary
    cross-entropy: p(1-p) u / numel(z), entrywise (y unused: H_ℓ does not depend on the targets)."""
    p = torch.sigmoid(z)
    return p * (1 - p) * u / z.numel()


_FISHER_PRODUCTS = {"cross_entropy": _cross_entropy_fisher_product, "mse": _mse_fisher_product,
                    "binary_cross_entropy": _binary_cross_entropy_fisher_product}


def _fisher_product(loss: Loss) -> OutputProduct:
    """The Fisher output product of a named loss; callables have no known likelihood."""
    if callable(loss):
        raise ConfigError(
            "the Fisher needs a known likelihood: pass loss='cross_entropy', 'mse' or 'binary_cross_entropy', "
            "or use ggn_vp for a custom loss callable"
        )
    _loss_fn(loss)  # rejects unknown names with the list of valid ones
    return _FISHER_PRODUCTS[loss]


def output_hessian_product(loss: str, z: Tensor, y: Tensor, u: Tensor) -> Tensor:
    """H_ℓ u at the output z for a named loss, in closed form (no autodiff): for every named loss H_ℓ
    equals the Fisher's output matrix F_z (see fisher_vp), so this is F_z u, for u shaped
    like z or K such vectors stacked on a leading axis (one product each, in one pass). For
    cross-entropy, y only marks the rows the mean counts (targets other than -100); mse and
    binary_cross_entropy ignore it."""
    return _fisher_product(loss)(z, y, u)


def _functional(model: nn.Module, inputs: Inputs) -> tuple[Callable[[dict], Tensor], dict]:
    """The model as a function of its trainable parameters, and their detached values by name.

    A gnfx CompiledModel computes the function of the module it was compiled from, on the same
    Parameter objects under the same names: that module is evaluated, so that a product neither
    runs the statistic taps nor trips the compiled model's check of its parameters (which
    functional_call swaps for the duration of a call). Each call runs on copies of the buffers, made
    inside it: batch-norm statistics in training mode do not move, and their in-place update writes a
    tensor of the torch.func transform rather than one it captured (which torch.func refuses), with
    kernels that forward mode differentiates (forward_mode_kernels) and the model's weight norm,
    spectral norm and reentrant checkpoints written out (gnfx.composite_forms)."""
    if isinstance(model, CompiledModel):
        model = model._model
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    buffers = dict(model.named_buffers())
    weight_norm, spectral = uses_weight_norm(model), spectral_norms(model)

    def f(theta: dict) -> Tensor:
        with forward_mode_kernels(), written_out(weight_norm, spectral):
            z = logits_of(functional_call(model, {**theta, **{n: b.clone() for n, b in buffers.items()}}, args))
        if z is None:
            raise ConfigError(f"{type(model).__name__} returns no floating tensor to take as the output z")
        return z

    return f, params


def _as_tangents(params: dict, v: Sequence[Tensor], batched: bool = False) -> dict:
    """Check v against the trainable parameters and key it by their names.

    With ``batched``, every entry carries one extra leading dimension K, the same for all.
    """
    if isinstance(v, Tensor) or len(v) != len(params):
        count = "a tensor" if isinstance(v, Tensor) else f"{len(v)} entries"
        raise ValueError(
            f"expected a list of {len(params)} tensors, one per trainable parameter "
            f"({', '.join(params)}), got {count}"
        )
    for i, ((name, p), t) in enumerate(zip(params.items(), v)):
        if (t.shape[1:] if batched else t.shape) != p.shape:
            expected = f"(K, {', '.join(map(str, p.shape))})" if batched else str(tuple(p.shape))
            raise ValueError(
                f"entry {i} has shape {tuple(t.shape)} but must be {expected} "
                f"for parameter {name!r} of shape {tuple(p.shape)}"
            )
    if batched and len({t.shape[0] for t in v}) > 1:
        raise ValueError(f"entries have different leading sizes {[t.shape[0] for t in v]}")
    return dict(zip(params, v))


def _curvature_operator(
    model: nn.Module, inputs: Inputs, targets: Tensor, output_product: OutputProduct
) -> tuple[dict, Callable[[dict], dict]]:
    """The trainable parameters and the map v ↦ Jᵀ M (J v), M applied by output_product."""
    f, params = _functional(model, inputs)
    with _named_functional_errors():
        z, pullback = vjp(f, params)

    def apply(tangents: dict) -> dict:
        with _named_forward_mode_errors():
            jv = _jvp(f, (params,), (tangents,))[1]
        return pullback(output_product(z, targets, jv))[0]

    return params, apply


def ggn_vp(
    model: nn.Module, loss: Loss, inputs: Inputs, targets: Tensor, v: Sequence[Tensor]
) -> list[Tensor]:
    """The GGN-vector product G v = Jᵀ (H_ℓ (J v)).

    J = ∂z/∂θ is the Jacobian of the batch output z = model(*inputs) with respect to the
    trainable parameters θ, and H_ℓ = ∇²_z L the Hessian of the mean loss L with respect to z.

    Args:
        model: any nn.Module; its trainable parameters are θ.
        loss: "cross_entropy", "mse", "binary_cross_entropy" or a callable ``loss(z, y) -> scalar``
            (see module doc).
        inputs: a tensor or a tuple of tensors, passed positionally to the model.
        targets: the targets y of the loss.
        v: tensors shaped like ``[p for p in model.parameters() if p.requires_grad]``.

    Returns:
        G v, as a list shaped like v.
    """
    params, apply = _curvature_operator(model, inputs, targets, _loss_hessian_product(loss))
    gv = apply(_as_tangents(params, v))
    return [gv[name] for name in params]


def ggn_vps(
    model: nn.Module,
    loss: Loss,
    inputs: Inputs,
    targets: Tensor,
    vs: Sequence[Tensor],
    chunk_size: int | None = None,
) -> list[Tensor]:
    """GGN products G v_k for K vectors at once, vectorized with torch.func.vmap.

    Each entry of vs is shaped (K, *parameter shape); slice [k] of every entry gives v_k. The
    reverse pass (z and its pullback) is built once and shared; the forward-mode pass runs
    batched over K. ``chunk_size`` bounds how many products vmap evaluates together (None: all
    K), trading speed for memory.

    Returns:
        G v_k stacked the same way, as a list shaped like vs.
    """
    params, apply = _curvature_operator(model, inputs, targets, _loss_hessian_product(loss))
    gvs = vmap(apply, chunk_size=chunk_size)(_as_tangents(params, vs, batched=True))
    return [gvs[name] for name in params]


def fisher_vp(
    model: nn.Module, loss: Loss, inputs: Inputs, targets: Tensor, v: Sequence[Tensor]
) -> list[Tensor]:
    """The Fisher-vector product F v = Jᵀ (F_z (J v)) of the model's predictive distribution.

    F_z is the Fisher of the likelihood the loss is the negative log of, with respect to the
    output z and scaled like the mean loss:

    * "cross_entropy": p = softmax(z_n) per example (or token) and
      F_z = (1/N) blockdiag(diag(p_n) - p_n p_nᵀ), ignored targets excluded from the N.
    * "mse": a unit-variance Gaussian with mean z, scaled as the mean MSE: F_z = (2/numel(z)) I.
    * "binary_cross_entropy": independent Bernoulli entries of mean p = σ(z), scaled as the mean:
      F_z = diag(p(1-p))/numel(z).

    For every named loss F_z equals H_ℓ, so fisher_vp equals ggn_vp (for soft cross-entropy targets,
    when each row of y sums to 1; for soft binary targets in [0, 1] always). Arguments and result are those of ggn_vp.

    Raises:
        ValueError (gnfx.errors.ConfigError): for a loss callable, whose likelihood is unknown.
    """
    params, apply = _curvature_operator(model, inputs, targets, _fisher_product(loss))
    fv = apply(_as_tangents(params, v))
    return [fv[name] for name in params]


def hvp(
    model: nn.Module, loss: Loss, inputs: Inputs, targets: Tensor, v: Sequence[Tensor]
) -> list[Tensor]:
    """The Hessian-vector product ∇²_θ L v of the mean loss, by forward-over-reverse autodiff.

    Unlike the GGN it includes the second derivatives of the model. Arguments and result are
    those of ggn_vp.
    """
    f, params = _functional(model, inputs)
    loss_fn = _loss_fn(loss)
    tangents = _as_tangents(params, v)
    with _named_forward_mode_errors():
        hv = _jvp(grad(lambda theta: loss_fn(f(theta), targets)), (params,), (tangents,))[1]
    return [hv[name] for name in params]


def ggn_matrix(
    model: nn.Module,
    loss: Loss,
    inputs: Inputs,
    targets: Tensor,
    max_params: int = 5000,
    chunk_size: int | None = None,
) -> Tensor:
    """The dense GGN G = Jᵀ H_ℓ J, of shape (P, P), for tiny models.

    P is the number of trainable parameters, flattened one after another in
    ``model.parameters()`` order. Column i is ``ggn_vp`` of the i-th unit vector; the columns
    are computed with ``ggn_vps`` (``chunk_size`` as there).

    Raises:
        ValueError (gnfx.errors.ConfigError): if P > max_params.
    """
    params = list(_functional(model, inputs)[1].values())
    sizes = [p.numel() for p in params]
    total = sum(sizes)
    if total > max_params:
        raise ConfigError(
            f"ggn_matrix would be {total} x {total}: the model has {total} trainable "
            f"parameters, more than max_params={max_params}; use ggn_vp, or raise max_params"
        )
    eye = torch.eye(total, dtype=params[0].dtype, device=params[0].device)
    basis = [block.reshape(total, *p.shape) for block, p in zip(eye.split(sizes, dim=1), params)]
    columns = ggn_vps(model, loss, inputs, targets, basis, chunk_size=chunk_size)
    # Row k of the concatenation is (G e_k)ᵀ, so its transpose has columns G e_k.
    return torch.cat([c.reshape(total, -1) for c in columns], dim=1).T.contiguous()
