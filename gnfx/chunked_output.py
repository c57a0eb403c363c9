"""A model output returned as a list of chunks of one output along its positions.

litgpt's fine-tuning forward, `model(input_ids, lm_head_chunk_size=128)`, returns its logits z as a
Python list of (N, t_i, C) tensors, the lm_head applied to 128 positions at a time, and its loss
(`chunked_cross_entropy`) is one mean cross-entropy over the unmasked rows of all of them: the loss of
the output z = cat(chunks) along the positions. The statistics count that loss's rows M and check its
gradient at z (docs/design.md §1); a chunk alone holds a share of the rows that depends on each batch's
masked tokens, which no fixed weight of a loss= tuple can give (benchmarks/results/first_contact_11_llm.md).

So a forward whose output is exactly a `list` of two or more floating tensors of one rank r ≥ 3, dtype and
device, equal in every dimension except at most one position dimension d (d = 1 for r = 3, an (N, T, C)
output; 2 ≤ d ≤ r - 2 for r ≥ 4, whose classes may be dimension 1, (N, C, H, W), or the last), is read as
the chunks of one output z: the compiled model returns them as views of z, their concatenation along d
(`ChunkedOutput`), whose gradient is then the loss's at z, each chunk's rows in place. Chunks of equal
shapes are joined along the first such dimension (d = 1, or 2 for r ≥ 4). A list of per-stage outputs of
the same rows (deep supervision, multi-token heads) is read so too: right for one mean over all their
rows; a loss that weights them differently fails the check of loss= at z, and is named with a loss= tuple
over the list's tensors, which reads them as outputs of their own. The concatenation is a copy of z's
size, made only on the forwards whose output gnfx reads (statistic forwards, and every training forward of
the quadratic-model step).
"""
from __future__ import annotations

import torch


class ChunkedOutput(list):
    """The chunks of one output z as the compiled model returns them: a list (the user's loss takes it as the
    forward's list, `logits[-1] = logits[-1][..., :-1, :]` included) of views of `whole`, z itself."""

    def __init__(self, chunks: list[torch.Tensor], whole: torch.Tensor):
        super().__init__(chunks)
        self.whole = whole


def chunk_dimension(out) -> int | None:
    """The dimension d along which `out` is the chunks of one output (module docstring), or None when it is not."""
    if type(out) is not list or len(out) < 2 or not all(isinstance(t, torch.Tensor) for t in out):
        return None
    first = out[0]
    r = first.dim()
    if r < 3 or not first.is_floating_point() or any(
            t.dim() != r or t.dtype != first.dtype or t.device != first.device for t in out):
        return None
    positions = range(1, 2) if r == 3 else range(2, r - 1)
    differing = {i for t in out for i in range(r) if t.shape[i] != first.shape[i]}
    if not differing:
        return positions[0]
    return next(iter(differing)) if len(differing) == 1 and differing <= set(positions) else None


def as_one_output(out):
    """`out` as a ChunkedOutput of views of its concatenation z when it is the chunks of one output (module
    docstring); any other output as it is."""
    d = chunk_dimension(out)
    if d is None:
        return out
    whole = torch.cat(out, dim=d)
    starts = [0]
    for t in out:
        starts.append(starts[-1] + t.shape[d])
    return ChunkedOutput([whole.narrow(d, start, t.shape[d]) for start, t in zip(starts, out)], whole)
