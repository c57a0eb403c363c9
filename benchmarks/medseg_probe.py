"""First contact with MONAI's and segmentation_models_pytorch's models, trained as their users train them.

    PYTHONPATH=<monai>:<segmentation_models_pytorch>:<timm>:<torchvision>:. OMP_NUM_THREADS=1 \
        python -m benchmarks.medseg_probe [--models unet3d smp_unet] [--optimizers kfac shampoo] [--steps 4] \
        [--timeout 300] [--out table.md]

benchmarks.family_probe's first contact (one model and optimizer per process, random weights, train mode,
`--steps` steps on one random batch) for medical and semantic segmentation models, small:

- MONAI (monai.networks.nets) on 3-D volumes (2, 1, 32, 32, 32) with a mask of 3 classes per voxel: UNet (residual
  units, PReLU, instance norm, strided and transposed convolutions), BasicUNet, AttentionUnet, SegResNet (group
  norm), UNETR and SwinUNETR (a ViT and a Swin transformer encoder; SwinUNETR on (1, 1, 64, 64, 64)), DynUNet with deep supervision (its training
  output (N, 1 + heads, C, D, H, W) unbound into the heads, their cross-entropies weighted 1, 1/2, ... as
  MONAI's DynUNet pipeline does), a 3-D DenseNet121 classifying the volumes into 2 classes, and on 2-D images
  (4, 1, 32, 32) AutoEncoder (MSE reconstruction) and VarAutoEncoder (its tutorial's loss: the summed BCE of
  the sigmoid reconstruction plus the KL term of (mu, logvar));
- segmentation_models_pytorch (encoder_weights=None, no download) on images (2, 3, 64, 64) with a mask of 3
  classes per pixel (or one binary mask): Unet, FPN, DeepLabV3Plus, PSPNet, Linknet, UnetPlusPlus, MAnet and
  Segformer over resnet18, mobilenet_v2, efficientnet-b0, mit_b0 and timm's resnet18 ("tu-resnet18").

The loss as users write it: `F.cross_entropy(logits, mask)` on the (N, C, ...) logits (compiled with
loss="cross_entropy"), `F.binary_cross_entropy_with_logits` (loss="binary_cross_entropy"), `F.mse_loss` of a
reconstruction (loss="mse"), and losses gnfx has no name for, compiled without loss=: monai.losses.DiceLoss and
DiceCELoss (softmax, one-hot masks), smp.losses.DiceLoss, the deep-supervision sum, the VAE's.

Optimizers: "kfac" at its defaults with the model's loss= (the quadratic-model step, fisher="mc"; without a
named loss kfac's default lr), "kfac_lr" (kfac at lr 1e-3), "shampoo", "auto" and "diag" at lr 1e-3, all with the
loss= the model has, and for reference torch.optim.AdamW at lr 1e-3 ("adamw"). Per run: the capture's form, the
share of the trainable parameters in curvature blocks, for "kfac" the exactness (float64, two batches, the same
random draws: the largest |difference| of the loss and of any gradient between the compiled model and the
module, and with a named loss and fisher="empirical" the largest difference of A and S of the linear and
convolution blocks (torch's own classes, one group) against forward and tensor hooks on the module, relative to their largest
entry: A = mean over rows and positions of ā āᵀ over the unfolded patches, S = M Σ g gᵀ, M the loss's rows),
the losses, gnfx's warnings (once each), the seconds; or the error. MONAI and segmentation_models_pytorch are
not dependencies of gnfx: unpack their wheels without dependencies on PYTHONPATH (smp needs timm and
torchvision, benchmarks.torchvision_models says how to make torchvision importable).
Results: benchmarks/results/first_contact_10_medseg.md.
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from benchmarks.child_rows import probe_main
from benchmarks.hooked_calls import diagonal_blocks, hooked_calls

CLASSES = 3
VOLUME, IMAGE, SMALL_IMAGE = (2, 1, 32, 32, 32), (2, 3, 64, 64), (4, 1, 32, 32)
SWIN_VOLUME = (1, 1, 64, 64, 64)  # SwinUNETR halves 5 times; its instance norms need 2+ voxels at the bottom
OPTIMIZERS = {"kfac": ("kfac", {}), "kfac_lr": ("kfac", {"lr": 1e-3}), "shampoo": ("shampoo", {"lr": 1e-3}),
              "auto": ("auto", {"lr": 1e-3}), "diag": ("diag", {"lr": 1e-3}),
              "adamw": ("adamw", {"lr": 1e-3})}  # adamw: torch.optim's, the reference


class Case(NamedTuple):
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator, torch.dtype], tuple]  # -> (inputs, target)
    criterion: Callable  # (model output, target) -> the training loss
    loss: str | None  # gnfx.compile's loss= (None: a loss gnfx has no name for)


def monai_nets():
    try:
        from monai.networks import nets
    except ImportError as exc:
        raise SystemExit(f"benchmarks.medseg_probe needs monai ({exc}): unpack its wheel without dependencies "
                         f"on PYTHONPATH") from exc
    return nets


def smp():
    try:
        import segmentation_models_pytorch
    except ImportError as exc:
        raise SystemExit(f"benchmarks.medseg_probe needs segmentation_models_pytorch ({exc}): unpack its wheel "
                         f"and timm's on PYTHONPATH, with torchvision importable (benchmarks.torchvision_models)") from exc
    return segmentation_models_pytorch


def masked(shape: tuple, classes: int = CLASSES) -> Callable:
    """Random inputs of `shape` and a random class per voxel (one binary channel with classes=1)."""
    def batch(g, dtype):
        x = torch.randn(shape, generator=g, dtype=dtype)
        if classes == 1:
            return x, (torch.rand((shape[0], 1) + shape[2:], generator=g) < 0.3).to(dtype)
        return x, torch.randint(0, classes, (shape[0],) + shape[2:], generator=g)
    return batch


def labelled(shape: tuple, classes: int) -> Callable:
    """Random inputs of `shape` and a random class per example."""
    return lambda g, dtype: (torch.randn(shape, generator=g, dtype=dtype),
                             torch.randint(0, classes, (shape[0],), generator=g))


def images01(shape: tuple) -> Callable:
    """Random images in [0, 1] of `shape`, their own targets."""
    return lambda g, dtype: (x := torch.rand(shape, generator=g, dtype=dtype), x)


def monai_dice(out, y):
    """MONAI's DiceLoss with softmax over the logits and the mask one-hot (its tutorials' multi-class loss)."""
    from monai.losses import DiceLoss
    return DiceLoss(to_onehot_y=True, softmax=True)(out, y.unsqueeze(1))


def monai_dice_ce(out, y):
    from monai.losses import DiceCELoss
    return DiceCELoss(to_onehot_y=True, softmax=True)(out, y.unsqueeze(1))


def smp_dice(out, y):
    return smp().losses.DiceLoss("multiclass")(out, y)


def deep_supervision(out, y):
    """MONAI's DynUNet pipeline: the training output (N, 1 + heads, C, ...) unbound, head i's loss weighted 2^-i."""
    heads = torch.unbind(out, dim=1)
    return sum(0.5 ** i * F.cross_entropy(head, y) for i, head in enumerate(heads)) / sum(0.5 ** i for i in range(len(heads)))


def vae_loss(out, x):
    """MONAI's VarAutoEncoder tutorial: summed BCE of the (sigmoid) reconstruction plus the KL term, β = 1."""
    reconstruction, mu, logvar, _ = out
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return F.binary_cross_entropy(reconstruction, x, reduction="sum") + kld


