"""What the statistics learn from the model output of a training forward that collects them.

The taps see each block's `a` and `δ`; the scale of the statistics comes from the model output
`z`, the logits (gnfx.outputs; docs/design.md §1): N, the examples, is its first dimension, and T,
the loss terms per example, the product of its middle dimensions for an (N, ..., C) output
(`loss_average="auto"`; "batch" keeps T = 1). When the user's backward reaches `z`, the rows
whose gradient is exactly zero are the ones the loss ignores (cross-entropy targets of -100), which
drop out of N and M; with loss="cross_entropy" that gradient must be a mean cross-entropy's over
z's classes (gnfx.outputs.check_cross_entropy_gradient), the last dimension or dimension 1 of an
(N, C, H, W) output, which the first gradient at z tells (gnfx.outputs.LogitsLayout: from then on the
rows, T and the true Fisher are those of the classes-last z_c), with loss="binary_cross_entropy" a mean
binary cross-entropy's of every entry (gnfx.outputs.check_binary_cross_entropy_gradient), with loss="mse" one
of at most two magnitudes per column, a piecewise-linear loss's (MAE, a quantile loss), warns
(gnfx.outputs.squared_error_gradient_findings); the true-Fisher backward
(gnfx.fisher, `fisher="mc"` or `"type2"`) starts there too, once per forward. With loss= naming several
outputs (gnfx.output_losses, a weighted sum Σ_k w_k L_k(z_k)) each named z_k is hooked so, its gradient
divided by w_k checked as its loss's, its own true-Fisher backward weighted (`_hook`); a named output
computed from another raises a GnfxError at the forward (gnfx.output_losses.cascade_error: the gradient at
the earlier one mixes both losses). A gradient at z that fails
these checks as it is, or warns, may be s times a mean's, that of a loss scaled by torch.amp.GradScaler,
whose scale s the backward cannot know (on a GPU autograd runs the hooks on its own thread, and nothing
there names the scaler); nor can it be told from a summed loss's (s = M). Its check is kept (z and the
gradient, until the step) and run at the step, which knows s (gnfx.optimizer), on the gradient divided
by s (`check_outputs_at_step`; s = 1 without a scaler): such a loss is named there, with the message the
backward gave before, and nothing of its backward is folded. A mean's gradient passes at the backward
and keeps nothing; so, for s ≥ 1, does every gradient that passes as it is (its sums fall with s and its
implied targets move towards softmax(z)), except that a dense output's one-hot test is not monotone in s
(a scaled gradient that passes it as it is is not checked again). With loss= the loss must be one of
the named outputs alone (of z alone, with one name): a backward that reaches z and another floating
output of at least one dimension (a second head, a VAE's mean and log-variance) raises a GnfxError
(gnfx.outputs.other_output_error); a 0-dimensional output, such as a loss returned with the logits,
is not watched, nor is a view of z (its last position, say: rows of z), whose gradient flows into z.
Without loss= the watched output is the last of the outputs computed one from the other with z's rows
(`_last_computed`: sentence-transformers' sentence embedding, pooled from the token embeddings it returns
first).
An output z is computed from (an encoder-decoder's encoder states, which its decoder reads, returned
with the logits by Hugging Face's T5 and BART) gets the loss's gradient through z: it is fine when
the backward reached z first (autograd reaches z before what z is computed from), and a loss term on
it besides z's goes unseen, as a penalty on the parameters does; reached before z, it is the output
the loss is of (CLIP's logits_per_text, whose transpose is the logits_per_image it returns first): a
GnfxError. Whether an output was reached is whether its gradient hook ran: no values are read.
A backward that fills none of the forward's blocks' gradients (torch.autograd.grad: a gradient penalty's
input gradient, gnfx.filled_gradients) is not the training loss's: the hook lets it pass and waits for one
that does.
One backward that reaches the outputs of two statistic forwards (autograd's graph task tells one backward
from the next: gradient accumulation's backward per forward is fine) adds each forward's rows to N and M,
M = Σ_k N_k T_k, the model of a loss that averages over every forward's rows: distinct micro-batches averaged
in one loss, or augmented views of one batch each row of which is a term of the loss (SimCLR's NT-Xent over
2N anchors, BYOL's symmetrized loss: M = 2N is their number of terms). When the calls are stages of one term
per example instead (the model called K times inside one loss: torchdiffeq's `odeint(compiled_func, y0, t)`
calls it at every solver stage, a cell stepped in a loop, a Siamese pair's distance), each call's rows are
positions of those examples, and S is K times too large, the per-example diagonal per call: warned once
(`note_backward`), naming both cases, with the fix for the second (compile the module whose forward makes the
calls).
"""
from __future__ import annotations

