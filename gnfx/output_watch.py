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
binary cross-entropy's of every entry (gnfx.outputs.check_binary_cross_entropy_gradient); the true-Fisher backward
(gnfx.fisher, `fisher="mc"` or `"type2"`) starts there too, once per forward. With loss= the loss
must be one of z alone: a backward that reaches z and another floating output of at least one
dimension (a second head, a VAE's mean and log-variance) raises a GnfxError
(gnfx.outputs.other_output_error); a 0-dimensional output, such as a loss returned with the logits,
is not watched, nor is a view of z (its last position, say: rows of z), whose gradient flows into z.
An output z is computed from (an encoder-decoder's encoder states, which its decoder reads, returned
with the logits by Hugging Face's T5 and BART) gets the loss's gradient through z: it is fine when
the backward reached z first (autograd reaches z before what z is computed from), and a loss term on
it besides z's goes unseen, as a penalty on the parameters does; reached before z, it is the output
the loss is of (CLIP's logits_per_text, whose transpose is the logits_per_image it returns first): a
GnfxError. Whether an output was reached is whether its gradient hook ran: no values are read.
A backward that fills none of the forward's blocks' gradients (torch.autograd.grad: a gradient penalty's
input gradient, gnfx.filled_gradients) is not the training loss's: the hook lets it pass and waits for one
that does.
"""
from __future__ import annotations

import torch

from gnfx.errors import GnfxError
from gnfx.filled_gradients import fills_gradients
from gnfx.fisher import record_true_fisher
from gnfx.outputs import (LogitsLayout, check_binary_cross_entropy_gradient, check_cross_entropy_gradient,
                          floating_outputs, other_output_error)


def watch_output(out, store, settings: dict, logits: LogitsLayout) -> None:
    """Record N and T of the forward `store.forward_id` (a gnfx.statistics.StatisticsStore) from its
    output `out`, and hook its logits for the ignored rows and the true-Fisher backward (module
    docstring). `settings`: gnfx.compile's (loss_average, fisher, loss, mc_samples); `logits`: the
    optimizer's LogitsLayout, the classes' axis of z."""
    outputs = floating_outputs(out)
    z = outputs[0] if outputs else None
    fid = store.forward_id
    trained, store.trained = store.trained, []
    if z is not None:
        store.batch_size[fid] = z.shape[0]
        _record_terms(store, fid, logits.classes_last(z), settings)
    if z is not None and z.requires_grad:
        _hook(z, store, settings, outputs[1:] if settings["loss"] is not None else [], logits, trained)
    elif store.fisher != "empirical":
        got = f"a {out.dim()}-dimensional tensor" if isinstance(out, torch.Tensor) else type(out).__name__
        raise GnfxError(f"fisher={store.fisher!r} needs a model output of logits (or predictions for "
                        f"mse) that requires grad, to sample labels from; got {got}. Fix: return the logits too, "
                        f"first (as nanoGPT's (logits, loss)), or compile without loss= and with an lr (the "
                        f"empirical Fisher, from your backward)")


def _record_terms(store, fid: int, z_c: torch.Tensor, settings: dict) -> None:
    """T of forward `fid`, the loss terms per example of its classes-last output z_c (N, ..., C)."""
    if settings["loss_average"] == "auto" and z_c.dim() > 2:
        store.terms_per_example[fid] = z_c.shape[1:-1].numel()


def _hook(z: torch.Tensor, store, settings: dict, others: list[torch.Tensor], logits: LogitsLayout,
          trained: list[torch.Tensor]) -> None:
    """When the user's backward reaches the logits z: count the rows the loss ignores (their
    gradient is exactly zero), so that N and M count only the rest, and run the true-Fisher
    backward (gnfx.fisher) if one is asked for. `others`: the outputs the loss must not reach
    (module docstring), named by an error once the backward has reached both z and one of them,
    in either order, after z's own check. `trained`: the trained parameters of the forward's blocks,
    of which the backward must fill one for the hook to act (module docstring)."""
    pending, store.pending = store.pending, []
    fid = store.forward_id
    reached = {"z": False, "other": None}

    def other_hook(position, other):
        def hook(grad):
            if _feeds(z, other):  # a view of z (rows of z): its gradient flows into z
                return
            if _feeds(other, z):  # z's gradient, if the loss reached z, came first (autograd's order)
                if reached["z"]:
                    return
                raise other_output_error(settings["loss"], z, position, other, reaches_z=False)
            reached["other"] = reached["other"] or (position, other)
            if reached["z"]:
                raise other_output_error(settings["loss"], z, position, other)
        return hook

    for position, other in enumerate(others, 1):
        if other.requires_grad:
            other.register_hook(other_hook(position, other))

    def hook(grad):
        if not fills_gradients(trained):  # not the training loss's backward (module docstring)
            return grad
        handle.remove()  # the true-Fisher backward starts at z too: run once
        reached["z"] = True
        if settings["loss"] == "cross_entropy" and logits.classes_axis is None:
            logits.settle(z, grad)  # the first gradient at z: the classes' axis (one more transfer, once)
            _record_terms(store, fid, logits.classes_last(z), settings)
        z_c, grad_c = logits.classes_last(z), logits.classes_last(grad)
        kept = (grad_c.reshape(-1, grad_c.shape[-1]) if grad_c.dim() >= 2 else grad_c.reshape(-1, 1)).ne(0).any(1)
        count = kept.sum()
        if settings["loss"] == "cross_entropy":  # the check reads the count with its own figures: one transfer
            (count,) = check_cross_entropy_gradient(z_c, grad_c, count, dense=logits.classes_axis == 1)
        elif settings["loss"] == "binary_cross_entropy":
            (count,) = check_binary_cross_entropy_gradient(z, grad, count)
        if reached["other"]:
            raise other_output_error(settings["loss"], z, *reached["other"])
        fraction = float(count) / max(kept.numel(), 1)
        store.kept_fraction[fid] = fraction
        if store.fisher != "empirical":
            terms = z.shape[0] if settings["loss_average"] == "batch" or z.dim() < 2 else kept.numel()
            record_true_fisher(z, pending, settings["fisher"], settings["loss"], settings["mc_samples"],
                               terms * fraction, kept, logits)
        return grad

    handle = z.register_hook(hook)


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