def _monai(name: str, **kwargs) -> Callable[[], nn.Module]:
    return lambda: getattr(monai_nets(), name)(**kwargs)


def _smp(arch: str, encoder: str, classes: int = CLASSES, **kwargs) -> Callable[[], nn.Module]:
    return lambda: getattr(smp(), arch)(encoder_name=encoder, encoder_weights=None, in_channels=3, classes=classes,
                                        **kwargs)


VOLUME_3D = dict(spatial_dims=3, in_channels=1, out_channels=CLASSES)
CE = (F.cross_entropy, "cross_entropy")
MODELS = {
    "unet": Case(_monai("UNet", **VOLUME_3D, channels=(8, 16, 32), strides=(2, 2), num_res_units=2),
                 masked(VOLUME), *CE),
    "unet_dice": Case(_monai("UNet", **VOLUME_3D, channels=(8, 16, 32), strides=(2, 2), num_res_units=2),
                      masked(VOLUME), monai_dice, None),
    "basic_unet": Case(_monai("BasicUNet", **VOLUME_3D, features=(8, 8, 16, 32, 64, 8)), masked(VOLUME), *CE),
    "attention_unet": Case(_monai("AttentionUnet", **VOLUME_3D, channels=(8, 16, 32), strides=(2, 2)),
                           masked(VOLUME), *CE),
    "segresnet": Case(_monai("SegResNet", **VOLUME_3D, init_filters=8, blocks_down=(1, 2, 2), blocks_up=(1, 1)),
                      masked(VOLUME), monai_dice_ce, None),
    "segresnet_ce": Case(_monai("SegResNet", **VOLUME_3D, init_filters=8, blocks_down=(1, 2, 2), blocks_up=(1, 1)),
                         masked(VOLUME), *CE),
    "dynunet_ds": Case(_monai("DynUNet", **VOLUME_3D, kernel_size=(3, 3, 3), strides=(1, 2, 2),
                              upsample_kernel_size=(2, 2), filters=(8, 16, 32), deep_supervision=True,
                              deep_supr_num=1), masked(VOLUME), deep_supervision, None),
    "unetr": Case(_monai("UNETR", in_channels=1, out_channels=CLASSES, img_size=VOLUME[2:], feature_size=8,
                         hidden_size=48, mlp_dim=96, num_heads=4), masked(VOLUME), *CE),
    "swin_unetr": Case(_monai("SwinUNETR", in_channels=1, out_channels=CLASSES, feature_size=12, depths=(1, 1, 1, 1),
                              num_heads=(3, 3, 3, 3), window_size=4), masked(SWIN_VOLUME), *CE),
    "densenet121": Case(_monai("DenseNet121", spatial_dims=3, in_channels=1, out_channels=2),
                        labelled(VOLUME, 2), *CE),
    "autoencoder": Case(_monai("AutoEncoder", spatial_dims=2, in_channels=1, out_channels=1, channels=(4, 8, 16),
                               strides=(2, 2, 2)), images01(SMALL_IMAGE), F.mse_loss, "mse"),
    "var_autoencoder": Case(_monai("VarAutoEncoder", spatial_dims=2, in_shape=SMALL_IMAGE[1:], out_channels=1,
                                   latent_size=8, channels=(8, 16), strides=(2, 2)), images01(SMALL_IMAGE),
                            vae_loss, None),
    "smp_unet": Case(_smp("Unet", "resnet18"), masked(IMAGE), *CE),
    "smp_unet_dice": Case(_smp("Unet", "resnet18"), masked(IMAGE), smp_dice, None),
    "smp_unet_binary": Case(_smp("Unet", "resnet18", classes=1), masked(IMAGE, 1), F.binary_cross_entropy_with_logits,
                            "binary_cross_entropy"),
    "smp_unet_effb0": Case(_smp("Unet", "efficientnet-b0"), masked(IMAGE), *CE),
    "smp_unet_timm": Case(_smp("Unet", "tu-resnet18"), masked(IMAGE), *CE),
    "smp_fpn": Case(_smp("FPN", "mobilenet_v2"), masked(IMAGE), *CE),
    "smp_deeplabv3plus": Case(_smp("DeepLabV3Plus", "resnet18"), masked(IMAGE), *CE),
    "smp_pspnet": Case(_smp("PSPNet", "resnet18"), masked(IMAGE), *CE),
    "smp_linknet": Case(_smp("Linknet", "resnet18"), masked(IMAGE), *CE),
    "smp_unetplusplus": Case(_smp("UnetPlusPlus", "resnet18"), masked(IMAGE), *CE),
    "smp_manet": Case(_smp("MAnet", "resnet18"), masked(IMAGE), *CE),
    "smp_segformer": Case(_smp("Segformer", "mit_b0"), masked(IMAGE), *CE),
}


