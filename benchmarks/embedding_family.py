"""The embedding family, one tiny model per way of reading rows of a trainable table W (V, d), against a
reference: benchmarks/results/first_contact_14_embednorm.md.

Each pattern is a tagger `head(tanh(lookup(ids)))` (a bag: `head(tanh(bag))`) in float64 on one batch of
token ids; per optimizer (kfac, ekfac, shampoo, rank1), with an lr (1e-2) and without one (loss=
'cross_entropy', step='quadratic'), captured by torch.fx and torch.export, two steps of gnfx on it and the
cells: the share of the trainable entries in curvature blocks, and whether the parameters after the two steps
equal (1e-9) those of the reference run:

- a lookup equal to `nn.Embedding`'s (F.embedding on a Parameter, `W[ids]`, `index_select`, `one_hot(ids) @ W`):
  the same two steps of gnfx on the plain `nn.Embedding` tagger with the same values (its steps are checked
  against dense algebra and vmap in tests/test_embedding.py, padding_idx's there too: its row is compared with
  itself here); `index_select`, whose index is a vector, against `nn.Embedding` of the same flattened ids;
- max_norm: the same model without max_norm whose table the loop renormalizes before each of the user's forward
  calls (`torch.embedding_renorm_` under no_grad, what the forward does first) and nowhere else;
- the rest (bags, scale_grad_by_freq, sparse, tied): the eager model's gradient of the first forward (the
  compiled model must reproduce it bit for bit), marked "grad".

Run: `PYTHONPATH=. .venv/bin/python -m benchmarks.embedding_family [--out FILE]`.
"""
from __future__ import annotations

import argparse
import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from benchmarks.child_rows import capture_cells, cell, write_table

V, D, N, R, C = 7, 4, 3, 5, 3
DTYPE = torch.float64
OPTIMIZERS = ("kfac", "ekfac", "shampoo", "rank1")


class Tagger(nn.Module):
    """`head(tanh(lookup(ids)))`, the lookup by `kind` of the table (module doc)."""

    def __init__(self, kind: str, **embedding):
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.emb = nn.Embedding(V, D, **embedding) if kind in ("module", "module_flat", "tied") else None
        self.table = nn.Parameter(torch.randn(V, D)) if self.emb is None and not kind.startswith("bag") else None
        self.bag = nn.EmbeddingBag(V, D, **embedding) if kind.startswith("bag") else None
        self.head = nn.Linear(D, V if kind == "tied" else C)
        if kind == "tied":
            self.head.weight = self.emb.weight
        self.to(DTYPE)

    def forward(self, ids):
        if self.bag is not None:
            return self.head(torch.tanh(self._bag(ids)))
        rows = {"module": lambda: self.emb(ids), "tied": lambda: self.emb(ids),
                "module_flat": lambda: self.emb(ids.reshape(-1)).reshape(N, R, D),
                "functional": lambda: F.embedding(ids, self.table),
                "functional_sparse": lambda: F.embedding(ids, self.table, sparse=True),
                "getitem": lambda: self.table[ids],
                "index_select": lambda: torch.index_select(self.table, 0, ids.reshape(-1)).reshape(N, R, D),
                "one_hot": lambda: F.one_hot(ids, V).to(self.table.dtype) @ self.table}[self.kind]()
        return self.head(torch.tanh(rows))

    def _bag(self, ids):
        flat = ids.reshape(-1)
        offsets = torch.arange(0, flat.numel(), R)
        if self.kind == "bag_weights":
            return self.bag(flat, offsets, per_sample_weights=torch.linspace(0.5, 1.5, flat.numel(), dtype=DTYPE))
        if self.kind == "bag_last_offset":
            return self.bag(flat, torch.cat([offsets, offsets.new_tensor([flat.numel()])]))
        return self.bag(ids)  # 2-D: one bag per row


# name: (Tagger's kind, its options, the reference: "plain" (the plain tagger), "flat" (the plain tagger looking
# up the flattened ids, as index_select must), "renorm" (the plain tagger, renormalized by the loop) or "grad"
# (the eager gradient only))
PATTERNS = {
    "nn.Embedding": ("module", {}, "plain"),
    "nn.Embedding(max_norm=1)": ("module", {"max_norm": 1.0}, "renorm"),
    "nn.Embedding(max_norm=1, norm_type=1, padding_idx=2)": ("module", {"max_norm": 1.0, "norm_type": 1.0,
                                                                         "padding_idx": 2}, "renorm"),
    "nn.Embedding(padding_idx=2)": ("module", {"padding_idx": 2}, "plain"),
    "nn.Embedding(scale_grad_by_freq)": ("module", {"scale_grad_by_freq": True}, "grad"),
    "nn.Embedding(sparse=True)": ("module", {"sparse": True}, "grad"),
    "F.embedding(ids, Parameter)": ("functional", {}, "plain"),
    "F.embedding(ids, Parameter, sparse=True)": ("functional_sparse", {}, "grad"),
    "W[ids]": ("getitem", {}, "plain"),
    "index_select(W, 0, ids)": ("index_select", {}, "flat"),
    "one_hot(ids) @ W": ("one_hot", {}, "plain"),
    "tied input/output embedding": ("tied", {}, "grad"),
    "EmbeddingBag(sum)": ("bag", {"mode": "sum"}, "grad"),
    "EmbeddingBag(mean)": ("bag", {"mode": "mean"}, "grad"),
    "EmbeddingBag(max)": ("bag", {"mode": "max"}, "grad"),
    "EmbeddingBag(sum, offsets, per_sample_weights)": ("bag_weights", {"mode": "sum"}, "grad"),
    "EmbeddingBag(mean, include_last_offset)": ("bag_last_offset", {"mode": "mean", "include_last_offset": True},
                                                "grad"),
    "EmbeddingBag(sum, padding_idx=2)": ("bag", {"mode": "sum", "padding_idx": 2}, "grad"),
    "EmbeddingBag(mean, max_norm=1)": ("bag", {"mode": "mean", "max_norm": 1.0}, "renorm"),
}


