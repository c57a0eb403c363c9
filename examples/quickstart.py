"""Quick start: train an MLP on scikit-learn's bundled digits with K-FAC in one line of gnfx.

    python examples/quickstart.py [--optimizer kfac] [--steps 200]
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import gnfx  # noqa: E402
from benchmarks.tasks import digits_mlp  # noqa: E402


def train(task, optimizer: str, lr: float, steps: int, show_table: bool = False) -> None:
    """Compile the task's model with gnfx and train it for `steps` steps with a progress bar."""
    model: nn.Module = task.make_model(seed=0)

    model = gnfx.compile(model, optimizer=optimizer, lr=lr)  # the one line

    if show_table:
        print(model)
    batches = task.batches(seed=0)
    for _ in (bar := tqdm(range(steps), desc=optimizer)):
        x, y = next(batches)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        model.step()
        model.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    with torch.no_grad():
        print(f"validation loss after {steps} steps: {task.eval_loss(model):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="kfac", choices=sorted(gnfx.REGISTRY))
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    train(digits_mlp(), args.optimizer, 3e-4, args.steps)  # 64-pixel digits, 10 classes


if __name__ == "__main__":
    main()
