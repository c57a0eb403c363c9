"""K-FAC on a model whose blocks torch.fx cannot trace: their layers opened into blocks
(passes/opaque_children.py) against the same blocks kept whole (`leaf_modules`, their parameters in
the diagonal fallback, as every untraceable block was before), and AdamW.

The model: digits (standardized pixels) -> Linear(64, 64) -> two residual blocks h + fc2(relu(fc1 h))
(64-128-64) that halve relu(fc1 h) when more than half of it is positive (a branch on a value:
neither torch.fx nor torch.export takes it) -> Linear(64, 10); cross-entropy, batches of 128.
"kfac": `gnfx.compile(model, optimizer="kfac", loss="cross_entropy")` (the quadratic-model step, no lr);
"kfac (blocks opaque)": the same with leaf_modules=["b1", "b2"]. Reported per seed: the first step (of
`--steps`, evaluated every 5) at which the cross-entropy on the whole training set is at most
`--train-target` (how fast the optimizer fits), and at which the validation cross-entropy is at most
`--target`, and the final validation loss.

    OMP_NUM_THREADS=1 python -m benchmarks.opaque_blocks --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from benchmarks.tasks import _digits_split

OPTIMIZERS = ("kfac", "kfac (blocks opaque)", "adamw lr=1e-3", "adamw lr=3e-3")


class Block(nn.Module):
    def __init__(self, d=64, hidden=128):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        if (h > 0).float().mean() > 0.5:
            h = h * 0.5
        return x + self.fc2(h)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.b1, self.b2, self.out = nn.Linear(64, 64), Block(), Block(), nn.Linear(64, 10)

    def forward(self, x):
        return self.out(self.b2(self.b1(self.inp(x))))


def run(name: str, seed: int, steps: int, target: float, train_target: float) -> dict:
    x_train, y_train, x_val, y_val = _digits_split(standardize=True)
    torch.manual_seed(seed)
    model = Net()
    if name.startswith("adamw"):
        opt = torch.optim.AdamW(model.parameters(), lr=float(name.split("=")[1]))
        trained, step = model, opt.step
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the coverage warning of the opaque baseline
            trained = gnfx.compile(model, optimizer="kfac", loss="cross_entropy",
                                   leaf_modules=["b1", "b2"] if "opaque" in name else ())
        opt, step = trained.optimizer, trained.step
    g = torch.Generator().manual_seed(seed)
    reached, fitted = None, None
    for t in range(1, steps + 1):
        idx = torch.randint(0, len(x_train), (128,), generator=g)
        loss = F.cross_entropy(trained(x_train[idx]), y_train[idx])
        loss.backward()
        step()
        opt.zero_grad()
        if t % 5 == 0:
            with torch.no_grad():
                if reached is None and F.cross_entropy(model(x_val), y_val).item() <= target:
                    reached = t
                if fitted is None and F.cross_entropy(model(x_train), y_train).item() <= train_target:
                    fitted = t
    with torch.no_grad():
        val = F.cross_entropy(model(x_val), y_val).item()
    covered = None if name.startswith("adamw") else trained.layers.coverage(dict(model.named_parameters()))
    return {"reached": reached, "fitted": fitted, "val": val,
            "coverage": None if covered is None else covered[0] / covered[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--target", type=float, default=0.12)
    parser.add_argument("--train-target", type=float, default=0.02)
    args = parser.parse_args()
    print(f"| optimizer | seed | blocks' share | steps to train-set CE ≤ {args.train_target:g} | "
          f"steps to val CE ≤ {args.target:g} | final val CE |")
    print("|---|---|---|---|---|---|")
    for name in OPTIMIZERS:
        for seed in args.seeds:
            r = run(name, seed, args.steps, args.target, args.train_target)
            share = "-" if r["coverage"] is None else f"{100 * r['coverage']:.0f}%"
            fitted, reached = (r[k] or f"> {args.steps}" for k in ("fitted", "reached"))
            print(f"| {name} | {seed} | {share} | {fitted} | {reached} | {r['val']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
