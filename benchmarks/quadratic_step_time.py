"""What the quadratic-model step costs, in CPU time: `python -m benchmarks.quadratic_step_time [--to-target]`.

CPU time (time.process_time, one intra-op thread) instead of wall time, so that other processes
on a shared machine do not count. Two tables, printed as markdown:

1. Per task (digits MLP, deep autoencoder, character GPT), the medians of the forward+backward
   and of `model.step()` for kfac at its defaults (the quadratic step, no lr), the same with
   damping_every=1 (ρ on every step) and with `quadratic_rows` a quarter of the batch, kfac at a fixed lr (the plain K-FAC step) and AdamW,
   their steps interleaved in one process, and the ratio of each whole step to AdamW's.
2. With `--to-target`: examples/demo.py's comparison (char GPT, the same batches, validation loss
   2.3 evaluated every 25 steps): steps and CPU seconds to the target for AdamW at 3e-3 and for
   kfac at defaults with `quadratic_rows` None and 4 (of 32), each with `damping_every` 1 and 5.
   Each run stops at the target.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

import gnfx
from benchmarks.tasks import TASKS, char_gpt

TASK_STEPS = {"digits_mlp": 60, "digits_autoencoder": 60, "char_gpt": 20}
WARM = 5  # untimed first steps (capture, first refresh)
TARGET, EVERY = 2.3, 25  # examples/demo.py's


def step_table(name: str, steps: int) -> str:
    task = TASKS[name]()
    batches = list(itertools.islice(task.batches(seed=0), steps))
    rows = len(batches[0][0]) // 4
    runs = {"kfac defaults": {"loss": task.loss_name},
            "kfac defaults, damping_every=1": {"loss": task.loss_name, "damping_every": 1},
            f"kfac defaults, quadratic_rows={rows}": {"loss": task.loss_name, "quadratic_rows": rows},
            "kfac lr=1e-3": {"lr": 1e-3}}
    trainers = {label: gnfx.compile(task.make_model(seed=0), optimizer="kfac", **hp) for label, hp in runs.items()}
    reference = task.make_model(seed=0)
    adamw = torch.optim.AdamW(reference.parameters(), lr=3e-3)
    steppers = {label: (c, c.step, c.zero_grad) for label, c in trainers.items()}
    steppers["AdamW"] = (reference, adamw.step, adamw.zero_grad)
    times = {label: ([], []) for label in steppers}
    for i, (x, y) in enumerate(batches):
        for label, (module, step, zero_grad) in steppers.items():
            began = time.process_time()
            task.loss_fn(module(x), y).backward()
            middle = time.process_time()
            step()
            ended = time.process_time()
            zero_grad()
            if i >= WARM:
                times[label][0].append(middle - began)
                times[label][1].append(ended - middle)
    med = {label: (1e3 * statistics.median(f), 1e3 * statistics.median(s)) for label, (f, s) in times.items()}
    base = sum(med["AdamW"])
    lines = [f"{name}, {steps - WARM} steps after {WARM} (CPU ms, medians)", "",
             "| run | fwd+bwd | step | whole step | ×AdamW |", "|---|---|---|---|---|"]
    lines += [f"| {label} | {f:.1f} | {s:.1f} | {f + s:.1f} | {(f + s) / base:.2f} |" for label, (f, s) in med.items()]
    return "\n".join(lines)


def to_target(label: str, module, step, zero_grad, task, batches) -> str:
    cpu, loss = 0.0, float("inf")
    for i, (x, y) in enumerate(batches, 1):
        began = time.process_time()
        task.loss_fn(module(x), y).backward()
        step()
        zero_grad()
        cpu += time.process_time() - began
        if i % EVERY == 0:
            loss = task.eval_loss(module)
            if loss <= TARGET:
                break
    return f"| {label} | {i if loss <= TARGET else '-'} | {cpu:.1f} | {loss:.3f} |"


def target_table(steps: int = 200) -> str:
    task = char_gpt()
    batches = list(itertools.islice(task.batches(seed=0), steps))
    reference = task.make_model(seed=0)
    adamw = torch.optim.AdamW(reference.parameters(), lr=3e-3)
    lines = [f"char GPT, validation loss {TARGET} (evaluated every {EVERY} steps, at most {steps})", "",
             "| run | steps to target | CPU s to target | val loss at stop |", "|---|---|---|---|",
             to_target("AdamW 3e-3", reference, adamw.step, adamw.zero_grad, task, batches)]
    for rows, every in itertools.product((None, 4), (1, 5)):
        c = gnfx.compile(task.make_model(seed=0), optimizer="kfac", loss="cross_entropy", quadratic_rows=rows,
                         damping_every=every, example_inputs=(batches[0][0],))
        lines.append(to_target(f"kfac defaults, quadratic_rows={rows}, damping_every={every}", c, c.step,
                               c.zero_grad, task, batches))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=list(TASK_STEPS), default=list(TASK_STEPS))
    parser.add_argument("--to-target", action="store_true", help="also the char GPT's CPU seconds to val 2.3")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.tasks:
        print(step_table(name, TASK_STEPS[name]), end="\n\n", flush=True)
    if args.to_target:
        print(target_table())


if __name__ == "__main__":
    main()
