"""First contact with the models of torchvision and timm: capture, blocks and a few steps at defaults.

    OMP_NUM_THREADS=1 python -m benchmarks.library_probe --library torchvision [--models resnet18 swin_t] \
        [--steps 5] [--timeout 400] [--out probe.md] [--cost-rows 8]
    OMP_NUM_THREADS=1 python -m benchmarks.library_probe --library timm [--models vit_tiny_patch16_224]
    OMP_NUM_THREADS=1 python -m benchmarks.library_probe --library timm --models hiera_tiny_224 --size 224

benchmarks.hf_zoo's first contact, for the two vision libraries: each model as its users build it
(`torchvision.models.get_model(NAME, num_classes=10)`, `timm.create_model(NAME, num_classes=10)`, from
random weights), compiled with `gnfx.compile(model, "kfac", loss="cross_entropy")` and nothing else (with `--cost-rows N`,
also cost_rows=N: the rows the plan's cost model assumes per call site, which bound K-FAC's factors),
`--steps` steps on one random batch of 8 images (train mode: dropout and stochastic depth on), each
model in a process of its own under `--timeout` seconds. Per model: the capture's form (torch.fx or
torch.export; `print(model)` says why), the share of the trainable parameters in curvature blocks, the losses, gnfx's
warnings (once each) and the seconds; or the error. Training on a learnable task is
benchmarks.torchvision_models'.

Neither library is a dependency of gnfx; `benchmarks.torchvision_models.torchvision_or_exit` says how to
make torchvision importable (timm imports it too).
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
import warnings

import torch
import torch.nn.functional as F

import gnfx
from benchmarks.child_rows import case_table
from benchmarks.torchvision_models import MODEL_KWARGS, torchvision_or_exit

BATCH = 8
# name -> image size: torchvision's models of the first-contact probe, and timm's (img_size where timm's
# constructor takes it; Swin, LeViT, MaxViT and EfficientFormer need their own resolution)
MODELS = {
    "torchvision": {
        "resnet18": 32, "resnet50": 32, "resnext50_32x4d": 32, "mobilenet_v2": 32, "mobilenet_v3_small": 32,
        "mobilenet_v3_large": 32, "efficientnet_b0": 32, "efficientnet_v2_s": 32, "shufflenet_v2_x0_5": 32,
        "squeezenet1_0": 64, "mnasnet0_5": 32, "regnet_x_400mf": 32, "regnet_y_400mf": 32, "densenet121": 32,
        "googlenet": 64, "inception_v3": 96, "convnext_tiny": 32, "swin_t": 64, "swin_v2_t": 64, "vit_b_16": 32,
        "alexnet": 64, "vgg11_bn": 32,
    },
    "timm": {
        "vit_tiny_patch16_224": 32, "deit_tiny_distilled_patch16_224": 32, "convnext_atto": 32,
        "efficientnet_b0": 32, "mobilenetv3_small_050": 32, "resnet18": 32, "regnetx_002": 32,
        "mixer_s16_224": 32, "resmlp_12_224": 32, "poolformer_s12": 32, "cait_xxs24_224": 32,
        "swin_tiny_patch4_window7_224": 224, "eva02_tiny_patch14_224": 28, "beit_base_patch16_224": 32,
        "edgenext_xx_small": 64, "efficientformer_l1": 224, "fastvit_t8": 64, "mobilevit_xxs": 64,
        "ghostnet_100": 32, "nfnet_l0": 32, "convmixer_768_32": 32, "xcit_nano_12_p16_224": 32, "pvt_v2_b0": 32,
        "sequencer2d_s": 32, "levit_128s": 224, "coat_tiny": 32, "hrnet_w18_small": 64, "dla34": 32,
        "cspresnet50": 32, "lcnet_050": 32,
    },
}
IMG_SIZE_PREFIXES = ("vit_", "deit_", "mixer_", "resmlp_", "cait_", "eva02_", "beit_", "xcit_", "coat_")  # timm's img_size=


def build(library: str, name: str, size: int) -> torch.nn.Module:
    """The library's model `name` with 10 classes, as its users build it."""
    torchvision_or_exit()
    if library == "torchvision":
        kwargs = dict(MODEL_KWARGS.get(name, {}), **({"image_size": size} if name.startswith("vit_") else {}))
        return importlib.import_module("torchvision.models").get_model(name, num_classes=10, **kwargs)
    timm = importlib.import_module("timm")
    if name.startswith(IMG_SIZE_PREFIXES):
        return timm.create_model(name, num_classes=10, img_size=size)
    if name in MODELS["timm"]:
        return timm.create_model(name, num_classes=10)
    try:  # a model off the list (--size): at that resolution where its constructor takes one
        return timm.create_model(name, num_classes=10, img_size=size)
    except TypeError:
        return timm.create_model(name, num_classes=10)


def probe(library: str, name: str, size: int, steps: int, cost_rows: int | None = None) -> str:
    """One table row: kfac at defaults (and the given cost_rows) for `steps` steps on one batch of `name`."""
    torch.manual_seed(0)
    model = build(library, name, size)
    x, y = torch.randn(BATCH, 3, size, size), torch.randint(0, 10, (BATCH,))
    start, losses = time.time(), []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = gnfx.compile(model, "kfac", loss="cross_entropy", **({} if cost_rows is None else {"cost_rows": cost_rows}))
        for _ in range(steps):
            loss = F.cross_entropy(c(x), y)
            loss.backward()
            c.step()
            c.zero_grad()
            losses.append(f"{loss.item():.3g}")
    covered, total = c.layers.coverage(dict(model.named_parameters()))
    said = sorted({str(w.message)[:90].replace("|", "/") + "..." for w in caught if str(w.message).startswith("gnfx")})
    return (f"| {name} | {c.layers.form} | {100 * covered / total:.1f}% | {', '.join(losses)} | "
            f"{'; '.join(said) or '–'} | {time.time() - start:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", choices=sorted(MODELS), required=True)
    parser.add_argument("--models", nargs="+", help="default: every model of the library's list")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=400, help="seconds per model")
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--cost-rows", type=int, help="gnfx.compile's cost_rows (default: gnfx's)")
    parser.add_argument("--size", type=int, help="image size of the --models that are not on the library's list "
                                                 "(any name the library builds; timm's img_size where it takes one)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process's model
    args = parser.parse_args()
    sizes = dict(MODELS[args.library], **{name: args.size for name in args.models or () if args.size})
    if args.one:
        print(probe(args.library, args.one, sizes[args.one], args.steps, args.cost_rows))
        return
    cases = []
    for name in args.models or sizes:
        if name not in sizes:
            parser.error(f"unknown model {name!r} of {args.library}: one of {', '.join(sizes)}, or any other with "
                         f"--size")
        command = [sys.executable, "-m", "benchmarks.library_probe", "--library", args.library, "--one", name,
                   "--steps", str(args.steps)] + ([] if args.cost_rows is None else ["--cost-rows", str(args.cost_rows)])
        command += ["--models", name, "--size", str(sizes[name])] if name not in MODELS[args.library] else []
        cases.append(((name,), command))
    header = ["| model | capture | in blocks | kfac losses | gnfx's warnings | s |", "|---|---|---|---|---|---|"]
    case_table(cases, header, args.timeout, args.out)


if __name__ == "__main__":
    main()