def patches(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """The unfolded input of a convolution of one group, (rows N·positions, C_in·prod(k)) in weight.flatten(1)'s
    column order: x zero-padded, each spatial dimension unfolded by its kernel, stride and dilation."""
    k, dims = conv.kernel_size, len(conv.kernel_size)
    padding = conv._reversed_padding_repeated_twice if isinstance(conv.padding, str) else \
        [p for p in reversed(conv.padding) for _ in range(2)]
    x = F.pad(x, padding)
    for i in range(dims):
        span = conv.dilation[i] * (k[i] - 1) + 1
        x = x.unfold(2 + i, span, conv.stride[i])[..., ::conv.dilation[i]]
    positions = x.shape[2:2 + dims]
    x = x.permute(0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims))  # (N, *positions, C, *k)
    return x.reshape(x.shape[0] * math.prod(positions), -1)


def layer_rows(module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ā, g) of one call of a linear or convolution module, one row per example and position."""
    if isinstance(module, nn.Linear):
        a, g = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
    else:
        a, g = patches(a, module), g.movedim(1, -1).reshape(-1, g.shape[1])
    return (torch.cat([a, torch.ones_like(a[:, :1])], 1) if module.bias is not None else a), g


def hooked_factors(module: nn.Module, names: list[str], run: Callable[[], torch.Tensor],
                   classes_second: bool) -> tuple[torch.Tensor, dict]:
    """The loss `run()` of `module` and the K-FAC factors of its submodules `names` (module doc) from forward and
    tensor hooks, with its parameters' gradients; M is the number of rows of the output z (N, ..., d) with a
    nonzero gradient, its rows those of z.movedim(1, -1) with `classes_second` (cross-entropy's (N, C, ...)
    logits; docs/design.md §1)."""
    modules, at_z = dict(module.named_modules()), {}

    def at_output(_, inputs, out):
        z = out if isinstance(out, torch.Tensor) else out[0]
        z.register_hook(lambda g: at_z.update(z=g))
    handle = module.register_forward_hook(at_output)
    with hooked_calls(module, names) as records:
        loss = run()
        loss.backward()
    handle.remove()
    z = at_z["z"].movedim(1, -1) if classes_second and at_z["z"].dim() > 2 else at_z["z"]
    rows = int(z.reshape(-1, z.shape[-1]).ne(0).any(1).sum())
    factors = {}
    for n, calls in records.items():
        pairs = [layer_rows(modules[n], a, g) for a, g in calls if g is not None]
        a, g = torch.cat([a for a, _ in pairs]), torch.cat([g for _, g in pairs])
        factors[n] = {"A": a.T @ a / len(a), "S": rows * g.T @ g}
    return loss, factors


def exactness(name: str, hparams: dict) -> str:
    """The compiled float64 model beside the module on two batches (module doc): 'loss Δ, grad Δ[, A/S Δ]'."""
    case = MODELS[name]
    torch.manual_seed(0)
    model = case.build().double().train()
    reference = copy.deepcopy(model)
    named = {"loss": case.loss, "fisher": "empirical"} if case.loss else {"lr": 1e-3}
    c = gnfx.compile(model, "kfac", stat_every=1, stat_decay=0.0, **named, **hparams)
    loss_delta = grad_delta = factor_delta = 0.0
    for i in range(2):
        x, y = case.batch(torch.Generator().manual_seed(i), torch.float64)
        reference.load_state_dict(model.state_dict())
        reference.zero_grad()
        torch.manual_seed(i)  # the same dropout masks and samples in both
        loss = case.criterion(c(x), y)
        loss.backward()
        modules = dict(reference.named_modules())
        checked = [b.name for b in c.layers.blocks if b.kind in ("linear", "conv") and  # torch's own classes: a
                   type(modules.get(b.name)) in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d) and  # subclass may pad first
                   getattr(modules[b.name], "groups", 1) == 1] if case.loss else []
        torch.manual_seed(i)
        expected, factors = hooked_factors(reference, checked, lambda: case.criterion(reference(x), y),
                                           classes_second=case.loss == "cross_entropy")
        loss_delta = max(loss_delta, (loss - expected).abs().item())
        grad_delta = max([grad_delta] + [(p.grad - q.grad).abs().max().item()
                                          for p, q in zip(model.parameters(), reference.parameters())
                                          if p.grad is not None and q.grad is not None])
        c.step()
        c.zero_grad()
        for block, expected_factors in factors.items():
            stats = c.statistics(block)
            for key in ("A", "S"):
                ref = diagonal_blocks(expected_factors[key], stats[key])
                factor_delta = max(factor_delta, ((stats[key] - ref).abs().max() / ref.abs().max()).item())
    return f"{loss_delta:.0e}, {grad_delta:.0e}" + (f", {factor_delta:.0e} ({len(factors)})" if case.loss else "")


def probe(name: str, optimizer: str, steps: int) -> str:
    """One table row: `optimizer` (OPTIMIZERS) for `steps` steps on one random batch of `name`."""
    kind, hparams = OPTIMIZERS[optimizer]
    case = MODELS[name]
    start, losses = time.time(), []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exact = exactness(name, {}) if optimizer == "kfac" else "–"
        torch.manual_seed(0)
        model = case.build().train()
        x, y = case.batch(torch.Generator().manual_seed(0), torch.float32)
        if kind == "adamw":
            c, step = model, torch.optim.AdamW(model.parameters(), **hparams)
        else:
            named = {"loss": case.loss} if case.loss else {}
            c = step = gnfx.compile(model, kind, **named, **hparams)
        for _ in range(steps):
            loss = case.criterion(c(x), y)
            loss.backward()
            step.step()
            step.zero_grad()
            losses.append(f"{loss.item():.4g}")
    if kind == "adamw":
        form = blocks = "–"
    else:
        covered, total = c.layers.coverage(dict(model.named_parameters()))
        form, blocks = c.layers.form, f"{100 * covered / total:.1f}%"
    said = sorted({str(w.message)[:120].replace("|", "/") + "..." for w in caught if str(w.message).startswith("gnfx")})
    return (f"| {name} | {optimizer} | {form} | {blocks} | {exact} | {', '.join(losses)} | "
            f"{'; '.join(said) or '–'} | {time.time() - start:.0f} |")


def main() -> None:
    probe_main(__doc__, "benchmarks.medseg_probe", probe, {"models": list(MODELS), "optimizers": list(OPTIMIZERS)},
               ["| model | optimizer | capture | in blocks | exact: loss, grad, A/S (blocks) | losses | gnfx's warnings | s |",
                "|---|---|---|---|---|---|---|---|"], steps=4, timeout=300)


if __name__ == "__main__":
    main()
