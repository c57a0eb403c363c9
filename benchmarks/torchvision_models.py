"""Defaults on real torchvision models over longer runs: does any optimizer diverge, crash or stall?

    OMP_NUM_THREADS=1 python -m benchmarks.torchvision_models [--steps 200] [--seed 0] [--models resnet18] \
        [--optimizers kfac adamw_0.001] [--out tables.md]

benchmarks.library_models' design (its Problem, train, verdicts, table and command line) with the
models of torchvision.models themselves, built by `torchvision.models.get_model(NAME, num_classes=10)`
from random weights, instead of look-alikes: each gnfx optimizer as
`gnfx.compile(model, optimizer=NAME, loss="cross_entropy")` with nothing else, and AdamW at lr 1e-3
and 3e-3, from the same initial weights on the same batch stream. The task: the digits (standardized),
bilinearly upsampled from 8x8 to 32x32 and repeated over 3 channels, so that every model's
downsampling has pixels to work on; the held-out loss is evaluated on the original module in eval
mode (dropout and stochastic depth off), BatchNorm's running statistics first recomputed from the
current weights on NORM_BATCHES training batches (library_models.held_out_loss: with the running
statistics training leaves, MobileNetV3's BatchNorm momentum of 0.01 kept every optimizer's eval-mode
loss on mobilenet_v3_small at chance, ln 10, for 100 steps; benchmarks/results/torchvision_models.md).

torchvision is not a dependency of gnfx: this script imports it, and says how to make it importable
when it is not (`torchvision_or_exit`).
"""
from __future__ import annotations

import importlib
import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import library_models

GNFX_OPTIMIZERS = ("kfac", "ekfac", "shampoo", "rank1")
IMAGE_SIZE = 32
NORM_BATCHES = 8  # training batches that recompute BatchNorm's running statistics before each evaluation

# The constructor keywords beyond num_classes=10: no auxiliary heads (their logits are a tuple, and
# inception_v3 would need 75x75 images), ViT's image size the task's.
MODEL_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
    "vit_b_16": {"image_size": IMAGE_SIZE},
}
# The default --models: the torchvision models of the first-contact probe, cheapest first.
MODELS = ("mobilenet_v3_small", "resnet18", "efficientnet_b0", "shufflenet_v2_x0_5", "regnet_y_400mf",
          "mnasnet0_5", "squeezenet1_0", "convnext_tiny", "swin_t", "vit_b_16")

SHIM_ADVICE = """torchvision is not importable here ({error}).
It is not a dependency of gnfx. Install a CPU build matching this torch, e.g.
    pip install torchvision --index-url https://download.pytorch.org/whl/cpu
If only a CUDA wheel is available (`pip install --no-deps --target DIR torchvision`), its _C.so
cannot load against a CPU torch and `import torchvision` fails registering a fake kernel for
`torchvision::nms`. The models are pure Python: defining the two operator schemas before the import
is enough. Put this in DIR_SHIM/sitecustomize.py and run with PYTHONPATH=DIR_SHIM:DIR:.
    import torch
    _lib = torch.library.Library("torchvision", "DEF")
    _lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")"""


def torchvision_or_exit():
    """torchvision.models, or exit with SHIM_ADVICE (how to make torchvision importable)."""
    try:
        return importlib.import_module("torchvision.models")
    except Exception as error:  # noqa: BLE001  (any import failure gets the same advice)
        sys.exit(SHIM_ADVICE.format(error=f"{type(error).__name__}: {error}"))


def upsampled_digits(x: torch.Tensor) -> torch.Tensor:
    """Rows of 64 standardized pixels as 3xIMAGE_SIZExIMAGE_SIZE images: bilinear upsampling, the
    one channel repeated."""
    images = F.interpolate(x.view(-1, 1, 8, 8), size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    return images.repeat(1, 3, 1, 1)


def model_builder(name: str) -> Callable[[], nn.Module]:
    """A builder of torchvision's `name` with 10 classes and MODEL_KWARGS[name]."""
    models = torchvision_or_exit()
    return lambda: models.get_model(name, num_classes=10, **MODEL_KWARGS.get(name, {}))


def problems(names: list[str]) -> dict[str, Callable[[], library_models.Problem]]:
    """library_models Problems for torchvision's `names` (any name get_model knows) on the upsampled digits."""
    return {name: (lambda name=name: library_models.digits_problem(model_builder(name), upsampled_digits,
                                                                      NORM_BATCHES))
            for name in names}


def main(argv: list[str] | None = None) -> None:
    models = torchvision_or_exit()
    library_models.main(argv, problems(models.list_models(models)), GNFX_OPTIMIZERS, __doc__, MODELS)


if __name__ == "__main__":
    main()
