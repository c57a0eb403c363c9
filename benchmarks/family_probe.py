"""First contact with torchvision's model families beyond image classification, called as their users call them.

    PYTHONPATH=<shim>:<torchvision>:. OMP_NUM_THREADS=1 python -m benchmarks.family_probe \
        [--models r3d_18 raft_small] [--optimizers kfac shampoo auto] [--steps 4] [--timeout 600] [--out probe.md]

benchmarks.library_probe's first contact (one model and optimizer per process, random weights, train
mode, `--steps` steps on one random batch) for the families whose inputs, outputs or losses are not an
image classifier's:

- video classification (torchvision.models.video): clips (N, 3, T, H, W), `F.cross_entropy(model(x), y)`,
  compiled with loss="cross_entropy";
- quantization-ready float models (torchvision.models.quantization, quantize=False: QuantStub,
  DeQuantStub, FloatFunctional's add), loss="cross_entropy";
- semantic segmentation (torchvision.models.segmentation): a dict of (N, C, H, W) logits, trained with
  `F.cross_entropy(out["out"], masks) + 0.5 * F.cross_entropy(out["aux"], masks)`, compiled without loss=;
- optical flow (torchvision.models.optical_flow.raft_small): `model(image1, image2)` returns the list of
  the flow refinements, trained with RAFT's sequence loss (the L1 distances to the target flow, weighted
  the i-th of n by gamma^(n - 1 - i)), compiled without loss=.

Optimizers: "kfac" (with loss= where the family has one, else with the family's lr), "shampoo" and "auto"
at lr=1e-3, and, for reference, torch.optim.AdamW at lr=1e-3 on the model itself ("adamw"). Per run: the
capture's form, the share of the trainable parameters in curvature blocks, the losses, gnfx's warnings (once
each), the seconds; or the error. torchvision is not a dependency of gnfx
(benchmarks.torchvision_models.torchvision_or_exit says how to make it importable).
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
import warnings
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

import gnfx
from benchmarks.child_rows import case_table
from benchmarks.torchvision_models import torchvision_or_exit

CLASSES = 4


class Family(NamedTuple):
    module: str  # the torchvision module that builds the family's models
    kwargs: dict  # constructor keywords beyond the model's own (MODELS)
    loss: str | None  # gnfx.compile's loss= (None: the user's own loss, and an lr)
    lr: float  # kfac's lr when loss is None
    batch: Callable[[tuple], tuple]  # input shape -> (inputs, target)
    criterion: Callable  # (model output, target) -> the training loss


def classes(shape: tuple) -> tuple:
    """A batch of random inputs of `shape` and random class labels."""
    return (torch.randn(shape),), torch.randint(0, CLASSES, (shape[0],))


def masks(shape: tuple) -> tuple:
    """Random images of `shape` and a random class per pixel."""
    return (torch.randn(shape),), torch.randint(0, CLASSES, (shape[0], shape[2], shape[3]))


def image_pairs(shape: tuple) -> tuple:
    """Two random images of `shape` and a random target flow (N, 2, H, W)."""
    return (torch.randn(shape), torch.randn(shape)), torch.randn(shape[0], 2, shape[2], shape[3])


def segmentation_loss(out: dict, target: torch.Tensor) -> torch.Tensor:
    """torchvision's reference training loss: the main head's, plus half the auxiliary head's."""
    loss = F.cross_entropy(out["out"], target)
    return loss + 0.5 * F.cross_entropy(out["aux"], target) if "aux" in out else loss


def sequence_loss(flows: list, target: torch.Tensor, gamma: float = 0.8) -> torch.Tensor:
    """RAFT's loss (torchvision's references/optical_flow): sum_i gamma^(n-1-i) mean|flow_i - target|."""
    n = len(flows)
    return sum(gamma ** (n - 1 - i) * (flow - target).abs().mean() for i, flow in enumerate(flows))


