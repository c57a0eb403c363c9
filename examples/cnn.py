"""A CNN on scikit-learn's digits (1x8x8 images), preconditioned with Shampoo: conv layers are
curvature blocks (unfolded patches), the linear head too.

    python examples/cnn.py [--optimizer shampoo] [--steps 150]
"""
import argparse
import os
import sys

import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import gnfx  # noqa: E402
from benchmarks.tasks import digits_cnn  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="shampoo", choices=sorted(gnfx.REGISTRY))
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    task = digits_cnn()
    model = gnfx.compile(task.make_model(seed=0), optimizer=args.optimizer, lr=1e-3)
    print(model)
    batches = task.batches(seed=0)
    for _ in (bar := tqdm(range(args.steps), desc=args.optimizer)):
        x, y = next(batches)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        model.step()
        model.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    print(f"validation loss: {task.eval_loss(model):.3f}")


if __name__ == "__main__":
    main()
