"""The losses `loss=` names: one named loss of the model output, or a weighted sum over several outputs.

A training loss of several outputs (docs/design.md §1, "Several outputs") is

    L(θ) = Σ_k w_k L_k(z_k),    L_k the mean-reduced named loss of output z_k,

z_k the floating tensors the model returns (gnfx.outputs.floating_outputs, in the order its tuple, dict or
dataclass lists them): Inception v3's (logits, aux_logits) trained with `ce(logits) + 0.4·ce(aux_logits)`,
a network with deep supervision, BertForPreTraining's (prediction_logits, seq_relationship_logits), a
classifier with a regression head (ce + mse). Its GGN is block-diagonal over the outputs,

    G = Σ_k w_k J_kᵀ H_k J_k,    J_k = ∂z_k/∂θ,  H_k = ∇²_{z_k} L_k,

so the quadratic step's curvature term (JΔ)ᵀH(JΔ) is the weighted sum of each output's own, and the true
Fisher backpropagates each output's vectors, sampled from its own distribution (gnfx.fisher), weighted w_k.

`loss=` is a loss name (one output, the first, of weight 1), or a tuple over the model's floating outputs in
their order: each entry a loss name (weight 1), a pair (name, w_k) with w_k > 0, or None for an output no
loss term reads. The first entry names a loss (the first output gives N, the examples). Outputs after the
last entry have no loss. A backward that reaches an output without a loss raises (gnfx.output_watch): its
loss would be left out of the curvature. So does a named output computed from another (`cascade_error`), and
a quadratic step whose backward did not reach a named output (gnfx.quadratic_step).

The weights are the user's to give: a cross-entropy's gradient w(p - q)/M tells w only where the targets q
are known to be one-hot (its entries off the targets are w p_c/M), not for soft or smoothed ones, where a
smaller w reads as softer targets. What the gradients can tell is checked on statistic steps: the gradient
at z_k divided by w_k must be a mean of its named loss (gnfx.outputs: a cross-entropy's rows sum to zero
and their absolute values to at most 2, a weight given too small raises; binary cross-entropy's implied
targets lie in [0, 1]).
"""
from __future__ import annotations

import dataclasses
import math

from gnfx.errors import ConfigError, GnfxError
from gnfx.fisher import LOSSES
from gnfx.outputs import complex_output_fix, floating_outputs


@dataclasses.dataclass(frozen=True)
class OutputLoss:
    """The named loss L_k of the model's floating output number `position`, of weight w_k in the sum."""
    position: int
    name: str
    weight: float


def output_losses(loss) -> tuple[OutputLoss, ...] | None:
    """The OutputLoss of each output `loss=` names (module docstring), in the order of the outputs; None
    for loss=None. A ConfigError names what is wrong with any other value."""
    if loss is None:
        return None
    if isinstance(loss, str):
        return (OutputLoss(0, _name(loss), 1.0),)
    if not isinstance(loss, (tuple, list)) or not loss:
        raise ConfigError(f"loss={loss!r}: pass a loss name, one of {LOSSES}, or a tuple over the model's "
                          f"outputs of names, (name, weight) pairs or None (module gnfx.output_losses)")
    losses = []
    for position, entry in enumerate(loss):
        if entry is None:
            continue
        name, weight = (entry, 1.0) if isinstance(entry, str) else _pair(entry, position)
        losses.append(OutputLoss(position, _name(name), float(weight)))
    if not losses or losses[0].position != 0:
        raise ConfigError(f"loss={loss!r}: its first entry must name the loss of the model's first output, "
                          f"whose first dimension gnfx reads as the examples N (return the output of the main "
                          f"loss first)")
    return tuple(losses)


def valid_loss(loss) -> bool:
    """Whether `loss` is a value output_losses accepts (for gnfx.compile's check of loss=)."""
    try:
        output_losses(loss)
    except ConfigError:
        return False
    return True


