"""First contact with training frameworks no round had tried, each driving the compiled model's optimizer itself.

    PYTHONPATH=<torchvision shim>:<torchvision>:<ignite, composer, poutyne, pytorch_accelerated, keras>:<their
        pure-python deps>:<a stub of mosaicml-cli>:. OMP_NUM_THREADS=1 python -m benchmarks.loops_probe \
        [--frameworks ignite composer] [--optimizers kfac adamw] [--steps 8] [--timeout 300] [--out probe.md]

One model for every framework: a small CNN (two 3x3 convolutions, the second strided, global average pooling,
two Linear layers) classifying 3x8x8 random images into the 4 classes a fixed random teacher gives their
channels' means, batches
of 16, cross-entropy; `--steps` batches. Each framework as its docs show it, with the settings a user hands it:

- `ignite`: pytorch-ignite 0.5.5, `create_supervised_trainer(model, model.optimizer, nn.CrossEntropyLoss(),
  gradient_accumulation_steps=2)` (it divides each micro-batch's loss by 2 and steps every second iteration),
  with `LinearCyclicalScheduler(optimizer, "lr", ...)` on ITERATION_STARTED; `ignite_momentum` adds a
  `LinearCyclicalScheduler(optimizer, "momentum", 0.8, 0.9, ...)`, a schedule of a gnfx.compile setting;
- `poutyne`: poutyne 1.19, `Model(model, model.optimizer, "cross_entropy").fit(...)` with its `ClipNorm` and
  `ExponentialLR` callbacks; `poutyne_accum` with `batches_per_step=2` (its accumulation backpropagates each
  micro-batch's mean loss times its batch size and divides the gradients by the examples at the step);
- `accelerated`: pytorch-accelerated 0.1.61, `Trainer(model, loss_func, model.optimizer).train(...,
  gradient_accumulation_steps=2, gradient_clip_value=1.0, create_scheduler_fn=partial(StepLR, ...))` (accelerate
  wraps the optimizer);
- `composer`: mosaicml composer 0.32.1, `Trainer(model=ComposerClassifier(model, num_classes=4),
  optimizers=model.optimizer, algorithms=[LabelSmoothing(0.1), ChannelsLast(), GradientClipping("norm", 1.0),
  EMA()], device_train_microbatch_size=8)` (its micro-batches: loss times 8/16); `composer_blurpool` with
  `BlurPool` among the algorithms (module surgery after gnfx.compile); `composer_blurpool_first` with
  `composer.functional.apply_blurpool(net)` before gnfx.compile instead; `composer_sam` with `SAM()` (which wraps
  the optimizer and perturbs the parameters between its closure's two forwards);
- `keras`: keras 3.15 with KERAS_BACKEND=torch, a Sequential of the same layers (a keras Model is a torch
  nn.Module): `gnfx.compile(keras_model, ...)`, the hand-off `keras_model.compile(optimizer=...)` being
  impossible (keras takes its own optimizers only); the "adamw" row is keras's own `fit` with
  keras.optimizers.AdamW.

Optimizers: "kfac", "shampoo" and "diag" at lr 3e-3 and torch.optim.AdamW at lr 1e-2 ("adamw", handed to the
framework the same way; in a plain loop over these batches kfac diverged at lr 1e-2 and AdamW was slowest at 3e-3). Per run: the share of the trainable parameters in curvature blocks, the losses the
framework reports (one per batch), gnfx's warnings (once each), the error, the seconds; for kfac, exactness: the
framework's first optimizer step (two micro-batches where it accumulates, one batch of 16 where it does not)
under kfac at stat_every=1, stat_decay=0, fisher="empirical", and K-FAC's A and S of the two Linear blocks against
plain hooks on a copy of the model over the same rows, the loss the mean over all of them (relative max gaps;
S = M Σ g gᵀ, M the rows of the window). None of these libraries is a dependency of gnfx. The results:
benchmarks/results/first_contact_12_loops.md.
"""
from __future__ import annotations

import copy
import functools
import os
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from benchmarks.child_rows import capture_cells, cell, gnfx_warnings, library, probe_main
from benchmarks.hooked_calls import hooked_calls, linear_factors

BATCH, CLASSES, LR, ADAMW_LR = 16, 4, 3e-3, 1e-2
FRAMEWORKS = ("ignite", "ignite_momentum", "poutyne", "poutyne_accum", "accelerated", "composer",
              "composer_blurpool", "composer_blurpool_first", "composer_sam", "keras")
ACCUMULATES = {"ignite": 2, "ignite_momentum": 2, "poutyne_accum": 2, "accelerated": 2, "composer": 2}
OPTIMIZERS = ("kfac", "shampoo", "diag", "adamw")
LINEAR = ("6", "8")  # the CNN's Linear layers