import warnings

import torch

from gnfx.errors import GnfxError
from gnfx.filled_gradients import fills_gradients
from gnfx.fisher import record_true_fisher
from gnfx.output_losses import cascade_error, named_outputs, unnamed_output_error, weighted_check_error
from gnfx.outputs import (LogitsLayout, check_output_gradient, complex_output_fix, floating_outputs,
                          other_output_error, output_gradient_findings)


def watch_output(out, store, settings: dict, layouts: list[LogitsLayout], ignored_rows: bool = True) -> None:
    """Record N and T of the forward `store.forward_id` (a gnfx.statistics.StatisticsStore) from its
    output `out`, and hook its logits for the ignored rows and the true-Fisher backward (module
    docstring). `settings`: gnfx.compile's (loss_average, fisher, losses, mc_samples); `layouts`: the
    optimizer's LogitsLayout of each output loss= names (one without loss=), the classes' axis of z_k.
    `ignored_rows`: whether rows of z with a zero gradient are rows the loss ignores; not for the outputs of
    a method gnfx.compile(methods=...) names (a reinforcement-learning agent's log-probabilities, which PPO's
    clipping gives a zero gradient in rows its mean still counts), whose rows all count."""
    outputs = floating_outputs(out)
    z = outputs[0] if outputs else None
    if settings["loss"] is None and z is not None:
        z = _last_computed(z, outputs[1:])
    fid = store.forward_id
    losses = settings["losses"]
    trained, store.trained = store.trained, []
    if z is not None:
        store.batch_size[fid] = z.shape[0]
        _record_terms(store, fid, layouts[0].classes_last(z), settings)
    if z is not None and z.requires_grad:
        heads = [(None, z)] if losses is None else list(zip(losses, named_outputs(out, losses)))
        _refuse_cascades(heads, losses)
        named = {0} if losses is None else {k.position for k in losses}
        others = [] if losses is None else [(i, t) for i, t in enumerate(outputs) if i not in named]
        _hook(heads, store, settings, others, layouts, trained, ignored_rows)
    elif store.fisher != "empirical":
        if fix := complex_output_fix(out):
            raise GnfxError(f"fisher={store.fisher!r} needs a model output of logits (or predictions for mse) to "
                            f"sample labels from: {fix}")
        got = f"a {out.dim()}-dimensional tensor" if isinstance(out, torch.Tensor) else type(out).__name__
        raise GnfxError(f"fisher={store.fisher!r} needs a model output of logits (or predictions for "
                        f"mse) that requires grad, to sample labels from; got {got}. Fix: return the logits too, "
                        f"first (as nanoGPT's (logits, loss)), or compile without loss= and with an lr (the "
                        f"empirical Fisher, from your backward)")


def _last_computed(z: torch.Tensor, later: list[torch.Tensor]) -> torch.Tensor:
    """Without loss=, the output the statistics count examples and loss terms by: the first floating output z,
    or a later one of as many rows computed from it (and so on), which the loss is then of, not z itself:
    sentence-transformers returns its `token_embeddings` (N, T, d) before the `sentence_embedding` (N, d)
    pooled from them, whose loss (a contrastive or cosine loss of the N sentences) reaches the tokens
    through the pooling only; counted by the tokens, M was the tokens the loss reached (N times the mean
    length) and the per-example n the share of unpadded tokens times N."""
    for other in later:
        if other.requires_grad and other.dim() and other.shape[0] == z.shape[0] and _feeds(z, other):
            z = other
    return z


def _record_terms(store, fid: int, z_c: torch.Tensor, settings: dict) -> None:
    """T of forward `fid`, the loss terms per example of its classes-last output z_c (N, ..., C)."""
    if settings["loss_average"] == "auto" and z_c.dim() > 2:
        store.terms_per_example[fid] = z_c.shape[1:-1].numel()


