"""The logits of a model output, whatever structure the forward returns it in.

A forward may return a tensor, a tuple, a dict, a (named)tuple or a dataclass (Hugging Face's
`ModelOutput`, a dataclass and a dict at once; a mapping pytree does not know, as transformers'
BatchEncoding). Its logits `z` (docs/design.md §1: N, the examples, is
their first dimension) are the first floating-point tensor of at least one dimension among its
leaves, in the order the structure lists them; a scalar such as a loss returned alongside is
skipped. A list of the chunks of one output along its positions (litgpt's `lm_head_chunk_size`) is
that output, their concatenation (gnfx.chunked_output).
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch.utils import _pytree

from gnfx.chunked_output import ChunkedOutput, as_one_output
from gnfx.errors import GnfxError

# the tolerance of check_cross_entropy_gradient's two tests, relative (rounding: 3-7e-8 in float32, 1.2e-3
# under bfloat16 autocast, benchmarks/results/first_contact_2.md; a logit regularizer such as a z-loss
# of weight 1e-4 adds about its weight to the first)
CROSS_ENTROPY_TOLERANCE = 1e-2
# the rounding of a mean cross-entropy's gradient rows, in units of the dtype's ε, summed over the rows
# (each row's sum rounds to a few ε/M; check_cross_entropy_gradient)
ROUNDING_ROWS = 8


def floating_outputs(out) -> list[torch.Tensor]:
    """The floating tensors of at least one dimension in `out`, in the order its structure lists them; a list
    of the chunks of one output (gnfx.chunked_output) is that one output."""
    leaves = _leaves(as_one_output(out))
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim()]


def complex_output_fix(out) -> str:
    """"" or, when `out` holds a complex tensor (which floating_outputs leaves out: no output loss gnfx models is
    of one), the sentence naming it and the fix, for the errors of loss= that found no real output there."""
    found = [t for t in _leaves(as_one_output(out)) if isinstance(t, torch.Tensor) and t.is_complex()]
    if not found:
        return ""
    return (f"the model returned a complex tensor ({found[0].dtype}, shape {tuple(found[0].shape)}), and loss= "
            f"models a loss of real logits or predictions. Fix: return from the forward the real tensor your loss "
            f"takes (z.abs(), torch.view_as_real(z)), or compile without loss= and with an lr (the empirical "
            f"Fisher, from your backward)")


def _leaves(out) -> list:
    """The leaves of `out`, pytree's, with a leaf that is a dataclass or a mapping not registered as a pytree
    taken apart: a dataclass's fields, a mapping's values (transformers' BatchEncoding, a UserDict, which
    sentence-transformers' CrossEncoder returns with its "scores")."""
    found = []
    for leaf in _pytree.tree_leaves(out):
        if isinstance(leaf, ChunkedOutput):
            found.append(leaf.whole)
        elif hasattr(type(leaf), "__dataclass_fields__"):
            found += _leaves([getattr(leaf, f) for f in type(leaf).__dataclass_fields__])
        elif isinstance(leaf, Mapping):
            found += _leaves(list(leaf.values()))
        else:
            found.append(leaf)
    return found


def logits_of(out) -> torch.Tensor | None:
    """The first floating tensor of at least one dimension in `out` (module doc), or None."""
    return next(iter(floating_outputs(out)), None)


class LogitsLayout:
    """Where the classes of loss="cross_entropy"'s logits z lie, told once by the first gradient at z
    (`settle`), and the classes-last view z_c every consumer of z reads (docs/design.md §1: an (N, ..., C)
    output of M = N·T rows). The classes are on z's last dimension for a classifier's (N, C) or a language
    model's (N, T, C) (`F.cross_entropy(z.reshape(-1, C), y.reshape(-1))`), and on dimension 1 where
    `F.cross_entropy(z, y)` takes an (N, C, d1, ..., dk) output as it is, a segmentation model's (N, C, H, W):
    z_c = z.movedim(1, -1), of the (N, H, W, C) rows whose mean that loss is. The gradient of a mean
    cross-entropy has rows (p - q)/M that sum to zero over the classes: the axis whose sums are the
    smaller (one host read) is the classes'; a loss of neither then fails check_cross_entropy_gradient on
    the view. A gradient that tells nothing (all zero: every target ignored) leaves it unsettled."""

    def __init__(self):
        self.classes_axis: int | None = None  # -1 or 1; None: no gradient at z has told yet

    def settle(self, z: torch.Tensor, grad: torch.Tensor) -> None:
        """Tell the classes' axis from `grad`, the user's loss's gradient at the logits z, unless known: the
        axis its rows sum to zero over; where that does not tell (F.nll_loss of log-probabilities, whose
        rows sum to -1/M: log_softmax_gradient), the axis over which z's logsumexp is 0."""
        if self.classes_axis is not None:
            return
        if z.dim() < 3:
            self.classes_axis = -1
            return
        grad = grad.detach().double()
        last, first = torch.stack([grad.sum(-1).abs().sum(), grad.sum(1).abs().sum()]).tolist()
        if last != first:
            self.classes_axis = -1 if last < first else 1
        elif log_probabilities(z.movedim(1, -1)) != log_probabilities(z):
            self.classes_axis = 1 if log_probabilities(z.movedim(1, -1)) else -1

    def classes_last(self, t: torch.Tensor) -> torch.Tensor:
        """z_c (or a tensor shaped like z, its gradient) with the classes on the last dimension: a view."""
        return t.movedim(1, -1) if self.classes_axis == 1 else t

    def as_output(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like z_c back in z's own layout (the inverse of classes_last)."""
        return t.movedim(-1, 1) if self.classes_axis == 1 else t


def other_output_error(loss: str, z: torch.Tensor, position: int, other: torch.Tensor,
                       reaches_z: bool = True) -> GnfxError:
    """The error for a loss that reaches an output other than z (gnfx.output_watch): `position` is the
    other output's place among the floating tensors the model returns (z: 0); `reaches_z`: False for a
    loss of an output z is computed from that did not reach z."""
    reached = ("also reaches output {} of those tensors (shape {}): a second head's loss, a VAE's KL term on "
               "its mean and log-variance, a triplet or contrastive loss over several embeddings, an interatomic "
               "potential's forces -∂E/∂x computed inside its forward (MACE's: their loss, a loss of E's gradient, "
               "has a curvature neither loss= models; compile without loss= and with an lr)" if reaches_z else
               "reaches output {} of those tensors (shape {}), which z is computed from, and not z: the loss of "
               "that output (CLIP's contrastive loss of logits_per_text, of which the logits_per_image it returns "
               "first is the transpose)")
    return GnfxError(
        f"loss={loss!r} is the loss of the model output z alone (z: the first floating tensor the model returns, "
        f"here of shape {tuple(z.shape)}), and the loss this backward ran "
        f"{reached.format(position, tuple(other.shape))}. The sampled Fisher and the quadratic-model step "
        f"would leave those terms out (a block that only that output reaches would get no curvature at all). Fix: compile "
        f"without loss= and with an lr (the curvature then comes from your whole loss's gradients), or return only the "
        f"output whose {loss} loss you train, or, for a weighted sum of named losses of the outputs, name each in loss= "
        f"in the order the model returns them (loss=({loss!r}, ({loss!r}, 0.4)) for L_0 + 0.4·L_1: "
        f"gnfx.output_losses)")


def check_cross_entropy_gradient(z: torch.Tensor, grad: torch.Tensor, *also: torch.Tensor, dense: bool = False,
                                 scale=1.0) -> list[float]:
    """Raise a GnfxError unless `grad`, the gradient of the user's loss at the logits `z`, can be
    that of a mean cross-entropy over z's last dimension, as loss="cross_entropy" declares (z and grad in
    the classes-last layout, LogitsLayout.classes_last). Its row
    n is (p_n - q_n)/M for the softmax p_n and the target distribution q_n (one-hot, smoothed or
    class-weighted alike; zero for an ignored target), so each row sums to zero, and Σ_n |p_n - q_n|₁
    ≤ 2M bounds the sum of its absolute values by 2 (a class-weighted mean's too), within
    CROSS_ENTROPY_TOLERANCE; the row sums also get ROUNDING_ROWS·ε of the gradient's dtype in all: p_y - 1
    rounds to ε/M in each row of a mean, so a model whose predictions are nearly certain (a training loss
    of 3e-7 in float32 had row sums 7% of the gradient, all rounding) still passes. A loss of another output (z is the first floating tensor the model
    returns) or over another dimension of z fails the first; a
    summed or scaled loss (reduction="sum"; torch.amp.GradScaler's, unless `scale` is its s) the second, at least while the
    model's predictions are far from its targets, as at the start of training. `scale`: the loss scale s
    (a float or a tensor of one entry) of a torch.amp.GradScaler's backward, whose `grad` is s times the
    loss's gradient: the tests read grad/s (the module doc of gnfx.output_watch: known at the step).

    Rows of the form k(e_y - p_n), k > 0, among those whose implied targets (below) are no distribution raise
    too (`lowering_rows`): such a row lowers the log-probability of class y, as DPO's rejected completions do,
    a loss of sequences' log-probabilities whose curvature in z is not cross-entropy's.

    A third test warns (a RuntimeWarning, one text: shown once by Python's default filter) instead of raising: the targets the gradient implies,
    t_n = p_n - M g_n (as the quadratic step recovers them), must be a distribution, t_n ≥ 0 within
    CROSS_ENTROPY_TOLERANCE. They are for one-hot, smoothed and soft targets, ignored rows, and a
    distillation loss KL(q ‖ softmax(z)) at temperature 1 (whose H_ℓ is cross-entropy's: exact). They
    are not where the loss has the form of a cross-entropy at z but another curvature, which gnfx
    models as the unweighted mean cross-entropy of z: class weights (row n is w_n(p_n - q_n)/Σw, its
    H_ℓ weighted by w_n), a distillation loss at temperature T ≠ 1 with its T² (row n is
    T(softmax(z_n/T) - q_n)/M, H_ℓ that of softmax(z/T)), a mean multiplied by a factor above 1.

    With `dense` (z the classes-last view of an (N, C, H, W) output, LogitsLayout) the warning asks more:
    the kept rows' targets t_n must be one-hot (every entry within CROSS_ENTROPY_TOLERANCE of 0 or 1), as a
    segmentation mask's are; it names soft or smoothed masks and, what a dense prediction's loss often is,
    a cross-entropy of logits resized before the loss (Segformer's: of z upsampled to the masks' size),
    whose gradient at z pulls each pixel's one-hot rows back through the resizing into soft rows or ones
    that are no distribution. gnfx then models the cross-entropy of z itself, an approximation of that
    loss's curvature.

    `also`: 0-d tensors the caller needs on the host (gnfx.output_watch: the count of the rows the loss
    keeps), read in the same transfer as the check's two sums, one host synchronization in all; returned
    as floats, in order."""
    return _told(*cross_entropy_gradient_findings(z, grad, *also, dense=dense, scale=scale))


def cross_entropy_gradient_findings(z: torch.Tensor, grad: torch.Tensor, *also: torch.Tensor, dense: bool = False,
                                    scale=1.0) -> tuple[str, str, list[float]]:
    """(the error, the warning, `also` as floats) that check_cross_entropy_gradient raises, warns and
    returns: '' for none."""
    rows = _unscaled(grad.detach().reshape(-1, grad.shape[-1]).double(), scale)
    kept = rows.ne(0).any(1)
    terms = kept.sum().clamp(min=1)
    # t_n of the docstring, in z's precision (at least float32): its test's tolerance is 1e-2, and a float64
    # copy of a language model's logits would be one more tensor of the logits' size in 8 bytes
    precision = torch.promote_types(z.dtype, torch.float32)
    probs = torch.softmax(z.detach().reshape(rows.shape).to(precision), -1)
    unscaled = _unscaled(grad.detach().reshape(rows.shape).to(precision), scale)
    targets = probs - terms * unscaled
    softest = (torch.minimum(targets, 1 - targets).amax(-1) * kept).max().double() if dense else targets.new_zeros(
        (), dtype=torch.float64)
    lowering = lowering_rows(probs, unscaled, kept & targets.amin(-1).lt(-CROSS_ENTROPY_TOLERANCE))
    off, total, lowest, soft, lowered, *values = torch.stack([
        rows.sum(-1).abs().sum(), rows.abs().sum(), targets.min().double(), softest, lowering.double(),
        *(a.double() for a in also)]).tolist()
    what = (f"its gradient at z is not one of a cross-entropy over that dimension (the rows of such a gradient "
            f"sum to zero; here |row sums| / |gradient| = {off / total:.3g}: a loss over another dimension of z, "
            f"one that couples its rows, as CLIP's cross-entropy over the columns of a similarity matrix too, or "
            f"a binary cross-entropy of each entry, BCEWithLogits: compile with loss='binary_cross_entropy' then)"
            if off > CROSS_ENTROPY_TOLERANCE * total + ROUNDING_ROWS * torch.finfo(grad.dtype).eps else
            f"its gradient at z is not one of a mean (its absolute values sum to at most 2; here {total:.4g}: "
            f"reduction='sum', a loss multiplied by a factor, torch.amp.GradScaler's scaled loss stepped without "
            f"scaler.step(optimizer), which tells gnfx its scale, or no cross-entropy of z at all, whose gradient's "
            f"rows sum to zero because z's do: features a LayerNorm centers, as sentence-transformers' embeddings "
            f"under a contrastive loss)"
            if total > 2 * (1 + CROSS_ENTROPY_TOLERANCE) else "")
    error = warning = ""
    if lowered:  # first: its rows sum to zero, and a large k reads as a sum or a scaled mean
        error = (
            f"loss='cross_entropy' is the mean cross-entropy of the model output's logits z over their classes, and "
            f"{lowered:.0f} of the {terms.item()} rows of the gradient at z (z of shape {tuple(z.shape)} with the "
            f"classes last) are those of a term that lowers the log-probability of a class, +k·log softmax(z)[y] "
            f"with k > 0 (the row is k(e_y - softmax(z)): it pushes z_y down), which no cross-entropy has: the loss "
            f"is a function of the log-probabilities of sequences, a preference loss (DPO's or IPO's rejected "
            f"completions, KTO's undesirable ones) or unlikelihood training, whose curvature in z is not "
            f"cross-entropy's (negative on those rows). gnfx would model the wrong loss (the sampled Fisher, the "
            f"quadratic step's GGN and, without a closure, its ρ). Fix: compile without loss= and with an lr "
            f"(K-FAC's statistics then come from your loss's own gradients, fisher='empirical'); a cross-entropy "
            f"of the same model (SFT's, labels -100 on the prompt) is one loss='cross_entropy' models exactly")
    elif what and symmetric_contrastive(z, rows):
        error = (
            f"loss='cross_entropy' is the mean cross-entropy of the rows of the model output's logits z, and the "
            f"gradient at z (of shape {tuple(z.shape)}) is that of a symmetric contrastive loss: the mean of the "
            f"cross-entropy of the rows of a square similarity matrix and of the cross-entropy of its columns, "
            f"labels arange(N) (open_clip's ClipLoss, sentence-transformers' MultipleNegativesSymmetricRankingLoss). "
            f"Its curvature couples the rows of z (the columns' softmax), which a cross-entropy over the rows, "
            f"what gnfx models (the sampled Fisher, the quadratic step's GGN), leaves out: gnfx would model the wrong "
            f"curvature. Fix: compile without loss= and with an lr (K-FAC's statistics then come from your loss's own "
            f"gradients, fisher='empirical'), or train the one-directional loss F.cross_entropy(logits, labels), "
            f"whose curvature loss='cross_entropy' models exactly")
    elif what and off > CROSS_ENTROPY_TOLERANCE * total and log_probabilities(z):
        # F.nll_loss of log-probabilities: checked as the cross-entropy gradient it is (log_softmax_gradient)
        return cross_entropy_gradient_findings(z, log_softmax_gradient(torch.softmax(z, -1), grad), *also, dense=dense,
                                               scale=scale)
    elif what:
        error = (
            f"loss='cross_entropy' is the mean cross-entropy of the model output's logits z over their classes, "
            f"the last dimension or, for an output of three or more dimensions, dimension 1 as F.cross_entropy "
            f"takes an (N, C, H, W) one (z: the first floating tensor the model returns, with the classes last here "
            f"of shape {tuple(z.shape)}), and the loss this backward ran is not: {what}. gnfx would model the "
            f"wrong loss. Fix: return the logits first (alone, or first in a tuple, dict or dataclass) and "
            f"take the mean (reduction='mean', the default), or compile with loss='mse' for a squared error, "
            f"loss='binary_cross_entropy' for BCEWithLogits, or without loss= (and with an lr) for another loss (a "
            f"contrastive loss over the embeddings the model returns, as CLIP's and sentence-transformers' are)")
    elif dense and (lowest < -CROSS_ENTROPY_TOLERANCE or soft > CROSS_ENTROPY_TOLERANCE):
        warning = (
            f"gnfx: loss='cross_entropy' over dimension 1 of the output (shape {tuple(z.shape)} with the classes "
            f"last): the targets the gradient at the logits z implies, t = softmax(z) - M·∂L/∂z, are not one-hot "
            f"(or not a distribution): class weights, soft or smoothed masks, or a loss of logits resized before it "
            f"(Segformer's: of z upsampled to the masks' size). gnfx models the unweighted mean cross-entropy of z "
            f"itself (its Fisher, the quadratic step's GGN): for those an approximation of your loss's curvature, "
            f"and without a closure the quadratic step measures ρ on it, not on your loss. Pass "
            f"model.step(closure) for ρ of your loss, or compile without loss= (and with an lr)")
    elif lowest < -CROSS_ENTROPY_TOLERANCE:
        warning = (
            f"gnfx: loss='cross_entropy': the gradient at the logits z has the form of a mean cross-entropy, but "
            f"the targets it implies, t = softmax(z) - M·∂L/∂z, are not a distribution (an entry below "
            f"-{CROSS_ENTROPY_TOLERANCE}): the loss is a cross-entropy with class weights, a distillation loss at a temperature "
            f"T ≠ 1 (T²·KL of softmax(z/T)), or a mean multiplied by a factor above 1; or it is no cross-entropy of "
            f"z at all, whose gradient's rows sum to zero because z's do (features a LayerNorm centers: "
            f"sentence-transformers' embeddings under a cosine loss). gnfx models it as the "
            f"unweighted mean cross-entropy of z (its Fisher, the quadratic step's GGN): an approximation of its "
            f"curvature where it is a cross-entropy, and without a closure the quadratic step measures ρ on that "
            f"loss, not yours. Pass model.step(closure) for ρ of your loss, or compile without loss= (and with an "
            f"lr), as for a loss that is no cross-entropy")
    return error, warning, values


def log_probabilities(z: torch.Tensor) -> bool:
    """Whether every row of the classes-last z is log-probabilities: its logsumexp 0 within
    CROSS_ENTROPY_TOLERANCE (the output of a log_softmax)."""
    rows = z.detach().reshape(-1, z.shape[-1]).double()
    return bool(rows.numel()) and torch.logsumexp(rows, -1).abs().max().item() < CROSS_ENTROPY_TOLERANCE


def log_softmax_gradient(probs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """g − p (1ᵀg) in each classes-last row, p = `probs` = softmax(z): the gradient a log_softmax whose output is
    z passes to its input, here taken at z itself. A forward ending in log_softmax (PyTorch's MNIST example, norse's
    tutorial) trained with F.nll_loss sends -q_n/M to its log-probabilities z, whose rows do not sum to zero;
    projected, it is the cross-entropy's (p_n − q_n)/M, which gnfx reads the targets from. Exact for
    loss="cross_entropy" on such a z: nll(z) = CE(z) for log-probabilities (their logsumexp is 0), the
    gradients below z are the same (the log_softmax's Jacobian applies the projection, which leaves a
    cross-entropy gradient as it is), and so is the GGN, since cross-entropy's H_ℓ = diag(p) − ppᵀ at z
    annihilates 1, the direction the projection removes. The identity on a cross-entropy gradient."""
    return grad - probs * grad.sum(-1, keepdim=True)


def lowering_rows(probs: torch.Tensor, grad: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """How many of the `candidates` rows (a boolean per row) of `grad`, a loss's gradient at logits whose softmax
    is `probs` (both (rows, C), classes last), are k(e_y - p) with k > 0 for some class y, within
    CROSS_ENTROPY_TOLERANCE of the row's absolute sum: the gradient of +k·log p_y, a term that lowers a class's
    log-probability (DPO's rejected completions), which a cross-entropy's row w(p - q), q ≥ 0, is not for C ≥ 3
    classes. y is the row's largest entry, k = g_y / (1 - p_y). The caller passes the rows whose implied targets
    are no distribution (a row of a mean cross-entropy whose targets are some q ≥ 0 is never one of those)."""
    if probs.shape[-1] < 3:  # with two classes p - e_0 = e_1 - p: every cross-entropy row has that form
        return candidates.new_zeros((), dtype=torch.long)
    label = grad.argmax(-1, keepdim=True)
    k = grad.gather(-1, label) / (1 - probs.gather(-1, label)).clamp(min=torch.finfo(probs.dtype).tiny)
    fitted = (-k * probs).scatter_add(-1, label, k)
    residual = (grad - fitted).abs().sum(-1)
    return (candidates & k.squeeze(-1).gt(0) & residual.le(CROSS_ENTROPY_TOLERANCE * grad.abs().sum(-1))).sum()


def symmetric_contrastive(z: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether `grad`, the gradient of the user's loss at a square z (N, N), is that of the symmetric
    contrastive loss L = (CE(z, arange(N)) + CE(zᵀ, arange(N)))/2 within CROSS_ENTROPY_TOLERANCE:
    2N·∂L/∂z = softmax(z, rows) + softmax(z, columns) - 2I. Read only where check_cross_entropy_gradient
    has already found the rows' sums off, to name that loss (one more host read there)."""
    if z.dim() != 2 or z.shape[0] != z.shape[1] or z.shape[0] < 2:
        return False
    logits = z.detach().double()
    expected = logits.softmax(-1) + logits.softmax(0) - 2 * torch.eye(len(logits), dtype=logits.dtype, device=z.device)
    off = (2 * len(logits) * grad.detach().double() - expected).abs().sum() / expected.abs().sum()
    return bool(off < CROSS_ENTROPY_TOLERANCE)


def check_binary_cross_entropy_gradient(z: torch.Tensor, grad: torch.Tensor, *also: torch.Tensor,
                                        scale=1.0) -> list[float]:
    """Raise a GnfxError unless `grad`, the gradient of the user's loss at the logits `z`, can be that of a
    mean binary cross-entropy of every entry of z, as loss="binary_cross_entropy" declares: that gradient is
    (p - y)/numel(z) for p = σ(z) and targets y in [0, 1], so the targets it implies, y = p - numel(z)·grad
    (as the quadratic step recovers them), must lie in [0, 1] within CROSS_ENTROPY_TOLERANCE. A cross-entropy
    over the classes, a summed or scaled loss (reduction="sum"; torch.amp.GradScaler's, unless `scale` is its s), a loss of another
    output, or a squared error implies targets far outside, at least while the predictions are far from
    the targets. `also` and `scale`: as check_cross_entropy_gradient's, `also` read in the same transfer and
    returned as floats."""
    return _told(*binary_cross_entropy_gradient_findings(z, grad, *also, scale=scale))


def binary_cross_entropy_gradient_findings(z: torch.Tensor, grad: torch.Tensor, *also: torch.Tensor,
                                           scale=1.0) -> tuple[str, str, list[float]]:
    """(the error, no warning: '', `also` as floats) of check_binary_cross_entropy_gradient: '' for none."""
    precision = torch.promote_types(z.dtype, torch.float32)
    targets = torch.sigmoid(z.detach().to(precision)) - z.numel() * _unscaled(grad.detach().to(precision), scale)
    lowest, highest, untouched, *values = torch.stack([targets.min().double(), targets.max().double(),
                                                       grad.eq(0).sum().double(), *(a.double() for a in also)]).tolist()
    error = ""
    if lowest < -CROSS_ENTROPY_TOLERANCE or highest > 1 + CROSS_ENTROPY_TOLERANCE:
        masked = (f" {int(untouched)} of the {z.numel()} entries have no gradient at all: a mean over the entries a mask "
                  f"keeps (ELECTRA's loss over its attention mask) is not the mean over every entry, which gnfx models "
                  f"(loss='cross_entropy' drops the rows of ignored targets, -100; binary_cross_entropy keeps every "
                  f"entry)." if untouched else "")
        error = (
            f"loss='binary_cross_entropy' is the mean binary cross-entropy of every entry of the model output's "
            f"logits z (F.binary_cross_entropy_with_logits(z, y) with y in [0, 1] shaped like z; z: the first "
            f"floating tensor the model returns, here of shape {tuple(z.shape)}), and the loss this backward ran "
            f"is not: the targets its gradient at z implies, y = σ(z) - numel(z)·∂L/∂z, range over "
            f"[{lowest:.4g}, {highest:.4g}], not [0, 1] (a cross-entropy over the classes, a loss summed or "
            f"multiplied by a factor, torch.amp.GradScaler's scaled loss stepped without scaler.step(optimizer), or "
            f"a loss of another output).{masked} gnfx "
            f"would model the wrong loss. Fix: return the logits first and take the mean "
            f"F.binary_cross_entropy_with_logits (reduction='mean', the default), or compile with "
            f"loss='cross_entropy' or loss='mse' for those losses, or without loss= (and with an lr) for another")
    return error, "", values


def squared_error_gradient_findings(z: torch.Tensor, grad: torch.Tensor, *also: torch.Tensor,
                                    scale=1.0) -> tuple[str, str, list[float]]:
    """(no error: '', the warning, `also` as floats) of loss="mse"'s check: a mean squared error's gradient,
    2(z - y)/numel(z), can be any tensor, but one that takes at most two nonzero magnitudes in each column of
    z's rows (its last dimension; an (N,) z is one column) where some column has three or more nonzero entries is a piecewise-linear
    loss's: every |∂L/∂z| equal for an L1 loss (MAE), q/M and (1 - q)/M in the column of quantile q for a
    quantile (pinball) loss, residuals that all match by chance for no squared error. Its curvature is zero
    where it is differentiable; gnfx models the squared error of the targets z - numel(z)·∂L/∂z/2 the gradient
    implies (the sampled Fisher, the quadratic step's GGN, and without a closure its ρ): warned. The test is
    the same for s·∂L/∂z, so `scale` only documents the signature shared with the other checks."""
    rows = grad.detach().reshape(-1, grad.shape[-1] if grad.dim() >= 2 else 1).abs()  # (N,): one column
    nonzero = rows.ne(0)
    largest = rows.amax(0, keepdim=True)
    smallest = torch.where(nonzero, rows, largest).amin(0, keepdim=True)
    two_values = (~nonzero | rows.eq(largest) | rows.eq(smallest)).all()
    kept, columns = nonzero.sum(), rows.shape[-1]
    piecewise, count, *values = torch.stack([two_values.double(), kept.double(),
                                             *(a.double() for a in also)]).tolist()
    warning = ""
    if piecewise and count > 2 * columns:
        warning = (
            f"gnfx: loss='mse' is the mean squared error of the model output z (shape {tuple(z.shape)}), and the "
            f"gradient at z takes at most two magnitudes in each column of its last dimension: a piecewise-linear "
            f"loss, an L1 loss (MAE: every |∂L/∂z| equal) or a quantile (pinball) loss (q/M and (1 - q)/M), whose "
            f"curvature is zero where it is differentiable. gnfx models it as the squared error of the targets "
            f"z - numel(z)·∂L/∂z/2 the gradient implies (its Fisher, the quadratic step's GGN): a surrogate of "
            f"your loss's curvature, and without a closure the quadratic step measures ρ on that squared error, "
            f"not on your loss. Pass model.step(closure) for ρ of your loss, or compile without loss= (and with "
            f"an lr): K-FAC's statistics are then the empirical Fisher of your loss's gradients")
    return "", warning, values


def output_gradient_findings(loss: str, z: torch.Tensor, grad: torch.Tensor, *also: torch.Tensor, dense: bool = False,
                             scale=1.0) -> tuple[str, str, list[float]]:
    """The findings of loss `loss`'s check (cross_entropy: z and grad classes-last, `dense` as
    check_cross_entropy_gradient's; binary_cross_entropy: as the model returns them)."""
    if loss == "cross_entropy":
        return cross_entropy_gradient_findings(z, grad, *also, dense=dense, scale=scale)
    if loss == "mse":
        return squared_error_gradient_findings(z, grad, *also, scale=scale)
    return binary_cross_entropy_gradient_findings(z, grad, *also, scale=scale)


def check_output_gradient(loss: str, z: torch.Tensor, grad: torch.Tensor, dense: bool, scale) -> None:
    """Raise or warn as loss `loss`'s check does (output_gradient_findings), for a gradient `grad` of loss scale s."""
    _told(*output_gradient_findings(loss, z, grad, dense=dense, scale=scale))


def _unscaled(grad: torch.Tensor, scale) -> torch.Tensor:
    """grad / s, s the loss scale (a float or a tensor of one entry; 1: none) in grad's dtype."""
    if isinstance(scale, torch.Tensor):
        return grad / scale.reshape(()).to(grad)
    return grad if scale == 1 else grad / scale


def _told(error: str, warning: str, values: list[float]) -> list[float]:
    """`values`, once `error` is raised (a GnfxError) or `warning` warned (a RuntimeWarning) where not ''."""
    if error:
        raise GnfxError(error)
    if warning:
        warnings.warn(warning, RuntimeWarning, stacklevel=3)
    return values
