"""First contact with lightly and pytorch-metric-learning, called as their users call them.

    PYTHONPATH=<lightly, pytorch_metric_learning>:. OMP_NUM_THREADS=1 python -m benchmarks.ssl_probe \
        [--models simclr byol] [--optimizers kfac adamw] [--steps 4] [--timeout 300] [--out probe.md]

benchmarks.clip_probe's first contact (one model and optimizer per process, random weights, train mode,
`--steps` steps on one batch of 16 random 3x16x16 images, fresh augmentations each step: random flips and
Gaussian noise from the global random state) for:

- lightly, as its examples write it: a small CNN backbone (conv-BN-ReLU twice, average pool, 16 features);
  `simclr` (SimCLRProjectionHead, NTXentLoss over the two views' projections: two forwards, one backward),
  `byol` (BYOLProjectionHead and BYOLPredictionHead; the momentum backbone and projection head are deep
  copies inside the same module, deactivate_requires_grad, called by `forward_momentum` on the module the
  user compiled from, their output detached; `update_momentum(student, teacher, m=0.99)` before each forward;
  loss ½(NegativeCosineSimilarity(p0, z1) + NegativeCosineSimilarity(p1, z0))), `dino` (DINOProjectionHead
  with its weight-normed last layer frozen for the first epoch by `cancel_last_layer_gradients` between the
  backward and the step; the teacher a deep copy of the backbone and its own DINOProjectionHead; two global
  16x16 views for the teacher, those and two local 8x8 crops for the student; DINOLoss(epoch=0), whose
  center is a buffer of the loss).
- pytorch-metric-learning: an embedding MLP (32 → 64 → 16) of 32 examples of 4 classes; `arcface`,
  `cosface`, `proxyanchor` (ArcFaceLoss, CosFaceLoss, ProxyAnchorLoss: the loss holds its own class weights,
  which the library's docs step with a second optimizer, `loss_optimizer = torch.optim.SGD(
  loss_func.parameters(), lr=0.01)`, stepped after the backward), `triplet` (TripletMarginMiner's semihard
  triplets, TripletMarginLoss on them), `arcface_joint` (one module holding the MLP and the ArcFaceLoss,
  forward(x, y) = the loss, compiled whole: its class weights are then the compiled model's).

Optimizers: "kfac" at its defaults (no loss=: none of these losses is one gnfx models), "kfac_lr" (lr 1e-3),
"shampoo", "diag" and "auto" at lr 1e-3, and for reference torch.optim.AdamW at lr 1e-3 ("adamw"; the
second optimizer of the losses' weights is the same SGD in every row). Per run: the capture's form, the share of
the trainable parameters in curvature blocks, exactness (the kfac_lr runs, float64: the compiled model beside
a second build from the same seed over 3 steps, the random state reseeded alike before each forward, the
largest |difference| of the loss and of any gradient; then the first statistic step's A and S of every
linear block against plain hooks on every call, benchmarks.hooked_calls: A = mean over the calls' rows of
ā āᵀ, S = M Σ g gᵀ with M the rows of all the student's forwards (2N, 4N for DINO's views: each view's
rows are terms of the loss's mean), largest gap relative to the largest entry), the losses,
gnfx's warnings (once each) and the parameters outside the blocks, the seconds; or the error. None of these
libraries is a dependency of gnfx. The results: benchmarks/results/first_contact_11_ssl.md.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

import gnfx
from benchmarks.child_rows import library, one_batch_row, probe_main
from benchmarks.hooked_calls import hooked_calls, linear_factor_gap
from benchmarks.lockstep import lockstep_gaps

BATCH, SIZE, FEATURES = 16, 16, 16  # images of a batch, their side, the backbone's features
EXAMPLES, CLASSES, EMBED = 32, 4, 16  # the metric-learning batch
LIGHTLY = ("simclr", "byol", "dino")
METRIC = ("arcface", "cosface", "proxyanchor", "triplet", "arcface_joint")
MODELS = (*LIGHTLY, *METRIC)
MOMENTUM = 0.99
STUDENT_VIEWS = {"simclr": 2, "byol": 2, "dino": 4}  # training forwards of the compiled model per loss
OPTIMIZERS = {"kfac": ("kfac", {}), "kfac_lr": ("kfac", {"lr": 1e-3}), "shampoo": ("shampoo", {"lr": 1e-3}),
              "diag": ("diag", {"lr": 1e-3}), "auto": ("auto", {"lr": 1e-3}),
              "adamw": ("adamw", {"lr": 1e-3})}  # adamw: torch.optim's, the reference


def _import(name: str):
    return library("benchmarks.ssl_probe", name)


def backbone() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, FEATURES, 3, stride=2, padding=1), nn.BatchNorm2d(FEATURES), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


class SimCLR(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = backbone()
        self.projection_head = _import("lightly.models.modules").SimCLRProjectionHead(FEATURES, 32, 16)

    def forward(self, x):
        return self.projection_head(self.backbone(x).flatten(start_dim=1))


class BYOL(nn.Module):
    def __init__(self):
        super().__init__()
        modules, utils = _import("lightly.models.modules"), _import("lightly.models.utils")
        self.backbone = backbone()
        self.projection_head = modules.BYOLProjectionHead(FEATURES, 32, 16)
        self.prediction_head = modules.BYOLPredictionHead(16, 32, 16)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        utils.deactivate_requires_grad(self.backbone_momentum)
        utils.deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, x):
        return self.prediction_head(self.projection_head(self.backbone(x).flatten(start_dim=1)))

    def forward_momentum(self, x):
        return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()

    def pairs(self):
        return [(self.backbone, self.backbone_momentum), (self.projection_head, self.projection_head_momentum)]


class DINO(nn.Module):
    def __init__(self):
        super().__init__()
        modules, utils = _import("lightly.models.modules"), _import("lightly.models.utils")
        self.student_backbone = backbone()
        self.student_head = modules.DINOProjectionHead(FEATURES, 32, 8, 64, freeze_last_layer=1)
        self.teacher_backbone = copy.deepcopy(self.student_backbone)
        self.teacher_head = modules.DINOProjectionHead(FEATURES, 32, 8, 64)
        utils.deactivate_requires_grad(self.teacher_backbone)
        utils.deactivate_requires_grad(self.teacher_head)

    def forward(self, x):
        return self.student_head(self.student_backbone(x).flatten(start_dim=1))

    def forward_teacher(self, x):
        return self.teacher_head(self.teacher_backbone(x).flatten(start_dim=1))

    def pairs(self):
        return [(self.student_backbone, self.teacher_backbone), (self.student_head, self.teacher_head)]


def _metric_loss(name: str) -> nn.Module:
    losses = _import("pytorch_metric_learning.losses")
    if name == "triplet":
        return losses.TripletMarginLoss(margin=0.2)
    kind = {"arcface": "ArcFaceLoss", "arcface_joint": "ArcFaceLoss", "cosface": "CosFaceLoss",
            "proxyanchor": "ProxyAnchorLoss"}[name]
    return getattr(losses, kind)(num_classes=CLASSES, embedding_size=EMBED)


class EmbedderWithLoss(nn.Module):
    """The embedding MLP and a metric loss with class weights in one module: forward(x, y) is the loss."""

    def __init__(self, name: str):
        super().__init__()
        self.embedder = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, EMBED))
        self.loss_func = _metric_loss(name)

    def forward(self, x, y):
        return self.loss_func(self.embedder(x), y)


def build(name: str) -> nn.Module:
    """The model `name` (module doc), with random weights from the current seed."""
    if name == "arcface_joint":
        return EmbedderWithLoss(name)
    if name in METRIC:
        return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, EMBED))
    return {"simclr": SimCLR, "byol": BYOL, "dino": DINO}[name]()


def _view(x: torch.Tensor, side: int) -> torch.Tensor:
    """A random view of `x` (global random state): a horizontal flip of each image with probability ½, a crop
    of `side`, Gaussian noise of 0.1."""
    flip = torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype) < 0.5
    x = torch.where(flip, x.flip(-1), x)
    top, left = (int(i) for i in torch.randint(0, x.shape[-1] - side + 1, (2,)))
    x = x[..., top:top + side, left:left + side]
    return x + 0.1 * torch.randn_like(x)


def problem(name: str, dtype=torch.float32):
    """(batch, loss(compiled or plain model, the module whose parameters it uses, batch), after_backward(plain)
    or None) of `name` as its users train it (module doc); the loss's own module, if any, built here from
    the current seed, after the model."""
    g = torch.Generator().manual_seed(1)
    if name in METRIC:
        labels = torch.arange(EXAMPLES) % CLASSES
        centers = torch.randn(CLASSES, 32, generator=g, dtype=dtype)
        batch = (centers[labels] + torch.randn(EXAMPLES, 32, generator=g, dtype=dtype), labels)
        if name == "arcface_joint":
            return batch, lambda m, plain, b: m(*b), None
        loss_func = _metric_loss(name).to(dtype)
        if name == "triplet":
            miners = _import("pytorch_metric_learning.miners")
            miner = miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")

            def mined(m, plain, b):
                embeddings = m(b[0])
                return loss_func(embeddings, b[1], miner(embeddings, b[1]))
            return batch, mined, None
        loss_optimizer = torch.optim.SGD(loss_func.parameters(), lr=0.01)

        def loss_step(plain):
            loss_optimizer.step()
            loss_optimizer.zero_grad()
        return batch, lambda m, plain, b: loss_func(m(b[0]), b[1]), loss_step
    images = torch.rand(BATCH, 3, SIZE, SIZE, generator=g, dtype=dtype)
    losses = _import("lightly.loss")
    if name == "simclr":
        criterion = losses.NTXentLoss()
        return images, lambda m, plain, b: criterion(m(_view(b, SIZE)), m(_view(b, SIZE))), None
    update_momentum = _import("lightly.models.utils").update_momentum
    if name == "byol":
        criterion = losses.NegativeCosineSimilarity()

        def byol(m, plain, b):
            for student, teacher in plain.pairs():
                update_momentum(student, teacher, m=MOMENTUM)
            x0, x1 = _view(b, SIZE), _view(b, SIZE)
            p0, z0, p1, z1 = m(x0), plain.forward_momentum(x0), m(x1), plain.forward_momentum(x1)
            return 0.5 * (criterion(p0, z1) + criterion(p1, z0))
        return images, byol, None
    criterion = losses.DINOLoss(output_dim=64, warmup_teacher_temp_epochs=5).to(dtype)

    def dino(m, plain, b):
        for student, teacher in plain.pairs():
            update_momentum(student, teacher, m=MOMENTUM)
        views = [_view(b, SIZE), _view(b, SIZE), _view(b, SIZE // 2), _view(b, SIZE // 2)]
        teacher_out = [plain.forward_teacher(v) for v in views[:2]]
        return criterion(teacher_out, [m(v) for v in views], epoch=0)
    return images, dino, lambda plain: plain.student_head.cancel_last_layer_gradients(current_epoch=0)


def factor_gaps(name: str, hparams: dict, dtype: torch.dtype) -> str:
    """The largest gap of the first step's A and S of the linear blocks against hooks, relative to the largest
    entry (module doc), in `dtype`."""
    torch.manual_seed(0)
    model = build(name).to(dtype)
    torch.manual_seed(0)
    reference = build(name).to(dtype)  # not a deepcopy: the old weight norm's W is no leaf (DINO's head)
    torch.manual_seed(0)
    batch, loss_of, _ = problem(name, dtype)
    torch.manual_seed(0)
    _, reference_loss_of, _ = problem(name, dtype)
    c = gnfx.compile(model, "kfac", stat_decay=0.0, stat_every=1, **hparams)
    # the student's linears (a frozen weight norm's `weight` is no parameter: its module's parameters tell)
    linears = [n for n, mod in reference.named_modules()
               if isinstance(mod, nn.Linear) and any(p.requires_grad for p in mod.parameters())]
    torch.manual_seed(7)
    with hooked_calls(reference, linears) as calls:
        reference_loss_of(reference, reference, batch).backward()
    torch.manual_seed(7)
    loss_of(c, model, batch).backward()
    c.step()
    n = EXAMPLES if name in METRIC else BATCH * STUDENT_VIEWS.get(name, 1)
    return linear_factor_gap(c, calls, n)


def exactness(name: str, kind: str, hparams: dict) -> str:
    """'loss Δ, grad Δ; A, S Δ': the compiled float64 model beside a second build from the same seed, over 3
    steps (each with its own loss module from the same seed); the first step's factors against hooks."""
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model = build(name).double()
        torch.manual_seed(0)
        reference = build(name).double()
        torch.manual_seed(0)
        batch, loss_of, _ = problem(name, torch.float64)
        torch.manual_seed(0)
        _, reference_loss_of, _ = problem(name, torch.float64)
        c = gnfx.compile(model, kind, **hparams)

        def either(m, plain):
            return (loss_of if m is c else reference_loss_of)(m, plain, batch)
        loss_gap, grad_gap = lockstep_gaps(c, model, reference, either, 3, seed=100)
        return f"{loss_gap:.0e}, {grad_gap:.0e}; {factor_gaps(name, hparams, torch.float64)}"
    finally:
        torch.set_default_dtype(torch.float32)


def probe(name: str, optimizer: str, steps: int) -> str:
    """One table row: `optimizer` (OPTIMIZERS) for `steps` steps of `name` on one batch."""
    kind, hparams = OPTIMIZERS[optimizer]

    def made():
        model = build(name).train()
        batch, loss_of, after_backward = problem(name)
        return (model, lambda c: loss_of(c, model, batch),
                *([lambda: after_backward(model)] if after_backward else []))

    return one_batch_row(name, optimizer, kind, hparams, steps, lambda: exactness(name, kind, hparams), made,
                         widths=(160, 300, 500), digits=4)


def main() -> None:
    probe_main(__doc__, "benchmarks.ssl_probe", probe, {"models": list(MODELS), "optimizers": list(OPTIMIZERS)},
               ["| model | optimizer | capture | in blocks | exact: loss, grad; A, S (float64) | losses | "
                "outside the blocks | gnfx's warnings | error | s |", "|---|---|---|---|---|---|---|---|---|---|"],
               steps=4, timeout=300)


if __name__ == "__main__":
    main()