def _import(name: str):
    return library("benchmarks.loops_probe", name)


def data(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`steps` batches of images (N, 3, 8, 8) and the classes a fixed random teacher gives them from their
    channels' means (what the CNN's pooling keeps, so that a few steps can learn it)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(steps * BATCH, 3, 8, 8, generator=g) + torch.randn(steps * BATCH, 3, 1, 1, generator=g)
    teacher = torch.randn(3, CLASSES, generator=g)
    return x, (x.mean((2, 3)) @ teacher).argmax(1)


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, CLASSES))


def fit(framework: str, c: nn.Module, optimizer, x, y, losses: list) -> None:
    """`framework`'s training of `c` (the compiled model or the module) by `optimizer` over (x, y) in batches of
    BATCH, as the module doc describes it; the loss of each batch appended to `losses`."""
    dataset = torch.utils.data.TensorDataset(x, y)
    if framework.startswith("ignite"):
        engine, handlers = _import("ignite.engine"), _import("ignite.handlers")
        trainer = engine.create_supervised_trainer(c, optimizer, nn.CrossEntropyLoss(),
                                                   gradient_accumulation_steps=ACCUMULATES[framework])
        top = optimizer.param_groups[0]["lr"]
        trainer.add_event_handler(engine.Events.ITERATION_STARTED,
                                  handlers.LinearCyclicalScheduler(optimizer, "lr", top / 10, top, 4))
        if framework == "ignite_momentum":
            trainer.add_event_handler(engine.Events.ITERATION_STARTED,
                                      handlers.LinearCyclicalScheduler(optimizer, "momentum", 0.8, 0.9, 4))
        trainer.add_event_handler(engine.Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output))
        trainer.run(torch.utils.data.DataLoader(dataset, batch_size=BATCH), max_epochs=1)
    elif framework.startswith("poutyne"):
        poutyne = _import("poutyne")

        class Record(poutyne.Callback):
            def on_train_batch_end(self, batch_number, logs):
                losses.append(logs["loss"])
        model = poutyne.Model(c, optimizer, "cross_entropy")
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=False, batches_per_step=ACCUMULATES.get(framework, 1),
                  callbacks=[poutyne.ClipNorm(c.parameters(), 1.0), poutyne.ExponentialLR(gamma=0.9), Record()])
    elif framework == "accelerated":
        accelerated = _import("pytorch_accelerated")

        class Record(_import("pytorch_accelerated.callbacks").TrainerCallback):
            def on_train_step_end(self, trainer, batch_output, **kwargs):  # the loss it divided by the accumulation
                losses.append(batch_output["loss"].item() * ACCUMULATES[framework])
        trainer = accelerated.Trainer(model=c, loss_func=nn.CrossEntropyLoss(), optimizer=optimizer, callbacks=[Record()])
        trainer.train(train_dataset=dataset, num_epochs=1, per_device_batch_size=BATCH,
                      gradient_accumulation_steps=ACCUMULATES[framework], gradient_clip_value=1.0,
                      create_scheduler_fn=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.5))
    else:
        _fit_composer(framework, c, optimizer, dataset, losses)


