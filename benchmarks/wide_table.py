"""Shampoo on a model with a large embedding table: its state and its whole step against AdamW's.

A recommender-like model: `columns` id columns looked up in one table of `rows` x `dim` entries, their
embeddings concatenated into an MLP of `hidden` units with one logit, trained with a binary cross-entropy
on labels the ids decide (the sign of a sum of a hidden score per row), from a pool of `steps` batches.
Each optimizer named on the command line (gnfx's, "name:key=value" for a hyperparameter, e.g.
"shampoo:diagonal_above=0" for Shampoo with the table's rows cut into blocks of max_block) runs the
same batches as torch.optim.AdamW in one process, interleaved round by round; a round times `steps`
consecutive steps (forward, backward, step: the refresh amortized over them). Printed: state bytes
(model.cost()), the median over rounds of each optimizer's whole step over AdamW's, and the mean training
loss of the last round (all at lr 1e-3).

    PYTHONPATH=. OMP_NUM_THREADS=1 python -m benchmarks.wide_table --rows 50000 \
        --optimizers shampoo shampoo:diagonal_above=0 kfac
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from benchmarks.defaults import variant_settings
from benchmarks.targets import seconds


class Tables(nn.Module):
    def __init__(self, rows: int, dim: int, columns: int, hidden: int):
        super().__init__()
        self.table = nn.Embedding(rows, dim)
        self.mlp = nn.Sequential(nn.Linear(columns * dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, ids):
        return self.mlp(self.table(ids).flatten(1)).squeeze(1)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--columns", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10, help="steps per round (one refresh each by default)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--optimizers", nargs="+", default=["shampoo", "shampoo:diagonal_above=0", "kfac"])
    args = parser.parse_args(argv)

    g = torch.Generator().manual_seed(0)
    score = torch.randn(args.rows, generator=g)
    ids = [torch.randint(args.rows, (args.batch, args.columns), generator=g) for _ in range(args.steps)]
    pool = [(i, (score[i].sum(1) > 0).float()) for i in ids]

    def make():
        torch.manual_seed(0)
        return Tables(args.rows, args.dim, args.columns, args.hidden)

    plain = make()
    runs = {"adamw": (plain, torch.optim.AdamW(plain.parameters(), lr=1e-3, foreach=True))}
    for text in args.optimizers:
        name, hp = variant_settings(text)
        model = gnfx.compile(make(), name, lr=1e-3, **hp)
        runs[text] = (model, model)

    losses = {}

    def round_of(key, model, opt):
        total = 0.0
        for ids, y in pool:
            loss = F.binary_cross_entropy_with_logits(model(ids), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            total += loss.item()
        losses[key] = total / len(pool)

    times = {k: [] for k in runs}
    for i in range(args.rounds + 1):  # the first round is a warm-up: compiling, Shampoo's start at step 10
        for key, (model, opt) in runs.items():
            t = seconds(lambda: round_of(key, model, opt))
            if i:
                times[key].append(t)
    out = {}
    print(f"table {args.rows} x {args.dim}, {args.columns} columns, batch {args.batch}, {args.steps} steps a round")
    print("| optimizer | state | whole step / AdamW's | loss, last round |")
    print("|---|---|---|---|")
    for key, (model, _) in runs.items():
        state = (2 * sum(p.numel() * p.element_size() for p in plain.parameters()) if key == "adamw"
                 else model.cost().total_memory_bytes)
        ratio = statistics.median(t / a for t, a in zip(times[key], times["adamw"]))
        out[key] = {"state_bytes": int(state), "ratio": ratio, "loss": losses[key]}
        print(f"| {key} | {state / 2 ** 20:.1f} MiB | {ratio:.2f} | {losses[key]:.4f} |")
    return out


if __name__ == "__main__":
    main()
