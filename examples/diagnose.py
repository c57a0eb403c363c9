"""How close is each preconditioner to the exact Gauss-Newton step? `gnfx.diagnose` on digits.

    python examples/diagnose.py [--steps 40] [--damping 1e-3]

Trains a small MLP (64 → 32 → 10) on scikit-learn's 8x8 digits for a few dozen steps with each
of diag, rank1, kfac and shampoo, then prints gnfx.diagnose's table for each on a held-out batch:
per block, the relative error of the preconditioner's curvature model against the exact GGN
block (where it has one) and the cosine between its step and the exact damped GGN-Newton step
(G_b + λI)⁻¹ g_b. Without scikit-learn it uses synthetic data (and says so). Runs in well under a
minute on two CPU cores.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import gnfx  # noqa: E402

OPTIMIZERS = {  # learning rates that train this model in a few dozen steps
    "diag": dict(lr=1e-2),
    "rank1": dict(lr=1e-2),
    "kfac": dict(lr=0.1, fisher="type2", loss="cross_entropy"),
    "shampoo": dict(lr=1e-2),
}


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """8x8 digit images scaled to [0, 1] (1797 x 64) and their labels; synthetic without sklearn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        print("scikit-learn is not installed: using synthetic data (10 Gaussian classes in 64 dimensions)")
        g = torch.Generator().manual_seed(0)
        y = torch.randint(0, 10, (1797,), generator=g)
        centers = torch.randn(10, 64, generator=g)
        return centers[y] + torch.randn(1797, 64, generator=g), y
    data = load_digits()
    return torch.tensor(data.data, dtype=torch.float32) / 16, torch.tensor(data.target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--damping", type=float, default=1e-3, help="λ of the reference step (G_b + λI)⁻¹ g_b")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny tensors: more threads only wait on each other

    x, y = digits()
    held_out = (x[-256:], y[-256:])
    x, y = x[:-256], y[:-256]
    for name, hparams in OPTIMIZERS.items():
        start = time.time()
        torch.manual_seed(0)
        model = gnfx.compile(nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)), optimizer=name,
                             stat_every=1, **hparams)
        for _ in range(args.steps):
            idx = torch.randint(0, len(x), (args.batch,))
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            model.step()
            model.zero_grad()
        with torch.no_grad():
            model.eval()
            loss = float(F.cross_entropy(model(held_out[0]), held_out[1]))
            model.train()
        print(f"\n{name}: {args.steps} steps, held-out loss {loss:.3f}")
        gnfx.diagnose(model, held_out, loss="cross_entropy", damping=args.damping)
        print(f"({time.time() - start:.1f} s)")


if __name__ == "__main__":
    main()
