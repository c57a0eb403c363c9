"""ctc loss shape: torch.export can capture `F.ctc_loss` with tensor lengths (a CTC model's own loss).

`F.ctc_loss(log_probs, targets, input_lengths, target_lengths)` with tensor lengths (Hugging Face's
Wav2Vec2ForCTC, HuBERT, ... with labels) is `aten.ctc_loss.Tensor`, a composite of
`aten._ctc_loss.Tensor`, which returns the per-sequence negative log-likelihood (B,) and the forward
variables log α of shape (B, T, 2·max(target_lengths) + 1), sized by the targets' values. torch 2.13
has no fake kernel for it (tagged dynamic_output_shape: torch.export raises
DynamicOutputShapeException), and a new unbacked size for that last dimension does not work either:
the composite reduces the likelihoods and returns no tensor of that size
(PendingUnbackedSymbolNotFound).

While capturing, `_ctc_loss.Tensor` gets a fake kernel: the likelihoods' shape (B,), exact, and for
log α the bound 2·S + 1, S = targets.shape[-1] (the padded length of 2-D targets, the total length
of concatenated 1-D ones, each at least max(target_lengths)). The captured graph keeps the composite
`aten.ctc_loss.Tensor` as one node, whose output (the reduced loss) has its exact shape; at run time
the real kernels compute it and its backward, so the bound shapes nothing that runs.
"""
from __future__ import annotations

import contextlib

import torch


def _ctc_loss_fake(log_probs, targets, input_lengths, target_lengths, blank=0, zero_infinity=False):
    """Fake tensors of `aten._ctc_loss.Tensor`'s outputs: (B,) and the bound (B, T, 2·S + 1) of log α."""
    T, B = log_probs.shape[0], (log_probs.shape[1] if log_probs.dim() == 3 else 1)
    return log_probs.new_empty((B,)), log_probs.new_empty((B, T, 2 * targets.shape[-1] + 1))


@contextlib.contextmanager
def ctc_loss_traceable():
    """While torch.export captures: `aten._ctc_loss.Tensor` has the fake kernel `_ctc_loss_fake`."""
    library = torch.library.Library("aten", "FRAGMENT")
    try:
        torch.library.register_fake("aten::_ctc_loss.Tensor", _ctc_loss_fake, lib=library)
        yield
    finally:
        library._destroy()