FAMILIES = {
    "video": Family("torchvision.models.video", {"num_classes": CLASSES}, "cross_entropy", 1e-3, classes,
                    F.cross_entropy),
    "quantization": Family("torchvision.models.quantization", {"num_classes": CLASSES, "quantize": False},
                           "cross_entropy", 1e-3, classes, F.cross_entropy),
    "segmentation": Family("torchvision.models.segmentation", {"num_classes": CLASSES, "weights_backbone": None},
                           None, 1e-3, masks, segmentation_loss),
    "optical_flow": Family("torchvision.models.optical_flow", {}, None, 1e-4, image_pairs, sequence_loss),
}
# model -> (family, input shape, its own constructor keywords)
MODELS = {
    "r3d_18": ("video", (2, 3, 8, 64, 64), {}),
    "mc3_18": ("video", (2, 3, 8, 64, 64), {}),
    "r2plus1d_18": ("video", (2, 3, 8, 64, 64), {}),
    "s3d": ("video", (2, 3, 16, 224, 224), {}),  # its AvgPool3d((2, 7, 7)) needs 224 pixels and 14+ frames
    "mvit_v1_b": ("video", (1, 3, 16, 224, 224), {}),  # the position tables fix 16 frames of 224 pixels
    "mvit_v2_s": ("video", (1, 3, 16, 224, 224), {}),
    "swin3d_t": ("video", (2, 3, 8, 64, 64), {}),
    "resnet18": ("quantization", (4, 3, 32, 32), {}),
    "mobilenet_v2": ("quantization", (4, 3, 32, 32), {}),
    "googlenet": ("quantization", (4, 3, 64, 64), {"aux_logits": False, "init_weights": True}),
    "shufflenet_v2_x0_5": ("quantization", (4, 3, 32, 32), {}),
    "mobilenet_v3_large": ("quantization", (4, 3, 32, 32), {}),
    "inception_v3": ("quantization", (4, 3, 96, 96), {"aux_logits": False, "init_weights": True}),
    "fcn_resnet50": ("segmentation", (2, 3, 64, 64), {"aux_loss": True}),
    "deeplabv3_mobilenet_v3_large": ("segmentation", (2, 3, 64, 64), {"aux_loss": True}),
    "lraspp_mobilenet_v3_large": ("segmentation", (2, 3, 64, 64), {}),
    "raft_small": ("optical_flow", (2, 3, 128, 128), {}),  # its correlation pyramid needs 128 pixels
}
OPTIMIZERS = ("kfac", "shampoo", "auto", "adamw")  # adamw: torch.optim.AdamW at lr=1e-3 on the model, the reference


def build(name: str, qat: bool = False) -> torch.nn.Module:
    """torchvision's model `name` with random weights, as its family's users build it; with `qat`, a
    quantizable model prepared for quantization-aware training as torchvision's reference script does it
    (`fuse_model(is_qat=True)`, fbgemm's QAT qconfig, `torch.ao.quantization.prepare_qat`)."""
    torchvision_or_exit()
    family, _, kwargs = MODELS[name]
    model = getattr(importlib.import_module(FAMILIES[family].module), name)(**FAMILIES[family].kwargs, **kwargs)
    if qat:
        if family != "quantization":
            raise SystemExit(f"--qat takes the quantizable models; {name} is of the {family} family")
        model.train().fuse_model(is_qat=True)
        model.qconfig = torch.ao.quantization.get_default_qat_qconfig("fbgemm")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao.quantization's own
            torch.ao.quantization.prepare_qat(model, inplace=True)
    return model


def compile_kwargs(family: Family, optimizer: str) -> dict:
    """kfac at its defaults given the family's loss (or at the family's lr without one); the others at lr=1e-3."""
    loss = {} if family.loss is None else {"loss": family.loss}
    if optimizer == "kfac":
        return loss if family.loss is not None else {"lr": family.lr}
    return {**loss, "lr": 1e-3}


def probe(name: str, optimizer: str, steps: int, qat: bool = False) -> str:
    """One table row: `optimizer` for `steps` steps on one random batch of `name` (`qat`: see `build`)."""
    family_name, shape, _ = MODELS[name]
    family = FAMILIES[family_name]
    torch.manual_seed(0)
    model = build(name, qat).train()
    inputs, target = family.batch(shape)
    start, losses = time.time(), []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if optimizer == "adamw":
            c, step = model, torch.optim.AdamW(model.parameters(), lr=1e-3)
        else:
            c = step = gnfx.compile(model, optimizer, **compile_kwargs(family, optimizer))
        for _ in range(steps):
            loss = family.criterion(c(*inputs), target)
            loss.backward()
            step.step()
            step.zero_grad()
            losses.append(f"{loss.item():.3g}")
    if optimizer == "adamw":
        form = blocks = "–"
    else:
        covered, total = c.layers.coverage(dict(model.named_parameters()))
        form, blocks = c.layers.form, f"{100 * covered / total:.1f}%"
    said = sorted({str(w.message)[:90].replace("|", "/") + "..." for w in caught if str(w.message).startswith("gnfx")})
    return (f"| {name}{' (QAT)' if qat else ''} | {optimizer} | {form} | {blocks} | {', '.join(losses)} | "
            f"{'; '.join(said) or '–'} | {time.time() - start:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per model and optimizer")
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--qat", action="store_true", help="the quantizable models prepared for quantization-aware "
                                                           "training (fuse_model(is_qat=True), prepare_qat)")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "OPTIMIZER"), help=argparse.SUPPRESS)  # a child's run
    args = parser.parse_args()
    if args.one:
        print(probe(*args.one, args.steps, args.qat))
        return
    cases = [((f"{name} (QAT)" if args.qat else name, optimizer),
              [sys.executable, "-m", "benchmarks.family_probe", "--one", name, optimizer, "--steps", str(args.steps)]
              + (["--qat"] if args.qat else [])) for name in args.models for optimizer in args.optimizers]
    case_table(cases, ["| model | optimizer | capture | in blocks | losses | gnfx's warnings | s |",
                       "|---|---|---|---|---|---|---|"], args.timeout, args.out)


if __name__ == "__main__":
    main()
