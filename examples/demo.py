"""The main job of `make demo`: gnfx at its defaults beside AdamW on a character-level GPT.

    python examples/demo.py [--optimizer kfac] [--steps 200] [--adamw-lr 3e-3] [--plot demo.png]

Trains two copies of the same model on the same batches: one compiled by gnfx with
`optimizer="kfac", loss="cross_entropy"` and no learning rate (the step size α, the momentum μ
and the damping λ come from the exact Gauss–Newton model of the loss, gnfx.quadratic_step), the
other with torch.optim.AdamW at a good learning rate (3e-3, the best of the benchmark's grid on
this task). The progress bars show the batch loss and gnfx's α, μ, λ and ρ; at the end a table
gives the steps and seconds each took to reach a validation target and the final validation
loss, and a plot of both validation curves is saved. The data is the text of the standard
library's `pydoc_data.topics` (no download); the model and data come from the benchmark task
`char_gpt` (benchmarks/tasks.py).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import gnfx  # noqa: E402
from benchmarks.tasks import char_gpt  # noqa: E402

TARGET = 2.3  # validation loss; AdamW at 3e-3 reaches it in ~200 steps


def train(name, module, step, zero_grad, batches, task, steps, eval_every, info=None):
    """Train on `batches`; returns [(step, training seconds, validation loss)]."""
    curve = [(0, 0.0, task.eval_loss(module))]
    seconds = 0.0
    bar = tqdm(batches, total=steps, desc=f"{name:<14}")
    for i, (x, y) in enumerate(bar, 1):
        began = time.perf_counter()
        loss = task.loss_fn(module(x), y)
        loss.backward()
        step()
        zero_grad()
        seconds += time.perf_counter() - began
        bar.set_postfix(loss=f"{loss.item():.3f}", **(info() if info else {}))
        if i % eval_every == 0 or i == steps:
            curve.append((i, seconds, task.eval_loss(module)))
    return curve


def gnfx_progress(compiled):
    """A function giving α, μ, λ of gnfx's last step and ρ of the last step that measured it (one in
    `damping_every`), for the progress bar."""
    shown = {}

    def info():
        last = compiled.optimizer.last_step
        if last:
            shown.update({"α": f"{last['alpha']:.2g}", "μ": f"{last['mu']:.2f}", "λ": f"{last['damping']:.1e}"})
            if last.get("adapted", True):
                shown["ρ"] = f"{last['rho']:.2f}"
        return shown

    return info


def reached(curve, target):
    """(steps, seconds) of the first evaluation at or below target, or (None, None)."""
    return next(((s, t) for s, t, v in curve if v <= target), (None, None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="kfac", choices=sorted(gnfx.REGISTRY))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--adamw-lr", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--plot", default="demo.png", help="where to save the plot of both curves")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    task = char_gpt()
    batches = list(itertools.islice(task.batches(seed=0), args.steps))  # the same batches for both
    model = task.make_model(seed=0)
    compiled = gnfx.compile(model, optimizer=args.optimizer, loss="cross_entropy", step="quadratic",
                            example_inputs=(batches[0][0],))
    print(compiled)  # the block table: blocks, kinds, factor shapes, preconditioner, state memory

    reference = task.make_model(seed=0)
    adamw = torch.optim.AdamW(reference.parameters(), lr=args.adamw_lr)
    eval_every = min(args.eval_every, args.steps)
    curves = {
        f"gnfx {args.optimizer}": train(f"gnfx {args.optimizer}", compiled, compiled.step, compiled.zero_grad,
                                        batches, task, args.steps, eval_every, gnfx_progress(compiled)),
        f"AdamW {args.adamw_lr:g}": train(f"AdamW {args.adamw_lr:g}", reference, adamw.step, adamw.zero_grad,
                                          batches, task, args.steps, eval_every),
    }

    print(f"\nvalidation target {TARGET} (cross-entropy per character), {args.steps} steps, same batches")
    print(f"{'':<16}{'lr':>8}{'steps to target':>17}{'s to target':>13}{'total s':>9}{'final val loss':>16}")
    for (name, curve), lr in zip(curves.items(), ("none", f"{args.adamw_lr:g}")):
        steps, seconds = reached(curve, TARGET)
        print(f"{name:<16}{lr:>8}{steps if steps else '-':>17}{f'{seconds:.1f}' if seconds else '-':>13}"
              f"{curve[-1][1]:>9.1f}{curve[-1][2]:>16.3f}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    for name, curve in curves.items():
        by_step.plot([s for s, _, _ in curve], [v for _, _, v in curve], label=name)
        by_time.plot([t for _, t, _ in curve], [v for _, _, v in curve], label=name)
    for ax, label in ((by_step, "step"), (by_time, "training seconds")):
        ax.axhline(TARGET, color="black", linestyle="--", linewidth=1, label="target")
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss")
        ax.grid(True, alpha=0.3)
    by_step.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=100)
    print(f"saved {args.plot}")


if __name__ == "__main__":
    main()