def _hook(heads: list, store, settings: dict, others: list, layouts: list[LogitsLayout],
          trained: list[torch.Tensor], ignored_rows: bool = True) -> None:
    """When the user's backward reaches an output z_k that loss= names (`heads`: (OutputLoss or None, z_k)
    each, the first z): check its gradient against its loss (divided by its weight w_k), count the rows the
    loss ignores (their gradient is exactly zero) and run the true-Fisher backward (gnfx.fisher) of z_k if
    one is asked for. With one output its kept rows are those of N and M; with several (docs/design.md §1,
    "Several outputs") M is the first output's N·T rows, ignored ones included, and output k's vectors are
    backpropagated at the weight w_k M_k / M (M_k: its own kept rows), so that the statistics are those of
    Σ_k w_k J_kᵀ H_k J_k. `others`: (position, output) of the outputs the loss must not reach (module
    docstring), named by an error once the backward has reached a head and one of them, in either order.
    `trained`: the trained parameters of the forward's blocks, of which the backward must fill one for a
    hook to act (module docstring)."""
    pending, store.pending = store.pending, []
    fid = store.forward_id
    several = len(heads) > 1
    if several:  # M of the statistics: the first output's rows as the forward's layout reads them
        store.kept_fraction[fid] = 1.0
        reference = store.batch_size[fid] * store.terms_per_example.get(fid, 1)
    reached = {"heads": set(), "other": None}
    z = heads[0][1]

    def reached_error(position, other, reaches_z=True):
        if several:
            return unnamed_output_error(settings["losses"], position, tuple(other.shape))
        return other_output_error(settings["loss"], z, position, other, reaches_z)

    def other_hook(position, other):
        def hook(grad):
            if any(_feeds(head, other) for _, head in heads):  # a view of an output (its rows): flows into it
                return
            fed = [j for j, (_, head) in enumerate(heads) if _feeds(other, head)]
            if fed:  # the head's gradient, if the loss reached it, came first (autograd's order)
                if reached["heads"] & set(fed):
                    return
                raise reached_error(position, other, reaches_z=False)
            reached["other"] = reached["other"] or (position, other)
            if reached["heads"]:
                raise reached_error(position, other)
        return hook

    for position, other in others:
        if other.requires_grad:
            other.register_hook(other_hook(position, other))

    def head_hook(j, loss, z_k, layout):
        name = settings["loss"] if loss is None else loss.name
        version = z_k._version

        def hook(grad):
            if not fills_gradients(trained):  # not the training loss's backward (module docstring)
                return grad
            handles[j].remove()  # the true-Fisher backward starts at z_k too: run once
            if j == 0:
                note_backward(store, fid)
            reached["heads"].add(j)
            if name == "cross_entropy" and layout.classes_axis is None:
                layout.settle(z_k, grad)  # the first gradient at z_k: the classes' axis (one more transfer, once)
                if j == 0 and not several:
                    _record_terms(store, fid, layout.classes_last(z_k), settings)
            z_c, grad_c = layout.classes_last(z_k), layout.classes_last(grad)
            kept = (grad_c.reshape(-1, grad_c.shape[-1]) if grad_c.dim() >= 2 else grad_c.reshape(-1, 1)).ne(0).any(1)
            count = kept.sum()
            if name in ("cross_entropy", "binary_cross_entropy", "mse"):  # the check reads the count with its figures: one transfer
                unweighted = grad_c if loss is None or loss.weight == 1.0 else grad_c / loss.weight
                dense = layout.classes_axis == 1
                error, warning, (count,) = output_gradient_findings(name, z_c, unweighted, count, dense=dense)
                if error or warning:  # not a mean's gradient as it is: told at the step, which knows the loss scale
                    store.output_checks.append((name, z_c.detach(), unweighted.detach(), dense, loss if several else None))
            if reached["other"]:
                raise reached_error(*reached["other"])
            fraction = float(count) / max(kept.numel(), 1)
            if not several and ignored_rows:
                store.kept_fraction[fid] = fraction
            if store.fisher != "empirical":
                if z_k._version != version:  # its backward ran already, through the in-place op (`_written_error`)
                    raise _written_error(settings["fisher"], j, several)
                terms = z_k.shape[0] if settings["loss_average"] == "batch" or z_k.dim() < 2 else kept.numel()
                weight = 1.0 if not several else loss.weight * terms * fraction / reference
                record_true_fisher(z_k, pending, settings["fisher"], name, settings["mc_samples"],
                                   terms * fraction, kept, layout, weight)
            return grad
        return hook

    handles = [head.register_hook(head_hook(j, loss, head, layouts[j])) for j, (loss, head) in enumerate(heads)]


