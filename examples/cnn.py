"""A CNN on scikit-learn's digits (1x8x8 images), preconditioned with Shampoo: conv layers are
curvature blocks (unfolded patches), the linear head too.

    python examples/cnn.py [--optimizer shampoo] [--steps 150]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import gnfx  # noqa: E402
from benchmarks.tasks import digits_cnn  # noqa: E402
from quickstart import train  # noqa: E402  (the same loop as the quick start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="shampoo", choices=sorted(gnfx.REGISTRY))
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    train(digits_cnn(), args.optimizer, 1e-3, args.steps, show_table=True)


if __name__ == "__main__":
    main()
