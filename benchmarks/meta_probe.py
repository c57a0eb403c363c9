"""First contact with learn2learn, higher and avalanche, called as their users call them.

    PYTHONPATH=<learn2learn, higher, avalanche>:<their pure-python deps>:<a stub of wandb>:. OMP_NUM_THREADS=1 \
        python -m benchmarks.meta_probe [--patterns maml ewc] [--optimizers kfac adamw] [--steps 6] [--timeout 300] \
        [--out probe.md]

One problem for the meta-learners: 5-way few-shot classification of 8-dimensional points, each task drawing 5
random class centres (a fresh task per meta-batch entry, 4 tasks a meta-batch), 5 support and 5 query points
per class; the model an MLP 8-32-32-5 (Tanh). `--steps` meta-batches (one optimizer step each):

- `maml`, `fomaml`: learn2learn 0.2.0's `maml = l2l.algorithms.MAML(model, lr=0.5, first_order=...)`; per
  task `learner = maml.clone(); learner.adapt(support loss)` (one step), the query losses averaged and
  backpropagated, `opt.step()`; `metasgd`: `l2l.algorithms.MetaSGD(model, lr=0.5)`, whose per-parameter
  learning rates (its own parameters) keep an Adam of their own beside the compiled model's optimizer;
- `protonet`: prototypical networks with the MLP as the embedding (its last layer 5 wide), one forward of the
  support and query points, the query's log-softmax of minus the squared distances to the class means;
- `reptile`: a plain loop, learn2learn's example's: 4 inner steps of the optimizer on one task's 50 points,
  then θ ← θ₀ + 0.5 (θ - θ₀) in place (the losses: the inner ones);
- `higher`: higher 0.2.1's `with higher.innerloop_ctx(model, SGD(model.parameters(), lr=0.5)) as (fmodel,
  diffopt)`: `diffopt.step(support loss)`, the query loss backpropagated.

avalanche 0.6.0: a class-incremental stream of 2 experiences (4 classes of 16-dimensional Gaussian clusters
each, 64 points a class), the model an MLP 16-32-8; `Strategy(model, optimizer, CrossEntropyLoss(),
train_mb_size=32, train_epochs=1, ...)` with the optimizer handed over (`model.optimizer`, torch's AdamW for
"adamw"), `strategy.train(experience)` per experience, the loss of every iteration recorded by a plugin
(`--steps` is not used: 16 iterations): `naive`, `ewc` (ewc_lambda=100: a penalty λ Σ F (θ - θ*)² on the
parameters), `replay` (mem_size=64), `lwf` (alpha=1, temperature=2: distillation against a deep copy of the
model after the last experience), `si` (SynapticIntelligence, si_lambda=1: a penalty on the parameters).

Optimizers: "kfac" at its defaults (loss="cross_entropy", no lr: the quadratic-model step), "kfac_lr" (lr 1e-2),
"shampoo" (lr 1e-2), and torch.optim.AdamW at lr 1e-2 ("adamw"), the reference. Per run: how the model was
captured, the share of its parameters in curvature blocks, exactness (the kfac_lr runs: float64, the compiled
model beside a second build from the same seed over 3 steps of the user's loss, benchmarks.lockstep: the
largest |difference| of the loss and of any gradient; "–" where the loop is a library's own), the losses,
gnfx's warnings (once each), the error. None of these libraries is a dependency of gnfx. The results:
benchmarks/results/first_contact_13_meta.md.
"""
from __future__ import annotations

import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from benchmarks.child_rows import capture_cells, cell, gnfx_warnings, library, probe_main
from benchmarks.lockstep import float64_gaps

WAYS, SHOTS, DIM, TASKS, INNER_LR = 5, 5, 8, 4, 0.5
META = ("maml", "fomaml", "metasgd", "protonet", "reptile", "higher")
CONTINUAL = ("naive", "ewc", "replay", "lwf", "si")
OPTIMIZERS = {"kfac": ("kfac", {"loss": "cross_entropy"}), "kfac_lr": ("kfac", {"lr": 1e-2}),
              "shampoo": ("shampoo", {"lr": 1e-2}), "adamw": ("adamw", {"lr": 1e-2})}


def _import(name: str):
    return library("benchmarks.meta_probe", name)


