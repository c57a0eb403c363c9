"""First contact with torchvision's detection models, called as their users call them.

    PYTHONPATH=<shim>:<torchvision>:. OMP_NUM_THREADS=1 python -m benchmarks.detection_probe \
        [--models retinanet_resnet50_fpn fcos_resnet50_fpn ssdlite320_mobilenet_v3_large] [--steps 3]

Each model (random weights: weights=None, weights_backbone=None, num_classes=3; train mode) is compiled with
gnfx.compile(model, "kfac", lr=1e-3) and trained `--steps` steps as its users train it: `losses = model(images,
targets); sum(losses.values()).backward()`, images a list of two (3, 128, 128) tensors, targets dicts of
boxes (x1 < x2, y1 < y2) and labels. Neither torch.fx nor torch.export captures these forwards
(`for target in targets`, the training transform's random image size): the forward runs as its Python code,
its submodules' layers opened into blocks (passes/opaque_root.py). Per model: the capture's form, the share of
the trainable parameters in curvature blocks, the blocks, the losses, gnfx's warnings (once each), the
seconds; or the error. One model per process (`--timeout` seconds each). torchvision is not a dependency of
gnfx (benchmarks.torchvision_models.torchvision_or_exit says how to make it importable).
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch

import gnfx
from benchmarks.child_rows import child_row

MODELS = ("retinanet_resnet50_fpn", "fcos_resnet50_fpn", "ssdlite320_mobilenet_v3_large")


def batch(seed: int = 0, n: int = 2, size: int = 128):
    """Two (3, size, size) images and a target of two boxes with labels each."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, size, size, generator=g) for _ in range(n)]
    targets = []
    for _ in range(n):
        corner = torch.rand(2, 2, generator=g) * size / 2
        boxes = torch.cat([corner, corner + 8 + torch.rand(2, 2, generator=g) * size / 2], 1)
        targets.append({"boxes": boxes, "labels": torch.randint(1, 3, (2,), generator=g)})
    return images, targets


def build(name: str) -> torch.nn.Module:
    """torchvision's detection model `name`, random weights, 3 classes, its resizing at 128 (ssdlite's is 320)."""
    from torchvision.models import detection
    kwargs = dict(weights=None, weights_backbone=None, num_classes=3)
    if name != "ssdlite320_mobilenet_v3_large":
        kwargs.update(min_size=128, max_size=128)
    return getattr(detection, name)(**kwargs)


def probe(name: str, steps: int) -> str:
    """One model's row of the table (module doc)."""
    torch.manual_seed(0)
    model = build(name).train()
    start = time.perf_counter()
    losses, said = [], {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = gnfx.compile(model, "kfac", lr=1e-3)
        images, targets = batch()
        for _ in range(steps):
            loss = sum(c(images, targets).values())
            loss.backward()
            c.step()
            c.zero_grad()
            losses.append(f"{loss.item():.3g}")
    for w in caught:
        if "gnfx" in str(w.message) or w.category is RuntimeWarning:
            said.setdefault(str(w.message)[:160], None)
    covered, total = c.layers.coverage(dict(model.named_parameters()))
    return (f"| {name} | {c.layers.form} | {100 * covered / total:.1f}% ({len(c.layers)} blocks, "
            f"{len(c.layers.fallbacks)} fallback) | {', '.join(losses)} | {' / '.join(said) or '-'} | "
            f"{time.perf_counter() - start:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per model")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child's run
    args = parser.parse_args()
    if args.one:
        print(probe(args.one, args.steps))
        return
    print("| model | capture | in blocks | losses | gnfx's warnings (first 160 characters) | s |\n|---|---|---|---|---|---|")
    for name in args.models:
        command = [sys.executable, "-m", "benchmarks.detection_probe", "--one", name, "--steps", str(args.steps)]
        print(child_row(command, args.timeout, lambda error: f"| {name} | - | - | - | raised: {error[:300]} | - |",
                        f"| {name} | - | - | - | timed out after {args.timeout:.0f} s | - |"), flush=True)


if __name__ == "__main__":
    main()