def _fit_composer(framework: str, c: nn.Module, optimizer, dataset, losses: list) -> None:
    composer, algorithms = _import("composer"), _import("composer.algorithms")

    class Record(composer.Callback):
        def after_train_batch(self, state, logger):
            losses.append(state.loss.item() if isinstance(state.loss, torch.Tensor) else float("nan"))
    chosen = {"composer": [algorithms.LabelSmoothing(0.1), algorithms.ChannelsLast(),
                           algorithms.GradientClipping("norm", 1.0), algorithms.EMA(half_life="2ba")],
              "composer_blurpool": [algorithms.BlurPool(min_channels=1)],
              "composer_blurpool_first": [], "composer_sam": [algorithms.SAM()]}[framework]
    trainer = composer.Trainer(model=_import("composer.models").ComposerClassifier(c, num_classes=CLASSES),
                               train_dataloader=torch.utils.data.DataLoader(dataset, batch_size=BATCH),
                               optimizers=optimizer, max_duration="1ep", algorithms=chosen, device="cpu",
                               progress_bar=False, log_to_console=False, callbacks=[Record()], save_folder=None,
                               device_train_microbatch_size=BATCH // ACCUMULATES.get(framework, 1))
    trainer.fit()


def keras_cnn():
    """The CNN in keras 3 (KERAS_BACKEND=torch), channels first as the torch one."""
    os.environ["KERAS_BACKEND"] = "torch"
    keras = _import("keras")
    keras.utils.set_random_seed(0)
    layers = keras.layers
    return keras, keras.Sequential([
        keras.Input((3, 8, 8)), layers.Conv2D(8, 3, padding="same", activation="relu", data_format="channels_first"),
        layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", data_format="channels_first"),
        layers.GlobalAveragePooling2D(data_format="channels_first"), layers.Dense(16, activation="relu"),
        layers.Dense(CLASSES)])


def build(framework: str) -> nn.Module:
    net = cnn()
    if framework == "composer_blurpool_first":  # the surgery composer's BlurPool does, before gnfx.compile
        _import("composer.functional").apply_blurpool(net, min_channels=1)
    return net


def exactness(framework: str) -> str:
    """K-FAC's A and S of the Linear blocks after the framework's first optimizer step against plain hooks
    over the same rows (module doc), 'A Δ, S Δ (M)': the framework gets the rows of exactly one step."""
    rows = BATCH * ACCUMULATES.get(framework, 1) if not framework.startswith("composer") else BATCH
    net = build(framework)
    reference = copy.deepcopy(net)
    c = gnfx.compile(net, "kfac", lr=LR, stat_every=1, stat_decay=0.0, fisher="empirical")
    x, y = data(2)
    fit(framework, c, c.optimizer, x[:rows], y[:rows], [])
    smoothing = 0.1 if framework == "composer" else 0.0  # its LabelSmoothing(0.1)
    with hooked_calls(reference, list(LINEAR)) as records:
        F.cross_entropy(reference(x[:rows]), y[:rows], label_smoothing=smoothing).backward()
    a_gap = s_gap = 0.0
    for name in LINEAR:
        A, gg = linear_factors(records[name], True)
        stats = c.statistics(name)
        a_gap = max(a_gap, ((stats["A"] - A).abs().max() / A.abs().max()).item())
        s_gap = max(s_gap, ((stats["S"] - rows * gg).abs().max() / (rows * gg).abs().max()).item())
    return f"A {a_gap:.0e}, S {s_gap:.0e} (M {rows}, {c.optimizer.steps} step)"


def probe(framework: str, optimizer: str, steps: int) -> str:
    """One table row: `optimizer` driven by `framework` for `steps` batches."""
    torch.set_num_threads(1)
    start, losses, error, exact = time.time(), [], "", "–"
    c = net = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if optimizer == "kfac" and framework not in ("keras", "composer_blurpool", "composer_sam"):
                exact = exactness(framework)
        except Exception as exc:  # noqa: BLE001 -- what a user would see is the result
            exact, error = "error", f"exactness: {type(exc).__name__}: {exc}"
        try:
            x, y = data(steps)
            if framework == "keras":
                keras, net = keras_cnn()
                if optimizer == "adamw":  # keras's own loop and optimizer, the reference
                    class Record(keras.callbacks.Callback):
                        def on_train_batch_end(self, batch, logs=None):  # keras's running mean over the epoch
                            losses.append(logs["loss"])
                    net.compile(optimizer=keras.optimizers.AdamW(ADAMW_LR),
                                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
                    net.fit(x.numpy(), y.numpy(), batch_size=BATCH, epochs=1, verbose=0, callbacks=[Record()],
                            shuffle=False)
                else:
                    c = gnfx.compile(net, optimizer, lr=LR, example_inputs=(x[:BATCH],))
            else:
                net = build(framework)
                c = net if optimizer == "adamw" else gnfx.compile(net, optimizer, lr=LR)
                handed = torch.optim.AdamW(net.parameters(), lr=ADAMW_LR) if optimizer == "adamw" else c.optimizer
                fit(framework, c, handed, x, y, losses)
        except Exception as exc:  # noqa: BLE001
            error = (error + "; " if error else "") + f"{type(exc).__name__}: {exc}"
    _, blocks, _ = capture_cells(c, net) if isinstance(net, nn.Module) else ("–", "–", "–")
    said = gnfx_warnings(caught, 240)
    shown = ", ".join(f"{v:.3g}" for v in losses)
    return (f"| {framework} | {optimizer} | {blocks} | {exact} | {shown or '–'} | {'; '.join(said) or '–'} | "
            f"{cell(error, 500) or '–'} | {time.time() - start:.0f} |")


def main() -> None:
    probe_main(__doc__, "benchmarks.loops_probe", probe, {"frameworks": list(FRAMEWORKS),
                                                          "optimizers": list(OPTIMIZERS)},
               ["| framework | optimizer | in blocks | exact: A, S of the Linear blocks (kfac) | losses | "
                "gnfx's warnings | error | s |", "|---|---|---|---|---|---|---|---|"], steps=8, timeout=300)


if __name__ == "__main__":
    main()