def mlp(sizes) -> nn.Sequential:
    layers = []
    for d_in, d_out in zip(sizes, sizes[1:]):
        layers += [nn.Linear(d_in, d_out), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def tasks(step: int, count: int = TASKS, dtype=torch.float32) -> list[tuple]:
    """`count` tasks of meta-batch `step`: (support x, support y, query x, query y), 5 ways of 5 shots each."""
    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for _ in range(count):
        centres = 2 * torch.randn(WAYS, DIM, generator=g, dtype=dtype)
        y = torch.arange(WAYS).repeat_interleave(2 * SHOTS)
        x = centres[y] + torch.randn(len(y), DIM, generator=g, dtype=dtype)
        support = torch.arange(len(y)) % (2 * SHOTS) < SHOTS
        out.append((x[support], y[support], x[~support], y[~support]))
    return out


def meta_loss(pattern: str, learner_of, batch) -> torch.Tensor:
    """The meta-batch's mean query loss of `pattern` (maml, fomaml, metasgd, protonet); `learner_of` the
    learn2learn wrapper (MAML/MetaSGD of the model) or, for protonet, the model."""
    total = 0.0
    for xs, ys, xq, yq in batch:
        if pattern == "protonet":
            emb = learner_of(torch.cat([xs, xq]))
            prototypes = torch.stack([emb[:len(xs)][ys == k].mean(0) for k in range(WAYS)])
            total = total + F.cross_entropy(-torch.cdist(emb[len(xs):], prototypes) ** 2, yq)
            continue
        learner = learner_of.clone()
        learner.adapt(F.cross_entropy(learner(xs), ys))
        total = total + F.cross_entropy(learner(xq), yq)
    return total / len(batch)


def wrapper(pattern: str, model: nn.Module):
    l2l = _import("learn2learn")
    if pattern == "metasgd":
        return l2l.algorithms.MetaSGD(model, lr=INNER_LR)
    return l2l.algorithms.MAML(model, lr=INNER_LR, first_order=pattern == "fomaml")


def exactness(pattern: str, kind: str, hparams: dict) -> str:
    """'loss Δ, grad Δ' of the user's meta-loss, compiled beside plain (benchmarks.lockstep.float64_gaps)."""
    if pattern not in ("maml", "fomaml", "protonet"):
        return "–"
    batch = tasks(0, 2, torch.float64)

    def loss_for(model):
        return lambda m: meta_loss(pattern, m if pattern == "protonet" else wrapper(pattern, m), batch)
    return float64_gaps(lambda: mlp([DIM, 32, 32, WAYS]), loss_for, kind, hparams)


def meta_losses(pattern: str, c: nn.Module, model: nn.Module, step, steps: int) -> list[float]:
    """`steps` meta-batches of `pattern` on `c` (the compiled model or the module), `step()` the optimizer's."""
    losses = []
    if pattern == "reptile":
        for s in range(steps):
            xs, ys, xq, yq = tasks(s, 1)[0]
            x, y = torch.cat([xs, xq]), torch.cat([ys, yq])
            start = [p.detach().clone() for p in model.parameters()]
            for _ in range(4):
                loss = F.cross_entropy(c(x), y)
                loss.backward()
                step.step()
                step.zero_grad()
                losses.append(loss.item())
            with torch.no_grad():
                for p, p0 in zip(model.parameters(), start):
                    p.copy_(p0 + 0.5 * (p - p0))
        return losses
    if pattern == "higher":
        higher = _import("higher")
        inner = torch.optim.SGD(c.parameters(), lr=INNER_LR)
        for s in range(steps):
            total = 0.0
            for xs, ys, xq, yq in tasks(s):
                with higher.innerloop_ctx(c, inner, copy_initial_weights=False) as (fmodel, diffopt):
                    diffopt.step(F.cross_entropy(fmodel(xs), ys))
                    query = F.cross_entropy(fmodel(xq), yq) / TASKS
                    query.backward()
                    total += query.item()
            step.step()
            step.zero_grad()
            losses.append(total)
        return losses
    learner_of = c if pattern == "protonet" else wrapper(pattern, c)
    extra = torch.optim.Adam(learner_of.lrs.parameters(), lr=1e-3) if pattern == "metasgd" else None
    for s in range(steps):
        loss = meta_loss(pattern, learner_of, tasks(s))
        loss.backward()
        step.step()
        step.zero_grad()
        if extra is not None:  # MetaSGD's learning rates: an optimizer of their own
            extra.step()
            extra.zero_grad()
        losses.append(loss.item())
    return losses


def stream():
    """avalanche's class-incremental benchmark of 2 experiences over 8 Gaussian classes (module doc)."""
    generators = _import("avalanche.benchmarks.scenarios.deprecated.generators")
    g = torch.Generator().manual_seed(2)
    centres = 3 * torch.randn(8, 16, generator=g)

    def split(n):
        y = torch.arange(8).repeat_interleave(n)
        dataset = torch.utils.data.TensorDataset(centres[y] + torch.randn(len(y), 16, generator=g), y)
        dataset.targets = y.tolist()
        return dataset
    return generators.nc_benchmark(split(64), split(16), n_experiences=2, task_labels=False, seed=0,
                                   fixed_class_order=list(range(8)))


def continual_losses(pattern: str, c: nn.Module, optimizer) -> list[float]:
    """avalanche's strategy `pattern` training `c` with `optimizer` over the stream (module doc)."""
    training = _import("avalanche.training")
    plugins = _import("avalanche.training.plugins")
    losses = []

    class Record(plugins.SupervisedPlugin):
        def after_training_iteration(self, strategy, **kwargs):
            losses.append(strategy.loss.item())
    kwargs = dict(train_mb_size=32, train_epochs=1, eval_mb_size=64, device="cpu", plugins=[Record()])
    strategy = {"naive": lambda: training.Naive(c, optimizer, nn.CrossEntropyLoss(), **kwargs),
                "ewc": lambda: training.EWC(c, optimizer, nn.CrossEntropyLoss(), ewc_lambda=100.0, **kwargs),
                "replay": lambda: training.Replay(c, optimizer, nn.CrossEntropyLoss(), mem_size=64, **kwargs),
                "lwf": lambda: training.LwF(c, optimizer, nn.CrossEntropyLoss(), alpha=1.0, temperature=2.0,
                                            **kwargs),
                "si": lambda: training.SynapticIntelligence(c, optimizer, nn.CrossEntropyLoss(), si_lambda=1.0,
                                                            **kwargs)}[pattern]()
    for experience in stream().train_stream:
        strategy.train(experience)
    return losses


def probe(pattern: str, optimizer: str, steps: int) -> str:
    """One table row: `optimizer` for `pattern` (module doc)."""
    torch.set_num_threads(1)
    kind, hparams = OPTIMIZERS[optimizer]
    start, losses, error, exact = time.time(), [], "", "–"
    c = model = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if optimizer == "kfac_lr":
                exact = exactness(pattern, kind, hparams)
        except Exception as exc:  # noqa: BLE001 -- what a user would see is the result
            exact, error = "error", f"exactness: {type(exc).__name__}: {exc}"
        try:
            torch.manual_seed(0)
            model = mlp([16, 32, 8] if pattern in CONTINUAL else [DIM, 32, 32, WAYS])
            if kind == "adamw":
                c, step = model, torch.optim.AdamW(model.parameters(), **hparams)
            else:
                c = gnfx.compile(model, kind, **hparams)
                step = c.optimizer
            if pattern in CONTINUAL:
                losses = continual_losses(pattern, c, step)
            else:
                losses = meta_losses(pattern, c, model, step, steps)
        except Exception as exc:  # noqa: BLE001
            error = (error + "; " if error else "") + f"{type(exc).__name__}: {exc}"
    form, blocks, _ = capture_cells(c, model)
    said = gnfx_warnings(caught, 200)
    shown = ", ".join(f"{v:.3g}" for v in losses)
    return (f"| {pattern} | {optimizer} | {form} | {blocks} | {exact} | {shown or '–'} | {'; '.join(said) or '–'} | "
            f"{cell(error, 400) or '–'} | {time.time() - start:.0f} |")


def main() -> None:
    probe_main(__doc__, "benchmarks.meta_probe", probe, {"patterns": [*META, *CONTINUAL],
                                                         "optimizers": list(OPTIMIZERS)},
               ["| pattern | optimizer | capture | in blocks | exact: loss, grad (float64) | losses | gnfx's warnings "
                "| error | s |", "|---|---|---|---|---|---|---|---|---|"], steps=6, timeout=300)


if __name__ == "__main__":
    main()