def batch(kind: str):
    """Token ids (N, R), every id of the vocabulary present and the padding id 2 twice; labels per token (a
    bag: per bag; tied: over the vocabulary)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (N, R), generator=g)
    ids.view(-1)[:V] = torch.randperm(V, generator=g)
    ids[1, 3] = ids[2, 1] = 2
    shape = (N,) if kind.startswith("bag") else (N, R)
    return ids, torch.randint(0, V if kind == "tied" else C, shape, generator=g)


def loss_of(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def hparams(optimizer: str, lr: bool, capture: str, ids) -> dict:
    given = dict(lr=1e-2) if lr else dict(loss="cross_entropy", step="quadratic")
    # the factors' inverses (roots) refreshed on every step, Shampoo's from the first (not its 10 grafted steps)
    every = {"kfac": dict(inv_every=1), "ekfac": dict(inv_every=1), "rank1": {},
             "shampoo": dict(start_preconditioning_step=0, precondition_frequency=1)}[optimizer]
    return dict(optimizer=optimizer, capture=capture, example_inputs=(ids,), stat_every=1, **every, **given)


def trained(model, ids, y, options: dict, steps: int, renorm: tuple | None = None) -> gnfx.CompiledModel:
    """`model` compiled with `options`, after `steps` steps on (ids, y), its table renormalized to `renorm`
    (max_norm, norm_type) before each forward (the user's loop, as nn.Embedding's max_norm does) when given."""
    torch.manual_seed(1)  # the sampled Fisher's labels
    c = gnfx.compile(model, **options)
    for _ in range(steps):
        if renorm is not None:
            with torch.no_grad():
                torch.embedding_renorm_((model.emb or model.bag).weight, ids, *renorm)
        loss_of(c(ids), y).backward()
        c.step()
        c.zero_grad()
    return c


def reference_cell(name: str, model, c_first_grads: dict, after: dict, optimizer: str, lr: bool, capture: str,
                   steps: int) -> str:
    """Whether the run of the pattern `name` matches its reference (module doc)."""
    kind, options, reference = PATTERNS[name]
    ids, y = batch(kind)
    if reference == "grad":
        eager = Tagger(kind, **options)
        loss_of(eager(ids), y).backward()
        same = all(torch.equal(p.grad.to_dense() if p.grad.is_sparse else p.grad, c_first_grads[n])
                   for n, p in eager.named_parameters())
        return "grad ✓" if same else "grad ✗"
    plain = Tagger({"renorm": kind, "flat": "module_flat"}.get(reference, "module"),
                   **{k: v for k, v in options.items() if k not in ("max_norm", "norm_type")})
    with torch.no_grad():
        for p, q in zip(plain.parameters(), Tagger(kind, **options).parameters()):
            p.copy_(q)
    trained(plain, ids, y, hparams(optimizer, lr, capture, ids), steps,
            renorm=(options["max_norm"], options.get("norm_type", 2.0)) if reference == "renorm" else None)
    worst = max((a - b).abs().max().item() for a, b in zip(after.values(), plain.parameters()))
    return "✓" if worst < 1e-9 else f"✗ ({worst:.1e})"


def row(name: str, optimizer: str, lr: bool, capture: str, steps: int) -> str:
    kind, options, _ = PATTERNS[name]
    ids, y = batch(kind)
    model = Tagger(kind, **options)
    first_grads, error, c = {}, "", None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.manual_seed(1)
            c = gnfx.compile(model, **hparams(optimizer, lr, capture, ids))
            for step in range(steps):
                loss_of(c(ids), y).backward()
                if step == 0:
                    first_grads = {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone()
                                   for n, p in model.named_parameters()}
                c.step()
                c.zero_grad()
            after = {n: p.detach().clone() for n, p in model.named_parameters()}
            verdict = reference_cell(name, model, first_grads, after, optimizer, lr, capture, steps)
        except Exception as exc:  # noqa: BLE001 -- what a user would see is the result
            verdict, error = "error", f"{type(exc).__name__}: {exc}"
    _, blocks, outside = capture_cells(c, model)
    return (f"| {name} | {optimizer} | {'lr' if lr else 'quadratic'} | {capture} | {blocks} | {verdict} | "
            f"{cell(outside, 160)} | {cell(error, 200) or '–'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patterns", nargs="+", choices=list(PATTERNS), default=list(PATTERNS))
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = ["| pattern | optimizer | step | capture | in blocks | reference | fallbacks | error |",
            "|---|---|---|---|---|---|---|---|"]
    for name in args.patterns:
        for optimizer in args.optimizers:
            for lr in (True, False):
                for capture in ("fx", "export"):
                    rows.append(row(name, optimizer, lr, capture, args.steps))
                    print(rows[-1], flush=True)
    write_table(rows, args.out)


if __name__ == "__main__":
    main()
