"""What the quadratic-model step costs, in CPU time: `python -m benchmarks.quadratic_step_time [--to-target [TASK ...]]`.

CPU time (time.process_time / time.thread_time, one intra-op thread) instead of wall time, so that
other processes on a shared machine do not count. Two tables, printed as markdown:

1. Per task (digits MLP, deep autoencoder, character GPT), the medians of the forward+backward
   and of `model.step()` for kfac at its defaults (the quadratic step, no lr), the same with
   damping_every=1 (ρ on every step) and with `quadratic_rows` a quarter of the batch's rows of z, kfac at a
   fixed lr (the plain K-FAC step) and AdamW, their steps interleaved in one process, and the ratio of each whole step to AdamW's.
2. With `--to-target`: per task (the deep autoencoder and the char GPT unless named), the steps and
   CPU seconds to the benchmark's validation and training-loss targets (benchmarks/tasks.py) of
   AdamW at its best lr (the same for both targets on these two tasks), kfac and ekfac at their
   defaults, and kfac with `quadratic_rows` (`--rows`, a quarter of the rows of z unless given), on
   the same batches, interleaved step by step (one step of each in turn, so that a load changing
   during the measurement slows them alike); each run stops once both targets are reached.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

import gnfx
from benchmarks.tasks import TASKS

TASK_STEPS = {"digits_mlp": 60, "digits_autoencoder": 60, "char_gpt": 20}
WARM = 5  # untimed first steps (capture, first refresh)
# AdamW's best lr of its grid (1e-3, 3e-3, 1e-2) for both targets (benchmarks/results/quadratic_step.md)
ADAMW_LR = {"digits_autoencoder": 1e-2, "char_gpt": 3e-3}


def output_rows(batch) -> int:
    """The rows of z of a batch (x, y), quadratic_rows' unit: one per class label, one per target row."""
    y = batch[1]
    return y.numel() // y.shape[-1] if y.is_floating_point() else y.numel()


def step_table(name: str, steps: int) -> str:
    task = TASKS[name]()
    batches = list(itertools.islice(task.batches(seed=0), steps))
    rows = output_rows(batches[0]) // 4
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


def to_target(label: str, module, step, zero_grad, task, batches):
    """One run to the task's validation and training-loss targets, evaluated every `task.eval_every`
    steps, stopping once both are reached: a generator that yields after each step (target_table
    interleaves the runs) and returns one markdown row, the steps and CPU seconds (fwd+bwd+step,
    evaluations not counted) to each target. It keeps its own random state (fisher="mc" samples
    labels), the one of its creation, so that its steps are those it would take alone right after
    its model was made."""
    return _run(label, module, step, zero_grad, task, batches, torch.get_rng_state())


def _run(label, module, step, zero_grad, task, batches, rng):
    """to_target's generator, from the random state `rng`."""
    cpu, reached = 0.0, {}
    for i, (x, y) in enumerate(batches, 1):
        torch.set_rng_state(rng)
        began = time.thread_time()
        task.loss_fn(module(x), y).backward()
        step()
        zero_grad()
        cpu += time.thread_time() - began
        rng = torch.get_rng_state()
        if i % task.eval_every == 0:
            for name, loss, target in (("val", task.eval_loss, task.target), ("train", task.fit_loss, task.train_target)):
                if name not in reached and loss(module) <= target:
                    reached[name] = (i, cpu)
            if len(reached) == 2:
                break
        yield
    cells = [f"{reached[n][0]} | {reached[n][1]:.2f}" if n in reached else f"> {i} | –" for n in ("val", "train")]
    return f"| {label} | {' | '.join(cells)} |"


def interleaved(runs: list) -> list[str]:
    """The rows of the `to_target` runs, stepped in turn (one step of each, then the next): a load
    that changes during the measurement slows them alike."""
    rows, active = [None] * len(runs), dict(enumerate(runs))
    while active:
        for k, run in list(active.items()):
            try:
                next(run)
            except StopIteration as done:
                rows[k] = done.value
                del active[k]
    return rows


def target_table(name: str, rows: int | None, steps: int | None = None) -> str:
    """Steps and CPU seconds to the benchmark task's targets: AdamW at its best lr, kfac and ekfac at
    their defaults (no lr), and kfac with the products on `rows` rows of z (`quadratic_rows`; None: a
    quarter of the batch's), within `steps` (the task's max_steps unless given), the runs interleaved
    step by step."""
    task = TASKS[name]()
    steps = steps or task.max_steps
    batches = list(itertools.islice(task.batches(seed=0), steps))
    reference = task.make_model(seed=0)
    adamw = torch.optim.AdamW(reference.parameters(), lr=ADAMW_LR[name])
    lines = [f"{name}: val {task.target}, train {task.train_target} (evaluated every {task.eval_every} steps, at "
             f"most {steps}; CPU s of fwd+bwd+step, one thread, the runs interleaved)", "",
             "| run | steps to val | CPU s to val | steps to train | CPU s to train |", "|---|---|---|---|---|"]
    runs = [to_target(f"AdamW {ADAMW_LR[name]:g}", reference, adamw.step, adamw.zero_grad, task, batches)]
    rows = rows or output_rows(batches[0]) // 4
    for label, optimizer, hp in (("kfac defaults", "kfac", {}), ("ekfac defaults", "ekfac", {}),
                                 (f"kfac defaults, quadratic_rows={rows}", "kfac", {"quadratic_rows": rows})):
        c = gnfx.compile(task.make_model(seed=0), optimizer=optimizer, loss=task.loss_name,
                         example_inputs=(batches[0][0],), **hp)
        runs.append(to_target(label, c, c.step, c.zero_grad, task, batches))  # its random state: from here
    return "\n".join(lines + interleaved(runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=list(TASK_STEPS), default=list(TASK_STEPS))
    parser.add_argument("--to-target", nargs="*", choices=list(ADAMW_LR), default=None,
                        help="also the steps and CPU seconds to these tasks' targets (none named: the "
                             "autoencoder and the char GPT)")
    parser.add_argument("--rows", type=int, default=None, help="quadratic_rows (rows of z) of the last run of --to-target")
    parser.add_argument("--no-steps", action="store_true", help="skip the per-step table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in [] if args.no_steps else args.tasks:
        print(step_table(name, TASK_STEPS[name]), end="\n\n", flush=True)
    for name in [] if args.to_target is None else args.to_target or list(ADAMW_LR):
        print(target_table(name, args.rows), end="\n\n", flush=True)


if __name__ == "__main__":
    main()