def _written_error(fisher: str, j: int, several: bool) -> GnfxError:
    """An output the loop wrote in place after the forward (`logits /= T`): the true-Fisher backward starts at z,
    whose graph the backward through that op has already run and freed by the time z's gradient is known."""
    which = f"output {j} that loss= names" if several else "model output (the logits)"
    return GnfxError(f"fisher={fisher!r} backpropagates sampled vectors from the {which}, which the training loop "
                     f"modified in place after the forward (`logits /= T`, `logits.clamp_(...)`): its backward has "
                     f"already gone through that operation when the output's gradient arrives, so the vectors cannot "
                     f"start there. Fix: write it out of place (`logits = logits / T`), or fisher='empirical'")


def note_backward(store, fid: int) -> None:
    """At the gradient of forward `fid`'s output: warn, once, when the backward running now reached another
    statistic forward's output before (module docstring)."""
    task = torch._C._current_graph_task_id()
    last_task, last_fid = store.last_reached
    store.last_reached = (task, fid)
    if task != last_task or last_fid == fid or store.shared_backward_told:
        return
    store.shared_backward_told = True
    warnings.warn(
        "gnfx: one backward reached the outputs of two or more training forwards of the compiled model, whose "
        "statistics count each forward's rows as loss terms of their own (N and M summed over the forwards). That "
        "is right when the loss averages over each forward's rows: distinct micro-batches averaged in one loss, or "
        "augmented views of one batch whose every row is a term of the loss (SimCLR's NT-Xent over the 2N "
        "anchors, BYOL's loss symmetrized over the two views, DINO's over the student's views): nothing to do. "
        "If instead the calls are stages of one term per example (the model called several times inside one "
        "loss: torchdiffeq's odeint(compiled_func, y0, t) calls it at every solver stage; a cell stepped in a "
        "loop; a Siamese pair's distance), the calls are positions of those examples: S is as many times too "
        "large as there are calls, and the per-example diagonal is per call. Fix: compile the module whose "
        "forward makes the calls (an nn.Module whose forward runs odeint or the loop)", RuntimeWarning, stacklevel=2)


def _refuse_cascades(heads: list, losses) -> None:
    """Raise gnfx.output_losses.cascade_error where one named output is computed from another (one graph
    walk per pair of outputs, with several named)."""
    for j, (_, earlier) in enumerate(heads):
        for k, (_, later) in enumerate(heads):
            if j != k and _feeds(earlier, later):
                raise cascade_error(losses, j, k)


def check_outputs_at_step(store, scale) -> None:
    """At the step: the checks of the gradients at z that the backward left to it (module doc), on grad/s
    for s the loss `scale` of a torch.amp.GradScaler's step (1 without one): each raises or warns as at
    the backward. `store`: the gnfx.statistics.StatisticsStore that holds them, emptied."""
    checks, store.output_checks = store.output_checks, []
    for name, z, grad, dense, entry in checks:
        try:
            check_output_gradient(name, z, grad, dense, scale)
        except GnfxError as failed:
            if entry is None:
                raise
            raise weighted_check_error(entry, name, failed) from None


def _feeds(other: torch.Tensor, z: torch.Tensor) -> bool:
    """Whether z is computed from `other`: whether other's place in the autograd graph, its grad_fn
    and output number, is an input edge of a node z's backward reaches."""
    if other.grad_fn is None:
        return False
    target = (other.grad_fn, other.output_nr)
    seen, todo = set(), [z.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for edge in node.next_functions:
            if edge == target:
                return True
            todo.append(edge[0])
    return False