def _name(name) -> str:
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r} in loss=: valid names are {LOSSES} (each a mean-reduced loss)")
    return name


def _pair(entry, position: int) -> tuple[str, float]:
    weight = entry[1] if isinstance(entry, (tuple, list)) and len(entry) == 2 else None
    if not (isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight)
            and weight > 0):
        raise ConfigError(f"loss= entry {position} is {entry!r}: an output's entry is a loss name, a pair "
                          f"(name, weight) with a finite weight > 0, or None")
    return entry[0], weight


def unnamed_output_error(losses: tuple[OutputLoss, ...], position: int, shape: tuple):
    """The GnfxError for a backward that reaches floating output `position` (of `shape`), which loss= gives
    no loss (gnfx.output_watch, with several outputs named)."""
    named = ", ".join(f"{k.position} ({k.name}, weight {k.weight:g})" for k in losses)
    return GnfxError(
        f"loss= names the losses of the model's floating outputs {named}, and the loss this backward ran also "
        f"reaches output {position} (shape {shape}), which it gives no loss: the sampled Fisher and the "
        f"quadratic-model step would leave that term out. Fix: name that output's loss in loss= (an entry "
        f"'cross_entropy', 'mse' or 'binary_cross_entropy', or (name, weight) for a term w·L), or compile "
        f"without loss= (and with an lr)")


def weighted_check_error(loss: OutputLoss, name: str, failed: GnfxError):
    """The GnfxError for output `loss.position`, whose gradient divided by its weight fails the check of a
    mean `name` loss (`failed`: that check's error; gnfx.output_watch)."""
    return GnfxError(f"loss= entry {loss.position} ({name}, weight {loss.weight:g}): the gradient at that output "
                     f"divided by its weight is checked against a mean {name}, and fails (a weight given smaller "
                     f"than the one your loss takes reads as a larger loss). {failed}")


def named_outputs(out, losses: tuple[OutputLoss, ...], missing_ok: bool = False) -> list:
    """The outputs z_k of `out` (a model's output) that `losses` names, in their order; a GnfxError when
    the model returned fewer floating tensors than loss= names (with `missing_ok`: None for each missing)."""
    outputs = floating_outputs(out)
    missing = [k.position for k in losses if k.position >= len(outputs)]
    if missing_ok:
        return [outputs[k.position] if k.position < len(outputs) else None for k in losses]
    if missing and (fix := complex_output_fix(out)):
        raise GnfxError(f"loss= names the losses of {len(losses)} outputs, and this forward returned {len(outputs)} "
                        f"real ones: {fix}")
    if missing:
        raise GnfxError(f"loss= names the losses of {len(losses)} outputs, up to output {missing[-1]} of the "
                        f"floating tensors the model returns, and this forward returned {len(outputs)} (shapes "
                        f"{[tuple(t.shape) for t in outputs]}; torchvision's GoogLeNet and Inception v3 return "
                        f"their auxiliary logits in training mode only). Fix: name one entry per output, in the "
                        f"order the model returns them (None for one without a loss)")
    return [outputs[k.position] for k in losses]


def cascade_error(losses: tuple[OutputLoss, ...], earlier: int, later: int):
    """The GnfxError for named outputs of which one, `later` (an index into `losses`), is computed from
    another, `earlier` (gnfx.output_watch)."""
    first, second = losses[earlier], losses[later]
    return GnfxError(
        f"loss= names the losses of outputs {first.position} and {second.position}, and output {second.position} "
        f"is computed from output {first.position} (a later stage refining an earlier one's prediction, as a "
        f"stacked hourglass's or RAFT's with a loss on each stage): the gradient the backward sends to output "
        f"{first.position} is then its own loss's plus the later loss's through it, which gnfx cannot tell apart, "
        f"so it can neither check that output's loss nor recover it for the quadratic step. Not supported yet. "
        f"Fix: compile without loss= (and with an lr)")

