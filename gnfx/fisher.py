"""True-Fisher statistics: the output gradients that K-FAC's S and the diagonal are built from.

With `fisher="empirical"` the taps read the gradients of the training loss itself (free). With
`"mc"` and `"type2"` the compiled model, on statistic steps, starts one extra backward pass per
vector from the model output `z` (re-entrant, inside the user's `loss.backward()`, when the
gradient reaches `z`), returning the gradients at every block output; the user's backward then
goes on unchanged, so the gradients the optimizer applies are the true loss's (a tensor hook that removes
itself when the extra backward runs it is put back for the user's: gnfx.hook_removals).

For a loss that is a mean over M terms (rows of z), the backpropagated vectors are `v / M` with

  mc,    cross_entropy:  v = p - onehot(y~),  y~ ~ Categorical(softmax(z))   (E[v vᵀ] = H_ℓ)
  mc,    mse:            v = -sqrt(2/C) ε,    ε ~ N(0, I)     (ℓ = 1/C Σ_c (z_c - y_c)², a Gaussian
                                                              likelihood of variance C/2)
  type2, cross_entropy:  v_c = sqrt(p_c) (e_c - p),  c = 1..C  (columns of H_ℓ^{1/2}:
                                                              Σ_c v_c v_cᵀ = diag(p) - p pᵀ)
  type2, mse:            v_c = sqrt(2/C) e_c
  mc,    binary_cross_entropy:  v = (p - y~)/sqrt(C),  y~_c ~ Bernoulli(p_c), p = σ(z)   (ℓ = 1/C Σ_c bce:
                                                              E[v vᵀ] = diag(p(1-p))/C = H_ℓ)
  type2, binary_cross_entropy:  v_c = sqrt(p_c (1 - p_c) / C) e_c

so that S = M Σ g gᵀ (gnfx.statistics) equals 1/M Σ_m Σ_c v v-backpropagated outer products:
the K-FAC factor of the GGN `Jᵀ H_ℓ J` (type2 exactly, mc in expectation over `mc_samples`).
"""
from __future__ import annotations

import torch

from gnfx.hook_removals import undone_hook_removals
from gnfx.outputs import LogitsLayout

FISHER_TYPES = ("empirical", "mc", "type2")
LOSSES = ("cross_entropy", "mse", "binary_cross_entropy")


def backprop_vectors(z: torch.Tensor, fisher: str, loss: str, samples: int, generator=None):
    """The vectors v (rows like z flattened to (M, C); a 1-dimensional z, one output per example such as a
    binary classifier's squeezed logit, is (N, 1)), each to be backpropagated as v / M, with weights w such
    that Σ w · (outer products) is the estimate."""
    z = z.detach()
    C = z.shape[-1] if z.dim() > 1 else 1
    rows = z.reshape(-1, C)
    if loss == "cross_entropy":
        p = torch.softmax(rows.to(torch.float64 if z.dtype == torch.float64 else torch.float32), dim=-1)
        if fisher == "type2":
            sqrt_p = p.sqrt()
            for c in range(C):
                e = torch.zeros_like(p)
                e[:, c] = 1
                yield (sqrt_p[:, c:c + 1] * (e - p)).to(z.dtype).reshape(z.shape), 1.0
        else:
            for _ in range(samples):
                y = torch.multinomial(p, 1, generator=generator).squeeze(1)
                v = p.clone()
                v[torch.arange(len(y), device=v.device), y] -= 1
                yield v.to(z.dtype).reshape(z.shape), 1.0 / samples
    elif loss == "binary_cross_entropy":
        p = torch.sigmoid(rows.to(torch.float64 if z.dtype == torch.float64 else torch.float32))
        if fisher == "type2":
            scale = (p * (1 - p) / C).sqrt()
            for c in range(C):
                v = torch.zeros_like(p)
                v[:, c] = scale[:, c]
                yield v.to(z.dtype).reshape(z.shape), 1.0
        else:
            for _ in range(samples):
                y = torch.bernoulli(p, generator=generator)
                yield ((p - y) / C ** 0.5).to(z.dtype).reshape(z.shape), 1.0 / samples
    else:  # mse
        scale = (2.0 / C) ** 0.5
        if fisher == "type2":
            for c in range(C):
                v = torch.zeros_like(rows)
                v[:, c] = scale
                yield v.reshape(z.shape), 1.0
        else:
            for _ in range(samples):
                eps = torch.randn(rows.shape, dtype=rows.dtype, device=rows.device, generator=generator)
                yield (-scale * eps).reshape(z.shape), 1.0 / samples


def record_true_fisher(z: torch.Tensor, pending: list, fisher: str, loss: str, samples: int, loss_terms: float,
                       kept: torch.Tensor, logits: LogitsLayout, scale: float = 1.0) -> None:
    """Backpropagate each vector from z to the block outputs in `pending` and record their statistics.

    `pending` holds (block output, block input or None, BlockStatistics, forward id, routing or None, the call
    site's own layout or None: gnfx.taps) of this forward. `kept` marks the rows of z (flattened to (M, C)) that
    the loss counts (cross-entropy drops the targets it ignores): the other rows backpropagate nothing; `loss_terms`
    counts the kept ones. The vectors are those of the classes-last z_c (`logits`,
    gnfx.outputs.LogitsLayout), each backpropagated from z in its own layout. `scale`: a factor of every
    recorded outer product, w_k M_k / M for output k of a loss over several outputs (gnfx.output_watch).

    The backward runs on v itself, entries of order one, and the 1/M (and the weights) multiply its
    gradients after it, in at least float32: a float16 z (autocast) would hold v / M of a large batch in
    its subnormals, below 6.1e-5, and the products after it would lose its digits.
    """
    outputs = [entry[0] for entry in pending]
    if loss_terms == 0 or not outputs:  # no block output: a call that ran the model's own forward (gnfx.variants)
        return
    z_c = logits.classes_last(z)
    mask = kept.reshape(z_c.shape[:-1] + (1,) if z_c.dim() > 1 else z_c.shape).to(z.dtype)
    precision = torch.promote_types(z.dtype, torch.float32)
    for v, weight in backprop_vectors(z_c, fisher, loss, samples):
        with undone_hook_removals():  # a one-shot hook stays for the user's backward (gnfx.hook_removals)
            grads = torch.autograd.grad(z, outputs, grad_outputs=logits.as_output(v * mask), retain_graph=True,
                                        allow_unused=True)
        factor = (weight * scale) ** 0.5 / loss_terms
        for (_, a, stats, fid, routing, layout), g in zip(pending, grads):
            if g is not None:
                stats.record_error(g.to(precision) * factor, a, fid, routing, layout)
